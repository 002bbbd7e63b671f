"""`altdiff-min edit PICTURE --prompt SOURCE --target TARGET`: a real picture edited by editing its prompt.

    picture ─ null-text inversion (or plain DDIM inversion) under SOURCE at the guidance scale
            ─ x_T and one unconditional context per step (altdiff_min/inversion.py)
            ─ prompt-to-prompt from that x_T with those contexts: SOURCE and TARGET in one batch
              (research/prompt_to_prompt.py edit); the SOURCE row is the reconstruction

Used by the command line (run), the web page's Edit tab (apps/ui_edit.py) and edit sweeps
(apps/sweep_edit.py), all through check_edit (every argument, the words' alignment included, before
any model work: it needs the tokenizer only) and edit_picture. The command writes as `generate`
does: OUTDIR/samples/NNNNN.png under the next free number, a line per picture in OUTDIR/manifest.jsonl
and the same record in the PNG, whose "edit" entry holds what generate's records lack (the picture and
its SHA-256, both prompts, the mode, the windows, the inversion); `altdiff-min edit --replay` makes
the picture again (`generate --replay` refuses such a record, naming this command).
"""
from __future__ import annotations

import inspect
import math
import os
import sys

INVERSIONS = ("null-text", "ddim")


def add_arguments(p) -> None:
    p.add_argument("picture", nargs="?", help="the picture to edit (PNG, JPEG, …; its size rounded down to a "
                   "multiple the model takes, as image to image rounds it)")
    p.add_argument("--prompt", help="SOURCE: the prompt that describes the picture as it is")
    p.add_argument("--target", help="TARGET: the prompt edited (swap: words replaced one for one; refine: words "
                   "added; reweight: leave it out, it is SOURCE)")
    p.add_argument("--mode", default="swap", help="swap, refine or reweight (default: swap)")
    p.add_argument("--weight", action="append", metavar="WORD=C", help="multiply the cross-attention of the "
                   "target's WORD by C while the maps are replaced; repeatable (reweight needs one)")
    p.add_argument("--local-blend", nargs="+", action="extend", metavar="WORD", help="keep the source's latents "
                   "outside where these words are read (LocalBlend)")
    p.add_argument("--cross-replace-steps", type=float, default=None, metavar="F",
                   help="the first fraction F of the steps take the source's cross-attention maps (default 0.8)")
    p.add_argument("--word-replace-steps", action="append", metavar="WORD=F", help="the target's WORD takes the "
                   "source's cross-attention maps in the first fraction F of the steps instead (the reference's "
                   "per-word cross_replace_steps); repeatable")
    p.add_argument("--self-replace-steps", type=float, default=None, metavar="F",
                   help="the first fraction F of the steps take the source's self-attention maps (default 0.4)")
    p.add_argument("--value-replace-steps", type=float, default=None, metavar="F", help="the first fraction F of the "
                   "steps give the target's kept tokens the source's cross-attention values (default 0; XLM-R "
                   "spreads the swapped word over every token: docs/editing.md)")
    p.add_argument("--null-text-steps", type=float, default=None, metavar="F", help="the first fraction F of the "
                   "steps give the target's unconditional rows the fitted null-text contexts, the rest the empty "
                   "prompt's (default 1: every step, as the paper; they hold the picture's colour: docs/editing.md)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps of the inversion and of the edit")
    p.add_argument("--scale", type=float, default=7.5, help="classifier-free guidance scale of the edit (null-text "
                   "fits its unconditional contexts for it)")
    p.add_argument("--inversion", default="null-text", help="null-text (Mokady et al., the picture comes back "
                   "within the VAE's round trip; slower) or ddim (plain DDIM inversion at the scale; drifts)")
    p.add_argument("--model", default="toy", help="a converted model folder, or 'toy' (default: toy)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when there is one)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    p.add_argument("-o", "--outdir", default="AltDiffusionOutputs", help="where samples/NNNNN.png and manifest.jsonl go")
    p.add_argument("--reconstruction", action="store_true", help="also write the reconstruction (the source "
                   "prompt's row of the same run), before the edited picture")
    p.add_argument("--replay", metavar="MANIFEST:LINE|PICTURE", help="make a picture `edit` made again, into --outdir")


def edit_defaults() -> dict:
    """prompt_to_prompt.edit's defaults (the paper's windows): the one home of those numbers."""
    from ..research.prompt_to_prompt import edit

    return {n: p.default for n, p in inspect.signature(edit).parameters.items() if p.default is not inspect.Parameter.empty}


def parse_weights(given: list[str] | None, flag: str = "--weight", form: str = "WORD=C with C a finite number (e.g. red=2)"
                  ) -> dict[str, float] | None:
    """--weight WORD=C (or another flag's WORD=number, repeatable) → {word: number}; a malformed or
    non-finite one is one line."""
    from ..errors import BadValue

    weights = {}
    for text in given or []:
        word, _, c = text.rpartition("=")
        try:
            value = float(c)
        except ValueError:
            value = math.nan
        if not word.strip() or not math.isfinite(value):
            raise BadValue(f"{flag} {text!r}: give {form}")
        weights[word.strip()] = value
    return weights or None


def cross_windows(cross: float | None, words: list[str] | None, flag: str = "--word-replace-steps"):
    """--cross-replace-steps F and --word-replace-steps WORD=F → prompt_to_prompt's cross_replace_steps:
    F alone (None: edit's default), or {"default_": F, word: F, ...} when words have their own.
    flag: what a malformed WORD=F is called in its one-line error."""
    own = parse_weights(words, flag, "WORD=F with F a fraction (e.g. square=0.4)")
    if not own:
        return cross
    return {"default_": edit_defaults()["cross_replace_steps"] if cross is None else cross, **own}


def check_edit(shape, tokenizer, picture, source, target=None, mode: str = "swap", steps: int = 50,
               scale: float = 7.5, inversion: str = "null-text", cross_replace_steps=None, self_replace_steps=None,
               weights: dict | None = None, local_blend=None, value_replace_steps=None, names: dict | None = None,
               null_text_steps=None) -> dict:
    """Every argument, one line each, before any model work (the tokenizer and shape only: from a
    folder's files or a loaded model): the picture (pictures.check_picture: NaN tensors too) and its
    size rounded down as image to image rounds it, both prompts, steps and scale (generate's checks),
    the mode, the inversion (null-text needs scale ≠ 1), and the edit itself, built once so that
    target words that do not align with the source's, windows out of [0, 1] and weight or blend words
    the prompts lack are refused here. → the edit's keyword arguments for edit_picture."""
    from ..arguments import check_arguments
    from ..errors import BadValue
    from ..inversion import check_fitting, null_text_inversion
    from ..research.prompt_to_prompt import MODES, EditAttention, LocalBlend, steps_window
    from ..storage import pictures

    if mode not in MODES:
        raise BadValue(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    if inversion not in INVERSIONS:
        raise BadValue(f"--inversion must be one of {', '.join(INVERSIONS)}, got {inversion!r}")
    if target is None and mode != "reweight":
        raise BadValue(f"--mode {mode} needs --target, the edited prompt")
    target = source if target is None else target
    pictures.check_picture(picture, "the picture")
    width, height = pictures.rounded_size(picture, shape.vae.size_multiple * shape.unet.size_multiple)
    check_arguments(shape, [source, target], "", 1, steps, "ddim", scale, height=height, width=width, names=names)
    if inversion == "null-text":  # its fitting's settings as null_text_inversion's defaults
        fit = {n: p.default for n, p in inspect.signature(null_text_inversion).parameters.items()}
        try:
            check_fitting(fit["inner_steps"], fit["lr"], fit["tol"], scale)
        except BadValue as e:
            raise BadValue(f"--inversion null-text: {e}; or --inversion ddim") from None
    defaults = edit_defaults()
    cross = defaults["cross_replace_steps"] if cross_replace_steps is None else cross_replace_steps
    own = defaults["self_replace_steps"] if self_replace_steps is None else self_replace_steps
    values = defaults["value_replace_steps"] if value_replace_steps is None else value_replace_steps
    null = defaults["null_text_steps"] if null_text_steps is None else null_text_steps
    steps_window(null, "null_text_steps")
    EditAttention(tokenizer, [source], [target], mode, steps, cross, own, weights,
                  value_replace_steps=values)  # the alignment, the windows
    if local_blend:
        LocalBlend(tokenizer, [source], [target], list(local_blend), steps)
    return {"source": source, "target": target, "mode": mode, "steps": steps, "scale": float(scale),
            "inversion": inversion, "cross_replace_steps": cross, "self_replace_steps": own, "value_replace_steps": values,
            "null_text_steps": null, "weights": weights,
            "local_blend": list(local_blend) if local_blend else None, "width": width, "height": height}


def edit_picture(model, picture, checked: dict, progress: bool = True, inverted: dict | None = None):
    """check_edit's arguments on a loaded model → (reconstruction, edited) PIL pictures. inverted: a
    cache {(inversion, steps, scale): Inversion} for runs that edit one picture many ways (a sweep)."""
    from ..inversion import invert, null_text_inversion
    from ..research.prompt_to_prompt import edit

    c = checked
    key = (c["inversion"], c["steps"], c["scale"])
    inv = (inverted or {}).get(key)
    if inv is None:
        if c["inversion"] == "null-text":
            inv = null_text_inversion(model, picture, c["source"], c["steps"], c["scale"], progress=progress)
        else:
            inv = invert(model, picture, c["source"], c["steps"], c["scale"], progress=progress)
        if inverted is not None:
            inverted[key] = inv
    return edit(model, c["source"], c["target"], c["mode"], steps=c["steps"], scale=c["scale"],
                cross_replace_steps=c["cross_replace_steps"], self_replace_steps=c["self_replace_steps"],
                value_replace_steps=c["value_replace_steps"], null_text_steps=c["null_text_steps"],
                weights=c["weights"], local_blend=c["local_blend"], latents=inv.noise, uncond_embeddings=inv.uncond,
                height=c["height"], width=c["width"], output="pil", progress=progress)


def edit_record(checked: dict, picture: dict, shows: str) -> dict:
    """The "edit" entry of a record: what makes the picture besides generate's entries."""
    kept = ("source", "target", "mode", "inversion", "cross_replace_steps", "self_replace_steps", "value_replace_steps",
            "null_text_steps", "weights", "local_blend")
    return {"picture": picture, **{k: checked[k] for k in kept}, "shows": shows}


def records(model, checked: dict, picture: dict, model_folder: dict | None, made_in: dict) -> dict[str, dict]:
    """{"reconstruction": …, "edited": …}: each picture's record (provenance.picture_record: generate's
    entries, DDIM, no seed: x_T is the picture's inversion) with its "edit" entry."""
    from ..storage.provenance import picture_record

    arguments = {"steps": checked["steps"], "scale": checked["scale"], "seed": None, "sampler": "ddim"}
    size = (checked["width"], checked["height"])
    return {shows: picture_record(model, checked[prompt], 0, arguments, size, model_folder, made_in,
                                  edit=edit_record(checked, picture, shows))
            for shows, prompt in (("reconstruction", "source"), ("edited", "target"))}


def replay(args) -> str:
    """--replay: the arguments become the record's (its picture unchanged since: SHA-256; the model
    folder's weights too) → which picture to write ("edited" or "reconstruction")."""
    from ..errors import BadFile, BadValue
    from ..storage.folder import fingerprint
    from .generate import file_digest, read_record

    if args.picture is not None or args.prompt is not None or args.target is not None:
        raise BadValue("--replay takes the picture and the prompts from the record; give neither")
    source, row = read_record(args.replay, "edit")
    try:
        e = row["edit"]
        args.picture, args.prompt, args.target, args.mode = e["picture"]["path"], e["source"], e["target"], e["mode"]
        args.inversion, args.local_blend = e["inversion"], e["local_blend"]
        args.cross_replace_steps, args.self_replace_steps = e["cross_replace_steps"], e["self_replace_steps"]
        args.word_replace_steps = None  # a recorded {"default_": F, word: F} is cross_replace_steps whole
        args.value_replace_steps, args.null_text_steps = e["value_replace_steps"], e.get("null_text_steps")  # older records: none
        args.weight = [f"{w}={c!r}" for w, c in (e["weights"] or {}).items()] or None
        args.steps, args.scale, args.dtype, args.model = row["steps"], row["scale"], row["dtype"], row["model"]["path"]
        shows, digest, model = e["shows"], e["picture"]["sha256"], row["model"]
        if shows not in ("edited", "reconstruction") or not isinstance(model["path"], str):
            raise ValueError(f"shows {shows!r}")
    except (KeyError, TypeError, ValueError) as err:
        raise BadFile(f"{source} is not a record of altdiff-min edit ({type(err).__name__}: {err})") from None
    if file_digest(args.picture, "--replay: the picture") != digest:
        raise BadValue(f"--replay: {args.picture} has changed since it was edited")
    now = fingerprint(args.model)
    if changed := [k.removesuffix("_sha256") for k in model if k.endswith("sha256") and now.get(k) != model[k]]:
        raise BadValue(f"--replay: the {' and '.join(changed)} of {args.model} changed since the picture was made")
    args.reconstruction, args.replayed = shows == "reconstruction", {"file": row.get("file", os.path.abspath(args.replay))}
    return shows


def run(args) -> int:
    """`altdiff-min edit`: everything checked (the picture, the prompts' alignment, the output folder)
    before the model loads; then inversion and the edit, each with its progress bar; then the pictures."""
    import datetime
    import uuid

    import torch

    from ..arguments import Limits, Shape, check_device
    from ..errors import BadValue
    from ..model.tokenizer import Tokenizer
    from ..pipeline import load
    from ..storage.folder import TOKENIZER, fingerprint, read_config, resolve
    from ..storage.manifest import recover, save_picture
    from ..storage.pictures import read_picture_argument
    from ..storage.provenance import environment, png_bytes
    from .generate import FLAGS, check_outdir, file_digest

    only = replay(args) if args.replay else None
    if args.picture is None:
        raise BadValue("give the PICTURE to edit (or --replay)")
    if args.prompt is None or not args.prompt.strip():
        raise BadValue("give --prompt, the prompt that describes the picture (not empty or blank)")
    device = check_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    config = read_config(args.model)
    shape = Shape.of_config(config, Limits())
    tokenizer = Tokenizer(os.path.join(resolve(args.model), TOKENIZER), max_length=config["tokenizer"]["max_length"])
    image = read_picture_argument(args.picture, "PICTURE")
    checked = check_edit(shape, tokenizer, image, args.prompt, args.target, args.mode, args.steps, args.scale,
                         args.inversion, cross_windows(args.cross_replace_steps, args.word_replace_steps),
                         args.self_replace_steps, parse_weights(args.weight),
                         args.local_blend, args.value_replace_steps, names=FLAGS, null_text_steps=args.null_text_steps)
    check_outdir(args.outdir)
    if (checked["width"], checked["height"]) != image.size:
        print(f"PICTURE {args.picture} ({'×'.join(map(str, image.size))}) is resized to "
              f"{checked['width']}×{checked['height']}", file=sys.stderr)
    picture = {"path": os.path.abspath(args.picture), "sha256": file_digest(args.picture, "PICTURE")}
    _, orphans = recover(args.outdir)  # as generate: a killed run's partial files go, its pictures get a line
    for file in orphans:
        print(f"{os.path.join(args.outdir, file)}: recorded in the manifest as incomplete", file=sys.stderr)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    model = load(args.model, device=device, dtype=dtype)
    reconstruction, edited = edit_picture(model, image, checked, progress=True)
    made = records(model, checked, picture, fingerprint(args.model), environment(device, dtype))
    job = uuid.uuid4().hex[:12]
    wanted = [("reconstruction", reconstruction)] if args.reconstruction else []
    for shows, result in wanted + [("edited", edited)]:
        if only is not None and shows != only:
            continue
        record = made[shows]
        row = {"prompt": record["prompt"], "index": 0, **record, "job": job,
               "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               **({"replay_of": args.replayed["file"]} if only is not None else {})}
        print(f"{save_picture(args.outdir, png_bytes(result, record), row)} ({shows})")
    return 0
