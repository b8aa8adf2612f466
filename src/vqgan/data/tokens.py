"""Token stores: an image folder encoded once, for training the transformer on tokens instead of images.

A store is a directory:
- `tokens.bin`: (N, h, w) raw array, uint16 when the codebook has at most 65536 codes, else int32, read
  through a memory map;
- `labels.npy`: (N,) int64 class ids (-1: none);
- `meta.json`: the tokenizer (path, weight fingerprint, codebook size), grid, dtype, augmentation, class
  names, source file of each row, and how many rows are done (a killed `vqgan tokenize` resumes there).
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..errors import UserError

TOKENS_BIN = "tokens.bin"
LABELS_FILE = "labels.npy"
META_FILE = "meta.json"


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


class TokenStore(Dataset):
    """Rows of tokens (h, w) int64 and their labels, memory-mapped."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        meta_path = self.directory / META_FILE
        if not meta_path.is_file():
            raise UserError(f"{self.directory} is not a token store (no {META_FILE}); make one with `vqgan tokenize`")
        self.meta = json.loads(meta_path.read_text())
        if not self.meta.get("complete"):
            raise UserError(f"{self.directory} is incomplete ({self.meta.get('done', 0)}/{self.meta['count']} rows); "
                            "run the same `vqgan tokenize` command again to finish it")
        self.grid = tuple(self.meta["grid"])
        self.tokens = np.memmap(self.directory / TOKENS_BIN, dtype=self.meta["dtype"], mode="r",
                                shape=(self.meta["count"], *self.grid))
        self.labels = np.load(self.directory / LABELS_FILE)

    @property
    def n_embed(self) -> int:
        return int(self.meta["tokenizer"]["n_embed"])

    @property
    def class_names(self) -> list[str]:
        return list(self.meta.get("class_names") or [])

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"tokens": torch.from_numpy(self.tokens[i].astype(np.int64)), "label": int(self.labels[i])}


def folder_labels(names: list[str], root: Path) -> tuple[list[int], list[str]]:
    """ImageFolder convention: the first sub-folder under `root` names the class."""
    parts = [Path(n).relative_to(root).parts for n in names]
    if not parts or any(len(p) < 2 for p in parts):
        raise UserError(f"labels=folders needs every image of {root} inside a class sub-folder")
    classes = sorted({p[0] for p in parts})
    index = {c: i for i, c in enumerate(classes)}
    return [index[p[0]] for p in parts], classes


def mapping_labels(names: list[str], root: Path, mapping_file: Path) -> tuple[list[int], list[str]]:
    """Labels from a CSV (`file,label`) or JSON ({file: label}) keyed by path relative to `root` or file name."""
    if mapping_file.suffix.lower() == ".json":
        raw = json.loads(mapping_file.read_text())
    else:
        with open(mapping_file, newline="") as f:
            rows = [r for r in csv.reader(f) if r]
        if rows and rows[0][0].strip().lower() in ("file", "filename", "path"):
            rows = rows[1:]
        raw = {r[0].strip(): r[1].strip() for r in rows}
    classes = sorted({str(v) for v in raw.values()}, key=lambda c: (not c.isdigit(), int(c) if c.isdigit() else 0, c))
    index = {c: i for i, c in enumerate(classes)}
    labels = []
    for n in names:
        rel = str(Path(n).relative_to(root))
        key = rel if rel in raw else Path(n).name
        labels.append(index[str(raw[key])] if key in raw else -1)
    return labels, classes


class _Crops(Dataset):
    """Each image `crops` times (crop k of image i is row i * crops + k)."""

    def __init__(self, images: Dataset, crops: int):
        self.images, self.crops = images, crops

    def __len__(self) -> int:
        return len(self.images) * self.crops

    def __getitem__(self, row: int) -> dict:
        i, k = divmod(row, self.crops)
        self.images.epoch = k  # a different random crop per k, the same on every run
        item = self.images[i]
        return {"image": item["image"], "row": row}


@torch.no_grad()
def tokenize_folder(tokenizer_path: str, data: str, out: str, batch_size: int = 32, crops_per_image: int = 1,
                    labels: str | None = None, device: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Encode every image of `data` into a token store at `out`; resumes an interrupted run."""
    from ..checkpoint import fingerprint, load_model
    from .images import ImageDataset
    from .sources import image_sources

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_model(tokenizer_path, map_location=dev)
    sources, n_bad = image_sources(data, builtin_size=model.config.resolution)
    names = [s.name for s in sources]
    label_ids, class_names = [-1] * len(names), []
    if labels == "folders":
        label_ids, class_names = folder_labels(names, Path(data))
    elif labels:
        label_ids, class_names = mapping_labels(names, Path(data), Path(labels))
    crop = "random" if crops_per_image > 1 else "center"
    images = ImageDataset(sources, resolution=model.config.resolution, crop=crop, flip=crops_per_image > 1,
                          train=crops_per_image > 1)
    grid = [model.config.latent_size] * 2
    count = len(sources) * crops_per_image
    dtype = "uint16" if model.quantize.n_embed <= 65536 else "int32"
    meta = {"format": "vqgan-token-store/1",
            "tokenizer": {"path": str(tokenizer_path), "fingerprint": fingerprint(model),
                          "n_embed": model.quantize.n_embed, "config": model.config_dict()},
            "grid": grid, "dtype": dtype, "count": count, "crops_per_image": crops_per_image, "crop": crop,
            "flip": crops_per_image > 1, "resolution": model.config.resolution, "class_names": class_names,
            "files": [names[r // crops_per_image] for r in range(count)], "unreadable_files_skipped": n_bad,
            "done": 0, "complete": False}
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta_path = out_dir / META_FILE
    done = 0
    if meta_path.is_file():
        old = json.loads(meta_path.read_text())
        same = {k: old.get(k) for k in ("tokenizer", "grid", "count", "crops_per_image", "files")} == \
            {k: meta[k] for k in ("tokenizer", "grid", "count", "crops_per_image", "files")}
        if not same:
            raise UserError(f"{out_dir} holds a token store made differently (other tokenizer, data or crops); "
                            "choose another output directory")
        done = int(old.get("done", 0))
    mode = "r+" if done and (out_dir / TOKENS_BIN).is_file() else "w+"
    tokens = np.memmap(out_dir / TOKENS_BIN, dtype=dtype, mode=mode, shape=(count, *grid))
    np.save(out_dir / LABELS_FILE, np.repeat(np.asarray(label_ids, dtype=np.int64), crops_per_image))
    loader = DataLoader(torch.utils.data.Subset(_Crops(images, crops_per_image), range(done, count)),
                        batch_size=batch_size, shuffle=False, num_workers=0)
    bar = tqdm(total=count, initial=done, desc="tokenize", disable=not progress)
    for batch in loader:
        rows = batch["row"].numpy()
        tokens[rows[0]:rows[-1] + 1] = model.encode(batch["image"].to(dev)).cpu().numpy().astype(dtype)
        tokens.flush()
        done = int(rows[-1]) + 1
        _write_json_atomic(meta_path, {**meta, "done": done})
        bar.update(len(rows))
    bar.close()
    _write_json_atomic(meta_path, {**meta, "done": count, "complete": True})
    return {"out": str(out_dir), "count": count, "grid": grid, "classes": len(class_names), "skipped": n_bad}
