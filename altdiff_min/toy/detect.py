"""What a toy picture shows, measured rather than learned, and how often a model draws what it was asked.

    detect(image)                        → ("triangle", "blue"), or (None, None) for a blank picture
    object_mask(image)                   → (64, 64) bool: the object's pixels
    detect_scene(image)                  → Scene(Obj("circle", "red", "small"), "left of", Obj("square", "blue", "big"))
    grade(image, Scene(Obj("circle", "red")))  → {"delta_e": 0.0, "iou": 1.0, "position": None} (graded.py)
    table = evaluate(model)              → {lang: {"colour": 0.98, "shape": 0.93, "delta_e", "iou", "ungraded"}}
                                           over all 162 prompts; evaluate(model, guidance="rescale:0.7", ...)
    table = evaluate_rings(model)        → {lang: {"colour", "shape", "both"}}: "a red ring" … in nine languages
    table = evaluate_scenes(model)       → {lang: {"colour", "shape", "size", "objects", "relation", "swaps", ...}}
    vae_readback(model.vae, SceneWorld()) → {"lone": …, "pairs": …, "small": …}: read right after the VAE
    print(format_table(table))
"""
from __future__ import annotations

import inspect
from collections.abc import Sequence

import numpy as np
import torch

from ..errors import BadType, BadValue
from .data import (
    COLOURS,
    INVERSE,
    LANGUAGES,
    RELATIONS,
    RING,
    SHAPES,
    SIDES,
    SIZE_CHOICES,
    Obj,
    Scene,
    caption,
    caption_scene,
    random_scene,
)
from .graded import FORMATS, SCORES, grade_objects, means

INK = 96  # a pixel is "ink" when some channel is this far below white: about half-way to every palette colour
# Fill ratio of the ink's bounding box: square 1, circle π/4 ≈ 0.79, triangle 1/2; split half-way (a ring is
# told by its hole, not its fill: π/4 · (1 − 0.4²) ≈ 0.66 would read as a circle).
SQUARE_ABOVE, CIRCLE_ABOVE = 0.89, 0.64
SPECK = 20  # pieces of ink smaller than this (pixels) are noise, not objects: a 12-pixel triangle has ~70
SPLIT = 0.3  # a piece of ink whose inside is ≥ 30% a second colour is two objects touching: split by colour
# Size words are read half-way (in side length) between a small and a big object of a scene with that many.
SMALL_BELOW = {n: (sides["small"][1] + sides["big"][0]) / 2 for n, sides in SIDES.items()}
PALETTE = np.array(list(COLOURS.values()), dtype=np.float32)


def as_uint8(image) -> np.ndarray:
    """A PIL image, a (H, W, 3) uint8 array or a (3, H, W) float tensor in [0, 1] → (H, W, 3) uint8."""
    if isinstance(image, torch.Tensor):
        image = (image.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise BadValue(f"expected an RGB image, got an array {image.shape} of {image.dtype}")
    return image


def nearest_colour(pixels: np.ndarray) -> np.ndarray:
    """(..., 3) float RGB → (...) index into COLOURS of the nearest palette colour."""
    return ((pixels[..., None, :] - PALETTE) ** 2).sum(-1).argmin(-1)


def shape_of(region: np.ndarray) -> tuple[str, tuple[int, int, int, int]]:
    """The shape of a boolean region, and its box (x0, y0, x1, y1), ends excluded: a ring when it encloses
    a hole (a piece of its box's background, at least SPECK pixels, touching no side of the box), else
    the shape its box is filled like."""
    ys, xs = np.nonzero(region)
    box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    background = ~region[box[1]:box[3], box[0]:box[2]]
    if any(hole.sum() >= SPECK and not (hole[0].any() or hole[-1].any() or hole[:, 0].any() or hole[:, -1].any())
           for hole in label(background)):
        return RING, box
    fill = region.sum() / ((box[2] - box[0]) * (box[3] - box[1]))
    return ("square" if fill > SQUARE_ABOVE else "circle" if fill > CIRCLE_ABOVE else "triangle"), box


def detect(image) -> tuple[str | None, str | None]:
    """(shape, colour) of the single shape in `image`, or (None, None) for a blank one.

    colour: the palette colour nearest to the mean of the ink pixels. shape: from the fill ratio of
    the ink's bounding box. Two measurements, nothing trained. Specks (pieces of ink under SPECK
    pixels) are left out, as detect_objects leaves them out: one stray pixel would widen the box.
    """
    image = as_uint8(image).astype(np.float32)
    ink = ink_of(image)
    if not ink.any():
        return None, None
    return shape_of(ink)[0], list(COLOURS)[int(nearest_colour(image[ink].mean(axis=0)))]


def object_mask(image) -> np.ndarray:
    """(H, W) bool: the pixels of the drawn objects, the ink that `detect` reads (specks left out)."""
    return ink_of(as_uint8(image).astype(np.float32))


def ink_of(pixels: np.ndarray) -> np.ndarray:
    """(H, W, 3) float RGB in 0–255 → (H, W) bool: the ink, its pieces under SPECK pixels left out."""
    ink = (255 - pixels).max(axis=-1) > INK
    return np.logical_or.reduce([piece for piece in label(ink) if piece.sum() >= SPECK] or [np.zeros_like(ink)])


def label(mask: np.ndarray) -> list[np.ndarray]:
    """The 4-connected components of a boolean mask, as masks: each pixel takes the least flat index
    among itself and its neighbours until nothing changes (a convex blob needs about its width in rounds)."""
    off = mask.size
    labels = np.where(mask, np.arange(off).reshape(mask.shape), off)
    while True:
        p = np.pad(labels, 1, constant_values=off)
        least = np.where(mask, np.minimum.reduce([labels, p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]]), off)
        if np.array_equal(least, labels):
            return [labels == v for v in np.unique(labels[mask])]
        labels = least


def inside(mask: np.ndarray) -> np.ndarray:
    """The pixels of `mask` whose four neighbours are in it too: a blob without its rim."""
    p = np.pad(mask, 1)
    return mask & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]


def detect_objects(image) -> list[tuple[Obj, tuple[int, int, int, int]]]:
    """Every object in `image`, left to right: (Obj(shape, colour, size word), box (x0, y0, x1, y1)).

    Objects are the 4-connected pieces of ink, specks under SPECK pixels left out. A piece whose inside
    (rim dropped: a model's blended edges) is ≥ SPLIT a second colour is two touching objects, and
    splits into its colours' pieces. Each object as `detect` reads one: colour from the mean, shape
    from the box's fill; its size word from its side against SMALL_BELOW for a scene of that many.
    """
    return [(obj, box) for obj, box, _ in read_objects(as_uint8(image).astype(np.float32))]


def read_objects(image: np.ndarray) -> list[tuple[Obj, tuple[int, int, int, int], np.ndarray]]:
    """`detect_objects` of (H, W, 3) float RGB, each object with its region (its pixels, a bool mask)."""
    ink = (255 - image).max(axis=-1) > INK
    colours = nearest_colour(image)
    regions = []
    for piece in label(ink):
        if piece.sum() < SPECK:
            continue
        counts = np.bincount(colours[inside(piece)], minlength=len(COLOURS))
        main = np.nonzero(counts >= SPLIT * max(counts.sum(), 1))[0]  # the colours of a good part of its inside
        if len(main) > 1:
            regions += [r for c in main for r in label(piece & (colours == c)) if r.sum() >= SPECK]
        else:
            regions.append(piece)
    small_below = SMALL_BELOW[min(max(len(regions), 1), 2)]
    found = []
    for region in regions:
        shape, box = shape_of(region)
        side = max(box[2] - box[0], box[3] - box[1])
        colour = list(COLOURS)[int(nearest_colour(image[region].mean(axis=0)))]
        found.append((Obj(shape, colour, "small" if side < small_below else "big"), box, region))
    return sorted(found, key=lambda f: (f[1][0] + f[1][2], f[1][1] + f[1][3]))


def relation(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> str:
    """Where box a is relative to box b: along the axis on which their centres are further apart."""
    dx, dy = (b[0] + b[2] - a[0] - a[2]) / 2, (b[1] + b[3] - a[1] - a[3]) / 2
    if abs(dx) >= abs(dy):
        return "left of" if dx > 0 else "right of"
    return "above" if dy > 0 else "below"


def detect_scene(image) -> Scene | None:
    """The scene `image` shows, told from the left or top object: "left of" or "above" (compare with
    `same_scene`); None for a blank picture or one of three objects or more. Every object gets a
    size word, the one its side is nearer to (an unsized object of a caption gets one too)."""
    found = detect_objects(image)
    if len(found) == 1:
        return Scene(found[0][0])
    if len(found) != 2:
        return None
    (a, box_a), (b, box_b) = found
    where = relation(box_a, box_b)
    return Scene(a, where, b) if where in ("left of", "above") else Scene(b, INVERSE[where], a)


def same_scene(seen: Scene | None, asked: Scene) -> bool:
    """Whether `seen` shows what `asked` asks: the same objects (each size word that was asked for)
    in the same relation, told either way round."""
    def same(s: Obj, a: Obj) -> bool:
        return (s.shape, s.colour) == (a.shape, a.colour) and a.size in (None, s.size)
    return seen is not None and len(seen.objects) == len(asked.objects) and any(
        all(same(s, a) for s, a in zip(told.objects, asked.objects)) and told.relation == asked.relation
        for told in (seen, seen.flipped()))


def judge_pair(seen: Scene | None, asked: Scene) -> tuple[bool, bool | None]:
    """For a picture read as `seen` and a two-object prompt `asked`: are exactly the two objects asked
    for drawn (colour and shape; size words not judged), and if so, are they in the asked relation
    (None when the objects are not right)."""
    kinds = sorted((o.shape, o.colour) for o in seen.objects) if seen is not None else []
    if kinds != sorted((o.shape, o.colour) for o in asked.objects):
        return False, None
    told = seen if (seen.first.shape, seen.first.colour) == (asked.first.shape, asked.first.colour) else seen.flipped()
    return True, told.relation == asked.relation


def swapped(asked: Scene) -> Scene | None:
    """The pair drawn with each colour on the other's shape (a red square and a blue circle for "a red
    circle left of a blue square"): the binding failure. None where swapping changes nothing (one
    object, the same shape or the same colour twice)."""
    a, b = asked.first, asked.second
    if b is None or a.shape == b.shape or a.colour == b.colour:
        return None
    return Scene(Obj(a.shape, b.colour), asked.relation, Obj(b.shape, a.colour))


def grade(image, asked: Scene) -> dict[str, float | None]:
    """The graded scores (graded.py) of a picture against the scene `asked`: "delta_e" (CIEDE2000 of the
    object's mean colour from the asked one), "iou" (its fit to the asked shape), "position" (pixels
    from the asked relation; a pair only). One object asked: all the ink, as `detect` reads it; two: the
    two objects `detect_scene` reads. None where there is nothing to score: a blank picture, or a pair
    prompt drawn with other than two objects."""
    pixels = as_uint8(image).astype(np.float32)
    if asked.second is None:
        ink = ink_of(pixels)
        return grade_objects(pixels, [(None, shape_of(ink)[1], ink)] if ink.any() else [], asked)
    return grade_objects(pixels, read_objects(pixels), asked)


@torch.no_grad()
def vae_readback(vae, world, n: int = 240) -> dict[str, float]:
    """How much of a scene survives the VAE: the fraction of the world's first n pictures (a
    world.SceneWorld's) that `detect_scene` still reads right after encode and decode (posterior
    means), for lone objects, pairs, and scenes holding a small object (the hardest: 12 px is 1.5
    latent cells)."""
    right: dict[str, list[bool]] = {"lone": [], "pairs": [], "small": []}
    for start in range(0, min(n, len(world)), 60):
        indices = range(start, min(start + 60, n, len(world)))
        pixels = torch.stack([world.pixels(i) for i in indices])
        decoded = ((vae.decode(vae.encode(pixels)[0]) + 1) / 2).clamp(0, 1)
        for i, image in zip(indices, decoded):
            scene = world.scene(i)
            ok = same_scene(detect_scene(image), scene)
            right["lone" if scene.second is None else "pairs"].append(ok)
            if any(o.size == "small" for o in scene.objects):
                right["small"].append(ok)
    return {kind: round(float(np.mean(oks)), 3) if oks else None for kind, oks in right.items()}


# ---- accuracy of a model ----------------------------------------------------------------------------
DRAWN = {"prompt", "n_samples", "seed", "latents", "output", "progress", "return_trajectory", "return_flags"}


def draw(model, prompts: list[str], seeds: int | Sequence[int] = 0, sampler: str = "ddim", scale: float = 7.5,
         steps: int = 25, batch_size: int | None = None, **generate) -> list[torch.Tensor]:
    """One picture per prompt and seed (seed-major), in batches of batch_size prompts (None: as many as the
    model's Limits.max_batch lets one call of `generate` draw, 256 unless raised). generate: any other
    argument of `model.generate`, passed to every call (guidance=, controllers=, text_layer=,
    cross_attention=, negative_prompt=, ...); not those draw sets itself (DRAWN).

    A seed's initial latents are drawn for all prompts at once, torch.randn((len(prompts), 4, h, w))
    from the seed as `generate` draws them, and split into the batches: prompt i starts from the same
    noise whatever the batch size, and with one batch the pictures are generate(prompts, seed=seed)'s.
    (An ancestral sampler's later draws, euler_a's, do depend on the split.)
    """
    seeds = [seeds] if isinstance(seeds, int) else list(seeds)
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
        raise BadValue(f"seeds must be an int >= 0 or a non-empty list of them, got {seeds!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)):
        raise BadType(f"batch_size must be an int or None, got {batch_size!r}")
    if batch_size is not None and batch_size < 1:
        raise BadValue(f"batch_size must be >= 1, got {batch_size}")
    if taken := sorted(set(generate) & DRAWN):
        raise BadValue(f"{taken}: set by the evaluation itself (one picture per prompt and seed), not passed to generate")
    known = inspect.signature(model.generate).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in known.values()) and (unknown := sorted(set(generate) - set(known))):
        raise BadValue(f"{unknown}: not arguments of generate")
    batch_size = batch_size or min(len(prompts), model.limits.max_batch)
    down = model.vae.cfg.size_multiple
    shape = (len(prompts), model.unet.cfg.in_channels, model.image_size // down, model.image_size // down)
    images = []
    for seed in seeds:
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
        for start in range(0, len(prompts), batch_size):
            part = slice(start, start + batch_size)
            images += list(model.generate(prompts[part], steps=steps, sampler=sampler, scale=scale, seed=seed,
                                          latents=None if batch_size >= len(prompts) else noise[part],
                                          output="tensor", progress=False, **generate))
    return images


def evaluate(model, scale: float = 7.5, steps: int = 25, seeds: int | Sequence[int] = 0, phrasing: int = 0,
             languages: tuple[str, ...] = LANGUAGES, sampler: str = "ddim", batch_size: int | None = None,
             **generate) -> dict[str, dict[str, float | int | None]]:
    """Draw one picture per language × colour × shape prompt and seed (`sampler`, `steps`, guidance
    `scale`, and any other generate argument: guidance=, controllers=, text_layer=, cross_attention=...)
    and detect it. Returns, per language, the fraction of pictures with the right colour and with the
    right shape, and the graded scores' means (`grade`): "delta_e" (CIEDE2000 from the asked colour) and
    "iou" (fit to the asked shape), over the pictures not blank; "ungraded" counts the blank ones.
    seeds: one or several, each drawing every prompt once; batch_size: prompts per call of `generate`
    (None: up to the model's max_batch; fewer saves memory, same pictures: `draw`).
    """
    prompts = [(lang, shape, colour) for lang in languages for colour in COLOURS for shape in SHAPES]
    images = draw(model, [caption(s, c, lang, phrasing) for lang, s, c in prompts], seeds, sampler, scale, steps,
                  batch_size, **generate)
    right = {lang: {"colour": 0, "shape": 0} for lang in languages}  # counted, then divided once: a sum of
    per_language = len(images) // len(languages)                     # 1/n's comes out 1.0000000000000002
    graded: dict[str, list[dict]] = {lang: [] for lang in languages}
    for (lang, shape, colour), image in zip(prompts * (len(images) // len(prompts)), images):
        seen_shape, seen_colour = detect(image)
        right[lang]["colour"] += seen_colour == colour
        right[lang]["shape"] += seen_shape == shape
        graded[lang].append(grade(image, Scene(Obj(shape, colour))))
    return {lang: {**{k: n / per_language for k, n in counts.items()}, **means(graded[lang], SCORES[:2]),
                   "ungraded": sum(g["delta_e"] is None for g in graded[lang])} for lang, counts in right.items()}


def evaluate_rings(model, noun: str | None = None, scale: float = 7.5, steps: int = 25,
                   seeds: int | Sequence[int] = (0, 1), phrasing: int = 0, languages: tuple[str, ...] = LANGUAGES,
                   sampler: str = "ddim", batch_size: int | None = None, **generate) -> dict[str, dict[str, float]]:
    """How well a model draws rings: one picture per language × colour ("a red ring", or with `noun`,
    a new token's captions: "a red <ring>") and seed (generate: as `evaluate`). Per language, the
    fraction with the right colour, with the right shape (a ring), and with both."""
    prompts = [(lang, colour) for lang in languages for colour in COLOURS]
    images = draw(model, [caption(RING, c, lang, phrasing, noun=noun) for lang, c in prompts], seeds, sampler, scale,
                  steps, batch_size, **generate)
    right = {lang: {"colour": 0, "shape": 0, "both": 0} for lang in languages}
    for (lang, colour), image in zip(prompts * (len(images) // len(prompts)), images):
        seen_shape, seen_colour = detect(image)
        right[lang]["colour"] += seen_colour == colour
        right[lang]["shape"] += seen_shape == RING
        right[lang]["both"] += (seen_shape, seen_colour) == (RING, colour)
    per_language = len(images) // len(languages)
    return {lang: {k: n / per_language for k, n in counts.items()} for lang, counts in right.items()}


def compositions(singles: int = 18, pairs: int = 36, seed: int = 0) -> list[Scene]:
    """The fixed sample `evaluate_scenes` asks for: `singles` lone objects, every shape × colour in turn
    with the size words none, small, big in turn; `pairs` random pairs (`random_scene`), the relations in turn."""
    rng = np.random.default_rng(seed)
    lone = [Scene(Obj(SHAPES[i % 3], list(COLOURS)[i // 3 % 6], SIZE_CHOICES[(i + i // 3) % 3]))
            for i in range(singles)]  # each size word once per colour, twice per shape in 18
    two = [random_scene(rng, 2) for _ in range(pairs)]
    two = [Scene(s.first, RELATIONS[i % 4], s.second) for i, s in enumerate(two)]
    return lone + two


def evaluate_scenes(model, scenes: list[Scene] | None = None, scale: float = 7.5, steps: int = 25,
                    seeds: int | Sequence[int] = 0, phrasing: int | np.random.Generator = 0,
                    languages: tuple[str, ...] = LANGUAGES, sampler: str = "ddim", batch_size: int | None = None,
                    **generate) -> dict[str, dict[str, float | int | None]]:
    """Composition accuracy: one picture per language × scene (default `compositions()`) and seed
    (generate: any other generate argument, as `evaluate`), detected with `detect_scene`. Per language:

      colour, shape   lone objects: the fraction drawn alone with the right colour / shape
      size            lone objects asked with a size word: the fraction of those with the right one
      objects         pairs: the fraction with exactly two objects, both of the right colour and shape
      relation        among those, the fraction in the right relation (None when there are none)
      swaps           pairs drawn with each colour on the other's shape (a red square and a blue circle
                      for "a red circle left of a blue square"): the binding failure, counted
      pairs           how many pair pictures were drawn (for reading swaps)
      delta_e, iou    lone objects: the graded scores' means (`grade`)
      pair_delta_e, pair_iou, position   pairs: the same, each the mean of the pair's two; position:
                      pixels from the asked relation (0 when it reads right)
      ungraded        pictures without scores: blank lone objects, pairs drawn with other than two objects

    phrasing: an index (0–2: lone objects have three phrasings), or a numpy Generator for a random one each.
    """
    scenes = compositions() if scenes is None else scenes
    asks = [(lang, scene) for lang in languages for scene in scenes]
    images = draw(model, [caption_scene(s, lang, phrasing) for lang, s in asks], seeds, sampler, scale, steps,
                  batch_size, **generate)
    counts = {lang: dict.fromkeys(("single", "colour", "shape", "sized", "size", "pairs", "objects", "relation",
                                   "swaps"), 0) for lang in languages}
    graded = {(lang, k): [] for lang in languages for k in (1, 2)}  # per language, lone and pairs
    for (lang, asked), image in zip(asks * (len(images) // len(asks)), images):
        seen, n = detect_scene(image), counts[lang]
        graded[lang, len(asked.objects)].append(grade(image, asked))
        if asked.second is None:
            one = seen.first if seen is not None and seen.second is None else None
            n["single"] += 1
            n["colour"] += one is not None and one.colour == asked.first.colour
            n["shape"] += one is not None and one.shape == asked.first.shape
            n["sized"] += asked.first.size is not None
            n["size"] += asked.first.size is not None and one is not None and one.size == asked.first.size
            continue
        n["pairs"] += 1
        objects, where = judge_pair(seen, asked)
        n["objects"] += objects
        n["relation"] += bool(where)
        n["swaps"] += (twin := swapped(asked)) is not None and judge_pair(seen, twin)[0]
    return {lang: {"colour": ratio(n["colour"], n["single"]), "shape": ratio(n["shape"], n["single"]),
                   "size": ratio(n["size"], n["sized"]), "objects": ratio(n["objects"], n["pairs"]),
                   "relation": ratio(n["relation"], n["objects"]), "swaps": n["swaps"], "pairs": n["pairs"],
                   **means(graded[lang, 1], SCORES[:2]), **means(graded[lang, 2], SCORES[:2], "pair_"),
                   **means(graded[lang, 2], SCORES[2:]),
                   "ungraded": sum(g["delta_e"] is None for k in (1, 2) for g in graded[lang, k])}
            for lang, n in counts.items()}


def ratio(right: int, total: int) -> float | None:
    return right / total if total else None


def format_table(table: dict[str, dict[str, float | int | None]]) -> str:
    """An accuracy table (`evaluate`'s or `evaluate_scenes`') as text: one line per language, then
    `all`: the mean of each fraction and score, the sum of each count. A fraction of nothing prints as –."""
    columns = list(next(iter(table.values())))
    width = {c: max(6, len(c)) for c in columns}

    def cell(c: str, value) -> str:
        form = FORMATS.get(c.removeprefix("pair_"), "{:.0%}")  # the graded scores as numbers, fractions as %
        text = "–" if value is None else form.format(value) if isinstance(value, float) else str(value)
        return f"{text:>{width[c]}}"

    def total(c: str):
        values = [row[c] for row in table.values() if row[c] is not None]
        if values and all(isinstance(v, int) for v in values):
            return sum(values)
        return float(np.mean(values)) if values else None

    lines = [f"{'lang':4}  " + "  ".join(f"{c:>{width[c]}}" for c in columns)]
    lines += [f"{lang:4}  " + "  ".join(cell(c, row[c]) for c in columns) for lang, row in table.items()]
    lines.append(f"{'all':4}  " + "  ".join(cell(c, total(c)) for c in columns))
    return "\n".join(lines)
