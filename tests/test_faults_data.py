"""Data commands under bad data and bad input (issue 12): nothing lost, nothing silent.

- a row of a token store (or of `encode`'s tokens) is always its own image's tokens, with its own label and
  condition map; an unreadable image or map makes its row unusable and is counted, never replaced;
- per-image outputs never overwrite each other when files share a name in different sub-folders;
- stores record absolute tokenizer paths (a prior trained elsewhere still finds its tokenizer), and a resumed
  `tokenize` compares tokenizers by fingerprint, not by how their paths are spelled;
- symlinked sub-folders are followed, loops are not, and what is left out is logged;
- bad options and files end in one line `vqgan CMD: error: ...`, exit code 2, before any work.
"""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import tiny_model_config
from PIL import Image

from vqgan.autoencoder import VQModel
from vqgan.checkpoint import fingerprint, load_model, save_model
from vqgan.cli import main
from vqgan.config import QuantizerConfig, VQGANConfig
from vqgan.data.images import ImageDataset, ImageSource, scan_images
from vqgan.data.maps import load_label_map
from vqgan.data.scenes import SEGMENT_CLASSES
from vqgan.data.tokens import UNUSABLE, TokenStore, tokenize_folder
from vqgan.errors import UserError
from vqgan.eval.report import to_uint8
from vqgan.transformer import GPT, GPTConfig

N_LABELS = len(SEGMENT_CLASSES)


def write_png(path, seed: int, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    if mode == "L":  # a label map: class ids as grey values
        Image.fromarray(rng.integers(0, N_LABELS, (40, 36), dtype=np.uint8)).save(path)
    else:
        Image.fromarray(rng.integers(0, 255, (40, 36, 3), dtype=np.uint8)).save(path)


def truncate(path) -> None:
    """Keep the first half of the file: the header reads, the pixels do not."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def own_tokens(model: VQModel, path) -> torch.Tensor:
    x = ImageDataset.from_paths([path], resolution=32, crop="center", train=False)[0]["image"][None]
    return model.encode(x)[0]


def own_map_tokens(model: VQModel, path) -> torch.Tensor:
    ds = ImageDataset([ImageSource(str(path), lambda: load_label_map(path))], resolution=32, crop="center",
                      train=False, kind="segmentation", n_labels=N_LABELS)
    return model.encode(ds[0]["image"][None])[0]


@pytest.fixture
def tok(tmp_path):
    model = VQModel(tiny_model_config())
    model.save_pretrained(tmp_path / "tok")
    return model.eval(), tmp_path / "tok"


def seg_tokenizer(path) -> VQModel:
    model = VQModel(VQGANConfig(resolution=32, ch=32, ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[8],
                                z_channels=32, quantizer=QuantizerConfig(n_embed=32, embed_dim=16),
                                input_kind="segmentation", in_channels=N_LABELS, out_ch=N_LABELS))
    model.save_pretrained(path)
    return model.eval()


# -- every row is its own image ---------------------------------------------------------------------------


def test_tokenize_marks_a_truncated_image_unusable_instead_of_pairing_its_label_with_the_next(tmp_path, tok):
    model, tok_dir = tok
    for cls in ("cats", "dogs"):
        for i in range(3):
            write_png(tmp_path / "imgs" / cls / f"{i}.png", seed=10 * len(cls) + i)
    truncate(tmp_path / "imgs" / "cats" / "2.png")  # the next image is dogs/0.png: another class
    result = tokenize_folder(str(tok_dir), str(tmp_path / "imgs"), str(tmp_path / "store"), batch_size=4,
                             labels="folders", progress=False)
    store = TokenStore(tmp_path / "store")
    bad = store.meta["files"].index(str(tmp_path / "imgs" / "cats" / "2.png"))
    assert store.labels[bad] == UNUSABLE
    assert result["skipped"] == 1 and result["unusable_rows"] == 1
    for row, file in enumerate(store.meta["files"]):
        if row != bad:
            assert torch.equal(store[row]["tokens"], own_tokens(model, file)), file
            assert store.class_names[store.labels[row]] in file


def test_tokenize_with_maps_never_pairs_a_map_with_another_images_tokens(tmp_path, tok):
    model, tok_dir = tok
    seg = seg_tokenizer(tmp_path / "seg")
    for i in range(5):
        write_png(tmp_path / "imgs" / f"{i}.png", seed=i)
        write_png(tmp_path / "maps" / f"{i}.png", seed=100 + i, mode="L")
    truncate(tmp_path / "imgs" / "1.png")
    truncate(tmp_path / "maps" / "3.png")
    result = tokenize_folder(str(tok_dir), str(tmp_path / "imgs"), str(tmp_path / "store"), batch_size=2,
                             cond_maps=str(tmp_path / "maps"), cond_tokenizer=str(tmp_path / "seg"), progress=False)
    store = TokenStore(tmp_path / "store")
    assert [int(v) for v in store.labels] == [-1, UNUSABLE, -1, UNUSABLE, -1] and result["skipped"] == 2
    for row in (0, 2, 4):
        assert torch.equal(store[row]["tokens"], own_tokens(model, tmp_path / "imgs" / f"{row}.png"))
        assert torch.equal(store[row]["cond"], own_map_tokens(seg, tmp_path / "maps" / f"{row}.png"))


# -- paths that hold from any working directory ---------------------------------------------------------------


def test_the_condition_tokenizer_path_is_absolute(tmp_path, tok, monkeypatch):
    seg_tokenizer(tmp_path / "seg")
    monkeypatch.chdir(tmp_path)
    tokenize_folder("tok", "builtin:scenes", "store", builtin_count=2, cond_maps="builtin:scenes-seg",
                    cond_tokenizer="./seg", progress=False)
    cond = TokenStore(tmp_path / "store").condition
    assert cond["tokenizer"]["path"] == str(tmp_path / "seg") and cond["maps"] == "builtin:scenes-seg"


def as_if_killed(store, done: int) -> None:
    """The state a `tokenize` killed after `done` rows leaves behind."""
    meta = json.loads((store / "meta.json").read_text())
    (store / "meta.json").write_text(json.dumps({**meta, "done": done, "complete": False}))


@pytest.mark.parametrize("spelling", ["trailing slash", "relative"])
def test_resuming_with_the_same_tokenizer_spelled_differently_finishes_the_store(tmp_path, tok, monkeypatch,
                                                                                    spelling):
    _, tok_dir = tok
    for i in range(6):
        write_png(tmp_path / "imgs" / f"{i}.png", seed=i)
    tokenize_folder(str(tok_dir), str(tmp_path / "imgs"), str(tmp_path / "a"), batch_size=2, progress=False)
    tokenize_folder(str(tok_dir), str(tmp_path / "imgs"), str(tmp_path / "b"), batch_size=2, progress=False)
    as_if_killed(tmp_path / "b", done=2)
    monkeypatch.chdir(tmp_path)
    again = str(tok_dir) + "/" if spelling == "trailing slash" else "tok"
    tokenize_folder(again, "imgs", "b", batch_size=2, progress=False)
    assert np.array_equal(TokenStore(tmp_path / "a").tokens, TokenStore(tmp_path / "b").tokens)


def test_resume_starts_over_when_the_token_file_is_gone_and_refuses_other_labels(tmp_path, tok):
    _, tok_dir = tok
    for i in range(6):
        write_png(tmp_path / "imgs" / ("cats" if i < 3 else "dogs") / f"{i}.png", seed=i)
    tokenize_folder(str(tok_dir), str(tmp_path / "imgs"), str(tmp_path / "a"), batch_size=2, progress=False)
    tokenize_folder(str(tok_dir), str(tmp_path / "imgs"), str(tmp_path / "b"), batch_size=2, progress=False)
    as_if_killed(tmp_path / "b", done=2)
    with pytest.raises(UserError, match="made differently"):
        tokenize_folder(str(tok_dir), str(tmp_path / "imgs"), str(tmp_path / "b"), labels="folders", progress=False)
    (tmp_path / "b" / "tokens.bin").unlink()
    tokenize_folder(str(tok_dir), str(tmp_path / "imgs"), str(tmp_path / "b"), batch_size=2, progress=False)
    assert np.array_equal(TokenStore(tmp_path / "a").tokens, TokenStore(tmp_path / "b").tokens)


# -- symlinked folders --------------------------------------------------------------------------------------


def test_symlinked_sub_folders_are_followed_loops_are_not_and_both_are_logged(tmp_path, caplog):
    imgs = tmp_path / "imgs"
    write_png(imgs / "own" / "a.png", seed=0)
    for i in range(3):
        write_png(tmp_path / "outside" / f"{i}.png", seed=i + 1)
    (imgs / "linked").symlink_to(tmp_path / "outside", target_is_directory=True)
    (imgs / "own" / "loop").symlink_to(imgs, target_is_directory=True)  # a link to an ancestor
    (imgs / "again").symlink_to(imgs / "own", target_is_directory=True)  # the same folder twice
    (imgs / "gone.png").symlink_to(tmp_path / "missing.png")
    good, bad = scan_images(imgs)
    assert [str(p.relative_to(imgs)) for p in good] == ["linked/0.png", "linked/1.png", "linked/2.png", "own/a.png"]
    assert bad == [imgs / "gone.png"]
    assert "a loop" in caplog.text and "already scanned" in caplog.text and "broken link" in caplog.text


# -- bad input: one line, exit code 2, before any work ---------------------------------------------------------


def test_labels_keyed_by_a_shared_file_name_or_naming_no_image_are_refused(tmp_path, tok):
    _, tok_dir = tok
    for cls in ("a", "b"):
        write_png(tmp_path / "imgs" / cls / "x.png", seed=len(cls))
    (tmp_path / "by_name.csv").write_text("x.png,cat\n")
    with pytest.raises(UserError, match="2 images have that name"):
        tokenize_folder(str(tok_dir), str(tmp_path / "imgs"), str(tmp_path / "s"), labels=str(tmp_path / "by_name.csv"),
                        progress=False)
    (tmp_path / "none.json").write_text('{"y.png": "cat"}')
    with pytest.raises(UserError, match="names none of the images"):
        tokenize_folder(str(tok_dir), str(tmp_path / "imgs"), str(tmp_path / "s"), labels=str(tmp_path / "none.json"),
                        progress=False)


def test_the_command_line_prints_one_line_without_a_traceback(tmp_path, tok):
    _, tok_dir = tok
    write_png(tmp_path / "imgs" / "0.png", seed=0)
    proc = subprocess.run([sys.executable, "-m", "vqgan.cli", "tokenize", str(tok_dir), str(tmp_path / "imgs"),
                           str(tmp_path / "store"), "--crops", "0"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "vqgan tokenize: error: --crops 0: must be at least 1"
    assert not (tmp_path / "store").exists()
