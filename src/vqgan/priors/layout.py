"""The token layout of a stage-2 prior: which token ids hold image codes and which hold the condition.

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
    def from_dict(cls, d: dict) -> TokenLayout:
        return cls(int(d["n_embed"]), int(d.get("n_classes", 0)), int(d.get("cond_n_embed", 0)),
                   int(d.get("cond_len", 0)), d.get("layout", "vqgan"), int(d.get("sos_token", 0)))
