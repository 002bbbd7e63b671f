"""The measures a sweep puts in its table: a metric is a function (picture: PIL.Image, prompt: str)
→ {name: number or None}, computed from the saved picture. Built in: "toy" (the toy detector: colour
and shape for one object; both objects and their relation for two; and the graded scores, ΔE, IoU
and position) and "clip" (the multilingual CLIP
score, vision/score.py); any other is "package.module:function".
"""
from __future__ import annotations

import importlib
from typing import Callable

from ..errors import BadValue

Metric = Callable[..., dict]


def toy_metric(picture, prompt: str) -> dict:
    """The toy detector on the picture against what the prompt asks (any language, any phrasing:
    data.read_caption). One object: "colour" and "shape", each 1 when right. Two: "objects", 1 when
    exactly the two asked for are drawn (colour and shape), and "relation", 1 when they are also where
    the prompt puts them (None when the objects are not right). Then the graded scores (toy.detect.grade):
    "delta_e" (CIEDE2000 from the asked colour), "iou" (fit to the asked shape), each the mean of a
    pair's two, and for a pair "position" (pixels from the asked relation, 0 when it reads right);
    None for a blank picture or a pair drawn with other than two objects. None where a value does not
    apply, and everywhere for a prompt that is not a toy caption."""
    from ..toy.data import read_caption
    from ..toy.detect import detect, detect_scene, grade, judge_pair
    from ..toy.graded import SCORES

    values = dict.fromkeys(("colour", "shape", "objects", "relation") + SCORES)  # the columns, in this order
    asked = read_caption(prompt)
    if asked is None:
        return values
    if asked.second is None:
        shape, colour = detect(picture)
        return values | {"colour": float(colour == asked.first.colour), "shape": float(shape == asked.first.shape)} \
            | grade(picture, asked)
    objects, where = judge_pair(detect_scene(picture), asked)
    return values | {"objects": float(objects), "relation": None if where is None else float(where)} | grade(picture, asked)


def clip_metric(path: str | None, device="cpu") -> Metric:
    """The metric "clip": the multilingual CLIP score of the picture and its prompt, by the AltCLIP
    folder `path`. The model is loaded at the first picture: once per sweep, only by the process that
    writes the table, and not when read_spec merely checks the name."""
    scorer = None

    def clip(picture, prompt: str) -> dict:
        from ..vision.score import load_clip

        nonlocal scorer
        if scorer is None:
            scorer = load_clip(path, device)
        return {"clip_score": scorer.score([picture], [prompt]).item()}

    return clip


BUILT_IN_METRICS = ("toy", "clip")


def find_metric(name: str, clip_model: str | None = None, device="cpu") -> Metric:
    """A built-in metric, or the function 'package.module:function' names. "clip" is made for one
    sweep: its AltCLIP folder (the spec's clip_model), on the sweep's device."""
    if name == "toy":
        return toy_metric
    if name == "clip":
        return clip_metric(clip_model, device)
    module, _, function = name.partition(":")
    if not function:
        raise BadValue(f"metric {name!r}: not a built-in ({', '.join(BUILT_IN_METRICS)}) nor 'package.module:function'")
    try:
        return getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError) as e:
        raise BadValue(f"metric {name!r} cannot be imported ({e})") from None
