"""LoRA files for the UNet: diffusers/peft's `pytorch_lora_weights.safetensors` (read and written) and
kohya's / the web UIs' (read). The maths is altdiff_min/research/lora.py; this file only names.

A LoRA key is a module path and a part. The module path names a diffusers UNet module, so it is
renamed with the UNet converter's own rules (weights_convert/unet.py: RULES to ours, TO_DIFFUSERS
back; the same regexes that convert the weights, applied to `path + "."`):

  diffusers/peft  unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight  (lora_B;
                  diffusers' older `.lora.down.weight` / `.lora.up.weight` too). alpha: the file's
                  `lora_adapter_metadata` (peft's LoraConfig: unet.lora_alpha, unet.alpha_pattern),
                  else the rank, as diffusers reads it.
  kohya           lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight
                  (lora_up, and a scalar `.alpha`; absent → the rank). Underscores are ambiguous, so
                  the path is looked up among the model's own layers, renamed to diffusers' names.

Each file becomes one named adapter of research/lora.py (default_name: the file's stem), so several
stack; `read_lora_files` reads and checks a list of them before a model loads (load(..., lora=…)),
`attach_lora_files` checks them all against the UNet, then attaches them.

Strict both ways, as conversion is: every key is used or the file is refused with one line naming
it; `lora_te_` and `text_encoder.` keys adapt CLIP's text tower, which m9 does not have (its text
encoder is XLM-R), and are refused with that reason.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections import Counter

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open

from altdiff_min.errors import AltDiffError, BadFile, BadType, BadValue
from altdiff_min.research.lora import LoRA, attach, check_name, finite, load_lora_weights, lora_layers, plain_layers
from altdiff_min.storage.files import atomic_file, save_safetensors

from .rules import rename
from .unet import RULES, TO_DIFFUSERS

FILE = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
RECORD_KEY = "altdiff_min"  # what made the file (save_lora's record), as JSON
PARTS = {"lora_A.weight": "A", "lora_B.weight": "B", "lora.down.weight": "A", "lora.up.weight": "B",
         "lora_down.weight": "A", "lora_up.weight": "B", "alpha": "alpha"}
TEXT_TOWER = "adapts CLIP's text tower, which m9 does not have (its text encoder is XLM-R); only UNet LoRAs load"


def to_ours(diffusers: str) -> str:
    return rename(diffusers + ".", RULES)[:-1]


def to_diffusers(ours: str) -> str:
    """Our module path in diffusers' names; checked to come back through the converter's rules."""
    name = rename(ours + ".", TO_DIFFUSERS)[:-1]
    if to_ours(name) != ours:
        raise BadFile(f"no diffusers name for the layer {ours} (TO_DIFFUSERS gives {name}, which converts to "
                      f"{to_ours(name)})")
    return name


def read_file(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and the metadata of a .safetensors LoRA file."""
    if not os.path.isfile(path):
        raise BadFile(f"LoRA file not found: {path}")
    try:
        with safe_open(path, "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise BadFile(f"{path} is not a readable safetensors file (corrupt or truncated?): {e}") from None


def split(key: str, what: str) -> tuple[str, str, str]:
    """(format, module path, part) of a file's key: format 'kohya' or 'diffusers'."""
    if key.startswith(("lora_te_", "lora_te1_", "lora_te2_", "text_encoder.", "text_encoder_2.")):
        raise BadFile(f"{what}: {key} {TEXT_TOWER}")
    part = next((p for p in PARTS if key.endswith("." + p)), None)
    if part is None:
        raise BadFile(f"{what}: {key} is not a LoRA weight (expected …lora_A/lora_B.weight, …lora_down/"
                      f"lora_up.weight or …alpha)")
    path = key[: -len(part) - 1]
    if path.startswith("lora_unet_"):
        return "kohya", path.removeprefix("lora_unet_"), PARTS[part]
    if PARTS[part] == "alpha":
        raise BadFile(f"{what}: {key}: a per-layer alpha in a diffusers-named file is not a format altdiff-min reads")
    return "diffusers", path.removeprefix("unet."), PARTS[part]


def alphas_from_metadata(metadata: dict[str, str], what: str) -> tuple[float | None, dict[str, float]]:
    """peft's lora_alpha and alpha_pattern as diffusers saved them (unet.-prefixed), if the file has them."""
    if METADATA_KEY not in metadata:
        return None, {}
    try:
        config = json.loads(metadata[METADATA_KEY])
        alpha, pattern = config.get("unet.lora_alpha"), config.get("unet.alpha_pattern") or {}
        if alpha is not None:
            alpha = float(alpha)
        return alpha, {str(k): float(v) for k, v in pattern.items()}
    except (ValueError, TypeError, AttributeError) as e:
        raise BadFile(f"{what}: its {METADATA_KEY} is not peft's LoraConfig as JSON ({e})") from None


def read_lora(tensors: dict[str, torch.Tensor], metadata: dict[str, str], model: nn.Module,
              what: str) -> tuple[dict[str, tuple[int, float]], dict[str, torch.Tensor]]:
    """{our layer: (r, alpha)} and {our `layer.lora_A.weight`/`lora_B.weight`: tensor} from a file's
    tensors, checked against `model`'s plain layers (shapes, ranks, finite values)."""
    layers = plain_layers(model, [".*"])  # a layer that has LoRAs already: its base
    kohya = {"lora_unet_" + to_diffusers(name).replace(".", "_"): name for name in layers}
    found: dict[str, dict[str, torch.Tensor]] = {}
    first: dict[str, str] = {}  # a layer → its first key, for messages
    for key, tensor in tensors.items():
        kind, path, part = split(key, what)
        ours = kohya.get("lora_unet_" + path) if kind == "kohya" else to_ours(path)
        if ours not in layers:
            raise BadFile(f"{what}: {key} names no layer of this UNet")
        if part in found.setdefault(ours, {}):
            raise BadFile(f"{what}: {key} repeats a weight of the layer {path}")
        if not torch.is_floating_point(tensor) or not torch.isfinite(tensor).all():
            raise BadFile(f"{what}: {key} holds {'NaN or infinite values' if tensor.is_floating_point() else tensor.dtype}")
        found[ours][part] = tensor
        first.setdefault(ours, key)
    if not found:
        raise BadFile(f"{what} holds no LoRA weights")
    default_alpha, pattern = alphas_from_metadata(metadata, what)
    ranks = {name: parts["A"].shape[0] for name, parts in found.items() if "A" in parts}
    common_rank = Counter(ranks.values()).most_common(1)[0][0] if ranks else None
    shapes, out = {}, {}
    for name, parts in found.items():
        key = first[name]
        if set(parts) - {"alpha"} != {"A", "B"}:
            raise BadFile(f"{what}: the layer {to_diffusers(name)} has {' and '.join(sorted(parts))} but not both "
                          f"down (A) and up (B) weights")
        a, b, layer = parts["A"], parts["B"], layers[name]
        r = a.shape[0]
        if isinstance(layer, nn.Linear):
            want_a, want_b = (r, layer.in_features), (layer.out_features, r)
        else:
            want_a, want_b = (r, layer.in_channels, *layer.kernel_size), (layer.out_channels, r, 1, 1)
        if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
            raise BadFile(f"{what}: {key}: the LoRA of {to_diffusers(name)} is {tuple(a.shape)} down, "
                          f"{tuple(b.shape)} up; this UNet's layer needs {want_a} and {want_b} "
                          f"(a LoRA for another architecture, or a rank mismatch?)")
        if "alpha" in parts:  # kohya: per layer
            alpha = parts["alpha"].float().reshape(-1)
            if alpha.numel() != 1:
                raise BadFile(f"{what}: the alpha of {to_diffusers(name)} is not one number")
            alpha = alpha.item()
        else:  # diffusers: peft's alpha_pattern (regex as peft matches it), lora_alpha, else the common rank
            d = to_diffusers(name)
            alpha = next((v for k, v in pattern.items() if re.match(rf"(.*\.)?({k})$", d)), default_alpha)
            alpha = float(common_rank if alpha is None else alpha)
        shapes[name] = (r, alpha)
        out[f"{name}.lora_A.weight"], out[f"{name}.lora_B.weight"] = a, b
    return shapes, out


def check_file(path: str) -> int:
    """Check a LoRA file without a model (before one loads): a readable .safetensors file whose every key
    is a UNet LoRA weight (diffusers/peft or kohya; no text-tower keys), each layer with both its down
    and up weights, all finite. Returns the number of layers; shapes are checked against the UNet when
    it loads (read_lora)."""
    return check_tensors(*read_file(path), f"LoRA file {path}")


def check_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str], what: str) -> int:
    """check_file's checks on a file's tensors and metadata."""
    alphas_from_metadata(metadata, what)
    layers: dict[str, set[str]] = {}
    for key, tensor in tensors.items():
        kind, module, part = split(key, what)
        if not torch.is_floating_point(tensor) or not torch.isfinite(tensor).all():
            raise BadFile(f"{what}: {key} holds {'NaN or infinite values' if tensor.is_floating_point() else tensor.dtype}")
        layers.setdefault(f"{kind}:{module}", set()).add(part)
    if not layers:
        raise BadFile(f"{what} holds no LoRA weights")
    for module, parts in layers.items():
        if not {"A", "B"} <= parts:
            raise BadFile(f"{what}: the layer {module.partition(':')[2]} has {' and '.join(sorted(parts))} but not "
                          f"both down (A) and up (B) weights")
    return len(layers)


def load_lora(model: nn.Module, path: str, scale: float = 1.0, name: str | None = None) -> dict[str, LoRA]:
    """Attach the LoRA of a diffusers/peft or kohya .safetensors file to our UNet `model` (in place, at
    `scale`) as the adapter `name` (None: default_name(path)), beside any it has; returns {layer: LoRA}.
    Nothing changes when the file is refused."""
    name = default_name(path) if name is None else name
    return attach_lora_files(model, [(path, finite(scale, "scale"), name, *read_file(path))])[name]


def default_name(path: str) -> str:
    """A file's adapter name: its stem, any '.' made '_' (a module name holds no dot); a stem that torch's
    module dictionary takes for itself (train, keys, …) gets "_lora" after it."""
    name = os.path.splitext(os.path.basename(path))[0].replace(".", "_")
    return name if name and not hasattr(nn.ModuleDict(), name) else name + "_lora"


LoRAFile = tuple[str, float, str, dict, dict]  # (path, scale, name, tensors, metadata)


def lora_list(lora, what: str = "lora") -> list[tuple[str, float, str]]:
    """[(path, scale, name)] of `lora`: a list of FILE or (FILE, SCALE) (a FILE alone: one), scales
    finite (default 1.0), named default_name(FILE); a file given twice, or two that share a name,
    refused in one line."""
    items = [lora] if isinstance(lora, (str, os.PathLike)) else lora
    if not isinstance(items, (list, tuple)):
        raise BadType(f"{what} is a list of LoRA files, FILE or (FILE, SCALE), not {lora!r}")
    out, seen = [], {}
    for item in items:
        path, scale = (item, 1.0) if isinstance(item, (str, os.PathLike)) else \
            tuple(item) if isinstance(item, (list, tuple)) and len(item) == 2 else (None, None)
        if not isinstance(path, (str, os.PathLike)):
            raise BadType(f"{what}: each LoRA is a FILE or (FILE, SCALE), not {item!r}")
        path, scale = os.fspath(path), finite(scale, f"scale of {os.fspath(path)}")
        real, name = os.path.realpath(path), default_name(path)
        if real in seen.values():
            raise BadValue(f"{what}: the LoRA file {path} is given twice")
        if name in seen:
            raise BadValue(f"{what}: {seen[name]} and {path} would both be the LoRA {name!r}: rename one of the files")
        try:
            seen[check_name(name)] = real
        except AltDiffError as e:
            raise BadValue(f"{what}: {path}: {e}") from None
        out.append((path, scale, name))
    return out


def check_lora_files(lora, what: str) -> list[tuple[str, float, str]]:
    """lora_list(lora, what), each file checked as a LoRA file (check_file) before any model loads; an
    error names `what` (the flag or setting that gave the files)."""
    try:
        listed = lora_list(lora, what)
        for path, _, _ in listed:
            check_file(path)
    except AltDiffError as e:
        raise type(e)(str(e) if str(e).startswith(what) else f"{what}: {e}") from None
    return listed


def read_lora_files(lora, what: str = "lora") -> list[LoRAFile]:
    """lora_list(lora), each file read and checked (check_tensors) before a model loads."""
    files = []
    for path, scale, name in lora_list(lora, what):
        tensors, metadata = read_file(path)
        check_tensors(tensors, metadata, f"LoRA file {path}")
        files.append((path, scale, name, tensors, metadata))
    return files


def attach_lora_files(model: nn.Module, files: list[LoRAFile]) -> dict[str, dict[str, LoRA]]:
    """read_lora_files' files onto our UNet `model`, each its own adapter at its scale: every file is
    checked against the model's layers before the first is attached. Returns {name: {layer: LoRA}}."""
    read = [(name, scale, *read_lora(tensors, metadata, model, f"LoRA file {path}"))
            for path, scale, name, tensors, metadata in files]
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    added = {}
    for name, scale, shapes, weights in read:
        added[name] = attach(model, shapes, scale, name)
        load_lora_weights(model, {k: v.to(device, dtype) for k, v in weights.items()}, name)
    return added


def diffusers_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """The model's LoRA as diffusers' file holds it: {unet.<diffusers path>.lora_A/B.weight: tensor},
    and peft's LoraConfig for the metadata (r and lora_alpha the most common, patterns for the rest)."""
    layers = lora_layers(model)
    if not layers:
        raise BadFile("the model has no LoRA layers to save")
    tensors, ranks, alphas = {}, {}, {}
    for name, layer in layers.items():
        d = to_diffusers(name)
        tensors[f"unet.{d}.lora_A.weight"] = layer.lora_A.weight.detach()
        tensors[f"unet.{d}.lora_B.weight"] = layer.lora_B.weight.detach()
        ranks[d], alphas[d] = layer.r, layer.alpha
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    config = {"r": r, "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
              "target_modules": sorted(ranks), "peft_type": "LORA", "bias": "none", "lora_dropout": 0.0,
              "init_lora_weights": True, "use_dora": False, "use_rslora": False,
              "rank_pattern": {re.escape(d): v for d, v in ranks.items() if v != r},
              "alpha_pattern": {re.escape(d): v for d, v in alphas.items() if v != alpha}}
    return tensors, {f"unet.{k}": v for k, v in config.items()}


def save_lora(model: nn.Module, folder: str, name: str = FILE, record: dict | None = None) -> str:
    """Write the model's LoRA into folder/name (atomically) in diffusers' format, loadable with
    diffusers' `load_lora_weights`; returns the file's path. record: what made it (a training run's
    base model, data and settings), kept as JSON under the metadata key RECORD_KEY (readers ignore it)."""
    tensors, config = diffusers_state_dict(model)
    if not all(math.isfinite(t.float().abs().max().item()) for t in tensors.values()):
        raise BadFile("the model's LoRA weights hold NaN or infinite values; nothing written")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    with atomic_file(path) as tmp:
        save_safetensors(tmp, {k: v.contiguous().cpu() for k, v in tensors.items()},
                         {"format": "pt", METADATA_KEY: json.dumps(config, sort_keys=True),
                          **({RECORD_KEY: json.dumps(record, ensure_ascii=False)} if record else {})})
    return path


# ---- writing the kohya / web-UI form (export --to kohya) ----------------------------------------------------
KOHYA_PARTS = {"A": "lora_down.weight", "B": "lora_up.weight"}


def kohya_state_dict(tensors: dict[str, torch.Tensor], metadata: dict[str, str], what: str) -> dict[str, torch.Tensor]:
    """A diffusers/peft LoRA file's tensors as kohya names them: the diffusers module path with `_` for
    `.` after `lora_unet_`, lora_down/lora_up, and each layer's alpha as a scalar (the alpha
    diffusers would use: peft's alpha_pattern, lora_alpha, else the most common rank)."""
    default_alpha, pattern = alphas_from_metadata(metadata, what)
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        kind, path, part = split(key, what)
        if kind == "kohya":
            raise BadFile(f"{what} is in the kohya form already ({key})")
        layers.setdefault(path, {})[part] = tensor
    ranks = Counter(parts["A"].shape[0] for parts in layers.values() if "A" in parts)
    out = {}
    for path, parts in layers.items():
        if set(parts) != {"A", "B"}:
            raise BadFile(f"{what}: the layer {path} has {' and '.join(sorted(parts))} but not both down (A) and up (B)")
        alpha = next((v for k, v in pattern.items() if re.match(rf"(.*\.)?({k})$", path)), default_alpha)
        name = "lora_unet_" + path.replace(".", "_")
        out.update({f"{name}.{KOHYA_PARTS[p]}": parts[p].contiguous() for p in "AB"})
        out[f"{name}.alpha"] = torch.tensor(float(ranks.most_common(1)[0][0] if alpha is None else alpha))
    return out
