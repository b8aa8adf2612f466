"""The stage-2 prior: a GPT over token sequences, its token layout, and the one sampling loop.

Re-exports only the model and sampling pieces. The bundle that loads a prior with its tokenizers from disk
(`load.load_prior`, `bundle.Prior`) is imported from its modules: it reaches up into checkpoints and
conversion, which themselves build GPTs from here.
"""
from .gpt import GPT, GPTConfig
from .guidance import Guidance
from .kv_cache import KVCache
from .layout import TokenLayout
from .pick import filter_logits, pick
from .sampling import sample, sample_grid, sample_images_tokens, sample_tokens
from .windows import SlidingWindow, WholeSequence, Window, window_origin

__all__ = ["GPT", "GPTConfig", "Guidance", "KVCache", "SlidingWindow", "TokenLayout", "WholeSequence", "Window",
           "filter_logits", "pick", "sample", "sample_grid", "sample_images_tokens", "sample_tokens",
           "window_origin"]
