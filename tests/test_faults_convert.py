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
from conftest import tiny_model_config

from vqgan.autoencoder import VQModel
from vqgan.checkpoint import atomic_directory, load_model, safe_torch_load, save_tensors
from vqgan.cli import main
from vqgan.convert.taming import convert
from vqgan.errors import UserError


def released_run(fixtures_dir, root, config_name="configs/model.yaml", model="vqgan"):
    """taming's released archive layout: <run>/checkpoints/last.ckpt and <run>/configs/model.yaml."""
    (root / "checkpoints").mkdir(parents=True)
    (root / "configs").mkdir()
    shutil.copy(fixtures_dir / f"{model}.ckpt", root / "checkpoints" / "last.ckpt")
    shutil.copy(fixtures_dir / f"{model}.yaml", root / config_name)
    return root / "checkpoints" / "last.ckpt"


def snapshot(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_save_pretrained_keeps_the_other_files_of_a_folder(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "photo.png").write_bytes(b"\x89PNG")
    VQModel(tiny_model_config()).save_pretrained(folder)
    assert (folder / "photo.png").read_bytes() == b"\x89PNG" and (folder / "model.safetensors").is_file()


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
