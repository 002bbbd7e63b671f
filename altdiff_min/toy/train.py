"""Train the toy AltDiffusion from scratch on the synthetic shapes: `altdiff-min train-toy OUT_DIR`.

    captions → a sentencepiece unigram tokenizer (XLM-R's kind), trained on every caption there is
    images   → 1. the VAE: L1 + L2 reconstruction and a small KL term; then scaling_factor = 1/std(latents)
    latents  → 2. text encoder and UNet together: ε-prediction MSE at uniform t of the 1000-step
                  schedule, with 10% empty captions so that classifier-free guidance has an
                  unconditional model to steer away from (Ho & Salimans 2022)
             → AltDiffusion(...).save(OUT_DIR): a model folder like the converter's, for `load`

Both stages are runs of the shared training loop (altdiff_min/training/train.py, `train`) over the toy world:
world.ToyWorld (one object a picture, toy-one's) or, with world="scenes" (--world scenes),
world.SceneWorld (one or two objects, size words, relations: the shipped toy's). This file holds only the recipe: the
configs, the two stages' settings, the order.

The modules are altdiff-min's own, in small configurations (`toy_configs`); everything else about
the real model (tokenizer ids, 77 tokens, schedule, 8× VAE, guidance) is unchanged. About 50 minutes
on two CPU cores; fixed seeds make a run repeatable.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import os
import re
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import sentencepiece as spm
import torch

from ..errors import BadType, BadValue
from ..model.text_encoder import TextEncoder, TextEncoderConfig
from ..model.tokenizer import Tokenizer
from ..model.unet import UNet, UNetConfig
from ..model.vae import VAE, VAEConfig
from ..pipeline import AltDiffusion
from ..sampling.schedule import ScheduleConfig
from ..storage.folder import destination
from ..training.config import TrainConfig
from ..training.distributed import World, barrier, join_world, leave_world, on_rank0
from ..training.train import train
from .data import COLOURS, SHAPES, SIZE, all_captions, scene_corpus, vocabulary
from .detect import evaluate as measure_accuracy
from .detect import evaluate_scenes, format_table, vae_readback
from .world import SceneWorld, ToyWorld

EVAL_SCALE, EVAL_STEPS = 7.5, 25  # guidance and DDIM steps of the accuracy measured after training
# The worlds a recipe trains on. "shapes": one unsized object a picture (world.ToyWorld), toy-one's.
# "scenes" (the shipped toy's): a third lone objects (a size word two times in three), two thirds pairs with their
# relation (world.SceneWorld): pairs are the harder half (two bindings and a relation to learn), lone
# objects keep the first world's captions true. Its tokenizer sees the size and relation words too.
WORLDS = ("shapes", "scenes")
VOCAB = {"shapes": 250, "scenes": 400}  # the tokenizer's target vocabulary (a bound: hard_vocab_limit is off)


@dataclass(frozen=True)
class Recipe:
    """Everything a training run depends on besides the seed (recorded in the folder's config.json)."""
    images: int = 5400  # rendered once; "shapes": in equal numbers per (shape, colour), 300 each
    vae_steps: int = 600
    vae_batch: int = 32
    vae_lr: float = 2e-3
    kl_weight: float = 1e-3  # small: the latents stay informative, but their scale stays near 1
    unet_steps: int = 4000  # 1500 left colours muddled under guidance 7.5 (35% right); 4000 gets them all
    unet_batch: int = 128
    unet_lr: float = 2e-3  # text encoder and UNet alike; warm-up, then cosine decay to 0
    warmup: int = 50
    uncond_prob: float = 0.1  # captions replaced by "" for classifier-free guidance
    snr_gamma: float = 0.0  # Min-SNR-γ loss weights (train.diffusion_loss); 0: the plain ε-prediction loss
    latent_channels: int = 4  # m9's 4; 8 keeps more of the smallest objects (14 px, under two latent cells)
    unet_channels: tuple[int, ...] = (32, 64, 64)  # the UNet's width per level (8×8, 4×4, 2×2 latents)
    text_layers: int = 2  # the text encoder's transformer layers
    world: str = "shapes"  # what the pictures and captions show: one of WORLDS

    def __post_init__(self):
        if self.world not in WORLDS:
            raise BadValue(f"world must be one of {WORLDS}, got {self.world!r}")
        if (not isinstance(self.unet_channels, tuple) or not self.unet_channels
                or not all(type(c) is int and c > 0 and c % 8 == 0 for c in self.unet_channels)):
            raise BadValue(f"unet_channels must be a tuple of positive multiples of 8 (GroupNorm's 8 groups), "
                           f"got {self.unet_channels!r}")
        for f in (f for f in dataclasses.fields(self) if f.type in ("int", "float")):
            value, positive_int = getattr(self, f.name), f.type == "int"
            if isinstance(value, bool) or not isinstance(value, int if positive_int else (int, float)):
                raise BadType(f"{f.name} must be {'an int' if positive_int else 'a number'}, got {value!r}")
        for name in ("images", "vae_steps", "vae_batch", "unet_steps", "unet_batch", "vae_lr", "unet_lr",
                     "latent_channels", "text_layers"):
            if getattr(self, name) <= 0:
                raise BadValue(f"{name} must be positive, got {getattr(self, name)}")
        if self.images < len(SHAPES) * len(COLOURS):
            raise BadValue(f"images must be at least {len(SHAPES) * len(COLOURS)}, one per shape and colour")
        if self.kl_weight < 0 or self.warmup < 0 or self.snr_gamma < 0 or not 0 <= self.uncond_prob < 1:
            raise BadValue("kl_weight, warmup and snr_gamma must be >= 0 and uncond_prob in [0, 1)")


# What a world changes in the recipe above. Scenes: binding two objects wants both the batch and the
# updates (docs/toy.md), so twice the pictures (fresh ones keep the longer run from memorising) and
# 9,000 UNet steps of 128, about 1.5 hours of a 2-core CPU.
WORLD_RECIPES = {"shapes": {}, "scenes": dict(images=21600, vae_steps=800, unet_steps=9000)}


def recipe_for(world: str = "shapes", **changes) -> Recipe:
    """The world's recipe (Recipe's defaults, then WORLD_RECIPES[world]) with `changes` on top."""
    return Recipe(world=world, **{**WORLD_RECIPES.get(world, {}), **changes})


def toy_configs(vocab_size: int, r: Recipe = Recipe()) -> tuple[TextEncoderConfig, UNetConfig, VAEConfig]:
    """m9's three modules, shrunk to the recipe's sizes: by default ~0.1 M + 1.8 M + 1 M parameters
    instead of 560 M + 860 M + 84 M."""
    text = TextEncoderConfig(vocab_size=vocab_size, hidden=64, layers=r.text_layers, heads=4, mlp=256,
                             max_positions=77 + 2, project_dim=64)  # 77 tokens after the pad id, as m9
    unet = UNetConfig(in_channels=r.latent_channels, out_channels=r.latent_channels, channels=r.unet_channels,
                      layers=1, attention=(True,) * len(r.unet_channels), heads=4, context_dim=text.project_dim, groups=8)
    vae = VAEConfig(channels=(16, 32, 64, 64), layers=1, groups=8,  # four levels: 8× down, as m9's
                    latent_channels=r.latent_channels)
    return text, unet, vae


def train_tokenizer(path: str, world: str = "shapes") -> Tokenizer:
    """A unigram model on the world's captions (every one of "shapes", data.scene_corpus of "scenes"),
    plus each word of its tables on its own so that words, not whole phrases, become pieces (CJK
    captions have no spaces to split on). For "scenes" the captions are also cut around those words
    while training (pieces never cross the cuts): else the many colour-size-shape phrases of zh and ja
    became pieces of their own ("橙色小正方形": one token, nothing for attention to tell apart)."""
    words, captions, extra = vocabulary(world), all_captions() if world == "shapes" else [], {}
    if world == "scenes":
        cut = re.compile("|".join(map(re.escape, sorted(set(words), key=len, reverse=True))))
        captions = [cut.sub(lambda m: f"\t{m.group(0)}\t", text) for text in scene_corpus()]
        extra = {"pretokenization_delimiter": "\t"}
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(captions + words * 10), model_writer=buf,
                                   vocab_size=VOCAB[world], model_type="unigram", character_coverage=1.0,
                                   hard_vocab_limit=False, num_threads=1, minloglevel=2, **extra)
    with open(path, "wb") as f:
        f.write(buf.getvalue())
    return Tokenizer(path)


def stage_configs(r: Recipe, seed: int, processes: int = 1) -> tuple[TrainConfig, TrainConfig]:
    """The two stages as runs of the shared loop: the VAE, then text encoder and UNet together. The
    recipe's batches are global: each of `processes` takes its share."""
    for name in ("vae_batch", "unet_batch"):
        if getattr(r, name) % processes:
            raise BadValue(f"{name} {getattr(r, name)} does not split into {processes} processes' equal shares")
    vae = TrainConfig(train="vae", max_steps=r.vae_steps, batch_size=r.vae_batch // processes, lr=r.vae_lr,
                      warmup=r.warmup, weight_decay=0.0, max_grad_norm=0.0, kl_weight=r.kl_weight, seed=seed)
    diffusion = TrainConfig(train="both", max_steps=r.unet_steps, batch_size=r.unet_batch // processes, lr=r.unet_lr,
                            warmup=r.warmup, weight_decay=0.0, max_grad_norm=1.0, uncond_prob=r.uncond_prob,
                            snr_gamma=r.snr_gamma, seed=seed)
    return vae, diffusion


@contextmanager
def flush_denormals():
    """Round subnormal floats to zero while training. Early in training some activations and
    gradients underflow into the subnormal range, where x86 CPUs are ~100× slower: without this,
    some steps took 15 s instead of 0.5 s."""
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def curve(losses: list[float], points: int = 50) -> list[float]:
    """The loss averaged over `points` equal stretches of training: the log kept in config.json."""
    return [round(float(np.mean(chunk)), 5) for chunk in np.array_split(np.array(losses), min(points, len(losses)))]


def train_toy(out_dir: str, seed: int = 0, force: bool = False, evaluate: bool = True, progress: bool = True,
              **recipe) -> AltDiffusion:
    """Train the toy model and save it as a model folder at out_dir (refused if it exists, unless
    force). recipe: fields of `Recipe` to change, e.g. unet_steps=3000 or world="scenes" (then that
    world's defaults, WORLD_RECIPES, apply to the fields not given). evaluate: measure the
    finished model with the detector (`detect.evaluate`, ~30 s) and record the table in config.json.
    Returns the trained model.

    Under torchrun (`torchrun --nproc-per-node N -m altdiff_min train-toy OUT`) the processes share
    each stage's global batches (the shared loop's sums do not depend on how many there are) and
    rank 0 measures and writes the folder. On this project's 2-core CPU it does not pay: two
    one-thread processes ran the VAE stage 1.25× as fast as one two-thread process, but the UNet
    stage only 0.8× as fast (the gradients' all-reduce competes for the two cores)."""
    r = recipe_for(**recipe)  # bad values are refused here, before any work
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise BadValue(f"seed must be an int >= 0, got {seed!r}")
    world = join_world("cpu")
    try:
        runs = stage_configs(r, seed, world.size)  # refused if the batches do not split into the processes' shares
        on_rank0(world, lambda: check_destination(out_dir, force))  # refused now, not after an hour of training
        return run_recipe(r, runs, out_dir, seed, force, evaluate, progress and world.rank == 0, world)
    finally:
        leave_world(world)


@torch.no_grad()
def latent_scale(vae: VAE, data) -> float:
    """1 / std of the posterior means over all the data: the UNet then sees latents of unit variance."""
    latents = torch.cat([vae.encode(torch.stack([data.pixels(int(i)) for i in chunk]))[0]
                         for chunk in torch.arange(len(data)).split(256)])
    return 1 / latents.std().item()


def check_destination(out_dir: str, force: bool) -> None:
    with destination(out_dir, force):
        pass


def run_recipe(r: Recipe, runs: tuple[TrainConfig, TrainConfig], out_dir: str, seed: int, force: bool,
               evaluate: bool, progress: bool, world: World) -> AltDiffusion:
    torch.manual_seed(seed)  # the modules' initial weights
    vae_run, diffusion_run = runs
    with tempfile.TemporaryDirectory() as tmp, flush_denormals():
        path = os.path.join(tmp, "sentencepiece.bpe.model")
        pieces = on_rank0(world, lambda: train_tokenizer(path, r.world) and open(path, "rb").read())
        if world.rank:  # the same tokenizer in every process: rank 0's
            with open(path, "wb") as f:
                f.write(pieces)
        tokenizer = Tokenizer(path)
        text_cfg, unet_cfg, vae_cfg = toy_configs(tokenizer.vocab_size, r)
        model = AltDiffusion(tokenizer=tokenizer, text_encoder=TextEncoder(text_cfg), unet=UNet(unet_cfg),
                             vae=VAE(vae_cfg), schedule=ScheduleConfig(), image_size=SIZE)
        data = ToyWorld(r.images, seed) if r.world == "shapes" else SceneWorld(r.images, seed)

        start = time.perf_counter()
        vae_losses = train(model, data, vae_run, world=world, progress=progress)
        model.vae.cfg = dataclasses.replace(vae_cfg, scaling_factor=on_rank0(world, lambda: latent_scale(model.vae, data)))
        minutes = {"vae": (time.perf_counter() - start) / 60}
        readback = on_rank0(world, lambda: vae_readback(model.vae, data)) if r.world == "scenes" else None  # is 8× enough?
        if readback is not None and progress:
            print(f"the VAE keeps what the detector reads in: {readback}")

        start = time.perf_counter()
        unet_losses = train(model, data, diffusion_run, world=world, progress=progress)
        minutes["unet"] = (time.perf_counter() - start) / 60
        for module in (model.text_encoder, model.unet, model.vae):
            module.half().float()  # rounded to the fp16 it is stored in, so the accuracy below is the shipped model's
        if world.rank == 0:
            info = {"seed": seed, "recipe": dataclasses.asdict(r), "processes": world.size,
                    "minutes": {k: round(v, 2) for k, v in minutes.items()},
                    "loss": {"vae": curve(vae_losses), "unet": curve(unet_losses)}}
            if readback is not None:
                info["vae_readback"] = readback
            if evaluate:
                info["accuracy"] = {"scale": EVAL_SCALE, "steps": EVAL_STEPS, "sampler": "ddim",
                                    "per_language": measure_accuracy(model, EVAL_SCALE, EVAL_STEPS)}
                print(format_table(info["accuracy"]["per_language"]))
                if r.world == "scenes":  # every language × data.compositions(), detect.evaluate_scenes
                    info["accuracy"]["scenes"] = evaluate_scenes(model, scale=EVAL_SCALE, steps=EVAL_STEPS)
                    print(format_table(info["accuracy"]["scenes"]))
            # Stored in fp16 to halve the package (~6 MB), loaded back in fp32 unless a dtype is asked for.
            model.save(out_dir, force=force, dtype=torch.float16, default_dtype="float32", toy=info)
        barrier(world)
    model.tokenizer = Tokenizer(os.path.join(out_dir, "sentencepiece.bpe.model"))  # the temporary file is gone
    return model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `altdiff-min train-toy` (the CLI adds them to its sub-command's parser)."""
    parser.add_argument("out_dir", help="the model folder to write (config.json, model.safetensors, tokenizer)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the data, the initial weights and training")
    parser.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    world = " (default: the world's recipe, shapes / scenes: {})"
    for flag, kind, text in (("--vae-steps", int, "VAE training steps"),
                             ("--unet-steps", int, "text encoder + UNet training steps"),
                             ("--unet-batch", int, "text encoder + UNet global batch (shared among torchrun's processes)"),
                             ("--images", int, "pictures rendered for training"),
                             ("--snr-gamma", float, "Min-SNR-γ loss weights of the UNet stage (0: unweighted)"),
                             ("--latent-channels", int, "the VAE's latent channels"),
                             ("--text-layers", int, "the text encoder's layers")):
        name = flag[2:].replace("-", "_")
        defaults = " / ".join(str(getattr(recipe_for(w), name)) for w in WORLDS)
        parser.add_argument(flag, type=kind, default=None, help=text + world.format(defaults))
    parser.add_argument("--unet-channels", type=int, nargs="+", default=None,
                        help=f"the UNet's channels per level, e.g. 48 96 96 (default: {' '.join(map(str, Recipe.unet_channels))})")
    parser.add_argument("--world", choices=WORLDS, default=Recipe.world,
                        help="shapes: one object a picture (toy-one's); scenes: one or two, sizes, relations (the shipped toy's)")
    parser.add_argument("--no-eval", action="store_true", help="skip the accuracy measurement at the end")


def run(args: argparse.Namespace) -> int:
    """Run `altdiff-min train-toy` with parsed arguments; returns the exit status."""
    recipe = {f.name: getattr(args, f.name) for f in dataclasses.fields(Recipe)
              if getattr(args, f.name, None) is not None}  # each flag given, over the world's recipe
    if "unet_channels" in recipe:
        recipe["unet_channels"] = tuple(recipe["unet_channels"])  # nargs="+" gives a list
    train_toy(args.out_dir, seed=args.seed, force=args.force, evaluate=not args.no_eval, **recipe)
    if os.environ.get("RANK", "0") == "0":
        print(f"wrote {args.out_dir}")
    return 0
