"""Classifier-free guidance (Ho & Salimans 2022): mix the predictions for the asked class with those for
the "no class" token, uncond + scale * (cond - uncond). Both run in one batch: rows 0..B-1 carry the class,
rows B..2B-1 the same tokens after the "no class" token, so one KV cache serves both."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .layout import TokenLayout


@dataclass(frozen=True)
class Guidance:
    scale: float
    null_token: int  # the "no class" token of the unconditional rows

    @classmethod
    def of(cls, layout: TokenLayout, labels: torch.Tensor | None, scale: float) -> Guidance | None:
        """The guidance to apply, or None where it changes nothing (scale 1, no classes or no labels)."""
        if scale == 1.0 or not layout.n_classes or labels is None:
            return None
        return cls(scale, layout.null_class)

    def context(self, prefix: torch.Tensor) -> torch.Tensor:
        """Condition tokens (B, P) -> (2B, P): the "no class" rows after the class rows."""
        return torch.cat([prefix, torch.full_like(prefix, self.null_token)])

    @staticmethod
    def pair(tokens: torch.Tensor) -> torch.Tensor:
        """Image tokens (B, T) -> (2B, T): both halves see the same image tokens."""
        return torch.cat([tokens, tokens])

    def mix(self, logits: torch.Tensor) -> torch.Tensor:
        """(2B, V) -> (B, V)."""
        cond, uncond = logits.float().chunk(2)
        return uncond + self.scale * (cond - uncond)
