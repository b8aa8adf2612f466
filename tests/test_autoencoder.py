import numpy as np
import pytest
import torch
from conftest import tiny_model_config

from vqgan.config import VQGANConfig, quantizer_config
from vqgan.errors import UserError
from vqgan.tokenizers import VQModel


@pytest.mark.parametrize("ch_mult,f", [([1, 2], 2), ([1, 1, 2], 4), ([1, 1, 2, 2], 8), ([1, 1, 1, 2, 2], 16),
                                       ([1, 1, 1, 1, 2, 2], 32)])
def test_downsampling_factors(ch_mult, f):
    cfg = VQGANConfig(resolution=64, ch=32, ch_mult=ch_mult, num_res_blocks=1, attn_resolutions=[],
                      z_channels=8, quantizer=quantizer_config(n_embed=16, embed_dim=8))
    model = VQModel(cfg).eval()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    tokens = model.encode(x)
    assert model.downsample_factor == f
    assert tokens.shape == (2, 64 // f, 64 // f, 1) and tokens.dtype == torch.int64
    assert model.decode(tokens).shape == (2, 3, 64, 64)


def test_public_api_roundtrip_and_errors():
    model = VQModel(tiny_model_config()).eval()
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    tokens = model.encode(x)
    rec, loss, info = model(x)
    torch.testing.assert_close(model.decode(tokens), rec, atol=1e-4, rtol=0)  # layouts differ in rounding
    assert torch.equal(info["indices"], tokens)
    with pytest.raises(ValueError, match="must lie in"):
        model.decode(torch.full((1, 16, 16, 1), 64))
    with pytest.raises(ValueError, match=r"\(B, h, w, 1\)"):
        model.decode(tokens.reshape(3, -1))


def test_bad_config_is_a_clear_error():
    with pytest.raises(UserError, match="GroupNorm"):
        VQModel(VQGANConfig(ch=48, ch_mult=[1]))


def test_matches_taming_reference_outputs(fixtures_dir):
    """The released architecture, loaded by key copy, reproduces the original code's numbers."""
    sd = torch.load(fixtures_dir / "vqgan.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    sd = {k: v for k, v in sd.items() if not k.startswith("loss.")}
    cfg = VQGANConfig(resolution=32, ch=32, ch_mult=[1, 1, 1], num_res_blocks=1, attn_resolutions=[8],
                      z_channels=16, quantizer=quantizer_config(n_embed=64, embed_dim=16, legacy_beta=True))
    model = VQModel(cfg).eval()
    model.load_state_dict(sd, strict=True)
    io = np.load(fixtures_dir / "io.npz")
    x = torch.from_numpy(io["images"])
    with torch.no_grad():
        rec, qloss, info = model(x)
        h = model.encode_to_prequant(x)
    assert torch.equal(info["indices"][..., 0], torch.from_numpy(io["vq_indices_bhw"]))
    torch.testing.assert_close(h, torch.from_numpy(io["vq_h"]), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(rec, torch.from_numpy(io["vq_dec"]), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(qloss, torch.tensor(float(io["vq_qloss"])), atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(model.decode(model.encode(x)), torch.from_numpy(io["vq_decode_code"]),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("channels,size,layout", [(32, 8, torch.contiguous_format), (64, 5, torch.contiguous_format),
                                                   (32, 6, torch.channels_last)])
def test_subpixel_upsample_equals_upsample_then_conv(channels, size, layout):
    from vqgan.nn import Upsample

    up = Upsample(channels)
    x = torch.randn(2, channels, size, size + 2).contiguous(memory_format=layout).requires_grad_(True)
    fast, slow = up(x), up.forward_reference(x)
    assert fast.is_contiguous(memory_format=layout)  # channels-last stays so for the convolutions after it
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    g_fast = torch.autograd.grad(fast.square().sum(), [x, up.conv.weight, up.conv.bias])
    g_slow = torch.autograd.grad(slow.square().sum(), [x, up.conv.weight, up.conv.bias])
    for a, b in zip(g_fast, g_slow):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
