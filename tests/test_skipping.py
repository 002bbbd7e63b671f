"""Speed paths that skip work (altdiff_min/research/skipping.py) against their reference packages on
diffusers' modules with the same random weights: ToMe against tomesd 0.1.3 (`apply_patch`), DeepCache
against DeepCache 0.1.1 (`DeepCacheSDHelper`), both installed by the Makefile without their requirements.
Then what they promise as controllers: nothing changed when they skip nothing, the work they skip not
run, their errors, and the command line's --tome / --deepcache recorded and replayed."""
import json

import pytest
from PIL import Image
import tomesd  # installed by the Makefile, as DeepCache
import torch
from DeepCache import DeepCacheSDHelper
from diffusers import UNet2DConditionModel
from helpers import UNET, diffusers_pipeline, randomize_, rel_diff, rel_err

from altdiff_min.apps.cli import main
from altdiff_min.errors import BadType, BadValue
from altdiff_min.pipeline import load
from altdiff_min.research.interventions import Controller, evaluation, intervene
from altdiff_min.research.skipping import DeepCache, ToMe, bipartite_soft_matching, skip_branches
from weights_convert.unet import config_from_hf
from weights_convert.unet import load as load_unet

PROMPT, NEGATIVE = "一只戴着帽子的小狗", "模糊"
HEIGHT, WIDTH = 64, 96  # latents 8×12: non-square


@pytest.fixture(scope="module")
def unet_pair():
    """The small UNet of the pipeline tests (helpers.UNET), diffusers' and ours sharing its weights."""
    torch.manual_seed(0)
    ref = randomize_(UNet2DConditionModel(**UNET), 5).eval()
    ours, _ = load_unet(ref.state_dict(), config_from_hf(dict(ref.config)))
    return ref, ours


@pytest.fixture(scope="module")
def ours(small_model_dir):
    return load(small_model_dir)


@pytest.fixture(scope="module")
def plain(ours):
    """generate's pictures without skipping (our_images)."""
    return our_images(ours)


# (tomesd.apply_patch's settings, latents (batch, h, w)): tomesd's defaults on a batch of 4; and merging
# on two levels, in cross-attention too, with 3×2 cells that do not tile a 20-wide grid, on an odd
# batch (where tomesd, and ToMe, take each cell's top-left instead of a random token).
TOME_CASES = {"defaults": (dict(ratio=0.5, max_downsample=1), (4, 16, 24)),
              "two-levels": (dict(ratio=0.6, max_downsample=2, sx=3, sy=2, merge_crossattn=True), (3, 16, 20))}


@pytest.mark.parametrize("case", list(TOME_CASES))
@torch.no_grad()
def test_tome_equals_tomesd_on_the_unet(unet_pair, case):
    """Two UNet evaluations in a row (the random cells drawn on from one generator), against tomesd's
    patch of diffusers' UNet with its generator seeded alike."""
    ref, ours = unet_pair
    settings, (b, h, w) = TOME_CASES[case]
    g = torch.Generator().manual_seed(1)
    x, context = torch.randn(b, 4, h, w, generator=g), torch.randn(b, 77, UNET["cross_attention_dim"], generator=g)
    plain = ref(x, 500, encoder_hidden_states=context).sample
    tomesd.apply_patch(ref, **settings)
    try:
        ref._tome_info["args"]["generator"] = torch.Generator().manual_seed(7)  # tomesd's own, forked on first use
        expected = [ref(x, t, encoder_hidden_states=context).sample for t in (500, 300)]
    finally:
        tomesd.remove_patch(ref)
    with intervene([ToMe(seed=7, **settings)]):
        for t, theirs in zip((500, 300), expected):
            with evaluation(t, True, (h, w)):
                assert rel_err(ours(x, t, context), theirs) < 1e-5
    assert rel_diff(expected[0], plain) > 1e-2  # the merging changed the output: the test compares something


def test_tome_matching_merges_and_unmerges_as_written():
    """The matching by hand on a 4×6 grid, 2×2 cells, top-left dst: each src token's nearest dst by
    cosine, the r most similar merged (averaged with their dst), the rest kept; unmerge gives each
    merged token its dst's value."""
    g = torch.Generator().manual_seed(0)
    metric = torch.randn(2, 24, 5, generator=g)
    merge, unmerge = bipartite_soft_matching(metric, 4, 6, 2, 2, r=7)
    x = torch.randn(2, 24, 3, generator=g)
    merged, back = merge(x), unmerge(merge(x))
    dst = [0, 2, 4, 12, 14, 16]
    src = [i for i in range(24) if i not in dst]
    unit = metric / metric.norm(dim=-1, keepdim=True)
    for b in range(2):
        best, target = (unit[b, src] @ unit[b, dst].T).max(dim=-1)
        chosen = best.argsort(descending=True)[:7].tolist()
        kept = [s for j, s in enumerate(src) if j not in chosen]
        sums = {d: [x[b, d]] for d in dst}
        for j in chosen:
            sums[dst[target[j]]].append(x[b, src[j]])
        assert merged.shape == (2, 24 - 7, 3)
        assert set(map(tuple, merged[b, :len(kept)].tolist())) == set(map(tuple, x[b, kept].tolist()))
        assert torch.allclose(merged[b, len(kept):], torch.stack([torch.stack(sums[d]).mean(0) for d in dst]))
        for j, s in enumerate(src):
            assert torch.equal(back[b, s], back[b, dst[target[j]]] if j in chosen else x[b, s])
        assert torch.equal(back[b, dst], merged[b, len(kept):])


def our_images(ours, controllers=None, steps=5, **extra):
    return ours.generate(PROMPT, negative_prompt=NEGATIVE, n_samples=2, steps=steps, height=HEIGHT, width=WIDTH,
                         seed=42, output="tensor", progress=False, controllers=controllers, **extra)


def diffusers_images(pipe, steps=5):
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe(PROMPT, negative_prompt=NEGATIVE, num_images_per_prompt=2, num_inference_steps=steps,
                    guidance_scale=7.5, height=HEIGHT, width=WIDTH, output_type="pt",
                    generator=torch.Generator("cpu").manual_seed(42)).images


# (ToMe's settings or None, DeepCache's (interval, branch) or None) on DDIM, 5 steps, guidance 7.5.
PIPELINE_CASES = {"tome": (dict(ratio=0.5), None), "deepcache-3-0": (None, (3, 0)), "deepcache-2-4": (None, (2, 4)),
                  "both": (dict(ratio=0.5), (3, 0))}


@pytest.mark.parametrize("case", list(PIPELINE_CASES))
def test_same_images_as_the_reference_packages_on_diffusers(ours, plain, hub_layout, reference, case):
    """generate with ToMe and/or DeepCache against diffusers' AltDiffusionPipeline patched by tomesd and/or
    run under DeepCache's helper: the same pictures (guidance batch 4, 8×12 latents)."""
    tome, cache = PIPELINE_CASES[case]
    pipe = diffusers_pipeline(hub_layout, reference, "ddim")
    helper = DeepCacheSDHelper(pipe=pipe) if cache else None
    if tome:
        tomesd.apply_patch(pipe.unet, **tome)
        pipe.unet._tome_info["args"]["generator"] = torch.Generator().manual_seed(0)
    if helper:
        helper.set_params(cache_interval=cache[0], cache_branch_id=cache[1])
        helper.enable()
    try:
        expected = diffusers_images(pipe)
    finally:
        if helper:
            helper.disable()
        tomesd.remove_patch(pipe.unet)
    controllers = ([ToMe(**tome)] if tome else []) + ([DeepCache(*cache)] if cache else [])
    assert rel_err(our_images(ours, controllers), expected) < 1e-4
    assert rel_diff(plain, expected) > 1e-3  # without them the pictures differ: the test compares something


class Blocks(Controller):
    """Which blocks ran, by UNet evaluation and depth (a block hook after DeepCache's sees only those it runs)."""

    def __init__(self):
        self.ran = {}

    def block(self, when, depth, block, compute):
        self.ran.setdefault(when.call, []).append(depth)
        return compute()


class Lengths(Controller):
    """The length of the queries each self-attention of the finest level computes with."""

    def __init__(self):
        self.seen = []

    def qkv(self, site, when, q, k, v):
        if site.kind == "self" and site.scale == 1:
            self.seen.append((q.shape[1], k.shape[1]))


def test_skipping_nothing_changes_nothing(ours, plain):
    """ToMe ratio 0, DeepCache interval 1 and a block hook that only computes: the same pictures, bit for bit."""
    for controllers in ([ToMe(0.0)], [DeepCache(1)], [Blocks()]):
        assert torch.equal(our_images(ours, controllers), plain)


def test_the_work_skipped_is_not_done(ours):
    """DeepCache(3, 2): evaluations 0 and 3 run every block, 1, 2 and 4 only those at depth ≤ 2;
    ToMe(0.5): the finest self-attentions attend over half the tokens (8×12 = 96 → 48)."""
    seen, lengths = Blocks(), Lengths()
    our_images(ours, [DeepCache(3, 2), seen])
    n = skip_branches(ours.unet.cfg)
    assert n == 9 and max(seen.ran[0]) == n and seen.ran[0] == seen.ran[3]
    for call in (1, 2, 4):
        assert sorted(seen.ran[call]) == sorted(d for d in seen.ran[0] if d <= 2) and len(seen.ran[call]) < len(seen.ran[0])
    our_images(ours, [ToMe(0.5), lengths], steps=1)
    assert lengths.seen and set(lengths.seen) == {(48, 48)}


@pytest.mark.parametrize("make, error, message", [
    (lambda: ToMe(0.8), BadValue, r"ratio must be in \[0, 0.75\]"),
    (lambda: ToMe("half"), BadType, "ratio must be a number"),
    (lambda: ToMe(0.5, sx=0), BadValue, "sx must be at least 1"),
    (lambda: ToMe(0.5, merge_mlp=True), BadValue, "merge_mlp=True is not supported"),
    (lambda: ToMe(0.5, use_rand="yes"), BadType, "use_rand must be True or False"),
    (lambda: DeepCache(0), BadValue, "interval must be at least 1"),
    (lambda: DeepCache(3, 1.5), BadType, "branch must be a whole number"),
])
def test_bad_settings_are_one_line(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_a_branch_the_unet_lacks_and_tome_without_a_size_are_refused(ours, unet_pair):
    with pytest.raises(BadValue, match=r"branch 9: this UNet has 9 skip branches \(0–8\)"):
        our_images(ours, [DeepCache(3, 9)])
    _, unet = unet_pair
    x = torch.randn(2, 4, 8, 8)
    with pytest.raises(BadValue, match="ToMe needs the latents' size"), intervene([ToMe()]), torch.no_grad():
        unet(x, 500, torch.randn(2, 77, UNET["cross_attention_dim"]))


def test_the_command_line_uses_records_and_replays_them(small_model_dir, ours, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "o"
    args = ["generate", PROMPT, "--model", small_model_dir, "--n-samples", "2", "--steps", "4", "--H", str(HEIGHT),
            "--W", str(WIDTH), "--seed", "3", "--device", "cpu", "--skip-grid", "--outdir", str(out)]
    assert main(args + ["--tome", "0.5", "--deepcache", "2:1"]) == 0
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert rows[1]["tome"] == {"ratio": 0.5, "max_downsample": 1, "sx": 2, "sy": 2, "use_rand": True, "merge_attn": True,
                               "merge_crossattn": False, "seed": 0}
    assert rows[1]["deepcache"] == {"interval": 2, "branch": 1}
    expected = ours.generate(PROMPT, n_samples=2, steps=4, height=HEIGHT, width=WIDTH, seed=3, progress=False,
                             controllers=[ToMe(0.5), DeepCache(2, 1)])[1]
    assert Image.open(out / rows[1]["file"]).tobytes() == expected.tobytes()
    assert main(["generate", "--replay", str(out / rows[1]["file"]), "--outdir", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "samples" / "00000.png").read_bytes() == (out / rows[1]["file"]).read_bytes()
    for extra, message in ((["--tome", "0.9"], "--tome: ToMe ratio must be in"), (["--deepcache", "3:x"], "--deepcache takes N"),
                           (["--deepcache", "3:9"], "branch 9, but this model's UNet has 9"),
                           (["--tome", "0.5", "--compile"], "drop --compile")):
        capsys.readouterr()
        assert main(args + extra) == 2
        assert message in capsys.readouterr().err


def test_sweep_axes_skip_work_record_it_and_replay_it(tmp_path, capsys):
    """tome / deepcache are sweep axes (a ratio, an interval, the class's arguments, or null: off): each
    cell is generate with those controllers, its picture records their settings, and --replay remakes it."""
    from altdiff_min.storage.provenance import record_of_png

    spec = {"model": "toy", "prompts": ["un cercle rouge"], "seeds": [2], "metrics": ["toy"], "fixed": {"steps": 4},
            "axes": {"tome": [None, 0.5], "deepcache": [None, {"interval": 2, "branch": 1}]}}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    assert main(["sweep", str(tmp_path / "spec.json"), "--device", "cpu"]) == 0
    out, toy = tmp_path / "spec", load("toy")
    pictures = sorted((out / "pictures").iterdir())
    made = [ToMe(0.5) if t else None for t in (0, 0, 1, 1)], [DeepCache(2, 1) if d else None for d in (0, 1, 0, 1)]
    for picture, tome, deepcache in zip(pictures, *made):
        controllers = [c for c in (tome, deepcache) if c is not None]
        again = toy.generate("un cercle rouge", seed=2, steps=4, controllers=controllers)[0]
        assert Image.open(picture).tobytes() == again.tobytes()
        record = record_of_png(str(picture))
        assert {k: record.get(k) for k in ("tome", "deepcache")} == {
            "tome": tome and tome.settings(), "deepcache": deepcache and deepcache.settings()}
        assert main(["generate", "--replay", str(picture), "--outdir", str(tmp_path / picture.stem)]) == 0
        assert (tmp_path / picture.stem / "samples" / "00000.png").read_bytes() == picture.read_bytes()
    assert len({Image.open(p).tobytes() for p in pictures}) == 4  # each setting changes the picture
    capsys.readouterr()
    for bad, message in [({"tome": [0.99]}, "tome 0.99: ToMe ratio must be in"), ({"deepcache": [{"every": 2}]}, "not DeepCache's settings"),
                         ({"deepcache": [{"interval": 2, "branch": 6}]}, f"this model's UNet has {skip_branches(toy.unet.cfg)} skip branches")]:
        (tmp_path / "bad.json").write_text(json.dumps({**spec, "axes": bad}))
        assert main(["sweep", str(tmp_path / "bad.json"), "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and not (tmp_path / "bad").exists()
