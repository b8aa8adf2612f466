import pytest

from vqgan.config import TokenizerTrainConfig, load_config
from vqgan.errors import UserError
from vqgan.presets import preset_names, resolve_config_path


def test_presets_load_and_overrides_apply():
    assert {"small-cpu", "f16-1024", "f16-16384", "demo"} <= set(preset_names())
    from vqgan.train.stage2 import TransformerTrainConfig

    assert preset_names("prior") == ["demo-prior"] and "demo-prior" not in preset_names()
    for name in preset_names() + preset_names("prior"):
        cfg = load_config(TransformerTrainConfig if name.endswith("prior") else TokenizerTrainConfig,
                          resolve_config_path(name))
        cfg.validate()
    with pytest.raises(UserError, match="tokenizer presets: .*small-cpu-vq.*; prior presets: demo-prior"):
        resolve_config_path("small-cpu-typo")
    cfg = load_config(TokenizerTrainConfig, resolve_config_path("f16-16384"),
                      ["train.steps=7", "model.quantizer.n_embed=512", "loss.disc_weight=0.5", "data.path=/x"])
    assert cfg.model.downsample_factor == 16 and cfg.model.latent_size == 16
    assert (cfg.train.steps, cfg.model.quantizer.n_embed, cfg.loss.disc_weight) == (7, 512, 0.5)


def test_unknown_keys_list_the_valid_ones(tmp_path):
    with pytest.raises(UserError, match=r"unknown key train\.stepz.*valid keys of train: .*steps"):
        load_config(TokenizerTrainConfig, {}, ["train.stepz=3"])
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  chanels: 3\n")
    with pytest.raises(UserError, match=r"unknown key model\.chanels; valid keys .*ch_mult"):
        load_config(TokenizerTrainConfig, p)


def test_bad_values_are_clear_errors():
    with pytest.raises(UserError, match="train.steps must be int"):
        load_config(TokenizerTrainConfig, {}, ["train.steps=many"])
    with pytest.raises(UserError, match="disc_train_start"):
        load_config(TokenizerTrainConfig, {}, ["loss.disc_start=10", "loss.disc_train_start=20"])
    with pytest.raises(UserError, match="neither a config file nor a preset"):
        resolve_config_path("no-such-preset")


def test_yaml_float_without_a_dot_is_accepted():
    cfg = load_config(TokenizerTrainConfig, {}, ["train.base_learning_rate=5e-5"])
    assert cfg.train.base_learning_rate == 5e-5


def test_overrides_leave_the_callers_dict_alone():
    import copy

    data = {"model": {"quantizer": {"kind": "vq", "n_embed": 64}}, "train": {"steps": 5}}
    before = copy.deepcopy(data)
    cfg = load_config(TokenizerTrainConfig, data, ["model.quantizer.kind=fsq", "model.quantizer.levels=[5,5,5]",
                                                   "train.steps=7"])
    assert cfg.train.steps == 7 and cfg.model.quantizer.kind == "fsq"
    assert data == before


def test_a_kind_override_warns_about_the_settings_it_keeps(caplog):
    data = {"model": {"quantizer": {"kind": "vq", "n_embed": 64, "embed_dim": 8, "entropy_weight": 0.1}}}
    with caplog.at_level("WARNING", logger="vqgan.config"):
        cfg = load_config(TokenizerTrainConfig, data, ["model.quantizer.kind=fsq"])
    assert cfg.model.quantizer.entropy_weight == 0.1  # shared with fsq: kept (n_embed, vq's own, left)
    assert len(caplog.records) == 1 and "entropy_weight=0.1 (set for kind vq) carried over" in caplog.text
    assert "embed_dim" not in caplog.text  # every kind's key: not a setting of the old kind
    caplog.clear()
    with caplog.at_level("WARNING", logger="vqgan.config"):  # set on the same command line, or the same kind: quiet
        load_config(TokenizerTrainConfig, data, ["model.quantizer.kind=fsq", "model.quantizer.entropy_weight=0"])
        load_config(TokenizerTrainConfig, data, ["model.quantizer.kind=vq"])
    assert not caplog.records


def test_extends_lays_a_file_over_its_base(tmp_path):
    # a user's variant of a preset: sections merge key by key, lists replace, another kind replaces its section
    (tmp_path / "mine.yaml").write_text(
        "extends: small-cpu\nmodel:\n  ch_mult: [1, 2, 2, 2]\n  quantizer: {kind: vq, n_embed: 256}\ntrain:\n  steps: 9\n")
    cfg = load_config(TokenizerTrainConfig, tmp_path / "mine.yaml")
    base = load_config(TokenizerTrainConfig, resolve_config_path("small-cpu"))
    assert (cfg.model.ch_mult, cfg.train.steps) == ([1, 2, 2, 2], 9)
    assert cfg.model.quantizer.kind == "vq" and cfg.model.quantizer.n_embed == 256  # fsq's levels did not follow
    assert (cfg.model.z_channels, cfg.train.batch_size, cfg.loss.disc_weight) == (
        base.model.z_channels, base.train.batch_size, base.loss.disc_weight)
    # a chain of files relative to each other, and the same kind merging: ema's keys over small-cpu-ema's
    (tmp_path / "more.yaml").write_text("extends: mine.yaml\nmodel:\n  quantizer: {beta: 0.5}\n")
    more = load_config(TokenizerTrainConfig, tmp_path / "more.yaml")
    assert (more.model.quantizer.n_embed, more.model.quantizer.beta, more.train.steps) == (256, 0.5, 9)
    spread = load_config(TokenizerTrainConfig, resolve_config_path("small-cpu-vqvae-spread"))
    assert spread.model.quantizer.kind == "ema" and spread.model.quantizer.decay == 0.99  # from small-cpu-vqvae
    from vqgan.config import merge_sections

    assert merge_sections({"a": {"x": 1}, "b": [1], "c": {"kind": "p", "k": 1}},
                          {"a": [2], "b": {"y": 2}, "c": {"k": 2}, "d": 3}) == {
        "a": [2], "b": {"y": 2}, "c": {"kind": "p", "k": 2}, "d": 3}  # values of another shape replace


def test_extends_errors_name_the_file(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(UserError, match=r"b\.yaml: extends goes round in a circle \(a\.yaml -> b\.yaml -> a\.yaml\)"):
        load_config(TokenizerTrainConfig, tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("extends: no-such-preset\n")
    with pytest.raises(UserError, match="neither a config file nor a preset"):
        load_config(TokenizerTrainConfig, tmp_path / "c.yaml")
    (tmp_path / "e.yaml").write_text("extends: missing.yaml\n")
    with pytest.raises(UserError, match=r"e\.yaml: extends missing\.yaml, but there is no .*missing\.yaml"):
        load_config(TokenizerTrainConfig, tmp_path / "e.yaml")
    (tmp_path / "d.yaml").write_text("extends: [small-cpu]\n")
    with pytest.raises(UserError, match=r"d\.yaml: extends must name a preset or a YAML file"):
        load_config(TokenizerTrainConfig, tmp_path / "d.yaml")
