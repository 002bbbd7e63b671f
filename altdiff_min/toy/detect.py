"""What a toy picture shows, measured rather than learned, and how often a model draws what it was asked.

    detect(image)                        → ("triangle", "blue"), or (None, None) for a blank picture
    table = evaluate(model)              → {lang: {"colour": 0.98, "shape": 0.93}} over all 162 prompts
    print(format_table(table))
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import BadValue
from .data import COLOURS, LANGUAGES, SHAPES, caption

INK = 96  # a pixel is "ink" when some channel is this far below white: about half-way to every palette colour
# Fill ratio of the ink's bounding box: square 1, circle π/4 ≈ 0.79, triangle 1/2; split half-way.
SQUARE_ABOVE, CIRCLE_ABOVE = 0.89, 0.64


def as_uint8(image) -> np.ndarray:
    """A PIL image, a (H, W, 3) uint8 array or a (3, H, W) float tensor in [0, 1] → (H, W, 3) uint8."""
    if isinstance(image, torch.Tensor):
        image = (image.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise BadValue(f"expected an RGB image, got an array {image.shape} of {image.dtype}")
    return image


def detect(image) -> tuple[str | None, str | None]:
    """(shape, colour) of the single shape in `image`, or (None, None) for a blank one.

    colour: the palette colour nearest to the mean of the ink pixels. shape: from the fill ratio of
    the ink's bounding box. Two measurements, nothing trained.
    """
    image = as_uint8(image).astype(np.float32)
    ink = (255 - image).max(axis=-1) > INK
    if not ink.any():
        return None, None
    mean = image[ink].mean(axis=0)
    names, palette = list(COLOURS), np.array(list(COLOURS.values()), dtype=np.float32)
    colour = names[int(np.argmin(((palette - mean) ** 2).sum(axis=1)))]
    ys, xs = np.nonzero(ink)
    fill = ink.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    shape = "square" if fill > SQUARE_ABOVE else "circle" if fill > CIRCLE_ABOVE else "triangle"
    return shape, colour


def evaluate(model, scale: float = 7.5, steps: int = 25, seed: int = 0, phrasing: int = 0,
             languages: tuple[str, ...] = LANGUAGES) -> dict[str, dict[str, float]]:
    """Draw one picture per language × colour × shape prompt (DDIM, guidance `scale`) and detect it.

    Returns, per language, the fraction of pictures with the right colour and with the right shape.
    All prompts go through `generate` in one batch; the initial latents come from `seed`.
    """
    prompts = [(lang, shape, colour) for lang in languages for colour in COLOURS for shape in SHAPES]
    images = model.generate([caption(s, c, lang, phrasing) for lang, s, c in prompts], steps=steps, sampler="ddim",
                            scale=scale, height=64, width=64, seed=seed, output="tensor", progress=False)
    table = {lang: {"colour": 0.0, "shape": 0.0} for lang in languages}
    per_language = len(COLOURS) * len(SHAPES)
    for (lang, shape, colour), image in zip(prompts, images):
        seen_shape, seen_colour = detect(image)
        table[lang]["colour"] += (seen_colour == colour) / per_language
        table[lang]["shape"] += (seen_shape == shape) / per_language
    return table


def format_table(table: dict[str, dict[str, float]]) -> str:
    """The accuracy table as text: one line per language, then the mean."""
    lines = [f"{'lang':4}  {'colour':>6}  {'shape':>6}"]
    lines += [f"{lang:4}  {row['colour']:6.0%}  {row['shape']:6.0%}" for lang, row in table.items()]
    lines.append(f"{'all':4}  {np.mean([r['colour'] for r in table.values()]):6.0%}  "
                 f"{np.mean([r['shape'] for r in table.values()]):6.0%}")
    return "\n".join(lines)
