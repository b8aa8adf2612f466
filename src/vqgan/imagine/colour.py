"""Colour jitter as one 3x3 matrix per view: hue rotation and saturation of the W3C filter effects.

kornia's `ColorJitter` goes through HSV, whose forward and backward cost more than all the geometry of the
cutouts on a CPU. The `hueRotate` and `saturate` matrices of the W3C Filter Effects spec
(https://www.w3.org/TR/filter-effects-1/#feColorMatrixElement) do the same job linearly: both keep greys grey
and rotate / scale the chroma around the Rec. 709 luma axis, so a view's jitter is one small matmul.
"""
from __future__ import annotations

import math

import torch

LUMA = (0.213, 0.715, 0.072)


def hue_rotation(turns: torch.Tensor) -> torch.Tensor:
    """(N,) turns -> (N, 3, 3) W3C `hueRotate` matrices (0 and whole turns: the identity)."""
    a = turns.double() * (2 * math.pi)
    c, s = torch.cos(a)[:, None, None], torch.sin(a)[:, None, None]
    luma = torch.tensor(LUMA, dtype=torch.float64).expand(3, 3)
    cos_part = torch.eye(3, dtype=torch.float64) - luma
    sin_part = torch.tensor([[-0.213, -0.715, 0.928], [0.143, 0.140, -0.283], [-0.787, 0.715, 0.072]],
                            dtype=torch.float64)
    return luma + c * cos_part + s * sin_part


def saturation(factor: torch.Tensor) -> torch.Tensor:
    """(N,) factors -> (N, 3, 3) W3C `saturate` matrices: a blend with the luma grey (1: identity, 0: grey)."""
    luma = torch.tensor(LUMA, dtype=torch.float64).expand(3, 3)
    return luma + factor.double()[:, None, None] * (torch.eye(3, dtype=torch.float64) - luma)


def apply(batch: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1] and (N, 3, 3) -> the recoloured batch, clamped to [0, 1] as kornia's jitter."""
    n, _, height, width = batch.shape
    m = matrices.to(batch.device, batch.dtype)
    return torch.bmm(m, batch.reshape(n, 3, height * width)).view(n, 3, height, width).clamp(0, 1)
