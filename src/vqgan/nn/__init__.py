"""Neural-network building blocks shared by the models."""
from .blocks import AttnBlock, Downsample, ResnetBlock, Upsample, norm_swish, normalize, swish
from .conv import Conv2d, dalle_init

__all__ = ["AttnBlock", "Conv2d", "Downsample", "ResnetBlock", "Upsample", "dalle_init", "norm_swish", "normalize", "swish"]
