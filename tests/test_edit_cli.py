"""`altdiff-min edit` (altdiff_min/apps/edit.py): a picture inverted and edited from the command line, written
and recorded as generate writes, replayed; bad input refused in one line before the model loads."""
import json
import os

import pytest
import torch
from PIL import Image

from altdiff_min import load
from altdiff_min.apps.cli import main
from altdiff_min.apps.edit import check_edit, edit_picture
from altdiff_min.errors import NotFinite

EDIT = ["--prompt", "a red circle", "--target", "a blue circle", "--steps", "3", "--device", "cpu"]


@pytest.fixture(scope="module")
def picture(tmp_path_factory) -> str:
    """A 70×75 picture (not a multiple of the small model's 32 px: rounded down to 64×64)."""
    path = tmp_path_factory.mktemp("edit") / "circle.png"
    g = torch.Generator().manual_seed(0)
    Image.fromarray((torch.rand(75, 70, 3, generator=g) * 255).byte().numpy()).save(path)
    return str(path)


def test_edit_writes_the_pictures_edit_picture_makes_with_records_that_replay(small_model_dir, picture, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["edit", picture, *EDIT, "--model", small_model_dir, "-o", str(out), "--reconstruction",
                 "--cross-replace-steps", "0.6", "--weight", "blue=2", "--null-text-steps", "0.5"]) == 0
    captured = capsys.readouterr()
    assert "(70×75) is resized to 64×64" in captured.err
    assert "ddim inversion" in captured.err and "null-text" in captured.err  # the progress bars
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [(r["file"], r["prompt"], r["edit"]["shows"]) for r in rows] == [
        (os.path.join("samples", "00000.png"), "a red circle", "reconstruction"),
        (os.path.join("samples", "00001.png"), "a blue circle", "edited")]
    e = rows[1]["edit"]
    assert e["picture"]["path"] == picture and len(e["picture"]["sha256"]) == 64 and e["inversion"] == "null-text"
    assert (e["mode"], e["cross_replace_steps"], e["self_replace_steps"], e["weights"]) == ("swap", 0.6, 0.4, {"blue": 2.0})
    assert e["null_text_steps"] == 0.5
    assert (rows[1]["steps"], rows[1]["scale"], rows[1]["width"], rows[1]["height"]) == (3, 7.5, 64, 64)
    # The same pictures as the Python functions make
    model = load(small_model_dir)
    checked = check_edit(model.shape, model.tokenizer, Image.open(picture).convert("RGB"), "a red circle",
                         "a blue circle", steps=3, cross_replace_steps=0.6, weights={"blue": 2.0}, null_text_steps=0.5)
    made = edit_picture(model, Image.open(picture).convert("RGB"), checked, progress=False)
    for row, want in zip(rows, made):
        assert (Image.open(out / row["file"]).convert("RGB").tobytes()) == want.tobytes()
    # Replayed from the manifest line and from the picture: the same bytes
    for k, replay in ((1, f"{out / 'manifest.jsonl'}:2"), (0, str(out / rows[0]["file"]))):
        again = tmp_path / f"again{k}"
        assert main(["edit", "--replay", replay, "-o", str(again), "--device", "cpu"]) == 0
        row = json.loads((again / "manifest.jsonl").read_text())
        assert row["edit"] == rows[k]["edit"] and row["replay_of"] in (rows[k]["file"], replay)
        assert (again / "samples" / "00000.png").read_bytes() == (out / rows[k]["file"]).read_bytes()
    capsys.readouterr()
    assert main(["generate", "--replay", f"{out / 'manifest.jsonl'}:2", "--outdir", str(tmp_path / "g")]) == 2
    assert "altdiff-min edit --replay" in capsys.readouterr().err and not (tmp_path / "g").exists()


def test_ddim_inversion_and_a_refinement(small_model_dir, picture, tmp_path):
    out = tmp_path / "o"
    assert main(["edit", picture, "--prompt", "a circle", "--target", "a big circle", "--mode", "refine",
                 "--inversion", "ddim", "--scale", "1", "--steps", "2", "--model", small_model_dir, "-o", str(out),
                 "--device", "cpu", "--word-replace-steps", "circle=0.5"]) == 0
    row = json.loads((out / "manifest.jsonl").read_text())
    assert (row["edit"]["mode"], row["edit"]["inversion"], row["scale"]) == ("refine", "ddim", 1.0)
    assert row["edit"]["cross_replace_steps"] == {"default_": 0.8, "circle": 0.5}  # the word's own window
    assert sorted(os.listdir(out / "samples")) == ["00000.png"]
    again = tmp_path / "again"
    assert main(["edit", "--replay", f"{out / 'manifest.jsonl'}:1", "-o", str(again), "--device", "cpu"]) == 0
    assert json.loads((again / "manifest.jsonl").read_text())["edit"] == row["edit"]
    assert (again / "samples" / "00000.png").read_bytes() == (out / "samples" / "00000.png").read_bytes()


@pytest.mark.parametrize("change, message", [
    ({"picture": "NOWHERE.png"}, "NOWHERE.png: no such file"),
    ({"picture": "TEXT.png"}, "is not a picture PIL can read"),
    ({"picture": "SMALL.png"}, "rounding down leaves nothing"),
    ({"--target": "a big blue circle"}, "swap: the target's 'big' 'blue' replaces the source's 'red', 2 word(s) for 1"),
    ({"--target": "a circle"}, "the source's 'red' is missing from the target"),
    ({"--mode": "refine"}, "refine: the target's 'blue' replaces the source's 'red'"),
    ({"--mode": "morph"}, "--mode must be one of swap, refine, reweight, got 'morph'"),
    ({"--mode": "reweight", "--target": None}, "reweight needs weights"),
    ({"--target": None}, "--mode swap needs --target"),
    ({"--prompt": None}, "give --prompt"),
    ({"--steps": "0"}, "steps"),
    ({"--steps": "1000"}, "steps=1000 is not possible for ddim"),
    ({"--scale": "1"}, "--inversion null-text: null-text inversion fits the unconditional rows"),
    ({"--scale": "nan"}, "--scale must be finite"),
    ({"--inversion": "magic"}, "--inversion must be one of null-text, ddim"),
    ({"--cross-replace-steps": "1.5"}, "cross_replace_steps must be a fraction in [0, 1]"),
    ({"--weight": "blue"}, "--weight 'blue': give WORD=C"),
    ({"--word-replace-steps": "blue"}, "--word-replace-steps 'blue': give WORD=F"),
    ({"--null-text-steps": "2"}, "null_text_steps must be a fraction in [0, 1]"),
    ({"--word-replace-steps": "green=0.2"}, "names the word 'green', which no target prompt holds"),
    ({"--word-replace-steps": "blue=2"}, "cross_replace_steps['blue'] must be a fraction in [0, 1]"),
    ({"--weight": "green=2"}, "has no word 'green'"),
    ({"--local-blend": "square"}, "local_blend: none of ['square']"),
    ({"--model": "NOWHERE"}, "model folder not found"),
])
def test_bad_input_is_one_line_before_the_model_loads_and_nothing_is_written(small_model_dir, picture, tmp_path,
                                                                             monkeypatch, capsys, change, message):
    import altdiff_min.pipeline as pipeline
    import altdiff_min.inversion as inversion

    monkeypatch.setattr(pipeline, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setattr(inversion, "picture_latents", lambda *a, **k: pytest.fail("inversion began"))
    (tmp_path / "TEXT.png").write_text("not a picture")
    Image.new("RGB", (20, 90)).save(tmp_path / "SMALL.png")
    flags = {"--prompt": "a red circle", "--target": "a blue circle", "--steps": "3", "--model": small_model_dir,
             **{k: v for k, v in change.items() if k != "picture"}}
    given = change.get("picture", picture)
    given = str(tmp_path / given) if given != picture else given
    argv = ["edit", given, "-o", str(tmp_path / "o"), "--device", "cpu"]
    for flag, value in flags.items():
        argv += [flag, value] if value is not None else []
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


def test_a_picture_tensor_with_nan_is_refused_by_the_check(small_model_dir):
    model = load(small_model_dir)
    bad = torch.full((1, 3, 64, 64), 0.5)
    bad[0, 1, 3, 4] = float("nan")
    with pytest.raises(NotFinite, match="the picture holds NaN"):
        check_edit(model.shape, model.tokenizer, bad, "a red circle", "a blue circle", steps=3)
