"""The whole AltDiffusion: `load()` a model folder, then `generate()` images from prompts.

The folder (written by `altdiff-min convert`) is self-describing and never needs the network:
    config.json               every module's config, the noise schedule, the tokenizer length
    model.safetensors         every tensor under altdiff-min's names: text_encoder.*, unet.*, vae.*
    sentencepiece.bpe.model   the XLM-R tokenizer
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .samplers import ScheduleConfig, check_eta, get_sampler, timesteps
from .text_encoder import TextEncoder, TextEncoderConfig
from .tokenizer import Tokenizer
from .unet import UNet, UNetConfig
from .vae import VAE, VAEConfig

FORMAT = "altdiff-min"
CONFIG, WEIGHTS, TOKENIZER = "config.json", "model.safetensors", "sentencepiece.bpe.model"
MODULES = {"text_encoder": (TextEncoder, TextEncoderConfig), "unet": (UNet, UNetConfig), "vae": (VAE, VAEConfig)}


def config_to_dict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_from_dict(cls, d: dict[str, Any]):
    """A frozen config from its JSON form; JSON lists become the tuples the dataclass defaults use."""
    names = {f.name for f in dataclasses.fields(cls)}
    if unknown := set(d) - names:
        raise ValueError(f"{cls.__name__} has no field(s) {sorted(unknown)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@dataclass
class AltDiffusion:
    tokenizer: Tokenizer
    text_encoder: TextEncoder
    unet: UNet
    vae: VAE
    schedule: ScheduleConfig
    path: str = ""
    image_size: int = 512  # what the model was trained at: the default height and width of generate

    @torch.no_grad()
    def generate(self, prompt: str | list[str], negative_prompt: str = "", n_samples: int = 1, steps: int = 50,
                 sampler: str = "ddim", scale: float = 7.5, eta: float = 0.0, height: int | None = None, width: int | None = None,
                 seed: int | None = None, latents: torch.Tensor | None = None, output: str = "pil",
                 callback: Callable | None = None, progress: bool = True):
        """Text to image: n_samples images per prompt, height × width pixels (default: image_size).

        seed: the initial latents are torch.randn((n, 4, height//8, width//8)) from a CPU generator
        seeded with it, exactly as diffusers draws them, so a seed gives the same image as diffusers'
        AltDiffusionPipeline. latents: pass them yourself instead. callback(i, t, x, x0) sees the
        latents after each step and the x0 the step predicted. output "tensor": floats in [0, 1],
        (n, 3, height, width), float32 on the model's device; "pil": a list of PIL images.
        """
        # 0. Check everything before any model work.
        height = self.image_size if height is None else height
        width = self.image_size if width is None else width
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompt must be a str or a non-empty list of str, got {prompt!r}")
        if not isinstance(negative_prompt, str):
            raise TypeError(f"negative_prompt must be a str, got {negative_prompt!r}")
        if not isinstance(n_samples, int) or n_samples < 1:
            raise ValueError(f"n_samples must be a positive int, got {n_samples!r}")
        get_sampler(sampler), check_eta(sampler, eta), timesteps(sampler, steps, self.schedule)
        if output not in ("pil", "tensor"):
            raise ValueError(f"output must be 'pil' or 'tensor', got {output!r}")
        down = check_size(height, width, self.vae.cfg, self.unet.cfg)
        batch = len(prompts) * n_samples
        shape = (batch, self.unet.cfg.in_channels, height // down, width // down)
        if latents is not None and tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        device, dtype = self.unet.conv_in.weight.device, self.unet.conv_in.weight.dtype

        # 1. The text: prompts and negative prompts in one text-encoder call.
        guided = scale != 1  # scale 1 is the conditional model alone: no unconditional branch
        texts = [p for p in prompts for _ in range(n_samples)]
        ids, mask = self.tokenizer(([negative_prompt] * batch if guided else []) + texts)
        context = self.text_encoder(ids.to(device), mask.to(device)).to(dtype)

        # 2. The initial latents x_T ~ N(0, I), drawn on the CPU as diffusers does.
        generator = torch.Generator("cpu").manual_seed(seed) if seed is not None else None
        x = latents if latents is not None else torch.randn(shape, generator=generator)
        x = x.to(device, dtype)

        # 3. Sample with the guided ε, showing progress.
        bar = tqdm(total=steps, desc=sampler, disable=not progress, leave=False)

        def on_step(i: int, t: int, x: torch.Tensor, x0: torch.Tensor) -> None:
            bar.update()
            if callback is not None:
                callback(i, t, x, x0)

        x = get_sampler(sampler)(guided_eps(self.unet, context, scale), x, steps, self.schedule, eta=eta,
                                 generator=generator, callback=on_step)
        bar.close()

        # 4. Decode: latents were sampled in the VAE's scaled space.
        images = (self.vae.decode(x / self.vae.cfg.scaling_factor).float() / 2 + 0.5).clamp(0, 1)
        return images if output == "tensor" else to_pil(images)

    def save(self, path: str, force: bool = False, **extra: Any) -> None:
        """Write this model as a model folder (atomically; see `write_folder`)."""
        modules = {name: getattr(self, name) for name in MODULES}
        write_folder(path, {n: m.cfg for n, m in modules.items()}, {n: m.state_dict() for n, m in modules.items()},
                     self.schedule, self.tokenizer.model_file, self.tokenizer.max_length, force=force,
                     image_size=self.image_size, **extra)


def check_size(height: int, width: int, vae: VAEConfig, unet: UNetConfig) -> int:
    """Raise unless the models can make height × width images; return the pixels per latent."""
    down = 2 ** (len(vae.channels) - 1)
    multiple = down * unet.size_multiple
    if height < multiple or width < multiple or height % multiple or width % multiple:
        raise ValueError(f"height and width must be positive multiples of {multiple} for this model "
                         f"(the VAE downsamples {down}×, the UNet halves {unet.size_multiple}× more); got {height}×{width}")
    return down


def guided_eps(unet: UNet, context: torch.Tensor, scale: float) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """ε for the sampler, with classifier-free guidance (Ho & Salimans 2022, eq. 6):
        ε = ε(x, ∅) + scale · (ε(x, c) − ε(x, ∅)),   ∅ = the negative prompt ("" by default).
    context holds the unconditional rows first, then the conditional ones; both halves go through
    the UNet in one batch. With scale 1 context is only the conditional rows and ε = ε(x, c)."""
    if scale == 1:
        return lambda x, t: unet(x, t, context)

    def eps(x: torch.Tensor, t: int) -> torch.Tensor:
        e_uncond, e_cond = unet(torch.cat([x, x]), t, context).chunk(2)
        return e_uncond + scale * (e_cond - e_uncond)

    return eps


def to_pil(images: torch.Tensor) -> list:
    """(n, 3, H, W) floats in [0, 1] → PIL images, rounding to the nearest level as diffusers does."""
    from PIL import Image

    pixels = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(p) for p in pixels]


def write_folder(path: str, configs: dict, states: dict, schedule: ScheduleConfig, tokenizer_file: str,
                 max_length: int = 77, force: bool = False, dtype: torch.dtype | None = None, image_size: int = 512,
                 **extra: Any) -> None:
    """Write a model folder atomically: everything goes into a temporary sibling, which is renamed to
    `path` only once complete, so a failed or interrupted write never leaves a folder `load` accepts,
    and an existing folder (replaced only with force=True) stays intact until the last moment.

    configs / states: module name → config / state dict; dtype casts floating tensors (None keeps them).
    """
    path = os.path.abspath(path)
    if os.path.exists(path) and not force:
        raise FileExistsError(f"{path} already exists; pass --force (force=True) to replace it")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.partial-", dir=parent)
    try:
        tensors = {f"{name}.{k}": (v if dtype is None or not v.is_floating_point() else v.to(dtype)).contiguous()
                   for name, state in states.items() for k, v in state.items()}
        save_file(tensors, os.path.join(tmp, WEIGHTS), metadata={"format": "pt"})
        shutil.copyfile(tokenizer_file, os.path.join(tmp, TOKENIZER))
        config = {"format": FORMAT, "version": 1, **{name: config_to_dict(c) for name, c in configs.items()},
                  "schedule": config_to_dict(schedule), "tokenizer": {"max_length": max_length},
                  "image_size": image_size, **extra}
        with open(os.path.join(tmp, CONFIG), "w") as f:  # written last: a folder without it is not loadable
            json.dump(config, f, indent=2, ensure_ascii=False)
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=parent)
            os.replace(path, os.path.join(old, "previous"))
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve(path: str | os.PathLike) -> str:
    """A model folder's path; "toy" is the small model shipped with the package."""
    if path == "toy":
        from .toy import TOY_MODEL

        return TOY_MODEL
    return os.fspath(path)


def read_config(path: str) -> dict[str, Any]:
    """The config.json of a model folder, after checking the folder really is one."""
    path = resolve(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model folder not found: {path!r}")
    missing = [f for f in (CONFIG, WEIGHTS, TOKENIZER) if not os.path.isfile(os.path.join(path, f))]
    if missing:
        raise ValueError(f"{path!r} is not an altdiff-min model folder (missing {', '.join(missing)}); "
                         f"make one with `altdiff-min convert SRC {path}`")
    with open(os.path.join(path, CONFIG)) as f:
        config = json.load(f)
    if config.get("format") != FORMAT:
        raise ValueError(f"{os.path.join(path, CONFIG)} is not an altdiff-min config (format {config.get('format')!r})")
    return config


def load(path: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> AltDiffusion:
    """Build tokenizer, text encoder, UNet and VAE from a converted folder; no network, no random init.

    dtype None keeps the dtype the folder was written in. path "toy" is the small model shipped
    with the package (altdiff_min/toy/model).
    """
    path = resolve(path)
    config = read_config(path)
    tensors = load_file(os.path.join(path, WEIGHTS), device=str(device))
    if stray := sorted({k.split(".")[0] for k in tensors} - set(MODULES)):
        raise ValueError(f"{os.path.join(path, WEIGHTS)} holds tensors of unknown modules: {stray}")
    modules = {}
    for name, (model_cls, config_cls) in MODULES.items():
        cfg = config_from_dict(config_cls, config[name])
        with torch.device("meta"):
            model = model_cls(cfg)
        prefix = name + "."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        model.load_state_dict(state, strict=True, assign=True)
        modules[name] = model.to(dtype=dtype).eval().requires_grad_(False)
    tokenizer = Tokenizer(os.path.join(path, TOKENIZER), max_length=config["tokenizer"]["max_length"])
    schedule = config_from_dict(ScheduleConfig, config["schedule"])
    return AltDiffusion(tokenizer=tokenizer, schedule=schedule, path=path, image_size=config.get("image_size", 512),
                        **modules)
