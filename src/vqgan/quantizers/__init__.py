"""Quantizers. Each honours one contract (see `base.py`)."""
from .base import Quantizer, QuantizerOutput, codebook_stats
from .vq import VectorQuantizer, nearest_code

__all__ = ["Quantizer", "QuantizerOutput", "VectorQuantizer", "codebook_stats", "nearest_code"]
