"""The tokenizer side: a continuous latent grid per level of codes, snapped to the codebook, then decoded.

The latent z is what the tokenizer's quantizer reads (after `quant_conv`): optimising it and snapping it with
the quantizer's own straight-through forward (vq, ema, factorized / l2 codes, residual, FSQ, LFQ) gives images
the decoder knows, with gradients to every position. Gumbel / dVAE codes are chosen by logits: there the logits
are steered (a straight-through softmax over the codes). After each optimiser step z is clamped to the range of
the code vectors per channel, as the well-known notebook does, so it never drifts where no code lies.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..quantizers import (
    FiniteScalarQuantizer,
    GumbelQuantizer,
    LookupFreeQuantizer,
    Quantizer,
    ResidualQuantizer,
    VectorQuantizer,
)
from ..tokenizers.model import VQModel
from ..tokenizers.vqvae2 import VQVAE2

STEERABLE = (VectorQuantizer, ResidualQuantizer, FiniteScalarQuantizer, LookupFreeQuantizer, GumbelQuantizer)


class LevelSteer:
    """One level's quantizer as the optimiser sees it: snap, clamp, noise."""

    def __init__(self, quantizer: Quantizer, width: int):
        if not isinstance(quantizer, STEERABLE):
            raise UserError(f"quantizer kind {getattr(quantizer.config, 'kind', type(quantizer).__name__)!r} cannot "
                            "be steered by vqgan imagine (it steers vq, ema, residual, fsq, lfq and gumbel codes)")
        self.quantizer, self.width = quantizer, width
        self.range = self._code_range()  # (lo, hi) per channel, each (1, C, 1, 1); None: not clamped

    def _code_range(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        q = self.quantizer
        with torch.no_grad():
            if isinstance(q, ResidualQuantizer):  # z ~ a sum of one code per depth: the sum of the ranges
                ranges = [_codes_range(q.book(d)) for d in range(q.config.depth)]
                return sum(r[0] for r in ranges), sum(r[1] for r in ranges)
            if isinstance(q, VectorQuantizer) and not q.config.l2_norm:  # on the sphere, |z| does not matter
                return _codes_range(q)
            if isinstance(q, LookupFreeQuantizer):  # only the signs matter; beyond +-scale is wasted travel
                s = q.scale  # codebook_scale, over sqrt(bits) when spherical
                return torch.full((1, self.width, 1, 1), -s), torch.full((1, self.width, 1, 1), s)
        return None  # FSQ bounds z itself (tanh); gumbel's z are pre-logit features

    def snap(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, C, h, w) -> code vectors with z's gradient (straight-through)."""
        q = self.quantizer
        if isinstance(q, GumbelQuantizer):
            logits = q.logits(z)
            soft = logits.softmax(1)
            hard = F.one_hot(logits.argmax(1), q.n_embed).permute(0, 3, 1, 2).float()
            one_hot = hard + soft - soft.detach()
            return torch.einsum("bkhw,kd->bdhw", one_hot, q.embed.weight.float()).to(z.dtype)
        return q(z).quantized

    @torch.no_grad()
    def clamp_(self, z: torch.Tensor) -> None:
        if self.range is not None:
            lo, hi = (r.to(z.device, z.dtype) for r in self.range)
            z.copy_(torch.maximum(torch.minimum(z, hi), lo))

    @torch.no_grad()
    def noise(self, batch: int, h: int, w: int, generator: torch.Generator) -> torch.Tensor:
        """A random start: the code vectors of random tokens (a Gaussian for gumbel's pre-logit features)."""
        q = self.quantizer
        if isinstance(q, GumbelQuantizer):
            return torch.randn(batch, self.width, h, w, generator=generator)
        tokens = torch.stack([torch.randint(0, v, (batch, h, w), generator=generator) for v in q.vocab_per_depth], -1)
        return q.decode_indices(tokens.to(_device_of(q))).float().cpu()


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.buffers(), next(module.parameters(), torch.empty(0))).device


def _codes_range(q: VectorQuantizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel min and max of all code vectors as the quantizer returns them, (1, C, 1, 1) each."""
    codes = q.from_lookup(q.codebook().detach().float()[None, None]).float()  # (1, C, 1, K)
    return codes.amin(dim=(0, 2, 3)).view(1, -1, 1, 1).cpu(), codes.amax(dim=(0, 2, 3)).view(1, -1, 1, 1).cpu()


class Steerable:
    """A tokenizer as the optimiser sees it: one latent grid per level (factor and width), `encode` an image to
    those latents, `decode` snapped latents to an image in [-1, 1] (roughly; not clamped)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model.eval().requires_grad_(False)
        config = getattr(model, "config", None)
        if getattr(config, "input_kind", "rgb") != "rgb" or getattr(config, "out_ch", 3) != 3:
            raise UserError("vqgan imagine steers RGB image tokenizers; this one codes "
                            f"{getattr(config, 'input_kind', '?')} maps, which CLIP cannot judge")
        if isinstance(model, VQModel):
            self.levels = [LevelSteer(model.quantize, model.quant_conv.out_channels)]
            self.factors = [model.downsample_factor]
        elif isinstance(model, VQVAE2):  # top (1/8) then bottom (1/4), as the code spec lists them
            self.levels = [LevelSteer(model.quantize_top, model.quant_conv_top.out_channels),
                           LevelSteer(model.quantize_bottom, model.quant_conv_bottom.out_channels)]
            self.factors = [8, 4]
        else:
            what = " (a transformer prior: pass the tokenizer whose tokens it models)" if hasattr(model, "blocks") \
                else ""
            raise UserError(f"vqgan imagine steers image tokenizers (kinds vqgan, vqvae2), not a "
                            f"{type(model).__name__}{what}")

    @property
    def factor(self) -> int:
        """Output sides must be multiples of this (the coarsest level's factor)."""
        return max(self.factors)

    def check_size(self, width: int, height: int) -> None:
        f = self.factor
        if width < f or height < f or width % f or height % f:
            fix = f"{max(f, round(width / f) * f)} {max(f, round(height / f) * f)}"
            raise UserError(f"--size {width} {height}: both sides must be multiples of the tokenizer's factor {f}, "
                            f"e.g. --size {fix}")
        config = getattr(self.model, "config", None)
        decoder = getattr(getattr(config, "decoder", None), "kind", "")
        if decoder == "vit" and (width, height) != (config.resolution, config.resolution):
            raise UserError(f"--size {width} {height}: this tokenizer's ViT decoder was trained at "
                            f"{config.resolution}x{config.resolution} and is only used at that grid; use --size "
                            f"{config.resolution} {config.resolution}")

    def noise(self, width: int, height: int, generator: torch.Generator) -> list[torch.Tensor]:
        return [lvl.noise(1, height // f, width // f, generator) for lvl, f in zip(self.levels, self.factors)]

    def encode(self, image: torch.Tensor) -> list[torch.Tensor]:
        """Images (1, 3, H, W) in [-1, 1] -> the continuous latents of each level (before snapping)."""
        m = self.model
        with torch.no_grad():
            if isinstance(m, VQVAE2):
                features = m.encoder_bottom(image)
                h_top = m.top_prequant(features)
                h_bottom = m.bottom_prequant(features, self.levels[0].snap(h_top))
                return [h_top, h_bottom]
            return [m.encode_to_prequant(image)]

    def snap(self, latents: list[torch.Tensor]) -> list[torch.Tensor]:
        return [lvl.snap(z) for lvl, z in zip(self.levels, latents)]

    def decode(self, quantized: list[torch.Tensor]) -> torch.Tensor:
        return self.model.decode_latents(*quantized)

    def clamp_(self, latents: list[torch.Tensor]) -> None:
        for lvl, z in zip(self.levels, latents):
            lvl.clamp_(z)
