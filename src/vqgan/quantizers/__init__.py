"""Quantizers. Each honours one contract (see `base.py`)."""
from .base import Quantizer, QuantizerOutput, codebook_stats
from .gumbel import GumbelQuantizer
from .vq import VectorQuantizer, nearest_code

__all__ = ["GumbelQuantizer", "Quantizer", "QuantizerOutput", "VectorQuantizer", "build_quantizer", "codebook_stats",
           "nearest_code"]


def build_quantizer(config, latent_channels: int) -> Quantizer:
    """The quantizer named by `config.kind`; `latent_channels` is the width of what it quantizes."""
    if config.kind == "gumbel":
        return GumbelQuantizer(config, latent_channels)
    return VectorQuantizer(config)
