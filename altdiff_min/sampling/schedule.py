"""The noise schedule of m9 and the routes samplers take through it.

    ScheduleConfig          the training schedule (scheduler_config.json, checked on construction)
    alphas_cumprod, add_noise      ᾱ_t and the forward process q(x_t | x_0)
    timesteps(name, steps, cfg)    the route sampler `name` takes: what diffusers' scheduler of
                                   that kind gives for the same config and step count
Notation: ᾱ_t = alphas_cumprod[t]; σ_t = √((1 − ᾱ_t)/ᾱ_t), the noise level in the "variance
exploding" scale of Karras et al. 2022. The samplers themselves are in samplers.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import torch

from ..checks import check_config
from ..errors import BadType, BadValue

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
    # sampler's own diffusers default (ROUTES' spacing), as m9's scheduler_config.json states none.
    timestep_spacing: Spacing | None = None
    # What the UNet predicts: ε, or v = √ᾱ_t·ε − √(1−ᾱ_t)·x0 (Salimans & Ho 2022, §4; diffusers'
    # get_velocity). The samplers read ε either way: samplers.model_eps converts.
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"

    def __post_init__(self):
        check_config(self)  # types, ranges and limits: altdiff_min/checks.py


@dataclass(frozen=True)
class Route:
    """How one sampler walks the schedule, as diffusers' scheduler of that kind does. The one table of
    samplers' properties (ROUTES); their functions are samplers.SAMPLERS, under the same names.

    spacing: the timestep spacing when the config states none. Parity: diffusers' `from_config(cfg)`
        keeps a spacing the config states and otherwise uses the class's default, so m9's DDIM config
        gives DPM-Solver "linspace" (its own default).
    told: the timesteps the UNet is told: "integer" (rounded), "float" (linspace's fractions, Euler),
        "karras" (Karras' σ, each told its interpolated timestep, rounded).
    state: "vp", variance preserving, x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε, or "ve", variance exploding,
        x_σ = x0 + σ·ε (initial noise times init_noise_sigma).
    stride: each step lands on t − T // S (DDIM, PNDM), ending on ᾱ = 1 or ᾱ_0 by `alpha_to_one`
        (the default when the config says None); otherwise on the next listed level, ending at σ = 0.
    dpm_spacing: spaces S + 1 points and drops the last (t = 0), as DPM-Solver does.
    warmup: PLMS's warm-up step: img2img cuts PNDM's list, whose second entry repeats (img2img.cut).
    eta: takes DDIM's η; stochastic: draws its own noise at every step (η must then be 0)."""
    spacing: Spacing
    told: Literal["integer", "float", "karras"] = "integer"
    state: Literal["vp", "ve"] = "vp"
    stride: bool = False
    alpha_to_one: bool | None = None
    dpm_spacing: bool = False
    warmup: bool = False
    eta: bool = False
    stochastic: bool = False


ROUTES = {
    "ddim": Route("leading", stride=True, alpha_to_one=True, eta=True),
    "plms": Route("leading", stride=True, alpha_to_one=False, warmup=True),
    "dpm++2m": Route("linspace", dpm_spacing=True),
    "dpm++2m-karras": Route("linspace", told="karras"),
    "euler": Route("linspace", told="float", state="ve"),
    "euler_a": Route("linspace", told="float", state="ve", stochastic=True),
}


def route(name: str) -> Route:
    """ROUTES[name]; an unknown name is one line naming the samplers."""
    if not isinstance(name, str) or name not in ROUTES:
        raise BadValue(f"unknown sampler {name!r}; choose one of {sorted(ROUTES)}")
    return ROUTES[name]


def final_alpha(name: str, cfg: ScheduleConfig) -> float:
    """ᾱ where the last DDIM/PLMS step lands: 1, or ᾱ_0 (set_alpha_to_one)."""
    one = route(name).alpha_to_one if cfg.set_alpha_to_one is None else cfg.set_alpha_to_one
    return 1.0 if one else alphas_cumprod(cfg)[0].item()


def betas(cfg: ScheduleConfig = ScheduleConfig(), dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """β_t, "scaled_linear": linspace(√beta_start, √beta_end, T)², shape (T,)."""
    return torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, cfg.num_train_timesteps, dtype=dtype) ** 2


def alphas_cumprod(cfg: ScheduleConfig = ScheduleConfig(), dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """ᾱ_t = Π_{s≤t} (1 − β_s), shape (T,).

    Parity: computed in float32 as diffusers does; FlagAI computes it in float64 and stores float32
    (the two differ by ~1e-7 relative)."""
    return torch.cumprod(1 - betas(cfg, dtype), dim=0)


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


def noise_to(name: str, x0: torch.Tensor, noise: torch.Tensor, sigma: float, t: float,
             cfg: ScheduleConfig = ScheduleConfig()) -> torch.Tensor:
    """x0 noised to level sigma (timestep t) in sampler `name`'s state convention (see samplers.py),
    as diffusers' scheduler of that kind `add_noise`s: DDIM and PNDM at ᾱ_t (add_noise above); the
    DPM-Solvers at the level itself, α = 1/√(σ² + 1) (with Karras' σ this is not ᾱ of the rounded
    timestep); Euler and Euler-a variance exploding, x0 + σ·noise."""
    kind = route(name)
    if kind.stride:
        return add_noise(x0, noise, int(t), cfg)
    if kind.state == "ve":
        return x0 + sigma * noise
    alpha = 1 / math.sqrt(sigma * sigma + 1)
    return alpha * x0 + sigma * alpha * noise


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
    # PLMS only: the timestep its warm-up step evaluates at and lands on, when not t[1]. Parity:
    # diffusers' img2img cuts PNDM's timestep list, whose second entry repeats for the warm-up; cut
    # below it, the warm-up lands on the timestep after the first and the next step is told the one
    # after that (img2img.cut builds this route).
    warmup: float | None = None

    def __len__(self) -> int:
        return len(self.t)

    def __iter__(self):
        return iter(self.t)

    def __getitem__(self, index):
        if isinstance(index, slice):
            if index.step not in (None, 1):
                raise BadValue("a run can be cut (ts[k:], ts[:k]) but not strided")
            start, stop, _ = index.indices(len(self.t))
            return Timesteps(self.t[start:stop], self.sigmas[start:stop + 1], self.stride,
                             self.warmup if start == 0 else None)
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
    kind = route(name)
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise BadType(f"steps must be an int, got {type(steps).__name__}")
    T = cfg.num_train_timesteps
    if not 1 <= steps <= T:
        raise BadValue(f"steps must be in [1, {T}] for a {T}-step schedule, got {steps}")
    spacing = cfg.timestep_spacing or kind.spacing
    sigmas = train_sigmas(cfg)
    stride = None
    if kind.told == "karras":
        # Karras' σ from σ_max to σ_min (the spacing is unused); the UNet is told each σ's timestep,
        # interpolated in log σ and rounded, while the update uses the σ itself.
        levels = karras_sigmas(float(sigmas[0]), float(sigmas[-1]), steps)
        ts = sigma_to_t(levels, np.log(sigmas)).round()
    else:
        ts = spaced(spacing, steps, T, cfg.steps_offset, dpm=kind.dpm_spacing)
        # Integer timesteps; Euler keeps linspace's fractions, in float32 (Parity: σ is interpolated
        # at the float32 t, as diffusers does, which matters at hundreds of steps).
        ts = ts.round().astype(np.int64) if kind.told == "integer" else ts.astype(np.float32)
        if kind.stride:
            stride = T // steps
        levels = np.interp(ts, np.arange(T), sigmas)
    check_route(ts, steps, T, f"{name} with {spacing!r} spacing" if kind.told != "karras" else name,
                strict=kind.told != "karras")
    if kind.stride:
        final = math.sqrt((1 - final_alpha(name, cfg)) / final_alpha(name, cfg))
    else:
        final = 0.0  # diffusers' final_sigmas_type "zero": the last step returns x0
    levels = np.concatenate([levels, [final]]).astype(np.float32)
    ts = ts.astype(np.float32) if kind.told == "float" else ts.astype(np.int64)
    return Timesteps(tuple(ts.tolist()), tuple(levels.tolist()), stride)


def check_route(ts: np.ndarray, steps: int, T: int, what: str, strict: bool = True) -> None:
    """Raise unless ts is `steps` timesteps in [0, T − 1], descending (strictly, unless not strict)."""
    bad = None
    if len(ts) != steps:
        bad = f"the spacing gives {len(ts)} timesteps"
    elif ts.min() < 0 or ts.max() > T - 1:
        bad = f"timestep {ts.max() if ts.max() > T - 1 else ts.min():g} is outside the schedule's [0, {T - 1}]"
    elif np.any(np.diff(ts) > 0):
        i = int(np.argmax(np.diff(ts) > 0))
        bad = (f"the timesteps go up ({ts[i]:g} then {ts[i + 1]:g}); they must descend, from the noisiest "
               f"(highest) to the cleanest")
    elif strict and np.any(np.diff(ts) == 0):
        bad = "two steps land on the same timestep"
    if bad:
        raise BadValue(f"steps={steps} is not possible for {what} on a {T}-step schedule: {bad}")


def as_timesteps(ts: Timesteps | Sequence[float], cfg: ScheduleConfig) -> Timesteps:
    """A plain list of timesteps → Timesteps (σ interpolated at each t, ending at 0); checked."""
    if isinstance(ts, Timesteps):
        return ts
    if isinstance(ts, (int, float)) or not all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in ts):
        raise BadType(f"timesteps must be a list of numbers (see schedule.timesteps), got {ts!r}")
    arr = np.asarray(ts, dtype=np.float64)
    if len(arr) == 0 or not np.isfinite(arr).all():
        raise BadValue(f"timesteps must be a non-empty list of finite numbers, got {list(ts)!r}")
    check_route(arr, len(arr), cfg.num_train_timesteps, "this timestep list")
    levels = np.interp(arr, np.arange(cfg.num_train_timesteps), train_sigmas(cfg))
    return Timesteps(tuple(ts), tuple(np.append(levels, 0.0).astype(np.float32).tolist()))


def init_noise_sigma(name: str, ts: Timesteps, cfg: ScheduleConfig = ScheduleConfig()) -> float:
    """The factor on N(0, I) for the initial latents. 1 for the variance-preserving samplers; for
    Euler and Euler-a σ_max, or √(σ_max² + 1) with "leading" spacing (Parity: diffusers' rule)."""
    kind = route(name)
    if kind.state != "ve":
        return 1.0
    sigma_max = max(ts.sigmas)
    return sigma_max if (cfg.timestep_spacing or kind.spacing) != "leading" else math.sqrt(sigma_max**2 + 1)
