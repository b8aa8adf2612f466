"""Where the VQGAN lived before the family layout; `from vqgan.autoencoder import VQModel` keeps working."""
from .config import QuantizerConfig, VQGANConfig, quantizer_config
from .tokenizers import Decoder, Encoder, VQModel

__all__ = ["Decoder", "Encoder", "QuantizerConfig", "VQGANConfig", "VQModel", "quantizer_config"]
