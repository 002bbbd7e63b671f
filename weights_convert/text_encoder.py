"""Text encoder: transformers' `RobertaSeriesModelWithTransformation` layout → altdiff_min.TextEncoder."""
from __future__ import annotations

from typing import Mapping

import torch

from altdiff_min.model.text_encoder import TextEncoder, TextEncoderConfig

from .rules import Drop, Report, Rule, invert, load_model

RULES: list[Rule] = [
    (r"^roberta\.embeddings\.word_embeddings\.", "token_embedding."),
    (r"^roberta\.embeddings\.position_embeddings\.", "position_embedding."),
    (r"^roberta\.embeddings\.token_type_embeddings\.", "type_embedding."),
    (r"^roberta\.embeddings\.LayerNorm\.", "embed_norm."),
    (r"^roberta\.encoder\.layer\.", "layers."),
    # inside a layer; attention.output.* must be renamed before the MLP's output.*
    (r"\.attention\.self\.query\.", ".attn.q."),
    (r"\.attention\.self\.key\.", ".attn.k."),
    (r"\.attention\.self\.value\.", ".attn.v."),
    (r"\.attention\.output\.dense\.", ".attn.out."),
    (r"\.attention\.output\.LayerNorm\.", ".attn_norm."),
    (r"\.intermediate\.dense\.", ".fc1."),
    (r"\.output\.dense\.", ".fc2."),
    (r"\.output\.LayerNorm\.", ".mlp_norm."),
    (r"^pre_LN\.", "pre_ln."),  # transformation.* and transformation_pre.* keep their names
]

# The same mapping backwards, ours → transformers' names (RobertaSeriesModelWithTransformation, as
# diffusers' AltDiffusionPipeline holds it), for LoRA files (weights_convert/lora.py). tests/test_lora_text.py
# checks that every module name of the reference comes back through rename(rename(name, RULES), TO_TRANSFORMERS).
TO_TRANSFORMERS: list[Rule] = invert(RULES)

DROPS: list[Drop] = [
    (r"^roberta\.pooler\.", "pooler: the CLS pooling head, not used for conditioning"),
    (r"^roberta\.embeddings\.(position_ids|token_type_ids)$", "index buffer: recomputed from the input ids"),
    (r"^logit_scale$", "logit_scale: AltCLIP's contrastive temperature"),
]


# What an option a config.json leaves out means: RobertaSeriesConfig's default (XLMRobertaConfig's), as
# transformers builds the reference from that file; layer_norm_eps is 1e-12 there, not m9's 1e-5. The
# sizes (hidden_size, project_dim, …) must be stated: a missing one is a one-line error naming the file.
REFERENCE_DEFAULTS = dict(hidden_act="gelu", type_vocab_size=2, layer_norm_eps=1e-12, pad_token_id=1,
                          has_pre_transformation=False, position_embedding_type="absolute", use_attention_mask=True,
                          is_decoder=False, add_cross_attention=False)


def config_from_hf(config: Mapping) -> TextEncoderConfig:
    """Our config from a transformers `text_encoder/config.json` (RobertaSeriesConfig); an option it
    leaves out takes that class's default (REFERENCE_DEFAULTS)."""
    hf = {**REFERENCE_DEFAULTS, **config}
    for flag in ("is_decoder", "add_cross_attention"):  # causal self-attention / cross-attention layers
        if hf[flag]:
            raise ValueError(f"text encoder has {flag}=true; altdiff-min implements XLM-R's bidirectional encoder only")
    if hf["hidden_act"] != "gelu":
        raise ValueError(f"text encoder uses hidden_act={hf['hidden_act']!r}; only 'gelu' (XLM-R's) is implemented")
    if hf["position_embedding_type"] != "absolute":
        raise ValueError(f"position_embedding_type={hf['position_embedding_type']!r} is not XLM-R's 'absolute'")
    if hf["use_attention_mask"] is not True:  # diffusers' AltDiffusionPipeline then encodes unmasked
        raise ValueError(f"use_attention_mask={hf['use_attention_mask']!r}: altdiff-min always masks the padding, "
                         f"as m9 (use_attention_mask true) does")
    return TextEncoderConfig(
        vocab_size=hf["vocab_size"],
        hidden=hf["hidden_size"],
        layers=hf["num_hidden_layers"],
        heads=hf["num_attention_heads"],
        mlp=hf["intermediate_size"],
        max_positions=hf["max_position_embeddings"],
        type_vocab_size=hf["type_vocab_size"],
        eps=hf["layer_norm_eps"],
        pad_id=hf["pad_token_id"],
        project_dim=hf["project_dim"],
        pre_transformation=bool(hf["has_pre_transformation"]),
    )


def config_to_hf(cfg: TextEncoderConfig) -> dict:
    """config_from_hf backwards: text_encoder/config.json (RobertaSeriesConfig) for our config."""
    return {"architectures": ["RobertaSeriesModelWithTransformation"], "model_type": "xlm-roberta",
            "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden, "num_hidden_layers": cfg.layers,
            "num_attention_heads": cfg.heads, "intermediate_size": cfg.mlp, "max_position_embeddings": cfg.max_positions,
            "type_vocab_size": cfg.type_vocab_size, "layer_norm_eps": cfg.eps, "pad_token_id": cfg.pad_id,
            "bos_token_id": 0, "eos_token_id": 2,  # XLM-R's <s> and </s> (the tokenizer's fairseq ids)
            "project_dim": cfg.project_dim, "has_pre_transformation": cfg.pre_transformation,
            **{k: REFERENCE_DEFAULTS[k] for k in ("hidden_act", "position_embedding_type", "use_attention_mask")}}


# m9's text encoder has no second head, and diffusers' RobertaSeriesModelWithTransformation then has no
# pre_LN; a file saved from FlagAI's model (which always builds one) still carries it, as the ldm
# single file does. Dropped only for such a config: for m18 it is a weight the model needs.
PRE_LN_DROP: Drop = (r"^pre_LN\.", "pre_LN: present in some m9 files, used only by m18's second head")


def load(state_dict: Mapping[str, torch.Tensor], cfg: TextEncoderConfig) -> tuple[TextEncoder, Report]:
    """A TextEncoder holding the reference weights (loaded strictly), and the conversion report."""
    drops = DROPS if cfg.pre_transformation else [*DROPS, PRE_LN_DROP]
    return load_model(lambda: TextEncoder(cfg), state_dict, RULES, drops, "text encoder state dict")
