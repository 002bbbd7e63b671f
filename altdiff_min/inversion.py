"""Inverting a real picture into the model's noise, so that sampling from that noise gives the picture
back (the first half of editing a real picture; prompt-to-prompt then samples from the same noise).

    picture ─ VAE encoder (posterior mean) ─ z0 = x_0
    DDIM inversion    x_0 → x_1 → … → x_T: each DDIM step of the forward route run backward
    null-text         per step an unconditional embedding ∅_i, fitted so the guided DDIM step from
                      the route's x lands on the inversion's next latents (Mokady et al. 2023)
    sampling back     DDIM from x_T with ∅_i as the unconditional rows at step i (stepwise_eps)

Sampler level (plain functions over an ε callable, as sampling/samplers.py):
    ddim_inversion_route(eps, z0, ts, cfg)    the latents x_0 … x_T, ts the forward route (noisiest first)
    stepwise_eps(denoise, cond, uncond, ts, scale)   guided ε with step i's own unconditional rows
Model level:
    invert(model, picture, prompt, steps, scale)     → Inversion (plain DDIM inversion)
    null_text_inversion(model, picture, prompt, steps, scale=7.5)  → Inversion with the fitted ∅_i
    sample_inverted(model, inversion, prompts=None, controllers=...)  → clean latents (decode_latents)
    toy.editing.measure_inversion(model, n=50)      the reconstruction table of docs/editing.md

The route: the same `Timesteps` drive inversion and sampling. Forward DDIM step i goes from ᾱ_a = ᾱ[t_i]
to ᾱ_b (t_i − stride, or final_alpha past the end: samplers.landing); inversion runs the steps in the
opposite order, each from ᾱ_b to ᾱ_a with ε(x, t_i) read on latents at ᾱ_b:
    x0̂ = (x − √(1−ᾱ_b)·ε)/√ᾱ_b,    x_next = √ᾱ_a·x0̂ + √(1−ᾱ_a)·ε       (Song et al. 2021, eq. 12 backward)
This is diffusers' DDIMInverseScheduler (and the null-text paper's `next_step`): ε is read at the step's
timestep t_i before the latents reach it, the approximation ε(x_{t−1}, t) ≈ ε(x_t, t) that makes the
inversion exact only as steps → ∞ and drift under guidance > 1. The forward route's "linspace" landing
(t − stride, not the next listed timestep) is inverted as it is, so sampling back retraces it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from .arguments import check_arguments
from .errors import BadType, BadValue
from .sampling.guidance import Denoiser, Rule, guided_eps
from .sampling.samplers import Eps, Callback, ddim, ddim_step, landing, model_eps
from .sampling.schedule import ScheduleConfig, Timesteps, as_timesteps
from .storage import pictures
from .research.interventions import Controller, check_controllers, intervene, latent_steps


def ddim_inversion_route(eps: Eps, z0: torch.Tensor, ts: Timesteps | list[int], cfg: ScheduleConfig = ScheduleConfig(),
                         progress: bool = False) -> list[torch.Tensor]:
    """DDIM inversion: the latents x_0 = z0, x_1, …, x_S (S = len(ts)); ts is the *forward* route,
    noisiest first, as samplers.ddim takes it, and x_S sits at ts[0]'s level. x_k is where forward
    step S − k starts and x_{k−1} where it lands, so ddim(eps, x_S, ts) retraces the route when ε is
    read alike. Equal to diffusers' DDIMInverseScheduler (leading, trailing) step by step; eps reads
    ε-prediction (v-models are refused by the model-level functions)."""
    ts = as_timesteps(ts, cfg)
    a, a_prev = landing("ddim", ts, cfg)
    route = [z0]
    for i in tqdm(reversed(range(len(ts))), total=len(ts), desc="ddim inversion", disable=not progress, leave=False):
        x, _ = ddim_step(route[-1], eps(route[-1], ts[i]), a_prev[i], a[i])  # step i, from its landing back up
        route.append(x)
    return route


def stepwise_eps(denoise: Denoiser, cond: torch.Tensor, uncond: list[torch.Tensor], ts: Timesteps, scale: float,
                 rule: Rule | None = None) -> Eps:
    """The guided ε of guidance.guided_eps with a different unconditional context at each step:
    uncond[i] (1 or B rows, (·, 77, D)) at timestep ts[i], cond (B, 77, D) throughout. Null-text's ∅_i
    reach the UNet this way, with no change to the core; a batch of prompts (prompt-to-prompt's source
    and target) shares each step's ∅_i."""
    if len(uncond) != len(ts):
        raise BadValue(f"one unconditional context per step: {len(ts)} steps, got {len(uncond)}")
    step = {t: i for i, t in enumerate(ts.t)}  # DDIM's timesteps are distinct (schedule.check_route)

    def eps(x: torch.Tensor, t: float) -> torch.Tensor:
        u = uncond[step[t]].to(cond).expand(len(cond), -1, -1)
        return guided_eps(denoise, torch.cat([u, cond]), scale, rule)(x, t)
    return eps


@dataclass
class Inversion:
    """A picture inverted: `latents` x_0 (the picture's) … x_T (to sample from), each (1, 4, h, w);
    `ts` the forward route; `context` the prompt's conditional rows (1, 77, D); `uncond[i]` the
    unconditional rows (1, 77, D) for forward step i (ts order: uncond[0] at the noisiest step), the
    negative prompt's for plain inversion, the fitted ∅_i for null-text; `scale` the guidance they are
    for; `losses[i]` null-text's loss at step i with the fitted ∅_i, `iterations[i]` its Adam updates."""
    latents: list[torch.Tensor]
    ts: Timesteps
    context: torch.Tensor
    uncond: list[torch.Tensor]
    scale: float
    losses: list[float] | None = None
    iterations: list[int] | None = None

    @property
    def noise(self) -> torch.Tensor:
        return self.latents[-1]


def check_inversion_arguments(model, picture, prompt: str, steps: int, scale: float, negative_prompt: str = ""):
    """One line each before any model work: the picture (pictures.check_picture: a PIL image or a float
    (1, 3, H, W) / (3, H, W) tensor in [0, 1], finite), the prompt, steps, scale and the picture's size,
    rounded down as image to image rounds it (arguments.check_picture_arguments). → (pixels in [−1, 1],
    the DDIM route)."""
    if model.schedule.prediction_type != "epsilon":
        raise BadValue(f"inversion reads ε-prediction models; this one predicts {model.schedule.prediction_type}")
    if not isinstance(prompt, str):
        raise BadType(f"prompt must be one str (one picture is inverted), got {prompt!r}")
    if callable(scale):
        raise BadType("scale must be a number here (the ∅_i are fitted for one guidance scale), got a callable")
    pictures.check_picture(picture)
    width, height = pictures.rounded_size(picture, model.vae.cfg.size_multiple * model.unet.cfg.size_multiple)
    _, ts, _ = check_arguments(model.shape, prompt, negative_prompt, 1, steps, "ddim", scale, height=height, width=width)
    return pictures.prepare_image(picture, (width, height)), ts


@torch.no_grad()
def picture_latents(model, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels (1, 3, H, W) in [−1, 1] → z0: the VAE posterior's mean times scaling_factor (the null-text
    paper's choice; pipeline.encode_image draws a sample instead, which would add its noise to x_0)."""
    p = model.vae.quant_conv.weight
    mean, _ = model.vae.encode(pixels.to(p.device, p.dtype))
    return mean * model.vae.cfg.scaling_factor


@torch.no_grad()
def invert(model, picture, prompt: str, steps: int = 50, scale: float = 1.0, *, negative_prompt: str = "",
           progress: bool = True) -> Inversion:
    """DDIM inversion of `picture` under `prompt` at guidance `scale` (1: ε(x, c) alone, the null-text
    pivot; > 1 drifts: the picture does not come back exactly). Its uncond are the negative prompt's rows."""
    pixels, ts = check_inversion_arguments(model, picture, prompt, steps, scale, negative_prompt)
    context = model.encode_prompt([prompt], negative_prompt, guided=True)  # [∅; c]
    z0 = picture_latents(model, pixels)
    eps = guided_eps(model.denoise, context if scale != 1 else context[1:], scale)
    route = ddim_inversion_route(eps, z0, ts, model.schedule, progress)
    return Inversion(route, ts, context[1:], [context[:1]] * len(ts), float(scale))


def check_fitting(inner_steps: int, lr: float, tol: float, scale: float) -> None:
    for name, v, ok in (("inner_steps", inner_steps, isinstance(inner_steps, int) and inner_steps >= 1),
                        ("lr", lr, isinstance(lr, (int, float)) and lr > 0),
                        ("tol", tol, isinstance(tol, (int, float)) and tol >= 0)):
        if isinstance(v, bool) or not ok:
            raise BadValue(f"{name} must be a positive number (inner_steps an int ≥ 1, tol ≥ 0), got {v!r}")
    if scale == 1:
        raise BadValue("null-text inversion fits the unconditional rows of guidance: scale must not be 1 "
                       "(at 1 they are unused; invert(...) at scale 1 is exact as it stands)")


def null_text(model, pivot: list[torch.Tensor], ts: Timesteps, cond: torch.Tensor, uncond: torch.Tensor,
              scale: float = 7.5, *, inner_steps: int = 10, lr: float = 1e-2, tol: float = 1e-5,
              progress: bool = True) -> tuple[list[torch.Tensor], list[float], list[int]]:
    """Null-text inversion (Mokady et al. 2023, §3.2, Algorithm 1) of B pictures at once. pivot: the
    DDIM inversion at guidance 1, x*_0 … x*_T (B rows each); cond (B, 77, D); uncond (1 or B, 77, D)
    the starting ∅. From x̄_T = x*_T, at each forward step i (noisiest first) only the unconditional
    embedding ∅_i is optimised (Adam, lr, ≤ inner_steps updates, starting from ∅_{i−1}'s result) to
    minimise, per picture,
        ‖x*_{t−1} − DDIM_step(x̄_t, ε∅ + w·(εc − ε∅))‖²  (mean over its latents)
    stopping early once every picture's loss is below tol; x̄ then takes the guided step with the
    fitted ∅_i. The batch's loss is the pictures' sum, and Adam's update is elementwise, so each row
    follows the run it would have alone (but for the shared early stop). Chosen: the paper's text
    (constant lr and tol); its code's lr·(1 − i/100) and tol + i·2e-5 schedule is not used. εc is
    read once per step (no gradient), ε∅ with a gradient for ∅ only.
    → (∅_i per step (B, 77, D), the last loss per step (the batch's worst), Adam updates per step)."""
    check_fitting(inner_steps, lr, tol, scale)
    a, a_prev = landing("ddim", ts, model.schedule)
    S, B, x = len(ts), len(cond), pivot[-1]
    u = uncond.float().expand(B, -1, -1)
    fitted, losses, iterations = [], [], []
    with tqdm(total=S, desc="null-text", disable=not progress, leave=False) as bar:
        for i, t in enumerate(ts):
            target = pivot[S - i - 1]
            with torch.no_grad():
                e_cond = model.denoise(x, t, cond)

            def denoise(x2: torch.Tensor, t: float, context: torch.Tensor, guided: bool) -> torch.Tensor:
                # The guidance batch [x; x] over [∅; c]: ε(x, ∅) with its gradient, ε(x, c) as read above.
                return torch.cat([model.denoise(x2[:B], t, context[:B]), e_cond])

            u = u.detach().clone().requires_grad_(True)
            opt = torch.optim.Adam([u], lr=lr)
            for updates in range(inner_steps + 1):
                e = guided_eps(denoise, torch.cat([u.to(cond.dtype), cond]), scale)(x, t)
                step = ddim_step(x, e, a[i], a_prev[i])[0].float()
                loss = ((step - target.float()) ** 2).flatten(1).mean(1)  # per picture: F.mse_loss of each
                if loss.max().item() < tol or updates == inner_steps:
                    break
                opt.zero_grad()
                loss.sum().backward(inputs=[u])
                opt.step()
            u = u.detach()
            x = ddim_step(x, e.detach(), a[i], a_prev[i])[0]  # e: the last loss's, with the fitted ∅_i
            fitted.append(u.to(cond.dtype))
            losses.append(loss.max().item())
            iterations.append(updates)
            bar.set_postfix(loss=f"{losses[-1]:.2e}", updates=updates)
            bar.update()
    return fitted, losses, iterations


def null_text_inversion(model, picture, prompt: str, steps: int = 50, scale: float = 7.5, *, inner_steps: int = 10,
                        lr: float = 1e-2, tol: float = 1e-5, negative_prompt: str = "", progress: bool = True) -> Inversion:
    """Null-text inversion of one picture (see null_text): the pivot is invert(..., scale=1), the
    fitted ∅_i start from the negative prompt's rows. Sampling back at `scale` (sample_inverted)
    gives the picture within the VAE's round trip (docs/editing.md)."""
    check_inversion_arguments(model, picture, prompt, steps, scale, negative_prompt)
    check_fitting(inner_steps, lr, tol, scale)
    pivot = invert(model, picture, prompt, steps, 1.0, negative_prompt=negative_prompt, progress=progress)
    uncond, losses, iterations = null_text(model, pivot.latents, pivot.ts, pivot.context, pivot.uncond[0], scale,
                                           inner_steps=inner_steps, lr=lr, tol=tol, progress=progress)
    return Inversion(pivot.latents, pivot.ts, pivot.context, uncond, float(scale), losses, iterations)


@torch.no_grad()
def sample_inverted(model, inversion: Inversion, prompts: list[str] | None = None, scale: float | None = None, *,
                    cond: torch.Tensor | None = None, controllers: list[Controller] | None = None,
                    callback: Callback | None = None, progress: bool = True) -> torch.Tensor:
    """DDIM from the inversion's x_T over its route, step i's unconditional rows inversion.uncond[i]
    → clean latents (P, 4, h, w) (model.decode_latents makes them pictures). prompts (or cond, (P, 77, D)
    conditional rows): default the inverted prompt; several (prompt-to-prompt's source and target) run
    in one batch from the same x_T, sharing each step's ∅_i. scale: default the inversion's.
    controllers: attention controllers for this run (the UNet's batch is [∅_i × P; c × P], guided), their
    `latents` hooks (latent guidance) as generate runs them; callback(i, t, x, x0) as the samplers' (latent hook)."""
    if prompts is not None and cond is not None:
        raise BadValue("give prompts or cond, not both")
    controllers = check_controllers(controllers)
    if prompts is not None:
        prompts, _, _ = check_arguments(model.shape, prompts, steps=len(inversion.ts), scale=1.0)
        check_controllers(controllers, sampler="ddim", prompts=prompts)
        cond = model.encode_prompt(prompts, guided=False)
    cond = inversion.context if cond is None else cond
    scale = inversion.scale if scale is None else scale
    x = inversion.noise.expand(len(cond), -1, -1, -1)
    ts, cfg = inversion.ts, model.schedule
    eps = stepwise_eps(model.denoise, cond, inversion.uncond, ts, scale) if scale != 1 else \
        (lambda x, t: model.denoise(x, t, cond))
    with tqdm(total=len(ts), desc="ddim", disable=not progress, leave=False) as bar, intervene(controllers) as run:
        before = latent_steps(run, model.denoise, cond, ts, "ddim")

        def on_step(i, t, x, x0):
            bar.update()
            out = callback(i, t, x, x0) if callback is not None else None
            return before(i + 1, x if out is None else out)
        return ddim(model_eps(eps, ts, cfg), before(0, x), ts, cfg, callback=on_step)
