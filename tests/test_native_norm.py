"""The C GroupNorm + swish (vqgan.native.norm) for channels-last inference: PyTorch's numbers, and used."""
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vqgan.nn.blocks
from vqgan.native import load
from vqgan.native.norm import group_norm_nhwc
from vqgan.nn import ResnetBlock

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")


def test_the_kernel_builds_here():
    assert load("group_norm") is not None


def norm_layer(groups, channels, affine=True):
    torch.manual_seed(0)
    norm = nn.GroupNorm(groups, channels, eps=1e-6, affine=affine)
    if affine:
        norm.weight.data.normal_(1.0, 0.5)
        norm.bias.data.normal_(0.0, 0.5)
    return norm


@pytest.mark.parametrize("swish", [True, False])
@pytest.mark.parametrize("shape,groups,affine", [
    ((3, 64, 9, 7), 32, True),    # odd spatial size, 2 channels a group
    ((1, 40, 5, 3), 8, True),     # 40 channels: a tail past the 8-lane vectors; fewer pixels than one block
    ((2, 128, 16, 16), 32, False),
    ((1, 256, 1, 1), 32, True),   # one pixel: variance 0 within a channel
])
def test_equals_pytorch(shape, groups, affine, swish):
    norm = norm_layer(groups, shape[1], affine)
    # far from zero mean: the statistics must not cancel catastrophically
    x = (torch.randn(shape) * 3 + 40).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ours = group_norm_nhwc(norm, x, swish)
        theirs = norm(x.contiguous())
        theirs = F.silu(theirs) if swish else theirs
    assert ours is not None and ours.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_swish_over_a_wide_range():
    """The kernel's exp: swish over -100..100 (uniform values, normalised, scaled by the affine weight)."""
    norm = nn.GroupNorm(1, 8, eps=1e-6)
    with torch.no_grad():
        norm.weight.fill_(57.0)  # a uniform variable normalised spans +-1.73
        norm.bias.zero_()
    x = torch.linspace(-1, 1, 100_001).repeat(8, 1).view(1, 8, -1, 1).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        n = norm(x.contiguous())
        ours = group_norm_nhwc(norm, x, True)
    assert n.min() < -98 and n.max() > 98
    torch.testing.assert_close(ours, F.silu(n), atol=1e-5, rtol=1e-5)


def test_not_used_where_it_does_not_apply():
    norm = norm_layer(32, 64)
    x = torch.randn(2, 64, 4, 4)
    with torch.no_grad():
        assert group_norm_nhwc(norm, x, True) is None  # NCHW
        assert group_norm_nhwc(norm, x.contiguous(memory_format=torch.channels_last).double(), True) is None
    assert group_norm_nhwc(norm, x.contiguous(memory_format=torch.channels_last), True) is None  # autograd on
    with torch.no_grad():
        empty = torch.randn(0, 64, 4, 4).contiguous(memory_format=torch.channels_last)
        assert group_norm_nhwc(norm, empty, True) is None  # PyTorch's answer for an empty batch


def test_blocks_use_it_in_channels_last_inference(monkeypatch):
    calls = []
    real = vqgan.nn.blocks.group_norm_nhwc
    monkeypatch.setattr(vqgan.nn.blocks, "group_norm_nhwc", lambda *a: calls.append(1) or real(*a))
    block = ResnetBlock(64, 64).eval()
    x = torch.randn(2, 64, 8, 8)
    with torch.no_grad():
        reference = block(x)
        calls.clear()
        fast = block(x.contiguous(memory_format=torch.channels_last))
    assert len(calls) == 2
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-5)
