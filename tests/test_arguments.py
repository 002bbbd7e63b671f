"""altdiff_min.arguments: what load() and generate() accept, checked before any weight is read or the
model runs; the Limits on one call, and how to raise them; NaN and inf refused in every input."""
import math
import re

import pytest
import torch
from helpers import HW, no_weights_read

from altdiff_min.arguments import Limits
from altdiff_min.errors import BadType, BadValue, NotFinite
from altdiff_min.pipeline import load


# ---- load()'s arguments -------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,error,message", [
    (dict(dtype="fp16"), BadType, "dtype must be torch.float32, torch.float16, torch.bfloat16 or None, got 'fp16'"),
    (dict(dtype=torch.int8), BadValue, "dtype torch.int8 is not one a model computes in"),
    (dict(dtype=torch.complex64), BadValue, "dtype torch.complex64 is not one"),
    (dict(compile="no"), BadType, "compile must be True or False, got 'no'"),
    (dict(fast=1), BadType, "fast must be True or False"),
    (dict(safety_checker=None), BadType, "safety_checker must be True or False"),
    (dict(limits=None), BadType, "limits must be a Limits, got None"),
])
def test_load_arguments_are_checked_before_any_weight_is_read(small_model_dir, monkeypatch, kwargs, error, message):
    no_weights_read(monkeypatch)
    with pytest.raises(error, match=re.escape(message)) as e:
        load(small_model_dir, **kwargs)
    assert "\n" not in str(e.value)


# ---- generate()'s arguments: wrong types and values fail before the model runs ------------------------

@pytest.mark.parametrize("kwargs,error,match", [
    (dict(callback=3), BadType, "callback must be a function"),
    (dict(text_layer="a"), BadValue, r"text_layer must be an int in \[0, 2\]"),
    (dict(text_layer=True), BadValue, r"text_layer must be an int in \[0, 2\]"),
    (dict(sampler=["ddim"]), BadValue, r"unknown sampler \['ddim'\]"),
    (dict(image=torch.full((1, 3, 64, 96), 255.0)), BadValue, r"image tensor must be in \[0, 1\], got values in \[255, 255\]"),
])
def test_wrong_arguments_to_generate_fail_before_the_model_runs(small_model_dir, monkeypatch, kwargs, error, match):
    pipe = load(small_model_dir)
    monkeypatch.setattr(pipe.text_encoder, "forward", lambda *a, **k: pytest.fail("the model ran"))
    monkeypatch.setattr(pipe.vae, "encode", lambda *a, **k: pytest.fail("the model ran"))
    with pytest.raises(error, match=match) as e:
        pipe.generate("a dog", **{**HW, **kwargs})
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(prompt=None, prompt_embeds=torch.zeros(77, 32)), BadValue, r"prompt_embeds must be a \(P, 77, 32\) tensor"),
    (dict(prompt=None, prompt_embeds=torch.zeros(1, 77, 48)), BadValue, r"prompt_embeds must be a \(P, 77, 32\) tensor"),
    (dict(prompt=None, prompt_embeds=torch.zeros(1, 20, 32)), BadValue, r"prompt_embeds must be a \(P, 77, 32\) tensor"),
    (dict(prompt_embeds=torch.zeros(1, 77, 32)), BadValue, "not both"),
    (dict(height=64.0), BadType, "height must be an int"),
    (dict(scale="7.5"), BadType, "scale must be a number"),
    (dict(n_samples=True), BadType, "n_samples must be an int"),
    (dict(seed=-1), BadValue, "seed must be an int"),
    (dict(prompt="a \ud800 dog"), BadValue, r"lone surrogate U\+D800 at position 2"),
    (dict(negative_prompt="a" * 10_001), BadValue,
     r"^negative_prompt is 10,001 characters; at most 10,000 are accepted \(only the first 77 tokens are used\)$"),
])
def test_generate_argument_gaps(small_model_dir, monkeypatch, kwargs, error, match):
    pipe = load(small_model_dir)
    monkeypatch.setattr(pipe.text_encoder, "forward", lambda *a, **k: pytest.fail("the model ran"))
    args = {"prompt": "a dog", **HW, **kwargs}
    with pytest.raises(error, match=match):
        pipe.generate(args.pop("prompt"), **args)


# ---- limits: huge requests refused up front, unless raised --------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    (dict(n_samples=10**9), "over the limit of 256"),
    (dict(height=100_000), "over the limit of 4096"),
    (dict(n_samples=200, height=1024, width=2048), "over the limit of 268435456"),
])
def test_huge_requests_to_generate(small_model_dir, monkeypatch, kwargs, match):
    pipe = load(small_model_dir)
    monkeypatch.setattr(pipe.text_encoder, "forward", lambda *a, **k: pytest.fail("the model ran"))
    with pytest.raises(BadValue, match=match):
        pipe.generate("a dog", **{**HW, **kwargs})


def test_limits_can_be_raised(small_model_dir):
    pipe = load(small_model_dir, limits=Limits(max_batch=2))
    with pytest.raises(BadValue, match="over the limit of 2"):
        pipe.generate("a", n_samples=3, **HW)
    assert pipe.generate("a", n_samples=2, output="tensor", **HW).shape == (2, 3, 64, 96)


# ---- NaN and inf never pass silently ------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,error,match", [
    (dict(latents=torch.full((1, 4, 8, 12), math.nan)), NotFinite, "latents hold NaN"),
    (dict(latents=torch.full((1, 4, 8, 12), math.inf)), NotFinite, "latents hold NaN"),
    (dict(scale=math.nan), BadValue, "scale must be finite"),
    (dict(eta=math.nan), BadValue, r"eta must be in \[0, 1\]"),
    (dict(eta=1.5), BadValue, r"eta must be in \[0, 1\]"),
    (dict(prompt_embeds=torch.full((1, 77, 32), math.nan)), NotFinite, "prompt_embeds"),
])
def test_non_finite_arguments(small_model_dir, kwargs, error, match):
    pipe = load(small_model_dir)
    prompt = None if "prompt_embeds" in kwargs else "a dog"
    with pytest.raises(error, match=match):
        pipe.generate(prompt, **{**HW, **kwargs})
