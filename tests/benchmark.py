"""`make bench`: altdiff-min against diffusers on the full m9 architecture with identical random weights.

Each measurement alternates the two (A B A B …) after one warm-up each, and reports the median of
--runs and the ratio ours / diffusers (< 1: we are faster or smaller):
  text encoder forward (batch 2) · one guided UNet step (batch 2) · VAE decode (batch 1) ·
  a whole image at --steps (DPM-Solver++, guidance 7.5) · peak memory of that image, load included ·
  load time of a model folder (ours) vs from_pretrained (diffusers, safetensors).
Attention controllers (altdiff_min.research.interventions), eager only: one interleaved round of five UNet steps,
  ours as before the door (no attention labelled: no ContextVar read, fused SDPA), ours with no
  controller, with a controller overriding no hook, with one whose probs hook returns None (the
  explicit softmax path), and diffusers; each row is ours vs that round's diffusers, and a line
  states each way's ratio to "before" (no controller ≈ 1: the door is free when unused).
Skipping work (research/skipping.py), eager only: the guided UNet step at 64×64 latents (512 px) as written,
  with ToMe 0.5 and with DeepCache interval 3 (the mean of one whole and two shallow steps), ours against
  diffusers patched by tomesd / run under DeepCache's helper, in one interleaved round; a line states each
  way's speed-up over its own plain step. --skipping-only: these rows alone.
--vae-only: the VAE decode row alone (batch 1, at --size; `--size 512` is how m9 is used), per dtype;
--image-only: the whole-image row alone (text encoder, --steps, VAE decode), per dtype.
Training rows (UNet only: forward + backward + AdamW(lr=1e-5) step, batch 2, latents (--size / 8)²,
fp32 master weights, autocast to --dtype unless fp32; ours `train.diffusion_loss`, diffusers the same
loss by hand on its UNet2DConditionModel):
  train step (s) · train peak memory (MiB), load and two steps included;
  on cuda also: train step with gradient checkpointing (s) and its peak memory · largest train batch
  (doubled from 1 until torch.cuda.OutOfMemoryError; here a ratio > 1 means we fit more).
LoRA rows (--lora R, default 4; diffusers' SD recipe: to_q/to_k/to_v/to_out.0 of every attention, alpha = R,
the same batch, loss and AdamW(lr=1e-4) on the LoRA alone): ours (training/lora.attach, as `train --lora`)
against diffusers' UNet2DConditionModel + peft (`add_adapter(LoraConfig)`, as its train_text_to_image_lora.py),
and full fine-tuning of the same UNet on both sides: step time (`interleaved`, in this process) and the
peak memory the training adds to the loaded UNet (a child per side; the peak is reset, /proc/self/clear_refs,
once the UNet is built: imports and loading are not counted). --lora-unet mid (the default on the CPU: m9's architecture at channels 64/128/256/256) or m9;
--lora-pair: the LoRA pair alone (m9's two LoRA UNets fit a 24 GB machine, its four with the full fine-tunes do not).
A training step holds ~15 GB on the CPU in fp32 (weights, grads, AdamW's two moments), so the two sides
cannot share a 24 GB machine: the training rows run in child processes, ours, diffusers, ours, … (--runs
each), each timing its own steps after a warm-up step (which allocates AdamW's state) and reporting its peak.
On a 2-core CPU use a reduced --size (the default there is 256 px); the output states it.

    python tests/benchmark.py [--size 512] [--steps 25] [--device cuda] [--dtype fp32 bf16] [--compile [both]] [--json out.json]
                              [--train-only | --no-train | --lora-only | --skipping-only | --vae-only | --image-only] [--lora R] [--lora-unet mid|m9] [--lora-pair]
                              (on cuda, --dtype bf16 for the training rows)
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(__file__))
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PROMPT = "黑暗精灵公主，非常详细，幻想，数字绘画，概念艺术"
TIMED_TRAIN_STEPS = {"cpu": 1, "cuda": 10}  # per child, after its warm-up step: a GPU step is short and noisy
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]  # diffusers' SD recipe (train_text_to_image_lora.py)
MID_UNET = {"block_out_channels": [64, 128, 256, 256]}  # m9's architecture (helpers.M9_UNET), narrower


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")  # b 0: diffusers fit no batch at all


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class Timing(tuple):
    """(ours, diffusers) medians, with `pairs`: each run's (ours, diffusers), for the ratio's spread."""
    pairs: list[tuple[float, float]] = []


def seconds(fn, device: str) -> float:
    """Wall-clock seconds of one fn(), the device's queued work included."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def interleaved(a, b, runs: int, device: str) -> Timing:
    """Median seconds of a() and b(), alternating, after one warm-up of each."""
    times: tuple[list[float], list[float]] = ([], [])
    for r in range(runs + 1):
        for fn, out in ((a, times[0]), (b, times[1])):
            elapsed = seconds(fn, device)
            if r:
                out.append(elapsed)
    result = Timing((statistics.median(times[0]), statistics.median(times[1])))
    result.pairs = list(zip(*times))
    return result


def build(folder: str, seed: int = 0) -> None:
    """The random m9 in both layouts: diffusers' save_pretrained folders and our model folder."""
    from helpers import train_sentencepiece
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.pipelines.deprecated.alt_diffusion.modeling_roberta_series import (
        RobertaSeriesConfig, RobertaSeriesModelWithTransformation)
    from prompts import ALL_PROMPTS
    from helpers import M9_TEXT, M9_UNET, M9_VAE

    from altdiff_min import AltDiffusion, ScheduleConfig, Tokenizer
    from weights_convert import text_encoder, unet, vae

    torch.manual_seed(seed)
    ref = {"text_encoder": RobertaSeriesModelWithTransformation(RobertaSeriesConfig(**M9_TEXT)),
           "unet": UNet2DConditionModel.from_config(M9_UNET), "vae": AutoencoderKL.from_config(M9_VAE)}
    ours = {}
    for name, module in ref.items():
        module.save_pretrained(os.path.join(folder, "diffusers", name))
        convert = {"text_encoder": text_encoder, "unet": unet, "vae": vae}[name]
        config = module.config.to_dict() if name == "text_encoder" else dict(module.config)
        ours[name], _ = convert.load(module.state_dict(), convert.config_from_hf(config))
    # A small tokenizer stands in for XLM-R's 250k pieces: its ids are valid inputs of the full model.
    spm = train_sentencepiece(os.path.join(folder, "diffusers", "sentencepiece.bpe.model"), ALL_PROMPTS * 3)
    AltDiffusion(tokenizer=Tokenizer(spm), schedule=ScheduleConfig(), **ours).save(os.path.join(folder, "ours"))


def load_diffusers(folder: str, device: str, dtype: torch.dtype):
    from diffusers import AutoencoderKL, DDIMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel
    from diffusers.pipelines.deprecated.alt_diffusion import AltDiffusionPipeline
    from diffusers.pipelines.deprecated.alt_diffusion.modeling_roberta_series import RobertaSeriesModelWithTransformation
    from helpers import SCHEDULER
    from transformers import XLMRobertaTokenizer

    d = os.path.join(folder, "diffusers")
    kw = dict(torch_dtype=dtype)
    tokenizer = XLMRobertaTokenizer.from_pretrained(d, model_max_length=77)
    pipe = AltDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(os.path.join(d, "vae"), **kw),
        text_encoder=RobertaSeriesModelWithTransformation.from_pretrained(os.path.join(d, "text_encoder"), **kw),
        unet=UNet2DConditionModel.from_pretrained(os.path.join(d, "unet"), **kw), tokenizer=tokenizer,
        scheduler=DPMSolverMultistepScheduler.from_config(DDIMScheduler.from_config(SCHEDULER).config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def load_ours(folder: str, device: str, dtype: torch.dtype):
    from altdiff_min import load

    return load(os.path.join(folder, "ours"), device=device, dtype=dtype)


def matmul_gflops(device: str, dtype: torch.dtype, runs: int) -> float:
    """What this machine reaches on one large matrix product in `dtype`: the yardstick the UNet step
    is measured against (GFLOP/s, median of `runs`)."""
    n = 4096 if device == "cuda" else 2048
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=g).to(device, dtype) for _ in range(2))
    seconds, _ = interleaved(lambda: a @ b, lambda: None, runs, device)
    return 2 * n**3 / seconds / 1e9


def unet_gflop(unet, x, t, context) -> float:
    """The floating-point operations of one UNet call, counted by torch (2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        unet(x, t, context)
    return counter.get_total_flops() / 1e9


def conversion_ways(folder: str, device: str, dtype: torch.dtype, x, t, context, runs: int) -> tuple[float, float]:
    """A UNet step of our model loaded in fp32 and converted to `dtype` inside torch.inference_mode()
    and outside it (the trap of issue 17: the first used to run 1.5× slower on the CPU)."""
    inside, outside = load_ours(folder, device, torch.float32), load_ours(folder, device, torch.float32)
    with torch.inference_mode():
        inside.unet.to(dtype)
    outside.unet.to(dtype)
    return interleaved(lambda: inside.unet(x, t, context), lambda: outside.unet(x, t, context), runs, device)


def interleaved_many(fns: dict, runs: int, device: str) -> dict[str, list[float]]:
    """Each fn's seconds over `runs` rounds (fns in turn within a round), after one warm-up round."""
    times = {name: [] for name in fns}
    for r in range(runs + 1):
        for name, fn in fns.items():
            elapsed = seconds(fn, device)
            if r:
                times[name].append(elapsed)
    return times


def controller_rows(ours, theirs, x, t, context, runs: int, device: str) -> dict:
    """The UNet step with attention controllers that change nothing, against the code path before the
    door and diffusers, timed in one interleaved round (see the module docstring)."""
    from altdiff_min.research.interventions import Controller, intervene

    class NoHook(Controller):
        """Overrides nothing: every attention enters the run and takes the fused path."""

    class ProbsNone(Controller):
        def probs(self, site, when, probs):
            return None  # has the hook, so every site computes explicit probabilities

    labelled = [m for m in ours.unet.modules() if getattr(m, "site", None) is not None]
    sites = [m.site for m in labelled]

    def before():  # Attention.forward with site None: straight to attention(), as before the door
        for m in labelled:
            m.site = None
        try:
            ours.unet(x, t, context)
        finally:
            for m, s in zip(labelled, sites):
                m.site = s

    def under(controller):
        def fn():
            with intervene([controller]):
                ours.unet(x, t, context)
        return fn

    fns = {"before": before, "none": lambda: ours.unet(x, t, context), "no hook": under(NoHook()),
           "probs → None": under(ProbsNone()), "diffusers": lambda: theirs.unet(x, t, encoder_hidden_states=context)}
    times = interleaved_many(fns, runs, device)
    names = {"before": "UNet step, as before the door (s)", "none": "UNet step, no controller (s)",
             "no hook": "UNet step, controller with no hook (s)", "probs → None": "UNet step, probs hook → None (s)"}
    rows, median = {}, {name: statistics.median(ts) for name, ts in times.items()}
    for way, row in names.items():
        rows[row] = Timing((median[way], median["diffusers"]))
        rows[row].pairs = list(zip(times[way], times["diffusers"]))
    print("controllers, ratio to before (median; spread over rounds): " + " · ".join(
        f"{way} {median[way] / median['before']:.3f} ({min(a / b for a, b in zip(times[way], times['before'])):.2f}–"
        f"{max(a / b for a, b in zip(times[way], times['before'])):.2f})" for way in ("none", "no hook", "probs → None")),
        flush=True)
    return rows


def skipping_rows(ours, theirs, device: str, dtype: torch.dtype, runs: int) -> dict:
    """The guided UNet step at 64×64 latents (512 px) as written, with ToMe (ratio 0.5) and with DeepCache
    (interval 3, branch 0: the mean of three steps, one whole and two shallow), ours (research/skipping.py)
    and diffusers' (tomesd 0.1.3's patch, DeepCache 0.1.1's helper), in one interleaved round; then each
    way's speed-up over its own step as written."""
    import types

    import tomesd
    from DeepCache import DeepCacheSDHelper

    from altdiff_min.research.interventions import evaluation, intervene
    from altdiff_min.research.skipping import DeepCache, ToMe

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 64, 64, generator=g).to(device, dtype)
    context = torch.randn(2, 77, 768, generator=g).to(device, dtype)
    route = [torch.tensor(float(t), device=device) for t in (999, 979, 959)]  # three DDIM steps

    def ours_under(controller, ts):
        def fn():
            with intervene([controller]):
                for t in ts:
                    with evaluation(t, True, (64, 64)):
                        ours.unet(x, t, context)
        return fn

    def theirs_tome():
        tomesd.apply_patch(theirs.unet, ratio=0.5)
        try:
            theirs.unet(x, route[0], encoder_hidden_states=context)
        finally:
            tomesd.remove_patch(theirs.unet)

    def theirs_deepcache():
        helper = DeepCacheSDHelper(pipe=types.SimpleNamespace(unet=theirs.unet, scheduler=types.SimpleNamespace(
            timesteps=[t.item() for t in route])))  # the helper counts steps by the scheduler's timesteps
        helper.set_params(cache_interval=3, cache_branch_id=0)
        helper.enable()
        try:
            for t in route:
                theirs.unet(x, t, encoder_hidden_states=context)
        finally:
            helper.disable()

    fns = {"plain": lambda: ours.unet(x, route[0], context), "tome": ours_under(ToMe(0.5), route[:1]),
           "deepcache": ours_under(DeepCache(3), route),
           "theirs plain": lambda: theirs.unet(x, route[0], encoder_hidden_states=context),
           "theirs tome": theirs_tome, "theirs deepcache": theirs_deepcache}
    times = interleaved_many(fns, runs, device)
    for way in ("deepcache", "theirs deepcache"):
        times[way] = [s / len(route) for s in times[way]]
    rows, median = {}, {name: statistics.median(ts) for name, ts in times.items()}
    for way, row in (("plain", "UNet step 64×64, as written (s)"), ("tome", "UNet step 64×64, ToMe 0.5 (s)"),
                     ("deepcache", "UNet step 64×64, DeepCache 3, mean of 3 (s)")):
        rows[row] = Timing((median[way], median[f"theirs {way}"]))
        rows[row].pairs = list(zip(times[way], times[f"theirs {way}"]))
    print("skipping work, speed-up over the step as written (median): " + " · ".join(
        f"{name} ours {median['plain'] / median[way]:.2f}×, diffusers {median['theirs plain'] / median['theirs ' + way]:.2f}×"
        for name, way in (("ToMe 0.5", "tome"), ("DeepCache 3", "deepcache"))), flush=True)
    return rows


def vae_fns(ours, theirs, z):
    return lambda: ours.vae.decode(z), lambda: theirs.vae.decode(z)


def image_fns(ours, theirs, args):
    gen = dict(height=args.size, width=args.size)
    return (lambda: ours.generate(PROMPT, steps=args.steps, sampler="dpm++2m", seed=0, output="tensor", progress=False, **gen),
            lambda: theirs(PROMPT, num_inference_steps=args.steps, generator=torch.Generator("cpu").manual_seed(0),
                           output_type="pt", **gen))


def train_inputs(batch: int, size: int, device: str, seed: int = 0):
    """Fixed random (context, latents, noise, t) of one training batch: the same on both sides."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch, 4, size // 8, size // 8)
    context, latents, noise = torch.randn(batch, 77, 768, generator=g), torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    return context.to(device), latents.to(device), noise.to(device), t.to(device)


def train_step_fn(which: str, folder: str, device: str, amp: torch.dtype, checkpointing: bool = False):
    """step(context, latents, noise, t): one training step of one side's UNet, or None where ours has no
    gradient checkpointing yet (an unknown attribute set on a Module would silently do nothing)."""
    import torch.nn.functional as F

    from altdiff_min.sampling.schedule import add_noise
    from altdiff_min.training.train import diffusion_loss, trainable

    if which == "ours":
        unet = load_ours(folder, device, torch.float32).unet  # the text encoder and VAE are dropped here
        trainable(unet)
        if checkpointing:
            if not hasattr(unet, "gradient_checkpointing"):
                return None
            unet.gradient_checkpointing = True
        loss_fn = lambda c, x0, eps, t: diffusion_loss(unet, c, x0, eps, t)
    else:
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(os.path.join(folder, "diffusers", "unet")).to(device)
        unet.train().requires_grad_(True)
        if checkpointing:
            unet.enable_gradient_checkpointing()
        loss_fn = lambda c, x0, eps, t: F.mse_loss(
            unet(add_noise(x0, eps, t), t, encoder_hidden_states=c).sample.float(), eps.float())
    return optimizer_step(loss_fn, list(unet.parameters()), 1e-5, device, amp)


def optimizer_step(loss_fn, params: list, lr: float, device: str, amp: torch.dtype):
    """step(*batch): one AdamW step of `params` on loss_fn(*batch), under autocast to `amp`."""
    opt = torch.optim.AdamW(params, lr=lr)
    scaler = torch.amp.GradScaler(device, enabled=amp == torch.float16)  # fp16 needs loss scaling; bf16 does not

    def step(*batch) -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=amp, enabled=amp != torch.float32):
            loss = loss_fn(*batch)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    return step


def lora_unet_folder(folder: str, which_unet: str) -> str:
    """The diffusers UNet folder the LoRA rows train: build()'s m9 UNet, or the mid-size one (built here)."""
    if which_unet == "m9":
        return os.path.join(folder, "diffusers", "unet")
    path = os.path.join(folder, "mid-unet")
    if not os.path.isdir(path):
        from diffusers import UNet2DConditionModel
        from helpers import M9_UNET

        torch.manual_seed(0)
        UNet2DConditionModel.from_config({**M9_UNET, **MID_UNET}).save_pretrained(path)
    return path


def lora_step_fn(which: str, path: str, device: str, amp: torch.dtype, r: int):
    """step(context, latents, noise, t): one training step of one side's UNet (diffusers' folder `path`,
    ours converted from it), of its LoRA of rank r (all weights where r is 0)."""
    import torch.nn.functional as F

    from altdiff_min.sampling.schedule import add_noise
    from altdiff_min.training.train import diffusion_loss, generator, trainable

    if which == "ours":
        from safetensors.torch import load_file

        from altdiff_min.research import speed
        from altdiff_min.training import lora
        from altdiff_min.training.config import TrainConfig
        from weights_convert import unet as unet_rules

        with open(os.path.join(path, "config.json")) as f:
            config = unet_rules.config_from_hf(json.load(f))
        unet, _ = unet_rules.load(load_file(os.path.join(path, "diffusion_pytorch_model.safetensors")), config)
        unet = speed.apply(unet.to(device))  # as `train`'s load leaves it
        if r:
            params = lora.attach(SimpleNamespace(unet=unet), TrainConfig(lora=r), lambda m, k: generator(0, 2 + m, k))  # as train --lora r
        else:
            trainable(unet)
            params = list(unet.parameters())
        loss_fn = lambda c, x0, eps, t: diffusion_loss(unet, c, x0, eps, t)
    else:
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(path).to(device)
        if r:
            from peft import LoraConfig

            unet.requires_grad_(False)
            unet.add_adapter(LoraConfig(r=r, lora_alpha=r, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
            unet.train()
            params = [p for p in unet.parameters() if p.requires_grad]
        else:
            unet.train().requires_grad_(True)
            params = list(unet.parameters())
        loss_fn = lambda c, x0, eps, t: F.mse_loss(
            unet(add_noise(x0, eps, t), t, encoder_hidden_states=c).sample.float(), eps.float())
    return optimizer_step(loss_fn, params, 1e-4, device, amp), sum(p.numel() for p in params)


def resident_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


def reset_peak(device: str) -> float:
    """Start counting the peak afresh (CPU: clear_refs 5 resets VmHWM); returns the memory held now (MiB)."""
    gc.collect()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return resident_mib()


def lora_probe(args) -> dict:
    """Child process, modes lora / lora-full: one side's UNet, its LoRA (or every weight) trained for two
    steps (AdamW allocates its state on the first); the memory that adds to the loaded UNet."""
    device = args.device
    with torch.enable_grad():
        step, trained = lora_step_fn(args.probe, lora_unet_folder(args.folder, args.lora_unet), device,
                                     DTYPES[args.dtype], args.lora if args.mode == "lora" else 0)
        batch = train_inputs(2, args.size, device)
        held = reset_peak(device)  # the UNet (and the imports) are held; what the training adds is measured
        step(*batch)
        step(*batch)
    return {"added_mib": peak_mib(device) - held, "trained": trained}


def lora_training(args) -> dict:
    """The LoRA rows and full fine-tuning of the same UNet: the four step times (ours and diffusers', LoRA
    and full) interleaved in this process, so that a busy machine slows them alike (the four UNets fit
    beside each other), and the memory each adds, in its own child."""
    label = {"mid": "mid UNet", "m9": "m9 UNet"}[args.lora_unet]
    print(f"LoRA rows: r={args.lora} on the {label}, {args.size} px, ours / diffusers+peft / LoRA / full interleaved, "
          f"{args.runs} rounds …", flush=True)
    device, path = args.device, lora_unet_folder(args.folder, args.lora_unet)
    modes = {"lora": (f"LoRA r={args.lora}", args.lora), **({} if args.lora_pair else {"lora-full": ("full", 0)})}
    fns, trained = {}, {}
    with torch.enable_grad():
        batch = train_inputs(2, args.size, device)
        for mode, (_, r) in modes.items():
            for which in ("ours", "diffusers"):
                step, trained[mode, which] = lora_step_fn(which, path, device, DTYPES[args.dtype], r)
                fns[mode, which] = lambda step=step: step(*batch)
            if trained[mode, "ours"] != trained[mode, "diffusers"]:  # the same targets: the same numbers trained
                sys.exit(f"{mode}: ours trains {trained[mode, 'ours']:,} numbers, diffusers {trained[mode, 'diffusers']:,}")
        times = interleaved_many(fns, args.runs, device)
    rows, found = {}, {}
    for mode, (name, _) in modes.items():
        step = Timing((statistics.median(times[mode, "ours"]), statistics.median(times[mode, "diffusers"])))
        step.pairs = list(zip(times[mode, "ours"], times[mode, "diffusers"]))
        added = tuple(run_probe(args, w, mode)["added_mib"] for w in ("ours", "diffusers"))
        found[mode] = {"step": step, "added": added}
        rows[f"{name} train step, {label} (s)"] = step
        rows[f"{name} train, memory added (MiB)"] = added
    if args.lora_pair:
        return rows
    lora, full = found["lora"], found["lora-full"]
    print(f"trained numbers: LoRA {trained['lora', 'ours']:,}, full {trained['lora-full', 'ours']:,}. LoRA / full: "
          f"step time {lora['step'][0] / full['step'][0]:.2f} (ours), {lora['step'][1] / full['step'][1]:.2f} "
          f"(diffusers); memory added {lora['added'][0] / full['added'][0]:.2f} (ours), "
          f"{lora['added'][1] / full['added'][1]:.2f} (diffusers)", flush=True)
    return rows


def largest_batch(step, args, limit: int = 4096) -> int:
    """The largest batch, doubling from 1, whose training step fits in GPU memory (0: not even 1)."""
    fit, batch = 0, 1
    while batch <= limit:
        try:
            step(*train_inputs(batch, args.size, args.device))
        except torch.cuda.OutOfMemoryError:
            break
        fit, batch = batch, batch * 2
    return fit


def train_probe(args) -> dict:
    """Child process, modes train / checkpointing / batch: one side's UNet, trained."""
    device = args.device
    with torch.enable_grad():
        step = train_step_fn(args.probe, args.folder, device, DTYPES[args.dtype], args.mode == "checkpointing")
        if step is None:
            return {"missing": "altdiff_min's UNet has no gradient_checkpointing attribute yet"}
        if args.mode == "batch":
            return {"batch": largest_batch(step, args)}
        batch = train_inputs(2, args.size, device)
        step(*batch)  # warm-up: AdamW allocates its state on its first step
        times = [seconds(lambda: step(*batch), device) for _ in range(TIMED_TRAIN_STEPS[device])]
    return {"step_s": statistics.median(times)}


def peak_mib(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    # VmHWM: this process's own peak (ru_maxrss would include the parent's, inherited across fork/exec)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))


def probe(args) -> None:
    """Child process: load one implementation and make one image (mode image) or train its UNet
    (train_probe); print one JSON line with its peak memory in MiB and what the mode measured."""
    if args.mode in ("lora", "lora-full"):
        print(json.dumps(lora_probe(args)))
        return
    if args.mode == "image":
        model = (load_ours if args.probe == "ours" else load_diffusers)(args.folder, args.device, DTYPES[args.dtype])
        with torch.no_grad():
            (image_fns(model, None, args)[0] if args.probe == "ours" else image_fns(None, model, args)[1])()
        result = {}
    else:
        result = train_probe(args)
    print(json.dumps({**result, "peak_mib": peak_mib(args.device)}))


def run_probe(args, which: str, mode: str) -> dict:
    cmd = [sys.executable, __file__, "--probe", which, "--mode", mode, "--folder", args.folder, "--size", str(args.size),
           "--steps", str(args.steps), "--device", args.device, "--dtype", args.dtype, "--lora", str(args.lora),
           "--lora-unet", args.lora_unet]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:  # -9: most likely the kernel's OOM killer
        sys.exit(f"probe {which} ({mode}) exited with {done.returncode}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def peak_memory(args, which: str) -> float:
    return run_probe(args, which, "image")["peak_mib"]


def train_rows(args, mode: str, time_row: str, memory_row: str) -> dict:
    """Children alternate ours, diffusers, ours, … (--runs each; see the module docstring for why not
    `interleaved` in this process): medians of their step times and peaks. {} where ours lacks the mode."""
    results: dict[str, list[dict]] = {"ours": [], "diffusers": []}
    for _ in range(args.runs):
        for which, out in results.items():
            out.append(run_probe(args, which, mode))
            if "missing" in out[-1]:
                print(f"skipping {time_row!r}: {out[-1]['missing']}", flush=True)
                return {}
    med = lambda key: tuple(statistics.median(r[key] for r in results[w]) for w in results)
    return {time_row: med("step_s"), memory_row: med("peak_mib")}


def training(args) -> dict:
    """The training rows; checkpointing and the largest batch on cuda only."""
    print(f"training rows: children alternate ours / diffusers, {args.runs} each …", flush=True)
    rows = train_rows(args, "train", "train step (s)", "train peak memory (MiB)")
    if args.device == "cuda":
        rows.update(train_rows(args, "checkpointing", "train step, checkpointing (s)", "train peak, checkpointing (MiB)"))
        rows["largest train batch"] = tuple(run_probe(args, w, "batch")["batch"] for w in ("ours", "diffusers"))
    return rows


def inference(args) -> tuple[dict, dict]:
    """The inference rows of one dtype, eager or compiled, each measured by `interleaved` in this
    process (peak memory in child processes), and the UNet step's GFLOP/s against a large matmul's."""
    folder, device, dtype = args.folder, args.device, DTYPES[args.dtype]
    rows = {}
    if not args.compile:  # the same either way
        rows["load (s)"] = interleaved(lambda: load_ours(folder, device, dtype),
                                       lambda: load_diffusers(folder, device, dtype), args.runs, device)
    ours, theirs = load_ours(folder, device, dtype), load_diffusers(folder, device, dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, args.size // 8, args.size // 8, generator=g).to(device, dtype)
    context = torch.randn(2, 77, 768, generator=g).to(device, dtype)
    t = torch.tensor(500.0, device=device)  # float32, as the pipeline passes it (one compiled graph for both rows)
    gflop = unet_gflop(ours.unet, x, t, context)
    if args.compile:
        from altdiff_min.research.speed import compile_unet

        ours.unet = compile_unet(ours.unet)  # what load(..., compile=True) does
        theirs.unet = torch.compile(theirs.unet)  # what diffusers' users do first
        rows["compile: first UNet call (s)"] = (seconds(lambda: ours.unet(x, t, context), device),
                                               seconds(lambda: theirs.unet(x, t, encoder_hidden_states=context), device))
    ids, mask = ours.tokenizer(["", PROMPT])
    ids, mask = ids.to(device), mask.to(device)
    z = torch.randn(1, 4, args.size // 8, args.size // 8, generator=g).to(device, dtype)
    rows["text encoder (s)"] = interleaved(lambda: ours.text_encoder(ids, mask),
                                           lambda: theirs.text_encoder(input_ids=ids, attention_mask=mask), args.runs, device)
    rows["guided UNet step (s)"] = interleaved(lambda: ours.unet(x, t, context),
                                               lambda: theirs.unet(x, t, encoder_hidden_states=context), args.runs, device)
    if not args.compile:  # a compiled UNet refuses controllers
        rows.update(controller_rows(ours, theirs, x, t, context, args.runs, device))
        rows.update(skipping_rows(ours, theirs, device, dtype, args.runs))
    step = rows["guided UNet step (s)"][0]
    peak = matmul_gflops(device, dtype, args.runs)
    unet_speed = {"gflop": gflop, "gflops": gflop / step, "matmul_gflops": peak, "fraction": gflop / step / peak}
    print(f"guided UNet step: {gflop:.0f} GFLOP in {step:.3f} s = {gflop / step:.0f} GFLOP/s, "
          f"{gflop / step / peak:.0%} of a large matmul's {peak:.0f} GFLOP/s in {args.dtype}", flush=True)
    if dtype != torch.float32 and not args.compile:
        rows["UNet step, converted in / outside inference_mode (s)"] = conversion_ways(folder, device, dtype, x, t,
                                                                                      context, args.runs)
    rows["VAE decode (s)"] = interleaved(*vae_fns(ours, theirs, z), args.runs, device)
    rows[f"image, {args.steps} steps (s)"] = interleaved(*image_fns(ours, theirs, args), args.runs, device)
    del ours, theirs
    if not args.compile:
        rows["peak memory (MiB)"] = (peak_memory(args, "ours"), peak_memory(args, "diffusers"))
    if device == "cuda":  # hand this process's cached blocks back: the largest-batch children need them
        gc.collect()
        torch.cuda.empty_cache()
    return rows, unet_speed


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default 512 on cuda, 256 on cpu)")
    p.add_argument("--steps", type=int, default=None, help="steps of the whole image (default 25 on cuda, 4 on cpu)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=["fp32"],
                   help="one or more; each gets its inference rows (the training rows: the first)")
    p.add_argument("--compile", nargs="?", const="on", default="off", choices=["off", "on", "both"],
                   help="torch.compile both UNets (ours as load(compile=True) does): on, or both eager and compiled rows")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--json", default="benchmark.json")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--train-only", action="store_true", help="only the training rows")
    which.add_argument("--no-train", action="store_true", help="skip the training rows (the LoRA rows too)")
    which.add_argument("--lora-only", action="store_true", help="only the LoRA rows (no m9 built for --lora-unet mid)")
    which.add_argument("--skipping-only", action="store_true", help="only the rows of ToMe and DeepCache (64×64 latents)")
    which.add_argument("--vae-only", action="store_true", help="only the VAE decode row, at --size")
    which.add_argument("--image-only", action="store_true", help="only the whole-image row, at --size and --steps")
    p.add_argument("--lora", type=int, default=4, help="the LoRA rows' rank (default 4)")
    p.add_argument("--lora-unet", choices=["mid", "m9"], default=None,
                   help="the UNet the LoRA rows train (default: mid on the CPU, m9 on cuda)")
    p.add_argument("--lora-pair", action="store_true",
                   help="the LoRA rows without their full fine-tunes (m9's four UNets side by side exceed 24 GB)")
    p.add_argument("--probe", choices=["ours", "diffusers"], help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=["image", "train", "checkpointing", "batch", "lora", "lora-full"], default="image",
                   help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.size = args.size or (512 if args.device == "cuda" else 256)
    args.steps = args.steps or (25 if args.device == "cuda" else 4)
    args.lora_unet = args.lora_unet or ("m9" if args.device == "cuda" else "mid")
    dtypes, args.dtype = args.dtype, args.dtype[0]
    compiles = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    if args.probe:
        return probe(args)
    results, unet_speed = [], {}  # results: (row, dtype, compile, (ours, diffusers) or a Timing)
    with tempfile.TemporaryDirectory() as folder:
        args.folder = folder
        if not (args.lora_only and args.lora_unet == "mid"):
            print(f"building the random m9 in both layouts under {folder} …", flush=True)
            build(folder)
        if args.skipping_only:
            for dtype in dtypes:
                print(f"skipping rows: {dtype}, {args.runs} rounds …", flush=True)
                ours, theirs = load_ours(folder, args.device, DTYPES[dtype]), load_diffusers(folder, args.device, DTYPES[dtype])
                results += [(name, dtype, "no", row) for name, row in
                            skipping_rows(ours, theirs, args.device, DTYPES[dtype], args.runs).items()]
                del ours, theirs
        for dtype in dtypes if args.vae_only or args.image_only else []:
            name = f"VAE decode, {args.size} px (s)" if args.vae_only else f"whole image, {args.size} px, {args.steps} steps (s)"
            print(f"{name}: {dtype}, {args.runs} rounds …", flush=True)
            ours, theirs = load_ours(folder, args.device, DTYPES[dtype]), load_diffusers(folder, args.device, DTYPES[dtype])
            z = torch.randn(1, 4, args.size // 8, args.size // 8, generator=torch.Generator().manual_seed(0))
            fns = vae_fns(ours, theirs, z.to(args.device, DTYPES[dtype])) if args.vae_only else image_fns(ours, theirs, args)
            results.append((name, dtype, "no", interleaved(*fns, args.runs, args.device)))
            write_json(results, unet_speed, args)
            del ours, theirs, fns
        alone = args.skipping_only or args.vae_only or args.image_only  # one group of rows alone: no training rows either
        only = args.train_only or args.lora_only or alone
        for dtype, compiled in [(d, c) for d in dtypes for c in compiles] if not only else []:
            print(f"inference rows: {dtype}, {'compiled' if compiled else 'eager'} …", flush=True)
            rows, unet_speed[f"{dtype} {'compiled' if compiled else 'eager'}"] = inference(
                argparse.Namespace(**{**vars(args), "dtype": dtype, "compile": compiled}))
            results += [(name, dtype, "yes" if compiled else "no", row) for name, row in rows.items()]
            write_json(results, unet_speed, args)  # so far: what survives a run stopped at a time limit
        if not (args.no_train or only):
            results += [(name, args.dtype, "-", row) for name, row in training(args).items()]
        if not (args.no_train or alone):
            results += [(name, args.dtype, "-", row) for name, row in lora_training(args).items()]
    report(results, unet_speed, args)


def machine_name(args) -> str:
    return (torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} cores")


def spread(row) -> list[float]:
    """The sorted ratios of the runs' (ours, diffusers) pairs; [] where the two were not timed in pairs."""
    return sorted(ratio(a, b) for a, b in getattr(row, "pairs", []))


def write_json(results: list, unet_speed: dict, args) -> None:
    """The results so far, written atomically (the file is rewritten after each configuration)."""
    tmp = f"{args.json}.partial"
    with open(tmp, "w") as f:
        json.dump({"machine": machine_name(args),
                   "args": {k: v for k, v in vars(args).items() if k not in ("probe", "mode", "folder")},
                   "unet_speed": unet_speed,
                   "results": [{"row": name, "dtype": dtype, "compile": compiled, "ours": row[0], "diffusers": row[1],
                                "ratio": ratio(*row), "ratios": spread(row)} for name, dtype, compiled, row in results]},
                  f, indent=2)
    os.replace(tmp, args.json)


def report(results: list, unet_speed: dict, args) -> None:
    """The table (with the spread of each ratio over the runs, where the two sides were timed in pairs)
    and the JSON."""
    machine = machine_name(args)
    print(f"\n{machine} · {args.size}×{args.size} px · {args.steps} steps · median of {args.runs} "
          f"(spread: the lowest and highest ratio of the runs' pairs)")
    print(f"{'':52}{'dtype':>6}{'compile':>8}{'altdiff-min':>12}{'diffusers':>12}{'ratio':>7}  spread")
    cell = lambda v: f"{v:12d}" if isinstance(v, int) else f"{v:12.3f}"  # int: a batch size
    for name, dtype, compiled, row in results:
        (a, b), pairs = row, spread(row)
        print(f"{name:52}{dtype:>6}{compiled:>8}{cell(a)}{cell(b)}{ratio(a, b):7.2f}  "
              + (f"{pairs[0]:.2f}–{pairs[-1]:.2f}" if pairs else ""))
    for config, sp in unet_speed.items():
        print(f"UNet step, {config}: {sp['gflop']:.0f} GFLOP at {sp['gflops']:.0f} GFLOP/s, {sp['fraction']:.0%} of a "
              f"large matmul's {sp['matmul_gflops']:.0f} GFLOP/s")
    write_json(results, unet_speed, args)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
