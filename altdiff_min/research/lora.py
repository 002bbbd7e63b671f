"""LoRA (Hu et al. 2021): a frozen layer plus a trainable low-rank update, on a built model, per instance.

    W x  →  W x + (alpha / r) · scale · B (A x)        A: (r, in), B: (out, r)

`add_lora(model, r)` replaces each nn.Linear (and nn.Conv2d: A is then the layer's own kernel with r
output channels, B a 1×1 conv) whose dotted name matches a target pattern by a `LoRA` module that
holds the frozen layer as `base` and the update as `lora_A` / `lora_B` (peft's names and initialisation:
A Kaiming-uniform as nn.Linear's default, B zeros, so a new LoRA changes nothing until trained). Only
the given model's modules are replaced; no class is patched. While a LoRA is attached the model's
state dict holds `….q.base.weight` and `….q.lora_A.weight` (as peft's holds `base_layer`);
`remove_lora` gives the plain modules back.

The default targets are diffusers' Stable Diffusion recipe, `to_q/to_k/to_v/to_out.0` of every
attention in the UNet's transformer blocks: our `self_attn`/`cross_attn` `q`, `k`, `v`, `out`
(layers.Attention inside unet.TransformerBlock). For m9's UNet that is 199,296 · r parameters.

Files (the diffusers/peft and kohya formats) are read and written by weights_convert/lora.py; this
file knows only the maths and our module names.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from numbers import Real

import torch
import torch.nn as nn

from ..errors import BadType, BadValue

# Regexes matched against the tail of a module's dotted name (after a dot, or the whole name), as
# peft matches its target_modules.
DEFAULT_TARGETS = (r"(self|cross)_attn\.(q|k|v|out)",)


def finite(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise BadValue(f"LoRA {what} must be a finite number, not {value!r}")
    return float(value)


class LoRA(nn.Module):
    """`base(x) + (alpha / r) · scale · lora_B(lora_A(x))` around a frozen nn.Linear or nn.Conv2d.

    `merge()` folds the update into base's weight (the forward then runs base alone, as fast as
    without LoRA); `unmerge()` takes it out again. `scale` may change at any time (`set_scale`)."""

    def __init__(self, base: nn.Module, r: int, alpha: float | None = None, scale: float = 1.0):
        super().__init__()
        if type(r) is not int or r < 1:
            raise BadValue(f"LoRA rank r must be a positive int, not {r!r}")
        self.trained = [p.requires_grad for p in base.parameters()]  # given back by remove_lora
        self.base = base.requires_grad_(False)
        kw = dict(device=base.weight.device, dtype=base.weight.dtype, bias=False)
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.merged or self.scale == 0:
            return out
        return out + self.lora_B(self.lora_A(x)) * self.scaling  # peft's order of operations

    def delta(self) -> torch.Tensor:
        """The update as a weight of base's shape: scaling · B A (for a conv, B mixes A's r kernels)."""
        a, b = self.lora_A.weight, self.lora_B.weight
        if a.dim() == 2:
            return (b @ a) * self.scaling
        return torch.einsum("or,rikl->oikl", b[:, :, 0, 0], a) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base.weight += self.delta().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= self.delta().to(self.base.weight.dtype)
            self.merged = False

    def set_scale(self, scale: float) -> None:
        """A merged LoRA is unmerged, rescaled and merged again."""
        merged = self.merged
        self.unmerge()
        self.scale = finite(scale, "scale")
        if merged:
            self.merge()


def matches(name: str, targets: Iterable[str]) -> bool:
    """Whether a module's dotted name ends with one of the target patterns (at a dot)."""
    return any(re.fullmatch(rf"(?:.*\.)?(?:{pattern})", name) for pattern in targets)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def targets_of(model: nn.Module, targets: Iterable[str] = DEFAULT_TARGETS) -> list[str]:
    """The names of the Linear and Conv2d layers of `model` that the patterns choose."""
    targets = [targets] if isinstance(targets, str) else list(targets)
    return [name for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d)) and name and matches(name, targets)]


def add_lora(model: nn.Module, r: int, alpha: float | None = None, targets: Iterable[str] = DEFAULT_TARGETS,
             scale: float = 1.0) -> dict[str, LoRA]:
    """Wrap each chosen layer of `model` in a new LoRA of rank r (alpha None: alpha = r), in place, and
    return {name: LoRA}. The wrapped layers are frozen; what else trains is the caller's choice
    (`lora_parameters` gives an optimizer the LoRA weights alone)."""
    if lora_layers(model):
        raise BadValue("the model already has LoRA layers: merge them in or remove them first (remove_lora)")
    names = targets_of(model, targets)
    if not names:
        raise BadValue(f"no nn.Linear or nn.Conv2d of the model matches the LoRA targets {list(targets)}")
    return attach(model, {name: (r, alpha) for name in names}, scale)


def attach(model: nn.Module, layers: Mapping[str, tuple[int, float | None]], scale: float = 1.0) -> dict[str, LoRA]:
    """Wrap the named layers, each with its own (r, alpha): a file's layers, as weights_convert/lora.py
    reads them (then `load_lora_weights` fills them)."""
    modules = dict(model.named_modules())
    for name, (r, alpha) in layers.items():  # every check before the first change
        base = modules.get(name)
        if not isinstance(base, (nn.Linear, nn.Conv2d)) or isinstance(base, nn.Conv2d) and base.groups != 1:
            raise BadValue(f"the model has no nn.Linear or ungrouped nn.Conv2d {name} for a LoRA")
        if type(r) is not int or r < 1:
            raise BadValue(f"LoRA rank r must be a positive int, not {r!r} ({name})")
        finite(scale, "scale"), finite(r if alpha is None else alpha, "alpha")
    added = {name: LoRA(model.get_submodule(name), r, alpha, scale) for name, (r, alpha) in layers.items()}
    for name, layer in added.items():
        _replace(model, name, layer)
    return added


def lora_layers(model: nn.Module) -> dict[str, LoRA]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRA)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """lora_A and lora_B of every LoRA layer: what an optimizer trains."""
    return [p for layer in lora_layers(model).values() for p in (layer.lora_A.weight, layer.lora_B.weight)]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """{`<layer>.lora_A.weight`, `<layer>.lora_B.weight`: tensor} in our names (weights_convert/lora.py
    renames them for a file)."""
    return {f"{name}.{part}.weight": getattr(layer, part).weight
            for name, layer in lora_layers(model).items() for part in ("lora_A", "lora_B")}


@torch.no_grad()
def load_lora_weights(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Copy `lora_state_dict`-named tensors into the model's LoRA layers; every layer must be filled."""
    own = lora_state_dict(model)
    missing, unknown = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or unknown:
        raise BadValue(f"LoRA weights do not fit the model's LoRA layers: {(missing or unknown)[0]} "
                       f"is {'missing' if missing else 'not a LoRA weight of the model'}")
    for name, tensor in tensors.items():
        if tensor.shape != own[name].shape:
            raise BadValue(f"LoRA weight {name} is {tuple(tensor.shape)}, the layer's is {tuple(own[name].shape)}")
        own[name].copy_(tensor)


def set_scale(model: nn.Module, scale: float) -> None:
    for layer in lora_layers(model).values():
        layer.set_scale(scale)


def merge_lora(model: nn.Module) -> None:
    """Fold every LoRA into its base weight (same outputs, base speed); `unmerge_lora` takes them out."""
    for layer in lora_layers(model).values():
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    for layer in lora_layers(model).values():
        layer.unmerge()


def remove_lora(model: nn.Module) -> nn.Module:
    """Put every plain layer back in its LoRA's place, as it is now: a merged LoRA stays in the weight
    (peft's merge_and_unload), an unmerged one is dropped (the original weights). Returns `model`."""
    for name, layer in lora_layers(model).items():
        for p, trained in zip(layer.base.parameters(), layer.trained):
            p.requires_grad_(trained)
        _replace(model, name, layer.base)
    return model
