"""Noise schedule: diffusers' `scheduler/scheduler_config.json` → altdiff_min.samplers.ScheduleConfig."""
from __future__ import annotations

from typing import Mapping

from altdiff_min.samplers import ScheduleConfig

# What AltDiffusion's DDIMScheduler config says and altdiff-min implements; other values are refused
# rather than silently sampled with the wrong maths.
SUPPORTED = {"beta_schedule": "scaled_linear", "prediction_type": "epsilon", "clip_sample": False,
             "trained_betas": None, "thresholding": False, "rescale_betas_zero_snr": False}


def config_from_hf(hf: Mapping) -> ScheduleConfig:
    for key, value in SUPPORTED.items():
        if hf.get(key, value) != value:
            raise ValueError(f"scheduler config has {key}={hf[key]!r}; altdiff-min implements {value!r} (AltDiffusion's)")
    default = ScheduleConfig()
    return ScheduleConfig(
        num_train_timesteps=hf.get("num_train_timesteps", default.num_train_timesteps),
        beta_start=hf.get("beta_start", default.beta_start),
        beta_end=hf.get("beta_end", default.beta_end),
        steps_offset=hf.get("steps_offset", default.steps_offset),
        set_alpha_to_one=hf.get("set_alpha_to_one", default.set_alpha_to_one),
    )
