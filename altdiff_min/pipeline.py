"""The whole AltDiffusion: `load()` a model folder (altdiff_min.storage.folder), then `generate()` images.

    1. encode_prompt     prompt ─ tokenizer ─ text encoder ─ context
       encode_image      (image to image) picture ─ VAE encoder ─ z0, a sample of its posterior
    2. initial_latents   seed ─ x_T ~ N(0, I) · init_noise_sigma; or z0 noised to where strength starts
                         (inpainting at strength 1: x_T alone, as diffusers)
    3. sample            x_T ─ sampler over timesteps, ε = guided UNet(x, t, context) ─ x_0
                         (inpainting: the kept region blended back after every step, `blend`)
    4. decode_latents    x_0 ─ VAE decoder ─ image
    5. check_safety      image ─ safety checker ─ flagged pictures replaced by a placeholder
                         (only where the model folder holds a checker)
`generate` is their composition, after checking every argument.
"""
from __future__ import annotations

import os
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from tqdm import tqdm  # the plain text bar: also in notebooks, without ipywidgets

from .arguments import Limits, Shape, check_arguments, check_device, check_dtype, check_load_flags
from .arguments import check_picture_arguments, check_pictures_finite, check_safety_request, check_savable, check_text_layer
from .errors import BadType, BadValue
from .model.text_encoder import TextEncoder
from .model.tokenizer import Tokenizer
from .model.unet import UNet
from .model.vae import VAE
from .research import speed
from .research.interventions import Controller, CrossAttentionSwitch, check_controllers, evaluation, intervene, latent_steps
from .sampling import img2img
from .sampling.guidance import Rule, Scale, guidance_rule, guided_eps
from .sampling.samplers import draw_noise, get_sampler, model_eps
from .sampling.schedule import ScheduleConfig, Timesteps, init_noise_sigma, noise_to, route
from .storage import pictures
from .storage.folder import DIFFUSION, read_folder, resolve, write_folder


@dataclass
class AltDiffusion:
    tokenizer: Tokenizer
    text_encoder: TextEncoder
    unet: UNet
    vae: VAE
    schedule: ScheduleConfig
    path: str = ""
    image_size: int = 512  # what the model was trained at: the default height and width of generate
    limits: Limits = field(default_factory=lambda: Limits())  # what one generate call may ask for
    safety_checker: torch.nn.Module | None = None  # the folder's vision.safety.SafetyChecker, if it holds one
    # (convert --with-safety-checker); the pipeline only calls its screen(images)

    @torch.no_grad()
    def encode(self, prompts: list[str], layer: int | None = None) -> torch.Tensor:
        """The UNet's context for each prompt, (B, 77, context_dim); layer: see TextEncoder.forward."""
        ids, mask = self.tokenizer(prompts)
        device = self.unet.conv_in.weight.device
        return self.text_encoder(ids.to(device), mask.to(device), layer=layer).to(self.unet.conv_in.weight.dtype)

    # The four stages of generate, each usable on its own.

    def encode_prompt(self, prompts: list[str], negative_prompt: str = "", n_samples: int = 1, guided: bool = True,
                      prompt_embeds: torch.Tensor | None = None, text_layer: int | None = None) -> torch.Tensor:
        """1. The context of every sample: (P·n, 77, D), and with guidance the negative prompt's rows
        first, (2·P·n, 77, D). One text-encoder call: the negative prompt once, then each prompt once.
        prompt_embeds (P, 77, D): contexts to use instead of encoding `prompts`."""
        texts = ([negative_prompt] if guided else []) + (prompts if prompt_embeds is None else [])
        encoded = self.encode(texts, text_layer) if texts else None
        if prompt_embeds is not None:
            cond = prompt_embeds.to(self.unet.conv_in.weight.device, self.unet.conv_in.weight.dtype)
        else:
            cond = encoded[1:] if guided else encoded
        cond = cond.repeat_interleave(n_samples, dim=0)
        return torch.cat([encoded[:1].expand(len(cond), -1, -1), cond]) if guided else cond

    def encode_image(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(Image to image.) Pixels (1, 3, H, W) in [−1, 1] (pictures.prepare_image) → z0: a sample of
        the VAE's posterior N(mean, exp(logvar)), drawn from `generator` as diffusers draws it, times
        scaling_factor (the sampler's space)."""
        p = self.vae.quant_conv.weight
        mean, logvar = self.vae.encode(pixels.to(p.device, p.dtype))
        return (mean + (0.5 * logvar).exp() * draw_noise(mean, generator)) * self.vae.cfg.scaling_factor

    def initial_latents(self, shape: tuple[int, ...], sampler: str, ts: Timesteps, generator: torch.Generator | None = None,
                        latents: torch.Tensor | None = None, image_latents: torch.Tensor | None = None,
                        pure_noise: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """2. The latents the route starts from, and the N(0, I) draw they came from.

        Text to image: the draw is torch.randn(shape) from the CPU `generator` exactly as diffusers
        draws it (or `latents`), times the sampler's init_noise_sigma. Image to image (image_latents:
        z0 from encode_image, repeated over the batch): z0 noised to the first level of `ts` (the
        route strength cut) with the draw, as diffusers' scheduler.add_noise; with pure_noise
        (inpainting at strength 1, as diffusers' inpainting pipeline) the draw alone, times
        init_noise_sigma, drawn after z0 all the same: the blending reads both."""
        p = self.unet.conv_in.weight
        if image_latents is not None:
            z0 = image_latents.expand(shape[0], -1, -1, -1)
            noise = draw_noise(z0, generator)
            if pure_noise:
                return (noise * init_noise_sigma(sampler, ts, self.schedule)).to(p.dtype), noise
            return noise_to(sampler, z0, noise, ts.sigmas[0], ts.t[0], self.schedule).to(p.dtype), noise
        x = latents if latents is not None else torch.randn(shape, generator=generator)
        x = x.to(p.device, p.dtype)
        return x * init_noise_sigma(sampler, ts, self.schedule), x

    def sample(self, x: torch.Tensor, context: torch.Tensor | None, sampler: str, ts: Timesteps, scale: Scale = 7.5,
               eta: float = 0.0, generator: torch.Generator | None = None, callback: Callable | None = None,
               progress: bool = True, controllers: tuple[Controller, ...] = (), guidance: Rule | None = None,
               blend: img2img.Blend | None = None, trajectory: list | None = None) -> torch.Tensor:
        """3. Run `sampler` over the timesteps `ts` with the guided UNet (guidance.guided_eps, combining
        by `guidance`, CFG by default): x_T → clean latents. controllers: attention controllers for
        this run (altdiff_min.research.interventions). After every step, in this order: `blend` (inpainting's,
        also applied to PLMS's warm-up estimate), `trajectory` (a list: {"t", "latents", "x0"} appended,
        on the CPU), then `callback(i, t, x, x0)`, which may return the latents to go on from (the
        latent hook), then the controllers' `latents` hooks for the next step (also before step 0)."""
        with tqdm(total=len(ts), desc=sampler, disable=not progress, leave=False) as bar:
            def on_step(i: int, t: float, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor | None:
                bar.update()
                x = blend(i, t, x, x0) if blend is not None else x
                if trajectory is not None:
                    trajectory.append({"t": t, "latents": x.float().cpu(), "x0": x0.float().cpu()})
                out = callback(i, t, x, x0) if callback is not None else None
                return before(i + 1, x if out is None else out)  # latent guidance for the next step

            eps = model_eps(guided_eps(self.denoise, context, scale, guidance), ts, self.schedule)  # v → ε, once
            extra = {"warmup": blend.warmup} if blend is not None and route(sampler).warmup else {}
            with intervene(controllers) as run:
                before = latent_steps(run, self.denoise, context, ts, sampler)  # x unchanged without a `latents` hook
                return get_sampler(sampler)(eps, before(0, x), ts, self.schedule, eta=eta, generator=generator,
                                            callback=on_step, **extra)

    def denoise(self, x: torch.Tensor, t: float, context: torch.Tensor | None, guided: bool = False) -> torch.Tensor:
        """One UNet evaluation ε(x, t, context), marked for attention controllers (interventions.evaluation:
        its timestep, and whether the batch is the guidance pair [∅; c]). The timestep reaches the UNet
        as a float32 tensor, so a compiled UNet sees a new value, not a new constant, at every step, and
        one dtype for every sampler: one compilation (the embedding computes in float32 either way, and
        integer timesteps < 2²⁴ are exact)."""
        with evaluation(t, guided, tuple(x.shape[-2:])):
            return self.unet(x, torch.as_tensor(t, dtype=torch.float32, device=x.device), context)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """4. Clean latents (in the sampler's scaled space) → images (n, 3, H, W), float32 in [0, 1]."""
        return (self.vae.decode(latents / self.vae.cfg.scaling_factor).float() / 2 + 0.5).clamp(0, 1)

    def check_safety(self, images: torch.Tensor) -> tuple[torch.Tensor, list[bool]]:
        """5. Each picture (n, 3, H, W) in [0, 1] through the safety checker (diffusers'
        StableDiffusionSafetyChecker decision, altdiff_min/vision/safety.py) → the pictures with every flagged
        one replaced by a placeholder that says so (FlagAI's behaviour; diffusers blacks them out),
        and one flag per picture."""
        if self.safety_checker is None:
            raise BadValue("this model holds no safety checker (convert the diffusers folder with --with-safety-checker)")
        return self.safety_checker.screen(images)

    @torch.no_grad()
    def generate(self, prompt: str | list[str] | None = None, negative_prompt: str = "", n_samples: int = 1,
                 steps: int = 50, sampler: str = "ddim", scale: Scale = 7.5, eta: float = 0.0,
                 height: int | None = None, width: int | None = None, seed: int | None = None,
                 latents: torch.Tensor | None = None, output: str = "pil", callback: Callable | None = None,
                 progress: bool = True, *, prompt_embeds: torch.Tensor | None = None, text_layer: int | None = None,
                 cross_attention: bool | Collection[str] = True, return_trajectory: bool = False,
                 safety_checker: bool | None = None, return_flags: bool = False, image=None, strength: float | None = None, mask=None,
                 paste_unmasked: bool = False, controllers: list[Controller] | None = None, guidance: Rule | str | None = None):
        """Text to image: n_samples images per prompt, height × width pixels (default: image_size);
        with `image`, image to image; with `mask` too, inpainting (altdiff_min/sampling/img2img.py).

        sampler: one of samplers.SAMPLERS, over `timesteps(sampler, steps, self.schedule)`.
        seed: the initial latents are torch.randn((n, 4, height//8, width//8)) from a CPU generator
        seeded with it (times the sampler's init_noise_sigma), exactly as diffusers draws them, so a
        seed gives the same image as diffusers' AltDiffusionPipeline with that scheduler. latents:
        pass the N(0, I) draw yourself instead. callback(i, t, x, x0) sees the latents after each step
        and the x0 the step predicted. output "tensor": floats in [0, 1], (n, 3, height, width),
        float32 on the model's device; "pil": a list of PIL images.

        For ablations (all off by default):
          prompt_embeds: (P, L, D) contexts to use instead of encoding `prompt`, e.g. an interpolation
              between two prompts' `encode()`; text_layer: which text-encoder layer feeds the UNet;
          scale: a callable t → scale gives a guidance schedule; cross_attention=False: the UNet
              never reads the text (self-attention only); a part or a list of parts, e.g. ["down",
              "up.2"]: only those read it (names: UNet.text_parts; [] = False, every part = True);
              return_trajectory: also return a list of {"t", "latents", "x0"} per step, on the CPU;
          controllers: attention controllers that change what the UNet's attention computes, this call
              only (altdiff_min.research.interventions; cross_attention is one, CrossAttentionSwitch);
          guidance: how ε(x, ∅) and ε(x, c) combine: a guidance.Rule or its text, "cfg" (default),
              "rescale:0.7" (CFG rescale), "interval:LOW,HIGH" (guidance on an interval of timesteps).

        safety_checker: None (default) checks the pictures when the model holds a checker, False
        never, True insists (an error if there is none). Flagged pictures are replaced by a
        placeholder saying so; return_flags: also return a list of one bool per picture (True:
        flagged and replaced; all False when no checker ran). With both: (images, trajectory, flags).

        Image to image (SDEdit; diffusers' AltDiffusionImg2ImgPipeline, same seed, same picture):
          image: a PIL picture or a float tensor (1, 3, H, W) in [0, 1]; its size rounded down to a
              multiple the model takes, or resized to height × width when they are given;
          strength (default 0.8, with a mask 1.0, as diffusers): how much of the route runs, the last
              int(steps · strength) steps; 1 starts from (almost) pure noise (with a mask: pure
              noise), small values keep the picture;
          mask: inpainting with any model: white (≥ 0.5) is repainted, the rest kept by blending the
              latents after every step; paste_unmasked: also paste the kept pixels back exactly.
        """
        # 0. Check everything before any model work.
        if image is not None or mask is not None or strength is not None or paste_unmasked:
            height, width = check_picture_arguments(self.shape, image, strength, mask, paste_unmasked, latents, height, width)
        prompts, ts, shape = check_arguments(self.shape, prompt, negative_prompt, n_samples, steps, sampler, scale, eta,
                                                  height, width, seed, latents, output, prompt_embeds, guidance)
        reads = self.unet.text_parts(cross_attention)
        reads_text = bool(reads)  # [] or False: the text is never encoded
        controllers = check_controllers(controllers, isinstance(self.unet, speed.CompiledUNet), sampler, prompts)
        if reads_text and reads != self.unet.text_parts(True):  # some parts do not read the text
            controllers = check_controllers([CrossAttentionSwitch(reads), *controllers],
                                            compiled=isinstance(self.unet, speed.CompiledUNet))
        guidance = guidance_rule(guidance)
        if callback is not None and not callable(callback):
            raise BadType(f"callback must be a function (i, t, latents, x0) -> latents or None, got {callback!r}")
        check_text_layer(self.shape, text_layer)
        pixels = repaint = None
        if image is not None:
            strength = img2img.default_strength(mask) if strength is None else strength
            ts = img2img.cut(ts, steps, strength, sampler)
            pixels = pictures.prepare_image(image, (width, height))
        if mask is not None:
            repaint = pictures.prepare_mask(mask, image, (width, height))
        check = check_safety_request(safety_checker, self.safety_checker is not None)
        guided = reads_text and (callable(scale) or scale != 1)  # scale 1: no unconditional branch
        context = self.encode_prompt(prompts, negative_prompt, n_samples, guided, prompt_embeds, text_layer)
        generator = torch.Generator("cpu").manual_seed(seed) if seed is not None else None
        z0 = self.encode_image(pixels, generator) if pixels is not None else None  # draws first
        x, noise = self.initial_latents(shape, sampler, ts, generator, latents, z0,
                                        pure_noise=mask is not None and strength == 1)
        if mask is not None:  # Parity: diffusers' inpainting pipeline then encodes the masked picture (for
            draw_noise(z0, generator)  # 9-channel UNets), a posterior draw; skipped alike, so η > 0 and Euler-a match
        blend = img2img.Blend(sampler, z0, noise, repaint, ts, self.schedule) if mask is not None else None
        trajectory = [] if return_trajectory else None
        x = self.sample(x, context if reads_text else None, sampler, ts, scale if guided else 1.0, eta,
                        generator, callback, progress, controllers, guidance, blend, trajectory)
        images = self.decode_latents(x)
        check_pictures_finite(images)
        if paste_unmasked:
            keep = 1 - repaint.to(images)
            images = images * (1 - keep) + (pixels.to(images) + 1) / 2 * keep
        flags = [False] * len(images)  # no checker ran: none flagged
        if check:
            images, flags = self.check_safety(images)
        images = images if output == "tensor" else to_pil(images)
        extra = ([trajectory] if return_trajectory else []) + ([flags] if return_flags else [])
        return (images, *extra) if extra else images

    @property
    def shape(self) -> Shape:
        """What generate's arguments are checked against (arguments.py)."""
        return Shape(self.unet.cfg, self.vae.cfg, self.schedule, self.tokenizer.max_length, len(self.text_encoder.layers),
                     self.image_size, self.limits)

    def save(self, path: str, force: bool = False, **extra: Any) -> None:
        """Write this model as a model folder (atomically; see folder.write_folder)."""
        check_savable(self)
        modules = {name: getattr(self, name) for name in (*DIFFUSION, "safety_checker") if getattr(self, name) is not None}
        write_folder(path, {n: m.cfg for n, m in modules.items()}, {n: m.state_dict() for n, m in modules.items()},
                     self.schedule, self.tokenizer.model_file, self.tokenizer.max_length, force=force,
                     image_size=self.image_size, **extra)


def to_pil(images: torch.Tensor) -> list:
    """(n, 3, H, W) floats in [0, 1] → PIL images, rounding to the nearest level as diffusers does."""
    from PIL import Image

    pixels = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(p) for p in pixels]


def load(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
         compile: bool = False, limits: Limits = Limits(), safety_checker: bool = True, fast: bool = True,
         check_finite: bool = True, lora=()) -> AltDiffusion:
    """Build tokenizer, text encoder, UNet and VAE from a model folder, and its safety checker if it
    holds one (safety_checker=False: not even loaded); no network, no random init.

    dtype None: the folder's `default_dtype` if its config names one (the toy is stored in fp16 to
    stay small and computes in fp32), else the dtype it was written in. path "toy" is the small model shipped
    with the package (altdiff_min/toy/model). fast: the speed paths of altdiff_min/research/speed.py (same
    sums, faster; False: the modules exactly as the model files write them). compile: torch.compile
    the UNet as one graph; the first steps then take a while. limits: the largest image side, batch
    and pixels per call `generate` accepts (see Limits). check_finite: a weight holding NaN or infinity
    is refused (errors.NotFinite, naming the tensor) instead of sampling to the end into a NaN picture;
    one pass over the weights (aminmax per tensor); False skips it. lora: LoRA files (UNet, text encoder), each
    FILE or (FILE, SCALE) (scale 1.0 unless given), read and checked before the weights load, then attached as
    adapters named after the files (weights_convert/lora.py; research/lora.py to reweigh, merge, remove).
    """
    device, dtype = check_device(device), check_dtype(dtype)
    check_load_flags(limits, compile=compile, safety_checker=safety_checker, fast=fast, check_finite=check_finite)
    from weights_convert.lora import attach_lora_files, read_lora_files  # the files' names: the converter's rules
    loras, path = read_lora_files(lora), resolve(path)
    config, tokenizer, modules = read_folder(path, DIFFUSION, device, dtype,
                                             names=DIFFUSION + (("safety_checker",) if safety_checker else ()),
                                             check_finite=check_finite)
    if fast:
        modules = {name: speed.apply(module) for name, module in modules.items()}
    attach_lora_files(modules["unet"], loras, modules["text_encoder"])  # before compiling: in the graph
    if compile:
        modules["unet"] = speed.compile_unet(modules["unet"])
    return AltDiffusion(tokenizer=tokenizer, schedule=config["schedule"], path=path,
                        image_size=config.get("image_size", 512), limits=limits, **modules)


