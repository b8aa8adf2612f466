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


