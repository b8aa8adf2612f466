"""Neural-network building blocks shared by the models."""
from .blocks import AttnBlock, Downsample, ResnetBlock, Upsample, norm_swish, normalize, swish

__all__ = ["AttnBlock", "Downsample", "ResnetBlock", "Upsample", "norm_swish", "normalize", "swish"]
