"""The evaluation protocol's images: how a file becomes the uint8 crop that is measured, and how tensors cross
between uint8 and the tokenizer's [-1, 1] (`vqgan eval`, `vqgan compare`, their outputs)."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..data.images import ImageDataset, fit_image

# name -> (PIL filter, how the protocol names it). PIL antialiases both when downsampling (the kernel is
# widened by the scale), which torchvision's `antialias=True` bicubic imitates.
RESIZE_FILTERS = {
    "lanczos": (Image.LANCZOS, "PIL Image.LANCZOS (Lanczos-3, antialiased)"),
    "bicubic": (Image.BICUBIC, "PIL Image.BICUBIC (antialiased, a=-0.5)"),
}


class ProtocolImages(ImageDataset):
    """Centre crops as uint8 (3, res, res): the short side resized to `res` by the named filter alone."""

    def __init__(self, sources, resolution: int, resample: int):
        super().__init__(sources, resolution, crop="center", flip=False, train=False)
        self.resample = resample

    @property
    def upscaled(self) -> int:
        """How many images are smaller than the resolution on their short side (the resize enlarges them): by the
        sizes the folder scan read from their headers; built-in images are made at the resolution."""
        return sum(src.size is not None and min(src.size) < self.resolution for src in self.sources)

    def prepare(self, im: Image.Image, index: int, epoch: int = 0) -> torch.Tensor:
        """The same for every epoch: no random crop, no flip."""
        im = fit_image(im, self.resolution, "center", None, self.resample, exact=True)
        return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)


def to_signed(images: torch.Tensor) -> torch.Tensor:
    """uint8 -> the tokenizer's [-1, 1] input (exact: x / 127.5 - 1)."""
    return images.float().div_(127.5).sub_(1.0)


def round_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """A reconstruction in [-1, 1] (not clamped) -> uint8, rounded to nearest (as PNG files are written)."""
    return ((images.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round_().to(torch.uint8)
