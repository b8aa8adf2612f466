"""Tokenizers: encoders and decoders by kind, composed with a quantizer into `VQModel`. Importing a part's
file here is its registry line."""
from . import dvae, vqvae  # noqa: F401  (encoder / decoder kinds `dvae`, `vqvae`)
from .conv import Decoder, Encoder
from .model import Tokenizer, VQModel
from .vit import ViTDecoder, ViTEncoder
from .vqvae2 import VQVAE2, VQVAE2Config

__all__ = ["VQVAE2", "Decoder", "Encoder", "Tokenizer", "VQModel", "VQVAE2Config", "ViTDecoder", "ViTEncoder"]
