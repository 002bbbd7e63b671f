"""Training maths shared by every recipe (the toy's in toy/train.py; fine-tuning a converted model).

    diffusion_loss   ε-prediction (Ho et al. 2020, eq. 14, unweighted):
                     L = mean ‖ε − ε_θ(x_t, t, c)‖²,  x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε  (schedule.add_noise)
                     with t uniform over the T training timesteps and ε ~ N(0, I)
    drop_captions    classifier-free guidance (Ho & Salimans 2022): a fraction of the captions is
                     replaced by the empty prompt, so one model learns ε(x, c) and ε(x, ∅)
    vae_loss         the autoencoder: L1 + L2 reconstruction of a posterior sample, plus a small
                     KL(q(z|x) ‖ N(0, I)) term

The random draws (t, ε, which captions drop) are arguments, so a caller decides where they come from:
the same draws give the same loss and gradients, which is what the tests compare with diffusers.
"""
from __future__ import annotations

import torch

from .schedule import ScheduleConfig, add_noise
from .unet import UNet
from .vae import VAE


def trainable(*modules: torch.nn.Module) -> None:
    """Undo what `load` does for inference (eval mode, requires_grad off) on the modules to train."""
    for module in modules:
        module.train().requires_grad_(True)


def diffusion_loss(unet: UNet, context: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                   schedule: ScheduleConfig = ScheduleConfig()) -> torch.Tensor:
    """mean ‖ε_θ(x_t, t, context) − ε‖² over every element of the batch: latents, noise (B, 4, h, w)
    in the sampler's scale (VAE latents × scaling_factor), t (B,) integer timesteps, context (B, 77, D)."""
    x_t = add_noise(latents, noise, t, schedule)
    return (unet(x_t, t, context).float() - noise.float()).pow(2).mean()


def drop_captions(ids: torch.Tensor, empty: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """ids (B, L) with the rows where drop (B,) is True replaced by the empty prompt's ids (L,)."""
    ids = ids.clone()
    ids[drop] = empty
    return ids


def vae_loss(vae: VAE, images: torch.Tensor, kl_weight: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """images (B, 3, H, W) in [−1, 1] → L1 + L2 reconstruction error of a sample of the posterior,
    plus kl_weight · KL(N(mean, var) ‖ N(0, 1)) averaged over the latents."""
    mean, logvar = vae.encode(images)
    device = generator.device if generator is not None else mean.device
    z = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=generator, device=device).to(mean)  # posterior sample
    error = vae.decode(z) - images
    kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).mean()
    return error.abs().mean() + error.pow(2).mean() + kl_weight * kl
