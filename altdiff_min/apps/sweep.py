"""Ablation sweeps: `altdiff-min sweep SPEC` runs a grid of `generate` settings over prompts and seeds
and writes a table. An ablation is a table: settings down the side, prompts and seeds across, a
measure in every cell.

A SPEC (JSON, or TOML on Python ≥ 3.11):

    model = "toy"                                  # a model folder, or "toy"
    prompts = ["un cercle rouge", "一个蓝色的正方形"]   # or prompts_file = "prompts.txt" (one per line)
    seeds = [0, 1, 2]
    metrics = ["toy", "clip"]                      # built in: "toy", "clip"; or "package.module:function"
    clip_model = "altclip-m9"                      # the AltCLIP folder of "clip" (only with it)
    [fixed]                                        # generate arguments every cell shares
    steps = 25
    [axes]                                         # generate arguments to vary: every combination is a setting
    scale = [1.0, 3.0, 7.5]
    sampler = ["ddim", "dpm++2m"]
    cross_attention = [true, ["down", "up"], "mid"]  # everywhere; all but the middle; the middle only
    lora_scale = [0.0, 0.5, 1.0]                   # with `lora = ["style.safetensors"]` (beside the spec):
                                                   # every LoRA of the spec at that scale (default 1.0)
    tome = [0.0, 0.3, 0.5]                         # skipping work (research/skipping.py), as --tome / --deepcache:
    deepcache = [1, 2, 3]                          # a ratio, an interval, ToMe's / DeepCache's arguments, or null (off)

With an `edit` table (picture, source) the sweep edits one real picture instead: prompts are the
targets, the axes `altdiff-min edit`'s arguments (apps/sweep_edit.py, docs/sweeps.md).

Every cell (setting × prompt × seed) is one picture, `generate(prompt, seed=seed, **fixed, **setting)`,
written atomically to OUT/pictures/sSSS-pPPP-seedN.png; a sweep that was interrupted resumes by
skipping the cells whose picture exists. Under torchrun cell c is made by rank c % processes, and each
picture depends only on its cell, so any number of processes makes the same pictures. At the end
(rank 0): results.csv (one row per picture: its setting, prompt, seed, file and every metric),
contact_sheet.png (one labelled row per setting, one column per prompt × seed), and the mean of every
metric per setting, printed.

The metrics are apps/metrics.py's: "toy" is the toy detector's accuracy and its graded scores (ΔE,
IoU, position: toy/graded.py; None for a prompt that is not a toy caption); "clip" is the multilingual CLIP score by the AltCLIP folder `clip_model`
(`altdiff-min convert BAAI/AltCLIP-m9 OUT_DIR` writes one), loaded once per sweep on the sweep's device.
"""
from __future__ import annotations

import csv
import inspect
import itertools
import json
import math
import os
from contextlib import ExitStack
from dataclasses import dataclass

from ..errors import AltDiffError, BadFile, BadType, BadValue, Exists
from ..model.tokenizer import check_prompt
from ..research.skipping import SKIPPERS, from_settings, skip_branches
from ..sampling.guidance import guidance_rule
from ..storage.files import atomic_file, clean_partials, locked, make_folder, read_json, read_text, refuse_link
from ..storage.folder import fingerprint
from .metrics import Metric, find_metric
from .sweep_edit import EDIT_ARGUMENTS, check_edit_cells, make_edit_cell, read_edit_entry
from .sweep_sheet import contact_sheet, label

SPEC_KEYS = {"model", "prompts", "prompts_file", "seeds", "metrics", "clip_model", "fixed", "axes", "lora", "edit"}
LORA_SCALE = "lora_scale"  # not a generate argument: the scale of the spec's LoRAs (research/lora.py lora_scales)
NOT_SWEPT = {"prompt", "seed", "n_samples", "latents", "output", "callback", "progress", "prompt_embeds",
             "return_trajectory", "return_flags", "controllers",  # objects: a spec holds JSON
             # image to image needs a picture, which a spec cannot hold yet
             "image", "mask", "strength", "paste_unmasked"}  # generate arguments a cell sets itself, or that a spec cannot write
FORMAT = "altdiff-min-sweep"


def generate_arguments() -> set[str]:
    from ..pipeline import AltDiffusion

    return set(inspect.signature(AltDiffusion.generate).parameters) - {"self"} - NOT_SWEPT


@dataclass
class Spec:
    model: str
    prompts: list[str]
    seeds: list[int]
    fixed: dict
    axes: dict[str, list]
    metrics: list[str]
    clip_model: str | None = None  # the AltCLIP folder of the metric "clip"
    lora: list[str] | None = None  # LoRA files (absolute paths), at the setting's lora_scale
    edit: dict | None = None  # an edit sweep's picture, its SHA-256 and source prompt (apps/sweep_edit.py)

    @property
    def settings(self) -> list[dict]:
        """Every combination of the axes' values, the first axis varying slowest."""
        return [dict(zip(self.axes, values)) for values in itertools.product(*self.axes.values())]

    def cells(self) -> list[tuple[int, int, int]]:
        """(setting, prompt, seed) indices, in table order."""
        return list(itertools.product(range(len(self.settings)), range(len(self.prompts)), range(len(self.seeds))))

    def as_dict(self) -> dict:
        # clip_model only when given: the sweeps recorded before it existed still resume
        return {"format": FORMAT, "model": self.model, "prompts": self.prompts, "seeds": self.seeds,
                "fixed": self.fixed, "axes": self.axes, "metrics": self.metrics,
                **({"clip_model": self.clip_model} if self.clip_model is not None else {}),
                **({"lora": self.lora} if self.lora else {}), **({"edit": self.edit} if self.edit else {})}


def read_spec(path: str) -> Spec:
    """A SPEC file, every entry checked (names, types, non-empty axes) before any model work."""
    if path.endswith(".toml"):
        try:
            import tomllib
        except ImportError:  # Python 3.10
            raise BadValue(f"{path}: reading TOML needs Python 3.11 or later; write the spec as JSON") from None
        try:
            raw = tomllib.loads(read_text(path, "sweep spec"))
        except tomllib.TOMLDecodeError as e:
            raise BadFile(f"{path} is not valid TOML ({e})") from None
    else:
        raw = read_json(path, "sweep spec")
    if not isinstance(raw, dict):
        raise BadFile(f"{path}: a sweep spec is a table of settings, got {type(raw).__name__}")
    if unknown := set(raw) - SPEC_KEYS:
        raise BadValue(f"{path}: unknown entries {sorted(unknown)}; a spec has {sorted(SPEC_KEYS)}")
    if not isinstance(raw.get("model"), str):
        raise BadValue(f"{path}: 'model' must name a model folder (or \"toy\")")
    prompts = raw.get("prompts")
    if "prompts_file" in raw:
        if prompts is not None:
            raise BadValue(f"{path}: give 'prompts' or 'prompts_file', not both")
        if not isinstance(raw["prompts_file"], str):
            raise BadValue(f"{path}: 'prompts_file' must name a text file (one prompt per line), beside the spec")
        file = os.path.join(os.path.dirname(os.path.abspath(path)), raw["prompts_file"])
        prompts = [line.strip() for line in read_text(file, "prompt file").splitlines() if line.strip()]
        if not prompts:
            raise BadValue(f"{file} has no prompts (one per line expected)")
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise BadValue(f"{path}: 'prompts' must be a non-empty list of strings (or give 'prompts_file')")
    for prompt in prompts:
        try:
            check_prompt(prompt)
        except AltDiffError as e:
            raise type(e)(f"{path}: {e}") from None
    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**64
                                                          for s in seeds):
        raise BadValue(f"{path}: 'seeds' must be a non-empty list of ints in [0, 2**64)")
    if len(set(seeds)) < len(seeds):
        raise BadValue(f"{path}: 'seeds' repeats a seed ({seeds}): each would be the same picture")
    fixed, axes = raw.get("fixed", {}), raw.get("axes", {})
    if not isinstance(fixed, dict) or not isinstance(axes, dict):
        raise BadType(f"{path}: 'fixed' and 'axes' must be tables of generate arguments")
    edit = read_edit_entry(path, raw)  # prompts are its targets; no seeds, no LoRA
    lora = read_lora_entry(path, raw.get("lora"))
    allowed = EDIT_ARGUMENTS if edit else generate_arguments() | set(SKIPPERS) | ({LORA_SCALE} if lora else set())
    if not lora and LORA_SCALE in {*fixed, *axes}:
        raise BadValue(f"{path}: {LORA_SCALE} scales the spec's LoRA files: give them as 'lora' (a list of .safetensors files)")
    for name in [*fixed, *axes]:
        if name not in allowed:
            raise BadValue(f"{path}: {name!r} is not {'an edit' if edit else 'a generate'} argument a sweep can set; "
                           f"choose from {sorted(allowed)}")
    if both := set(fixed) & set(axes):
        raise BadValue(f"{path}: {sorted(both)} is both fixed and an axis")
    for name, values in axes.items():
        if not isinstance(values, list) or not values:
            raise BadValue(f"{path}: axis {name!r} is empty; give it a list of at least one value")
    for rule in axes.get("guidance", []) + ([fixed["guidance"]] if "guidance" in fixed else []):
        if not isinstance(rule, str):  # its text, which the table records; a Rule object is not JSON
            raise BadType(f"{path}: guidance must be a rule's text such as 'rescale:0.7', got {rule!r}")
        guidance_rule(rule, f"{path}: guidance")
    for key in set(SKIPPERS) & {*fixed, *axes}:  # each value makes its controller, or is refused now
        for value in axes.get(key, []) + ([fixed[key]] if key in fixed else []):
            try:
                from_settings({key: value})
            except (AltDiffError, TypeError) as e:
                raise BadValue(f"{path}: {key} {value!r}: {e}") from None
    for scale in axes.get(LORA_SCALE, []) + ([fixed[LORA_SCALE]] if LORA_SCALE in fixed else []):
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise BadValue(f"{path}: {LORA_SCALE} must be a finite number, got {scale!r}")
    metrics = raw.get("metrics", [])
    if not isinstance(metrics, list) or not all(isinstance(m, str) for m in metrics):
        raise BadValue(f"{path}: 'metrics' must be a list of names")
    for name in metrics:
        find_metric(name)
    clip_model = raw.get("clip_model")
    if "clip" in metrics and not isinstance(clip_model, str):
        raise BadValue(f"{path}: the metric \"clip\" needs 'clip_model', an AltCLIP folder "
                       f"(`altdiff-min convert BAAI/AltCLIP-m9 OUT_DIR` writes one)")
    if "clip" not in metrics and clip_model is not None:
        raise BadValue(f"{path}: 'clip_model' is read by the metric \"clip\" only; add \"clip\" to 'metrics' or remove it")
    return Spec(raw["model"], prompts, seeds, fixed, axes, metrics, clip_model, lora, edit)


def read_lora_entry(path: str, lora) -> list[str] | None:
    """The spec's 'lora': a .safetensors file or a list of them, beside the spec (relative paths), each
    checked as generate --lora checks it (weights_convert/lora.py) → their absolute paths."""
    from weights_convert.lora import check_lora_files

    if lora is None:
        return None
    files = [lora] if isinstance(lora, str) else lora
    if not isinstance(files, list) or not files or not all(isinstance(f, str) for f in files):
        raise BadValue(f"{path}: 'lora' must name a LoRA file or a non-empty list of them")
    files = [os.path.join(os.path.dirname(os.path.abspath(path)), f) for f in files]
    try:
        check_lora_files(files, "'lora'")
    except AltDiffError as e:
        raise type(e)(f"{path}: {e}") from None
    return files


def check_cells(spec: Spec, model) -> None:
    """Every setting's arguments, checked by generate's own checks (arguments.py) before any picture is made."""
    from ..arguments import check_arguments, check_text_layer

    if spec.edit:
        return check_edit_cells(spec, model)
    for setting in spec.settings:
        arguments = {**spec.fixed, **setting}
        model.unet.text_parts(arguments.get("cross_attention", True))  # true, false or a list of UNet parts
        check_text_layer(model.shape, arguments.get("text_layer"))
        deepcache = from_settings({key: arguments[key] for key in SKIPPERS if key in arguments}).get("deepcache")
        if deepcache is not None and deepcache.branch >= (n := skip_branches(model.unet.cfg)):
            raise BadValue(f"deepcache: branch {deepcache.branch}, but this model's UNet has {n} skip branches (0–{n - 1})")
        check_arguments(model.shape, spec.prompts[0], arguments.get("negative_prompt", ""), 1, arguments.get("steps", 50),
                        arguments.get("sampler", "ddim"), arguments.get("scale", 7.5), arguments.get("eta", 0.0),
                        arguments.get("height"), arguments.get("width"), spec.seeds[0], guidance=arguments.get("guidance"))


def picture_name(cell: tuple[int, int, int], spec: Spec) -> str:
    s, p, k = cell
    return os.path.join("pictures", f"s{s:03}-p{p:03}-seed{spec.seeds[k]}.png")


SWEEP_FILES = ("spec.json", "pictures", "results.csv", "contact_sheet.png")  # what a sweep writes into OUT


NOT_THE_SPEC = ("model_folder", "environment", "environments")  # spec.json's records besides the spec itself


def recorded_spec(spec: Spec, environment: dict | None = None) -> dict:
    """spec.json: the spec, the model folder's whole fingerprint (folder.fingerprint: its path and every
    *_sha256; a changed model is another sweep), and the environments its pictures were made in
    (provenance.environment: the software, device, dtype and threads; a resumed sweep adds its own)."""
    from .generate import file_digest

    loras = [{"path": f, "sha256": file_digest(f, "LoRA file")} for f in spec.lora or []]  # a changed file: another sweep
    return {**spec.as_dict(), "model_folder": fingerprint(spec.model), **({"lora_files": loras} if loras else {}),
            **({"environments": [environment]} if environment is not None else {})}


def claim_folder(out: str, spec: Spec, force: bool, write: bool = True, environment: dict | None = None) -> None:
    """OUT is new, holds this very sweep (resumed), or (force) holds another sweep, whose files are
    replaced (only when OUT holds nothing else). write=False: only check, before any model work.
    Writing, the leftovers of killed writes (files.clean_partials) are removed from OUT and its pictures."""
    file = os.path.join(out, "spec.json")
    now = recorded_spec(spec, environment)
    if os.path.lexists(out):
        if not os.path.isdir(out):
            raise Exists(f"{out} exists and is not a folder")
        recorded = read_json(file, "sweep spec") if os.path.exists(file) else None
        if not isinstance(recorded, dict) or recorded.get("format") != FORMAT:
            if os.listdir(out):
                raise Exists(f"{out} holds files that are not a sweep's; choose another --outdir")
        elif (why := differs(recorded, now)) is None:  # resumed: the environments it was made in so far, and this one
            made_in = recorded.get("environments", [])
            if isinstance(made_in, list) and environment is not None:
                now["environments"] = made_in + ([environment] if environment not in made_in else [])
        else:
            if not force:
                raise Exists(f"{out} holds a sweep of another spec{why}; --force replaces it, or choose another --outdir")
            if others := sorted(set(os.listdir(out)) - set(SWEEP_FILES)):
                raise Exists(f"{out} also holds {others[:3]}, which no sweep wrote; --force replaces only a sweep's "
                             f"files: move them, or choose another --outdir")
            if write:
                import shutil

                for name in SWEEP_FILES:
                    path = os.path.join(out, name)
                    if os.path.isdir(path) and not os.path.islink(path):
                        shutil.rmtree(path)
                    elif os.path.lexists(path):
                        os.unlink(path)
    for name in ("spec.json", "results.csv", "contact_sheet.png"):  # a planted link: refused before any model work
        refuse_link(os.path.join(out, name), f"sweep's {name}")
    where = out if os.path.isdir(out) else os.path.dirname(out)
    if not os.access(where, os.W_OK | os.X_OK):
        raise BadValue(f"--outdir: cannot write into {where} (permission denied)")
    if not write:
        return
    make_folder(os.path.join(out, "pictures"), "--outdir")
    for folder in (out, os.path.join(out, "pictures")):
        clean_partials(folder)
    with atomic_file(file) as tmp, open(tmp, "w") as f:
        json.dump(now, f, indent=2, ensure_ascii=False)


def differs(recorded: dict, now: dict) -> str | None:
    """None when `recorded` (spec.json) is this sweep; else why not, for the message. The model
    folder's fingerprint is compared (its path and every *_sha256 it records: config, weights; a key
    recorded before another was kept compares what it kept); sweeps recorded before the fingerprint
    was kept compare their specs only. The environments are a
    record, not the sweep: a sweep may be resumed on another machine."""
    if "model_folder" in recorded:
        was, model = recorded["model_folder"], now["model_folder"]
        if not isinstance(was, dict):
            return " (its spec.json's model_folder is not a fingerprint)"
        if changed := sorted(k for k in was if was[k] != model.get(k)):  # keys kept since are not compared
            named = [f"its {k.removesuffix('_sha256')} ({k})" if k.endswith("_sha256") else k for k in changed]
            return f" (the model folder is not the one the sweep began with: {', '.join(named)} changed)"
    recorded = {k: v for k, v in recorded.items() if k not in NOT_THE_SPEC}
    return None if recorded == json.loads(json.dumps({k: v for k, v in now.items() if k not in NOT_THE_SPEC})) else ""


def run_sweep(spec_path: str, out: str | None = None, device: str = "cpu", force: bool = False,
              metrics: dict[str, Metric] | None = None, progress: bool = True) -> list[dict]:
    """`altdiff-min sweep SPEC`: make every missing cell's picture, then (rank 0) the table and the
    contact sheet. out: default SPEC's name without its extension, beside it. metrics: more metric
    functions by name, besides the spec's. Returns the table's rows."""
    from ..arguments import check_device
    from ..pipeline import load
    from ..storage.folder import read_config
    from ..storage.provenance import environment
    from ..training.distributed import barrier, join_world, leave_world, on_rank0

    spec = read_spec(spec_path)
    out = os.path.abspath(out or os.path.splitext(spec_path)[0])
    read_config(spec.model)  # a missing or broken model folder is refused here
    if spec.clip_model is not None:
        try:
            read_config(spec.clip_model, require=("altclip",))
        except AltDiffError as e:
            raise type(e)(f"{spec_path}: clip_model: {e}") from None
    make_folder(os.path.dirname(out), "--outdir")  # OUT's place and state, before the model loads
    claim_folder(out, spec, force, write=False)
    world = join_world(check_device(device))
    try:
        functions = {name: find_metric(name, spec.clip_model, world.device) for name in spec.metrics} | (metrics or {})
        model = load(spec.model, device=world.device, lora=spec.lora or ())
        try:
            check_cells(spec, model)
        except AltDiffError as e:
            raise type(e)(f"{spec_path}: {e}") from None
        with ExitStack() as stack:
            def claim() -> None:
                make_folder(os.path.dirname(out), "--outdir")
                stack.enter_context(locked(out))  # one sweep at a time writes OUT (rank 0 holds it)
                claim_folder(out, spec, force, environment=environment(world.device, model.unet.conv_in.weight.dtype))

            on_rank0(world, claim)
            make_pictures(spec, out, world, model, progress)
        del model  # the metrics may load a model of their own ("clip": AltCLIP-m9) onto the same device
        barrier(world)
        return on_rank0(world, lambda: write_results(out, spec, functions))
    finally:
        leave_world(world)


def make_pictures(spec: Spec, out: str, world, model, progress: bool) -> None:
    """This rank's missing pictures, by `model` (loaded, its cells checked). Each carries its record
    (provenance.picture_record: the cell's generate arguments, the prompt, the seed, the model
    folder's fingerprint as spec.json's model_folder, the environment), as `altdiff-min generate`'s
    pictures do, so `generate --replay PICTURE` makes it again."""
    from tqdm import tqdm

    from weights_convert.lora import default_name

    from ..research.lora import lora_scales
    from ..storage.provenance import environment, picture_record, png_bytes
    from .generate import file_digest

    settings, mine = spec.settings, [c for i, c in enumerate(spec.cells()) if i % world.size == world.rank]
    # Made: a regular file. A link planted at a picture's name is not taken as the picture: atomic_file refuses it.
    todo = [c for c in mine if not is_file(os.path.join(out, picture_name(c, spec)))]
    for cell in todo:  # before the first picture is made
        refuse_link(os.path.join(out, picture_name(cell, spec)), "picture")
    model_folder = fingerprint(spec.model) if todo else None
    made_in = environment(world.device, model.unet.conv_in.weight.dtype)
    loras = {f: file_digest(f, "LoRA file") for f in spec.lora or []} if todo else {}
    inverted = {}  # an edit sweep's inversions of its picture, by (inversion, steps, scale)
    for cell in tqdm(todo, desc="sweep", disable=not (progress and world.rank == 0)):
        s, p, k = cell
        if spec.edit:
            image, record = make_edit_cell(spec, model, settings[s], spec.prompts[p], inverted, model_folder, made_in)
            with atomic_file(os.path.join(out, picture_name(cell, spec))) as tmp, open(tmp, "wb") as f:
                f.write(png_bytes(image, record))
            continue
        arguments = {**spec.fixed, **settings[s], "seed": spec.seeds[k]}
        scale = float(arguments.pop(LORA_SCALE, 1.0))  # the same for every LoRA of the spec, as generate --lora records it
        skipping = from_settings({key: arguments.pop(key) for key in SKIPPERS if key in arguments})
        with lora_scales(model, {default_name(f): scale for f in loras}):
            image = model.generate(spec.prompts[p], progress=False, controllers=list(skipping.values()), **arguments)[0]
        more = {"lora": [{"path": f, "sha256": digest, "scale": scale} for f, digest in loras.items()]} if loras else {}
        more |= {key: c.settings() for key, c in skipping.items()}  # as generate --tome / --deepcache records them
        record = picture_record(model, spec.prompts[p], 0, arguments, image.size, model_folder, made_in, **more)
        with atomic_file(os.path.join(out, picture_name(cell, spec))) as tmp, open(tmp, "wb") as f:
            f.write(png_bytes(image, record))


def is_file(path: str) -> bool:
    return os.path.isfile(path) and not os.path.islink(path)


def write_results(out: str, spec: Spec, functions: dict[str, Metric]) -> list[dict]:
    """results.csv and contact_sheet.png from the saved pictures; prints each setting's mean per metric."""
    from PIL import Image

    rows, pictures = [], []
    for cell in spec.cells():
        s, p, k = cell
        file = picture_name(cell, spec)
        with Image.open(os.path.join(out, file)) as image:
            picture = image.convert("RGB")
        pictures.append(picture)
        values = {}
        for name, fn in functions.items():
            values |= {(key if len(functions) == 1 else f"{name}.{key}"): value for key, value in fn(picture, spec.prompts[p]).items()}
        rows.append({"setting": s, **{axis: json.dumps(v) if not isinstance(v, (int, float, str)) else v
                                      for axis, v in spec.settings[s].items()},
                     "prompt": spec.prompts[p], "seed": spec.seeds[k], "file": file, **values})
    with atomic_file(os.path.join(out, "results.csv")) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    contact_sheet(out, spec, pictures)
    measured = [key for key in rows[0] if key not in ("setting", "prompt", "seed", "file", *spec.axes)]
    for s, setting in enumerate(spec.settings):
        means = []
        for key in measured:
            values = [r[key] for r in rows if r["setting"] == s and r[key] is not None]
            means.append(f"{key} {sum(values) / len(values):.2f}" if values else f"{key} –")
        print(f"{label(setting):40} {'  '.join(means)}")
    return rows
