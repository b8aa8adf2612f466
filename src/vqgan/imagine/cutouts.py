"""Random cutouts of the decoded image, resized to CLIP's input size and augmented.

As the well-known VQGAN+CLIP notebook (Crowson 2021, its "MakeCutouts" with kornia augmentations): `cutn` square
crops whose side is min_size + (max_size - min_size) * u**cut_pow (u uniform; cut_pow > 1 favours small crops,
< 1 large ones), then flips, affine, perspective, colour jitter and additive noise. CLIP sees many views, so the
image has to match the prompt everywhere and at several scales rather than fool CLIP with one adversarial view.

The notebook resamples each view three times (resize, affine warp, perspective warp), and their backward passes
cost more than the rest of the cutout code. Here each view's crop, resize, flip, affine and perspective are one
3x3 homography (homography.py), drawn with the ranges of kornia's `RandomHorizontalFlip(p=0.5)`,
`RandomAffine(degrees=15, translate=0.1, p=0.7)` and `RandomPerspective(0.7, p=0.7)`, and all views are sampled
by one `grid_sample` per pyramid level. A view shrunk by more than ~1.4x is sampled from the image average-pooled
by the nearest power of two (as the notebooks' adaptive average pooling), so bilinear sampling does not alias.
Colour jitter has the ranges of kornia's `ColorJitter(hue=0.1, saturation=0.1, p=0.7)` as one 3x3 matrix per view
(colour.py); the noise is added elementwise.

Randomness: every parameter comes from this object's generator, so a seed reproduces the cutouts on one device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import colour, homography

FLIP_P, AFFINE_P, PERSPECTIVE_P, COLOUR_P = 0.5, 0.7, 0.7, 0.7
DEGREES, TRANSLATE, DISTORTION = 15.0, 0.1, 0.7  # degrees; fraction of the side; corners move up to 0.7 * side / 2
HUE, SATURATION = 0.1, 0.1  # hue shift in turns, saturation factor 1 +- 0.1


@dataclass
class Draw:
    """One call's random parameters, N = cutn (identity values where a view skipped an augmentation)."""

    boxes: torch.Tensor  # (N, 3) long: x, y, side of each crop in image pixels
    flip: torch.Tensor  # (N,) bool
    angle: torch.Tensor  # (N,) degrees
    shift: torch.Tensor  # (N, 2) pixels of the resized view
    corners: torch.Tensor  # (N, 4, 2) where the view's corners (0,0) (s-1,0) (s-1,s-1) (0,s-1) go
    hue: torch.Tensor  # (N,) turns
    saturation: torch.Tensor  # (N,)
    hue_first: bool  # kornia draws the order of its colour steps once per call
    noise: torch.Tensor  # (N,) std of each view's noise

    def src_from_dst(self, size: int) -> torch.Tensor:
        """(N, 3, 3) image pixel <- view pixel: output(p) = image(crop_resize . flip . affine^-1 . perspective^-1 p)."""
        s = size - 1
        square = torch.tensor([[0, 0], [s, 0], [s, s], [0, s]], dtype=torch.float64).expand_as(self.corners)
        affine = homography.rotate_translate(self.angle, self.shift, size)
        return (homography.crop_resize(self.boxes, size) @ homography.hflip(self.flip, size)
                @ torch.linalg.inv(affine) @ homography.from_points(self.corners, square))


def _uniform(n: int, low: float, high: float, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(n, generator=generator, dtype=torch.float64) * (high - low) + low


def _chosen(n: int, p: float, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(n, generator=generator) < p


class MakeCutouts(nn.Module):
    """(1, 3, H, W) images in [0, 1] -> (cutn, 3, size, size) augmented views."""

    def __init__(self, cut_size: int, cutn: int, cut_pow: float = 1.0, noise: float = 0.1,
                 augment: bool = True, generator: torch.Generator | None = None):
        super().__init__()
        self.cut_size, self.cutn, self.cut_pow, self.noise = cut_size, cutn, cut_pow, noise
        self.augment, self.generator = augment, generator

    def sizes(self, height: int, width: int) -> list[int]:
        """The crop sides of one call. The notebook's smallest side is CLIP's input size; an image smaller than
        that would give only whole-image crops, so there the smallest is half the image."""
        max_size = min(height, width)
        min_size = min(max_size, self.cut_size) if max_size > self.cut_size else max(1, max_size // 2)
        u = torch.rand(self.cutn, generator=self.generator)
        return [int(v) for v in (u ** self.cut_pow * (max_size - min_size) + min_size)]

    def draw(self, height: int, width: int) -> Draw:
        """All random parameters of one call, from this object's generator."""
        n, g, side = self.cutn, self.generator, self.cut_size
        boxes = []
        for size in self.sizes(height, width):
            y = int(torch.randint(0, height - size + 1, (), generator=g))
            x = int(torch.randint(0, width - size + 1, (), generator=g))
            boxes.append((x, y, size))
        corners = torch.tensor([[0, 0], [side - 1, 0], [side - 1, side - 1], [0, side - 1]], dtype=torch.float64)
        corners = corners.expand(n, 4, 2).clone()
        draw = Draw(torch.tensor(boxes), torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.float64),
                    torch.zeros(n, 2, dtype=torch.float64), corners, torch.zeros(n, dtype=torch.float64),
                    torch.ones(n, dtype=torch.float64), False, torch.zeros(n, dtype=torch.float64))
        if self.augment:
            draw.flip = _chosen(n, FLIP_P, g)
            on = _chosen(n, AFFINE_P, g)
            draw.angle = torch.where(on, _uniform(n, -DEGREES, DEGREES, g), 0.0)
            draw.shift = torch.where(on[:, None], _uniform(2 * n, -TRANSLATE, TRANSLATE, g).view(n, 2) * side, 0.0)
            # kornia's "basic" perspective: each corner moves inwards by up to distortion * side / 2 on each axis
            on = _chosen(n, PERSPECTIVE_P, g)
            inwards = torch.tensor([[1, 1], [-1, 1], [-1, -1], [1, -1]], dtype=torch.float64)
            offset = DISTORTION * side / 2 * torch.rand(n, 4, 2, generator=g, dtype=torch.float64) * inwards
            draw.corners = corners + offset * on[:, None, None]
            on = _chosen(n, COLOUR_P, g)
            draw.hue = torch.where(on, _uniform(n, -HUE, HUE, g), 0.0)
            draw.saturation = torch.where(on, _uniform(n, 1 - SATURATION, 1 + SATURATION, g), 1.0)
            draw.hue_first = bool(torch.rand((), generator=g) < 0.5)
        if self.noise:
            draw.noise = _uniform(n, 0, self.noise, g)
        return draw

    def warp(self, image: torch.Tensor, draw: Draw) -> torch.Tensor:
        """(1, 3, H, W) -> (N, 3, size, size): each view sampled from the pyramid level nearest its scale."""
        matrices = draw.src_from_dst(self.cut_size)
        height, width = image.shape[-2:]
        levels = (draw.boxes[:, 2].double() / self.cut_size).log2().round().clamp(min=0).long()
        if int(levels.max()) == 0:
            return homography.sample(image, matrices, self.cut_size)
        parts, order = [], []
        for level in levels.unique().tolist():
            which = (levels == level).nonzero().flatten()
            pooled = image if level == 0 else F.adaptive_avg_pool2d(
                image, (math.ceil(height / 2 ** level), math.ceil(width / 2 ** level)))
            parts.append(homography.sample(pooled, matrices[which], self.cut_size))
            order.append(which)
        return torch.cat(parts)[torch.cat(order).argsort().to(image.device)]

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        draw = self.draw(*image.shape[-2:])
        batch = self.warp(image, draw)
        if self.augment:
            hue, sat = colour.hue_rotation(draw.hue), colour.saturation(draw.saturation)
            batch = colour.apply(batch, sat @ hue if draw.hue_first else hue @ sat)
        if self.noise:
            # a device generator seeded from ours: the noise is drawn where the image lives
            seed = int(torch.randint(2 ** 62, (), generator=self.generator))
            g = torch.Generator(image.device).manual_seed(seed)
            std = draw.noise.to(image.device, image.dtype).view(-1, 1, 1, 1)
            batch = batch + std * torch.randn(batch.shape, generator=g, device=image.device, dtype=image.dtype)
        return batch
