"""The ViT-VQGAN (Yu et al. 2021): encoder/decoder kind `vit`, its presets, the adaptive GAN weight through its
linear last layer, and the StyleGAN discriminator (`loss.disc_kind: stylegan`)."""
import copy

import pytest
import torch
from conftest import photo_crops, tiny_train_config

from vqgan.config import LossConfig, TokenizerTrainConfig, VQGANConfig, load_config
from vqgan.errors import UserError
from vqgan.losses import VQGANLoss
from vqgan.losses.stylegan_discriminator import StyleGANDiscriminator, minibatch_stddev
from vqgan.nn.vit import sincos_2d
from vqgan.presets import resolve_config_path
from vqgan.tokenizers import VQModel
from vqgan.tokenizers.vit import ViTDecoder, ViTEncoder
from vqgan.train.stage1 import TokenizerTrainer

VIT = {"kind": "vit", "patch_size": 8, "width": 32, "depth": 1, "heads": 2}
TINY_VIT = {"resolution": 32, "z_channels": 16, "encoder": dict(VIT), "decoder": dict(VIT),
            "quantizer": {"n_embed": 64, "embed_dim": 16, "codebook_dim": 8, "l2_norm": True}}


def tiny_vit(**model) -> VQGANConfig:
    return load_config(TokenizerTrainConfig, {"model": {**TINY_VIT, **model}}).model


# -- presets: shapes on the meta device, parameter counts ----------------------------------------------------
# the paper's Table 1 (Small ~32M, Base ~91M per encoder or decoder, as recalled): ours count the blocks, the patch
# (un)embedding and the tanh output head of one part
@pytest.mark.parametrize("name,params_per_part", [("vit-vqgan-small", 32e6), ("vit-vqgan-base", 91e6)])
def test_paper_presets_build_on_meta_with_the_papers_sizes(name, params_per_part):
    cfg = load_config(TokenizerTrainConfig, resolve_config_path(name))
    assert cfg.loss.disc_kind == "stylegan"
    with torch.device("meta"):  # the quantizer's search runs in float32 autocast, which meta tensors lack: the parts
        model = VQModel(cfg.model)
        x = torch.empty(2, 3, 256, 256)
        h = model.encode_to_prequant(x)
        rec = model.decode_latents(h)
    assert h.shape == (2, cfg.model.quantizer.code_width, 32, 32) and rec.shape == x.shape
    assert model.code_spec.levels[0].factor == 8 and model.code_spec.levels[0].vocab == (8192,)
    assert model.quantize.embedding.weight.shape == (8192, 32)
    for part in (model.encoder, model.decoder):
        n = sum(p.numel() for p in part.parameters())
        assert 0.8 * params_per_part < n < 1.2 * params_per_part, (name, type(part).__name__, n)


@pytest.mark.parametrize("name,conv_name", [("small-cpu-vit", "small-cpu-vq"), ("small-cpu-vit-spread", "small-cpu-vq"),
                                            ("small-cpu-vit-fsq", "small-cpu")])
def test_cpu_preset_matches_small_cpu_tokens_and_bits(name, conv_name):
    vit = load_config(TokenizerTrainConfig, resolve_config_path(name)).model
    conv = load_config(TokenizerTrainConfig, resolve_config_path(conv_name)).model
    assert vit.latent_size == conv.latent_size == 8 and vit.resolution == conv.resolution == 64
    assert vit.code_spec.levels[0].vocab == conv.code_spec.levels[0].vocab
    assert (vit.encoder.kind, vit.quantizer.kind) == ("vit", conv.quantizer.kind)


# -- shapes, positions, settings -----------------------------------------------------------------------------
def test_vit_parts_map_images_to_grids_and_back_at_any_multiple_of_the_patch():
    cfg = tiny_vit()
    enc, dec = ViTEncoder(cfg), ViTDecoder(cfg)
    z = enc(torch.randn(2, 3, 48, 40))
    assert z.shape == (2, 16, 6, 5)
    assert dec(z).shape == (2, 3, 48, 40)
    assert isinstance(dec.last_layer, torch.nn.Linear) and dec.last_layer.out_features == 3 * 64


def test_sincos_positions_are_distinct_and_fixed():
    pe = sincos_2d(4, 6, 32)
    assert pe.shape == (24, 32) and torch.equal(pe, sincos_2d(4, 6, 32))
    assert torch.cdist(pe, pe).add(torch.eye(24) * 9).min() > 0.1  # every position its own vector


@pytest.mark.parametrize("override,message", [
    ("model.resolution=36", r"model.resolution 36 is not divisible .*patch_size.*model.resolution=32"),
    ("model.decoder.patch_size=16", r"model.decoder.patch_size .* 8; set model.decoder.patch_size=8"),
    ("model.encoder.heads=3", r"model.encoder.width 32 is not divisible by model.encoder.heads 3; .*heads=2"),
    ("model.decoder.depth=0", r"model.decoder.depth must be >= 1"),
    ("model.decoder.kind=conv", r"model.ch_mult gives the decoder a factor of 16.* is 8; give model.ch_mult 4 levels"),
    ("model.encoder.patchsize=8", r"unknown key .*patchsize.* valid keys .*patch_size"),
    ("loss.disc_kind=style", r"loss.disc_kind must be 'patch' or 'stylegan'"),
])
def test_bad_settings_are_one_line_errors_naming_the_key(override, message):
    with pytest.raises(UserError, match=message) as err:
        load_config(TokenizerTrainConfig, {"model": copy.deepcopy(TINY_VIT)}, [override])  # overrides edit the dict
    assert "\n" not in str(err.value)


def test_vit_encoder_with_an_fsq_quantizer_is_a_valid_config():
    cfg = tiny_vit(quantizer={"kind": "fsq", "levels": [8, 5, 5]})
    model = VQModel(cfg)
    tokens = model.encode(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert tokens.shape == (2, 4, 4, 1) and model.code_spec.levels[0].vocab == (200,)
    assert model.decode(tokens).shape == (2, 3, 32, 32)


def test_vit_with_the_conv_decoder_is_valid_when_the_factors_agree():
    cfg = load_config(TokenizerTrainConfig, {"model": {**TINY_VIT, "decoder": {"kind": "conv"}, "ch": 32,
                                                       "ch_mult": [1, 1, 1, 2], "attn_resolutions": []}}).model
    assert VQModel(cfg)(torch.zeros(1, 3, 32, 32))[0].shape == (1, 3, 32, 32)


# -- the code contract, files --------------------------------------------------------------------------------
def test_codes_round_trip_and_save_load(tmp_path):
    model = VQModel(tiny_vit()).eval()
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    tokens = model.encode(x)
    assert tokens.shape == (3, 4, 4, 1) and tokens.dtype == torch.int64
    with torch.no_grad():
        rec, _, info = model(x)
    torch.testing.assert_close(model.decode(tokens), rec, rtol=1e-4, atol=1e-5)
    assert torch.equal(info["indices"], tokens)
    model.save_pretrained(tmp_path / "m")
    loaded = VQModel.from_pretrained(tmp_path / "m")
    assert loaded.config.encoder == model.config.encoder and type(loaded.encoder) is ViTEncoder
    assert torch.equal(loaded.encode(x), tokens)
    torch.testing.assert_close(loaded.decode(tokens), model.decode(tokens))


# -- the adaptive GAN weight through the linear last layer ---------------------------------------------------
@pytest.mark.parametrize("disc_kind", ["patch", "stylegan"])
def test_fast_generator_step_equals_reference_for_a_vit(disc_kind):
    torch.manual_seed(0)
    fast_model = VQModel(tiny_vit())
    fast_loss = VQGANLoss(LossConfig(perceptual_weight=0.0, disc_start=0, disc_ndf=8, disc_kind=disc_kind), None,
                          resolution=32)
    ref_model, ref_loss = copy.deepcopy(fast_model), copy.deepcopy(fast_loss)
    x = torch.rand(4, 3, 32, 32) * 2 - 1

    tapped = {}  # as train/stage1.py's _InputTap
    hook = fast_model.decoder.last_layer.register_forward_pre_hook(lambda m, a: tapped.update(x=a[0]))
    rec, qloss, _ = fast_model(x)
    hook.remove()
    fast = fast_loss.generator_loss(x, rec, qloss, fast_model.decoder.last_layer, tapped["x"], step=1)
    fast.loss.backward()
    rec_r, qloss_r, _ = ref_model(x)
    ref = ref_loss.generator_loss_reference(x, rec_r, qloss_r, ref_model.decoder.last_layer, step=1)
    ref.loss.backward()

    assert float(ref.logs["adaptive_weight"]) > 0
    torch.testing.assert_close(fast.logs["adaptive_weight"], ref.logs["adaptive_weight"], rtol=1e-4, atol=1e-6)
    g_fast = {n: p.grad for n, p in fast_model.named_parameters() if p.grad is not None}
    g_ref = {n: p.grad for n, p in ref_model.named_parameters() if p.grad is not None}
    assert g_fast.keys() == g_ref.keys() and len(g_fast) == len(list(fast_model.parameters()))
    for name in g_ref:
        torch.testing.assert_close(g_fast[name], g_ref[name], rtol=1e-4,
                                   atol=1e-6 + 1e-5 * float(g_ref[name].abs().max()),
                                   msg=name)
    assert not any(p.grad is not None for p in fast_loss.discriminator.parameters())


# -- the StyleGAN discriminator ------------------------------------------------------------------------------
def test_stylegan_discriminator_gives_one_logit_per_image_at_any_batch():
    d = StyleGANDiscriminator(3, 8, 32)
    for batch in (1, 3, 4, 6):
        assert d(torch.randn(batch, 3, 32, 32)).shape == (batch, 1)
    assert len(d.blocks) == 3  # 32 -> 16 -> 8 -> 4
    x = torch.randn(4, 5, 2, 2)
    assert minibatch_stddev(x).shape == (4, 6, 2, 2)
    with pytest.raises(ValueError, match="built for 32 px"):
        d(torch.randn(2, 3, 64, 64))


@pytest.mark.parametrize("disc_loss", ["hinge", "vanilla"])
def test_stylegan_discriminator_step_gives_finite_gradients(disc_loss):
    loss = VQGANLoss(LossConfig(perceptual_weight=0.0, disc_kind="stylegan", disc_loss=disc_loss, disc_ndf=8), None,
                     resolution=32)
    real, fake = torch.rand(4, 3, 32, 32) * 2 - 1, torch.rand(4, 3, 32, 32) * 2 - 1
    d_loss, logs = loss.discriminator_loss_step(real, fake)
    d_loss.backward()
    grads = [p.grad for p in loss.discriminator.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and float(d_loss.detach()) > 0


def test_stylegan_discriminator_trains_and_resumes_with_its_saved_kind(tmp_path):
    loss = {"disc_kind": "stylegan", "disc_start": 1, "disc_train_start": 0}
    cfg = tiny_train_config(tmp_path / "a", model=TINY_VIT, loss=loss, train={"steps": 4, "ckpt_every": 2})
    full = TokenizerTrainer(cfg, progress=False)
    assert isinstance(full.loss.discriminator, StyleGANDiscriminator)
    d0 = copy.deepcopy(full.loss.discriminator.state_dict())
    assert full.fit()["step"] == 4
    assert any(not torch.equal(d0[k], v) for k, v in full.loss.discriminator.state_dict().items())

    cfg = tiny_train_config(tmp_path / "b", model=TINY_VIT, loss=loss, train={"steps": 2, "ckpt_every": 2})
    TokenizerTrainer(cfg, progress=False).fit()
    # resumed with a config that asks for the PatchGAN: the checkpoint's StyleGAN discriminator is kept
    cfg = tiny_train_config(tmp_path / "b", model=TINY_VIT, loss={**loss, "disc_kind": "patch"},
                            train={"steps": 4, "ckpt_every": 2})
    resumed = TokenizerTrainer(cfg, resume=True, progress=False)
    assert resumed.step == 2 and cfg.loss.disc_kind == "stylegan"
    resumed.fit()
    for k, v in full.loss.discriminator.state_dict().items():
        torch.testing.assert_close(resumed.loss.discriminator.state_dict()[k], v, msg=k)
    for k, v in full.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[k], v, msg=k)


# -- a tiny ViT tokenizer learns real images -----------------------------------------------------------------
@pytest.mark.slow
def test_tiny_vit_tokenizer_overfits_photographs(tmp_path):
    folder = photo_crops(tmp_path / "photos")
    vit = {"kind": "vit", "patch_size": 4, "width": 64, "depth": 2, "heads": 4}
    model = {**TINY_VIT, "z_channels": 32, "encoder": vit, "decoder": vit,
             "quantizer": {"n_embed": 128, "embed_dim": 32, "codebook_dim": 8, "l2_norm": True}}
    cfg = tiny_train_config(tmp_path, model=model,
                            data={"path": str(folder), "holdout": 4, "crop": "center", "flip": False},
                            loss={"disc_start": 10_000, "disc_train_start": 10_000},
                            train={"steps": 150, "batch_size": 8, "base_learning_rate": 1e-4, "warmup_steps": 10,
                                   "eval_every": 1000, "ckpt_every": 1000,
                                   "codebook": {"restart_every": 10, "restart_after": 20}})
    trainer = TokenizerTrainer(cfg, progress=False)
    before = trainer.evaluate()["psnr"]
    after = trainer.fit()
    assert after["psnr"] > before + 5.0, (before, after["psnr"])
    assert after["psnr"] > 15.0
