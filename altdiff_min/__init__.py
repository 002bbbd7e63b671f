"""altdiff-min: AltDiffusion-m9 (multilingual Stable Diffusion) in plain PyTorch."""
from .attention import attention, attention_backend
from .text_encoder import TextEncoder, TextEncoderConfig
from .tokenizer import Tokenizer

__all__ = ["Tokenizer", "TextEncoder", "TextEncoderConfig", "attention", "attention_backend"]
