"""`altdiff-min export MODEL OUT --to diffusers|single-file`: a model folder → the layouts other tools read.

    diffusers     OUT/ as BAAI/AltDiffusion-m9 is on the hub (model_index.json, scheduler/, text_encoder/,
                  tokenizer/, unet/, vae/; safetensors weights), for diffusers' AltDiffusionPipeline.from_pretrained
    single-file   OUT.safetensors in the ldm layout the web UIs and FlagAI read (weights_convert/ldm.py)
    kohya         (LORA_FILE OUT --to kohya) a diffusers/peft LoRA file in the kohya / web-UI form

The names come from the converter's rules read backwards (rules.rename_back: each name checked to
convert forward into the one it came from), so export and convert cannot drift apart. As convert:
everything is checked before any weight is read; OUT is written beside itself and renamed into place;
--force replaces only an OUT that export wrote (marked: model_index.json's MARK entry, the single
file's metadata).
"""
from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors import SafetensorError, safe_open

from altdiff_min.errors import AltDiffError, BadFile, BadValue, Exists, io_error
from altdiff_min.sampling.schedule import ScheduleConfig, alphas_cumprod, betas
from altdiff_min.storage.files import (
    atomic_file,
    clean_partials,
    fsync_path,
    locked,
    make_folder,
    put_in_place,
    read_json,
    save_safetensors,
    sibling,
)
from altdiff_min.storage.folder import (
    DIFFUSION,
    TOKENIZER,
    read_config,
    read_folder,
    recover,
    resolve,
)

from . import ldm, schedule, text_encoder, unet, vae, vision
from .rules import rename_back

TARGETS = ("diffusers", "single-file", "kohya")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MARK = "_altdiff_min_export"  # diffusers skips model_index.json entries that start with "_"
MARK_METADATA = "altdiff_min_export"  # the single file's metadata key
# module (its folder in the diffusers layout) → (its weights file there, the rules that read it)
DIFFUSERS = {
    "text_encoder": ("model.safetensors", text_encoder.RULES),
    "unet": ("diffusion_pytorch_model.safetensors", unet.RULES),
    "vae": ("diffusion_pytorch_model.safetensors", vae.RULES),
    "safety_checker": ("model.safetensors", vision.SAFETY_RULES),  # where the folder has one
}
CHECKER = {"safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
           "feature_extractor": ["transformers", "CLIPImageProcessor"], "requires_safety_checker": True}
# model_index.json: [library, class] per component. The text encoder's class is in no library diffusers
# resolves since the pipeline moved to pipelines/deprecated/ (neither the hub's ["alt_diffusion", …] nor
# what save_pretrained writes loads in diffusers 0.42): it is named under "deprecated", which diffusers
# accepts when the text encoder is passed, from_pretrained(OUT, text_encoder=…from_pretrained(OUT/text_encoder))
# (docs/conversion.md). No safety checker → null entries, which from_pretrained accepts.
MODEL_INDEX = {"_class_name": "AltDiffusionPipeline", "_diffusers_version": "0.42.1",
               "feature_extractor": [None, None], "safety_checker": [None, None],
               "requires_safety_checker": False,
               "scheduler": ["diffusers", "DDIMScheduler"],
               "text_encoder": ["deprecated", "RobertaSeriesModelWithTransformation"],
               "tokenizer": ["transformers", "XLMRobertaTokenizer"],
               "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
WRITTEN = {"model_index.json", "scheduler", "text_encoder", "tokenizer", "unet", "vae", *CHECKER}  # what OUT/ may hold


def export(model: str, out: str, to: str = "diffusers", dtype: str = "fp32", force: bool = False) -> str:
    """Write the model folder (or, --to kohya, the LoRA file) `model` to `out` in the layout `to`;
    returns out's absolute path. Every refusal comes before any weight is read, and leaves nothing."""
    if to not in TARGETS:
        raise BadValue(f"--to must be one of {', '.join(TARGETS)}, got {to!r}")
    if dtype not in DTYPES:
        raise BadValue(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    model, out = resolve(model), os.path.abspath(os.fspath(out))
    if to == "kohya":
        return save_kohya(model, out, force)
    if os.path.isfile(model) and model.endswith(".safetensors"):
        raise BadValue(f"{model} is a file: export takes a model folder (a LoRA file goes --to kohya)")
    config = read_config(model)  # a one-line BadFile/Missing for anything but an AltDiffusion model folder
    if to == "single-file":
        check_single_file(config, out)
    make_folder(os.path.dirname(out), f"cannot write {out}")
    with locked(out):
        if to == "diffusers":
            recover(out)
        else:
            clean_partials(os.path.dirname(out))
        check_destination(out, to, force)
        names = tuple(config["modules"]) if to == "diffusers" else DIFFUSION  # an ldm file holds no safety checker
        config, tokenizer, modules = read_folder(model, DIFFUSION, torch.device("cpu"), None, names)
        states = cast({name: m.state_dict() for name, m in modules.items()}, DTYPES[dtype])
        source = os.path.abspath(model)
        if to == "diffusers":
            write_diffusers(out, config, states, os.path.join(model, TOKENIZER), tokenizer.max_length, source)
        else:
            write_single_file(out, config, states, source)
    return out


def prediction_type(config: dict) -> str:
    """What the UNet predicts, as the folder's schedule records it (ScheduleConfig: epsilon where it says nothing)."""
    return config["schedule"].prediction_type


def check_single_file(config: dict, out: str) -> None:
    """A single file carries no configs: a reader assumes the ldm/m9 noise schedule and ε-prediction (the
    web UIs' v1 yaml). What it cannot say is refused rather than written to be misread."""
    if not out.endswith(".safetensors"):
        raise BadValue(f"{out}: a single file is written as .safetensors (the web UIs read it; a pickled .ckpt "
                       f"can run code when loaded)")
    if (kind := prediction_type(config)) != "epsilon":
        raise BadValue(f"the model predicts {kind}, which a single file cannot record (web UIs assume epsilon): "
                       f"export --to diffusers")
    try:
        ldm.check_schedule(ldm_schedule(config["schedule"]), ScheduleConfig())
    except AltDiffError:
        raise BadValue("the model's noise schedule is not m9's, which a single file's readers assume (they "
                       "rebuild it from their own config): export --to diffusers") from None


def ldm_schedule(cfg: ScheduleConfig) -> dict[str, torch.Tensor]:
    """The schedule buffers ldm keeps (float32, as FlagAI stores them), which ldm.check_schedule reads."""
    return {"betas": betas(cfg, torch.float64).float(), "alphas_cumprod": alphas_cumprod(cfg, torch.float64).float()}


def check_destination(out: str, to: str, force: bool) -> None:
    """OUT absent, or (force) something export wrote: never a model folder, another tool's, or a user's."""
    if not os.path.lexists(out):
        return
    if not force:
        raise Exists(f"{out} already exists; pass --force to replace it")
    if problem := not_an_export(out, to):
        raise Exists(f"{out} {problem}; --force replaces only what altdiff-min export wrote")


def not_an_export(out: str, to: str) -> str | None:
    """Why `out` is not an earlier export of the same kind, or None."""
    if os.path.islink(out):
        return "is a symbolic link"
    if to == "diffusers":
        if not os.path.isdir(out):
            return "is not a folder"
        if other := sorted(set(os.listdir(out)) - WRITTEN):
            return f"holds files export did not write ({', '.join(other[:5])})"
        try:
            index = read_json(os.path.join(out, "model_index.json"))
        except AltDiffError:
            return "has no readable model_index.json"
        return None if isinstance(index, dict) and MARK in index else "is not a diffusers folder export wrote"
    if not os.path.isfile(out):
        return "is not a file"
    try:
        with safe_open(out, "pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError):
        return "is not a readable safetensors file"
    return None if MARK_METADATA in metadata else "is not a single file export wrote"


def cast(states: dict, dtype: torch.dtype) -> dict:
    """Floating tensors in `dtype`; one that overflows it is refused (as write_locked does)."""
    out = {name: {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state.items()}
           for name, state in states.items()}
    if bad := [f"{n}.{k}" for n, s in out.items() for k, v in s.items() if v.is_floating_point() and not torch.isfinite(v).all()]:
        raise BadValue(f"{len(bad)} tensor(s) do not fit {str(dtype).removeprefix('torch.')} (beyond "
                       f"±{torch.finfo(dtype).max:g}), e.g. {', '.join(bad[:3])}: export them in fp32")
    return out


def write_json(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False, allow_nan=False)
        f.write("\n")


def write_weights(path: str, tensors: dict, metadata: dict, mode: int | None = None) -> None:
    """safetensors' file, with the permissions the umask gives (files.save_safetensors)."""
    save_safetensors(path, tensors, {"format": "pt", **metadata}, mode)


def diffusers_configs(config: dict) -> dict[str, dict]:
    """Each module's config.json (and the scheduler's) in diffusers' and transformers' terms."""
    image = config.get("image_size", 512)
    latent = image // 2 ** (len(config["vae"].channels) - 1)
    configs = {"text_encoder": text_encoder.config_to_hf(config["text_encoder"]),
               "unet": unet.config_to_hf(config["unet"], latent), "vae": vae.config_to_hf(config["vae"], image),
               "scheduler": schedule.config_to_hf(config["schedule"])}
    if "safety_checker" in config["modules"]:
        configs["safety_checker"] = vision.safety_config_to_hf(config["safety_checker"])
        configs["feature_extractor"] = vision.preprocessor_to_hf(config["safety_checker"])
    return configs


def write_diffusers(out: str, config: dict, states: dict, tokenizer_file: str, max_length: int, source: str) -> None:
    """Every file into a fresh `.OUT.partial-*` sibling, fsync'd, then renamed into place."""
    tmp = sibling(out, "partial")
    configs = diffusers_configs(config)
    try:
        os.mkdir(tmp)  # 0777 less the umask, as any folder the user makes; its files as the umask makes them
        mode = os.stat(tmp).st_mode & 0o666
        for name, (weights, rules) in ((n, d) for n, d in DIFFUSERS.items() if n in states):
            os.mkdir(os.path.join(tmp, name))
            names = rename_back(list(states[name]), rules, f"{name} state dict")
            write_json(os.path.join(tmp, name, "config.json"), configs[name])
            write_weights(os.path.join(tmp, name, weights), {names[k]: v for k, v in states[name].items()}, {}, mode)
        os.mkdir(os.path.join(tmp, "scheduler"))
        write_json(os.path.join(tmp, "scheduler", "scheduler_config.json"), configs["scheduler"])
        os.mkdir(os.path.join(tmp, "tokenizer"))
        shutil.copyfile(tokenizer_file, os.path.join(tmp, "tokenizer", TOKENIZER))
        # The tokenizer's length is the folder's (77, as FlagAI), not the hub file's 512.
        write_json(os.path.join(tmp, "tokenizer", "tokenizer_config.json"),
                   {"tokenizer_class": "XLMRobertaTokenizer", "model_max_length": max_length})
        write_json(os.path.join(tmp, "tokenizer", "special_tokens_map.json"),
                   {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "sep_token": "</s>",
                    "pad_token": "<pad>", "cls_token": "<s>", "mask_token": "<mask>"})
        checker = "safety_checker" in states
        if checker:
            os.mkdir(os.path.join(tmp, "feature_extractor"))
            write_json(os.path.join(tmp, "feature_extractor", "preprocessor_config.json"), configs["feature_extractor"])
        write_json(os.path.join(tmp, "model_index.json"),
                   {**MODEL_INDEX, **(CHECKER if checker else {}), MARK: {"source": source}})
        for parent, _, files in os.walk(tmp, topdown=False):
            for f in files:
                fsync_path(os.path.join(parent, f))
            fsync_path(parent)
        put_in_place(tmp, out)
    except OSError as e:
        raise io_error(out, e) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def single_file_tensors(config: dict, states: dict) -> dict[str, torch.Tensor]:
    """One state dict under ldm's prefixes and names, with the noise schedule's buffers."""
    rules = {"text_encoder": text_encoder.RULES, "unet": ldm.unet_rules(config["unet"]),
             "vae": ldm.vae_rules(config["vae"])}
    tensors = {}
    for name, prefix in ldm.PREFIXES.items():
        names = rename_back(list(states[name]), rules[name], f"{name} state dict (ldm)")
        for k, v in states[name].items():
            tensors[prefix + names[k]] = ldm.as_conv(names[k], v) if name == "vae" else v
    return {**tensors, **ldm_schedule(config["schedule"])}


def write_single_file(out: str, config: dict, states: dict, source: str) -> None:
    tensors = single_file_tensors(config, states)
    with atomic_file(out) as tmp:
        write_weights(tmp, {k: v.contiguous() for k, v in tensors.items()}, {MARK_METADATA: json.dumps({"source": source})},
                      os.stat(tmp).st_mode & 0o666)  # as atomic_file made it: the umask's


def check_lora_destination(out: str, force: bool) -> None:
    """For save_kohya: OUT absent, or (force) a kohya file export wrote."""
    if os.path.lexists(out) and not force:
        raise Exists(f"{out} already exists; pass --force to replace it")
    if os.path.lexists(out) and (problem := not_an_export(out, "kohya")):
        raise Exists(f"{out} {problem}; --force replaces only what altdiff-min export wrote")
    if not out.endswith(".safetensors"):
        raise BadFile(f"{out}: a kohya LoRA file is written as .safetensors")


def save_kohya(path: str, out: str, force: bool = False) -> str:
    """`export LORA_FILE OUT --to kohya`: the diffusers/peft LoRA file `path` written to `out` in the kohya
    form (checked first, as generate --lora checks it: keys, both halves, finite values); returns out."""
    from .lora import check_file, kohya_state_dict, read_file

    what = f"LoRA file {path}"
    out = os.path.abspath(out)
    check_lora_destination(out, force)
    check_file(path)
    tensors = kohya_state_dict(*read_file(path), what)
    ranks = {t.shape[0] for k, t in tensors.items() if k.endswith(".lora_down.weight")}
    alphas = {t.item() for k, t in tensors.items() if k.endswith(".alpha")}
    metadata = {"ss_network_module": "networks.lora", MARK_METADATA: json.dumps({"source": os.path.abspath(path)}),
                **({"ss_network_dim": str(*ranks)} if len(ranks) == 1 else {}),
                **({"ss_network_alpha": f"{next(iter(alphas)):g}"} if len(alphas) == 1 else {})}
    with locked(out):
        check_lora_destination(out, force)
        with atomic_file(out) as tmp:
            write_weights(tmp, tensors, metadata)
    return out
