"""`altdiff-min convert SRC OUT_DIR`: a published checkpoint → one altdiff-min model folder.

SRC is a hub repo id or a local folder: an AltDiffusion in the diffusers layout (BAAI/AltDiffusion-m9;
its safety checker too with --with-safety-checker) or an AltCLIP in the transformers layout
(BAAI/AltCLIP-m9); or a single ldm/FlagAI checkpoint (.ckpt / .safetensors, with --tokenizer). The steps:
  1. check the arguments and the destination, before reading gigabytes;
  2. read each module's config and weights and rename them strictly (weights_convert.rules);
  3. write the model folder atomically (altdiff_min.storage.folder.write_folder): a failed or interrupted
     conversion leaves nothing that `altdiff_min.load` would accept, and replaces nothing.
"""
from __future__ import annotations

import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from tqdm import tqdm  # the plain text bar: also in notebooks, without ipywidgets

from altdiff_min.checks import IMAGE_SIZE, check_int
from altdiff_min.errors import AltDiffError, BadType, BadValue, Missing
from altdiff_min.model.tokenizer import Tokenizer
from altdiff_min.sampling.schedule import ScheduleConfig
from altdiff_min.storage.files import read_json
from altdiff_min.storage.folder import destination, write_locked

from . import ldm, schedule, text_encoder, unet, vae, vision
from .rules import ConversionError, Report
from .sources import COMPONENTS, folder_files, hub_folder, locate, pick_weights, read_component, read_tensors

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "keep": None}
# module → (its config from the reference's config.json, its weights renamed strictly into the module)
CONVERTERS = {"text_encoder": (text_encoder.config_from_hf, text_encoder.load),
              "unet": (unet.config_from_hf, unet.load), "vae": (vae.config_from_hf, vae.load),
              "safety_checker": (vision.safety_config_from_hf, vision.load_safety_checker),
              "altclip": (vision.altclip_config_from_hf, vision.load_altclip)}
PREPROCESSOR = {"safety_checker": "feature_extractor/preprocessor_config.json", "altclip": "preprocessor_config.json"}
REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass
class Model:
    """A checkpoint read into altdiff-min's terms, ready to be written."""
    configs: dict = field(default_factory=dict)  # module name → frozen config
    tensors: dict = field(default_factory=dict)  # module name → {our name: tensor}
    reports: dict = field(default_factory=dict)  # module name → Report
    schedule: ScheduleConfig | None = ScheduleConfig()  # None: not a diffusion model (AltCLIP)
    tokenizer_file: str = ""
    image_size: int | None = 512  # SD v1's; a diffusers folder's VAE config may say otherwise


def from_diffusers_folder(folder: str, fp16: bool, tokenizer: str | None = None, safety_checker: bool = False) -> Model:
    """Every config first (checked, each error naming its file), the tokenizer against the text
    encoder's vocabulary, and only then the weights. safety_checker: also convert safety_checker/."""
    files = folder_files(folder)
    components = COMPONENTS + (("safety_checker",) if safety_checker else ())
    if missing := [f"{c}/config.json" for c in components if f"{c}/config.json" not in files]:
        hint = ("; it is an altdiff-min model folder already: pass it to --model" if "config.json" in files
                and "model.safetensors" in files else "")
        if missing == ["safety_checker/config.json"]:
            hint = "; convert without --with-safety-checker, or from a folder or repo that has one"
        raise ConversionError(f"{folder} is not an AltDiffusion folder in the diffusers layout: missing "
                              f"{', '.join(missing)}{hint}")
    if not tokenizer and "tokenizer/sentencepiece.bpe.model" not in files:
        raise ConversionError(f"{folder} has no tokenizer/sentencepiece.bpe.model (transformers 5 saves tokenizer.json "
                              f"only): pass --tokenizer PATH/sentencepiece.bpe.model, the file in the hub repo's tokenizer/")
    model = Model(tokenizer_file=tokenizer or os.path.join(folder, "tokenizer", "sentencepiece.bpe.model"))
    if "scheduler/scheduler_config.json" in files:
        path = os.path.join(folder, "scheduler", "scheduler_config.json")
        model.schedule = schedule.config_from_hf(read_json(path), path)
    for name in components:
        hf = read_module_config(folder, f"{name}/config.json", name, model)
        if name == "vae":  # the VAE's sample_size is the image size (the UNet's 32 is m9's known mistake)
            model.image_size = hf.get("sample_size", model.image_size)
            with naming(os.path.join(folder, name, "config.json")):
                check_int("sample_size", model.image_size, *IMAGE_SIZE)
    check_tokenizer(model)
    read_weights(folder, files, components, fp16, model)
    return model


def from_transformers_folder(folder: str, fp16: bool, tokenizer: str | None = None) -> Model:
    """An AltCLIP (transformers' AltCLIPModel layout: config.json, weights, sentencepiece.bpe.model
    and preprocessor_config.json at the top level) as a model folder holding the `altclip` module."""
    files = folder_files(folder)
    if not tokenizer and "sentencepiece.bpe.model" not in files:
        raise ConversionError(f"{folder} has no sentencepiece.bpe.model: pass --tokenizer PATH/sentencepiece.bpe.model "
                              f"(AltCLIP-m9's is XLM-R's, the same file as AltDiffusion-m9's tokenizer/)")
    model = Model(tokenizer_file=tokenizer or os.path.join(folder, "sentencepiece.bpe.model"), schedule=None,
                  image_size=None)
    read_module_config(folder, "config.json", "altclip", model)
    check_tokenizer(model)
    read_weights(folder, files, ("altclip",), fp16, model)
    return model


def read_module_config(folder: str, file: str, name: str, model: Model) -> dict:
    """Module `name`'s config from the reference's `file` into model.configs (and its preprocessor's,
    checked, for the vision modules); returns the reference's config."""
    path = os.path.join(folder, file)
    hf = read_json(path)
    with naming(path):
        if not isinstance(hf, dict):
            raise BadType(f"a config must be a JSON object, got {type(hf).__name__}")
        if name == "altclip" and hf.get("model_type") != "altclip":
            raise ValueError(f"model_type is {hf.get('model_type')!r}, not 'altclip': altdiff-min converts AltCLIP "
                             f"(transformers' AltCLIPModel) and AltDiffusion (a diffusers folder) only")
        model.configs[name] = CONVERTERS[name][0](hf)
    if name in PREPROCESSOR and os.path.isfile(path := os.path.join(folder, PREPROCESSOR[name])):
        with naming(path):
            vision.check_preprocessor(read_json(path), model.configs[name].vision if name == "altclip"
                                      else model.configs[name])
    return hf


@contextmanager
def naming(path: str):
    """Errors in reading a config become one ConversionError that names its file."""
    try:
        yield
    except KeyError as e:
        raise ConversionError(f"{path} has no {e.args[0]!r} entry") from None
    except (AltDiffError, ValueError, TypeError) as e:
        raise ConversionError(f"{path}: {e}") from None


def read_weights(folder: str, files: list[str], components: tuple[str, ...], fp16: bool, model: Model) -> None:
    """Every component's weight files found first (a missing one is named before gigabytes are read)."""
    located = {name: locate(folder, pick_weights(files, "" if name == "altclip" else name, fp16)) for name in components}
    for name in tqdm(components, desc="converting", unit="module"):
        weights = read_component(folder, located[name])
        module, model.reports[name] = CONVERTERS[name][1](weights, model.configs[name])
        model.tensors[name] = module.state_dict()


def is_transformers_folder(folder: str) -> bool:
    """A transformers model (config.json at the top level), not an AltDiffusion (model_index.json)
    nor an altdiff-min model folder (config.json beside model.safetensors and the tokenizer)."""
    if not os.path.isfile(os.path.join(folder, "config.json")) or os.path.isfile(os.path.join(folder, "model_index.json")):
        return False
    try:
        return read_json(os.path.join(folder, "config.json")).get("format") != "altdiff-min"
    except (AltDiffError, AttributeError):
        return True  # read again, and reported, by from_transformers_folder


def from_single_file(path: str, tokenizer: str, configs: dict | None = None) -> Model:
    if unknown := sorted(set(configs or ()) - set(ldm.DEFAULT_CONFIGS)):
        raise BadValue(f"configs: a single file holds {sorted(ldm.DEFAULT_CONFIGS)}, not {unknown}")
    model = Model(tokenizer_file=tokenizer, configs={**ldm.DEFAULT_CONFIGS, **(configs or {})})  # the rest: m9's
    check_tokenizer(model)
    tensors = read_tensors(path)
    ldm.check_schedule(tensors, model.schedule)
    parts, model.reports["other"] = ldm.split(tensors)
    for name in tqdm(COMPONENTS, desc="converting", unit="module"):
        module, model.reports[name] = ldm.load(name, parts[name], model.configs[name])
        model.tensors[name] = module.state_dict()
    return model


def check_tokenizer(model: Model) -> None:
    """The tokenizer must be a sentencepiece model with as many ids as the text encoder embeds."""
    vocab = Tokenizer(model.tokenizer_file).vocab_size
    text = model.configs["text_encoder"] if "text_encoder" in model.configs else model.configs["altclip"].text
    if vocab != text.vocab_size:
        raise ConversionError(f"the tokenizer {model.tokenizer_file} has {vocab} ids but the text encoder "
                              f"embeds {text.vocab_size}: they do not belong together")


def is_hub_id(src: str) -> bool:
    """owner/name, and not a local path that happens to be missing (./x/y, ../x, /x, ~/x, or x/y whose
    x is a local folder)."""
    return bool(REPO_ID.match(src)) and not src.startswith((".", "/", "~")) and not os.path.isdir(src.split("/")[0])


def convert(src: str, out_dir: str, dtype: str = "fp32", revision: str | None = None,
            tokenizer: str | None = None, force: bool = False, max_length: int = 77,
            configs: dict | None = None, safety_checker: bool = False) -> dict[str, Report]:
    """Convert SRC (hub id, diffusers or transformers folder, or single checkpoint) into the model
    folder OUT_DIR.

    configs: module name → config, for single checkpoints that are not m9-sized (they carry none).
    safety_checker: also convert an AltDiffusion's safety_checker/ (fetched from the hub only then).
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
    if safety_checker and (os.path.isfile(src) or os.path.isdir(src) and is_transformers_folder(src)):
        raise BadValue(f"--with-safety-checker: {src} is {'a single checkpoint' if os.path.isfile(src) else 'an AltCLIP'}, "
                       f"which holds no safety checker; it comes with the diffusers folder (BAAI/AltDiffusion-m9)")
    with destination(out_dir, force) as out_dir:
        # 2. Read and rename.
        fp16 = dtype == "fp16"
        if os.path.isfile(src):
            model = from_single_file(src, tokenizer, configs)
        else:
            folder = src if os.path.isdir(src) else hub_folder(src, revision, fp16, safety_checker)
            if not is_transformers_folder(folder):
                model = from_diffusers_folder(folder, fp16, tokenizer, safety_checker)
            elif safety_checker:
                raise BadValue(f"--with-safety-checker: {src} is an AltCLIP, which holds no safety checker")
            else:
                model = from_transformers_folder(folder, fp16, tokenizer)
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
