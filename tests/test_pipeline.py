"""generate() end to end against diffusers' AltDiffusionPipeline: the same random AltDiffusion, converted
from the hub layout and loaded by us, and given to diffusers component by component."""
import copy
import dataclasses
import json
import os

import pytest
import torch
from helpers import BF16_TOL, SCHEDULER, SCHEDULERS, diffusers_pipeline, rel_diff, rel_err

from altdiff_min.pipeline import load
from weights_convert.schedule import config_from_hf

PROMPT, NEGATIVE = "一只戴着帽子的小狗", "模糊"
HEIGHT, WIDTH = 64, 96  # non-square; latents 8×12


@pytest.fixture(scope="module")
def ours(small_model_dir):
    return load(small_model_dir)


@pytest.fixture(scope="module")
def resaved_config(tmp_path_factory) -> str:
    """m9's scheduler config as current diffusers saves it: with "timestep_spacing": "leading"."""
    from diffusers import DDIMScheduler

    folder = tmp_path_factory.mktemp("resaved")
    DDIMScheduler.from_config(SCHEDULER).save_config(folder)
    assert json.loads((folder / "scheduler_config.json").read_text())["timestep_spacing"] == "leading"
    return str(folder)


def diffusers_images(pipe, steps, eta=0.0, scale=7.5, **extra) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe(PROMPT, negative_prompt=NEGATIVE, num_images_per_prompt=2, num_inference_steps=steps,
                    guidance_scale=scale, eta=eta, height=HEIGHT, width=WIDTH, output_type="pt",
                    generator=torch.Generator("cpu").manual_seed(42), **extra).images


def our_images(ours, sampler, steps, eta=0.0, scale=7.5, **extra) -> torch.Tensor:
    got = ours.generate(PROMPT, negative_prompt=NEGATIVE, n_samples=2, steps=steps, sampler=sampler, scale=scale,
                        eta=eta, height=HEIGHT, width=WIDTH, seed=42, output="tensor", progress=False, **extra)
    assert got.shape == (2, 3, HEIGHT, WIDTH) and 0 <= got.min() and got.max() <= 1
    assert (got[0] - got[1]).abs().mean() > 1e-2  # two different samples, not one repeated
    return got


def same_seed_same_images(ours, pipe, sampler, steps, eta=0.0, scale=7.5):
    expected = diffusers_images(pipe, steps, eta, scale)
    assert rel_err(our_images(ours, sampler, steps, eta, scale), expected) < 1e-4


@pytest.mark.parametrize("sampler,steps,eta,scale", [
    ("ddim", 7, 0.0, 7.5), ("ddim", 5, 1.0, 7.5), ("plms", 7, 0.0, 7.5), ("dpm++2m", 6, 0.0, 7.5),
    ("dpm++2m-karras", 6, 0.0, 7.5), ("euler", 6, 0.0, 7.5), ("euler_a", 6, 0.0, 7.5), ("ddim", 4, 0.0, 1.0),
], ids=["ddim", "ddim-eta1", "plms", "dpm++2m", "dpm++2m-karras", "euler", "euler_a", "ddim-no-guidance"])
def test_same_seed_same_images_as_diffusers(ours, hub_layout, reference, sampler, steps, eta, scale):
    """The scheduler config as m9's hub has it: no timestep_spacing, each sampler spaces by its own default."""
    same_seed_same_images(ours, diffusers_pipeline(hub_layout, reference, sampler), sampler, steps, eta, scale)


@pytest.mark.parametrize("sampler", ["ddim", "dpm++2m"])
def test_cfg_rescale_same_images_as_diffusers_guidance_rescale(ours, hub_layout, reference, sampler):
    """guidance="rescale:0.7" (guidance.CFGRescale) against diffusers' pipeline with guidance_rescale=0.7."""
    expected = diffusers_images(diffusers_pipeline(hub_layout, reference, sampler), 6, guidance_rescale=0.7)
    got = our_images(ours, sampler, 6, guidance="rescale:0.7")
    assert rel_err(got, expected) < 1e-4 and rel_diff(our_images(ours, sampler, 6), expected) > 1e-3


@pytest.mark.parametrize("sampler", list(SCHEDULERS))
def test_same_images_with_a_config_saved_by_current_diffusers(ours, hub_layout, reference, resaved_config, sampler):
    """The reported bug: a re-saved config states "leading", and every sampler must then space by it.
    The config goes through the converter's reading of scheduler_config.json."""
    with open(os.path.join(resaved_config, "scheduler_config.json")) as f:
        schedule = config_from_hf(json.load(f))
    assert schedule.timestep_spacing == "leading"
    resaved = dataclasses.replace(ours, schedule=schedule)
    same_seed_same_images(resaved, diffusers_pipeline(hub_layout, reference, sampler, resaved_config), sampler, 6)


@pytest.mark.parametrize("sampler,guidance", [("ddim", None), ("dpm++2m", None), ("dpm++2m-karras", None),
                                             ("euler", None), ("euler_a", None), ("ddim", "rescale:0.7")])
def test_v_prediction_same_images_as_diffusers(ours, hub_layout, reference, tmp_path, sampler, guidance):
    """A scheduler_config.json stating prediction_type "v_prediction", read by the converter's rules: the
    same UNet read as a v-model gives diffusers' pictures (samplers.model_eps converts after guidance,
    as diffusers' schedulers read the guided output; CFG rescale acts on the model's output, v, in both)."""
    from diffusers import DDIMScheduler

    DDIMScheduler.from_config({**SCHEDULER, "prediction_type": "v_prediction"}).save_config(tmp_path)
    with open(tmp_path / "scheduler_config.json") as f:
        v_model = dataclasses.replace(ours, schedule=config_from_hf(json.load(f)))
    assert v_model.schedule.prediction_type == "v_prediction"
    extra = {"guidance_rescale": 0.7} if guidance else {}
    expected = diffusers_images(diffusers_pipeline(hub_layout, reference, sampler, str(tmp_path)), 6, **extra)
    got = our_images(v_model, sampler, 6, **({"guidance": guidance} if guidance else {}))
    assert rel_err(got, expected) < 1e-4 and rel_diff(our_images(ours, sampler, 6), expected) > 1e-3


def test_bf16_images_match_diffusers_in_fp32_and_in_bf16(small_model_dir, hub_layout, reference):
    """generate in bf16 on the CPU, 5 DDIM steps, against diffusers' pipeline with the same seed in fp32
    and in bf16. Tolerance: bf16's target for one module (helpers.BF16_TOL); over a few steps the
    pictures stay within it (measured: ours 1.7e-2 from diffusers' fp32 pictures and 2.1e-2 from its
    bf16 ones, diffusers' bf16 1.5e-2 from its fp32; with dpm++2m, euler_a, plms ≤ 2.1e-2 and 2.8e-2)."""
    ours = load(small_model_dir, dtype=torch.bfloat16)
    assert {p.dtype for m in (ours.text_encoder, ours.unet, ours.vae) for p in m.parameters()} == {torch.bfloat16}
    got = our_images(ours, "ddim", 5)
    in_bf16 = {name: copy.deepcopy(module).to(torch.bfloat16) for name, module in reference.items()}  # the fixture stays fp32
    for modules in (reference, in_bf16):
        assert rel_err(got, diffusers_images(diffusers_pipeline(hub_layout, modules, "ddim"), 5)) < BF16_TOL


def test_pil_output_trajectory_and_explicit_latents(ours):
    seen = []
    images = ours.generate(["a", "b"], n_samples=1, steps=3, height=HEIGHT, width=WIDTH, seed=1, progress=False,
                           callback=lambda i, t, x, x0: seen.append((i, t, x.shape, x0.shape)))
    assert [im.size for im in images] == [(WIDTH, HEIGHT)] * 2 and images[0].mode == "RGB"
    assert [(i, t) for i, t, *_ in seen] == [(0, 667), (1, 334), (2, 1)]
    assert all(xs == x0s == (2, 4, 8, 12) for *_, xs, x0s in seen)
    latents = torch.randn((2, 4, 8, 12), generator=torch.Generator().manual_seed(1))
    a = ours.generate(["a", "b"], steps=3, height=HEIGHT, width=WIDTH, latents=latents, output="tensor", progress=False)
    b = ours.generate(["a", "b"], steps=3, height=HEIGHT, width=WIDTH, seed=1, output="tensor", progress=False)
    assert torch.equal(a, b)  # seed s means exactly these latents


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(height=60), ValueError, "multiples of 32"),
    (dict(width=0), ValueError, "width must be at least 1"),
    (dict(width=48), ValueError, "multiples of 32"),
    (dict(steps=0), ValueError, "steps"),
    (dict(sampler="heun"), ValueError, "unknown sampler"),
    (dict(sampler="euler_a", eta=0.5), ValueError, "eta must be 0"),
    (dict(steps=1000), ValueError, "steps=1000 is not possible"),
    (dict(sampler="plms", eta=0.5), ValueError, "eta must be 0"),
    (dict(n_samples=0), ValueError, "n_samples"),
    (dict(prompt=["ok", 3]), TypeError, "prompt"),
    (dict(prompt=[]), TypeError, "prompt"),
    (dict(output="png"), ValueError, "output"),
    (dict(latents=torch.zeros(1, 4, 8, 8)), ValueError, "latents must have shape"),
])
def test_bad_arguments_fail_before_any_model_work(ours, monkeypatch, kwargs, error, match):
    monkeypatch.setattr(ours.text_encoder, "forward", lambda *a: pytest.fail("the model ran"))
    args = dict(prompt="a dog", height=HEIGHT, width=WIDTH, progress=False) | kwargs
    with pytest.raises(error, match=match):
        ours.generate(args.pop("prompt"), **args)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_loading_in_another_dtype_reads_tensor_by_tensor_and_casts_exactly(small_model_dir, dtype):
    """Cast on load (each tensor read from the file on its own, not memory-mapped) = load as stored, then cast."""
    cast, stored = load(small_model_dir, dtype=dtype), load(small_model_dir)
    for name in ("text_encoder", "unet", "vae"):
        ours, ref = getattr(cast, name).state_dict(), getattr(stored, name).state_dict()
        assert ours.keys() == ref.keys()
        for key, value in ref.items():
            expected = value.to(dtype) if value.is_floating_point() else value
            assert ours[key].dtype == expected.dtype and torch.equal(ours[key], expected), (name, key)
