"""Backward-compatible names for sampling; it lives in vqgan.priors (pick, sampling)."""
from .priors.pick import filter_logits, pick
from .priors.sampling import sample

__all__ = ["filter_logits", "pick", "sample"]
