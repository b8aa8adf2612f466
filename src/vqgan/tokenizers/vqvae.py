"""The original VQ-VAE's encoder and decoder (encoder/decoder kind `vqvae`).

van den Oord, Vinyals & Kavukcuoglu, "Neural Discrete Representation Learning" (NeurIPS 2017), sec. 4.1: "The
encoder consists of 2 strided convolutional layers with stride 2 and window size 4 x 4, followed by two
residual 3 x 3 blocks (implemented as ReLU, 3x3 conv, ReLU, 1x1 conv), all having 256 hidden units. The
decoder similarly has two residual 3 x 3 blocks, followed by two transposed convolutions with stride 2 and
window size 4 x 4." On ImageNet at 128 px that gives a 32 x 32 grid of K = 512 codes (f = 4).

Details the paper leaves open, as chosen here (they follow DeepMind's released Sonnet example):
- the first strided conv has half the hidden width; a 3x3 conv follows the strided ones in the encoder and
  precedes the residual blocks in the decoder; a ReLU closes each residual stack;
- `factor` 8 (or 2, 16) adds (or removes) strided / transposed convs, all 4x4 with stride 2;
- the encoder ends in a 1x1 conv to `model.z_channels` (then VQModel's quant_conv to the code width: the paper's
  "pre-VQ" projection), the decoder starts with a 3x3 conv from `model.z_channels`;
- the decoder's last layer is the last transposed conv (the adaptive GAN weight takes the exact VJP path there).
The paper's codebook is updated by moving averages (appendix A.1): the presets use the `ema` quantizer, and
train on the mean squared error alone (`loss.l2_weight`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..config import DecoderConfig, EncoderConfig, VQGANConfig
from ..errors import UserError
from ..nn import Conv2d
from ..registry import DECODERS, ENCODERS


@dataclass
class VQVAEShape:
    """The keys the VQ-VAE's encoder and decoder sections share."""

    hidden_channels: int = 256  # sec. 4.1: "all having 256 hidden units"
    residual_channels: int = 256  # the width inside a residual block (the 3x3 conv's output)
    num_residual_blocks: int = 2

    def check_shape(self, where: str) -> None:
        for name in ("hidden_channels", "residual_channels", "num_residual_blocks"):
            if getattr(self, name) < (0 if name == "num_residual_blocks" else 1):
                raise UserError(f"{where}.{name} must be >= {0 if name == 'num_residual_blocks' else 1}, "
                                f"got {getattr(self, name)}")
        if self.hidden_channels % 2:
            raise UserError(f"{where}.hidden_channels must be even (the outer strided convs have half of it), "
                            f"got {self.hidden_channels}")


@dataclass
class VQVAEEncoderConfig(VQVAEShape, EncoderConfig):
    """`model.encoder` of kind `vqvae`: its widths and its grid factor (one 4x4 stride-2 conv per halving)."""

    kind: str = "vqvae"
    factor: int = 4  # image side / grid side: 4 in the paper (2 strided convs); 2, 8 or 16

    def downsample_factor(self, model: VQGANConfig) -> int:
        return self.factor

    def validate(self, model: VQGANConfig, where: str) -> None:
        super().validate(model, where)
        self.check_shape(where)
        if self.factor not in (2, 4, 8, 16):
            raise UserError(f"{where}.factor must be 2, 4, 8 or 16 (one strided conv per halving), got {self.factor}")


@dataclass
class VQVAEDecoderConfig(VQVAEShape, DecoderConfig):
    """`model.decoder` of kind `vqvae`: its widths; it upsamples by the encoder's factor."""

    kind: str = "vqvae"

    def upsample_factor(self, model: VQGANConfig) -> int:
        return model.downsample_factor  # it has as many upsampling steps as the encoder's factor needs

    def validate(self, model: VQGANConfig, where: str) -> None:
        super().validate(model, where)
        self.check_shape(where)


class ResidualBlock(nn.Module):
    """x + conv1x1(ReLU(conv3x3(ReLU(x)))) (sec. 4.1)."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.conv1 = Conv2d(channels, hidden, 3, padding=1)
        self.conv2 = Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(torch.relu(self.conv1(torch.relu(x))))


class ResidualStack(nn.Module):
    def __init__(self, shape: VQVAEShape):
        super().__init__()
        self.block = nn.ModuleList([ResidualBlock(shape.hidden_channels, shape.residual_channels)
                                    for _ in range(shape.num_residual_blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        return torch.relu(x)


def _widths(shape: VQVAEShape, factor: int) -> list[int]:
    """The widths between the strided convs, from the image side: half the hidden width first, then hidden."""
    n = int(math.log2(factor))
    return [shape.hidden_channels // 2] * (n > 1) + [shape.hidden_channels] * (n - (n > 1))


@ENCODERS.register("vqvae", config=VQVAEEncoderConfig)
class VQVAEEncoder(nn.Module):
    """Image (B, in_channels, H, W) -> latent (B, z_channels, H/f, W/f)."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        shape: VQVAEEncoderConfig = cfg.encoder  # type: ignore[assignment]
        self.down = nn.ModuleList()
        c = cfg.in_channels
        for width in _widths(shape, shape.factor):
            self.down.append(nn.Conv2d(c, width, 4, stride=2, padding=1))
            c = width
        self.conv_mid = Conv2d(c, shape.hidden_channels, 3, padding=1)
        self.res = ResidualStack(shape)
        self.conv_out = nn.Conv2d(shape.hidden_channels, cfg.z_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.down:
            x = torch.relu(conv(x))
        return self.conv_out(self.res(self.conv_mid(x)))


@DECODERS.register("vqvae", config=VQVAEDecoderConfig)
class VQVAEDecoder(nn.Module):
    """Latent (B, z_channels, h, w) -> image (B, out_ch, h*f, w*f)."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        shape: VQVAEDecoderConfig = cfg.decoder  # type: ignore[assignment]
        self.conv_in = Conv2d(cfg.z_channels, shape.hidden_channels, 3, padding=1)
        self.res = ResidualStack(shape)
        widths = [*reversed(_widths(shape, cfg.downsample_factor)), cfg.out_ch][1:]
        self.up = nn.ModuleList()
        c = shape.hidden_channels
        for width in widths:
            self.up.append(nn.ConvTranspose2d(c, width, 4, stride=2, padding=1))
            c = width

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.res(self.conv_in(z))
        for i, conv in enumerate(self.up):
            h = conv(h) if i == len(self.up) - 1 else torch.relu(conv(h))
        return h

    @property
    def last_layer(self) -> nn.Module:
        """The layer at which the adaptive GAN weight is measured."""
        return self.up[-1]


__all__ = ["VQVAEDecoder", "VQVAEDecoderConfig", "VQVAEEncoder", "VQVAEEncoderConfig"]
