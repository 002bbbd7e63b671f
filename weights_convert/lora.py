"""LoRA files for the UNet and for m9's text encoder (XLM-R): diffusers/peft's
`pytorch_lora_weights.safetensors` (read and written) and kohya's / the web UIs' (read; UNet only). The
maths is altdiff_min/research/lora.py; this file only names.

A LoRA key is a module, a module path and a part. The path names a diffusers UNet module, or a module
of transformers' RobertaSeriesModelWithTransformation (the text encoder diffusers' AltDiffusionPipeline
holds), so it is renamed with that converter's own rules (weights_convert/unet.py RULES / TO_DIFFUSERS,
weights_convert/text_encoder.py RULES / TO_TRANSFORMERS: the regexes that convert the weights, applied
to `path + "."`):

  diffusers/peft  unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight  (lora_B;
                  diffusers' older `.lora.down.weight` / `.lora.up.weight` too)
                  text_encoder.roberta.encoder.layer.0.attention.self.query.lora_linear_layer.down.weight
                  (…up; lora_A/lora_B and .lora.down/.up read too). The text encoder's part is written as
                  diffusers writes a text encoder's LoRA (convert_state_dict_to_diffusers): diffusers
                  (0.42) reads a text encoder's peft lora_A/B keys only under CLIP's q_proj … out_proj
                  names, lora_linear_layer under any. alpha: the file's `lora_adapter_metadata` (peft's
                  LoraConfig per module: unet.lora_alpha, text_encoder.alpha_pattern, …), else the layer's
                  rank, as diffusers reads it.
  kohya           lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight
                  (lora_up, and a scalar `.alpha`; absent → the rank). Underscores are ambiguous, so
                  the path is looked up among the model's own layers, renamed to diffusers' names.

Each file becomes one named adapter of research/lora.py (default_name: the file's stem) on each module
it adapts, so several stack; `read_lora_files` reads and checks a list of them before a model loads
(load(..., lora=…)), `attach_lora_files` checks them all against the UNet and the text encoder, then
attaches them.

Strict both ways, as conversion is: every key is used or the file is refused with one line naming
it. `lora_te_`, `text_encoder_2.` and `text_encoder.` keys that do not name XLM-R's modules (CLIP's
`text_model.…`) adapt CLIP's text tower, which m9 does not have, and are refused with that reason.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Mapping

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open

from altdiff_min.errors import AltDiffError, BadFile, BadType, BadValue
from altdiff_min.research.lora import (LoRA, attach, check_name, finite, load_lora_weights, lora_layers, names,
                                       plain_layers)
from altdiff_min.storage.files import atomic_file, save_safetensors

from . import text_encoder, unet
from .rules import rename

FILE = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
RECORD_KEY = "altdiff_min"  # what made the file (save_lora's record), as JSON
PARTS = {"lora_A.weight": "A", "lora_B.weight": "B", "lora.down.weight": "A", "lora.up.weight": "B",
         "lora_linear_layer.down.weight": "A", "lora_linear_layer.up.weight": "B",
         "lora_down.weight": "A", "lora_up.weight": "B", "alpha": "alpha"}
# The modules a file adapts, by its keys' prefix (diffusers' unet_name, text_encoder_name): the rules to
# our names and back, the module's name in messages, and how save_lora writes its A and B.
NAMES = {"unet": (unet.RULES, unet.TO_DIFFUSERS), "text_encoder": (text_encoder.RULES, text_encoder.TO_TRANSFORMERS)}
TITLE = {"unet": "UNet", "text_encoder": "text encoder"}
WRITTEN = {"unet": ("lora_A.weight", "lora_B.weight"),
           "text_encoder": ("lora_linear_layer.down.weight", "lora_linear_layer.up.weight")}
XLM_R = ("roberta.", "transformation.", "transformation_pre.")  # where XLM-R's layers are (transformers' names)
TEXT_TOWER = ("adapts CLIP's text tower, which m9 does not have (its text encoder is XLM-R; LoRA keys of XLM-R "
              "are text_encoder.roberta.…)")


def to_ours(path: str, module: str = "unet") -> str:
    return rename(path + ".", NAMES[module][0])[:-1]


def to_diffusers(ours: str, module: str = "unet") -> str:
    """Our module path in the reference's names; checked to come back through the converter's rules."""
    name = rename(ours + ".", NAMES[module][1])[:-1]
    if to_ours(name, module) != ours:
        raise BadFile(f"no reference name for the {TITLE[module]} layer {ours} (the rules backwards give {name}, "
                      f"which converts to {to_ours(name, module)})")
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


def split(key: str, what: str) -> tuple[str, str, str, str]:
    """(format, module, module path, part) of a file's key: format 'kohya' or 'diffusers', module 'unet'
    or 'text_encoder'."""
    if key.startswith(("lora_te_", "lora_te1_", "lora_te2_", "text_encoder_2.")):
        raise BadFile(f"{what}: {key} {TEXT_TOWER}")
    part = next((p for p in PARTS if key.endswith("." + p)), None)
    if part is None:
        raise BadFile(f"{what}: {key} is not a LoRA weight (expected …lora_A/lora_B.weight, …lora_down/"
                      f"lora_up.weight or …alpha)")
    path = key[: -len(part) - 1]
    if path.startswith("lora_unet_"):
        return "kohya", "unet", path.removeprefix("lora_unet_"), PARTS[part]
    if PARTS[part] == "alpha":
        raise BadFile(f"{what}: {key}: a per-layer alpha in a diffusers-named file is not a format altdiff-min reads")
    if path.startswith("text_encoder."):
        path = path.removeprefix("text_encoder.")
        if not (path + ".").startswith(XLM_R):  # CLIP's text_model.encoder.layers.…
            raise BadFile(f"{what}: {key} {TEXT_TOWER}")
        return "diffusers", "text_encoder", path, PARTS[part]
    return "diffusers", "unet", path.removeprefix("unet."), PARTS[part]


def alphas_from_metadata(metadata: dict[str, str], what: str, module: str = "unet") -> tuple[float | None, dict[str, float]]:
    """peft's lora_alpha and alpha_pattern of `module` as diffusers saved them (`unet.`- or
    `text_encoder.`-prefixed), if the file has them."""
    if METADATA_KEY not in metadata:
        return None, {}
    try:
        config = json.loads(metadata[METADATA_KEY])
        alpha, pattern = config.get(f"{module}.lora_alpha"), config.get(f"{module}.alpha_pattern") or {}
        if alpha is not None:
            alpha = float(alpha)
        return alpha, {str(k): float(v) for k, v in pattern.items()}
    except (ValueError, TypeError, AttributeError) as e:
        raise BadFile(f"{what}: its {METADATA_KEY} is not peft's LoraConfig as JSON ({e})") from None


def layer_alpha(default: float | None, pattern: dict[str, float], path: str, r: int) -> float:
    """A diffusers-named layer's alpha: peft's alpha_pattern (a regex, matched as peft matches it), else
    lora_alpha, else the layer's rank (diffusers' reading of a file without alphas: scale 1)."""
    alpha = next((v for k, v in pattern.items() if re.match(rf"(.*\.)?({k})$", path)), default)
    return float(r if alpha is None else alpha)


Read = dict[str, tuple[dict[str, tuple[int, float]], dict[str, torch.Tensor]]]  # module → (shapes, weights)


def read_lora(tensors: dict[str, torch.Tensor], metadata: dict[str, str], modules: nn.Module | Mapping[str, nn.Module | None],
              what: str) -> Read:
    """{module: ({our layer: (r, alpha)}, {our `layer.lora_A.weight`/`lora_B.weight`: tensor})} for each
    module the file adapts ('unet', 'text_encoder'), checked against `modules` {name: our module} (a
    module alone: the UNet): every key names a plain layer of a module given; shapes, ranks, finite values."""
    modules = {"unet": modules} if isinstance(modules, nn.Module) else modules
    layers_of: dict[str, dict[str, nn.Module]] = {}  # a layer that has LoRAs already: its base
    kohya: dict[str, str] | None = None
    found: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    first: dict[tuple[str, str], str] = {}  # a layer → its first key, for messages
    for key, tensor in tensors.items():
        kind, module, path, part = split(key, what)
        if modules.get(module) is None:
            raise BadValue(f"{what}: {key} adapts the {TITLE[module]}, and no {TITLE[module]} was given to attach it to")
        if module not in layers_of:
            layers_of[module] = plain_layers(modules[module], [".*"])
        layers = layers_of[module]
        if kind == "kohya":
            if kohya is None:
                kohya = {to_diffusers(name).replace(".", "_"): name for name in layers}
            ours = kohya.get(path)
        else:
            ours = to_ours(path, module)
        if ours not in layers:
            raise BadFile(f"{what}: {key} names no layer of this {TITLE[module]}")
        if part in found.setdefault((module, ours), {}):
            raise BadFile(f"{what}: {key} repeats a weight of the layer {path}")
        if not torch.is_floating_point(tensor) or not torch.isfinite(tensor).all():
            raise BadFile(f"{what}: {key} holds {'NaN or infinite values' if tensor.is_floating_point() else tensor.dtype}")
        found[module, ours][part] = tensor
        first.setdefault((module, ours), key)
    if not found:
        raise BadFile(f"{what} holds no LoRA weights")
    out: Read = {}
    for (module, name), parts in found.items():
        key, d, layer = first[module, name], to_diffusers(name, module), layers_of[module][name]
        if set(parts) - {"alpha"} != {"A", "B"}:
            raise BadFile(f"{what}: the layer {d} has {' and '.join(sorted(parts))} but not both down (A) and up (B) weights")
        a, b = parts["A"], parts["B"]
        r = a.shape[0]
        if isinstance(layer, nn.Linear):
            want_a, want_b = (r, layer.in_features), (layer.out_features, r)
        else:
            want_a, want_b = (r, layer.in_channels, *layer.kernel_size), (layer.out_channels, r, 1, 1)
        if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
            raise BadFile(f"{what}: {key}: the LoRA of {d} is {tuple(a.shape)} down, {tuple(b.shape)} up; this "
                          f"{TITLE[module]}'s layer needs {want_a} and {want_b} (a LoRA for another architecture, "
                          f"or a rank mismatch?)")
        if "alpha" in parts:  # kohya: per layer
            alpha = parts["alpha"].float().reshape(-1)
            if alpha.numel() != 1:
                raise BadFile(f"{what}: the alpha of {d} is not one number")
            alpha = alpha.item()
        else:
            alpha = layer_alpha(*alphas_from_metadata(metadata, what, module), d, r)
        shapes, weights = out.setdefault(module, ({}, {}))
        shapes[name] = (r, alpha)
        weights[f"{name}.lora_A.weight"], weights[f"{name}.lora_B.weight"] = a, b
    return out


def check_file(path: str) -> int:
    """Check a LoRA file without a model (before one loads): a readable .safetensors file whose every key
    is a LoRA weight of the UNet (diffusers/peft or kohya) or of XLM-R (no CLIP text-tower keys), each
    layer with both its down and up weights, all finite. Returns the number of layers; shapes are
    checked against the modules when they load (read_lora)."""
    return check_tensors(*read_file(path), f"LoRA file {path}")


def check_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str], what: str) -> int:
    """check_file's checks on a file's tensors and metadata."""
    for module in NAMES:
        alphas_from_metadata(metadata, what, module)
    layers: dict[tuple[str, str, str], set[str]] = {}
    for key, tensor in tensors.items():
        kind, module, path, part = split(key, what)
        if not torch.is_floating_point(tensor) or not torch.isfinite(tensor).all():
            raise BadFile(f"{what}: {key} holds {'NaN or infinite values' if tensor.is_floating_point() else tensor.dtype}")
        layers.setdefault((kind, module, path), set()).add(part)
    if not layers:
        raise BadFile(f"{what} holds no LoRA weights")
    for (_, _, path), parts in layers.items():
        if not {"A", "B"} <= parts:
            raise BadFile(f"{what}: the layer {path} has {' and '.join(sorted(parts))} but not both down (A) and up (B) weights")
    return len(layers)


def load_lora(model: nn.Module, path: str, scale: float = 1.0, name: str | None = None,
              text_encoder: nn.Module | None = None) -> dict[str, LoRA]:
    """Attach the LoRA of a diffusers/peft or kohya .safetensors file to our UNet `model` (and, for its
    text_encoder. keys, to our `text_encoder`; None: such keys are refused), in place, at `scale`, as the
    adapter `name` (None: default_name(path)), beside any they have; returns {layer: LoRA} (the text
    encoder's layers named text_encoder.…). Nothing changes when the file is refused."""
    name = default_name(path) if name is None else name
    return attach_lora_files(model, [(path, finite(scale, "scale"), name, *read_file(path))], text_encoder)[name]


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


def attach_lora_files(model: nn.Module | None, files: list[LoRAFile],
                      text_encoder: nn.Module | None = None) -> dict[str, dict[str, LoRA]]:
    """read_lora_files' files onto our UNet `model` and our `text_encoder` (each file's adapter, one name,
    on every module it adapts), each at its scale: every file is checked against the modules, and every
    name against the adapters they hold, before the first is attached. Returns {name: {layer: LoRA}}
    (the text encoder's layers named text_encoder.…)."""
    modules = {"unet": model, "text_encoder": text_encoder}
    read = [(name, scale, read_lora(tensors, metadata, modules, f"LoRA file {path}"))
            for path, scale, name, tensors, metadata in files]
    if twice := [n for n, k in Counter(name for name, _, _ in read).items() if k > 1]:
        raise BadValue(f"two of the LoRA files would both be the LoRA {twice[0]!r}: name them apart")
    for name, _, parts in read:
        for module in parts:
            if name in names(modules[module]):
                raise BadValue(f"the {TITLE[module]} already has a LoRA named {name!r}: remove it first (remove_lora), "
                               f"or name this one")
    added = {}
    for name, scale, parts in read:
        added[name] = {}
        for module, (shapes, weights) in parts.items():
            target = modules[module]
            device, dtype = next(target.parameters()).device, next(target.parameters()).dtype
            layers = attach(target, shapes, scale, name)
            load_lora_weights(target, {k: v.to(device, dtype) for k, v in weights.items()}, name)
            added[name].update({("" if module == "unet" else f"{module}.") + k: v for k, v in layers.items()})
    return added


def peft_config(ranks: dict[str, int], alphas: dict[str, float]) -> dict:
    """peft's LoraConfig of one module's layers {reference path: r / alpha}: r and lora_alpha the most
    common, patterns for the rest (regexes of the whole path, as peft matches them)."""
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    return {"r": r, "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
            "target_modules": sorted(ranks), "peft_type": "LORA", "bias": "none", "lora_dropout": 0.0,
            "init_lora_weights": True, "use_dora": False, "use_rslora": False,
            "rank_pattern": {re.escape(d): v for d, v in ranks.items() if v != r},
            "alpha_pattern": {re.escape(d): v for d, v in alphas.items() if v != alpha}}


def diffusers_state_dict(model: nn.Module | None, text_encoder: nn.Module | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """The LoRAs of our UNet `model` and `text_encoder` as diffusers' file holds them ({unet.<diffusers
    path>.lora_A/B.weight, text_encoder.<transformers path>.lora_linear_layer.down/up.weight: tensor}),
    and each module's peft LoraConfig for the metadata, prefixed with its name as diffusers packs it."""
    tensors, config = {}, {}
    for module, target in (("unet", model), ("text_encoder", text_encoder)):
        layers = lora_layers(target) if target is not None else {}
        ranks, alphas = {}, {}
        for name, layer in layers.items():
            d = to_diffusers(name, module)
            for written, weight in zip(WRITTEN[module], (layer.lora_A.weight, layer.lora_B.weight)):
                tensors[f"{module}.{d}.{written}"] = weight.detach()
            ranks[d], alphas[d] = layer.r, layer.alpha
        if layers:
            config.update({f"{module}.{k}": v for k, v in peft_config(ranks, alphas).items()})
    if not tensors:
        raise BadFile("the model has no LoRA layers to save")
    return tensors, config


def save_lora(model: nn.Module | None, folder: str, name: str = FILE, record: dict | None = None,
              text_encoder: nn.Module | None = None) -> str:
    """Write the LoRAs of our UNet `model` and of our `text_encoder` (if given; either may hold none)
    into folder/name (atomically) in diffusers' format, loadable with diffusers' `load_lora_weights`;
    returns the file's path. record: what made it (a training run's base model, data and settings),
    kept as JSON under the metadata key RECORD_KEY (readers ignore it)."""
    tensors, config = diffusers_state_dict(model, text_encoder)
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
    `.` after `lora_unet_`, lora_down/lora_up, and each layer's alpha as a scalar (the alpha diffusers
    would use: peft's alpha_pattern, lora_alpha, else the layer's rank). UNet only: the kohya form's
    text-encoder keys (lora_te_…) name CLIP's layers, which the web UIs look up in CLIP's text tower."""
    default_alpha, pattern = alphas_from_metadata(metadata, what)
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        kind, module, path, part = split(key, what)
        if kind == "kohya":
            raise BadFile(f"{what} is in the kohya form already ({key})")
        if module != "unet":
            raise BadFile(f"{what}: {key} adapts m9's text encoder (XLM-R), which the kohya form cannot name (its "
                          f"lora_te_ keys name CLIP's layers): only a UNet LoRA exports to kohya")
        layers.setdefault(path, {})[part] = tensor
    out = {}
    for path, parts in layers.items():
        if set(parts) != {"A", "B"}:
            raise BadFile(f"{what}: the layer {path} has {' and '.join(sorted(parts))} but not both down (A) and up (B)")
        name = "lora_unet_" + path.replace(".", "_")
        out.update({f"{name}.{KOHYA_PARTS[p]}": parts[p].contiguous() for p in "AB"})
        out[f"{name}.alpha"] = torch.tensor(layer_alpha(default_alpha, pattern, path, parts["A"].shape[0]))
    return out
