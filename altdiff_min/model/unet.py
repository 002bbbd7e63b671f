"""The Stable Diffusion v1 UNet: the noise ε in a latent, given the timestep and the text.

    latents (B, 4, h, w) → conv_in
      → down: per level, `layers` × (ResBlock [→ SpatialTransformer]), then a stride-2 conv (not the last level)
      → mid:  ResBlock → SpatialTransformer → ResBlock
      → up:   per level, `layers`+1 × (concat a skip → ResBlock [→ SpatialTransformer]), then ×2 upsampling
      → GroupNorm → SiLU → conv_out                                            = ε (B, 4, h, w)

Every tensor the down path produces (conv_in's output included) is a skip, consumed last-in first-out
by the up path. Every ResBlock hears the timestep (sinusoids → MLP); every SpatialTransformer reads
the text through cross-attention. Ho et al. 2020 (DDPM UNet), Rombach et al. 2022 (latent diffusion).
"""
from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ..checks import check_config
from ..errors import BadType, BadValue
from .door import active, label_sites
from .layers import Attention, Downsample, Level, ResBlock, Upsample, checkpointed


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    channels: tuple[int, ...] = (320, 640, 1280, 1280)  # per level, from the finest resolution down
    layers: int = 2  # res blocks per level on the way down (the way up has one more, for the extra skip)
    attention: tuple[bool, ...] = (True, True, True, False)  # per level on the way down; the way up mirrors it
    heads: int = 8  # per attention, at every level: head width = channels / heads (40, 80, 160)
    context_dim: int = 768  # width of the text encoder's output
    groups: int = 32
    eps: float = 1e-5  # GroupNorm eps of the res blocks and the output norm (the transformers use 1e-6)
    dropout: float = 0.0

    def __post_init__(self):
        check_config(self)  # types, ranges and limits: altdiff_min/checks.py

    @property
    def time_dim(self) -> int:
        return 4 * self.channels[0]

    @property
    def size_multiple(self) -> int:
        """Latent height and width must be multiples of this: every level but the last halves them."""
        return 2 ** (len(self.channels) - 1)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoids of the (B,) timesteps → (B, dim): [cos(t·f_i), sin(t·f_i)], f_i = max_period^(−i/half).

    Parity: cosines first and f_i's exponent over `half`, i.e. diffusers' flip_sin_to_cos=True, freq_shift=0.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None, :]
    return F.pad(torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1), (0, dim % 2))


class GEGLU(nn.Module):
    """Feed-forward with a GELU-gated linear unit (Shazeer 2020): out(h · GELU(gate)), inner width 4×dim."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * mult * dim)  # h and gate in one matrix, h first
        self.out = nn.Linear(mult * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.proj(x).chunk(2, dim=-1)
        return self.out(h * F.gelu(gate))


class TransformerBlock(nn.Module):
    """Pre-LN transformer block over pixels, with cross-attention to the text between self-attention and MLP.
    While a sampling run has controllers, their `tokens` hook sees (and may change) the block's input first
    (interventions.Controller.tokens: token merging computes its matching from it)."""

    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.norm1, self.self_attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2, self.cross_attn = nn.LayerNorm(dim), Attention(dim, heads, context_dim)
        self.norm3, self.ff = nn.LayerNorm(dim), GEGLU(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        x = x if (run := active()) is None else run.tokens(self.self_attn.site, x)  # controllers see its input (ToMe)
        x = x + self.self_attn(self.norm1(x))
        if context is not None:  # None: the "no cross-attention" ablation, the text is never read
            x = x + self.cross_attn(self.norm2(x), context)  # unmasked: all context tokens, padding included
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """GroupNorm → 1×1 conv → TransformerBlock on the h·w pixels as tokens → 1×1 conv, plus the input."""

    def __init__(self, ch: int, heads: int, context_dim: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6)  # Parity: GroupNorm eps is 1e-6 here, 1e-5 elsewhere
        self.proj_in = nn.Conv2d(ch, ch, 1)
        self.block = TransformerBlock(ch, heads, context_dim)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        h, w = x.shape[-2:]
        tokens = rearrange(self.proj_in(self.norm(x)), "b c h w -> b (h w) c")
        tokens = self.block(tokens, context)
        return x + self.proj_out(rearrange(tokens, "b (h w) c -> b c h w", h=h, w=w))


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig = UNetConfig()):
        super().__init__()
        self.cfg = cfg
        ch, last = cfg.channels, len(cfg.channels) - 1

        def res(in_ch: int, out_ch: int) -> ResBlock:
            return ResBlock(in_ch, out_ch, cfg.groups, cfg.eps, cfg.time_dim, cfg.dropout)

        def transformer(c: int) -> SpatialTransformer:
            return SpatialTransformer(c, cfg.heads, cfg.context_dim, cfg.groups)

        self.time_mlp = nn.Sequential(nn.Linear(ch[0], cfg.time_dim), nn.SiLU(), nn.Linear(cfg.time_dim, cfg.time_dim))
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)

        x_ch, skips = ch[0], [ch[0]]  # channels of x, and of each skip the down path leaves for the up path
        self.down = nn.ModuleList()
        for i, (c, has_attn) in enumerate(zip(ch, cfg.attention)):
            blocks = [res(x_ch if j == 0 else c, c) for j in range(cfg.layers)]
            x_ch = c
            skips += [c] * (cfg.layers + (i < last))  # one per res block, one for the downsampler
            self.down.append(Level(blocks, [transformer(c) for _ in blocks] if has_attn else [],
                                   downsample=Downsample(c) if i < last else None))

        self.mid_res1, self.mid_attn, self.mid_res2 = res(x_ch, x_ch), transformer(x_ch), res(x_ch, x_ch)

        self.up = nn.ModuleList()
        for i, (c, has_attn) in enumerate(zip(reversed(ch), reversed(cfg.attention))):
            blocks = []
            for _ in range(cfg.layers + 1):
                blocks.append(res(x_ch + skips.pop(), c))
                x_ch = c
            self.up.append(Level(blocks, [transformer(c) for _ in blocks] if has_attn else [],
                                 upsample=Upsample(c) if i < last else None))

        self.norm_out = nn.GroupNorm(cfg.groups, ch[0], cfg.eps)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)
        self.gradient_checkpointing = False  # training: recompute each block's activations in backward
        label_sites(self)  # where each attention is, for attention controllers (model/door.py)

    def check_inputs(self, latents: torch.Tensor, timesteps: float | torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        """Raise a ValueError for inputs the UNet cannot take; return the timesteps as a (B,) tensor."""
        cfg, m = self.cfg, self.cfg.size_multiple
        if latents.ndim != 4 or latents.shape[1] != cfg.in_channels:
            raise BadValue(f"latents must be (batch, {cfg.in_channels} channels, height, width), "
                             f"got {tuple(latents.shape)}")
        b, _, h, w = latents.shape
        if h == 0 or w == 0 or h % m or w % m:
            raise BadValue(f"latent size {h}×{w} is not a multiple of {m}: the UNet halves it "
                             f"{len(cfg.channels) - 1} times and the up path must meet every skip")
        if context is not None and (context.ndim != 3 or context.shape[2] != cfg.context_dim):
            raise BadValue(f"context must be (batch, tokens, {cfg.context_dim}), got {tuple(context.shape)}")
        if context is not None and context.shape[0] != b:
            raise BadValue(f"batch sizes disagree: {b} latents but {context.shape[0]} contexts")
        t = torch.as_tensor(timesteps, device=latents.device)
        if t.ndim == 0:
            return t.expand(b)
        if t.shape != (b,):
            raise BadValue(f"timesteps must be a number or a ({b},) tensor, one per latent; got shape {tuple(t.shape)}")
        return t

    def text_parts(self, cross_attention: bool | str | Collection[str] = True) -> frozenset[str]:
        """The levels whose transformers read the text, named as the modules are: "down.i", "mid", "up.i"
        (levels with attention only). cross_attention: True (every level), False (none), or the parts
        that keep reading it, any mix of "down", "mid", "up" and single levels such as "down.1"."""
        levels = {"down": [f"down.{i}" for i, level in enumerate(self.down) if level.attn], "mid": ["mid"],
                  "up": [f"up.{i}" for i, level in enumerate(self.up) if level.attn]}
        if isinstance(cross_attention, bool):
            return frozenset(name for names in levels.values() for name in names if cross_attention)
        names = [cross_attention] if isinstance(cross_attention, str) else cross_attention
        if not isinstance(names, (list, tuple, set, frozenset)) or not all(isinstance(n, str) for n in names):
            raise BadType(f"cross_attention must be True, False or a list of UNet parts, got {cross_attention!r}")
        parts = levels | {name: [name] for names in levels.values() for name in names}
        if bad := [n for n in names if n not in parts]:
            raise BadValue(f"cross_attention: {bad[0]!r} is not a part of this UNet; its parts are {', '.join(parts)}")
        return frozenset(level for n in names for level in parts[n])

    def forward(self, latents: torch.Tensor, timesteps: float | torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        """ε (B, out_channels, h, w) for (B, in_channels, h, w) latents at `timesteps` (a number, or one per
        latent), given the (B, L, context_dim) text context. context None skips every cross-attention
        (the text is never read); to switch single parts off, see interventions.CrossAttentionSwitch.

        Every block of the walk (res block, transformer, resampler) runs through `step`. While a sampling run
        has controllers they may stand in for it (interventions.Controller.block; DeepCache reuses the deep
        blocks' outputs), told its depth, len(skips) as it runs: the skips made before it on the way down,
        or still to be taken after it on the way up (the middle block's depth is the number of skips)."""
        t = self.check_inputs(latents, timesteps, context)
        emb = self.time_mlp(timestep_embedding(t, self.cfg.channels[0]).to(latents.dtype))
        run, ckpt = active(), self.gradient_checkpointing
        x = self.conv_in(latents)
        skips = [x]

        def step(block: nn.Module, *args) -> torch.Tensor:  # one block of the walk; a run's controllers may stand in for it
            return checkpointed(ckpt, block, *args) if run is None else run.block(block, len(skips), ckpt, *args)

        for level in self.down:
            for i, res in enumerate(level.res):
                x = step(res, x, emb)
                if level.attn:
                    x = step(level.attn[i], x, context)
                skips.append(x)
            if level.downsample is not None:
                x = step(level.downsample, x)
                skips.append(x)

        x = step(self.mid_res1, x, emb)
        x = step(self.mid_res2, step(self.mid_attn, x, context), emb)

        for level in self.up:
            for i, res in enumerate(level.res):
                x = step(res, torch.cat([x, skips.pop()], dim=1), emb)
                if level.attn:
                    x = step(level.attn[i], x, context)
            if level.upsample is not None:
                x = step(level.upsample, x)
        return self.conv_out(F.silu(self.norm_out(x)))
