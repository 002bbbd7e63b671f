"""Sampler parity with diffusers' DDIMScheduler, PNDMScheduler(skip_prk_steps=True) and
DPMSolverMultistepScheduler.from_config(m9's DDIM config), driven by the same fake ε model.

Every intermediate latent (and the x0 each step exposes) is compared, in fp32 on the CPU, with
‖ours − ref‖/‖ref‖ < 1e-5 per latent."""
import math

import pytest
import torch
from conftest import rel_err
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler

from altdiff_min.samplers import SAMPLERS, ScheduleConfig, alphas_cumprod, get_sampler, timesteps

TOL = 1e-5
# m9's scheduler_config.json, with every value the installed diffusers might default differently
# passed explicitly. It has no `timestep_spacing` key (it predates it): see test_dpm_spacing_*.
M9 = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
          trained_betas=None, clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
STEPS = [1, 2, 7, 25, 50, 333, 999]  # 7, 333 do not divide 1000; 999 is the most a 1000-step schedule allows

g = torch.Generator().manual_seed(0)
LATENTS = torch.randn(2, 4, 6, 10, generator=g)  # batch 2, non-square
FIXED = torch.randn(2, 4, 6, 10, generator=g)


def fake_eps(x: torch.Tensor, t) -> torch.Tensor:
    """Deterministic, nonlinear in x and in t; t may be an int (ours) or a 0-d tensor (diffusers)."""
    t = int(t)
    return 0.5 * torch.tanh(x) * math.cos(t / 300) + 0.1 * math.sin(t) + 0.3 * (t / 1000) * FIXED


def reference(name: str):
    ddim = DDIMScheduler.from_config(M9)
    if name == "ddim":
        return ddim
    if name == "plms":
        return PNDMScheduler.from_config(M9, skip_prk_steps=True)
    return DPMSolverMultistepScheduler.from_config(ddim.config)  # as the model card does


def run_ours(name: str, steps: int, **kw) -> list[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """[(i, t, x after step i, x0 of step i)] from the callback; also checks the returned latents."""
    traj = []
    out = SAMPLERS[name](fake_eps, LATENTS.clone(), steps, callback=lambda *a: traj.append(a), **kw)
    assert out is traj[-1][2] and [(i, t) for i, t, _, _ in traj] == list(enumerate(timesteps(name, steps)))
    return traj


def test_schedule_matches_diffusers():
    assert torch.equal(alphas_cumprod(ScheduleConfig()), DDIMScheduler.from_config(M9).alphas_cumprod)


def test_timesteps_match_diffusers_for_every_step_count():
    ddim, plms, dpm = reference("ddim"), reference("plms"), reference("dpm++2m")
    for n in range(1, 1000):
        for sch in ddim, plms, dpm:
            sch.set_timesteps(n)
        # PNDM repeats its second timestep for the warm-up's second model call (n > 1): 981, 961, 961, 941, …
        pndm = plms.timesteps.tolist()
        assert pndm == timesteps("plms", n)[:2] + timesteps("plms", n)[1:]
        assert ddim.timesteps.tolist() == timesteps("ddim", n) == timesteps("plms", n)
        assert dpm.timesteps.tolist() == timesteps("dpm++2m", n)
    assert timesteps("ddim", 50)[:2] == [981, 961] and timesteps("ddim", 50)[-1] == 1
    assert timesteps("dpm++2m", 25)[:2] == [999, 959] and timesteps("dpm++2m", 25)[-1] == 40


def test_dpm_spacing_from_m9_config():
    """from_config drops settings the source config only has as defaults: m9's json never set
    timestep_spacing, so DPM gets its own default "linspace" (steps_offset 1 passes but is unused).
    Had the DDIM config set "leading" explicitly, DPM would space by 1000 // (n + 1) instead."""
    dpm = reference("dpm++2m")
    assert (dpm.config.timestep_spacing, dpm.config.steps_offset) == ("linspace", 1)
    explicit = DPMSolverMultistepScheduler.from_config(DDIMScheduler(**M9, timestep_spacing="leading").config)
    explicit.set_timesteps(25)
    assert explicit.timesteps.tolist()[:2] == [951, 913] != timesteps("dpm++2m", 25)[:2]


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("eta,seed", [(0.0, None), (0.5, 1), (1.0, 2)])
def test_ddim_matches_diffusers(steps, eta, seed):
    """Every latent and every predicted x0; with η > 0 both draw their noise from equal generators."""
    ours = run_ours("ddim", steps, eta=eta, generator=seed and torch.Generator().manual_seed(seed))
    sch, x = reference("ddim"), LATENTS.clone()
    sch.set_timesteps(steps)
    gen = seed and torch.Generator().manual_seed(seed)
    for (i, t, x_ours, x0_ours), t_ref in zip(ours, sch.timesteps, strict=True):
        out = sch.step(fake_eps(x, t_ref), t_ref, x, eta=eta, generator=gen)
        x = out.prev_sample
        assert rel_err(x_ours, x) < TOL, f"latent after step {i} (t={t})"
        assert rel_err(x0_ours, out.pred_original_sample) < TOL, f"x0 at step {i} (t={t})"


@pytest.mark.parametrize("steps", STEPS)
def test_plms_matches_diffusers(steps):
    """diffusers makes S + 1 calls to step(); its first output is the warm-up's Euler estimate, an
    internal value we do not expose, so ours[i] is compared with its output i + 1 (n > 1).
    The x0 reference is the DDIM "predicted x0" for the combined ε' diffusers actually used,
    captured at its `_get_prev_sample`."""
    ours = run_ours("plms", steps)
    sch, x, used = reference("plms"), LATENTS.clone(), []
    get_prev_sample = sch._get_prev_sample

    def spy(sample, t, t_prev, e):  # records (x_t, t, ε') of every update diffusers makes
        used.append((sample, int(t), e))
        return get_prev_sample(sample, t, t_prev, e)

    sch._get_prev_sample = spy
    sch.set_timesteps(steps)
    latents = []
    for t in sch.timesteps:
        x = sch.step(fake_eps(x, t), t, x).prev_sample
        latents.append(x)
    skip = 1 if steps > 1 else 0
    ac = sch.alphas_cumprod.double()
    for (i, t, x_ours, x0_ours), x_ref, (sample, t_ref, e) in zip(ours, latents[skip:], used[skip:], strict=True):
        assert t == t_ref
        assert rel_err(x_ours, x_ref) < TOL, f"latent after step {i} (t={t})"
        x0_ref = (sample.double() - (1 - ac[t]).sqrt() * e.double()) / ac[t].sqrt()
        assert rel_err(x0_ours, x0_ref) < TOL, f"x0 at step {i} (t={t})"


@pytest.mark.parametrize("steps", STEPS)
def test_dpm_solver_pp_2m_matches_diffusers(steps):
    """Every latent, and every x0 (diffusers keeps its data predictions in `model_outputs`)."""
    ours = run_ours("dpm++2m", steps)
    sch, x = reference("dpm++2m"), LATENTS.clone()
    sch.set_timesteps(steps)
    for (i, t, x_ours, x0_ours), t_ref in zip(ours, sch.timesteps, strict=True):
        x = sch.step(fake_eps(x, t_ref), t_ref, x).prev_sample
        assert rel_err(x_ours, x) < TOL, f"latent after step {i} (t={t})"
        assert rel_err(x0_ours, sch.model_outputs[-1]) < TOL, f"x0 at step {i} (t={t})"
    assert torch.equal(ours[-1][2], ours[-1][3])  # the last step goes to σ = 0: x is x0


@pytest.mark.parametrize("name,calls", [("ddim", 50), ("plms", 51), ("dpm++2m", 50)])
def test_model_calls(name, calls):
    """Any callable works as `eps`; PLMS's warm-up costs one extra call."""
    seen = []
    SAMPLERS[name](lambda x, t: seen.append(t) or fake_eps(x, t), LATENTS.clone(), 50)
    assert len(seen) == calls and all(type(t) is int for t in seen)


def test_diffusers_cannot_take_1000_steps():
    """Why our limit is 999: with steps_offset 1 the first timestep would be 1000 (ᾱ has 1000
    entries, 0 … 999), and DPM's linspace would round two timesteps to the same value."""
    ddim, dpm = reference("ddim"), reference("dpm++2m")
    ddim.set_timesteps(1000)
    dpm.set_timesteps(1000)
    assert ddim.timesteps[0] == len(ddim.alphas_cumprod) and len(set(dpm.timesteps.tolist())) == 999


def never_called(x, t):
    raise AssertionError("the model must not be called when the arguments are bad")


@pytest.mark.parametrize("name,steps,eta,error,match", [
    ("ddim", 0, 0.0, ValueError, r"steps must be in \[1, 999\]"),
    ("plms", -3, 0.0, ValueError, r"steps must be in \[1, 999\]"),
    ("dpm++2m", 1000, 0.0, ValueError, r"steps must be in \[1, 999\]"),
    ("ddim", 1001, 0.0, ValueError, r"steps must be in \[1, 999\]"),
    ("ddim", 2.5, 0.0, TypeError, "steps must be an int"),
    ("plms", True, 0.0, TypeError, "steps must be an int"),
    ("ddim", 50, -0.1, ValueError, "eta must be >= 0"),
    ("plms", 50, 0.5, ValueError, "plms is deterministic: eta must be 0"),
    ("dpm++2m", 50, 1.0, ValueError, "dpm\\+\\+2m is deterministic: eta must be 0"),
])
def test_bad_arguments(name, steps, eta, error, match):
    with pytest.raises(error, match=match):
        SAMPLERS[name](never_called, LATENTS.clone(), steps, eta=eta)


@pytest.mark.parametrize("lookup", [get_sampler, lambda name: timesteps(name, 50)])
def test_unknown_sampler(lookup):
    with pytest.raises(ValueError, match=r"unknown sampler 'euler'; choose one of \['ddim', 'dpm\+\+2m', 'plms'\]"):
        lookup("euler")
