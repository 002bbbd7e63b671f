"""CLIP's image encoder: a vision transformer (ViT-L/14), and the preprocessing that feeds it.

    pixels (B, 3, 224, 224) → 14×14 patches, each a linear embedding (Conv2d, stride 14)
        → [class token; 256 patch tokens] + learned positions → LayerNorm (pre_norm)
        → 24 pre-LN transformer layers                              = last hidden state (B, 257, 1024)
        → LayerNorm of the class token (post_norm)                  = pooled (B, 1024)

The transformer is ViT's (Dosovitskiy et al. 2021) as trained in CLIP (Radford et al. 2021). Two
departures from the ViT paper, both OpenAI's: a LayerNorm on the embeddings before the first layer
(`ln_pre` in OpenAI's code), and the sigmoid approximation of GELU, x·σ(1.702x) (Hendrycks & Gimpel
2016, §2), instead of the exact one. The last hidden state is *not* normalised: only the class
token, the image's summary, goes through the final LayerNorm.

Why it is here: AltDiffusion-m9's safety checker is this image tower (CLIP ViT-L/14) with projection
heads, fed by CLIPImageProcessor (`preprocess` here, bit for bit); and AltCLIP (Chen et al. 2022),
whose text tower m9 conditions on, replaced CLIP's text tower but kept this image tower as CLIP
trained it. `project_dim` is the width of the projection heads, built elsewhere.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from ..checks import check_config
from ..errors import BadType, BadValue, NotFinite
from ..model.layers import Attention, checkpointed
from ..storage.pictures import rgb_over_white

# OpenAI's normalisation: the mean and standard deviation of CLIP's training pictures, per RGB channel.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class VisionConfig:
    hidden: int = 1024
    layers: int = 24
    heads: int = 16
    mlp: int = 4096
    patch: int = 14  # side of a square patch, in pixels: one token each
    image_size: int = 224  # the only input size: the position table has one row per patch
    image_channels: int = 3
    eps: float = 1e-5
    project_dim: int = 768  # width of the projection heads (the safety checker's), not used here

    def __post_init__(self):
        check_config(self)  # types, ranges and limits: altdiff_min/checks.py

    @property
    def patches(self) -> int:
        """Tokens per image besides the class token: (224 / 14)² = 256."""
        return (self.image_size // self.patch) ** 2


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x·σ(1.702x): CLIP's GELU, a sigmoid fit of x·Φ(x); they differ by 0.0203 at most (near x = −2.27)."""
    return x * torch.sigmoid(1.702 * x)


class VisionLayer(nn.Module):
    """A pre-LN layer: normalise *before* each branch; the residual stream itself is never normalised
    (the text encoder's BERT layers are post-LN)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.attn_norm = nn.LayerNorm(cfg.hidden, eps=cfg.eps)
        self.attn = Attention(cfg.hidden, cfg.heads, qkv_bias=True)
        self.mlp_norm = nn.LayerNorm(cfg.hidden, eps=cfg.eps)
        self.fc1 = nn.Linear(cfg.hidden, cfg.mlp)
        self.fc2 = nn.Linear(cfg.mlp, cfg.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))  # every token attends to every token: no mask
        return x + self.fc2(quick_gelu(self.fc1(self.mlp_norm(x))))


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig = VisionConfig()):
        super().__init__()
        self.cfg = cfg
        # Cutting the image into patches and embedding each linearly is one strided convolution.
        self.patch_embedding = nn.Conv2d(cfg.image_channels, cfg.hidden, cfg.patch, stride=cfg.patch, bias=False)
        # OpenAI's initialisation (width^-½ · N(0, 1)); checkpoints replace both.
        self.class_embedding = nn.Parameter(torch.randn(cfg.hidden) * cfg.hidden**-0.5)
        self.position_embedding = nn.Parameter(torch.randn(1 + cfg.patches, cfg.hidden) * cfg.hidden**-0.5)
        self.pre_norm = nn.LayerNorm(cfg.hidden, eps=cfg.eps)
        self.layers = nn.ModuleList(VisionLayer(cfg) for _ in range(cfg.layers))
        self.post_norm = nn.LayerNorm(cfg.hidden, eps=cfg.eps)
        self.gradient_checkpointing = False  # training: recompute each layer's activations in backward

    def check_inputs(self, pixels: torch.Tensor) -> None:
        c, s = self.cfg.image_channels, self.cfg.image_size
        if not isinstance(pixels, torch.Tensor) or not pixels.is_floating_point():
            raise BadType(f"pixels must be a float tensor (batch, {c}, {s}, {s}) from vision.preprocess, "
                          f"got {getattr(pixels, 'dtype', type(pixels).__name__)}")
        if pixels.ndim != 4 or pixels.shape[1] != c:
            raise BadValue(f"pixels must be (batch, {c} channels, height, width), got {tuple(pixels.shape)}")
        if pixels.shape[2:] != (s, s):
            raise BadValue(f"pixels are {pixels.shape[2]}×{pixels.shape[3]}; this encoder takes {s}×{s} "
                           f"(one learned position per patch): resize them with vision.preprocess")

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised pixels (B, image_channels, image_size, image_size), as `preprocess` makes them
        → (last hidden state (B, 1 + patches, hidden), pooled (B, hidden)).

        Token 0 is the class token; tokens 1… are the patches in reading order (row by row)."""
        self.check_inputs(pixels)
        # Parity: transformers casts the pixels to the weights' dtype (fp32 pixels, fp16 model).
        patches = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))  # (B, hidden, rows, cols)
        patches = patches.flatten(2).transpose(1, 2)  # (B, rows·cols, hidden)
        cls = self.class_embedding.expand(len(pixels), 1, -1)
        x = self.pre_norm(torch.cat([cls, patches], dim=1) + self.position_embedding)
        for layer in self.layers:
            x = checkpointed(self.gradient_checkpointing, layer, x)
        return x, self.post_norm(x[:, 0])


def _tensor_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) floats in [0, 1] → uint8 RGB PIL images, rounded to the nearest level in float32:
    what diffusers' pipelines hand CLIPImageProcessor (VaeImageProcessor.numpy_to_pil), and what
    altdiff_min.pipeline.to_pil writes to disk."""
    if not images.is_floating_point():
        raise BadType(f"a picture tensor must hold floats in [0, 1], got {images.dtype}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise BadValue(f"a picture tensor must be (batch, 3, height, width), got {tuple(images.shape)}")
    images = images.detach().float().cpu()
    if not torch.isfinite(images).all():
        raise NotFinite("the pictures contain NaN or infinite values")
    if images.numel() and not 0 <= images.min() <= images.max() <= 1:
        raise BadValue(f"picture tensors must lie in [0, 1], got [{images.min():.4g}, {images.max():.4g}]")
    pixels = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(p) for p in pixels]


def preprocess(images, cfg: VisionConfig = VisionConfig()) -> torch.Tensor:
    """Pictures → the encoder's input (B, 3, image_size, image_size), float32: CLIPImageProcessor's
    defaults, written out.

    images: a PIL image or a sequence of them (any mode, any size: converted to RGB), or a float
    tensor (B, 3, H, W) in [0, 1] (first rounded to 8-bit pictures, see _tensor_to_pil).
    Each picture: shorter side → image_size with PIL's bicubic filter (the longer side to
    int(image_size · long / short), truncated), centre crop image_size², ×1/255, then minus CLIP_MEAN
    and over CLIP_STD per channel. The arithmetic follows transformers' order (×1/255 in float64,
    rounded to float32, then normalised in float32), so the result is bit for bit its result.
    """
    if cfg.image_channels != 3:
        raise BadValue(f"CLIP's preprocessing makes RGB pictures; this config takes {cfg.image_channels} channels")
    if isinstance(images, torch.Tensor):
        images = _tensor_to_pil(images)
    elif isinstance(images, Image.Image):
        images = [images]
    elif not isinstance(images, Sequence) or not all(isinstance(im, Image.Image) for im in images):
        raise BadType(f"images must be PIL images or a (batch, 3, height, width) float tensor, got {type(images).__name__}")
    if len(images) == 0:
        raise BadValue("no images to preprocess")
    s = cfg.image_size
    out = []
    for image in images:
        w, h = image.size
        if w == 0 or h == 0:
            raise BadValue(f"an image of {w}×{h} pixels has nothing to resize")
        short, long = min(w, h), max(w, h)
        long = int(s * long / short)  # Parity: truncated, as transformers' get_resize_output_image_size
        size = (s, long) if w <= h else (long, s)  # PIL sizes are (width, height)
        pixels = np.asarray(rgb_over_white(image).resize(size, Image.Resampling.BICUBIC))  # (H, W, 3) uint8
        top, left = (pixels.shape[0] - s) // 2, (pixels.shape[1] - s) // 2  # odd margins: 1 more below/right
        out.append(torch.from_numpy(pixels[top:top + s, left:left + s].copy()).permute(2, 0, 1))
    x = (torch.stack(out).double() * (1 / 255)).float()
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    return (x - mean) / std
