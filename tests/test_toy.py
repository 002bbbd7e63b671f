"""The toy model: its data and captions, its detector, the training command, and the shipped model's
quality measured with the detector over every language × colour × shape prompt."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from altdiff_min import load
from altdiff_min.toy import (
    COLOURS,
    LANGUAGES,
    SHAPES,
    TOY_MODEL,
    TOY_ONE,
    Obj,
    Scene,
    caption,
    caption_scene,
    detect,
    detect_scene,
    evaluate,
    evaluate_scenes,
    format_table,
    render,
    render_scene,
)
from altdiff_min.toy.data import (
    BESIDE,
    COLOUR_WORDS,
    GAP,
    MAX_SIZE,
    MIN_SIZE,
    PHRASINGS,
    RELATIONS,
    RING,
    RING_SIDES,
    RING_WORDS,
    RU_INSTRUMENTAL,
    SCENE_PHRASINGS,
    SHAPE_WORDS,
    SIDES,
    SIZE,
    SIZE_WORDS,
    WHERE,
    all_captions,
    place_pair,
    random_scene,
    read_caption,
    scene_captions,
    scene_corpus,
)
from altdiff_min.toy.detect import SPECK, compositions, detect_objects, evaluate_rings, same_scene
from altdiff_min.toy.train import WORLD_RECIPES, Recipe, recipe_for, train_tokenizer, train_toy
from altdiff_min.toy.world import RingWorld, SceneWorld

# What the shipped models must reach on one object in every language separately, and how it is sampled for that.
MIN_COLOUR, MIN_SHAPE = 0.90, 0.85
SCALE, STEPS = 7.5, 25
# What the shipped toy (the scene toy) must reach over evaluate_scenes' sample (nine languages × compositions()):
# pairs with both objects right, and the relation right among those; what it measured (docs/toy.md)
# less a margin, and never below the issue's 55% / 50%. Its lone objects: MIN_COLOUR / MIN_SHAPE, overall.
MIN_PAIRS, MIN_RELATION = 0.55, 0.50


# ---- data ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("colour", list(COLOURS))
def test_render_is_white_and_the_exact_colour(shape, colour):
    rng = np.random.default_rng(0)
    for _ in range(20):
        image = render(shape, colour, rng=rng)
        assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
        pixels = {tuple(p) for p in image.reshape(-1, 3).tolist()}
        assert pixels == {(255, 255, 255), COLOURS[colour]}  # no anti-aliasing, no other colour


def test_render_keeps_the_shape_whole_in_the_frame():
    rng = np.random.default_rng(1)
    for i in range(300):
        shape = SHAPES[i % 3]
        image = render(shape, "blue", size=MAX_SIZE if i % 2 else None, rng=rng)
        ink = (image != 255).any(axis=-1)
        assert not (ink[0].any() or ink[-1].any() or ink[:, 0].any() or ink[:, -1].any()), "touches the border"
        ys, xs = np.nonzero(ink)
        assert MIN_SIZE - 2 <= max(ys.max() - ys.min(), xs.max() - xs.min()) + 1 <= MAX_SIZE


def test_render_refuses_bad_arguments():
    with pytest.raises(ValueError, match="shape"):
        render("hexagon", "red")
    with pytest.raises(ValueError, match="colour"):
        render("circle", "pink")
    with pytest.raises(ValueError, match="frame"):
        render("square", "red", size=40, center=(10, 32))


def test_captions_in_every_language():
    assert set(LANGUAGES) == {"en", "zh", "es", "fr", "ru", "ja", "ko", "ar", "it"}
    for lang in LANGUAGES:
        captions = [caption(s, c, lang, p) for s in SHAPES for c in COLOURS for p in range(len(PHRASINGS[lang]))]
        assert all(captions) and len(set(captions)) == len(captions), f"{lang}: empty or repeated captions"
    assert caption("circle", "red", "en") == "a red circle"
    assert caption("square", "orange", "en", 2) == "a picture of an orange square"
    assert caption("circle", "red", "es") == "un círculo rojo"
    assert caption("square", "blue", "fr") == "un carré bleu"
    assert caption("triangle", "yellow", "it") == "un triangolo giallo"
    assert caption("triangle", "green", "ru", 2) == "изображение зелёного треугольника"
    assert caption("circle", "red", "ar") == "دائرة حمراء"  # feminine noun, feminine adjective after it
    assert caption("square", "red", "ar") == "مربع أحمر"
    assert caption("circle", "red", "ja", 1) == "白い背景に赤い円"
    rng = np.random.default_rng(0)
    assert {caption("circle", "red", "ko", rng) for _ in range(50)} == {caption("circle", "red", "ko", p) for p in range(3)}


def test_detector_is_right_on_rendered_pictures():
    rng = np.random.default_rng(2)
    for i in range(540):
        shape, colour = SHAPES[i % 3], list(COLOURS)[(i // 3) % 6]
        image = render(shape, colour, rng=rng)
        assert detect(image) == (shape, colour)
        assert detect(torch.from_numpy(image).permute(2, 0, 1) / 255.0) == (shape, colour)  # a tensor in [0, 1]
    assert detect(np.full((SIZE, SIZE, 3), 255, np.uint8)) == (None, None)
    image = render("square", "red", rng=rng)
    image[1, 1] = 128  # one stray grey pixel would widen the box to a corner: a "triangle"
    image[SIZE - 3:, SIZE - 3:] = COLOURS["blue"]  # and a speck of another colour
    assert detect(image) == ("square", "red")
    speck = np.full((SIZE, SIZE, 3), 255, np.uint8)
    speck[5:8, 5:8] = COLOURS["green"]
    assert detect(speck) == (None, None)


# ---- rings: the shape the fine-tuning lesson teaches ---------------------------------------------------------
def test_rings_are_rendered_with_a_hole_and_read_as_rings():
    rng = np.random.default_rng(5)
    for i in range(60):
        colour = list(COLOURS)[i % 6]
        image = render(RING, colour, rng=rng)
        ink = (image != 255).any(-1)
        ys, xs = np.nonzero(ink)
        side = xs.max() - xs.min() + 1
        assert RING_SIDES[0] - 1 <= side <= RING_SIDES[1] and not ink[int(ys.mean()), int(xs.mean())]  # hole in the middle
        assert detect(image) == (RING, colour)
        assert [o.shape for o, _ in detect_objects(image)] == [RING]
    for i in range(90):  # the filled shapes never read as rings
        assert detect(render(SHAPES[i % 3], "red", rng=rng))[0] == SHAPES[i % 3]
    with pytest.raises(ValueError, match="unknown shape 'hexagon'"):
        render("hexagon", "red")


def test_ring_captions_in_every_language_and_with_a_token():
    spoken = {"en": "a red ring", "zh": "一个红色的圆环", "es": "un anillo rojo", "fr": "un anneau rouge",
              "ru": "красное кольцо", "ja": "赤い輪", "ko": "빨간 고리", "ar": "حلقة حمراء", "it": "un anello rosso"}
    assert {lang: caption(RING, "red", lang) for lang in LANGUAGES} == spoken
    assert caption(RING, "blue", "ru", 2) == "изображение синего кольца"  # neuter: the genitive is the masculine's
    assert caption(RING, "orange", "en", 2) == "a picture of an orange ring"
    for lang in LANGUAGES:
        for p in range(len(PHRASINGS[lang])):
            with_token = caption(RING, "green", lang, p, noun="<ring>")
            rest = with_token.replace("<ring>", " ")
            assert with_token.count("<ring>") == 1 and not any(w in rest for w in forms(RING_WORDS[lang]))
    assert all(w not in " ".join(all_captions()) for lang in LANGUAGES for w in forms(RING_WORDS[lang]))  # a new word


def test_ring_world_is_registered_data_of_every_colour():
    from altdiff_min.training.dataset import open_data

    world, tokens = open_data("toy-ring", 64), open_data("toy-<ring>", 64)
    assert len(world) == len(tokens) == 36 and world.resolution == 64
    assert [detect((world.pixels(i) + 1) / 2) for i in range(12)] == [(RING, c) for c in COLOURS] * 2
    assert torch.equal(world.pixels(7), tokens.pixels(7))
    assert len(world.texts(0)) == 27 and world.texts(0)[0] == "a red ring" and tokens.texts(0)[0] == "a red <ring>"
    assert tokens.describe()["noun"] == "<ring>" and "noun" not in world.describe()
    with pytest.raises(ValueError, match="at least 6 pictures"):
        RingWorld(n=5)


def test_evaluate_rings_counts_colour_shape_and_both(monkeypatch):
    detect_module = sys.modules[evaluate.__module__]
    asked = []

    def draw(model, prompts, seeds, *a):
        asked.extend(prompts * len(seeds))
        return list(range(len(asked)))

    answers = [(RING if c != "red" else "circle", c if c != "blue" else "green") for lang in LANGUAGES for c in COLOURS]
    monkeypatch.setattr(detect_module, "draw", draw)
    monkeypatch.setattr(detect_module, "detect", lambda i: answers[i % len(answers)])
    table = evaluate_rings(None, noun="<ring>", seeds=(0, 1))
    assert asked[:2] == ["a red <ring>", "a green <ring>"] and len(asked) == 2 * 9 * 6
    assert table == {lang: {"colour": 5 / 6, "shape": 5 / 6, "both": 4 / 6} for lang in LANGUAGES}


# ---- scenes: sizes, two objects, relations ------------------------------------------------------------
# The spec, in every language: a small red circle left of a blue square (phrasing 0, and 3: told from the
# square), and a green square above a big yellow circle (phrasing 2; ru also 0: над + instrumental).
SPOKEN = {
    "en": ("a small red circle to the left of a blue square", "a blue square with a small red circle to its left",
           "a picture of a green square above a big yellow circle"),
    "zh": ("蓝色正方形左边的红色小圆形", "红色小圆形在蓝色正方形左边", "一张黄色大圆形上方有绿色正方形的图片"),
    "es": ("un círculo rojo pequeño a la izquierda de un cuadrado azul",
           "un cuadrado azul con un círculo rojo pequeño a su izquierda",
           "una imagen de un cuadrado verde encima de un círculo amarillo grande"),
    "fr": ("un petit cercle rouge à gauche d'un carré bleu", "un carré bleu avec un petit cercle rouge à sa gauche",
           "une image d'un carré vert au-dessus d'un grand cercle jaune"),
    "ru": ("маленький красный круг слева от синего квадрата", "синий квадрат, слева от него маленький красный круг",
           "изображение зелёного квадрата над большим жёлтым кругом"),
    "ja": ("青い正方形の左に小さな赤い円", "小さな赤い円が青い正方形の左にある", "大きな黄色い円の上に緑の正方形がある絵"),
    "ko": ("파란 정사각형 왼쪽에 작은 빨간 원", "작은 빨간 원이 파란 정사각형 왼쪽에 있다",
           "큰 노란 원 위에 초록색 정사각형이 있는 그림"),
    "ar": ("دائرة حمراء صغيرة على يسار مربع أزرق", "مربع أزرق وعلى يساره دائرة حمراء صغيرة",
           "صورة لمربع أخضر فوق دائرة صفراء كبيرة"),
    "it": ("un cerchio rosso piccolo a sinistra di un quadrato blu",
           "un quadrato blu con un cerchio rosso piccolo alla sua sinistra",
           "un'immagine di un quadrato verde sopra un cerchio giallo grande"),
}
LEFT = Scene(Obj("circle", "red", "small"), "left of", Obj("square", "blue"))
ABOVE = Scene(Obj("square", "green"), "above", Obj("circle", "yellow", "big"))


def phrasings(scene: Scene) -> range:
    return range(len(PHRASINGS["en"]) if scene.second is None else len(SCENE_PHRASINGS["en"]))


def forms(entry) -> list[str]:
    return [entry] if isinstance(entry, str) else list(entry)


def relation_words(lang: str, relation: str) -> list[str]:
    """How `lang` says `relation`: its WHERE phrase without B, and its BESIDE phrase(s)."""
    i = RELATIONS.index(relation)
    return [re.sub(r"\{B\w*\}", "", w).strip() for w in [WHERE[lang][i]] + forms(BESIDE.get(lang, ("",) * 4)[i]) if w]


def test_scene_captions_as_spoken_in_every_language():
    for lang, (left, left_told_from_b, above) in SPOKEN.items():
        assert (caption_scene(LEFT, lang, 0), caption_scene(LEFT, lang, 3), caption_scene(ABOVE, lang, 2)) == \
            (left, left_told_from_b, above), lang
    assert caption_scene(ABOVE, "ru", 0) == "зелёный квадрат над большим жёлтым кругом"
    assert caption_scene(ABOVE.flipped(), "ar", 3) == "مربع أخضر وتحته دائرة صفراء كبيرة"  # -hu: a masculine B
    assert caption_scene(ABOVE, "ar", 3) == "دائرة صفراء كبيرة وفوقها مربع أخضر"  # -hā: a feminine B
    assert caption_scene(Scene(Obj("square", "orange"), "below", Obj("circle", "red")), "en", 0) == \
        "an orange square below a red circle"
    assert caption("square", "orange", "en", 0, size="small") == "a small orange square"
    assert caption("circle", "red", "zh", 0, size="small") == "一个红色的小圆形"  # not 大红色: that reads "scarlet"
    assert caption("circle", "green", "ar", 0, size="big") == "دائرة خضراء كبيرة"
    assert caption("triangle", "purple", "ru", 2, size="small") == "изображение маленького фиолетового треугольника"
    assert caption("square", "blue", "fr", 1, size="big") == "un grand carré bleu sur un fond blanc"
    with pytest.raises(ValueError, match="phrasing"):
        caption_scene(Scene(Obj("circle", "red")), "en", 3)  # lone objects have three phrasings, pairs four


def test_read_caption_finds_the_scene_of_every_caption():
    rng = np.random.default_rng(5)
    scenes = [Scene(Obj(s, c, size)) for s in SHAPES for c in COLOURS for size in (None, "small", "big")]
    scenes += [random_scene(rng, 2) for _ in range(40)]
    for scene in scenes:
        for text in scene_captions(scene):
            assert read_caption(text) == scene, text
    told = caption_scene(scenes[-1], "en", 0)
    for text in ("a pink circle", "", told[: len(told) // 2], told + " and a red square", "un cercle rouge rouge"):
        assert read_caption(text) is None, text


def test_unsized_lone_objects_keep_the_first_worlds_captions():
    for lang in LANGUAGES:
        for s in SHAPES:
            for c in COLOURS:
                for p in range(len(PHRASINGS[lang])):
                    assert caption_scene(Scene(Obj(s, c)), lang, p) == caption(s, c, lang, p)


def test_scene_captions_differ_where_the_scene_does_and_name_its_words():
    rng = np.random.default_rng(3)
    scenes = {Scene(Obj(s, c, size)) for s in SHAPES for c in COLOURS for size in (None, "small", "big")}
    scenes |= {random_scene(rng, 2) for _ in range(150)}
    scenes |= {scene.flipped() for scene in scenes}
    for lang in LANGUAGES:
        said = {}
        for scene in scenes:
            texts = [caption_scene(scene, lang, p) for p in phrasings(scene)]
            assert len(set(texts)) == len(texts), f"{lang}: phrasings of {scene} coincide"
            for p, text in enumerate(texts):
                assert said.setdefault((p, text), scene) == scene, f"{lang}: {text!r} for two scenes"
                for obj in scene.objects:
                    shape, colour = forms(SHAPE_WORDS[lang][obj.shape]), forms(COLOUR_WORDS[lang][obj.colour])
                    assert any(w in text for w in shape + [RU_INSTRUMENTAL.get(w, w) for w in shape]), (text, obj)
                    assert any(w in text for w in colour + [RU_INSTRUMENTAL.get(w, w) for w in colour]), (text, obj)
                sized = any(o.size for o in scene.objects)
                size_words = [w for size in ("small", "big") for f in forms(SIZE_WORDS[lang][size])
                              for w in (f, RU_INSTRUMENTAL.get(f, f))]
                assert sized == any(w in text for w in size_words), text
                if scene.relation is not None:  # its own relation's words, and no other relation's
                    assert any(w in text for w in relation_words(lang, scene.relation)), text
                    assert not any(w in text for r in RELATIONS if r != scene.relation
                                   for w in relation_words(lang, r)), text


def test_scene_corpus_holds_every_word():
    corpus = "\n".join(scene_corpus())
    for table in (SHAPE_WORDS, COLOUR_WORDS, SIZE_WORDS):
        for lang in LANGUAGES:
            for entry in table[lang].values():
                assert all(w in corpus for w in forms(entry)), (lang, entry)
    assert all(w in corpus for w in RU_INSTRUMENTAL.values())


def test_pairs_are_placed_apart_and_plainly_related():
    rng = np.random.default_rng(4)
    for i in range(2000):
        relation = RELATIONS[i % 4]
        sides = [int(rng.integers(SIDES[2][w][0], SIDES[2][w][1] + 1)) for w in rng.choice([None, "small", "big"], 2)]
        if i % 50 == 0:
            sides = [SIDES[2]["big"][1]] * 2  # the tightest fit
        (x1, y1), (x2, y2) = place_pair(sides, relation, rng)
        boxes = [(x - s / 2, y - s / 2, x + s / 2, y + s / 2) for (x, y), s in zip([(x1, y1), (x2, y2)], sides)]
        assert all(1 <= b[0] and 1 <= b[1] and b[2] <= SIZE - 1 and b[3] <= SIZE - 1 for b in boxes)
        along = {"left of": boxes[1][0] - boxes[0][2], "right of": boxes[0][0] - boxes[1][2],
                 "above": boxes[1][1] - boxes[0][3], "below": boxes[0][1] - boxes[1][3]}[relation]
        assert along >= GAP - 1e-9, (relation, sides, boxes)
        dx, dy = abs(x2 - x1), abs(y2 - y1)
        assert (dy <= dx / 2) if relation in ("left of", "right of") else (dx <= dy / 2)


def test_render_scene_draws_the_asked_sizes_in_the_exact_colours():
    rng = np.random.default_rng(5)
    for i in range(600):
        scene = random_scene(rng, 1 + i % 2)
        image = render_scene(scene, rng)
        assert {tuple(p) for p in image.reshape(-1, 3).tolist()} == {(255, 255, 255)} | {
            COLOURS[o.colour] for o in scene.objects}
        boxes = {(o.shape, o.colour): box for o, box in detect_objects(image)}  # the two differ in one or both
        for obj in scene.objects:
            box, (low, high) = boxes[obj.shape, obj.colour], SIDES[len(scene.objects)][obj.size]
            assert low - 1 <= max(box[2] - box[0], box[3] - box[1]) <= high + 1
    rng_a, rng_b = np.random.default_rng(6), np.random.default_rng(6)
    assert np.array_equal(render_scene(Scene(Obj("circle", "red")), rng_a), render("circle", "red", rng=rng_b))


def test_detector_reads_every_rendered_scene_exactly():
    rng = np.random.default_rng(7)
    for i in range(1500):
        scene = random_scene(rng, 1 + (i % 3 > 0))
        image = render_scene(scene, rng)
        assert same_scene(detect_scene(image), scene), (scene, detect_scene(image))  # size words asked for too
    assert detect_scene(np.full((SIZE, SIZE, 3), 255, np.uint8)) is None
    assert same_scene(detect_scene(torch.from_numpy(render_scene(LEFT, rng)).permute(2, 0, 1) / 255.0), LEFT)
    assert same_scene(detect_scene(render_scene(LEFT.flipped(), rng)), LEFT)  # the same picture, told either way
    assert not same_scene(detect_scene(render_scene(LEFT, rng)), Scene(LEFT.first, "right of", LEFT.second))


def test_detector_ignores_specks_and_splits_touching_objects():
    rng = np.random.default_rng(8)
    image = render_scene(LEFT, rng)
    noisy = image.copy()
    for _ in range(6):  # specks of a few pixels, in any palette colour
        y, x = rng.integers(0, SIZE - 3, 2)
        if (image[y:y + 3, x:x + 3] == 255).all():
            noisy[y:y + 3, x:x + 3] = list(COLOURS.values())[rng.integers(6)]
    assert same_scene(detect_scene(noisy), LEFT)
    touching = np.full((SIZE, SIZE, 3), 255, np.uint8)
    touching[20:46, 6:32] = COLOURS["red"]  # a red square and a blue square side by side, no white between
    touching[20:46, 32:58] = COLOURS["blue"]
    assert detect_scene(touching) == Scene(Obj("square", "red", "big"), "left of", Obj("square", "blue", "big"))
    speck = np.full((SIZE, SIZE, 3), 255, np.uint8)
    speck[5:8, 5:8] = COLOURS["green"]
    assert SPECK > 9 and detect_scene(speck) is None


def test_scene_world_is_fixed_by_seed_and_index():
    world = SceneWorld(30, seed=2)
    assert len(world) == 30 and world.resolution == SIZE
    assert [len(world.scene(i).objects) for i in range(6)] == [1, 2, 2, 1, 2, 2]
    assert torch.equal(world.pixels(7), SceneWorld(30, seed=2).pixels(7))
    assert not torch.equal(world.pixels(7), SceneWorld(30, seed=3).pixels(7))
    pixels, texts = world[4]
    assert pixels.shape == (3, SIZE, SIZE) and pixels.min() >= -1 and pixels.max() <= 1
    assert len(texts) == len(LANGUAGES) * 4 and caption_scene(world.scene(4), "ko", 2) in texts
    assert same_scene(detect_scene(((pixels + 1) / 2)), world.scene(4))
    with pytest.raises(ValueError, match="at least"):
        SceneWorld(2)


# ---- the training command -----------------------------------------------------------------------------
@pytest.mark.parametrize("bad, match", [(dict(unet_steps=-1), "unet_steps"), (dict(vae_steps=0), "vae_steps"),
                                        (dict(images=5), "images"), (dict(unet_lr=0.0), "unet_lr"),
                                        (dict(uncond_prob=1.0), "uncond_prob"), (dict(world="cubes"), "world"),
                                        (dict(unet_channels=(48, 100)), "unet_channels"),
                                        (dict(unet_channels=[48, 96]), "unet_channels"), (dict(text_layers=0), "text_layers")])
def test_training_refuses_bad_recipes_before_any_work(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        train_toy(str(tmp_path / "out"), **bad)
    with pytest.raises(TypeError):
        Recipe(vae_steps=2.5)
    with pytest.raises(TypeError):
        train_toy(str(tmp_path / "out"), epochs=3)  # not a recipe field
    assert not (tmp_path / "out").exists()


def test_training_refuses_an_existing_folder_before_any_training(tmp_path, capsys, monkeypatch):
    import altdiff_min.toy.train as training
    from altdiff_min.apps.cli import main

    monkeypatch.setattr(training, "train", lambda *a, **k: pytest.fail("training started"))
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--force"):
        train_toy(str(out))
    assert main(["train-toy", str(out)]) == 2
    assert main(["train-toy", str(out), "--force"]) == 2  # --force replaces only a model folder
    assert "replaces only a model folder" in capsys.readouterr().err
    assert main(["train-toy", str(tmp_path / "new"), "--unet-steps", "-5"]) == 2
    assert "unet_steps must be positive" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine" and not (tmp_path / "new").exists()


def test_training_runs_end_to_end_and_writes_a_loadable_folder(tmp_path):
    out = str(tmp_path / "toy")
    tiny = dict(images=18, vae_steps=2, vae_batch=4, unet_steps=2, unet_batch=8)
    train_toy(out, seed=3, evaluate=True, progress=False, **tiny)
    model = load(out, dtype=torch.float32)
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["toy"]["recipe"]["unet_steps"] == 2 and len(config["toy"]["loss"]["unet"]) == 2
    assert set(config["toy"]["accuracy"]["per_language"]) == set(LANGUAGES)  # the measurement ran and was kept
    assert config["image_size"] == 64 and model.vae.cfg.scaling_factor == pytest.approx(config["vae"]["scaling_factor"])
    images = model.generate("un cercle rouge", steps=2, seed=0, output="tensor", progress=False)
    assert images.shape == (1, 3, 64, 64) and torch.isfinite(images).all()
    with pytest.raises(FileExistsError):
        train_toy(out, evaluate=False, progress=False, **tiny)
    train_toy(out, seed=3, force=True, evaluate=False, progress=False, **tiny)  # force replaces it, same seed, same weights
    again = load(out, dtype=torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(model.unet.state_dict().values(), again.unet.state_dict().values()))


def test_scene_training_runs_end_to_end_with_its_own_tokenizer(tmp_path):
    out = str(tmp_path / "scenes")
    train_toy(out, seed=1, evaluate=False, progress=False, world="scenes", images=18, vae_steps=2, vae_batch=4,
              unet_steps=2, unet_batch=8)
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["toy"]["recipe"]["world"] == "scenes"
    assert set(config["toy"]["vae_readback"]) == {"lone", "pairs", "small"}  # what the VAE keeps, measured
    model = load(out, dtype=torch.float32)
    for lang in LANGUAGES:  # every word of the new world is made of known pieces (id 3 is <unk>)
        ids, _ = model.tokenizer([caption_scene(LEFT, lang, p) for p in range(4)] + [caption_scene(ABOVE, lang, 2)])
        assert not (ids == 3).any(), lang


def test_scene_training_under_torchrun_does_the_same_sums_as_one_process(tmp_path):
    """Two processes share each global batch (the recipe's batches are global): the same losses, and
    weights equal up to the all-reduce's order of addition, through the fp16 they are stored in."""
    tiny = ["--world", "scenes", "--images", "18", "--vae-steps", "3", "--unet-steps", "3", "--unet-batch", "16",
            "--latent-channels", "8", "--snr-gamma", "5", "--unet-channels", "16", "32", "--text-layers", "1",
            "--no-eval", "--seed", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    launch = {1: [sys.executable, "-m"], 2: [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                            "--nproc_per_node=2", "-m"]}
    for n, command in launch.items():
        subprocess.run(command + ["altdiff_min", "train-toy", str(tmp_path / str(n))] + tiny, env=env, check=True,
                       capture_output=True)
    one, two = (json.load(open(tmp_path / str(n) / "config.json")) for n in (1, 2))
    assert (one["toy"]["processes"], two["toy"]["processes"]) == (1, 2)
    for stage in ("vae", "unet"):
        assert one["toy"]["loss"][stage] == pytest.approx(two["toy"]["loss"][stage], rel=1e-4)
    assert one["unet"]["in_channels"] == one["vae"]["latent_channels"] == 8
    assert one["unet"]["channels"] == [16, 32] and one["text_encoder"]["layers"] == 1
    assert one["toy"]["recipe"]["unet_batch"] == two["toy"]["recipe"]["unet_batch"] == 16
    a, b = (load(str(tmp_path / str(n)), dtype=torch.float32) for n in (1, 2))
    for module in ("text_encoder", "unet", "vae"):
        for (name, p), q in zip(getattr(a, module).state_dict().items(), getattr(b, module).state_dict().values()):
            assert (p - q).norm() <= 2e-3 * p.norm() + 1e-6, f"{module}.{name}"  # fp16 storage: one rounding step


def test_recipe_batches_must_split_into_the_processes():
    from altdiff_min.toy.train import stage_configs

    vae, unet = stage_configs(Recipe(vae_batch=32, unet_batch=128, snr_gamma=5.0), seed=0, processes=2)
    assert (vae.batch_size, unet.batch_size, unet.snr_gamma) == (16, 64, 5.0)
    with pytest.raises(ValueError, match="vae_batch 33 does not split into 2"):
        stage_configs(Recipe(vae_batch=33), seed=0, processes=2)
    with pytest.raises(ValueError, match="snr_gamma"):
        Recipe(snr_gamma=-1.0)


@pytest.mark.parametrize("world, folder", [("scenes", TOY_MODEL), ("shapes", TOY_ONE)])
def test_each_worlds_tokenizer_is_trained_again_bit_for_bit(tmp_path, world, folder):
    train_tokenizer(str(tmp_path / "spm.model"), world)
    with open(os.path.join(folder, "sentencepiece.bpe.model"), "rb") as shipped:
        assert (tmp_path / "spm.model").read_bytes() == shipped.read()


# ---- the shipped model --------------------------------------------------------------------------------
@pytest.mark.parametrize("name, folder", [("toy", TOY_MODEL), ("toy-one", TOY_ONE)])
def test_shipped_model_is_a_small_loadable_folder(name, folder):
    sizes = {f: os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)}
    assert set(sizes) == {"checksums.json", "config.json", "model.safetensors", "sentencepiece.bpe.model"}
    assert sum(sizes.values()) < 10 * 2**20, f"the shipped {name} is {sum(sizes.values()) / 2**20:.1f} MB"
    model = load(name)  # stored in fp16 to stay small; computes in fp32 unless asked otherwise
    assert model.image_size == 64 and model.path == folder
    assert all(p.dtype == torch.float32 for m in (model.text_encoder, model.unet, model.vae) for p in m.parameters())


@pytest.mark.parametrize("name", ["toy", "toy-one"])
def test_shipped_models_draw_one_object_as_asked_in_every_language(name):
    """162 prompts (9 languages × 6 colours × 3 shapes), one picture each, DDIM 25 steps with guidance."""
    model = load(name, dtype=torch.float32)
    table = evaluate(model, scale=SCALE, steps=STEPS, seeds=0)
    print(f"\nshipped {name}, DDIM {STEPS} steps, guidance {SCALE}, one picture per prompt:\n{format_table(table)}")
    failing = {lang: row for lang, row in table.items() if row["colour"] < MIN_COLOUR or row["shape"] < MIN_SHAPE}
    assert not failing, f"below {MIN_COLOUR:.0%} colour / {MIN_SHAPE:.0%} shape: {failing}"


def test_shipped_toy_draws_pairs_and_their_relations():
    """486 prompts (9 languages × 18 lone objects and 36 pairs), one picture each, DDIM 25 steps with guidance."""
    model = load("toy", dtype=torch.float32)
    table = evaluate_scenes(model, scale=SCALE, steps=STEPS, seeds=0)
    print(f"\nshipped toy, DDIM {STEPS} steps, guidance {SCALE}:\n{format_table(table)}")
    pairs = sum(row["pairs"] for row in table.values())
    right = sum(row["objects"] * row["pairs"] for row in table.values())
    related = sum((row["relation"] or 0) * row["objects"] * row["pairs"] for row in table.values())
    assert right / pairs >= MIN_PAIRS, f"pairs both right {right / pairs:.0%} < {MIN_PAIRS:.0%}"
    assert related / right >= MIN_RELATION, f"relation right in {related / right:.0%} of those < {MIN_RELATION:.0%}"
    lone = {k: sum(row[k] for row in table.values()) / len(table) for k in ("colour", "shape")}
    assert lone["colour"] >= MIN_COLOUR and lone["shape"] >= MIN_SHAPE, lone


def test_evaluation_takes_seeds_a_sampler_and_a_batch_size():
    model = load(TOY_MODEL, dtype=torch.float32)
    whole = evaluate(model, steps=2, seeds=[0, 1], languages=("ja",))  # 2 steps: the arguments' test, not a quality one
    assert whole == evaluate(model, steps=2, seeds=[0, 1], languages=("ja",), batch_size=12)  # the same pictures
    assert set(whole) == {"ja"} and all(0 <= whole["ja"][k] <= 1 for k in ("colour", "shape"))
    assert 0 <= whole["ja"]["ungraded"] <= 36 and (whole["ja"]["iou"] is None or 0 <= whole["ja"]["iou"] <= 1)
    euler = evaluate(model, steps=2, seeds=3, languages=("fr",), sampler="euler", batch_size=18)
    assert set(euler["fr"]) == {"colour", "shape", "delta_e", "iou", "ungraded"}  # the fractions, then the graded scores
    with pytest.raises(ValueError, match="seeds"):
        evaluate(model, seeds=[])
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(model, batch_size=0)

    scenes = compositions(singles=3, pairs=4)
    assert [len(s.objects) for s in scenes] == [1, 1, 1, 2, 2, 2, 2] and scenes == compositions(3, 4)
    assert [s.relation for s in scenes[3:]] == list(RELATIONS)
    assert [s.first.size for s in scenes[:3]] == [None, "small", "big"]
    table = evaluate_scenes(model, scenes, steps=2, seeds=0, languages=("en", "ja"), batch_size=4)
    columns = ["colour", "shape", "size", "objects", "relation", "swaps", "pairs",  # the fractions and counts,
               "delta_e", "iou", "pair_delta_e", "pair_iou", "position", "ungraded"]  # then the graded scores
    for row in table.values():
        assert list(row) == columns
        assert row["pairs"] == 4 and 0 <= row["swaps"] <= 4 and 0 <= row["objects"] <= 1
        assert 0 <= row["ungraded"] <= 7 and all(row[k] is None or 0 <= row[k] <= 1 for k in ("iou", "pair_iou"))
    text = format_table(table)
    assert text.splitlines()[0].split() == ["lang", *columns]
    assert text.splitlines()[-1].split()[1 + columns.index("pairs")] == "8"  # counts add up over the languages, fractions average
    assert format_table({"en": {"colour": 0.5, "shape": 1.0}}) == (
        "lang  colour   shape\nen       50%    100%\nall      50%    100%")


def test_each_world_has_its_recipe_and_flags_change_it(monkeypatch):
    import altdiff_min.toy.train as training
    from altdiff_min.apps.cli import main

    assert recipe_for() == Recipe() and recipe_for("scenes").unet_steps == WORLD_RECIPES["scenes"]["unet_steps"] > Recipe().unet_steps
    assert recipe_for("scenes", unet_steps=7).unet_steps == 7 and recipe_for("scenes", unet_steps=7).images == 21600
    seen = []
    monkeypatch.setattr(training, "train_toy", lambda out, seed, force, evaluate, **r: seen.append(recipe_for(**r)))
    assert main(["train-toy", "out", "--world", "scenes", "--unet-batch", "64", "--unet-channels", "16", "32"]) == 0
    assert seen[-1] == recipe_for("scenes", unet_batch=64, unet_channels=(16, 32))  # what was not given: the world's
    assert main(["train-toy", "out"]) == 0 and seen[-1] == Recipe()


def test_train_toy_command_line_help():
    result = subprocess.run([sys.executable, "-c", "import argparse; from altdiff_min.toy.train import add_arguments;"
                             "p = argparse.ArgumentParser(); add_arguments(p); p.parse_args(['--help'])"],
                            capture_output=True, text=True)
    assert result.returncode == 0 and "--unet-steps" in result.stdout and "--force" in result.stdout


@pytest.mark.parametrize("seeds", [0, [0, 1, 2]])
def test_evaluate_counts_then_divides_so_all_right_is_exactly_one(monkeypatch, seeds):
    """Every picture detected right: 1.0, not a sum of 1/18's (1.0000000000000002, 0.9999999999999989)."""
    detect_module = sys.modules[evaluate.__module__]  # the package's `detect` is the function
    asked = []

    def draw(model, prompts, seeds, *a):
        asked.extend(prompts * (1 if isinstance(seeds, int) else len(seeds)))
        return list(range(len(asked)))  # the picture is its prompt's index

    answers = [(s, c) for lang in LANGUAGES for c in COLOURS for s in SHAPES]
    monkeypatch.setattr(detect_module, "draw", draw)
    monkeypatch.setattr(detect_module, "detect", lambda i: answers[i % len(answers)])
    monkeypatch.setattr(detect_module, "grade", lambda i, asked: {"delta_e": 0.0, "iou": 1.0, "position": None})
    table = evaluate(None, seeds=seeds)
    assert table == {lang: {"colour": 1.0, "shape": 1.0, "delta_e": 0.0, "iou": 1.0, "ungraded": 0} for lang in LANGUAGES}
    answers = [(s, c if c != next(iter(COLOURS)) else None) for lang in LANGUAGES for c in COLOURS for s in SHAPES]
    asked.clear()
    table = evaluate(None, seeds=seeds)  # one colour in six never right: 5/6 of every language's pictures
    assert {lang: {k: row[k] for k in ("colour", "shape")} for lang, row in table.items()} == \
        {lang: {"colour": 5 / 6, "shape": 1.0} for lang in LANGUAGES}


def test_a_ring_run_resumes_from_its_folder_alone(tmp_path):
    """`train OUT_DIR --resume`: the registered ring world is reopened by the name run.json records."""
    from altdiff_min.apps.cli import main

    out = str(tmp_path / "run")
    assert main(["train", "toy", "toy-<ring>", out, "--train", "embeddings", "--new-token", "<ring>", "--init-word",
                 "circle", "--max-steps", "1", "--batch-size", "6", "--save-every", "1", "--no-progress"]) == 0
    with open(os.path.join(out, "run.json"), encoding="utf-8") as f:
        assert json.load(f)["data"]["name"] == "toy-<ring>"
    assert main(["train", out, "--resume", "--max-steps", "2", "--no-progress"]) == 0
    with open(os.path.join(out, "loss.jsonl"), encoding="utf-8") as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2]
