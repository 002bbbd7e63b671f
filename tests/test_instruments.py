"""Instruments and ablation switches: attention capture, heat maps, and generate's switches,
each off by default (the defaults are what test_pipeline proves equal to diffusers)."""
import re

import pytest
import torch
from helpers import rel_diff, rel_err

from altdiff_min.errors import BadValue
from altdiff_min.research import interventions
from altdiff_min.research.instruments import capture_attention
from altdiff_min.pipeline import load

RUN = dict(steps=3, height=64, width=96, seed=3, output="tensor", progress=False)


@pytest.fixture(scope="module")
def pipe(small_model_dir):
    return load(small_model_dir)


def test_capture_records_every_cross_attention_layer_and_changes_nothing(pipe):
    plain = pipe.generate(["un cercle rouge", "a dog"], **RUN)
    with capture_attention(pipe.unet, per_step=True) as maps:
        captured = pipe.generate(["un cercle rouge", "a dog"], **RUN)
    cross = [name for name, _ in pipe.unet.named_modules() if name.endswith("cross_attn")]
    assert sorted(maps.sums) == sorted(cross) and len(cross) == 11  # 2×2 down, mid, 2×3 up in the small UNet
    assert interventions.active() is None  # nothing left set after the capture
    assert rel_err(captured, plain) < 1e-5  # the explicit path, same images
    name = "down.0.attn.0.block.cross_attn"
    assert maps.calls[name] == 3 and len(maps.steps[name]) == 3  # one batched (guided) UNet call per step
    probs = maps.mean(name)
    assert probs.shape == (4, 4, 8 * 12, 77)  # [uncond ×2, cond ×2], heads, latent pixels, tokens
    assert torch.allclose(probs.sum(-1), torch.ones(()), atol=1e-5)
    assert maps.guided
    heat = maps.heatmap(token=1, size=(64, 96))  # one map per picture: the prompts' rows
    assert heat.shape == (2, 64, 96) and heat.min() == 0 and torch.allclose(heat.amax(dim=(1, 2)), torch.ones(2))
    both = maps.heatmap(token=1, size=(64, 96), branch="both")
    assert both.shape == (4, 64, 96) and torch.equal(both[2:], heat)
    assert torch.equal(maps.heatmap(token=1, size=(64, 96), branch="unconditional"), both[:2])
    with pytest.raises(ValueError, match="branch must be one of"):
        maps.heatmap(token=1, size=(64, 96), branch="cond")


def test_capture_refuses_a_compiled_unet(small_model_dir):
    """A compiled UNet runs one fused graph, in which no hook can run: a one-line error, not dynamo's."""
    from altdiff_min.errors import BadValue

    unet = load(small_model_dir, compile=True).unet  # compiled at its first call, which never comes
    with pytest.raises(BadValue, match="load the model without compile"):
        with capture_attention(unet):
            pass


def test_at_step_reads_one_call_and_the_calls_add_up_to_the_sums(pipe):
    with capture_attention(pipe.unet, per_step=True) as maps:
        pipe.generate(["un cercle rouge", "a dog"], **RUN)
    steps = [maps.at_step(i) for i in range(3)]
    for name in maps.sums:
        assert torch.allclose(sum(step.mean(name) for step in steps), maps.sums[name], rtol=1e-6, atol=0)
        assert torch.equal(maps.at_step(-1).mean(name), steps[2].mean(name))
    first = steps[0].heatmap(token=1, size=(64, 96))
    assert first.shape == (2, 64, 96) and steps[0].guided  # the conditional rows, as for the whole run
    assert rel_diff(first, steps[2].heatmap(token=1, size=(64, 96))) > 1e-3  # each step its own maps
    for bad in (3, -4, 1.0, True):
        with pytest.raises(ValueError, match=r"step must be an integer in \[-3, 3\)"):
            maps.at_step(bad)
    with capture_attention(pipe.unet) as sums_only:
        pipe.generate("a", **(RUN | dict(steps=1)))
    with pytest.raises(ValueError, match="per_step=True"):
        sums_only.at_step(0)


def test_heatmap_without_guidance_has_only_the_conditional_rows(pipe):
    with capture_attention(pipe.unet) as maps:
        pipe.generate(["un cercle rouge", "a dog"], scale=1.0, **RUN)
    assert maps.guided is False and maps.mean("mid_attn.block.cross_attn").shape[0] == 2  # no unconditional rows
    heat = maps.heatmap(token=1, size=(64, 96))
    assert heat.shape == (2, 64, 96) and torch.equal(maps.heatmap(token=1, size=(64, 96), branch="both"), heat)
    with pytest.raises(ValueError, match="no unconditional branch"):
        maps.heatmap(token=1, size=(64, 96), branch="unconditional")
    with capture_attention(pipe.unet), pytest.raises(ValueError, match="guided or unguided UNet calls, not both"):
        pipe.generate("un cercle rouge", scale=1.0, **RUN)
        pipe.generate("un cercle rouge", scale=7.5, **RUN)  # 2 rows either way, but not the same rows


def test_heatmap_rejects_a_size_the_layers_do_not_fit(pipe):
    with capture_attention(pipe.unet) as maps:
        pipe.generate("a", **(RUN | dict(steps=1)))
    with pytest.raises(ValueError, match="positions"):
        maps.heatmap(token=1, size=(64, 64))


def test_heatmap_with_nothing_captured():
    from altdiff_min.research.instruments import AttentionMaps

    with pytest.raises(BadValue, match="no attention maps were captured"):
        AttentionMaps().heatmap(token=1, size=(64, 64))


def test_pieces_name_each_position(pipe):
    pieces = pipe.tokenizer.pieces("un cercle rouge")
    ids, _ = pipe.tokenizer("un cercle rouge")
    assert pieces[0] == "<s>" and pieces[-1] == "</s>" and len(pieces) == int((ids != 1).sum())
    assert "".join(pieces[1:-1]).replace("▁", " ").strip() == "un cercle rouge"


def test_cross_attention_off_ignores_the_prompt(pipe):
    a = pipe.generate("a red circle", cross_attention=False, **RUN)
    b = pipe.generate("一只小狗", cross_attention=False, **RUN)
    assert torch.equal(a, b)
    assert rel_diff(pipe.generate("a red circle", **RUN), a) > 1e-3


def test_cross_attention_per_part(pipe):
    """[] is False, every part is True, exactly; the names are the modules' (down.i, mid_attn, up.i)."""
    def make(cross_attention=True):
        return pipe.generate("a red circle", cross_attention=cross_attention, **RUN)

    full = make()
    assert torch.equal(make([]), make(False))
    assert torch.equal(make(["down", "mid", "up"]), full) and torch.equal(make(sorted(pipe.unet.text_parts())), full)
    assert sorted(pipe.unet.text_parts()) == ["down.0", "down.1", "mid", "up.1", "up.2"]  # up.0 has no attention


@pytest.mark.parametrize("off, on", [("mid", ["down", "up"]), ("up.1", ["down", "mid", "up.2"]), ("down", ["mid", "up"])])
def test_a_part_switched_off_equals_zeroing_its_cross_attention_by_hand(pipe, off, on):
    full = pipe.generate("a red circle", **RUN)
    ablated = pipe.generate("a red circle", cross_attention=on, **RUN)
    prefix = "mid_attn." if off == "mid" else f"{off}."
    hooks = [m.register_forward_hook(lambda module, args, out: torch.zeros_like(out))
             for name, m in pipe.unet.named_modules() if name.startswith(prefix) and name.endswith("cross_attn")]
    try:
        by_hand = pipe.generate("a red circle", **RUN)
    finally:
        for hook in hooks:
            hook.remove()
    assert hooks and torch.equal(ablated, by_hand) and rel_diff(ablated, full) > 1e-4


@pytest.mark.parametrize("value, error, message", [
    (["down", "middle"], ValueError, "cross_attention: 'middle' is not a part of this UNet; its parts are "
                                     "down, mid, up, down.0, down.1, up.1, up.2"),
    ("up.0", ValueError, "'up.0' is not a part"),  # a level without attention
    (3, TypeError, "cross_attention must be True, False or a list of UNet parts, got 3"),
    ([None], TypeError, "a list of UNet parts"),
])
def test_bad_cross_attention_parts_fail_before_any_model_work(pipe, monkeypatch, value, error, message):
    monkeypatch.setattr(pipe.text_encoder, "forward", lambda *a: pytest.fail("the model ran"))
    with pytest.raises(error, match=re.escape(message)):
        pipe.generate("a", cross_attention=value, **RUN)


def test_text_layer(pipe):
    last = len(pipe.text_encoder.layers)
    assert torch.equal(pipe.encode(["un chien"], layer=last), pipe.encode(["un chien"]))
    assert rel_diff(pipe.encode(["un chien"], layer=1), pipe.encode(["un chien"])) > 1e-2
    with pytest.raises(ValueError, match="layer must be in"):
        pipe.encode(["un chien"], layer=last + 1)
    assert rel_diff(pipe.generate("un chien", text_layer=1, **RUN), pipe.generate("un chien", **RUN)) > 1e-4


def test_guidance_schedule(pipe):
    constant = pipe.generate("a dog", **RUN)
    assert torch.equal(pipe.generate("a dog", scale=lambda t: 7.5, **RUN), constant)
    varying = pipe.generate("a dog", scale=lambda t: 7.5 if t > 500 else 1.0, **RUN)
    assert rel_diff(varying, constant) > 1e-4


def test_prompt_embeddings_and_interpolation(pipe):
    a, b = pipe.encode(["a red circle"]), pipe.encode(["un cercle rouge"])
    direct = pipe.generate("a red circle", **RUN)
    assert rel_err(pipe.generate(prompt_embeds=a, **RUN), direct) < 1e-6
    noise = torch.randn((1, 4, 8, 12), generator=torch.Generator().manual_seed(RUN["seed"])).expand(3, -1, -1, -1)
    run = RUN | dict(seed=None, latents=noise)  # the same noise for every mix, so only the text differs
    mixes = pipe.generate(prompt_embeds=torch.cat([torch.lerp(a, b, w) for w in (0.0, 0.5, 1.0)]), **run)
    assert rel_err(mixes[0], direct[0]) < 1e-5 and rel_err(mixes[2], pipe.generate("un cercle rouge", **RUN)[0]) < 1e-5
    assert rel_diff(mixes[1], mixes[0]) > 1e-4 and rel_diff(mixes[1], mixes[2]) > 1e-4
    with pytest.raises(ValueError, match="not both"):
        pipe.generate("a", prompt_embeds=a, **RUN)


def test_trajectory(pipe):
    images, trajectory = pipe.generate("a dog", sampler="dpm++2m", return_trajectory=True, **RUN)
    assert [step["t"] for step in trajectory] == [999, 666, 333]
    assert all(step["latents"].shape == step["x0"].shape == (1, 4, 8, 12) for step in trajectory)
    final = trajectory[-1]["latents"]
    assert torch.equal(final, trajectory[-1]["x0"])  # DPM-Solver++'s last step lands on x0
    with torch.no_grad():
        decoded = pipe.decode_latents(final)
    assert rel_err(decoded, images) < 1e-6



def test_attention_path_is_per_thread():
    """attention_backend holds in its own thread only: a server's concurrent requests keep their own
    path. One thread sits inside "explicit" while another asks which path it would take, then each
    computes: both give the same attention output."""
    import importlib
    import threading

    module = importlib.import_module("altdiff_min.model.attention")  # the package's `attention` is the function

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 5, 8, generator=g) for _ in range(3))
    inside, done = threading.Event(), threading.Event()
    seen = {}

    def explicit_request():
        with module.attention_backend("explicit"):
            inside.set()
            seen["explicit_thread"] = module._backend.get()
            seen["explicit_out"] = module.attention(q, k, v, 2)
            done.wait(10)

    def default_request():
        inside.wait(10)
        seen["other_thread"] = module._backend.get()
        seen["default_out"] = module.attention(q, k, v, 2)
        done.set()

    threads = [threading.Thread(target=explicit_request), threading.Thread(target=default_request)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert (seen["explicit_thread"], seen["other_thread"], module._backend.get()) == ("explicit", "sdpa", "sdpa")
    assert rel_diff(seen["explicit_out"], seen["default_out"]) < 1e-6
