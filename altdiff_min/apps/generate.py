"""`altdiff-min generate`: prompts (or --replay of a manifest line or a picture) → pictures, each with its
record (the manifest line, and the same record in the PNG), under OUTDIR; torchrun splits the pictures.
"""
from __future__ import annotations

import os
import sys

from . import excite


def read_prompts(args) -> list[str]:
    from ..errors import AltDiffError, BadValue
    from ..model.tokenizer import check_prompt
    from ..storage.files import read_text

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
    from ..errors import BadFile, BadValue
    from ..storage.folder import fingerprint
    from ..storage.provenance import environment

    if args.prompt is not None or args.from_file:
        raise BadValue("--replay takes the prompt from the manifest line; give no prompt or --from-file")
    source, row = read_record(args.replay)
    if isinstance(row, dict) and "edit" in row:  # apps/edit.py's: a picture edited, not generated
        raise BadValue(f"--replay: {source} is a picture altdiff-min edit made: `altdiff-min edit --replay {args.replay}`")
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
        loras = recorded_loras(row)  # the same LoRA files (their SHA-256 checked below) at the same scales
        args.lora = [f"{lora['path']}:{float(lora['scale'])!r}" for lora in loras] or None
        for name, recorded in (("init_img", picture), ("mask", row.get("mask")), *(("LoRA file", lora) for lora in loras)):
            if recorded and file_digest(recorded["path"], f"--replay: the {name}") != recorded["sha256"]:
                raise BadValue(f"--replay: {recorded['path']} has changed since the picture was made")
        replay_embeddings(args, row)
        args.tome = args.deepcache = None  # the record's settings instead (skip_arguments)
        args.skipping = {k: row[k] for k in ("tome", "deepcache") if k in row}
        if not all(isinstance(v, dict) for v in args.skipping.values()):
            raise TypeError("tome or deepcache is not an object")
        excite.replay(args, row)
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


def read_record(replay: str, command: str = "generate") -> tuple[str, object]:
    """--replay MANIFEST:LINE or PICTURE.png → (where it was read, for messages; the record, unchecked)."""
    from ..errors import BadFile, BadValue
    from ..storage.files import parse_json, read_text
    from ..storage.provenance import record_of_png

    if is_png(replay):
        row = record_of_png(replay, "--replay")
        if row is None:
            raise BadFile(f"--replay: {replay} carries no altdiff-min record (it was not made by altdiff-min {command})")
        return replay, row
    file, _, line = replay.rpartition(":")
    if not file or not line.isdigit() or int(line) < 1:
        raise BadValue(f"--replay takes MANIFEST:LINE (e.g. out/manifest.jsonl:3) or a picture {command} made, "
                       f"got {replay!r}")
    lines = read_text(file, "manifest").splitlines()
    if int(line) > len(lines):
        raise BadValue(f"--replay: {file} has {len(lines)} line(s), not {line}")
    return f"{file} line {line}", parse_json(lines[int(line) - 1], f"{file} line {line}")


def check_outdir(outdir: str) -> tuple[str, str]:
    """OUTDIR/samples made, both writable, the manifest a regular file (never a link) → (samples, manifest)."""
    from ..errors import BadValue
    from ..storage.files import make_folder, refuse_link
    from ..storage.manifest import paths

    samples, manifest = paths(outdir)
    make_folder(samples, "--outdir")
    for folder in (samples, outdir):  # the pictures; the manifest and the grid
        if not os.access(folder, os.W_OK | os.X_OK):
            raise BadValue(f"--outdir: cannot write into {folder} (permission denied)")
    refuse_link(manifest, "manifest")
    if os.path.lexists(manifest) and not (os.path.isfile(manifest) and os.access(manifest, os.R_OK | os.W_OK)):
        raise BadValue(f"--outdir: {manifest} is not a file this run can read and append to")
    return samples, manifest


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

    from ..errors import Missing, io_error

    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except FileNotFoundError:
        raise Missing(f"{what} {path} is not there") from None
    except OSError as e:
        raise io_error(path, e) from None


def picture_arguments(args, config: dict) -> dict | None:
    """--init-img, --strength, --mask, --paste-unmasked: read and checked before the model loads →
    what generate takes, and what the manifest records (each file's path and SHA-256)."""
    from ..errors import BadValue
    from ..sampling import img2img
    from ..storage import pictures
    from ..storage.pictures import read_picture_argument as read_picture

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
        width, height = pictures.rounded_size(image, config["vae"].size_multiple * config["unet"].size_multiple)
    if mask is not None:
        pictures.prepare_mask(mask, image, pictures.size_of(image))  # the same size as the picture, readable
    record = {"init_img": {"path": os.path.abspath(args.init_img), "sha256": file_digest(args.init_img, "--init-img")},
              "strength": strength, "paste_unmasked": args.paste_unmasked,
              "mask": {"path": os.path.abspath(args.mask), "sha256": file_digest(args.mask, "--mask")} if mask else None}
    return {"kwargs": {"image": image, "strength": strength, "mask": mask, "paste_unmasked": args.paste_unmasked},
            "record": record, "height": height, "width": width}


def lora_argument(args) -> list[dict]:
    """--lora FILE[:SCALE], repeatable (SCALE 1.0 unless given): parsed, and each file checked as a LoRA
    file, before the model loads → what the manifest records: [{"path", "sha256", "scale"}]. A file
    given twice, or two files that would be one adapter name, are refused (weights_convert/lora.py lora_list)."""
    import math

    from weights_convert.lora import check_lora_files

    from ..errors import BadValue

    parsed = []
    for given in args.lora or []:
        path, scale = given, 1.0
        if not os.path.isfile(given) and ":" in given:  # FILE:SCALE (a file whose own name holds ':' is taken whole)
            path, _, text = given.rpartition(":")
            try:
                scale = float(text)
            except ValueError:
                scale = math.nan
            if not math.isfinite(scale):
                raise BadValue(f"--lora {given}: SCALE must be a finite number, not {text!r} (FILE[:SCALE], e.g. style.safetensors:0.8)")
        parsed.append((path, scale))
    check_lora_files(parsed, "--lora")
    return [{"path": os.path.abspath(path), "sha256": file_digest(path, "--lora"), "scale": scale} for path, scale in parsed]


def skip_arguments(args, config: dict) -> tuple[list, dict]:
    """--tome RATIO and --deepcache N[:BRANCH] (research/skipping.py), or a replayed record's settings, made
    and checked against the model's config before it loads → generate's controllers, and the record."""
    from ..errors import AltDiffError, BadFile, BadValue
    from ..research.skipping import DeepCache, ToMe, skip_branches

    settings = dict(getattr(args, "skipping", None) or {})  # replay's
    if args.tome is not None:
        settings["tome"] = {"ratio": args.tome}
    if args.deepcache is not None:
        interval, _, branch = args.deepcache.partition(":")
        if not (interval.isdigit() and (branch.isdigit() or not branch)):
            raise BadValue(f"--deepcache takes N or N:BRANCH, whole numbers (e.g. 3 or 3:0), got {args.deepcache!r}")
        settings["deepcache"] = {"interval": int(interval), "branch": int(branch or 0)}
    made = {}
    for key, kind, flag in (("tome", ToMe, "--tome"), ("deepcache", DeepCache, "--deepcache")):
        try:
            made[key] = kind(**settings[key]) if key in settings else None
        except AltDiffError as e:
            raise type(e)(f"{flag}: {e}") from None
        except TypeError:  # a replayed record's settings that are no arguments of the class
            raise BadFile(f"--replay: the recorded {key} settings {settings[key]!r} are not {kind.__name__}'s") from None
    if made["deepcache"] and made["deepcache"].branch >= (n := skip_branches(config["unet"])):
        raise BadValue(f"--deepcache: branch {made['deepcache'].branch}, but this model's UNet has {n} skip branches (0–{n - 1})")
    if args.compile and any(made.values()):
        raise BadValue("--tome and --deepcache change the UNet's walk, which a compiled UNet runs as one graph: drop --compile")
    return [c for c in made.values() if c], {key: c.settings() for key, c in made.items() if c}


def recorded_loras(row: dict) -> list[dict]:
    """A record's LoRA files: a list of {"path", "sha256", "scale"} (one dict in records written when
    generate took one file; none: [])."""
    lora = row.get("lora") or []
    return [lora] if isinstance(lora, dict) else lora


def embedding_arguments(args, config: dict) -> tuple[list[dict], dict]:
    """--embedding FILE[:TOKEN] (repeatable): each textual-inversion file read and checked (its rows'
    width against this model's, finite) before the model loads → the manifest's records [{"path",
    "sha256", "token" (the one given, or null), "tokens" (the words it adds)}] and {token: rows}."""
    from weights_convert.embeddings import check_width, read_embeddings

    from ..errors import AltDiffError, BadValue

    records, words, source = [], {}, {}
    for given in args.embedding or []:
        path, token = given, None
        if not os.path.isfile(given) and ":" in given:  # FILE:TOKEN (a file whose own name holds ':' is taken whole)
            path, _, token = given.rpartition(":")
        try:
            found = read_embeddings(path, token or None)
            check_width(found, config["text_encoder"].hidden, path)
        except AltDiffError as e:
            raise type(e)(f"--embedding: {e}") from None
        for t in found:
            if t in words:
                raise BadValue(f"--embedding: the token {t!r} is in both {source[t]} and {path}")
            source[t] = path
        words.update(found)
        records.append({"path": os.path.abspath(path), "sha256": file_digest(path, "--embedding"), "token": token or None,
                        "tokens": list(found)})
    return records, words


def apply_embeddings(model, words: dict) -> None:
    """The --embedding words onto the loaded model (research/textual_inversion.py add_words: a token the
    tokenizer has already is refused there, before anything changes)."""
    from ..errors import AltDiffError
    from ..research.textual_inversion import add_words

    if words:
        try:
            add_words(model, words)
        except AltDiffError as e:
            raise type(e)(f"--embedding: {e}") from None


def replay_embeddings(args, row: dict) -> None:
    """--replay: the recorded --embedding files again, each unchanged since (its SHA-256)."""
    from ..errors import BadValue

    recorded = row.get("embeddings") or []
    if not isinstance(recorded, list) or not all(isinstance(e, dict) and isinstance(e.get("path"), str) for e in recorded):
        raise TypeError("embeddings is not a list of recorded files")
    args.embedding = [f"{e['path']}:{e['token']}" if e.get("token") else e["path"] for e in recorded] or None
    for e in recorded:
        if file_digest(e["path"], "--replay: the embedding") != e.get("sha256"):
            raise BadValue(f"--replay: {e['path']} has changed since the picture was made")


# generate's arguments as the command line names them, for arguments.check_arguments' messages
FLAGS = {"n_samples": "--n-samples", "batch": "--n-samples", "height": "--H", "width": "--W", "scale": "--scale",
         "seed": "--seed", "guidance": "--guidance", "pixels": "--n-samples × --H × --W pixels"}


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

    from ..arguments import NO_LIMITS, Limits, Shape, check_arguments, check_device
    from ..errors import BadValue
    from ..pipeline import load
    from ..sampling.guidance import guidance_rule
    from ..storage.files import save_numbered
    from ..storage.folder import fingerprint, read_config
    from ..storage.manifest import job_rows, recover, save_picture
    from ..storage.provenance import environment, picture_record, png_bytes
    from ..training.distributed import barrier, gather, join_world, leave_world, on_rank0

    # 1. Everything that can be checked from the arguments, config.json and the output folder, before loading weights.
    keep = replay(args) if args.replay else None
    prompts = read_prompts(args)
    if args.plms and args.sampler not in ("ddim", "plms"):
        raise BadValue(f"--plms conflicts with --sampler {args.sampler}")
    sampler = "plms" if args.plms else args.sampler
    device = check_device(args.device)
    config = read_config(args.model)
    shape = Shape.of_config(config, NO_LIMITS if args.no_limits else Limits())
    picture = picture_arguments(args, config)
    loras = lora_argument(args)
    embeddings, words = embedding_arguments(args, config)
    skipping, skip_record = skip_arguments(args, config)
    default_h, default_w = (picture["height"], picture["width"]) if picture else (shape.image_size, shape.image_size)
    height, width = (default_h if args.H is None else args.H), (default_w if args.W is None else args.W)
    for flag, value, given in (("--H", height, args.H), ("--W", width, args.W)):  # a side the picture gave: say so
        if given is None and picture and not 1 <= value <= shape.limits.max_side:
            raise BadValue(f"{flag} must be in [1, {shape.limits.max_side}], --init-img {args.init_img} gives {value} "
                           f"(rounded down; --no-limits lifts the limit)")
    guidance = guidance_rule(args.guidance, "--guidance")
    for prompt in prompts:  # generate's own checks, on the folder's config (arguments.py): one prompt a call
        check_arguments(shape, prompt, args.negative_prompt, args.n_samples, args.steps, sampler, args.scale, args.eta,
                        height, width, args.seed, guidance=guidance, names=FLAGS)
    excite.check_before_loading(args, config, prompts, sampler)
    if args.safety_checker and "safety_checker" not in config["modules"]:
        raise BadValue(f"--safety-checker: {args.model} holds no safety checker (convert the diffusers folder "
                       f"with --with-safety-checker)")
    checked = "safety_checker" in config["modules"] and args.safety_checker is not False
    if args.C != config["unet"].in_channels:
        raise BadValue(f"--C {args.C}: this model's latents have {config['unet'].in_channels} channels")
    _, manifest = check_outdir(args.outdir)
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
        model = load(args.model, device=world.device, dtype=dtype, compile=args.compile, limits=shape.limits,
                     safety_checker=checked, lora=[(lora["path"], lora["scale"]) for lora in loras])
        apply_embeddings(model, words)
        # What makes the picture (provenance.picture_record): the PNG carries it, so a replay on the same
        # machine writes the same bytes.
        arguments = {"negative_prompt": args.negative_prompt, "seed": args.seed, "n_samples": args.n_samples,
                     "sampler": sampler, "steps": args.steps, "scale": args.scale, "guidance": guidance, "eta": args.eta,
                     "safety_checker": checked}
        model_folder, made_in = fingerprint(args.model), environment(world.device, dtype)
        more = {**(picture["record"] if picture else {}), **({"lora": loras} if loras else {})}
        more |= ({"embeddings": embeddings} if embeddings else {}) | skip_record | excite.record(args)

        def record(prompt: str, k: int) -> dict:
            return picture_record(model, prompt, k, arguments, (width, height), model_folder, made_in, **more)
        start, written = time.perf_counter(), 0
        for first in range(0, len(prompts), world.size):
            made, index = [], first + world.rank
            if index < len(prompts):
                images, flags = model.generate(prompts[index], negative_prompt=args.negative_prompt,
                                               n_samples=args.n_samples, steps=args.steps, sampler=sampler,
                                               scale=args.scale, guidance=guidance, eta=args.eta, height=height, width=width,
                                               seed=args.seed, progress=world.rank == 0, safety_checker=checked,
                                               return_flags=True, **(picture["kwargs"] if picture else {}),
                                               controllers=[*skipping, *excite.controllers(args, model.tokenizer,
                                                                                           prompts[index], sampler)])
                made = [(index, k, png_bytes(image, record(prompts[index], k)), flags[k] if checked else None)
                        for k, image in enumerate(images) if keep is None or k == keep]
            for index, k, png, flagged in sorted(p for part in gather(world, made) or [] for p in part):
                row = {"prompt": prompts[index], "index": index, **record(prompts[index], k), "job": job, "flagged": flagged,
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
