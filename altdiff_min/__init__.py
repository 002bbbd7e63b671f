"""altdiff-min: AltDiffusion-m9 (multilingual Stable Diffusion) in plain PyTorch."""
from .attention import attention, attention_backend
from .pipeline import AltDiffusion, load
from .samplers import SAMPLERS
from .schedule import ScheduleConfig, Timesteps, timesteps
from .text_encoder import TextEncoder, TextEncoderConfig
from .tokenizer import Tokenizer
from .unet import UNet, UNetConfig
from .vae import VAE, VAEConfig

__all__ = ["AltDiffusion", "load", "Tokenizer", "TextEncoder", "TextEncoderConfig", "UNet", "UNetConfig", "VAE",
           "VAEConfig", "ScheduleConfig", "SAMPLERS", "Timesteps", "timesteps", "attention", "attention_backend"]
