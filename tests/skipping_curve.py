"""The speed side of the skipping curve (docs/benchmarks.md, "Skipping work"): ours only, the guided m9 UNet step
at 64×64 latents (512 px), fp32, batch 2, random weights with load's speed paths, under each ToMe / DeepCache
setting: each setting's mean step over one whole cycle of its route (DeepCache: `interval` steps), the median
of RUNS interleaved rounds after a warm-up round. The quality side is toy.evaluate with the same controllers
(docs/interventions.md).

    python tests/skipping_curve.py OUT.json RUNS
"""
import json, statistics, sys, time
import torch
from altdiff_min.model.unet import UNet, UNetConfig
from altdiff_min.research import speed
from altdiff_min.research.interventions import evaluation, intervene
from altdiff_min.research.skipping import DeepCache, ToMe

torch.manual_seed(0)
unet = speed.apply(UNet(UNetConfig()).eval())
g = torch.Generator().manual_seed(0)
x, context = torch.randn(2, 4, 64, 64, generator=g), torch.randn(2, 77, 768, generator=g)
settings = {"plain": (lambda: [], 1), **{f"tome {r}": (lambda r=r: [ToMe(r)], 1) for r in (0.3, 0.5, 0.7)},
            **{f"deepcache {n}:{b}": (lambda n=n, b=b: [DeepCache(n, b)], n) for n, b in ((2, 0), (3, 0), (5, 0), (3, 3), (3, 6))}}
times = {k: [] for k in settings}
with torch.no_grad():
    for run in range(int(sys.argv[2]) + 1):
        for name, (make, steps) in settings.items():
            ts = [torch.tensor(999.0 - 20 * i) for i in range(steps)]
            start = time.perf_counter()
            with intervene(make()):
                for t in ts:
                    with evaluation(t, True, (64, 64)):
                        unet(x, t, context)
            if run:  # the first round warms up
                times[name].append((time.perf_counter() - start) / steps)
            print(run, name, f"{(time.perf_counter() - start) / steps:.2f} s a step", flush=True)
median = {k: statistics.median(v) for k, v in times.items()}
out = {k: {"seconds": median[k], "speedup": median["plain"] / median[k], "runs": times[k]} for k in settings}
json.dump(out, open(sys.argv[1], "w"), indent=1)
for k, v in out.items():
    print(f"{k:16} {v['seconds']:.2f} s  {v['speedup']:.2f}x")
