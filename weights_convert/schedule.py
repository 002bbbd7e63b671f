"""Noise schedule: diffusers' `scheduler/scheduler_config.json` → altdiff_min.samplers.ScheduleConfig.

Every option the file states is either carried, checked to be what altdiff-min implements, or
named in IGNORED with the reason; anything else is refused, so no checkpoint is ever sampled with
maths other than its config asks for. An option the file does not state takes diffusers' default,
as `from_config` does (ABSENT), which is not always m9's.
"""
from __future__ import annotations

import math
from typing import Mapping

from altdiff_min.errors import AltDiffError
from altdiff_min.schedule import SPACINGS, ScheduleConfig

from .rules import ConversionError

CARRIED = ("num_train_timesteps", "beta_start", "beta_end", "steps_offset", "set_alpha_to_one", "timestep_spacing")
# diffusers' defaults (the same in DDIM, PNDM, DPM-Solver and Euler) for options a file leaves out.
# set_alpha_to_one None and timestep_spacing None: each sampler's own (see altdiff_min.samplers).
ABSENT = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
          "steps_offset": 0, "set_alpha_to_one": None, "timestep_spacing": None}
# What AltDiffusion's scheduler configs say and altdiff-min implements (diffusers' defaults). The
# sampler options apply when a config of that scheduler class is re-targeted with from_config.
IMPLEMENTED = {
    "beta_schedule": "scaled_linear", "prediction_type": "epsilon", "clip_sample": False, "trained_betas": None,
    "thresholding": False, "rescale_betas_zero_snr": False,
    # DPMSolverMultistepScheduler: our dpm++2m is its default configuration.
    "solver_order": 2, "algorithm_type": "dpmsolver++", "solver_type": "midpoint", "lower_order_final": True,
    "euler_at_final": False, "final_sigmas_type": "zero", "lambda_min_clipped": -math.inf, "variance_type": None,
    "use_karras_sigmas": False, "use_lu_lambdas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
    "use_flow_sigmas": False, "use_dynamic_shifting": False, "timestep_type": "discrete",
    "interpolation_type": "linear", "sigma_min": None, "sigma_max": None,
}
# Stated but without effect on what altdiff-min computes, and why.
IGNORED = {
    "_class_name": "every sampler is built from the same schedule, whichever class saved it",
    "_diffusers_version": "metadata",
    "skip_prk_steps": "'plms' is PNDM without its Runge–Kutta steps, as AltDiffusion runs it",
    "clip_sample_range": "only used with clip_sample",
    "dynamic_thresholding_ratio": "only used with thresholding",
    "sample_max_value": "only used with thresholding",
    "flow_shift": "only used with flow sigmas",
    "shift_terminal": "only used with flow sigmas",
    "time_shift_type": "only used with use_dynamic_shifting",
}


def config_from_hf(hf: Mapping, name: str = "scheduler_config.json") -> ScheduleConfig:
    # A config dumped from a loaded scheduler lists the options that were never stated; drop them.
    defaults = set(hf.get("_use_default_values", ()))
    stated = {k: v for k, v in hf.items() if k not in defaults and k != "_use_default_values"}
    options = {**ABSENT, **stated}
    for key, value in options.items():
        if key in CARRIED or key in IGNORED:
            continue
        if key not in IMPLEMENTED:
            raise ConversionError(f"{name}: scheduler option {key!r} (= {value!r}) is not implemented by altdiff-min")
        if value != IMPLEMENTED[key] and not (value == "-inf" and IMPLEMENTED[key] == -math.inf):
            why = "" if key in stated else " (not stated, so diffusers' default)"
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
