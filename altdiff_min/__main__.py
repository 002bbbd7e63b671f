"""Command line: `altdiff-min COMMAND …` (or `python -m altdiff_min COMMAND …`)."""
from __future__ import annotations

import argparse
import glob
import os
import sys

# The keys of altdiff_min.samplers.SAMPLERS (tests check they agree), without importing torch for --help.
SAMPLER_NAMES = ["ddim", "plms", "dpm++2m", "dpm++2m-karras", "euler", "euler_a"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="altdiff-min", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="text-to-image from non-English prompts with the shipped toy model")
    demo.add_argument("--seed", type=int, default=0)

    convert = commands.add_parser("convert", help="a hub repo, diffusers folder or single checkpoint → a model folder")
    convert.add_argument("src", help="hub repo id (BAAI/AltDiffusion-m9), diffusers-layout folder, or .ckpt/.safetensors file")
    convert.add_argument("out_dir", help="the model folder to write (config.json, model.safetensors, tokenizer)")
    convert.add_argument("--dtype", choices=["fp32", "fp16", "keep"], default="fp32")
    convert.add_argument("--revision", help="hub branch, tag or commit (e.g. fp16)")
    convert.add_argument("--tokenizer", help="sentencepiece.bpe.model; required for a single checkpoint")
    convert.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")

    gen = commands.add_parser("generate", help="text to image, as FlagAI's predict_generate_images")
    gen.add_argument("prompt", nargs="?", help="the prompt (or --from-file)")
    gen.add_argument("--negative-prompt", default="")
    gen.add_argument("--from-file", help="a text file, one prompt per line")
    gen.add_argument("--n-samples", type=int, default=4, help="images per prompt")
    gen.add_argument("--steps", type=int, default=50)
    gen.add_argument("--sampler", choices=SAMPLER_NAMES, default="ddim")
    gen.add_argument("--plms", action="store_true", help="same as --sampler plms (FlagAI's flag)")
    gen.add_argument("--scale", type=float, default=7.5, help="classifier-free guidance scale")
    gen.add_argument("--eta", type=float, default=0.0, help="DDIM η (0: deterministic)")
    gen.add_argument("--H", type=int, default=None, help="image height (default: the model's image size)")
    gen.add_argument("--W", type=int, default=None, help="image width (default: the model's image size)")
    gen.add_argument("--C", type=int, default=4, help="latent channels (must be the model's)")
    gen.add_argument("--seed", type=int, default=34234, help="every prompt starts from this seed's noise")
    gen.add_argument("--outdir", default="AltDiffusionOutputs")
    gen.add_argument("--skip-grid", action="store_true")
    gen.add_argument("--model", default="toy", help="a converted model folder, or 'toy' (the small shipped model)")
    gen.add_argument("--device", default="cuda" if torch_cuda() else "cpu")
    gen.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    gen.add_argument("--compile", action="store_true", help="torch.compile the UNet (slow first step, faster after)")

    from .toy.train import add_arguments, run as run_train_toy

    add_arguments(commands.add_parser("train-toy", help="train the small toy model from scratch (2-core CPU: ~25 min)"))

    args = parser.parse_args(argv)
    if args.command == "train-toy":
        return run_train_toy(args)
    if args.command == "generate":
        try:
            return generate(args)
        except (FileNotFoundError, ValueError, TypeError) as e:
            print(f"altdiff-min generate: error: {e}", file=sys.stderr)
            return 2
    if args.command == "demo":
        from .demo import run

        run(seed=args.seed)
    elif args.command == "convert":
        from weights_convert.convert import convert as run_convert
        from weights_convert.rules import ConversionError

        try:
            reports = run_convert(args.src, args.out_dir, dtype=args.dtype, revision=args.revision,
                                  tokenizer=args.tokenizer, force=args.force)
        except (ConversionError, FileNotFoundError, FileExistsError, ValueError) as e:
            print(f"altdiff-min convert: error: {e}", file=sys.stderr)
            return 2
        for name, report in reports.items():
            print(f"{name:13} {report}")
        print(f"wrote {args.out_dir}")
    return 0


def torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def read_prompts(args) -> list[str]:
    if args.from_file:
        if not os.path.isfile(args.from_file):
            raise FileNotFoundError(f"prompt file not found: {args.from_file}")
        with open(args.from_file, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
        if not prompts:
            raise ValueError(f"{args.from_file} has no prompts (one per line expected)")
        return prompts
    if not args.prompt:
        raise ValueError("give a prompt, or --from-file with one prompt per line")
    return [args.prompt]


def grid(images: list, columns: int):
    """One picture of all images, `columns` per row (FlagAI: n_rows = n_samples), 2 px apart."""
    from PIL import Image

    w, h = images[0].size
    rows = -(-len(images) // columns)
    canvas = Image.new("RGB", (columns * (w + 2) + 2, rows * (h + 2) + 2))
    for i, im in enumerate(images):
        canvas.paste(im, (2 + (i % columns) * (w + 2), 2 + (i // columns) * (h + 2)))
    return canvas


def generate(args) -> int:
    """`altdiff-min generate`: samples to OUTDIR/samples/NNNNN.png (continuing the count), one grid per call."""
    import torch

    from .folder import MODULES, config_from_dict, read_config
    from .pipeline import check_size, load
    from .samplers import ScheduleConfig, check_eta, timesteps

    # 1. Everything that can be checked from the arguments and config.json, before loading weights.
    prompts = read_prompts(args)
    if args.plms and args.sampler not in ("ddim", "plms"):
        raise ValueError(f"--plms conflicts with --sampler {args.sampler}")
    sampler = "plms" if args.plms else args.sampler
    if args.n_samples < 1:
        raise ValueError(f"--n-samples must be at least 1, got {args.n_samples}")
    check_eta(sampler, args.eta)
    config = read_config(args.model)
    timesteps(sampler, args.steps, config_from_dict(ScheduleConfig, config["schedule"]))
    unet, vae = (config_from_dict(MODULES[name][1], config[name]) for name in ("unet", "vae"))
    size = config.get("image_size", 512)
    check_size(size if args.H is None else args.H, size if args.W is None else args.W, vae, unet)
    if args.C != unet.in_channels:
        raise ValueError(f"--C {args.C}: this model's latents have {unet.in_channels} channels")
    # 2. The model.
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    model = load(args.model, device=args.device, dtype=dtype, compile=args.compile)
    samples = os.path.join(args.outdir, "samples")
    os.makedirs(samples, exist_ok=True)
    count = len(glob.glob(os.path.join(samples, "*.png")))
    every = []
    for prompt in prompts:
        images = model.generate(prompt, negative_prompt=args.negative_prompt, n_samples=args.n_samples,
                                steps=args.steps, sampler=sampler, scale=args.scale, eta=args.eta,
                                height=args.H, width=args.W, seed=args.seed)
        for image in images:
            path = os.path.join(samples, f"{count:05}.png")
            image.save(path)
            print(path)
            count += 1
        every += images
    if not args.skip_grid:
        path = os.path.join(args.outdir, f"grid-{len(glob.glob(os.path.join(args.outdir, 'grid-*.png'))):04}.png")
        grid(every, args.n_samples).save(path)
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
