"""Training. The maths against the reference: for one batch with given noise, timesteps and caption
dropout, the loss and every gradient of our UNet and text encoder equal those of diffusers'
UNet2DConditionModel and RobertaSeriesModelWithTransformation holding the same weights. The loop:
`altdiff-min train` under torchrun equals one process, a killed run resumes to the same bits, and the
run folder holds what it says."""
import copy
import json
import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import rel_err, write_pictures
from PIL import Image
from safetensors.torch import load_file

from altdiff_min.pipeline import load
from altdiff_min.sampling.schedule import add_noise
from altdiff_min.training.train import caption_tokens, diffusion_loss, trainable, vae_loss
from weights_convert import text_encoder as text_rules
from weights_convert import unet as unet_rules
from weights_convert.rules import rename

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPTIONS = ["a red circle on a white background", "un cercle rouge", "一只戴着帽子的小狗"]


def batch(ours, seed=0):
    """Three captions, the middle one dropped to the empty prompt; latents 8×12; t spread over the schedule."""
    g = torch.Generator().manual_seed(seed)
    ids, mask = caption_tokens(ours.tokenizer, CAPTIONS, torch.tensor([False, True, False]))
    latents = torch.randn(3, 4, 8, 12, generator=g)
    noise = torch.randn(3, 4, 8, 12, generator=g)
    t = torch.tensor([999, 500, 3])
    return ids, mask, latents, noise, t


def gradients(named_parameters, rules=None):
    return {rename(n, rules) if rules else n: p.grad for n, p in named_parameters if p.grad is not None}


def test_captions_keep_the_tokenizers_mask_and_dropped_ones_the_empty_prompts(small_model_dir):
    tokenizer = load(small_model_dir).tokenizer
    captions = ["a <pad> circle", "un cercle rouge", "一只小狗"]
    ids, mask = caption_tokens(tokenizer, captions, torch.tensor([False, True, False]))
    (ids_all, mask_all), (empty_ids, empty_mask) = tokenizer(captions), tokenizer("")
    assert (ids[0] == 1).any() and torch.equal(mask[0], mask_all[0])  # the spelt <pad> is attended, as at inference
    assert torch.equal(ids[[0, 2]], ids_all[[0, 2]]) and torch.equal(mask[2], mask_all[2])
    assert torch.equal(ids[1], empty_ids[0]) and torch.equal(mask[1], empty_mask[0])


def test_loss_and_every_gradient_equal_diffusers(small_model_dir, reference):
    from diffusers import DDPMScheduler
    from helpers import SCHEDULER

    ours = load(small_model_dir)
    trainable(ours.unet, ours.text_encoder)
    ids, mask, latents, noise, t = batch(ours)
    assert ids[1].tolist() == ours.tokenizer("")[0][0].tolist()
    loss = diffusion_loss(ours.unet, ours.text_encoder(ids, mask), latents, noise, t, ours.schedule)
    loss.backward()

    unet, text = copy.deepcopy(reference["unet"]), copy.deepcopy(reference["text_encoder"])  # eval: no dropout
    unet.requires_grad_(True), text.requires_grad_(True)
    x_t = DDPMScheduler.from_config({k: v for k, v in SCHEDULER.items() if k != "_class_name"}).add_noise(latents, noise, t)
    context = text(input_ids=ids, attention_mask=mask)[0]
    ref_loss = torch.nn.functional.mse_loss(unet(x_t, t, encoder_hidden_states=context).sample, noise)
    ref_loss.backward()

    assert rel_err(loss.detach(), ref_loss.detach()) < 1e-6
    for module, ref_module, rules in [(ours.unet, unet, unet_rules.RULES), (ours.text_encoder, text, text_rules.RULES)]:
        ours_grads, ref_grads = gradients(module.named_parameters()), gradients(ref_module.named_parameters(), rules)
        assert set(ours_grads) == set(ref_grads), set(ours_grads) ^ set(ref_grads)
        # Attention key biases have a gradient of exactly 0 in exact arithmetic (softmax ignores a shift
        # shared by every key); both sides hold float noise there, compared against the module's scale.
        scale = torch.cat([g.flatten() for g in ref_grads.values()]).norm()
        zero = {n for n in ref_grads if n.endswith(".k.bias")}
        assert all((ours_grads[n] - ref_grads[n]).norm() < 1e-6 * scale for n in zero)
        worst = max(rel_err(ours_grads[n], ref_grads[n]) for n in ours_grads if n not in zero)
        assert worst < 1e-5, f"{type(module).__name__}: largest gradient error {worst:.2e}"


def test_min_snr_weighted_loss_equals_diffusers_training_script(small_model_dir):
    """--snr-gamma: diffusers' train_text_to_image weights each example's mean squared error by
    min(SNR_t, γ)/SNR_t (training_utils.compute_snr); ours gives the same loss for the same draws."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr
    from helpers import SCHEDULER

    ours = load(small_model_dir)
    ids, mask, latents, noise, t = batch(ours)
    context = ours.text_encoder(ids, mask)
    scheduler = DDPMScheduler.from_config({k: v for k, v in SCHEDULER.items() if k != "_class_name"})
    error = torch.nn.functional.mse_loss(ours.unet(scheduler.add_noise(latents, noise, t), t, context), noise,
                                         reduction="none").mean(dim=(1, 2, 3))
    snr = compute_snr(scheduler, t)
    for gamma in (5.0, 0.5):
        expected = (error * torch.stack([snr, gamma * torch.ones_like(t)], dim=1).min(dim=1)[0] / snr).mean()
        loss = diffusion_loss(ours.unet, context, latents, noise, t, ours.schedule, snr_gamma=gamma)
        assert rel_err(loss, expected) < 1e-6
        assert abs(loss - error.mean()) > 1e-2 * error.mean()  # t = 3 and 500 are weighted down: not the plain mean


def test_trainable_undoes_load(small_model_dir):
    ours = load(small_model_dir)
    assert not any(p.requires_grad for p in ours.unet.parameters()) and not ours.unet.training
    trainable(ours.unet)
    assert all(p.requires_grad for p in ours.unet.parameters()) and ours.unet.training
    assert not any(p.requires_grad for p in ours.vae.parameters())  # only what was asked


def test_vae_loss_is_reconstruction_plus_kl(small_model_dir):
    ours = load(small_model_dir)
    images = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    mean, logvar = ours.vae.encode(images)
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(2))
    error = ours.vae.decode(mean + (0.5 * logvar).exp() * noise) - images
    kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).mean()
    expected = error.abs().mean() + error.pow(2).mean() + 0.1 * kl
    assert rel_err(vae_loss(ours.vae, images, 0.1, noise), expected) < 1e-6
    assert kl > 0 and vae_loss(ours.vae, images, 0.0, noise) < vae_loss(ours.vae, images, 1.0, noise)


def test_add_noise_is_what_the_loss_sees(small_model_dir):
    """At t the UNet sees √ᾱ_t·x0 + √(1−ᾱ_t)·ε: a zero UNet output gives a loss of mean ε²."""
    ours = load(small_model_dir)
    _, _, latents, noise, t = batch(ours)
    seen = []

    class Spy(torch.nn.Module):
        def forward(self, x, t, context):
            seen.append(x)
            return torch.zeros_like(x)

    loss = diffusion_loss(Spy(), None, latents, noise, t, ours.schedule)
    assert torch.equal(seen[0], add_noise(latents, noise, t, ours.schedule))
    assert rel_err(loss, noise.pow(2).mean()) < 1e-7


# ---- the loop: `altdiff-min train` on one process, under torchrun, killed and resumed --------------------------

STEPS = ["--max-steps", "4", "--lr", "1e-4", "--no-progress"]  # at the model's 64 px: 8×8 latents, 2×2 in the middle
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}  # one thread per process: two processes on two cores


def weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(run_dir, "model", "model.safetensors"))


def cli(*args, torchrun: int = 0, check: bool = True) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}", "-m"] \
        if torchrun else [sys.executable, "-m"]
    done = subprocess.run([*launcher, "altdiff_min", "train", *map(str, args)], env=ENV, capture_output=True, text=True,
                          timeout=600)
    assert not check or done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("data") / "pictures"
    write_pictures(folder, 12)
    return str(folder)


def test_two_processes_and_accumulation_do_the_sums_of_one_batch(small_model_dir, pictures, tmp_path):
    """torchrun --nproc_per_node 2 (gloo) with batch 1, and one process accumulating 2 × batch 1, end
    where one process with batch 2 ends: the global batch, not how it is split, defines the run."""
    base = {f"{n}.{k}": v for n in ("text_encoder", "unet") for k, v in getattr(load(small_model_dir), n).state_dict().items()}
    common = [small_model_dir, pictures, *STEPS, "--train", "both"]
    cli(*common, tmp_path / "one", "--batch-size", "2")
    cli(*common, tmp_path / "two", "--batch-size", "1", torchrun=2)
    cli(*common, tmp_path / "accum", "--batch-size", "1", "--grad-accum", "2")
    one, two, accum = (weights(tmp_path / name) for name in ("one", "two", "accum"))
    assert sum(not torch.equal(one[k], v) for k, v in base.items()) > 0.9 * len(base)  # (almost) every weight moved
    for other in (two, accum):
        # Per tensor, the final weights; AdamW's early steps are ±lr whatever the gradient's size, so a
        # process that missed the other's gradients would be off by ~lr·steps/|w| ≈ 1e-2 here.
        assert max(rel_err(other[k], one[k]) for k in one) < 1e-5
    runs = [json.loads((tmp_path / name / "run.json").read_text()) for name in ("one", "two")]
    assert [r["global_batch"] for r in runs] == [2, 2] and [r["world_size"] for r in runs] == [1, 2]
    losses = [[json.loads(line)["loss"] for line in (tmp_path / name / "loss.jsonl").read_text().splitlines()]
              for name in ("one", "two")]
    assert len(losses[0]) == 4 and max(abs(a - b) / abs(b) for a, b in zip(*losses)) < 1e-5  # the same examples and draws


KILLER = """
import os, signal, sys
import torch
from altdiff_min.training import run_folder
from altdiff_min.apps.cli import main
mode, at = sys.argv[1], int(sys.argv[2])
if mode == "after-step":  # SIGKILL once step `at` is logged: past the checkpoint before it
    append = run_folder.LossLog.append
    def killing_append(self, row):
        append(self, row)
        if row["step"] == at:
            os.kill(os.getpid(), signal.SIGKILL)
    run_folder.LossLog.append = killing_append
else:  # SIGKILL in the middle of writing the checkpoint of step `at`
    save = torch.save
    def killing_save(state, file):
        if state["step"] == at:
            with open(file, "wb") as f:
                f.write(b"PK\\x03\\x04 half a checkpoint")
            os.kill(os.getpid(), signal.SIGKILL)
        save(state, file)
    torch.save = killing_save
sys.exit(main(["train", *sys.argv[3:]]))
"""


@pytest.mark.parametrize("mode, at, resumes_from", [("after-step", 5, 4), ("mid-checkpoint", 4, 2)])
def test_a_killed_run_resumes_to_the_same_bits(small_model_dir, pictures, tmp_path, mode, at, resumes_from):
    args = [small_model_dir, pictures, "--max-steps", "6", "--save-every", "2", "--batch-size", "2", "--lr", "1e-3",
            "--train", "both", "--ema", "0.9", "--no-progress"]
    cli(*args, tmp_path / "whole")
    killed = subprocess.run([sys.executable, "-c", KILLER, mode, str(at), *map(str, args), str(tmp_path / "run")],
                            env=ENV, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == resumes_from
    assert not (tmp_path / "run" / "model").exists()
    cli(*args, tmp_path / "run", "--resume")
    whole, resumed = weights(tmp_path / "whole"), weights(tmp_path / "run")
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert (tmp_path / "run" / "loss.jsonl").read_text() .count("\n") == 6
    log = lambda name: [{k: v for k, v in json.loads(line).items() if k != "seconds"}
                        for line in (tmp_path / name / "loss.jsonl").read_text().splitlines()]
    assert log("run") == log("whole")
    assert not [f for f in os.listdir(tmp_path / "run") if f.startswith(".")]  # no half-written leftovers


def test_resuming_keeps_the_global_batch_or_says_why(small_model_dir, pictures, tmp_path):
    args = [small_model_dir, pictures, *STEPS, "--save-every", "2"]
    cli(*args, tmp_path / "run", "--batch-size", "2")
    refused = cli(*args, tmp_path / "run", "--batch-size", "1", "--resume", check=False)
    assert refused.returncode == 2 and "global batch is 2" in refused.stderr and "product is 2" in refused.stderr
    refused = cli(*args, tmp_path / "run", "--batch-size", "2", "--lr", "1e-3", "--resume", check=False)
    assert refused.returncode == 2 and "--lr 0.0001 → 0.001" in refused.stderr
    cli(*args, tmp_path / "run", "--batch-size", "1", "--grad-accum", "2", "--resume")  # the same global batch


def test_run_folder_holds_log_curve_samples_and_a_loadable_model(small_model_dir, pictures, tmp_path):
    out = tmp_path / "run"
    cli(small_model_dir, pictures, *STEPS, out, "--batch-size", "2", "--sample-every", "2", "--sample-steps", "2",
        "--sample-prompt", "un cercle rouge", "--sample-prompt", "一只狗", "--mixed-precision", "bf16",
        "--gradient-checkpointing", "--ema", "0.5")
    assert sorted(os.listdir(out)) == ["checkpoint.pt", "loss.jsonl", "loss.png", "model", "run.json", "samples"]
    assert sorted(os.listdir(out / "samples")) == [f"step-{s:07d}-{k}.png" for s in (0, 2, 4) for k in (0, 1)]
    rows = [json.loads(line) for line in (out / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in rows)
    assert Image.open(out / "loss.png").size == (640, 360)
    model = load(out / "model")
    assert model.image_size == 64 and model.generate("un chien", steps=2, output="tensor").isfinite().all()
    recorded = json.loads((out / "model" / "config.json").read_text())["train"]
    assert recorded["weights"] == "ema" and recorded["global_batch"] == 2 and recorded["data"]["examples"] == 12
    assert recorded["config"]["mixed_precision"] == "bf16" and recorded["base"]["path"] == small_model_dir
    assert json.loads((out / "run.json").read_text())["environment"]["dtype"] == "bf16"  # what the forward pass computes in


def test_gradient_checkpointing_and_frozen_modules(small_model_dir, pictures, tmp_path):
    """Checkpointing changes no bit; --train unet leaves the text encoder and the VAE exactly as they were."""
    base = load(small_model_dir)
    cli(small_model_dir, pictures, *STEPS, tmp_path / "a", "--batch-size", "2")
    cli(small_model_dir, pictures, *STEPS, tmp_path / "b", "--batch-size", "2", "--gradient-checkpointing")
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    for name in ("text_encoder", "vae"):
        assert all(torch.equal(a[f"{name}.{k}"], v) for k, v in getattr(base, name).state_dict().items())
    assert not all(torch.equal(a[f"unet.{k}"], v) for k, v in base.unet.state_dict().items())


@pytest.mark.parametrize("mode", ["fp16", "bf16"])
def test_mixed_precision_trains_in_autocast_with_fp32_weights(small_model_dir, pictures, tmp_path, mode):
    from altdiff_min.training.config import TrainConfig
    from altdiff_min.training.dataset import open_data
    from altdiff_min.training.train import train

    model = load(small_model_dir)
    losses = train(model, open_data(pictures, 32), TrainConfig(max_steps=3, batch_size=2, lr=1e-3, mixed_precision=mode),
                   progress=False)
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert all(p.dtype == torch.float32 for p in model.unet.parameters())


def test_training_settings_are_checked(small_model_dir, pictures, tmp_path, capsys):
    from altdiff_min.apps.cli import main

    for bad, message in [(["--max-steps", "0"], "max_steps must be an int >= 1"),
                         (["--lr", "nan"], "lr must be a finite number"),
                         (["--ema", "1.5"], "ema and uncond_prob must be in [0, 1)"),
                         (["--sample-every", "5"], "needs at least one --sample-prompt"),
                         (["--resolution", "40"], "multiples of 32"),
                         (["--resolution", "100"], "--resolution 100 does not fit"),
                         (["--force", "--resume"], "not both")]:
        assert main(["train", small_model_dir, pictures, str(tmp_path / "out"), *bad]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "out").exists()


def test_bad_data_touches_no_run_folder(small_model_dir, pictures, tmp_path, capsys):
    """DATA is read before OUT_DIR is claimed: --force with a mistyped DATA keeps the old run, and a
    new OUT_DIR is not left behind empty. An empty folder is taken as a new OUT_DIR."""
    from altdiff_min.apps.cli import main

    run = tmp_path / "run"
    assert main(["train", small_model_dir, pictures, str(run), "--max-steps", "1", "--no-progress"]) == 0
    before = sorted(os.listdir(run))
    assert main(["train", small_model_dir, str(tmp_path / "no-such-data"), str(run), "--force", "--max-steps", "1"]) == 2
    assert "not found" in capsys.readouterr().err
    assert sorted(os.listdir(run)) == before and "checkpoint.pt" in before
    assert main(["train", small_model_dir, str(tmp_path / "no-such-data"), str(tmp_path / "new"), "--max-steps", "1"]) == 2
    assert not (tmp_path / "new").exists()
    (tmp_path / "empty").mkdir()
    assert main(["train", small_model_dir, pictures, str(tmp_path / "empty"), "--max-steps", "1", "--no-progress"]) == 0
    assert (tmp_path / "empty" / "model" / "model.safetensors").is_file()


def test_ema_decay_is_diffusers_ema_models():
    """diffusers' EMAModel (its train_text_to_image --use_ema): decay 0 at the first update, then
    min(decay, (1 + k)/(10 + k)); ours at 0-based step k is its get_decay at optimization step k + 1."""
    from diffusers.training_utils import EMAModel

    from altdiff_min.training.train import ema_decay

    for decay in (0.9999, 0.99, 0.5):
        ref = EMAModel([torch.nn.Parameter(torch.zeros(1))], decay=decay)
        assert [ema_decay(k, decay) for k in range(300)] == [ref.get_decay(k + 1) for k in range(300)]


def test_fp16_steps_the_scaler_skips_do_not_move_the_schedule(small_model_dir, pictures, tmp_path, monkeypatch, capsys):
    """As accelerate's scheduler wrapper (diffusers' scripts): an overflowed step leaves the learning-rate
    schedule where it was, and the run says how many steps were skipped."""
    from altdiff_min.training.config import TrainConfig
    from altdiff_min.training.dataset import open_data
    from altdiff_min.training.train import train, warmup_cosine

    class HugeScale(torch.amp.GradScaler):  # the first steps overflow until the scale has halved enough
        def __init__(self, *a, **k):
            super().__init__(*a, init_scale=2.0**40, **k)

    monkeypatch.setattr(torch.amp, "GradScaler", HugeScale)
    cfg = TrainConfig(max_steps=30, batch_size=2, lr=1e-3, warmup=4, mixed_precision="fp16", save_every=100)
    (tmp_path / "run").mkdir()
    train(load(small_model_dir), open_data(pictures, 64), cfg, str(tmp_path / "run"), progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "loss.jsonl").read_text().splitlines()]
    skipped = int(capsys.readouterr().err.split("skipped ")[1].split(" of 30")[0])
    assert 0 < skipped < 30
    assert all(r["grad_norm"] is None for r in rows[:skipped])  # inf: overflowed, recorded as null
    assert all(math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in rows[skipped:])
    factor = warmup_cosine(cfg.warmup, cfg.max_steps)
    assert [r["lr"] for r in rows[:skipped + 1]] == [cfg.lr * factor(0)] * (skipped + 1)  # still the first lr
    assert rows[skipped + 1]["lr"] == cfg.lr * factor(1)


def test_samples_of_an_ema_run_are_drawn_by_the_ema_weights(small_model_dir, pictures, tmp_path):
    from altdiff_min.training.config import TrainConfig
    from altdiff_min.training.dataset import open_data
    from altdiff_min.training.train import train

    cfg = TrainConfig(max_steps=3, batch_size=2, lr=1e-3, ema=0.9, save_every=100, sample_every=3,
                      sample_prompts=("a red circle",), sample_steps=2)
    (tmp_path / "run").mkdir()
    model = load(small_model_dir)
    train(model, open_data(pictures, 64), cfg, str(tmp_path / "run"), progress=False)  # leaves with the EMA weights
    again = model.generate("a red circle", steps=2, seed=0, progress=False)[0]
    sample = Image.open(tmp_path / "run" / "samples" / "step-0000003-0.png")
    assert torch.equal(torch.from_numpy(np.asarray(sample)), torch.from_numpy(np.asarray(again)))


def test_sample_pictures_carry_their_record_and_replay_says_why_it_cannot_make_them(small_model_dir, pictures,
                                                                                    tmp_path, capsys):
    """Each sample PNG carries the web UIs' "parameters" text and the altdiff-min record: its prompt,
    seed, sampler, steps, the step of training it was drawn at and the run folder (no model folder
    holds those weights: `generate --replay` says so in one line)."""
    from altdiff_min.apps.cli import main
    from altdiff_min.storage.provenance import environment, record_of_png
    from altdiff_min.training.config import TrainConfig
    from altdiff_min.training.dataset import open_data
    from altdiff_min.training.train import train

    prompts = ("a red circle", "一只狗")
    cfg = TrainConfig(max_steps=2, batch_size=2, lr=1e-3, ema=0.9, save_every=100, sample_every=2,
                      sample_prompts=prompts, sample_steps=2)
    run = tmp_path / "run"
    run.mkdir()
    model = load(small_model_dir)
    train(model, open_data(pictures, 64), cfg, str(run), progress=False)
    size = model.image_size
    for step in (0, 2):
        for k, prompt in enumerate(prompts):
            picture = run / "samples" / f"step-{step:07d}-{k}.png"
            assert record_of_png(str(picture)) == {
                "prompt": prompt, "sample": 0, "negative_prompt": "", "seed": k, "n_samples": 1, "sampler": "ddim",
                "steps": 2, "scale": 7.5, "guidance": "cfg", "eta": 0.0, "height": size, "width": size, "dtype": "fp32",
                "model": None, "safety_checker": False, "training": {"run": str(run), "step": step, "ema": step > 0},
                "environment": environment("cpu", "fp32")}
            lines = Image.open(picture).info["parameters"].splitlines()
            assert lines == [prompt, f"Steps: 2, Sampler: DDIM, CFG scale: 7.5, Seed: {k}, Size: {size}x{size}, "
                                     f"Training step: {step}, Training run: run, Batch size: 1, Batch pos: 0, "
                                     f"Precision: fp32, Version: altdiff-min {environment('cpu', 'fp32')['altdiff_min']}"]
    picture = run / "samples" / "step-0000002-1.png"
    assert main(["generate", "--replay", str(picture), "--outdir", str(tmp_path / "again")]) == 2
    assert capsys.readouterr().err == (f"altdiff-min generate: error: --replay: {picture} is a sample of the training "
                                       f"run {run} at step 2: those weights are in no model folder, so it cannot be "
                                       f"made again\n")


def test_batch_larger_than_the_data_is_refused_before_loading(small_model_dir, pictures, tmp_path, capsys, monkeypatch):
    import altdiff_min.pipeline as pipeline
    from altdiff_min.apps.cli import main

    monkeypatch.setattr(pipeline, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    for args in (["--batch-size", "13"], ["--batch-size", "7", "--grad-accum", "2"]):
        assert main(["train", small_model_dir, pictures, str(tmp_path / "out"), *args]) == 2
        assert "is larger than the data's 12 example(s)" in capsys.readouterr().err
        assert not (tmp_path / "out").exists()


def test_resume_refuses_rewritten_captions(small_model_dir, tmp_path, capsys):
    from altdiff_min.apps.cli import main

    data = tmp_path / "data"
    write_pictures(data, 4)
    run = tmp_path / "run"
    assert main(["train", small_model_dir, str(data), str(run), "--max-steps", "2", "--save-every", "1", "--no-progress"]) == 0
    captions = data / "metadata.jsonl"
    captions.write_text(captions.read_text().replace('"text": "', '"text": "x '))
    assert main(["train", small_model_dir, str(data), str(run), "--max-steps", "2", "--resume", "--no-progress"]) == 2
    assert "(the same folder, but other captions or files)" in capsys.readouterr().err


def test_resume_clears_every_interrupted_write(tmp_path):
    from altdiff_min.training import run_folder

    run = tmp_path / "run"
    run_folder.prepare(str(run), force=False, resume=False)
    run_folder.write_json(str(run / "run.json"), {"format": run_folder.FORMAT})
    (run / "samples").mkdir()
    left = [run / ".loss.png.partial-1a2b", run / ".run.json.partial-3c4d", run / "samples" / ".step-0000002-0.png.partial-5e"]
    for f in left:
        f.write_bytes(b"half")
    (run / "notes.partial-keep.txt").write_text("not a temporary file")
    assert run_folder.prepare(str(run), force=False, resume=True) == {"format": run_folder.FORMAT}
    assert not any(f.exists() for f in left) and (run / "notes.partial-keep.txt").exists()


def test_train_help_explains_every_flag(capsys):
    from altdiff_min.apps.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--max-steps", "--batch-size", "--grad-accum", "--lr", "--seed", "--resolution", "--save-every",
                 "--sample-every", "--sample-prompt", "--resume", "--force", "--train", "--mixed-precision",
                 "--gradient-checkpointing", "--ema", "metadata.jsonl", "torchrun"):
        assert flag in text
    # every default said once, by the setting's own help (--resolution and --device say theirs in words)
    options = text.split(" options: ")[1].split(" --")[1:]
    assert all(option.count("(default:") <= 1 for option in options), [o for o in options if o.count("(default:") > 1]
    assert "(default: None)" not in text and "(default: 1000)" in text and "(default: 1e-05)" in text


def test_train_flags_are_trainconfigs_fields():
    """The flags are made from TrainConfig's fields: each default is written once, in train.py."""
    import argparse
    import dataclasses

    from altdiff_min.training.config import TrainConfig, add_config_arguments, config_from_flags

    p = argparse.ArgumentParser()
    add_config_arguments(p)
    assert config_from_flags(p.parse_args([])) == TrainConfig()
    args = p.parse_args(["--lr", "3e-4", "--sample-every", "2", "--sample-prompt", "a", "--sample-prompt", "b",
                         "--gradient-checkpointing", "--mixed-precision", "bf16"])
    assert config_from_flags(args) == TrainConfig(lr=3e-4, sample_every=2, sample_prompts=("a", "b"),
                                                  gradient_checkpointing=True, mixed_precision="bf16")
    flags = {a.dest for a in p._actions}
    assert flags == {f.name for f in dataclasses.fields(TrainConfig)} - {"kl_weight"} | {"help"}


# ---- a finished run, resumed: records, the log, links, a full disk (issue 30) --------------------------------

FINISHED = ["--max-steps", "2", "--lr", "1e-4", "--warmup", "1", "--batch-size", "2", "--train", "text_encoder",
            "--sample-every", "2", "--sample-steps", "1", "--sample-prompt", "un cercle rouge", "--no-progress"]


@pytest.fixture(scope="module")
def finished_run(small_model_dir, pictures, tmp_path_factory) -> str:
    """A run of 2 steps that has ended (checkpoint, log, curve, samples, model); tests resume copies of it."""
    from altdiff_min.apps.cli import main

    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", small_model_dir, pictures, str(out), *FINISHED]) == 0
    return str(out)


@pytest.fixture
def run_copy(finished_run, tmp_path) -> str:
    import shutil

    shutil.copytree(finished_run, tmp_path / "run", symlinks=True)
    return str(tmp_path / "run")


def rows_of(run) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(run, "loss.jsonl"), encoding="utf-8").read().splitlines()]


def test_run_json_records_software_machine_and_the_models_whole_fingerprint(finished_run, small_model_dir):
    from altdiff_min.storage.folder import fingerprint
    from altdiff_min.storage.provenance import environment

    run = json.loads(open(os.path.join(finished_run, "run.json"), encoding="utf-8").read())
    assert run["model"] == fingerprint(small_model_dir)  # all of it, whatever it holds
    assert run["environment"] == environment("cpu", torch.float32)  # version, git commit, torch, device + name, threads
    assert run["environment"]["torch"] == torch.__version__ and run["environment"]["dtype"] == "fp32"
    recorded = json.loads(open(os.path.join(finished_run, "model", "config.json"), encoding="utf-8").read())["train"]
    assert recorded["environment"] == run["environment"]
    rows = rows_of(finished_run)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(isinstance(r["grad_norm"], float) and math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in rows)


def test_resume_with_out_dir_alone_extends_a_finished_run_past_a_torn_log_line(run_copy, capsys):
    """`train OUT_DIR --resume --max-steps 4`: model, data and settings from run.json; the torn last
    line a full disk left in loss.jsonl is dropped and the log goes on whole; `seconds` counts on from
    the time before the resume; the learning rate from step 3 on is the 4-step schedule's."""
    from altdiff_min.apps.cli import main
    from altdiff_min.training.train import warmup_cosine

    log = os.path.join(run_copy, "loss.jsonl")
    before = rows_of(run_copy)
    before[-1]["seconds"] = 1000.0  # as if the first steps had taken that long
    with open(log, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in before)
        f.write('{"step": 3, "loss": 0.12')  # torn: no end, no newline
    model_before = weights(run_copy)
    assert main(["train", run_copy, "--resume", "--max-steps", "4", "--no-progress"]) == 0
    rows = rows_of(run_copy)  # every line whole JSON
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[:2] == before
    assert all(r["seconds"] >= 1000.0 for r in rows[2:]) and rows[3]["seconds"] >= rows[2]["seconds"]
    assert [r["lr"] for r in rows[2:]] == [1e-4 * warmup_cosine(1, 4)(i) for i in (2, 3)]
    assert all(r["grad_norm"] > 0 for r in rows[2:])
    assert not all(torch.equal(v, model_before[k]) for k, v in weights(run_copy).items())  # the model moved on
    run = json.loads(open(os.path.join(run_copy, "run.json"), encoding="utf-8").read())
    assert run["config"]["max_steps"] == 4 and run["config"]["lr"] == 1e-4 and run["config"]["train"] == "text_encoder"
    assert len(run["resumed"]) == 1 and run["resumed"][0]["environment"]["torch"] == torch.__version__
    assert torch.load(os.path.join(run_copy, "checkpoint.pt"), weights_only=True)["step"] == 4
    capsys.readouterr()
    assert main(["train", run_copy, "--resume", "--max-steps", "3"]) == 2
    err = capsys.readouterr().err
    assert "--max-steps 3: the run in" in err and "is already at step 4" in err


def test_a_run_recorded_before_the_weights_hash_was_kept_still_resumes(run_copy, capsys):
    """run.json's model record from before weights_sha256 was kept: what it kept is compared, what it
    did not keep is not a change; a kept hash that differs is still refused."""
    from altdiff_min.apps.cli import main

    path = os.path.join(run_copy, "run.json")
    run = json.loads(open(path, encoding="utf-8").read())
    old = {k: v for k, v in run["model"].items() if k != "weights_sha256"}
    with open(path, "w", encoding="utf-8") as f:
        json.dump({**run, "model": old}, f)
    assert main(["train", run_copy, "--resume", "--max-steps", "3", "--no-progress"]) == 0
    run = json.loads(open(path, encoding="utf-8").read())
    with open(path, "w", encoding="utf-8") as f:
        json.dump({**run, "model": {**run["model"], "config_sha256": "0" * 64}}, f)
    capsys.readouterr()
    assert main(["train", run_copy, "--resume", "--max-steps", "4", "--no-progress"]) == 2
    assert "--resume: the run's model was" in capsys.readouterr().err
    with open(path, "w", encoding="utf-8") as f:  # the same config, other weights: another model
        json.dump({**run, "model": {**run["model"], "weights_sha256": "0" * 64}}, f)
    assert main(["train", run_copy, "--resume", "--max-steps", "4", "--no-progress"]) == 2
    assert "--resume: the run's model was" in capsys.readouterr().err


def test_resume_refuses_flags_that_change_the_sums_in_one_line(run_copy, small_model_dir, pictures, capsys):
    from altdiff_min.apps.cli import main

    for flags, message in [(["--lr", "1e-3"], "--lr 0.0001 → 0.001"),
                           (["--train", "both"], "--train text_encoder → both"),
                           (["--seed", "3", "--warmup", "2"], "--warmup 1 → 2; --seed 0 → 3"),
                           (["--batch-size", "1"], "the run's global batch is 2 (batch 2 × 1 process(es) × 1 accumulation), "
                                                   "this one would be 1 (batch 1"),
                           (["--max-steps", "1"], "--max-steps 1: the run in")]:
        assert main(["train", run_copy, "--resume", *flags]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
        assert "(2 (" not in err
    assert main(["train", small_model_dir, run_copy, "--resume"]) == 2  # two paths: neither form
    assert "give MODEL DATA OUT_DIR, or OUT_DIR alone with --resume" in capsys.readouterr().err
    assert main(["train", small_model_dir, pictures, run_copy, "--resume", "--max-steps", "2", "--no-progress"]) == 0


def test_resume_writes_nothing_through_a_planted_symbolic_link(run_copy, tmp_path, capsys):
    """Each file or folder a run writes in OUT_DIR (and its lock beside it), made a link to something
    outside: the resume stops in one line naming it, before training, and what the link points to is untouched."""
    import shutil

    from altdiff_min.apps.cli import main

    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    names = ["loss.jsonl", "run.json", "checkpoint.pt", "loss.png", "samples", "model",
             os.path.join("samples", "step-0000002-0.png"), os.path.join("..", ".run.lock")]
    for name in names:
        path = os.path.normpath(os.path.join(run_copy, name))
        aside = str(tmp_path / "aside")
        if os.path.lexists(path):
            os.replace(path, aside)
        os.symlink(victim if name in ("samples", "model") else victim / "precious.txt", path)
        assert main(["train", run_copy, "--resume", "--max-steps", "3", "--no-progress"]) == 2, name
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{path} is a symbolic link" in err, err
        assert os.listdir(victim) == ["precious.txt"] and (victim / "precious.txt").read_text() == "keep me"
        os.unlink(path)
        if os.path.lexists(aside):
            os.replace(aside, path)
    assert torch.load(os.path.join(run_copy, "checkpoint.pt"), weights_only=True)["step"] == 2  # nothing trained
    assert [r["step"] for r in rows_of(run_copy)] == [1, 2]
    shutil.rmtree(victim)


FULL_DISK = """
import resource, sys
from altdiff_min.apps.cli import main
limit = int(sys.argv[1])  # no file may grow past this: writes beyond it fail with EFBIG (Python ignores SIGXFSZ)
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
sys.exit(main(["train", *sys.argv[2:]]))
"""


def test_a_full_disk_while_saving_is_one_line_and_keeps_the_previous_checkpoint_and_model(run_copy):
    """torch.save and safetensors' save_file fail on a full disk with a RuntimeError ("unexpected pos")
    and a SafetensorError, not an OSError: each is one line naming the file, and the checkpoint and
    model before it stay whole. The failure is real: the process may write no file past a size limit."""
    import hashlib

    def digest(*parts):
        return hashlib.sha256(open(os.path.join(run_copy, *parts), "rb").read()).hexdigest()

    def resume(limit: int) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", FULL_DISK, str(limit), run_copy, "--resume", "--max-steps", "3",
                               "--no-progress"], env=ENV, capture_output=True, text=True, timeout=600)

    checkpoint, model = digest("checkpoint.pt"), digest("model", "model.safetensors")
    size = os.path.getsize(os.path.join(run_copy, "checkpoint.pt"))
    assert size < 2**21 < os.path.getsize(os.path.join(run_copy, "model", "model.safetensors"))
    failed = resume(size // 2)  # the log, curve and samples fit; the checkpoint does not
    assert failed.returncode == 2, failed.stderr[-2000:]
    assert failed.stderr.count("\n") == 1 and f"cannot write {os.path.join(run_copy, 'checkpoint.pt')}" in failed.stderr
    assert digest("checkpoint.pt") == checkpoint and digest("model", "model.safetensors") == model
    assert torch.load(os.path.join(run_copy, "checkpoint.pt"), weights_only=True)["step"] == 2
    failed = resume(2**21)  # the checkpoint fits; the model's weights do not
    assert failed.returncode == 2, failed.stderr[-2000:]
    assert failed.stderr.count("\n") == 1, failed.stderr
    assert f"cannot write {os.path.join(run_copy, 'model', 'model.safetensors')}" in failed.stderr
    assert digest("model", "model.safetensors") == model and load(os.path.join(run_copy, "model")) is not None
    assert torch.load(os.path.join(run_copy, "checkpoint.pt"), weights_only=True)["step"] == 3
    assert not [f for f in os.listdir(run_copy) if f.startswith(".")]  # no partial files left
    assert [r["step"] for r in rows_of(run_copy)] == [1, 2, 3]
