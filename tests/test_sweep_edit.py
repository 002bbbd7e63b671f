"""Edit sweeps (altdiff_min/apps/sweep_edit.py): one picture edited over an axis of cross_replace_steps on the
toy, its inversion made once, each picture replayed by `altdiff-min edit --replay`; bad edit specs refused."""
import csv
import functools
import json

import pytest
from PIL import Image

from altdiff_min.apps.cli import main
from altdiff_min.toy import render

SPEC = {"model": "toy", "prompts": ["a blue circle"], "metrics": ["toy"],
        "edit": {"picture": "circle.png", "source": "a red circle"},
        "fixed": {"steps": 3}, "axes": {"cross_replace_steps": [0.2, 0.8]}}


def write(folder, spec):
    Image.fromarray(render("circle", "red", size=30, center=(32, 32))).save(folder / "circle.png")
    (folder / "spec.json").write_text(json.dumps(spec))
    return str(folder / "spec.json")


def test_an_edit_sweep_inverts_once_and_its_pictures_replay(tmp_path, monkeypatch, capsys):
    import altdiff_min.inversion as inversion

    calls = []
    real = inversion.null_text_inversion
    monkeypatch.setattr(inversion, "null_text_inversion", functools.wraps(real)(lambda *a, **k: calls.append(1) or real(*a, **k)))
    assert main(["sweep", write(tmp_path, SPEC), "--device", "cpu"]) == 0
    assert len(calls) == 1  # both settings share the picture's inversion (same steps and scale)
    with open(tmp_path / "spec" / "results.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [(r["cross_replace_steps"], r["prompt"], r["file"]) for r in rows] == [
        ("0.2", "a blue circle", "pictures/s000-p000-seed0.png"), ("0.8", "a blue circle", "pictures/s001-p000-seed0.png")]
    assert {"colour", "shape"} <= set(rows[0])  # the toy metric, of the target prompt
    recorded = json.loads((tmp_path / "spec" / "spec.json").read_text())
    assert recorded["edit"]["source"] == "a red circle" and len(recorded["edit"]["sha256"]) == 64
    picture = tmp_path / "spec" / rows[1]["file"]
    assert main(["edit", "--replay", str(picture), "-o", str(tmp_path / "again"), "--device", "cpu"]) == 0
    again = json.loads((tmp_path / "again" / "manifest.jsonl").read_text())
    assert again["edit"]["cross_replace_steps"] == 0.8 and again["edit"]["target"] == "a blue circle"
    assert Image.open(tmp_path / "again" / "samples" / "00000.png").tobytes() == Image.open(picture).tobytes()


@pytest.mark.parametrize("change, message", [
    ({"seeds": [0, 1]}, "an edit sweep starts from the picture's inversion"),
    ({"edit": {"picture": "circle.png"}}, "'edit' must be a table of two strings"),
    ({"edit": {"picture": "nowhere.png", "source": "a red circle"}}, "nowhere.png: no such file"),
    ({"axes": {"sampler": ["ddim", "euler"]}}, "'sampler' is not an edit argument a sweep can set"),
    ({"prompts": ["a big blue circle"]}, "a word swap replaces words one for one"),
    ({"axes": {"self_replace_steps": [0.4, 2.0]}}, "self_replace_steps must be a fraction in [0, 1]"),
    ({"axes": {"inversion": ["ddim", "magic"]}}, "--inversion must be one of null-text, ddim"),
])
def test_bad_edit_specs_are_refused_before_any_picture(tmp_path, monkeypatch, capsys, change, message):
    import altdiff_min.inversion as inversion

    monkeypatch.setattr(inversion, "picture_latents", lambda *a, **k: pytest.fail("inversion began"))
    assert main(["sweep", write(tmp_path, {**SPEC, **change}), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "spec").exists()
