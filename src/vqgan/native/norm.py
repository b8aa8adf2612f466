"""GroupNorm + swish in one C pass over channels-last activations (group_norm.c), for inference on the CPU."""
from __future__ import annotations

import ctypes
from functools import cache

import torch
from torch import nn

from . import load, threads


@cache
def _library() -> ctypes.CDLL | None:
    lib = load("group_norm")
    if lib is not None:
        lib.vqgan_group_norm_nhwc.restype = ctypes.c_int
        lib.vqgan_group_norm_nhwc.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 4 + [
            ctypes.c_float, ctypes.c_int, ctypes.c_int]
    return lib


def _pointer(t: torch.Tensor | None) -> ctypes.c_void_p | None:
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def group_norm_nhwc(norm: nn.GroupNorm, x: torch.Tensor, swish: bool) -> torch.Tensor | None:
    """`swish(norm(x))` (or `norm(x)`) for a channels-last float32 CPU tensor outside autograd, else None (the
    caller runs PyTorch; also inside a torch.compile trace, which the C call would split). Equal to PyTorch's up
    to float rounding."""
    if (torch.is_grad_enabled() or torch.compiler.is_compiling() or not isinstance(norm, nn.GroupNorm)
            or x.device.type != "cpu"
            or x.dtype != torch.float32 or x.dim() != 4 or x.numel() == 0
            or not x.is_contiguous(memory_format=torch.channels_last)):
        return None
    lib = _library()
    if lib is None:
        return None
    b, c, h, w = x.shape
    weight = norm.weight.detach().float().contiguous() if norm.weight is not None else None
    bias = norm.bias.detach().float().contiguous() if norm.bias is not None else None
    y = torch.empty_like(x)
    if lib.vqgan_group_norm_nhwc(_pointer(x), _pointer(y), _pointer(weight), _pointer(bias), b, h * w, c,
                                 norm.num_groups, norm.eps, int(swish), threads()):
        return None  # out of memory in the kernel: PyTorch tries
    return y
