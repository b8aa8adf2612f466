"""The VQGAN's convolutional encoder and decoder (encoder/decoder kind `conv`).

Esser, Rombach & Ommer, "Taming Transformers for High-Resolution Image Synthesis" (CVPR 2021), sec. 3.1.
Module names match the released code (`down[i].block[j]`, `mid.attn_1`, `conv_out`, ...), so its
checkpoints convert by key copy.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import VQGANConfig
from ..nn import AttnBlock, Conv2d, Downsample, ResnetBlock, Upsample, norm_swish, normalize
from ..registry import DECODERS, ENCODERS


@ENCODERS.register("conv")
class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> latent (B, z_channels, H/f, W/f)."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        self.conv_in = Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        in_mult = [1, *cfg.ch_mult]
        res = cfg.resolution
        self.down = nn.ModuleList()
        for level, mult in enumerate(cfg.ch_mult):
            stage = nn.Module()
            block_in, block_out = cfg.ch * in_mult[level], cfg.ch * mult
            stage.block = nn.ModuleList()
            stage.attn = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                stage.block.append(ResnetBlock(block_in, block_out, cfg.dropout))
                block_in = block_out
                if res in cfg.attn_resolutions:
                    stage.attn.append(AttnBlock(block_in))
            if level != len(cfg.ch_mult) - 1:
                stage.downsample = Downsample(block_in)
                res //= 2
            self.down.append(stage)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, cfg.dropout)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in, cfg.dropout)
        self.norm_out = normalize(block_in)
        self.conv_out = Conv2d(block_in, cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn):
                    h = stage.attn[i](h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(norm_swish(self.norm_out, h))


@DECODERS.register("conv")
class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) -> image (B, out_ch, h*f, w*f).

    `up[level]` is indexed by resolution level (0 = full resolution) although it runs from the lowest
    resolution up, as in the released checkpoints.
    """

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        block_in = cfg.ch * cfg.ch_mult[-1]
        res = cfg.resolution // cfg.downsample_factor
        self.conv_in = Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, cfg.dropout)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in, cfg.dropout)
        up = []
        for level in reversed(range(len(cfg.ch_mult))):
            stage = nn.Module()
            block_out = cfg.ch * cfg.ch_mult[level]
            stage.block = nn.ModuleList()
            stage.attn = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                stage.block.append(ResnetBlock(block_in, block_out, cfg.dropout))
                block_in = block_out
                if res in cfg.attn_resolutions:
                    stage.attn.append(AttnBlock(block_in))
            if level != 0:
                stage.upsample = Upsample(block_in)
                res *= 2
            up.insert(0, stage)
        self.up = nn.ModuleList(up)
        self.norm_out = normalize(block_in)
        self.conv_out = Conv2d(block_in, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for stage in reversed(self.up):
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn):
                    h = stage.attn[i](h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(norm_swish(self.norm_out, h))

    @property
    def last_layer(self) -> nn.Conv2d:
        """The layer at which the adaptive GAN weight is measured."""
        return self.conv_out


__all__ = ["Decoder", "Encoder"]
