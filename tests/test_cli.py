"""`altdiff-min generate`: FlagAI's files and counters, and arguments refused before any model work."""
import os

import pytest
from PIL import Image

from altdiff_min.__main__ import main


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
