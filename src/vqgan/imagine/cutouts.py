"""Random cutouts of the decoded image, resized to CLIP's input size and augmented (kornia).

As the well-known VQGAN+CLIP notebook (Crowson 2021, its "MakeCutouts" with kornia augmentations): `cutn` square
crops whose side is min_size + (max_size - min_size) * u**cut_pow (u uniform; cut_pow > 1 favours small crops,
< 1 large ones), then flips, affine, perspective, colour jitter and additive noise. CLIP sees many views, so the
image has to match the prompt everywhere and at several scales rather than fool CLIP with one adversarial view.

Randomness: crop sizes and places come from this object's generator; kornia draws its augmentation parameters
from torch's global generator (seeded by the run), so a seed reproduces the cutouts on one device.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

try:
    import kornia.augmentation as K
except ImportError:  # pragma: no cover - kornia is in the `clip` extra
    K = None


def augmentations() -> nn.Module:
    """The notebook's set (its later versions), minus random erasing: flips, affine, perspective, colour."""
    from ..errors import UserError

    if K is None:
        raise UserError("vqgan imagine needs kornia for its augmentations: pip install 'vqgan[clip]'")
    return nn.Sequential(
        K.RandomHorizontalFlip(p=0.5),
        K.RandomAffine(degrees=15, translate=(0.1, 0.1), p=0.7, padding_mode="border"),
        K.RandomPerspective(distortion_scale=0.7, p=0.7),
        K.ColorJitter(hue=0.1, saturation=0.1, p=0.7),
    )


class MakeCutouts(nn.Module):
    """(1, 3, H, W) images in [0, 1] -> (cutn, 3, size, size) augmented views."""

    def __init__(self, cut_size: int, cutn: int, cut_pow: float = 1.0, noise: float = 0.1,
                 augment: bool = True, generator: torch.Generator | None = None):
        super().__init__()
        self.cut_size, self.cutn, self.cut_pow, self.noise = cut_size, cutn, cut_pow, noise
        self.augs = augmentations() if augment else nn.Identity()
        self.generator = generator

    def sizes(self, height: int, width: int) -> list[int]:
        """The crop sides of one call. The notebook's smallest side is CLIP's input size; an image smaller than
        that would give only whole-image crops, so there the smallest is half the image."""
        max_size = min(height, width)
        min_size = min(max_size, self.cut_size) if max_size > self.cut_size else max(1, max_size // 2)
        u = torch.rand(self.cutn, generator=self.generator)
        return [int(v) for v in (u ** self.cut_pow * (max_size - min_size) + min_size)]

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        views = []
        for size in self.sizes(height, width):
            y = int(torch.randint(0, height - size + 1, (), generator=self.generator))
            x = int(torch.randint(0, width - size + 1, (), generator=self.generator))
            crop = image[:, :, y:y + size, x:x + size]
            views.append(F.interpolate(crop, (self.cut_size, self.cut_size), mode="bilinear", align_corners=False,
                                       antialias=size > self.cut_size))
        batch = self.augs(torch.cat(views))
        if self.noise:
            scale = batch.new_empty(self.cutn, 1, 1, 1).uniform_(0, self.noise)
            batch = batch + scale * torch.randn_like(batch)
        return batch
