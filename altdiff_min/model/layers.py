"""Blocks that the UNet and the VAE share: the residual block, resampling, attention projections.

Both models descend from the DDPM UNet (Ho et al. 2020), so they are built from the same pieces with
different settings: the UNet's residual blocks hear the timestep, the VAE's do not; the UNet's
downsampling pads symmetrically, the VAE's does not.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .attention import attention
from .door import active


def checkpointed(enabled: bool, block: nn.Module, *args) -> torch.Tensor:
    """block(*args); when `enabled` and gradients are being recorded, the block's activations are not
    kept for the backward pass but recomputed there (gradient checkpointing, Chen et al. 2016): less
    memory for about one more forward pass. The result and the gradients are the same."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)


class Conv3x3(nn.Conv2d):
    """A 3×3 convolution, stride 1, padding 1: the residual blocks' and the upsampler's. (On the CPU,
    `load` runs it as speed.FastConv3x3, which computes the same sum faster at m9's wide levels.)"""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__(in_ch, out_ch, 3, padding=1)


class ResBlock(nn.Module):
    """GroupNorm–SiLU–conv3×3 (+ the time projection), GroupNorm–SiLU–dropout–conv3×3, plus a shortcut.

    time_dim=None (the VAE) leaves the time projection out.
    """

    def __init__(self, in_ch: int, out_ch: int, groups: int, eps: float, time_dim: int | None = None,
                 dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps)
        self.conv1 = Conv3x3(in_ch, out_ch)
        self.time_proj = nn.Linear(time_dim, out_ch) if time_dim else None
        self.norm2 = nn.GroupNorm(groups, out_ch, eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = Conv3x3(out_ch, out_ch)
        # The residual path needs the new channel count: a 1×1 conv where it changes.
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, time_emb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_proj is not None:
            h = h + self.time_proj(F.silu(time_emb))[:, :, None, None]  # one shift per channel
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.shortcut(x) + h


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 conv3×3."""

    def __init__(self, ch: int, asymmetric_padding: bool = False):
        super().__init__()
        self.asymmetric_padding = asymmetric_padding
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0 if asymmetric_padding else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.asymmetric_padding:
            x = F.pad(x, (0, 1, 0, 1))  # Parity: the VAE pads only right and bottom (ldm, diffusers)
        return self.conv(x)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour ×2, then a conv3×3 to smooth the blocks."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = Conv3x3(ch, ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Attention(nn.Module):
    """q/k/v/out projections around the shared `attention` function on (B, L, dim) tokens.

    Keys and values come from `context` (cross-attention, width context_dim) or from x itself; `mask`
    (B, Lk), True for the keys that may be attended, hides padding (the text encoder's).
    `site` (door.Site, set by the UNet when it is built) names where the layer is; while a
    sampling run has attention controllers, a layer with a site lets them change its q/k/v,
    probabilities and output (interventions.Run.attend). The UNet's, the VAE's and the text
    encoder's attention are all this class.
    """

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, qkv_bias: bool = False):
        super().__init__()
        self.heads = heads
        context_dim = context_dim or dim
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(context_dim, dim, bias=qkv_bias)
        self.v = nn.Linear(context_dim, dim, bias=qkv_bias)
        self.out = nn.Linear(dim, dim)
        self.site = None

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q, k, v = self.q(x), self.k(context), self.v(context)
        if self.site is not None and (run := active()) is not None:
            return run.attend(self.site, q, k, v, self.heads, mask, self.out)
        return self.out(attention(q, k, v, self.heads, mask))


class Level(nn.Module):
    """The blocks of one resolution: residual blocks, the attention after each (if the level has it),
    then a resampler (None on the last level). The model's forward says how they are called."""

    def __init__(self, res: Sequence[nn.Module], attn: Sequence[nn.Module] = (), downsample: nn.Module | None = None,
                 upsample: nn.Module | None = None):
        super().__init__()
        self.res, self.attn = nn.ModuleList(res), nn.ModuleList(attn)
        self.downsample, self.upsample = downsample, upsample
