"""`altdiff-min sweep`: an ablation grid on the toy model — its table, its contact sheet, the toy
detector as the metric, resuming without redoing cells, torchrun, and specs refused before any model work."""
import csv
import functools
import json
import os
import subprocess
import sys

import pytest
from helpers import lora_file
from PIL import Image

from altdiff_min.apps.cli import main
from altdiff_min.toy import COLOURS as COLOURS_RGB
from altdiff_min.toy import Obj, Scene, detect, grade

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = {"model": "toy", "prompts": ["a red circle", "un carré bleu"], "seeds": [0, 3], "metrics": ["toy"],
        "fixed": {"steps": 4}, "axes": {"scale": [1.0, 7.5], "sampler": ["ddim", "euler"]}}


def write_spec(folder, spec=SPEC, name="spec.json"):
    path = folder / name
    path.write_text(json.dumps(spec))
    return str(path)


def table(out):
    with open(out / "results.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_sweep_table_sheet_and_metric(tmp_path, capsys):
    assert main(["sweep", write_spec(tmp_path), "--device", "cpu"]) == 0
    out = tmp_path / "spec"
    rows = table(out)
    assert len(rows) == 4 * 2 * 2  # settings × prompts × seeds
    assert [(r["scale"], r["sampler"]) for r in rows[::4]] == [("1.0", "ddim"), ("1.0", "euler"), ("7.5", "ddim"), ("7.5", "euler")]
    asked = {"a red circle": ("circle", "red"), "un carré bleu": ("square", "blue")}
    assert list(rows[0]) == ["setting", "scale", "sampler", "prompt", "seed", "file", "colour", "shape", "objects",
                             "relation", "delta_e", "iou", "position"]  # the graded scores after the first columns
    for r in rows:  # the accuracy column is the detector on the saved picture, the graded ones its grade
        picture = Image.open(out / r["file"]).convert("RGB")
        shape, colour = detect(picture)
        assert float(r["colour"]) == (colour == asked[r["prompt"]][1]) and float(r["shape"]) == (shape == asked[r["prompt"]][0])
        graded = grade(picture, Scene(Obj(*asked[r["prompt"]])))
        assert r["delta_e"] == ("" if graded["delta_e"] is None else str(graded["delta_e"])) and r["position"] == ""
        assert r["iou"] == ("" if graded["iou"] is None else str(graded["iou"]))
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.size == (220 + 4 * 66, 30 + 4 * 66)  # a row per setting, a column per prompt × seed
    printed = capsys.readouterr().out
    assert "scale=7.5, sampler=euler" in printed and "colour" in printed


def test_a_guidance_rule_is_an_axis(tmp_path):
    """guidance, given as a rule's text, is swept like any generate argument and recorded in the table."""
    from altdiff_min import load

    spec = {**SPEC, "prompts": ["a red circle"], "seeds": [0], "axes": {"guidance": ["cfg", "rescale:0.7"]}}
    assert main(["sweep", write_spec(tmp_path, spec), "--device", "cpu"]) == 0
    rows = table(tmp_path / "spec")
    assert [r["guidance"] for r in rows] == ["cfg", "rescale:0.7"]
    model = load("toy")
    for r in rows:  # each cell is generate with that rule
        again = model.generate("a red circle", seed=0, steps=4, guidance=r["guidance"])[0]
        assert Image.open(tmp_path / "spec" / r["file"]).tobytes() == again.tobytes()


def test_the_toy_metric_reads_two_object_prompts_in_any_language():
    """Two objects: "objects" (both right) and "relation" (where the prompt puts them); one: colour, shape.
    Then the graded scores (toy.graded): exact on a rendered picture, and how far a wrong one is."""
    import numpy as np

    from altdiff_min.apps.metrics import toy_metric
    from altdiff_min.toy import Obj, Scene, caption_scene, render_scene
    from altdiff_min.toy.data import INVERSE
    from altdiff_min.toy.graded import delta_e

    scene = Scene(Obj("circle", "red", "small"), "above", Obj("triangle", "blue"))
    picture = Image.fromarray(render_scene(scene, np.random.default_rng(0)))
    other = Scene(Obj("circle", "green", "small"), "above", Obj("triangle", "blue"))
    exact = {"delta_e": 0.0, "iou": 1.0, "position": 0.0}
    for lang, p in (("en", 0), ("ko", 1), ("ar", 3)):
        assert toy_metric(picture, caption_scene(scene, lang, p)) == {"colour": None, "shape": None, "objects": 1.0,
                                                                      "relation": 1.0, **exact}
        assert toy_metric(picture, caption_scene(scene.flipped(), lang, p))["relation"] == 1.0  # the same picture
        below = toy_metric(picture, caption_scene(Scene(scene.first, INVERSE["above"], scene.second), lang, p))
        assert {k: below[k] for k in ("colour", "shape", "objects", "relation")} == \
            {"colour": None, "shape": None, "objects": 1.0, "relation": 0.0}
        assert below["position"] > 20  # the other way round: as far as the centres are apart
        assert toy_metric(picture, caption_scene(other, lang, p)) == {
            "colour": None, "shape": None, "objects": 0.0, "relation": None,
            "delta_e": delta_e(COLOURS_RGB["red"], "green") / 2, "iou": 1.0, "position": 0.0}  # the circle's colour wrong
    lone = Image.fromarray(render_scene(Scene(Obj("square", "orange", "big")), np.random.default_rng(1)))
    assert toy_metric(lone, caption_scene(Scene(Obj("square", "orange", "big")), "ja", 2)) == \
        {"colour": 1.0, "shape": 1.0, "objects": None, "relation": None, "delta_e": 0.0, "iou": 1.0, "position": None}
    assert toy_metric(lone, "a photo of a cat") == dict.fromkeys(("colour", "shape", "objects", "relation", "delta_e",
                                                                  "iou", "position"))


def test_the_clip_metric_is_the_clip_score_of_each_saved_picture(altclip_dir, tmp_path, monkeypatch):
    """One model load for the sweep; each row's clip_score is Scorer.score of its picture and prompt."""
    import altdiff_min.vision.score as score

    clip_model = altclip_dir
    loads, load_clip = [], score.load_clip
    monkeypatch.setattr(score, "load_clip", lambda *a, **k: loads.append(a) or load_clip(*a, **k))
    spec = {"model": "toy", "prompts": ["a red circle", "一个蓝色的正方形"], "seeds": [0], "metrics": ["clip"],
            "clip_model": clip_model, "fixed": {"steps": 2}, "axes": {"scale": [1.0, 7.5]}}
    assert main(["sweep", write_spec(tmp_path, spec), "--device", "cpu"]) == 0
    rows, clip = table(tmp_path / "spec"), load_clip(clip_model)
    assert len(loads) == 1 and len(rows) == 4
    for r in rows:
        expected = clip.score([Image.open(tmp_path / "spec" / r["file"]).convert("RGB")], [r["prompt"]]).item()
        assert float(r["clip_score"]) == expected > 0
    assert json.loads((tmp_path / "spec" / "spec.json").read_text())["clip_model"] == clip_model


def test_an_interrupted_sweep_resumes_without_redoing_cells(tmp_path, monkeypatch):
    import altdiff_min.pipeline as pipeline

    spec = write_spec(tmp_path)
    assert main(["sweep", spec, "--device", "cpu"]) == 0
    out = tmp_path / "spec" / "pictures"
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    for f in sorted(before)[5:9]:  # as if the run had been killed before these
        os.unlink(out / f)
    made, original = [], pipeline.AltDiffusion.generate

    @functools.wraps(original)  # the spec is checked against generate's signature
    def counting(self, *args, **kwargs):
        made.append(args)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pipeline.AltDiffusion, "generate", counting)
    assert main(["sweep", spec, "--device", "cpu"]) == 0
    assert len(made) == 4 and {f: (out / f).read_bytes() for f in os.listdir(out)} == before


def test_torchrun_sweep_makes_the_same_pictures(tmp_path):
    spec = write_spec(tmp_path, {**SPEC, "axes": {"scale": [1.0, 7.5]}})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    for name, launcher in (("one", []), ("two", ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"])):
        done = subprocess.run([sys.executable, *launcher, "-m", "altdiff_min", "sweep", spec, "--outdir", str(tmp_path / name),
                               "--device", "cpu"], env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
    pictures = {name: {f: (tmp_path / name / "pictures" / f).read_bytes() for f in os.listdir(tmp_path / name / "pictures")}
                for name in ("one", "two")}
    assert len(pictures["one"]) == 8 and pictures["one"] == pictures["two"]
    assert table(tmp_path / "one") == table(tmp_path / "two")


@pytest.mark.parametrize("change, message", [
    ({"axes": {"controllers": [1, 2]}}, "'controllers' is not a generate argument"),
    ({"axes": {"guidance": ["cfg", "rescale:2,3"]}}, "guidance 'rescale:2,3': rescale takes φ"),
    ({"fixed": {"guidance": 7}}, "guidance must be a rule's text"),
    ({"axes": {"scale": []}}, "axis 'scale' is empty"),
    ({"seeds": []}, "'seeds' must be a non-empty list"),
    ({"prompts": []}, "'prompts' must be a non-empty list"),
    ({"colour": "red"}, "unknown entries ['colour']"),
    ({"metrics": ["nope"]}, "metric 'nope'"),
    ({"fixed": {"scale": 2}}, "both fixed and an axis"),
    ({"prompts": None, "prompts_file": "missing.txt"}, "prompt file not found"),
    ({"prompts": None, "prompts_file": "EMPTY"}, "has no prompts"),
    ({"model": "NOWHERE"}, "model folder not found"),
    ({"axes": {"steps": [0]}}, "steps"),
    ({"axes": {"text_layer": [9]}}, "text_layer must be an int in [0, 2]"),
    ({"axes": {"cross_attention": [True, ["down", "middle"]]}}, "'middle' is not a part of this UNet; its parts are down, mid"),
    ({"fixed": {"cross_attention": 1}}, "cross_attention must be True, False or a list of UNet parts"),
    ({"fixed": {"return_flags": True}}, "'return_flags' is not a generate argument"),
    ({"metrics": ["clip"]}, "the metric \"clip\" needs 'clip_model'"),
    ({"clip_model": "NOWHERE"}, "'clip_model' is read by the metric \"clip\" only"),
    ({"metrics": ["clip"], "clip_model": "NOWHERE"}, "clip_model: model folder not found"),
    ({"metrics": ["clip"], "clip_model": "toy"}, "not altclip; pass an AltCLIP folder"),  # an AltDiffusion folder
    ({"prompts": None, "prompts_file": 5}, "'prompts_file' must name a text file"),
    ({"prompts": ["a red circle", "x\udc80"]}, "spec.json: "),  # not UTF-8: refused by the tokenizer's check
    ({"seeds": [1, 1]}, "'seeds' repeats a seed"),
    ({"axes": {"eta": [0.0, 2.0]}}, "spec.json: eta must be in [0, 1]"),
    ({"axes": {"lora_scale": [0.5]}}, "lora_scale scales the spec's LoRA files: give them as 'lora'"),
    ({"lora": "missing.safetensors"}, "LoRA file not found"),
    ({"lora": "EMPTY"}, "is not a readable safetensors file"),
    ({"lora": []}, "'lora' must name a LoRA file or a non-empty list"),
    ({"lora": ["LORA", "./LORA"]}, "is given twice"),
    ({"lora": "LORA", "axes": {"lora_scale": [0.5, True]}}, "lora_scale must be a finite number, got True"),
])
def test_bad_specs_are_refused_before_any_picture(tmp_path, capsys, monkeypatch, change, message):
    import altdiff_min.pipeline as pipeline

    monkeypatch.setattr(pipeline.AltDiffusion, "generate",
                        functools.wraps(pipeline.AltDiffusion.generate)(lambda *a, **k: pytest.fail("a picture was made")))
    (tmp_path / "EMPTY").write_text("\n \n")
    if "LORA" in json.dumps(change):
        os.rename(lora_file(tmp_path), tmp_path / "LORA")
    spec = {k: v for k, v in {**SPEC, **change}.items() if v is not None}
    assert main(["sweep", write_spec(tmp_path, spec), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "spec").exists()  # OUT not claimed: the corrected spec runs there


def test_force_replaces_only_what_a_sweep_wrote(tmp_path, capsys):
    small = {**SPEC, "seeds": [0], "axes": {"scale": [7.5]}}
    out = tmp_path / "spec"
    assert main(["sweep", write_spec(tmp_path, small), "--device", "cpu"]) == 0
    (out / "notes.txt").write_text("mine")
    changed = write_spec(tmp_path, {**small, "seeds": [1]})
    assert main(["sweep", changed, "--device", "cpu"]) == 2
    assert "holds a sweep of another spec; --force replaces it" in capsys.readouterr().err
    assert main(["sweep", changed, "--device", "cpu", "--force"]) == 2
    assert "also holds ['notes.txt'], which no sweep wrote" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine" and len(table(out)) == 2  # the old sweep is whole
    (out / "notes.txt").unlink()
    assert main(["sweep", changed, "--device", "cpu", "--force"]) == 0
    assert sorted(os.listdir(out / "pictures")) == ["s000-p000-seed1.png", "s000-p001-seed1.png"]


def test_a_sweep_resumed_with_another_model_is_refused(tmp_path, capsys):
    import shutil

    from altdiff_min.storage.folder import resolve

    model = tmp_path / "model"
    shutil.copytree(resolve("toy"), model)
    spec = write_spec(tmp_path, {**SPEC, "model": str(model), "seeds": [0], "axes": {"scale": [7.5]}})
    assert main(["sweep", spec, "--device", "cpu"]) == 0
    config = json.loads((model / "config.json").read_text())
    config["schedule"]["beta_end"] = 0.02
    (model / "config.json").write_text(json.dumps(config))
    assert main(["sweep", spec, "--device", "cpu"]) == 2
    assert "the model folder is not the one the sweep began with: its config (config_sha256) changed" in capsys.readouterr().err


def test_contact_sheet_heads_columns_with_the_prompts_shortened_to_fit(tmp_path, monkeypatch):
    """Each column is headed by its prompt (cut with "…" to the picture's width) over its seed, not 'p0 s0'."""
    from PIL import ImageDraw

    from altdiff_min.apps.sweep import Spec, contact_sheet

    drawn = []
    real = ImageDraw.ImageDraw.text
    monkeypatch.setattr(ImageDraw.ImageDraw, "text", lambda self, xy, text, **k: drawn.append((xy, text, self.textlength(text)))
                        or real(self, xy, text, **k))
    prompts = ["a red circle", "un grand carré bleu à gauche d'un petit cercle vert"]
    spec = Spec("toy", prompts, [0, 3], {}, {"scale": [7.5]}, [])
    contact_sheet(str(tmp_path), spec, [Image.new("RGB", (128, 64))] * 4)
    heads = [(text, length) for (x, y), text, length in drawn if x >= 220]
    assert len(heads) == 8, heads  # two lines a column
    assert [t for t, _ in heads] == ["a red circle", "seed 0", "a red circle", "seed 3",
                                     heads[4][0], "seed 0", heads[4][0], "seed 3"]
    assert heads[4][0].endswith("…") and prompts[1].startswith(heads[4][0][:-1]) and len(heads[4][0]) > 10
    assert all(length <= 128 - 4 for _, length in heads)  # within its column
    assert (tmp_path / "contact_sheet.png").exists()


def test_contact_sheet_fits_an_axis_of_sizes(tmp_path):
    spec = {**SPEC, "prompts": ["a red circle"], "seeds": [0], "axes": {"width": [64, 128]}}
    assert main(["sweep", write_spec(tmp_path, spec), "--device", "cpu"]) == 0
    assert Image.open(tmp_path / "spec" / "contact_sheet.png").size == (220 + 130, 30 + 2 * 66)


def test_outdir_that_is_a_file_or_someone_elses_folder(tmp_path, capsys):
    spec = write_spec(tmp_path)
    (tmp_path / "file").write_text("x")
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("keep")
    for out in ("file", "theirs"):
        assert main(["sweep", spec, "--outdir", str(tmp_path / out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "is not a folder" in err and "not a sweep's" in err
    assert (tmp_path / "theirs" / "notes.txt").read_text() == "keep"


def test_a_toml_spec(tmp_path):
    pytest.importorskip("tomllib")  # Python >= 3.11 (3.10 is told to use JSON)
    (tmp_path / "prompts.txt").write_text("a red circle\n")
    (tmp_path / "s.toml").write_text('model = "toy"\nprompts_file = "prompts.txt"\nseeds = [1]\nmetrics = ["toy"]\n'
                                     '[fixed]\nsteps = 3\n[axes]\ncross_attention = [true, false, ["down", "up"], "mid"]\n')
    assert main(["sweep", str(tmp_path / "s.toml"), "--device", "cpu"]) == 0
    rows = table(tmp_path / "s")
    assert [r["cross_attention"] for r in rows] == ["True", "False", '["down", "up"]', "mid"]
    assert json.loads((tmp_path / "s" / "spec.json").read_text())["axes"]["cross_attention"] == [True, False, ["down", "up"], "mid"]
    pictures = [(tmp_path / "s" / r["file"]).read_bytes() for r in rows]
    assert len(set(pictures)) == 4  # each part switched off changes the picture


def test_a_read_only_outdir_is_one_line_before_any_picture(tmp_path, capsys, monkeypatch):
    """As root, permissions do not stop writes here; the file system's refusal is simulated."""
    import errno

    import altdiff_min.pipeline as pipeline

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    spec = write_spec(tmp_path)
    monkeypatch.setattr(os, "makedirs", read_only)
    monkeypatch.setattr(pipeline, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(["sweep", spec, "--outdir", str(tmp_path / "ro" / "out"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "Read-only file system" in err and err.count("\n") == 1


SMALL = {**SPEC, "seeds": [0], "axes": {"scale": [7.5]}}  # two cells


def test_spec_json_records_the_environments_and_the_whole_fingerprint_and_resuming_compares_it(tmp_path, capsys,
                                                                                               monkeypatch):
    import altdiff_min.apps.sweep as sweep
    import altdiff_min.storage.provenance as provenance
    from altdiff_min.storage.folder import fingerprint

    spec, out = write_spec(tmp_path, SMALL), tmp_path / "spec"
    assert main(["sweep", spec, "--device", "cpu"]) == 0
    recorded = json.loads((out / "spec.json").read_text())
    first = provenance.environment("cpu", "fp32")  # the toy computes in fp32
    assert recorded["model_folder"] == fingerprint("toy") and recorded["environments"] == [first]
    assert {"altdiff_min", "git_commit", "torch", "device", "dtype", "threads"} <= set(first)
    # Resumed elsewhere (another thread count): allowed, and recorded beside the first
    real = provenance.environment
    monkeypatch.setattr(provenance, "environment", lambda *a: {**real(*a), "threads": 99})
    assert main(["sweep", spec, "--device", "cpu"]) == 0
    assert json.loads((out / "spec.json").read_text())["environments"] == [first, {**first, "threads": 99}]
    # Every *_sha256 of the fingerprint is compared: weights changed under the same config are another sweep
    monkeypatch.setattr(sweep, "fingerprint", lambda path: {**fingerprint(path), "weights_sha256": "0" * 64})
    capsys.readouterr()
    assert main(["sweep", spec, "--device", "cpu"]) == 2
    assert ("the model folder is not the one the sweep began with: its weights (weights_sha256) changed"
            in capsys.readouterr().err)


def test_a_sweep_recorded_before_the_weights_hash_was_kept_still_resumes(tmp_path, capsys):
    spec, out = write_spec(tmp_path, SMALL), tmp_path / "spec"
    assert main(["sweep", spec, "--device", "cpu"]) == 0
    recorded = json.loads((out / "spec.json").read_text())
    del recorded["model_folder"]["weights_sha256"]  # as spec.json was written before it was kept
    (out / "spec.json").write_text(json.dumps(recorded))
    os.unlink(out / "pictures" / "s000-p001-seed0.png")
    assert main(["sweep", spec, "--device", "cpu"]) == 0
    assert (out / "pictures" / "s000-p001-seed0.png").is_file()
    recorded["model_folder"]["config_sha256"] = "0" * 64  # what it kept is still compared
    (out / "spec.json").write_text(json.dumps(recorded))
    capsys.readouterr()
    assert main(["sweep", spec, "--device", "cpu"]) == 2
    assert "its config (config_sha256) changed" in capsys.readouterr().err


def test_a_resumed_sweep_removes_the_leftovers_of_killed_writes(tmp_path):
    spec, out = write_spec(tmp_path, SMALL), tmp_path / "spec"
    assert main(["sweep", spec, "--device", "cpu"]) == 0
    dead = [out / "pictures" / ".s000-p000-seed0.png.partial-0123456789ab", out / ".results.csv.partial-0123456789ab"]
    for file in dead:  # a killed write's: nobody holds its lock
        file.write_bytes(b"half a file")
    os.unlink(out / "pictures" / "s000-p001-seed0.png")  # a cell left to make
    assert main(["sweep", spec, "--device", "cpu"]) == 0
    assert not any(file.exists() for file in dead)
    assert sorted(os.listdir(out / "pictures")) == ["s000-p000-seed0.png", "s000-p001-seed0.png"]


@pytest.mark.parametrize("name", ["results.csv", "contact_sheet.png", "spec.json", "pictures/s000-p001-seed0.png",
                                  "../.spec.lock"])
def test_a_sweep_never_writes_through_a_planted_link(tmp_path, capsys, name):
    spec, out = write_spec(tmp_path, SMALL), tmp_path / "spec"
    assert main(["sweep", spec, "--device", "cpu"]) == 0
    victim = tmp_path / "victim"
    victim.write_bytes((out / "spec.json").read_bytes() if name == "spec.json" else
                       (out / "pictures" / "s000-p000-seed0.png").read_bytes())  # a file a reader could take for ours
    before = victim.read_bytes()
    link = out / name
    if os.path.lexists(link):
        os.unlink(link)
    os.symlink(victim, link)
    capsys.readouterr()
    assert main(["sweep", spec, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "is a symbolic link; altdiff-min does not write" in err.strip().splitlines()[-1]  # one line (after tqdm's)
    assert victim.read_bytes() == before and os.path.islink(link)


def test_each_picture_carries_its_record_and_generate_replays_it_to_the_same_bytes(tmp_path, capsys):
    """A cell's PNG carries what `altdiff-min generate` writes into its own (provenance.picture_record):
    the cell's arguments, prompt, seed, spec.json's model_folder and environment; `generate --replay`
    of the picture writes the very same bytes."""
    from altdiff_min.storage.provenance import record_of_png

    spec = {"model": "toy", "prompts": ["un cercle rouge"], "seeds": [5], "fixed": {"steps": 3, "negative_prompt": "flou"},
            "axes": {"sampler": ["ddim", "dpm++2m"], "guidance": ["rescale:0.7"]}}
    out = tmp_path / "spec"
    assert main(["sweep", write_spec(tmp_path, spec), "--device", "cpu"]) == 0
    recorded = json.loads((out / "spec.json").read_text())
    for row, sampler in zip(table(out), ("ddim", "dpm++2m")):
        picture = out / row["file"]
        carried = record_of_png(str(picture))
        assert carried == {"prompt": "un cercle rouge", "sample": 0, "negative_prompt": "flou", "seed": 5, "n_samples": 1,
                           "sampler": sampler, "steps": 3, "scale": 7.5, "guidance": "rescale:0.7", "eta": 0.0,
                           "height": 64, "width": 64, "dtype": "fp32", "model": recorded["model_folder"],
                           "safety_checker": False, "environment": recorded["environments"][0]}
        lines = Image.open(picture).info["parameters"].splitlines()
        assert lines[:2] == ["un cercle rouge", "Negative prompt: flou"]
        assert lines[2].startswith(f"Steps: 3, Sampler: {'DDIM' if sampler == 'ddim' else 'DPM++ 2M'}, CFG scale: 7.5, "
                                   f"Seed: 5, Size: 64x64, Guidance: rescale:0.7, Model hash: ")
        again = tmp_path / f"again-{sampler}"
        assert main(["generate", "--replay", str(picture), "--outdir", str(again)]) == 0
        assert (again / "samples" / "00000.png").read_bytes() == picture.read_bytes()


def test_a_cell_of_a_setting_generate_cannot_take_records_it_and_replay_says_so(tmp_path, capsys):
    from altdiff_min.storage.provenance import record_of_png

    spec = {"model": "toy", "prompts": ["a red circle"], "seeds": [0], "fixed": {"steps": 2},
            "axes": {"cross_attention": [["down", "up"]], "text_layer": [1]}}
    out = tmp_path / "spec"
    assert main(["sweep", write_spec(tmp_path, spec), "--device", "cpu"]) == 0
    picture = out / table(out)[0]["file"]
    carried = record_of_png(str(picture))
    assert carried["cross_attention"] == ["down", "up"] and carried["text_layer"] == 1
    assert 'Text layer: 1, Cross attention: "down, up"' in Image.open(picture).info["parameters"]
    capsys.readouterr()
    assert main(["generate", "--replay", str(picture), "--outdir", str(tmp_path / "again")]) == 2
    err = capsys.readouterr().err
    assert err == (f"altdiff-min generate: error: --replay: {picture} was made with text_layer=1, cross_attention=['down', "
                   f"'up'] (a sweep's setting), which generate cannot set; make it again with model.generate(…, "
                   f"text_layer=1, cross_attention=['down', 'up'])\n")
    assert not (tmp_path / "again").exists()


def test_a_lora_scale_axis(tmp_path, capsys):
    """`lora` (beside the spec) and a lora_scale axis: scale 0 is the plain picture, 1.5 that of
    load(MODEL, lora=[(FILE, 1.5)]); each picture records the file (path, SHA-256) and its scale, and
    generate --replay makes it again; spec.json records the file's SHA-256, so a changed file is another sweep."""
    from altdiff_min import load
    from altdiff_min.apps.generate import file_digest
    from altdiff_min.storage.provenance import record_of_png

    path = lora_file(tmp_path)
    spec = {"model": "toy", "prompts": ["a red circle"], "seeds": [0], "fixed": {"steps": 3},
            "lora": "style.safetensors", "axes": {"lora_scale": [0.0, 1.5]}}
    out = tmp_path / "spec"
    assert main(["sweep", write_spec(tmp_path, spec), "--device", "cpu"]) == 0
    rows = table(out)
    assert [r["lora_scale"] for r in rows] == ["0.0", "1.5"]
    plain = load("toy").generate("a red circle", seed=0, steps=3)[0]
    strong = load("toy", lora=[(path, 1.5)]).generate("a red circle", seed=0, steps=3)[0]
    pictures = [Image.open(out / r["file"]) for r in rows]
    assert pictures[0].tobytes() == plain.tobytes() and pictures[1].tobytes() == strong.tobytes() != plain.tobytes()
    carried = record_of_png(str(out / rows[1]["file"]))
    assert carried["lora"] == [{"path": path, "sha256": file_digest(path, "LoRA"), "scale": 1.5}]
    assert "lora_scale" not in carried and "<lora:style:1.5>" in pictures[1].info["parameters"]
    assert main(["generate", "--replay", str(out / rows[1]["file"]), "--outdir", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "samples" / "00000.png").read_bytes() == (out / rows[1]["file"]).read_bytes()
    assert json.loads((out / "spec.json").read_text())["lora_files"] == [{"path": path, "sha256": file_digest(path, "LoRA")}]
    lora_file(tmp_path, seed=1)  # another LoRA in the same file
    capsys.readouterr()
    assert main(["sweep", str(tmp_path / "spec.json"), "--device", "cpu"]) == 2
    assert "holds a sweep of another spec" in capsys.readouterr().err
