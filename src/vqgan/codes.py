"""The code contract: what a tokenizer's tokens are, in one small spec that model configs, token stores and
priors record.

A tokenizer turns an image into one or more grids of codes (`levels`; VQ-VAE-2 has two, most have one).
Each level has a grid factor (the image side / the grid side) and a depth: how many codes each position
holds (1 for VQ, D for a residual quantizer), each depth with its own vocabulary. The codes of one image
as tensors: one (B, h, w, depth) int64 tensor per level. As one row (token stores, the prior's sequence):
the levels in order, each in raster order of its positions, the depths of a position consecutive.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CodeLevel:
    factor: int  # the image's side over the grid's side
    vocab: tuple[int, ...]  # vocabulary of each depth: codes at depth d lie in [0, vocab[d])

    @property
    def depth(self) -> int:
        return len(self.vocab)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        return height // self.factor, width // self.factor


@dataclass(frozen=True)
class CodeSpec:
    levels: tuple[CodeLevel, ...]

    @classmethod
    def single(cls, factor: int, vocab: int | tuple[int, ...]) -> CodeSpec:
        return cls((CodeLevel(int(factor), (int(vocab),) if isinstance(vocab, int) else tuple(map(int, vocab))),))

    # -- sizes --------------------------------------------------------------------------------
    @property
    def streams(self) -> list[int]:
        """The vocabulary of each (level, depth) stream, in row order of first appearance."""
        return [v for level in self.levels for v in level.vocab]

    @property
    def stream_labels(self) -> list[str]:
        """A name for each stream, for people: "" for a single one; else its level (by grid factor) and depth."""
        many_levels = len(self.levels) > 1
        return ["" if len(self.streams) == 1 else ", ".join(
                    ([f"level f{level.factor}"] if many_levels else []) + ([f"depth {d + 1}"] if level.depth > 1 else []))
                for level in self.levels for d in range(level.depth)]

    def stream_codes(self, codes: torch.Tensor | list[torch.Tensor]) -> list[torch.Tensor]:
        """The codes of each stream, flattened: one 1-D tensor per (level, depth)."""
        return [t[..., d].reshape(-1) for t, level in zip(self.to_levels(codes), self.levels) for d in range(level.depth)]

    @property
    def max_vocab(self) -> int:
        return max(v for level in self.levels for v in level.vocab)

    @property
    def dtype(self) -> str:
        """The narrowest numpy dtype that holds every code (token stores)."""
        return "uint16" if self.max_vocab <= 2**16 else "int32"

    def grids(self, height: int, width: int) -> list[tuple[int, int]]:
        return [level.grid(height, width) for level in self.levels]

    def row_length(self, height: int, width: int) -> int:
        """Codes per image of that size: the length of a flat row."""
        return self.length_on(self.grids(height, width))

    def length_on(self, grids: list[tuple[int, int]]) -> int:
        """The length of a flat row on these grids (one (h, w) per level)."""
        return sum(h * w * level.depth for level, (h, w) in zip(self.levels, grids))

    def bits_per_image(self, height: int, width: int) -> float:
        return sum(h * w * sum(math.log2(v) for v in level.vocab)
                   for level, (h, w) in zip(self.levels, self.grids(height, width)))

    def slot_vocab(self, height: int, width: int) -> list[int]:
        """The vocabulary of each place of a flat row (which depth of which level it holds)."""
        out: list[int] = []
        for level, (h, w) in zip(self.levels, self.grids(height, width)):
            out.extend(list(level.vocab) * (h * w))
        return out

    # -- tensors <-> rows ---------------------------------------------------------------------
    def to_levels(self, codes: torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        """A tokenizer's codes as a list with one (B, h, w, depth) tensor per level, checked against the spec."""
        levels = [codes] if isinstance(codes, torch.Tensor) else list(codes)
        if len(levels) != len(self.levels):
            raise ValueError(f"expected codes for {len(self.levels)} level(s), got {len(levels)}")
        for i, (t, level) in enumerate(zip(levels, self.levels)):
            if t.dim() != 4 or t.shape[-1] != level.depth:
                raise ValueError(f"codes of level {i} must be (B, h, w, {level.depth}), got {tuple(t.shape)}")
        return levels

    def flatten(self, codes: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """Codes (a tensor, or one per level) -> rows (B, row_length)."""
        levels = self.to_levels(codes)
        flat = [t.reshape(t.shape[0], -1) for t in levels]
        return flat[0] if len(flat) == 1 else torch.cat(flat, 1)

    def unflatten(self, rows: torch.Tensor, grids: list[tuple[int, int]]) -> list[torch.Tensor]:
        """Rows (B, row_length) on the given grids (one (h, w) per level) -> one (B, h, w, depth) per level."""
        out, start = [], 0
        for level, (h, w) in zip(self.levels, grids):
            n = h * w * level.depth
            out.append(rows[:, start:start + n].reshape(rows.shape[0], h, w, level.depth))
            start += n
        if start != rows.shape[1]:
            raise ValueError(f"rows of {rows.shape[1]} codes do not fit grids {grids} with depths "
                             f"{[level.depth for level in self.levels]}")
        return out

    def check_range(self, codes: torch.Tensor | list[torch.Tensor]) -> None:
        """Every code inside its depth's vocabulary; a one-line error naming the first level and depth that is not."""
        for i, (t, level) in enumerate(zip(self.to_levels(codes), self.levels)):
            if t.numel() == 0:
                continue
            lo, hi = t.reshape(-1, level.depth).aminmax(dim=0)
            for d, vocab in enumerate(level.vocab):
                if int(lo[d]) < 0 or int(hi[d]) >= vocab:
                    where = f"level {i} depth {d}" if len(self.levels) > 1 or level.depth > 1 else "token"
                    raise ValueError(f"{where} indices must lie in [0, {vocab}), got range [{int(lo[d])}, {int(hi[d])}]")

    # -- files --------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"levels": [{"factor": level.factor, "vocab": list(level.vocab)} for level in self.levels]}

    @classmethod
    def from_dict(cls, data: dict) -> CodeSpec:
        return cls(tuple(CodeLevel(int(level["factor"]), tuple(int(v) for v in level["vocab"]))
                         for level in data["levels"]))

    def describe(self) -> str:
        parts = [f"f{level.factor} x {level.depth} x {'/'.join(map(str, sorted(set(level.vocab))))}"
                 for level in self.levels]
        return "; ".join(parts)
