"""The token layout of a stage-2 prior: which token ids hold image codes and which hold the condition.

Image codes take the ids 0..n_embed-1. With one code per position (VQ) a code is its own id. With several
codes per position (a residual quantizer's depths) or several levels, each (level, depth) stream of the code
spec gets its own id range, one after the other, so the prior can tell a coarse code from a fine one:
the id of code c at stream k is offset_k + c (offset_k = the vocabularies of the streams before it).
Condition tokens come after the image codes, so they never collide with them (taming reuses code ids for
its start and class tokens):
    n_embed                          start token (unconditional)
    n_embed + 1 + c                  class c
    n_embed + 1 + n_classes          "no class" (classifier-free guidance: dropped labels, the unconditional pass)
    n_embed + 2 + n_classes + j      id j of the condition tokenizer's codes (segmentation / depth maps)
A sequence is [condition tokens, image tokens in the code spec's row order (codes.py): raster order, the
depths of a position consecutive]; the GPT predicts each image token from everything before it, and
sampling draws each one among its own stream's ids.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..codes import CodeSpec


def slot_offsets(spec: CodeSpec | None, grids: list[tuple[int, int]] | None, length: int,
                 device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(offset, vocab) of each place of a row of `length` codes: token id = offset + code, code < vocab.
    None when a code is its own id (one stream), which keeps that case free of any arithmetic."""
    if spec is None or len(spec.streams) == 1:
        return None
    vocab = spec.streams
    starts = [0]
    for v in vocab[:-1]:
        starts.append(starts[-1] + v)
    if len(spec.levels) == 1:  # one level: the depths repeat at every position, on any grid
        depth = spec.levels[0].depth
        if length % depth:
            raise ValueError(f"{length} codes are not whole positions of depth {depth}")
        reps = length // depth
        off = torch.tensor(starts, device=device).repeat(reps)
        return off, torch.tensor(vocab, device=device).repeat(reps)
    if grids is None:
        raise ValueError("a code spec of several levels needs the grid of each level")
    off, voc, k = [], [], 0
    for level, (h, w) in zip(spec.levels, grids):
        ks = list(range(k, k + level.depth))
        off += [starts[i] for i in ks] * (h * w)
        voc += [vocab[i] for i in ks] * (h * w)
        k += level.depth
    if len(off) != length:
        raise ValueError(f"grids {grids} hold {len(off)} codes, not {length}")
    return torch.tensor(off, device=device), torch.tensor(voc, device=device)


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
    codes: CodeSpec | None = None  # the image tokenizer's code spec (None: one code per position, n_embed codes)
    cond_codes: CodeSpec | None = None  # the condition tokenizer's

    @classmethod
    def for_codes(cls, codes: CodeSpec, n_classes: int = 0, cond_codes: CodeSpec | None = None,
                  cond_len: int = 0) -> TokenLayout:
        """The layout of a prior over tokens of `codes` (and condition tokens of `cond_codes`)."""
        return cls(sum(codes.streams), n_classes, sum(cond_codes.streams) if cond_codes else 0,
                   cond_len, codes=codes, cond_codes=cond_codes)

    # -- image codes <-> token ids ------------------------------------------------------------------
    def code_slots(self, length: int, grids: list[tuple[int, int]] | None = None,
                   device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(offset, vocab) per place of an image row (see slot_offsets); None: codes are their own ids."""
        return slot_offsets(self.codes, grids, length, device)

    def codes_to_tokens(self, codes: torch.Tensor, grids: list[tuple[int, int]] | None = None) -> torch.Tensor:
        """Image code rows (B, L) -> token ids."""
        slots = self.code_slots(codes.shape[1], grids, codes.device)
        return codes.long() if slots is None else codes.long() + slots[0]

    def tokens_to_codes(self, tokens: torch.Tensor, grids: list[tuple[int, int]] | None = None) -> torch.Tensor:
        slots = self.code_slots(tokens.shape[1], grids, tokens.device)
        return tokens if slots is None else tokens - slots[0]

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
            rows = cond.to(device).long().reshape(cond.shape[0], -1)
            slots = slot_offsets(self.cond_codes, None, rows.shape[1], device)
            return rows + self.cond_offset + (0 if slots is None else slots[0])
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
                "cond_n_embed": self.cond_n_embed, "cond_len": self.cond_len, "sos_token": self.sos_token,
                "codes": self.codes.to_dict() if self.codes else None,
                "cond_codes": self.cond_codes.to_dict() if self.cond_codes else None}

    @classmethod
    def from_dict(cls, d: dict) -> TokenLayout:
        codes, cond_codes = (CodeSpec.from_dict(d[k]) if d.get(k) else None for k in ("codes", "cond_codes"))
        return cls(int(d["n_embed"]), int(d.get("n_classes", 0)), int(d.get("cond_n_embed", 0)),
                   int(d.get("cond_len", 0)), d.get("layout", "vqgan"), int(d.get("sos_token", 0)), codes, cond_codes)


def layout_for_store(store, choice: str = "auto", source: str = "the token store") -> TokenLayout:
    """The layout of a new prior over a token store (`data.tokens.TokenStore`): `choice` auto (on the store's
    condition maps when it has them, else on its class labels when it has them), spatial, class or none."""
    from ..errors import UserError

    has_labels = bool((store.labels >= 0).any()) and bool(store.class_names)
    if choice == "auto":
        choice = "spatial" if store.condition else "class" if has_labels else "none"
    if choice == "spatial":
        if not store.condition:
            raise UserError(f"data.conditioning=spatial: {source} has no condition maps; make it with "
                            "`vqgan tokenize ... --cond-maps DIR --cond-tokenizer MODEL`")
        return TokenLayout.for_codes(store.spec, cond_codes=store.cond_spec, cond_len=store.cond_tokens.shape[1])
    if choice == "class":
        if not has_labels:
            raise UserError(f"data.conditioning=class: {source} has no class labels; make it with "
                            "`vqgan tokenize ... --labels folders` (or a CSV/JSON file)")
        return TokenLayout.for_codes(store.spec, len(store.class_names))
    return TokenLayout.for_codes(store.spec)
