"""The original VQ-VAE's encoder and decoder (tokenizers/vqvae.py): preset shapes, factors, a tiny one learning
real photographs on MSE alone, its saved model and code contract, and its settings' errors."""
import pytest
import torch
from conftest import photo_crops, tiny_model_config, tiny_train_config

from vqgan.checkpoint import load_model
from vqgan.config import TokenizerTrainConfig, VQGANConfig, load_config
from vqgan.errors import UserError
from vqgan.presets import resolve_config_path
from vqgan.tokenizers import VQModel
from vqgan.tokenizers.vqvae import VQVAEDecoderConfig, VQVAEEncoderConfig
from vqgan.train.stage1 import TokenizerTrainer

TINY = {"encoder": {"kind": "vqvae", "hidden_channels": 32, "residual_channels": 16, "factor": 4},
        "decoder": {"kind": "vqvae", "hidden_channels": 32, "residual_channels": 16},
        "z_channels": 16, "quantizer": {"kind": "ema", "n_embed": 64, "embed_dim": 16}}


@pytest.mark.parametrize("name,grid,vocab,meta", [("vqvae", 32, 512, True), ("small-cpu-vqvae", 8, 1024, False)])
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


@pytest.mark.parametrize("override,key", [
    ("model.encoder.factor=3", "model.encoder.factor"),
    ("model.encoder.hidden_channels=31", "model.encoder.hidden_channels"),
    ("model.decoder.residual_channels=0", "model.decoder.residual_channels"),
    ("model.decoder.num_residual_blocks=-1", "model.decoder.num_residual_blocks"),
    ("loss.l2_weight=-1", "loss.l2_weight"),
    ("model.encoder.strides=2", "model.encoder.strides"),
])
def test_bad_settings_are_one_line_errors_naming_the_key(override, key):
    with pytest.raises(UserError, match=key.replace(".", r"\.")) as err:
        load_config(TokenizerTrainConfig, resolve_config_path("small-cpu-vqvae"), [override])
    assert "\n" not in str(err.value)


def test_a_tiny_vqvae_learns_real_photographs_on_mse(tmp_path):
    photos = photo_crops(tmp_path / "photos")
    cfg = tiny_train_config(tmp_path, model=TINY,
                            loss={"pixel_weight": 0.0, "l2_weight": 1.0, "disc_factor": 0.0},
                            data={"path": str(photos), "holdout": 4, "crop": "center", "flip": False},
                            train={"steps": 30, "batch_size": 8, "base_learning_rate": 2e-3, "scale_lr": False,
                                   "eval_every": 1000, "ckpt_every": 1000})
    trainer = TokenizerTrainer(cfg, progress=False)
    before = trainer.evaluate()["psnr"]
    after = trainer.fit()
    assert after["psnr"] > before + 2.0, (before, after["psnr"])
    model = load_model(tmp_path / "run")  # the saved config names the kinds; the registries rebuild them
    assert model.config == cfg.model and isinstance(model, VQModel)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    tokens = model.encode(x)
    assert tokens.shape == (2, 8, 8, 1) and tokens.dtype == torch.int64
    assert torch.equal(model.decode(tokens), model.decode(tokens)) and model.decode(tokens).shape == (2, 3, 32, 32)
    with torch.no_grad():
        rec, _, _ = model.eval()(x)
    torch.testing.assert_close(model.decode(tokens), rec)  # the code contract: tokens carry the whole latent
