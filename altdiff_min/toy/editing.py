"""Editing research measured on the toy: prompt-to-prompt (altdiff_min.research.prompt_to_prompt), word
heat maps (altdiff_min.research.daam) and inversion (altdiff_min.inversion).

    table = measure_swaps(model, "colour")   → {lang: {"pairs", "asked", "kept", "edited", "source_right"}}
    table = measure_inverted_swaps(model)    → the same from null-text-inverted rendered pictures
    curve = reweight_sweep(model)            → {c: {"colour", "saturation", "kept"}}: the colour word × c
    ious = toy_word_iou(model)               → {lang: {"iou", "shifted", "pictures"}}: the shape word's map
    errors = measure_inversion(model)        → reconstruction error and time of the VAE, DDIM, null-text
    python -m altdiff_min.toy.editing        prints the first two (the numbers in docs/editing.md)

An edit is right when the detector (detect.py) sees in the edited picture the shape and colour the
target asks for ("asked"), and the object stayed put: its box's centre within CENTRE_PX pixels of the
source picture's and its side within SIDE_RATIO of it ("kept"); "edited" is both.
"""
from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import BadValue
from ..inversion import Inversion, ddim_inversion_route, null_text, picture_latents, sample_inverted
from ..research.daam import THRESHOLD, iou, shifted, word_heat_map
from ..research.instruments import capture_attention
from ..research.prompt_to_prompt import edit
from ..sampling.guidance import guided_eps
from ..sampling.schedule import timesteps
from ..storage import pictures
from .data import COLOURS, LANGUAGES, SHAPES, Obj, caption, render, words
from .detect import INK, SPECK, as_uint8, detect, label, object_mask

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
            grade(counts, [case[:4] for case in part], src, src, out)
        table[lang] = {"pairs": len(cases), **{k: round(v / len(cases), 3) for k, v in counts.items()}}
    return table


def grade(counts: dict, cases, places, sources, edited) -> None:
    """Adds to counts each (shape, colour, new shape, new colour) case's grades: the edit shows what was
    asked, kept the place and size of its picture in `places` (both: edited), and the source row is
    what it was asked to be."""
    for (s, c, ns, nc), place, a, b in zip(cases, places, sources, edited):
        asked, stayed = detect(b) == (ns, nc), kept(place, b)
        counts["asked"] += asked
        counts["kept"] += stayed
        counts["edited"] += asked and stayed
        counts["source_right"] += detect(a) == (s, c)


def objects(start: int, stop: int) -> list[tuple[str, str]]:
    """The toy's objects start … stop − 1 in turn: every shape in the first colour, then the next colour."""
    return [(SHAPES[k % len(SHAPES)], list(COLOURS)[(k // len(SHAPES)) % len(COLOURS)]) for k in range(start, stop)]


def measure_inverted_swaps(model, settings: dict[str, dict] | None = None, kinds: Sequence[str] = ("colour", "shape"),
                           languages: Sequence[str] = LANGUAGES, per_language: int = 6, steps: int = 25,
                           scale: float = 7.5, seed: int = 0, log=None) -> dict:
    """measure_swaps on real pictures: per language, `per_language` rendered objects (random size and
    place; the objects in turn across the languages), null-text inverted at `scale` under their caption
    (one batch a language, once for every kind and setting), then each swapped to the next colour or
    shape (`kinds`) from their x_T with their ∅_t under each of `settings` {name: edit's options}
    (default {"the paper's": {}}). "kept" compares the edit with the real picture; "source_right":
    the reconstruction shows the picture's shape and colour. → {(kind, name): {lang: the fractions,
    and "seconds": per picture, its inversion and the edit}}; log(line) gets one line each."""
    settings = settings or {"the paper's": {}}
    rng, ts = np.random.default_rng(seed), timesteps("ddim", steps, model.schedule)
    table: dict = {(kind, name): {} for kind in kinds for name in settings}
    for li, lang in enumerate(languages):
        drawn = objects(li * per_language, (li + 1) * per_language)
        real = [render(s, c, rng=rng) for s, c in drawn]
        sources = [caption(s, c, lang) for s, c in drawn]
        start = time.perf_counter()
        with torch.no_grad():
            pixels = torch.cat([pictures.prepare_image(Image.fromarray(r), (64, 64)) for r in real])
            cond = model.encode_prompt(sources, guided=True)  # [∅ × B; c × B]
            pivot = ddim_inversion_route(guided_eps(model.denoise, cond[len(drawn):], 1.0),
                                         picture_latents(model, pixels), ts)
        uncond, _, _ = null_text(model, pivot, ts, cond[len(drawn):], cond[:1], scale, progress=False)
        inverting = time.perf_counter() - start
        for kind in kinds:
            swapped = {(s, c): (ns, nc) for s, c, ns, nc in swap_pairs(kind, 1)}  # each to the next one
            cases = [(s, c, *swapped[s, c]) for s, c in drawn]
            for name, options in settings.items():
                start = time.perf_counter()
                src, out = edit(model, sources, [caption(ns, nc, lang) for _, _, ns, nc in cases], steps=steps,
                                scale=scale, latents=pivot[-1], uncond_embeddings=uncond, progress=False, **options)
                counts = dict.fromkeys(("asked", "kept", "edited", "source_right"), 0)
                grade(counts, cases, real, src, out)
                seconds = (inverting + time.perf_counter() - start) / len(drawn)
                table[kind, name][lang] = {"pairs": len(cases), **{k: round(v / len(cases), 3) for k, v in counts.items()},
                                           "seconds": round(seconds, 2)}
                if log is not None:
                    log(f"{kind} swaps, {name}, {lang}: {table[kind, name][lang]}")
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


@torch.no_grad()
def toy_word_iou(model, seeds=(0, 1), languages=None, colours=None, shapes=None, steps: int = 25,
                 scale: float = 7.5, threshold: float = THRESHOLD, progress: bool = False) -> dict[str, dict]:
    """How well the shape word's map finds the object on the toy: per language, over every colour ×
    shape caption (toy.data.caption, the plainest phrasing) and seed, the mean IoU of the map's
    segment (> threshold) with the object's pixels (toy.detect.object_mask), and of the `shifted`
    map's (the baseline). Pictures with nothing drawn are left out; `pictures` counts the others.
    One generate call per seed, every caption at once (as toy.detect.draw draws them)."""
    seeds = [seeds] if isinstance(seeds, int) else list(seeds)
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
        raise BadValue(f"seeds must be an int >= 0 or a non-empty list of them, got {seeds!r}")
    asks = [(lang, shape, colour) for lang in languages or LANGUAGES for colour in colours or COLOURS
            for shape in shapes or SHAPES]
    prompts = [caption(shape, colour, lang, 0) for lang, shape, colour in asks]
    nouns = [words(Obj(shape, colour), lang)["shape"] for lang, shape, colour in asks]
    found: dict[str, list[tuple[float, float]]] = {lang: [] for lang, _, _ in asks}
    for seed in seeds:
        with capture_attention(model.unet) as maps:
            images = model.generate(prompts, steps=steps, scale=scale, seed=seed, output="tensor", progress=progress)
        heat = word_heat_map(maps, model.tokenizer, prompts, nouns, size=tuple(images.shape[-2:]))
        masks = torch.stack([torch.from_numpy(object_mask(image)) for image in images])
        ours, base = iou(heat, masks, threshold).tolist(), iou(shifted(heat), masks, threshold).tolist()
        for (lang, _, _), drawn, a, b in zip(asks, masks.any(dim=(1, 2)).tolist(), ours, base):
            if drawn:
                found[lang].append((a, b))
    return {lang: {"iou": sum(a for a, _ in pairs) / max(len(pairs), 1),
                   "shifted": sum(b for _, b in pairs) / max(len(pairs), 1), "pictures": len(pairs)}
            for lang, pairs in found.items()}


def measure_inversion(model, n: int = 50, steps: int = 50, scale: float = 7.5, seed: int = 0, batch: int = 10,
            progress: bool = True, log=print) -> dict[str, dict[str, float]]:
    """Reconstruction over n toy pictures (altdiff_min.toy: one shape in one colour, captioned in the
    nine languages in turn), `batch` pictures at a time: mean |Δpixel| (pixels in [0, 1]) and seconds
    per picture (a batch's time over its pictures) of the VAE round trip, DDIM inversion at guidance
    `scale` sampled back at `scale`, and null-text inversion at `scale` sampled back at `scale`.
    log(line) gets one line per batch. Not a test: the numbers are docs/editing.md's."""


    rng = np.random.default_rng(seed)
    names = ("vae round trip", f"ddim inversion at {scale:g}", f"null-text at {scale:g}")
    errors, seconds = {k: [] for k in names}, {k: 0.0 for k in names}
    ts = timesteps("ddim", steps, model.schedule)
    for first in range(0, n, batch):
        drawn = objects(first, min(n, first + batch))
        pixels = torch.cat([pictures.prepare_image(Image.fromarray(render(s, c, rng=rng)), (64, 64)) for s, c in drawn])
        prompts = [caption(s, c, LANGUAGES[(first + j) % len(LANGUAGES)], rng) for j, (s, c) in enumerate(drawn)]
        B, got = len(drawn), {}
        with torch.no_grad():
            context = model.encode_prompt(prompts, guided=True)  # [∅ × B; c × B]
            start = time.perf_counter()
            z0 = picture_latents(model, pixels)
            got[names[0]] = model.decode_latents(z0)
            seconds[names[0]] += time.perf_counter() - start
            start = time.perf_counter()
            route = ddim_inversion_route(guided_eps(model.denoise, context, scale), z0, ts)
            inv = Inversion(route, ts, context[B:], [context[:B]] * len(ts), scale)
            got[names[1]] = model.decode_latents(sample_inverted(model, inv, progress=progress))
            seconds[names[1]] += time.perf_counter() - start
            start = time.perf_counter()
            pivot = ddim_inversion_route(guided_eps(model.denoise, context[B:], 1.0), z0, ts)
        uncond, _, _ = null_text(model, pivot, ts, context[B:], context[:1], scale, progress=progress)
        inv = Inversion(pivot, ts, context[B:], uncond, scale)
        got[names[2]] = model.decode_latents(sample_inverted(model, inv, progress=progress))
        seconds[names[2]] += time.perf_counter() - start
        truth = (pixels + 1) / 2
        for name, images in got.items():
            errors[name] += (images.float().cpu() - truth).abs().flatten(1).mean(1).tolist()
        log(f"pictures {first}–{first + B - 1}: " + ", ".join(f"{k} {np.mean(errors[k][-B:]):.4f}" for k in names))
    return {k: {"mean |Δpixel|": float(np.mean(errors[k])), "seconds": seconds[k] / n} for k in names}


def main(argv: list[str] | None = None) -> None:
    """The swap tables (the paper's settings, then with value_replace_steps=0.8), generated and from
    inverted rendered pictures, and the reweighting curve."""
    from ..pipeline import load
    from .detect import format_table

    argv = sys.argv[1:] if argv is None else argv
    seeds = tuple(range(int(argv[0]) if argv else 2))
    model = load("toy-one")  # docs/editing.md's tables were measured on it
    for kind in ("colour", "shape"):
        for options in ({}, {"value_replace_steps": 0.8}):
            said = options or "the paper's settings"
            print(f"{kind} swaps, seeds {seeds}, {said}:", flush=True)
            print(format_table(measure_swaps(model, kind, seeds=seeds, **options)), flush=True)
    settings = {"the paper's settings": {}, "value_replace_steps 0.8": {"value_replace_steps": 0.8},
                **{f"{said}, null_text_steps {f}": {**options, "null_text_steps": f}
                   for said, options, f in (("the paper's", {}, 0.5), ("values 0.8", {"value_replace_steps": 0.8}, 0.5),
                                            ("values 0.8", {"value_replace_steps": 0.8}, 0.8))}}
    for (kind, said), rows in measure_inverted_swaps(model, settings, per_language=12).items():
        seconds = np.mean([row.pop("seconds") for row in rows.values()])
        print(f"{kind} swaps of null-text-inverted rendered pictures, {said} ({seconds:.1f} s a picture):", flush=True)
        print(format_table(rows), flush=True)
    print("reweighting the colour word, seed 0:", flush=True)
    for c, row in reweight_sweep(model).items():
        print(f"c={c}: {row}", flush=True)


if __name__ == "__main__":
    main()
