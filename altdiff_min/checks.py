"""The one place where configs are checked: types, ranges, finite numbers and sizes with stated limits.

Every config dataclass calls `check_config(self)` in its `__post_init__`, so a config is checked
however it is made: read from a model folder by `load`, converted from diffusers' or ldm's files,
or written in code. A bad value is a one-line BadValue / BadType naming the field, before any
module is built or any weight is read (a config with a million layers would otherwise take minutes
and gigabytes to fail).

The limits are far above any Stable Diffusion v1 / XLM-R model (m9's value in the comment) and far
below what would exhaust a machine.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing

from .errors import BadType, BadValue

# field name → (low, high), inclusive; floats: (low, high) exclusive unless listed in CLOSED_AT_ZERO.
LIMITS: dict[str, tuple[float, float]] = {
    "vocab_size": (5, 2**21),  # 250002
    "hidden": (1, 16384),  # 1024
    "layers": (1, 64),  # text encoder 24; UNet and VAE: res blocks per level, 2
    "heads": (1, 256),  # 16, 8
    "mlp": (1, 65536),  # 4096
    "max_positions": (3, 8192),  # 514
    "type_vocab_size": (1, 16),  # 1
    "pad_id": (0, 2**21),  # 1
    "project_dim": (1, 16384),  # 768
    "projection_dim": (1, 16384),  # AltCLIP's joint image-text space: 768
    "context_dim": (1, 16384),  # 768
    "in_channels": (1, 64), "out_channels": (1, 64), "latent_channels": (1, 64), "image_channels": (1, 64),
    "channels": (1, 8192),  # per level: UNet 320 … 1280, VAE 128 … 512
    "groups": (1, 1024),  # 32
    "eps": (0, 1),
    "dropout": (0, 1),
    "scaling_factor": (0, 1e3),  # 0.18215
    "num_train_timesteps": (2, 100_000),  # 1000
    "beta_start": (0, 1), "beta_end": (0, 1),  # 0.00085, 0.012
    "steps_offset": (0, 100_000),  # 1
    "patch": (1, 1024),  # vision tower: 14
    "image_size": (1, 16384),  # vision tower input: 224
}
LEVELS = (1, 8)  # entries of a per-level tuple (channels, attention): m9 has 4
CLOSED_AT_ZERO = {"dropout"}


def check_value(where: str, value, hint, field: str) -> None:
    """Raise unless `value` fits the type `hint` (int, float, bool, str literals, tuples, X | None) and
    the limits of `field`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        if value not in args:
            raise BadValue(f"{where} must be one of {', '.join(map(repr, args))}, got {value!r}")
    elif origin is tuple:
        if not isinstance(value, tuple):
            raise BadType(f"{where} must be a list, got {value!r}")
        if not LEVELS[0] <= len(value) <= LEVELS[1]:
            raise BadValue(f"{where} must have {LEVELS[0]} to {LEVELS[1]} entries, got {len(value)}")
        for i, v in enumerate(value):
            check_value(f"{where}[{i}]", v, args[0], field)
    elif hint is bool:
        if not isinstance(value, bool):
            raise BadType(f"{where} must be true or false, got {value!r}")
    elif hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise BadType(f"{where} must be an integer, got {value!r}")
        low, high = LIMITS.get(field, (-math.inf, math.inf))
        if not low <= value <= high:
            raise BadValue(f"{where} must be in [{low}, {high}], got {value}")
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise BadType(f"{where} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise BadValue(f"{where} must be a finite number, got {value}")
        low, high = LIMITS.get(field, (-math.inf, math.inf))
        if not (low <= value if field in CLOSED_AT_ZERO else low < value) or not value < high:
            bracket = "[" if field in CLOSED_AT_ZERO else "("
            raise BadValue(f"{where} must be in {bracket}{low:g}, {high:g}), got {value:g}")


# Image to image's strength, the fraction of the route that runs: 0 would run no step and change nothing.
# img2img.check_strength enforces it; generate's --help and every error say it.
STRENGTH_RANGE = "(0, 1]"


def in_strength_range(strength: float) -> bool:
    return 0 < strength <= 1  # False for NaN too


IMAGE_SIZE = (8, 16384)  # a model folder's image_size (a VAE config's sample_size): m9's is 512


def check_int(name: str, value, low: int, high: int) -> None:
    """Raise unless value is an int (not a bool) in [low, high]: for single values outside a config
    class (a model folder's image size and tokenizer length)."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BadValue(f"{name} must be an integer in [{low}, {high}], got {value!r}")


def check_config(cfg) -> None:
    """Check every field of a config dataclass against its annotation and LIMITS, then the rules
    between fields (RULES)."""
    cls = type(cfg)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cfg):
        check_value(f"{cls.__name__}.{f.name}", getattr(cfg, f.name), hints[f.name], f.name)
    for rule in RULES.get(cls.__name__, ()):
        if problem := rule(cfg):
            raise BadValue(f"{cls.__name__}: {problem}")


def divides(cfg, widths: tuple[int, ...], by: tuple[str, ...]) -> str | None:
    for w in widths:
        for name in by:
            if w % getattr(cfg, name):
                return f"{w} channels do not divide into {name} = {getattr(cfg, name)}"
    return None


RULES = {
    "TextEncoderConfig": [
        lambda c: divides(c, (c.hidden,), ("heads",)),
        lambda c: c.pad_id >= c.vocab_size and f"pad_id {c.pad_id} is not below vocab_size {c.vocab_size}",
    ],
    "UNetConfig": [
        lambda c: len(c.attention) != len(c.channels)
        and f"attention has {len(c.attention)} entries for {len(c.channels)} levels",
        lambda c: divides(c, c.channels, ("groups", "heads")),
    ],
    "VAEConfig": [lambda c: divides(c, c.channels, ("groups",))],
    "VisionConfig": [
        lambda c: divides(c, (c.hidden,), ("heads",)),
        lambda c: c.image_size % c.patch and f"image_size {c.image_size} is not a multiple of patch {c.patch}",
    ],
    "ScheduleConfig": [
        lambda c: c.beta_start >= c.beta_end and f"beta_start {c.beta_start} must be below beta_end {c.beta_end}",
        lambda c: c.steps_offset >= c.num_train_timesteps
        and f"steps_offset {c.steps_offset} must be below num_train_timesteps {c.num_train_timesteps}",
    ],
}
