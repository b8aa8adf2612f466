"""Using a trained tokenizer: images -> token files, token files -> images, reconstructions with PSNR.

Tokens are written as a token store (`data/tokens.py`: tokens.bin, labels.npy, meta.json with the tokenizer's
absolute path, fingerprint and config, the grid, and the absolute path of each row's source file), the same
format `vqgan tokenize` writes; `decode` also reads the tokens.npy folders of earlier versions. An unreadable
image gets no row (and no reconstruction): it is counted in `skipped`.
Per-image outputs mirror the input's sub-folders, so images that share a file name never overwrite each other.
"""
from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from tqdm import tqdm

from .checkpoint import fingerprint
from .codes import CodeSpec
from .data.images import ImageDataset, ReadableItems, collate_readable
from .data.sources import image_sources
from .data.tokens import (
    META_FILE,
    UNUSABLE,
    TokenStore,
    absolute_source,
    check_output_dir,
    check_resolution,
    codes_record,
    encode_rows,
    load_tokenizer,
    relative_source,
    tokenizer_record,
    write_store,
)
from .errors import UserError
from .eval.metrics import psnr_per_image
from .eval.report import to_uint8
from .tokenizers import VQModel
from .userinput import at_least, resolve_device

LEGACY_TOKENS = "tokens.npy"  # `vqgan encode` before token stores (still decoded)
LEGACY_META = "tokens.json"


def _image_loader(model: VQModel, images: str, batch_size: int, crop: str, resolution: int | None,
                  out: Path | None = None, builtin_count: int = 1024):
    """(data set, loader of its readable items, unreadable files skipped while scanning). Unreadable items are
    left out of the batches, never replaced by another image: each output row names its own file. Files
    under `out` (an output folder inside the input folder) are not inputs: a second run would read the first's."""
    sources, n_bad = image_sources(images, builtin_count, builtin_size=model.config.resolution)
    if out is not None and not images.startswith("builtin:"):
        own = out.resolve()
        sources = [s for s in sources if own not in Path(s.name).resolve().parents]
        if not sources:
            raise UserError(f"{images} holds no images outside the output folder {out}")
    res = resolution or model.config.resolution
    if res % model.downsample_factor:
        raise UserError(f"--resolution {res} is not a multiple of the tokenizer's factor {model.downsample_factor}")
    ds = ImageDataset(sources, resolution=res, crop=crop, flip=False, train=False)
    loader = DataLoader(ReadableItems(ds), batch_size=batch_size, shuffle=False, num_workers=0,
                        collate_fn=collate_readable)
    return ds, loader, n_bad


def _start(model_path: str, out: str, batch_size: int, device: str | None, resolution: int | None = None,
           builtin_count: int | None = None) -> tuple[torch.device, VQModel, Path]:
    """Check the options every command here shares, before any work; then load the tokenizer."""
    at_least(batch_size, 1, "--batch-size")
    if builtin_count is not None:  # the commands that read images (built-in ones among them)
        at_least(builtin_count, 1, "--count")
    check_resolution(resolution)
    out_dir = check_output_dir(out)
    dev = resolve_device(device)
    return dev, load_tokenizer(model_path, dev), out_dir


@torch.no_grad()
def encode_folder(model_path: str, images: str, out: str, batch_size: int = 16, crop: str = "center",
                  resolution: int | None = None, device: str | None = None, progress: bool = True,
                  builtin_count: int = 1024) -> dict:
    """Images -> a token store (the format `vqgan tokenize` writes; `decode` and `train-transformer` read it)."""
    dev, model, out_dir = _start(model_path, out, batch_size, device, resolution, builtin_count)
    ds, loader, n_bad = _image_loader(model, images, batch_size, crop, resolution, builtin_count=builtin_count)
    chunks, names, skipped = [], [], n_bad
    for batch in tqdm(loader, desc="encode", disable=not progress):
        skipped += batch["skipped"]
        if batch["image"] is not None:
            chunks.append(encode_rows(model, batch["image"].to(dev)).cpu())
            names += [absolute_source(ds.name(i), images) for i in batch["index"]]
    if not chunks:
        raise UserError(f"none of the images in {images} could be read (see the warnings above); nothing written")
    tokens = torch.cat(chunks).numpy()
    res = resolution or model.config.resolution
    codes = codes_record(model, res)
    meta = {"condition": None, "data": absolute_source(images, images), "tokenizer": tokenizer_record(model_path, model),
            **codes, "crops_per_image": 1, "crop": crop, "flip": False, "resolution": res,
            "class_names": [], "files": names, "unreadable_files_skipped": skipped}
    write_store(out_dir, tokens, meta)
    return {"count": int(tokens.shape[0]), "grid": codes["grids"][0], "codes": model.code_spec.describe(),
            "out": str(out_dir), "skipped": skipped}


def read_legacy_tokens(path: Path) -> tuple[np.ndarray, dict]:
    """`tokens.npy` + `tokens.json`, as `vqgan encode` wrote them before token stores were the one format."""
    tokens_path, meta_path = (path / LEGACY_TOKENS, path / LEGACY_META) if path.is_dir() else (path, path.with_name(LEGACY_META))
    try:
        tokens = np.load(tokens_path, allow_pickle=False)
    except ValueError as e:
        raise UserError(f"{tokens_path} is not a plain token array: {e}") from None
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    if tokens.ndim != 3:
        raise UserError(f"{tokens_path} holds an array of shape {tokens.shape}; expected (N, h, w) token grids")
    if meta.get("grid") and list(tokens.shape[1:]) != list(meta["grid"]):
        raise UserError(f"{tokens_path}: grid {list(tokens.shape[1:])} differs from {meta_path}'s {meta['grid']}")
    return tokens, meta


def read_tokens(path: str) -> tuple[np.ndarray, CodeSpec | None, list[tuple[int, int]], dict, np.ndarray]:
    """(code rows (N, row_length), their code spec (None for the tokens.npy folders of earlier versions, which
    hold one code per position), the grid of each level, the metadata, which rows are usable) from a token
    store (`encode` or `tokenize`) or a tokens.npy folder."""
    p = Path(path)
    if (p / META_FILE).is_file():
        store = TokenStore(p)
        return np.asarray(store.tokens), store.spec, store.grids, store.meta, store.labels != UNUSABLE
    if (p / LEGACY_TOKENS).is_file() or (p.is_file() and p.suffix == ".npy"):
        tokens, meta = read_legacy_tokens(p)
        return (tokens.reshape(len(tokens), -1), None, [tuple(tokens.shape[1:])], meta,
                np.ones(len(tokens), dtype=bool))
    raise UserError(f"{p} holds no tokens: pass a folder written by `vqgan encode` or `vqgan tokenize`")


@torch.no_grad()
def decode_tokens(model_path: str, tokens_path: str, out: str, batch_size: int = 16, device: str | None = None,
                  force: bool = False, progress: bool = True) -> dict:
    dev, model, out_dir = _start(model_path, out, batch_size, device)
    tokens, spec, grids, meta, usable = read_tokens(tokens_path)
    recorded = meta.get("tokenizer", {}).get("fingerprint")
    mine = fingerprint(model)
    if recorded and recorded != mine and not force:
        raise UserError(f"{tokens_path} was made by tokenizer {recorded}, but {model_path} is {mine}; decode with "
                        "the tokenizer that encoded it (or pass --force)")
    own = model.code_spec
    if spec is not None and [lv.depth for lv in spec.levels] != [lv.depth for lv in own.levels]:
        raise UserError(f"{tokens_path} holds codes {spec.describe()}, but {model_path} makes {own.describe()}; "
                        "decode with the tokenizer that encoded it")
    if spec is None and (len(own.levels) > 1 or own.levels[0].depth > 1):
        raise UserError(f"{tokens_path} holds one code per position (an old tokens.npy), but {model_path} makes "
                        f"{own.describe()}")
    rows = np.flatnonzero(usable)  # rows whose image could not be read hold no tokens of theirs
    for start in range(0, len(rows), 4096):  # before any image is written; in chunks: a store can be large
        try:
            own.check_range(own.unflatten(torch.from_numpy(tokens[rows[start:start + 4096]].astype(np.int64)), grids))
        except ValueError as e:
            raise UserError(f"{tokens_path}: {e}, outside the vocabulary of {model_path}") from None
    out_dir.mkdir(parents=True, exist_ok=True)
    names = meta.get("files") or []
    written = []
    for start in tqdm(range(0, len(rows), batch_size), desc="decode", disable=not progress):
        chunk = rows[start:start + batch_size]
        levels = own.unflatten(torch.from_numpy(tokens[chunk].astype(np.int64)).to(dev), grids)
        for r, img in zip(chunk.tolist(), to_uint8(model.decode(levels[0] if len(levels) == 1 else levels))):
            name = Path(names[r]).stem if r < len(names) else f"{r:06d}"
            path = out_dir / f"{r:06d}_{name}.png"
            Image.fromarray(img).save(path)
            written.append(str(path))
    return {"count": len(written), "out": str(out_dir), "unusable_rows": int(len(tokens) - len(rows))}


def _mirrored_names(ds: ImageDataset, images: str, tail: str) -> list[Path]:
    """Each source's output path under the output folder: its sub-folders mirrored, so a/x.png and b/x.png
    stay apart; sources that share a stem in one folder (x.png, x.jpg) keep their extension in the name."""
    root = Path(images).expanduser()
    root = root if root.is_dir() else root.parent
    rel = [relative_source(ds.name(i), root) for i in range(len(ds))]
    shared = Counter(r.with_suffix("") for r in rel)
    return [r.with_name(f"{r.stem}{tail}" if shared[r.with_suffix("")] == 1 else f"{r.stem}_{r.suffix[1:]}{tail}")
            for r in rel]


@torch.no_grad()
def reconstruct_folder(model_path: str, images: str, out: str, batch_size: int = 16, crop: str = "center",
                       resolution: int | None = None, device: str | None = None, progress: bool = True,
                       builtin_count: int = 1024) -> dict:
    dev, model, out_dir = _start(model_path, out, batch_size, device, resolution, builtin_count)
    ds, loader, n_bad = _image_loader(model, images, batch_size, crop, resolution, out_dir, builtin_count)
    outputs = _mirrored_names(ds, images, "_rec.png")
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, skipped = [], n_bad
    for batch in tqdm(loader, desc="reconstruct", disable=not progress):
        skipped += batch["skipped"]
        if batch["image"] is None:
            continue
        x = batch["image"].to(dev)
        rec = model.decode(model.encode(x))
        for i, img, p in zip(batch["index"], to_uint8(rec), psnr_per_image(x, rec).tolist()):
            path = out_dir / outputs[i]
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(path)
            rows.append({"file": ds.name(i), "reconstruction": str(path), "psnr": round(p, 4)})
    with open(out_dir / "psnr.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["file", "reconstruction", "psnr"])
        w.writeheader()
        w.writerows(rows)
    mean = round(float(np.mean([r["psnr"] for r in rows])), 4) if rows else float("nan")
    return {"count": len(rows), "psnr_mean": mean, "out": str(out_dir), "per_image": str(out_dir / "psnr.csv"),
            "skipped": skipped}
