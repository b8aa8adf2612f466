"""The original taming-transformers checkpoints load exactly (fixtures made with the original code)."""
import shutil

import numpy as np
import pytest
import torch

import vqgan
from vqgan.cli import main
from vqgan.convert.taming import load_taming_vqgan
from vqgan.errors import UserError
from vqgan.losses import VQGANLoss, build_lpips


@pytest.fixture
def io(fixtures_dir):
    return {k: torch.from_numpy(v) for k, v in np.load(fixtures_dir / "io.npz").items()}


def test_vqgan_checkpoint_reproduces_reference_outputs(fixtures_dir, io):
    model, loss_cfg, disc_sd, lpips_sd = load_taming_vqgan(fixtures_dir / "vqgan.ckpt", fixtures_dir / "vqgan.yaml")
    assert model.config.quantizer.legacy_beta and loss_cfg.disc_ndf == 4 and len(disc_sd) == 22 and len(lpips_sd) == 33
    x = io["images"]
    with torch.no_grad():
        rec, qloss, info = model(x)
    assert torch.equal(model.encode(x), io["vq_indices_bhw"][..., None])
    assert torch.equal(info["indices"].reshape(-1), io["vq_indices"])
    for ours, ref in ((model.encode_to_prequant(x).detach(), io["vq_h"]), (rec, io["vq_dec"]),
                      (model.decode(model.encode(x)), io["vq_decode_code"]),
                      (model.quantize.decode_indices(io["vq_indices_bhw"][..., None]), io["vq_quant_from_indices"])):
        assert (ours - ref).abs().max() < 1e-4
    assert abs(float(qloss) - float(io["vq_qloss"])) < 1e-6


def test_converted_loss_reproduces_reference_objective(fixtures_dir, io):
    """L1 + LPIPS (the checkpoint's own network) + adaptive weight + PatchGAN terms, as taming computes them."""
    model, loss_cfg, disc_sd, lpips_sd = load_taming_vqgan(fixtures_dir / "vqgan.ckpt", fixtures_dir / "vqgan.yaml")
    loss = VQGANLoss(loss_cfg, build_lpips(state_dict=lpips_sd, state_source="fixture"))
    loss.discriminator.load_state_dict(disc_sd)
    loss.eval()
    x = io["images"]
    rec, qloss, _ = model(x)
    gen = loss.generator_loss_reference(x, rec, qloss, model.decoder.last_layer, step=0)
    p = loss.perceptual(x, rec)
    assert (p - io["loss_p_loss"].reshape(-1)).abs().max() < 1e-5
    weight = float(gen.logs["adaptive_weight"]) / loss_cfg.disc_weight  # taming logs d_weight * disc_weight
    assert weight * loss_cfg.disc_weight == pytest.approx(float(io["loss_log_train_d_weight"]), rel=1e-4)
    assert float(gen.logs["gan"]) == pytest.approx(float(io["loss_log_train_g_loss"]), rel=1e-4, abs=1e-6)
    assert float(gen.logs["total"]) == pytest.approx(float(io["loss_ae_total"]), rel=1e-4)
    d_loss, d_logs = loss.discriminator_loss_step(x, rec)
    assert float(d_loss.detach()) == pytest.approx(float(io["loss_disc_total"]), rel=1e-5)
    assert (loss.discriminator(x) - io["loss_logits_real"]).abs().max() < 1e-4


def test_convert_command_and_load(fixtures_dir, io, tmp_path):
    ckpt = tmp_path / "released" / "last.ckpt"
    ckpt.parent.mkdir()
    shutil.copy(fixtures_dir / "vqgan.ckpt", ckpt)
    shutil.copy(fixtures_dir / "vqgan.yaml", ckpt.parent / "model.yaml")  # found beside the checkpoint
    assert main(["convert", str(ckpt), str(tmp_path / "converted")]) == 0
    for f in ("model.safetensors", "config.yaml", "discriminator.safetensors", "lpips.safetensors", "loss.yaml"):
        assert (tmp_path / "converted" / f).is_file(), f
    for source in (tmp_path / "converted", ckpt):
        model = vqgan.load(source)
        assert torch.equal(model.encode(io["images"])[..., 0], io["vq_indices_bhw"])


def test_gumbel_checkpoint_reproduces_reference_outputs(fixtures_dir, io):
    model = load_taming_vqgan(fixtures_dir / "gumbel.ckpt", fixtures_dir / "gumbel.yaml")[0]
    x = io["gumbel_images"]
    with torch.no_grad():
        h = model.encode_to_prequant(x)
        assert (h - io["gumbel_h"]).abs().max() < 1e-4
        assert (model.quantize.proj(h) - io["gumbel_logits"]).abs().max() < 1e-4
        tokens = model.encode(x)  # eval: the noise-free argmax
        assert torch.equal(tokens[..., 0], io["gumbel_indices_argmax"])
        assert (model.quantize.decode_indices(tokens) - io["gumbel_quant_argmax"]).abs().max() < 1e-5
        assert (model.decode(tokens) - io["gumbel_dec_argmax"]).abs().max() < 1e-4
        # taming's eval adds Gumbel noise; the compatibility flag reproduces it draw for draw
        model.quantize.config.noise_in_eval = True
        torch.manual_seed(int(io["gumbel_noise_seed"]))
        out = model.quantize(h)
        assert torch.equal(out.indices[..., 0], io["gumbel_indices_sampled"])
        assert (out.quantized - io["gumbel_quant_sampled"]).abs().max() < 1e-5
        assert float(out.loss) == pytest.approx(float(io["gumbel_kl_sampled"]), rel=1e-4, abs=1e-12)


def test_unsupported_and_mismatched_checkpoints_are_clear_errors(fixtures_dir, tmp_path):
    with pytest.raises(UserError, match="not supported yet"):
        load_taming_vqgan(fixtures_dir / "transformer.ckpt", fixtures_dir / "transformer.yaml")
    with pytest.raises(UserError, match="no taming config found"):
        shutil.copy(fixtures_dir / "vqgan.ckpt", tmp_path / "lonely.ckpt")
        load_taming_vqgan(tmp_path / "lonely.ckpt")
    with pytest.raises(UserError, match="missing keys"):
        load_taming_vqgan(fixtures_dir / "gumbel.ckpt", fixtures_dir / "vqgan.yaml")
    truncated = tmp_path / "cut.ckpt"
    truncated.write_bytes((fixtures_dir / "vqgan.ckpt").read_bytes()[:5000])
    with pytest.raises(UserError, match="corrupt or truncated"):
        load_taming_vqgan(truncated, fixtures_dir / "vqgan.yaml")


def test_finetune_from_an_original_checkpoint(fixtures_dir, tmp_path):
    from vqgan.config import TokenizerTrainConfig, load_config
    from vqgan.train.stage1 import TokenizerTrainer

    cfg = load_config(TokenizerTrainConfig, {
        "model": {"resolution": 32, "ch": 32, "ch_mult": [1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [8],
                  "z_channels": 16, "quantizer": {"n_embed": 64, "embed_dim": 16, "legacy_beta": True}},
        "loss": {"perceptual_weight": 1.0, "disc_ndf": 4, "disc_start": 0},
        "data": {"path": "builtin:scenes", "builtin_count": 24, "holdout": 4, "num_workers": 0},
        "train": {"out_dir": str(tmp_path / "run"), "steps": 2, "batch_size": 4,
                  "init_from": str(fixtures_dir / "vqgan.ckpt"), "ckpt_every": 100}})
    shutil.copy(fixtures_dir / "vqgan.yaml", tmp_path / "vqgan.yaml")
    ckpt = tmp_path / "vqgan.ckpt"
    shutil.copy(fixtures_dir / "vqgan.ckpt", ckpt)
    cfg.train.init_from = str(ckpt)
    trainer = TokenizerTrainer(cfg, progress=False)
    assert "from " + str(ckpt) in trainer.loss.perceptual_description  # the checkpoint's own LPIPS
    ref = vqgan.load(ckpt)
    assert torch.equal(trainer.model.quantize.embedding.weight, ref.quantize.embedding.weight)  # codebook kept
    result = trainer.fit()
    assert result["step"] == 2


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_convert_refuses_a_malicious_checkpoint(fixtures_dir, tmp_path, capsys):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "callback": _Payload(marker)}, evil)
    assert main(["convert", str(evil), str(tmp_path / "out"), "--config", str(fixtures_dir / "vqgan.yaml")]) == 2
    assert "refused for safety" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("unknown", ["extra", "5"])
def test_remap_option_numbers_tokens_by_the_used_list(fixtures_dir, io, tmp_path, unknown):
    """taming's `remap`: tokens index a list of used codes; codes outside it become `unknown_index`."""
    import yaml

    used = np.arange(0, 64, 2)  # the even codes
    np.save(tmp_path / "used.npy", used)
    cfg = yaml.safe_load((fixtures_dir / "vqgan.yaml").read_text())
    cfg["model"]["params"].update(remap="used.npy", unknown_index=unknown if unknown == "extra" else int(unknown))
    (tmp_path / "remap.yaml").write_text(yaml.safe_dump(cfg))
    model = load_taming_vqgan(fixtures_dir / "vqgan.ckpt", tmp_path / "remap.yaml")[0]
    codes = io["vq_indices_bhw"]
    expect = torch.where(codes % 2 == 0, codes // 2, torch.full_like(codes, 32 if unknown == "extra" else 5))
    assert torch.equal(model.encode(io["images"])[..., 0], expect)
    assert model.quantize.n_embed == (33 if unknown == "extra" else 32)
    even = codes % 2 == 0  # known tokens decode to their own code vectors
    vectors = model.quantize.decode_indices(expect[..., None]).permute(0, 2, 3, 1)[even]
    assert torch.equal(vectors, model.quantize.embedding.weight[codes[even]])
    # a checkpoint that carries the list as the buffer `quantize.used` needs no file
    sd = torch.load(fixtures_dir / "vqgan.ckpt", weights_only=True)
    sd["state_dict"]["quantize.used"] = torch.from_numpy(used)
    torch.save(sd, tmp_path / "with_buffer.ckpt")
    (tmp_path / "used.npy").unlink()
    model = load_taming_vqgan(tmp_path / "with_buffer.ckpt", tmp_path / "remap.yaml")[0]
    assert torch.equal(model.encode(io["images"])[..., 0], expect)
    with pytest.raises(UserError, match="remap file used.npy is not found"):
        load_taming_vqgan(fixtures_dir / "vqgan.ckpt", tmp_path / "remap.yaml")


def test_full_size_released_layouts_match_key_for_key(fixtures_dir):
    """The state-dict layouts of full-size models built from taming's own imagenet_vqgan.yaml and
    faceshq_transformer.yaml (recorded in real_config_keys.json): every key and shape has its place here."""
    import json

    from vqgan.config import VQGANConfig, quantizer_config
    from vqgan.convert.taming import split_vqgan_state_dict
    from vqgan.losses.discriminator import NLayerDiscriminator
    from vqgan.losses.lpips import LPIPS
    from vqgan.priors import GPT, GPTConfig
    from vqgan.tokenizers import VQModel

    layouts = json.loads((fixtures_dir / "real_config_keys.json").read_text())
    f16 = VQGANConfig(resolution=256, ch=128, ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2, attn_resolutions=[16],
                      z_channels=256, quantizer=quantizer_config(n_embed=1024, embed_dim=256))

    def shapes(module, prefix=""):
        return {prefix + k: list(v.shape) for k, v in module.state_dict().items()}

    with torch.device("meta"):
        real = layouts["configs/imagenet_vqgan.yaml:VQModel"]
        model, disc, lpips = split_vqgan_state_dict({k: torch.empty(s) for k, s in real.items()}, "real")
        assert shapes(VQModel(f16)) == {k: list(v.shape) for k, v in model.items()}
        assert shapes(NLayerDiscriminator(3, 64, 3, "batch")) == {k: list(v.shape) for k, v in disc.items()}
        assert shapes(LPIPS()) == {k: list(v.shape) for k, v in lpips.items()}

        real = layouts["configs/faceshq_transformer.yaml:Net2NetTransformer"]
        gpt = GPT(GPTConfig(vocab_size=1024, block_size=512, n_layer=24, n_head=16, n_embd=1024))
        ours = {**shapes(gpt, "transformer."), **shapes(VQModel(f16), "first_stage_model.")}
        theirs = {k: v for k, v in real.items() if not k.endswith(".attn.mask")}  # a derived buffer
        assert ours == theirs


def test_a_checkpoint_without_its_config_says_how_for_every_command(tmp_path):
    from vqgan.checkpoint import load_model

    lonely = tmp_path / "run" / "last.ckpt"
    lonely.parent.mkdir()
    torch.save({"state_dict": {}}, lonely)
    with pytest.raises(UserError) as err:  # what encode, reconstruct or imagine call: none has --config
        load_model(lonely)
    message = str(err.value)
    assert "\n" not in message and "model.yaml or *-project.yaml" in message
    assert "vqgan convert CKPT OUT --config YAML" in message and "pass it with --config" not in message
