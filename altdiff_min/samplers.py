"""The noise schedule and three samplers: DDIM, PLMS and DPM-Solver++(2M).

Every sampler is a plain function over an ε-prediction callable and m9's 1000-step schedule:

    x = ddim(eps, x_T, steps, eta=0.0, callback=show)      eps(x, t) -> ε,  x: (B, 4, H/8, W/8), t: int

Each step goes from timestep t to the next one in `timesteps(name, steps)` and calls
`callback(i, t, x, x0)` with the latents *after* step i and the x0 that step predicted.
Guidance is not here: the pipeline wraps the UNet into `eps`. Notation: ᾱ_t = alphas_cumprod[t].
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

Eps = Callable[[torch.Tensor, int], torch.Tensor]
Callback = Callable[[int, int, torch.Tensor, torch.Tensor], None]


@dataclass(frozen=True)
class ScheduleConfig:
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085  # "scaled_linear": β = linspace(√beta_start, √beta_end, T)²
    beta_end: float = 0.012
    steps_offset: int = 1  # "leading" spacing plus 1: 50 steps → 981, 961, … , 1
    set_alpha_to_one: bool = False  # the last DDIM/PLMS step lands on ᾱ_0 (≈ 0.99915), not on 1


def alphas_cumprod(cfg: ScheduleConfig = ScheduleConfig()) -> torch.Tensor:
    """ᾱ_t = Π_{s≤t} (1 − β_s), shape (T,).

    Parity: computed in float32 as diffusers does; FlagAI computes it in float64 and stores float32
    (the two differ by ~1e-7 relative)."""
    betas = torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, cfg.num_train_timesteps, dtype=torch.float32) ** 2
    return torch.cumprod(1 - betas, dim=0)


def timesteps(name: str, steps: int, cfg: ScheduleConfig = ScheduleConfig()) -> list[int]:
    """The timesteps sampler `name` visits, noisiest first; also checks `name` and `steps`."""
    T = cfg.num_train_timesteps
    get_sampler(name)
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise TypeError(f"steps must be an int, got {type(steps).__name__}")
    # At T steps the offset pushes DDIM/PLMS to timestep T (ᾱ has no such entry: diffusers fails
    # with an IndexError) and DPM's linspace rounds two timesteps to the same value (h = 0).
    if not 1 <= steps <= T - 1:
        raise ValueError(f"steps must be in [1, {T - 1}] for a {T}-step schedule, got {steps}")
    if name == "dpm++2m":
        # Parity: diffusers' DPMSolverMultistepScheduler.from_config(m9's DDIM config) spaces by
        # "linspace": m9's scheduler_config.json predates `timestep_spacing`, so from_config drops
        # DDIM's default "leading" and DPM's own default applies; steps_offset 1 is passed but
        # "linspace" ignores it. 25 steps → 999, 959, … , 40. round() rounds half to even, as np.round.
        return [round(i * ((T - 1) / steps)) for i in range(steps, 0, -1)]
    # "leading": every (T // steps)-th timestep from 0, plus the offset. When steps does not divide T
    # the noisiest ones are never visited (7 steps start at 853).
    return [i * (T // steps) + cfg.steps_offset for i in range(steps - 1, -1, -1)]


def check_eta(name: str, eta: float) -> None:
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if eta != 0 and name != "ddim":
        raise ValueError(f"{name} is deterministic: eta must be 0 (got {eta}); use 'ddim' for eta > 0")


def alpha_pairs(name: str, steps: int, cfg: ScheduleConfig) -> tuple[list[int], list[float], list[float]]:
    """Timesteps t_i, ᾱ at t_i and ᾱ at the step's target t_{i+1}, as Python floats (no syncs in the loop)."""
    ts, ac = timesteps(name, steps, cfg), alphas_cumprod(cfg).tolist()
    a = [ac[t] for t in ts]
    return ts, a, a[1:] + [1.0 if cfg.set_alpha_to_one else ac[0]]


def ddim_step(x: torch.Tensor, e: torch.Tensor, a: float, a_prev: float,
              sigma: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Song et al. 2021, eq. 12 without its noise term σ·z: (x_t, ε) → (x_{t−1}, x0), same shapes."""
    x0 = (x - math.sqrt(1 - a) * e) / math.sqrt(a)  # "predicted x0"
    dir_xt = math.sqrt(1 - a_prev - sigma**2) * e  # "direction pointing to x_t"
    return math.sqrt(a_prev) * x0 + dir_xt, x0


def ddim(eps: Eps, x: torch.Tensor, steps: int, cfg: ScheduleConfig = ScheduleConfig(), *, eta: float = 0.0,
         generator: torch.Generator | None = None, callback: Callback | None = None) -> torch.Tensor:
    """DDIM (Song et al. 2021). η = 0: deterministic; η = 1: DDPM-like ancestral sampling.

    With η > 0 the noise z is drawn every step as diffusers' DDIMScheduler.step draws it:
    randn(x.shape) from `generator`, on the generator's device, then moved to x's."""
    check_eta("ddim", eta)
    ts, a, a_prev = alpha_pairs("ddim", steps, cfg)
    for i, t in enumerate(ts):
        sigma = eta * math.sqrt((1 - a_prev[i]) / (1 - a[i]) * (1 - a[i] / a_prev[i]))  # eq. 16
        x, x0 = ddim_step(x, eps(x, t), a[i], a_prev[i], sigma)
        if eta > 0:
            device = generator.device if generator is not None else x.device
            x = x + sigma * torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)
        if callback:
            callback(i, t, x, x0)
    return x


def plms(eps: Eps, x: torch.Tensor, steps: int, cfg: ScheduleConfig = ScheduleConfig(), *, eta: float = 0.0,
         generator: torch.Generator | None = None, callback: Callback | None = None) -> torch.Tensor:
    """PLMS, the pseudo linear multistep method of PNDM (Liu et al. 2022), as diffusers'
    PNDMScheduler(skip_prk_steps=True) and CompVis' plms.py: DDIM's update with a better ε.

    Step 0 has no history, so it is a pseudo improved Euler step: the model is called at t_0 and
    again at t_1 on the Euler estimate there, and the two ε are averaged (S + 1 model calls in all;
    diffusers repeats t_1 in its timestep list for this). Later steps extrapolate ε with the
    Adams–Bashforth formulas of order 2, 3, 4. The warm-up ε at t_1 is not kept in the history.

    Parity: diffusers' `_get_prev_sample` is the "transfer" of eq. 9, algebraically DDIM's η = 0
    update; `ddim_step` gives the same latents to float32 rounding."""
    check_eta("plms", eta)
    ts, a, a_prev = alpha_pairs("plms", steps, cfg)
    history: list[torch.Tensor] = []  # ε at earlier steps, newest last
    for i, t in enumerate(ts):
        e = eps(x, t)
        if not history and i + 1 < len(ts):
            x_euler, _ = ddim_step(x, e, a[i], a_prev[i])
            e_prime = (e + eps(x_euler, ts[i + 1])) / 2
        elif not history:  # a single step: plain Euler, as diffusers
            e_prime = e
        elif len(history) == 1:
            e_prime = (3 * e - history[-1]) / 2
        elif len(history) == 2:
            e_prime = (23 * e - 16 * history[-1] + 5 * history[-2]) / 12
        else:
            e_prime = (55 * e - 59 * history[-1] + 37 * history[-2] - 9 * history[-3]) / 24
        history = (history + [e])[-3:]
        x, x0 = ddim_step(x, e_prime, a[i], a_prev[i])
        if callback:
            callback(i, t, x, x0)
    return x


def dpm_solver_pp_2m(eps: Eps, x: torch.Tensor, steps: int, cfg: ScheduleConfig = ScheduleConfig(), *,
                     eta: float = 0.0, generator: torch.Generator | None = None,
                     callback: Callback | None = None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), as diffusers' DPMSolverMultistepScheduler with
    its defaults: solver_order 2, "dpmsolver++", "midpoint", lower_order_final, final_sigmas_type "zero".

    It integrates the data prediction x0 = (x − σ_t ε)/α_t (α_t = √ᾱ_t, σ_t = √(1 − ᾱ_t)) in
    log-SNR time λ = log(α/σ), step h_i = λ_{i+1} − λ_i:
        x_{i+1} = (σ_{i+1}/σ_i) x_i − α_{i+1} (e^{−h_i} − 1) D_i
    with D_i = x0_i at step 0 (first order = DDIM) and, after it, the linear extrapolation
    D_i = x0_i + (x0_i − x0_{i−1})/(2 r_i), r_i = h_{i−1}/h_i (the "midpoint" choice).
    The last step goes to σ = 0 (final_sigmas_type "zero"): λ = ∞, and the update returns x0 itself."""
    check_eta("dpm++2m", eta)
    ts, a, _ = alpha_pairs("dpm++2m", steps, cfg)
    alpha, sigma = [math.sqrt(v) for v in a], [math.sqrt(1 - v) for v in a]
    lam = [math.log(al / si) for al, si in zip(alpha, sigma)]
    x0_prev = None
    for i, t in enumerate(ts):
        x0 = (x - sigma[i] * eps(x, t)) / alpha[i]
        if i == len(ts) - 1:
            x = x0
        else:
            h = lam[i + 1] - lam[i]
            if x0_prev is None:
                d = x0
            else:
                r = (lam[i] - lam[i - 1]) / h
                d = x0 + (x0 - x0_prev) / (2 * r)
            x = (sigma[i + 1] / sigma[i]) * x - alpha[i + 1] * math.expm1(-h) * d
        x0_prev = x0
        if callback:
            callback(i, t, x, x0)
    return x


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {"ddim": ddim, "plms": plms, "dpm++2m": dpm_solver_pp_2m}


def get_sampler(name: str) -> Callable[..., torch.Tensor]:
    """SAMPLERS[name], with a clear error for an unknown name. All share ddim's signature."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    return SAMPLERS[name]
