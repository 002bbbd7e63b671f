"""`make bench`: altdiff-min against diffusers on the full m9 architecture with identical random weights.

Each measurement alternates the two (A B A B …) after one warm-up each, and reports the median of
--runs and the ratio ours / diffusers (< 1: we are faster or smaller):
  text encoder forward (batch 2) · one guided UNet step (batch 2) · VAE decode (batch 1) ·
  a whole image at --steps (DPM-Solver++, guidance 7.5) · peak memory of that image, load included ·
  load time of a model folder (ours) vs from_pretrained (diffusers, safetensors).
On a 2-core CPU use a reduced --size (the default there is 256 px); the output states it.

    python tests/benchmark.py [--size 512] [--steps 25] [--device cuda] [--dtype fp16] [--compile] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PROMPT = "黑暗精灵公主，非常详细，幻想，数字绘画，概念艺术"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def interleaved(a, b, runs: int, device: str) -> tuple[float, float]:
    """Median seconds of a() and b(), alternating, after one warm-up of each."""
    times: tuple[list[float], list[float]] = ([], [])
    for r in range(runs + 1):
        for fn, out in ((a, times[0]), (b, times[1])):
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            if r:
                out.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def build(folder: str, seed: int = 0) -> None:
    """The random m9 in both layouts: diffusers' save_pretrained folders and our model folder."""
    from helpers import train_sentencepiece
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.pipelines.deprecated.alt_diffusion.modeling_roberta_series import (
        RobertaSeriesConfig, RobertaSeriesModelWithTransformation)
    from prompts import ALL_PROMPTS
    from helpers import M9_TEXT, M9_UNET, M9_VAE

    from altdiff_min import AltDiffusion, ScheduleConfig, Tokenizer
    from weights_convert import text_encoder, unet, vae

    torch.manual_seed(seed)
    ref = {"text_encoder": RobertaSeriesModelWithTransformation(RobertaSeriesConfig(**M9_TEXT)),
           "unet": UNet2DConditionModel.from_config(M9_UNET), "vae": AutoencoderKL.from_config(M9_VAE)}
    ours = {}
    for name, module in ref.items():
        module.save_pretrained(os.path.join(folder, "diffusers", name))
        convert = {"text_encoder": text_encoder, "unet": unet, "vae": vae}[name]
        config = module.config.to_dict() if name == "text_encoder" else dict(module.config)
        ours[name], _ = convert.load(module.state_dict(), convert.config_from_hf(config))
    # A small tokenizer stands in for XLM-R's 250k pieces: its ids are valid inputs of the full model.
    spm = train_sentencepiece(os.path.join(folder, "diffusers", "sentencepiece.bpe.model"), ALL_PROMPTS * 3)
    AltDiffusion(tokenizer=Tokenizer(spm), schedule=ScheduleConfig(), **ours).save(os.path.join(folder, "ours"))


def load_diffusers(folder: str, device: str, dtype: torch.dtype):
    from diffusers import AutoencoderKL, DDIMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel
    from diffusers.pipelines.deprecated.alt_diffusion import AltDiffusionPipeline
    from diffusers.pipelines.deprecated.alt_diffusion.modeling_roberta_series import RobertaSeriesModelWithTransformation
    from helpers import SCHEDULER
    from transformers import XLMRobertaTokenizer

    d = os.path.join(folder, "diffusers")
    kw = dict(torch_dtype=dtype)
    tokenizer = XLMRobertaTokenizer.from_pretrained(d, model_max_length=77)
    pipe = AltDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(os.path.join(d, "vae"), **kw),
        text_encoder=RobertaSeriesModelWithTransformation.from_pretrained(os.path.join(d, "text_encoder"), **kw),
        unet=UNet2DConditionModel.from_pretrained(os.path.join(d, "unet"), **kw), tokenizer=tokenizer,
        scheduler=DPMSolverMultistepScheduler.from_config(DDIMScheduler.from_config(SCHEDULER).config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def load_ours(folder: str, device: str, dtype: torch.dtype):
    from altdiff_min import load

    return load(os.path.join(folder, "ours"), device=device, dtype=dtype)


def image_fns(ours, theirs, args):
    gen = dict(height=args.size, width=args.size)
    return (lambda: ours.generate(PROMPT, steps=args.steps, sampler="dpm++2m", seed=0, output="tensor", progress=False, **gen),
            lambda: theirs(PROMPT, num_inference_steps=args.steps, generator=torch.Generator("cpu").manual_seed(0),
                           output_type="pt", **gen))


def probe(args) -> None:
    """Child process: load one implementation and make one image; print its peak memory in MiB."""
    device, dtype = args.device, DTYPES[args.dtype]
    model = (load_ours if args.probe == "ours" else load_diffusers)(args.folder, device, dtype)
    with torch.no_grad():
        (image_fns(model, None, args)[0] if args.probe == "ours" else image_fns(None, model, args)[1])()
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:  # VmHWM: this process's own peak (ru_maxrss would include the parent's, inherited across fork/exec)
        with open("/proc/self/status") as f:
            peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    print(json.dumps({"peak_mib": peak / 2**20}))


def peak_memory(args, which: str) -> float:
    cmd = [sys.executable, __file__, "--probe", which, "--folder", args.folder, "--size", str(args.size),
           "--steps", str(args.steps), "--device", args.device, "--dtype", args.dtype]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default 512 on cuda, 256 on cpu)")
    p.add_argument("--steps", type=int, default=None, help="steps of the whole image (default 25 on cuda, 4 on cpu)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile both UNets")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--json", default="benchmark.json")
    p.add_argument("--probe", choices=["ours", "diffusers"], help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.size = args.size or (512 if args.device == "cuda" else 256)
    args.steps = args.steps or (25 if args.device == "cuda" else 4)
    if args.probe:
        return probe(args)
    device, dtype = args.device, DTYPES[args.dtype]
    with tempfile.TemporaryDirectory() as folder:
        args.folder = folder
        print(f"building the random m9 in both layouts under {folder} …", flush=True)
        build(folder)
        rows = {"load (s)": interleaved(lambda: load_ours(folder, device, dtype),
                                        lambda: load_diffusers(folder, device, dtype), args.runs, device)}
        ours, theirs = load_ours(folder, device, dtype), load_diffusers(folder, device, dtype)
        if args.compile:
            ours.unet = torch.compile(ours.unet, fullgraph=True)
            theirs.unet = torch.compile(theirs.unet)
        g = torch.Generator().manual_seed(0)
        ids, mask = ours.tokenizer(["", PROMPT])
        ids, mask = ids.to(device), mask.to(device)
        x = torch.randn(2, 4, args.size // 8, args.size // 8, generator=g).to(device, dtype)
        context = torch.randn(2, 77, 768, generator=g).to(device, dtype)
        z = torch.randn(1, 4, args.size // 8, args.size // 8, generator=g).to(device, dtype)
        t = torch.tensor(500, device=device)
        rows["text encoder (s)"] = interleaved(lambda: ours.text_encoder(ids, mask),
                                               lambda: theirs.text_encoder(input_ids=ids, attention_mask=mask), args.runs, device)
        rows["guided UNet step (s)"] = interleaved(lambda: ours.unet(x, t, context),
                                                   lambda: theirs.unet(x, t, encoder_hidden_states=context), args.runs, device)
        rows["VAE decode (s)"] = interleaved(lambda: ours.vae.decode(z), lambda: theirs.vae.decode(z), args.runs, device)
        rows[f"image, {args.steps} steps (s)"] = interleaved(*image_fns(ours, theirs, args), args.runs, device)
        del ours, theirs
        rows["peak memory (MiB)"] = (peak_memory(args, "ours"), peak_memory(args, "diffusers"))
    machine = (torch.cuda.get_device_name() if device == "cuda" else f"{platform.processor() or platform.machine()}, "
               f"{os.cpu_count()} cores")
    title = f"{machine} · {args.dtype} · {args.size}×{args.size} px · compile={args.compile} · median of {args.runs}"
    print(f"\n{title}\n{'':24}{'altdiff-min':>12}{'diffusers':>12}{'ratio':>8}")
    for name, (a, b) in rows.items():
        print(f"{name:24}{a:12.3f}{b:12.3f}{a / b:8.2f}")
    with open(args.json, "w") as f:
        json.dump({"machine": machine, "args": {k: v for k, v in vars(args).items() if k not in ("probe", "folder")},
                   "results": {k: {"ours": a, "diffusers": b, "ratio": a / b} for k, (a, b) in rows.items()}}, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
