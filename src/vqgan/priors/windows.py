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
    key: tuple[int, ...]  # the same key: the same sequence, extended (the KV cache carries over)
    region: tuple[slice, slice] | None  # rows, columns of the grid it covers; None: all of it (or several levels)
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


class LevelWindows:
    """A sliding window across the levels of a row [level 0 | level 1 | ...] (VQ-VAE-2: [top | bottom]; codes.py)
    on grids larger than the prior was trained on. The prior saw rows on `windows` (one (h, w) per level, all
    over the same image region). A position of level l sees level l's window centred on it, as SlidingWindow
    does, preceded by the windows of the levels before it in the row over the same image region, whole (they
    are sampled already): the bottom codes of a region are sampled seeing the top codes of that region, as in
    training. Window origins are kept on multiples of each level's grid ratio to the coarsest level, so the
    windows of all levels cover the same pixels. Positions are codes (`depths` per grid position)."""

    def __init__(self, grids: list[tuple[int, int]], windows: list[tuple[int, int]], depths: list[int],
                 device: torch.device | None = None):
        if not len(grids) == len(windows) == len(depths):
            raise ValueError(f"{len(grids)} grids, {len(windows)} windows and {len(depths)} depths: one per level")
        coarse = min(range(len(grids)), key=lambda k: grids[k][0])
        self.ratios = []
        for (H, W), (h, w) in zip(grids, windows):
            r = H // grids[coarse][0]
            if H < h or W < w:
                raise ValueError(f"grid {H}x{W} is smaller than the window {h}x{w}; sample it directly")
            if (H, W) != (grids[coarse][0] * r, grids[coarse][1] * r) or (h, w) != (windows[coarse][0] * r,
                                                                                windows[coarse][1] * r):
                raise ValueError(f"grids {grids} and windows {windows} are not the same regions at each level")
            self.ratios.append(r)
        self.grids, self.windows, self.depths = [tuple(g) for g in grids], [tuple(w) for w in windows], depths
        self.starts, start = [], 0
        self._flat = []
        for (H, W), d in zip(self.grids, depths):
            self.starts.append(start)
            self._flat.append(torch.arange(start, start + H * W * d, device=device).reshape(H, W, d))
            start += H * W * d
        self.length = start
        self._positions: dict[tuple[int, int, int], torch.Tensor] = {}

    def _region(self, k: int, unit: tuple[int, int]) -> tuple[slice, slice]:
        (h, w), r = self.windows[k], self.ratios[k]
        return slice(unit[0] * r, unit[0] * r + h), slice(unit[1] * r, unit[1] * r + w)

    def crop(self, unit: tuple[int, int], levels: int | None = None) -> torch.Tensor:
        """The flat row positions of the window at `unit` (its origin on the coarsest level's grid) over the first
        `levels` levels (default all), in the prior's reading order: a training sequence of a windowed prior."""
        key = (len(self.starts) if levels is None else levels, *unit)
        if key not in self._positions:
            self._positions[key] = torch.cat([self._flat[k][self._region(k, unit)].reshape(-1) for k in range(key[0])])
        return self._positions[key]

    @property
    def units(self) -> tuple[int, int]:
        """How many window origins there are down and across (on the coarsest level's grid)."""
        k = self.ratios.index(1)
        return self.grids[k][0] - self.windows[k][0] + 1, self.grids[k][1] - self.windows[k][1] + 1

    def __call__(self, pos: int) -> Window:
        level = next(k for k in range(len(self.starts) - 1, -1, -1) if pos >= self.starts[k])
        (_, W), (h, w), r, depth = self.grids[level], self.windows[level], self.ratios[level], self.depths[level]
        cell, d = divmod(pos - self.starts[level], depth)
        i, j = divmod(cell, W)
        i0, j0 = window_origin(i, j, self.grids[level], self.windows[level])
        i0, j0 = i0 // r * r, j0 // r * r  # on multiples of r: every level's window covers the same pixels
        i0, j0 = i0 + r * (i - i0 >= h), j0 + r * (j - j0 >= w)  # (a window only r positions wide)
        unit = (i0 // r, j0 // r)  # the origin on the coarsest level's grid
        before = sum(hk * wk * dk for (hk, wk), dk in zip(self.windows[:level], self.depths[:level]))
        return Window((level + 1, *unit), None, self.crop(unit, level + 1),
                      before + ((i - i0) * w + (j - j0)) * depth + d)
