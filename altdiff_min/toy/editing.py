"""How well prompt-to-prompt edits the toy's pictures (altdiff_min.research.prompt_to_prompt), measured.

    table = measure_swaps(model, "colour")   → {lang: {"pairs", "asked", "kept", "edited", "source_right"}}
    curve = reweight_sweep(model)            → {c: {"colour", "saturation", "kept"}}: the colour word × c
    python -m altdiff_min.toy.editing        prints both (the numbers in docs/editing.md)

An edit is right when the detector (detect.py) sees in the edited picture the shape and colour the
target asks for ("asked"), and the object stayed put: its box's centre within CENTRE_PX pixels of the
source picture's and its side within SIDE_RATIO of it ("kept"); "edited" is both.
"""
from __future__ import annotations

import math
import sys
from collections.abc import Sequence

import numpy as np
import torch

from ..research.prompt_to_prompt import edit
from .data import COLOURS, LANGUAGES, SHAPES, Obj, caption, words
from .detect import INK, SPECK, as_uint8, detect, label

CENTRE_PX, SIDE_RATIO = 2.0, 0.10  # the bar: the object moves ≤ 2 px and changes size ≤ 10%


def placement(image) -> tuple[float, float, int] | None:
    """(x, y, side) of the ink's box in `image`, specks left out as detect leaves them: its centre and
    its longer side in pixels; None for a blank picture."""
    image = as_uint8(image).astype(np.float32)
    ink = (255 - image).max(axis=-1) > INK
    pieces = [p for p in label(ink) if p.sum() >= SPECK]
    if not pieces:
        return None
    ys, xs = np.nonzero(np.logical_or.reduce(pieces))
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    return (x0 + x1) / 2, (y0 + y1) / 2, int(max(x1 - x0, y1 - y0))


def kept(source, edited) -> bool:
    """Whether the edited picture's object stayed where the source's is, at its size."""
    a, b = placement(source), placement(edited)
    if a is None or b is None:
        return False
    return math.dist(a[:2], b[:2]) <= CENTRE_PX and abs(b[2] - a[2]) <= SIDE_RATIO * a[2]


def noise(model, seeds: Sequence[int]) -> torch.Tensor:
    """x_T for each seed, drawn as generate draws it for one prompt: torch.randn((1, C, h, w)) from the seed."""
    side = model.image_size // model.vae.cfg.size_multiple
    return torch.cat([torch.randn((1, model.unet.cfg.in_channels, side, side), generator=torch.Generator().manual_seed(s))
                      for s in seeds])


def swap_pairs(kind: str, targets: int = 2) -> list[tuple[str, str, str, str]]:
    """(shape, colour, new shape, new colour) of every object, each swapped to `targets` others: the
    next colours (or shapes) round the list."""
    names = list(COLOURS) if kind == "colour" else list(SHAPES)
    pairs = []
    for shape in SHAPES:
        for colour in COLOURS:
            old = colour if kind == "colour" else shape
            for k in range(1, min(targets, len(names) - 1) + 1):
                new = names[(names.index(old) + k) % len(names)]
                pairs.append((shape, colour, new, colour) if kind == "shape" else (shape, colour, shape, new))
    return pairs


def measure_swaps(model, kind: str = "colour", languages: Sequence[str] = LANGUAGES, seeds: Sequence[int] = (0, 1),
                  targets: int = 2, steps: int = 25, scale: float = 7.5, batch: int = 64, **options) -> dict:
    """Per language, over every object's `kind` swap ("colour" or "shape", `targets` new ones each) and
    seed: the fractions edited right ("asked", "kept", "edited"), and how often the source was drawn
    right ("source_right"). options: edit's (cross_replace_steps, self_replace_steps, local_blend, ...)."""
    table = {}
    for lang in languages:
        cases = [(s, c, ns, nc, seed) for seed in seeds for s, c, ns, nc in swap_pairs(kind, targets)]
        counts = dict.fromkeys(("asked", "kept", "edited", "source_right"), 0)
        for start in range(0, len(cases), batch):
            part = cases[start:start + batch]
            sources = [caption(s, c, lang) for s, c, _, _, _ in part]
            targets_ = [caption(ns, nc, lang) for _, _, ns, nc, _ in part]
            x = noise(model, [seed for *_, seed in part])
            src, out = edit(model, sources, targets_, steps=steps, scale=scale, latents=x, progress=False, **options)
            for (s, c, ns, nc, _), a, b in zip(part, src, out):
                asked, stayed = detect(b) == (ns, nc), kept(a, b)
                counts["asked"] += asked
                counts["kept"] += stayed
                counts["edited"] += asked and stayed
                counts["source_right"] += detect(a) == (s, c)
        table[lang] = {"pairs": len(cases), **{k: round(v / len(cases), 3) for k, v in counts.items()}}
    return table


def saturation(image) -> float:
    """Mean HSV saturation (max − min) / max of the ink pixels; 0 for a blank picture."""
    image = as_uint8(image).astype(np.float32)
    ink = (255 - image).max(axis=-1) > INK
    if not ink.any():
        return 0.0
    px = image[ink]
    return float(((px.max(-1) - px.min(-1)) / np.maximum(px.max(-1), 1)).mean())


def reweight_sweep(model, cs: Sequence[float] = (0, 0.5, 1, 2, 3, 4), languages: Sequence[str] = LANGUAGES,
                   seeds: Sequence[int] = (0,), steps: int = 25, scale: float = 7.5, **options) -> dict:
    """The colour word's cross-attention × c (reweighting alone) over every object, language and
    seed: per c, the fraction still detected in its colour, the mean saturation of the ink, and the
    fraction whose object stayed put."""
    curve = {}
    for c in cs:
        right = sat = stayed = n = 0
        for lang in languages:
            cases = [(s, col, seed) for seed in seeds for s in SHAPES for col in COLOURS]
            prompts = [caption(s, col, lang) for s, col, _ in cases]
            colour_words = [words(Obj(s, col), lang)["colour"] for s, col, _ in cases]
            x = noise(model, [seed for *_, seed in cases])
            for word in sorted(set(colour_words)):  # one call per weighted word (weights are per call)
                idx = [i for i, w in enumerate(colour_words) if w == word]
                src, out = edit(model, [prompts[i] for i in idx], mode="reweight", weights={word: c}, steps=steps,
                                scale=scale, latents=x[idx], progress=False, **options)
                for i, a, b in zip(idx, src, out):
                    right += detect(b)[1] == cases[i][1]
                    sat += saturation(b)
                    stayed += kept(a, b)
                    n += 1
        curve[c] = {"colour": round(right / n, 3), "saturation": round(sat / n, 3), "kept": round(stayed / n, 3)}
    return curve


def main(argv: list[str] | None = None) -> None:
    """Both tables (the paper's settings, then with value_replace_steps=0.8) and the reweighting curve."""
    from ..pipeline import load
    from .detect import format_table

    argv = sys.argv[1:] if argv is None else argv
    seeds = tuple(range(int(argv[0]) if argv else 2))
    model = load("toy")
    for kind in ("colour", "shape"):
        for options in ({}, {"value_replace_steps": 0.8}):
            said = options or "the paper's settings"
            print(f"{kind} swaps, seeds {seeds}, {said}:", flush=True)
            print(format_table(measure_swaps(model, kind, seeds=seeds, **options)), flush=True)
    print("reweighting the colour word, seed 0:", flush=True)
    for c, row in reweight_sweep(model).items():
        print(f"c={c}: {row}", flush=True)


if __name__ == "__main__":
    main()
