"""Gumbel-softmax quantizer (as in DALL-E's dVAE and taming's GumbelVQ).

A 1x1 conv turns each latent into logits over the codebook. Training samples a relaxed one-hot with
Gumbel noise (temperature `temperature`, straight-through hard samples when `straight_through`), and a
KL term pulls the code distribution towards uniform. In eval mode the token is the argmax of the logits:
deterministic, unlike taming's GumbelVQ, which adds Gumbel noise even in eval (`noise_in_eval` reproduces
that quirk, drawing the noise with the same torch calls).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import QuantizerConfig
from ..errors import UserError
from ..registry import QUANTIZERS
from .base import Quantizer, QuantizerOutput, codebook_stats


@dataclass
class GumbelConfig(QuantizerConfig):
    """`kind: gumbel`: logits over `n_embed` codes of width `embed_dim`, relaxed with Gumbel noise in training."""

    kind: str = "gumbel"
    n_embed: int = 1024
    temperature: float = 1.0
    kl_weight: float = 5e-4
    straight_through: bool = True
    noise_in_eval: bool = False  # taming quirk: its GumbelVQ samples noise even in eval (off: argmax tokens)

    @property
    def vocab_per_depth(self) -> tuple[int, ...]:
        return (self.n_embed,)

    def validate(self, where: str = "model.quantizer") -> None:
        super().validate(where)
        if self.n_embed < 2:
            raise UserError(f"{where}.n_embed must be >= 2, got {self.n_embed}")
        if not self.temperature > 0:
            raise UserError(f"{where}.temperature must be > 0, got {self.temperature}")


@QUANTIZERS.register("gumbel", config=GumbelConfig)
class GumbelQuantizer(Quantizer):
    def __init__(self, config: GumbelConfig, in_channels: int):
        super().__init__()
        self.config = config
        self.n_embed = config.n_embed
        self.temperature = config.temperature
        self.proj = nn.Conv2d(in_channels, config.n_embed, 1)  # latent -> logits over the codes
        self.embed = nn.Embedding(config.n_embed, config.embed_dim)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        logits = self.proj(z).float()  # (B, K, h, w)
        if self.training or self.config.noise_in_eval:
            hard = self.config.straight_through if self.training else True
            one_hot = F.gumbel_softmax(logits, tau=self.temperature, dim=1, hard=hard)
        else:
            one_hot = F.one_hot(logits.argmax(1), self.n_embed).permute(0, 3, 1, 2).float()
        quantized = torch.einsum("bkhw,kd->bdhw", one_hot, self.embed.weight.float()).to(z.dtype)
        q = F.softmax(logits, dim=1)
        kl = self.config.kl_weight * (q * torch.log(q * self.n_embed + 1e-10)).sum(1).mean()
        indices = one_hot.argmax(1).unsqueeze(-1)  # (B, h, w, 1)
        return QuantizerOutput(quantized, indices, kl, codebook_stats(indices, self.n_embed))

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        return self.embed(self.check_indices(indices)[..., 0]).permute(0, 3, 1, 2).contiguous()


def gumbel_temperature(step: int, start: float = 1.0, end: float = 1.0 / 16, anneal_steps: int = 0) -> float:
    """Exponential annealing from `start` to `end` over `anneal_steps` (constant when 0)."""
    if anneal_steps <= 0:
        return start
    t = min(1.0, step / anneal_steps)
    return start * math.exp(t * math.log(end / start))
