"""Token stores: the one file format for tokens. `vqgan tokenize` (for training the transformer: labels,
crops, condition maps, resumable) and `vqgan encode` write them; `vqgan decode`, training and sampling read them.

A store is a directory:
- `tokens.bin`: (N, row_length) raw array of code rows in the code spec's order (codes.py: each level's grid
  in raster order, the depths of a position consecutive), uint16 when every vocabulary fits, else int32, read
  through a memory map;
- `labels.npy`: (N,) int64 class ids (-1: none);
- `cond_tokens.bin` (optional): (N, cond row_length) codes of each image's condition map (segmentation or
  depth, same file stem in a parallel folder, cropped exactly as the image), made by a condition tokenizer;
- `meta.json`: the tokenizer (absolute path, weight fingerprint, config), its code spec (`codes`: levels, grid
  factor, vocabulary per depth), the grid of each level, dtype, augmentation, class names, the condition
  tokenizer with its spec and grids, the absolute source file of each row, and how many rows are done (a
  killed `vqgan tokenize` resumes there). Stores of format 1 (one (h, w) grid per row) read as one level of
  depth 1: the bytes are the same.

A row whose image or condition map cannot be read keeps its place (rows are positions) but gets the label
`UNUSABLE`, so no label or map is ever paired with another image's tokens; training leaves such rows out.
"""
from __future__ import annotations

import csv
import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..checkpoint import atomic_file, fingerprint, load_model
from ..codes import CodeSpec
from ..errors import UserError
from ..tokenizers import Tokenizer
from ..userinput import at_least, output_dir, resolve_device
from .images import PROGRAM_ERRORS, ImageDataset, error_reason, report_bad_file
from .maps import resample_for
from .scenes import SCENE_CLASSES
from .sources import BUILTIN_PREFIX, image_sources

log = logging.getLogger("vqgan.data")

TOKENS_BIN = "tokens.bin"
LABELS_FILE = "labels.npy"
META_FILE = "meta.json"
COND_BIN = "cond_tokens.bin"
FORMAT = "vqgan-token-store/2"
UNUSABLE = -2  # label of a row whose image or condition map could not be read: training leaves it out


def _write_json_atomic(path: Path, data: dict) -> None:
    atomic_file(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1)))


def _save_labels_atomic(path: Path, labels: np.ndarray) -> None:
    """A kill while writing must not leave a corrupt labels file for the resumed run to trip over."""
    atomic_file(path, lambda tmp: np.save(tmp, labels))


def codes_record(model: Tokenizer, resolution: int) -> dict[str, Any]:
    """What a store records of the codes a tokenizer makes of images of `resolution`: spec, grids, row length,
    dtype."""
    spec = model.code_spec
    return {"codes": spec.to_dict(), "grids": [list(g) for g in spec.grids(resolution, resolution)],
            "row_length": spec.row_length(resolution, resolution), "dtype": spec.dtype}


def read_codes_record(record: dict[str, Any], n_embed: int | None = None) -> tuple[CodeSpec, list[tuple[int, int]]]:
    """(spec, grids) of a store's image or condition record; format 1 had one grid and a codebook size."""
    if record.get("codes"):
        return CodeSpec.from_dict(record["codes"]), [tuple(g) for g in record["grids"]]
    grid = tuple(record["grid"])
    factor = int(record.get("resolution", 0)) // grid[0] if record.get("resolution") else 1
    return CodeSpec.single(max(factor, 1), int(n_embed or record["tokenizer"]["n_embed"])), [grid]


def encode_rows(model: Tokenizer, images: torch.Tensor) -> torch.Tensor:
    """Images -> code rows (B, row_length) in the store's order."""
    return model.code_spec.flatten(model.encode(images))


class TokenStore(Dataset):
    """Rows of codes (row_length,) int64 and their labels, memory-mapped. `spec` and `grids` say what a row holds
    (`rows_to_codes` turns rows back into a tokenizer's (B, h, w, depth) codes)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        meta_path = self.directory / META_FILE
        if not meta_path.is_file():
            raise UserError(f"{self.directory} is not a token store (no {META_FILE}); make one with `vqgan tokenize`")
        self.meta = json.loads(meta_path.read_text())
        if not self.meta.get("complete"):
            raise UserError(f"{self.directory} is incomplete ({self.meta.get('done', 0)}/{self.meta['count']} rows); "
                            "run the same `vqgan tokenize` command again to finish it")
        self.spec, self.grids = read_codes_record(self.meta)
        self.row_length = self.spec.length_on(self.grids)
        self.tokens = np.memmap(self.directory / TOKENS_BIN, dtype=self.meta["dtype"], mode="r",
                                shape=(self.meta["count"], self.row_length))
        self.labels = np.load(self.directory / LABELS_FILE)
        cond = self.meta.get("condition")
        self.cond_spec, self.cond_grids, self.cond_tokens = None, None, None
        if cond:
            self.cond_spec, self.cond_grids = read_codes_record(cond)
            length = self.cond_spec.length_on(self.cond_grids)
            self.cond_tokens = np.memmap(self.directory / COND_BIN, dtype=cond["dtype"], mode="r",
                                         shape=(self.meta["count"], length))

    @property
    def grid(self) -> tuple[int, int]:
        """The grid of the first (for most tokenizers, the only) level."""
        return tuple(self.grids[0])

    def rows_to_codes(self, rows: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """Rows (B, row_length) -> the tokenizer's codes: (B, h, w, depth), or one such tensor per level."""
        levels = self.spec.unflatten(rows, self.grids)
        return levels[0] if len(levels) == 1 else levels

    def cond_rows_to_codes(self, rows: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        levels = self.cond_spec.unflatten(rows, self.cond_grids)
        return levels[0] if len(levels) == 1 else levels

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


# -- checks shared by the commands that read images through a tokenizer ----------------------------------


def load_tokenizer(path: str, device: torch.device, option: str = "tokenizer") -> Tokenizer:
    """The image tokenizer (stage-1 model) at `path`; a prior given in its place is refused, naming the fix."""
    model = load_model(path, map_location=device)
    if not isinstance(model, Tokenizer):
        bundled = [Path(path) / d / "tokenizer" for d in ("", "model") if (Path(path) / d / "tokenizer").is_dir()]
        hint = f" (the tokenizer it was trained with is {bundled[0]})" if bundled else ""
        raise UserError(f"{option} {path} is a transformer prior, not an image tokenizer{hint}; give a stage-1 "
                        "model: a train-tokenizer run, its model/ folder or a converted VQGAN")
    return model.eval()


def tokenizer_record(path: str, model: Tokenizer) -> dict[str, Any]:
    """How a token file names its tokenizer: an absolute path (readable from any working directory) and the
    weights' fingerprint (which decides whether two tokenizers are the same, however their paths are spelled)."""
    return {"path": str(Path(path).expanduser().resolve()), "fingerprint": fingerprint(model),
            "config": model.config_dict()}


def check_output_dir(path: str, option: str = "output folder") -> Path:
    """An output folder that is not a file and can be made (no file in the way up its path), before any work."""
    out = output_dir(path, option)
    above = next((p for p in out.absolute().parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise UserError(f"{option} {out}: {above} is a file, so no folder can be made there; give another path")
    return out


def check_resolution(resolution: int | None, option: str = "--resolution") -> None:
    if resolution is not None:
        at_least(resolution, 1, option)


# -- sources and their labels ----------------------------------------------------------------------------------


def relative_source(name: str, root: Path) -> Path:
    """`name` relative to the data root; built-in items have no root and stay as they are."""
    try:
        return Path(name).relative_to(root)
    except ValueError:
        return Path(name)


def absolute_source(name: str, root: str) -> str:
    """A source as meta.json records it: absolute, so it means the same from any working directory."""
    return name if root.startswith(BUILTIN_PREFIX) else os.path.abspath(name)


def check_labels_option(labels: str | None, data: str) -> None:
    """`--labels` is 'folders' (with an image folder) or an existing file; checked before any work."""
    if not labels:
        return
    if labels == "folders":
        if data.startswith(BUILTIN_PREFIX):
            raise UserError(f"--labels folders needs an image folder; {data} brings its own classes, leave it out")
        return
    if not Path(labels).is_file():
        raise UserError(f"--labels {labels}: neither 'folders' (the sub-folder names are the classes) nor an "
                        "existing CSV (file,label) or JSON ({file: label}) file")


def folder_labels(names: list[str], root: Path) -> tuple[list[int], list[str]]:
    """ImageFolder convention: the first sub-folder under `root` names the class."""
    parts = [Path(n).relative_to(root).parts for n in names]  # an image file as the data: no parts, refused
    if not parts or any(len(p) < 2 for p in parts):
        raise UserError(f"--labels folders needs every image of {root} inside a class sub-folder "
                        f"({root}/CLASS/image.png)")
    classes = sorted({p[0] for p in parts})
    index = {c: i for i, c in enumerate(classes)}
    return [index[p[0]] for p in parts], classes


def _read_json_mapping(mapping_file: Path) -> dict[str, str]:
    try:
        raw = json.loads(mapping_file.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"labels file {mapping_file} is not valid JSON ({e}); expected {{\"file\": label, ...}}"
                        ) from None
    scalar = isinstance(raw, dict) and all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in raw.values())
    if not scalar:
        raise UserError(f"labels file {mapping_file}: expected a JSON object {{\"file\": label, ...}} with one class "
                        "name or id per file")
    return {str(k).strip(): str(v).strip() for k, v in raw.items()}


def _read_csv_mapping(mapping_file: Path) -> dict[str, str]:
    try:
        with open(mapping_file, newline="") as f:
            rows = [(n, r) for n, r in enumerate(csv.reader(f), 1) if any(c.strip() for c in r)]
    except (UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"labels file {mapping_file} is not a readable CSV ({e}); expected file,label rows") from None
    if rows and rows[0][1][0].strip().lower() in ("file", "filename", "path"):
        rows = rows[1:]
    short = next((n for n, r in rows if len(r) < 2 or not r[1].strip()), None)
    if short is not None:
        raise UserError(f"labels file {mapping_file}, line {short}: expected two columns, file,label")
    return {r[0].strip(): r[1].strip() for _, r in rows}


def mapping_labels(names: list[str], root: Path, mapping_file: Path) -> tuple[list[int], list[str]]:
    """Labels from a CSV (`file,label`) or JSON ({file: label}) keyed by path relative to `root` or file name.

    A file name that several images share (a/x.png, b/x.png) is refused as a key: it would give them all one label.
    """
    read = _read_json_mapping if mapping_file.suffix.lower() == ".json" else _read_csv_mapping
    raw = read(mapping_file)
    if not raw:
        raise UserError(f"labels file {mapping_file} holds no labels; expected file,label rows (CSV) or "
                        "{\"file\": label} (JSON)")
    classes = sorted(set(raw.values()), key=lambda c: (not c.isdigit(), int(c) if c.isdigit() else 0, c))
    index = {c: i for i, c in enumerate(classes)}
    shared = Counter(Path(n).name for n in names)
    labels = []
    for n in names:
        rel, name = str(relative_source(n, root)), Path(n).name
        key = rel if rel in raw else name
        if key == name != rel and name in raw and shared[name] > 1:
            raise UserError(f"labels file {mapping_file} keys {name!r} by file name, but {shared[name]} images have "
                            f"that name; key them by their path under {root} (e.g. {rel})")
        labels.append(index[raw[key]] if key in raw else -1)
    missing = labels.count(-1)
    if missing == len(labels):
        raise UserError(f"labels file {mapping_file} names none of the images; key them by their path under {root} "
                        f"(e.g. {relative_source(names[0], root)}) or by file name")
    if missing:
        log.warning("%d of %d images have no label in %s: they train without a class", missing, len(labels),
                    mapping_file)
    return labels, classes


def _labels(names: list[str], sources: list, data: str, labels: str | None) -> tuple[list[int], list[str]]:
    """(class id per image, -1 for none; class names) from `--labels`, or the built-in scenes' own classes."""
    if labels == "folders":
        return folder_labels(names, Path(data))
    if labels:
        return mapping_labels(names, Path(data), Path(labels))
    if data.startswith(BUILTIN_PREFIX):
        return [s.label for s in sources], list(SCENE_CLASSES)
    return [-1] * len(names), []


# -- making a store -------------------------------------------------------------------------------------------


class _Crops(Dataset):
    """Each image `crops` times (crop k of image i is row i * crops + k), with its condition map cropped
    the same way when `maps` is given. Every row is its own image: an unreadable image (or map) gives a blank
    row marked `bad`, never a stand-in from another file."""

    def __init__(self, images: ImageDataset, crops: int, maps: ImageDataset | None = None):
        self.images, self.crops, self.maps = images, crops, maps

    def __len__(self) -> int:
        return len(self.images) * self.crops

    def __getitem__(self, row: int) -> dict:
        i, k = divmod(row, self.crops)  # crop k is epoch k's: a different random crop per k, the same every run
        if self.maps is None:
            image, cond = self.images.read(i, epoch=k), False
        else:
            image, cond = self._pair(i, k)
        if image is None:
            side = self.images.resolution
            return {"image": torch.zeros(3, side, side), "cond": None, "row": row, "bad": True}
        return {"image": image, "cond": cond, "row": row, "bad": False}

    def _pair(self, i: int, k: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        src, map_src = self.images.sources[i], self.maps.sources[i]
        try:
            im, cond = src.load(), map_src.load()
            if cond.size != im.size:  # maps made at another size: bring them to the image's pixels first
                cond = cond.resize(im.size, resample_for(self.maps.kind))
            return self.images.prepare(im, i, k), self.maps.prepare(cond, i, k)
        except PROGRAM_ERRORS:
            raise
        except Exception as e:  # either file: the pair is unusable
            report_bad_file(f"{src.name} / {map_src.name}", error_reason(e))
            return None, None


def _collate(items: list[dict]) -> dict:
    """`cond` is False without maps; a bad row gets zeros in place of its map (it is marked unusable)."""
    good = next((it["cond"] for it in items if isinstance(it["cond"], torch.Tensor)), None)
    return {"image": torch.stack([it["image"] for it in items]), "row": torch.tensor([it["row"] for it in items]),
            "bad": torch.tensor([it["bad"] for it in items]),
            "cond": None if good is None else torch.stack([it["cond"] if it["cond"] is not None
                                                             else torch.zeros_like(good) for it in items])}


def match_maps(sources: list, data: str, maps: str, kind: str, size: int) -> tuple[list, list]:
    """Pair each image source with the map of the same relative path stem under `maps` (built-in data:
    the same name). Returns (image sources with a map, their maps); images without one are left out."""
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


def _same_rows(old: dict, new: dict) -> bool:
    """Whether an existing store's rows mean what this run's would: the same tokenizers by fingerprint (not by
    how their paths are spelled), the same source files (compared as absolute paths), grid, crops and classes."""
    def recipe(meta: dict, data: str) -> dict:
        tokenizer = {k: v for k, v in (meta.get("tokenizer") or {}).items() if k != "path"}
        cond = meta.get("condition")
        if cond:
            maps = str(cond.get("maps", ""))
            cond = {**cond, "tokenizer": {k: v for k, v in (cond.get("tokenizer") or {}).items() if k != "path"},
                    "maps": absolute_source(maps, maps),
                    "map_files": [absolute_source(f, maps) for f in cond.get("map_files", [])]}
        files = [absolute_source(f, data) for f in meta.get("files", [])]
        return {"tokenizer": tokenizer, "condition": cond, "files": files,
                **{k: meta.get(k) for k in ("format", "grids", "count", "crops_per_image", "class_names")}}

    return recipe(old, new["data"]) == recipe(new, new["data"])


def _resume_point(out_dir: Path, meta: dict) -> int:
    """Rows already done by an earlier run of the same command (0 for a new store); refuses a store made
    differently, and starts over when the earlier run's files are missing or cut short."""
    meta_path = out_dir / META_FILE
    if not meta_path.is_file():
        return 0
    old = json.loads(meta_path.read_text())
    if not _same_rows(old, meta):
        raise UserError(f"{out_dir} holds a token store made differently (other tokenizer, data, crops or labels); "
                        "choose another output directory")
    done = int(old.get("done", 0))
    rows = [(TOKENS_BIN, meta["dtype"], meta["row_length"])]
    if meta["condition"]:
        rows.append((COND_BIN, meta["condition"]["dtype"], meta["condition"]["row_length"]))
    expected = {name: meta["count"] * length * np.dtype(dtype).itemsize for name, dtype, length in rows}
    intact = all((out_dir / n).is_file() and (out_dir / n).stat().st_size == size for n, size in expected.items())
    if done and not (intact and (out_dir / LABELS_FILE).is_file()):
        log.warning("%s: the earlier run's token or label files are missing or cut short; starting over", out_dir)
        return 0
    return done


def _row_labels(out_dir: Path, label_ids: list[int], crops: int, done: int) -> np.ndarray:
    """Each row's label; the rows an earlier run did keep theirs (and their `UNUSABLE` marks), which must agree."""
    rows = np.repeat(np.asarray(label_ids, dtype=np.int64), crops)
    if not done:
        return rows
    old = np.load(out_dir / LABELS_FILE)
    kept = old[:done] if len(old) == len(rows) else None
    if kept is None or ((kept != rows[:done]) & (kept != UNUSABLE)).any():
        raise UserError(f"{out_dir} holds a token store with other labels; choose another output directory")
    rows[:done] = kept
    return rows


@torch.no_grad()
def tokenize_folder(tokenizer_path: str, data: str, out: str, batch_size: int = 32, crops_per_image: int = 1,
                    labels: str | None = None, device: str | None = None, progress: bool = True,
                    cond_maps: str | None = None, cond_tokenizer: str | None = None,
                    builtin_count: int = 1024) -> dict[str, Any]:
    """Encode every image of `data` into a token store at `out`; resumes an interrupted run.

    With `cond_maps` (a folder of segmentation / depth maps named like the images, or builtin:scenes-seg)
    and `cond_tokenizer` (a stage-1 model trained on such maps), each row also gets the condition tokens."""
    at_least(batch_size, 1, "--batch-size")
    at_least(crops_per_image, 1, "--crops")
    at_least(builtin_count, 1, "--count")
    check_labels_option(labels, data)
    if bool(cond_maps) != bool(cond_tokenizer):
        raise UserError("--cond-maps and --cond-tokenizer go together: the maps and the tokenizer trained on them")
    out_dir = check_output_dir(out, "token store folder")
    dev = resolve_device(device)
    model = load_tokenizer(tokenizer_path, dev)
    cond_model = load_tokenizer(cond_tokenizer, dev, "--cond-tokenizer") if cond_tokenizer else None
    if cond_model is not None and cond_model.config.input_kind == "rgb":
        raise UserError(f"{cond_tokenizer} is an RGB tokenizer; a condition tokenizer has model.input_kind "
                        "segmentation or depth")
    sources, n_bad = image_sources(data, builtin_count=builtin_count, builtin_size=model.config.resolution)
    map_sources = None
    if cond_model is not None:
        sources, map_sources = match_maps(sources, data, cond_maps, cond_model.config.input_kind,
                                          model.config.resolution)
    names = [s.name for s in sources]
    label_ids, class_names = _labels(names, sources, data, labels)
    crop = "random" if crops_per_image > 1 else "center"
    common = dict(resolution=model.config.resolution, crop=crop, flip=crops_per_image > 1, train=crops_per_image > 1)
    images = ImageDataset(sources, **common)
    maps = None if cond_model is None else ImageDataset(map_sources, kind=cond_model.config.input_kind,
                                                        n_labels=cond_model.config.in_channels, **common)
    count = len(sources) * crops_per_image
    codes = codes_record(model, model.config.resolution)
    dtype = codes["dtype"]
    condition = None
    if cond_model is not None:
        condition = {"kind": cond_model.config.input_kind, "maps": absolute_source(cond_maps, cond_maps),
                     "tokenizer": tokenizer_record(cond_tokenizer, cond_model),
                     **codes_record(cond_model, model.config.resolution),
                     "map_files": [absolute_source(map_sources[r // crops_per_image].name, cond_maps)
                                   for r in range(count)]}
    meta = {"format": FORMAT, "condition": condition, "data": absolute_source(data, data),
            "tokenizer": tokenizer_record(tokenizer_path, model), **codes,
            "count": count, "crops_per_image": crops_per_image, "crop": crop,
            "flip": crops_per_image > 1, "resolution": model.config.resolution, "class_names": class_names,
            "files": [absolute_source(names[r // crops_per_image], data) for r in range(count)],
            "unreadable_files_skipped": n_bad, "done": 0, "complete": False}
    out_dir.mkdir(parents=True, exist_ok=True)
    meta_path, labels_path = out_dir / META_FILE, out_dir / LABELS_FILE
    done = _resume_point(out_dir, meta)
    row_labels = _row_labels(out_dir, label_ids, crops_per_image, done)
    mode = "r+" if done else "w+"
    tokens = np.memmap(out_dir / TOKENS_BIN, dtype=dtype, mode=mode, shape=(count, codes["row_length"]))
    cond_tokens = None if condition is None else np.memmap(out_dir / COND_BIN, dtype=condition["dtype"], mode=mode,
                                                           shape=(count, condition["row_length"]))
    loader = DataLoader(torch.utils.data.Subset(_Crops(images, crops_per_image, maps), range(done, count)),
                        batch_size=batch_size, shuffle=False, num_workers=0, collate_fn=_collate)
    bar = tqdm(total=count, initial=done, desc="tokenize", disable=not progress)
    for batch in loader:
        rows = batch["row"].numpy()
        span = slice(rows[0], rows[-1] + 1)
        tokens[span] = encode_rows(model, batch["image"].to(dev)).cpu().numpy().astype(dtype)
        if cond_tokens is not None and batch["cond"] is not None:
            cond_tokens[span] = encode_rows(cond_model, batch["cond"].to(dev)).cpu().numpy().astype(condition["dtype"])
            cond_tokens.flush()
        row_labels[rows[batch["bad"].numpy()]] = UNUSABLE  # never a label or map with another image's tokens
        tokens.flush()
        _save_labels_atomic(labels_path, row_labels)
        done = int(rows[-1]) + 1
        _write_json_atomic(meta_path, {**meta, "done": done})
        bar.update(len(rows))
    bar.close()
    unusable = np.flatnonzero(row_labels == UNUSABLE)
    if len(unusable):
        log.warning("%d rows of %s are marked unusable (their image or map could not be read): training leaves "
                    "them out", len(unusable), out_dir)
    _save_labels_atomic(labels_path, row_labels)
    _write_json_atomic(meta_path, {**meta, "done": count, "complete": True, "unusable_rows": len(unusable)})
    return {"out": str(out_dir), "count": count, "grid": codes["grids"][0], "codes": model.code_spec.describe(),
            "classes": len(class_names), "skipped": n_bad + len(set((unusable // crops_per_image).tolist())),
            # rows: `count`, of which `unusable_rows` (files that failed to decode, among the `skipped` files) are
            # kept as masked rows, so that row i stays image i's; `usable_rows` train the prior
            "unusable_rows": len(unusable), "usable_rows": count - len(unusable),
            "condition_grid": condition["grids"][0] if condition else None}


def write_store(out_dir: Path, tokens: np.ndarray, meta: dict[str, Any], labels: np.ndarray | None = None) -> None:
    """A complete store of code rows (N, row_length) written in one go (`vqgan encode`); `meta` holds the codes
    record. An older store's meta.json goes first and the new one comes last, so a kill midway leaves no
    meta.json that describes other rows than tokens.bin holds."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / META_FILE).unlink(missing_ok=True)
    atomic_file(out_dir / TOKENS_BIN, lambda tmp: tokens.astype(meta["dtype"]).tofile(tmp))
    _save_labels_atomic(out_dir / LABELS_FILE, labels if labels is not None else np.full(len(tokens), -1, np.int64))
    _write_json_atomic(out_dir / META_FILE, {**meta, "format": FORMAT, "count": len(tokens), "done": len(tokens),
                                             "complete": True})
