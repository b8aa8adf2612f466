"""Backward-compatible names for the GPT prior; it lives in vqgan.priors (gpt, kv_cache, linear)."""
from .priors.gpt import GPT, Block, CausalSelfAttention, GPTConfig
from .priors.kv_cache import KVCache
from .priors.linear import Linear, linear

__all__ = ["GPT", "Block", "CausalSelfAttention", "GPTConfig", "KVCache", "Linear", "linear"]
