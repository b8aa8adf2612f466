"""The VQGAN autoencoder: convolutional encoder, vector quantizer, convolutional decoder.

Esser, Rombach & Ommer, "Taming Transformers for High-Resolution Image Synthesis" (CVPR 2021), sec. 3.1.
Module names match the released code (`down[i].block[j]`, `mid.attn_1`, `quant_conv`, ...), so its
checkpoints convert by key copy.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import QuantizerConfig, VQGANConfig, from_dict
from .nn import AttnBlock, Conv2d, Downsample, ResnetBlock, Upsample, norm_swish, normalize
from .quantizers import QuantizerOutput, build_quantizer


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


class VQModel(nn.Module):
    """VQGAN tokenizer. Images are NCHW in [-1, 1]; tokens are (B, h, w) int64.

    >>> tokens = model.encode(images)          # (B, h, w)
    >>> images = model.decode(tokens)          # (B, 3, H, W)
    >>> rec, codebook_loss, info = model(images)
    """

    def __init__(self, config: VQGANConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        qc = config.quantizer
        self.quant_conv = nn.Conv2d(config.z_channels, qc.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(qc.embed_dim, config.z_channels, 1)
        self.quantize = build_quantizer(qc, qc.embed_dim)

    # -- the pieces ------------------------------------------------------------------------------
    def encode_to_prequant(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> continuous latents before quantization, (B, embed_dim, h, w)."""
        return self.quant_conv(self.encoder(x))

    def quantize_latents(self, h: torch.Tensor) -> QuantizerOutput:
        return self.quantize(h)

    def decode_latents(self, quantized: torch.Tensor) -> torch.Tensor:
        """Code vectors (B, embed_dim, h, w) -> images."""
        return self.decoder(self.post_quant_conv(quantized))

    # -- the public API --------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] -> tokens (B, H/f, W/f) int64."""
        return self.quantize(self.encode_to_prequant(_inference_layout(images))).indices

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens (B, h, w) -> images (B, out_ch, h*f, w*f), roughly in [-1, 1] (not clamped)."""
        if tokens.dim() != 3:
            raise ValueError(f"tokens must be (B, h, w), got shape {tuple(tokens.shape)}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.quantize.n_embed):
            raise ValueError(f"token indices must lie in [0, {self.quantize.n_embed}), got range "
                             f"[{int(tokens.min())}, {int(tokens.max())}]")
        images = self.decode_latents(_inference_layout(self.quantize.decode_indices(tokens)))
        return images.contiguous()

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """Images -> (reconstruction, codebook loss, info with `indices`, `prequant` and stats)."""
        h = self.encode_to_prequant(images)
        q = self.quantize(h)
        rec = self.decode_latents(q.quantized)
        return rec, q.loss, {"indices": q.indices, "prequant": h, **q.stats}

    # -- files -----------------------------------------------------------------------------------
    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    def config_dict(self) -> dict[str, Any]:
        return {"kind": "vqgan", **asdict(self.config)}

    @classmethod
    def from_config_dict(cls, data: dict[str, Any]) -> "VQModel":
        data = {k: v for k, v in data.items() if k != "kind"}
        return cls(from_dict(VQGANConfig, data, "model"))

    def save_pretrained(self, directory: str | Path) -> None:
        from .checkpoint import save_model

        save_model(self, directory)

    @classmethod
    def from_pretrained(cls, path: str | Path, map_location: str | torch.device = "cpu") -> "VQModel":
        from .checkpoint import load_model

        model = load_model(path, map_location=map_location)
        if not isinstance(model, cls):
            raise TypeError(f"{path} holds a {type(model).__name__}, not a {cls.__name__}")
        return model


def _inference_layout(x: torch.Tensor) -> torch.Tensor:
    """Channels-last activations on CPU: oneDNN's forward convolutions run faster in that layout (its
    backward does not, so training keeps the default layout)."""
    return x.contiguous(memory_format=torch.channels_last) if x.device.type == "cpu" else x


__all__ = ["Decoder", "Encoder", "QuantizerConfig", "VQGANConfig", "VQModel"]
