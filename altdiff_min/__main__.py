"""Command line: `altdiff-min COMMAND …` (or `python -m altdiff_min COMMAND …`)."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="altdiff-min", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="run the most complete part of the model that exists, on small random weights")
    demo.add_argument("--seed", type=int, default=0)

    convert = commands.add_parser("convert", help="a hub repo, diffusers folder or single checkpoint → a model folder")
    convert.add_argument("src", help="hub repo id (BAAI/AltDiffusion-m9), diffusers-layout folder, or .ckpt/.safetensors file")
    convert.add_argument("out_dir", help="the model folder to write (config.json, model.safetensors, tokenizer)")
    convert.add_argument("--dtype", choices=["fp32", "fp16", "keep"], default="fp32")
    convert.add_argument("--revision", help="hub branch, tag or commit (e.g. fp16)")
    convert.add_argument("--tokenizer", help="sentencepiece.bpe.model; required for a single checkpoint")
    convert.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")

    args = parser.parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
