"""UNet: diffusers' `UNet2DConditionModel` layout → altdiff_min.UNet.

Our blocks sit where diffusers' do, with the same indices (`down_blocks.1.attentions.0.` ↔
`down.1.attn.0.`), so the rules are: where a block sits, then the few names that differ inside
blocks. Inside a spatial transformer, the ldm layout (weights_convert/ldm.py) uses diffusers' names,
so it reuses TRANSFORMER_INSIDE.
"""
from __future__ import annotations

from typing import Mapping

import torch

from altdiff_min.model.unet import UNet, UNetConfig

from .rules import Drop, Report, Rule, invert, load_model

PLACES: list[Rule] = [  # conv_in and conv_out keep their names
    (r"^time_embedding\.linear_1\.", "time_mlp.0."),
    (r"^time_embedding\.linear_2\.", "time_mlp.2."),
    (r"^(down|up)_blocks\.(\d+)\.resnets\.", r"\1.\2.res."),
    (r"^(down|up)_blocks\.(\d+)\.attentions\.", r"\1.\2.attn."),
    (r"^down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample."),
    (r"^up_blocks\.(\d+)\.upsamplers\.0\.", r"up.\1.upsample."),
    (r"^mid_block\.resnets\.0\.", "mid_res1."),
    (r"^mid_block\.attentions\.0\.", "mid_attn."),
    (r"^mid_block\.resnets\.1\.", "mid_res2."),
    (r"^conv_norm_out\.", "norm_out."),
]

RES_INSIDE: list[Rule] = [(r"\.time_emb_proj\.", ".time_proj."), (r"\.conv_shortcut\.", ".shortcut.")]

# diffusers' Attention → ours; its to_out is [Linear, Dropout]. The VAE converter uses these too.
ATTENTION_INSIDE: list[Rule] = [(r"\.to_([qkv])\.", r".\1."), (r"\.to_out\.0\.", ".out.")]

TRANSFORMER_INSIDE: list[Rule] = [  # norm, proj_in, proj_out and the block's norm1..3 keep their names
    (r"\.transformer_blocks\.0\.", ".block."),  # one transformer block per attention
    (r"\.block\.attn1\.", ".block.self_attn."),
    (r"\.block\.attn2\.", ".block.cross_attn."),
    # before the feed-forward's rules: read backwards (export, rules.invert), `.out.` becomes the
    # attention's to_out.0 only once the feed-forward's own `.ff.out.` has become ff.net.2
    *ATTENTION_INSIDE,
    (r"\.ff\.net\.0\.proj\.", ".ff.proj."),
    (r"\.ff\.net\.2\.", ".ff.out."),
]

RULES: list[Rule] = PLACES + RES_INSIDE + TRANSFORMER_INSIDE

# The same mapping backwards, ours → diffusers' names, for files whose keys name diffusers' modules
# (LoRA files, weights_convert/lora.py) and for export: RULES read backwards (rules.invert).
# tests/test_lora.py checks that every tensor name of a diffusers UNet comes back from
# rename(rename(name, RULES), TO_DIFFUSERS).
TO_DIFFUSERS: list[Rule] = invert(RULES)

DROPS: list[Drop] = []  # diffusers' UNet state dict holds nothing we do not use

# diffusers options implemented only at Stable Diffusion v1's value (also diffusers' default). SD2's
# `use_linear_projection`, SDXL's `addition_embed_type`, class conditioning etc. are rejected.
SD1_ONLY = {
    "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu",
    "mid_block_type": "UNetMidBlock2DCrossAttn", "only_cross_attention": False, "downsample_padding": 1,
    "mid_block_scale_factor": 1, "reverse_transformer_layers_per_block": None, "encoder_hid_dim": None,
    "encoder_hid_dim_type": None, "dual_cross_attention": False, "use_linear_projection": False,
    "class_embed_type": None, "addition_embed_type": None, "num_class_embeds": None, "upcast_attention": False,
    "resnet_time_scale_shift": "default", "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional", "time_embedding_dim": None, "time_embedding_act_fn": None,
    "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None, "attention_type": "default", "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None, "cross_attention_norm": None,
}

# diffusers' defaults for the options we read, for configs that leave them out.
DIFFUSERS_DEFAULTS = {
    "in_channels": 4, "out_channels": 4, "block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "norm_num_groups": 32, "norm_eps": 1e-5, "cross_attention_dim": 1280, "attention_head_dim": 8,
    "num_attention_heads": None, "transformer_layers_per_block": 1, "dropout": 0.0,
}


def reject_other_values(hf: Mapping, only: Mapping, what: str) -> None:
    """ValueError naming the first option set to a value other than the one we implement."""
    for key, value in only.items():
        if hf.get(key, value) != value:
            raise ValueError(f"{what} config has {key}={hf[key]!r}; altdiff-min implements only {value!r} (SD v1's)")


def same_at_every_level(hf: Mapping, key: str):
    """diffusers allows a list (one per level) for some options; we implement one value for all levels.
    A list must name each level once, as diffusers requires."""
    value, levels = hf[key], len(hf["block_out_channels"])
    if isinstance(value, (list, tuple)):
        if len(value) != levels:
            raise ValueError(f"unet config has {key}={list(value)}: {len(value)} values for {levels} levels")
        if any(isinstance(v, (list, tuple, dict)) for v in value):
            raise ValueError(f"unet config has {key}={list(value)}: a different value per block is not implemented")
        if len(set(value)) != 1:
            raise ValueError(f"unet config has {key}={value}: a different value per level is not implemented")
        value = value[0]
    return value


def config_from_hf(hf: Mapping) -> UNetConfig:
    """Our config from a diffusers `unet/config.json`; raises ValueError for what we do not implement.

    Parity quirk: m9's config says sample_size 32 (a known mistake: it makes 64×64 latents). Our UNet
    takes any latent size, so sample_size is ignored.
    """
    hf = {**DIFFUSERS_DEFAULTS, **hf}
    reject_other_values(hf, SD1_ONLY, "unet")
    if same_at_every_level(hf, "transformer_layers_per_block") != 1:
        raise ValueError("unet config has transformer_layers_per_block != 1; "
                         "altdiff-min has one transformer block per attention")
    down, up = list(hf["down_block_types"]), list(hf["up_block_types"])
    if not set(down) <= {"CrossAttnDownBlock2D", "DownBlock2D"} or len(down) != len(hf["block_out_channels"]):
        raise ValueError(f"unet config has down_block_types={down}; altdiff-min implements one "
                         "CrossAttnDownBlock2D or DownBlock2D per block_out_channels entry")
    attention = tuple(t == "CrossAttnDownBlock2D" for t in down)
    mirrored = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)]
    if up != mirrored:
        raise ValueError(f"unet config has up_block_types={up}; "
                         f"altdiff-min implements the mirror of the down path, {mirrored}")
    if isinstance(hf["cross_attention_dim"], (list, tuple)):
        raise ValueError("unet config has a cross_attention_dim per level; altdiff-min implements one context width")
    return UNetConfig(
        in_channels=hf["in_channels"],
        out_channels=hf["out_channels"],
        channels=tuple(hf["block_out_channels"]),
        layers=same_at_every_level(hf, "layers_per_block"),
        attention=attention,
        # Parity: diffusers' `attention_head_dim` is the number of HEADS when num_attention_heads is
        # unset (a naming mistake kept for compatibility): SD v1's 8 means 8 heads of width 40/80/160.
        heads=same_at_every_level(hf, "num_attention_heads" if hf["num_attention_heads"] else "attention_head_dim"),
        context_dim=hf["cross_attention_dim"],
        groups=hf["norm_num_groups"],
        eps=hf["norm_eps"],
        dropout=hf["dropout"],
    )


def config_to_hf(cfg: UNetConfig, sample_size: int) -> dict:
    """config_from_hf backwards: diffusers' unet/config.json for our config (sample_size: the latent
    side, image size / 8; not m9's mistaken 32). The options left out take diffusers' defaults, SD v1's."""
    attention = ["CrossAttn" if a else "" for a in cfg.attention]
    return {"_class_name": "UNet2DConditionModel", "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
            "block_out_channels": list(cfg.channels), "layers_per_block": cfg.layers,
            "down_block_types": [f"{a}DownBlock2D" for a in attention],
            "up_block_types": [f"{a}UpBlock2D" for a in reversed(attention)],
            "attention_head_dim": cfg.heads,  # the number of heads: diffusers' naming mistake, see config_from_hf
            "cross_attention_dim": cfg.context_dim, "norm_num_groups": cfg.groups, "norm_eps": cfg.eps,
            "dropout": cfg.dropout, "sample_size": sample_size}


def load(state_dict: Mapping[str, torch.Tensor], cfg: UNetConfig) -> tuple[UNet, Report]:
    """A UNet holding the reference weights (loaded strictly), and the conversion report."""
    return load_model(lambda: UNet(cfg), state_dict, RULES, DROPS, "unet state dict")
