"""Stable Diffusion's autoencoder (AutoencoderKL): images ↔ latents 8× smaller per side.

    encode: image (B, 3, H, W) → conv_in → down levels (res blocks, stride-2 conv) → mid (res, attention, res)
            → GroupNorm → SiLU → conv_out → quant_conv → mean, log-variance (B, 4, H/8, W/8)
    decode: latents → post_quant_conv → conv_in → mid → up levels (res blocks, ×2 upsampling)
            → GroupNorm → SiLU → conv_out → image in roughly [−1, 1]

Trained as a VAE with a KL penalty (Rombach et al. 2022, Esser et al. 2021). The pipeline samples in
latents scaled by `scaling_factor` (so they have unit variance): it divides by it before `decode`.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ..checks import check_config
from ..errors import BadValue
from .layers import Attention, Downsample, Level, ResBlock, Upsample


@dataclass(frozen=True)
class VAEConfig:
    channels: tuple[int, ...] = (128, 256, 512, 512)  # per level, from the image's resolution down
    layers: int = 2  # res blocks per encoder level (the decoder has one more per level)
    latent_channels: int = 4
    image_channels: int = 3
    groups: int = 32
    eps: float = 1e-6  # Parity: GroupNorm eps is 1e-6 throughout the VAE (the UNet's res blocks use 1e-5)
    scaling_factor: float = 0.18215  # latents × this have about unit variance; used by the pipeline

    def __post_init__(self):
        check_config(self)  # types, ranges and limits: altdiff_min/checks.py

    @property
    def size_multiple(self) -> int:
        """Image height and width must be multiples of this: every level but the last halves them."""
        return 2 ** (len(self.channels) - 1)


class PixelAttention(Attention):
    """Single-head self-attention among the h·w pixels, channels as features; GroupNorm first, residual."""

    def __init__(self, ch: int, groups: int, eps: float):
        super().__init__(ch, heads=1, qkv_bias=True)
        self.norm = nn.GroupNorm(groups, ch, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        out = super().forward(rearrange(self.norm(x), "b c h w -> b (h w) c"))
        return x + rearrange(out, "b (h w) c -> b c h w", h=h, w=w)


def res_blocks(in_ch: int, out_ch: int, n: int, cfg: VAEConfig) -> list[ResBlock]:
    return [ResBlock(in_ch if i == 0 else out_ch, out_ch, cfg.groups, cfg.eps) for i in range(n)]


def mid_block(ch: int, cfg: VAEConfig) -> nn.Sequential:
    """res → attention → res at the coarsest resolution, the only place the VAE attends."""
    return nn.Sequential(OrderedDict(res1=ResBlock(ch, ch, cfg.groups, cfg.eps),
                                     attn=PixelAttention(ch, cfg.groups, cfg.eps),
                                     res2=ResBlock(ch, ch, cfg.groups, cfg.eps)))


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, last = cfg.channels, len(cfg.channels) - 1
        self.conv_in = nn.Conv2d(cfg.image_channels, ch[0], 3, padding=1)
        self.down = nn.ModuleList(
            Level(res_blocks(ch[max(i - 1, 0)], c, cfg.layers, cfg),
                  downsample=Downsample(c, asymmetric_padding=True) if i < last else None)
            for i, c in enumerate(ch)
        )
        self.mid = mid_block(ch[-1], cfg)
        self.norm_out = nn.GroupNorm(cfg.groups, ch[-1], cfg.eps)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)  # mean and log-variance

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for level in self.down:
            for res in level.res:
                x = res(x)
            if level.downsample is not None:
                x = level.downsample(x)
        return self.conv_out(F.silu(self.norm_out(self.mid(x))))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, last = cfg.channels[::-1], len(cfg.channels) - 1  # from the coarsest level up
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid = mid_block(ch[0], cfg)
        self.up = nn.ModuleList(
            Level(res_blocks(ch[max(i - 1, 0)], c, cfg.layers + 1, cfg), upsample=Upsample(c) if i < last else None)
            for i, c in enumerate(ch)
        )
        self.norm_out = nn.GroupNorm(cfg.groups, ch[-1], cfg.eps)
        self.conv_out = nn.Conv2d(ch[-1], cfg.image_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid(self.conv_in(z))
        for level in self.up:
            for res in level.res:
                x = res(x)
            if level.upsample is not None:
                x = level.upsample(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class VAE(nn.Module):
    def __init__(self, cfg: VAEConfig = VAEConfig()):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)
        self.decoder = Decoder(cfg)

    @staticmethod
    def check_channels(x: torch.Tensor, what: str, channels: int) -> None:
        if x.ndim != 4 or x.shape[1] != channels or not x.shape[2] * x.shape[3]:
            raise BadValue(f"{what} must be (batch, {channels} channels, height, width), got {tuple(x.shape)}")

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, image_channels, H, W) images in [−1, 1] → mean and log-variance, each (B, latent_channels, H/8, W/8).

        The latent distribution is N(mean, exp(logvar)); the pipeline uses the mean, or samples it."""
        self.check_channels(images, "images", self.cfg.image_channels)
        h, w, m = *images.shape[-2:], self.cfg.size_multiple
        if h % m or w % m:
            raise BadValue(f"image size {h}×{w} is not a multiple of {m}: "
                             f"the encoder halves it {len(self.cfg.channels) - 1} times")
        mean, logvar = self.quant_conv(self.encoder(images)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)  # Parity: diffusers' DiagonalGaussianDistribution clamps

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """RAW latents (B, latent_channels, h, w), i.e. already divided by scaling_factor
        → images (B, image_channels, 8h, 8w) in roughly [−1, 1]."""
        self.check_channels(z, "latents", self.cfg.latent_channels)
        return self.decoder(self.post_quant_conv(z))
