"""The ViT-VQGAN encoder and decoder (encoder/decoder kind `vit`).

Yu et al., "Vector-quantized Image Modeling with Improved VQGAN" (ICLR 2022, arXiv 2110.04627), sec. 3.1: the
encoder maps non-overlapping 8x8 patches to tokens and runs Transformer blocks over them (a 256 px image -> 32x32
tokens); the decoder does the inverse, each token back to an 8x8 patch, regrouped into the image. "At the output
of transformer blocks, we apply a two-layer feed-forward network with a tanh activation layer in the middle. No
activation is applied at the output of ViT-VQGAN encoder or decoder."

Here each part is: patch embedding (a conv with stride = kernel = patch_size, i.e. a linear map of each flattened
patch) or a linear embedding of each latent -> + fixed 2-D sin-cos positions (nn/vit.py says why) -> `depth`
pre-norm blocks (GELU MLPs) -> LayerNorm -> the output head, Linear(width, width * mlp_ratio) -> tanh -> Linear.
The encoder's head ends at z_channels, laid out as the (B, z_channels, H/p, W/p) grid VQModel's quant_conv reads;
the decoder's head ends at patch_size^2 * out_ch values per token (its `last_layer`, for the adaptive GAN weight),
unpatchified into (B, out_ch, H, W). Choices where the paper is silent: the MLP activation inside the blocks
(GELU, as ViT), the width of the tanh head (the blocks' MLP width), and that the decoder's final linear is the
second layer of that head rather than one more layer. The factorized, l2-normalised code lookup of sec. 3.2 is
the `vq` quantizer's `codebook_dim` / `l2_norm`; the StyleGAN discriminator is `loss.disc_kind: stylegan`.

Sizes (the paper's Table 1): Small 8 blocks, width 512, 8 heads, MLP 2048; Base 12 blocks, 768, 12 heads, 3072
(configs/vit-vqgan-small.yaml, vit-vqgan-base.yaml).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import DecoderConfig, EncoderConfig, VQGANConfig
from ..errors import UserError
from ..nn.vit import Mlp, Transformer, grid_to_tokens, init_vit_weights, tokens_to_grid, unpatchify
from ..registry import DECODERS, ENCODERS


@dataclass
class ViTShape:
    """The settings of one ViT part; encoder and decoder sections each carry their own. Mixed in before the
    section base, so `validate` adds its checks to the base's."""

    patch_size: int = 8  # pixels per token side: the grid factor
    width: int = 512  # token width
    depth: int = 8  # transformer blocks
    heads: int = 8
    mlp_ratio: float = 4.0  # MLP width / token width (in the blocks and in the tanh output head)

    @property
    def hidden(self) -> int:
        return int(self.width * self.mlp_ratio)

    def validate(self, model: VQGANConfig, where: str) -> None:
        super().validate(model, where)  # type: ignore[misc]  # the section's own checks (its kind)
        for name in ("patch_size", "width", "depth", "heads"):
            if getattr(self, name) < 1:
                raise UserError(f"{where}.{name} must be >= 1, got {getattr(self, name)}")
        if self.width % self.heads:
            raise UserError(f"{where}.width {self.width} is not divisible by {where}.heads {self.heads}; "
                            f"e.g. {where}.heads={_a_divisor(self.width, self.heads)}")
        if self.width % 4:  # the sin-cos position embedding spends a quarter of the width on each sin/cos axis
            raise UserError(f"{where}.width must be a multiple of 4 (the 2-D sin-cos positions), got {self.width}")
        if self.hidden < 1:
            raise UserError(f"{where}.mlp_ratio must be > 0, got {self.mlp_ratio}")

    def factor_fix(self, factor: int) -> str:
        return f"set {self.factor_key}={factor}"  # type: ignore[attr-defined]


def _a_divisor(width: int, near: int) -> int:
    return min((d for d in range(1, width + 1) if width % d == 0), key=lambda d: (abs(d - near), d))


@dataclass
class ViTEncoderConfig(ViTShape, EncoderConfig):
    """`model.encoder` with `kind: vit`."""

    kind: str = "vit"
    factor_key = "model.encoder.patch_size"

    def downsample_factor(self, model: VQGANConfig) -> int:
        return self.patch_size


@dataclass
class ViTDecoderConfig(ViTShape, DecoderConfig):
    """`model.decoder` with `kind: vit`; its patch_size must be the encoder's grid factor."""

    kind: str = "vit"
    factor_key = "model.decoder.patch_size"

    def upsample_factor(self, model: VQGANConfig) -> int:
        return self.patch_size


@ENCODERS.register("vit", config=ViTEncoderConfig)
class ViTEncoder(nn.Module):
    """Image (B, in_channels, H, W) -> latent (B, z_channels, H/p, W/p); H and W multiples of p."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        e: ViTEncoderConfig = cfg.encoder  # type: ignore[assignment]
        self.patch_size = e.patch_size
        self.patch_embed = nn.Conv2d(cfg.in_channels, e.width, e.patch_size, stride=e.patch_size)
        self.transformer = Transformer(e.width, e.depth, e.heads, e.hidden)
        self.head = Mlp(e.width, e.hidden, cfg.z_channels, act=nn.Tanh)
        self.apply(init_vit_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.patch_embed(x)  # (B, width, H/p, W/p)
        grid = h.shape[-2:]
        tokens = self.transformer(grid_to_tokens(h), grid)  # (B, h*w, width)
        return tokens_to_grid(self.head(tokens), *grid)  # (B, z_channels, h, w)


@DECODERS.register("vit", config=ViTDecoderConfig)
class ViTDecoder(nn.Module):
    """Latent (B, z_channels, h, w) -> image (B, out_ch, h*p, w*p)."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        d: ViTDecoderConfig = cfg.decoder  # type: ignore[assignment]
        self.patch_size = d.patch_size
        self.embed = nn.Linear(cfg.z_channels, d.width)
        self.transformer = Transformer(d.width, d.depth, d.heads, d.hidden)
        self.head = Mlp(d.width, d.hidden, cfg.out_ch * d.patch_size ** 2, act=nn.Tanh)
        self.apply(init_vit_weights)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        grid = z.shape[-2:]
        tokens = self.transformer(self.embed(grid_to_tokens(z)), grid)  # (B, h*w, width)
        return unpatchify(self.head(tokens), *grid, self.patch_size)  # (B, out_ch, h*p, w*p)

    @property
    def last_layer(self) -> nn.Linear:
        """The layer at which the adaptive GAN weight is measured: the linear map to each token's pixels."""
        return self.head.fc2


__all__ = ["ViTDecoder", "ViTDecoderConfig", "ViTEncoder", "ViTEncoderConfig"]
