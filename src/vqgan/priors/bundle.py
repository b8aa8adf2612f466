"""A prior with what it needs around it: its token layout, the tokenizer that decodes its tokens, the grid
it was trained on, and the condition tokenizer of a spatial prior."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..errors import UserError
from .gpt import GPT
from .layout import TokenLayout
from .sampling import sample_grid, sample_levels

if TYPE_CHECKING:
    from ..tokenizers import Tokenizer, VQModel


@dataclass(frozen=True)
class ArgNames:
    """How errors name what the caller passed: the library's parameter names by default; the command line
    passes its flags (generate.CLI_NAMES)."""

    tokenizer: str = "tokenizer"
    force: str = "force=True"
    label: str = "label"


PARAMETER_NAMES = ArgNames()


@dataclass
class Prior:
    gpt: GPT
    layout: TokenLayout
    tokenizer: Tokenizer
    grid: tuple[int, int]
    conditioning: dict
    cond_tokenizer: VQModel | None = None
    grids: list[tuple[int, int]] | None = None  # the trained grid of each level (a prior over several levels)

    @property
    def levels(self) -> int:
        return len(self.layout.codes.levels) if self.layout.codes is not None else 1

    def level_grids(self, grid: tuple[int, int]) -> list[tuple[int, int]]:
        """The grid of each level for first-level grid `grid` (the prior's `grid` is its first level's)."""
        spec = self.layout.codes
        f = spec.levels[0].factor
        return spec.grids(grid[0] * f, grid[1] * f)

    @property
    def class_names(self) -> list[str]:
        return list(self.conditioning.get("class_names") or [])

    def label_id(self, label: str, names: ArgNames = PARAMETER_NAMES) -> int:
        """A class name or id -> the class id."""
        classes = self.class_names
        if not self.layout.n_classes:
            raise UserError(f"this prior is not class-conditional; leave out {names.label}")
        if label in classes:
            return classes.index(label)
        if label.isdigit() and int(label) < self.layout.n_classes:
            return int(label)
        raise UserError(f"{names.label} {label!r} is neither a class name ({', '.join(classes) or 'none recorded'}) "
                        f"nor a class id below {self.layout.n_classes}")

    @torch.no_grad()
    def encode_maps(self, maps: torch.Tensor) -> torch.Tensor:
        """Condition maps as the condition tokenizer's input (B, C, H, W) -> condition codes (B, h, w, depth)."""
        if self.cond_tokenizer is None:
            raise ValueError("this prior has no condition tokenizer")
        return self.cond_tokenizer.encode(maps.to(next(self.cond_tokenizer.parameters()).device))

    def sample(self, batch: int, grid: tuple[int, int] | None = None, labels: torch.Tensor | None = None,
               cond: torch.Tensor | None = None, known: torch.Tensor | None = None, keep: torch.Tensor | None = None,
               progress: bool = False, **kwargs) -> torch.Tensor:
        """(B, H, W, depth) codes on `grid` (a prior over several levels: a list, one per level, `grid` the first's;
        `known` and `keep` then lists too) (default: the training grid; larger grids slide a window of the
        training grid's size, with a progress bar if `progress`). `cond`: condition codes (B, H, W, depth) of a
        spatial prior; `known`/`keep`: completion; `kwargs`: guidance and token choice (sampling.sample_grid)."""
        grid = tuple(grid or (cond.shape[1:3] if cond is not None else self.grid))
        sliding = grid != tuple(self.grid)
        if self.levels > 1:  # a list of codes per level; `known` / `keep` one per level too
            return sample_levels(self.gpt, self.layout, self.level_grids(grid), batch,
                                 self.grids or self.level_grids(self.grid), labels, cond, known, keep,
                                 progress=progress and sliding, **kwargs)
        return sample_grid(self.gpt, self.layout, grid, batch, tuple(self.grid), labels, cond, known, keep,
                           progress=progress and sliding, **kwargs)
