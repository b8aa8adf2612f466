"""Tokenizers: encoders and decoders by kind, composed with a quantizer into `VQModel`. Importing a part's
file here is its registry line."""
from . import dvae, vqvae  # noqa: F401  (encoder / decoder kinds `dvae`, `vqvae`)
from .conv import Decoder, Encoder
from .model import VQModel
from .vit import ViTDecoder, ViTEncoder

__all__ = ["Decoder", "Encoder", "VQModel", "ViTDecoder", "ViTEncoder"]
