"""Sampler parity with diffusers' schedulers, built as users build them: `Cls.from_config(config)` of
the model's DDIM scheduler config, once as m9's hub file has it (no `timestep_spacing`) and once with
each spacing stated (as current diffusers saves it), driven by the same fake ε model.

Every intermediate latent (and the x0 each step exposes) is compared, in fp32 on the CPU, with
‖ours − ref‖/‖ref‖ < 1e-5 per latent."""
import math

import numpy as np
import pytest
import torch
from helpers import SCHEDULER, rel_err
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, PNDMScheduler)

from altdiff_min.apps.cli import SAMPLER_NAMES
from altdiff_min.errors import BadValue
from altdiff_min.sampling.samplers import SAMPLERS, get_sampler
from altdiff_min.sampling.schedule import ScheduleConfig, Timesteps, add_noise, alphas_cumprod, init_noise_sigma, timesteps

TOL = 1e-5
M9 = {k: v for k, v in SCHEDULER.items() if k != "_class_name"}  # m9's scheduler_config.json: no timestep_spacing
SPACINGS = [None, "leading", "linspace", "trailing"]  # None: the key is absent from the config
STEPS = [1, 2, 7, 10, 25, 50, 999]  # 7 does not divide 1000; 999 needs the schedule's every timestep but one
# The diffusers scheduler behind each of our samplers, and what from_config is given besides the config.
REFERENCE = {"ddim": (DDIMScheduler, {}), "plms": (PNDMScheduler, {"skip_prk_steps": True}),
             "dpm++2m": (DPMSolverMultistepScheduler, {}),
             "dpm++2m-karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
             "euler": (EulerDiscreteScheduler, {}), "euler_a": (EulerAncestralDiscreteScheduler, {})}

g = torch.Generator().manual_seed(0)
LATENTS = torch.randn(2, 4, 6, 10, generator=g)  # batch 2, non-square
FIXED = torch.randn(2, 4, 6, 10, generator=g)


def fake_eps(x: torch.Tensor, t) -> torch.Tensor:
    """Deterministic, nonlinear in x and in t; t may be a number (ours) or a 0-d tensor (diffusers)."""
    t = float(t)
    return 0.5 * torch.tanh(x) * math.cos(t / 300) + 0.1 * math.sin(t) + 0.3 * (t / 1000) * FIXED


def config(spacing: str | None, **changes) -> dict:
    return {**M9, **changes} if spacing is None else {**M9, "timestep_spacing": spacing, **changes}


def reference(name: str, cfg: dict):
    """The scheduler a diffusers user gets: the model's scheduler loaded, then re-targeted (model card)."""
    cls, extra = REFERENCE[name]
    return cls.from_config(DDIMScheduler.from_config(cfg).config, **extra)


def ours_config(spacing: str | None) -> ScheduleConfig:
    return ScheduleConfig(timestep_spacing=spacing)


def reference_run(name: str, sch, x: torch.Tensor, seed: int | None = None, eta: float = 0.0, start: int = 0):
    """diffusers' loop from timesteps[start:]: [(t, latents after the step, x0 of the step)]; PLMS's
    warm-up output is dropped."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    kw = {"generator": gen} if name == "euler_a" else {"eta": eta, "generator": gen} if name == "ddim" else {}
    used = []
    if name == "plms":  # PNDM exposes no x0: record (x, t, ε') at each of its updates to compute it
        prev_sample = sch._get_prev_sample
        sch._get_prev_sample = lambda s, t, t_prev, e: used.append((s, t, e)) or prev_sample(s, t, t_prev, e)
    out = []
    for t in sch.timesteps[start:]:
        step = sch.step(fake_eps(sch.scale_model_input(x, t), t), t, x, **kw)
        x = step.prev_sample
        if name == "plms":
            sample, t_from, e = used[-1]
            ac = sch.alphas_cumprod.double()[t_from]
            x0 = (sample.double() - (1 - ac).sqrt() * e.double()) / ac.sqrt()
        else:
            x0 = sch.model_outputs[-1] if name.startswith("dpm") else step.pred_original_sample
        out.append((float(t), x, x0))
    if name == "plms" and len(out) > 1:  # 981, 961, 961, 941 …: outputs 1, 2, … are our steps 0, 1, … at 981, 961, …
        out = [(t, x, x0) for (t, _, _), (_, x, x0) in zip(out[:1] + out[2:], out[1:])]
    return out


def run_ours(name: str, ts: Timesteps, cfg: ScheduleConfig, x: torch.Tensor, seed: int | None = None, eta: float = 0.0):
    traj = []
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    out = SAMPLERS[name](fake_eps, x.clone(), ts, cfg, eta=eta, generator=gen, callback=lambda *a: traj.append(a))
    assert out is traj[-1][2] and [i for i, *_ in traj] == list(range(len(ts)))
    return traj


def assert_same_run(ours, ref):
    assert len(ours) == len(ref)
    for (i, t, x, x0), (t_ref, x_ref, x0_ref) in zip(ours, ref):
        assert t == t_ref, f"timestep of step {i}"
        assert rel_err(x, x_ref) < TOL, f"latent after step {i} (t={t})"
        assert rel_err(x0, x0_ref) < TOL, f"x0 at step {i} (t={t})"


def diffusers_route_is_illegal(name: str, sch) -> bool:
    """Why we refuse a step count: diffusers' timesteps leave [0, T−1] or repeat (a step of size 0)."""
    ts = sch.timesteps.double().numpy()
    if name == "plms" and len(ts) > 1:
        ts = np.concatenate([ts[:1], ts[2:]])
    return bool(ts.min() < 0 or ts.max() > 999 or np.any(np.diff(ts) >= 0))


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("spacing", SPACINGS, ids=lambda s: s or "absent")
@pytest.mark.parametrize("name", list(REFERENCE))
def test_every_step_matches_diffusers(name, spacing, steps):
    sch, cfg = reference(name, config(spacing)), ours_config(spacing)
    sch.set_timesteps(steps)
    try:
        ts = timesteps(name, steps, cfg)
    except ValueError as e:
        assert "is not possible" in str(e) and diffusers_route_is_illegal(name, sch), e
        return
    x = LATENTS * init_noise_sigma(name, ts, cfg)
    assert float(sch.init_noise_sigma) == pytest.approx(init_noise_sigma(name, ts, cfg), rel=1e-6)
    assert_same_run(run_ours(name, ts, cfg, x, seed=3), reference_run(name, sch, x.clone(), seed=3))


def test_the_spacing_a_config_states_applies_to_every_sampler():
    """The reported bug: a re-saved config states "leading", and DPM-Solver must then space by it."""
    for name in REFERENCE:
        for spacing in SPACINGS:
            sch = reference(name, config(spacing))
            sch.set_timesteps(25)
            ours = timesteps(name, 25, ours_config(spacing))
            want = sch.timesteps.tolist()
            assert list(ours.t) == (want[:1] + want[2:] if name == "plms" else want), (name, spacing)
    resaved = timesteps("dpm++2m", 25, ours_config("leading"))
    assert resaved.t[:2] == (951, 913) and timesteps("dpm++2m", 25).t[:2] == (999, 959)


@pytest.mark.parametrize("steps", [1, 5, 50, 333])
@pytest.mark.parametrize("eta", [0.5, 1.0])
@pytest.mark.parametrize("spacing", SPACINGS, ids=lambda s: s or "absent")
def test_ddim_with_eta_draws_noise_as_diffusers(spacing, eta, steps):
    sch, cfg = reference("ddim", config(spacing)), ours_config(spacing)
    sch.set_timesteps(steps)
    ts = timesteps("ddim", steps, cfg)
    assert_same_run(run_ours("ddim", ts, cfg, LATENTS, seed=1, eta=eta),
                    reference_run("ddim", sch, LATENTS.clone(), seed=1, eta=eta))


@pytest.mark.parametrize("set_alpha_to_one", [True, False, None])
@pytest.mark.parametrize("name", ["ddim", "plms"])
def test_final_alpha(name, set_alpha_to_one):
    """None: the config does not say, and diffusers' DDIM (1) and PNDM (ᾱ_0) defaults differ."""
    hub = config(None) if set_alpha_to_one is None else config(None, set_alpha_to_one=set_alpha_to_one)
    hub.pop("set_alpha_to_one", None) if set_alpha_to_one is None else None
    sch, cfg = reference(name, hub), ScheduleConfig(set_alpha_to_one=set_alpha_to_one)
    sch.set_timesteps(10)
    assert_same_run(run_ours(name, timesteps(name, 10, cfg), cfg, LATENTS), reference_run(name, sch, LATENTS.clone()))


@pytest.mark.parametrize("start", [1, 6])
@pytest.mark.parametrize("spacing", SPACINGS, ids=lambda s: s or "absent")
@pytest.mark.parametrize("name", [n for n in REFERENCE if n != "plms"])
def test_a_run_can_start_part_way(name, spacing, start):
    """ts[k:] is diffusers' img2img: the scheduler's timesteps[k:] with set_begin_index(k).
    (PLMS is left out: diffusers' PNDM keeps a step counter that a cut list does not reset.)"""
    sch, cfg = reference(name, config(spacing)), ours_config(spacing)
    sch.set_timesteps(10)
    ts = timesteps(name, 10, cfg)[start:]
    assert len(ts) == 10 - start and ts.t == tuple(sch.timesteps.tolist()[start:])
    if hasattr(sch, "set_begin_index"):
        sch.set_begin_index(start)
    x = LATENTS * 3.0
    assert_same_run(run_ours(name, ts, cfg, x, seed=2), reference_run(name, sch, x.clone(), seed=2, start=start))


@pytest.mark.parametrize("name,scheduler", [("dpm++2m", DPMSolverMultistepScheduler), ("euler", EulerDiscreteScheduler)])
def test_a_plain_list_of_timesteps(name, scheduler):
    """Any descending list works; diffusers' custom `timesteps=` is the reference where it has one."""
    custom = [999, 700, 420, 180, 40]
    sch = scheduler.from_config(DDIMScheduler.from_config(M9).config)
    sch.set_timesteps(timesteps=custom)
    assert_same_run(run_ours(name, custom, ScheduleConfig(), LATENTS), reference_run(name, sch, LATENTS.clone()))
    ddim = run_ours("ddim", [999, 500, 1], ScheduleConfig(), LATENTS)
    assert [t for _, t, *_ in ddim] == [999, 500, 1]


@pytest.mark.parametrize("t", [0, 1, 500, 999, torch.tensor([3, 990])], ids=["0", "1", "500", "999", "per-sample"])
def test_add_noise_is_the_forward_process(t):
    x0, noise = torch.randn(2, 4, 6, 10, generator=g), torch.randn(2, 4, 6, 10, generator=g)
    expected = DDPMScheduler.from_config(M9).add_noise(x0, noise, torch.as_tensor(t).expand(2))
    assert rel_err(add_noise(x0, noise, t), expected) < 1e-6


def test_schedule_matches_diffusers():
    assert torch.equal(alphas_cumprod(ScheduleConfig()), DDIMScheduler.from_config(M9).alphas_cumprod)


@pytest.mark.parametrize("name,calls", [("ddim", 50), ("plms", 51), ("dpm++2m", 50), ("dpm++2m-karras", 50),
                                        ("euler", 50), ("euler_a", 50)])
def test_model_calls(name, calls):
    """Any callable works as `eps`; PLMS's warm-up costs one extra call."""
    seen = []
    SAMPLERS[name](lambda x, t: seen.append(t) or fake_eps(x, t), LATENTS.clone(), timesteps(name, 50))
    assert len(seen) == calls and all(isinstance(t, (int, float)) for t in seen)


def test_one_table_names_every_sampler():
    """The command line, the functions and the routes' table (schedule.ROUTES) name the same samplers."""
    from altdiff_min.sampling.schedule import ROUTES

    assert sorted(SAMPLER_NAMES) == sorted(SAMPLERS) == sorted(ROUTES)


def never_called(x, t):
    raise AssertionError("the model must not be called when the arguments are bad")


@pytest.mark.parametrize("name,steps,spacing,error,match", [
    ("ddim", 0, None, ValueError, r"steps must be in \[1, 1000\]"),
    ("plms", -3, None, ValueError, r"steps must be in \[1, 1000\]"),
    ("euler", 1001, None, ValueError, r"steps must be in \[1, 1000\]"),
    ("ddim", 1000, None, ValueError, r"steps=1000 is not possible for ddim with 'leading' spacing.*timestep 1000"),
    ("dpm++2m", 1000, None, ValueError, r"steps=1000 is not possible for dpm\+\+2m with 'linspace'.*same timestep"),
    ("dpm++2m", 999, "leading", ValueError, r"steps=999 is not possible for dpm\+\+2m with 'leading'"),
    ("ddim", 2.5, None, TypeError, "steps must be an int"),
    ("plms", True, None, TypeError, "steps must be an int"),
    ("euler_a", "25", None, TypeError, "steps must be an int"),
    ("karras", 25, None, ValueError, "unknown sampler 'karras'"),
])
def test_bad_steps(name, steps, spacing, error, match):
    with pytest.raises(error, match=match):
        timesteps(name, steps, ours_config(spacing))


@pytest.mark.parametrize("name,eta,error,match", [
    ("ddim", -0.1, ValueError, r"eta must be in \[0, 1\]"),
    ("ddim", 1.5, ValueError, r"eta must be in \[0, 1\]"),
    ("ddim", float("nan"), ValueError, r"eta must be in \[0, 1\]"),
    ("ddim", "0.5", TypeError, "eta must be a number"),
    ("plms", 0.5, ValueError, "plms is deterministic: eta must be 0"),
    ("dpm++2m", 1.0, ValueError, r"dpm\+\+2m is deterministic: eta must be 0"),
    ("dpm++2m-karras", 1.0, ValueError, r"dpm\+\+2m-karras is deterministic: eta must be 0"),
    ("euler", 0.3, ValueError, "euler is deterministic: eta must be 0"),
    ("euler_a", 1.0, ValueError, "euler_a draws its own noise at every step: eta must be 0"),
])
def test_bad_eta(name, eta, error, match):
    with pytest.raises(error, match=match):
        SAMPLERS[name](never_called, LATENTS.clone(), timesteps(name, 10), eta=eta)


@pytest.mark.parametrize("generator", [[torch.Generator()], 42, "x"])
def test_bad_generator(generator):
    """Every sampler, drawing noise or not: one torch.Generator or None, checked before the first model call."""
    for name in SAMPLERS:
        with pytest.raises(TypeError, match="generator must be a torch.Generator or None"):
            SAMPLERS[name](never_called, LATENTS.clone(), timesteps(name, 10), generator=generator)


@pytest.mark.parametrize("ts,error,match", [
    ([500, 700], ValueError, r"the timesteps go up \(500 then 700\); they must descend, from the noisiest"),
    ([999, 500, 500, 700], ValueError, r"the timesteps go up \(500 then 700\)"),  # the order is named first
    ([999, 999], ValueError, "two steps land on the same timestep"),
    ([1200, 3], ValueError, r"outside the schedule's \[0, 999\]"),
    ([], ValueError, "non-empty"),
    (50, TypeError, "list of numbers"),
    (["999"], TypeError, "list of numbers"),
    ([999, float("nan")], ValueError, "finite"),
])
def test_bad_timestep_lists(ts, error, match):
    for name in SAMPLERS:
        with pytest.raises(error, match=match):
            SAMPLERS[name](never_called, LATENTS.clone(), ts)


def test_ddim_needs_integer_timesteps():
    with pytest.raises(ValueError, match="integer timesteps"):
        SAMPLERS["ddim"](never_called, LATENTS.clone(), timesteps("euler", 7))  # 999, 832.5, …


@pytest.mark.parametrize("lookup", [get_sampler, lambda name: timesteps(name, 50)])
def test_unknown_sampler(lookup):
    with pytest.raises(ValueError, match=r"unknown sampler 'heun'; choose one of \['ddim', 'dpm\+\+2m', "
                                         r"'dpm\+\+2m-karras', 'euler', 'euler_a', 'plms'\]"):
        lookup("heun")


@pytest.mark.parametrize("returned,match", [
    (lambda x: x[..., :2], r"latents of shape \(1, 4, 2, 3\), got \(1, 4, 2, 2\)"),
    (lambda x: "x", "got str"),
    (lambda x: x.double(), "as it got them, torch.float32 on cpu, got torch.float64 on cpu"),
])
def test_what_a_callback_returns_is_checked(returned, match):
    from altdiff_min.sampling.samplers import after_step

    x = torch.randn(1, 4, 2, 3)
    assert after_step(lambda i, t, x, x0: None, 0, 999.0, x, x) is x
    with pytest.raises(BadValue, match=match) as e:
        after_step(lambda i, t, x, x0: returned(x), 0, 999.0, x, x)
    assert "\n" not in str(e.value)


# ---- v-prediction: the same fake model's output read as v (samplers.model_eps) -------------------------------

V_STEPS = [1, 7, 25, 50]


@pytest.mark.parametrize("steps", V_STEPS)
@pytest.mark.parametrize("spacing", [None, "trailing"], ids=lambda s: s or "absent")
@pytest.mark.parametrize("name", [n for n in REFERENCE if n != "plms"])
def test_v_prediction_matches_diffusers(name, spacing, steps):
    """diffusers' scheduler with prediction_type="v_prediction" and ours over model_eps(v-model): every
    latent and x0 within 1e-5 (Karras' σ, Euler's fractional timesteps and η-free Euler-a noise included)."""
    from altdiff_min.sampling.samplers import model_eps

    sch = reference(name, config(spacing, prediction_type="v_prediction"))
    cfg = ScheduleConfig(timestep_spacing=spacing, prediction_type="v_prediction")
    sch.set_timesteps(steps)
    ts = timesteps(name, steps, cfg)
    x = LATENTS * init_noise_sigma(name, ts, cfg)
    traj, gen = [], torch.Generator().manual_seed(3)
    SAMPLERS[name](model_eps(fake_eps, ts, cfg), x.clone(), ts, cfg, generator=gen, callback=lambda *a: traj.append(a))
    assert_same_run(traj, reference_run(name, sch, x.clone(), seed=3))


def test_v_prediction_conversion_is_the_velocity_identity():
    """ε = √ᾱ·v + √(1−ᾱ)·x_t inverts diffusers' get_velocity: a model answering the true v of (x0, ε)
    gives back ε at every step's level (DDIM's integer t, Euler's fractional one, Karras' σ), and PLMS
    (whose diffusers scheduler converts after extrapolating, so no parity there) reads the same ε as DDIM."""
    from altdiff_min.sampling.samplers import model_eps

    cfg = ScheduleConfig(prediction_type="v_prediction")
    ddpm = DDPMScheduler.from_config(config(None, prediction_type="v_prediction"))
    x0 = FIXED.clone()
    for name in REFERENCE:
        ts = timesteps(name, 10, cfg)
        for k, (t, sigma) in enumerate(zip(ts.t, ts.sigmas)):
            alpha = 1 / math.sqrt(sigma * sigma + 1)
            x_t = alpha * x0 + sigma * alpha * LATENTS
            if name in ("ddim", "plms"):  # the integer timestep's own ᾱ: diffusers' get_velocity
                v = ddpm.get_velocity(x0, LATENTS, torch.tensor([int(t)]).repeat(2))
            else:
                v = alpha * LATENTS - sigma * alpha * x0
            eps = model_eps(lambda x, t, v=v: v, ts, cfg)
            for earlier in ts.t[:k]:  # the k-th call is step k's
                eps(x_t, earlier)
            assert rel_err(eps(x_t, t), LATENTS) < TOL, (name, k)
    assert model_eps(fake_eps, timesteps("ddim", 3), ScheduleConfig()) is fake_eps  # ε-models are untouched
