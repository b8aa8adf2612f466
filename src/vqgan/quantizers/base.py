"""The contract every quantizer honours: `forward(z) -> QuantizerOutput`, `decode_indices(indices)`."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class QuantizerOutput:
    quantized: torch.Tensor  # (B, D, h, w), straight-through: the value of the codes, the gradient of z
    indices: torch.Tensor  # (B, h, w) int64
    loss: torch.Tensor  # scalar codebook + commitment loss
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # detached scalars for logging


class Quantizer(nn.Module):
    n_embed: int

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, h, w) int64 -> (B, D, h, w) code vectors."""
        raise NotImplementedError


def codebook_stats(indices: torch.Tensor, n_embed: int) -> dict[str, torch.Tensor]:
    """Fraction of codes used and perplexity (exp of the entropy of the code histogram)."""
    counts = torch.bincount(indices.reshape(-1), minlength=n_embed).float()
    return stats_from_counts(counts)


def stats_from_counts(counts: torch.Tensor) -> dict[str, torch.Tensor]:
    p = counts / counts.sum().clamp_min(1)
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum()
    return {"usage": (counts > 0).float().mean(), "perplexity": torch.exp(entropy)}


def perplexity_from_counts(counts) -> float:
    total = float(sum(counts))
    if total == 0:
        return 0.0
    return math.exp(-sum((c / total) * math.log(c / total) for c in counts if c > 0))
