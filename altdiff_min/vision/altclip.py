"""AltCLIP-m9: the CLIP model whose text tower AltDiffusion-m9 conditions on, and CLIPScore with it.

AltCLIP (Chen et al. 2022) kept CLIP ViT-L/14's image tower and its projection as OpenAI trained them,
and replaced CLIP's text tower by XLM-R, distilled (then contrastively tuned) to land in the same
768-wide space. AltCLIP-m9 is its nine-language version.

    text:  ids → XLM-R (24 post-LN layers) → last hidden state → token 0 (<s>)
               → pre_LN (LayerNorm) → transformation (Linear 1024 → 768, bias)
               → text_projection (Linear 768 → 768, no bias)                  = text embedding
    image: pixels → CLIP's vision transformer → pooled (post-LayerNorm of the class token)
               → visual_projection (Linear 1024 → 768, no bias)                = image embedding
    logits = exp(logit_scale) · cos(image embedding, text embedding)

`AltCLIP.text` is exactly AltDiffusion-m9's text encoder: the UNet's context is `transformation`
applied to *every* token of the last hidden state *without* pre_LN (FlagAI's `projection_state`),
while the CLIP embedding passes token 0 through pre_LN first (FlagAI's `pooler_output`). One
`transformation`, two uses; pre_LN belongs to the CLIP side only, so it lives here (`text_norm`).

LayerNorm and the projections act on each token alone, so only token 0 is normalised and projected.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..checks import check_config
from ..errors import BadType, BadValue
from ..model.text_encoder import TextEncoder, TextEncoderConfig
from ..storage.folder import register_module
from .tower import VisionConfig, VisionTransformer, preprocess


@dataclass(frozen=True)
class AltCLIPConfig:
    # The defaults are AltCLIP-m9's: XLM-R large (1024 wide, 24 layers, 16 heads) with its 1024 → 768
    # `transformation`, CLIP ViT-L/14 at 224², and CLIP ViT-L/14's 768-wide joint space.
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    projection_dim: int = 768  # the joint space; vision.project_dim is not read here

    def __post_init__(self):
        check_config(self)  # types, ranges and limits: altdiff_min/checks.py
        if not isinstance(self.text, TextEncoderConfig) or not isinstance(self.vision, VisionConfig):
            raise BadType(f"AltCLIPConfig takes a TextEncoderConfig and a VisionConfig, "
                          f"got {type(self.text).__name__} and {type(self.vision).__name__}")
        if self.text.pre_transformation:
            raise BadValue("AltCLIPConfig: the text tower reads the last layer through pre_LN and `transformation`; "
                           "pre_transformation (m18's penultimate-layer head) has no place in it")


class AltCLIP(nn.Module):
    def __init__(self, cfg: AltCLIPConfig = AltCLIPConfig()):
        super().__init__()
        self.cfg = cfg
        self.text = TextEncoder(cfg.text)
        self.text_norm = nn.LayerNorm(cfg.text.hidden, eps=cfg.text.eps)  # transformers' text_model.pre_LN
        self.text_projection = nn.Linear(cfg.text.project_dim, cfg.projection_dim, bias=False)
        self.vision = VisionTransformer(cfg.vision)
        self.visual_projection = nn.Linear(cfg.vision.hidden, cfg.projection_dim, bias=False)
        # CLIP's initial temperature T = 0.07, learned as log(1/T); checkpoints replace it.
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) token ids and their mask (1 = token, 0 = padding) → (B, projection_dim), not normalised.

        Padding does not change the result (it is masked and comes after token 0), so prompts padded
        to 77 tokens or to the longest prompt give the same embeddings. Without a mask, padding is
        found from the ids (transformers' AltCLIPModel would attend to it instead: give it the mask).
        """
        hidden = self.text.hidden_states(input_ids, attention_mask)  # the last layer's, (B, L, hidden)
        return self.text_projection(self.text.transformation(self.text_norm(hidden[:, 0])))

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels from `vision.preprocess` (B, 3, image_size, image_size) → (B, projection_dim), not normalised."""
        return self.visual_projection(self.vision(pixels)[1])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """→ (logits per image (B_image, B_text), logits per text (B_text, B_image)): exp(logit_scale)
        times the cosine similarity of every image with every text; one matrix and its transpose."""
        image = self.encode_image(pixels)
        text = self.encode_text(input_ids, attention_mask)
        image = image / image.norm(dim=-1, keepdim=True)
        text = text / text.norm(dim=-1, keepdim=True)
        per_text = text @ image.T * self.logit_scale.exp()
        return per_text.T, per_text


@torch.no_grad()
def clip_score(model: AltCLIP, tokenizer, images, prompts: str | Sequence[str]) -> torch.Tensor:
    """CLIPScore of each (image, prompt) pair → (B,) float32: 100 · max(cos(E_image, E_text), 0).

    Hessel et al. 2021's per-pair CLIPScore, clamped at 0 as they define it, scaled by 100 as
    torchmetrics scales it (Hessel et al. use w = 2.5). torchmetrics clamps only the mean of its
    unclamped 100·cos, so the two means differ when some cosine is negative. Higher is better; 0
    means unrelated or worse. The temperature (logit_scale) plays no part.

    images: PIL images or a float tensor (B, 3, H, W) in [0, 1], preprocessed by `vision.preprocess`
    (resize, centre crop, CLIP's normalisation); prompts: one per image, tokenized by `tokenizer`
    (altdiff_min.model.tokenizer.Tokenizer: <s> … </s>, padded to 77 tokens).
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    pixels = preprocess(images, model.cfg.vision)
    input_ids, attention_mask = tokenizer(list(prompts))
    if len(pixels) != len(input_ids):
        raise BadValue(f"clip_score scores pairs: got {len(pixels)} images and {len(input_ids)} prompts")
    device = model.logit_scale.device
    image = model.encode_image(pixels.to(device)).float()
    text = model.encode_text(input_ids.to(device), attention_mask.to(device)).float()
    cos = (image * text).sum(-1) / (image.norm(dim=-1) * text.norm(dim=-1))
    return 100 * cos.clamp(min=0)


register_module("altclip", AltCLIP, AltCLIPConfig)  # an AltCLIP folder holds it (`altdiff-min convert BAAI/AltCLIP-m9`)
