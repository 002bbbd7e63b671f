"""Training: the maths every recipe shares, and the one loop that runs it, on one process or under torchrun.

The maths
    diffusion_loss   ε-prediction (Ho et al. 2020, eq. 14, unweighted):
                     L = mean ‖ε − ε_θ(x_t, t, c)‖²,  x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε  (schedule.add_noise)
                     with t uniform over the T training timesteps and ε ~ N(0, I); optionally each
                     example weighted by min(SNR_t, γ)/SNR_t, SNR_t = ᾱ_t/(1−ᾱ_t) (Min-SNR-γ, Hang et
                     al. 2023, for ε-prediction): the nearly clean timesteps count less (their
                     gradients conflict with those of the noisy ones, which decide what the
                     picture shows: the paper's reading); diffusers' training script's --snr_gamma
    drop_captions    classifier-free guidance (Ho & Salimans 2022): a fraction of the captions is
                     replaced by the empty prompt, so one model learns ε(x, c) and ε(x, ∅)
    vae_loss         the autoencoder: L1 + L2 reconstruction of a posterior sample, plus a small
                     KL(q(z|x) ‖ N(0, I)) term
The random draws (t, ε, which captions drop) are arguments: the same draws give the same loss and
gradients, which is what the tests compare with diffusers.

The loop (`train`): AdamW with warm-up and cosine decay, gradient clipping and accumulation,
autocast mixed precision (fp32 master weights; a grad scaler for fp16), EMA, checkpoints and resume.
Under torchrun the objective is wrapped in DistributedDataParallel (gloo on CPU, nccl on GPU).

    global batch  G = batch_size × processes × grad_accum examples per optimizer step
    step s, place j < G:  the example at position s·G + j of the data stream (epoch after epoch, each
                          a permutation seeded by (seed, epoch)); its caption choice, dropout, t, ε and
                          posterior sample drawn from a generator seeded by (seed, s, j)
    micro-step a, rank r: places (a·processes + r)·batch_size … + batch_size

So the maths depends on the seed, the step and the place in the global batch only, never on how many
processes share it: one process with batch 2B and two with batch B do the same sums.
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

from . import run_folder
from .errors import BadValue, NotFinite
from .distributed import World, join_world, leave_world, on_rank0
from .files import locked, make_folder
from .schedule import ScheduleConfig, add_noise, alphas_cumprod
from .tokenizer import check_prompt
from .unet import UNet
from .vae import VAE

# ---- the maths ------------------------------------------------------------------------------------------


def trainable(*modules: torch.nn.Module) -> None:
    """Undo what `load` does for inference (eval mode, requires_grad off) on the modules to train."""
    for module in modules:
        module.train().requires_grad_(True)


def diffusion_loss(unet: UNet, context: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                   schedule: ScheduleConfig = ScheduleConfig(), snr_gamma: float = 0.0) -> torch.Tensor:
    """mean ‖ε_θ(x_t, t, context) − ε‖² over every element of the batch: latents, noise (B, 4, h, w)
    in the sampler's scale (VAE latents × scaling_factor), t (B,) integer timesteps, context (B, 77, D).
    snr_gamma γ > 0: each example's mean error weighted by min(SNR_t, γ)/SNR_t (Min-SNR-γ), then averaged."""
    x_t = add_noise(latents, noise, t, schedule)
    error = (unet(x_t, t, context).float() - noise.float()).pow(2)
    if not snr_gamma:
        return error.mean()
    a = alphas_cumprod(schedule).to(error.device)[t]
    snr = a / (1 - a)
    return (error.flatten(1).mean(dim=1) * snr.clamp(max=snr_gamma) / snr).mean()


def drop_captions(ids: torch.Tensor, empty: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """ids (B, L) with the rows where drop (B,) is True replaced by the empty prompt's ids (L,)."""
    ids = ids.clone()
    ids[drop] = empty
    return ids


def caption_tokens(tokenizer, texts: list[str], drop: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The captions' (ids, attention mask), the rows where drop is True the empty prompt's. The mask is
    the tokenizer's, as at inference: a caption that spells "<pad>" attends to that token there too."""
    return tuple(drop_captions(x, empty[0], drop) for x, empty in zip(tokenizer(texts), tokenizer("")))


def vae_loss(vae: VAE, images: torch.Tensor, kl_weight: float, noise: torch.Tensor) -> torch.Tensor:
    """images (B, 3, H, W) in [−1, 1] → L1 + L2 reconstruction error of the posterior sample
    z = mean + σ·noise, plus kl_weight · KL(N(mean, σ²) ‖ N(0, 1)) averaged over the latents."""
    mean, logvar = vae.encode(images)
    error = vae.decode(mean + (0.5 * logvar).exp() * noise.to(mean)) - images
    kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).mean()
    return error.abs().mean() + error.pow(2).mean() + kl_weight * kl


def ema_decay(step: int, decay: float) -> float:
    """The EMA's decay at (0-based) optimizer step `step`: 0 at the first (the average starts at the
    trained weights), then min(decay, (1 + step)/(10 + step)), diffusers' EMAModel's warm-up, so a
    short run is not mostly its starting point (0.9999 held from the start keeps 90% of it after 1000 steps)."""
    return 0.0 if step == 0 else min(decay, (1 + step) / (10 + step))


def warmup_cosine(warmup: int, steps: int) -> Callable[[int], float]:
    """The learning-rate factor at step i: linear warm-up over `warmup` steps, times a cosine from 1 to 0."""
    return lambda i: min(1.0, (i + 1) / max(warmup, 1)) * 0.5 * (1 + math.cos(math.pi * i / steps))


# ---- what a run is --------------------------------------------------------------------------------------

TRAIN = ("unet", "text_encoder", "both", "vae")  # what trains; "vae" is the toy's first stage
PRECISION = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def setting(default, help: str, **cli):
    """A TrainConfig field and its `altdiff-min train` flag: the help text, and argparse's choices,
    metavar, flag (another name) or cli=False (no flag). The default is written once, here."""
    return field(default=default, metadata={"help": help, **cli})


@dataclass(frozen=True)
class TrainConfig:
    train: str = setting("unet", "what trains; the VAE stays frozen", choices=TRAIN[:3])
    max_steps: int = setting(1000, "optimizer steps (the cosine schedule ends at the last); with --resume, a larger "
                             "number extends the run (the schedule is recomputed: see train.train)")
    batch_size: int = setting(1, "examples per process per micro-step")
    grad_accum: int = setting(1, "micro-steps per optimizer step; the global batch is batch-size × processes × grad-accum")
    lr: float = setting(1e-5, "AdamW's peak learning rate; times the linear warm-up and a cosine to 0 over the whole "
                        "run (a long warm-up peaks below it)")
    warmup: int = setting(0, "steps of linear learning-rate warm-up")
    weight_decay: float = setting(1e-2, "AdamW's decoupled weight decay")
    max_grad_norm: float = setting(1.0, "clip the gradient's global norm to this (0: no clipping); loss.jsonl "
                                   "records the norm before clipping")
    mixed_precision: str = setting("no", "autocast the forward pass; weights and optimizer stay fp32 (fp16 adds a "
                                   "grad scaler)", choices=tuple(PRECISION))
    gradient_checkpointing: bool = setting(False, "recompute activations in the backward pass: less memory, ~1/3 more time")
    ema: float = setting(0.0, "keep an exponential moving average of the weights (e.g. 0.9999; diffusers' warm-up: "
                         "min(DECAY, (1+k)/(10+k)) at step k) and save it as the model; the samples use it too; "
                         "0: none", metavar="DECAY")
    uncond_prob: float = setting(0.1, "captions replaced by '' (for classifier-free guidance)")
    snr_gamma: float = setting(0.0, "weight each example's loss by min(SNR, GAMMA)/SNR (Min-SNR-γ, Hang et al. 2023; "
                               "5 is theirs and diffusers'); 0: unweighted", metavar="GAMMA")
    kl_weight: float = setting(1e-3, "train='vae' only: the KL term's weight", cli=False)
    seed: int = setting(0, "the data order and every random draw of the run")
    save_every: int = setting(500, "steps between checkpoints (and one at the end)")
    sample_every: int = setting(0, "steps between sample pictures in OUT_DIR/samples (0: none)")
    sample_prompts: tuple[str, ...] = setting((), "a prompt to sample (repeat the flag for more); picture K uses seed K",
                                              flag="--sample-prompt", metavar="PROMPT")
    sample_steps: int = setting(25, "DDIM steps of the sample pictures")

    def __post_init__(self):
        if self.train not in TRAIN:
            raise BadValue(f"--train must be one of {', '.join(TRAIN[:3])}, got {self.train!r}")
        if self.mixed_precision not in PRECISION:
            raise BadValue(f"--mixed-precision must be no, bf16 or fp16, got {self.mixed_precision!r}")
        for name in ("max_steps", "batch_size", "grad_accum", "save_every", "sample_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise BadValue(f"{name} must be an int >= 1, got {value!r}")
        for name in ("warmup", "sample_every", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise BadValue(f"{name} must be an int >= 0, got {value!r}")
        for name in ("lr", "weight_decay", "max_grad_norm", "kl_weight", "snr_gamma"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 or (name == "lr" and value == 0):
                raise BadValue(f"{name} must be a finite number {'> 0' if name == 'lr' else '>= 0'}, got {value!r}")
        if not 0 <= self.ema < 1 or not 0 <= self.uncond_prob < 1:
            raise BadValue(f"ema and uncond_prob must be in [0, 1), got {self.ema} and {self.uncond_prob}")
        if self.sample_every and not self.sample_prompts:
            raise BadValue("--sample-every needs at least one --sample-prompt")
        for prompt in self.sample_prompts:
            if not isinstance(prompt, str):
                raise BadValue(f"sample_prompts must be strings, got {prompt!r}")
            check_prompt(prompt)

    @property
    def modules(self) -> tuple[str, ...]:
        return {"both": ("text_encoder", "unet")}.get(self.train, (self.train,))

    def global_batch(self, processes: int) -> int:
        """Examples per optimizer step: batch_size × processes × grad_accum."""
        return self.batch_size * processes * self.grad_accum


# What a resumed run may change: how the global batch is split (not its size), memory, what is saved
# and sampled, and max_steps (extends the run; train() says how the schedule follows). The other
# settings change the sums: a resumed run has the same ones.
MAY_CHANGE_ON_RESUME = ("max_steps", "batch_size", "grad_accum", "gradient_checkpointing", "save_every", "sample_every",
                        "sample_prompts", "sample_steps")
SAME_ON_RESUME = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name not in MAY_CHANGE_ON_RESUME)


def flag(name: str) -> str:
    """The `altdiff-min train` flag of a TrainConfig field."""
    return next(f.metadata.get("flag") for f in dataclasses.fields(TrainConfig) if f.name == name) \
        or "--" + name.replace("_", "-")


def add_config_arguments(p) -> None:
    """One `altdiff-min train` flag per TrainConfig field (except cli=False ones), its help and default
    taken from the field. Every flag's argparse default is None, so that `config_from_flags` knows
    which were given (on --resume only those override run.json)."""
    import argparse

    for f in dataclasses.fields(TrainConfig):
        meta = dict(f.metadata)
        if not meta.pop("cli", True):
            continue
        help, name = meta.pop("help"), meta.pop("flag", None) or flag(f.name)
        shown = ", ".join(f.default) if isinstance(f.default, tuple) else f.default
        options = dict(dest=f.name, default=None, help=f"{help} (default: {shown if shown != '' else 'none'})", **meta)
        if isinstance(f.default, bool):
            p.add_argument(name, action=argparse.BooleanOptionalAction, **options)
        elif isinstance(f.default, tuple):
            p.add_argument(name, action="append", **options)
        else:
            p.add_argument(name, type=type(f.default), **options)


def config_from_flags(args, recorded: dict | None = None) -> TrainConfig:
    """The TrainConfig of `altdiff-min train`'s flags (None: not given): a new run takes the fields'
    defaults for the others, a resumed one run.json's `recorded` settings; a flag given on --resume for
    a setting that may not change (SAME_ON_RESUME) with another value than run.json's is an error naming it."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if getattr(args, f.name, None) is not None}
    if "sample_prompts" in given:
        given["sample_prompts"] = tuple(given["sample_prompts"])
    if recorded is None:
        return TrainConfig(**given)
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    old = {k: tuple(v) if k == "sample_prompts" and isinstance(v, list) else v for k, v in recorded.items() if k in names}
    if changed := [f"{flag(n)} {old.get(n, getattr(TrainConfig, n))} → {given[n]}" for n in SAME_ON_RESUME
                   if n in given and given[n] != old.get(n, getattr(TrainConfig, n))]:
        raise BadValue(f"--resume: the run was started with other settings ({'; '.join(changed)}); those cannot change "
                       f"on resume: drop the flag(s), or start a new run")
    try:
        return TrainConfig(**{**old, **given})
    except TypeError as e:  # a run.json edited by hand
        raise BadValue(f"--resume: run.json's settings do not make a TrainConfig ({e})") from None


# ---- the random draws: functions of (seed, step, place) only -------------------------------------------


def generator(seed: int, *key: int) -> torch.Generator:
    """A CPU generator seeded from (seed, key…) through numpy's SeedSequence: independent streams."""
    state = np.random.SeedSequence(seed, spawn_key=key).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 ^ int(state[1]))


class Stream:
    """Position p of the data stream → example index: epoch p // n is a permutation seeded by (seed, epoch)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.orders = n, seed, {}

    def __getitem__(self, p: int) -> int:
        epoch = p // self.n
        if epoch not in self.orders:
            self.orders = {e: o for e, o in self.orders.items() if e >= epoch - 1}
            self.orders[epoch] = torch.randperm(self.n, generator=generator(self.seed, 0, epoch)).tolist()
        return self.orders[epoch][p % self.n]


# ---- the objective DDP wraps ------------------------------------------------------------------------------


class Objective(nn.Module):
    """The loss of one micro-batch. Only the modules in training are submodules (DDP sees and
    synchronises those); the frozen ones it reads are kept aside in `frozen`."""

    def __init__(self, model, cfg: TrainConfig):
        super().__init__()
        self.cfg, self.schedule, self.frozen = cfg, model.schedule, {}
        for name in ("text_encoder", "unet", "vae"):
            if name in cfg.modules:
                setattr(self, name, getattr(model, name))
            else:
                self.frozen[name] = getattr(model, name)

    def module(self, name: str) -> nn.Module:
        return self.frozen[name] if name in self.frozen else getattr(self, name)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.cfg.train == "vae":
            return vae_loss(self.vae, batch["pixels"], self.cfg.kl_weight, batch["noise"])
        with torch.set_grad_enabled(torch.is_grad_enabled() and "text_encoder" in self.cfg.modules):
            context = self.module("text_encoder")(batch["ids"], batch["mask"])
        return diffusion_loss(self.module("unet"), context, batch["latents"], batch["noise"], batch["t"], self.schedule,
                              self.cfg.snr_gamma)


class Batches:
    """Rank `world.rank`'s micro-batches: examples from the data stream, with their draws."""

    def __init__(self, model, data, cfg: TrainConfig, world: World):
        self.model, self.data, self.cfg, self.world = model, data, cfg, world
        self.stream = Stream(len(data), cfg.seed)
        self.global_batch = cfg.global_batch(world.size)
        down = model.vae.cfg.size_multiple
        self.latent_shape = (model.vae.cfg.latent_channels, data.resolution // down, data.resolution // down)
        self.posteriors: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # example → VAE mean and σ (cache)

    def posterior(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE's N(mean, σ²) of example i, encoded once, alone (so its bits never depend on the
        examples it happened to come with), then kept on the CPU."""
        if i not in self.posteriors:
            vae = self.model.vae
            with torch.no_grad():
                pixels = self.data.pixels(i)[None].to(self.world.device)
                mean, logvar = vae.encode(pixels)
            self.posteriors[i] = mean[0].float().cpu(), (0.5 * logvar[0]).exp().float().cpu()
        return self.posteriors[i]

    def __call__(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        cfg, world = self.cfg, self.world
        first = (micro * world.size + world.rank) * cfg.batch_size
        places = range(first, first + cfg.batch_size)
        examples = [self.stream[step * self.global_batch + j] for j in places]
        gens = [generator(cfg.seed, 1, step, j) for j in places]
        if cfg.train == "vae":
            return {"pixels": torch.stack([self.data.pixels(i) for i in examples]).to(world.device),
                    "noise": torch.stack([torch.randn(self.latent_shape, generator=g) for g in gens]).to(world.device)}
        texts, drop, t, noise, latents = [], [], [], [], []
        for i, g in zip(examples, gens):  # the order of the draws is part of the run's definition
            captions = self.data.texts(i)
            texts.append(captions[int(torch.randint(len(captions), (1,), generator=g))])
            drop.append(bool(torch.rand(1, generator=g) < cfg.uncond_prob))
            t.append(int(torch.randint(self.model.schedule.num_train_timesteps, (1,), generator=g)))
            noise.append(torch.randn(self.latent_shape, generator=g))
            mean, std = self.posterior(i)
            latents.append((mean + std * torch.randn(self.latent_shape, generator=g)) * self.model.vae.cfg.scaling_factor)
        ids, mask = caption_tokens(self.model.tokenizer, texts, torch.tensor(drop))
        return {name: value.to(world.device) for name, value in
                {"ids": ids, "mask": mask, "t": torch.tensor(t), "noise": torch.stack(noise),
                 "latents": torch.stack(latents)}.items()}


# ---- resuming: the same sums or a reason -------------------------------------------------------------------


def check_batch(cfg: TrainConfig, processes: int, examples: int) -> None:
    """`altdiff-min train`: a global batch holds each example at most once, no larger than the data
    (the loop itself reads the data stream epoch after epoch; the toy recipe's small worlds rely on it)."""
    if cfg.global_batch(processes) > examples:
        raise BadValue(f"the global batch {describe_batch(cfg, processes)} is larger than the data's {examples} "
                       f"example(s): lower --batch-size or --grad-accum")


def describe_batch(cfg: TrainConfig, processes: int) -> str:
    return (f"{cfg.global_batch(processes)} (batch {cfg.batch_size} × {processes} process(es) "
            f"× {cfg.grad_accum} accumulation)")


def check_resume(recorded: dict, cfg: TrainConfig, world: World, run: dict) -> None:
    """A resumed run must do the same sums: same base model and data, the same settings, the same global batch."""
    old = {n: recorded["config"].get(n, getattr(TrainConfig, n)) for n in SAME_ON_RESUME}  # one added since: its default
    if changed := [f"{flag(n)} {old[n]} → {getattr(cfg, n)}" for n in SAME_ON_RESUME if old[n] != getattr(cfg, n)]:
        raise BadValue(f"--resume: the run was started with other settings ({'; '.join(changed)}); resume with the "
                       f"same ones, or start a new run")

    def but_content(d: dict) -> dict:
        return {k: v for k, v in d.items() if k != "content"}

    for key in ("model", "data"):
        was, now = recorded[key], run[key]
        if key == "data" and "content" not in was:  # recorded before the content's hash was kept
            now = but_content(now)
        if key == "model":  # a run recorded before a hash was kept (weights_sha256) compares what it kept
            now = {k: now.get(k) for k in was}
        if was != now:
            why = " (the same folder, but other captions or files)" if key == "data" and but_content(was) == \
                but_content(now) else ""
            raise BadValue(f"--resume: the run's {key} was {was}, now {now}{why}; a resumed run must read the same")
    if recorded["global_batch"] != cfg.global_batch(world.size):
        raise BadValue(f"--resume: the run's global batch is {recorded.get('batch', recorded['global_batch'])}, this one "
                       f"would be {describe_batch(cfg, world.size)}: with {world.size} process(es) choose --batch-size "
                       f"and --grad-accum whose product is {recorded['global_batch'] / world.size:g}, or the sums change")


# ---- the loop ---------------------------------------------------------------------------------------------------


def train(model, data, cfg: TrainConfig, out_dir: str | None = None, world: World = World(), resume: bool = False,
          progress: bool = True) -> list[float]:
    """Train `model` (an AltDiffusion, fp32 on world.device) on `data` (dataset.CaptionedFolder or
    dataset.ToyWorld: pixels(i), texts(i), resolution); returns the loss of every step. out_dir: a run
    folder that `fine_tune` has prepared (rank 0 writes its log, checkpoints and samples; resume: go on
    from its checkpoint); None keeps nothing (the toy recipe). The model leaves in eval mode, frozen,
    with the EMA weights if cfg.ema.

    Resuming with another cfg.max_steps (`train OUT_DIR --resume --max-steps N`, to extend a finished
    run or shorten one under way) recomputes the learning-rate schedule as if the run had been started
    with N steps: from the checkpoint's step s on, the rate is lr · warmup_cosine(warmup, N)(s), so the
    cosine ends at 0 at step N (after a finished run the rate rises again from ~0 to where the longer
    cosine is at s); the steps already taken keep the rates they had, which loss.jsonl records. With
    N unchanged this is bit for bit the schedule the checkpoint holds. N below s is an error.

    loss.jsonl's rows: step, loss, lr, grad_norm (the gradient's global norm before clipping, after
    fp16 unscaling; null where not finite: a step the grad scaler skipped), seconds (training time
    since the run began, counted on across --resume)."""
    objective = Objective(model, cfg)
    trained = [getattr(model, name) for name in cfg.modules]
    trainable(*trained)
    text = model.text_encoder
    if "text_encoder" in cfg.modules and text.cfg.pre_transformation:  # m18 never runs its last layer:
        text.layers[-1].requires_grad_(False), text.transformation.requires_grad_(False)  # no gradient for DDP to wait on
    for module in trained:
        module.gradient_checkpointing = cfg.gradient_checkpointing and hasattr(module, "gradient_checkpointing")
    params = [p for module in trained for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.warmup, cfg.max_steps))
    scaler = torch.amp.GradScaler(world.device.type) if cfg.mixed_precision == "fp16" else None
    ema = [p.detach().float().clone() for p in params] if cfg.ema and world.rank == 0 else None
    start, checkpoint = 0, run_folder.load_checkpoint(out_dir, world.device) if resume else None
    if checkpoint is not None:
        start = checkpoint["step"]
        if start > cfg.max_steps:
            raise BadValue(f"--max-steps {cfg.max_steps}: the run in {out_dir} is already at step {start}; give at "
                           f"least {start}")
        for name in cfg.modules:
            getattr(model, name).load_state_dict(checkpoint["modules"][name])
        opt.load_state_dict(checkpoint["optimizer"])
        sched.load_state_dict(checkpoint["lr_schedule"])
        factor = warmup_cosine(cfg.warmup, cfg.max_steps)  # max_steps may have changed: this run's schedule
        for group, base in zip(opt.param_groups, sched.base_lrs):
            group["lr"] = base * factor(sched.last_epoch)  # what LambdaLR.get_lr computes
        sched._last_lr = [group["lr"] for group in opt.param_groups]
        if scaler is not None:
            scaler.load_state_dict(checkpoint["scaler"])
        if ema is not None:
            torch._foreach_copy_(ema, checkpoint["ema"])
        run_folder.set_rng_states(checkpoint["rng"])
    ddp = objective if world.size == 1 else nn.parallel.DistributedDataParallel(
        objective, device_ids=[world.device.index] if world.device.type == "cuda" else None)
    batches = Batches(model, data, cfg, world)
    main = world.rank == 0 and out_dir is not None
    log = run_folder.LossLog(out_dir, upto=start) if main else None
    losses = [row["loss"] for row in log.rows] if log else []

    def save(step: int) -> None:
        state = {"step": step, "modules": {n: getattr(model, n).state_dict() for n in cfg.modules},
                 "optimizer": opt.state_dict(), "lr_schedule": sched.state_dict(),
                 "scaler": scaler.state_dict() if scaler else None, "ema": ema, "rng": run_folder.rng_states(),
                 "data_position": step * batches.global_batch, "global_batch": batches.global_batch,
                 "world_size": world.size}
        run_folder.save_checkpoint(out_dir, state)
        run_folder.draw_curve(losses, os.path.join(out_dir, run_folder.CURVE))

    def sample(step: int) -> None:
        """Sample pictures by the weights the run would save now: the EMA's, when there is one. Each
        carries its record (provenance.picture_record): its generate arguments, and as "training"
        the run folder, the step and whether the weights were the EMA's (no model folder holds them)."""
        from .provenance import environment, picture_record

        for module in trained:
            module.eval()
        with torch.no_grad():
            raw = [p.detach().clone() for p in params] if ema is not None and step > 0 else None
            if raw is not None:
                torch._foreach_copy_(params, ema)
            arguments = [{"steps": cfg.sample_steps, "seed": k} for k in range(len(cfg.sample_prompts))]
            images = [model.generate(prompt, progress=False, **asked)[0]
                      for prompt, asked in zip(cfg.sample_prompts, arguments)]
            if raw is not None:
                torch._foreach_copy_(params, raw)
        for module in trained:
            module.train()
        made_in = environment(world.device, model.unet.conv_in.weight.dtype)
        training = {"run": os.path.abspath(out_dir), "step": step, "ema": raw is not None}
        run_folder.save_samples(out_dir, step, images, [
            picture_record(model, prompt, 0, asked, image.size, None, made_in, training=training)
            for prompt, asked, image in zip(cfg.sample_prompts, arguments, images)])

    skipped = 0  # steps the fp16 grad scaler skipped (overflowed gradients)
    try:
        if main and cfg.sample_every and start == 0:
            sample(0)
        precision = PRECISION[cfg.mixed_precision]
        autocast = torch.autocast(world.device.type, precision) if precision else nullcontext()
        began = time.perf_counter() - (log.seconds if log else 0.0)  # the time of the steps before a resume counts
        bar = tqdm(range(start, cfg.max_steps), initial=start, total=cfg.max_steps, desc=f"train {cfg.train}",
                   disable=not (progress and world.rank == 0))
        for step in bar:
            total = torch.zeros((), device=world.device)
            for micro in range(cfg.grad_accum):
                batch = batches(step, micro)
                last = micro == cfg.grad_accum - 1
                with nullcontext() if last or world.size == 1 else ddp.no_sync():  # all-reduce once per step
                    with autocast:
                        loss = ddp(batch)
                    scaled = loss.float() / cfg.grad_accum
                    (scaler.scale(scaled) if scaler else scaled).backward()
                total += loss.detach().float()
            if scaler:
                scaler.unscale_(opt)
            if cfg.max_grad_norm:
                norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            else:
                norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
            norm = float(norm)
            lr = sched.get_last_lr()[0]
            stepped = True
            if scaler:
                scale = scaler.get_scale()
                scaler.step(opt)  # skipped when the fp16 gradients overflowed; the scale then shrinks
                scaler.update()
                stepped = scaler.get_scale() >= scale
                skipped += not stepped
            else:
                opt.step()
            opt.zero_grad(set_to_none=True)
            if stepped:  # a skipped step does not move the schedule on (as accelerate's scheduler wrapper)
                sched.step()
            if ema is not None:
                torch._foreach_lerp_(ema, [p.detach().float() for p in params], 1 - ema_decay(step, cfg.ema))
            if world.size > 1:
                dist.all_reduce(total)
            value = total.item() / (cfg.grad_accum * world.size)
            if not math.isfinite(value):
                raise NotFinite(f"the loss became {value} at step {step + 1}: lower --lr, or use bf16 rather than fp16"
                                + (f"; the last checkpoint is in {out_dir}" if out_dir else ""))
            losses.append(value)
            bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}", **({"skipped": skipped} if scaler else {}))
            done = step + 1
            if main:
                log.append({"step": done, "loss": value, "lr": lr, "grad_norm": norm if math.isfinite(norm) else None,
                            "seconds": round(time.perf_counter() - began, 3)})
                if done % cfg.save_every == 0 or done == cfg.max_steps:
                    save(done)
                if cfg.sample_every and (done % cfg.sample_every == 0 or done == cfg.max_steps):
                    sample(done)
    finally:
        if log:
            log.close()
    if skipped and world.rank == 0:
        print(f"train: the fp16 grad scaler skipped {skipped} of {cfg.max_steps - start} steps (gradients overflowed)"
              + ("; no step updated the weights: try bf16" if skipped == cfg.max_steps - start else ""), file=sys.stderr)
    if ema is not None:  # the model leaves with the averaged weights
        with torch.no_grad():
            torch._foreach_copy_(params, ema)
    for module in trained:
        module.eval().requires_grad_(False)
        module.gradient_checkpointing = False
    return losses


def fine_tune(model_path: str, data: str, out_dir: str, cfg: TrainConfig, resolution: int | None = None,
              device: str | torch.device = "cpu", resume: bool = False, force: bool = False,
              progress: bool = True) -> str:
    """`altdiff-min train MODEL DATA OUT_DIR`: fine-tune a model folder ("toy" or a converted m9) on
    DATA (a captioned folder, or "toy") into the run folder OUT_DIR; returns OUT_DIR/model, the
    result. Under torchrun every process calls this; rank 0 checks and writes, the others follow.
    Everything is checked before the model is loaded: the settings, the model folder, OUT_DIR, the data."""
    from .dataset import open_data
    from .folder import fingerprint, read_config
    from .pipeline import check_device, check_size, load
    from .provenance import environment
    from safetensors import SafetensorError
    from .toy.data import SIZE as TOY_SIZE

    world = join_world(check_device(device))
    try:
        with ExitStack() as stack:
            config = read_config(model_path)
            resolution = (TOY_SIZE if data == "toy" else config.get("image_size", 512)) if resolution is None else resolution
            try:
                check_size(resolution, resolution, config["vae"], config["unet"])
            except BadValue as e:
                raise BadValue(f"--resolution {resolution} does not fit {model_path}: {e}") from None
            out_dir = os.path.abspath(out_dir)

            def claim() -> dict | None:
                make_folder(os.path.dirname(out_dir), "OUT_DIR")
                stack.enter_context(locked(out_dir))  # held until the run ends
                return run_folder.prepare(out_dir, force, resume)

            dataset = on_rank0(world, lambda: open_data(data, resolution, progress))  # before OUT_DIR is touched
            check_batch(cfg, world.size, len(dataset))
            recorded = on_rank0(world, claim)
            model_record = fingerprint(model_path)
            run = {"format": run_folder.FORMAT, "model": model_record, "data": dataset.describe(),
                   "config": dataclasses.asdict(cfg), "world_size": world.size,
                   "global_batch": cfg.global_batch(world.size), "batch": describe_batch(cfg, world.size)}

            # What made the run: altdiff-min's version and git commit, torch's, the device and its name,
            # the dtype the forward pass computes in (the weights and the optimizer are fp32), the threads.
            env = environment(world.device, PRECISION[cfg.mixed_precision] or torch.float32)
            run["environment"] = env

            def record() -> None:
                if recorded:
                    check_resume(recorded, cfg, world, run)
                    # the start's environment stays; each resume adds the one it runs in
                    run["environment"] = recorded.get("environment") or env
                    run["resumed"] = [*recorded.get("resumed", []), {"environment": env}]
                run_folder.write_json(os.path.join(out_dir, run_folder.RUN), run)
                if getattr(dataset, "skipped", None):  # (record runs on rank 0)
                    print(f"data: {len(dataset)} examples; skipped {dataset.report()}")

            on_rank0(world, record)
            model = load(model_path, device=world.device, dtype=torch.float32)
            losses = train(model, dataset, cfg, out_dir, world, resume=recorded is not None, progress=progress)
            result = os.path.join(out_dir, run_folder.MODEL)
            if world.rank == 0:
                try:  # a failed write (a full disk) leaves the previous OUT_DIR/model as it was (folder.write_folder)
                    model.save(result, force=True, train={"base": model_record, "data": run["data"], "config": run["config"],
                                                          "global_batch": run["global_batch"], "steps": cfg.max_steps,
                                                          "weights": "ema" if cfg.ema else "last",
                                                          "final_loss": losses[-1] if losses else None,
                                                          "environment": env})
                except (RuntimeError, SafetensorError) as e:  # safetensors' and torch's write errors are not OSErrors
                    raise run_folder.write_failed(os.path.join(result, "model.safetensors"), e) from None
            return result
    finally:
        leave_world(world)
