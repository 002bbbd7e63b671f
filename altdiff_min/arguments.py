"""Every argument of a generate call, checked against what a model folder says, before any weight is
read. `AltDiffusion.generate` runs these on the loaded model's `Shape`, and `altdiff-min generate` on
the folder's config.json (`Shape.of_config`) before it loads anything: one set of checks, each a
one-line BadValue / BadType naming the argument (`names` gives the CLI's flags).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .errors import BadType, BadValue, NotFinite
from .model.tokenizer import check_prompt
from .model.unet import UNetConfig
from .model.vae import VAEConfig
from .sampling.guidance import guidance_rule
from .sampling.samplers import check_eta, get_sampler
from .sampling.schedule import ScheduleConfig, Timesteps, timesteps
from .storage import pictures


@dataclass(frozen=True)
class Limits:
    """The most one generate call takes, so that a typo (--H 100000, n_samples=10**9) is a clear error
    instead of an allocator failure. Raise them per model: load(..., limits=Limits(max_side=8192)),
    or `generate --no-limits` on the command line."""
    max_side: int = 4096  # pixels, height and width (m9 is trained at 512)
    max_batch: int = 256  # prompts × n_samples in one call
    max_pixels: int = 256 * 1024 * 1024  # prompts × n_samples × height × width: 256 pictures of 1024²


NO_LIMITS = Limits(max_side=2**31, max_batch=2**31, max_pixels=2**62)


def positive_int(name: str, value, most: int | None = None, limit: str = "") -> None:
    """Raise unless value is an int (not a bool, not 64.0) in [1, most]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadType(f"{name} must be an int, got {value!r}")
    if value < 1:
        raise BadValue(f"{name} must be at least 1, got {value}")
    if most is not None and value > most:
        raise BadValue(f"{name} = {value} is over the limit of {most} (Limits.{limit}; raise it with "
                       f"load(..., limits=Limits({limit}=...)) or --no-limits)")


def check_size(height: int, width: int, vae: VAEConfig, unet: UNetConfig) -> int:
    """Raise unless the models can make height × width images; return the pixels per latent."""
    down = 2 ** (len(vae.channels) - 1)
    multiple = down * unet.size_multiple
    if height < multiple or width < multiple or height % multiple or width % multiple:
        raise BadValue(f"height and width must be positive multiples of {multiple} for this model "
                         f"(the VAE downsamples {down}×, the UNet halves {unet.size_multiple}× more); got {height}×{width}")
    return down


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_dtype(dtype: torch.dtype | None) -> torch.dtype | None:
    """dtype as given (None: the folder's), or a BadType/BadValue naming the dtypes a model computes in."""
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise BadType(f"dtype must be torch.float32, torch.float16, torch.bfloat16 or None, got {dtype!r}")
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise BadValue(f"dtype {dtype} is not one a model computes in: torch.float32, torch.float16 or torch.bfloat16")
    return dtype


def check_device(device: str | torch.device) -> torch.device:
    """torch.device(device), or a BadValue saying why it cannot be used here."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise BadValue(f"device {device!r} is not a torch device ({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BadValue(f"device {str(device)!r}: this machine has no CUDA device (torch {torch.__version__}); use cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise BadValue(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type not in ("cpu", "cuda", "mps"):
        raise BadValue(f"device {str(device)!r}: altdiff-min runs on cpu, cuda or mps")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise BadValue("device 'mps': this machine has no MPS device")
    return device


@dataclass(frozen=True)
class Shape:
    """What the checks need of a model: its configs, the tokenizer's length, the text encoder's layers,
    its default picture side and the Limits of one call. Read from a loaded model
    (AltDiffusion.shape) or from a folder's config.json before loading (of_config)."""
    unet: UNetConfig
    vae: VAEConfig
    schedule: ScheduleConfig
    max_length: int = 77
    text_layers: int = 24
    image_size: int = 512
    limits: Limits = field(default_factory=Limits)

    @classmethod
    def of_config(cls, config: dict, limits: Limits = Limits()) -> Shape:
        """From storage.folder.read_config's dict."""
        return cls(config["unet"], config["vae"], config["schedule"], config["tokenizer"]["max_length"],
                   config["text_encoder"].layers, config.get("image_size", 512), limits)


def check_text_layer(shape: Shape, text_layer) -> None:
    """generate's text_layer: None (the last), or which text-encoder layer feeds the UNet, 0 the embeddings."""
    if text_layer is not None and (isinstance(text_layer, bool) or not isinstance(text_layer, int)
                                   or not 0 <= text_layer <= shape.text_layers):
        raise BadValue(f"text_layer must be an int in [0, {shape.text_layers}] (or None), got {text_layer!r}")


def check_picture_arguments(shape: Shape, image, strength, mask, paste_unmasked, latents, height,
                            width) -> tuple[int, int]:
    """Image to image's arguments → the (height, width) to make: the picture's, rounded down to a
    multiple the model takes, unless given (check_arguments checks them). strength against steps:
    img2img.cut; the mask's size: pictures.prepare_mask."""
    if image is None:
        what = "mask" if mask is not None else "strength" if strength is not None else "paste_unmasked"
        raise BadValue(f"{what} needs an image to start from (image=...)")
    if latents is not None:
        raise BadValue("give image or latents, not both: with an image the run starts from the noised picture")
    if not isinstance(paste_unmasked, bool):
        raise BadType(f"paste_unmasked must be True or False, got {paste_unmasked!r}")
    if paste_unmasked and mask is None:
        raise BadValue("paste_unmasked pastes back the pixels outside the mask: give a mask")
    pictures.check_picture(image)
    if height is not None and width is not None:
        return height, width
    # A side not given is the picture's, rounded down (diffusers' get_default_height_width, to 8)
    rounded_width, rounded_height = pictures.rounded_size(image, shape.vae.size_multiple * shape.unet.size_multiple)
    return (rounded_height if height is None else height, rounded_width if width is None else width)


def check_arguments(shape: Shape, prompt, negative_prompt="", n_samples=1, steps=50, sampler="ddim", scale=7.5,
                    eta=0.0, height=None, width=None, seed=None, latents=None, output="pil", prompt_embeds=None,
                    guidance=None, names: dict[str, str] | None = None) -> tuple[list[str], Timesteps, tuple[int, ...]]:
    """Every argument of generate but the pictures' (check_picture_arguments): one BadValue / BadType
    line each, naming the argument as `names` says (the CLI: {"height": "--H", ...}). Returns the
    prompts, the sampler's timesteps and the latents' shape."""
    name = (names or {}).get
    if prompt_embeds is not None:
        if prompt is not None:
            raise BadValue("give either prompt or prompt_embeds, not both")
        want = (shape.max_length, shape.unet.context_dim)
        if not isinstance(prompt_embeds, torch.Tensor) or prompt_embeds.ndim != 3 or \
                tuple(prompt_embeds.shape[1:]) != want or len(prompt_embeds) == 0:
            got = tuple(prompt_embeds.shape) if isinstance(prompt_embeds, torch.Tensor) else type(prompt_embeds).__name__
            raise BadValue(f"prompt_embeds must be a (P, {want[0]}, {want[1]}) tensor (what encode() gives), got {got}")
        if not torch.isfinite(prompt_embeds).all():
            raise NotFinite("prompt_embeds holds NaN or infinite values")
        prompts = [""] * len(prompt_embeds)
    else:
        prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise BadType(f"prompt must be a str or a non-empty list of str, got {prompt!r}")
    if not isinstance(negative_prompt, str):
        raise BadType(f"negative_prompt must be a str, got {negative_prompt!r}")
    for text, what in [*((p, "prompt") for p in prompts), (negative_prompt, "negative_prompt")]:
        check_prompt(text, what, shape.max_length)
    positive_int(name("n_samples", "n_samples"), n_samples)
    get_sampler(sampler), check_eta(sampler, eta)
    guidance_rule(guidance, name("guidance", "guidance"))
    ts = timesteps(sampler, steps, shape.schedule)
    if not callable(scale):
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise BadType(f"scale must be a number or a callable t -> number, got {scale!r}")
        if not math.isfinite(scale):
            raise BadValue(f"{name('scale', 'scale')} must be finite, got {scale}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64):
        raise BadValue(f"{name('seed', 'seed')} must be an int in [0, 2**64), got {seed!r}")
    if output not in ("pil", "tensor"):
        raise BadValue(f"output must be 'pil' or 'tensor', got {output!r}")
    height = shape.image_size if height is None else height
    width = shape.image_size if width is None else width
    positive_int(name("height", "height"), height, shape.limits.max_side, "max_side")
    positive_int(name("width", "width"), width, shape.limits.max_side, "max_side")
    down = check_size(height, width, shape.vae, shape.unet)
    batch = len(prompts) * n_samples
    positive_int(name("batch", "prompts × n_samples"), batch, shape.limits.max_batch, "max_batch")
    positive_int(name("pixels", "prompts × n_samples × height × width"), batch * height * width,
                 shape.limits.max_pixels, "max_pixels")
    latent_shape = (batch, shape.unet.in_channels, height // down, width // down)
    if latents is not None:
        if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != latent_shape:
            raise BadValue(f"latents must have shape {latent_shape}, got "
                           f"{tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__}")
        if not torch.isfinite(latents).all():
            raise NotFinite("latents hold NaN or infinite values")
    return list(prompts), ts, latent_shape


def check_safety_request(safety_checker, has_checker: bool) -> bool:
    """generate's safety_checker (None: check when the model holds a checker; False: never; True: insist)
    → whether the pictures are checked."""
    if safety_checker is not None and not isinstance(safety_checker, bool):
        raise BadType(f"safety_checker must be None, True or False, got {safety_checker!r}")
    if safety_checker and not has_checker:
        raise BadValue("safety_checker=True, but this model holds no safety checker (convert the diffusers "
                       "folder with --with-safety-checker)")
    return has_checker and safety_checker is not False


def check_pictures_finite(images: torch.Tensor) -> None:
    """Decoded pictures (n, 3, H, W): every one finite, or a NotFinite naming those that are not."""
    if bad := [i for i, ok in enumerate(torch.isfinite(images).flatten(1).all(1).tolist()) if not ok]:
        raise NotFinite(f"picture(s) {bad} of {len(images)} came out NaN or infinite: the weights, the latents "
                        f"or the guidance scale hold non-finite numbers, or the model overflows in this dtype")


def check_savable(model) -> None:
    """A model folder holds the model files' weights: not added tokens (research/textual_inversion.py) nor
    LoRA layers (research/lora.py, in the UNet or the text encoder), whose state dicts load into no model file."""
    from .research.lora import lora_layers

    if not isinstance(model.text_encoder.token_embedding, torch.nn.Embedding):
        raise BadValue("this model holds added tokens, which a model folder cannot: write them with write_embeddings")
    if lora_layers(model):
        raise BadValue("this model holds LoRA layers, which a model folder cannot: write them with save_lora, "
                       "or merge_lora then remove_lora to keep them in the weights")


def check_load_flags(limits, **flags) -> None:
    """load's switches (compile, safety_checker, fast, check_finite): each True or False; limits a Limits."""
    for name, flag in flags.items():
        if not isinstance(flag, bool):
            raise BadType(f"{name} must be True or False, got {flag!r}")
    if not isinstance(limits, Limits):
        raise BadType(f"limits must be a Limits, got {limits!r}")
