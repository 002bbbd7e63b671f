"""Training: the maths every recipe shares, and the one loop that runs it, on one process or under torchrun.

The maths (the targets, weights and DreamBooth's prior loss: objectives.py)
    diffusion_loss   ε-prediction (Ho et al. 2020, eq. 14, unweighted; or v-prediction, --prediction-type):
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
                          posterior sample drawn from a generator seeded by (seed, s, j) (and last its
                          --noise-offset draw); with --class-prompt, place j's class example too, from
                          its own stream and generator (seed, 2, s, j) (prior.py); with several DATA
                          sources, the stream draws each position's source by weight (mixing.py)
    micro-step a, rank r: places (a·processes + r)·batch_size … + batch_size

So the maths depends on the seed, the step and the place in the global batch only, never on how many
processes share it: one process with batch 2B and two with batch B do the same sums.
"""
from __future__ import annotations

import math
import os
import sys
import time
from contextlib import nullcontext
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

from ..errors import BadValue, NotFinite
from ..model.unet import UNet
from ..model.vae import VAE
from ..research import textual_inversion
from ..sampling.schedule import ScheduleConfig, add_noise
from . import lora, objectives, run_folder
from .config import PRECISION, TrainConfig
from .distributed import World

# ---- the maths ------------------------------------------------------------------------------------------


def trainable(*modules: torch.nn.Module) -> None:
    """Undo what `load` does for inference (eval mode, requires_grad off) on the modules to train."""
    for module in modules:
        module.train().requires_grad_(True)


def diffusion_loss(unet: UNet, context: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                   schedule: ScheduleConfig = ScheduleConfig(), snr_gamma: float = 0.0,
                   prior_weight: float | None = None) -> torch.Tensor:
    """mean ‖UNet(x_t, t, context) − target‖² over every element of the batch: latents, noise (B, 4, h, w)
    in the sampler's scale (VAE latents × scaling_factor), t (B,) integer timesteps, context (B, 77, D);
    the target ε or v by schedule.prediction_type (objectives.target). snr_gamma γ > 0: each example's
    mean error weighted by Min-SNR-γ, then averaged; prior_weight: DreamBooth's instance + λ · class
    loss over the batch's two halves (objectives.reduce)."""
    x_t = add_noise(latents, noise, t, schedule)
    error = (unet(x_t, t, context).float() - objectives.target(latents, noise, t, schedule).float()).pow(2)
    return objectives.reduce(error, t, schedule, snr_gamma, prior_weight)


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


# ---- the random draws: functions of (seed, step, place) only -------------------------------------------


def generator(seed: int, *key: int) -> torch.Generator:
    """A CPU generator seeded from (seed, key…) through numpy's SeedSequence: independent streams."""
    state = np.random.SeedSequence(seed, spawn_key=key).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 ^ int(state[1]))


class Stream:
    """Position p of the data stream → example index: epoch p // n is a permutation seeded by (seed, epoch);
    key: another stream of the same seed (a mixture's sources, DreamBooth's class pictures)."""

    def __init__(self, n: int, seed: int, key: tuple[int, ...] = ()):
        self.n, self.seed, self.key, self.orders = n, seed, key, {}

    def __getitem__(self, p: int) -> int:
        epoch = p // self.n
        if epoch not in self.orders:
            self.orders = {e: o for e, o in self.orders.items() if e >= epoch - 1}
            self.orders[epoch] = torch.randperm(self.n, generator=generator(self.seed, 0, epoch, *self.key)).tolist()
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
                              self.cfg.snr_gamma, self.cfg.prior_weight if self.cfg.class_images else None)


class Batches:
    """Rank `world.rank`'s micro-batches: examples from the data stream, with their draws."""

    def __init__(self, model, data, cfg: TrainConfig, world: World):
        self.model, self.data, self.cfg, self.world = model, data, cfg, world
        self.stream = data.order(cfg.seed) if hasattr(data, "order") else Stream(len(data), cfg.seed)  # mixing.py
        self.classes = data.class_order(cfg.seed) if hasattr(data, "class_order") else None  # prior.py
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
        if self.classes is not None:  # DreamBooth: the places' class examples after them, with their own draws
            examples += [self.classes[step * self.global_batch + j] for j in places]
            gens += [generator(cfg.seed, 2, step, j) for j in places]
        for i, g in zip(examples, gens):  # the order of the draws is part of the run's definition
            captions = self.data.texts(i)
            texts.append(captions[int(torch.randint(len(captions), (1,), generator=g))])
            drop.append(bool(torch.rand(1, generator=g) < cfg.uncond_prob))
            t.append(int(torch.randint(self.model.schedule.num_train_timesteps, (1,), generator=g)))
            noise.append(torch.randn(self.latent_shape, generator=g))
            mean, std = self.posterior(i)
            latents.append((mean + std * torch.randn(self.latent_shape, generator=g)) * self.model.vae.cfg.scaling_factor)
            noise[-1] = objectives.offset_noise(noise[-1], g, cfg.noise_offset)
        ids, mask = caption_tokens(self.model.tokenizer, texts, torch.tensor(drop))
        return {name: value.to(world.device) for name, value in
                {"ids": ids, "mask": mask, "t": torch.tensor(t), "noise": torch.stack(noise),
                 "latents": torch.stack(latents)}.items()}


# ---- resuming: the same sums or a reason -------------------------------------------------------------------


# ---- the loop ---------------------------------------------------------------------------------------------------


def train(model, data, cfg: TrainConfig, out_dir: str | None = None, world: World = World(), resume: bool = False,
          progress: bool = True) -> list[float]:
    """Train `model` (an AltDiffusion, fp32 on world.device) on `data` (dataset.CaptionedFolder or
    toy.world.ToyWorld: pixels(i), texts(i), resolution); returns the loss of every step. out_dir: a run
    folder that `fine_tune` has prepared (rank 0 writes its log, checkpoints and samples; resume: go on
    from its checkpoint); None keeps nothing (the toy recipe). The model leaves in eval mode, frozen,
    with the EMA weights if cfg.ema. With cfg.lora only a LoRA on the UNet trains (training/lora.py); the
    UNet leaves with it attached, unmerged (research.lora: merge_lora, remove_lora; save_lora writes it).

    Resuming with another cfg.max_steps (`train OUT_DIR --resume --max-steps N`, to extend a finished
    run or shorten one under way) recomputes the learning-rate schedule as if the run had been started
    with N steps: from the checkpoint's step s on, the rate is lr · warmup_cosine(warmup, N)(s), so the
    cosine ends at 0 at step N (after a finished run the rate rises again from ~0 to where the longer
    cosine is at s); the steps already taken keep the rates they had, which loss.jsonl records. With
    N unchanged this is bit for bit the schedule the checkpoint holds. N below s is an error.

    loss.jsonl's rows: step, loss, lr, grad_norm (the gradient's global norm before clipping, after
    fp16 unscaling; null where not finite: a step the grad scaler skipped), seconds (training time
    since the run began, counted on across --resume)."""
    model.schedule = objectives.with_prediction(model.schedule, cfg.prediction_type)  # what it learns, saves, samples
    objective = Objective(model, cfg)
    trained = [getattr(model, name) for name in cfg.modules]
    whole = [getattr(model, name) for name in cfg.modules  # weight by weight (the new rows: whole, then frozen but them)
             if name not in cfg.lora_modules or (name == "text_encoder" and cfg.train == "embeddings")]
    trainable(*whole)
    text = model.text_encoder
    if cfg.train == "embeddings":  # textual inversion: the new words' rows alone
        textual_inversion.train_only_new_rows(text)
    params = [p for module in whole for p in module.parameters() if p.requires_grad]
    if cfg.lora:  # LoRAs, their bases frozen (training/lora.py); with embeddings, rows and LoRAs train together
        params += lora.attach(model, cfg, lambda m, k: generator(cfg.seed, 2 + m, k))
    if "text_encoder" in cfg.modules and text.cfg.pre_transformation:  # m18 never runs its last layer:
        text.layers[-1].requires_grad_(False), text.transformation.requires_grad_(False)  # no gradient for DDP to wait on
        params = [p for p in params if p.requires_grad]
    for module in trained:
        module.gradient_checkpointing = cfg.gradient_checkpointing and hasattr(module, "gradient_checkpointing")
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
        lora.load_weights(model, cfg, checkpoint["modules"])
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
        state = {"step": step, "modules": lora.weights(model, cfg),
                 "optimizer": opt.state_dict(), "lr_schedule": sched.state_dict(),
                 "scaler": scaler.state_dict() if scaler else None, "ema": ema, "rng": run_folder.rng_states(),
                 "data_position": step * batches.global_batch, "global_batch": batches.global_batch,
                 "world_size": world.size}
        run_folder.save_checkpoint(out_dir, state)
        run_folder.draw_curve(losses, os.path.join(out_dir, run_folder.CURVE))

    def sample(step: int) -> None:
        """Sample pictures by the weights the run would save now: the EMA's, when there is one. Each
        carries its record (provenance.picture_record): its generate arguments, and as "training"
        the run folder, the step, whether the weights were the EMA's (no model folder holds them), the LoRA's shape."""
        from ..storage.provenance import environment, picture_record

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
        training = {"run": os.path.abspath(out_dir), "step": step, "ema": raw is not None,
                    **({"lora": lora.record(cfg)} if cfg.lora else {})}
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


