"""Backward-compatible names for sliding-window sampling, now a window policy of the one sampling loop
(vqgan.priors.windows.SlidingWindow, used by vqgan.priors.sampling.sample_grid)."""
from __future__ import annotations

import torch

from .priors.gpt import GPT
from .priors.layout import TokenLayout
from .priors.sampling import sample_grid
from .priors.windows import window_origin

__all__ = ["sample_sliding_window", "window_origin"]


def sample_sliding_window(gpt: GPT, layout: TokenLayout, grid: tuple[int, int], window: tuple[int, int],
                          batch: int, labels: torch.Tensor | None = None, cond: torch.Tensor | None = None,
                          known: torch.Tensor | None = None, keep: torch.Tensor | None = None,
                          progress: bool = False, **sampling) -> torch.Tensor:
    """(B, H, W) tokens of a grid sampled through windows of the prior's training grid (see sample_grid)."""
    return sample_grid(gpt, layout, grid, batch, window, labels, cond, known, keep, progress=progress, **sampling)
