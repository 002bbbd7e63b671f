"""LoRA training (`altdiff-min train … --lora R`): only the LoRA trains (its count is the formula's, the
base weights keep every bit), the run leaves a diffusers/peft file that diffusers' load_lora_weights
and ours load to the same UNet output, two gloo processes do the sums of one, a killed run resumes
to the same bits, and bad settings are one line before any work."""
import copy
import json
import os
import subprocess
import sys

from types import SimpleNamespace

import pytest
import torch
from helpers import M9_UNET, UNET, rel_diff, rel_err, write_pictures
from safetensors import safe_open
from safetensors.torch import load_file

from altdiff_min.model.unet import UNet, UNetConfig
from altdiff_min.pipeline import load
from altdiff_min.research.lora import lora_layers, lora_parameters, lora_state_dict
from altdiff_min.training import lora as lora_training
from altdiff_min.training.config import TrainConfig
from altdiff_min.training.train import generator
from weights_convert import lora as lora_files

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}  # one thread per process: two processes on two cores
STEPS = ["--max-steps", "4", "--lr", "1e-2", "--no-progress", "--lora", "2"]


def count_formula(config: dict, r: int) -> int:
    """LoRA numbers on diffusers' SD targets: r · (in + out) of each projection. A transformer block of
    width C with cross-attention dimension D has self q, k, v, out (C → C), cross q and out (C → C) and
    cross k, v (D → C): r · (14 C + 2 D). Blocks: `layers_per_block` per attention level down, one more
    per level up, one in the middle."""
    channels, layers, d = config["block_out_channels"], config["layers_per_block"], config["cross_attention_dim"]
    block = lambda c: 14 * c + 2 * d
    down = sum(layers * block(c) for c, kind in zip(channels, config["down_block_types"]) if kind.startswith("CrossAttn"))
    up = sum((layers + 1) * block(c) for c, kind in zip(reversed(channels), config["up_block_types"])
             if kind.startswith("CrossAttn"))
    return r * (down + block(channels[-1]) + up)


def test_the_formula_is_m9s_199296_per_rank():
    assert count_formula(M9_UNET, 1) == 199_296


@pytest.mark.parametrize("r", [1, 4])
def test_training_attaches_exactly_the_formulas_parameters_to_m9(r):
    """training/lora.attach on m9's UNet (meta device: shapes only): the parameters it returns (what the
    optimizer gets) are every parameter that requires grad, and there are 199,296 · r of them."""
    with torch.device("meta"):
        unet = UNet(UNetConfig())
    params = lora_training.attach(SimpleNamespace(unet=unet), TrainConfig(lora=r), lambda m, k: generator(0, 2 + m, k))
    assert sum(p.numel() for p in params) == 199_296 * r
    assert {id(p) for p in params} == {id(p) for p in unet.parameters() if p.requires_grad}


@pytest.mark.parametrize("r", [1, 4])
def test_both_modules_take_their_recipes_loras_on_m9(r):
    """--train both --lora r: the UNet's 199,296 · r, and the text encoder's every self-attention q, k, v, out
    (1024 → 1024 each, 24 layers: 24 · 4 · r · 2048 = 196,608 · r, diffusers' --train_text_encoder recipe);
    only they require grad, each module's A drawn from its own stream."""
    from altdiff_min.model.text_encoder import TextEncoder, TextEncoderConfig

    with torch.device("meta"):
        model = SimpleNamespace(unet=UNet(UNetConfig()), text_encoder=TextEncoder(TextEncoderConfig()))
    drawn = []
    params = lora_training.attach(model, TrainConfig(train="both", lora=r), lambda m, k: drawn.append(m) or generator(0, 2 + m, k))
    assert sum(p.numel() for p in params) == (199_296 + 196_608) * r
    trainable = [p for module in (model.unet, model.text_encoder) for p in module.parameters() if p.requires_grad]
    assert {id(p) for p in params} == {id(p) for p in trainable}
    assert sorted(set(drawn)) == [0, 1] and len(lora_layers(model.text_encoder)) == 24 * 4


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("data") / "pictures"
    write_pictures(folder, 12)
    return str(folder)


def cli(*args, torchrun: int = 0, check: bool = True) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}", "-m"] \
        if torchrun else [sys.executable, "-m"]
    done = subprocess.run([*launcher, "altdiff_min", "train", *map(str, args)], env=ENV, capture_output=True, text=True,
                          timeout=600, check=False)
    assert not check or done.returncode == 0, done.stderr[-3000:]
    return done


def lora_file(run) -> str:
    return os.path.join(run, "lora", lora_files.FILE)


def test_only_the_lora_trains_and_the_base_keeps_every_bit(small_model_dir, pictures):
    """In process: the optimizer's parameters are the LoRA's, as many as the formula says for the small
    UNet; after training every base tensor (UNet, text encoder, VAE) is bit-identical, every lora_B moved."""
    from altdiff_min.training.dataset import open_data
    from altdiff_min.training.train import train

    model = load(small_model_dir)
    before = {name: {k: v.clone() for k, v in getattr(model, name).state_dict().items()}
              for name in ("text_encoder", "unet", "vae")}
    cfg = TrainConfig(max_steps=3, batch_size=2, lr=1e-3, lora=3, lora_alpha=6, ema=0.5)
    losses = train(model, open_data(pictures, 32), cfg, progress=False)
    assert len(losses) == 3
    layers = lora_layers(model.unet)
    assert len(layers) == 8 * 11 and {(m.r, m.alpha) for m in layers.values()} == {(3, 6.0)}
    assert sum(p.numel() for p in lora_parameters(model.unet)) == count_formula(UNET, 3) == 3 * 8320
    after = {k.replace(".base.", "."): v for k, v in model.unet.state_dict().items() if ".lora_" not in k}
    assert after.keys() == before["unet"].keys() and all(torch.equal(after[k], v) for k, v in before["unet"].items())
    for name in ("text_encoder", "vae"):
        assert all(torch.equal(getattr(model, name).state_dict()[k], v) for k, v in before[name].items())
    assert all(m.lora_B.weight.abs().sum() > 0 for m in layers.values())  # B starts at 0: each one trained
    assert not any(p.requires_grad for p in model.unet.parameters()) and not model.unet.training


@pytest.fixture(scope="module")
def lora_run(small_model_dir, pictures, tmp_path_factory) -> str:
    """A LoRA run of 4 steps (batch 2, EMA, samples at 0, 2, 4)."""
    out = tmp_path_factory.mktemp("lora") / "run"
    cli(small_model_dir, pictures, *STEPS, out, "--batch-size", "2", "--save-every", "2", "--ema", "0.5",
        "--sample-every", "2", "--sample-steps", "2", "--sample-prompt", "un cercle rouge")
    return str(out)


def test_a_lora_run_leaves_a_small_file_and_a_lora_only_checkpoint(lora_run, small_model_dir):
    assert sorted(os.listdir(lora_run)) == ["checkpoint.pt", "lora", "loss.jsonl", "loss.png", "run.json", "samples"]
    tensors = load_file(lora_file(lora_run))
    assert sum(t.numel() for t in tensors.values()) == count_formula(UNET, 2)
    assert all(k.startswith("unet.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in tensors)
    checkpoint = torch.load(os.path.join(lora_run, "checkpoint.pt"), weights_only=True)
    modules = checkpoint["modules"]
    assert list(modules) == ["unet"] and all(".lora_A." in k or ".lora_B." in k for k in modules["unet"])
    assert sum(t.numel() for t in modules["unet"].values()) == count_formula(UNET, 2)
    state = checkpoint["optimizer"]["state"]  # AdamW's moments: for the LoRA alone
    assert len(state) == len(modules["unet"]) and sum(s["exp_avg"].numel() for s in state.values()) == count_formula(UNET, 2)
    assert sum(t.numel() for t in checkpoint["ema"]) == count_formula(UNET, 2)
    with safe_open(lora_file(lora_run), "pt") as f:  # the file names its base model, as run.json does
        made = json.loads(f.metadata()[lora_files.RECORD_KEY])["train"]
    with open(os.path.join(lora_run, "run.json")) as f:
        run = json.load(f)
    assert made["base"] == run["model"] and made["base"]["path"] == small_model_dir and made["weights"] == "ema"
    assert run["config"]["lora"] == 2 and run["config"]["lora_targets"] == list(TrainConfig().lora_targets)
    mode = lambda name: os.stat(os.path.join(lora_run, name)).st_mode & 0o777
    assert mode(os.path.join("lora", lora_files.FILE)) == mode("run.json")  # not safetensors' own 0600


def test_samples_are_drawn_with_the_lora(lora_run, small_model_dir):
    """The last sample is the base model with the run's LoRA (its EMA weights, which the file holds),
    the first the base alone; the picture's record names the LoRA."""
    import numpy as np
    from PIL import Image

    model = load(small_model_dir)
    pixels = lambda image: np.asarray(image.convert("RGB"), dtype=np.float64)
    plain = pixels(model.generate("un cercle rouge", steps=2, seed=0, progress=False)[0])
    lora_files.load_lora(model.unet, lora_file(lora_run))
    drawn = pixels(model.generate("un cercle rouge", steps=2, seed=0, progress=False)[0])
    first, saved = (Image.open(os.path.join(lora_run, "samples", f"step-000000{s}-0.png")) for s in (0, 4))
    difference = lambda a, b: np.abs(pixels(a) - b).mean()  # mean |Δ| of 0–255 values
    assert difference(saved, drawn) < 0.1 * difference(saved, plain) and difference(first, plain) < 0.1 * difference(saved, plain)
    record = json.loads(saved.text["altdiff-min"])
    assert record["training"]["lora"] == {"r": 2, "alpha": 2.0, "targets": list(TrainConfig().lora_targets)}


def test_the_file_gives_diffusers_and_ours_the_same_unet_output(lora_run, small_model_dir, reference, hub_layout):
    """The trained file, loaded by diffusers' AltDiffusionPipeline.load_lora_weights (peft) onto the
    reference UNet and by weights_convert.lora.load_lora onto ours: the same output (fp32, 1e-5)."""
    from diffusers import DDIMScheduler
    from diffusers.pipelines.deprecated.alt_diffusion import AltDiffusionPipeline
    from helpers import SCHEDULER
    from transformers import XLMRobertaTokenizer

    pipe = AltDiffusionPipeline(vae=reference["vae"], text_encoder=reference["text_encoder"],
                                tokenizer=XLMRobertaTokenizer.from_pretrained(os.path.join(hub_layout, "tokenizer")),
                                unet=copy.deepcopy(reference["unet"]), scheduler=DDIMScheduler.from_config(SCHEDULER),
                                safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.load_lora_weights(os.path.join(lora_run, "lora"), weight_name=lora_files.FILE)
    ref = pipe.unet
    ours = load(small_model_dir).unet
    lora_files.load_lora(ours, lora_file(lora_run))
    g = torch.Generator().manual_seed(1)
    x, t, context = torch.randn(2, 4, 16, 24, generator=g), torch.tensor([999, 7]), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        expected, plain = ref(x, t, encoder_hidden_states=context).sample, reference["unet"](x, t, encoder_hidden_states=context).sample
        assert rel_diff(expected, plain) > 1e-3  # the trained LoRA changes the output: the comparison means something
        assert rel_err(ours(x, t, context), expected) <= 1e-5


def test_two_processes_and_accumulation_do_the_sums_of_one_batch(small_model_dir, pictures, tmp_path):
    """torchrun --nproc_per_node 2 (gloo) with batch 1, and one process accumulating 2 × batch 1, end
    where one process with batch 2 ends: the same LoRA file, the same losses. (DDP registers only the
    parameters that require grad: the LoRA's.)"""
    common = [small_model_dir, pictures, *STEPS]
    cli(*common, tmp_path / "one", "--batch-size", "2")
    cli(*common, tmp_path / "two", "--batch-size", "1", torchrun=2)
    cli(*common, tmp_path / "accum", "--batch-size", "1", "--grad-accum", "2")
    one, two, accum = (load_file(lora_file(tmp_path / name)) for name in ("one", "two", "accum"))
    assert all(one[k].abs().sum() > 0 for k in one)  # every lora_B moved off its zeros
    # DDP averages the two gradients, (g1 + g2)/2; accumulation sums g1/2 + g2/2: halving is exact in
    # binary, so the two runs agree bit for bit, and a process that missed the other's gradient would not.
    assert two.keys() == accum.keys() == one.keys() and all(torch.equal(two[k], accum[k]) for k in one)
    # Batch 2 rounds its matmuls otherwise than batch 1; AdamW's first steps, ±lr·g/(|g| + ε), blow that
    # up where g is near 0 (cross-attention q: keys of near-alike tokens), and LoRA's B *is* those steps
    # (it starts at 0): the whole LoRA within the end-to-end 1e-4 (measured 9.4e-6, 2-core CPU VM).
    flat = lambda tensors: torch.cat([tensors[k].flatten() for k in sorted(tensors)])
    assert rel_err(flat(two), flat(one)) < 1e-4
    losses = [[json.loads(line)["loss"] for line in (tmp_path / name / "loss.jsonl").read_text().splitlines()]
              for name in ("one", "two")]
    assert len(losses[0]) == 4 and max(abs(a - b) / abs(b) for a, b in zip(*losses)) < 1e-5


def test_a_resumed_lora_run_ends_where_an_uninterrupted_one_does(small_model_dir, pictures, tmp_path):
    """Stopped after its step-2 checkpoint (SIGKILL once step 3 is logged), resumed: the same bits and log.
    The settings that shape the LoRA cannot change on resume."""
    args = [small_model_dir, pictures, *STEPS, "--save-every", "2", "--batch-size", "2", "--ema", "0.9"]
    cli(*args, tmp_path / "whole")
    killed = subprocess.run([sys.executable, "-c", KILLER, *map(str, args), str(tmp_path / "run")], env=ENV,
                            capture_output=True, check=False, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == 2
    assert not (tmp_path / "run" / "lora").exists()
    for flag, value, said in [("--lora", "3", "--lora 2 → 3"), ("--lora-alpha", "4", "--lora-alpha 0.0 → 4.0"),
                              ("--lora-targets", "q", "--lora-targets")]:
        refused = cli(tmp_path / "run", "--resume", flag, value, check=False)
        assert refused.returncode == 2 and said in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    cli(tmp_path / "run", "--resume", "--no-progress")
    whole, resumed = load_file(lora_file(tmp_path / "whole")), load_file(lora_file(tmp_path / "run"))
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)
    log = lambda name: [{k: v for k, v in json.loads(line).items() if k != "seconds"}
                        for line in (tmp_path / name / "loss.jsonl").read_text().splitlines()]
    assert len(log("run")) == 4 and log("run") == log("whole")


KILLER = """
import os, signal, sys
from altdiff_min.training import run_folder
from altdiff_min.apps.cli import main
append = run_folder.LossLog.append
def killing_append(self, row):  # SIGKILL once step 3 is logged: past the step-2 checkpoint
    append(self, row)
    if row["step"] == 3:
        os.kill(os.getpid(), signal.SIGKILL)
run_folder.LossLog.append = killing_append
sys.exit(main(["train", *sys.argv[1:]]))
"""


@pytest.mark.parametrize("bad, said", [
    (["--lora-text-targets", "attn.q"], "--lora-text-targets with --train unet: a LoRA on both modules is --train both"),
    (["--train", "both", "--lora-text-targets", "fc9"], "--lora-text-targets fc9 choose no nn.Linear or nn.Conv2d of "
                                                         "the text encoder"),
    (["--lora", "-1"], "lora must be an int >= 0"),
    (["--lora", "0", "--lora-alpha", "4"], "--lora-alpha, --lora-targets and --lora-text-targets shape a LoRA: give --lora R too"),
    (["--lora-alpha", "nan"], "lora_alpha must be a finite number"),
    (["--lora-targets", "to_q("], "--lora-targets 'to_q(' is not a regular expression"),
    (["--lora-targets", "to_q", "to_k"], "--lora-targets to_q to_k choose no nn.Linear or nn.Conv2d of the UNet"),
])
def test_bad_lora_settings_are_one_line_before_any_work(small_model_dir, pictures, tmp_path, capsys, bad, said):
    from altdiff_min.apps.cli import main

    assert main(["train", small_model_dir, pictures, str(tmp_path / "out"), *STEPS, *bad]) == 2
    err = capsys.readouterr().err
    assert said in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_lora_flags_are_trainconfig_fields():
    import argparse

    from altdiff_min.training.config import add_config_arguments, config_from_flags

    p = argparse.ArgumentParser()
    add_config_arguments(p)
    args = p.parse_args(["--lora", "4", "--lora-alpha", "8", "--lora-targets", "attn[12]?\\.(q|v)", "proj_in"])
    assert config_from_flags(args) == TrainConfig(lora=4, lora_alpha=8.0, lora_targets=("attn[12]?\\.(q|v)", "proj_in"))
    recorded = json.loads(json.dumps({"lora": 4, "lora_targets": ["a", "b"]}))  # run.json keeps a tuple as a list
    assert config_from_flags(p.parse_args(["--lora-targets", "a", "b"]), recorded).lora_targets == ("a", "b")


def test_gradient_checkpointing_changes_no_bit_of_the_lora(small_model_dir, pictures):
    """Recomputing the activations in the backward pass (non-reentrant: the frozen blocks' inputs need no
    grad for the LoRA inside them to get one) trains the same LoRA, bit for bit."""
    from altdiff_min.training.dataset import open_data
    from altdiff_min.training.train import train

    data, ends = open_data(pictures, 32), []
    for checkpointing in (False, True):
        model = load(small_model_dir)
        train(model, data, TrainConfig(max_steps=2, batch_size=2, lr=1e-2, lora=2, gradient_checkpointing=checkpointing),
              progress=False)
        ends.append(lora_state_dict(model.unet))
    assert all(ends[0][k].abs().sum() > 0 for k in ends[0] if "lora_B" in k)
    assert all(torch.equal(ends[0][k], ends[1][k]) for k in ends[0])


@pytest.mark.parametrize("settings", [
    dict(train="both"),  # diffusers' --train_text_encoder: a LoRA on each module
    dict(train="embeddings", new_tokens=("<ring>",), init_words=("circle",), lora_text_targets=("attn\\.(q|v)", "fc1")),
], ids=["both", "words+both"])
def test_a_text_encoder_lora_trains_alone_and_resumes_to_the_same_bits(settings, tmp_path, monkeypatch):
    """A LoRA on the text encoder too (and, with new words, their rows): only the LoRAs (and the rows) move,
    every base tensor keeps its bits; the checkpoint holds nothing else; a run stopped at its step-2
    checkpoint and resumed ends on the bits of one that ran through."""
    from altdiff_min.training import run_folder, words
    from altdiff_min.training.mixing import open_sources
    from altdiff_min.training.train import train

    cfg = lambda steps: TrainConfig(max_steps=steps, batch_size=3, lr=1e-2, lora=2, save_every=2, **settings)
    data = open_sources("toy-<ring>" if "new_tokens" in settings else "toy-ring", 64)

    def run(steps, out, resume=False):
        out.mkdir(exist_ok=True)
        model = load("toy")
        words.start(model, cfg(steps))
        before = {name: {k: v.clone() for k, v in getattr(model, name).state_dict().items()} for name in ("text_encoder", "unet")}
        train(model, data, cfg(steps), str(out), resume=resume, progress=False)
        return model, before

    model, before = run(3, tmp_path / "whole")
    for name in ("text_encoder", "unet"):
        module = getattr(model, name)
        after = {k.replace(".base.", "."): v for k, v in module.state_dict().items() if ".lora_" not in k}
        moved = [k for k, v in before[name].items() if not torch.equal(after[k], v)]
        assert moved == (["token_embedding.rows"] if name == "text_encoder" and "new_tokens" in settings else [])
        assert lora_layers(module) and all(m.lora_B.weight.abs().sum() > 0 for m in lora_layers(module).values())
    held = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)["modules"]
    assert list(held) == ["text_encoder", "unet"]
    assert all(".lora_" in k or k == lora_training.ROWS for part in held.values() for k in part)
    assert (lora_training.ROWS in held["text_encoder"]) == ("new_tokens" in settings)
    append = run_folder.LossLog.append

    def stopping_append(self, row):  # stopped once step 3 is logged: past the step-2 checkpoint
        append(self, row)
        if row["step"] == 3:
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(run_folder.LossLog, "append", stopping_append)
        with pytest.raises(KeyboardInterrupt):
            run(3, tmp_path / "run")
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == 2
    resumed, _ = run(3, tmp_path / "run", resume=True)
    for name in ("text_encoder", "unet"):
        a, b = lora_state_dict(getattr(model, name)), lora_state_dict(getattr(resumed, name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if "new_tokens" in settings:
        assert torch.equal(model.text_encoder.token_embedding.rows, resumed.text_encoder.token_embedding.rows)


def test_a_both_modules_run_leaves_one_file_with_both_loras(small_model_dir, pictures, tmp_path):
    """`train --train both --lora 2`: the file holds the UNet's LoRA (`unet.`) and the text encoder's
    (`text_encoder.`), as many numbers as the two modules' LoRAs trained, and `load(lora=…)` puts both back."""
    cli(small_model_dir, pictures, *STEPS, tmp_path / "run", "--train", "both", "--batch-size", "2")
    tensors = load_file(lora_file(tmp_path / "run"))
    held = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["modules"]
    for prefix, name in (("unet.", "unet"), ("text_encoder.", "text_encoder")):
        part = {k: v for k, v in tensors.items() if k.startswith(prefix)}
        assert part and sum(v.numel() for v in part.values()) == sum(v.numel() for v in held[name].values())
    model = load(small_model_dir, lora=[lora_file(tmp_path / "run")])
    for name in ("unet", "text_encoder"):
        loaded = lora_state_dict(getattr(model, name))
        assert loaded.keys() == held[name].keys() and all(torch.equal(loaded[k], held[name][k]) for k in loaded)
