"""VAE: diffusers' `AutoencoderKL` layout → altdiff_min.VAE.

As for the UNet (weights_convert/unet.py): where a block sits, then the names that differ inside.
Both layouts number the decoder's levels in the order they run, coarsest first.
"""
from __future__ import annotations

from typing import Mapping

import torch

from altdiff_min.model.vae import VAE, VAEConfig

from .rules import Alias, Drop, Report, Rule, load_model
from .unet import ATTENTION_INSIDE, reject_other_values

PLACES: list[Rule] = [  # conv_in, conv_out, quant_conv and post_quant_conv keep their names
    (r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.res."),
    (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
    (r"^decoder\.up_blocks\.(\d+)\.resnets\.", r"decoder.up.\1.res."),
    (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", r"decoder.up.\1.upsample."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.mid.res1."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.", r"\1.mid.attn."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.mid.res2."),
    (r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
]

# diffusers before 0.14 (m9's hub vae/ was written by 0.8) named the mid-block attention's projections
# query/key/value/proj_attn; diffusers still reads such files (renaming them on load), and so do we.
LEGACY_ATTENTION: list[Rule] = [Alias((rf"(\.mid\.attn)\.{old}\.", rf"\1.{new}."))
                                for old, new in [("query", "q"), ("key", "k"), ("value", "v"), ("proj_attn", "out")]]
# (Alias: export writes the current names.)

INSIDE: list[Rule] = [(r"\.conv_shortcut\.", ".shortcut."), (r"\.group_norm\.", ".norm."), *ATTENTION_INSIDE,
                      *LEGACY_ATTENTION]

RULES: list[Rule] = PLACES + INSIDE

DROPS: list[Drop] = []  # diffusers' AutoencoderKL state dict holds nothing we do not use

# diffusers options implemented only at SD v1's value (also diffusers' default).
SD1_ONLY = {
    "act_fn": "silu", "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True,
    "shift_factor": None, "latents_mean": None, "latents_std": None,
}

# diffusers' defaults for the options we read (not m9's: its config.json states them all).
DIFFUSERS_DEFAULTS = {
    "in_channels": 3, "out_channels": 3, "block_out_channels": (64,), "layers_per_block": 1,
    "down_block_types": ("DownEncoderBlock2D",), "up_block_types": ("UpDecoderBlock2D",),
    "latent_channels": 4, "norm_num_groups": 32, "scaling_factor": 0.18215,
}


def config_from_hf(hf: Mapping) -> VAEConfig:
    """Our config from a diffusers `vae/config.json`; raises ValueError for what we do not implement.

    sample_size (the training resolution) and force_upcast (advice to run in fp32) do not change the model.
    """
    hf = {**DIFFUSERS_DEFAULTS, **hf}
    reject_other_values(hf, SD1_ONLY, "vae")
    levels = len(hf["block_out_channels"])
    for key, block in [("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")]:
        if list(hf[key]) != [block] * levels:
            raise ValueError(f"vae config has {key}={list(hf[key])}; altdiff-min implements {levels} × {block}")
    if hf["in_channels"] != hf["out_channels"]:
        raise ValueError(f"vae config has in_channels={hf['in_channels']} but out_channels={hf['out_channels']}; "
                         "altdiff-min's VAE gives back images of the channels it takes")
    return VAEConfig(
        channels=tuple(hf["block_out_channels"]),
        layers=hf["layers_per_block"],
        latent_channels=hf["latent_channels"],
        image_channels=hf["in_channels"],
        groups=hf["norm_num_groups"],
        scaling_factor=hf["scaling_factor"],
    )


def config_to_hf(cfg: VAEConfig, sample_size: int) -> dict:
    """config_from_hf backwards: diffusers' vae/config.json for our config (sample_size: the image size)."""
    levels = len(cfg.channels)
    return {"_class_name": "AutoencoderKL", "in_channels": cfg.image_channels, "out_channels": cfg.image_channels,
            "block_out_channels": list(cfg.channels), "layers_per_block": cfg.layers,
            "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
            "latent_channels": cfg.latent_channels, "norm_num_groups": cfg.groups, "scaling_factor": cfg.scaling_factor,
            "act_fn": "silu", "sample_size": sample_size}


def load(state_dict: Mapping[str, torch.Tensor], cfg: VAEConfig) -> tuple[VAE, Report]:
    """A VAE holding the reference weights (loaded strictly), and the conversion report."""
    return load_model(lambda: VAE(cfg), state_dict, RULES, DROPS, "vae state dict")
