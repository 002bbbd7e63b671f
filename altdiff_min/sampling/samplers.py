"""Six samplers: DDIM, PLMS, DPM-Solver++(2M) (plain and with Karras sigmas), Euler and Euler ancestral.

Every sampler is a plain function over an ε-prediction callable and an explicit list of timesteps:

    ts = timesteps("ddim", 50, schedule)                 noisiest first; ts[10:] starts part-way down
    x = ddim(eps, x_T, ts, schedule, callback=show)      eps(x, t) -> ε,  x: (B, 4, H/8, W/8), t: a number

`timesteps` is what diffusers' scheduler `set_timesteps` gives for the same config and step count, so
the same seed gives the same image. A plain list works too: `ddim(eps, x, [999, 500, 1])`.
Each step calls `callback(i, t, x, x0)` with the latents *after* step i and the x0 that step predicted;
a callback that returns a tensor replaces the latents the run goes on from (inpainting's blending,
or an ablation that edits the state mid-run); one that returns None changes nothing.
Guidance is not here: the pipeline wraps the UNet into `eps`. The schedule and the routes
(`timesteps`, ᾱ_t, σ_t) are in schedule.py.

Two state conventions (each sampler's docstring says which):
  variance preserving (DDIM, PLMS, DPM-Solver++):  x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε;  x_T ~ N(0, I)
  variance exploding (Euler, Euler-a):             x_σ = x0 + σ·ε;  x_T ~ N(0, I)·init_noise_sigma
and the UNet, trained on the first, is shown x_σ/√(σ²+1). Both end on the clean latents.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from ..errors import BadType, BadValue
from .schedule import ScheduleConfig, Timesteps, alphas_cumprod, as_timesteps, final_alpha, route

Eps = Callable[[torch.Tensor, float], torch.Tensor]
Callback = Callable[[int, float, torch.Tensor, torch.Tensor], "torch.Tensor | None"]


def after_step(callback: Callback | None, i: int, t: float, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """The latents the run goes on from after step i: x, or what the callback returned instead."""
    out = callback(i, t, x, x0) if callback is not None else None
    if out is None:
        return x
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        raise BadValue(f"a sampler callback returns None or latents of shape {tuple(x.shape)}, got "
                       f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
    if out.dtype != x.dtype or out.device != x.device:
        raise BadValue(f"a sampler callback returns latents as it got them, {x.dtype} on {x.device}, got "
                       f"{out.dtype} on {out.device}")
    return out


def check_generator(generator) -> None:
    """One torch.Generator (or None) draws the whole batch's noise, as diffusers' single generator does."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise BadType(f"generator must be a torch.Generator or None (one for the whole batch), got {type(generator).__name__}")


def check_eta(name: str, eta: float) -> None:
    if isinstance(eta, bool) or not isinstance(eta, (int, float)):
        raise BadType(f"eta must be a number, got {eta!r}")
    if not 0 <= eta <= 1:  # also NaN; above 1 the direction term's √(1 − ᾱ_prev − σ²) turns imaginary
        raise BadValue(f"eta must be in [0, 1] (DDIM's η: 0 deterministic, 1 DDPM-like), got {eta}")
    if eta != 0 and not route(name).eta:
        what = "draws its own noise at every step" if route(name).stochastic else "is deterministic"
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
    check_eta("ddim", eta), check_generator(generator)
    ts = as_timesteps(ts, cfg)
    a, a_prev = landing("ddim", ts, cfg)
    for i, t in enumerate(ts):
        sigma = eta * math.sqrt((1 - a_prev[i]) / (1 - a[i]) * (1 - a[i] / a_prev[i]))  # eq. 16
        x, x0 = ddim_step(x, eps(x, t), a[i], a_prev[i], sigma)
        if eta > 0:
            x = x + sigma * draw_noise(x, generator)
        x = after_step(callback, i, t, x, x0)
    return x


def plms(eps: Eps, x: torch.Tensor, ts: Timesteps | Sequence[int], cfg: ScheduleConfig = ScheduleConfig(), *,
         eta: float = 0.0, generator: torch.Generator | None = None, callback: Callback | None = None,
         warmup: Callable[[float, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """PLMS, the pseudo linear multistep method of PNDM (Liu et al. 2022), as diffusers'
    PNDMScheduler(skip_prk_steps=True) and CompVis' plms.py: DDIM's update with a better ε. Variance preserving.

    Step 0 has no history, so it is a pseudo improved Euler step: the model is called at t_0 and
    again at t_1 on the Euler estimate there, and the two ε are averaged (S + 1 model calls in all;
    diffusers repeats t_1 in its timestep list for this). Later steps extrapolate ε with the
    Adams–Bashforth formulas of order 2, 3, 4. The warm-up ε at t_1 is not kept in the history.

    warmup(t_1, x): the Euler estimate at t_1 before the model reads it → the latents it reads instead
    (inpainting's blending: diffusers' loop blends after every PNDM step call, and PNDM lists t_1
    twice, so its Euler estimate is blended too); `callback` sees the steps only.

    Parity: diffusers' `_get_prev_sample` is the "transfer" of eq. 9, algebraically DDIM's η = 0
    update; `ddim_step` gives the same latents to float32 rounding. With a stride (see Timesteps)
    the averaged warm-up step goes from t_1 + stride to t_1, as diffusers' does."""
    check_eta("plms", eta), check_generator(generator)
    ts = as_timesteps(ts, cfg)
    a, a_prev = landing("plms", ts, cfg)
    ac = alphas_cumprod(cfg).tolist()
    history: list[torch.Tensor] = []  # ε at earlier steps, newest last
    for i, t in enumerate(ts):
        e = eps(x, t)
        a_from, a_to = a[i], a_prev[i]
        if not history and (i + 1 < len(ts) or ts.warmup is not None):
            t_1 = ts[i + 1] if ts.warmup is None else ts.warmup
            x_euler, _ = ddim_step(x, e, a[i], a_prev[i])
            if warmup is not None:
                x_euler = warmup(t_1, x_euler)
            e_prime = (e + eps(x_euler, t_1)) / 2
            a_to = ac[int(t_1)]  # the averaged step lands on t_1 itself
            if ts.stride:
                a_from = ac[int(t_1) + ts.stride]
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
        x = after_step(callback, i, t, x, x0)
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
    check_eta("dpm++2m", eta), check_generator(generator)
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
        x = after_step(callback, i, t, x, x0)
    return x


def dpm_solver_pp_2m_karras(eps: Eps, x: torch.Tensor, ts: Timesteps | Sequence[int],
                            cfg: ScheduleConfig = ScheduleConfig(), *, eta: float = 0.0,
                            generator: torch.Generator | None = None, callback: Callback | None = None) -> torch.Tensor:
    """DPM-Solver++(2M) over Karras' σ (diffusers' use_karras_sigmas=True; the web UIs' "DPM++ 2M
    Karras"): the same solver; only `timesteps("dpm++2m-karras", …)` differs."""
    check_eta("dpm++2m-karras", eta), check_generator(generator)
    return dpm_solver_pp_2m(eps, x, ts, cfg, callback=callback)


def euler(eps: Eps, x: torch.Tensor, ts: Timesteps | Sequence[float], cfg: ScheduleConfig = ScheduleConfig(), *,
          eta: float = 0.0, generator: torch.Generator | None = None, callback: Callback | None = None) -> torch.Tensor:
    """Euler's method on the probability-flow ODE dx/dσ = (x − x0)/σ (Karras et al. 2022, alg. 1
    without churn; k-diffusion's sample_euler; diffusers' EulerDiscreteScheduler). Variance exploding:
    x = x0 + σ·ε, starting from N(0, I)·init_noise_sigma; the UNet sees x/√(σ² + 1)."""
    check_eta("euler", eta), check_generator(generator)
    ts = as_timesteps(ts, cfg)
    for i, t in enumerate(ts):
        s, s_next = ts.sigmas[i], ts.sigmas[i + 1]
        x0 = x - s * eps(x / math.sqrt(s * s + 1), t)
        x = x + (x - x0) / s * (s_next - s)
        x = after_step(callback, i, t, x, x0)
    return x


def euler_ancestral(eps: Eps, x: torch.Tensor, ts: Timesteps | Sequence[float], cfg: ScheduleConfig = ScheduleConfig(),
                    *, eta: float = 0.0, generator: torch.Generator | None = None,
                    callback: Callback | None = None) -> torch.Tensor:
    """Ancestral Euler (k-diffusion's sample_euler_ancestral, diffusers' EulerAncestralDiscreteScheduler):
    from σ an Euler step down to σ_down, then fresh noise of size σ_up, with σ_up² + σ_down² = σ_next²
    and σ_up² = σ_next²(σ² − σ_next²)/σ² (the DDPM posterior's variance in this scale).
    Variance exploding, as `euler`. The noise is drawn every step from `generator` (draw_noise), as
    diffusers draws it, so one seed gives one image."""
    check_eta("euler_a", eta), check_generator(generator)
    ts = as_timesteps(ts, cfg)
    for i, t in enumerate(ts):
        s, s_next = ts.sigmas[i], ts.sigmas[i + 1]
        x0 = x - s * eps(x / math.sqrt(s * s + 1), t)
        s_up = math.sqrt(s_next**2 * (s**2 - s_next**2) / s**2)
        s_down = math.sqrt(s_next**2 - s_up**2)
        x = x + (x - x0) / s * (s_down - s) + draw_noise(x, generator) * s_up
        x = after_step(callback, i, t, x, x0)
    return x


def model_eps(model: Eps, ts: Timesteps, cfg: ScheduleConfig) -> Eps:
    """The samplers' ε from the model's output: the one place a v-prediction model is read (cfg.prediction_type).
    With α = √ᾱ = 1/√(σ² + 1), s = √(1 − ᾱ) at the step's level σ (x_t = α·x0 + s·ε, v = α·ε − s·x0), ε = α·v + s·x_t:
    the model's input x_t is variance preserving for every sampler (Euler's x/√(σ² + 1) too). The k-th call is
    step k's, at ts.sigmas[k] (Karras' σ for dpm++2m-karras, not σ of its rounded timestep, as diffusers' DPM-Solver
    reads v); PLMS's warm-up call and those after it are at integer timesteps, whose level is σ_t. Parity: DDIM,
    DPM-Solver++ and Euler(-a) as diffusers' schedulers in v mode; diffusers' PNDM instead extrapolates the raw v's
    of several steps and converts the result, PLMS here extrapolates the ε's."""
    calls = iter(range(len(ts) + 1))

    def eps(x: torch.Tensor, t: float) -> torch.Tensor:  # ᾱ = α² at the step's level
        a = 1 / (ts.sigmas[k] ** 2 + 1) if (k := next(calls)) < len(ts) and ts.t[k] == t else alphas_cumprod(cfg)[int(t)].item()
        return math.sqrt(a) * model(x, t) + math.sqrt(1 - a) * x
    return model if cfg.prediction_type == "epsilon" else eps


# The samplers' functions; what each is (spacing, timesteps, state, landing, warm-up, η) is its row of
# schedule.ROUTES, under the same name.
SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "ddim": ddim, "plms": plms, "dpm++2m": dpm_solver_pp_2m, "dpm++2m-karras": dpm_solver_pp_2m_karras,
    "euler": euler, "euler_a": euler_ancestral}


def get_sampler(name: str) -> Callable[..., torch.Tensor]:
    """SAMPLERS[name], with a clear error for an unknown name. All share ddim's signature (PLMS adds `warmup`)."""
    route(name)
    return SAMPLERS[name]
