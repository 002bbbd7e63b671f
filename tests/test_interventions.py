"""The door (altdiff_min.research.interventions): attention controllers change exactly what they say, per call,
on both attention backends; guidance rules (altdiff_min.sampling.guidance) against diffusers and the papers."""
import importlib
import re
import threading

import pytest
import torch
from helpers import rel_diff, rel_err

from altdiff_min.research import interventions
from altdiff_min.model.attention import attention, attention_backend
from altdiff_min.errors import BadType, BadValue
from altdiff_min.sampling.guidance import CFG, CFGRescale, GuidanceInterval, guidance_rule
from altdiff_min.research.interventions import Controller, Site, intervene
from altdiff_min.model.layers import Attention
from altdiff_min.pipeline import load

RUN = dict(steps=3, height=64, width=96, seed=3, output="tensor", progress=False)
PROMPTS = ["un cercle rouge", "一个蓝色的正方形"]
BACKENDS = ["sdpa", "explicit"]


@pytest.fixture(scope="module")
def pipe(small_model_dir):
    return load(small_model_dir)


class Unchanged(Controller):
    """Hands every value back as it came (a new tensor each time, so nothing is returned by identity)."""

    def qkv(self, site, when, q, k, v):
        return q.clone(), k.clone(), v.clone()

    def probs(self, site, when, probs):
        return probs.clone()

    def output(self, site, when, out):
        return out.clone()


class Reweight(Controller):
    """Prompt-to-prompt's reweighting (Hertz et al. 2023, §3.2): token j's cross-attention times c."""

    def __init__(self, token, c):
        self.token, self.c = token, c

    def probs(self, site, when, probs):
        if site.kind != "cross":
            return None
        probs = probs.clone()
        probs[..., self.token] *= self.c
        return probs


class Drop(Controller):
    """Token j's column zeroed and each row renormalised."""

    def __init__(self, token):
        self.token = token

    def probs(self, site, when, probs):
        probs = probs.clone()
        probs[..., self.token] = 0
        return probs / probs.sum(-1, keepdim=True)


class Record(Controller):
    """Every attention output, by site and UNet call."""

    def __init__(self):
        self.seen = {}

    def output(self, site, when, out):
        self.seen[(when.call, site)] = out.clone()


class Replace(Controller):
    """Prompt-to-prompt's word swap at its simplest: the cross-attention maps of the named sites are
    replaced by those `source` recorded (its own per call)."""

    def __init__(self, source, where):
        self.source, self.where = source, where

    def probs(self, site, when, probs):
        return self.source[(when.call, site)] if site in self.where else None


class Maps(Controller):
    def __init__(self):
        self.maps = {}

    def probs(self, site, when, probs):
        if site.kind == "cross":
            self.maps[(when.call, site)] = probs.clone()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_controller_that_changes_nothing_equals_none(pipe, backend):
    with attention_backend(backend):
        plain = pipe.generate(PROMPTS, **RUN)
        for controller in (Unchanged(), Reweight(token=2, c=1.0)):
            assert rel_err(pipe.generate(PROMPTS, controllers=[controller], **RUN), plain) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropping_a_token_equals_masking_it(backend):
    """Zeroing key j's column and renormalising is attention with key j masked out (per module, on
    random non-square inputs, batch 3)."""
    g = torch.Generator().manual_seed(0)
    layer = Attention(dim=24, heads=3, context_dim=10)
    layer.site = Site("down", 0, 0, "cross", 1)
    x, context = torch.randn(3, 35, 24, generator=g), torch.randn(3, 7, 10, generator=g)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[:, 4] = False
    with attention_backend(backend):
        masked = layer.out(attention(layer.q(x), layer.k(context), layer.v(context), 3, mask))
        with intervene([Drop(4)]):
            dropped = layer(x, context)
        plain = layer(x, context)
    assert rel_err(dropped, masked) < 1e-6 and rel_diff(plain, masked) > 1e-3


def test_reweighting_a_word_changes_the_picture_more_the_more_it_is_weighted(pipe):
    plain = pipe.generate(PROMPTS[0], **RUN)
    diffs = [rel_diff(pipe.generate(PROMPTS[0], controllers=[Reweight(token=3, c=c)], **RUN), plain) for c in (1.5, 4.0)]
    assert 1e-4 < diffs[0] < diffs[1]


def test_swapping_in_another_prompts_maps_changes_only_the_places_named(pipe):
    """One guided UNet evaluation (1 step): the other prompt's cross-attention maps at one site. Every
    attention that runs before it is bit-identical (both runs on the explicit path); that site's output differs; swapping in the
    prompt's own maps changes nothing."""
    one = dict(RUN, steps=1)
    theirs, mine = Maps(), Maps()
    pipe.generate(PROMPTS[1], controllers=[theirs], **one)
    pipe.generate(PROMPTS[0], controllers=[mine], **one)
    sites = [site for _, site in theirs.maps]  # in the order the UNet ran them
    named = sites[4]
    plain, swapped, same = Record(), Record(), Record()
    pipe.generate(PROMPTS[0], controllers=[Maps(), plain], **one)  # the explicit path too, as the swaps take
    pipe.generate(PROMPTS[0], controllers=[Replace(theirs.maps, {named}), swapped], **one)
    pipe.generate(PROMPTS[0], controllers=[Replace(mine.maps, set(sites)), same], **one)
    order = list(plain.seen)
    at = order.index((0, named))
    assert all(torch.equal(swapped.seen[key], plain.seen[key]) for key in order[:at])
    assert rel_diff(swapped.seen[(0, named)], plain.seen[(0, named)]) > 1e-3
    assert all(rel_err(same.seen[key], plain.seen[key]) < 1e-5 for key in order)


def test_sites_name_every_unet_attention_and_moments_count_the_calls(pipe):
    seen = []

    class Where(Controller):
        def output(self, site, when, out):
            seen.append((site, when))

    pipe.generate(PROMPTS[0], controllers=[Where()], **RUN)
    sites = {site for site, _ in seen}
    modules = {m.site for name, m in pipe.unet.named_modules() if name.endswith(("self_attn", "cross_attn"))}
    assert sites == modules and len(sites) == 22  # 11 transformers in the small UNet, self and cross each
    assert {when.call for _, when in seen} == {0, 1, 2} and all(when.guided for _, when in seen)
    assert [when.t for site, when in seen if site.name == "mid.cross"] == [667.0, 334.0, 1.0]
    for site, when in seen:  # a site's grid: the latents' size over its scale
        assert when.size == (8, 12) and site.scale in (1, 2, 4)


def test_two_threads_use_their_own_controllers(pipe):
    """Per call, never process-wide: a request in another thread is not changed by this one's controller."""
    plain = pipe.generate(PROMPTS[0], **RUN)
    results, barrier = {}, threading.Barrier(2)

    def run(name, controllers):
        barrier.wait()
        results[name] = pipe.generate(PROMPTS[0], controllers=controllers, **RUN)

    threads = [threading.Thread(target=run, args=("plain", None)),
               threading.Thread(target=run, args=("changed", [Reweight(token=3, c=5.0)]))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert rel_err(results["plain"], plain) < 1e-6 and rel_diff(results["changed"], plain) > 1e-4
    assert interventions.active() is None


def test_no_controller_takes_the_fused_path(pipe, monkeypatch):
    """Free when unused: without controllers no attention computes explicit probabilities."""
    attention_module = importlib.import_module("altdiff_min.model.attention")  # the package exports a function of that name
    for module in (attention_module, interventions):
        monkeypatch.setattr(module, "attention_probs", lambda *a: pytest.fail("explicit path taken"))
    monkeypatch.setattr(interventions.Run, "attend", lambda *a, **k: pytest.fail("a run was entered"))
    pipe.generate(PROMPTS[0], **RUN)


@pytest.mark.parametrize("value, error, message", [
    (3, BadType, "controllers must be a list of interventions.Controller, got 3"),
    ([lambda *a: None], BadType, "controllers must be a list"),
])
def test_bad_controllers_fail_before_any_model_work(pipe, monkeypatch, value, error, message):
    monkeypatch.setattr(pipe.text_encoder, "forward", lambda *a: pytest.fail("the model ran"))
    with pytest.raises(error, match=re.escape(message)):
        pipe.generate("a", controllers=value, **RUN)


def test_a_compiled_unet_refuses_controllers_in_one_line(small_model_dir):
    compiled = load(small_model_dir, compile=True)  # compiled at its first call, which never comes
    for kwargs in ({"controllers": [Unchanged()]}, {"cross_attention": ["down"]}):
        with pytest.raises(BadValue, match="load the model without compile to change its attention"):
            compiled.generate("a", **kwargs, **RUN)


# Guidance rules


def test_rescale_equals_diffusers_rescale_noise_cfg():
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    g = torch.Generator().manual_seed(1)
    e_uncond, e_cond = torch.randn(3, 4, 8, 12, generator=g), torch.randn(3, 4, 8, 12, generator=g) * 1.7
    for phi in (0.0, 0.7, 1.0):
        cfg = e_uncond + 7.5 * (e_cond - e_uncond)
        assert rel_err(CFGRescale(phi).combine(e_uncond, e_cond, 7.5, 500.0), rescale_noise_cfg(cfg, e_cond, phi)) < 1e-6


def test_an_interval_guides_only_inside_it(pipe):
    """Kynkäänniemi et al. 2024 as written: CFG where low ≤ t ≤ high, ε(x, c) elsewhere; the same as a
    scale of 1 outside (which computes ε∅ + (εc − ε∅), so equal to float rounding)."""
    by_rule = pipe.generate(PROMPTS[0], guidance=GuidanceInterval(500, 1000), **RUN)  # t = 667 | 334, 1
    by_scale = pipe.generate(PROMPTS[0], scale=lambda t: 7.5 if 500 <= t <= 1000 else 1.0, **RUN)
    assert rel_err(by_rule, by_scale) < 1e-5
    assert rel_diff(by_rule, pipe.generate(PROMPTS[0], **RUN)) > 1e-4
    assert torch.equal(pipe.generate(PROMPTS[0], guidance="interval:0,1000", **RUN), pipe.generate(PROMPTS[0], **RUN))


def test_rules_from_text_and_back():
    for text, rule in (("cfg", CFG()), ("rescale", CFGRescale(0.7)), ("rescale:0.5", CFGRescale(0.5)),
                       ("interval:200,800", GuidanceInterval(200, 800)), ("rescale:0.123456789", CFGRescale(0.123456789)),
                       ("interval:0.5,999.25", GuidanceInterval(0.5, 999.25))):  # the text is the record: exact
        assert guidance_rule(text) == rule and guidance_rule(str(rule)) == rule
    assert guidance_rule(None) == CFG()


@pytest.mark.parametrize("text, message", [
    ("cfgg", "unknown rule 'cfgg'"), ("rescale:2", "φ must be a number in [0, 1]"), ("interval:5", "takes LOW,HIGH"),
    ("interval:800,200", "0 ≤ low ≤ high"), ("rescale:x", "not a comma-separated list of numbers"), (3, "guidance must be"),
])
def test_bad_rules_are_one_line(pipe, monkeypatch, text, message):
    monkeypatch.setattr(pipe.text_encoder, "forward", lambda *a: pytest.fail("the model ran"))
    with pytest.raises((BadValue, BadType), match=re.escape(message)):
        pipe.generate("a", guidance=text, **RUN)
