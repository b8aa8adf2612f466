"""The convolution layer the models build on (nn.Conv2d, with a faster path for 3x3 convolutions on the CPU),
and the released DALL-E code's conv init."""
from __future__ import annotations

import torch
from torch import nn

from ..native import winograd


class Conv2d(nn.Conv2d):
    """nn.Conv2d (same parameters, same state-dict keys) whose 3x3 "same" convolutions of float32 tensors on the
    CPU run by Winograd's F(4x4, 3x3) (`vqgan.native.winograd`) where the image is large enough to gain: NCHW
    with both gradients (training; 1.5-3x faster than oneDNN at the sizes VQGAN and LPIPS train at), channels-
    last outside autograd (inference). Everything else (GPU, other shapes) is nn.Conv2d's own forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if winograd.applies(self, x):
            return winograd.conv3x3(x, self.weight, self.bias)
        if winograd.applies_channels_last(self, x):
            return winograd.conv3x3_channels_last(x, self.weight, self.bias)
        return super().forward(x)


def dalle_init(module: nn.Module) -> None:
    """Every conv of `module` as the released dall_e `Conv2d`: w ~ N(0, 1 / (n_in * kw * kw)), b = 0."""
    for conv in module.modules():
        if isinstance(conv, nn.Conv2d):
            nn.init.normal_(conv.weight, std=conv.weight[0].numel() ** -0.5)
            nn.init.zeros_(conv.bias)
