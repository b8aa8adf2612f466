"""A linear layer that is faster for the handful of rows of a KV-cached sampling step on CPU."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear`, computed as (W @ x^T)^T on CPU when x has 2-64 rows (a KV-cached sampling step).

    Measured on a 2-core AMD Zen 3 with MKL: a (4, 256) @ (256, 1024)^T product runs 2-2.5x faster in that
    orientation, because MKL's kernels are poor at streaming a weight matrix past a handful of rows; one row is
    a GEMV already, and from ~128 rows on the two agree. The result is the same up to float rounding.
    """
    rows = x.numel() // max(x.shape[-1], 1)
    if x.device.type != "cpu" or not 2 <= rows <= 64:
        return F.linear(x, weight, bias)
    if x.dim() != 2:
        return linear(x.reshape(rows, x.shape[-1]), weight, bias).reshape(*x.shape[:-1], weight.shape[0])
    out = torch.mm(weight, x.t()) if bias is None else torch.addmm(bias[:, None], weight, x.t())
    return out.t()


class Linear(nn.Linear):
    """nn.Linear (same parameters and state-dict keys) with the small-batch CPU path of `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
