"""Converters from other implementations' checkpoints."""
from .taming import convert, load_taming_vqgan

__all__ = ["convert", "load_taming_vqgan"]
