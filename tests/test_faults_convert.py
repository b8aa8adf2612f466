"""What `convert` and the model files promise under bad input: nothing lost, nothing silent.

Converting never deletes what it did not write (its input least of all), finds the config of the released
layouts, follows the umask, names what it refuses, and turns bad model folders into one-line errors.
"""
import os
import pickle
import shutil
import stat

import pytest
import torch
import yaml
from conftest import tiny_model_config

import vqgan
from vqgan.checkpoint import atomic_directory, load_model, safe_torch_load, save_tensors
from vqgan.cli import main
from vqgan.convert.taming import convert, load_for_finetuning
from vqgan.errors import UserError
from vqgan.priors.load import load_prior
from vqgan.tokenizers import VQModel


def released_run(fixtures_dir, root, config_name="configs/model.yaml", model="vqgan"):
    """taming's released archive layout: <run>/checkpoints/last.ckpt and <run>/configs/model.yaml."""
    (root / "checkpoints").mkdir(parents=True)
    (root / "configs").mkdir()
    shutil.copy(fixtures_dir / f"{model}.ckpt", root / "checkpoints" / "last.ckpt")
    shutil.copy(fixtures_dir / f"{model}.yaml", root / config_name)
    return root / "checkpoints" / "last.ckpt"


def snapshot(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_convert_into_the_folder_of_its_input_refuses_and_overwrite_keeps_everything(fixtures_dir, tmp_path, capsys):
    """The reported loss: `convert run/checkpoints/last.ckpt run/` deleted the checkpoint and its config."""
    run = tmp_path / "run"
    ckpt = released_run(fixtures_dir, run, "configs/2021-01-01T00-00-00-project.yaml")
    (run / "notes.txt").write_text("mine")
    before = snapshot(run)
    assert main(["convert", str(ckpt), str(run)]) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and "among them the input" in err and len(err.strip().splitlines()) == 1
    assert snapshot(run) == before
    assert main(["convert", str(ckpt), str(run), "--overwrite"]) == 0
    after = snapshot(run)
    assert all(after[name] == data for name, data in before.items())  # every file there, with its bytes
    assert {"model.safetensors", "config.yaml", "discriminator.safetensors"} <= {p.name for p in run.iterdir()}
    assert torch.equal(vqgan.load(run).quantize.embedding.weight, vqgan.load(ckpt).quantize.embedding.weight)
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # no temporary folder left behind


def test_convert_into_an_existing_model_replaces_only_its_own_files(fixtures_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert convert(fixtures_dir / "vqgan.ckpt", out, fixtures_dir / "vqgan.yaml")["kind"] == "vqgan"
    (out / "README.txt").write_text("my notes")
    weights = (out / "model.safetensors").read_bytes()
    with pytest.raises(UserError, match="already holds README.txt"):
        convert(fixtures_dir / "vqgan.ckpt", out, fixtures_dir / "vqgan.yaml")
    result = convert(fixtures_dir / "vqgan.ckpt", out, fixtures_dir / "vqgan.yaml", overwrite=True)
    assert "model.safetensors" in result["replaced"] and (out / "README.txt").read_text() == "my notes"
    assert (out / "model.safetensors").read_bytes() == weights
    # a model without loss weights over one with them: the old discriminator would pass for the new model's
    with pytest.raises(UserError, match="discriminator.safetensors.*which this conversion does not write"):
        convert(fixtures_dir / "gumbel.ckpt", out, fixtures_dir / "gumbel.yaml", overwrite=True)
    assert (out / "model.safetensors").read_bytes() == weights


def test_overwrite_never_replaces_an_input(fixtures_dir, tmp_path):
    """A taming config named config.yaml beside the checkpoint is an input, even with --overwrite."""
    shutil.copy(fixtures_dir / "vqgan.ckpt", tmp_path / "last.ckpt")
    shutil.copy(fixtures_dir / "vqgan.yaml", tmp_path / "config.yaml")
    before = snapshot(tmp_path)
    with pytest.raises(UserError, match="would replace .*config.yaml, an input"):
        convert(tmp_path / "last.ckpt", tmp_path, overwrite=True)
    assert snapshot(tmp_path) == before


def test_a_failed_conversion_leaves_the_existing_files_as_they_were(fixtures_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    convert(fixtures_dir / "vqgan.ckpt", out, fixtures_dir / "vqgan.yaml")
    before = snapshot(out)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("vqgan.convert.taming.write_yaml", full_disk)
    with pytest.raises(OSError):
        convert(fixtures_dir / "vqgan.ckpt", out, fixtures_dir / "vqgan.yaml", overwrite=True)
    assert snapshot(out) == before and sorted(out.iterdir()) == sorted(out / n for n in map(str, before))


def test_save_pretrained_keeps_the_other_files_of_a_folder(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "photo.png").write_bytes(b"\x89PNG")
    VQModel(tiny_model_config()).save_pretrained(folder)
    assert (folder / "photo.png").read_bytes() == b"\x89PNG" and (folder / "model.safetensors").is_file()


def test_released_layout_finds_configs_model_yaml(fixtures_dir, tmp_path):
    """The README's example on the layout of the released archives (issue 12, item 11)."""
    ckpt = released_run(fixtures_dir, tmp_path / "vqgan_imagenet_f16_1024")
    assert main(["convert", str(ckpt), str(tmp_path / "converted")]) == 0
    assert vqgan.load(tmp_path / "converted").quantize.n_embed == 64
    assert isinstance(vqgan.load(ckpt), VQModel)  # the .ckpt itself loads too
    prior_ckpt = released_run(fixtures_dir, tmp_path / "transformer_run", model="transformer")
    assert main(["convert", str(prior_ckpt), str(tmp_path / "prior")]) == 0
    assert load_prior(str(tmp_path / "prior")).layout.taming


def test_this_projects_config_beside_a_checkpoint_is_passed_over(fixtures_dir, tmp_path):
    """A model converted into the run folder leaves our config.yaml there; the taming one is still found."""
    ckpt = released_run(fixtures_dir, tmp_path / "run")
    VQModel(tiny_model_config()).save_pretrained(tmp_path / "run")
    assert convert(ckpt, tmp_path / "out")["codes"] == 64


def test_converting_a_missing_file_says_it_does_not_exist(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "nope.ckpt"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "checkpoint" in err and "does not exist" in err and "no taming config" not in err
    assert not (tmp_path / "out").exists()


def test_convert_to_a_path_that_is_a_file_is_refused(fixtures_dir, tmp_path):
    (tmp_path / "out").write_text("x")
    with pytest.raises(UserError, match="is an existing file"):
        convert(fixtures_dir / "vqgan.ckpt", tmp_path / "out", fixtures_dir / "vqgan.yaml")
    assert (tmp_path / "out").read_text() == "x"


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def test_model_folders_and_weight_files_follow_the_umask(fixtures_dir, tmp_path, umask_027):
    """Issue 12 item 14: they were 0700 / 0600 whatever the umask."""
    def mode(p):
        return stat.S_IMODE(p.stat().st_mode)

    convert(fixtures_dir / "transformer.ckpt", tmp_path / "prior", fixtures_dir / "transformer.yaml")
    with atomic_directory(tmp_path / "ckpt") as tmp:
        save_tensors({"w": torch.zeros(2)}, tmp / "model.safetensors")
    for folder in (tmp_path / "prior", tmp_path / "prior" / "tokenizer", tmp_path / "ckpt"):
        assert mode(folder) == 0o750, folder
    for f in (tmp_path / "prior" / "model.safetensors", tmp_path / "prior" / "tokenizer" / "model.safetensors",
              tmp_path / "ckpt" / "model.safetensors", tmp_path / "prior" / "config.yaml"):
        assert mode(f) == 0o640, f


class _Evil:
    def __reduce__(self):
        return (eval, ("1 + 1",))


class Plain:
    pass


@pytest.mark.parametrize("payload, name", [(_Evil(), "builtins.eval"), (Plain(), f"{__name__}.Plain")])
@pytest.mark.parametrize("save", [torch.save, pickle.dump])
def test_refused_checkpoint_names_the_global_and_never_suggests_turning_safety_off(tmp_path, payload, name, save):
    path = tmp_path / "x.ckpt"
    with open(path, "wb") as f:
        save({"state_dict": {"w": torch.zeros(1)}, "extra": payload}, f)
    with pytest.raises(UserError) as e:
        safe_torch_load(path)
    message = str(e.value)
    assert "refused for safety" in message and name in message
    assert "weights_only" not in message and "\n" not in message and message.rstrip().endswith(")")


@pytest.mark.parametrize("text, expected", [("kind: vqgan\nch: [1, 2\n", "is not valid YAML"),
                                            ("- 1\n- 2\n", "holds a list, not a mapping")])
def test_a_broken_model_config_is_one_line_naming_the_file(tmp_path, text, expected, capsys):
    VQModel(tiny_model_config()).save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.yaml").write_text(text)
    with pytest.raises(UserError, match=expected) as e:
        load_model(tmp_path / "m")
    assert str(tmp_path / "m" / "config.yaml") in str(e.value) and "\n" not in str(e.value)
    assert main(["encode", str(tmp_path / "m"), "builtin:scenes", str(tmp_path / "t"), "--no-progress"]) == 2
    assert expected in capsys.readouterr().err


def test_a_prior_given_as_a_tokenizer_is_one_line(fixtures_dir, tmp_path):
    convert(fixtures_dir / "transformer.ckpt", tmp_path / "prior", fixtures_dir / "transformer.yaml")
    shutil.copy(fixtures_dir / "transformer.ckpt", tmp_path / "t.ckpt")
    shutil.copy(fixtures_dir / "transformer.yaml", tmp_path / "t.yaml")
    for prior in (tmp_path / "prior", tmp_path / "t.ckpt"):
        with pytest.raises(UserError, match="is a transformer prior, not a tokenizer"):
            load_for_finetuning(prior)


def test_a_tokenizer_given_as_a_prior_is_one_line(fixtures_dir, tmp_path):
    VQModel(tiny_model_config()).save_pretrained(tmp_path / "tok")
    shutil.copy(fixtures_dir / "vqgan.ckpt", tmp_path / "v.ckpt")
    shutil.copy(fixtures_dir / "vqgan.yaml", tmp_path / "v.yaml")
    for tokenizer in (tmp_path / "tok", tmp_path / "v.ckpt"):
        with pytest.raises(UserError, match="is a tokenizer.*not a transformer prior"):
            load_prior(str(tokenizer))


def test_train_init_from_a_prior_is_one_line(fixtures_dir, tmp_path, capsys):
    convert(fixtures_dir / "transformer.ckpt", tmp_path / "prior", fixtures_dir / "transformer.yaml")
    assert main(["train-tokenizer", "small-cpu", f"train.init_from={tmp_path / 'prior'}",
                 f"train.out_dir={tmp_path / 'run'}", "data.path=builtin:scenes", "data.builtin_count=16",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is a transformer prior, not a tokenizer" in err


def test_prior_config_records_its_tokenizer_fingerprint(fixtures_dir, tmp_path):
    from vqgan.checkpoint import fingerprint

    convert(fixtures_dir / "transformer.ckpt", tmp_path / "prior", fixtures_dir / "transformer.yaml")
    recorded = yaml.safe_load((tmp_path / "prior" / "config.yaml").read_text())["conditioning"]
    assert recorded["tokenizer_fingerprint"] == fingerprint(load_model(tmp_path / "prior" / "tokenizer"))
