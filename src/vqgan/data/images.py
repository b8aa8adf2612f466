"""Folders of images for training and inference.

Bad data never kills a run: files whose header cannot be read are dropped while scanning; files that
fail to decode later (truncated, corrupt) are replaced by another image, counted and logged once by
name. Any mode (CMYK, palette, 16-bit, RGBA, greyscale) is converted to 8-bit RGB.
"""
from __future__ import annotations

import logging
import os
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from ..errors import UserError
from ..parallel import is_first_process

log = logging.getLogger("vqgan.data")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
_reported: set[str] = set()


def report_bad_file(path: str | Path, reason: str, announce: bool = True) -> None:
    """Log a skipped file once per process; `announce=False` only marks it reported (what every torchrun
    replica finds alike, such as the folder scan's findings, is logged by the first process alone)."""
    key = str(path)
    if key not in _reported:
        _reported.add(key)
        if announce:
            log.warning("skipping %s: %s", path, reason)


# Raised while reading a file, these mean a bug in the code, not a bad file: the readers re-raise them rather than
# count the file as unreadable (a wrong signature once surfaced as "none of the 37 images could be read")
PROGRAM_ERRORS = (TypeError, AttributeError, NameError, ImportError, NotImplementedError, RecursionError)


def error_reason(e: BaseException) -> str:
    """The first line of an exception's message (PIL's can be long), or its type when it has none."""
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _to_8bit_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        if im.mode == "F":
            top = max(float(a.max()), 1e-8)
        im = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))  # transparent -> white
        im = Image.alpha_composite(background, rgba)
    return im.convert("RGB")


def load_rgb(path: str | Path) -> Image.Image:
    """Decode an image file fully to 8-bit RGB, honouring EXIF orientation. Raises on bad files."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL's palette/EXIF chatter
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            return _to_8bit_rgb(im)


def _image_files(root: Path) -> tuple[list[Path], list[Path]]:
    """(image files, broken links to image files) under `root`, sorted by path.

    Symlinked folders are followed, each real folder once: a link back to an ancestor would loop forever,
    and one to a folder already scanned would list its images twice. Such links are logged with the reason.
    """
    files, broken, passed_over = [], [], []
    seen = {os.stat(root)[1:3]}  # (inode, device) of each folder scanned: links are followed to real folders

    def unreadable(e: OSError) -> None:
        passed_over.append(f"{e.filename} (cannot be read: {e.strerror})")

    for folder, subfolders, names in os.walk(root, followlinks=True, onerror=unreadable):
        here = Path(folder)
        for name in sorted(subfolders, key=lambda n: (os.path.islink(os.path.join(folder, n)), n)):  # real first
            sub = here / name
            key = os.stat(sub)[1:3]
            if key not in seen:
                seen.add(key)
                continue
            subfolders.remove(name)
            real, real_here = Path(os.path.realpath(sub)), Path(os.path.realpath(here))
            why = "a link back to its ancestor, a loop" if real in (real_here, *real_here.parents) else \
                "already scanned under another name"
            passed_over.append(f"{sub} -> {real} ({why})")
        for name in names:
            p = here / name
            if p.suffix.lower() in IMAGE_EXTENSIONS:
                (files if p.is_file() else broken).append(p)
            elif not p.exists():  # a broken link, maybe to a folder of images
                passed_over.append(f"{p} (a broken link)")
    if passed_over and is_first_process():
        log.warning("%d folders or links under %s were not followed: %s", len(passed_over), root,
                    "; ".join(passed_over))
    for p in broken:
        report_bad_file(p, "a broken link (its target does not exist)", announce=is_first_process())
    return sorted(files), sorted(broken)


def scan_images(root: str | Path, sizes: dict[Path, tuple[int, int]] | None = None
                ) -> tuple[list[Path], list[Path]]:
    """(readable files, unreadable files) under `root`, recursive (following symlinked folders), sorted by path;
    each readable file's (width, height) into `sizes` when given.

    Only headers are read here; full decoding happens at load time. Broken links count as unreadable files.
    """
    root = Path(root)
    if not root.exists():
        raise UserError(f"data folder {root} does not exist")
    candidates, bad = ([root], []) if root.is_file() else _image_files(root)
    total = len(candidates) + len(bad)
    if not total:
        raise UserError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")
    good = []
    for p in candidates:
        try:
            if p.stat().st_size == 0:
                raise OSError("empty file")
            with Image.open(p) as im:
                size = im.size  # header only
            if sizes is not None:
                sizes[p] = size
            good.append(p)
        except PROGRAM_ERRORS:
            raise
        except Exception as e:  # PIL raises many types for bad files
            report_bad_file(p, error_reason(e), announce=is_first_process())
            bad.append(p)
    if not good:
        raise UserError(f"none of the {total} image files under {root} could be read")
    return good, sorted(bad)


def to_tensor(im: Image.Image) -> torch.Tensor:
    """8-bit RGB image -> (3, H, W) float in [-1, 1]."""
    a = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy())
    return a.permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def fit_image(im: Image.Image, resolution: int, crop: str, rng: random.Random | None,
              resample: int = Image.BICUBIC, exact: bool = False) -> Image.Image:
    """Resize so the short side is `resolution`, then crop a square (random when `rng` is given).

    The random draws depend only on the image size and `rng`, so an image and its condition map (same size,
    same seed) get the same crop. `exact`: the named filter alone, without PIL's faster box pre-reduction of
    large downscales (`reducing_gap`), as an evaluation protocol that names its filter needs."""
    gap = 3.0 if resample == Image.BICUBIC and not exact else None
    if crop == "resize":
        return im.resize((resolution, resolution), resample, reducing_gap=gap)
    w, h = im.size
    scale = resolution / min(w, h)
    if scale != 1.0:
        im = im.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), resample,
                       reducing_gap=gap)
    w, h = im.size
    if crop == "random" and rng is not None:
        left, top = rng.randint(0, w - resolution), rng.randint(0, h - resolution)
    else:
        left, top = (w - resolution) // 2, (h - resolution) // 2
    return im.crop((left, top, left + resolution, top + resolution))


@dataclass
class ImageSource:
    """Where one item comes from: a file path or an in-memory image (built-in data)."""

    name: str
    load: Callable[[], Image.Image]
    label: int | None = None  # a class id the data set itself knows (the built-in scenes)
    size: tuple[int, int] | None = None  # (width, height) from the file's header, where the scan read it


class ImageDataset(Dataset):
    """Square crops as (3, res, res) tensors in [-1, 1], or condition maps as their tokenizer's input
    (`kind` segmentation / depth, see data/maps.py).

    Augmentation randomness comes from (seed, epoch, index), so an interrupted run that resumes sees the
    same crops, whatever the number of loader workers. Items are dicts: `image`, `index`, `skipped`
    (how many bad files were passed over to produce this item).
    """

    def __init__(self, sources: Sequence[ImageSource], resolution: int, crop: str = "random", flip: bool = True,
                 train: bool = True, seed: int = 0, kind: str = "rgb", n_labels: int = 0):
        if not sources:
            raise UserError("the data set is empty")
        self.sources = list(sources)
        self.resolution = resolution
        self.crop = crop if train else ("center" if crop == "random" else crop)
        self.flip = flip and train
        self.train = train
        self.seed = seed
        self.kind = kind
        self.n_labels = n_labels

    @classmethod
    def from_paths(cls, paths: Sequence[Path], **kwargs) -> "ImageDataset":
        return cls([ImageSource(str(p), (lambda p=p: load_rgb(p))) for p in paths], **kwargs)

    def batch(self) -> torch.Tensor:
        """Every item stacked, (N, 3, res, res): a small evaluation set in one tensor (benchmarks, analyses)."""
        return torch.stack([self[i]["image"] for i in range(len(self))])

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        """Item `index` as in epoch 0, or `(epoch, index)`: as in that epoch (an endless loader's keys,
        train/common.py `EpochBatches`)."""
        epoch, index = key if isinstance(key, tuple) else (0, key)
        n = len(self.sources)
        for attempt in range(min(n, 50)):
            i = (index + attempt) % n
            x = self.read(i, crop_index=index, epoch=epoch)
            if x is not None:
                return {"image": x, "index": i, "skipped": attempt, "epoch": epoch}
        raise RuntimeError(f"could not load any image near index {index} (50 bad files in a row)")

    def read(self, index: int, crop_index: int | None = None, epoch: int = 0) -> torch.Tensor | None:
        """Source `index` prepared as item `crop_index` (default `index`) of `epoch`, or
        None when it cannot be read (reported once): for outputs whose rows name their file, where a stand-in
        would be mislabelled."""
        src = self.sources[index]
        try:
            return self.prepare(src.load(), index if crop_index is None else crop_index, epoch)
        except PROGRAM_ERRORS:
            raise
        except Exception as e:  # corrupt / truncated / vanished file, or a label map with a bad label
            report_bad_file(src.name, error_reason(e))
            return None

    def prepare(self, im: Image.Image, index: int, epoch: int = 0) -> torch.Tensor:
        """Crop (and flip) as item `index` of `epoch`, then convert to the model's input tensor."""
        from .maps import map_to_tensor, resample_for

        rng = random.Random(f"{self.seed}/{epoch}/{index}") if self.train else None  # stable across processes
        im = fit_image(im, self.resolution, self.crop, rng, resample_for(self.kind))
        if self.flip and rng is not None and rng.random() < 0.5:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        return to_tensor(im) if self.kind == "rgb" else map_to_tensor(im, self.kind, self.n_labels)

    def name(self, index: int) -> str:
        return self.sources[index].name


class ReadableItems(Dataset):
    """The items of `images` in order, each prepared from its own file, or None when that cannot be read.

    Use with `collate_readable`, which leaves the unreadable ones out and counts them."""

    def __init__(self, images: ImageDataset):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.images.read(index), "index": index}


def collate_readable(items: list[dict]) -> dict:
    """`image`: (B, 3, H, W) of the readable items (None if there is none), `index`: their source indices,
    `skipped`: how many were left out, `skipped_index`: theirs."""
    good = [it for it in items if it["image"] is not None]
    return {"image": torch.stack([it["image"] for it in good]) if good else None,
            "index": [it["index"] for it in good], "skipped": len(items) - len(good),
            "skipped_index": [it["index"] for it in items if it["image"] is None]}
