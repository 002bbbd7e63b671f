"""`make demo`: text-to-image from non-English prompts, in seconds on a CPU, with the shipped toy model.

The toy (altdiff_min/toy) is AltDiffusion's whole pipeline — sentencepiece tokenizer, XLM-R text
encoder with projection, guided DDIM in the UNet, VAE decode — at a size trained on a laptop CPU,
in a world of coloured shapes captioned in nine languages. The detector reads back what was drawn.
"""
from __future__ import annotations

import os
import time

from .pipeline import load
from .toy import caption, detect

# One picture per language: (language, shape, colour), each caption in its second phrasing
# ("a red circle on a white background").
ASKS = (("zh", "circle", "red"), ("fr", "square", "blue"), ("ar", "triangle", "green"), ("ru", "circle", "purple"),
        ("ja", "square", "orange"), ("es", "triangle", "yellow"))


def run(seed: int = 0, outdir: str = "demo_outputs", asks: tuple[tuple[str, str, str], ...] = ASKS) -> list[str]:
    """Draw each ask with the toy model into outdir/LANG.png; print and return the paths."""
    pipe = load("toy")
    print(f"altdiff-min demo: the trained toy model ({pipe.path}), DDIM 25 steps, guidance 7.5, seed {seed}")
    os.makedirs(outdir, exist_ok=True)
    paths = []
    for lang, shape, colour in asks:
        prompt = caption(shape, colour, lang, 1)
        start = time.perf_counter()
        image = pipe.generate(prompt, steps=25, seed=seed, progress=False)[0]
        paths.append(os.path.join(outdir, f"{lang}.png"))
        image.save(paths[-1])
        seen_shape, seen_colour = detect(image)
        print(f"{lang}  {prompt:40} → {paths[-1]}  ({time.perf_counter() - start:.2f} s; "
              f"detected: {seen_colour} {seen_shape})")
    return paths
