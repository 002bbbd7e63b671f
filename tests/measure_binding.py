"""The binding table of docs/binding.md: toy.binding.evaluate_binding on the toy, each way in turn, with
the methods' maps on the grid GRID (latents / GRID: 4 is the references' default, 1 the toy's finest).

    python tests/measure_binding.py OUT.json [GRID] [LANGS|all] [PAIRS]
"""
import json
import sys

import torch

from altdiff_min import load
from altdiff_min.toy.binding import WAYS, evaluate_binding
from altdiff_min.toy.detect import compositions, format_table

model = load("toy", dtype=torch.float32)
grid = {"scale": int(sys.argv[2])} if len(sys.argv) > 2 else {}
langs = {"languages": tuple(sys.argv[3].split(","))} if len(sys.argv) > 3 and sys.argv[3] != "all" else {}
scenes = compositions(singles=0, pairs=int(sys.argv[4])) if len(sys.argv) > 4 else None
out = {}
for way in WAYS:
    out |= evaluate_binding(model, ways=(way,), scenes=scenes, excite=grid, bind=grid, **langs)
    print(way, f"{out[way]['seconds']:.3f} s a picture\n" + format_table(out[way]["table"]), flush=True)
    with open(sys.argv[1], "w") as f:
        json.dump(out, f, indent=1)
