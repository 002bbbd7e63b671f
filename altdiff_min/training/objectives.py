"""What the UNet is trained to predict, and how the per-element errors become the loss.

    target           ε-prediction: ε (Ho et al. 2020, eq. 14); v-prediction: v = √ᾱ_t·ε − √(1−ᾱ_t)·x0
                     (Salimans & Ho 2022, §4; diffusers' DDPMScheduler.get_velocity), so that
                     x0 = √ᾱ_t·x_t − √(1−ᾱ_t)·v and ε = √ᾱ_t·v + √(1−ᾱ_t)·x_t (samplers.model_eps)
    snr_weights      Min-SNR-γ (Hang et al. 2023): min(SNR_t, γ)/SNR_t for ε, min(SNR_t, γ)/(SNR_t + 1) for v
                     (the paper's §4 and diffusers' train_text_to_image: the v loss is already the x0 loss
                     times SNR + 1)
    reduce           the loss of a batch: mean error (Min-SNR-weighted per example); with DreamBooth's prior
                     preservation (Ruiz et al. 2023, eq. 2) the batch is B instance examples then their B class
                     examples, and the loss is instance loss + λ · class loss, each a mean over its half, the
                     class half unweighted, as diffusers' train_dreambooth computes it
    offset_noise     ε + X·n, n ~ N(0, I) per example and channel, constant over the picture (the "noise offset"
                     of diffusers' training script): the model also learns to move the picture's mean brightness
"""
from __future__ import annotations

import dataclasses

import torch

from ..errors import BadValue
from ..sampling.schedule import ScheduleConfig, alphas_cumprod

PREDICTION = ("model", "epsilon", "v_prediction")  # "model": what the base model's folder records


def with_prediction(schedule: ScheduleConfig, prediction_type: str) -> ScheduleConfig:
    """The schedule a run trains and saves with: the model's, with --prediction-type unless "model"."""
    return schedule if prediction_type == "model" else dataclasses.replace(schedule, prediction_type=prediction_type)


def check_prediction(cfg, schedule: ScheduleConfig) -> None:
    """A run whose result is a file used on the base model (a LoRA, new words) keeps the base's prediction
    type: the file is loaded onto a folder that says what the UNet predicts, and no loader reads it from the file."""
    keeps = cfg.prediction_type in ("model", schedule.prediction_type)
    if (cfg.lora or cfg.train == "embeddings") and not keeps:
        raise BadValue(f"--prediction-type {cfg.prediction_type}: a LoRA or new words are used on the base model, "
                       f"which predicts {schedule.prediction_type}; train the whole UNet to change what it predicts")


def velocity(latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, schedule: ScheduleConfig) -> torch.Tensor:
    """v = √ᾱ_t·ε − √(1−ᾱ_t)·x0, per example's t (B,), in the latents' dtype (as get_velocity)."""
    a = alphas_cumprod(schedule).to(latents.device, latents.dtype)[t].reshape(-1, *([1] * (latents.ndim - 1)))
    return a.sqrt() * noise - (1 - a).sqrt() * latents


def target(latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, schedule: ScheduleConfig) -> torch.Tensor:
    """What the UNet's output is compared with: ε, or v for a v-prediction schedule."""
    return velocity(latents, noise, t, schedule) if schedule.prediction_type == "v_prediction" else noise


def snr_weights(t: torch.Tensor, schedule: ScheduleConfig, gamma: float) -> torch.Tensor:
    """Min-SNR-γ's weight of each example (B,), SNR_t = ᾱ_t/(1 − ᾱ_t)."""
    a = alphas_cumprod(schedule).to(t.device)[t]
    snr = a / (1 - a)
    return snr.clamp(max=gamma) / (snr + 1 if schedule.prediction_type == "v_prediction" else snr)


def reduce(error: torch.Tensor, t: torch.Tensor, schedule: ScheduleConfig, snr_gamma: float = 0.0,
           prior_weight: float | None = None) -> torch.Tensor:
    """The loss of the squared errors (B, …) float32. prior_weight λ (not None): the batch's second half
    is the first half's class examples; loss = reduce(first half) + λ · mean(second half)."""
    if prior_weight is not None:
        n = len(error) // 2
        return reduce(error[:n], t[:n], schedule, snr_gamma) + prior_weight * error[n:].mean()
    if not snr_gamma:
        return error.mean()
    return (error.flatten(1).mean(dim=1) * snr_weights(t.to(error.device), schedule, snr_gamma)).mean()


def offset_noise(noise: torch.Tensor, generator: torch.Generator, offset: float) -> torch.Tensor:
    """One example's noise (C, h, w) plus offset·n, n ~ N(0, I) of shape (C, 1, 1) from its own generator
    (drawn last, so a run without offset draws what it always drew); offset 0: the noise unchanged."""
    if not offset:
        return noise
    return noise + offset * torch.randn((noise.shape[0], 1, 1), generator=generator)
