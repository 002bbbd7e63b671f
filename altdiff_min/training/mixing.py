"""Several data sources in one run, drawn by weight: DATA `SOURCE[:WEIGHT],SOURCE[:WEIGHT],…`.

    altdiff-min train MODEL new_pictures:3,toy:1 OUT_DIR     3 of every 4 examples from new_pictures,
                                                              1 rehearses the toy world

Grammar: the sources are separated by commas; each is a captioned folder or a registered name ("toy"),
with an optional weight after its LAST colon (a positive number; 1 when absent). A DATA that is an
existing folder as a whole is that one folder, whatever it spells, so a folder named `a,b` or `x:2`
keeps working alone; inside a list such a name is written with an explicit weight after it
(`x:2:1` is the folder `x:2`, weight 1); a name with a comma cannot be listed (link it under
another name). A DATA with one source and no weight is exactly the single dataset it always was.

How examples are drawn: the example at position p of the run's data stream (train.py: step s, place
j, p = s·G + j) comes from source k with probability w_k / Σw, decided by a generator seeded by
(seed, p) alone; within source k it is position p of that source's own stream (an epoch-by-epoch
permutation seeded by (seed, k)). So every draw depends on (seed, step, place) only, never on the
number of processes, and a source is rehearsed in proportion to its weight, not its size.
"""
from __future__ import annotations

import bisect
import math
import os

import torch

from ..errors import BadValue

SEPARATOR, WEIGHT = ",", ":"


def parse(data: str) -> list[tuple[str, float]]:
    """DATA → [(source, weight)], checked (one line naming the problem): no empty source, weights finite
    and > 0, no source twice. A whole DATA naming an existing folder is that folder, weight 1."""
    if not isinstance(data, str) or not data.strip():
        raise BadValue(f"DATA must name a folder or 'toy' (several: SOURCE:WEIGHT,SOURCE:WEIGHT), got {data!r}")
    if os.path.isdir(data) or SEPARATOR not in data and WEIGHT not in data:
        return [(data, 1.0)]
    sources = []
    for item in data.split(SEPARATOR):
        source, weight = item, 1.0
        head, sep, tail = item.rpartition(WEIGHT)
        if sep:
            try:
                source, weight = head, float(tail)
            except ValueError:
                source = item  # a colon that is part of the name
        if not source.strip():
            raise BadValue(f"DATA {data!r}: an empty source in the list (write SOURCE[:WEIGHT],SOURCE[:WEIGHT], …)")
        if not math.isfinite(weight) or weight <= 0:
            raise BadValue(f"DATA {data!r}: the weight of {source!r} must be a finite number > 0, got {tail!r}")
        if source in (s for s, _ in sources):
            raise BadValue(f"DATA {data!r}: {source!r} is listed twice")
        sources.append((source, weight))
    return sources


def number(w: float) -> str:
    """A weight as text that reads back as exactly `w` ("3", "0.1", "0.3333333333333333")."""
    return str(int(w)) if w == int(w) else repr(w)


def native_resolution(sources: list[tuple[str, float]], named: dict, default: int) -> int:
    """The pictures' side a run trains at unless --resolution says: a named world's own (all named ones
    must agree), else the model's image size."""
    sizes = {name: named[name].resolution for name, _ in sources if name in named}
    if len(set(sizes.values())) > 1:
        raise BadValue(f"DATA: the sources' pictures differ in size ({', '.join(f'{n} {r} px' for n, r in sizes.items())}); "
                       f"mixed sources must share one resolution")
    return next(iter(sizes.values()), default)


def open_sources(data: str, resolution: int, progress: bool = False):
    """DATA opened: one source as itself (dataset.open_data), several as a Mixture, each at `resolution`
    (a named world whose pictures are another size is refused by open_data, naming it)."""
    from .dataset import open_data

    sources = parse(data)
    if len(sources) == 1:  # its weight, if any, says nothing
        return open_data(sources[0][0], resolution, progress)
    return Mixture([open_data(s, resolution, progress) for s, _ in sources], [w for _, w in sources],
                   [s for s, _ in sources])


class Mixture:
    """Datasets as one: example i of their concatenation (pixels, texts), and `order(seed)`, the data
    stream that draws each position's source by weight (see the module's docstring)."""

    def __init__(self, sources: list, weights: list[float], names: list[str]):
        self.sources, self.weights, self.names = sources, weights, names
        self.resolution = sources[0].resolution
        self.offsets = [0]
        for source in sources:
            self.offsets.append(self.offsets[-1] + len(source))

    def __len__(self) -> int:
        return self.offsets[-1]

    def locate(self, i: int) -> tuple[object, int]:
        k = bisect.bisect_right(self.offsets, i) - 1
        return self.sources[k], i - self.offsets[k]

    def pixels(self, i: int) -> torch.Tensor:
        source, j = self.locate(i)
        return source.pixels(j)

    def texts(self, i: int) -> tuple[str, ...]:
        source, j = self.locate(i)
        return source.texts(j)

    def order(self, seed: int) -> MixedStream:
        return MixedStream(self, seed)

    @property
    def skipped(self) -> dict:
        return {f"{name}: {reason}": files for name, source in zip(self.names, self.sources)
                for reason, files in (getattr(source, "skipped", None) or {}).items()}

    def report(self) -> str:
        return "; ".join(f"{name}: {source.report()}" for name, source in zip(self.names, self.sources)
                         if getattr(source, "skipped", None))

    def describe(self) -> dict:
        """run.json's "data": every source's own record with its weight, and `spec`, DATA with absolute
        folder paths (what `train OUT_DIR --resume` reopens)."""
        records = [{**source.describe(), "weight": w} for source, w in zip(self.sources, self.weights)]
        spec = SEPARATOR.join(f"{r.get('path', name)}{WEIGHT}{number(w)}" for r, name, w in zip(records, self.names, self.weights))
        return {"kind": "mixture", "spec": spec, "sources": records, "examples": len(self), "resolution": self.resolution}


class MixedStream:
    """Position p of a Mixture's data stream → example index (of the concatenation)."""

    def __init__(self, mixture: Mixture, seed: int):
        from .train import Stream

        self.mixture, self.seed = mixture, seed
        total = sum(mixture.weights)
        self.cumulative = torch.tensor(mixture.weights, dtype=torch.float64).cumsum(0) / total
        self.streams = [Stream(len(source), seed, key=(1, k)) for k, source in enumerate(mixture.sources)]

    def source(self, p: int) -> int:
        """Which source position p draws from: u ~ U[0, 1) from the generator of (seed, p), the first
        k with u < (w_0 + … + w_k)/Σw."""
        from .train import generator

        u = torch.rand(1, generator=generator(self.seed, 3, p), dtype=torch.float64)
        return min(int(torch.searchsorted(self.cumulative, u, right=True)), len(self.streams) - 1)

    def __getitem__(self, p: int) -> int:
        k = self.source(p)
        return self.mixture.offsets[k] + self.streams[k][p]
