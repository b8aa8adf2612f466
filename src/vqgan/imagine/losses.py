"""The CLIP guidance loss: weighted spherical distance between cutout embeddings and each prompt's embedding.

d(a, b) = 2 arcsin(||a - b|| / 2)^2 on unit vectors: the squared great-circle distance (half of it), as the
well-known VQGAN+CLIP notebook (Crowson 2021) computes it; for unit vectors ||a - b|| = 2 sin(theta / 2), so
d = theta^2 / 2. A negative weight pushes away (the distance enters with its sign flipped), and `stop` cuts the
gradient where the signed distance is already below it (the value is unchanged).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .prompts import Prompt


def spherical_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, D), (M, D) -> (N, M): 2 arcsin(||a - b|| / 2)^2 between the normalised rows."""
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    # clamp: rounding can make ||a - b|| / 2 exceed 1 by an ulp for opposite vectors (arcsin would be NaN)
    return (a[:, None] - b[None]).norm(dim=-1).div(2).clamp(max=1).arcsin().pow(2).mul(2)


class _GradientFrom(torch.autograd.Function):
    """Forward `value`, backward through `path` (the notebook's replace_grad)."""

    @staticmethod
    def forward(ctx, value: torch.Tensor, path: torch.Tensor) -> torch.Tensor:
        return value.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return None, grad


def prompt_loss(embeddings: torch.Tensor, target: torch.Tensor, prompt: Prompt) -> torch.Tensor:
    """Cutout embeddings (N, D) against one prompt's target (D,) -> the prompt's scalar loss:
    |weight| * mean_n(sign(weight) * d(e_n, target)), no gradient where that signed distance is below `stop`."""
    d = spherical_distance(embeddings, target[None])[:, 0] * (1.0 if prompt.weight > 0 else -1.0)
    d = _GradientFrom.apply(d, torch.maximum(d, torch.full_like(d, prompt.stop)))
    return abs(prompt.weight) * d.mean()


def similarity(embeddings: torch.Tensor, target: torch.Tensor) -> float:
    """Mean cosine similarity of the cutout embeddings (N, D) with the target (D,): what the log reports."""
    return F.cosine_similarity(embeddings.detach().float(), target[None].float(), dim=-1).mean().item()


class ClampWithGrad(torch.autograd.Function):
    """Clamp to [lo, hi] whose gradient still flows where it moves the value back into the range (the notebook's
    clamp_with_grad): a saturated pixel is not a dead end for the optimiser."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
        ctx.lo, ctx.hi = lo, hi
        ctx.save_for_backward(x)
        return x.clamp(lo, hi)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        inward = grad * (x - x.clamp(ctx.lo, ctx.hi)) >= 0
        return grad * inward, None, None
