"""The toy's graded scores (altdiff_min/toy/graded.py): CIEDE2000 against its published test pairs, exact
scores on rendered pictures, how each moves under a known change, near-ideal after the toy's VAE, and
evaluate passing generate's arguments through."""
import functools
import sys

import numpy as np
import pytest
import torch

from altdiff_min import load
from altdiff_min.errors import BadValue
from altdiff_min.toy import COLOURS, SHAPES, Obj, Scene, evaluate, evaluate_scenes, format_table, grade
from altdiff_min.toy.data import SIZE, WHITE, mask, random_scene, render, render_scene
from altdiff_min.toy.detect import compositions, swapped
from altdiff_min.toy.graded import ciede2000, delta_e, relation_error, shape_iou, srgb_to_lab
from altdiff_min.toy.world import ToyWorld

# Sharma, Wu & Dalal (2005), Table 1: the 34 pairs (L*1, a*1, b*1, L*2, a*2, b*2) and their ΔE00, to 4 decimals.
SHARMA = [
    (50.0000, 2.6772, -79.7751, 50.0000, 0.0000, -82.7485, 2.0425),
    (50.0000, 3.1571, -77.2803, 50.0000, 0.0000, -82.7485, 2.8615),
    (50.0000, 2.8361, -74.0200, 50.0000, 0.0000, -82.7485, 3.4412),
    (50.0000, -1.3802, -84.2814, 50.0000, 0.0000, -82.7485, 1.0000),
    (50.0000, -1.1848, -84.8006, 50.0000, 0.0000, -82.7485, 1.0000),
    (50.0000, -0.9009, -85.5211, 50.0000, 0.0000, -82.7485, 1.0000),
    (50.0000, 0.0000, 0.0000, 50.0000, -1.0000, 2.0000, 2.3669),
    (50.0000, -1.0000, 2.0000, 50.0000, 0.0000, 0.0000, 2.3669),
    (50.0000, 2.4900, -0.0010, 50.0000, -2.4900, 0.0009, 7.1792),
    (50.0000, 2.4900, -0.0010, 50.0000, -2.4900, 0.0010, 7.1792),
    (50.0000, 2.4900, -0.0010, 50.0000, -2.4900, 0.0011, 7.2195),
    (50.0000, 2.4900, -0.0010, 50.0000, -2.4900, 0.0012, 7.2195),
    (50.0000, -0.0010, 2.4900, 50.0000, 0.0009, -2.4900, 4.8045),
    (50.0000, -0.0010, 2.4900, 50.0000, 0.0010, -2.4900, 4.8045),
    (50.0000, -0.0010, 2.4900, 50.0000, 0.0011, -2.4900, 4.7461),
    (50.0000, 2.5000, 0.0000, 50.0000, 0.0000, -2.5000, 4.3065),
    (50.0000, 2.5000, 0.0000, 73.0000, 25.0000, -18.0000, 27.1492),
    (50.0000, 2.5000, 0.0000, 61.0000, -5.0000, 29.0000, 22.8977),
    (50.0000, 2.5000, 0.0000, 56.0000, -27.0000, -3.0000, 31.9030),
    (50.0000, 2.5000, 0.0000, 58.0000, 24.0000, 15.0000, 19.4535),
    (50.0000, 2.5000, 0.0000, 50.0000, 3.1736, 0.5854, 1.0000),
    (50.0000, 2.5000, 0.0000, 50.0000, 3.2972, 0.0000, 1.0000),
    (50.0000, 2.5000, 0.0000, 50.0000, 1.8634, 0.5757, 1.0000),
    (50.0000, 2.5000, 0.0000, 50.0000, 3.2592, 0.3350, 1.0000),
    (60.2574, -34.0099, 36.2677, 60.4626, -34.1751, 39.4387, 1.2644),
    (63.0109, -31.0961, -5.8663, 62.8187, -29.7946, -4.0864, 1.2630),
    (61.2901, 3.7196, -5.3901, 61.4292, 2.2480, -4.9620, 1.8731),
    (35.0831, -44.1164, 3.7933, 35.0232, -40.0716, 1.5901, 1.8645),
    (22.7233, 20.0904, -46.6940, 23.0331, 14.9730, -42.5619, 2.0373),
    (36.4612, 47.8580, 18.3852, 36.2715, 50.5065, 21.2231, 1.4146),
    (90.8027, -2.0831, 1.4410, 91.1528, -1.6435, 0.0447, 1.4441),
    (90.9257, -0.5406, -0.9208, 88.6381, -0.8985, -0.7239, 1.5381),
    (6.7747, -0.2908, -2.4247, 5.8714, -0.0985, -2.2286, 0.6377),
    (2.0776, 0.0795, -1.1350, 0.9033, -0.0636, -0.5514, 0.9082),
]
EXACT_ONE = {"delta_e": 0.0, "iou": 1.0, "position": None}
EXACT_PAIR = {"delta_e": 0.0, "iou": 1.0, "position": 0.0}


# ---- the colour difference ------------------------------------------------------------------------------
def test_ciede2000_gives_the_published_values_of_all_34_test_pairs():
    table = np.array(SHARMA)
    ours = ciede2000(table[:, :3], table[:, 3:6])  # all at once: the formula is elementwise
    assert np.abs(ours - table[:, 6]).max() < 5e-5  # the table's 4 decimals
    assert np.allclose(ciede2000(table[:, 3:6], table[:, :3]), ours, rtol=0, atol=1e-12)  # symmetric
    assert ciede2000([50, 2.5, 0], [50, 2.5, 0]) == 0


def test_srgb_to_lab_of_greys_by_hand_and_of_the_primaries():
    # Greys have X/Xn = Y/Yn = Z/Zn (the white is the matrix's row sums): a* = b* = 0 and L* = 116 ∛Y − 16.
    # 128: (128/255 + 0.055)/1.055 = 0.528 …, to the 2.4: Y = 0.21586, ∛ = 0.59987, L* = 53.585.
    assert np.allclose(srgb_to_lab([[255, 255, 255], [0, 0, 0], [128, 128, 128]]),
                       [[100, 0, 0], [0, 0, 0], [53.585, 0, 0]], rtol=0, atol=1e-3)
    # sRGB's primaries as colour calculators give them (Lab D65); the IEC matrix's 4 digits move them by ≤ 0.03.
    assert np.allclose(srgb_to_lab([[255, 0, 0], [0, 255, 0], [0, 0, 255]]),
                       [[53.24, 80.09, 67.20], [87.73, -86.18, 83.18], [32.30, 79.19, -107.86]], rtol=0, atol=0.05)


# ---- rendered pictures: exact ------------------------------------------------------------------------------
def test_rendered_pictures_score_exactly_ideal():
    rng = np.random.default_rng(0)
    for shape in SHAPES:
        for colour in COLOURS:
            for _ in range(3):  # any size 24–48 and any place, as the world draws them
                assert grade(render(shape, colour, rng=rng), Scene(Obj(shape, colour))) == EXACT_ONE
    for size in ("small", "big"):  # a lone object with a size word: 14–20 and 32–46 pixels
        for shape in SHAPES:
            scene = Scene(Obj(shape, "purple", size))
            assert grade(render_scene(scene, rng), scene) == EXACT_ONE
    for _ in range(40):  # pairs: each object exact, and in its relation
        scene = random_scene(rng, 2)
        picture = render_scene(scene, rng)
        assert grade(picture, scene) == grade(picture, scene.flipped()) == EXACT_PAIR
    framed = np.pad(picture, ((5, 11), (20, 12), (0, 0)), constant_values=255)  # 80 × 96: another picture size
    assert grade(framed, scene) == EXACT_PAIR
    blank = np.full((SIZE, SIZE, 3), WHITE, np.uint8)
    assert grade(blank, Scene(Obj("circle", "red"))) == dict.fromkeys(EXACT_ONE)  # nothing to score


def test_delta_e_is_the_formulas_for_a_changed_colour_and_grows_towards_white():
    picture = render("square", "red", size=30, center=(32, 32))
    ink = (picture != 255).any(-1)
    for rgb in ((200, 60, 40), (30, 160, 60), (235, 200, 20)):
        changed = picture.copy()
        changed[ink] = rgb
        want = ciede2000(srgb_to_lab(rgb), srgb_to_lab(COLOURS["red"]))
        assert grade(changed, Scene(Obj("square", "red")))["delta_e"] == pytest.approx(want, rel=1e-12)
    steps = []
    for t in (0, 0.1, 0.2, 0.3, 0.4):  # blended with the white, as a model's pale colours are
        changed = picture.copy()
        changed[ink] = np.round((1 - t) * np.array(COLOURS["red"]) + t * 255).astype(np.uint8)
        steps.append(grade(changed, Scene(Obj("square", "red")))["delta_e"])
    assert steps[0] == 0 and all(a < b for a, b in zip(steps, steps[1:])), steps


def test_iou_falls_as_a_shape_is_cut_and_for_a_wrong_shape():
    square = mask("square", 30, (32, 32))
    cut = [shape_iou(square & (np.arange(SIZE) < 47 - k), "square") for k in range(9)]  # k columns off the right
    assert cut[0] == 1 and all(a >= b for a, b in zip(cut, cut[1:])) and all(a > b for a, b in zip(cut[2:], cut[3:]))
    assert cut[:3] == [1.0, 1.0, 1.0]  # up to 2 columns: a 28–29-pixel square with its edge given (shape_iou)
    off = (32.3, 31.6)
    assert 0.8 < shape_iou(mask("square", 30, off), "circle") < 0.9 and 0.8 < shape_iou(mask("circle", 30, off), "square") < 0.9
    assert shape_iou(mask("triangle", 30, off), "square") < 0.6


def pair(first: Obj, a: tuple, second: Obj, b: tuple, side: int = 16) -> np.ndarray:
    """Two objects drawn where we say (integer centres, an even side: their boxes' centres are these)."""
    picture = np.full((SIZE, SIZE, 3), WHITE, np.uint8)
    for obj, centre in ((first, a), (second, b)):
        picture[mask(obj.shape, side, centre)] = COLOURS[obj.colour]
    return picture


def test_position_error_is_zero_when_the_relation_reads_right_and_grows_with_a_shift():
    red, blue = Obj("square", "red"), Obj("circle", "blue")
    left = Scene(red, "left of", blue)
    assert grade(pair(red, (20, 32), blue, (44, 32)), left)["position"] == 0
    for k in range(6):  # drawn the other way round, then pushed k pixels further: the centres' distance
        assert grade(pair(red, (44 + k, 32), blue, (20, 32)), left)["position"] == 24 + k
    above = Scene(red, "above", blue)
    for k in (2, 4, 6):  # beside the cone: k pixels more across than along, (|across| − along)/√2
        assert grade(pair(red, (20, 18), blue, (44 + k, 42)), above)["position"] == pytest.approx(k / np.sqrt(2))
    assert relation_error((0, 0, 10, 10), (20, 0, 30, 10), "right of") == 20  # the boxes alone
    assert relation_error((0, 0, 10, 10), (0, 20, 10, 30), "above") == 0 and relation_error((0, 0, 10, 10), (0, 20, 10, 30), "below") == 20


def test_a_pair_is_matched_to_what_was_asked_and_scores_its_mistakes():
    red, blue = Obj("square", "red"), Obj("circle", "blue")
    drawn = pair(red, (20, 32), blue, (44, 32))
    swapped = Scene(Obj("circle", "red"), "left of", Obj("square", "blue"))  # each colour on the other's shape
    scores = grade(drawn, swapped)
    assert scores["delta_e"] == 0 and scores["position"] == 0  # matched by colour: each shape is the wrong one
    assert 0.85 < scores["iou"] < 0.95  # 16 pixels: a circle's pixels are nearer a square's than at 30 (0.87)
    recoloured = grade(drawn, Scene(Obj("square", "green"), "left of", blue))
    assert recoloured["delta_e"] == pytest.approx(delta_e(COLOURS["red"], "green") / 2) and recoloured["iou"] == 1
    three = drawn.copy()
    three[mask("triangle", 12, (32, 10))] = COLOURS["yellow"]
    assert grade(three, Scene(red, "left of", blue)) == dict.fromkeys(EXACT_PAIR)  # not two objects: nothing to score


# ---- after the toy's VAE -----------------------------------------------------------------------------------
def test_lone_objects_score_near_ideal_after_the_toys_vae():
    """The shipped VAE's round trip of 54 of the world's pictures (every shape × colour, three times).
    Measured: ΔE mean 1.06 (0.22–3.54), IoU mean 0.999 (min 0.995); none blank."""
    world, vae = ToyWorld(), load("toy").vae
    with torch.no_grad():
        pixels = torch.stack([world.pixels(i) for i in range(54)])
        back = ((vae.decode(vae.encode(pixels)[0]) + 1) / 2).clamp(0, 1)
    scores = [grade(image, Scene(Obj(*world.label(i)))) for i, image in enumerate(back)]
    assert all(s["delta_e"] is not None and s["position"] is None for s in scores)
    colour, iou = np.array([s["delta_e"] for s in scores]), np.array([s["iou"] for s in scores])
    print(f"\nafter the toy's VAE: ΔE mean {colour.mean():.2f} (max {colour.max():.2f}), IoU mean {iou.mean():.3f} "
          f"(min {iou.min():.3f})")
    assert colour.mean() < 2 and colour.max() < 5  # 3 would be a difference one notices side by side
    assert iou.mean() > 0.99 and iou.min() > 0.98


# ---- evaluate ----------------------------------------------------------------------------------------------
def test_evaluate_reports_graded_means_over_the_pictures_not_blank(monkeypatch):
    """Rendered pictures of what each prompt asks, but every first colour's blank: ΔE 0, IoU 1 over the
    rest, and the blank ones counted; the fractions as before."""
    detect_module = sys.modules[evaluate.__module__]
    rng = np.random.default_rng(0)
    first = next(iter(COLOURS))

    def draw(model, prompts, seeds, *a, **generate):  # evaluate's order: language, colour, shape; seed-major
        asked = [(s, c) for _ in ("en", "fr") for c in COLOURS for s in SHAPES]
        return [np.full((SIZE, SIZE, 3), WHITE, np.uint8) if c == first else render(s, c, rng=rng)
                for _ in range(len(seeds)) for s, c in asked]

    monkeypatch.setattr(detect_module, "draw", draw)
    table = evaluate(None, seeds=[0, 1], languages=("en", "fr"))
    assert table == {lang: {"colour": 5 / 6, "shape": 5 / 6, "delta_e": 0.0, "iou": 1.0, "ungraded": 6}
                     for lang in ("en", "fr")}
    assert format_table(table).splitlines()[-1].split() == ["all", "83%", "83%", "0.00", "1.000", "12"]


def test_evaluate_passes_generate_arguments_through_and_refuses_its_own():
    model = load("toy")
    seen, generate = [], model.generate

    @functools.wraps(generate)  # its signature is generate's, which draw checks the arguments against
    def recording(*args, **kwargs):
        seen.append({k: kwargs[k] for k in ("guidance", "cross_attention", "negative_prompt", "controllers") if k in kwargs})
        return generate(*args, **kwargs)

    model.generate = recording  # this instance only
    arguments = {"guidance": "rescale:0.7", "cross_attention": ["down", "up"], "negative_prompt": "", "controllers": []}
    table = evaluate(model, steps=2, languages=("ko",), **arguments)
    assert seen == [arguments] and set(table["ko"]) == {"colour", "shape", "delta_e", "iou", "ungraded"}
    seen.clear()
    scenes = evaluate_scenes(model, compositions(1, 1), steps=2, languages=("ja",), guidance="rescale:0.7")
    assert seen == [{"guidance": "rescale:0.7"}] and scenes["ja"]["pairs"] == 1
    seen.clear()
    with pytest.raises(BadValue, match="set by the evaluation"):
        evaluate(model, seed=3)
    with pytest.raises(BadValue, match="not arguments of generate"):
        evaluate(model, strenght=0.5)
    assert seen == []  # refused before any picture


def test_graded_keys_follow_the_fractions_in_evaluate_scenes(monkeypatch):
    """Lone objects' means, then pairs', then the count, after the fractions and counts evaluate_scenes had."""
    detect_module = sys.modules[evaluate.__module__]
    scenes = compositions(3, 4)
    rng = np.random.default_rng(1)
    monkeypatch.setattr(detect_module, "draw", lambda model, prompts, seeds, *a, **k: [render_scene(s, rng) for s in scenes])
    row = evaluate_scenes(None, scenes, languages=("en",))["en"]
    assert row == {"colour": 1.0, "shape": 1.0, "size": 1.0, "objects": 1.0, "relation": 1.0, "swaps": 0, "pairs": 4,
                   "delta_e": 0.0, "iou": 1.0, "pair_delta_e": 0.0, "pair_iou": 1.0, "position": 0.0, "ungraded": 0}


def test_pairs_drawn_swapped_are_counted_as_swaps(monkeypatch):
    detect_module = sys.modules[evaluate.__module__]
    red_blue = Scene(Obj("circle", "red"), "above", Obj("square", "blue"))
    assert swapped(red_blue) == Scene(Obj("circle", "blue"), "above", Obj("square", "red"))
    assert swapped(Scene(Obj("circle", "red"), "above", Obj("circle", "blue"))) is None  # nothing to swap
    assert swapped(Scene(Obj("circle", "red"))) is None and swapped(Scene(Obj("circle", "red"), "above", Obj("square", "red"))) is None
    scenes = compositions(0, 12, seed=3)
    twins = [swapped(s) or s for s in scenes]  # every swappable pair drawn swapped, the others as asked
    rng = np.random.default_rng(2)
    monkeypatch.setattr(detect_module, "draw", lambda model, prompts, seeds, *a, **k: [render_scene(s, rng) for s in twins])
    row = evaluate_scenes(None, scenes, languages=("it",))["it"]
    can = sum(swapped(s) is not None for s in scenes)
    assert 0 < can < 12 and row["swaps"] == can and row["objects"] == pytest.approx((12 - can) / 12)
