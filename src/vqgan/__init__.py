"""vqgan: VQGAN ("Taming Transformers") image tokenizers and the models around them."""
from .checkpoint import load_model as load
from .config import LossConfig, QuantizerConfig, TokenizerTrainConfig, VQGANConfig, load_config, quantizer_config
from .errors import UserError
from .tokenizers import Decoder, Encoder, VQModel

__version__ = "0.1.0"
__all__ = ["Decoder", "Encoder", "LossConfig", "QuantizerConfig", "TokenizerTrainConfig", "UserError", "VQGANConfig",
           "VQModel", "load", "load_config", "quantizer_config"]
