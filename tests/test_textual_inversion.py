"""Textual inversion: added tokens and rows (altdiff_min/research/textual_inversion.py) and their files
(weights_convert/embeddings.py) against diffusers' load_textual_inversion on its AltDiffusionPipeline
(transformers 5's XLMRobertaTokenizer): the same ids, the same text-encoder output, the same picture."""
import copy
import os

import pytest
import torch
from helpers import diffusers_pipeline, rel_err
from safetensors.torch import load_file, save_file

from altdiff_min.errors import BadFile, BadValue, NotFinite
from altdiff_min.pipeline import load
from altdiff_min.research.textual_inversion import (
    AddedRows,
    WordTokenizer,
    add_words,
    init_rows,
    learned,
)
from weights_convert.embeddings import read_embeddings, write_embeddings

# The token in several places and languages, beside punctuation, inside words, twice, at the ends;
# "<ring>_1" and "<star>" are the second vector and the second file.
PROMPTS = ["a photo of <ring> on a table", "<ring>", "un <ring>, rouge<ring>rouge", "一个<ring>在桌子上",
           "красный <ring>  и <star>", "赤い<ring>と<star>、写真", " <ring> <ring> ", "<star>\t<ring>\nb",
           "una acuarela de <ring> al atardecer", "no token at all"]


@pytest.fixture(scope="module")
def files(tmp_path_factory, reference):
    """Two diffusers-form files: <ring> with 3 vectors ((n, D), as diffusers' script saves them) and
    <star> with one (D,)."""
    width = reference["text_encoder"].config.hidden_size
    g = torch.Generator().manual_seed(5)
    folder = tmp_path_factory.mktemp("embeds")
    save_file({"<ring>": torch.randn(3, width, generator=g)}, folder / "ring.safetensors", metadata={"format": "pt"})
    save_file({"<star>": torch.randn(width, generator=g)}, folder / "star.safetensors", metadata={"format": "pt"})
    return str(folder / "ring.safetensors"), str(folder / "star.safetensors")


@pytest.fixture(scope="module")
def pipes(small_model_dir, hub_layout, reference, files):
    """diffusers' pipeline (its own copy of the text encoder: loading resizes the table) and ours, each
    with both files loaded."""
    pipe = diffusers_pipeline(hub_layout, {**reference, "text_encoder": copy.deepcopy(reference["text_encoder"])}, "ddim")
    ours = load(small_model_dir)
    for path in files:
        pipe.load_textual_inversion(path)
        add_words(ours, read_embeddings(path))
    return pipe, ours


def test_same_ids_as_diffusers(pipes):
    pipe, ours = pipes
    assert ours.tokenizer.added == {t: pipe.tokenizer.convert_tokens_to_ids(t) for t in ("<ring>", "<ring>_1", "<ring>_2", "<star>")}
    assert min(ours.tokenizer.added.values()) == ours.tokenizer.vocab_size == len(pipe.tokenizer) - 4  # V + k
    for prompt in PROMPTS:
        converted = pipe.maybe_convert_prompt(prompt, pipe.tokenizer)
        expected = pipe.tokenizer(converted, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        ids, mask = ours.tokenizer(prompt)
        assert ids.tolist() == expected.input_ids.tolist(), prompt
        assert mask.tolist() == expected.attention_mask.tolist(), prompt
    ids = ours.tokenizer("a photo of <ring>")[0][0].tolist()
    assert [ours.tokenizer.added[t] for t in ("<ring>", "<ring>_1", "<ring>_2")] == ids[ids.index(ours.tokenizer.added["<ring>"]):][:3]


def test_same_text_encoder_output_and_rows_as_diffusers(pipes):
    pipe, ours = pipes
    table = pipe.text_encoder.get_input_embeddings().weight
    assert torch.equal(ours.text_encoder.token_embedding.weight, table)  # the rows, appended in the same order
    prompts = [pipe.maybe_convert_prompt(p, pipe.tokenizer) for p in PROMPTS[:6]]
    batch = pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        expected = pipe.text_encoder(batch.input_ids, attention_mask=batch.attention_mask)[0]
    assert rel_err(ours.encode(PROMPTS[:6]), expected) < 1e-5


def test_same_picture_as_diffusers(pipes):
    pipe, ours = pipes
    pipe.set_progress_bar_config(disable=True)
    prompt, negative = "un <ring> sobre <star>", "<star>, 模糊"
    with torch.no_grad():
        expected = pipe(prompt, negative_prompt=negative, num_images_per_prompt=2, num_inference_steps=4, height=64,
                        width=96, output_type="pt", generator=torch.Generator("cpu").manual_seed(7)).images
    got = ours.generate(prompt, negative_prompt=negative, n_samples=2, steps=4, height=64, width=96, seed=7,
                        output="tensor", progress=False)
    assert rel_err(got, expected) < 1e-4
    plain = ours.generate("un sobre", negative_prompt=negative, n_samples=2, steps=4, height=64, width=96, seed=7,
                          output="tensor", progress=False)
    assert (got - plain).abs().mean() > 1e-3  # the new words change the picture


def test_adding_leaves_the_table_and_the_old_tokenizer_alone(small_model_dir, files):
    model = load(small_model_dir)
    before, tokenizer = model.text_encoder.token_embedding.weight.clone(), model.tokenizer
    add_words(model, read_embeddings(files[1]))
    assert isinstance(model.tokenizer, WordTokenizer) and isinstance(model.text_encoder.token_embedding, AddedRows)
    assert torch.equal(model.text_encoder.token_embedding.table.weight, before)
    assert tokenizer.engine.token_to_id("<star>") is None  # the model's tokenizer was copied, not changed
    assert model.tokenizer("a cat")[0].tolist() == tokenizer("a cat")[0].tolist()


@pytest.mark.parametrize("words,error,match", [
    ({"a": torch.ones(32)}, BadValue, "already exists"),  # a piece of the vocabulary
    ({"<s>": torch.ones(32)}, BadValue, "already exists"),
    ({"<star>": torch.ones(32)}, BadValue, "already exists"),  # added before
    ({"<new>": torch.ones(2, 32), "<new>_1": torch.ones(32)}, BadValue, "given twice"),
    ({"  ": torch.ones(32)}, BadValue, "non-blank"),
    ({"": torch.ones(32)}, BadValue, "non-blank"),
    ({"＜new＞": torch.ones(32)}, BadValue, "normal form; write it '<new>'"),
    ({"<new>": torch.ones(31)}, BadValue, "31 wide; this text encoder's tokens are 32"),
    ({"<new>": torch.ones(2, 2, 32)}, BadValue, r"\(D,\) or \(n, D\)"),
    ({"<new>": torch.full((32,), float("nan"))}, NotFinite, "NaN"),
    ({"<ok>": torch.ones(32), "<bad>": torch.ones(16)}, BadValue, "16 wide"),  # nothing added, not even <ok>
])
def test_bad_words_refused_before_any_change(small_model_dir, files, words, error, match):
    model = load(small_model_dir)
    add_words(model, read_embeddings(files[1]))
    tokenizer, rows = model.tokenizer, model.text_encoder.token_embedding.rows
    with pytest.raises(error, match=match):
        add_words(model, words)
    assert model.tokenizer is tokenizer and model.text_encoder.token_embedding.rows is rows
    assert model.tokenizer.engine.token_to_id("<ok>") is None


def test_init_words(small_model_dir):
    model = load(small_model_dir)
    word = next(w for w in ("circle", "red", "a") if len(model.tokenizer.encode(w)) == 3)
    rows = init_rows(model, ("<ring>", "<ball>"), (word,))
    assert torch.equal(rows["<ring>"][0], model.text_encoder.token_embedding.weight[model.tokenizer.encode(word)[1]])
    with pytest.raises(BadValue, match=r"the init word 'lighthouse' is \d+ tokens \(.*\), not one"):
        init_rows(model, ("<ring>",), ("lighthouse",))
    with pytest.raises(BadValue, match="one per --new-token"):
        init_rows(model, ("<ring>", "<ball>", "<cube>"), (word, word))


def test_files_round_trip_and_the_web_ui_forms(tmp_path, small_model_dir, files):
    model = load(small_model_dir)
    words = read_embeddings(files[0])
    add_words(model, {**words, **read_embeddings(files[1])})
    out = str(tmp_path / "learned_embeds.safetensors")
    write_embeddings(out, learned(model, ("<ring>",)))
    saved = load_file(out)
    assert list(saved) == ["<ring>"] and torch.equal(saved["<ring>"], words["<ring>"])  # (n, D) as diffusers' script
    row = torch.randn(2, 32)
    save_file({"emb_params": row}, tmp_path / "pretty-style.safetensors")
    torch.save({"string_to_param": {"*": row}, "name": "kitsch", "step": 3}, tmp_path / "web.pt")
    torch.save(row, tmp_path / "bare.bin")
    assert list(read_embeddings(str(tmp_path / "pretty-style.safetensors"))) == ["pretty-style"]
    assert torch.equal(read_embeddings(str(tmp_path / "web.pt"))["kitsch"], row)
    assert list(read_embeddings(str(tmp_path / "web.pt"), "<k>")) == ["<k>"]
    assert torch.equal(read_embeddings(str(tmp_path / "bare.bin"), "<b>")["<b>"], row)
    with pytest.raises(BadFile, match="bare tensor; name its token"):
        read_embeddings(str(tmp_path / "bare.bin"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a file of tensors")
    with pytest.raises(BadFile, match="neither a safetensors nor"):
        read_embeddings(str(tmp_path / "junk.safetensors"))
    with pytest.raises(BadFile, match="not found"):
        read_embeddings(str(tmp_path / "missing.safetensors"))


# ---- generate --embedding ----------------------------------------------------------------------------------------

def test_generate_with_embeddings_is_the_python_picture_recorded_and_replayed(small_model_dir, files, tmp_path, capsys):
    """--embedding FILE (twice, one renamed with FILE:TOKEN) gives the picture of add_words + model.generate;
    the manifest and the PNG record each file (path, SHA-256, token given, tokens added); --replay
    PICTURE.png makes the same bytes, and refuses once a file changed."""
    import json
    import shutil

    import numpy as np
    from PIL import Image

    from altdiff_min.apps.cli import main
    from altdiff_min.apps.generate import file_digest
    from altdiff_min.storage.provenance import record_of_png

    ring, star = tmp_path / "ring.safetensors", tmp_path / "star.safetensors"
    shutil.copy(files[0], ring), shutil.copy(files[1], star)
    prompt = "un <ring> sobre <sun>"
    common = [prompt, "--model", small_model_dir, "--n-samples", "1", "--steps", "3", "--H", "64", "--W", "64", "--seed", "5",
              "--skip-grid", "--device", "cpu", "--embedding", str(ring), "--embedding", f"{star}:<sun>"]
    assert main(["generate", *common, "--outdir", str(tmp_path / "a")]) == 0
    row = json.loads((tmp_path / "a" / "manifest.jsonl").read_text())
    picture = tmp_path / "a" / row["file"]
    model = load(small_model_dir)
    add_words(model, {**read_embeddings(str(ring)), **read_embeddings(str(star), "<sun>")})
    expected = np.asarray(model.generate(prompt, n_samples=1, steps=3, height=64, width=64, seed=5, progress=False)[0])
    assert np.array_equal(np.asarray(Image.open(picture)), expected)
    assert row["embeddings"] == [
        {"path": str(ring), "sha256": file_digest(str(ring), "x"), "token": None, "tokens": ["<ring>"]},
        {"path": str(star), "sha256": file_digest(str(star), "x"), "token": "<sun>", "tokens": ["<sun>"]}]
    assert record_of_png(str(picture))["embeddings"] == row["embeddings"]
    assert main(["generate", "--replay", str(picture), "--outdir", str(tmp_path / "again"), "--device", "cpu"]) == 0
    again = json.loads((tmp_path / "again" / "manifest.jsonl").read_text())
    assert again["embeddings"] == row["embeddings"]
    assert (tmp_path / "again" / again["file"]).read_bytes() == picture.read_bytes()
    with open(star, "ab") as f:
        f.write(b" ")
    capsys.readouterr()
    assert main(["generate", "--replay", str(picture), "--outdir", str(tmp_path / "x"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"--replay: {star} has changed since the picture was made" in err and err.count("\n") == 1


@pytest.mark.parametrize("extra,message,loads", [
    (["--embedding", "nowhere.safetensors"], "--embedding: embedding file not found: nowhere.safetensors", False),
    (["--embedding", "JUNK"], "neither a safetensors nor", False),
    (["--embedding", "WIDE"], "this model's tokens are 32 wide", False),
    (["--embedding", "NAN"], "holds NaN or infinity", False),
    (["--embedding", "RING", "--embedding", "RING"], "the token '<ring>' is in both", False),
    (["--embedding", "RING:a"], "--embedding: the token 'a' already exists", True),  # the tokenizer says so
])
def test_bad_embeddings_are_refused_before_generating(small_model_dir, files, tmp_path, monkeypatch, capsys, extra,
                                                      message, loads):
    import altdiff_min.pipeline
    from altdiff_min.apps.cli import main
    from altdiff_min.pipeline import AltDiffusion

    (tmp_path / "JUNK").write_text("hello")
    save_file({"<w>": torch.ones(2, 31)}, str(tmp_path / "WIDE"))
    save_file({"<n>": torch.full((32,), float("nan"))}, str(tmp_path / "NAN"))
    extra = [str(tmp_path / e) if e in ("JUNK", "WIDE", "NAN") else e.replace("RING", files[0]) for e in extra]
    if not loads:
        monkeypatch.setattr(altdiff_min.pipeline, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setattr(AltDiffusion, "generate", lambda *a, **k: pytest.fail("a picture was made"))
    assert main(["generate", "x", "--model", small_model_dir, "--outdir", str(tmp_path / "o"), "--device", "cpu", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not os.path.exists(tmp_path / "o" / "manifest.jsonl")


# ---- train --train embeddings ------------------------------------------------------------------------------------

CAPTIONS = ["a photo of <ring>", "un <ring> rouge", "一个<ring>在桌子上", "красный <ring>", "赤い<ring>と<ball>", "un perro"]


@pytest.fixture(scope="module")
def ring_pictures(tmp_path_factory) -> str:
    """Six random pictures captioned with the new words, in several languages (one without)."""
    import json

    from helpers import write_pictures

    folder = tmp_path_factory.mktemp("data") / "rings"
    write_pictures(folder, len(CAPTIONS))
    rows = [json.dumps({"file_name": f"{i:03}.png", "text": c}, ensure_ascii=False) for i, c in enumerate(CAPTIONS)]
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return str(folder)


def one_token_word(model_dir: str) -> str:
    from altdiff_min.model.tokenizer import Tokenizer

    tokenizer = Tokenizer(os.path.join(model_dir, "sentencepiece.bpe.model"))
    return next(w for w in ("circle", "red", "dog", "a") if len(tokenizer.encode(w)) == 3)


def test_only_the_new_rows_train(small_model_dir, ring_pictures):
    """--train embeddings through train(): the new rows move, every other weight (the token table's other
    rows included) stays bit for bit; the optimizer holds the new rows alone."""
    from altdiff_min.training import words
    from altdiff_min.training.config import TrainConfig
    from altdiff_min.training.dataset import open_data
    from altdiff_min.training.train import train

    model = load(small_model_dir)
    before = {f"{n}.{k}": v.clone() for n in ("text_encoder", "unet", "vae") for k, v in getattr(model, n).state_dict().items()}
    cfg = TrainConfig(train="embeddings", new_tokens=("<ring>", "<ball>"), init_words=(one_token_word(small_model_dir),),
                      max_steps=3, batch_size=2, lr=1e-2)
    words.start(model, cfg)
    start = learned(model)
    losses = train(model, open_data(ring_pictures, 32), cfg, progress=False)
    assert len(losses) == 3
    after = {f"{n}.{k}": v for n in ("text_encoder", "unet", "vae") for k, v in getattr(model, n).state_dict().items()}
    renamed = {k.replace("token_embedding.weight", "token_embedding.table.weight"): v for k, v in before.items()}
    assert set(after) == set(renamed) | {"text_encoder.token_embedding.rows"}
    assert all(torch.equal(after[k], v) for k, v in renamed.items())
    assert all(not torch.equal(learned(model)[t], start[t]) for t in ("<ring>", "<ball>"))


def test_train_embeddings_cli_writes_diffusers_file_and_resumes_to_the_same_bits(small_model_dir, ring_pictures, tmp_path):
    """`altdiff-min train … --train embeddings`: OUT_DIR/learned_embeds.safetensors ({token: (1, D)},
    diffusers' script's form, no model folder), loadable by generate; a killed run resumes to the same bits."""
    import signal
    import subprocess
    import sys

    from test_train import ENV, KILLER, cli

    args = [small_model_dir, ring_pictures, "--train", "embeddings", "--new-token", "<ring>", "--new-token", "<ball>",
            "--init-word", one_token_word(small_model_dir), "--max-steps", "4", "--save-every", "2", "--batch-size", "2",
            "--lr", "1e-2", "--ema", "0.5", "--no-progress"]
    cli(*args, tmp_path / "whole")
    assert sorted(os.listdir(tmp_path / "whole")) == ["checkpoint.pt", "learned_embeds.safetensors", "loss.jsonl",
                                                      "loss.png", "run.json"]
    whole = load_file(tmp_path / "whole" / "learned_embeds.safetensors")
    assert sorted(whole) == ["<ball>", "<ring>"] and whole["<ring>"].shape == (1, 32) and whole["<ring>"].dtype == torch.float32
    killed = subprocess.run([sys.executable, "-c", KILLER, "after-step", "3", *args, str(tmp_path / "run")],
                            env=ENV, capture_output=True, text=True, timeout=600, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    cli(*args, tmp_path / "run", "--resume")
    resumed = load_file(tmp_path / "run" / "learned_embeds.safetensors")
    assert all(torch.equal(resumed[t], whole[t]) for t in whole)
    model = load(small_model_dir)
    add_words(model, read_embeddings(str(tmp_path / "whole" / "learned_embeds.safetensors")))
    assert model.generate("un <ring> y <ball>", steps=2, height=64, width=64, output="tensor", progress=False).isfinite().all()


def test_new_words_and_a_lora_train_together_and_resume_to_the_same_bits(small_model_dir, ring_pictures, tmp_path):
    """`--train embeddings --lora R` (pivotal tuning): the new rows and the UNet's LoRA train in one
    optimizer, every base weight keeps its bits, the run leaves learned_embeds.safetensors and the LoRA
    file, its checkpoint holds the rows and the LoRA alone, and a killed run resumes to the same bits."""
    import signal
    import subprocess
    import sys

    from test_train import ENV, KILLER, cli

    from weights_convert.lora import FILE

    args = [small_model_dir, ring_pictures, "--train", "embeddings", "--new-token", "<ring>", "--init-word",
            one_token_word(small_model_dir), "--lora", "2", "--max-steps", "4", "--save-every", "2", "--batch-size", "2",
            "--lr", "1e-2", "--no-progress"]
    cli(*args, tmp_path / "whole")
    whole = tmp_path / "whole"
    assert {"learned_embeds.safetensors", "lora", "checkpoint.pt"} <= set(os.listdir(whole)) and "model" not in os.listdir(whole)
    checkpoint = torch.load(whole / "checkpoint.pt", weights_only=True)
    assert list(checkpoint["modules"]["text_encoder"]) == ["token_embedding.rows"]
    assert checkpoint["modules"]["unet"] and all(".lora_" in k for k in checkpoint["modules"]["unet"])
    killed = subprocess.run([sys.executable, "-c", KILLER, "after-step", "3", *args, str(tmp_path / "run")],
                            env=ENV, capture_output=True, text=True, timeout=600, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    cli(*args, tmp_path / "run", "--resume")
    for name in ("learned_embeds.safetensors", os.path.join("lora", FILE)):
        a, b = load_file(whole / name), load_file(tmp_path / "run" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    base, tuned = load(small_model_dir), load(small_model_dir, lora=[str(whole / "lora" / FILE)])
    add_words(tuned, read_embeddings(str(whole / "learned_embeds.safetensors")))
    kept = {k.replace(".base.", "."): v for k, v in tuned.unet.state_dict().items() if ".adapters." not in k}
    assert kept.keys() == base.unet.state_dict().keys()
    assert all(torch.equal(kept[k], v) for k, v in base.unet.state_dict().items())  # the base keeps its bits
    assert tuned.generate("un <ring>", steps=2, height=64, width=64, output="tensor", progress=False).isfinite().all()


def test_train_embeddings_under_torchrun_does_the_sums_of_one_process(small_model_dir, ring_pictures, tmp_path):
    from test_train import cli

    common = [small_model_dir, ring_pictures, "--train", "embeddings", "--new-token", "<ring>", "--init-word",
              one_token_word(small_model_dir), "--max-steps", "3", "--lr", "1e-2", "--no-progress"]
    cli(*common, tmp_path / "one", "--batch-size", "2")
    cli(*common, tmp_path / "two", "--batch-size", "1", torchrun=2)
    one, two = (load_file(tmp_path / n / "learned_embeds.safetensors")["<ring>"] for n in ("one", "two"))
    assert rel_err(two, one) < 1e-5


@pytest.mark.parametrize("extra,message", [
    (["--new-token", "<ring>", "--init-word", "WORD"], "--train embeddings takes --new-token"),  # without --train embeddings
    (["--train", "embeddings", "--init-word", "WORD"], "--train embeddings takes --new-token"),
    (["--train", "embeddings", "--new-token", "<ring>"], "--train embeddings takes --new-token"),
    (["--train", "embeddings", "--new-token", "a", "--init-word", "WORD"], "the token 'a' already exists"),
    (["--train", "embeddings", "--new-token", " ", "--init-word", "WORD"], "non-blank"),
    (["--train", "embeddings", "--new-token", "<ring>", "--init-word", "lighthouse"], "the init word 'lighthouse' is"),
    (["--train", "embeddings", "--new-token", "<ring>", "--new-token", "<x>", "--new-token", "<y>", "--init-word", "WORD",
      "--init-word", "WORD"], "one per --new-token (3), not 2"),
    (["--train", "embeddings", "--new-token", "<cube>", "--init-word", "WORD"], "no caption of the data holds '<cube>'"),
])
def test_bad_new_words_are_refused_before_the_run_folder(small_model_dir, ring_pictures, tmp_path, monkeypatch, capsys,
                                                         extra, message):
    import altdiff_min.pipeline
    from altdiff_min.apps.cli import main

    monkeypatch.setattr(altdiff_min.pipeline, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    extra = [one_token_word(small_model_dir) if e == "WORD" else e for e in extra]
    assert main(["train", small_model_dir, ring_pictures, str(tmp_path / "out"), "--max-steps", "1", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_a_model_with_added_words_is_not_saved_as_a_model_folder(small_model_dir, files, tmp_path):
    model = load(small_model_dir)
    add_words(model, read_embeddings(files[1]))
    with pytest.raises(BadValue, match="holds added tokens"):
        model.save(str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_an_embeddings_file_has_the_permissions_the_umask_gives(tmp_path):
    """safetensors writes 0600; the file is the user's ordinary file, as model folders, LoRA files and exports."""
    old = os.umask(0o022)
    try:
        write_embeddings(str(tmp_path / "learned_embeds.safetensors"), {"<ring>": torch.randn(2, 8)})
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "learned_embeds.safetensors").st_mode & 0o777 == 0o644
