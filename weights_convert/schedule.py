"""Noise schedule: diffusers' `scheduler/scheduler_config.json` → altdiff_min.sampling.samplers.ScheduleConfig.

Every option the file states is either carried, checked to be what altdiff-min implements, or
named in IGNORED with the reason; anything else is refused, so no checkpoint is ever sampled with
maths other than its config asks for. An option the file does not state takes diffusers' default
for the class that wrote it (`defaults`), as `from_config` does, which is not always m9's: DDIM's
clip_sample is True, PNDM runs its Runge–Kutta steps. A class whose defaults are not written
down here is refused.
"""
from __future__ import annotations

import math
from typing import Mapping

from altdiff_min.errors import AltDiffError
from altdiff_min.sampling.schedule import SPACINGS, ScheduleConfig

from .rules import ConversionError

CARRIED = ("num_train_timesteps", "beta_start", "beta_end", "steps_offset", "set_alpha_to_one", "timestep_spacing",
           "prediction_type")  # epsilon or v_prediction: samplers.model_eps reads either
# diffusers' defaults shared by the scheduler classes below, for options a file leaves out.
# set_alpha_to_one None and timestep_spacing None: each sampler's own (see altdiff_min.sampling.samplers).
ABSENT = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
          "steps_offset": 0, "set_alpha_to_one": None, "timestep_spacing": None, "prediction_type": "epsilon"}
# Where a class's own defaults differ from ABSENT or from what altdiff-min implements (diffusers 0.42's
# __init__ defaults; tests/test_convert.py compares them with the installed diffusers). None: a file
# that names no class, read with ABSENT alone.
_OLD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012}  # m9's betas, but with beta_schedule "linear" (LCM: scaled)
CLASS_DEFAULTS: dict[str | None, dict] = {
    None: {}, "DDIMScheduler": {"clip_sample": True}, "DDIMInverseScheduler": {"clip_sample": True},
    "DDIMParallelScheduler": {"clip_sample": True}, "DDPMScheduler": {"clip_sample": True, "variance_type": "fixed_small"},
    "DDPMParallelScheduler": {"clip_sample": True, "variance_type": "fixed_small"},
    "PNDMScheduler": {"skip_prk_steps": False}, "DPMSolverMultistepScheduler": {},
    "DPMSolverSinglestepScheduler": {"lower_order_final": False}, "EulerDiscreteScheduler": {},
    "EulerAncestralDiscreteScheduler": {}, "LMSDiscreteScheduler": {}, "HeunDiscreteScheduler": _OLD_BETAS,
    "KDPM2DiscreteScheduler": _OLD_BETAS, "KDPM2AncestralDiscreteScheduler": _OLD_BETAS,
    "LCMScheduler": {**_OLD_BETAS, "beta_schedule": "scaled_linear"},
    "UniPCMultistepScheduler": {"solver_type": "bh2"},
}
# What AltDiffusion's scheduler configs say and altdiff-min implements (diffusers' defaults). The
# sampler options apply when a config of that scheduler class is re-targeted with from_config.
IMPLEMENTED = {
    "beta_schedule": "scaled_linear", "clip_sample": False, "trained_betas": None,
    "thresholding": False, "rescale_betas_zero_snr": False,
    "skip_prk_steps": True,  # PNDMScheduler: 'plms' is PNDM without its Runge–Kutta steps, as AltDiffusion runs it
    # DPMSolverMultistepScheduler: our dpm++2m is its default configuration.
    "solver_order": 2, "algorithm_type": "dpmsolver++", "solver_type": "midpoint", "lower_order_final": True,
    "euler_at_final": False, "final_sigmas_type": "zero", "lambda_min_clipped": -math.inf, "variance_type": None,
    "use_karras_sigmas": False, "use_lu_lambdas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
    "use_flow_sigmas": False, "use_dynamic_shifting": False, "timestep_type": "discrete",
    "interpolation_type": "linear", "sigma_min": None, "sigma_max": None,
}
# Stated but without effect on what altdiff-min computes, and why.
IGNORED = {
    "_class_name": "every sampler is built from the same schedule, whichever class saved it (its defaults count)",
    "_diffusers_version": "metadata",
    "clip_sample_range": "only used with clip_sample",
    "dynamic_thresholding_ratio": "only used with thresholding",
    "sample_max_value": "only used with thresholding",
    "flow_shift": "only used with flow sigmas",
    "shift_terminal": "only used with flow sigmas",
    "time_shift_type": "only used with use_dynamic_shifting",
}


def defaults(class_name: str | None, name: str = "scheduler_config.json") -> dict:
    """diffusers' defaults for the options a config of scheduler class `class_name` leaves out."""
    if class_name not in CLASS_DEFAULTS:
        known = ", ".join(sorted(k for k in CLASS_DEFAULTS if k))
        raise ConversionError(f"{name}: scheduler class {class_name!r} is not one whose defaults altdiff-min "
                              f"knows ({known})")
    return {**ABSENT, **CLASS_DEFAULTS[class_name]}


def config_from_hf(hf: Mapping, name: str = "scheduler_config.json") -> ScheduleConfig:
    # A config dumped from a loaded scheduler lists the options that were never stated; drop them.
    unstated = set(hf.get("_use_default_values", ()))
    stated = {k: v for k, v in hf.items() if k not in unstated and k != "_use_default_values"}
    options = {**defaults(hf.get("_class_name"), name), **stated}
    for key, value in options.items():
        if key in CARRIED or key in IGNORED:
            continue
        if key not in IMPLEMENTED:
            raise ConversionError(f"{name}: scheduler option {key!r} (= {value!r}) is not implemented by altdiff-min")
        if value != IMPLEMENTED[key] and not (value == "-inf" and IMPLEMENTED[key] == -math.inf):
            why = "" if key in stated else f" (not stated, so diffusers' default for {hf.get('_class_name') or 'any scheduler'})"
            hint = "; use the sampler 'dpm++2m-karras' instead" if key == "use_karras_sigmas" else ""
            raise ConversionError(f"{name}: {key}={value!r}{why} is not implemented by altdiff-min "
                                  f"(it implements {IMPLEMENTED[key]!r}, AltDiffusion's){hint}")
    if options["timestep_spacing"] not in SPACINGS + (None,):
        raise ConversionError(f"{name}: timestep_spacing={options['timestep_spacing']!r} is not one of "
                              f"{', '.join(SPACINGS)}")
    try:
        return ScheduleConfig(**{k: options[k] for k in CARRIED})
    except AltDiffError as e:
        raise ConversionError(f"{name}: {e}") from None


def config_to_hf(cfg: ScheduleConfig) -> dict:
    """config_from_hf backwards: scheduler/scheduler_config.json for our schedule, as m9's DDIMScheduler
    (the options AltDiffusion's samplers implement stated, so that from_config into another class keeps
    them; a None of ours is diffusers' per-class default, so it is left unstated)."""
    options = {k: getattr(cfg, k) for k in CARRIED if getattr(cfg, k) is not None}
    fixed = {k: IMPLEMENTED[k] for k in ("beta_schedule", "clip_sample", "trained_betas", "thresholding")}
    return {"_class_name": "DDIMScheduler", **options, **fixed}  # prediction_type: CARRIED
