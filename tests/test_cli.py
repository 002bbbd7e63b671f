"""`altdiff-min generate`: FlagAI's files and counters, and arguments refused before any model work."""
import os
from pathlib import Path

import pytest
import torch
from helpers import put_in
from PIL import Image

from altdiff_min.apps.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def model_dir(small_model_dir):
    return small_model_dir


def test_generate_writes_samples_and_grids_and_continues_the_count(model_dir, tmp_path, capsys):
    out = str(tmp_path / "outputs")
    args = ["generate", "a red circle", "--model", model_dir, "--n-samples", "2", "--steps", "3", "--H", "64",
            "--W", "96", "--outdir", out, "--device", "cpu"]
    assert main(args) == 0
    assert main(args + ["--sampler", "euler_a"]) == 0
    assert sorted(os.listdir(os.path.join(out, "samples"))) == ["00000.png", "00001.png", "00002.png", "00003.png"]
    assert sorted(f for f in os.listdir(out) if f.startswith("grid")) == ["grid-0000.png", "grid-0001.png"]
    assert Image.open(os.path.join(out, "samples", "00003.png")).size == (96, 64)
    assert Image.open(os.path.join(out, "grid-0000.png")).size == (2 * 98 + 2, 68)  # one row of n_samples
    printed = capsys.readouterr().out.split()
    assert os.path.join(out, "samples", "00002.png") in printed and os.path.join(out, "grid-0001.png") in printed


def test_prompts_from_file_share_the_seed(model_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("一只戴着帽子的小狗\n\nun petit chien portant un chapeau\n", encoding="utf-8")
    out = str(tmp_path / "o")
    assert main(["generate", "--from-file", str(prompts), "--model", model_dir, "--n-samples", "1", "--steps", "2",
                 "--H", "64", "--W", "64", "--outdir", out, "--skip-grid", "--plms", "--device", "cpu"]) == 0
    assert sorted(os.listdir(os.path.join(out, "samples"))) == ["00000.png", "00001.png"]
    assert not any(f.startswith("grid") for f in os.listdir(out))


@pytest.mark.parametrize("extra,message", [
    (["--H", "60"], "multiples of 32"),
    (["--steps", "0"], "steps"),
    (["--plms", "--eta", "0.5"], "eta must be 0"),
    (["--sampler", "euler_a", "--eta", "0.5"], "euler_a draws its own noise at every step: eta must be 0"),
    (["--steps", "1000"], "steps=1000 is not possible for ddim with 'leading' spacing"),
    (["--sampler", "dpm++2m", "--steps", "1000"], "steps=1000 is not possible for dpm++2m"),
    (["--n-samples", "0"], "--n-samples"),
    (["--C", "3"], "--C 3"),
    (["--plms", "--sampler", "dpm++2m"], "conflicts"),
    (["--from-file", "/nonexistent/prompts.txt"], "prompt file not found"),
    (["--from-file", "EMPTY"], "has no prompts"),
    (["--model", "NOT_A_MODEL"], "not an altdiff-min model folder"),
    (["--guidance", "nope"], "--guidance 'nope': unknown rule 'nope'"),
    (["--guidance", "rescale:2"], "φ must be a number in [0, 1]"),
    (["--guidance", "interval:800,200"], "0 ≤ low ≤ high"),
])
def test_bad_arguments_are_refused_before_the_model_loads(model_dir, tmp_path, monkeypatch, capsys, extra, message):
    import altdiff_min.pipeline as pipeline

    monkeypatch.setattr(pipeline, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    (tmp_path / "EMPTY").write_text("\n  \n")
    (tmp_path / "NOT_A_MODEL").mkdir()
    extra = [str(tmp_path / e) if e in ("EMPTY", "NOT_A_MODEL") else e for e in extra]
    prompt = [] if "--from-file" in extra else ["a dog"]
    assert main(["generate", *prompt, "--model", model_dir, "--outdir", str(tmp_path / "o"), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_missing_prompt(model_dir, capsys):
    assert main(["generate", "--model", model_dir]) == 2
    assert "give a prompt" in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["   "], "give a prompt (not empty or blank)"),
    ([""], "give a prompt (not empty or blank)"),
    (["a dog", "--from-file", "PROMPTS"], "give a prompt or --from-file, not both"),
    (["a \udcff dog"], "lone surrogate"),
    (["a" * 10_001], "error: prompt is 10,001 characters; at most 10,000 are accepted (only the first 77 tokens are used)\n"),
])
def test_command_line_prompt_gaps(small_model_dir, tmp_path, capsys, args, message):
    (tmp_path / "PROMPTS").write_text("a cat\n")
    args = [str(tmp_path / a) if a == "PROMPTS" else a for a in args]
    assert main(["generate", *args, "--model", small_model_dir, "--outdir", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("args,message", [
    (["--H", "100000", "--W", "100000"], "--H = 100000 is over the limit of 4096"),
    (["--n-samples", "100000"], "--n-samples = 100000 is over the limit of 256"),
    (["--n-samples", "200", "--H", "1024", "--W", "2048"], "--n-samples × --H × --W pixels = 419430400 is over the limit"),
])
def test_huge_requests_on_the_command_line(small_model_dir, tmp_path, monkeypatch, capsys, args, message):
    import altdiff_min.pipeline as pipeline

    monkeypatch.setattr(pipeline, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(["generate", "a dog", "--model", small_model_dir, "--outdir", str(tmp_path / "o"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "--no-limits" in err


@pytest.mark.parametrize("setup,message", [
    ("outdir-is-a-file", "exists and is not a folder"),
    ("samples-is-a-file", "samples exists and is not a folder"),
])
def test_output_folder_is_checked_before_the_model_loads(small_model_dir, tmp_path, monkeypatch, capsys, setup, message):
    import altdiff_min.pipeline as pipeline

    monkeypatch.setattr(pipeline, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "o"
    if setup == "outdir-is-a-file":
        out.write_text("x")
    else:
        out.mkdir()
        (out / "samples").write_text("x")
    assert main(["generate", "a dog", "--model", small_model_dir, "--outdir", str(out)]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("device,message", [
    pytest.param("cuda", "this machine has no CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")),
    ("tpu", "device 'tpu'"),
    ("cpu:banana", "is not a torch device"),
])
def test_devices_that_cannot_be_used(small_model_dir, tmp_path, capsys, device, message):
    assert main(["generate", "a dog", "--model", small_model_dir, "--outdir", str(tmp_path / "o"), "--device", device]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and not (tmp_path / "o").exists()


def test_manifest_records_every_picture_and_replay_makes_it_again(model_dir, tmp_path):
    import json

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\nun chien\n")
    out = tmp_path / "o"
    assert main(["generate", "--from-file", str(prompts), "--model", model_dir, "--n-samples", "2", "--steps", "2",
                 "--H", "64", "--W", "96", "--sampler", "euler_a", "--seed", "5", "--outdir", str(out), "--device", "cpu"]) == 0
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [(r["file"], r["prompt"], r["sample"]) for r in rows] == [
        (os.path.join("samples", f"0000{i}.png"), p, k) for i, (p, k) in enumerate([("a red circle", 0), ("a red circle", 1),
                                                                                    ("un chien", 0), ("un chien", 1)])]
    assert rows[0]["seed"] == 5 and rows[0]["sampler"] == "euler_a" and (rows[0]["height"], rows[0]["width"]) == (64, 96)
    assert rows[0]["model"]["path"] == os.path.abspath(model_dir) and len(rows[0]["model"]["config_sha256"]) == 64
    assert main(["generate", "--replay", f"{out / 'manifest.jsonl'}:4", "--outdir", str(tmp_path / "again"),
                 "--device", "cpu"]) == 0
    again = json.loads((tmp_path / "again" / "manifest.jsonl").read_text())
    assert again["replay_of"] == rows[3]["file"] and again["prompt"] == "un chien" and again["sample"] == 1
    assert (tmp_path / "again" / "samples" / "00000.png").read_bytes() == (out / rows[3]["file"]).read_bytes()


@pytest.mark.parametrize("replay, message", [("nowhere.jsonl:1", "manifest not found"), ("M:7", "has 1 line(s), not 7"),
                                             ("M:0", "takes MANIFEST:LINE"), ("M", "takes MANIFEST:LINE")])
def test_replay_refuses_bad_lines(model_dir, tmp_path, capsys, replay, message):
    (tmp_path / "M").write_text('{"prompt": "x"}\n')
    assert main(["generate", "--replay", replay.replace("M", str(tmp_path / "M")), "--outdir", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("change, message", [
    ({"prompt": 5}, "prompt of the wrong type"), ({"scale": "7.5"}, "scale of the wrong type"),
    ({"seed": "5"}, "seed of the wrong type"), ({"dtype": "fp8"}, "dtype 'fp8' or sample 0 out of range"),
    ({"sample": 5}, "sample 5 out of range"), ({"model": "m"}, "is not a manifest line"),
    ({"model": {"path": "NOWHERE", "config_sha256": "0"}}, "model folder not found"),
])
def test_replay_refuses_a_recorded_line_it_cannot_honour(model_dir, tmp_path, capsys, monkeypatch, change, message):
    import json

    import altdiff_min.pipeline as pipeline

    out = tmp_path / "o"
    assert main(["generate", "a dog", "--model", model_dir, "--steps", "1", "--n-samples", "1", "--outdir", str(out),
                 "--device", "cpu"]) == 0
    row = {**json.loads((out / "manifest.jsonl").read_text()), **change}
    (tmp_path / "M").write_text(json.dumps(row) + "\n")
    monkeypatch.setattr(pipeline, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(["generate", "--replay", f"{tmp_path / 'M'}:1", "--outdir", str(tmp_path / "again")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_replay_refuses_changed_weights(model, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["generate", "a dog", "--model", str(model), "--steps", "1", "--n-samples", "1", "--H", "64", "--W", "64",
                 "--outdir", str(out), "--device", "cpu"]) == 0
    put_in(model, "unet.conv_out.bias", lambda t: t.add_(1e-3))
    assert main(["generate", "--replay", f"{out / 'manifest.jsonl'}:1", "--outdir", str(tmp_path / "again")]) == 2
    err = capsys.readouterr().err
    assert f"the weights of {model} changed since the picture was made" in err


def test_a_broken_manifest_line_is_left_alone_and_the_next_one_starts_fresh(model_dir, tmp_path):
    import json

    out = tmp_path / "o"
    out.mkdir()
    (out / "manifest.jsonl").write_text('not json\n{"file": "samples/x.png", "time": "2026-11-')  # cut short
    assert main(["generate", "a dog", "--model", model_dir, "--steps", "1", "--n-samples", "1", "--outdir", str(out),
                 "--device", "cpu"]) == 0
    lines = (out / "manifest.jsonl").read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[2])["prompt"] == "a dog"
    assert (out / "grid-0000.png").is_file()


def test_a_deeply_nested_manifest_line_breaks_neither_later_runs_nor_replay(model_dir, tmp_path, capsys):
    import json

    out = tmp_path / "o"
    out.mkdir()
    (out / "manifest.jsonl").write_text("[" * 100_000 + "\n")
    args = ["generate", "a dog", "--model", model_dir, "--steps", "1", "--n-samples", "1", "--outdir", str(out),
            "--H", "64", "--W", "64", "--device", "cpu"]
    assert main(args) == 0 and main(args) == 0
    lines = (out / "manifest.jsonl").read_text().splitlines()
    assert [json.loads(line)["file"] for line in lines[1:]] == [os.path.join("samples", f"0000{i}.png") for i in (0, 1)]
    capsys.readouterr()
    assert main(["generate", "--replay", f"{out / 'manifest.jsonl'}:1", "--outdir", str(tmp_path / "again")]) == 2
    err = capsys.readouterr().err
    assert "line 1 nests JSON deeper than 64 levels" in err and err.count("\n") == 1


def test_a_linked_manifest_is_refused_and_its_target_untouched(model_dir, tmp_path, capsys):
    target = tmp_path / "precious.txt"
    target.write_text("keep\n")
    out = tmp_path / "o"
    out.mkdir()
    os.symlink(target, out / "manifest.jsonl")
    assert main(["generate", "a dog", "--model", model_dir, "--steps", "1", "--n-samples", "1", "--outdir", str(out),
                 "--H", "64", "--W", "64", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "manifest.jsonl is a symbolic link; altdiff-min does not write manifests through links" in err
    assert err.count("\n") == 1 and target.read_text() == "keep\n" and not os.listdir(out / "samples")


KILLED_AFTER_LINKING = """
import os, signal, sys
from altdiff_min.storage import manifest
def kill(path):
    os.kill(os.getpid(), signal.SIGKILL)
manifest.append_line = lambda *a: kill(None)  # killed between linking the picture and appending its line
sys.argv = ["altdiff-min", "generate", "a dog", "--model", sys.argv[1], "--steps", "1", "--n-samples", "2",
            "--H", "64", "--W", "64", "--outdir", sys.argv[2], "--device", "cpu"]
from altdiff_min.apps.cli import main
main(sys.argv[1:])
"""

KILLED_WHILE_SAVING = """
import os, signal, sys
from altdiff_min.storage import manifest
manifest.save_numbered.__globals__["fsync_path"] = lambda path: os.kill(os.getpid(), signal.SIGKILL)
sys.argv = ["altdiff-min", "generate", "a dog", "--model", sys.argv[1], "--steps", "1", "--n-samples", "1",
            "--H", "64", "--W", "64", "--outdir", sys.argv[2], "--device", "cpu"]
from altdiff_min.apps.cli import main
main(sys.argv[1:])
"""


def test_a_killed_runs_leftovers_are_cleaned_and_its_pictures_recorded(model_dir, tmp_path, capsys):
    """A kill inside the PNG save leaves a partial file; a kill between linking a picture and appending its
    line leaves a picture without a line. The next run removes the first and records the second as
    incomplete, from the settings the picture carries."""
    import json
    import subprocess
    import sys

    out = tmp_path / "o"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    left = []
    for script in (KILLED_WHILE_SAVING, KILLED_AFTER_LINKING):  # the second run cleans the first's partial file
        done = subprocess.run([sys.executable, "-c", script, model_dir, str(out)], env=env, capture_output=True)
        assert done.returncode == -9, done.stderr.decode()[-2000:]
        left.append(sorted(os.listdir(out / "samples")))
    assert len(left[0]) == 1 and left[0][0].startswith(".new.png.partial-") and left[1] == ["00000.png"], left
    assert not (out / "manifest.jsonl").exists()
    assert main(["generate", "a cat", "--model", model_dir, "--steps", "1", "--n-samples", "1", "--H", "64", "--W", "64",
                 "--outdir", str(out), "--device", "cpu"]) == 0
    assert sorted(os.listdir(out / "samples")) == ["00000.png", "00001.png"]
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [(r["file"], r["prompt"], r.get("incomplete", False)) for r in rows] == [
        (os.path.join("samples", "00000.png"), "a dog", True), (os.path.join("samples", "00001.png"), "a cat", False)]
    assert rows[0]["sample"] == 0 and rows[0]["seed"] == rows[1]["seed"] and "job" not in rows[0]
    assert "00000.png: recorded in the manifest as incomplete" in capsys.readouterr().err


def test_a_full_disk_leaves_no_truncated_picture(small_model_dir, tmp_path, monkeypatch, capsys):
    import errno

    import altdiff_min.storage.files as files

    out = tmp_path / "o"
    args = ["generate", "a dog", "--model", small_model_dir, "--outdir", str(out), "--H", "64", "--W", "64",
            "--steps", "1", "--n-samples", "1", "--device", "cpu", "--skip-grid"]
    assert main(args) == 0
    real = files.fsync_path

    def disk_full(path):  # the bytes went to the page cache; the file system refuses them on sync
        if ".partial-" in os.path.basename(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path)

    monkeypatch.setattr(files, "fsync_path", disk_full)
    assert main(args) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert sorted(os.listdir(out / "samples")) == ["00000.png"]  # nothing half-written, nothing counted
    monkeypatch.setattr(files, "fsync_path", real)
    assert main(args) == 0 and sorted(os.listdir(out / "samples")) == ["00000.png", "00001.png"]


def test_a_read_only_folder_is_one_line(small_model_dir, tmp_path, monkeypatch, capsys):
    """As root, permissions do not stop writes here; the file system's refusal is simulated."""
    import errno

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(os, "link", read_only)
    out = tmp_path / "o"
    assert main(["generate", "a dog", "--model", small_model_dir, "--outdir", str(out), "--H", "64", "--W", "64",
                 "--steps", "1", "--n-samples", "1", "--device", "cpu", "--skip-grid"]) == 2
    err = capsys.readouterr().err
    assert "Read-only file system" in err and str(out / "samples") in err and os.listdir(out / "samples") == []


def test_records_say_what_made_the_picture_and_a_png_replays_byte_identically(model_dir, tmp_path, capsys):
    import json
    import subprocess

    import torch

    from altdiff_min.storage.folder import fingerprint

    out = tmp_path / "o"
    assert main(["generate", "un chien rouge", "--negative-prompt", "flou", "--model", model_dir, "--n-samples", "2",
                 "--steps", "2", "--H", "64", "--W", "96", "--sampler", "dpm++2m", "--seed", "7", "--outdir", str(out),
                 "--device", "cpu"]) == 0
    assert "2 picture(s) of 1 prompt(s) in " in capsys.readouterr().out  # one process prints its summary too
    row = json.loads((out / "manifest.jsonl").read_text().splitlines()[1])
    environment = row["environment"]
    assert environment["torch"] == torch.__version__ and environment["threads"] == torch.get_num_threads()
    assert environment["device"] == "cpu" and environment["device_name"] and environment["dtype"] == "fp32"
    assert environment["altdiff_min"] and "git_commit" in environment
    assert row["model"] == fingerprint(model_dir)  # its path, config and weights (weights_sha256)
    if os.path.exists(os.path.join(REPO, ".git")):  # run from a checkout: the commit it runs
        head = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        assert environment["git_commit"] == head and isinstance(environment["git_dirty"], bool)
    picture = Image.open(out / row["file"])
    carried = json.loads(picture.info["altdiff-min"])
    assert carried == {k: v for k, v in row.items() if k not in ("file", "index", "job", "flagged", "time")}
    parameters = picture.info["parameters"].splitlines()
    assert parameters[:2] == ["un chien rouge", "Negative prompt: flou"]
    assert "Steps: 2, Sampler: DPM++ 2M, CFG scale: 7.5, Seed: 7, Size: 96x64" in parameters[2]
    assert "Batch size: 2, Batch pos: 1" in parameters[2]
    assert main(["generate", "--replay", str(out / row["file"]), "--outdir", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "manifest.jsonl").read_text())
    assert again["replay_of"] == str(out / row["file"]) and again["sample"] == 1
    assert (tmp_path / "again" / "samples" / "00000.png").read_bytes() == (out / row["file"]).read_bytes()


def test_a_guidance_rule_is_used_recorded_and_replayed(model_dir, tmp_path):
    import json

    from altdiff_min.pipeline import load

    out = tmp_path / "o"
    args = ["generate", "un chien", "--model", model_dir, "--n-samples", "2", "--steps", "3", "--H", "64", "--W", "96",
            "--seed", "3", "--device", "cpu", "--skip-grid"]
    assert main(args + ["--outdir", str(out), "--guidance", "interval:300,700"]) == 0
    assert main(args + ["--outdir", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["guidance"] for r in rows] == ["interval:300,700"] * 2 + ["cfg"] * 2
    picture = Image.open(out / rows[1]["file"])
    assert 'Guidance: "interval:300,700"' in picture.info["parameters"]
    expected = load(model_dir).generate("un chien", n_samples=2, steps=3, height=64, width=96, seed=3, progress=False,
                                        guidance="interval:300,700")[1]
    assert picture.tobytes() == expected.tobytes()
    assert picture.tobytes() != Image.open(out / rows[3]["file"]).tobytes()  # the rule changed the picture
    assert main(["generate", "--replay", str(out / rows[1]["file"]), "--outdir", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "samples" / "00000.png").read_bytes() == (out / rows[1]["file"]).read_bytes()


def test_replay_refuses_a_picture_without_a_record(model_dir, tmp_path, capsys):
    Image.new("RGB", (64, 64)).save(tmp_path / "p.png")
    assert main(["generate", "--replay", str(tmp_path / "p.png"), "--outdir", str(tmp_path / "o")]) == 2
    assert "carries no altdiff-min record" in capsys.readouterr().err


@pytest.mark.parametrize("how", ["manifest is a folder", "negative prompt not text"])
def test_outdir_and_negative_prompt_are_checked_before_loading(model_dir, tmp_path, capsys, monkeypatch, how):
    import altdiff_min.pipeline as pipeline

    monkeypatch.setattr(pipeline, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    out, extra = tmp_path / "o", []
    if how == "manifest is a folder":
        (out / "manifest.jsonl").mkdir(parents=True)
    else:
        extra = ["--negative-prompt", "blurry\udc80"]
    assert main(["generate", "a dog", "--model", model_dir, "--outdir", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert ("manifest.jsonl is not a regular file (a folder, device or pipe)" if how == "manifest is a folder" else
            "--negative-prompt: prompt 'blurry\\udc80' has a lone surrogate") in err and err.count("\n") == 1


def test_a_small_init_img_with_a_size_given_is_resized_as_generate_does(model_dir, tmp_path, capsys):
    from PIL import Image

    Image.new("RGB", (20, 20), "red").save(tmp_path / "tiny.png")
    out = tmp_path / "o"
    assert main(["generate", "a dog", "--model", model_dir, "--init-img", str(tmp_path / "tiny.png"), "--H", "64", "--W",
                 "96", "--steps", "2", "--n-samples", "1", "--outdir", str(out), "--device", "cpu"]) == 0
    assert Image.open(out / "samples" / "00000.png").size == (96, 64)
    assert f"--init-img {tmp_path / 'tiny.png'} (20×20) is resized to 96×64" in capsys.readouterr().err
    Image.new("RGB", (64, 96), "red").save(tmp_path / "fits.png")  # a side not given is the picture's own: no notice
    assert main(["generate", "a dog", "--model", model_dir, "--init-img", str(tmp_path / "fits.png"), "--steps", "2",
                 "--n-samples", "1", "--outdir", str(out), "--device", "cpu"]) == 0
    assert "resized" not in capsys.readouterr().err


def test_concurrent_runs_into_one_folder_keep_every_picture(model_dir, tmp_path):
    """Three processes started at once, four pictures each: twelve files, twelve manifest lines."""
    import json
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": repo}
    runs = [subprocess.Popen([sys.executable, "-m", "altdiff_min", "generate", f"prompt {i}", "--model", model_dir,
                              "--n-samples", "4", "--steps", "2", "--H", "64", "--W", "64", "--seed", str(i),
                              "--outdir", str(tmp_path / "o"), "--device", "cpu"], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE) for i in range(3)]
    assert all(run.wait(timeout=600) == 0 for run in runs)
    files = sorted(os.listdir(tmp_path / "o" / "samples"))
    assert files == [f"{i:05}.png" for i in range(12)]
    rows = [json.loads(line) for line in (tmp_path / "o" / "manifest.jsonl").read_text().splitlines()]
    assert sorted(r["file"] for r in rows) == [os.path.join("samples", f) for f in files]
    assert sorted((r["prompt"], r["sample"]) for r in rows) == [(f"prompt {i}", k) for i in range(3) for k in range(4)]
    assert sorted(f for f in os.listdir(tmp_path / "o") if f.startswith("grid")) == [f"grid-{i:04}.png" for i in range(3)]


def test_torchrun_makes_the_same_pictures_as_one_process(model_dir, tmp_path):
    """torchrun --nproc_per_node 2 (gloo) shards the prompts; every picture, and the grid, is byte-identical."""
    import json
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": repo}
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\nun chien\n一只猫\n")
    job = ["-m", "altdiff_min", "generate", "--from-file", str(prompts), "--model", model_dir, "--n-samples", "2",
           "--steps", "2", "--H", "64", "--W", "64", "--sampler", "euler_a", "--device", "cpu"]
    for name, launcher in (("one", []), ("two", ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"])):
        done = subprocess.run([sys.executable, *launcher, *job, "--outdir", str(tmp_path / name)], env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
    pictures = {}
    for name in ("one", "two"):
        rows = [json.loads(line) for line in (tmp_path / name / "manifest.jsonl").read_text().splitlines()]
        pictures[name] = {(r["index"], r["sample"]): (r["file"], (tmp_path / name / r["file"]).read_bytes()) for r in rows}
        assert len({r["job"] for r in rows}) == 1
    # numbered by (prompt, sample) as one process numbers them, and the same bytes
    assert len(pictures["one"]) == 6 and pictures["one"] == pictures["two"]
    assert (tmp_path / "one" / "grid-0000.png").read_bytes() == (tmp_path / "two" / "grid-0000.png").read_bytes()
    assert not (tmp_path / "two" / "grid-0001.png").exists()  # rank 0 alone wrote the grid


def test_image_to_image_and_inpainting_from_the_command_line(model_dir, tmp_path, capsys):
    """--init-img / --strength / --mask / --paste-unmasked give generate's pictures, the manifest
    records the files (path and SHA-256), and --replay makes the picture again from them."""
    import json

    import numpy as np
    from helpers import picture

    from altdiff_min.pipeline import load

    init, mask = tmp_path / "init.png", tmp_path / "mask.png"
    picture("RGB", 100, 70, seed=4).save(init)
    m = np.zeros((70, 100), np.uint8)
    m[:, 60:] = 255
    Image.fromarray(m).save(mask)
    out = tmp_path / "o"
    assert main(["generate", "un cercle rouge", "--model", model_dir, "--n-samples", "2", "--steps", "4", "--seed", "5",
                 "--init-img", str(init), "--strength", "0.7", "--mask", str(mask), "--paste-unmasked",
                 "--outdir", str(out), "--skip-grid", "--device", "cpu"]) == 0
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["sample"] for r in rows] == [0, 1] and (rows[0]["width"], rows[0]["height"]) == (96, 64)
    assert rows[0]["init_img"]["path"] == str(init) and rows[0]["mask"]["path"] == str(mask) and rows[0]["strength"] == 0.7
    expected = load(model_dir).generate("un cercle rouge", n_samples=2, steps=4, seed=5, image=Image.open(init),
                                        strength=0.7, mask=Image.open(mask), paste_unmasked=True, progress=False)
    for row, image in zip(rows, expected):
        assert np.array_equal(np.asarray(Image.open(out / row["file"])), np.asarray(image))
    assert main(["generate", "--replay", f"{out / 'manifest.jsonl'}:2", "--outdir", str(tmp_path / "again"),
                 "--device", "cpu"]) == 0
    again = [json.loads(line) for line in (tmp_path / "again" / "manifest.jsonl").read_text().splitlines()]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "again" / again[0]["file"])), np.asarray(expected[1]))
    # a changed picture cannot be replayed
    picture("RGB", 100, 70, seed=5).save(init)
    capsys.readouterr()
    assert main(["generate", "--replay", f"{out / 'manifest.jsonl'}:1", "--outdir", str(tmp_path / "x"), "--device", "cpu"]) == 2
    assert "has changed since the picture was made" in capsys.readouterr().err


@pytest.mark.parametrize("extra,message", [
    (["--init-img", "nowhere.png"], "--init-img nowhere.png: no such file"),
    (["--init-img", "NOT_A_PICTURE"], "is not a picture PIL can read"),
    (["--init-img", "INIT", "--strength", "1.5"], "strength must be in (0, 1]"),
    (["--init-img", "INIT", "--strength", "0"], "strength must be in (0, 1] (0 would run no step), got 0.0"),
    (["--init-img", "INIT", "--strength", "0.1", "--steps", "5"], "runs int(5·0.1) = 0 steps"),
    (["--init-img", "INIT", "--mask", "SMALL"], "the mask is 30×20 pixels but the picture is 100×70"),
    (["--init-img", "TINY"], "rounding down leaves nothing"),
    (["--init-img", "WIDE"], "--W must be in [1, 4096], --init-img "),  # the side came from the picture
    (["--init-img", "WIDE", "--H", "64"], "--W must be in [1, 4096], --init-img "),
    (["--init-img", "BOMB"], "has more pixels than PIL opens (Image.MAX_IMAGE_PIXELS = 300000"),
    (["--strength", "0.5"], "--strength needs --init-img"),
    (["--mask", "SMALL"], "--mask needs --init-img"),
    (["--init-img", "INIT", "--paste-unmasked"], "give --mask"),
])
def test_bad_picture_arguments_are_refused_before_the_model_loads(model_dir, tmp_path, monkeypatch, capsys, extra, message):
    from helpers import picture

    import altdiff_min.pipeline

    files = {"INIT": (100, 70), "SMALL": (30, 20), "TINY": (20, 90), "WIDE": (4200, 70), "BOMB": (1000, 1000)}
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300_000)  # BOMB is over twice that: PIL refuses to open it
    for name, size in files.items():
        picture("RGB", *size).save(tmp_path / f"{name}.png")
    (tmp_path / "NOT_A_PICTURE.png").write_text("hello")
    extra = [str(tmp_path / f"{a}.png") if a in (*files, "NOT_A_PICTURE") else a for a in extra]
    monkeypatch.setattr(altdiff_min.pipeline, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(["generate", "x", "--model", model_dir, "--outdir", str(tmp_path / "o"), "--device", "cpu", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.fixture(scope="module")
def lora_file(model_dir, tmp_path_factory):
    """A diffusers-format LoRA of the small model's attention (r 2, random non-zero B), as save_lora writes it."""
    from altdiff_min.pipeline import load
    from altdiff_min.research.lora import add_lora
    from weights_convert.lora import save_lora

    model = load(model_dir)
    generator = torch.Generator().manual_seed(0)
    for layer in add_lora(model.unet, 2).values():
        layer.lora_B.weight.data = torch.randn(layer.lora_B.weight.shape, generator=generator) * 0.3
    return save_lora(model.unet, str(tmp_path_factory.mktemp("lora")), "style.safetensors")


@pytest.fixture(scope="module")
def second_lora_file(model_dir, tmp_path_factory):
    """Another LoRA of the small model (r 3, the cross attention's keys and values and the feed-forward)."""
    from altdiff_min.pipeline import load
    from altdiff_min.research.lora import add_lora
    from weights_convert.lora import save_lora

    model = load(model_dir)
    generator = torch.Generator().manual_seed(1)
    for layer in add_lora(model.unet, 3, targets=[r"cross_attn\.(k|v)", r"ff\.out"]).values():
        layer.lora_B.weight.data = torch.randn(layer.lora_B.weight.shape, generator=generator) * 0.3
    return save_lora(model.unet, str(tmp_path_factory.mktemp("lora")), "ink.safetensors")


def test_generate_with_a_lora_is_the_python_picture_recorded_and_replayed(model_dir, lora_file, tmp_path, capsys):
    """--lora FILE:SCALE gives the picture of load_lora + model.generate (same seed); scale 0 the picture
    without it; the manifest and the PNG record the file (path, SHA-256) and the scale, the parameters
    text shows A1111's <lora:NAME:SCALE>; --replay PICTURE.png makes the same bytes, and refuses once the
    file changed."""
    import json
    import shutil

    import numpy as np

    from altdiff_min.pipeline import load
    from altdiff_min.storage.provenance import record_of_png
    from weights_convert.lora import load_lora

    lora = tmp_path / "style.safetensors"
    shutil.copy(lora_file, lora)
    common = ["un chien", "--model", model_dir, "--n-samples", "1", "--steps", "3", "--H", "64", "--W", "64",
              "--seed", "5", "--skip-grid", "--device", "cpu"]
    pixels = {}
    for name, extra in (("plain", []), ("lora", ["--lora", f"{lora}:0.7"]), ("zero", ["--lora", f"{lora}:0"])):
        assert main(["generate", *common, "--outdir", str(tmp_path / name), *extra]) == 0
        row = json.loads((tmp_path / name / "manifest.jsonl").read_text())
        pixels[name] = np.asarray(Image.open(tmp_path / name / row["file"]))
    model = load(model_dir)
    load_lora(model.unet, str(lora), 0.7)
    expected = np.asarray(model.generate("un chien", n_samples=1, steps=3, height=64, width=64, seed=5, progress=False)[0])
    assert np.array_equal(pixels["lora"], expected)
    assert not np.array_equal(pixels["lora"], pixels["plain"])  # the LoRA changes the picture
    assert np.array_equal(pixels["zero"], pixels["plain"])
    row = json.loads((tmp_path / "lora" / "manifest.jsonl").read_text())
    picture = tmp_path / "lora" / row["file"]
    from altdiff_min.apps.generate import file_digest

    assert row["lora"] == [{"path": str(lora), "sha256": file_digest(str(lora), "LoRA"), "scale": 0.7}]
    assert record_of_png(str(picture))["lora"] == row["lora"]
    assert Image.open(picture).info["parameters"].splitlines()[0] == "un chien <lora:style:0.7>"
    assert main(["generate", "--replay", str(picture), "--outdir", str(tmp_path / "again"), "--device", "cpu"]) == 0
    again = json.loads((tmp_path / "again" / "manifest.jsonl").read_text())
    assert again["lora"] == row["lora"]
    assert (tmp_path / "again" / again["file"]).read_bytes() == picture.read_bytes()
    old = tmp_path / "old.jsonl"  # a line of the time generate took one file: {"lora": {…}}, not a list
    old.write_text(json.dumps({**row, "lora": row["lora"][0]}) + "\n")
    assert main(["generate", "--replay", f"{old}:1", "--outdir", str(tmp_path / "old"), "--device", "cpu"]) == 0
    replayed = json.loads((tmp_path / "old" / "manifest.jsonl").read_text())
    assert replayed["lora"] == row["lora"] and np.array_equal(np.asarray(Image.open(tmp_path / "old" / replayed["file"])),
                                                              pixels["lora"])
    with open(lora, "ab") as f:  # the file changes: the picture cannot be made again from it
        f.write(b" ")
    capsys.readouterr()
    assert main(["generate", "--replay", str(picture), "--outdir", str(tmp_path / "x"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"--replay: {lora} has changed since the picture was made" in err and err.count("\n") == 1


@pytest.mark.parametrize("extra,message", [
    (["--lora", "nowhere.safetensors"], "--lora: LoRA file not found: nowhere.safetensors"),
    (["--lora", "TEXT"], "is not a readable safetensors file"),
    (["--lora", "WEIGHTS"], "is not a LoRA weight"),
    (["--lora", "TEXT_TOWER"], "adapts CLIP's text tower, which m9 does not have"),
    (["--lora", "HALF"], "but not both down (A) and up (B) weights"),
    (["--lora", "LORA:abc"], "SCALE must be a finite number, not 'abc'"),
    (["--lora", "LORA:nan"], "SCALE must be a finite number, not 'nan'"),
    (["--lora", "LORA", "--lora", "LORA:0.5"], "--lora: the LoRA file LORA is given twice"),
    (["--lora", "LORA", "--lora", "OTHER/style.safetensors"], "would both be the LoRA 'style': rename one of the files"),
    (["--lora", "LORA", "--lora", "HALF"], "but not both down (A) and up (B) weights"),
])
def test_bad_lora_arguments_are_refused_before_the_model_loads(model_dir, lora_file, tmp_path, monkeypatch, capsys,
                                                                extra, message):
    from safetensors.torch import save_file

    import altdiff_min.pipeline

    (tmp_path / "TEXT").write_text("hello")
    save_file({"conv_in.weight": torch.ones(2, 2)}, str(tmp_path / "WEIGHTS"))
    save_file({"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.ones(2, 8),
               "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.ones(8, 2)},
              str(tmp_path / "TEXT_TOWER"))
    save_file({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.ones(2, 8)},
              str(tmp_path / "HALF"))
    names = {"TEXT", "WEIGHTS", "TEXT_TOWER", "HALF"}
    (tmp_path / "OTHER").mkdir()
    (tmp_path / "OTHER" / "style.safetensors").write_bytes(Path(lora_file).read_bytes())
    extra = [str(tmp_path / e) if e in names or e.startswith("OTHER") else e.replace("LORA", lora_file) for e in extra]
    message = message.replace("LORA", lora_file)
    monkeypatch.setattr(altdiff_min.pipeline, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(["generate", "x", "--model", model_dir, "--outdir", str(tmp_path / "o"), "--device", "cpu", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "--lora" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_generate_with_two_loras_is_the_python_picture_recorded_and_replayed(model_dir, lora_file, second_lora_file,
                                                                              tmp_path):
    """--lora A:0.7 --lora B:-0.5: the picture of load(MODEL, lora=[(A, 0.7), (B, -0.5)]) (same seed), unlike
    either alone; both recorded in order, both tags in the parameters text; --replay makes the same bytes."""
    import json

    import numpy as np

    from altdiff_min.apps.generate import file_digest
    from altdiff_min.pipeline import load

    common = ["un chien", "--model", model_dir, "--n-samples", "1", "--steps", "3", "--H", "64", "--W", "64",
              "--seed", "5", "--skip-grid", "--device", "cpu"]
    pixels = {}
    for name, extra in (("one", ["--lora", f"{lora_file}:0.7"]),
                        ("two", ["--lora", f"{lora_file}:0.7", "--lora", f"{second_lora_file}:-0.5"])):
        assert main(["generate", *common, "--outdir", str(tmp_path / name), *extra]) == 0
        row = json.loads((tmp_path / name / "manifest.jsonl").read_text())
        pixels[name] = np.asarray(Image.open(tmp_path / name / row["file"]))
    model = load(model_dir, lora=[(lora_file, 0.7), (second_lora_file, -0.5)])
    expected = np.asarray(model.generate("un chien", n_samples=1, steps=3, height=64, width=64, seed=5, progress=False)[0])
    assert np.array_equal(pixels["two"], expected) and not np.array_equal(pixels["two"], pixels["one"])
    assert row["lora"] == [{"path": lora_file, "sha256": file_digest(lora_file, "LoRA"), "scale": 0.7},
                           {"path": second_lora_file, "sha256": file_digest(second_lora_file, "LoRA"), "scale": -0.5}]
    picture = tmp_path / "two" / row["file"]
    assert Image.open(picture).info["parameters"].splitlines()[0] == "un chien <lora:style:0.7> <lora:ink:-0.5>"
    assert main(["generate", "--replay", str(picture), "--outdir", str(tmp_path / "again"), "--device", "cpu"]) == 0
    again = json.loads((tmp_path / "again" / "manifest.jsonl").read_text())
    assert again["lora"] == row["lora"] and (tmp_path / "again" / again["file"]).read_bytes() == picture.read_bytes()
