"""Backward-compatible names for the prior; it lives in vqgan.priors (layout, sampling, bundle, load)."""
from .priors.bundle import Prior
from .priors.layout import TokenLayout
from .priors.load import load_prior
from .priors.sampling import sample_images_tokens

__all__ = ["Prior", "TokenLayout", "load_prior", "sample_images_tokens"]
