"""Condition maps: segmentation label maps and depth maps, as a condition tokenizer sees them.

A tokenizer's `input_kind` says what its input channels hold:
- "rgb": images, (3, H, W) in [-1, 1];
- "segmentation": a label map as one-hot channels, (n_labels, H, W) in {0, 1}; the decoder returns
  logits over the labels (as the paper's segmentation condition stage);
- "depth": one channel, (1, H, W) in [-1, 1] (near = -1 ... far = 1, as the file stores it).

Label maps are greyscale or palette PNGs whose pixel values are class ids (palette indices are the ids,
as in VOC-style masks); colour-coded RGB masks are refused with a message, since their colours carry no
ids. Depth maps are 8- or 16-bit greyscale (or float TIFF), scaled by their format's range.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

MAP_KINDS = ("rgb", "segmentation", "depth")

# distinct colours for label ids (cycled past 20) when a person looks at a label map
_PALETTE = torch.tensor([
    (135, 190, 235), (250, 210, 60), (235, 235, 240), (120, 110, 140), (110, 170, 70), (40, 90, 170),
    (30, 110, 50), (190, 70, 60), (230, 140, 40), (150, 80, 170), (60, 180, 170), (240, 120, 170),
    (100, 100, 100), (200, 200, 120), (80, 50, 30), (170, 220, 120), (20, 20, 90), (250, 160, 120),
    (120, 200, 250), (0, 0, 0)], dtype=torch.float32)


def load_label_map(path) -> Image.Image:
    """A label map file -> mode "I" image of class ids. Raises ValueError for colour-coded masks."""
    with Image.open(path) as im:
        im.load()
        if im.mode == "P":
            return Image.fromarray(np.asarray(im).astype(np.int32), "I")
        if im.mode in ("RGB", "RGBA"):
            a = np.asarray(im.convert("RGB"))
            if not ((a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()):
                raise ValueError("colour-coded segmentation map: save class ids as a greyscale or palette PNG")
            return Image.fromarray(a[..., 0].astype(np.int32), "I")
        return Image.fromarray(np.asarray(im).astype(np.int32), "I")


def load_depth_map(path) -> Image.Image:
    """A depth map file -> mode "F" image in [0, 1]."""
    with Image.open(path) as im:
        im.load()
        if im.mode == "F":
            a = np.asarray(im, dtype=np.float32)
            lo, hi = float(a.min()), float(a.max())
            a = (a - lo) / max(hi - lo, 1e-8)
        elif im.mode.startswith("I"):
            a = np.asarray(im, dtype=np.float32) / (65535.0 if im.mode.startswith("I;16") or np.asarray(im).max() > 255
                                                     else 255.0)
        else:
            a = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    return Image.fromarray(a.astype(np.float32), "F")


def map_to_tensor(im: Image.Image, kind: str, n_labels: int = 0) -> torch.Tensor:
    """A (cropped) map image -> the tokenizer's input tensor (see the module docstring)."""
    if kind == "segmentation":
        labels = torch.from_numpy(np.asarray(im, dtype=np.int64).copy())
        top = int(labels.max())
        if top >= n_labels or int(labels.min()) < 0:
            raise ValueError(f"label {top} outside 0..{n_labels - 1} (model.in_channels = the number of labels)")
        return one_hot(labels, n_labels)
    if kind == "depth":
        return torch.from_numpy(np.asarray(im, dtype=np.float32).copy())[None].mul(2.0).sub(1.0)
    raise ValueError(f"unknown map kind {kind!r}")


def one_hot(labels: torch.Tensor, n_labels: int) -> torch.Tensor:
    """(..., H, W) int -> (..., n_labels, H, W) float in {0, 1}."""
    return F.one_hot(labels.long(), n_labels).movedim(-1, -3).float()


def colorize(labels: torch.Tensor) -> torch.Tensor:
    """(B, H, W) class ids -> (B, 3, H, W) in [-1, 1] with a fixed palette."""
    rgb = _PALETTE.to(labels.device)[labels.long() % len(_PALETTE)]  # (B, H, W, 3)
    return rgb.permute(0, 3, 1, 2) / 127.5 - 1.0


def to_display(x: torch.Tensor, kind: str) -> torch.Tensor:
    """A tokenizer's input or output batch -> RGB in [-1, 1] for pictures."""
    if kind == "segmentation":
        return colorize(x.argmax(1))
    if kind == "depth":
        return x.clamp(-1, 1).expand(-1, 3, -1, -1)
    return x


def resample_for(kind: str) -> int:
    """Class ids must not be blended when resizing; images and depth may be."""
    return {"segmentation": Image.NEAREST, "depth": Image.BILINEAR}.get(kind, Image.BICUBIC)
