"""Training objective of the VQGAN tokenizer: LPIPS, PatchGAN discriminator, adaptive GAN weight."""
from .discriminator import ActNorm, NLayerDiscriminator
from .lpips import LPIPS, PerceptualWeightsMissing, build_lpips
from .objective import VQGANLoss

__all__ = ["ActNorm", "LPIPS", "NLayerDiscriminator", "PerceptualWeightsMissing", "VQGANLoss", "build_lpips"]
