"""The token layout of the stage-2 prior: how condition tokens precede the image tokens.

Image codes keep their ids 0..n_embed-1. Condition tokens come after them, so they never collide with
codes (taming reuses code ids for its start and class tokens):
    n_embed                     start token (unconditional)
    n_embed + 1 + c             class c
    n_embed + 1 + n_classes     "no class" (classifier-free guidance: dropped labels, the unconditional pass)
A sequence is [condition token, image tokens in raster order]; the GPT predicts each image token from
everything before it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .sampling import filter_logits
from .transformer import GPT


@dataclass
class TokenLayout:
    n_embed: int
    n_classes: int = 0  # 0: unconditional

    @property
    def start_token(self) -> int:
        return self.n_embed

    @property
    def null_class(self) -> int:
        return self.n_embed + 1 + self.n_classes

    @property
    def vocab_size(self) -> int:
        return self.n_embed + 2 + self.n_classes

    def condition_tokens(self, labels: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
        """(B, 1) condition tokens; labels < 0 (or no labels) give the start / "no class" token."""
        if self.n_classes == 0 or labels is None:
            return torch.full((batch, 1), self.start_token if self.n_classes == 0 else self.null_class,
                              dtype=torch.long, device=device)
        labels = labels.to(device).long()
        tokens = torch.where(labels >= 0, self.n_embed + 1 + labels.clamp_min(0), torch.full_like(labels, self.null_class))
        return tokens[:, None]


@torch.no_grad()
def sample_images_tokens(gpt: GPT, layout: TokenLayout, n_tokens: int, batch: int,
                         labels: torch.Tensor | None = None, prefix: torch.Tensor | None = None,
                         guidance_scale: float = 1.0, temperature: float = 1.0, top_k: int | None = None,
                         top_p: float | None = None, generator: torch.Generator | None = None,
                         use_cache: bool = True) -> torch.Tensor:
    """Sample `n_tokens` image tokens (B, n_tokens) after the condition token and the given `prefix` tokens
    (image completion). With a guidance scale != 1 and class labels, each step mixes the conditional and the
    "no class" logits: uncond + scale * (cond - uncond), both passes batched and cached."""
    device = next(gpt.parameters()).device
    cond = layout.condition_tokens(labels, batch, device)
    given = prefix.to(device).long() if prefix is not None else cond[:, :0]
    guided = guidance_scale != 1.0 and layout.n_classes > 0 and labels is not None
    context = torch.cat([cond, given], 1)
    if guided:
        null = torch.full_like(cond, layout.null_class)
        context = torch.cat([context, torch.cat([null, given], 1)], 0)
    if context.shape[1] + n_tokens - 1 > gpt.config.block_size:
        raise ValueError(f"{context.shape[1]} context + {n_tokens} tokens exceed block_size {gpt.config.block_size}")
    cache = gpt.new_cache() if use_cache else None
    seq, step_input, out = context, context, []
    for _ in range(n_tokens):
        logits = (gpt(step_input, cache) if use_cache else gpt(seq))[:, -1].float()
        if guided:
            c, u = logits.chunk(2)
            logits = u + guidance_scale * (c - u)
        logits[:, layout.n_embed:] = float("-inf")  # only image codes follow the condition
        probs = filter_logits(logits / max(temperature, 1e-8), top_k, top_p).softmax(-1)
        token = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
        out.append(token)
        step_input = torch.cat([token, token], 0) if guided else token
        seq = torch.cat([seq, step_input], 1)
    return torch.cat(out, 1)


def load_prior(path: str, tokenizer: str | None = None, device: str | torch.device = "cpu"):
    """(GPT, conditioning dict, tokenizer VQModel, grid) for a trained prior or a converted taming transformer."""
    from pathlib import Path

    import yaml

    from .checkpoint import load_model
    from .errors import UserError

    p = Path(path)
    model_dir = p / "model" if (p / "model" / "config.yaml").is_file() else p
    gpt = load_model(model_dir, map_location=device)
    if not isinstance(gpt, GPT):
        raise UserError(f"{path} is not a transformer prior")
    conditioning = (yaml.safe_load((model_dir / "config.yaml").read_text()) or {}).get("conditioning") or {}
    tok_path = tokenizer or (str(model_dir / "tokenizer") if (model_dir / "tokenizer").is_dir()
                             else conditioning.get("tokenizer"))
    if not tok_path:
        raise UserError(f"{path} does not say which tokenizer decodes its tokens; pass --tokenizer")
    vq = load_model(tok_path, map_location=device)
    grid = tuple(conditioning.get("grid") or (vq.config.latent_size, vq.config.latent_size))
    return gpt.eval(), conditioning, vq, grid


@torch.no_grad()
def sample_prior(gpt: GPT, conditioning: dict, grid: tuple[int, int], batch: int, labels: torch.Tensor | None = None,
                 **kwargs) -> torch.Tensor:
    """(B, h, w) token grids from a prior in this project's layout or taming's (condition token = a code id)."""
    n = grid[0] * grid[1]
    if conditioning.get("layout") == "vqgan":
        layout = TokenLayout(conditioning["n_embed"], conditioning.get("n_classes", 0))
        tokens = sample_images_tokens(gpt, layout, n, batch, labels, **kwargs)
    else:  # taming: the start token, or the class id, shares the vocabulary with the codes
        from .sampling import sample

        kwargs.pop("guidance_scale", None)
        kwargs.pop("prefix", None)
        first = labels.long()[:, None] if labels is not None else torch.full(
            (batch, 1), int(conditioning.get("sos_token", 0)), dtype=torch.long)
        tokens = sample(gpt, first.to(next(gpt.parameters()).device), n, **kwargs)
    return tokens.reshape(batch, *grid)
