"""A StyleGAN2-style discriminator (Karras et al. 2020, "Analyzing and Improving the Image Quality of StyleGAN",
the residual D of fig. 7), the ViT-VQGAN's choice (Yu et al. 2021, sec. 3.1) beside the PatchGAN
(`loss.disc_kind: stylegan`).

from_rgb (1x1 conv) -> residual blocks, each halving the side (3x3 conv, 3x3 conv, 2x2 average pool; a 1x1 skip
from the pooled input; sum / sqrt 2) down to 4 px (or the first odd side) -> minibatch standard deviation (one
extra channel: the spread of the features over a group of up to 4 images) -> 3x3 conv -> flatten -> linear ->
linear: one logit per image, (B, 1). Kept plain: no equalized learning rate, no blur before pooling (StyleGAN2's
[1, 3, 3, 1] filter; average pooling is the simpler low-pass), no normalisation layers (so no buffers to
synchronise across processes). Widths: `ndf` at full resolution, doubling per block up to 8 * ndf.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ResidualDown(nn.Module):
    """(B, c_in, s, s) -> (B, c_out, s/2, s/2): two 3x3 convs and a pooled 1x1 skip, summed / sqrt 2."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_in, 3, padding=1)
        self.conv2 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.conv1(x), 0.2)
        h = F.avg_pool2d(F.leaky_relu(self.conv2(h), 0.2), 2)
        return (h + self.skip(F.avg_pool2d(x, 2))) / math.sqrt(2)


def minibatch_stddev(x: torch.Tensor, group: int = 4) -> torch.Tensor:
    """Appends one channel: the standard deviation of each feature over a group of images, averaged over
    features and positions (Karras et al. 2018, sec. 3). The group is the largest size <= `group` that divides
    the batch, so any batch size works."""
    B, C, H, W = x.shape
    g = max(d for d in range(1, min(group, B) + 1) if B % d == 0)
    y = x.float().reshape(g, B // g, C, H, W)
    std = (y.var(0, unbiased=False) + 1e-8).sqrt().mean(dim=(1, 2, 3))  # (B/g,)
    std = std.to(x.dtype).repeat(g).view(B, 1, 1, 1).expand(B, 1, H, W)
    return torch.cat([x, std], 1)


class StyleGANDiscriminator(nn.Module):
    """Images (B, in_channels, resolution, resolution) -> one real/fake logit per image, (B, 1)."""

    def __init__(self, in_channels: int = 3, ndf: int = 64, resolution: int = 256):
        super().__init__()
        self.resolution = resolution
        self.from_rgb = nn.Conv2d(in_channels, ndf, 1)
        blocks, side, ch = [], resolution, ndf
        while side > 4 and side % 2 == 0:
            out = min(ch * 2, 8 * ndf)
            blocks.append(ResidualDown(ch, out))
            side, ch = side // 2, out
        self.blocks = nn.ModuleList(blocks)
        self.conv_out = nn.Conv2d(ch + 1, ch, 3, padding=1)
        self.fc = nn.Linear(ch * side * side, ch)
        self.out = nn.Linear(ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.resolution or x.shape[-2] != self.resolution:
            raise ValueError(f"the StyleGAN discriminator was built for {self.resolution} px images, got "
                             f"{tuple(x.shape[-2:])}")
        h = F.leaky_relu(self.from_rgb(x), 0.2)
        for block in self.blocks:
            h = block(h)
        h = F.leaky_relu(self.conv_out(minibatch_stddev(h)), 0.2)
        return self.out(F.leaky_relu(self.fc(h.flatten(1)), 0.2))  # (B, 1)
