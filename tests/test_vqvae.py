"""The original VQ-VAE's encoder and decoder (tokenizers/vqvae.py): preset shapes, factors, a tiny one learning
real photographs on MSE alone, its saved model and code contract, and its settings' errors."""
import pytest
import torch
from conftest import assert_setting_error, tiny_model_config, train_on_photos

from vqgan.config import TokenizerTrainConfig, VQGANConfig, load_config
from vqgan.presets import resolve_config_path
from vqgan.tokenizers import VQModel
from vqgan.tokenizers.vqvae import VQVAEDecoderConfig, VQVAEEncoderConfig

TINY = {"encoder": {"kind": "vqvae", "hidden_channels": 32, "residual_channels": 16, "factor": 4},
        "decoder": {"kind": "vqvae", "hidden_channels": 32, "residual_channels": 16},
        "z_channels": 16, "quantizer": {"kind": "ema", "n_embed": 64, "embed_dim": 16}}


@pytest.mark.parametrize("name,grid,vocab,meta", [("vqvae", 32, 512, True), ("small-cpu-vqvae", 8, 1024, False),
                                                    ("small-cpu-vqvae-spread", 8, 1024, False)])
def test_presets_build(name, grid, vocab, meta):
    cfg = load_config(TokenizerTrainConfig, resolve_config_path(name))
    assert cfg.model.latent_size == grid and cfg.model.code_spec.levels[0].vocab == (vocab,)
    assert cfg.loss.l2_weight == 1 and cfg.loss.pixel_weight == cfg.loss.perceptual_weight == cfg.loss.disc_factor == 0
    with torch.device("meta" if meta else "cpu"):
        model = VQModel(cfg.model)
    assert len(model.encoder.down) == len(model.decoder.up) == {32: 2, 8: 3}[grid]
    if not meta:
        tokens = model.eval().encode(torch.zeros(2, 3, 64, 64))
        assert tokens.shape == (2, grid, grid, 1) and model.decode(tokens).shape == (2, 3, 64, 64)


@pytest.mark.parametrize("factor", [2, 4, 8])
def test_the_factor_is_the_number_of_strided_convs(factor):
    cfg = VQGANConfig(resolution=32, z_channels=8, encoder=VQVAEEncoderConfig(hidden_channels=16, residual_channels=8,
                                                                              num_residual_blocks=1, factor=factor),
                      decoder=VQVAEDecoderConfig(hidden_channels=16, residual_channels=8, num_residual_blocks=1),
                      quantizer=tiny_model_config().quantizer)
    model = VQModel(cfg)
    rec, _, info = model(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert rec.shape == (2, 3, 32, 32) and info["indices"].shape == (2, 32 // factor, 32 // factor, 1)
    assert len(model.encoder.down) == factor.bit_length() - 1
    assert model.decoder.last_layer is model.decoder.up[-1]


@pytest.mark.parametrize("override", [
    "model.encoder.factor=3",
    "model.encoder.hidden_channels=31",
    "model.decoder.residual_channels=0",
    "model.decoder.num_residual_blocks=-1",
    "loss.l2_weight=-1",
    "model.encoder.strides=2",
])
def test_bad_settings_are_one_line_errors_naming_the_key(override):
    assert_setting_error("small-cpu-vqvae", override)


def test_a_tiny_vqvae_learns_real_photographs_on_mse(tmp_path):
    cfg, before, after, model = train_on_photos(tmp_path, 30, 2e-3, model=TINY,
                                                loss={"pixel_weight": 0.0, "l2_weight": 1.0, "disc_factor": 0.0})
    assert after > before + 2.0, (before, after)
    assert model.config == cfg.model and isinstance(model, VQModel)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    tokens = model.encode(x)
    assert tokens.shape == (2, 8, 8, 1) and tokens.dtype == torch.int64
    assert torch.equal(model.decode(tokens), model.decode(tokens)) and model.decode(tokens).shape == (2, 3, 32, 32)
    with torch.no_grad():
        rec, _, _ = model.eval()(x)
    torch.testing.assert_close(model.decode(tokens), rec)  # the code contract: tokens carry the whole latent
