"""Command line: `altdiff-min COMMAND …` (or `python -m altdiff_min COMMAND …`)."""
from __future__ import annotations

import argparse
import os
import sys

# The keys of altdiff_min.sampling.samplers.SAMPLERS (tests check they agree), without importing torch for --help.
SAMPLER_NAMES = ["ddim", "plms", "dpm++2m", "dpm++2m-karras", "euler", "euler_a"]


def main(argv: list[str] | None = None) -> int:
    from ..checks import STRENGTH_RANGE

    parser = argparse.ArgumentParser(prog="altdiff-min", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="text-to-image from non-English prompts with the shipped toy model")
    demo.add_argument("--seed", type=int, default=0)

    convert = commands.add_parser("convert", help="a hub repo, diffusers or transformers folder, or single checkpoint → a model folder")
    convert.add_argument("src", help="hub repo id (BAAI/AltDiffusion-m9, BAAI/AltCLIP-m9), a folder in their layouts "
                         "(diffusers, transformers), or a .ckpt/.safetensors file")
    convert.add_argument("out_dir", help="the model folder to write (config.json, model.safetensors, tokenizer)")
    convert.add_argument("--dtype", choices=["fp32", "fp16", "keep"], default="fp32")
    convert.add_argument("--revision", help="hub branch, tag or commit (e.g. fp16)")
    convert.add_argument("--tokenizer", help="sentencepiece.bpe.model: required for a single checkpoint; for a "
                         "folder without one (transformers 5 saves tokenizer.json only), the hub's m9 tokenizer file")
    convert.add_argument("--force", action="store_true", help="replace OUT_DIR if it is a model folder altdiff-min wrote")
    convert.add_argument("--with-safety-checker", action="store_true", help="also convert the diffusers folder's "
                         "safety_checker/ (1.1 GB from the hub; generate then checks every picture by default)")

    export = commands.add_parser("export", help="a model folder → the diffusers layout or a web-UI single file; a "
                                 "LoRA file → the kohya form")
    export.add_argument("model", help="a model folder (for --to kohya: a diffusers/peft LoRA .safetensors file)")
    export.add_argument("out", help="the diffusers folder, or the .safetensors file, to write")
    export.add_argument("--to", required=True, help="diffusers (AltDiffusionPipeline.from_pretrained), single-file (the "
                        "ldm layout of the web UIs and FlagAI), or kohya (a LoRA file for the web UIs)")
    export.add_argument("--dtype", default="fp32", help="fp32, fp16 or bf16 (default: fp32)")
    export.add_argument("--force", action="store_true", help="replace OUT if altdiff-min export wrote it")

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
    gen.add_argument("--guidance", default="cfg", metavar="RULE",
                     help="how the unconditional and conditional predictions combine: cfg (classifier-free "
                     "guidance), rescale[:PHI] (CFG rescale, φ 0.7 by default), interval:LOW,HIGH (guidance only "
                     "for timesteps in [LOW, HIGH]) (default: cfg)")
    gen.add_argument("--H", type=int, default=None, help="image height (default: the model's image size)")
    gen.add_argument("--W", type=int, default=None, help="image width (default: the model's image size)")
    gen.add_argument("--C", type=int, default=4, help="latent channels (must be the model's)")
    gen.add_argument("--seed", type=int, default=34234, help="every prompt starts from this seed's noise")
    gen.add_argument("--outdir", default="AltDiffusionOutputs")
    gen.add_argument("--skip-grid", action="store_true")
    gen.add_argument("--model", default="toy", help="a converted model folder, or 'toy' / 'toy-one', the small shipped models (default: toy)")
    gen.add_argument("--device", default="cuda" if torch_cuda() else "cpu")
    gen.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    gen.add_argument("--compile", action="store_true", help="torch.compile the UNet (slow first step, faster after)")
    gen.add_argument("--no-limits", action="store_true",
                     help="lift the sanity limits on image side (4096), batch (256) and pixels per call")
    gen.add_argument("--init-img", help="image to image: start from this picture (its size rounded down to a multiple "
                     "the model takes, unless --H/--W are given)")
    gen.add_argument("--strength", type=float, default=None, help="with --init-img: how much of the route runs, "
                     f"{STRENGTH_RANGE}; 1 starts from (almost) pure noise, with --mask from pure noise (default 0.8, with --mask 1.0, as diffusers)")
    gen.add_argument("--mask", help="with --init-img: inpainting; white is repainted, black kept (same size as the picture)")
    gen.add_argument("--paste-unmasked", action="store_true", help="with --mask: paste the kept pixels back exactly")
    gen.add_argument("--safety-checker", action=argparse.BooleanOptionalAction, default=None,
                     help="check every picture with the model's safety checker and replace flagged ones by a "
                     "placeholder (default: when the model folder holds one; --no-safety-checker: never)")
    gen.add_argument("--lora", action="append", metavar="FILE[:SCALE]",
                     help="apply a LoRA of the UNet and/or text encoder (.safetensors, diffusers/peft or kohya/web-UI format) at SCALE (default "
                     "1.0; 0: none); repeat for several (their updates add up, each at its scale); checked before "
                     "the model loads, recorded (path, SHA-256, scale) and replayed")
    gen.add_argument("--embedding", action="append", metavar="FILE[:TOKEN]",
                     help="add the new word(s) of a textual-inversion file (diffusers' learned_embeds.safetensors, or "
                     "the web UI's; TOKEN renames its one word) to the tokenizer; repeatable; recorded and replayed")
    gen.add_argument("--tome", type=float, default=None, metavar="RATIO",
                     help="token merging (ToMe for SD, tomesd's defaults): merge this share of the tokens before each "
                     "self-attention of the finest level, e.g. 0.5; faster, the picture changes a little; recorded and replayed")
    gen.add_argument("--deepcache", default=None, metavar="N[:BRANCH]",
                     help="feature caching (DeepCache): the whole UNet every N steps, the others only the blocks above "
                     "skip branch BRANCH (default 0, the shallowest), reusing the deep ones; recorded and replayed")
    gen.add_argument("--replay", metavar="MANIFEST:LINE|PICTURE",
                     help="make a picture again, into --outdir: the one of line LINE (1-based) of an --outdir's "
                     "manifest.jsonl, or a PNG generate made (it carries its settings)")

    from .excite import add_arguments as add_excite_arguments

    add_excite_arguments(gen)
    from .edit import add_arguments as add_edit_arguments

    add_edit_arguments(commands.add_parser("edit", help="edit a picture by editing its prompt: null-text inversion, "
                                           "then prompt-to-prompt (docs/editing.md)"))

    add_train_arguments(commands.add_parser(
        "train", help="fine-tune a model folder on captioned pictures (one process, or many under torchrun)",
        description="Fine-tune MODEL on DATA into the run folder OUT_DIR (run.json, checkpoint.pt, loss.jsonl, "
                    "loss.png, samples/, and the result in OUT_DIR/model). Under `torchrun --nproc_per_node N` the same "
                    "command trains with DistributedDataParallel; the sums do not depend on N.",
        usage="%(prog)s [options] MODEL DATA OUT_DIR, or %(prog)s OUT_DIR --resume [options]"))

    sweep = commands.add_parser("sweep", help="an ablation grid: every setting × prompt × seed, a table and a contact sheet")
    sweep.add_argument("spec", help="the sweep spec, JSON or TOML: model, prompts, seeds, fixed, axes, metrics "
                       "(see altdiff_min/apps/sweep.py)")
    sweep.add_argument("--outdir", help="where the pictures and the table go (default: SPEC without its extension)")
    sweep.add_argument("--device", default=None, help="cpu or cuda (default: cuda when there is one)")
    sweep.add_argument("--force", action="store_true", help="replace the sweep in --outdir if it was made from another spec")

    score = commands.add_parser("score", help="multilingual CLIP score of pictures and their prompts, with AltCLIP-m9")
    score.add_argument("path", help="a generate --outdir (or its manifest.jsonl), or a folder of pictures captioned in "
                       "metadata.jsonl or NAME.txt files")
    score.add_argument("--clip", required=True, help="an AltCLIP model folder (`altdiff-min convert BAAI/AltCLIP-m9 OUT_DIR`)")
    score.add_argument("--out", help="write every picture's score to this CSV file (file, prompt, clip_score)")
    score.add_argument("--force", action="store_true", help="replace --out if it exists")
    score.add_argument("--device", default=None, help="cpu or cuda (default: cuda when there is one)")
    score.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    score.add_argument("--batch-size", type=int, default=32, help="pictures per forward pass")
    score.add_argument("--no-progress", action="store_true", help="no progress bar")

    ui = commands.add_parser("ui", help="a web page for text-to-image and image-to-image (pip install -e .[ui])")
    ui.add_argument("--model", default="toy", help="a model folder, or 'toy' (the small shipped model, runs offline)")
    ui.add_argument("--host", default="127.0.0.1", help="the address to listen on (0.0.0.0: every interface)")
    ui.add_argument("--port", type=int, default=7860)
    ui.add_argument("--device", default=None, help="cpu or cuda (default: cuda when there is one)")
    ui.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    ui.add_argument("--lora-dir", metavar="DIR", help="offer the LoRA files in DIR (*.safetensors, read at start) "
                    "on the page, each by name with a scale")

    from ..toy.train import add_arguments

    add_arguments(commands.add_parser("train-toy", help="train the small toy model from scratch (2-core CPU: ~50 min)"))

    args, extra = parser.parse_known_args(argv)
    if args.command == "train":  # MODEL DATA OUT_DIR may be split by flags: `train MODEL DATA --lr 1e-4 OUT_DIR`
        args.paths += [x for x in extra if not x.startswith("-")]
        extra = [x for x in extra if x.startswith("-")]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from ..errors import AltDiffError

    try:
        return run(args)
    except AltDiffError as e:  # an expected failure: one line, exit 2; anything else is a bug and keeps its traceback
        print(f"altdiff-min {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"altdiff-min {args.command}: interrupted", file=sys.stderr)
        return 130


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    from ..training.config import add_config_arguments

    p.add_argument("paths", nargs="+", metavar="MODEL DATA OUT_DIR",
                   help="MODEL: the model folder to start from, 'toy' or one `altdiff-min convert` wrote; DATA: a "
                   "folder of images captioned in metadata.jsonl ({\"file_name\": …, \"text\": …} per line) or in "
                   "NAME.txt beside each image, or 'toy' (the toy world's pictures), or several mixed by weight, "
                   "SOURCE:WEIGHT,SOURCE:WEIGHT (e.g. new:3,toy:1; see docs/training.md); OUT_DIR: the run folder to write, "
                   "OUT_DIR/model is the result, for load() and --model. With --resume, OUT_DIR alone: the run's "
                   "model, data and settings come from OUT_DIR/run.json")
    add_config_arguments(p)  # one flag per TrainConfig setting, its default written there
    p.add_argument("--resolution", type=int, default=None, help="pictures are resized and centre-cropped to this "
                   "(default: the model's image size; the toy world's is 64)")
    p.add_argument("--resume", action="store_true", help="continue the run in OUT_DIR from its checkpoint, with the "
                   "settings in its run.json; give only what changes (--max-steps N extends a finished run, "
                   "--batch-size/--grad-accum with the same product, --save-every, --sample-*, --device)")
    p.add_argument("--force", action="store_true", help="start again, replacing OUT_DIR if it is a run folder altdiff-min wrote")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when there is one); under torchrun each "
                   "process takes the GPU of its LOCAL_RANK")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def train(args) -> int:
    """`altdiff-min train MODEL DATA OUT_DIR`, or `train OUT_DIR --resume`: the settings are checked
    (TrainConfig) before anything is read; on --resume they are run.json's, with the flags given now."""
    from ..errors import BadValue
    from ..storage.files import read_json
    from ..training.config import config_from_flags
    from ..training.fine_tune import fine_tune
    from ..training.run_folder import RUN, check_links

    if len(args.paths) not in ((1, 3) if args.resume else (3,)):
        raise BadValue(f"give MODEL DATA OUT_DIR{', or OUT_DIR alone with --resume' if args.resume else ''}; got "
                       f"{len(args.paths)} path(s): {' '.join(args.paths)}")
    *sources, out_dir = args.paths
    recorded = None
    if args.resume and os.path.isdir(out_dir) and not os.path.islink(out_dir):
        check_links(out_dir)  # run.json read through a link would be another run's settings
    if args.resume and os.path.isfile(os.path.join(out_dir, RUN)) and not os.path.islink(os.path.join(out_dir, RUN)):
        recorded = read_json(os.path.join(out_dir, RUN), RUN)  # fine_tune reads it again under the folder's lock
        if not isinstance(recorded, dict) or not isinstance(recorded.get("config"), dict):
            recorded = None  # fine_tune says what is wrong with the folder
    if args.resume and not sources:
        if recorded is None:
            raise BadValue(f"--resume with OUT_DIR alone needs {os.path.join(out_dir, RUN)} (a run altdiff-min "
                           f"started); give MODEL DATA OUT_DIR")
        data = recorded.get("data") or {}
        sources = [(recorded.get("model") or {}).get("path"),
                   data.get("name") or {"toy": "toy", "mixture": data.get("spec")}.get(data.get("kind"), data.get("path"))]
        if not all(isinstance(x, str) for x in sources):
            raise BadValue(f"{os.path.join(out_dir, RUN)} does not name the run's model and data; give MODEL DATA OUT_DIR")
    resolution = args.resolution
    if resolution is None and recorded is not None:
        resolution = (recorded.get("data") or {}).get("resolution")
    cfg = config_from_flags(args, recorded["config"] if recorded is not None else None)
    result = fine_tune(*sources, out_dir, cfg, resolution, args.device or ("cuda" if torch_cuda() else "cpu"),
                       resume=args.resume, force=args.force, progress=not args.no_progress)
    if os.environ.get("RANK", "0") == "0":
        print(f"wrote {result}")
    return 0


def run(args) -> int:
    if args.command == "train":
        return train(args)
    if args.command == "sweep":
        from .sweep import run_sweep

        run_sweep(args.spec, args.outdir, args.device or ("cuda" if torch_cuda() else "cpu"), force=args.force)
        return 0
    if args.command == "ui":
        from .ui import run as run_ui

        return run_ui(args)
    if args.command == "score":
        from ..vision.score import run as run_score

        return run_score(args)
    if args.command == "train-toy":
        from ..toy.train import run as run_train_toy

        return run_train_toy(args)
    if args.command == "edit":
        from .edit import run as run_edit

        return run_edit(args)
    if args.command == "generate":
        from .generate import generate

        return generate(args)
    if args.command == "export":
        from weights_convert.export import export

        print(f"wrote {export(args.model, args.out, to=args.to, dtype=args.dtype, force=args.force)}")
        return 0
    if args.command == "demo":
        from .demo import run as run_demo

        run_demo(seed=args.seed)
    elif args.command == "convert":
        from weights_convert.convert import convert as run_convert

        reports = run_convert(args.src, args.out_dir, dtype=args.dtype, revision=args.revision,
                              tokenizer=args.tokenizer, force=args.force, safety_checker=args.with_safety_checker)
        for name, report in reports.items():
            print(f"{name:15} {report}")
        if not args.with_safety_checker and os.path.isdir(os.path.join(args.src, "safety_checker")):
            print(f"not converted: {os.path.join(args.src, 'safety_checker')} (pass --with-safety-checker)")
        print(f"wrote {args.out_dir}")
    return 0


def torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
