"""Token stores: an image folder encoded once, for training the transformer on tokens instead of images.

A store is a directory:
- `tokens.bin`: (N, h, w) raw array, uint16 when the codebook has at most 65536 codes, else int32, read
  through a memory map;
- `labels.npy`: (N,) int64 class ids (-1: none);
- `cond_tokens.bin` (optional): (N, hc, wc) tokens of each image's condition map (segmentation or depth,
  same file stem in a parallel folder, cropped exactly as the image), made by a condition tokenizer;
- `meta.json`: the tokenizer (path, weight fingerprint, codebook size), grid, dtype, augmentation, class
  names, the condition tokenizer and its grid, the source file of each row, and how many rows are done (a
  killed `vqgan tokenize` resumes there).
"""
from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..errors import UserError

log = logging.getLogger("vqgan.data")

TOKENS_BIN = "tokens.bin"
LABELS_FILE = "labels.npy"
META_FILE = "meta.json"
COND_BIN = "cond_tokens.bin"
UNUSABLE = -2  # label of a row whose image or condition map could not be read: training leaves it out


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
        cond = self.meta.get("condition")
        self.cond_tokens = None if not cond else np.memmap(
            self.directory / COND_BIN, dtype=cond["dtype"], mode="r", shape=(self.meta["count"], *cond["grid"]))

    @property
    def n_embed(self) -> int:
        return int(self.meta["tokenizer"]["n_embed"])

    @property
    def condition(self) -> dict | None:
        """The condition maps' tokenizer, kind and grid, when the store has condition tokens."""
        return self.meta.get("condition")

    @property
    def class_names(self) -> list[str]:
        return list(self.meta.get("class_names") or [])

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = {"tokens": torch.from_numpy(self.tokens[i].astype(np.int64)), "label": int(self.labels[i])}
        if self.cond_tokens is not None:
            item["cond"] = torch.from_numpy(self.cond_tokens[i].astype(np.int64))
        return item


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
    """Each image `crops` times (crop k of image i is row i * crops + k), with its condition map cropped
    the same way when `maps` is given."""

    def __init__(self, images, crops: int, maps=None):
        self.images, self.crops, self.maps = images, crops, maps

    def __len__(self) -> int:
        return len(self.images) * self.crops

    def __getitem__(self, row: int) -> dict:
        i, k = divmod(row, self.crops)
        self.images.epoch = k  # a different random crop per k, the same on every run
        if self.maps is None:
            return {"image": self.images[i]["image"], "cond": False, "row": row}
        from .images import report_bad_file

        self.maps.epoch = k
        src, map_src = self.images.sources[i], self.maps.sources[i]
        try:
            im, cond = src.load(), map_src.load()
            if cond.size != im.size:  # maps made at another size: bring them to the image's pixels first
                from .maps import resample_for

                cond = cond.resize(im.size, resample_for(self.maps.kind))
            return {"image": self.images.prepare(im, i), "cond": self.maps.prepare(cond, i), "row": row}
        except Exception as e:
            # the row must stay (rows are positions); it is marked so training skips it
            report_bad_file(f"{src.name} / {map_src.name}", str(e).splitlines()[0] if str(e) else type(e).__name__)
            side = self.images.resolution
            return {"image": torch.zeros(3, side, side), "cond": None, "row": row}


def _collate(items: list[dict]) -> dict:
    """`cond` is False without maps, None for a row that could not be read."""
    bad = [it["cond"] is None for it in items]
    good = next((it["cond"] for it in items if isinstance(it["cond"], torch.Tensor)), None)
    return {"image": torch.stack([it["image"] for it in items]), "row": torch.tensor([it["row"] for it in items]),
            "bad": torch.tensor(bad),
            "cond": None if good is None else torch.stack([it["cond"] if it["cond"] is not None
                                                             else torch.zeros_like(good) for it in items])}


def match_maps(sources: list, data: str, maps: str, kind: str, size: int) -> tuple[list, list]:
    """Pair each image source with the map of the same relative path stem under `maps` (built-in data:
    the same name). Returns (image sources with a map, their maps); images without one are left out."""
    from .sources import BUILTIN_PREFIX, image_sources

    map_sources, _ = image_sources(maps, builtin_count=len(sources), builtin_size=size, kind=kind)

    def key(name: str, root: str) -> str:
        return name if root.startswith(BUILTIN_PREFIX) else str(Path(name).relative_to(Path(root)).with_suffix(""))

    by_key = {key(m.name, maps): m for m in map_sources}
    pairs = [(s, by_key.get(key(s.name, data))) for s in sources]
    kept = [(s, m) for s, m in pairs if m is not None]
    if not kept:
        raise UserError(f"no condition map in {maps} has the file stem of an image in {data} (e.g. "
                        f"{key(sources[0].name, data)}.png)")
    if len(kept) < len(pairs):
        log.warning("%d of %d images have no condition map in %s and are left out", len(pairs) - len(kept),
                    len(pairs), maps)
    return [s for s, _ in kept], [m for _, m in kept]


@torch.no_grad()
def tokenize_folder(tokenizer_path: str, data: str, out: str, batch_size: int = 32, crops_per_image: int = 1,
                    labels: str | None = None, device: str | None = None, progress: bool = True,
                    cond_maps: str | None = None, cond_tokenizer: str | None = None,
                    builtin_count: int = 1024) -> dict[str, Any]:
    """Encode every image of `data` into a token store at `out`; resumes an interrupted run.

    With `cond_maps` (a folder of segmentation / depth maps named like the images, or builtin:scenes-seg)
    and `cond_tokenizer` (a stage-1 model trained on such maps), each row also gets the condition tokens."""
    from ..checkpoint import fingerprint, load_model
    from .images import ImageDataset
    from .sources import BUILTIN_PREFIX, image_sources

    if bool(cond_maps) != bool(cond_tokenizer):
        raise UserError("--cond-maps and --cond-tokenizer go together: the maps and the tokenizer trained on them")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_model(tokenizer_path, map_location=dev)
    sources, n_bad = image_sources(data, builtin_count=builtin_count, builtin_size=model.config.resolution)
    cond_model, map_sources = None, None
    if cond_maps:
        cond_model = load_model(cond_tokenizer, map_location=dev)
        kind = cond_model.config.input_kind
        if kind == "rgb":
            raise UserError(f"{cond_tokenizer} is an RGB tokenizer; a condition tokenizer has model.input_kind "
                            "segmentation or depth")
        sources, map_sources = match_maps(sources, data, cond_maps, kind, model.config.resolution)
    names = [s.name for s in sources]
    label_ids, class_names = [-1] * len(names), []
    if labels == "folders":
        label_ids, class_names = folder_labels(names, Path(data))
    elif labels:
        label_ids, class_names = mapping_labels(names, Path(data), Path(labels))
    elif data.startswith(BUILTIN_PREFIX):  # the built-in scenes know their classes
        from .scenes import SCENE_CLASSES

        label_ids, class_names = [s.label for s in sources], list(SCENE_CLASSES)
    crop = "random" if crops_per_image > 1 else "center"
    common = dict(resolution=model.config.resolution, crop=crop, flip=crops_per_image > 1, train=crops_per_image > 1)
    images = ImageDataset(sources, **common)
    maps = None if cond_model is None else ImageDataset(map_sources, kind=cond_model.config.input_kind,
                                                        n_labels=cond_model.config.in_channels, **common)
    grid = [model.config.latent_size] * 2
    count = len(sources) * crops_per_image
    dtype = _token_dtype(model.quantize.n_embed)
    condition = None
    if cond_model is not None:
        side = model.config.resolution // cond_model.config.downsample_factor
        condition = {"kind": cond_model.config.input_kind, "maps": str(cond_maps),
                     "tokenizer": {"path": str(cond_tokenizer), "fingerprint": fingerprint(cond_model),
                                   "n_embed": cond_model.quantize.n_embed, "config": cond_model.config_dict()},
                     "grid": [side, side], "dtype": _token_dtype(cond_model.quantize.n_embed),
                     "map_files": [map_sources[r // crops_per_image].name for r in range(count)]}
    meta = {"format": "vqgan-token-store/1", "condition": condition,
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
        keys = ("tokenizer", "grid", "count", "crops_per_image", "files", "condition")
        same = {k: old.get(k) for k in keys} == {k: meta[k] for k in keys}
        if not same:
            raise UserError(f"{out_dir} holds a token store made differently (other tokenizer, data or crops); "
                            "choose another output directory")
        done = int(old.get("done", 0))
    mode = "r+" if done and (out_dir / TOKENS_BIN).is_file() else "w+"
    tokens = np.memmap(out_dir / TOKENS_BIN, dtype=dtype, mode=mode, shape=(count, *grid))
    cond_tokens = None if condition is None else np.memmap(out_dir / COND_BIN, dtype=condition["dtype"], mode=mode,
                                                           shape=(count, *condition["grid"]))
    row_labels = np.repeat(np.asarray(label_ids, dtype=np.int64), crops_per_image)
    labels_path = out_dir / LABELS_FILE
    if done and labels_path.is_file():
        row_labels = np.load(labels_path)  # keeps the rows marked unusable (-2) by the earlier part of the run
    loader = DataLoader(torch.utils.data.Subset(_Crops(images, crops_per_image, maps), range(done, count)),
                        batch_size=batch_size, shuffle=False, num_workers=0, collate_fn=_collate)
    bar = tqdm(total=count, initial=done, desc="tokenize", disable=not progress)
    for batch in loader:
        rows = batch["row"].numpy()
        span = slice(rows[0], rows[-1] + 1)
        tokens[span] = model.encode(batch["image"].to(dev)).cpu().numpy().astype(dtype)
        if cond_tokens is not None:
            if batch["cond"] is not None:
                cond_tokens[span] = cond_model.encode(batch["cond"].to(dev)).cpu().numpy().astype(condition["dtype"])
            row_labels[rows[batch["bad"].numpy()]] = UNUSABLE
            cond_tokens.flush()
        tokens.flush()
        np.save(labels_path, row_labels)
        done = int(rows[-1]) + 1
        _write_json_atomic(meta_path, {**meta, "done": done})
        bar.update(len(rows))
    bar.close()
    np.save(labels_path, row_labels)
    _write_json_atomic(meta_path, {**meta, "done": count, "complete": True})
    return {"out": str(out_dir), "count": count, "grid": grid, "classes": len(class_names),
            "skipped": n_bad + int((row_labels == UNUSABLE).sum()),
            "condition_grid": condition["grid"] if condition else None}


def _token_dtype(n_embed: int) -> str:
    return "uint16" if n_embed <= 65536 else "int32"
