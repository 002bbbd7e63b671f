"""Reading checkpoints: tensors from .safetensors / .bin / .ckpt files, weights picked from a
diffusers-layout folder, and that folder fetched from (or found in the cache of) the Hugging Face hub.

Nothing from a checkpoint is executed: pickles are read with `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import os
import pickle
import zipfile

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from altdiff_min.storage.files import read_json

from .rules import ConversionError

COMPONENTS = ("text_encoder", "unet", "vae")
# File stems per component: transformers saves `model` / `pytorch_model`, diffusers `diffusion_pytorch_model`.
# "" is a transformers repo's top level (BAAI/AltCLIP-m9).
STEMS = {"text_encoder": ("model", "pytorch_model"), "unet": ("diffusion_pytorch_model",),
         "vae": ("diffusion_pytorch_model",), "safety_checker": ("model", "pytorch_model"), "": ("model", "pytorch_model")}
CONFIG_FILES = ["model_index.json", "scheduler/scheduler_config.json", "tokenizer/sentencepiece.bpe.model",
                "tokenizer/tokenizer_config.json"] + [f"{c}/config.json" for c in COMPONENTS]
SAFETY_FILES = ["safety_checker/config.json", "feature_extractor/preprocessor_config.json"]
ALTCLIP_FILES = ["config.json", "preprocessor_config.json", "sentencepiece.bpe.model"]


def is_pickle(path: str) -> bool:
    """The file starts as a pickle of protocol 2 to 5 does (PROTO opcode, version)."""
    with open(path, "rb") as f:
        head = f.read(2)
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def read_tensors(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors, .bin, .pt or .ckpt file (a .ckpt's "state_dict" is unwrapped)."""
    if not os.path.isfile(path):
        raise ConversionError(f"checkpoint file not found: {path}")
    if path.endswith(".safetensors"):
        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as e:
            raise ConversionError(f"{path} is not a readable safetensors file (corrupt or truncated?): {e}") from None
    if zipfile.is_zipfile(path):  # torch.save's format: every member carries a CRC, checked before use
        try:
            with zipfile.ZipFile(path) as z:
                if (bad := z.testzip()) is not None:
                    raise ConversionError(f"{path} is corrupt: member {bad} fails its CRC check")
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise ConversionError(f"{path} is not a readable PyTorch checkpoint (corrupt or truncated?): {e}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        blocked = [line.strip() for line in str(e).splitlines()
                   if "global" in line.lower() and ("unsupported" in line.lower() or "blocked" in line.lower())]
        if blocked:  # a class or function torch.load(weights_only=True) refuses to build
            raise ConversionError(f"{path} holds more than tensors ({blocked[0][:200]}); altdiff-min never executes "
                                  f"code from a checkpoint. Re-save it as tensors only, or as .safetensors.") from None
        if "weights only load failed" in str(e).lower() and is_pickle(path):  # one torch.save did not write
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            why = next((lines[i + 1] for i, line in enumerate(lines[:-1]) if "WeightsUnpickler error" in line), "")
            raise ConversionError(f"{path} is a pickle that torch.load(weights_only=True) cannot read safely "
                                  f"({why[:120] or 'unsupported content'}); altdiff-min never executes code from a "
                                  f"checkpoint. Re-save its tensors with torch.save, or as .safetensors.") from None
        raise ConversionError(f"{path} is not a readable PyTorch checkpoint (corrupt or truncated?)") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError, AttributeError,
            UnicodeDecodeError, zipfile.BadZipFile) as e:
        raise ConversionError(f"{path} is not a readable PyTorch checkpoint (corrupt, truncated, or not a "
                              f"checkpoint at all: {type(e).__name__})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # ldm / FlagAI .ckpt files nest the weights
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConversionError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return obj


def pick_weights(files: list[str], component: str, fp16: bool) -> list[str]:
    """The weight file(s) of one component among `files` (repo-relative paths; component "": the top
    level): safetensors before pickles, the `.fp16.` variant first only when fp16 is asked for;
    sharded checkpoints via their index (a variant's: `NAME.safetensors.index.fp16.json`, as diffusers
    and transformers name it, or `NAME.fp16.safetensors.index.json`)."""
    variants = ((".fp16", "") if fp16 else ("", ".fp16"))
    available, folder = set(files), f"{component}/" if component else ""
    for variant in variants:
        for ext in (".safetensors", ".bin"):
            for stem in STEMS[component]:
                name = f"{folder}{stem}{variant}{ext}"
                if name in available:
                    return [name]
                for index in (f"{folder}{stem}{ext}.index{variant}.json", name + ".index.json"):
                    if index in available:
                        return [index]
    raise ConversionError(f"no {component or 'model'} weights found: expected e.g. {folder}{STEMS[component][-1]}.bin "
                          f"or .safetensors (or their .fp16 variants)")


def is_index(name: str) -> bool:
    """A sharded checkpoint's index (the shards' names are in its weight_map)."""
    return name.endswith((".index.json", ".index.fp16.json"))


def locate(folder: str, files: list[str]) -> list[str]:
    """The files `pick_weights` chose, with a sharded checkpoint's index replaced by its shards, each
    checked to exist: every file is found before any is read."""
    if len(files) == 1 and is_index(files[0]):
        index = os.path.join(folder, files[0])
        try:
            shards = sorted(set(read_json(index, "weight index")["weight_map"].values()))
        except (KeyError, TypeError, AttributeError):
            raise ConversionError(f"{index} has no weight_map of tensor names to shard files") from None
        files = [os.path.join(os.path.dirname(files[0]), s) for s in shards]
    if missing := [f for f in files if not os.path.isfile(os.path.join(folder, f))]:
        raise ConversionError(f"weight file(s) not found in {folder}: {', '.join(missing[:5])}")
    return files


def read_component(folder: str, files: list[str]) -> dict[str, torch.Tensor]:
    """The tensors of the files `locate` gave (the shards of one checkpoint, or one file)."""
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        tensors.update(read_tensors(os.path.join(folder, name)))
    return tensors


def folder_files(folder: str) -> list[str]:
    return [os.path.relpath(os.path.join(d, f), folder).replace(os.sep, "/")
            for d, _, fs in os.walk(folder, followlinks=True) for f in fs]


def hub_folder(repo_id: str, revision: str | None, fp16: bool, safety_checker: bool = False) -> str:
    """A local folder with what conversion needs from a hub repo, in one precision and one format:
    an AltDiffusion (model_index.json): configs, tokenizer, the text encoder / UNet / VAE weights, and
    the safety checker's only when asked; an AltCLIP (a transformers repo: config.json): its config,
    tokenizer and weights.

    Online, the repo's file list decides which weight files to fetch; offline (HF_HUB_OFFLINE=1) or
    when the hub cannot be reached, the usual cache (HF_HOME, HF_HUB_CACHE) is used as it is.
    """
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    listing = None
    if not constants.HF_HUB_OFFLINE:
        try:
            listing = HfApi().list_repo_files(repo_id, revision=revision)
        except (RepositoryNotFoundError, RevisionNotFoundError) as e:
            raise ConversionError(f"{repo_id} (revision {revision or 'main'}) is not on the hub: {e}") from None
        except Exception:  # no connection: fall back to what the cache holds, as huggingface_hub does
            listing = None
    if listing is not None:
        if "model_index.json" in listing:
            components = COMPONENTS + (("safety_checker",) if safety_checker else ())
            wanted = [f for f in CONFIG_FILES + (SAFETY_FILES if safety_checker else []) if f in listing]
        elif "config.json" in listing:
            if safety_checker:
                raise ConversionError(f"--with-safety-checker: {repo_id} is a transformers repo (an AltCLIP), which "
                                      f"holds no safety checker; it comes with the diffusers repo (BAAI/AltDiffusion-m9)")
            components, wanted = ("",), [f for f in ALTCLIP_FILES if f in listing]
        else:
            raise ConversionError(f"{repo_id} has neither model_index.json (an AltDiffusion in the diffusers layout) "
                                  f"nor config.json (an AltCLIP in the transformers layout)")
        wanted += [f for c in components for f in pick_weights(listing, c, fp16)]
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=wanted)
        for f in wanted:  # sharded weights: fetch the shards their index names
            if is_index(f):
                shards = sorted(set(read_json(os.path.join(folder, f), "weight index")["weight_map"].values()))
                folder = snapshot_download(repo_id, revision=revision,
                                           allow_patterns=wanted + [os.path.join(os.path.dirname(f), s) for s in shards])
        return folder
    try:
        return snapshot_download(repo_id, revision=revision, local_files_only=True,
                                 allow_patterns=["model_index.json", "config.json"])
    except LocalEntryNotFoundError:
        checker = " 'safety_checker/*' 'feature_extractor/*'" if safety_checker else ""
        # huggingface_hub ≥ 1.0 ships the `hf` command; `huggingface-cli` is gone.
        if "altclip" in repo_id.lower():  # a transformers repo: taken whole
            how = f"  hf download {repo_id}\n"
        else:
            altclip = repo_id.replace("AltDiffusion", "AltCLIP") if "AltDiffusion" in repo_id else "BAAI/AltCLIP-m9"
            how = (f"  hf download {repo_id} --include '*.json' 'tokenizer/*' 'text_encoder/*' 'unet/*' 'vae/*'{checker}\n"
                   f"(its AltCLIP, for `altdiff-min score`, is a repo of its own: hf download {altclip})\n")
        raise ConversionError(
            f"{repo_id} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and the hub cannot be reached "
            f"(offline mode or no network). Download it once where the hub is reachable, e.g.\n{how}"
            f"then copy the cache (or the downloaded folder) here and run the conversion again, "
            f"or pass a local folder in the diffusers or transformers layout as SRC.") from None
