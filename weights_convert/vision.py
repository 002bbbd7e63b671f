"""The vision side's layouts → altdiff_min's modules: transformers' CLIPVisionModel (the tower alone),
AltCLIPModel (BAAI/AltCLIP-m9) and diffusers' StableDiffusionSafetyChecker (the m9 repo's
safety_checker/), with their configs and CLIPImageProcessor's. Ordered rename rules, strict both
ways, as for the three diffusion modules."""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Mapping

import torch

from altdiff_min.vision.altclip import AltCLIP, AltCLIPConfig
from altdiff_min.vision.safety import SafetyChecker
from altdiff_min.vision.tower import CLIP_MEAN, CLIP_STD, VisionConfig

from . import text_encoder
from .rules import Alias, Drop, Report, Rule, load_model, nested, rename

# transformers' CLIPVisionConfig defaults (ViT-B/32's, not ViT-L/14's): what a config that leaves a
# key out means.
CLIP_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5)

# ---- CLIP's vision tower → altdiff_min.vision.tower.VisionTransformer -------------------------------------------
RULES: list[Rule] = [
    # transformers 4.x and the hub's files say vision_model.embeddings…; 5.x's CLIPVisionModel strips
    # the prefix when it loads them (its state dict starts at embeddings…): accept both, write 5.x's.
    Alias((r"^vision_model\.", "")),
    (r"^embeddings\.position_embedding\.weight$", "position_embedding"),  # an nn.Embedding there, a table here
    (r"^embeddings\.(class_embedding|patch_embedding\.)", r"\1"),
    (r"^pre_layrnorm\.", "pre_norm."),
    (r"^post_layernorm\.", "post_norm."),
    Alias((r"^encoder\.layer\.", "layers.")),  # 5.x's save_pretrained writes the vision layers as encoder.layer.N
    (r"^encoder\.layers\.", "layers."),
    # inside a layer
    (r"\.self_attn\.(q|k|v|out)_proj\.", r".attn.\1."),
    (r"\.layer_norm1\.", ".attn_norm."),
    (r"\.layer_norm2\.", ".mlp_norm."),
    (r"\.mlp\.(fc1|fc2)\.", r".\1."),
]

DROPS: list[Drop] = [
    (r"(^|\.)embeddings\.position_ids$", "index buffer 0 … patches: every position is used, in order"),
]


def tower_config(hf: Mapping, key: str, defaults: Mapping) -> dict:
    """One tower's config from a two-tower config (CLIPConfig, AltCLIPConfig) as transformers reads it:
    `vision_config` over the defaults; older files also carry `vision_config_dict`, which then wins
    outright: its keys, and the defaults for every key it leaves out (transformers builds a full
    config from it and lets that replace `vision_config`)."""
    if (older := hf.get(f"{key}_dict")) is not None:
        return {**(hf.get(key) or {}), **defaults, **older}
    return {**defaults, **(hf.get(key) or {})}


def config_from_hf(hf: dict) -> VisionConfig:
    if hf.get("hidden_act", "quick_gelu") != "quick_gelu":
        raise ValueError(f"vision tower uses hidden_act={hf['hidden_act']!r}; only CLIP's 'quick_gelu' is implemented")
    return VisionConfig(hidden=hf["hidden_size"], layers=hf["num_hidden_layers"], heads=hf["num_attention_heads"],
                        mlp=hf["intermediate_size"], patch=hf["patch_size"], image_size=hf["image_size"],
                        image_channels=hf.get("num_channels", 3), eps=hf.get("layer_norm_eps", 1e-5),
                        project_dim=hf.get("projection_dim", 512))


# ---- AltCLIP ------------------------------------------------------------------------------------------------
# transformers' AltCLIPModel layout → altdiff_min.vision.altclip.AltCLIP. Each tower's names go through that
# tower's own rules.
ALTCLIP_TEXT_RULES: list[Rule] = [
    # transformers 5 names XLM-R's layers encoder.layers.N (and renames the hub's encoder.layer.N when it
    # loads them); 4.x, FlagAI and the hub's file say encoder.layer.N, which text_encoder.RULES handles.
    (r"^roberta\.encoder\.layers\.", "layers."),
    *text_encoder.RULES,
]
ALTCLIP_RULES: list[Rule] = [
    (r"^text_model\.pre_LN\.", "text_norm."),  # before the text tower's rules, which would make it text.pre_ln
    (r"^text_model\.(.+)$", lambda m: "text." + rename(m[1], ALTCLIP_TEXT_RULES)),
    (r"^vision_model\.(.+)$", lambda m: "vision." + rename(m[1], RULES)),
    # text_projection.weight, visual_projection.weight and logit_scale keep their names
]
ALTCLIP_DROPS: list[Drop] = [
    # FlagAI built its text tower with XLMRobertaModel's default pooling head, so its files carry one;
    # transformers' AltCLIPTextModel has none (add_pooling_layer=False) and skips it on loading.
    (r"^text_model\.roberta\.pooler\.", "pooler: XLM-R's tanh head on token 0, which AltCLIP does not use"),
    (r"^text_model\.roberta\.embeddings\.(position_ids|token_type_ids)$", text_encoder.DROPS[1][1]),
    (r"^vision_model\.embeddings\.position_ids$", DROPS[0][1]),
]


# transformers' AltCLIPTextConfig defaults (AltCLIP-m9's XLM-R large) and AltCLIPConfig's joint width.
ALTCLIP_TEXT_DEFAULTS = dict(vocab_size=250002, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                             intermediate_size=4096, hidden_act="gelu", max_position_embeddings=514, type_vocab_size=1,
                             layer_norm_eps=1e-5, pad_token_id=1, project_dim=768)
ALTCLIP_PROJECTION_DIM = 768


def altclip_config_from_hf(hf: dict) -> AltCLIPConfig:
    """Our config from transformers' AltCLIPConfig.to_dict() (the hub's config.json)."""
    projection_dim = hf.get("projection_dim", ALTCLIP_PROJECTION_DIM)
    text = tower_config(hf, "text_config", ALTCLIP_TEXT_DEFAULTS)
    if text.get("position_embedding_type") is None:  # AltCLIPTextConfig's None means absolute
        text.pop("position_embedding_type", None)
    # AltCLIPModel never reads vision_config.projection_dim (its default is 512): the joint width is the
    # top-level projection_dim, which the vision config then records too.
    vision = replace(config_from_hf(tower_config(hf, "vision_config", CLIP_VISION_DEFAULTS)), project_dim=projection_dim)
    return AltCLIPConfig(text=text_encoder.config_from_hf(text), vision=vision, projection_dim=projection_dim)


def load_altclip(state_dict: Mapping[str, torch.Tensor], cfg: AltCLIPConfig) -> tuple[AltCLIP, Report]:
    return load_model(lambda: AltCLIP(cfg), state_dict, ALTCLIP_RULES, ALTCLIP_DROPS, "AltCLIP state dict")


# ---- the safety checker -----------------------------------------------------------------------------------
# diffusers' StableDiffusionSafetyChecker → altdiff_min.vision.safety.SafetyChecker. The hub's files say
# vision_model.vision_model.…; transformers 5 loads them as vision_model.… : the vision RULES take
# both once the outer vision_model. is ours (vision.). The other five names are the same here.
SAFETY_RULES: list[Rule] = [nested("vision_model.", "vision.", RULES)]
SAFETY_DROPS: list[Drop] = DROPS


def safety_config_from_hf(hf: dict) -> VisionConfig:
    """Our config from the checker's config.json (a CLIPConfig: its vision tower, and projection_dim,
    512 when left out as in transformers)."""
    return replace(config_from_hf(tower_config(hf, "vision_config", CLIP_VISION_DEFAULTS)),
                   project_dim=hf.get("projection_dim", 512))


def safety_config_to_hf(cfg: VisionConfig) -> dict:
    """safety_config_from_hf backwards: safety_checker/config.json (a CLIPConfig; its text tower, which
    the checker does not have, left at transformers' defaults)."""
    vision = {"hidden_size": cfg.hidden, "num_hidden_layers": cfg.layers, "num_attention_heads": cfg.heads,
              "intermediate_size": cfg.mlp, "patch_size": cfg.patch, "image_size": cfg.image_size,
              "num_channels": cfg.image_channels, "layer_norm_eps": cfg.eps, "hidden_act": "quick_gelu",
              "projection_dim": cfg.project_dim}
    return {"architectures": ["StableDiffusionSafetyChecker"], "model_type": "clip", "projection_dim": cfg.project_dim,
            "vision_config": vision}


def preprocessor_to_hf(cfg: VisionConfig) -> dict:
    """feature_extractor/preprocessor_config.json asking for what vision.preprocess does (check_preprocessor
    accepts exactly this): CLIP's resize, centre crop and normalisation at the tower's image size."""
    s = cfg.image_size
    return {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": s},
            "resample": 3, "do_center_crop": True, "crop_size": {"height": s, "width": s}, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
            "do_convert_rgb": True}


def load_safety_checker(state_dict: Mapping[str, torch.Tensor], cfg: VisionConfig) -> tuple[SafetyChecker, Report]:
    return load_model(lambda: SafetyChecker(cfg), state_dict, SAFETY_RULES, SAFETY_DROPS, "safety checker state dict")


# ---- CLIPImageProcessor's config ---------------------------------------------------------------------------
def check_preprocessor(hf: dict, cfg: VisionConfig) -> None:
    """Refuse a preprocessor_config.json that asks for other preprocessing than altdiff_min.vision.tower.
    preprocess does (CLIPImageProcessor's defaults at the tower's image size): the old
    CLIPFeatureExtractor form (size: 224) and the current one (size: {"shortest_edge": 224}) both."""
    s = cfg.image_size
    size, crop = hf.get("size", s), hf.get("crop_size", s)
    want = {"size": s, "crop_size": (s, s), "resample": 3}  # 3: PIL's BICUBIC
    got = {"size": size.get("shortest_edge", size) if isinstance(size, dict) else size,
           "crop_size": (crop.get("height"), crop.get("width")) if isinstance(crop, dict) else (crop, crop),
           "resample": hf.get("resample", 3)}
    for flag in ("do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_convert_rgb"):
        want[flag], got[flag] = True, True if hf.get(flag) is None else hf[flag]  # null: the default
    if got != want:
        key = next(k for k in want if got[k] != want[k])
        raise ValueError(f"{key} is {got[key]!r}; altdiff-min's preprocess does CLIP's ({key} {want[key]!r})")
    if isinstance(size, dict) and set(size) - {"shortest_edge"}:
        raise ValueError(f"size is {size!r}; altdiff-min's preprocess resizes the shortest edge only (no "
                         f"longest_edge, height or width)")
    if hf.get("do_pad"):
        raise ValueError(f"do_pad is {hf['do_pad']!r}; altdiff-min's preprocess does not pad")
    for key, values in (("image_mean", CLIP_MEAN), ("image_std", CLIP_STD)):
        given = hf.get(key, list(values))
        if not isinstance(given, list) or len(given) != 3 or not all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(given, values)):
            raise ValueError(f"{key} is {given!r}; altdiff-min's preprocess normalises with CLIP's {list(values)}")
    factor = hf.get("rescale_factor", 1 / 255)
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isclose(factor, 1 / 255, rel_tol=1e-9):
        raise ValueError(f"rescale_factor is {hf['rescale_factor']!r}; altdiff-min's preprocess scales by 1/255")
