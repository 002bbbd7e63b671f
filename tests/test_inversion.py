"""Inversion of real pictures (altdiff_min/inversion.py): DDIM inversion against diffusers'
DDIMInverseScheduler step by step on the small random AltDiffusion, the inverse of diffusers' forward
DDIM step for every spacing, null-text inversion on the shipped toy, and bad input."""
import dataclasses
import math
import re

import numpy as np
import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler
from helpers import SCHEDULER, rel_diff, rel_err
from PIL import Image

import altdiff_min
from altdiff_min.errors import BadType, BadValue, NotFinite
from altdiff_min.pipeline import load
from altdiff_min.research.interventions import Controller
from altdiff_min.inversion import (Inversion, ddim_inversion_route, invert, null_text, null_text_inversion,
                                            sample_inverted, stepwise_eps)
from altdiff_min.sampling.guidance import guided_eps
from altdiff_min.sampling.samplers import ddim
from altdiff_min.sampling.schedule import ScheduleConfig, timesteps
from altdiff_min.toy.data import caption, render

TOL = 1e-5
PROMPTS, NEGATIVE = ["一只戴着帽子的小狗", "a red circle"], "模糊"
g = torch.Generator().manual_seed(0)
Z0 = torch.randn(2, 4, 8, 12, generator=g)  # batch 2, non-square latents (the small UNet takes multiples of 4)


@pytest.fixture(scope="module")
def small(small_model_dir):
    return load(small_model_dir)


@pytest.fixture(scope="module")
def toy():
    return altdiff_min.load("toy")


def with_spacing(model, spacing):
    return dataclasses.replace(model.schedule, timestep_spacing=spacing)


def model_eps(model, scale):
    """Ours: the guided ε of guidance.py over [∅ × 2; c × 2] (c alone at scale 1)."""
    context = model.encode_prompt(PROMPTS, NEGATIVE, guided=True)
    return guided_eps(model.denoise, context if scale != 1 else context[2:], scale), context


@pytest.mark.parametrize("spacing", [None, "leading", "trailing"])  # None: m9's config, which states none
@pytest.mark.parametrize("scale", [1.0, 7.5])
@pytest.mark.parametrize("steps", [7, 10])
@torch.no_grad()
def test_ddim_inversion_matches_diffusers_inverse_scheduler(small, spacing, scale, steps):
    """Every latent of the route against diffusers' DDIMInverseScheduler.from_config(the model's
    scheduler) driven by the same UNet, guidance written as diffusers' pipelines write it."""
    cfg = with_spacing(small, spacing)
    eps, context = model_eps(small, scale)
    ts = timesteps("ddim", steps, cfg)
    route = ddim_inversion_route(eps, Z0, ts, cfg)

    sch = DDIMInverseScheduler.from_config({**SCHEDULER, **({"timestep_spacing": spacing} if spacing else {})})
    sch.set_timesteps(steps)
    assert sch.timesteps.tolist() == list(ts.t)[::-1]
    def reference_eps(x, t):
        if scale == 1:
            return small.denoise(x, float(t), context[2:])
        e_uncond, e_text = small.denoise(torch.cat([x, x]), float(t), context).chunk(2)
        return e_uncond + scale * (e_text - e_uncond)

    assert len(route) == steps + 1 and route[0] is Z0
    x = Z0
    for k, t in enumerate(sch.timesteps):
        # step by step: diffusers' step from our x_k gives our x_{k+1}
        assert rel_err(route[k + 1], sch.step(reference_eps(route[k], t), t, route[k]).prev_sample) < TOL
        x = sch.step(reference_eps(x, t), t, x).prev_sample
    # the whole route, diffusers' chained on its own (end to end): float32 rounding (ᾱ's square roots in
    # float32 there, in float64 here; ~1e-7 a step) grows through the guided UNet, 1.2e-5 after 7 steps at 7.5
    assert rel_diff(route[-1], x) < 1e-4
    assert rel_diff(route[-1], Z0) > 0.1  # the route went somewhere


@pytest.mark.parametrize("spacing", [None, "leading", "linspace", "trailing"])
@pytest.mark.parametrize("steps", [1, 7, 10])
@torch.no_grad()
def test_each_inversion_step_is_undone_by_diffusers_forward_ddim_step(small, spacing, steps):
    """diffusers' inverse scheduler has no "linspace"; for every spacing, diffusers' forward
    DDIMScheduler step, given the ε the inversion read, takes each inverted latent back to the one it
    came from (landing on t − stride, as the forward route does)."""
    cfg = with_spacing(small, spacing)
    eps, _ = model_eps(small, 7.5)
    ts = timesteps("ddim", steps, cfg)
    route = ddim_inversion_route(eps, Z0, ts, cfg)
    sch = DDIMScheduler.from_config({**SCHEDULER, **({"timestep_spacing": spacing} if spacing else {})})
    sch.set_timesteps(steps)
    assert sch.timesteps.tolist() == list(ts.t)
    for k in range(steps):
        t = ts.t[steps - 1 - k]  # inversion step k undoes forward step S − 1 − k
        back = sch.step(eps(route[k], t), torch.tensor(t), route[k + 1]).prev_sample
        assert rel_err(back, route[k]) < TOL


@pytest.mark.parametrize("spacing", [None, "linspace", "trailing"])
def test_with_an_eps_that_ignores_the_latents_sampling_back_is_exact(spacing):
    """ε(x, t) = f(t): each DDIM step is then exactly invertible, so ddim(x_T) over the same route
    gives z0 back (the maths, apart from the ε(x_{t−1}, t) ≈ ε(x_t, t) approximation)."""
    cfg = ScheduleConfig(timestep_spacing=spacing)
    fixed = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(1))

    def eps(x, t):
        return math.cos(float(t) / 300) * fixed
    ts = timesteps("ddim", 10, cfg)
    route = ddim_inversion_route(eps, Z0, ts, cfg)
    assert rel_err(ddim(eps, route[-1], ts, cfg), Z0) < TOL


def test_stepwise_eps_reads_each_steps_unconditional_rows():
    seen = []

    def denoise(x, t, context, guided):
        seen.append((t, context.clone(), guided))
        return torch.zeros_like(x) + context.mean()
    ts = timesteps("ddim", 3)
    uncond = [torch.full((1, 77, 8), float(i)) for i in range(3)]
    cond = torch.full((2, 77, 8), 10.0)
    eps = stepwise_eps(denoise, cond, uncond, ts, 7.5)
    for i, t in enumerate(ts):
        eps(Z0, t)
        t_seen, context, guided = seen[-1]
        assert t_seen == t and guided and context.shape == (4, 77, 8)
        assert (context[:2] == i).all() and (context[2:] == 10).all()
    with pytest.raises(BadValue, match="one unconditional context per step: 3 steps, got 2"):
        stepwise_eps(denoise, cond, uncond[:2], ts, 7.5)


@torch.no_grad()
def test_null_text_of_a_batch_is_each_pictures_own(toy):
    """The batch's loss is the pictures' sum and Adam is elementwise: two pictures fitted together get
    the ∅_i each gets alone (no early stop: tol 0), and sample back to the same latents. (On the toy's
    trained UNet; on a random one Adam's first, sign-like update magnifies the batch's float32
    rounding: 1.8e-5 on the small random model.)"""
    context = toy.encode_prompt(PROMPTS, NEGATIVE, guided=True)
    ts = timesteps("ddim", 3, toy.schedule)
    pivot = ddim_inversion_route(guided_eps(toy.denoise, context[2:], 1.0), Z0, ts, toy.schedule)
    with torch.enable_grad():
        both, _, its = null_text(toy, pivot, ts, context[2:], context[:1], 7.5, inner_steps=3, tol=0, progress=False)
        alone = [null_text(toy, [x[b:b + 1] for x in pivot], ts, context[2 + b:3 + b], context[:1], 7.5,
                           inner_steps=3, tol=0, progress=False)[0] for b in range(2)]
    assert its == [3, 3, 3]
    for i in range(3):
        assert rel_err(both[i], torch.cat([alone[0][i], alone[1][i]])) < TOL
        assert rel_diff(both[i], context[:2]) > 1e-3  # ∅ moved
    together = sample_inverted(toy, Inversion(pivot, ts, context[2:], both, 7.5), progress=False)
    apart = [sample_inverted(toy, Inversion([x[b:b + 1] for x in pivot], ts, context[2 + b:3 + b], alone[b], 7.5),
                             progress=False) for b in range(2)]
    assert rel_err(together, torch.cat(apart)) < TOL


def toy_picture(seed=0):
    return Image.fromarray(render("triangle", "blue", rng=np.random.default_rng(seed)))


def error(model, latents, picture):
    truth = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    return (model.decode_latents(latents) - truth).abs().mean().item()


def test_null_text_reconstructs_the_picture_where_ddim_inversion_drifts(toy):
    """On the shipped toy at guidance 7.5 (10 steps to keep the test short): sampling back from plain
    DDIM inversion drifts; null-text's ∅_i bring the picture back within 1.5× the VAE round trip's
    error (measured on 4 toy pictures at 10 steps: null-text 1.04–1.14×, DDIM inversion 1.7–2.9×)."""
    picture, prompt = toy_picture(), caption("triangle", "blue", "es")
    plain = invert(toy, picture, prompt, 10, 7.5, progress=False)
    fitted = null_text_inversion(toy, picture, prompt, 10, 7.5, progress=False)
    vae = error(toy, plain.latents[0], picture)
    e_plain = error(toy, sample_inverted(toy, plain, progress=False), picture)
    e_null = error(toy, sample_inverted(toy, fitted, progress=False), picture)
    assert e_null < e_plain / 2, (e_null, e_plain)
    assert e_null < 1.5 * vae, (e_null, vae)
    assert len(fitted.uncond) == 10 and fitted.uncond[0].shape == (1, 77, toy.unet.cfg.context_dim)
    # the pivot itself, guidance 1 both ways, comes back close too
    pivot = invert(toy, picture, prompt, 10, 1.0, progress=False)
    assert error(toy, sample_inverted(toy, pivot, progress=False), picture) < e_plain


class Moments(Controller):
    def __init__(self):
        self.seen = set()

    def output(self, site, when, out):
        self.seen.add((when.call, when.guided, out.shape[0]))


@torch.no_grad()
def test_sampling_back_runs_several_prompts_in_one_batch_with_controllers(toy):
    """prompt-to-prompt's shape: source and target prompts from the same x_T, each step's ∅_i for both,
    attention controllers active; the same prompt twice gives the one-prompt latents twice."""
    picture, prompt = toy_picture(1), caption("triangle", "blue", "en")
    inv = invert(toy, picture, prompt, 4, 7.5, progress=False)
    one = sample_inverted(toy, inv, progress=False)
    watch = Moments()
    two = sample_inverted(toy, inv, prompts=[prompt, caption("circle", "red", "en")], controllers=[watch], progress=False)
    assert two.shape == (2, *one.shape[1:])
    assert rel_err(two[:1], one) < TOL and rel_diff(two[1:], one) > 1e-3
    assert watch.seen == {(k, True, 4) for k in range(4)}  # [∅_i, ∅_i, c_source, c_target] at every step


@pytest.mark.parametrize("picture, kw, error, message", [
    (torch.full((1, 3, 64, 64), float("nan")), {}, NotFinite, "image holds NaN or infinite values"),
    (torch.rand(1, 4, 64, 64), {}, BadValue, "image tensor must be floats (1, 3, H, W) or (3, H, W)"),
    (torch.rand(2, 3, 64, 64), {}, BadValue, "image tensor must be floats (1, 3, H, W) or (3, H, W)"),
    (torch.rand(1, 3, 20, 64), {}, BadValue, "the picture is 64×20 pixels"),
    (torch.rand(1, 3, 64, 64), {"steps": 0}, BadValue, "steps must be in [1, 1000]"),
    (torch.rand(1, 3, 64, 64), {"steps": 1001}, BadValue, "steps must be in [1, 1000]"),
    (torch.rand(1, 3, 64, 64), {"prompt": ["a", "b"]}, BadType, "prompt must be one str"),
    (torch.rand(1, 3, 64, 64), {"scale": 1.0}, BadValue, "scale must not be 1"),
    (torch.rand(1, 3, 64, 64), {"inner_steps": 0}, BadValue, "inner_steps must be a positive number"),
    (torch.rand(1, 3, 64, 64), {"scale": lambda t: 7.5}, BadType, "scale must be a number here"),
])
def test_bad_input_is_one_line_before_any_model_work(toy, monkeypatch, picture, kw, error, message):
    for module in (toy.unet, toy.vae, toy.text_encoder):
        monkeypatch.setattr(module, "forward", lambda *a, **k: pytest.fail("the model ran"))
    monkeypatch.setattr(toy.vae, "encode", lambda *a, **k: pytest.fail("the model ran"))
    kw = {"prompt": "a red circle", **kw}
    with pytest.raises(error, match=re.escape(message)):
        null_text_inversion(toy, picture, progress=False, **kw)
    if "inner_steps" not in kw and kw.get("scale") != 1.0:
        with pytest.raises(error, match=re.escape(message)):
            invert(toy, picture, progress=False, **kw)


def test_a_picture_of_another_size_is_rounded_as_image_to_image(toy):
    inv = invert(toy, torch.rand(1, 3, 70, 100), "a red circle", 2, 1.0, progress=False)
    assert inv.latents[0].shape == (1, 4, 64 // 8, 96 // 8)  # 100×70 → 96×64, the toy's multiple 32
    assert isinstance(inv, Inversion) and len(inv.latents) == 3
