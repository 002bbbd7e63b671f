"""Guidance: how the sampler's ε is made from the UNet's ε(x, ∅) and ε(x, c). The one place it lives.

    guided_eps(denoise, context, scale, rule) the ε callable every sampler takes
    rule: CFG() (default)                    ε = ε∅ + s·(εc − ε∅)         Ho & Salimans 2022, eq. 6
          CFGRescale(phi=0.7)                the CFG result rescaled to εc's standard deviation, mixed by φ
                                             (Lin et al. 2024, §3.4, eqs. 15–16; diffusers' rescale_noise_cfg)
          GuidanceInterval(low, high)        CFG only at timesteps low ≤ t ≤ high, εc alone elsewhere
                                             (Kynkäänniemi et al. 2024); outside, the UNet runs the
                                             conditional half only
    guidance_rule("rescale:0.7")             a rule from its text form (CLI --guidance, sweep specs,
                                             manifests): "cfg", "rescale[:PHI]", "interval:LOW,HIGH"

A rule is a small class: `guides(t)` says whether step t needs the unconditional half, `combine`
mixes the two. Write another by subclassing Rule; pass it as generate(..., guidance=rule).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from ..errors import BadType, BadValue

Scale = float | Callable[[float], float]  # a guidance scale, or one per timestep t
# One UNet evaluation (x, t, context, guided) → ε; guided: the batch is the guidance pair [∅; c]
# (AltDiffusion.denoise, which tells attention controllers so).
Denoiser = Callable[[torch.Tensor, float, "torch.Tensor | None", bool], torch.Tensor]


class Rule:
    """CFG's combination by default; subclasses change `combine` or `guides`."""

    def guides(self, t: float) -> bool:
        """Whether the step at timestep t is guided (else ε = ε(x, c), one UNet half)."""
        return True

    def combine(self, e_uncond: torch.Tensor, e_cond: torch.Tensor, scale: float, t: float) -> torch.Tensor:
        return e_uncond + scale * (e_cond - e_uncond)

    def __str__(self) -> str:
        return "cfg"

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and str(other) == str(self)

    def __hash__(self) -> int:
        return hash(str(self))


class CFG(Rule):
    """Classifier-free guidance as written (Ho & Salimans 2022, eq. 6)."""


class CFGRescale(Rule):
    """CFG, then rescaled so its standard deviation (per picture, over channels and pixels) is εc's,
    and mixed with the plain CFG result: φ·rescaled + (1 − φ)·cfg (Lin et al. 2024, eqs. 15–16; φ = 0.7
    in the paper). It counters the over-exposure strong guidance gives; diffusers applies it to ε as here."""

    def __init__(self, phi: float = 0.7):
        if isinstance(phi, bool) or not isinstance(phi, (int, float)) or not 0 <= phi <= 1:
            raise BadValue(f"guidance rescale φ must be a number in [0, 1], got {phi!r}")
        self.phi = float(phi)

    def combine(self, e_uncond, e_cond, scale, t):
        cfg = super().combine(e_uncond, e_cond, scale, t)
        dims = list(range(1, cfg.ndim))
        rescaled = cfg * (e_cond.std(dim=dims, keepdim=True) / cfg.std(dim=dims, keepdim=True))
        return self.phi * rescaled + (1 - self.phi) * cfg

    def __str__(self) -> str:
        return f"rescale:{number(self.phi)}"


class GuidanceInterval(Rule):
    """Guidance only on an interval of the route: CFG where low ≤ t ≤ high (training timesteps, 0 the
    clean end), ε(x, c) alone elsewhere (Kynkäänniemi et al. 2024 limit it to the middle noise levels:
    early guidance drags every sample toward one mode, late guidance does little)."""

    def __init__(self, low: float, high: float):
        for name, v in (("low", low), ("high", high)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise BadValue(f"guidance interval {name} must be a finite number (a timestep), got {v!r}")
        if not 0 <= low <= high:
            raise BadValue(f"guidance interval must have 0 ≤ low ≤ high (timesteps), got low {low}, high {high}")
        self.low, self.high = float(low), float(high)

    def guides(self, t):
        return self.low <= t <= self.high

    def __str__(self) -> str:
        return f"interval:{number(self.low)},{number(self.high)}"


RULES = {"cfg": CFG, "rescale": CFGRescale, "interval": GuidanceInterval}


def number(x: float) -> str:
    """The shortest text that reads back as exactly `x` ("0.7", "300"): a rule's text is its record."""
    return str(int(x)) if x == int(x) else repr(x)


def guidance_rule(spec: str | Rule | None, where: str = "guidance") -> Rule:
    """A Rule from itself, None (CFG) or its text: "cfg", "rescale" / "rescale:0.7", "interval:200,800".
    `where` names the argument in errors (the CLI's --guidance, a sweep cell's guidance)."""
    if spec is None:
        return CFG()
    if isinstance(spec, Rule):
        return spec
    if not isinstance(spec, str):
        raise BadType(f"{where} must be a rule (altdiff_min.sampling.guidance.Rule) or its text such as 'rescale:0.7', got {spec!r}")
    name, _, args = spec.partition(":")
    if name not in RULES:
        raise BadValue(f"{where} {spec!r}: unknown rule {name!r}; choose cfg, rescale[:PHI] or interval:LOW,HIGH")
    try:
        numbers = [float(a) for a in args.split(",")] if args else []
    except ValueError:
        raise BadValue(f"{where} {spec!r}: {args!r} is not a comma-separated list of numbers") from None
    wanted = {"cfg": (0, 0), "rescale": (0, 1), "interval": (2, 2)}[name]
    if not wanted[0] <= len(numbers) <= wanted[1]:
        raise BadValue(f"{where} {spec!r}: {name} takes {'no number' if wanted[1] == 0 else 'φ' if name == 'rescale' else 'LOW,HIGH'}")
    return RULES[name](*numbers)


def guided_eps(denoise: Denoiser, context: torch.Tensor | None, scale: Scale, rule: Rule | None = None
               ) -> Callable[[torch.Tensor, float], torch.Tensor]:
    """ε for the sampler. context holds the unconditional rows first, then the conditional ones; both
    halves go through the UNet in one batch (`denoise(..., guided=True)`). With scale 1, context is
    only the conditional rows and ε = ε(x, c). Any other scale is taken as written, as FlagAI's (ldm's)
    samplers take it: 0 is the negative prompt alone, between 0 and 1 a mix, below 0 away from the
    prompt; diffusers instead skips guidance for every scale ≤ 1 (ε(x, c)), so only scales > 1 and
    exactly 1 give its pictures."""
    rule = rule or CFG()
    if not callable(scale) and scale == 1:
        return lambda x, t: denoise(x, t, context, False)

    def eps(x: torch.Tensor, t: float) -> torch.Tensor:
        if not rule.guides(float(t)):
            return denoise(x, t, context[len(x):], False)  # the conditional rows only
        e_uncond, e_cond = denoise(torch.cat([x, x]), t, context, True).chunk(2)
        return rule.combine(e_uncond, e_cond, scale(t) if callable(scale) else scale, float(t))

    return eps
