"""AltDiffusion's text encoder: XLM-RoBERTa-large and a linear projection to the UNet's context width.

    ids → token + position + type embeddings → LayerNorm → 24 post-LN transformer layers
        → transformation (Linear 1024 → 768)                     = the UNet's cross-attention context

AltCLIP (Chen et al. 2022) distilled this encoder to replace CLIP's; the projection is its
`transformation` head. AltDiffusion-m18 instead reads the penultimate layer through a LayerNorm and
a second head (`pre_transformation=True`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checks import check_config
from ..errors import BadValue
from .layers import Attention, checkpointed


@dataclass(frozen=True)
class TextEncoderConfig:
    vocab_size: int = 250002  # 250000 sentencepiece pieces + <s>/<pad>/</s>/<unk> shift + <mask>
    hidden: int = 1024
    layers: int = 24
    heads: int = 16
    mlp: int = 4096
    max_positions: int = 514  # positions start after the padding id, so 512 tokens at most
    type_vocab_size: int = 1
    eps: float = 1e-5
    pad_id: int = 1
    project_dim: int = 768
    pre_transformation: bool = False  # m18: hidden_states[-2] → pre_LN → transformation_pre

    def __post_init__(self):
        check_config(self)  # types, ranges and limits: altdiff_min/checks.py

    @property
    def max_length(self) -> int:
        return self.max_positions - self.pad_id - 1


class EncoderLayer(nn.Module):
    """BERT's post-LN layer: normalise *after* each residual sum."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.attn = Attention(cfg.hidden, cfg.heads, qkv_bias=True)  # BERT's q/k/v have biases
        self.attn_norm = nn.LayerNorm(cfg.hidden, eps=cfg.eps)
        self.fc1 = nn.Linear(cfg.hidden, cfg.mlp)
        self.fc2 = nn.Linear(cfg.mlp, cfg.hidden)
        self.mlp_norm = nn.LayerNorm(cfg.hidden, eps=cfg.eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.attn_norm(x + self.attn(x, mask=mask))
        return self.mlp_norm(x + self.fc2(F.gelu(self.fc1(x))))  # exact (erf) GELU, as XLM-R


class TextEncoder(nn.Module):
    def __init__(self, cfg: TextEncoderConfig = TextEncoderConfig()):
        super().__init__()
        self.cfg = cfg
        # Parity: XLM-R's token and position tables are padding_idx tables: the <pad> row (and the
        # position row padding tokens get) takes no gradient in training; no effect on the forward pass.
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden, padding_idx=cfg.pad_id)
        self.position_embedding = nn.Embedding(cfg.max_positions, cfg.hidden, padding_idx=cfg.pad_id)
        self.type_embedding = nn.Embedding(cfg.type_vocab_size, cfg.hidden)
        self.embed_norm = nn.LayerNorm(cfg.hidden, eps=cfg.eps)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.layers))
        self.transformation = nn.Linear(cfg.hidden, cfg.project_dim)
        if cfg.pre_transformation:
            self.pre_ln = nn.LayerNorm(cfg.hidden, eps=cfg.eps)
            self.transformation_pre = nn.Linear(cfg.hidden, cfg.project_dim)
        self.gradient_checkpointing = False  # training: recompute each layer's activations in backward

    def positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        # RoBERTa numbers the real tokens pad_id+1, pad_id+2, … and gives padding the pad_id itself.
        real = (input_ids != self.cfg.pad_id).long()
        return real.cumsum(dim=1) * real + self.cfg.pad_id

    def check_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        if input_ids.ndim != 2 or input_ids.dtype != torch.long:
            raise BadValue(f"input_ids must be a (batch, length) LongTensor, got {input_ids.dtype} {tuple(input_ids.shape)}")
        if input_ids.shape[1] > self.cfg.max_length:
            raise BadValue(f"input_ids has {input_ids.shape[1]} tokens; this encoder takes at most {self.cfg.max_length}")
        if input_ids.numel() and not 0 <= int(input_ids.min()) <= int(input_ids.max()) < self.cfg.vocab_size:
            raise BadValue(f"input_ids must lie in [0, {self.cfg.vocab_size}): is the tokenizer the model's own?")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise BadValue(f"attention_mask {tuple(attention_mask.shape)} does not match input_ids {tuple(input_ids.shape)}")

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      depth: int | None = None) -> torch.Tensor:
        """(B, L) token ids and their mask → (B, L, hidden): XLM-R's hidden state after `depth` layers
        (0 = the embeddings; default all of them), before any projection. AltCLIP reads the last one.

        Without a mask, padding is the ids equal to pad_id (the pipeline passes the tokenizer's mask,
        as diffusers' AltDiffusionPipeline does; the two differ only where a prompt spells "<pad>").
        """
        self.check_inputs(input_ids, attention_mask)
        depth = len(self.layers) if depth is None else depth
        if not 0 <= depth <= len(self.layers):
            raise BadValue(f"layer must be in [0, {len(self.layers)}], got {depth}")
        mask = (input_ids != self.cfg.pad_id) if attention_mask is None else attention_mask.bool()
        x = self.token_embedding(input_ids) + self.position_embedding(self.positions(input_ids))
        x = self.embed_norm(x + self.type_embedding.weight[0])  # every token has type 0
        for block in self.layers[:depth]:  # m18 reads the penultimate layer: the last one is not run
            x = checkpointed(self.gradient_checkpointing, block, x, mask)
        return x

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                layer: int | None = None) -> torch.Tensor:
        """(B, L) token ids and their mask (1 = token, 0 = padding) → (B, L, project_dim).

        Without a mask, padding is the ids equal to pad_id (see hidden_states). Padding
        positions still get outputs: the UNet's cross-attention attends to all of them.
        layer: project the hidden state after this many layers (0 = the embeddings) instead of the
        model's own choice, the last (m9) or the penultimate (m18): an ablation.
        """
        depth = len(self.layers) - self.cfg.pre_transformation if layer is None else layer
        x = self.hidden_states(input_ids, attention_mask, depth)
        if self.cfg.pre_transformation:
            return self.transformation_pre(self.pre_ln(x))
        return self.transformation(x)
