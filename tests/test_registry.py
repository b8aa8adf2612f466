"""Parts are chosen by kind: unknown kinds are one-line errors listing the valid ones; old flat configs load."""
import pytest
import yaml
from conftest import tiny_model_config

from vqgan.autoencoder import VQModel
from vqgan.checkpoint import load_model
from vqgan.config import VQGANConfig, load_config, quantizer_config
from vqgan.errors import UserError
from vqgan.quantizers import build_quantizer
from vqgan.registry import ENCODERS, QUANTIZERS, Registry


def test_unknown_quantizer_kind_is_one_line_listing_the_kinds():
    with pytest.raises(UserError, match=r"model\.quantizer\.kind must be one of .*gumbel.*vq.*; got 'nope'") as e:
        build_quantizer(quantizer_config(kind="nope"), 8)  # no silent fallback to plain VQ
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="model.quantizer.kind must be one of"):
        load_config(VQGANConfig, {"quantizer": {"kind": "nope"}})


def test_unknown_encoder_kind_is_one_line():
    with pytest.raises(UserError, match=r"model\.encoder\.kind must be one of conv; got 'vit'"):
        load_config(VQGANConfig, {"encoder": {"kind": "vit"}})
    assert "conv" in ENCODERS and "vq" in QUANTIZERS


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
