"""Finite scalar quantization (Mentzer et al. 2023, "Finite Scalar Quantization: VQ-VAE Made Simple",
arXiv:2309.15505).

Each of the `len(levels)` channels is bounded to a few values and rounded; the code of a position is the
tuple of rounded values, its token the mixed-radix number they spell. There is no codebook to learn, to
collapse or to restart, and no auxiliary loss: the implicit codebook is the grid prod(levels).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..config import QuantizerConfig
from ..errors import UserError
from ..registry import QUANTIZERS
from .base import Quantizer, QuantizerOutput, codebook_stats
from .decorrelation import channel_correlation
from .entropy import grid_entropies, grid_log_probs

# the paper's bound shrinks the range a little so that tanh never reaches a rounding boundary
_EPS = 1e-3


@dataclass
class FSQConfig(QuantizerConfig):
    """`kind: fsq`: channel i takes `levels[i]` values; prod(levels) codes. The paper's recommended sets:
    [8, 6, 5] (2^8), [8, 5, 5, 5] (2^10), [7, 5, 5, 5, 5] (2^12), [8, 8, 8, 6, 5] (2^14), [8, 8, 8, 5, 5, 5] (2^16).
    `embed_dim` is not read: the code width is len(levels)."""

    kind: str = "fsq"
    levels: list[int] = field(default_factory=lambda: [8, 5, 5, 5])
    # Beyond the paper (0: off, the paper's FSQ): LFQ's entropy penalty over the grid (entropy.py), with each
    # channel's soft assignment p_i(g|z) = softmax_g(-(bound(z)_i - g)^2 / entropy_temperature) to its integers
    entropy_weight: float = 0.0
    entropy_temperature: float = 0.1  # in squared grid steps
    sample_entropy_weight: float = 1.0  # the per-position term's share of it (vq.py: VQConfig)
    # Beyond the paper (0: off): the mean squared correlation between distinct channels over the batch
    # (decorrelation.py), so that the latent fills the grid's combinations rather than a slab of them
    decorrelation_weight: float = 0.0

    @property
    def code_width(self) -> int:
        return len(self.levels)

    @property
    def vocab_per_depth(self) -> tuple[int, ...]:
        return (math.prod(self.levels),)

    def validate(self, where: str = "model.quantizer") -> None:
        super().validate(where)
        if not self.levels or any(level < 2 for level in self.levels):
            raise UserError(f"{where}.levels must list values >= 2 (one per channel), got {self.levels}; "
                            f"e.g. [8, 5, 5, 5]")
        if self.entropy_weight < 0:
            raise UserError(f"{where}.entropy_weight must be >= 0 (0: off, e.g. 0.1), got {self.entropy_weight}")
        if not self.entropy_temperature > 0:
            raise UserError(f"{where}.entropy_temperature must be > 0, e.g. 0.1; got {self.entropy_temperature}")
        if self.decorrelation_weight < 0:
            raise UserError(f"{where}.decorrelation_weight must be >= 0 (0: off, e.g. 1.0), "
                            f"got {self.decorrelation_weight}")
        if self.sample_entropy_weight < 0:
            raise UserError(f"{where}.sample_entropy_weight must be >= 0 (1: the full term, e.g. 0.5), "
                            f"got {self.sample_entropy_weight}")
        if math.prod(self.levels) > 2**31 - 1:
            raise UserError(f"{where}.levels {self.levels} give {math.prod(self.levels)} codes; token ids must fit "
                            f"int32 (at most 2**31 - 1): use fewer or smaller levels")


@QUANTIZERS.register("fsq", config=FSQConfig)
class FiniteScalarQuantizer(Quantizer):
    """z (B, len(levels), h, w) -> each channel bounded, rounded (straight-through) and scaled into [-1, 1].

    Channel i with L levels: bound(z) = tanh(z + shift) * (L - 1)(1 - eps)/2 - offset, offset = 0.5 for even L
    (so the L integers it rounds to are -L/2 .. L/2 - 1) and 0 for odd L; shift = atanh(offset / half range)
    makes bound(0) = 0 (the paper's code writes tan, a slip for atanh; they differ by ~1e-3 for L >= 4). For
    L = 2 no shift can centre an integer (offset > half range): the shift is 0 and the channel splits at z = 0.
    """

    def __init__(self, config: FSQConfig, in_channels: int | None = None):
        super().__init__()  # in_channels: the model projects its latents to len(levels) channels
        self.config = config
        levels = torch.tensor(config.levels, dtype=torch.long)
        # index = sum digit_i * basis_i, digit_i in [0, L_i): channel 0 is the least significant
        basis = torch.cumprod(torch.cat([torch.ones(1, dtype=torch.long), levels[:-1]]), 0)
        # constants, rebuilt from the config: not part of the state dict
        self.register_buffer("levels", levels, persistent=False)
        self.register_buffer("basis", basis, persistent=False)
        self.register_buffer("half_width", levels // 2, persistent=False)  # integer grid -> [-1, 1]
        self.vocab = math.prod(config.levels)

    def _per_channel(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(1, -1, 1, 1)

    def bound(self, z: torch.Tensor) -> torch.Tensor:
        levels = self._per_channel(self.levels).float()
        half_l = (levels - 1) * (1 - _EPS) / 2
        offset = torch.where(levels % 2 == 0, 0.5, 0.0)
        ratio = offset / half_l  # < 1 except for L = 2, whose grid {-1, 0} has no centre at an integer
        shift = torch.where(ratio < 1, torch.atanh(ratio.clamp(max=0.5)), 0.0)
        return torch.tanh(z + shift) * half_l - offset

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        with torch.autocast(device_type=z.device.type, enabled=False):
            bounded = self.bound(z.float())
            grid = torch.round(bounded)  # integers in [-L//2, (L-1)//2]
            half_width = self._per_channel(self.half_width)
            digits = grid.long() + half_width  # (B, C, h, w) in [0, L)
            # value of the code, gradient of the bounded latent (straight-through rounding); exact value,
            # so decode_indices reproduces it bit for bit
            quantized = (grid + (bounded - bounded.detach())) / half_width
            loss = z.new_zeros((), dtype=torch.float32)
            indices = (digits * self._per_channel(self.basis)).sum(1).unsqueeze(-1)  # (B, h, w, 1)
            stats = codebook_stats(indices, self.vocab)
            if self.training and self.config.decorrelation_weight:
                correlation = channel_correlation(z.float().permute(0, 2, 3, 1).reshape(-1, z.shape[1]))
                loss = loss + self.config.decorrelation_weight * correlation
                stats.update(channel_correlation=correlation.detach())
            if self.training and self.config.entropy_weight:
                rows = bounded.permute(0, 2, 3, 1).reshape(-1, bounded.shape[1])
                per_sample, batch = grid_entropies(
                    grid_log_probs(rows, self.config.levels, self.config.entropy_temperature), self.config.levels)
                loss = loss + self.config.entropy_weight * (self.config.sample_entropy_weight * per_sample - batch)
                stats.update(sample_entropy=per_sample.detach(), codebook_entropy=batch.detach())
        return QuantizerOutput(quantized.to(z.dtype), indices, loss, stats)

    def grid_position(self, latents: torch.Tensor) -> torch.Tensor:
        return self.bound(latents.float()[:, :, None, None])[:, :, 0, 0]  # the codes are the integers

    def grid_values(self, latents: torch.Tensor) -> torch.Tensor:
        return torch.round(self.grid_position(latents))

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        tokens = self.check_indices(indices)[..., 0].unsqueeze(1)  # (B, 1, h, w)
        digits = (tokens // self._per_channel(self.basis)) % self._per_channel(self.levels)  # (B, C, h, w)
        half_width = self._per_channel(self.half_width)
        return (digits - half_width).float() / half_width
