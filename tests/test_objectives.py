"""Training objectives beyond plain ε: v-prediction, the noise offset, DreamBooth's prior preservation
and data mixing — the maths against diffusers and by hand, the draws, the run folder's records, resume,
and one process against two under torchrun."""
import json
import os

import numpy as np
import pytest
import torch
from helpers import SCHEDULER, rel_err, write_pictures
from PIL import Image
from test_train import cli, weights

from altdiff_min.pipeline import load
from altdiff_min.sampling.schedule import ScheduleConfig, add_noise, alphas_cumprod
from altdiff_min.storage.provenance import record_of_png
from altdiff_min.training import mixing, objectives
from altdiff_min.training.config import TrainConfig
from altdiff_min.training.dataset import CaptionedFolder
from altdiff_min.training.distributed import World
from altdiff_min.training.train import (
    Batches,
    caption_tokens,
    diffusion_loss,
    generator,
)

V = ScheduleConfig(prediction_type="v_prediction")
HF = {k: v for k, v in SCHEDULER.items() if k != "_class_name"}


def draws(ours, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    texts = ["a red ring", "un anneau rouge", "一个红色的环", "ein roter Ring"][:n]
    ids, mask = caption_tokens(ours.tokenizer, texts, torch.zeros(n, dtype=torch.bool))
    latents, noise = torch.randn(n, 4, 8, 12, generator=g), torch.randn(n, 4, 8, 12, generator=g)
    return ours.text_encoder(ids, mask), latents, noise, torch.tensor([999, 500, 3, 250][:n])


# ---- v-prediction -------------------------------------------------------------------------------------------


def test_v_target_is_diffusers_get_velocity():
    from diffusers import DDPMScheduler

    sch = DDPMScheduler.from_config({**HF, "prediction_type": "v_prediction"})
    g = torch.Generator().manual_seed(1)
    x0, eps, t = torch.randn(3, 4, 6, 10, generator=g), torch.randn(3, 4, 6, 10, generator=g), torch.tensor([0, 417, 999])
    assert rel_err(objectives.velocity(x0, eps, t, V), sch.get_velocity(x0, eps, t)) < 1e-6
    assert objectives.target(x0, eps, t, ScheduleConfig()) is eps


def test_v_loss_and_min_snr_equal_diffusers_training_script(small_model_dir):
    """MSE against get_velocity; Min-SNR-γ for v as diffusers' train_text_to_image: min(SNR, γ)/(SNR + 1)."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    ours = load(small_model_dir)
    context, latents, noise, t = draws(ours)
    sch = DDPMScheduler.from_config({**HF, "prediction_type": "v_prediction"})
    error = torch.nn.functional.mse_loss(ours.unet(sch.add_noise(latents, noise, t), t, context),
                                         sch.get_velocity(latents, noise, t), reduction="none").mean(dim=(1, 2, 3))
    assert rel_err(diffusion_loss(ours.unet, context, latents, noise, t, V), error.mean()) < 1e-6
    snr = compute_snr(sch, t)
    expected = (error * torch.minimum(snr, torch.full_like(snr, 5.0)) / (snr + 1)).mean()
    assert rel_err(diffusion_loss(ours.unet, context, latents, noise, t, V, snr_gamma=5.0), expected) < 1e-6


# ---- noise offset -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("data") / "pictures"
    write_pictures(folder, 6)
    return str(folder)


def test_noise_offset_is_drawn_last_from_each_examples_generator(small_model_dir, pictures):
    """noise + X·n, n (C, 1, 1) from the example's own generator after its other draws: every other draw
    (caption, t, ε, posterior) is what a run without offset draws."""
    model, data = load(small_model_dir), CaptionedFolder(pictures, 64)
    plain = Batches(model, data, TrainConfig(batch_size=3), World())(2, 0)
    offset = Batches(model, data, TrainConfig(batch_size=3, noise_offset=0.1), World())(2, 0)
    assert all(torch.equal(plain[k], offset[k]) for k in ("ids", "mask", "t", "latents"))
    for j in range(3):
        g = generator(0, 1, 2, j)  # replay place j's draws: caption, dropout, t, ε, posterior sample, then n
        torch.randint(1, (1,), generator=g), torch.rand(1, generator=g), torch.randint(1000, (1,), generator=g)
        eps = torch.randn(4, 8, 8, generator=g)
        torch.randn(4, 8, 8, generator=g)
        n = torch.randn((4, 1, 1), generator=g)
        assert torch.equal(plain["noise"][j], eps)
        assert rel_err(offset["noise"][j], eps + 0.1 * n) < 1e-7


# ---- DreamBooth's prior loss ----------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma", [0.0, 5.0])
def test_prior_loss_is_instance_plus_lambda_class_by_hand(small_model_dir, gamma):
    """The batch is 2 instance then 2 class examples; loss = instance loss (Min-SNR-weighted with γ) +
    λ · plain MSE of the class half, as diffusers' train_dreambooth."""
    ours = load(small_model_dir)
    context, latents, noise, t = draws(ours)
    x_t = add_noise(latents, noise, t, ScheduleConfig())
    per = (ours.unet(x_t, t, context) - noise).pow(2).mean(dim=(1, 2, 3))
    ac = alphas_cumprod()[t[:2]]
    snr = ac / (1 - ac)
    instance = (per[:2] * (torch.minimum(snr, torch.full_like(snr, gamma)) / snr)).mean() if gamma else per[:2].mean()
    expected = instance + 0.7 * per[2:].mean()
    loss = diffusion_loss(ours.unet, context, latents, noise, t, ScheduleConfig(), snr_gamma=gamma, prior_weight=0.7)
    assert rel_err(loss, expected) < 1e-6
    assert abs(loss - per.mean()) > 1e-3 * per.mean()  # not the plain mean of the four


# ---- data mixing ------------------------------------------------------------------------------------------------


class Fake:
    def __init__(self, n, tag):
        self.n, self.tag, self.resolution = n, tag, 64

    def __len__(self):
        return self.n

    def texts(self, i):
        return (f"{self.tag} {i}",)

    def describe(self):
        return {"kind": self.tag, "examples": self.n}


def test_mixing_draws_each_source_by_its_weight_from_the_seed_and_position_alone():
    mix = mixing.Mixture([Fake(5, "a"), Fake(40, "b")], [3.0, 1.0], ["a", "b"])
    stream = mix.order(7)
    picks = [stream[p] for p in range(4000)]
    share = sum(i < 5 for i in picks) / len(picks)
    assert abs(share - 0.75) < 0.03, share  # 3 : 1 by weight, whatever the sizes (5 and 40)
    assert {mix.texts(i)[0].split()[0] for i in picks} == {"a", "b"} and set(picks) == set(range(45))
    again = mix.order(7)
    assert [again[p] for p in reversed(range(4000))] == picks[::-1]  # any order of asking: the same
    assert [mix.order(8)[p] for p in range(100)] != picks[:100]
    assert mix.describe()["sources"][1] == {"kind": "b", "examples": 40, "weight": 1.0}
    odd = mixing.Mixture([Fake(5, "a"), Fake(4, "b")], [1 / 3, 2.0], ["a", "b"])
    assert mixing.parse(odd.describe()["spec"]) == [("a", 1 / 3), ("b", 2.0)]  # what --resume reopens: exactly


def test_data_lists_parse_and_bad_ones_are_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert mixing.parse("new:3,toy:1") == [("new", 3.0), ("toy", 1.0)]
    assert mixing.parse("toy") == [("toy", 1.0)] and mixing.parse("x:2:1,toy") == [("x:2", 1.0), ("toy", 1.0)]
    assert mixing.parse("a:b,toy:0.5") == [("a:b", 1.0), ("toy", 0.5)]  # a colon that is part of a name
    os.mkdir("odd,name:3")
    assert mixing.parse("odd,name:3") == [("odd,name:3", 1.0)]  # a folder as a whole stays itself
    for spec, message in [("new:0,toy", "weight of 'new' must be a finite number > 0"),
                          ("new:-1,toy", "weight of 'new' must be"), ("new:inf,toy", "weight of 'new' must be"),
                          ("new,,toy", "an empty source"), ("toy:1,toy:2", "'toy' is listed twice"), ("", "DATA must name")]:
        with pytest.raises(ValueError, match=message) as e:
            mixing.parse(spec)
        assert "\n" not in str(e.value)

    class Named:
        resolution = 64

    class Big:
        resolution = 128

    with pytest.raises(ValueError, match="differ in size .*toy 64 px, big 128 px"):
        mixing.native_resolution([("toy", 1), ("big", 1)], {"toy": Named, "big": Big}, 512)
    assert mixing.native_resolution([("x", 1), ("toy", 1)], {"toy": Named}, 512) == 64


# ---- the loop: records, resume, one process against two --------------------------------------------------------

STEPS = ["--max-steps", "2", "--lr", "1e-4", "--no-progress", "--save-every", "1"]
DREAMBOOTH = ["--class-prompt", "a red ring", "--class-images", "3", "--class-steps", "2"]


@pytest.fixture(scope="module")
def dreambooth_run(small_model_dir, pictures, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("runs") / "db"
    cli(small_model_dir, f"{pictures}:3,toy:1", out, *STEPS, *DREAMBOOTH, "--batch-size", "2",
        "--prediction-type", "v_prediction", "--noise-offset", "0.1", "--prior-weight", "0.5")
    return str(out)


def test_run_records_sources_class_pictures_and_the_prediction_type(dreambooth_run, pictures):
    with open(os.path.join(dreambooth_run, "run.json")) as f:
        run = json.load(f)
    data = run["data"]
    assert data["kind"] == "mixture" and [s["weight"] for s in data["sources"]] == [3.0, 1.0]
    assert [s["kind"] for s in data["sources"]] == ["folder", "toy"] and data["spec"] == f"{pictures}:3,toy:1"
    assert run["class_images"]["prompt"] == "a red ring" and run["class_images"]["count"] == 3
    folder = os.path.join(dreambooth_run, "class_images")
    assert sorted(os.listdir(folder)) == ["00000.png", "00001.png", "00002.png", "metadata.jsonl"]
    record = record_of_png(os.path.join(folder, "00001.png"))
    assert record["prompt"] == "a red ring" and record["seed"] == 1 and record["steps"] == 2
    with open(os.path.join(folder, "metadata.jsonl")) as f:
        assert [json.loads(line)["text"] for line in f] == ["a red ring"] * 3
    assert load(os.path.join(dreambooth_run, "model")).schedule.prediction_type == "v_prediction"


def test_resume_reuses_the_class_pictures_and_refuses_other_ones_or_other_sources(dreambooth_run, tmp_path, pictures,
                                                                                 small_model_dir):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(dreambooth_run, run)
    folder = run / "class_images"
    before = {name: (folder / name).stat().st_mtime_ns for name in os.listdir(folder) if name.endswith(".png")}
    cli(run, "--resume", "--max-steps", "3", "--no-progress")  # OUT_DIR alone: model, the data list, settings from run.json
    assert {name: (folder / name).stat().st_mtime_ns for name in before} == before  # not drawn again
    assert len((run / "loss.jsonl").read_text().splitlines()) == 3
    for change, message in [(["--class-prompt", "a blue ring"], "--class-prompt a red ring → a blue ring"),
                            (["--class-images", "4"], "--class-images 3 → 4")]:
        done = cli(run, "--resume", "--max-steps", "4", "--no-progress", *change, check=False)
        assert done.returncode == 2 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1
    done = cli(small_model_dir, f"{pictures}:1,toy:1", run, "--resume", "--max-steps", "4", "--no-progress", check=False)
    assert done.returncode == 2 and "the run's data was" in done.stderr, done.stderr


def test_bad_settings_are_one_line_before_any_work(small_model_dir, pictures, tmp_path):
    for args, message in [(["--class-images", "2"], "needs both --class-prompt TEXT and --class-images N"),
                          (["--class-prompt", "a ring"], "needs both"),
                          (["--prediction-type", "sample"], "invalid choice"),
                          (["--noise-offset", "-0.1"], "noise_offset must be a finite number >= 0"),
                          (["--prediction-type", "v_prediction", "--lora", "2"], "a LoRA or new words are used on the "
                           "base model, which predicts epsilon")]:
        done = cli(small_model_dir, pictures, tmp_path / "out", *STEPS, *args, check=False)
        assert done.returncode == 2 and message in done.stderr, (args, done.stderr)
    for data, message in [(f"{pictures}:0,toy", "must be a finite number > 0"), (f"{pictures},nowhere:2", "not found")]:
        done = cli(small_model_dir, data, tmp_path / "out", *STEPS, check=False)
        assert done.returncode == 2 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not os.path.exists(tmp_path / "out")


def test_two_processes_do_the_sums_of_one_with_every_objective(small_model_dir, pictures, tmp_path):
    """Mixing, class pictures (drawn once, by rank 0), v-prediction and the noise offset together:
    torchrun with 2 × batch 1 ends where one process with batch 2 ends."""
    common = [small_model_dir, f"{pictures}:3,toy:1", *STEPS, *DREAMBOOTH, "--prediction-type", "v_prediction",
              "--noise-offset", "0.1", "--train", "unet"]
    cli(*common, tmp_path / "one", "--batch-size", "2")
    cli(*common, tmp_path / "two", "--batch-size", "1", torchrun=2)
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert max(rel_err(two[k], one[k]) for k in one) < 1e-5
    losses = [[json.loads(line)["loss"] for line in (tmp_path / n / "loss.jsonl").read_text().splitlines()]
              for n in ("one", "two")]
    assert max(abs(a - b) / abs(b) for a, b in zip(*losses)) < 1e-5
    for name in ("00000.png", "00002.png"):  # the same pictures (their records name their own run folder)
        pixels = [np.asarray(Image.open(tmp_path / run / "class_images" / name)) for run in ("one", "two")]
        assert np.array_equal(*pixels)
