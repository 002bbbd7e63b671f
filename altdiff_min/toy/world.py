"""The toy worlds as training data, with the interface train.py reads (len, pixels(i), texts(i),
resolution, describe): `ToyWorld`, one object a picture (toy-one's), and `SceneWorld`,
one or two objects with size words and relations (the shipped toy's). "toy" as DATA of `altdiff-min train` is ToyWorld
(registered with training/dataset.py below).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import BadValue
from ..training.dataset import register_data
from .data import (
    COLOURS,
    LANGUAGES,
    PHRASINGS,
    RING,
    SHAPES,
    SIZE,
    Scene,
    caption,
    random_scene,
    render,
    render_scene,
    scene_captions,
)


@dataclass
class ToyWorld:
    """The toy's pictures (64 px): example i is a (shape, colour) taken in turn, drawn at a size and
    place fixed by (seed, i), with every caption of it in the nine languages and their phrasings."""
    resolution = SIZE  # its pictures' side in pixels (a class attribute: read before a world is made)
    n: int = 5400
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < len(SHAPES) * len(COLOURS):
            raise BadValue(f"the toy world needs at least {len(SHAPES) * len(COLOURS)} pictures, one per shape and colour")
        self.labels = [(shape, colour) for colour in COLOURS for shape in SHAPES]
        self.captions = {label: tuple(caption(*label, lang, p) for lang in LANGUAGES for p in range(len(PHRASINGS[lang])))
                      for label in self.labels}

    def __len__(self) -> int:
        return self.n

    def label(self, i: int) -> tuple[str, str]:
        return self.labels[i % len(self.labels)]

    def pixels(self, i: int) -> torch.Tensor:
        pixels = render(*self.label(i), rng=np.random.default_rng([self.seed, int(i)]))
        return torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1

    def texts(self, i: int) -> tuple[str, ...]:
        return self.captions[self.label(i)]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, tuple[str, ...]]:
        return self.pixels(i), self.texts(i)

    def describe(self) -> dict:
        return {"kind": "toy", "examples": self.n, "seed": self.seed, "resolution": self.resolution}


class SceneWorld:
    """Training data of scenes, with ToyWorld's interface (len, pixels(i), texts(i), resolution,
    describe). Example i is one object when i % 3 == 0, two otherwise: a scene and its picture drawn
    from (seed, i), with every caption of it in the nine languages and their phrasings."""

    def __init__(self, n: int = 5400, seed: int = 0):
        if isinstance(n, bool) or not isinstance(n, int) or n < 3:
            raise BadValue(f"the scene world needs at least 3 pictures, got {n!r}")
        self.n, self.seed, self.resolution = n, seed, SIZE
        self.captions: dict[Scene, tuple[str, ...]] = {}  # made once per scene

    def __len__(self) -> int:
        return self.n

    def draw(self, i: int) -> tuple[Scene, np.random.Generator]:
        rng = np.random.default_rng([self.seed, int(i)])
        return random_scene(rng, 1 if i % 3 == 0 else 2), rng

    def scene(self, i: int) -> Scene:
        return self.draw(i)[0]

    def pixels(self, i: int) -> torch.Tensor:
        pixels = render_scene(*self.draw(i))
        return torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1

    def texts(self, i: int) -> tuple[str, ...]:
        scene = self.scene(i)
        if scene not in self.captions:
            self.captions[scene] = scene_captions(scene)
        return self.captions[scene]

    def __getitem__(self, i: int):
        return self.pixels(i), self.texts(i)

    def describe(self) -> dict:
        return {"kind": "toy scenes", "examples": self.n, "seed": self.seed, "resolution": self.resolution}


class RingWorld(ToyWorld):
    """A shape the toys never saw: rings (a disc with a hole), example i in colour i % 6, at a
    size and place fixed by (seed, i), with every caption of it in the nine languages and their phrasings.
    noun: a word said in place of "ring" in every language (a textual-inversion token, "<ring>"); None: the
    languages' own words (ring, 圆环, anillo, anneau, кольцо, 輪, 고리, حلقة, anello)."""

    def __init__(self, n: int = 36, seed: int = 0, noun: str | None = None):
        if isinstance(n, bool) or not isinstance(n, int) or n < len(COLOURS):
            raise BadValue(f"the ring world needs at least {len(COLOURS)} pictures, one per colour, got {n!r}")
        if noun is not None and (not isinstance(noun, str) or not noun.strip()):
            raise BadValue(f"noun must be a non-empty word, got {noun!r}")
        self.n, self.seed, self.noun = n, seed, noun
        self.labels = [(RING, colour) for colour in COLOURS]
        self.captions = {label: tuple(caption(*label, lang, p, noun=noun) for lang in LANGUAGES
                                      for p in range(len(PHRASINGS[lang]))) for label in self.labels}

    def describe(self) -> dict:
        return {"kind": "toy rings", "name": "toy-<ring>" if self.noun == "<ring>" else "toy-ring", "examples": self.n,
                "seed": self.seed, "resolution": self.resolution, **({"noun": self.noun} if self.noun else {})}


class TokenRingWorld(RingWorld):
    """RingWorld captioned with the token "<ring>" in place of the word, in every language."""

    def __init__(self, n: int = 36, seed: int = 0):
        super().__init__(n, seed, noun="<ring>")


register_data("toy", ToyWorld)  # DATA "toy" of `altdiff-min train`
register_data("toy-ring", RingWorld)  # 36 rings, captioned with each language's word
register_data("toy-<ring>", TokenRingWorld)  # the same pictures, captioned with "<ring>"
