"""3x3 convolutions by Winograd's F(4x4, 3x3) on the CPU: a quarter of the multiplies, forward and backward.

A "same" 3x3 convolution is, per 4x4 output tile, y = A'[(G w G') * (B' d B)]A with d the 6x6 input tile: the
channel-mixing work becomes 36 matrix products (one per point of the 6x6 transformed tile) of a quarter of the
direct method's size, which PyTorch's batched matrix product (MKL/oneDNN) runs near this CPU's peak. The data
transforms are fused C passes (winograd.c), over one cache-sized piece of the image at a time. Both gradients
stay in the Winograd domain: the weight gradient is G'(sum dM V')G with dM = A dy A' per output tile, the input
gradient a Winograd convolution of dy with the flipped, transposed filters. Exact in exact arithmetic; in
float32 the result differs from the direct convolution by ~1e-6 of its scale (the direct one by ~1e-7).

`conv3x3` (NCHW, differentiable) is what training uses, `conv3x3_channels_last` (no gradients) what encoding and
decoding use; `applies` and `applies_channels_last` say where each pays (`vqgan.nn.Conv2d` asks them). Off
with VQGAN_NATIVE=0 or VQGAN_WINOGRAD=0, or without a C compiler: then everything is `F.conv2d`.
"""
from __future__ import annotations

import ctypes
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

from . import load, switched_on, threads

# Below these the work saved does not pay for the transforms (measured on a Zen 3 CPU): matrix products
# thinner than MIN_CHANNELS, fewer 4x4 output tiles per call than MIN_TILES (the products then read the 4x-sized
# transformed filters for little work), NCHW rows narrower than MIN_WIDTH (its kernels take eight tiles of a row
# at once; the channels-last ones take eight channels, any width).
MIN_CHANNELS = 16
MIN_TILES = 64
MIN_TILES_CHANNELS_LAST = 32
MIN_WIDTH = 16

# Tile rows go through in pieces whose transformed tiles take about this many bytes, so that the transform, the
# matrix product and the inverse transform of a piece find it in cache.
PIECE_BYTES = 4 << 20


@cache
def _library() -> ctypes.CDLL | None:
    if not switched_on("VQGAN_WINOGRAD"):
        return None
    lib = load("winograd")
    if lib is not None:
        ptr, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        lib.vqgan_winograd_input.argtypes = [ptr, ptr] + [i64] * 8 + [i32]
        lib.vqgan_winograd_output.argtypes = [ptr, ptr, ptr] + [i64] * 8 + [i32]
        lib.vqgan_winograd_output_adjoint.argtypes = [ptr, ptr] + [i64] * 8 + [i32]
        lib.vqgan_winograd_input_nhwc.argtypes = [ptr, ptr] + [i64] * 8 + [i32]
        lib.vqgan_winograd_output_nhwc.argtypes = [ptr, ptr, ptr] + [i64] * 8 + [i32]
        lib.vqgan_winograd_weight.argtypes = [ptr, ptr, i64, i64, i32, i32]
        lib.vqgan_winograd_weight_adjoint.argtypes = [ptr, ptr, i64, i32]
    return lib


def _ptr(t: torch.Tensor | None) -> ctypes.c_void_p | None:
    return None if t is None else ctypes.c_void_p(t.data_ptr())


class _Tiling:
    """An (N, C, H, W) image batch as rows of 4x4 tiles, cut into pieces of at most `rows` tile rows."""

    def __init__(self, x: torch.Tensor, widest: int):
        self.n, _, self.h, self.w = x.shape
        self.th, self.tw = (self.h + 3) // 4, (self.w + 3) // 4
        self.total = self.n * self.th
        self.rows = max(1, min(self.total, PIECE_BYTES // (36 * 4 * widest * self.tw)))

    def pieces(self):
        for first in range(0, self.total, self.rows):
            last = min(first + self.rows, self.total)
            yield first, last, (last - first) * self.tw

    def buffer(self, channels: int) -> torch.Tensor:
        """Room for one piece's transformed tiles, `channels` each."""
        return torch.empty(36 * self._plane(channels * self.rows * self.tw, padded=True))

    @staticmethod
    def _plane(size: int, padded: bool) -> int:
        # a kernel writing 36 planes 4 KiB apart thrashes a few cache sets: padded planes lie 64 bytes past a
        # multiple of 4 KiB apart. PyTorch writes the matrix products' results, which must be unpadded (with
        # out= in a strided tensor it computes elsewhere and copies).
        return -(-size // 1024) * 1024 + 16 if padded else size

    def view(self, buffer: torch.Tensor, rows: int, cols: int, padded: bool) -> torch.Tensor:
        """A piece's (36, rows, cols) matrices in `buffer`: (36, channels, tiles), or (36, tiles, channels) for
        channels-last images."""
        return buffer.as_strided((36, rows, cols), (self._plane(rows * cols, padded), cols, 1))

    def args(self, piece: torch.Tensor, channels: int, first: int, last: int) -> tuple[int, ...]:
        """The C kernels' geometry arguments for `piece`, a view of tile rows [first, last)."""
        return channels, self.h, self.w, self.th, self.tw, first, last, piece.stride(0)


def _weight(lib: ctypes.CDLL, weight: torch.Tensor, flip: bool) -> torch.Tensor:
    """U = G w G' per filter, (36, out, in); flipped: of the input gradient's filters, (36, in, out)."""
    out, inp = weight.shape[:2]
    u = torch.empty(36, inp, out) if flip else torch.empty(36, out, inp)
    lib.vqgan_winograd_weight(_ptr(weight), _ptr(u), out, inp, int(flip), threads())
    return u


def _convolve(lib: ctypes.CDLL, x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None,
              channels_last: bool = False) -> torch.Tensor:
    """The "same" 3x3 convolution of x (N, C, H, W) with transformed filters u (36, out, C), in pieces: per
    piece V = B' d B, M = U V, y = A' m A. Channels-last x (and y) keep their tiles as (36, tiles, channels)
    and take the product the other way round, M' = V' U'."""
    out, inp = u.shape[1:]
    tiling = _Tiling(x, max(out, inp))
    if channels_last:
        y = torch.empty(tiling.n, tiling.h, tiling.w, out).permute(0, 3, 1, 2)
        transform_in, transform_out = lib.vqgan_winograd_input_nhwc, lib.vqgan_winograd_output_nhwc
        u = u.transpose(1, 2)
    else:
        y = torch.empty(tiling.n, out, tiling.h, tiling.w)
        transform_in, transform_out = lib.vqgan_winograd_input, lib.vqgan_winograd_output
    v_buffer, m_buffer = tiling.buffer(inp), tiling.buffer(out)
    def matrices(channels: int, tiles: int) -> tuple[int, int]:
        return (tiles, channels) if channels_last else (channels, tiles)

    for first, last, tiles in tiling.pieces():
        v = tiling.view(v_buffer, *matrices(inp, tiles), padded=True)
        m = tiling.view(m_buffer, *matrices(out, tiles), padded=False)
        transform_in(_ptr(x), _ptr(v), *tiling.args(v, inp, first, last), threads())
        torch.bmm(v, u, out=m) if channels_last else torch.bmm(u, v, out=m)
        transform_out(_ptr(m), _ptr(y), _ptr(bias), *tiling.args(m, out, first, last), threads())
    return y


def _weight_grad(lib: ctypes.CDLL, x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """The weight gradient G'(sum over tiles of dM V')G, dM = A dy A' per output tile, V = B' d B per input tile."""
    inp, out = x.shape[1], grad_out.shape[1]
    tiling = _Tiling(x, max(out, inp))
    v_buffer, m_buffer = tiling.buffer(inp), tiling.buffer(out)
    grad_u = torch.zeros(36, out, inp)
    for first, last, tiles in tiling.pieces():
        v, m = tiling.view(v_buffer, inp, tiles, padded=True), tiling.view(m_buffer, out, tiles, padded=True)
        lib.vqgan_winograd_input(_ptr(x), _ptr(v), *tiling.args(v, inp, first, last), threads())
        lib.vqgan_winograd_output_adjoint(_ptr(grad_out), _ptr(m), *tiling.args(m, out, first, last), threads())
        grad_u.baddbmm_(m, v.transpose(1, 2))
    grad_w = torch.empty(out, inp, 3, 3)
    lib.vqgan_winograd_weight_adjoint(_ptr(grad_u), _ptr(grad_w), out * inp, threads())
    return grad_w


class _Winograd3x3(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        lib = _library()
        weight = weight.contiguous()
        # the input is only needed for the weight gradient (LPIPS' frozen VGG asks for none: less memory)
        ctx.save_for_backward(x if weight.requires_grad else None, weight)
        ctx.has_bias = bias is not None
        return _convolve(lib, x, _weight(lib, weight, flip=False), None if bias is None else bias.contiguous())

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        lib = _library()
        x, weight = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            # the input gradient is the "same" convolution of grad_out with the flipped, transposed filters
            grad_x = _convolve(lib, grad_out, _weight(lib, weight, flip=True), None)
        if ctx.needs_input_grad[1]:
            grad_w = _weight_grad(lib, x, grad_out)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum((0, 2, 3))
        return grad_x, grad_w, grad_b


def available() -> bool:
    """Whether the kernel is built and switched on here."""
    return _library() is not None


def _cpu_autocast() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled()


def _pays(conv: nn.Conv2d, x: torch.Tensor, min_tiles: int, min_width: int) -> bool:
    """A float32 CPU input to a 3x3, stride-1, padding-1 convolution with enough channels and tiles to gain,
    the kernel here."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4
            and conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
            and conv.in_channels >= MIN_CHANNELS and conv.out_channels >= MIN_CHANNELS
            and x.shape[-1] >= min_width
            and x.shape[0] * ((x.shape[-2] + 3) // 4) * ((x.shape[-1] + 3) // 4) >= min_tiles
            and conv.weight.dtype == torch.float32 and conv.weight.device.type == "cpu"
            and not _cpu_autocast() and not torch.compiler.is_compiling()
            and available())


def applies(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether `conv3x3` runs `conv(x)`: see `_pays`, for an NCHW input."""
    return x.is_contiguous() and _pays(conv, x, MIN_TILES, MIN_WIDTH)


def applies_channels_last(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether `conv3x3_channels_last` runs `conv(x)`: see `_pays`, for a channels-last input outside autograd
    (inference)."""
    return (x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
            and not (torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad))
            and _pays(conv, x, MIN_TILES_CHANNELS_LAST, 1))


def _runs_here(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """The kernels' contract: float32 CPU tensors, (out, in, 3, 3) filters matching x's channels."""
    tensors = [x, weight] if bias is None else [x, weight, bias]
    return (all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors) and x.dim() == 4
            and weight.dim() == 4 and weight.shape[1:] == (x.shape[1], 3, 3)
            and (bias is None or bias.shape == (weight.shape[0],)) and available())


def conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.conv2d(x, weight, bias, padding=1) by Winograd, differentiable (once) in all three; NCHW out. Anything
    outside the kernels' contract (see `_runs_here`) goes to F.conv2d; `applies` says where Winograd pays."""
    if not _runs_here(x, weight, bias):
        return F.conv2d(x, weight, bias, padding=1)
    return _Winograd3x3.apply(x.contiguous(), weight, bias)


def conv3x3_channels_last(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.conv2d(x, weight, bias, padding=1) by Winograd for inference (no gradients), channels-last in and out."""
    if not _runs_here(x, weight, bias):
        return F.conv2d(x, weight, bias, padding=1)
    lib = _library()
    x = x.contiguous(memory_format=torch.channels_last)
    return _convolve(lib, x, _weight(lib, weight.detach().contiguous(), flip=False),
                     None if bias is None else bias.detach().contiguous(), channels_last=True)
