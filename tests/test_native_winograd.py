"""Winograd F(4x4, 3x3) convolutions (vqgan.native.winograd): the direct convolution's numbers, forward and both
gradients, on awkward sizes; used where it pays and nowhere else."""
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vqgan.native import winograd
from vqgan.nn import Conv2d, ResnetBlock

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")


def test_the_kernel_builds_here():
    assert winograd.available()


def relative_error(ours: torch.Tensor, exact: torch.Tensor) -> float:
    return float((ours.detach().double() - exact.detach().double()).abs().max() / exact.detach().double().abs().max())


@pytest.mark.parametrize("shape,out_channels,bias", [
    ((2, 16, 13, 10), 24, True),   # height and width no multiple of 4: partial edge tiles
    ((1, 32, 4, 4), 16, False),    # one tile
    ((3, 16, 35, 70), 16, True),   # rows of 18 tiles: two full groups of 8 and a tail of 2
    ((1, 17, 1, 1), 19, True),     # one pixel, odd channel counts
    ((2, 64, 64, 64), 64, True),   # the small config's size
])
@pytest.mark.parametrize("piece_bytes", [1 << 12, 4 << 20])  # many pieces (one tile row each) or one
def test_equals_the_direct_convolution(shape, out_channels, bias, piece_bytes, monkeypatch):
    """Forward, input gradient, weight and bias gradients against float64 direct convolution: within ~1e-5 of
    the output's scale (float32 direct convolution is ~1e-6 off)."""
    monkeypatch.setattr(winograd, "PIECE_BYTES", piece_bytes)
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    w = (torch.randn(out_channels, shape[1], 3, 3, dtype=torch.float64) / (3 * shape[1] ** 0.5)).requires_grad_()
    b = torch.randn(out_channels, dtype=torch.float64, requires_grad=True) if bias else None
    exact = F.conv2d(x, w, b, padding=1)
    grad_y = torch.randn_like(exact)
    inputs = (x, w, b) if bias else (x, w)
    exact_grads = torch.autograd.grad(exact, inputs, grad_y)
    ours_in = [t.detach().float().requires_grad_() for t in inputs]
    ours = winograd.conv3x3(ours_in[0], ours_in[1], ours_in[2] if bias else None)
    ours_grads = torch.autograd.grad(ours, ours_in, grad_y.float())
    assert ours.dtype == torch.float32 and ours.shape == exact.shape
    assert relative_error(ours, exact) < 2e-5
    for g, e in zip(ours_grads, exact_grads):
        assert relative_error(g, e) < 2e-5


def test_only_the_gradients_asked_for():
    """LPIPS' frozen VGG needs the input gradient only: no weight gradient is computed (or returned)."""
    conv = Conv2d(16, 16, 3, padding=1).requires_grad_(False)
    x = torch.randn(1, 16, 64, 64, requires_grad=True)
    assert winograd.applies(conv, x)
    conv(x).sum().backward()
    assert x.grad is not None and conv.weight.grad is None
    torch.testing.assert_close(x.grad, torch.autograd.grad(F.conv2d(x, conv.weight, conv.bias, padding=1).sum(), x)[0],
                               atol=1e-5, rtol=1e-4)


def test_conv2d_is_nn_conv2d_where_winograd_does_not_pay():
    torch.manual_seed(0)
    big = torch.randn(2, 32, 32, 32)
    assert winograd.applies(Conv2d(32, 32, 3, padding=1), big)
    assert not winograd.applies(Conv2d(3, 32, 3, padding=1), torch.randn(2, 3, 32, 32))    # thin: RGB in
    assert not winograd.applies(Conv2d(32, 3, 3, padding=1), big)                          # thin: RGB out
    assert not winograd.applies(Conv2d(32, 32, 3, stride=2, padding=1), big)
    assert not winograd.applies(Conv2d(32, 32, 3), big)                                    # no padding
    assert not winograd.applies(Conv2d(32, 32, 1), big)
    assert not winograd.applies(Conv2d(32, 32, 3, padding=1), torch.randn(2, 32, 8, 8))    # too few tiles
    assert not winograd.applies(Conv2d(32, 32, 3, padding=1), big.double())
    assert not winograd.applies(Conv2d(32, 32, 3, padding=1), big.contiguous(memory_format=torch.channels_last))
    # the layer itself is nn.Conv2d: same parameters and state-dict keys, same results either way
    conv = Conv2d(32, 32, 3, padding=1)
    reference = nn.Conv2d(32, 32, 3, padding=1)
    reference.load_state_dict(conv.state_dict())
    assert isinstance(conv, nn.Conv2d) and conv.state_dict().keys() == reference.state_dict().keys()
    with torch.no_grad():
        torch.testing.assert_close(conv(big), reference(big), atol=1e-5, rtol=1e-4)


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("VQGAN_WINOGRAD", "0")
    winograd._library.cache_clear()
    try:
        assert not winograd.available()
        assert not winograd.applies(Conv2d(32, 32, 3, padding=1), torch.randn(2, 32, 32, 32))
    finally:
        monkeypatch.undo()
        winograd._library.cache_clear()
    assert winograd.available()


def test_a_resnet_block_trains_the_same(monkeypatch):
    """A ResnetBlock's output and every parameter's gradient, Winograd against PyTorch's convolutions."""
    torch.manual_seed(0)
    block = ResnetBlock(32, 64)
    x = torch.randn(2, 32, 32, 32, requires_grad=True)

    def run():
        block.zero_grad()
        x.grad = None
        y = block(x)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        return y.detach(), x.grad.clone(), [p.grad.clone() for p in block.parameters()]

    ours = run()
    monkeypatch.setattr(winograd, "available", lambda: False)
    theirs = run()
    for a, b in zip([ours[0], ours[1], *ours[2]], [theirs[0], theirs[1], *theirs[2]]):
        assert relative_error(a, b) < 2e-5


@pytest.mark.parametrize("shape,out_channels", [
    ((2, 16, 13, 10), 24),   # partial edge tiles
    ((3, 20, 35, 70), 16),   # 20 channels: a tail past the 8-lane vectors
    ((2, 64, 64, 64), 64),
])
@pytest.mark.parametrize("piece_bytes", [1 << 12, 4 << 20])
def test_channels_last_inference_equals_the_direct_convolution(shape, out_channels, piece_bytes, monkeypatch):
    monkeypatch.setattr(winograd, "PIECE_BYTES", piece_bytes)
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64)
    w = torch.randn(out_channels, shape[1], 3, 3, dtype=torch.float64) / (3 * shape[1] ** 0.5)
    b = torch.randn(out_channels, dtype=torch.float64)
    exact = F.conv2d(x, w, b, padding=1)
    ours = winograd.conv3x3_channels_last(x.float().contiguous(memory_format=torch.channels_last), w.float(), b.float())
    assert ours.is_contiguous(memory_format=torch.channels_last)
    assert relative_error(ours, exact) < 2e-5


def test_channels_last_only_outside_autograd():
    conv = Conv2d(32, 32, 3, padding=1)
    x = torch.randn(2, 32, 32, 32).contiguous(memory_format=torch.channels_last)
    assert not winograd.applies_channels_last(conv, x)  # the weight wants a gradient
    with torch.no_grad():
        assert winograd.applies_channels_last(conv, x)
        torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1), atol=1e-5, rtol=1e-4)


def test_outside_the_kernels_contract_it_is_f_conv2d():
    x = torch.randn(1, 16, 16, 16, dtype=torch.float64)
    w = torch.randn(16, 16, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(winograd.conv3x3(x, w), F.conv2d(x, w, padding=1))  # float64
    with pytest.raises(RuntimeError):  # channel mismatch: PyTorch's own error, not a read past the buffer
        winograd.conv3x3(torch.randn(1, 8, 16, 16), torch.randn(16, 16, 3, 3))
