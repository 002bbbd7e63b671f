"""The safety checker AltDiffusion-m9 ships: CLIP ViT-L/14's image tower, a projection into CLIP's
768-wide joint space, and 17 + 3 fixed concept embeddings with a threshold each.

    pictures → vision.preprocess → VisionTransformer → pooled (B, 1024)
        → visual_projection (no bias)                              = image embeds e (B, 768)
    cos_k = ⟨e/‖e‖, c_k/‖c_k‖⟩ for the 3 "special care" concepts and the 17 concepts
    special score_j = round(cos_j − t_j + a, 3)    a = 0, and 0.01 once an earlier special score > 0
    concept score_k = round(cos_k − t_k + a, 3)    a = 0.01 if any special score > 0, else 0
    flagged         = any concept score > 0

The concept embeddings and thresholds are opaque tensors of the released checkpoint (CompVis's Stable
Diffusion v1 checker, Rando et al. 2022 "Red-Teaming the Stable Diffusion Safety Filter" describes
them); a special-care hit makes every concept 0.01 easier to hit.

What is matched: diffusers' `StableDiffusionSafetyChecker.forward` (the loop version the pipelines
call, diffusers/pipelines/stable_diffusion/safety_checker.py), not its vectorised `forward_onnx`,
which does not round and applies the special-care adjustment to no special score. Decisions and
scores are those of `forward`, to the bit given the same cosines:
  - cosines are computed in the model's dtype (F.normalize, then a matrix product) and cast to
    float32 on the CPU, as there;
  - each score is float32 arithmetic in diffusers' order, ((cos − t) + a), as NumPy ≥ 2 computes
    `np.float32 − python float` (NEP 50: the Python float is cast to float32; NumPy 1.x would have
    computed in float64);
  - rounding to 3 decimals is rint(x · 1000) / 1000 in float32, half to even: what `round()` of an
    np.float32 does (np.round) and what torch.round(x, decimals=3) does;
  - the adjustment is sequential over the special concepts, as in diffusers' loop: a hit on special
    concept j adds 0.01 to the special scores after j (not before) and to every concept score.

Where we differ on purpose: diffusers blacks out flagged pictures; `replace_flagged` follows FlagAI,
which replaces them with a placeholder picture that says so.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from ..errors import BadType, BadValue
from ..storage.folder import register_module
from .tower import VisionConfig, VisionTransformer, preprocess

CONCEPTS = 17  # rows of concept_embeds in the released checker
SPECIAL_CONCEPTS = 3  # rows of special_care_embeds
ADJUSTMENT = 0.01  # added to later scores once a special-care concept is hit
DECIMALS = 3  # diffusers rounds every score to 3 decimals before comparing it with 0
PLACEHOLDER_TEXT = "flagged by the safety checker"
PLACEHOLDER_GREY = (128, 128, 128)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n, d), (m, d) → (n, m) cosine similarities, in diffusers' order of operations (normalise both
    sides, F.normalize's eps 1e-12, then one matrix product), then float32 on the CPU."""
    return (F.normalize(a) @ F.normalize(b).t()).cpu().float()


def _score(cos: torch.Tensor, threshold: torch.Tensor, adjustment: torch.Tensor) -> torch.Tensor:
    """round((cos − threshold) + adjustment, 3) in float32: cos (B,) or (B, n), adjustment (B,) or (B, 1)."""
    return torch.round((cos - threshold) + adjustment, decimals=DECIMALS)


class SafetyChecker(nn.Module):
    def __init__(self, cfg: VisionConfig = VisionConfig()):
        super().__init__()
        if not isinstance(cfg, VisionConfig):
            raise BadType(f"cfg must be a VisionConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.vision = VisionTransformer(cfg)
        self.visual_projection = nn.Linear(cfg.hidden, cfg.project_dim, bias=False)
        # The checkpoint's values replace these; ones (as diffusers) flag nothing: a cosine is ≤ 1.
        self.concept_embeds = nn.Parameter(torch.ones(CONCEPTS, cfg.project_dim), requires_grad=False)
        self.special_care_embeds = nn.Parameter(torch.ones(SPECIAL_CONCEPTS, cfg.project_dim), requires_grad=False)
        self.concept_embeds_weights = nn.Parameter(torch.ones(CONCEPTS), requires_grad=False)
        self.special_care_embeds_weights = nn.Parameter(torch.ones(SPECIAL_CONCEPTS), requires_grad=False)

    def image_embeds(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed pixels (B, 3, S, S) → projected pooled output (B, project_dim), model dtype."""
        return self.visual_projection(self.vision(pixels)[1])

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Preprocessed pixels (B, 3, S, S) → (flags (B,) bool, scores), all on the CPU, float32:
        special_cos (B, 3), concept_cos (B, 17): the cosines; special (B, 3), concept (B, 17): the
        rounded scores (> 0 is a hit); special_care (B,) bool: any special score > 0."""
        embeds = self.image_embeds(pixels)
        special_cos = cosine(embeds, self.special_care_embeds)
        concept_cos = cosine(embeds, self.concept_embeds)
        special_t = self.special_care_embeds_weights.detach().cpu().float()
        concept_t = self.concept_embeds_weights.detach().cpu().float()
        adjustment = torch.zeros(len(embeds))  # float32, per picture
        special = torch.empty_like(special_cos)
        for j in range(special_cos.shape[1]):  # sequential, as diffusers' loop: a hit raises later scores
            special[:, j] = _score(special_cos[:, j], special_t[j], adjustment)
            adjustment = torch.where(special[:, j] > 0, torch.tensor(ADJUSTMENT), adjustment)
        concept = _score(concept_cos, concept_t, adjustment[:, None])
        flags = (concept > 0).any(dim=1)
        return flags, {"special_cos": special_cos, "concept_cos": concept_cos, "special": special,
                       "concept": concept, "special_care": (special > 0).any(dim=1)}

    def check(self, images) -> tuple[list[bool], dict[str, torch.Tensor]]:
        """PIL images, or a (B, 3, H, W) float tensor in [0, 1] → (one flag per picture, scores as
        `forward` returns them). The pictures go through vision.preprocess (CLIPImageProcessor)."""
        p = next(self.parameters())
        pixels = preprocess(images, self.vision.cfg).to(device=p.device, dtype=p.dtype)
        flags, scores = self(pixels)
        return flags.tolist(), scores

    def screen(self, images) -> tuple:
        """The pictures with every flagged one replaced by `placeholder` (replace_flagged), and one flag per picture."""
        flags, _ = self.check(images)
        return replace_flagged(images, flags), flags


def placeholder(width: int, height: int) -> Image.Image:
    """A grey RGB picture of width × height with PLACEHOLDER_TEXT in PIL's default font, centred and
    wrapped at word boundaries to the picture's width where it can be."""
    image = Image.new("RGB", (width, height), PLACEHOLDER_GREY)
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    lines: list[str] = []
    for word in PLACEHOLDER_TEXT.split():
        wider = f"{lines[-1]} {word}" if lines else word
        if lines and draw.textlength(wider, font=font) <= width - 4:
            lines[-1] = wider
        else:
            lines.append(word)
    text = "\n".join(lines)
    left, top, right, bottom = draw.multiline_textbbox((0, 0), text, font=font, align="center")
    xy = ((width - (right - left)) / 2 - left, (height - (bottom - top)) / 2 - top)
    draw.multiline_text(xy, text, fill=(255, 255, 255), font=font, align="center")
    return image


def replace_flagged(images, flags: Sequence[bool]):
    """Each flagged picture replaced by `placeholder` of its size; the others are returned as they are.

    images: a sequence of PIL images (→ a new list) or a (B, 3, H, W) float tensor in [0, 1] (→ a new
    tensor, the placeholder as floats k/255). The input is not modified."""
    flags = [bool(f) for f in flags]
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise BadValue(f"a picture tensor must be floats (batch, 3, height, width), got {images.dtype} "
                           f"{tuple(images.shape)}")
        if len(flags) != len(images):
            raise BadValue(f"{len(flags)} flags for {len(images)} pictures")
        out = images.clone()
        if any(flags):
            h, w = images.shape[2:]
            grey = torch.frombuffer(bytearray(placeholder(w, h).tobytes()), dtype=torch.uint8)
            grey = (grey.view(h, w, 3).permute(2, 0, 1).float() / 255).to(images)
            out[torch.tensor(flags)] = grey
        return out
    if isinstance(images, Image.Image) or not isinstance(images, Sequence) \
            or not all(isinstance(im, Image.Image) for im in images):
        raise BadType(f"images must be a sequence of PIL images or a (batch, 3, height, width) float tensor, "
                      f"got {type(images).__name__}")
    if len(flags) != len(images):
        raise BadValue(f"{len(flags)} flags for {len(images)} pictures")
    return [placeholder(*im.size) if f else im for im, f in zip(images, flags)]


register_module("safety_checker", SafetyChecker, VisionConfig)  # a model folder may hold one beside the diffusion modules
