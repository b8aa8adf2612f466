"""Which earlier tokens the prior sees before each position: the policies of the sampling loop.

A policy maps each position of the token grid (raster order, flat index) to a `Window`: the grid region it
sees (its condition map is cropped to it), the flat positions of that region in the order the prior reads
them, and the place of the sampled position in that order (everything before it is context). Consecutive
positions with the same window key extend one sequence, so the loop keeps its KV cache across them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class Window:
    key: tuple[int, int]  # the same key: the same sequence, extended (the KV cache carries over)
    region: tuple[slice, slice] | None  # rows, columns of the grid it covers; None: all of it
    positions: slice | torch.Tensor  # flat grid positions of the window, in the prior's reading order
    place: int  # the sampled position's index in `positions`


class Windows(Protocol):
    def __call__(self, pos: int) -> Window: ...


class WholeSequence:
    """Every earlier position is context: sampling on the grid the prior was trained on (or any sequence
    that fits its block)."""

    def __init__(self, n: int):
        self.positions = slice(0, n)

    def __call__(self, pos: int) -> Window:
        return Window((0, 0), None, self.positions, pos)


def window_origin(i: int, j: int, grid: tuple[int, int], window: tuple[int, int]) -> tuple[int, int]:
    """Top-left corner of the window around (i, j), clamped inside the grid."""
    (H, W), (h, w) = grid, window
    return min(max(i - h // 2, 0), H - h), min(max(j - w // 2, 0), W - w)


class SlidingWindow:
    """Grids larger than the prior was trained on (Esser et al. 2021, sec. 3.2). The prior saw `window` = (h, w)
    grids; position (i, j) of the (H, W) grid sees the h x w window centred on it as far as the borders allow,
    in the window's own raster order, up to the position's place in it. Everything before that place is already
    sampled, so each position sees its neighbourhood above and to the left. Near the borders (or when the grid
    is only as wide as the window) consecutive positions share a window, and the cache carries over.
    With `depth` codes per position, the loop's positions are codes: the depths of a grid position follow
    each other in one window."""

    def __init__(self, grid: tuple[int, int], window: tuple[int, int], device: torch.device | None = None,
                 depth: int = 1):
        (H, W), (h, w) = grid, window
        if H < h or W < w:
            raise ValueError(f"grid {H}x{W} is smaller than the window {h}x{w}; sample it directly")
        self.grid, self.window, self.depth = grid, window, depth
        self._flat = torch.arange(H * W * depth, device=device).reshape(H, W, depth)
        self._positions: dict[tuple[int, int], torch.Tensor] = {}

    def __call__(self, pos: int) -> Window:
        (_, W), (h, w) = self.grid, self.window
        cell, d = divmod(pos, self.depth)
        i, j = divmod(cell, W)
        i0, j0 = window_origin(i, j, self.grid, self.window)
        if (i0, j0) not in self._positions:
            self._positions[i0, j0] = self._flat[i0:i0 + h, j0:j0 + w].reshape(-1)
        region = (slice(i0, i0 + h), slice(j0, j0 + w))
        return Window((i0, j0), region, self._positions[i0, j0], ((i - i0) * w + (j - j0)) * self.depth + d)
