"""What a training run is: `TrainConfig` (every setting, its default and its help, from which
`altdiff-min train`'s flags are made), and which settings may change on --resume.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

import torch

from ..errors import BadValue
from ..model.tokenizer import check_prompt
from .objectives import PREDICTION
from ..research.lora import DEFAULT_TARGETS, TEXT_TARGETS

TRAIN = ("unet", "text_encoder", "both", "embeddings", "vae")  # what trains; "vae" is the toy's first stage


PRECISION = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def setting(default, help: str, **cli):
    """A TrainConfig field and its `altdiff-min train` flag: the help text, and argparse's choices,
    metavar, flag (another name) or cli=False (no flag). The default is written once, here."""
    return field(default=default, metadata={"help": help, **cli})


@dataclass(frozen=True)
class TrainConfig:
    train: str = setting("unet", "what trains; the VAE stays frozen; embeddings: only the rows of the --new-token "
                         "words (textual inversion)", choices=TRAIN[:4])
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
    prediction_type: str = setting("model", "what the UNet learns to predict: epsilon (the noise), v_prediction "
                                   "(v = √ᾱ·ε − √(1−ᾱ)·x0, diffusers' get_velocity), or model: what the base model's "
                                   "folder records (m9: epsilon); the result's folder records it and every sampler "
                                   "reads it", choices=PREDICTION)
    noise_offset: float = setting(0.0, "add X·n to each example's noise, n ~ N(0, 1) per channel and constant over "
                                  "the picture (diffusers' --noise_offset, e.g. 0.1: darker darks, brighter lights); "
                                  "0: none", metavar="X")
    class_prompt: str = setting("", "DreamBooth prior preservation: the class's prompt (e.g. 'a ring'); with "
                                "--class-images N, N pictures of it are drawn with the base model before training "
                                "(OUT_DIR/class_images, kept for --resume) and every step adds their loss",
                                metavar="TEXT")
    class_images: int = setting(0, "how many class pictures (with --class-prompt); each step pairs every "
                                "example with one", metavar="N")
    class_steps: int = setting(50, "DDIM steps of each class picture (guidance 7.5, seed K for picture K)")
    prior_weight: float = setting(1.0, "λ: loss = instance loss + λ · class-picture (prior) loss", metavar="LAMBDA")
    kl_weight: float = setting(1e-3, "train='vae' only: the KL term's weight", cli=False)
    seed: int = setting(0, "the data order and every random draw of the run")
    save_every: int = setting(500, "steps between checkpoints (and one at the end)")
    sample_every: int = setting(0, "steps between sample pictures in OUT_DIR/samples (0: none)")
    sample_prompts: tuple[str, ...] = setting((), "a prompt to sample (repeat the flag for more); picture K uses seed K",
                                              flag="--sample-prompt", metavar="PROMPT")
    sample_steps: int = setting(25, "DDIM steps of the sample pictures")
    new_tokens: tuple[str, ...] = setting((), "--train embeddings: a new word to learn, e.g. '<ring>' (repeat the flag "
                                          "for more); the captions must hold it", flag="--new-token", metavar="TOKEN")
    init_words: tuple[str, ...] = setting((), "--train embeddings: the word (one token) whose row each new token starts "
                                          "from: one for all, or one per --new-token", flag="--init-word", metavar="WORD")
    lora: int = setting(0, "train a LoRA of rank R (Hu et al. 2021) instead of the weights of what trains: the UNet "
                        "(--train unet or embeddings), the text encoder (--train text_encoder), or both (--train both, "
                        "diffusers' --train_text_encoder); the base stays frozen, the optimizer holds only the LoRA, the "
                        "result is OUT_DIR/lora/pytorch_lora_weights.safetensors (diffusers/peft format); 0: train every "
                        "weight", metavar="R")
    lora_alpha: float = setting(0.0, "the LoRA's alpha: its update is scaled by alpha/R (0: alpha = R, diffusers' "
                                "default)", metavar="A")
    lora_targets: tuple[str, ...] = setting(DEFAULT_TARGETS, "regexes matched against the tail of the UNet's layer "
                                            "names (as peft's target_modules); the default: every attention's q, k, "
                                            "v, out, diffusers' SD recipe (to_q/to_k/to_v/to_out.0)",
                                            metavar="PATTERN", nargs="+")
    lora_text_targets: tuple[str, ...] = setting((), "the same over the text encoder's layer names; empty: "
                                                 f"{TEXT_TARGETS[0]} (every self-attention's q, k, v, out) where the "
                                                 "text encoder takes a LoRA; given with --train embeddings, the new "
                                                 "words, a UNet LoRA and a text-encoder LoRA train together",
                                                 metavar="PATTERN", nargs="+")

    def __post_init__(self):
        if self.train not in TRAIN:
            raise BadValue(f"--train must be one of {', '.join(TRAIN[:4])}, got {self.train!r}")
        if self.mixed_precision not in PRECISION:
            raise BadValue(f"--mixed-precision must be no, bf16 or fp16, got {self.mixed_precision!r}")
        for name in ("max_steps", "batch_size", "grad_accum", "save_every", "sample_steps", "class_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise BadValue(f"{name} must be an int >= 1, got {value!r}")
        for name in ("warmup", "sample_every", "seed", "class_images", "lora"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise BadValue(f"{name} must be an int >= 0, got {value!r}")
        for name in ("lr", "weight_decay", "max_grad_norm", "kl_weight", "snr_gamma", "noise_offset", "prior_weight",
                     "lora_alpha"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 or (name == "lr" and value == 0):
                raise BadValue(f"{name} must be a finite number {'> 0' if name == 'lr' else '>= 0'}, got {value!r}")
        if not 0 <= self.ema < 1 or not 0 <= self.uncond_prob < 1:
            raise BadValue(f"ema and uncond_prob must be in [0, 1), got {self.ema} and {self.uncond_prob}")
        if self.prediction_type not in PREDICTION:
            raise BadValue(f"--prediction-type must be one of {', '.join(PREDICTION)}, got {self.prediction_type!r}")
        if not isinstance(self.class_prompt, str) or bool(self.class_prompt.strip()) != bool(self.class_images):
            raise BadValue("DreamBooth's prior preservation needs both --class-prompt TEXT and --class-images N "
                           f"(N >= 1), got {self.class_prompt!r} and {self.class_images!r}")
        if self.class_images and self.train == "vae":
            raise BadValue("--class-images: the prior loss is a diffusion loss; the VAE does not take it")
        if self.class_prompt:
            check_prompt(self.class_prompt)
        if self.sample_every and not self.sample_prompts:
            raise BadValue("--sample-every needs at least one --sample-prompt")
        for prompt in self.sample_prompts:
            if not isinstance(prompt, str):
                raise BadValue(f"sample_prompts must be strings, got {prompt!r}")
            check_prompt(prompt)
        check_words_setting(self)
        self.check_lora()

    def check_lora(self) -> None:
        if not self.lora:
            if self.lora_alpha or self.lora_targets != DEFAULT_TARGETS or self.lora_text_targets:
                raise BadValue("--lora-alpha, --lora-targets and --lora-text-targets shape a LoRA: give --lora R too")
            return
        if self.train == "vae":
            raise BadValue("--lora: the VAE takes no LoRA; train the UNet, the text encoder or both")
        if self.lora_text_targets and self.train in ("unet", "text_encoder"):
            raise BadValue(f"--lora-text-targets with --train {self.train}: a LoRA on both modules is --train both "
                           f"(on the text encoder alone, --train text_encoder)")
        for what, patterns in (("--lora-targets", self.lora_targets), ("--lora-text-targets", self.text_targets)):
            if not patterns or not all(isinstance(p, str) and p for p in patterns):
                raise BadValue(f"{what} must be non-empty patterns, got {patterns!r}")
            for pattern in patterns:
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise BadValue(f"{what} {pattern!r} is not a regular expression: {e}") from None

    @property
    def text_targets(self) -> tuple[str, ...]:
        return self.lora_text_targets or TEXT_TARGETS

    @property
    def lora_modules(self) -> tuple[str, ...]:
        """The modules that carry a LoRA (none without --lora): what trains, the UNet with new words, and the
        text encoder with them when --lora-text-targets are given."""
        if not self.lora:
            return ()
        text = self.train in ("text_encoder", "both") or bool(self.lora_text_targets)
        return ("text_encoder",) * text + ("unet",) * (self.train != "text_encoder")

    @property
    def modules(self) -> tuple[str, ...]:
        """The modules that train (in part: embeddings, the text encoder's new rows; with lora, their LoRAs)."""
        modules = {"both": ("text_encoder", "unet"), "embeddings": ("text_encoder",)}.get(self.train, (self.train,))
        return tuple(dict.fromkeys(modules + self.lora_modules))

    def global_batch(self, processes: int) -> int:
        """Examples per optimizer step: batch_size × processes × grad_accum."""
        return self.batch_size * processes * self.grad_accum


def check_words_setting(cfg: TrainConfig) -> None:
    """--new-token and --init-word go with --train embeddings (the tokenizer checks the words themselves:
    research/textual_inversion.py init_ids)."""
    if (cfg.train == "embeddings") != bool(cfg.new_tokens) or (cfg.train == "embeddings") != bool(cfg.init_words):
        raise BadValue("--train embeddings takes --new-token TOKEN and --init-word WORD, and they go with it only")
    if not all(isinstance(w, str) for w in cfg.new_tokens + cfg.init_words):
        raise BadValue(f"new_tokens and init_words must be strings, got {cfg.new_tokens!r} and {cfg.init_words!r}")


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
        elif isinstance(f.default, tuple):  # --flag A --flag B, or (nargs) --flag A B
            p.add_argument(name, action="extend" if "nargs" in meta else "append", **options)
        else:
            p.add_argument(name, type=type(f.default), **options)


def recorded_settings(recorded: dict) -> dict:
    """run.json's "config" as TrainConfig's values (JSON keeps a tuple as a list)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in recorded.items() if k in names}


def config_from_flags(args, recorded: dict | None = None) -> TrainConfig:
    """The TrainConfig of `altdiff-min train`'s flags (None: not given): a new run takes the fields'
    defaults for the others, a resumed one run.json's `recorded` settings; a flag given on --resume for
    a setting that may not change (SAME_ON_RESUME) with another value than run.json's is an error naming it."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if getattr(args, f.name, None) is not None}
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in given.items()}
    if recorded is None:
        return TrainConfig(**given)
    old = recorded_settings(recorded)
    if changed := [f"{flag(n)} {old.get(n, getattr(TrainConfig, n))} → {given[n]}" for n in SAME_ON_RESUME
                   if n in given and given[n] != old.get(n, getattr(TrainConfig, n))]:
        raise BadValue(f"--resume: the run was started with other settings ({'; '.join(changed)}); those cannot change "
                       f"on resume: drop the flag(s), or start a new run")
    try:
        return TrainConfig(**{**old, **given})
    except TypeError as e:  # a run.json edited by hand
        raise BadValue(f"--resume: run.json's settings do not make a TrainConfig ({e})") from None
