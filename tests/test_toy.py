"""The toy model: its data and captions, its detector, the training command, and the shipped model's
quality measured with the detector over every language × colour × shape prompt."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from altdiff_min import load
from altdiff_min.toy import COLOURS, LANGUAGES, SHAPES, TOY_MODEL, caption, detect, evaluate, format_table, render
from altdiff_min.toy.data import MAX_SIZE, MIN_SIZE, PHRASINGS, SIZE
from altdiff_min.toy.train import Recipe, train_toy

# What the shipped model must reach in every language separately, and how it is sampled for that.
MIN_COLOUR, MIN_SHAPE = 0.90, 0.85
SCALE, STEPS = 7.5, 25


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


# ---- the training command -----------------------------------------------------------------------------
@pytest.mark.parametrize("bad, match", [(dict(unet_steps=-1), "unet_steps"), (dict(vae_steps=0), "vae_steps"),
                                        (dict(images=5), "images"), (dict(unet_lr=0.0), "unet_lr"),
                                        (dict(uncond_prob=1.0), "uncond_prob")])
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
    from altdiff_min.__main__ import main

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


# ---- the shipped model --------------------------------------------------------------------------------
def test_shipped_model_is_a_small_loadable_folder():
    sizes = {f: os.path.getsize(os.path.join(TOY_MODEL, f)) for f in os.listdir(TOY_MODEL)}
    assert set(sizes) == {"config.json", "model.safetensors", "sentencepiece.bpe.model"}
    assert sum(sizes.values()) < 10 * 2**20, f"the shipped toy is {sum(sizes.values()) / 2**20:.1f} MB"
    model = load("toy")  # stored in fp16 to stay small; computes in fp32 unless asked otherwise
    assert model.image_size == 64 and model.path == TOY_MODEL
    assert all(p.dtype == torch.float32 for m in (model.text_encoder, model.unet, model.vae) for p in m.parameters())


def test_shipped_model_draws_what_it_is_asked_in_every_language():
    """162 prompts (9 languages × 6 colours × 3 shapes), one picture each, DDIM 25 steps with guidance."""
    model = load(TOY_MODEL, dtype=torch.float32)
    table = evaluate(model, scale=SCALE, steps=STEPS, seed=0)
    print(f"\nshipped toy model, DDIM {STEPS} steps, guidance {SCALE}, one picture per prompt:\n{format_table(table)}")
    failing = {lang: row for lang, row in table.items() if row["colour"] < MIN_COLOUR or row["shape"] < MIN_SHAPE}
    assert not failing, f"below {MIN_COLOUR:.0%} colour / {MIN_SHAPE:.0%} shape: {failing}"


def test_train_toy_command_line_help():
    result = subprocess.run([sys.executable, "-c", "import argparse; from altdiff_min.toy.train import add_arguments;"
                             "p = argparse.ArgumentParser(); add_arguments(p); p.parse_args(['--help'])"],
                            capture_output=True, text=True)
    assert result.returncode == 0 and "--unet-steps" in result.stdout and "--force" in result.stdout
