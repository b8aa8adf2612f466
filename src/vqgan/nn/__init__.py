"""Neural-network building blocks shared by the models."""
from .conv import Conv2d
from .blocks import AttnBlock, Downsample, ResnetBlock, Upsample, norm_swish, normalize, swish

__all__ = ["AttnBlock", "Conv2d", "Downsample", "ResnetBlock", "Upsample", "norm_swish", "normalize", "swish"]
