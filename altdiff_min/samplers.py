"""The noise schedule, its timesteps, and six samplers: DDIM, PLMS, DPM-Solver++(2M) (plain and with
Karras sigmas), Euler and Euler ancestral.

Every sampler is a plain function over an ε-prediction callable and an explicit list of timesteps:

    ts = timesteps("ddim", 50, schedule)                 noisiest first; ts[10:] starts part-way down
    x = ddim(eps, x_T, ts, schedule, callback=show)      eps(x, t) -> ε,  x: (B, 4, H/8, W/8), t: a number

`timesteps` is what diffusers' scheduler `set_timesteps` gives for the same config and step count, so
the same seed gives the same image. A plain list works too: `ddim(eps, x, [999, 500, 1])`.
Each step calls `callback(i, t, x, x0)` with the latents *after* step i and the x0 that step predicted.
Guidance is not here: the pipeline wraps the UNet into `eps`. Notation: ᾱ_t = alphas_cumprod[t];
σ_t = √((1 − ᾱ_t)/ᾱ_t), the noise level in the "variance exploding" scale of Karras et al. 2022.

Two state conventions (each sampler's docstring says which):
  variance preserving (DDIM, PLMS, DPM-Solver++):  x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε;  x_T ~ N(0, I)
  variance exploding (Euler, Euler-a):             x_σ = x0 + σ·ε;  x_T ~ N(0, I)·init_noise_sigma
and the UNet, trained on the first, is shown x_σ/√(σ²+1). Both end on the clean latents.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import numpy as np
import torch

from .checks import check_config
from .errors import BadType, BadValue

Eps = Callable[[torch.Tensor, float], torch.Tensor]
Callback = Callable[[int, float, torch.Tensor, torch.Tensor], None]
Spacing = Literal["leading", "linspace", "trailing"]
SPACINGS = ("leading", "linspace", "trailing")


@dataclass(frozen=True)
class ScheduleConfig:
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085  # "scaled_linear": β = linspace(√beta_start, √beta_end, T)²
    beta_end: float = 0.012
    steps_offset: int = 1  # added to "leading" timesteps: 50 steps → 981, 961, … , 1
    # The last DDIM/PLMS step lands on ᾱ_0 (≈ 0.99915) or on 1. None (a config that does not say):
    # diffusers' defaults, DDIM 1 and PNDM ᾱ_0.
    set_alpha_to_one: bool | None = False
    # How S steps are spread over the T training timesteps (Lin et al. 2023, table 2). None: each
    # sampler's own diffusers default (DEFAULT_SPACING), as m9's scheduler_config.json states none.
    timestep_spacing: Spacing | None = None

    def __post_init__(self):
        check_config(self)  # types, ranges and limits: altdiff_min/checks.py


# Parity: diffusers' `Scheduler.from_config(cfg)` keeps a spacing the config states and otherwise
# uses the new class's default, so m9's DDIM config gives DPM-Solver "linspace" (its own default).
DEFAULT_SPACING = {"ddim": "leading", "plms": "leading", "dpm++2m": "linspace", "dpm++2m-karras": "linspace",
                   "euler": "linspace", "euler_a": "linspace"}
DEFAULT_ALPHA_TO_ONE = {"ddim": True, "plms": False}


def final_alpha(name: str, cfg: ScheduleConfig) -> float:
    """ᾱ where the last DDIM/PLMS step lands: 1, or ᾱ_0 (set_alpha_to_one)."""
    one = DEFAULT_ALPHA_TO_ONE[name] if cfg.set_alpha_to_one is None else cfg.set_alpha_to_one
    return 1.0 if one else alphas_cumprod(cfg)[0].item()


def alphas_cumprod(cfg: ScheduleConfig = ScheduleConfig()) -> torch.Tensor:
    """ᾱ_t = Π_{s≤t} (1 − β_s), shape (T,).

    Parity: computed in float32 as diffusers does; FlagAI computes it in float64 and stores float32
    (the two differ by ~1e-7 relative)."""
    betas = torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, cfg.num_train_timesteps, dtype=torch.float32) ** 2
    return torch.cumprod(1 - betas, dim=0)


def train_sigmas(cfg: ScheduleConfig = ScheduleConfig()) -> np.ndarray:
    """σ_t = √((1 − ᾱ_t)/ᾱ_t) for t = 0 … T−1, float32 as diffusers computes them."""
    ac = alphas_cumprod(cfg)
    return (((1 - ac) / ac) ** 0.5).numpy()


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: int | torch.Tensor,
              cfg: ScheduleConfig = ScheduleConfig()) -> torch.Tensor:
    """The forward process q(x_t | x_0) (Ho et al. 2020, eq. 4): x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·noise.
    t: one timestep, or a (B,) tensor of one per sample. Computed in x0's dtype, as diffusers' add_noise."""
    a = alphas_cumprod(cfg).to(x0.device, x0.dtype)[torch.as_tensor(t, device=x0.device)]
    a = a.reshape(a.shape + (1,) * (x0.ndim - a.ndim))  # (B,) → (B, 1, 1, 1) against (B, C, H, W)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


@dataclass(frozen=True)
class Timesteps:
    """The route of one run: at step i the UNet is told t[i] and the latents are at noise level
    sigmas[i]; sigmas[-1] is where the run ends (0: clean). `ts[k:]` starts k steps down the route.

    stride: Parity: diffusers' DDIM and PNDM land each step on timestep t − stride (T // S) rather
    than on the next listed one; the two agree for "leading" spacing but not for "linspace" or
    "trailing". None (any plain list): land on the next listed timestep."""
    t: tuple[float, ...]
    sigmas: tuple[float, ...]
    stride: int | None = None

    def __len__(self) -> int:
        return len(self.t)

    def __iter__(self):
        return iter(self.t)

    def __getitem__(self, index):
        if isinstance(index, slice):
            if index.step not in (None, 1):
                raise BadValue("a run can be cut (ts[k:], ts[:k]) but not strided")
            start, stop, _ = index.indices(len(self.t))
            return Timesteps(self.t[start:stop], self.sigmas[start:stop + 1], self.stride)
        return self.t[index]


def spaced(spacing: str, steps: int, T: int, offset: int, dpm: bool = False) -> np.ndarray:
    """S timesteps in [0, T), descending, by diffusers' three spacings (its set_timesteps).
    dpm: DPM-Solver spaces S + 1 points and drops the last (t = 0) for "linspace" and "leading"."""
    n = steps + 1 if dpm else steps
    if spacing == "leading":  # every (T // n)-th from 0, plus the offset; the noisiest may be skipped
        ts = (np.arange(0, n) * (T // n)).round()[::-1] + offset
    elif spacing == "linspace":  # evenly from T − 1 down to 0, unrounded (Euler) or rounded
        ts = np.linspace(0, T - 1, n)[::-1]
    elif spacing == "trailing":  # evenly from T − 1 down, T/S apart
        ts = np.round(np.arange(T, 0, -T / steps)) - 1
    else:
        raise BadValue(f"timestep_spacing must be one of {SPACINGS} or None, got {spacing!r}")
    return ts[:-1] if dpm and spacing != "trailing" else ts


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """The (fractional) timestep of each σ, by linear interpolation of log σ_t (diffusers' _sigma_to_t)."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=len(log_sigmas) - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022, eq. 5: σ_i = (σ_max^(1/ρ) + i/(S−1)·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ."""
    ramp = np.linspace(0, 1, steps)
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def timesteps(name: str, steps: int, cfg: ScheduleConfig = ScheduleConfig()) -> Timesteps:
    """The route sampler `name` takes in `steps` steps, noisiest first, as diffusers' scheduler of that
    kind built with `from_config` of this schedule; also checks `name` and `steps`."""
    get_sampler(name)
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise BadType(f"steps must be an int, got {type(steps).__name__}")
    T = cfg.num_train_timesteps
    if not 1 <= steps <= T:
        raise BadValue(f"steps must be in [1, {T}] for a {T}-step schedule, got {steps}")
    spacing = cfg.timestep_spacing or DEFAULT_SPACING[name]
    sigmas = train_sigmas(cfg)
    stride = None
    if name == "dpm++2m-karras":
        # Karras' σ from σ_max to σ_min (the spacing is unused); the UNet is told each σ's timestep,
        # interpolated in log σ and rounded, while the update uses the σ itself.
        levels = karras_sigmas(float(sigmas[0]), float(sigmas[-1]), steps)
        ts = sigma_to_t(levels, np.log(sigmas)).round()
    else:
        ts = spaced(spacing, steps, T, cfg.steps_offset, dpm=name == "dpm++2m")
        # Integer timesteps; Euler keeps linspace's fractions, in float32 (Parity: σ is interpolated
        # at the float32 t, as diffusers does, which matters at hundreds of steps).
        ts = ts.round().astype(np.int64) if name in ("ddim", "plms", "dpm++2m") else ts.astype(np.float32)
        if name in ("ddim", "plms"):
            stride = T // steps
        levels = np.interp(ts, np.arange(T), sigmas)
    check_route(ts, steps, T, f"{name} with {spacing!r} spacing" if name != "dpm++2m-karras" else name,
                strict=name != "dpm++2m-karras")
    if name in ("ddim", "plms"):
        final = math.sqrt((1 - final_alpha(name, cfg)) / final_alpha(name, cfg))
    else:
        final = 0.0  # diffusers' final_sigmas_type "zero": the last step returns x0
    levels = np.concatenate([levels, [final]]).astype(np.float32)
    ts = ts.astype(np.float32) if name in ("euler", "euler_a") else ts.astype(np.int64)
    return Timesteps(tuple(ts.tolist()), tuple(levels.tolist()), stride)


def check_route(ts: np.ndarray, steps: int, T: int, what: str, strict: bool = True) -> None:
    """Raise unless ts is `steps` timesteps in [0, T − 1], descending (strictly, unless not strict)."""
    bad = None
    if len(ts) != steps:
        bad = f"the spacing gives {len(ts)} timesteps"
    elif ts.min() < 0 or ts.max() > T - 1:
        bad = f"timestep {ts.max() if ts.max() > T - 1 else ts.min():g} is outside the schedule's [0, {T - 1}]"
    elif np.any(np.diff(ts) >= 0) if strict else np.any(np.diff(ts) > 0):
        bad = "two steps land on the same timestep"
    if bad:
        raise BadValue(f"steps={steps} is not possible for {what} on a {T}-step schedule: {bad}")


def as_timesteps(ts: Timesteps | Sequence[float], cfg: ScheduleConfig) -> Timesteps:
    """A plain list of timesteps → Timesteps (σ interpolated at each t, ending at 0); checked."""
    if isinstance(ts, Timesteps):
        return ts
    if isinstance(ts, (int, float)) or not all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in ts):
        raise BadType(f"timesteps must be a list of numbers (see samplers.timesteps), got {ts!r}")
    arr = np.asarray(ts, dtype=np.float64)
    if len(arr) == 0 or not np.isfinite(arr).all():
        raise BadValue(f"timesteps must be a non-empty list of finite numbers, got {list(ts)!r}")
    check_route(arr, len(arr), cfg.num_train_timesteps, "this timestep list")
    levels = np.interp(arr, np.arange(cfg.num_train_timesteps), train_sigmas(cfg))
    return Timesteps(tuple(ts), tuple(np.append(levels, 0.0).astype(np.float32).tolist()))


def init_noise_sigma(name: str, ts: Timesteps, cfg: ScheduleConfig = ScheduleConfig()) -> float:
    """The factor on N(0, I) for the initial latents. 1 for the variance-preserving samplers; for
    Euler and Euler-a σ_max, or √(σ_max² + 1) with "leading" spacing (Parity: diffusers' rule)."""
    if name not in ("euler", "euler_a"):
        return 1.0
    sigma_max = max(ts.sigmas)
    return sigma_max if (cfg.timestep_spacing or DEFAULT_SPACING[name]) != "leading" else math.sqrt(sigma_max**2 + 1)


def check_eta(name: str, eta: float) -> None:
    if isinstance(eta, bool) or not isinstance(eta, (int, float)):
        raise BadType(f"eta must be a number, got {eta!r}")
    if not eta >= 0:  # also NaN
        raise BadValue(f"eta must be >= 0, got {eta}")
    if eta != 0 and name != "ddim":
        what = "draws its own noise at every step" if name == "euler_a" else "is deterministic"
        raise BadValue(f"{name} {what}: eta must be 0 (got {eta}); eta is DDIM's, use 'ddim' for eta > 0")


def draw_noise(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """randn like x, drawn as diffusers' randn_tensor draws it: on the generator's device, then moved."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def ddim_step(x: torch.Tensor, e: torch.Tensor, a: float, a_prev: float,
              sigma: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Song et al. 2021, eq. 12 without its noise term σ·z: (x_t, ε) → (x_{t−1}, x0), same shapes."""
    x0 = (x - math.sqrt(1 - a) * e) / math.sqrt(a)  # "predicted x0"
    dir_xt = math.sqrt(1 - a_prev - sigma**2) * e  # "direction pointing to x_t"
    return math.sqrt(a_prev) * x0 + dir_xt, x0


def landing(name: str, ts: Timesteps, cfg: ScheduleConfig) -> tuple[list[float], list[float]]:
    """ᾱ at each step's timestep and at the one it lands on (final_alpha past the end)."""
    ac, final = alphas_cumprod(cfg).tolist(), final_alpha(name, cfg)
    if any(v != int(v) for v in ts.t):
        raise BadValue(f"DDIM and PLMS step between integer timesteps; got {list(ts.t)}")
    t = [int(v) for v in ts.t]
    nxt = [v - ts.stride for v in t] if ts.stride else t[1:] + [-1]
    return [ac[v] for v in t], [ac[v] if v >= 0 else final for v in nxt]


def ddim(eps: Eps, x: torch.Tensor, ts: Timesteps | Sequence[int], cfg: ScheduleConfig = ScheduleConfig(), *,
         eta: float = 0.0, generator: torch.Generator | None = None, callback: Callback | None = None) -> torch.Tensor:
    """DDIM (Song et al. 2021), variance preserving. η = 0: deterministic; η = 1: DDPM-like ancestral
    sampling, with z drawn every step as diffusers' DDIMScheduler.step draws it (draw_noise)."""
    check_eta("ddim", eta)
    ts = as_timesteps(ts, cfg)
    a, a_prev = landing("ddim", ts, cfg)
    for i, t in enumerate(ts):
        sigma = eta * math.sqrt((1 - a_prev[i]) / (1 - a[i]) * (1 - a[i] / a_prev[i]))  # eq. 16
        x, x0 = ddim_step(x, eps(x, t), a[i], a_prev[i], sigma)
        if eta > 0:
            x = x + sigma * draw_noise(x, generator)
        if callback:
            callback(i, t, x, x0)
    return x


def plms(eps: Eps, x: torch.Tensor, ts: Timesteps | Sequence[int], cfg: ScheduleConfig = ScheduleConfig(), *,
         eta: float = 0.0, generator: torch.Generator | None = None, callback: Callback | None = None) -> torch.Tensor:
    """PLMS, the pseudo linear multistep method of PNDM (Liu et al. 2022), as diffusers'
    PNDMScheduler(skip_prk_steps=True) and CompVis' plms.py: DDIM's update with a better ε. Variance preserving.

    Step 0 has no history, so it is a pseudo improved Euler step: the model is called at t_0 and
    again at t_1 on the Euler estimate there, and the two ε are averaged (S + 1 model calls in all;
    diffusers repeats t_1 in its timestep list for this). Later steps extrapolate ε with the
    Adams–Bashforth formulas of order 2, 3, 4. The warm-up ε at t_1 is not kept in the history.

    Parity: diffusers' `_get_prev_sample` is the "transfer" of eq. 9, algebraically DDIM's η = 0
    update; `ddim_step` gives the same latents to float32 rounding. With a stride (see Timesteps)
    the averaged warm-up step goes from t_1 + stride to t_1, as diffusers' does."""
    check_eta("plms", eta)
    ts = as_timesteps(ts, cfg)
    a, a_prev = landing("plms", ts, cfg)
    ac = alphas_cumprod(cfg).tolist()
    history: list[torch.Tensor] = []  # ε at earlier steps, newest last
    for i, t in enumerate(ts):
        e = eps(x, t)
        a_from, a_to = a[i], a_prev[i]
        if not history and i + 1 < len(ts):
            x_euler, _ = ddim_step(x, e, a[i], a_prev[i])
            e_prime = (e + eps(x_euler, ts[i + 1])) / 2
            a_to = a[i + 1]  # the averaged step lands on t_1 itself
            if ts.stride:
                a_from = ac[int(ts[i + 1]) + ts.stride]
        elif not history:  # a single step: plain Euler, as diffusers
            e_prime = e
        elif len(history) == 1:
            e_prime = (3 * e - history[-1]) / 2
        elif len(history) == 2:
            e_prime = (23 * e - 16 * history[-1] + 5 * history[-2]) / 12
        else:
            e_prime = (55 * e - 59 * history[-1] + 37 * history[-2] - 9 * history[-3]) / 24
        history = (history + [e])[-3:]
        x, x0 = ddim_step(x, e_prime, a_from, a_to)
        if callback:
            callback(i, t, x, x0)
    return x


def vp_levels(ts: Timesteps) -> tuple[list[float], list[float], list[float]]:
    """α_i = 1/√(σ_i² + 1), σ_i·α_i and λ_i = log(α_i/(σ_i α_i)) at each level (λ = ∞ at σ = 0)."""
    alpha = [1 / math.sqrt(s * s + 1) for s in ts.sigmas]
    sigma = [s * a for s, a in zip(ts.sigmas, alpha)]
    lam = [math.log(a / s) if s > 0 else math.inf for a, s in zip(alpha, sigma)]
    return alpha, sigma, lam


def dpm_solver_pp_2m(eps: Eps, x: torch.Tensor, ts: Timesteps | Sequence[int], cfg: ScheduleConfig = ScheduleConfig(),
                     *, eta: float = 0.0, generator: torch.Generator | None = None,
                     callback: Callback | None = None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), as diffusers' DPMSolverMultistepScheduler with
    its defaults: solver_order 2, "dpmsolver++", "midpoint", lower_order_final, final_sigmas_type "zero".
    Variance preserving; the levels are ts.sigmas (Karras' for "dpm++2m-karras").

    It integrates the data prediction x0 = (x − σ_t ε)/α_t (α_t = √ᾱ_t, σ_t = √(1 − ᾱ_t)) in
    log-SNR time λ = log(α/σ), step h_i = λ_{i+1} − λ_i:
        x_{i+1} = (σ_{i+1}/σ_i) x_i − α_{i+1} (e^{−h_i} − 1) D_i
    with D_i = x0_i at the first step and at the run's last (first order = DDIM) and, between, the
    linear extrapolation D_i = x0_i + (x0_i − x0_{i−1})/(2 r_i), r_i = h_{i−1}/h_i ("midpoint").
    A step to σ = 0 (the end, "zero"): λ = ∞, and the update returns x0 itself."""
    check_eta("dpm++2m", eta)
    ts = as_timesteps(ts, cfg)
    alpha, sigma, lam = vp_levels(ts)
    x0_prev = None
    for i, t in enumerate(ts):
        x0 = (x - sigma[i] * eps(x, t)) / alpha[i]
        if sigma[i + 1] == 0:
            x = x0
        else:
            h = lam[i + 1] - lam[i]
            last = i == len(ts) - 1  # lower_order_final
            d = x0 if x0_prev is None or last else x0 + (x0 - x0_prev) / (2 * (lam[i] - lam[i - 1]) / h)
            x = (sigma[i + 1] / sigma[i]) * x - alpha[i + 1] * math.expm1(-h) * d
        x0_prev = x0
        if callback:
            callback(i, t, x, x0)
    return x


def dpm_solver_pp_2m_karras(eps: Eps, x: torch.Tensor, ts: Timesteps | Sequence[int],
                            cfg: ScheduleConfig = ScheduleConfig(), *, eta: float = 0.0,
                            generator: torch.Generator | None = None, callback: Callback | None = None) -> torch.Tensor:
    """DPM-Solver++(2M) over Karras' σ (diffusers' use_karras_sigmas=True; the web UIs' "DPM++ 2M
    Karras"): the same solver; only `timesteps("dpm++2m-karras", …)` differs."""
    check_eta("dpm++2m-karras", eta)
    return dpm_solver_pp_2m(eps, x, ts, cfg, callback=callback)


def euler(eps: Eps, x: torch.Tensor, ts: Timesteps | Sequence[float], cfg: ScheduleConfig = ScheduleConfig(), *,
          eta: float = 0.0, generator: torch.Generator | None = None, callback: Callback | None = None) -> torch.Tensor:
    """Euler's method on the probability-flow ODE dx/dσ = (x − x0)/σ (Karras et al. 2022, alg. 1
    without churn; k-diffusion's sample_euler; diffusers' EulerDiscreteScheduler). Variance exploding:
    x = x0 + σ·ε, starting from N(0, I)·init_noise_sigma; the UNet sees x/√(σ² + 1)."""
    check_eta("euler", eta)
    ts = as_timesteps(ts, cfg)
    for i, t in enumerate(ts):
        s, s_next = ts.sigmas[i], ts.sigmas[i + 1]
        x0 = x - s * eps(x / math.sqrt(s * s + 1), t)
        x = x + (x - x0) / s * (s_next - s)
        if callback:
            callback(i, t, x, x0)
    return x


def euler_ancestral(eps: Eps, x: torch.Tensor, ts: Timesteps | Sequence[float], cfg: ScheduleConfig = ScheduleConfig(),
                    *, eta: float = 0.0, generator: torch.Generator | None = None,
                    callback: Callback | None = None) -> torch.Tensor:
    """Ancestral Euler (k-diffusion's sample_euler_ancestral, diffusers' EulerAncestralDiscreteScheduler):
    from σ an Euler step down to σ_down, then fresh noise of size σ_up, with σ_up² + σ_down² = σ_next²
    and σ_up² = σ_next²(σ² − σ_next²)/σ² (the DDPM posterior's variance in this scale).
    Variance exploding, as `euler`. The noise is drawn every step from `generator` (draw_noise), as
    diffusers draws it, so one seed gives one image."""
    check_eta("euler_a", eta)
    ts = as_timesteps(ts, cfg)
    for i, t in enumerate(ts):
        s, s_next = ts.sigmas[i], ts.sigmas[i + 1]
        x0 = x - s * eps(x / math.sqrt(s * s + 1), t)
        s_up = math.sqrt(s_next**2 * (s**2 - s_next**2) / s**2)
        s_down = math.sqrt(s_next**2 - s_up**2)
        x = x + (x - x0) / s * (s_down - s) + draw_noise(x, generator) * s_up
        if callback:
            callback(i, t, x, x0)
    return x


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "ddim": ddim, "plms": plms, "dpm++2m": dpm_solver_pp_2m, "dpm++2m-karras": dpm_solver_pp_2m_karras,
    "euler": euler, "euler_a": euler_ancestral}


def get_sampler(name: str) -> Callable[..., torch.Tensor]:
    """SAMPLERS[name], with a clear error for an unknown name. All share ddim's signature."""
    if name not in SAMPLERS:
        raise BadValue(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    return SAMPLERS[name]
