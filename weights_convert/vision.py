"""The vision side's layouts → altdiff_min's modules: transformers' CLIPVisionModel (the tower alone),
AltCLIPModel (BAAI/AltCLIP-m9) and diffusers' StableDiffusionSafetyChecker (the m9 repo's
safety_checker/). Ordered rename rules, strict both ways, as for the three diffusion modules; the
converter does not read these layouts yet (the tests load with them)."""
from __future__ import annotations

from dataclasses import replace

from altdiff_min.altclip import AltCLIPConfig
from altdiff_min.vision import VisionConfig

from . import text_encoder
from .rules import Drop, Rule, rename

# ---- CLIP's vision tower → altdiff_min.vision.VisionTransformer -------------------------------------------
RULES: list[Rule] = [
    # transformers 4.x and the hub's files say vision_model.embeddings…; 5.x's CLIPVisionModel strips
    # the prefix when it loads them (its state dict starts at embeddings…): accept both.
    (r"^vision_model\.", ""),
    (r"^embeddings\.position_embedding\.weight$", "position_embedding"),  # an nn.Embedding there, a table here
    (r"^embeddings\.", ""),  # patch_embedding.weight, class_embedding
    (r"^pre_layrnorm\.", "pre_norm."),
    (r"^post_layernorm\.", "post_norm."),
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


def config_from_hf(hf: dict) -> VisionConfig:
    if hf.get("hidden_act", "quick_gelu") != "quick_gelu":
        raise ValueError(f"vision tower uses hidden_act={hf['hidden_act']!r}; only CLIP's 'quick_gelu' is implemented")
    return VisionConfig(hidden=hf["hidden_size"], layers=hf["num_hidden_layers"], heads=hf["num_attention_heads"],
                        mlp=hf["intermediate_size"], patch=hf["patch_size"], image_size=hf["image_size"],
                        image_channels=hf.get("num_channels", 3), eps=hf.get("layer_norm_eps", 1e-5),
                        project_dim=hf.get("projection_dim", 512))


# ---- AltCLIP ------------------------------------------------------------------------------------------------
# transformers' AltCLIPModel layout → altdiff_min.altclip.AltCLIP. Each tower's names go through that
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


def altclip_config_from_hf(hf: dict) -> AltCLIPConfig:
    """Our config from transformers' AltCLIPConfig.to_dict() (the hub's config.json)."""
    # AltCLIPModel never reads vision_config.projection_dim (its default is 512): the joint width is the
    # top-level projection_dim, which the vision config then records too.
    vision = replace(config_from_hf(hf["vision_config"]), project_dim=hf["projection_dim"])
    return AltCLIPConfig(text=text_encoder.config_from_hf(hf["text_config"]), vision=vision,
                         projection_dim=hf["projection_dim"])


# ---- the safety checker -----------------------------------------------------------------------------------
# diffusers' StableDiffusionSafetyChecker → altdiff_min.safety.SafetyChecker. The hub's files say
# vision_model.vision_model.…; transformers 5 loads them as vision_model.… : the vision RULES take
# both once the outer vision_model. is ours (vision.). The other five names are the same here.
SAFETY_RULES: list[Rule] = [
    (r"^vision_model\.(.*)$", lambda m: "vision." + rename(m.group(1), RULES)),
]
SAFETY_DROPS: list[Drop] = DROPS
