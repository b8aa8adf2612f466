"""The token layout of the stage-2 prior, and sampling image tokens after their condition.

Image codes keep their ids 0..n_embed-1. Condition tokens come after them, so they never collide with
codes (taming reuses code ids for its start and class tokens):
    n_embed                          start token (unconditional)
    n_embed + 1 + c                  class c
    n_embed + 1 + n_classes          "no class" (classifier-free guidance: dropped labels, the unconditional pass)
    n_embed + 2 + n_classes + j      code j of the condition tokenizer (segmentation / depth maps)
A sequence is [condition tokens, image tokens in raster order]: one start or class token, or the
`cond_len` tokens of a condition map; the GPT predicts each image token from everything before it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .sampling import pick
from .transformer import GPT


@dataclass
class TokenLayout:
    n_embed: int
    n_classes: int = 0  # 0: unconditional, or spatially conditioned
    cond_n_embed: int = 0  # > 0: spatially conditioned on maps tokenized into this many codes
    cond_len: int = 0  # condition tokens per sequence (the condition grid's h * w)
    # "taming": a converted original transformer, whose start token (`sos_token`), class ids and condition
    # codes reuse the code ids 0.. (no "no class" token, so no guidance)
    scheme: str = "vqgan"
    sos_token: int = 0

    @property
    def taming(self) -> bool:
        return self.scheme == "taming"

    @property
    def start_token(self) -> int:
        return self.sos_token if self.taming else self.n_embed

    @property
    def class_offset(self) -> int:
        return 0 if self.taming else self.n_embed + 1

    @property
    def null_class(self) -> int:
        if self.taming:
            raise ValueError("an original taming transformer has no 'no class' token: guidance needs a prior "
                             "trained with label dropout")
        return self.n_embed + 1 + self.n_classes

    @property
    def cond_offset(self) -> int:
        return 0 if self.taming else self.n_embed + 2 + self.n_classes

    @property
    def vocab_size(self) -> int:
        return max(self.n_embed, self.cond_n_embed) if self.taming else self.cond_offset + self.cond_n_embed

    @property
    def spatial(self) -> bool:
        return self.cond_n_embed > 0

    @property
    def prefix_len(self) -> int:
        return self.cond_len if self.spatial else 1

    def condition_tokens(self, labels: torch.Tensor | None, batch: int, device: torch.device,
                         cond: torch.Tensor | None = None) -> torch.Tensor:
        """(B, prefix_len) condition tokens. Spatial: the condition map's tokens `cond` (B, hc, wc).
        Otherwise one token; labels < 0 (or no labels) give the start / "no class" token."""
        if self.spatial:
            if cond is None:
                raise ValueError("this prior is conditioned on a map: give its condition tokens")
            return cond.to(device).long().reshape(cond.shape[0], -1) + self.cond_offset
        if self.n_classes == 0 or labels is None:
            if self.n_classes and self.taming:
                raise ValueError("this class-conditional prior needs a class label")
            return torch.full((batch, 1), self.start_token if self.n_classes == 0 else self.null_class,
                              dtype=torch.long, device=device)
        labels = labels.to(device).long()
        if self.taming:
            return labels[:, None]
        tokens = torch.where(labels >= 0, self.class_offset + labels.clamp_min(0),
                             torch.full_like(labels, self.null_class))
        return tokens[:, None]

    def to_dict(self) -> dict:
        return {"layout": self.scheme, "n_embed": self.n_embed, "n_classes": self.n_classes,
                "cond_n_embed": self.cond_n_embed, "cond_len": self.cond_len, "sos_token": self.sos_token}

    @classmethod
    def from_dict(cls, d: dict) -> "TokenLayout":
        return cls(int(d["n_embed"]), int(d.get("n_classes", 0)), int(d.get("cond_n_embed", 0)),
                   int(d.get("cond_len", 0)), d.get("layout", "vqgan"), int(d.get("sos_token", 0)))


def guided_context(layout: TokenLayout, prefix: torch.Tensor, labels: torch.Tensor | None,
                   guidance_scale: float) -> tuple[torch.Tensor, bool]:
    """Classifier-free guidance runs the "no class" sequences in the same batch: (context, guided)."""
    guided = guidance_scale != 1.0 and layout.n_classes > 0 and labels is not None
    if guided:
        prefix = torch.cat([prefix, torch.full_like(prefix, layout.null_class)], 0)
    return prefix, guided


def next_token(logits: torch.Tensor, layout: TokenLayout, guided: bool, guidance_scale: float,
               **pick_kwargs) -> torch.Tensor:
    """Last-position logits (B or 2B, vocab) -> image codes (B,): guidance mix, then only codes may follow."""
    logits = logits.float()
    if guided:
        c, u = logits.chunk(2)
        logits = u + guidance_scale * (c - u)
    return pick(logits[:, :layout.n_embed], **pick_kwargs)


def _keep_mask(keep: torch.Tensor | None, known: torch.Tensor | None, batch: int, n: int) -> torch.Tensor | None:
    if known is None:
        return None
    keep = torch.ones(n, dtype=torch.bool) if keep is None else keep.bool()
    return keep.reshape(-1, n).expand(batch, n).to(known.device)


@torch.inference_mode()
def sample_images_tokens(gpt: GPT, layout: TokenLayout, n_tokens: int, batch: int,
                         labels: torch.Tensor | None = None, cond: torch.Tensor | None = None,
                         known: torch.Tensor | None = None, keep: torch.Tensor | None = None,
                         guidance_scale: float = 1.0, temperature: float = 1.0, top_k: int | None = None,
                         top_p: float | None = None, greedy: bool = False, generator: torch.Generator | None = None,
                         use_cache: bool = True) -> torch.Tensor:
    """Sample `n_tokens` image tokens (B, n_tokens) in raster order after the condition tokens.

    Completion: `known` (B, n_tokens) tokens and `keep` ((n_tokens,) or (B, n_tokens) bool; default all)
    say which positions are given; the rest are sampled, each seeing every earlier position, given or
    sampled. Leading given positions are fed as one prefix. With a guidance scale != 1 and class labels,
    each step mixes the conditional and the "no class" logits: uncond + scale * (cond - uncond), both
    passes batched and cached."""
    device = next(gpt.parameters()).device
    prefix = layout.condition_tokens(labels, batch, device, cond)
    keep_mask = _keep_mask(keep, known, batch, n_tokens)
    lead = 0
    if keep_mask is not None:
        known = known.to(device).long().reshape(batch, n_tokens)
        free = (~keep_mask).any(0).nonzero()
        lead = int(free[0]) if len(free) else n_tokens
    out = known[:, :lead] if lead else prefix[:, :0]
    context, guided = guided_context(layout, torch.cat([prefix, out], 1), labels, guidance_scale)
    if context.shape[1] + n_tokens - lead - 1 > gpt.config.block_size:
        raise ValueError(f"{layout.prefix_len} condition + {n_tokens} image tokens exceed block_size "
                         f"{gpt.config.block_size} + 1")
    cache = gpt.new_cache() if use_cache else None
    seq, step_input = context, context
    picks = dict(temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy, generator=generator)
    for pos in range(lead, n_tokens):
        logits = (gpt(step_input, cache) if use_cache else gpt(seq))[:, -1]
        token = next_token(logits, layout, guided, guidance_scale, **picks)
        if keep_mask is not None:
            token = torch.where(keep_mask[:, pos], known[:, pos], token)
        out = torch.cat([out, token[:, None]], 1)
        step_input = torch.cat([token, token])[:, None] if guided else token[:, None]
        if not use_cache:
            seq = torch.cat([seq, step_input], 1)
    return out


@dataclass
class Prior:
    """A trained (or converted) prior with what it needs around it: its token layout, the tokenizer that
    decodes its tokens, the grid it was trained on, and the condition tokenizer of a spatial prior."""

    gpt: GPT
    layout: TokenLayout
    tokenizer: "VQModel"  # noqa: F821
    grid: tuple[int, int]
    conditioning: dict
    cond_tokenizer: "VQModel | None" = None  # noqa: F821

    @property
    def class_names(self) -> list[str]:
        return list(self.conditioning.get("class_names") or [])

    def label_id(self, label: str) -> int:
        """A class name or id -> the class id."""
        from .errors import UserError

        names = self.class_names
        if not self.layout.n_classes:
            raise UserError("this prior is not class-conditional; leave out --label")
        if label in names:
            return names.index(label)
        if label.isdigit() and int(label) < self.layout.n_classes:
            return int(label)
        raise UserError(f"--label {label!r} is neither a class name ({', '.join(names) or 'none recorded'}) nor a "
                        f"class id below {self.layout.n_classes}")

    @torch.no_grad()
    def encode_maps(self, maps: torch.Tensor) -> torch.Tensor:
        """Condition maps as the condition tokenizer's input (B, C, H, W) -> condition tokens (B, h, w)."""
        if self.cond_tokenizer is None:
            raise ValueError("this prior has no condition tokenizer")
        return self.cond_tokenizer.encode(maps.to(next(self.cond_tokenizer.parameters()).device))

    def sample(self, batch: int, grid: tuple[int, int] | None = None, labels: torch.Tensor | None = None,
               cond: torch.Tensor | None = None, known: torch.Tensor | None = None, keep: torch.Tensor | None = None,
               progress: bool = False, **kwargs) -> torch.Tensor:
        """(B, H, W) tokens on `grid` (default: the training grid; larger grids use the sliding window).
        `cond`: condition tokens (B, H, W) of a spatial prior; `known`/`keep`: completion (see
        sample_images_tokens)."""
        grid = tuple(grid or (cond.shape[1:] if cond is not None else self.grid))
        if grid == tuple(self.grid):
            n = grid[0] * grid[1]
            flat = None if known is None else known.reshape(batch, n)
            mask = None if keep is None else keep.reshape(-1, n)
            tokens = sample_images_tokens(self.gpt, self.layout, n, batch, labels, cond, flat, mask, **kwargs)
            return tokens.reshape(batch, *grid)
        from .sliding import sample_sliding_window

        return sample_sliding_window(self.gpt, self.layout, grid, tuple(self.grid), batch, labels, cond, known, keep,
                                     progress=progress, **kwargs)


def load_prior(path: str, tokenizer: str | None = None, device: str | torch.device = "cpu",
               force: bool = False) -> Prior:
    """A trained prior (a `train-transformer` run or its model/) or a converted taming transformer.

    `tokenizer` replaces the prior's own; it must be the same weights (the fingerprint the prior records),
    else its samples would decode to noise, unless `force`."""
    from pathlib import Path

    from .checkpoint import CONFIG_FILE, fingerprint, load_model, read_yaml_mapping
    from .errors import UserError

    p = Path(path)
    if p.is_file():  # an original .ckpt: converted in memory
        from .convert.taming import load_taming_transformer

        gpt, vq, conditioning, cond_vq = load_taming_transformer(p)
        grid = (vq.config.latent_size, vq.config.latent_size)  # the grid it was trained on, whatever decodes it
        if tokenizer:
            vq = _same_tokenizer(load_model(tokenizer).eval(), vq.quantize.n_embed, fingerprint(vq),
                                 f"--tokenizer {tokenizer}", path, _USE_OWN, force)
        layout = TokenLayout.from_dict({"n_embed": vq.quantize.n_embed, **conditioning})
        return Prior(gpt.to(device), layout, vq.to(device), grid, conditioning,
                     cond_vq.to(device) if cond_vq is not None else None)
    model_dir = p / "model" if (p / "model" / CONFIG_FILE).is_file() else p
    gpt = load_model(model_dir, map_location=device)
    if not isinstance(gpt, GPT):
        raise UserError(f"{path} is a tokenizer, not a transformer prior; give a train-transformer run, its model/ "
                        "folder, or a taming Net2NetTransformer (its .ckpt or `vqgan convert` output)")
    conditioning = read_yaml_mapping(model_dir / CONFIG_FILE, "model config").get("conditioning") or {}

    def tokenizer_at(own: str, recorded: str | None, what: str):
        """The copy bundled in the prior's folder, else the one at the path it records (checked: it may have
        been retrained since)."""
        if (model_dir / own).is_dir():
            return load_model(model_dir / own, map_location=device).eval()
        if not recorded:
            raise UserError(f"{path} does not say which {what} it uses; pass --tokenizer")
        if not Path(recorded).exists():
            raise UserError(f"the {what} {recorded} recorded by {path} is missing; pass --tokenizer")
        codes = conditioning.get("n_embed" if own == "tokenizer" else "cond_n_embed")
        return _same_tokenizer(load_model(recorded, map_location=device).eval(), codes,
                               conditioning.get(f"{own}_fingerprint"), f"the {what} {recorded} (recorded by it)", path,
                               "pass --tokenizer with the one it was trained with", force)

    if tokenizer:
        recorded = conditioning.get("tokenizer_fingerprint")
        if recorded is None and (model_dir / "tokenizer").is_dir():  # converted before fingerprints were recorded
            recorded = fingerprint(load_model(model_dir / "tokenizer"))
        vq = _same_tokenizer(load_model(tokenizer, map_location=device).eval(), conditioning.get("n_embed"), recorded,
                             f"--tokenizer {tokenizer}", path, _USE_OWN, force)
    else:
        vq = tokenizer_at("tokenizer", conditioning.get("tokenizer"), "tokenizer")
    cond_vq = None
    if conditioning.get("cond_n_embed"):
        cond_vq = tokenizer_at("cond_tokenizer", conditioning.get("cond_tokenizer"), "condition tokenizer")
    grid = tuple(conditioning.get("grid") or (vq.config.latent_size, vq.config.latent_size))
    # converted taming transformers written before the layout was recorded share code ids with conditions
    layout = TokenLayout.from_dict({"layout": "taming", "n_embed": vq.quantize.n_embed, **conditioning})
    return Prior(gpt.eval(), layout, vq, grid, conditioning, cond_vq)


_USE_OWN = "leave out --tokenizer to use the prior's own"


def _same_tokenizer(model, codes: int | None, expected: str | None, source: str, prior: str, fix: str,
                    force: bool):
    """`model` when its weights are those the prior was trained on: the fingerprint `expected` (unless
    `force`) and `codes` codes (even with `force`: the prior's codes would not index another codebook).
    What the prior does not record is not checked."""
    from .checkpoint import fingerprint
    from .errors import UserError

    if codes and int(codes) != model.quantize.n_embed:
        raise UserError(f"{source} has {model.quantize.n_embed} codes, but {prior} was trained on a codebook of "
                        f"{codes}; {fix}")
    if expected and not force and (mine := fingerprint(model)) != expected:
        raise UserError(f"{source} is tokenizer {mine}, but {prior} was trained on the tokens of tokenizer "
                        f"{expected}: its samples would decode to noise; {fix}, or pass --force")
    return model
