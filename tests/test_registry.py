"""Parts are chosen by kind: unknown kinds are one-line errors listing the valid ones; old flat configs load."""
import pytest
import yaml
from conftest import tiny_model_config

from vqgan.checkpoint import load_model
from vqgan.config import VQGANConfig, load_config, quantizer_config
from vqgan.errors import UserError
from vqgan.quantizers import build_quantizer
from vqgan.registry import ENCODERS, QUANTIZERS, Registry
from vqgan.tokenizers import VQModel


def test_unknown_quantizer_kind_is_one_line_listing_the_kinds():
    with pytest.raises(UserError, match=r"model\.quantizer\.kind must be one of .*gumbel.*vq.*; got 'nope'") as e:
        build_quantizer(quantizer_config(kind="nope"), 8)  # no silent fallback to plain VQ
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="model.quantizer.kind must be one of"):
        load_config(VQGANConfig, {"quantizer": {"kind": "nope"}})


def test_unknown_encoder_kind_is_one_line():
    with pytest.raises(UserError, match=r"model\.encoder\.kind must be one of conv, .*vit.*; got 'nope'"):
        load_config(VQGANConfig, {"encoder": {"kind": "nope"}})
    assert "conv" in ENCODERS and "vit" in ENCODERS and "vq" in QUANTIZERS


def test_a_kind_registers_once():
    reg = Registry("thing", "x.kind")
    reg.register("a")(int)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a")(float)


def test_a_flat_config_without_part_sections_loads_unchanged(tmp_path):
    model = VQModel(tiny_model_config())
    model.save_pretrained(tmp_path / "m")
    saved = yaml.safe_load((tmp_path / "m" / "config.yaml").read_text())
    assert saved["encoder"] == {"kind": "conv"} and saved["decoder"] == {"kind": "conv"}
    flat = {k: v for k, v in saved.items() if k not in ("encoder", "decoder")}  # as written before the registry
    (tmp_path / "m" / "config.yaml").write_text(yaml.safe_dump(flat))
    loaded = load_model(tmp_path / "m")
    assert loaded.config == model.config


def test_each_quantizer_kind_reads_its_own_typed_section():
    from vqgan.quantizers import GumbelConfig, VQConfig

    cfg = load_config(VQGANConfig, {"quantizer": {"kind": "gumbel", "n_embed": 16, "temperature": 0.5}})
    assert type(cfg.quantizer) is GumbelConfig and cfg.quantizer.temperature == 0.5
    with pytest.raises(UserError, match=r"unknown key quantizer\.temperature; valid keys of "
                                        r"quantizer \(kind vq\): kind, embed_dim, n_embed, beta"):
        load_config(VQGANConfig, {"quantizer": {"kind": "vq", "temperature": 0.5}})
    # switching the kind on the command line drops the preset's keys the new kind does not have
    cfg = load_config(VQGANConfig, {"quantizer": {"kind": "gumbel", "n_embed": 16, "temperature": 0.5}},
                      ["quantizer.beta=0.5", "quantizer.kind=vq"])  # kind first, whatever the order given
    assert type(cfg.quantizer) is VQConfig and (cfg.quantizer.n_embed, cfg.quantizer.beta) == (16, 0.5)
    with pytest.raises(UserError, match="model.quantizer.kind must be one of"):
        load_config(VQGANConfig, {}, ["quantizer.kind=nope"])


def test_a_quantizer_section_saved_with_every_kinds_keys_still_loads(tmp_path):
    """Model folders written before the sections were typed hold all kinds' keys at their defaults."""
    model = VQModel(tiny_model_config())
    model.save_pretrained(tmp_path / "m")
    saved = yaml.safe_load((tmp_path / "m" / "config.yaml").read_text())
    saved["quantizer"].update(temperature=1.0, kl_weight=5e-4, straight_through=True, noise_in_eval=False)
    del saved["codes"]
    (tmp_path / "m" / "config.yaml").write_text(yaml.safe_dump(saved))
    assert load_model(tmp_path / "m").config == model.config
    saved["quantizer"]["temperature"] = 0.3  # not a default: a real setting this kind cannot honour
    (tmp_path / "m" / "config.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(UserError, match="temperature"):
        load_model(tmp_path / "m")


def test_the_model_config_records_its_code_spec(tmp_path):
    model = VQModel(tiny_model_config())
    model.save_pretrained(tmp_path / "m")
    saved = yaml.safe_load((tmp_path / "m" / "config.yaml").read_text())
    assert saved["codes"] == {"levels": [{"factor": 2, "vocab": [64]}]} == model.code_spec.to_dict()
