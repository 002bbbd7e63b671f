"""LoRA training (`altdiff-min train … --lora R`): what trains, what a checkpoint holds, what a run leaves.
(`weights`/`load_weights` say what a checkpoint holds for every mode: whole modules, a LoRA, new words.)

With cfg.lora = r the UNet's chosen layers (cfg.lora_targets) are wrapped in research.lora's LoRA,
W x + (alpha / r) · B A x, and only A and B train: the base weights are frozen, so the optimizer,
its state, the gradients DDP all-reduces (it registers only parameters that require grad), the EMA
and the checkpoints hold only the LoRA (Hu et al. 2021, §4.2: 199,296 · r numbers for m9's UNet
with the default targets, against its 859,520,964). The run's result is the LoRA file in diffusers'
format (weights_convert/lora.py), not a model folder.
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


def attach(unet: nn.Module, cfg: TrainConfig, generator: Callable[[int], torch.Generator]) -> list[nn.Parameter]:
    """Wrap the UNet's target layers in new LoRAs (B zero, so training starts at the base model; A
    Kaiming-uniform, peft's init, drawn from generator(k) for the k-th layer: every process and every
    run with the seed starts from the same A), put the UNet in training mode with only the LoRA
    trainable, and return the LoRA's parameters (A, B of each layer, in the model's order)."""
    layers = add_lora(unet, cfg.lora, cfg.lora_alpha or None, cfg.lora_targets)
    unet.train().requires_grad_(False)
    with torch.no_grad():
        for k, layer in enumerate(layers.values()):
            a = torch.empty(layer.lora_A.weight.shape)  # drawn on the CPU: a GPU tensor takes no CPU generator
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator(k))
            layer.lora_A.weight.copy_(a)
    params = lora_parameters(unet)
    for p in params:
        p.requires_grad_(True)
    return params


def weights(model, cfg: TrainConfig) -> dict[str, dict[str, torch.Tensor]]:
    """A checkpoint's "modules": what trains of each trained module. A module training whole, its state
    dict; with LoRA, the UNet's LoRA tensors alone; with --train embeddings, the text encoder's new rows
    alone (the rest is the base model's: a checkpoint of m9's words is kilobytes, not its 2 GB encoder)."""
    def held(name: str) -> dict[str, torch.Tensor]:
        if cfg.lora and name == "unet":
            return {k: v.detach() for k, v in lora_state_dict(model.unet).items()}
        if cfg.train == "embeddings" and name == "text_encoder":
            return {ROWS: model.text_encoder.token_embedding.rows.detach()}
        return getattr(model, name).state_dict()
    return {name: held(name) for name in cfg.modules}


def load_weights(model, cfg: TrainConfig, modules: dict[str, dict[str, torch.Tensor]]) -> None:
    """Put `weights` back (a resumed run: a LoRA's or new words' checkpoint holds no base weight)."""
    for name in cfg.modules:
        if cfg.lora and name == "unet":
            load_lora_weights(model.unet, modules["unet"])
        elif cfg.train == "embeddings" and name == "text_encoder":
            with torch.no_grad():
                model.text_encoder.token_embedding.rows.copy_(modules[name][ROWS])
        else:
            getattr(model, name).load_state_dict(modules[name])


def record(cfg: TrainConfig) -> dict:
    """What a sample picture and the LoRA file record of the run's LoRA."""
    return {"r": cfg.lora, "alpha": cfg.lora_alpha or float(cfg.lora), "targets": list(cfg.lora_targets)}


def check_targets(unet_config, cfg: TrainConfig) -> None:
    """Before the weights load: cfg.lora_targets choose at least one layer of a UNet of this config
    (built on the meta device: shapes, no memory)."""
    from ..errors import BadValue
    from ..model.unet import UNet

    with torch.device("meta"):
        unet = UNet(unet_config)
    if not targets_of(unet, cfg.lora_targets):
        raise BadValue(f"--lora-targets {' '.join(cfg.lora_targets)} choose no nn.Linear or nn.Conv2d of the UNet "
                       f"(a pattern matches the tail of a name such as down.0.attn.0.block.self_attn.q)")
