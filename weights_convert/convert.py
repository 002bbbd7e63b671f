"""`altdiff-min convert SRC OUT_DIR`: a published AltDiffusion checkpoint → one altdiff-min model folder.

SRC is a hub repo id (BAAI/AltDiffusion-m9), a local folder in the diffusers layout, or a single
ldm/FlagAI checkpoint (.ckpt / .safetensors, with --tokenizer). The steps:
  1. check the arguments and the destination, before reading gigabytes;
  2. read each module's config and weights and rename them strictly (weights_convert.rules);
  3. write the model folder atomically (altdiff_min.folder.write_folder): a failed or interrupted
     conversion leaves nothing that `altdiff_min.load` would accept, and replaces nothing.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

import torch
from tqdm import tqdm  # the plain text bar: also in notebooks, without ipywidgets

from altdiff_min.folder import write_folder
from altdiff_min.samplers import ScheduleConfig
from altdiff_min.tokenizer import Tokenizer

from . import ldm, schedule, text_encoder, unet, vae
from .rules import ConversionError, Report
from .sources import COMPONENTS, folder_files, hub_folder, pick_weights, read_component, read_tensors

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "keep": None}
CONVERTERS = {"text_encoder": text_encoder, "unet": unet, "vae": vae}
REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass
class Model:
    """A checkpoint read into altdiff-min's terms, ready to be written."""
    configs: dict = field(default_factory=dict)  # module name → frozen config
    tensors: dict = field(default_factory=dict)  # module name → {our name: tensor}
    reports: dict = field(default_factory=dict)  # module name → Report
    schedule: ScheduleConfig = ScheduleConfig()
    tokenizer_file: str = ""
    image_size: int = 512  # SD v1's; a diffusers folder's VAE config may say otherwise


def from_diffusers_folder(folder: str, fp16: bool, tokenizer: str | None = None) -> Model:
    files = folder_files(folder)
    needed = [f"{c}/config.json" for c in COMPONENTS] + ([] if tokenizer else ["tokenizer/sentencepiece.bpe.model"])
    if missing := [f for f in needed if f not in files]:
        raise ConversionError(f"{folder} is not an AltDiffusion folder in the diffusers layout: missing {', '.join(missing)}")
    model = Model(tokenizer_file=tokenizer or os.path.join(folder, "tokenizer", "sentencepiece.bpe.model"))
    if "scheduler/scheduler_config.json" in files:  # first: a config we cannot honour stops before the weights
        path = os.path.join(folder, "scheduler", "scheduler_config.json")
        with open(path) as f:
            model.schedule = schedule.config_from_hf(json.load(f), path)
    for name in tqdm(COMPONENTS, desc="converting", unit="module"):
        with open(os.path.join(folder, name, "config.json")) as f:
            hf = json.load(f)
        cfg = CONVERTERS[name].config_from_hf(hf)
        if name == "vae":  # the VAE's sample_size is the image size (the UNet's 32 is m9's known mistake)
            model.image_size = hf.get("sample_size", model.image_size)
        weights = read_component(folder, pick_weights(files, name, fp16))
        module, model.reports[name] = CONVERTERS[name].load(weights, cfg)
        model.configs[name], model.tensors[name] = cfg, module.state_dict()
    return model


def from_single_file(path: str, tokenizer: str, configs: dict | None = None) -> Model:
    model = Model(tokenizer_file=tokenizer)
    parts, model.reports["other"] = ldm.split(read_tensors(path))
    for name in tqdm(COMPONENTS, desc="converting", unit="module"):
        cfg = (configs or ldm.DEFAULT_CONFIGS)[name]
        module, model.reports[name] = ldm.load(name, parts[name], cfg)
        model.configs[name], model.tensors[name] = cfg, module.state_dict()
    return model


def convert(src: str, out_dir: str, dtype: str = "fp32", revision: str | None = None,
            tokenizer: str | None = None, force: bool = False, max_length: int = 77,
            configs: dict | None = None) -> dict[str, Report]:
    """Convert SRC (hub id, diffusers folder or single checkpoint) into the model folder OUT_DIR.

    configs: module name → config, for single checkpoints that are not m9-sized (they carry none).
    """
    # 1. Arguments and destination first.
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not force:
        raise FileExistsError(f"{out_dir} already exists; pass --force (force=True) to replace it")
    if tokenizer is not None and not os.path.isfile(tokenizer):
        raise FileNotFoundError(f"tokenizer model not found: {tokenizer}")
    src = os.fspath(src)
    # 2. Read and rename.
    if os.path.isfile(src):
        if tokenizer is None:
            raise ValueError(f"{src} is a single checkpoint, which does not carry the tokenizer: pass "
                             f"--tokenizer PATH/sentencepiece.bpe.model (from the hub repo's tokenizer/ folder)")
        model = from_single_file(src, tokenizer, configs)
    elif os.path.isdir(src):
        model = from_diffusers_folder(src, dtype == "fp16", tokenizer)
    elif REPO_ID.match(src):
        model = from_diffusers_folder(hub_folder(src, revision, dtype == "fp16"), dtype == "fp16", tokenizer)
    else:
        raise FileNotFoundError(f"{src!r} is neither a file, a folder, nor a hub repo id like BAAI/AltDiffusion-m9")
    vocab = Tokenizer(model.tokenizer_file).vocab_size
    if vocab != model.configs["text_encoder"].vocab_size:
        raise ConversionError(f"the tokenizer {model.tokenizer_file} has {vocab} ids but the text encoder "
                              f"embeds {model.configs['text_encoder'].vocab_size}: they do not belong together")
    # 3. Write atomically.
    write_folder(out_dir, model.configs, model.tensors, model.schedule, model.tokenizer_file, max_length,
                 force=force, dtype=DTYPES[dtype], image_size=model.image_size, source=src,
                 conversion={name: str(r) for name, r in model.reports.items()})
    return model.reports
