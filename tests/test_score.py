"""`altdiff-min score`: the multilingual CLIP score of pictures and their prompts with a converted
AltCLIP folder, against transformers' AltCLIPModel by hand; the three kinds of input, the CSV, and bad
input refused in one line before the model loads."""
import csv
import json
import os
import shutil

import numpy as np
import pytest
import torch
from helpers import picture, rel_diff, rel_err, write_pictures
from PIL import Image
from prompts import PROMPTS

from altdiff_min.apps.cli import main
from altdiff_min.errors import BadFile, Exists
from altdiff_min.vision.score import load_clip, read_pairs, score_pictures
from altdiff_min.model.tokenizer import Tokenizer
from altdiff_min.vision.tower import preprocess


@pytest.fixture(scope="module")
def generated(small_model_dir, tmp_path_factory) -> str:
    """A generate --outdir: two prompts (Chinese, French), two pictures each, and its manifest."""
    out = tmp_path_factory.mktemp("generated") / "out"
    prompts = out.parent / "prompts.txt"
    prompts.write_text(f"{PROMPTS['zh'][3]}\n{PROMPTS['fr'][3]}\n", encoding="utf-8")
    assert main(["generate", "--from-file", str(prompts), "--model", small_model_dir, "--n-samples", "2", "--steps", "2",
                 "--H", "64", "--W", "96", "--outdir", str(out), "--skip-grid", "--device", "cpu"]) == 0
    return str(out)


def read_csv(path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_scores_equal_the_reference_by_hand(altclip_dir, altclip_reference, spm_dir, tmp_path):
    """Five pictures (modes, sizes and aspects all different) with prompts in five languages, scored
    from their files in batches of 2, against 100 · max(cos, 0) of transformers' embeddings."""
    pictures = [picture("RGB", 96, 80, seed=0), picture("RGBA", 70, 120, seed=1), picture("L", 64, 64, seed=2),
                picture("RGB", 150, 90, seed=3), picture("P", 81, 67, seed=4)]
    files = [str(tmp_path / f"{i}.png") for i in range(len(pictures))]
    for image, file in zip(pictures, files):
        image.save(file)
    prompts = [PROMPTS["zh"][1], PROMPTS["ar"][0], PROMPTS["ru"][2], PROMPTS["ja"][3], PROMPTS["es"][0]]
    clip = load_clip(altclip_dir)
    got = clip.score(files, prompts, batch_size=2)

    input_ids, mask = Tokenizer(os.path.join(spm_dir, "sentencepiece.bpe.model"))(prompts)
    pixels = preprocess([Image.open(f) for f in files], clip.model.cfg.vision)
    with torch.no_grad():
        image = altclip_reference.get_image_features(pixel_values=pixels).pooler_output.double()
        text = altclip_reference.get_text_features(input_ids=input_ids, attention_mask=mask).pooler_output.double()
    cos = (image * text).sum(-1) / (image.norm(dim=-1) * text.norm(dim=-1))
    assert (cos > 0).all(), cos  # else clamped scores would hide a difference
    assert got.shape == (5,) and got.dtype == torch.float32 and got.device.type == "cpu"
    assert rel_err(got, 100 * cos) < 1e-5
    assert len(set(got.tolist())) == 5  # each pair its own score: nothing is shared or shifted across pairs
    # The same pictures as PIL images, or as a float tensor in [0, 1]: the same scores.
    assert torch.equal(clip.score([Image.open(f) for f in files], prompts, batch_size=2), got)
    as_tensor = torch.from_numpy(np.array(Image.open(files[0]))).permute(2, 0, 1)[None].float() / 255
    assert rel_diff(clip.score(torch.cat([as_tensor, as_tensor]), prompts[:1] * 2), got[:1].repeat(2)) < 1e-5


def test_an_altdiffusion_folder_is_not_a_clip_model(small_model_dir):
    with pytest.raises(BadFile, match="holds text_encoder and unet and vae, not altclip; pass an AltCLIP folder"):
        load_clip(small_model_dir)


def test_read_pairs_of_a_generate_outdir_and_of_its_manifest(generated, tmp_path, capsys):
    rows = [json.loads(line) for line in open(os.path.join(generated, "manifest.jsonl"), encoding="utf-8")]
    expected = [(os.path.join(generated, r["file"]), r["prompt"]) for r in rows]
    assert [p for _, p in expected] == [PROMPTS["zh"][3]] * 2 + [PROMPTS["fr"][3]] * 2
    assert read_pairs(generated) == read_pairs(os.path.join(generated, "manifest.jsonl")) == expected
    assert all(os.path.isfile(f) and os.path.isabs(f) for f, _ in expected)
    # A picture the safety checker replaced by its placeholder is left out, and said so.
    shutil.copytree(generated, tmp_path / "out")
    flagged = str(tmp_path / "out" / "flagged.jsonl")
    with open(flagged, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({**r, "flagged": k == 1}, ensure_ascii=False) + "\n" for k, r in enumerate(rows))
    assert read_pairs(flagged) == [(f.replace(generated, str(tmp_path / "out")), p) for f, p in expected[:1] + expected[2:]]
    assert "left out 1 picture(s) the safety checker replaced" in capsys.readouterr().err


@pytest.mark.parametrize("captions", ["jsonl", "txt"])
def test_read_pairs_of_a_captioned_folder(tmp_path, capsys, captions):
    folder = tmp_path / "data"
    texts = write_pictures(folder, 4, captions)
    picture("RGB", 40, 30).save(folder / "uncaptioned.png")
    if captions == "jsonl":  # several captions of one picture: a pair each
        with open(folder / "metadata.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"file_name": "extra.png", "text": ["un carré", "一个正方形"]}, ensure_ascii=False) + "\n")
        picture("RGB", 50, 70).save(folder / "extra.png")
    pairs = read_pairs(str(folder))
    expected = [(str(folder / f"{i:03}.png"), text) for i, text in enumerate(texts)]
    if captions == "jsonl":
        expected += [(str(folder / "extra.png"), "un carré"), (str(folder / "extra.png"), "一个正方形")]
    assert pairs == expected
    assert "image without a caption: uncaptioned.png" in capsys.readouterr().err


def test_the_csv_is_written_atomically_and_replaced_only_with_force(altclip_dir, tmp_path, monkeypatch):
    write_pictures(tmp_path / "data", 3)
    clip, out = load_clip(altclip_dir), tmp_path / "reports" / "scores.csv"  # its folder is made
    rows = score_pictures(str(tmp_path / "data"), clip, out=str(out), progress=False)
    expected = clip.score([r["file"] for r in rows], [r["prompt"] for r in rows])
    assert [r["clip_score"] for r in rows] == expected.tolist() and all(r["clip_score"] > 0 for r in rows)
    assert read_csv(out) == [{k: str(v) for k, v in r.items()} for r in rows]  # a float's str reads back the same
    assert sorted(os.listdir(out.parent)) == ["scores.csv"]  # no temporary file, no lock left behind

    out.write_text("mine")
    with pytest.raises(Exists, match="already exists; pass --force"):
        score_pictures(str(tmp_path / "data"), clip, out=str(out), progress=False)
    assert out.read_text() == "mine"

    def full_disk(self, rows):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(csv.DictWriter, "writerows", full_disk)
    with pytest.raises(BadFile, match="No space left on device"):
        score_pictures(str(tmp_path / "data"), clip, out=str(out), progress=False, force=True)
    assert out.read_text() == "mine" and sorted(os.listdir(out.parent)) == ["scores.csv"]
    monkeypatch.undo()
    score_pictures(str(tmp_path / "data"), clip, out=str(out), progress=False, force=True)
    assert read_csv(out) == [{k: str(v) for k, v in r.items()} for r in rows]


def test_the_command_line_end_to_end(generated, altclip_dir, tmp_path, capsys):
    out = tmp_path / "scores.csv"
    assert main(["score", generated, "--clip", altclip_dir, "--out", str(out), "--batch-size", "3", "--device", "cpu",
                 "--no-progress"]) == 0
    rows = read_csv(out)
    pairs = read_pairs(generated)
    assert [(r["file"], r["prompt"]) for r in rows] == pairs
    scores = load_clip(altclip_dir).score([f for f, _ in pairs], [p for _, p in pairs], batch_size=3)
    assert [float(r["clip_score"]) for r in rows] == scores.tolist()
    printed = capsys.readouterr().out.splitlines()
    assert printed == [str(out), f"4 pictures: mean CLIP score {np.mean(scores.numpy()):.2f} (std {np.std(scores.numpy()):.2f})"]
    assert main(["score", generated, "--clip", altclip_dir, "--device", "cpu", "--no-progress"]) == 0  # no --out: no file
    assert capsys.readouterr().out.startswith("4 pictures: mean CLIP score ")


@pytest.mark.parametrize("case, message", [
    ("altdiffusion", "holds text_encoder and unet and vae, not altclip; pass an AltCLIP folder"),
    ("no clip", "model folder not found"),
    ("no path", "pictures not found"),
    ("missing picture", "line 2: picture not found"),
    ("unreadable picture", "line 2: "),
    ("truncated picture", "line 2: "),
    ("bad line", "skipped 1 line(s) that are not generate's manifest lines (a write cut short, or an edit): line 1"),
    ("empty manifest", "names no picture to score"),
    ("empty folder", "no usable example"),
    ("out exists", "already exists; pass --force"),
    ("out is a folder", "is a folder; name the CSV file"),
    ("batch", "--batch-size must be an integer in [1, 4096]"),
    ("device", "is not a torch device"),
])
def test_bad_input_is_one_line_before_the_model_loads(generated, altclip_dir, small_model_dir, tmp_path, monkeypatch,
                                                      capsys, case, message):
    import altdiff_min.storage.folder

    monkeypatch.setattr(altdiff_min.storage.folder, "read_modules", lambda *a, **k: pytest.fail("the model was loaded"))
    path, clip, extra = generated, altclip_dir, []
    lines = open(os.path.join(generated, "manifest.jsonl"), encoding="utf-8").read().splitlines()
    manifest = tmp_path / "manifest.jsonl"
    if case == "altdiffusion":
        clip = small_model_dir
    elif case == "no clip":
        clip = str(tmp_path / "nowhere")
    elif case == "no path":
        path = str(tmp_path / "nowhere")
    elif case in ("unreadable picture", "truncated picture"):
        shutil.copytree(os.path.join(generated, "samples"), tmp_path / "samples")
        picture = tmp_path / json.loads(lines[1])["file"]
        picture.write_bytes(b"not a png" if case == "unreadable picture" else picture.read_bytes()[:200])
        manifest.write_text("\n".join(lines))
        path, message = str(manifest), f"line 2: {picture} is not a picture PIL can read"
    elif case in ("missing picture", "bad line", "empty manifest"):
        shutil.copytree(os.path.join(generated, "samples"), tmp_path / "samples")
        os.unlink(tmp_path / json.loads(lines[1])["file"])
        manifest.write_text({"missing picture": "\n".join(lines), "bad line": '{"prompt": "x"}', "empty manifest": "\n"}[case])
        path = str(manifest)
    elif case == "empty folder":
        path = str(tmp_path / "empty")
        os.mkdir(path)
    elif case == "out exists":
        (tmp_path / "s.csv").write_text("keep")
        extra = ["--out", str(tmp_path / "s.csv")]
    elif case == "out is a folder":
        extra = ["--out", str(tmp_path)]
    else:
        extra = {"batch": ["--batch-size", "0"], "device": ["--device", "gpu please"]}[case]
    assert main(["score", path, "--clip", clip, "--no-progress", *extra]) == 2
    err = capsys.readouterr().err
    # a line that is not generate's is skipped (and said), then nothing is left to score
    assert message in err and err.count("\n") == (2 if case == "bad line" else 1), err
    if case == "out exists":
        assert (tmp_path / "s.csv").read_text() == "keep"


def test_load_clip_is_exported_by_the_package_as_the_readme_shows():
    import altdiff_min
    from altdiff_min import load_clip as exported

    assert exported is load_clip and "load_clip" in altdiff_min.__all__
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        altdiff_min.nothing


def test_pictures_with_several_captions_are_counted_as_pairs_of_pictures(tmp_path, monkeypatch):
    """31 pictures, one of them with 31 captions: 61 pairs are scored, of 31 pictures, and the progress
    bar counts pairs."""
    import altdiff_min.vision.score as score
    from altdiff_min.vision.score import Scorer, summary

    folder = tmp_path / "data"
    write_pictures(folder, 30, "jsonl", sizes=((16, 16),))
    picture("RGB", 16, 16).save(folder / "many.png")
    with open(folder / "metadata.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"file_name": "many.png", "text": [f"caption {i}" for i in range(31)]}) + "\n")
    pairs = read_pairs(str(folder))
    assert len(pairs) == 61 and len({p for p, _ in pairs}) == 31
    monkeypatch.setattr(score, "clip_score", lambda model, tok, batch, prompts: torch.full((len(batch),), 20.0))
    bars = []
    import tqdm

    real = tqdm.tqdm
    monkeypatch.setattr(tqdm, "tqdm", lambda **k: bars.append(k) or real(**{**k, "disable": True}))
    scores = Scorer(None, None, "").score([p for p, _ in pairs], [t for _, t in pairs], batch_size=16)
    assert bars[0]["unit"] == "pair" and bars[0]["total"] == 61
    rows = [{"file": p, "prompt": t, "clip_score": s} for (p, t), s in zip(pairs, scores.tolist())]
    assert summary(rows) == "61 pairs of 31 pictures: mean CLIP score 20.00 (std 0.00)"
    assert summary(rows[:30]) == "30 pictures: mean CLIP score 20.00 (std 0.00)"  # one caption each: pictures
