"""Quantizers. Each honours one contract (see `base.py`) and registers its kind in its own file; importing it
here is its registry line."""
from ..registry import QUANTIZERS
from .base import Quantizer, QuantizerOutput, codebook_stats
from .codebook import CodebookUpkeep
from .ema import EMAConfig, EMAVectorQuantizer
from .fsq import FiniteScalarQuantizer, FSQConfig
from .gumbel import GumbelConfig, GumbelQuantizer
from .lfq import LFQConfig, LookupFreeQuantizer
from .residual import ResidualConfig, ResidualQuantizer
from .vq import VectorQuantizer, VQConfig, nearest_code

__all__ = ["CodebookUpkeep", "EMAConfig", "EMAVectorQuantizer", "FSQConfig", "FiniteScalarQuantizer", "GumbelConfig",
           "GumbelQuantizer", "LFQConfig", "LookupFreeQuantizer", "Quantizer", "QuantizerOutput", "ResidualConfig",
           "ResidualQuantizer", "VQConfig", "VectorQuantizer", "build_quantizer", "codebook_stats", "nearest_code"]


def build_quantizer(config, latent_channels: int) -> Quantizer:
    """The quantizer named by `config.kind`; `latent_channels` is the width of what it quantizes. An unknown
    kind is a one-line error listing the registered ones."""
    return QUANTIZERS.build(config.kind, config, latent_channels)
