"""Reconstruction of real pictures after inversion, on toy-one (not a test: docs/editing.md's table).

    PYTHONPATH=$PWD python tests/measure_inversion.py [--n 50] [--steps 50] [--batch 10]

Mean |Δpixel| over n toy pictures of the VAE round trip, DDIM inversion at guidance 7.5 sampled back
at 7.5, and null-text inversion at 7.5 (research/inversion.measure), and seconds per picture."""
import argparse
import sys

import torch

import altdiff_min
from altdiff_min.toy.editing import measure_inversion

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--scale", type=float, default=7.5)
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    table = measure_inversion(altdiff_min.load("toy-one"), args.n, args.steps, args.scale, batch=args.batch, progress=False,
                    log=lambda line: print(line, flush=True))
    vae = table["vae round trip"]["mean |Δpixel|"]
    print(f"\n{args.n} pictures, {args.steps} steps, {torch.get_num_threads()} threads")
    print("| | mean |Δpixel| | × VAE round trip | seconds per picture |\n|---|---|---|---|")
    for name, row in table.items():
        print(f"| {name} | {row['mean |Δpixel|']:.4f} | {row['mean |Δpixel|'] / vae:.2f} | {row['seconds']:.2f} |")
    sys.stdout.flush()
