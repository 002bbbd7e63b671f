"""LoRA training (`altdiff-min train … --lora R`): what trains, what a checkpoint holds, what a run leaves.
(`weights`/`load_weights` say what a checkpoint holds for every mode: whole modules, a LoRA, new words.)

With cfg.lora = r the chosen layers of each module in cfg.lora_modules (the UNet's cfg.lora_targets, the
text encoder's cfg.text_targets) are wrapped in research.lora's LoRA, W x + (alpha / r) · B A x, and only
A and B train: the base weights are frozen, so the optimizer, its state, the gradients DDP all-reduces (it
registers only parameters that require grad), the EMA and the checkpoints hold only the LoRA (Hu et al.
2021, §4.2: 199,296 · r numbers for m9's UNet with the default targets, against its 859,520,964; a LoRA
on the text encoder too is diffusers' --train_text_encoder). The run's result is the LoRA file in
diffusers' format (weights_convert/lora.py: `unet.` and `text_encoder.` keys), not a model folder.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from ..research.lora import (
    add_lora,
    load_lora_weights,
    lora_parameters,
    lora_state_dict,
    targets_of,
)
from .config import TrainConfig

ROWS = "token_embedding.rows"  # the text encoder's added rows (research/textual_inversion.py AddedRows)


def targets(cfg: TrainConfig, name: str) -> tuple[str, ...]:
    """The layer patterns of module `name`'s LoRA."""
    return cfg.text_targets if name == "text_encoder" else cfg.lora_targets


def attach(model, cfg: TrainConfig, generator: Callable[..., torch.Generator]) -> list[nn.Parameter]:
    """Wrap the target layers of each module of cfg.lora_modules in new LoRAs (B zero, so training starts
    at the base model; A Kaiming-uniform, peft's init, drawn from generator(m, k) for the k-th layer of
    the m-th module of (unet, text_encoder): every process and every run with the seed starts from the
    same A), put those modules in training mode with only the LoRA trainable (and, with --train
    embeddings, the new rows: training/train.py), and return the LoRA's parameters in the model's order."""
    params = []
    for name in cfg.lora_modules:
        module = getattr(model, name)
        layers = add_lora(module, cfg.lora, cfg.lora_alpha or None, targets(cfg, name))
        module.train()
        with torch.no_grad():
            for k, layer in enumerate(layers.values()):
                a = torch.empty(layer.lora_A.weight.shape)  # drawn on the CPU: a GPU tensor takes no CPU generator
                nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator(MODULES.index(name), k))
                layer.lora_A.weight.copy_(a)
        if not (name == "text_encoder" and cfg.train == "embeddings"):  # (there train_only_new_rows froze the rest)
            module.requires_grad_(False)
        module_params = lora_parameters(module)
        for p in module_params:
            p.requires_grad_(True)
        params += module_params
    return params


MODULES = ("unet", "text_encoder")  # the order of generator's first key (the UNet's is the one older runs drew)


def weights(model, cfg: TrainConfig) -> dict[str, dict[str, torch.Tensor]]:
    """A checkpoint's "modules": what trains of each trained module. A module training whole, its state
    dict; with LoRA, the module's LoRA tensors alone; with --train embeddings, the text encoder's new rows
    (and its LoRA's tensors, when it has one: the rest is the base model's, so a checkpoint of m9's words
    is kilobytes, not its 2 GB encoder)."""
    def held(name: str) -> dict[str, torch.Tensor]:
        module = getattr(model, name)
        out = {k: v.detach() for k, v in lora_state_dict(module).items()} if name in cfg.lora_modules else {}
        if cfg.train == "embeddings" and name == "text_encoder":
            out[ROWS] = module.token_embedding.rows.detach()
        return out if out else module.state_dict()
    return {name: held(name) for name in cfg.modules}


def load_weights(model, cfg: TrainConfig, modules: dict[str, dict[str, torch.Tensor]]) -> None:
    """Put `weights` back (a resumed run: a LoRA's or new words' checkpoint holds no base weight)."""
    for name in cfg.modules:
        module, held = getattr(model, name), dict(modules[name])
        rows = held.pop(ROWS, None) if cfg.train == "embeddings" and name == "text_encoder" else None
        if rows is not None:
            with torch.no_grad():
                module.token_embedding.rows.copy_(rows)
        if name in cfg.lora_modules:
            load_lora_weights(module, held)
        elif rows is None:
            module.load_state_dict(held)


def record(cfg: TrainConfig) -> dict:
    """What a sample picture and the LoRA file record of the run's LoRA."""
    return {"r": cfg.lora, "alpha": cfg.lora_alpha or float(cfg.lora), "targets": list(cfg.lora_targets),
            **({"text_targets": list(cfg.text_targets)} if "text_encoder" in cfg.lora_modules else {})}


def check_targets(config: dict, cfg: TrainConfig) -> None:
    """Before the weights load: the patterns choose at least one layer of each module that takes a LoRA
    (built on the meta device from the model folder's config: shapes, no memory)."""
    from ..errors import BadValue
    from ..model.text_encoder import TextEncoder
    from ..model.unet import UNet

    build = {"unet": lambda: UNet(config["unet"]), "text_encoder": lambda: TextEncoder(config["text_encoder"])}
    for name in cfg.lora_modules:
        with torch.device("meta"):
            module = build[name]()
        if not targets_of(module, targets(cfg, name)):
            flag, example = (("--lora-text-targets", "layers.0.attn.q") if name == "text_encoder" else
                             ("--lora-targets", "down.0.attn.0.block.self_attn.q"))
            raise BadValue(f"{flag} {' '.join(targets(cfg, name))} choose no nn.Linear or nn.Conv2d of the "
                           f"{'text encoder' if name == 'text_encoder' else 'UNet'} (a pattern matches the tail of a name such as {example})")
