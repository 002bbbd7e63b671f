"""Where a guided UNet step's time goes: altdiff-min's and diffusers' m9 UNet (identical random weights),
per operator (torch.profiler), with variants of how each runs. The companion of benchmark.py, which
says *how fast*; this says *why*.

A variant is SIDE:COMPILE:LAYOUT, e.g. ours:none:nchw, diffusers:default:nchw, ours:reduce-overhead:nhwc
  SIDE     ours | ours-as-written (load(fast=False)) | diffusers
  COMPILE  none | a torch.compile mode (default, reduce-overhead, max-autotune-no-cudagraphs)
  LAYOUT   nchw | nhwc (the UNet's weights and input in channels_last)
All variants are timed round-robin (one warm-up each, which includes compiling, reported), medians of
--runs; then each eager or plainly compiled variant is profiled over 3 steps and its operators are
summed into classes (convolution, matrix product, attention, normalisation, the rest); on cuda it
also prints how busy the GPU was (kernel time / wall time: well under 1 means launch-bound).

    python tests/profile_step.py --device cuda --dtype fp16 --size 512 \\
        --variants ours:none:nchw diffusers:none:nchw ours:default:nchw diffusers:default:nchw
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from benchmark import DTYPES, seconds, sync  # noqa: E402

CLASSES = (  # operator (or kernel) name fragments → class; the first match wins
    ("attention", ("scaled_dot_product", "flash", "attention", "fmha", "softmax", "baddbmm")),
    ("convolution", ("conv", "cudnn", "im2col", "unfold", "col2im", "implicit_gemm", "xmma_fprop")),
    ("matrix product", ("addmm", "aten::mm", "bmm", "matmul", "linear", "gemm", "cutlass", "sm90_xmma", "nvjet")),
    ("normalisation", ("group_norm", "layer_norm", "native_batch_norm", "norm")),
)


def classify(name: str) -> str:
    low = name.lower()
    return next((cls for cls, keys in CLASSES if any(k in low for k in keys)), "the rest")


def build(device: str, dtype: torch.dtype, seed: int = 0):
    """diffusers' m9 UNet with random weights, and ours converted from its state dict."""
    from diffusers import UNet2DConditionModel
    from helpers import M9_UNET

    from weights_convert import unet as convert

    torch.manual_seed(seed)
    theirs = UNet2DConditionModel.from_config(M9_UNET).eval()
    ours, _ = convert.load(theirs.state_dict(), convert.config_from_hf(dict(theirs.config)))
    return ours.eval(), theirs


def check_variant(spec: str) -> None:
    parts = spec.split(":")
    if len(parts) != 3 or parts[0] not in ("ours", "ours-as-written", "diffusers") or parts[2] not in ("nchw", "nhwc"):
        sys.exit(f"bad variant {spec!r}: SIDE:COMPILE:LAYOUT, SIDE ours|ours-as-written|diffusers, LAYOUT nchw|nhwc")


def variant(spec: str, ours, theirs, device: str, dtype: torch.dtype):
    """(callable of (x, t, context), compile mode) for one SIDE:COMPILE:LAYOUT; each variant its own copy."""
    import copy

    from altdiff_min.research import speed

    side, mode, layout = spec.split(":")
    model = copy.deepcopy(theirs if side == "diffusers" else ours)
    if side == "ours":
        speed.apply(model)
    model = model.to(device, dtype)
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    model = model.to(memory_format=fmt)
    if mode != "none":
        model = torch.compile(model, mode=None if mode == "default" else mode, fullgraph=side != "diffusers")
    if side == "diffusers":
        return lambda x, t, c: model(x.contiguous(memory_format=fmt), t, encoder_hidden_states=c).sample
    return lambda x, t, c: model(x.contiguous(memory_format=fmt), t, c)


def profile(fn, args, device: str, top: int) -> dict:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    sync(device)
    start = time.perf_counter()
    with torch_profile(activities=acts) as prof:
        for _ in range(3):
            fn(*args)
        sync(device)
    wall = (time.perf_counter() - start) / 3
    on_device = device == "cuda"
    rows = []
    for e in prof.key_averages():
        us = e.self_device_time_total if on_device else e.self_cpu_time_total
        if us > 0 and (not on_device or e.device_type == torch.autograd.DeviceType.CUDA):
            rows.append((e.key, us / 3 / 1e3, e.count // 3))
    rows.sort(key=lambda r: -r[1])
    classes: dict[str, float] = {}
    for name, ms, _ in rows:
        classes[classify(name)] = classes.get(classify(name), 0.0) + ms
    busy = sum(ms for _, ms, _ in rows)
    return {"wall_ms": wall * 1e3, "busy_ms": busy, "classes": classes, "top": rows[:top]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--size", type=int, default=256, help="image side in pixels; latents are size/8")
    p.add_argument("--variants", nargs="+", default=["ours:none:nchw", "diffusers:none:nchw"])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--no-profile", action="store_true", help="timings only")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    device, dtype = args.device, DTYPES[args.dtype]
    for spec in args.variants:  # before the minute-long build
        check_variant(spec)
    torch.set_grad_enabled(False)
    ours, theirs = build(device, dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, args.size // 8, args.size // 8, generator=g).to(device, dtype)
    context = torch.randn(2, 77, 768, generator=g).to(device, dtype)
    t = torch.tensor(500.0, device=device)
    fns, warm = {}, {}
    for spec in args.variants:
        fn = fns[spec] = variant(spec, ours, theirs, device, dtype)
        calls = 3 if ":none:" not in spec else 1  # cudagraph modes record on their 2nd/3rd call
        warm[spec] = sum(seconds(lambda: fn(x, t, context), device) for _ in range(calls))
        print(f"{spec}: warm-up (compile included) {warm[spec]:.1f} s", flush=True)
    times: dict[str, list[float]] = {s: [] for s in fns}
    for _ in range(args.runs):
        for spec, fn in fns.items():
            times[spec].append(seconds(lambda: fn(x, t, context), device))
    base = statistics.median(times[args.variants[-1]])
    print(f"\n{args.device} {args.dtype} {args.size} px, guided UNet step (batch 2), median of {args.runs}, "
          f"ratio to {args.variants[-1]}")
    result = {"args": vars(args), "variants": {}}
    for spec in fns:
        med = statistics.median(times[spec])
        print(f"  {spec:36} {med * 1e3:9.2f} ms  ({med / base:.2f})  spread {min(times[spec]) * 1e3:.2f}–"
              f"{max(times[spec]) * 1e3:.2f}", flush=True)
        result["variants"][spec] = {"median_s": med, "times": times[spec], "warmup_s": warm[spec]}
    if not args.no_profile:
        for spec, fn in fns.items():
            if "cudagraphs" not in spec and "reduce-overhead" not in spec and "max-autotune:" not in spec:
                prof = profile(fn, (x, t, context), device, args.top)
                result["variants"][spec]["profile"] = prof
                print(f"\n== {spec}: {prof['wall_ms']:.2f} ms a step, {prof['busy_ms']:.2f} ms of it in operators"
                      f"{' on the GPU' if device == 'cuda' else ''} ({prof['busy_ms'] / prof['wall_ms']:.0%})")
                for cls, ms in sorted(prof["classes"].items(), key=lambda kv: -kv[1]):
                    print(f"   {cls:16} {ms:9.2f} ms  {ms / prof['busy_ms']:5.1%}")
                for name, ms, count in prof["top"]:
                    print(f"     {ms:8.2f} ms  ×{count:<4} {name[:90]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
