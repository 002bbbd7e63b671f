"""LoRA (Hu et al. 2021): a frozen layer plus low-rank updates, on a built model, per instance.

    W x  →  W x + Σ_i scale_i · (alpha_i / r_i) · B_i (A_i x)        A_i: (r_i, in), B_i: (out, r_i)

Each update i is an *adapter* with a name (peft's adapter_name; a file's adapters are named after the
file), so several LoRAs stack on one layer, each at its own scale, as diffusers' `set_adapters(names,
adapter_weights)` weighs peft's adapters. `add_lora(model, r)` replaces each nn.Linear (and
nn.Conv2d: A is then the layer's own kernel with r output channels, B a 1×1 conv) whose dotted name
matches a target pattern by a `LoRA` module that holds the frozen layer as `base` and its adapters as
`adapters.<name>.lora_A` / `lora_B` (peft's names and initialisation: A Kaiming-uniform as
nn.Linear's default, B zeros, so a new adapter changes nothing until trained); a layer already
wrapped gets one more adapter. Only the given model's modules are replaced; no class is patched.
While one adapter is attached, `layer.lora_A`, `.lora_B`, `.r`, `.alpha`, `.scale` read it; every
function below takes `name=None` (every adapter) or one adapter's name. `remove_lora` gives the
plain modules back.

Scales are the adapters' own (`set_scale`), or, for one call, `lora_scales(model, {name: scale})`: a
ContextVar (this thread, this call), so two web requests on one model may weigh its LoRAs
differently (as research/interventions.py keeps its controllers).

The default targets are diffusers' Stable Diffusion recipe, `to_q/to_k/to_v/to_out.0` of every
attention in the UNet's transformer blocks: our `self_attn`/`cross_attn` `q`, `k`, `v`, `out`
(layers.Attention inside unet.TransformerBlock). For m9's UNet that is 199,296 · r parameters.
TEXT_TARGETS are the text encoder's, diffusers' recipe for SD's text encoder (q_proj, k_proj, v_proj,
out_proj of every self-attention): our `layers.N.attn.q/k/v/out`; for m9's XLM-R 196,608 · r.

A pipeline (altdiff_min.pipeline.AltDiffusion) holds LoRAs in two modules, its text_encoder and unet: a
file's adapter is attached to both under one name (weights_convert/lora.py). Every function below
that reads adapters by name (names, set_scale, lora_scales, merge_lora, unmerge_lora, remove_lora,
lora_layers, …) takes such a pipeline as well as a module, and then acts on both (`carriers`).

Files (the diffusers/peft and kohya formats) are read and written by weights_convert/lora.py; this
file knows only the maths and our module names.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from numbers import Real

import torch
from torch import nn

from ..errors import BadType, BadValue

# Regexes matched against the tail of a module's dotted name (after a dot, or the whole name), as
# peft matches its target_modules.
DEFAULT_TARGETS = (r"(self|cross)_attn\.(q|k|v|out)",)
TEXT_TARGETS = (r"attn\.(q|k|v|out)",)  # the text encoder's: layers.N.attn.q, k, v, out (XLM-R's query … output.dense)
CARRIERS = ("text_encoder", "unet")  # a pipeline's modules that may hold LoRAs (its attribute names)
DEFAULT = "default"  # peft's adapter name when none is given
SCALES: ContextVar[Mapping[int, float] | None] = ContextVar("lora_scales", default=None)  # lora_scales': id(adapter) → scale


def finite(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise BadValue(f"LoRA {what} must be a finite number, not {value!r}")
    return float(value)


def check_name(name) -> str:
    """An adapter's name: a module name (no dot, not empty) that no nn.ModuleDict attribute takes."""
    if not isinstance(name, str) or not name or "." in name or hasattr(nn.ModuleDict(), name):
        raise BadValue(f"a LoRA's name must be a non-empty word without '.' that is not a torch attribute "
                       f"(keys, train, …), not {name!r}")
    return name


class Adapter(nn.Module):
    """One LoRA's update of one layer: lora_B(lora_A(x)) · (alpha / r) · scale."""

    def __init__(self, base: nn.Module, r: int, alpha: float | None = None, scale: float = 1.0):
        super().__init__()
        if type(r) is not int or r < 1:
            raise BadValue(f"LoRA rank r must be a positive int, not {r!r}")
        kw = {"device": base.weight.device, "dtype": base.weight.dtype, "bias": False}
        if isinstance(base, nn.Linear):
            self.lora_A, self.lora_B = nn.Linear(base.in_features, r, **kw), nn.Linear(r, base.out_features, **kw)
        elif isinstance(base, nn.Conv2d) and base.groups == 1:
            self.lora_A = nn.Conv2d(base.in_channels, r, base.kernel_size, base.stride, base.padding, base.dilation,
                                    padding_mode=base.padding_mode, **kw)
            self.lora_B = nn.Conv2d(r, base.out_channels, 1, **kw)
        else:
            raise BadType(f"LoRA wraps an nn.Linear or an ungrouped nn.Conv2d, not {type(base).__name__}")
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # peft's init_lora_weights=True
        nn.init.zeros_(self.lora_B.weight)
        self.r, self.alpha, self.scale, self.merged = r, float(r if alpha is None else alpha), finite(scale, "scale"), False
        finite(self.alpha, "alpha")

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, scale={self.scale:g}, merged={self.merged}"

    @property
    def scaling(self) -> float:
        return self.alpha / self.r * self.scale

    def delta(self) -> torch.Tensor:
        """The update as a weight of base's shape: scaling · B A (for a conv, B mixes A's r kernels)."""
        a, b = self.lora_A.weight, self.lora_B.weight
        if a.dim() == 2:
            return (b @ a) * self.scaling
        return torch.einsum("or,rikl->oikl", b[:, :, 0, 0], a) * self.scaling


class LoRA(nn.Module):
    """`base(x) + Σ (alpha / r) · scale · lora_B(lora_A(x))` over the adapters, around a frozen nn.Linear
    or nn.Conv2d.

    `merge()` folds adapters into base's weight (the forward then skips them: base speed);
    `unmerge()` takes them out again. A scale may change at any time (`set_scale`)."""

    def __init__(self, base: nn.Module, r: int, alpha: float | None = None, scale: float = 1.0, name: str = DEFAULT):
        super().__init__()
        if not isinstance(base, (nn.Linear, nn.Conv2d)) or isinstance(base, nn.Conv2d) and base.groups != 1:
            raise BadType(f"LoRA wraps an nn.Linear or an ungrouped nn.Conv2d, not {type(base).__name__}")
        self.trained = [p.requires_grad for p in base.parameters()]  # given back by remove_lora
        self.base = base.requires_grad_(False)
        self.adapters = nn.ModuleDict()
        self.add(name, r, alpha, scale)

    def add(self, name: str, r: int, alpha: float | None = None, scale: float = 1.0) -> Adapter:
        if check_name(name) in self.adapters:
            raise BadValue(f"the layer already has a LoRA named {name!r}")
        self.adapters[name] = Adapter(self.base, r, alpha, scale)
        return self.adapters[name]

    def only(self) -> Adapter:
        """The one adapter (what `.lora_A`, `.r`, … read): several are named, not guessed."""
        if len(self.adapters) != 1:
            raise BadValue(f"the layer holds {len(self.adapters)} LoRAs ({', '.join(self.adapters)}): name one")
        return next(iter(self.adapters.values()))

    lora_A = property(lambda self: self.only().lora_A)
    lora_B = property(lambda self: self.only().lora_B)
    r = property(lambda self: self.only().r)
    alpha = property(lambda self: self.only().alpha)
    scale = property(lambda self: self.only().scale)
    merged = property(lambda self: all(a.merged for a in self.adapters.values()))

    def chosen(self, name: str | None) -> list[Adapter]:
        return list(self.adapters.values()) if name is None else [self.adapters[name]] if name in self.adapters else []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        scales = None if torch.compiler.is_compiling() else SCALES.get()  # a compiled graph: the adapters' own
        for a in self.adapters.values():
            scale = a.scale if scales is None else scales.get(id(a), a.scale)
            if not a.merged and scale != 0:
                out = out + a.lora_B(a.lora_A(x)) * (a.alpha / a.r * scale)  # peft's order of operations
        return out

    @torch.no_grad()
    def merge(self, name: str | None = None) -> None:
        for a in self.chosen(name):
            if not a.merged:
                self.base.weight += a.delta().to(self.base.weight.dtype)
                a.merged = True

    @torch.no_grad()
    def unmerge(self, name: str | None = None) -> None:
        for a in self.chosen(name):
            if a.merged:
                self.base.weight -= a.delta().to(self.base.weight.dtype)
                a.merged = False

    def set_scale(self, scale: float, name: str | None = None) -> None:
        """A merged adapter is unmerged, rescaled and merged again."""
        scale = finite(scale, "scale")
        for n in list(self.adapters) if name is None else [name] if name in self.adapters else []:
            merged = self.adapters[n].merged
            self.unmerge(n)
            self.adapters[n].scale = scale
            if merged:
                self.merge(n)


def matches(name: str, targets: Iterable[str]) -> bool:
    """Whether a module's dotted name ends with one of the target patterns (at a dot)."""
    return any(re.fullmatch(rf"(?:.*\.)?(?:{pattern})", name) for pattern in targets)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def plain_layers(model: nn.Module, targets: Iterable[str] = DEFAULT_TARGETS) -> dict[str, nn.Module]:
    """{name: layer} of the Linear and Conv2d layers of `model` that the patterns choose; a layer
    wrapped in a LoRA is its base, under the LoRA's name (what a further adapter attaches to)."""
    targets = [targets] if isinstance(targets, str) else list(targets)
    found, inside = {}, None
    for name, m in model.named_modules():  # depth first: a LoRA's own modules follow it
        if inside and name.startswith(inside):
            continue
        if isinstance(m, LoRA):
            inside, m = name + ".", m.base
        if isinstance(m, (nn.Linear, nn.Conv2d)) and name and matches(name, targets):
            found[name] = m
    return found


def targets_of(model: nn.Module, targets: Iterable[str] = DEFAULT_TARGETS) -> list[str]:
    """The names of the Linear and Conv2d layers of `model` that the patterns choose."""
    return list(plain_layers(model, targets))


def names(model: nn.Module) -> list[str]:
    """The names of the model's LoRA adapters, each once (in the order of the layers that hold them)."""
    return list(dict.fromkeys(n for layer in lora_layers(model).values() for n in layer.adapters))


def check_names(model: nn.Module, name: str | None) -> list[str]:
    """[name] if the model has an adapter of that name (None: all of them), else a one-line refusal."""
    have = names(model)
    if name is not None and name not in have:
        raise BadValue(f"the model has no LoRA named {name!r} (it has {', '.join(map(repr, have)) or 'none'})")
    return have if name is None else [name]


def add_lora(model: nn.Module, r: int, alpha: float | None = None, targets: Iterable[str] = DEFAULT_TARGETS,
             scale: float = 1.0, name: str = DEFAULT) -> dict[str, LoRA]:
    """Give each chosen layer of `model` a new adapter `name` of rank r (alpha None: alpha = r), in
    place, and return {layer: LoRA}. The wrapped layers are frozen; what else trains is the caller's
    choice (`lora_parameters` gives an optimizer the LoRA weights alone)."""
    layers = targets_of(model, targets)
    if not layers:
        raise BadValue(f"no nn.Linear or nn.Conv2d of the model matches the LoRA targets {list(targets)}")
    return attach(model, {layer: (r, alpha) for layer in layers}, scale, name)


def attach(model: nn.Module, layers: Mapping[str, tuple[int, float | None]], scale: float = 1.0,
           name: str = DEFAULT) -> dict[str, LoRA]:
    """Give the named layers an adapter `name`, each with its own (r, alpha): a file's layers, as
    weights_convert/lora.py reads them (then `load_lora_weights` fills them). Nothing changes on a refusal."""
    if check_name(name) in names(model):
        raise BadValue(f"the model already has a LoRA named {name!r}: remove it first (remove_lora), or name this one")
    plain = plain_layers(model, [".*"])
    for layer, (r, alpha) in layers.items():  # every check before the first change
        base = plain.get(layer)
        if base is None or isinstance(base, nn.Conv2d) and base.groups != 1:
            raise BadValue(f"the model has no nn.Linear or ungrouped nn.Conv2d {layer} for a LoRA")
        if type(r) is not int or r < 1:
            raise BadValue(f"LoRA rank r must be a positive int, not {r!r} ({layer})")
        finite(scale, "scale"), finite(r if alpha is None else alpha, "alpha")
    added = {}
    for layer, (r, alpha) in layers.items():
        module = model.get_submodule(layer)
        if isinstance(module, LoRA):
            module.add(name, r, alpha, scale)
        else:
            _replace(model, layer, module := LoRA(module, r, alpha, scale, name))
        added[layer] = module
    return added


def carriers(model) -> dict[str, nn.Module]:
    """{prefix: module} of what may hold LoRA layers: a module itself (prefix ""), or a pipeline's
    text_encoder and unet ("text_encoder.", "unet."), so that one adapter name acts on both."""
    if isinstance(model, nn.Module):
        return {"": model}
    found = {f"{n}.": m for n in CARRIERS if isinstance(m := getattr(model, n, None), nn.Module)}
    if not found:
        raise BadType(f"LoRAs are held by an nn.Module or a pipeline's text_encoder and unet, not {type(model).__name__}")
    return found


def lora_layers(model) -> dict[str, LoRA]:
    """{name: LoRA} of a module's LoRA layers (a pipeline's: named text_encoder.… and unet.…)."""
    return {prefix + name: m for prefix, module in carriers(model).items()
            for name, m in module.named_modules() if isinstance(m, LoRA)}


def adapters(model: nn.Module, name: str | None = None) -> Iterator[tuple[str, str, Adapter]]:
    """(layer, adapter name, adapter) of every adapter, or of those named `name` (checked)."""
    chosen = check_names(model, name)
    for layer, module in lora_layers(model).items():
        for n, a in module.adapters.items():
            if n in chosen:
                yield layer, n, a


def lora_parameters(model: nn.Module, name: str | None = None) -> list[nn.Parameter]:
    """lora_A and lora_B of every adapter (or of adapter `name`): what an optimizer trains."""
    return [p for _, _, a in adapters(model, name) for p in (a.lora_A.weight, a.lora_B.weight)]


def one(model: nn.Module, name: str | None) -> str:
    """The adapter `name`, or the model's only one."""
    have = check_names(model, name)
    if len(have) != 1:
        raise BadValue(f"the model holds {len(have)} LoRAs ({', '.join(map(repr, have)) or 'none'}): name one")
    return have[0]


def lora_state_dict(model: nn.Module, name: str | None = None) -> dict[str, torch.Tensor]:
    """{`<layer>.lora_A.weight`, `<layer>.lora_B.weight`: tensor} of adapter `name` (None: the only one)
    in our names (weights_convert/lora.py renames them for a file)."""
    name = one(model, name)
    return {f"{layer}.{part}.weight": getattr(a, part).weight
            for layer, _, a in adapters(model, name) for part in ("lora_A", "lora_B")}


@torch.no_grad()
def load_lora_weights(model: nn.Module, tensors: Mapping[str, torch.Tensor], name: str | None = None) -> None:
    """Copy `lora_state_dict`-named tensors into adapter `name`; every layer of it must be filled."""
    own = lora_state_dict(model, name)
    missing, unknown = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or unknown:
        raise BadValue(f"LoRA weights do not fit the model's LoRA layers: {(missing or unknown)[0]} "
                       f"is {'missing' if missing else 'not a LoRA weight of the model'}")
    for key, tensor in tensors.items():
        if tensor.shape != own[key].shape:
            raise BadValue(f"LoRA weight {key} is {tuple(tensor.shape)}, the layer's is {tuple(own[key].shape)}")
        own[key].copy_(tensor)


def set_scale(model: nn.Module, scale: float, name: str | None = None) -> None:
    """Every adapter's scale (name None), or adapter `name`'s; diffusers' set_adapters' weights."""
    scale, chosen = finite(scale, "scale"), check_names(model, name)
    for layer in lora_layers(model).values():
        for n in chosen:
            layer.set_scale(scale, n)


@contextmanager
def lora_scales(model: nn.Module, scales: Mapping[str, float]):
    """`with lora_scales(model, {name: scale}):` the adapters named weigh `scale` in the model's calls
    made inside (this thread, this call), the others their own; the model is not changed. Merged
    adapters are in the weights and cannot be reweighed: refused."""
    if not isinstance(scales, Mapping):
        raise BadType(f"LoRA scales are a mapping {{name: scale}}, not {scales!r}")
    if scales and any(getattr(m, "_compiled_call_impl", None) is not None and set(scales) & set(names(m))
                      for m in carriers(model).values()):  # nn.Module.compile's (load(compile=True))
        raise BadValue("a compiled UNet reads no per-call LoRA scales (its graph holds no Python): use set_scale")
    scales = {check_names(model, n)[0]: finite(s, f"scale of {n!r}") for n, s in scales.items()}
    if merged := sorted({n for _, n, a in adapters(model) if n in scales and a.merged}):
        raise BadValue(f"the LoRA {merged[0]!r} is merged into the weights: unmerge it to change its scale per call")
    # keyed by the adapters themselves: another model's adapter of the same name keeps its own scale
    token = SCALES.set({**(SCALES.get() or {}), **{id(a): scales[n] for _, n, a in adapters(model) if n in scales}})
    try:
        yield
    finally:
        SCALES.reset(token)


def merge_lora(model: nn.Module, name: str | None = None) -> None:
    """Fold every adapter (or adapter `name`) into its base weight (same outputs, base speed);
    `unmerge_lora` takes them out."""
    for n in check_names(model, name):
        for layer in lora_layers(model).values():
            layer.merge(n)


def unmerge_lora(model: nn.Module, name: str | None = None) -> None:
    for n in check_names(model, name):
        for layer in lora_layers(model).values():
            layer.unmerge(n)


def remove_lora(model: nn.Module, name: str | None = None) -> nn.Module:
    """Drop every adapter (or adapter `name`) as it is now: a merged one stays in the weight (peft's
    merge_and_unload), an unmerged one is gone (the original weights). A layer left with no adapter
    is its plain layer again. Returns `model`."""
    chosen = check_names(model, name)
    for carrier in carriers(model).values():
        for layer, module in lora_layers(carrier).items():
            for n in chosen:
                if n in module.adapters:
                    del module.adapters[n]
            if not module.adapters:
                for p, trained in zip(module.base.parameters(), module.trained):
                    p.requires_grad_(trained)
                _replace(carrier, layer, module.base)
    return model
