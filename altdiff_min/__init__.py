"""altdiff-min: AltDiffusion-m9 (multilingual Stable Diffusion) in plain PyTorch."""
# toy and vision register themselves: "toy" as a model folder and as training data; the safety checker
# and AltCLIP as modules a model folder may hold (storage.folder, training.dataset read the registries).
from . import toy, vision  # noqa: F401
from .model.attention import attention, attention_backend
from .model.text_encoder import TextEncoder, TextEncoderConfig
from .model.tokenizer import Tokenizer
from .model.unet import UNet, UNetConfig
from .model.vae import VAE, VAEConfig
from .pipeline import AltDiffusion, load
from .sampling.samplers import SAMPLERS
from .sampling.schedule import ScheduleConfig, Timesteps, timesteps

__all__ = ["AltDiffusion", "load", "load_clip", "Tokenizer", "TextEncoder", "TextEncoderConfig", "UNet", "UNetConfig", "VAE",
           "VAEConfig", "ScheduleConfig", "SAMPLERS", "Timesteps", "timesteps", "attention", "attention_backend"]


def __getattr__(name: str):
    """load_clip (score.py) on first use: the CLIP score's modules are not imported with the package."""
    if name == "load_clip":
        from .vision.score import load_clip

        return load_clip
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
