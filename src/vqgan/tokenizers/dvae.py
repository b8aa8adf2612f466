"""DALL-E's discrete VAE encoder and decoder (encoder/decoder kind `dvae`).

Ramesh et al., "Zero-Shot Text-to-Image Generation" (ICML 2021), sec. 2.1 and appendix A.1, in the shape of
the released `dall_e` package: groups of residual blocks at one resolution each, max-pool (encoder) and nearest
(decoder) resampling between the groups; every block adds its residual path, scaled by the "post-gain"
1 / n_layers^2 (n_layers = all blocks of the net), to an identity (or a 1x1 conv where the width changes).
(The scale sits on the residual path, as in the released code, not on the identity.)

    encoder: conv 7x7 -> group 1 (width n_hid) -> pool -> group 2 (2 n_hid) -> pool -> group 3 (4 n_hid) -> pool
             -> group 4 (8 n_hid) -> ReLU -> conv 1x1                                             f = 8 with 4 groups
             block: ReLU-conv3x3 (n_out / 4)-ReLU-conv3x3-ReLU-conv3x3-ReLU-conv1x1 (n_out)
    decoder: conv 1x1 (n_init) -> group 1 (8 n_hid) -> up -> group 2 (4 n_hid) -> up -> group 3 (2 n_hid) -> up
             -> group 4 (n_hid) -> ReLU -> conv 1x1 (2 x 3: logit-Laplace location and log-scale, A.3)
             block: ReLU-conv1x1 (n_out / 4)-ReLU-conv3x3-ReLU-conv3x3-ReLU-conv3x3 (n_out)

Where this differs from the released code, and why:
- DALL-E's encoder ends in a 1x1 conv to 8192 logits, and its decoder starts with a 1x1 conv of the one-hot
  codes. Here the quantizer sits between (`gumbel`: its 1x1 `proj` makes the logits, its `embed` is the decoder's
  first conv), so the encoder's last conv maps to `model.z_channels` and VQModel's quant_conv to the code width:
  the logits have rank <= `embed_dim` (the codebook's width), and the decoder's input conv reads
  `model.z_channels`. The presets keep those widths at DALL-E's n_init (128).
- The number of groups (`groups`, 4: f = 8) is a setting; group g has width 2^g n_hid.
- Every conv is initialised as the released code's: weights normal with std 1 / sqrt(fan_in), biases zero
  (`dalle_init`). PyTorch's default (uniform, ~1/sqrt(3) of that scale, and biases of the same size as the
  weights) shrinks the signal through the 1x1 convs between groups until the biases dominate: at init the
  latent varied 5x less across positions than its constant offset, every position's logits picked one of 8
  codes, and training kept that collapse (1-2% of the codes used; 42+ codes at init with this one).
- Inputs are images in [-1, 1], not DALL-E's pixels mapped into (0.1, 0.9) (an affine map the first conv absorbs).
- The decoder's output is twice `model.out_ch` only under `model.decoder_output: logit_laplace` (VQModel builds
  it so); the image is the location's median (losses/likelihood.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import DecoderConfig, EncoderConfig, VQGANConfig
from ..errors import UserError
from ..nn import Conv2d, dalle_init
from ..registry import DECODERS, ENCODERS


@dataclass
class DVAEShape:
    """The keys the dVAE's encoder and decoder sections share."""

    hidden_channels: int = 256  # n_hid: the width of the full-resolution group (A.1: 256)
    blocks_per_group: int = 2  # n_blk_per_group (released code: 2)
    # the scale of every block's residual path; None: the paper's post-gain 1 / n_layers^2, which starts the net
    # as nearly its identity paths (1/16 at 4 groups of 1 block: the encoder is then close to conv 7x7 + pooling)
    residual_gain: float | None = None

    def check_shape(self, where: str) -> None:
        if self.hidden_channels < 4 or self.hidden_channels % 4:
            raise UserError(f"{where}.hidden_channels must be a positive multiple of 4 (a block's inner width is "
                            f"a quarter of its width), got {self.hidden_channels}")
        if self.blocks_per_group < 1:
            raise UserError(f"{where}.blocks_per_group must be >= 1, got {self.blocks_per_group}")
        if self.residual_gain is not None and not self.residual_gain > 0:
            raise UserError(f"{where}.residual_gain must be > 0 (or null: the paper's 1 / n_layers^2), "
                            f"got {self.residual_gain}")

    def gain(self, n_layers: int) -> float:
        return 1.0 / n_layers ** 2 if self.residual_gain is None else self.residual_gain


@dataclass
class DVAEEncoderConfig(DVAEShape, EncoderConfig):
    """`model.encoder` of kind `dvae`: widths, blocks, and the number of groups (f = 2^(groups - 1))."""

    kind: str = "dvae"
    groups: int = 4  # released code: 4 (f = 8)

    def downsample_factor(self, model: VQGANConfig) -> int:
        return 2 ** (self.groups - 1)

    def validate(self, model: VQGANConfig, where: str) -> None:
        super().validate(model, where)
        self.check_shape(where)
        if not 1 <= self.groups <= 5:
            raise UserError(f"{where}.groups must be in 1..5 (f = 2^(groups - 1)), got {self.groups}")


@dataclass
class DVAEDecoderConfig(DVAEShape, DecoderConfig):
    """`model.decoder` of kind `dvae`: widths and blocks; it has as many groups as the encoder's factor needs."""

    kind: str = "dvae"
    init_channels: int = 128  # n_init: the width of the decoder's input conv

    def upsample_factor(self, model: VQGANConfig) -> int:
        return model.downsample_factor  # it has as many upsampling steps as the encoder's factor needs

    def validate(self, model: VQGANConfig, where: str) -> None:
        super().validate(model, where)
        self.check_shape(where)
        if self.init_channels < 1:
            raise UserError(f"{where}.init_channels must be >= 1, got {self.init_channels}")


class Block(nn.Module):
    """id_path(x) + post_gain * res_path(x); `kernels` are the four convs' sizes (encoder 3-3-3-1, decoder 1-3-3-3)."""

    def __init__(self, n_in: int, n_out: int, post_gain: float, kernels: tuple[int, ...]):
        super().__init__()
        hidden = n_out // 4
        self.post_gain = post_gain
        self.id_path = Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        widths = [n_in, hidden, hidden, hidden, n_out]
        self.res_path = nn.ModuleList([Conv2d(widths[i], widths[i + 1], k, padding=k // 2)
                                       for i, k in enumerate(kernels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for conv in self.res_path:
            h = conv(torch.relu(h))
        return self.id_path(x) + self.post_gain * h


def _groups(widths: list[int], n_in: int, blocks: int, post_gain: float, kernels: tuple[int, ...]) -> nn.ModuleList:
    groups = nn.ModuleList()
    for width in widths:
        groups.append(nn.ModuleList([Block(n_in if i == 0 else width, width, post_gain, kernels)
                                     for i in range(blocks)]))
        n_in = width
    return groups


@ENCODERS.register("dvae", config=DVAEEncoderConfig)
class DVAEEncoder(nn.Module):
    """Image (B, in_channels, H, W) -> latent (B, z_channels, H/f, W/f)."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        shape: DVAEEncoderConfig = cfg.encoder  # type: ignore[assignment]
        n_hid = shape.hidden_channels
        self.conv_in = Conv2d(cfg.in_channels, n_hid, 7, padding=3)
        self.group = _groups([n_hid * 2 ** g for g in range(shape.groups)], n_hid, shape.blocks_per_group,
                             shape.gain(shape.groups * shape.blocks_per_group), (3, 3, 3, 1))
        self.conv_out = Conv2d(n_hid * 2 ** (shape.groups - 1), cfg.z_channels, 1)
        dalle_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for g, group in enumerate(self.group):
            if g:
                h = F.max_pool2d(h, 2)
            for block in group:
                h = block(h)
        return self.conv_out(torch.relu(h))


@DECODERS.register("dvae", config=DVAEDecoderConfig)
class DVAEDecoder(nn.Module):
    """Latent (B, z_channels, h, w) -> (B, out_ch, h*f, w*f): the image, or location and log-scale (2 out_ch)."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        shape: DVAEDecoderConfig = cfg.decoder  # type: ignore[assignment]
        n_hid, groups = shape.hidden_channels, cfg.downsample_factor.bit_length()  # f = 2^(groups - 1)
        if 2 ** (groups - 1) != cfg.downsample_factor:
            raise UserError(f"decoder kind dvae upsamples by powers of 2; the encoder's factor is "
                            f"{cfg.downsample_factor}")
        self.conv_in = Conv2d(cfg.z_channels, shape.init_channels, 1)
        self.group = _groups([n_hid * 2 ** g for g in reversed(range(groups))], shape.init_channels,
                             shape.blocks_per_group, shape.gain(groups * shape.blocks_per_group), (1, 3, 3, 3))
        self.conv_out = Conv2d(n_hid, cfg.out_ch, 1)
        dalle_init(self)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for g, group in enumerate(self.group):
            if g:
                h = F.interpolate(h, scale_factor=2, mode="nearest")
            for block in group:
                h = block(h)
        return self.conv_out(torch.relu(h))

    @property
    def last_layer(self) -> nn.Conv2d:
        """The layer at which the adaptive GAN weight is measured."""
        return self.conv_out


__all__ = ["DVAEDecoder", "DVAEDecoderConfig", "DVAEEncoder", "DVAEEncoderConfig"]
