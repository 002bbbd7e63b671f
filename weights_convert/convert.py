"""`altdiff-min convert SRC OUT_DIR`: a published AltDiffusion checkpoint → one altdiff-min model folder.

SRC is a hub repo id (BAAI/AltDiffusion-m9), a local folder in the diffusers layout, or a single
ldm/FlagAI checkpoint (.ckpt / .safetensors, with --tokenizer). The steps:
  1. check the arguments and the destination, before reading gigabytes;
  2. read each module's config and weights and rename them strictly (weights_convert.rules);
  3. write the model folder atomically (altdiff_min.folder.write_folder): a failed or interrupted
     conversion leaves nothing that `altdiff_min.load` would accept, and replaces nothing.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import torch
from tqdm import tqdm  # the plain text bar: also in notebooks, without ipywidgets

from altdiff_min.checks import IMAGE_SIZE, check_int
from altdiff_min.errors import AltDiffError, BadType, BadValue, Missing
from altdiff_min.files import read_json
from altdiff_min.folder import destination, write_locked
from altdiff_min.schedule import ScheduleConfig
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
    """Every config first (checked, each error naming its file), the tokenizer against the text
    encoder's vocabulary, and only then the weights."""
    files = folder_files(folder)
    if missing := [f"{c}/config.json" for c in COMPONENTS if f"{c}/config.json" not in files]:
        hint = ("; it is an altdiff-min model folder already: pass it to --model" if "config.json" in files
                and "model.safetensors" in files else "")
        raise ConversionError(f"{folder} is not an AltDiffusion folder in the diffusers layout: missing "
                              f"{', '.join(missing)}{hint}")
    if not tokenizer and "tokenizer/sentencepiece.bpe.model" not in files:
        raise ConversionError(f"{folder} has no tokenizer/sentencepiece.bpe.model (transformers 5 saves tokenizer.json "
                              f"only): pass --tokenizer PATH/sentencepiece.bpe.model, the file in the hub repo's tokenizer/")
    model = Model(tokenizer_file=tokenizer or os.path.join(folder, "tokenizer", "sentencepiece.bpe.model"))
    if "scheduler/scheduler_config.json" in files:
        path = os.path.join(folder, "scheduler", "scheduler_config.json")
        model.schedule = schedule.config_from_hf(read_json(path), path)
    for name in COMPONENTS:
        path = os.path.join(folder, name, "config.json")
        hf = read_json(path)
        try:
            if not isinstance(hf, dict):
                raise BadType(f"a config must be a JSON object, got {type(hf).__name__}")
            model.configs[name] = CONVERTERS[name].config_from_hf(hf)
            if name == "vae":  # the VAE's sample_size is the image size (the UNet's 32 is m9's known mistake)
                model.image_size = hf.get("sample_size", model.image_size)
                check_int("sample_size", model.image_size, *IMAGE_SIZE)
        except KeyError as e:
            raise ConversionError(f"{path} has no {e.args[0]!r} entry") from None
        except (AltDiffError, ValueError, TypeError) as e:
            raise ConversionError(f"{path}: {e}") from None
    check_tokenizer(model)
    for name in tqdm(COMPONENTS, desc="converting", unit="module"):
        weights = read_component(folder, pick_weights(files, name, fp16))
        module, model.reports[name] = CONVERTERS[name].load(weights, model.configs[name])
        model.tensors[name] = module.state_dict()
    return model


def from_single_file(path: str, tokenizer: str, configs: dict | None = None) -> Model:
    model = Model(tokenizer_file=tokenizer, configs=dict(configs or ldm.DEFAULT_CONFIGS))
    check_tokenizer(model)
    parts, model.reports["other"] = ldm.split(read_tensors(path))
    for name in tqdm(COMPONENTS, desc="converting", unit="module"):
        module, model.reports[name] = ldm.load(name, parts[name], model.configs[name])
        model.tensors[name] = module.state_dict()
    return model


def check_tokenizer(model: Model) -> None:
    """The tokenizer must be a sentencepiece model with as many ids as the text encoder embeds."""
    vocab = Tokenizer(model.tokenizer_file).vocab_size
    if vocab != model.configs["text_encoder"].vocab_size:
        raise ConversionError(f"the tokenizer {model.tokenizer_file} has {vocab} ids but the text encoder "
                              f"embeds {model.configs['text_encoder'].vocab_size}: they do not belong together")


def is_hub_id(src: str) -> bool:
    """owner/name, and not a local path that happens to be missing (./x/y, ../x, /x, ~/x, or x/y whose
    x is a local folder)."""
    return bool(REPO_ID.match(src)) and not src.startswith((".", "/", "~")) and not os.path.isdir(src.split("/")[0])


def convert(src: str, out_dir: str, dtype: str = "fp32", revision: str | None = None,
            tokenizer: str | None = None, force: bool = False, max_length: int = 77,
            configs: dict | None = None) -> dict[str, Report]:
    """Convert SRC (hub id, diffusers folder or single checkpoint) into the model folder OUT_DIR.

    configs: module name → config, for single checkpoints that are not m9-sized (they carry none).
    """
    # 1. Arguments and destination first; the destination stays locked until the folder is written.
    if dtype not in DTYPES:
        raise BadValue(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    if tokenizer is not None and not os.path.isfile(tokenizer):
        raise Missing(f"tokenizer model not found: {tokenizer}")
    src = os.fspath(src)
    if not (os.path.isfile(src) or os.path.isdir(src) or is_hub_id(src)):
        raise Missing(f"{src!r} is neither a file, a folder, nor a hub repo id like BAAI/AltDiffusion-m9")
    if os.path.isfile(src) and tokenizer is None:
        raise BadValue(f"{src} is a single checkpoint, which does not carry the tokenizer: pass "
                       f"--tokenizer PATH/sentencepiece.bpe.model (from the hub repo's tokenizer/ folder)")
    with destination(out_dir, force) as out_dir:
        # 2. Read and rename.
        if os.path.isfile(src):
            model = from_single_file(src, tokenizer, configs)
        elif os.path.isdir(src):
            model = from_diffusers_folder(src, dtype == "fp16", tokenizer)
        else:
            model = from_diffusers_folder(hub_folder(src, revision, dtype == "fp16"), dtype == "fp16", tokenizer)
        check_finite(model)
        # 3. Write atomically.
        write_locked(out_dir, model.configs, model.tensors, model.schedule, model.tokenizer_file, max_length,
                     DTYPES[dtype], model.image_size, source=src,
                     conversion={name: str(r) for name, r in model.reports.items()})
    return model.reports


def check_finite(model: Model) -> None:
    """No NaN or infinity in any weight (a corrupt file can decode into them)."""
    bad = [f"{name}.{k}" for name, state in model.tensors.items() for k, v in state.items()
           if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ConversionError(f"{len(bad)} tensor(s) hold NaN or infinite values, e.g. {', '.join(bad[:5])}: "
                              f"the checkpoint is corrupt")
