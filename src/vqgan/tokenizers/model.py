"""The tokenizer: an encoder, a quantizer and a decoder, each chosen by kind from its registry.

The conv VQGAN (Esser et al. 2021) is the default composition. Attribute names (`encoder`, `quant_conv`,
`quantize`, `post_quant_conv`, `decoder`) match the released code, so taming checkpoints convert by key copy.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import load_model, save_model
from ..codes import CodeSpec
from ..config import VQGANConfig, from_dict
from ..losses.likelihood import logit_laplace_image
from ..quantizers import Quantizer, QuantizerOutput, build_quantizer
from ..quantizers.grid_start import start_on_grid
from ..registry import DECODERS, ENCODERS, MODELS, TOKENIZERS


class Tokenizer(nn.Module):
    """What every tokenizer kind shares (model.kind: vqgan, vqvae2): its config's grid factor and code spec, and
    its files (safetensors + config.yaml, loaded through the registry of model kinds)."""

    config: Any

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    @property
    def code_spec(self) -> CodeSpec:
        return self.config.code_spec

    def networks(self) -> list[nn.Module]:
        """The encoder and decoder networks, what `train.compile` hands to torch.compile: every child with
        layers of its own except the quantizer, whose code statistics branch on data and stay eager."""
        return [m for m in self.children() if m is not self.quantize and next(m.children(), None) is not None]

    def save_pretrained(self, directory: str | Path) -> None:
        save_model(self, directory)

    @classmethod
    def from_pretrained(cls, path: str | Path, map_location: str | torch.device = "cpu") -> Tokenizer:
        model = load_model(path, map_location=map_location)
        if not isinstance(model, cls):
            raise TypeError(f"{path} holds a {type(model).__name__}, not a {cls.__name__}")
        return model


class VQModel(Tokenizer):
    """VQGAN tokenizer. Images are NCHW in [-1, 1]; tokens are (B, h, w, depth) int64 (depth 1 for VQ).

    >>> tokens = model.encode(images)          # (B, h, w, depth)
    >>> images = model.decode(tokens)          # (B, 3, H, W)
    >>> rec, codebook_loss, info = model(images)
    >>> model.code_spec                        # the grid factor and the vocabulary of each depth (codes.py)

    With `decoder_output: logit_laplace` the decoder (any kind: it is built with twice `out_ch`) predicts
    DALL-E's location and log-scale per sub-pixel; `forward` hands that raw output to the loss
    (`info["decoder_output"]`) and every path, `forward`'s reconstruction included, gets the image made from the
    location (losses/likelihood.py). A per-pixel scale rather than one learnt per channel: it is what DALL-E's
    decoder predicts (Ramesh et al. 2021, A.3), and it keeps the likelihood a function of the decoder's output
    alone, so the loss, its adaptive weight and the GAN step need no parameter outside the model.
    """

    def __init__(self, config: VQGANConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.encoder = ENCODERS.build(config.encoder.kind, config)
        stats = config.decoder_output == "logit_laplace"
        self.decoder = DECODERS.build(config.decoder.kind,
                                      replace(config, out_ch=2 * config.out_ch) if stats else config)
        width = config.quantizer.code_width
        self.quant_conv = nn.Conv2d(config.z_channels, width, 1)
        self.post_quant_conv = nn.Conv2d(width, config.z_channels, 1)
        self.quantize = build_quantizer(config.quantizer, width)

    # -- the pieces ------------------------------------------------------------------------------
    def encode_to_prequant(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> continuous latents before quantization, (B, code_width, h, w)."""
        return self.quant_conv(self.encoder(x))

    def quantize_latents(self, h: torch.Tensor) -> QuantizerOutput:
        return self.quantize(h)

    def decode_raw(self, quantized: torch.Tensor) -> torch.Tensor:
        """Code vectors (B, code_width, h, w) -> the decoder's raw output: images, or (location, log-scale)."""
        return self.decoder(self.post_quant_conv(quantized))

    def image_of(self, output: torch.Tensor) -> torch.Tensor:
        """The decoder's raw output -> images (B, out_ch, H, W)."""
        if self.config.decoder_output == "logit_laplace":
            return logit_laplace_image(output[:, :self.config.out_ch])
        return output

    def decode_latents(self, quantized: torch.Tensor) -> torch.Tensor:
        """Code vectors (B, code_width, h, w) -> images."""
        return self.image_of(self.decode_raw(quantized))

    @torch.no_grad()
    def initialize_codebook(self, batches: Callable[[], Iterable[torch.Tensor]]) -> str:
        """Data-dependent initialisation (the trainer's, before the first step; under its autocast): the codes
        start as random encoder outputs of the images that `batches()` yields; a grid quantizer's latent that
        starts inside one cell is centred onto the grid (grid_start.py). Returns what was done, for the log."""
        rows = torch.cat([latent_rows(self.quant_conv, self.encoder(x)) for x in batches()])
        with torch.autocast(rows.device.type, enabled=False):
            return initialize_quantizer(self.quantize, self.quant_conv, rows)

    # -- the public API --------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] -> tokens (B, H/f, W/f, depth) int64."""
        return self.quantize.indices_of(self.encode_to_prequant(inference_layout(images)))

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens (B, h, w, depth) -> images (B, out_ch, h*f, w*f), roughly in [-1, 1] (not clamped)."""
        if tokens.dim() != 4:
            raise ValueError(f"tokens must be (B, h, w, {self.quantize.depth}), got shape {tuple(tokens.shape)}")
        self.code_spec.check_range(tokens)
        images = self.decode_latents(inference_layout(self.quantize.decode_indices(tokens)))
        return images.contiguous()

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """Images -> (reconstruction, codebook loss, info with `indices`, `codes` (the codebook rows, for upkeep),
        `prequant`, stats, and `decoder_output` where the decoder predicts more than the image)."""
        h = self.encode_to_prequant(images)
        q = self.quantize(h)
        output = self.decode_raw(q.quantized)
        rec = self.image_of(output)
        extra = {"decoder_output": output} if rec is not output else {}
        return rec, q.loss, {"indices": q.indices, "codes": q.codes, "prequant": h, **q.stats, **extra}

    # -- files -----------------------------------------------------------------------------------
    def config_dict(self) -> dict[str, Any]:
        """The config as saved (config.yaml), with the code spec it implies (`codes`, for readers that do not
        build the model; ignored when loading)."""
        return {"kind": "vqgan", **asdict(self.config), "codes": self.code_spec.to_dict()}

    @classmethod
    def from_config_dict(cls, data: dict[str, Any]) -> VQModel:
        data = {k: v for k, v in data.items() if k not in ("kind", "codes")}
        return cls(from_dict(VQGANConfig, data, "model"))


def latent_rows(layer: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """`layer` (the 1x1 conv before a quantizer) on `features` in float32 even under autocast, as rows (N, C): the
    statistics of a latent that spreads over less than one bf16 step of its offset survive."""
    with torch.autocast(features.device.type, enabled=False):
        h = layer(features.float())
    return h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])


def initialize_quantizer(quantizer: Quantizer, layer: nn.Module, rows: torch.Tensor) -> str:
    """Data initialisation of one quantizer from `rows` (N, C), the outputs of `layer`: its codebook from them, or for
    a grid kind the check of where the latent starts (grid_start.py). Returns what was done, for the log."""
    quantizer.initialize_from(rows)  # a grid kind has no codebook: this marks its upkeep initialised
    return start_on_grid(quantizer, layer, rows) or f"codebook initialised from {rows.shape[0]} encoder outputs"


def inference_layout(x: torch.Tensor) -> torch.Tensor:
    """Channels-last activations on CPU: oneDNN's forward convolutions run faster in that layout (its
    backward does not, so training keeps the default layout)."""
    return x.contiguous(memory_format=torch.channels_last) if x.device.type == "cpu" else x


MODELS.register("vqgan")(VQModel.from_config_dict)
TOKENIZERS.register("vqgan", config=VQGANConfig)(VQModel)

__all__ = ["Tokenizer", "VQModel"]
