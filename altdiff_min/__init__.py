"""altdiff-min: AltDiffusion-m9 (multilingual Stable Diffusion) in plain PyTorch."""
from .attention import attention, attention_backend
from .pipeline import AltDiffusion, load
from .samplers import SAMPLERS
from .schedule import ScheduleConfig, Timesteps, timesteps
from .text_encoder import TextEncoder, TextEncoderConfig
from .tokenizer import Tokenizer
from .unet import UNet, UNetConfig
from .vae import VAE, VAEConfig

__all__ = ["AltDiffusion", "load", "load_clip", "Tokenizer", "TextEncoder", "TextEncoderConfig", "UNet", "UNetConfig", "VAE",
           "VAEConfig", "ScheduleConfig", "SAMPLERS", "Timesteps", "timesteps", "attention", "attention_backend"]


def __getattr__(name: str):
    """load_clip (score.py) on first use: the CLIP score's modules are not imported with the package."""
    if name == "load_clip":
        from .score import load_clip

        return load_clip
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
