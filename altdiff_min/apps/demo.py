"""`make demo`: text-to-image from non-English prompts, in seconds on a CPU, with the shipped toy model.

The toy (altdiff_min/toy) is AltDiffusion's whole pipeline — sentencepiece tokenizer, XLM-R text
encoder with projection, guided DDIM in the UNet, VAE decode — at a size trained on a laptop CPU,
in a world of coloured shapes captioned in nine languages. The detector reads back what was drawn.
"""
from __future__ import annotations

import time

from ..errors import BadValue
from ..pipeline import load
from ..storage.files import make_folder, save_numbered
from ..toy import Obj, Scene, caption, caption_scene, detect, detect_scene

# One picture per language: (language, shape, colour), each caption in its second phrasing
# ("a red circle on a white background").
ASKS = (("zh", "circle", "red"), ("fr", "square", "blue"), ("ar", "triangle", "green"), ("ru", "circle", "purple"),
        ("ja", "square", "orange"), ("es", "triangle", "yellow"))
# Then two objects: (language, scene).
SCENES = (("ru", Scene(Obj("circle", "red"), "left of", Obj("square", "blue"))),)


def run(seed: int = 0, outdir: str = "demo_outputs", asks: tuple[tuple[str, str, str], ...] = ASKS,
        scenes: tuple[tuple[str, Scene], ...] = SCENES) -> list[str]:
    """Draw each ask with the toy model into outdir/LANG-NNN.png (the next free number: a rerun adds,
    never overwrites), then each scene into outdir/scene-LANG-NNN.png; print and return the paths."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise BadValue(f"--seed must be an int in [0, 2**64), got {seed!r}")
    make_folder(outdir, "the demo's output folder")
    pipe = load("toy")
    print(f"altdiff-min demo: the trained toy model ({pipe.path}), DDIM 25 steps, guidance 7.5, seed {seed}")
    paths = []
    for lang, shape, colour in asks:
        prompt = caption(shape, colour, lang, 1)
        start = time.perf_counter()
        image = pipe.generate(prompt, steps=25, seed=seed, progress=False)[0]
        paths.append(save_numbered(outdir, lang + "-{:03}.png", lambda tmp: image.save(tmp, format="PNG")))
        seen_shape, seen_colour = detect(image)
        print(f"{lang}  {prompt:40} → {paths[-1]}  ({time.perf_counter() - start:.2f} s; "
              f"detected: {seen_colour} {seen_shape})")
    for lang, scene in scenes:
        prompt = caption_scene(scene, lang)
        start = time.perf_counter()
        image = pipe.generate(prompt, steps=25, seed=seed, progress=False)[0]
        paths.append(save_numbered(outdir, f"scene-{lang}-{{:03}}.png", lambda tmp: image.save(tmp, format="PNG")))
        seen = detect_scene(image)
        told = "nothing it can read" if seen is None else ", ".join(f"{o.colour} {o.shape}" for o in seen.objects) + \
            (f", the first {seen.relation} the second" if seen.relation else "")
        print(f"{lang}  {prompt:40} → {paths[-1]}  ({time.perf_counter() - start:.2f} s; detected: {told})")
    return paths
