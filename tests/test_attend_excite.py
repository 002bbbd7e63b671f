"""Latent guidance by cross-attention (altdiff_min.research.attend_excite): Attend-and-Excite equal to
diffusers' StableDiffusionAttendAndExcitePipeline step by step; SynGen's binding loss equal to the
formula computed by hand, and its update a step down the gradient (no runnable reference: see the
module's docstring); words found in several languages; bad input in one line before any model work;
nothing changed when unused; the command line's flags recorded and replayed."""
import functools
import json
import math
import os

import pytest
import torch
from helpers import SCHEDULER, SCHEDULERS, rel_diff, rel_err
from PIL import Image

import altdiff_min
from altdiff_min.apps.cli import main
from altdiff_min.errors import BadType, BadValue
from altdiff_min.pipeline import load
from altdiff_min.research.attend_excite import (AttendAndExcite, Bind, ExciteConfig, binding_loss, excite_loss,
                                               occurrences)
from altdiff_min.research.interventions import Controller, Step, intervene
from altdiff_min.sampling.schedule import timesteps
from altdiff_min.toy import data
from altdiff_min.toy.binding import colour_pairs, evaluate_binding, toy_bind, toy_excite
from altdiff_min.toy.detect import compositions, evaluate_scenes

PROMPTS, NEGATIVE = ["a red circle on a white background", "un cercle rouge sur un fond blanc"], "模糊"
INDICES = [[2, 3], [2]]  # diffusers' token_indices, one list a prompt: ▁re, d; ▁cerc (the small tokenizer's pieces)
RUN = dict(height=64, width=96, progress=False, output="tensor")  # latents 8×12; the small UNet's grids 8×12, 4×6, 2×3
SCALE = 2  # the 4×6 grid: down.1 and up.1, five cross-attentions


@pytest.fixture(scope="module")
def ours(small_model_dir):
    return load(small_model_dir)


@pytest.fixture(scope="module")
def toy():
    return altdiff_min.load("toy")


def diffusers_attend_and_excite(reference, hub_layout, sampler, max_refinement_steps):
    """diffusers' pipeline on the small reference modules; its refinement's cap (a parameter of its
    `_perform_iterative_refinement_step`, 20, which __call__ does not pass) set for this instance."""
    import diffusers
    from diffusers.pipelines.deprecated.stable_diffusion_attend_and_excite import StableDiffusionAttendAndExcitePipeline
    from transformers import XLMRobertaTokenizer

    name, extra = SCHEDULERS[sampler]
    scheduler = getattr(diffusers, name).from_config(diffusers.DDIMScheduler.from_config(SCHEDULER).config, **extra)
    tokenizer = XLMRobertaTokenizer.from_pretrained(os.path.join(hub_layout, "tokenizer"), model_max_length=77)
    pipe = StableDiffusionAttendAndExcitePipeline(
        vae=reference["vae"], text_encoder=reference["text_encoder"], tokenizer=tokenizer, unet=reference["unet"],
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe._perform_iterative_refinement_step = functools.partial(
        type(pipe)._perform_iterative_refinement_step, pipe, max_refinement_steps=max_refinement_steps)
    return pipe


def guided_inputs(unet, batch: int):
    """A pre-hook keeping the latents of every guided UNet call (batch 2B: [x; x]): the latents each
    step reads, after that step's latent update."""
    seen = []

    def hook(module, args):
        if args[0].shape[0] == 2 * batch:
            seen.append(args[0][:batch].detach().clone())
    return seen, unet.register_forward_pre_hook(hook)


@pytest.mark.parametrize("sampler,n", [("ddim", 2), ("dpm++2m", 1)])
def test_attend_and_excite_equals_diffusers_step_by_step(ours, reference, hub_layout, sampler, n):
    """Two prompts (n pictures each), non-square latents, our text encoder's contexts fed to diffusers.
    Step 0 refines: its threshold lies between the pictures' first losses, so some refine and some do
    not; the update stops after step 2 of 4. Compared: the latents each guided UNet call reads (after
    its step's update), and the pictures."""
    steps, batch = 4, len(PROMPTS) * n
    common = dict(negative_prompt=NEGATIVE, n_samples=n, steps=steps, sampler=sampler, seed=7, **RUN)
    probe = AttendAndExcite(INDICES, scale=SCALE, max_iter_to_alter=0, thresholds={0: 0.0})  # reads step 0 only
    plain = ours.generate(PROMPTS, controllers=[probe], **common)
    first = sorted(probe.losses[0][1])
    threshold = 1 - (first[batch // 2 - 1] + first[batch // 2]) / 2  # half the pictures above 1 − threshold
    options = dict(max_iter_to_alter=3, thresholds={0: threshold}, scale_factor=2000)

    pipe = diffusers_attend_and_excite(reference, hub_layout, sampler, max_refinement_steps=3)
    cond, uncond = ours.encode(PROMPTS), ours.encode([NEGATIVE]).expand(len(PROMPTS), -1, -1)
    theirs, hook = guided_inputs(reference["unet"], batch)
    try:
        with torch.no_grad():
            expected = pipe(None, prompt_embeds=cond, negative_prompt_embeds=uncond, token_indices=INDICES,
                            height=RUN["height"], width=RUN["width"], num_inference_steps=steps, num_images_per_prompt=n,
                            attn_res=(4, 6), generator=torch.Generator().manual_seed(7), output_type="pt", **options).images
    finally:
        hook.remove()
    excite = AttendAndExcite(INDICES, scale=SCALE, max_refinement_steps=3, **options)
    mine, hook = guided_inputs(ours.unet, batch)
    try:
        got = ours.generate(PROMPTS, controllers=[excite], **common)
    finally:
        hook.remove()
    assert len(mine) == len(theirs) == steps
    reads = [i for i, _ in excite.losses]  # step 0: its read, refinement's (≤ 2 more), the final one; steps 1, 2
    assert 2 <= reads.count(0) <= 4 and reads[reads.count(0):] == [1, 2]
    refining = [loss > 1 - threshold for loss in excite.losses[0][1]]
    assert 0 < sum(refining) < batch
    for a, b in zip(mine, theirs):
        assert rel_err(a, b) < 1e-4
    assert rel_err(got, expected) < 1e-4
    assert rel_diff(got, plain) > 1e-2  # the guidance changed the pictures, visibly to the comparison


def smoothed_peak(m):
    """diffusers' GaussianSmoothing (3×3, σ 0.5 as it writes the exponent) after reflect padding, by hand; the maximum."""
    k = [math.exp(-1), 1.0, math.exp(-1)]  # exp(−(d / (2·0.5))²), d = −1, 0, 1
    total = sum(k) ** 2
    h, w = len(m), len(m[0])

    def at(i, j):  # reflect padding: index −1 → 1, h → h − 2
        i = -i if i < 0 else 2 * (h - 1) - i if i >= h else i
        j = -j if j < 0 else 2 * (w - 1) - j if j >= w else j
        return m[i][j]
    return max(sum(k[a + 1] * k[b + 1] * at(i + a, j + b) for a in (-1, 0, 1) for b in (-1, 0, 1)) / total
               for i in range(h) for j in range(w))


@pytest.mark.parametrize("normalize_eot", [False, True])
def test_excite_loss_by_hand(normalize_eot):
    """Steps 1–3 on small random maps, with a subject of two pieces (their shares summed) and, with
    normalize_eot, the softmax over the prompt's own pieces only."""
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(2, 3, 4, 77, generator=g, dtype=torch.float64) * 0.05
    subjects, lengths = [[[2], [4, 5]], [[1, 3]]], [9, 6]
    got = excite_loss(maps, subjects, ExciteConfig(normalize_eot=normalize_eot), lengths)
    for b in range(2):
        end = lengths[b] - 1 if normalize_eot else 76
        peaks = []
        for positions in subjects[b]:
            share = [[0.0] * 4 for _ in range(3)]
            for i in range(3):
                for j in range(4):
                    e = [math.exp(100 * maps[b, i, j, p].item()) for p in range(1, end)]
                    share[i][j] = sum(e[p - 1] for p in positions) / sum(e)
            peaks.append(smoothed_peak(share))
        assert abs(got[b].item() - max(max(0.0, 1 - p) for p in peaks)) < 1e-9


def test_binding_loss_by_hand():
    """SynGen's L (the module's docstring) on small random maps: a noun with two modifiers, a noun of
    two pieces, U every other piece between <s> and </s>; each map a distribution over the pixels."""
    g = torch.Generator().manual_seed(1)
    maps = torch.rand(1, 2, 3, 12, generator=g, dtype=torch.float64) + 0.01
    trees, length = [((4,), [(2,), (3,)]), ((7, 8), [(6,)])], 11

    def dist_of(positions):
        v = [sum(maps[0, i, j, p].item() for p in positions) for i in range(2) for j in range(3)]
        return [x / sum(v) for x in v]

    def sym(p, q):
        return (sum(a * math.log(a / b) for a, b in zip(p, q)) + sum(b * math.log(b / a) for a, b in zip(p, q))) / 2
    expected = 0.0
    for noun, modifiers in trees:
        inside = set(noun) | {p for m in modifiers for p in m}
        outside = [u for u in range(1, length - 1) if u not in inside]
        for m in modifiers:
            expected += sym(dist_of(m), dist_of(noun))
            expected -= sum(sym(dist_of(m), dist_of([u])) + sym(dist_of(noun), dist_of([u])) for u in outside) / (2 * len(outside))
    got = binding_loss(maps, [trees], [length])
    assert got.shape == (1,) and abs(got.item() - expected) < 1e-9 * abs(expected)


class Keep(Controller):
    """The probabilities with their graph, at the sites of one grid."""

    def __init__(self, scale):
        self.scale, self.kept = scale, []

    def probs(self, site, when, probs):
        if site.kind == "cross" and site.scale == self.scale:
            self.kept.append(probs)


def test_binding_update_is_a_step_down_the_gradient(ours):
    """Bind's update equals x − 20·∇ₓL with the maps averaged here (over the grid's sites and heads) and
    L's gradient by autograd; and a small step that way lowers L: the loss is what the update descends."""
    prompt = PROMPTS[1]
    bind = Bind.for_pairs(ours.tokenizer, prompt, [("rouge", "cercle")], scale=SCALE)
    x = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(2))
    cond = ours.encode([prompt]).expand(2, -1, -1)
    step = Step(0, 801.0, 50, "ddim", lambda z: ours.denoise(z, 801.0, cond))
    trees, lengths = [bind.subtrees[0]] * 2, [bind.lengths[0]] * 2

    def loss_at(z):
        keep = Keep(SCALE)
        with intervene([keep]):
            ours.denoise(z, 801.0, cond)
        maps = torch.cat(keep.kept, dim=1).float().mean(dim=1).reshape(2, 4, 6, -1)
        return binding_loss(maps, trees, lengths)
    with torch.no_grad():
        moved = bind.latents(step, x)
    with torch.enable_grad():
        z = x.clone().requires_grad_(True)
        loss = loss_at(z)
        (grad,) = torch.autograd.grad(loss.sum(), z)
    assert rel_diff(moved, x - 20 * grad) < 1e-6
    assert torch.allclose(torch.tensor(bind.losses[0][1]), loss.detach(), rtol=1e-5)
    with torch.no_grad():
        lower = loss_at(x - 1e-2 * grad / grad.norm())
    assert (lower < loss.detach()).all()


@pytest.mark.parametrize("prompt,word", [
    ("a red circle", "circle"), ("一个红色的圆形", "圆形"), ("un carré bleu", "carré"), ("синий квадрат", "квадрат"),
    ("изображение красного круга", "круга"), ("赤い円の絵", "円"), ("빨간 원이 파란 정사각형 왼쪽에 있다", "원"),
    ("صورة لدائرة حمراء", "دائرة"), ("un'immagine di un cerchio rosso", "cerchio"),
])
def test_words_are_found_by_their_pieces_in_many_languages(toy, prompt, word):
    """for_words finds a word as daam.word_positions does (runs of pieces, glued particles and cases too)."""
    excite = AttendAndExcite.for_words(toy.tokenizer, prompt, [word])
    pieces = toy.tokenizer.pieces(prompt)
    (positions,) = excite.subjects[0]
    assert "".join(pieces[p] for p in positions).replace("▁", "") == word
    assert excite.lengths == (len(pieces),) and excite.prompts == (prompt,)


def test_pairs_bind_where_the_words_stand(toy):
    """A colour said twice binds to each noun by where it stands (for_pairs: the nearest occurrences),
    and the toy's colour words pair with their own shape in every language and phrasing of a scene."""
    prompt = "a red circle to the left of a red square"
    bind = Bind.for_pairs(toy.tokenizer, prompt, [("red", "circle"), ("red", "square")])
    (red1,), (red2,) = occurrences(toy.tokenizer, prompt, "red")
    ((circle,),), ((square,),) = occurrences(toy.tokenizer, prompt, "circle"), occurrences(toy.tokenizer, prompt, "square")
    assert bind.subtrees[0] == (((circle,), [(red1,)]), ((square,), [(red2,)]))
    scenes = [data.Scene(data.Obj("circle", "red", "small"), "left of", data.Obj("square", "orange", "big")),
              data.Scene(data.Obj("triangle", "yellow"), "above", data.Obj("triangle", "green")),
              data.Scene(data.Obj("square", "purple", "big"))]
    for scene in scenes:
        for lang in data.LANGUAGES:
            truth = [{(w["colour"], w["shape"]) for w in (data.words(o, lang, case) for case in ("nom", "gen", "ins"))}
                     for o in scene.objects]
            for phrasing in range(3 if scene.second is None else 4):
                caption = data.caption_scene(scene, lang, phrasing)
                pieces = toy.tokenizer.pieces(caption)
                spelled = [tuple("".join(pieces[p] for p in w).replace("▁", "") for w in pair)
                           for pair in colour_pairs(toy.tokenizer, caption)]
                assert len(spelled) == len(truth) and all(any(p in t for p in spelled) for t in truth), caption
    prompts = ["un cercle rouge", "一个红色的圆形"]
    bind = toy_bind(toy.tokenizer, prompts)
    assert bind.lengths == tuple(len(toy.tokenizer.pieces(p)) for p in prompts) and bind.prompts == tuple(prompts)
    for prompt, ((noun, (colour,)),), said in zip(prompts, bind.subtrees, [("rouge", "cercle"), ("红色", "圆形")]):
        pieces = toy.tokenizer.pieces(prompt)
        assert tuple("".join(pieces[p] for p in w).replace("▁", "") for w in (colour, noun)) == said
    two = data.caption_scene(scenes[1], "ru", 0)  # the same shape twice: two subjects, the nouns bind names
    excite = toy_excite(toy.tokenizer, prompts + [two])
    assert excite.subjects == tuple(tuple(tuple(n) for _, n in colour_pairs(toy.tokenizer, p)) for p in prompts + [two])
    assert len(excite.subjects[-1]) == 2 and excite.prompts == tuple(prompts + [two])


def test_binding_is_measured_four_ways_with_each_calls_own_controllers(toy):
    scenes = compositions(singles=0, pairs=2, seed=4)
    tables = evaluate_binding(toy, languages=("ko", "es"), scenes=scenes, steps=2)  # 2 steps: the plumbing, not quality
    assert list(tables) == ["plain", "excite", "bind", "both"] and all(t["seconds"] > 0 for t in tables.values())
    alone = {lang: evaluate_scenes(toy, scenes, languages=(lang,), steps=2)[lang] for lang in ("ko", "es")}
    assert tables["plain"]["table"] == alone  # one call a language: each language's noise is its own call's
    assert all(set(t["table"]) == {"ko", "es"} and t["table"]["es"]["pairs"] == 2 for t in tables.values())
    with pytest.raises(BadValue, match="ways"):
        evaluate_binding(toy, ways=("plain", "syngen"))
    for way, options in (("excite", {"excite": {"scale": 8}}), ("bind", {"bind": {"scale": 8}})):  # the methods' options
        with pytest.raises(BadValue, match="would be 1×1"):
            evaluate_binding(toy, ways=(way,), languages=("ko",), scenes=scenes, steps=2, **options)


def test_bad_input_is_one_line_before_any_model_work(ours, small_model_dir, monkeypatch):
    prompt = PROMPTS[0]
    with pytest.raises(BadValue, match="'square' is not a word of"):
        AttendAndExcite.for_words(ours.tokenizer, prompt, ["circle", "square"])
    with pytest.raises(BadValue, match="is not a word of"):
        Bind.for_pairs(ours.tokenizer, prompt, [("blue", "circle")])
    for bad, error in [("circle", BadType), ([[0, 2]], BadValue), ([[2], []], BadType), ([[2, 99]], BadValue)]:
        with pytest.raises(error, match="indices"):
            AttendAndExcite(bad)
    with pytest.raises(BadValue, match="thresholds"):
        AttendAndExcite([2], thresholds={0: 2.0})
    with pytest.raises(BadValue, match="scale_factor"):
        AttendAndExcite([2], scale_factor=-1)
    with pytest.raises(BadValue, match="normalize_eot needs"):
        AttendAndExcite([2], normalize_eot=True)
    with pytest.raises(BadType, match="pairs"):
        Bind.for_pairs(ours.tokenizer, prompt, "red=circle")
    with pytest.raises(BadValue, match="colour word"):
        colour_pairs(ours.tokenizer, "a dog")
    excite, bind = AttendAndExcite.for_words(ours.tokenizer, prompt, ["circle"]), Bind([[([2], [3])]], [10])
    monkeypatch.setattr(ours.text_encoder, "forward", lambda *a: pytest.fail("the model ran"))
    for controller, kwargs, match in [
            (excite, dict(sampler="euler"), "sampler must be one of"), (bind, dict(sampler="plms"), "sampler must be one of"),
            (excite, dict(prompt=PROMPTS[1]), "was built for the prompt"),
            (Bind.for_pairs(ours.tokenizer, prompt, [("red", "circle")]), dict(prompt=PROMPTS[1]), "was built for"),
            (AttendAndExcite([[2], [3]]), {}, "given for 2 prompt")]:
        with pytest.raises(BadValue, match=match):
            ours.generate(kwargs.pop("prompt", prompt), steps=2, controllers=[controller], **kwargs, **RUN)
    compiled = load(small_model_dir, compile=True)  # compiled at its first call, which never comes
    with pytest.raises(BadValue, match="compiled"):
        compiled.generate(prompt, steps=2, controllers=[excite], **RUN)


def test_runs_it_cannot_read_are_one_line_before_the_first_step(ours):
    for kwargs, options, match in [({}, dict(scale=8), "would be 1×1"),
                                   (dict(cross_attention=False), dict(scale=SCALE), "no cross-attention ran")]:
        with pytest.raises(BadValue, match=match):
            ours.generate(PROMPTS[0], steps=2, controllers=[AttendAndExcite([2], **options)], **kwargs, **RUN)


def test_unused_it_changes_nothing_and_the_hook_runs_before_each_step(ours):
    """Controllers whose hook never moves the latents give generate's pictures bit for bit; a `latents`
    hook sees every step once, in order, after the callback, with the step's timestep and the
    prompts' rows."""
    common = dict(n_samples=2, steps=3, seed=1, **RUN)
    plain = ours.generate(PROMPTS, **common)
    idle = [AttendAndExcite(INDICES, scale=SCALE, max_iter_to_alter=0, thresholds={}),
            Bind([[([2], [3])], [([2], [3])]], [10, 10], scale=SCALE, max_iter_to_alter=0)]
    assert torch.equal(ours.generate(PROMPTS, controllers=idle, **common), plain)

    class Watch(Controller):
        def __init__(self):
            self.seen = []

        def latents(self, step, x):
            self.seen.append((step.i, step.t, step.steps, step.sampler, x.clone(), step.unet(x).shape))
            return None
    watch, after = Watch(), []
    assert torch.equal(ours.generate(PROMPTS, controllers=[watch], callback=lambda i, t, x, x0: after.append(x.clone()),
                                     **common), plain)
    ts = timesteps("ddim", 3, ours.schedule)
    assert [s[:4] for s in watch.seen] == [(i, float(t), 3, "ddim") for i, t in enumerate(ts)]
    assert all(torch.equal(s[4], x) for s, x in zip(watch.seen[1:], after))  # step i + 1 reads what step i left
    assert all(s[5] == (4, 4, 8, 12) for s in watch.seen)


def test_an_inverted_picture_is_sampled_with_the_hook_too(ours):
    """sample_inverted (editing real pictures) runs the `latents` hooks as generate does: each step
    once, in order, on the prompts' rows; Bind moves its latents."""
    from altdiff_min.inversion import Inversion, sample_inverted

    ts = timesteps("ddim", 3, ours.schedule)
    noise = torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(4))
    inversion = Inversion([noise], ts, ours.encode(PROMPTS[:1]), [ours.encode([""])] * 3, 7.5)
    seen = []

    class Watch(Controller):
        def latents(self, step, x):
            seen.append((step.i, step.t, tuple(x.shape)))
    plain = sample_inverted(ours, inversion, PROMPTS, controllers=[Watch()], progress=False)
    assert seen == [(i, float(t), (2, 4, 8, 12)) for i, t in enumerate(ts)]
    said = [("red", "circle"), ("rouge", "cercle")]  # one pair a prompt, each in its language
    pairs = [[tuple(occurrences(ours.tokenizer, p, w)[0] for w in pair)] for p, pair in zip(PROMPTS, said)]
    bind = Bind(pairs, [len(ours.tokenizer.pieces(p)) for p in PROMPTS], scale=SCALE, step_size=2000)
    bound = sample_inverted(ours, inversion, PROMPTS, progress=False, controllers=[bind])
    assert [i for i, _ in bind.losses] == [0, 1, 2]
    assert rel_diff(bound, plain) > 1e-3
    with pytest.raises(BadValue, match="was built for"):
        sample_inverted(ours, inversion, PROMPTS[:1], progress=False,
                        controllers=[AttendAndExcite.for_words(ours.tokenizer, PROMPTS[1], ["cercle"])])


def test_the_command_line_binds_records_and_replays(small_model_dir, tmp_path):
    """--bind-pairs through generate: the Python picture, recorded, replayed byte for byte (the flags'
    controllers reach model.generate one way for all three flags)."""
    out = tmp_path / "o"
    args = ["generate", PROMPTS[1], "--model", small_model_dir, "--n-samples", "1", "--steps", "2", "--H", "64",
            "--W", "96", "--seed", "3", "--device", "cpu", "--skip-grid"]
    assert main(args + ["--outdir", str(out), "--bind-pairs", "rouge=cercle"]) == 0
    (row,) = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert row["bind_pairs"] == [["rouge", "cercle"]] and "bind" not in row and "excite" not in row
    model = load(small_model_dir)
    expected = model.generate(PROMPTS[1], steps=2, height=64, width=96, seed=3, progress=False,
                              controllers=[Bind.for_pairs(model.tokenizer, PROMPTS[1], [("rouge", "cercle")])])[0]
    assert Image.open(out / row["file"]).tobytes() == expected.tobytes()
    assert main(["generate", "--replay", str(out / row["file"]), "--outdir", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "samples" / "00000.png").read_bytes() == (out / row["file"]).read_bytes()


def test_the_flags_make_the_python_controllers_and_replay_them(toy):
    """Each flag gives the controller the Python API gives for its words; its record gives the flag back."""
    from argparse import Namespace

    from altdiff_min.apps import excite as flags

    prompt = "un cercle rouge à gauche d'un carré bleu"
    args = Namespace(excite="cercle, carré", bind=True, bind_pairs=None)
    excite, bind = flags.controllers(args, toy.tokenizer, prompt, "ddim")
    assert excite.subjects == AttendAndExcite.for_words(toy.tokenizer, prompt, ["cercle", "carré"]).subjects
    assert bind.subtrees == toy_bind(toy.tokenizer, prompt).subtrees
    pairs = Namespace(excite=None, bind=False, bind_pairs="rouge=cercle,bleu=carré")
    (bound,) = flags.controllers(pairs, toy.tokenizer, prompt, "dpm++2m")
    assert bound.subtrees == Bind.for_pairs(toy.tokenizer, prompt, [("rouge", "cercle"), ("bleu", "carré")]).subtrees
    for given in (args, pairs):
        again = Namespace()
        flags.replay(again, json.loads(json.dumps(flags.record(given))))
        assert flags.record(again) == flags.record(given)
    assert flags.record(args) == {"excite": ["cercle", "carré"], "bind": True}


@pytest.mark.parametrize("prompt,extra,message", [
    (PROMPTS[1], ["--excite", "carré"], "--excite: 'carré' is not a word of"),
    (PROMPTS[1], ["--excite", "cercle,"], "--excite takes words separated by commas"),
    (PROMPTS[1], ["--bind-pairs", "rouge"], "--bind-pairs takes MODIFIER=NOUN pairs"),
    (PROMPTS[1], ["--bind", "--bind-pairs", "rouge=cercle"], "not both"),
    ("un chien", ["--bind"], "--bind pairs the toy's colour words"),
    (PROMPTS[1], ["--excite", "cercle", "--sampler", "euler_a"], "sampler must be one of"),
    (PROMPTS[1], ["--excite", "cercle", "--compile"], "drop --compile"),
])
def test_bad_flags_are_refused_before_the_model_loads(small_model_dir, tmp_path, capsys, monkeypatch, prompt, extra, message):
    import altdiff_min.pipeline as pipeline

    monkeypatch.setattr(pipeline, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(["generate", prompt, "--model", small_model_dir, "--outdir", str(tmp_path / "no"), "--device", "cpu",
                 *extra]) == 2
    assert message in capsys.readouterr().err
