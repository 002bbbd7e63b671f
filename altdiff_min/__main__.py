"""Command line: `altdiff-min COMMAND …` (or `python -m altdiff_min COMMAND …`)."""
from __future__ import annotations

import argparse
import math
import os
import sys

# The keys of altdiff_min.samplers.SAMPLERS (tests check they agree), without importing torch for --help.
SAMPLER_NAMES = ["ddim", "plms", "dpm++2m", "dpm++2m-karras", "euler", "euler_a"]


def main(argv: list[str] | None = None) -> int:
    from .checks import STRENGTH_RANGE

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
    gen.add_argument("--model", default="toy", help="a converted model folder, or 'toy', the small shipped model (default: toy)")
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
    gen.add_argument("--replay", metavar="MANIFEST:LINE|PICTURE",
                     help="make a picture again, into --outdir: the one of line LINE (1-based) of an --outdir's "
                     "manifest.jsonl, or a PNG generate made (it carries its settings)")

    add_train_arguments(commands.add_parser(
        "train", help="fine-tune a model folder on captioned pictures (one process, or many under torchrun)",
        description="Fine-tune MODEL on DATA into the run folder OUT_DIR (run.json, checkpoint.pt, loss.jsonl, "
                    "loss.png, samples/, and the result in OUT_DIR/model). Under `torchrun --nproc_per_node N` the same "
                    "command trains with DistributedDataParallel; the sums do not depend on N.",
        usage="%(prog)s [options] MODEL DATA OUT_DIR, or %(prog)s OUT_DIR --resume [options]"))

    sweep = commands.add_parser("sweep", help="an ablation grid: every setting × prompt × seed, a table and a contact sheet")
    sweep.add_argument("spec", help="the sweep spec, JSON or TOML: model, prompts, seeds, fixed, axes, metrics "
                       "(see altdiff_min/sweep.py)")
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

    from .toy.train import add_arguments

    add_arguments(commands.add_parser("train-toy", help="train the small toy model from scratch (2-core CPU: ~50 min)"))

    args, extra = parser.parse_known_args(argv)
    if args.command == "train":  # MODEL DATA OUT_DIR may be split by flags: `train MODEL DATA --lr 1e-4 OUT_DIR`
        args.paths += [x for x in extra if not x.startswith("-")]
        extra = [x for x in extra if x.startswith("-")]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from .errors import AltDiffError

    try:
        return run(args)
    except AltDiffError as e:  # an expected failure: one line, exit 2; anything else is a bug and keeps its traceback
        print(f"altdiff-min {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"altdiff-min {args.command}: interrupted", file=sys.stderr)
        return 130


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    from .train import add_config_arguments

    p.add_argument("paths", nargs="+", metavar="MODEL DATA OUT_DIR",
                   help="MODEL: the model folder to start from, 'toy' or one `altdiff-min convert` wrote; DATA: a "
                   "folder of images captioned in metadata.jsonl ({\"file_name\": …, \"text\": …} per line) or in "
                   "NAME.txt beside each image, or 'toy' (the toy world's pictures); OUT_DIR: the run folder to write, "
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
    from .errors import BadValue
    from .files import read_json
    from .run_folder import RUN, check_links
    from .train import config_from_flags, fine_tune

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
        sources = [(recorded.get("model") or {}).get("path"), "toy" if data.get("kind") == "toy" else data.get("path")]
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
        from .score import run as run_score

        return run_score(args)
    if args.command == "train-toy":
        from .toy.train import run as run_train_toy

        return run_train_toy(args)
    if args.command == "generate":
        return generate(args)
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


def read_prompts(args) -> list[str]:
    from .errors import AltDiffError, BadValue
    from .files import read_text
    from .tokenizer import check_prompt

    if args.from_file:
        if args.prompt is not None:
            raise BadValue("give a prompt or --from-file, not both")
        text = read_text(args.from_file, "prompt file")
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
        if not prompts:
            raise BadValue(f"{args.from_file} has no prompts (one per line expected)")
    elif args.prompt is None or not args.prompt.strip():
        raise BadValue("give a prompt (not empty or blank), or --from-file with one prompt per line")
    else:
        prompts = [args.prompt]
    for prompt in prompts:
        check_prompt(prompt)
    try:
        check_prompt(args.negative_prompt)
    except AltDiffError as e:
        raise type(e)(f"--negative-prompt: {e}") from None
    return prompts


def grid(images: list, columns: int):
    """One picture of all images, `columns` per row (FlagAI: n_rows = n_samples), 2 px apart."""
    from PIL import Image

    w, h = images[0].size
    rows = -(-len(images) // columns)
    canvas = Image.new("RGB", (columns * (w + 2) + 2, rows * (h + 2) + 2))
    for i, im in enumerate(images):
        canvas.paste(im, (2 + (i % columns) * (w + 2), 2 + (i // columns) * (h + 2)))
    return canvas


def replay(args) -> int | None:
    """--replay MANIFEST:LINE or --replay PICTURE.png: the arguments become those the line (or the record
    the picture carries) holds; returns which picture of that batch to keep (a seed's noise is drawn
    for the whole batch at once)."""
    from .errors import BadFile, BadValue
    from .files import parse_json, read_text
    from .folder import fingerprint
    from .provenance import environment, record_of_png

    if args.prompt is not None or args.from_file:
        raise BadValue("--replay takes the prompt from the manifest line; give no prompt or --from-file")
    if is_png(args.replay):
        source = args.replay
        row = record_of_png(source, "--replay")
        if row is None:
            raise BadFile(f"--replay: {source} carries no altdiff-min record (it was not made by altdiff-min generate)")
    else:
        file, _, line = args.replay.rpartition(":")
        if not file or not line.isdigit() or int(line) < 1:
            raise BadValue(f"--replay takes MANIFEST:LINE (e.g. out/manifest.jsonl:3) or a picture generate made, "
                           f"got {args.replay!r}")
        lines = read_text(file, "manifest").splitlines()
        if int(line) > len(lines):
            raise BadValue(f"--replay: {file} has {len(lines)} line(s), not {line}")
        source, row = f"{file} line {line}", parse_json(lines[int(line) - 1], f"{file} line {line}")
    if isinstance(row, dict) and isinstance(training := row.get("training"), dict):  # provenance.picture_record's
        raise BadValue(f"--replay: {source} is a sample of the training run {training.get('run')} at step "
                       f"{training.get('step')}: those weights are in no model folder, so it cannot be made again")
    if isinstance(row, dict) and (unset := [k for k in ("text_layer", "cross_attention") if k in row]):
        made = ", ".join(f"{k}={row[k]!r}" for k in unset)
        raise BadValue(f"--replay: {source} was made with {made} (a sweep's setting), which generate cannot set; "
                       f"make it again with model.generate(…, {made})")
    try:
        if not isinstance(row, dict):
            raise TypeError("not an object")
        args.prompt, args.from_file, args.negative_prompt = row["prompt"], None, row["negative_prompt"]
        args.seed, args.sampler, args.plms, args.steps = row["seed"], row["sampler"], False, row["steps"]
        args.scale, args.eta, args.H, args.W = row["scale"], row["eta"], row["height"], row["width"]
        args.guidance = row.get("guidance", "cfg")  # lines written before guidance rules were plain CFG
        args.n_samples, args.dtype, args.model = row["n_samples"], row["dtype"], row["model"]["path"]
        args.safety_checker = row.get("safety_checker", False)  # whether it ran: it runs again, or not
        picture = row.get("init_img")
        args.init_img, args.strength = (picture["path"], row["strength"]) if picture else (None, None)
        args.mask, args.paste_unmasked = (row["mask"]["path"], row["paste_unmasked"]) if row.get("mask") else (None, False)
        for name, recorded in (("init_img", picture), ("mask", row.get("mask"))):
            if recorded and file_digest(recorded["path"], f"--replay: the {name}") != recorded["sha256"]:
                raise BadValue(f"--replay: {recorded['path']} has changed since the picture was made")
        keep, args.replayed = row["sample"], {**row, "file": row.get("file", os.path.abspath(args.replay))}
        kinds = {"prompt": str, "negative_prompt": str, "seed": int, "sampler": str, "steps": int, "scale": (int, float),
                 "eta": (int, float), "height": int, "width": int, "n_samples": int, "dtype": str, "sample": int,
                 "guidance": str}
        kinds = {k: kind for k, kind in kinds.items() if k != "guidance" or k in row}
        if wrong := [k for k, kind in kinds.items() if isinstance(row[k], bool) or not isinstance(row[k], kind)]:
            raise TypeError(f"{', '.join(wrong)} of the wrong type")
        if row["dtype"] not in ("fp32", "fp16", "bf16") or not 0 <= row["sample"] < row["n_samples"]:
            raise ValueError(f"dtype {row['dtype']!r} or sample {row['sample']} out of range")
        model = row["model"]
        if not isinstance(model["path"], str) or not all(isinstance(model[k], str) for k in model if k.endswith("sha256")):
            raise TypeError("model is not a recorded model folder")
        recorded_environment = row.get("environment") or {}
        if not isinstance(recorded_environment, dict):
            raise TypeError("environment is not an object")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise BadFile(f"{source} is not a manifest line of altdiff-min generate ({e})") from None
    now = fingerprint(args.model)
    if changed := [k.removesuffix("_sha256") for k in model if k.endswith("sha256") and now.get(k) != model[k]]:
        raise BadValue(f"--replay: the {' and '.join(changed)} of {args.model} changed since the picture was made")
    here = environment(args.device, row["dtype"])
    if differ := [k for k in ("altdiff_min", "git_commit", "torch", "device", "device_name", "threads")
                  if k in recorded_environment and recorded_environment[k] != here[k]]:
        print(f"--replay: note: {', '.join(f'{k} {recorded_environment[k]} → {here[k]}' for k in differ)}; "
              f"the picture may differ in its last bits", file=sys.stderr)
    args.skip_grid = True
    return keep


def is_png(path: str) -> bool:
    """`path` is a file that starts with the PNG signature."""
    try:
        with open(path, "rb") as f:
            return os.path.isfile(path) and f.read(8) == b"\x89PNG\r\n\x1a\n"
    except OSError:
        return False


def file_digest(path: str, what: str) -> str:
    """SHA-256 of a file (a picture the manifest names), or a clear error when it cannot be read."""
    import hashlib

    from .errors import Missing, io_error

    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except FileNotFoundError:
        raise Missing(f"{what} {path} is not there") from None
    except OSError as e:
        raise io_error(path, e) from None


def read_picture(path: str, flag: str, mask: bool = False):
    """A picture file given to `flag`, read by dataset.read_picture (its bound on pixels before
    decoding; 8-bit RGB, or with mask=True its own mode, 8-bit), or a clear error naming the flag."""
    from .dataset import read_picture as read
    from .errors import Missing

    if not os.path.isfile(path):
        raise Missing(f"{flag} {path}: no such file")
    return read(path, "mask" if mask else "rgb", where=f"{flag} ")


def picture_arguments(args, config: dict) -> dict | None:
    """--init-img, --strength, --mask, --paste-unmasked: read and checked before the model loads →
    what generate takes, and what the manifest records (each file's path and SHA-256)."""
    from . import img2img
    from .errors import BadValue

    if args.init_img is None:
        for flag, value in (("--strength", args.strength), ("--mask", args.mask), ("--paste-unmasked", args.paste_unmasked)):
            if value not in (None, False):
                raise BadValue(f"{flag} needs --init-img, the picture to start from")
        return None
    if args.paste_unmasked and args.mask is None:
        raise BadValue("--paste-unmasked pastes back the pixels outside the mask: give --mask")
    strength = img2img.default_strength(args.mask) if args.strength is None else args.strength
    img2img.check_strength(strength, args.steps)
    image = read_picture(args.init_img, "--init-img")
    mask = read_picture(args.mask, "--mask", mask=True) if args.mask else None
    # A side not given is the picture's own, rounded down to a multiple the model takes (as generate does)
    width, height = args.W, args.H
    if args.H is None or args.W is None:
        width, height = img2img.rounded_size(image, config["vae"].size_multiple * config["unet"].size_multiple)
    if mask is not None:
        img2img.prepare_mask(mask, image, img2img.size_of(image))  # the same size as the picture, readable
    record = {"init_img": {"path": os.path.abspath(args.init_img), "sha256": file_digest(args.init_img, "--init-img")},
              "strength": strength, "paste_unmasked": args.paste_unmasked,
              "mask": {"path": os.path.abspath(args.mask), "sha256": file_digest(args.mask, "--mask")} if mask else None}
    return {"kwargs": {"image": image, "strength": strength, "mask": mask, "paste_unmasked": args.paste_unmasked},
            "record": record, "height": height, "width": width}


def generate(args) -> int:
    """`altdiff-min generate`: samples to OUTDIR/samples/NNNNN.png (continuing the count), one grid per call.
    Each PNG is written under a temporary name and linked to the first free number (never replacing a
    file, so concurrent runs into one folder keep every picture), and gets a line in
    OUTDIR/manifest.jsonl that records how to make it again (--replay); the PNG carries the same
    record (provenance.png_bytes). Under torchrun the processes share the prompts and rank 0 writes
    every picture, numbered in (prompt, sample) order as one process numbers them."""
    import datetime
    import time
    import uuid

    import torch
    from PIL import Image

    from .distributed import barrier, gather, join_world, leave_world, on_rank0
    from .errors import BadValue
    from .files import make_folder, refuse_link, save_numbered
    from .folder import fingerprint, read_config
    from .manifest import job_rows, paths, recover, save_picture
    from .pipeline import NO_LIMITS, Limits, check_device, check_size, load
    from .provenance import environment, png_bytes
    from .guidance import guidance_rule
    from .samplers import check_eta
    from .schedule import timesteps

    # 1. Everything that can be checked from the arguments, config.json and the output folder, before loading weights.
    keep = replay(args) if args.replay else None
    prompts = read_prompts(args)
    if args.plms and args.sampler not in ("ddim", "plms"):
        raise BadValue(f"--plms conflicts with --sampler {args.sampler}")
    sampler = "plms" if args.plms else args.sampler
    limits = NO_LIMITS if args.no_limits else Limits()
    if not 1 <= args.n_samples <= limits.max_batch:
        raise BadValue(f"--n-samples must be in [1, {limits.max_batch}], got {args.n_samples} (--no-limits lifts the limit)")
    check_eta(sampler, args.eta)
    guidance = guidance_rule(args.guidance, "--guidance")
    if not math.isfinite(args.scale):
        raise BadValue(f"--scale must be finite, got {args.scale}")
    if not 0 <= args.seed < 2**64:
        raise BadValue(f"--seed must be in [0, 2**64), got {args.seed}")
    device = check_device(args.device)
    config = read_config(args.model)
    timesteps(sampler, args.steps, config["schedule"])
    picture = picture_arguments(args, config)
    size = config.get("image_size", 512)
    default_h, default_w = (picture["height"], picture["width"]) if picture else (size, size)
    height, width = (default_h if args.H is None else args.H), (default_w if args.W is None else args.W)
    for flag, value, given in (("--H", height, args.H), ("--W", width, args.W)):
        if not 1 <= value <= limits.max_side:
            source = f"got {value}" if given is not None else f"--init-img {args.init_img} gives {value} (rounded down)"
            raise BadValue(f"{flag} must be in [1, {limits.max_side}], {source} (--no-limits lifts the limit)")
    if args.n_samples * height * width > limits.max_pixels:
        raise BadValue(f"--n-samples × --H × --W = {args.n_samples * height * width} pixels is over the limit of "
                       f"{limits.max_pixels} per call (--no-limits lifts it)")
    check_size(height, width, config["vae"], config["unet"])
    if args.safety_checker and "safety_checker" not in config["modules"]:
        raise BadValue(f"--safety-checker: {args.model} holds no safety checker (convert the diffusers folder "
                       f"with --with-safety-checker)")
    checked = "safety_checker" in config["modules"] and args.safety_checker is not False
    if args.C != config["unet"].in_channels:
        raise BadValue(f"--C {args.C}: this model's latents have {config['unet'].in_channels} channels")
    samples, manifest = paths(args.outdir)
    make_folder(samples, "--outdir")
    for folder in (samples, args.outdir):  # the pictures; the manifest and the grid
        if not os.access(folder, os.W_OK | os.X_OK):
            raise BadValue(f"--outdir: cannot write into {folder} (permission denied)")
    refuse_link(manifest, "manifest")
    if os.path.lexists(manifest) and not (os.path.isfile(manifest) and os.access(manifest, os.R_OK | os.W_OK)):
        raise BadValue(f"--outdir: {manifest} is not a file this run can read and append to")
    if picture and (width, height) != picture["kwargs"]["image"].size:
        print(f"--init-img {args.init_img} ({'×'.join(map(str, picture['kwargs']['image'].size))}) is resized to "
              f"{width}×{height}", file=sys.stderr)
    # 2. The model, on every process torchrun started; each makes the prompts p with p % processes == rank,
    # and rank 0 writes them all, a round of one prompt per process at a time.
    world = join_world(device)
    try:
        job = on_rank0(world, lambda: uuid.uuid4().hex[:12])  # one id for the pictures of this command, all ranks
        if world.rank == 0:
            _, orphans = recover(args.outdir)  # a killed run's partial files go; its unrecorded pictures get a line
            for file in orphans:
                print(f"{os.path.join(args.outdir, file)}: recorded in the manifest as incomplete (its run was "
                      f"stopped before recording it)", file=sys.stderr)
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
        model = load(args.model, device=world.device, dtype=dtype, compile=args.compile, limits=limits,
                     safety_checker=checked)
        # What makes the picture: the PNG carries it, so a replay on the same machine writes the same bytes.
        record = {"negative_prompt": args.negative_prompt, "seed": args.seed, "n_samples": args.n_samples,
                  "sampler": sampler, "steps": args.steps, "scale": args.scale, "guidance": str(guidance), "eta": args.eta, "height": height,
                  "width": width, "dtype": args.dtype, "model": fingerprint(args.model), "safety_checker": checked,
                  **(picture["record"] if picture else {}), "environment": environment(world.device, dtype)}
        start, written = time.perf_counter(), 0
        for first in range(0, len(prompts), world.size):
            made, index = [], first + world.rank
            if index < len(prompts):
                images, flags = model.generate(prompts[index], negative_prompt=args.negative_prompt,
                                               n_samples=args.n_samples, steps=args.steps, sampler=sampler,
                                               scale=args.scale, guidance=guidance, eta=args.eta, height=height, width=width,
                                               seed=args.seed, progress=world.rank == 0, safety_checker=checked,
                                               return_flags=True, **(picture["kwargs"] if picture else {}))
                made = [(index, k, png_bytes(image, {"prompt": prompts[index], "sample": k, **record}), flags[k] if checked else None)
                        for k, image in enumerate(images) if keep is None or k == keep]
            for index, k, png, flagged in sorted(p for part in gather(world, made) or [] for p in part):
                row = {"prompt": prompts[index], "index": index, "sample": k, **record, "job": job, "flagged": flagged,
                       "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       **({"replay_of": args.replayed["file"]} if keep is not None else {})}
                path = save_picture(args.outdir, png, row)
                written += 1
                print(f"{path} (flagged by the safety checker: replaced by a placeholder)" if flagged else path)
        barrier(world)
        if world.rank == 0:
            rows = job_rows(args.outdir, job)
            if not args.skip_grid:
                images = [Image.open(os.path.join(args.outdir, r["file"])).convert("RGB") for r in rows]
                print(save_numbered(args.outdir, "grid-{:04}.png", lambda tmp: grid(images, args.n_samples).save(tmp, format="PNG")))
            by = f" by {world.size} processes" if world.size > 1 else ""
            print(f"{written} picture(s) of {len(prompts)} prompt(s){by} in {time.perf_counter() - start:.1f} s; "
                  f"manifest: {manifest} (job {job})")
    finally:
        leave_world(world)
    return 0


if __name__ == "__main__":
    sys.exit(main())
