"""Instruments for looking inside: where in the image each text token is attended.

    with capture_attention(pipe.unet) as maps:
        images = pipe.generate("un cercle rouge", seed=0)
    heat = maps.heatmap(token=3, size=(64, 64))        # (pictures, 64, 64) in [0, 1]: the prompts' rows

The maps are an attention controller (altdiff_min.research.interventions) that reads the probabilities and
changes nothing: while capturing, every cross-attention layer takes the explicit softmax path (the
fused SDPA kernel never materialises the probabilities) and hands them over, (B, heads, h·w, tokens).
With guidance the UNet's batch holds the negative prompt's rows too, first; the moment each layer
is told (`when.guided`) says so, so the maps know which rows are which. (The shapes cannot tell: one
prompt guided and two prompts unguided are both 2 rows.) The capture is this thread's only: a
request served meanwhile in another thread on the same model is not recorded.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import BadValue
from .interventions import Controller, intervene

BRANCHES = ("conditional", "unconditional", "both")


@dataclass(eq=False)
class AttentionMaps(Controller):
    """Cross-attention probabilities per layer name, summed over the UNet calls made while capturing
    (`sums`, with `calls` the count), and, with per_step=True, each call's own (`steps`): every row
    of the UNet's batch. `guided`: whether those calls were guidance batches, whose first half is
    the unconditional branch (None until a call is recorded); `size`: the latents' (height, width),
    and `scales`: how many times smaller each layer's grid is (a Site's scale), as the calls told them."""
    per_step: bool = False
    guided: bool | None = None
    size: tuple[int, int] | None = None
    scales: dict[str, int] = field(default_factory=dict)
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    steps: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    names: dict = field(default_factory=dict)  # Site → the layer's module name in the UNet

    def probs(self, site, when, probs):
        if site.kind == "cross":
            name = self.names.get(site, site.name)
            self.record(name, probs, when.guided)
            self.size, self.scales[name] = when.size, site.scale
        return None  # read, not changed

    def record(self, name: str, probs: torch.Tensor, guided: bool) -> None:
        if self.guided is not None and self.guided != guided:
            raise BadValue("one capture holds guided or unguided UNet calls, not both (scale 1 has no "
                           "unconditional rows, nor do the steps a guidance interval leaves out): capture "
                           "each generate call on its own")
        self.guided = guided
        probs = probs.detach().float().cpu()
        self.sums[name] = self.sums[name] + probs if name in self.sums else probs
        self.calls[name] = self.calls.get(name, 0) + 1
        if self.per_step:
            self.steps.setdefault(name, []).append(probs)

    def mean(self, name: str) -> torch.Tensor:
        """One layer's probabilities averaged over the calls: (B, heads, h·w, tokens)."""
        return self.sums[name] / self.calls[name]

    def at_step(self, i: int) -> AttentionMaps:
        """The maps of UNet call i alone (0 is the first, noisiest step; -1 the last), as AttentionMaps
        whose heatmap and mean read that one call. Needs capture_attention(..., per_step=True)."""
        if not self.per_step:
            raise BadValue("these maps hold sums only: capture with capture_attention(unet, per_step=True) to read single steps")
        count = len(next(iter(self.steps.values()), []))
        if isinstance(i, bool) or not isinstance(i, int) or not -count <= i < count:
            raise BadValue(f"step must be an integer in [{-count}, {count}), the calls captured; got {i!r}")
        return AttentionMaps(guided=self.guided, size=self.size, scales=self.scales, names=self.names,
                             sums={name: calls[i] for name, calls in self.steps.items()},
                             calls={name: 1 for name in self.steps})

    def heatmap(self, token: int, size: tuple[int, int], layers: list[str] | None = None,
                branch: str = "conditional") -> torch.Tensor:
        """How much `token` (a position in the 77) is attended at each pixel: (pictures, H, W).

        branch "conditional" (default): one map per picture, the prompts' rows; "unconditional": the
        negative prompt's rows of a guided run; "both": every row, unconditional first when guided.
        A map is the token's attention probability, its share of the pixel's attention over all 77
        positions (the UNet's cross-attention is unmasked: <s>, </s> and padding take shares too,
        and nothing is renormalised over the words), then each map is scaled to [0, 1] on its own:
        compare places within a map, not brightness across maps. Every layer's h×w map (averaged
        over heads and calls) is upsampled to `size`, the image's or the latents' (height, width),
        and the layers are averaged."""
        if not self.sums:
            raise BadValue("no attention maps were captured: generate inside `with capture_attention(pipe.unet) as maps:`")
        if branch not in BRANCHES:
            raise BadValue(f"branch must be one of {BRANCHES}, got {branch!r}")
        if branch == "unconditional" and not self.guided:
            raise BadValue("these maps hold no unconditional branch: the run was not guided (scale 1)")
        if unknown := sorted(set(layers or ()) - set(self.sums)):
            raise BadValue(f"no maps were captured for layer(s) {unknown}; captured: {sorted(self.sums)}")
        total = 0
        for name in layers or list(self.sums):
            probs = self.mean(name)[..., token].mean(dim=1)  # (B, h·w): heads averaged
            half = len(probs) // 2 if self.guided else 0
            probs = {"conditional": probs[half:], "unconditional": probs[:half], "both": probs}[branch]
            f = math.isqrt(size[0] * size[1] // probs.shape[1])  # how much smaller this layer's grid is
            if f == 0 or (size[0] // f) * (size[1] // f) != probs.shape[1]:
                raise BadValue(f"layer {name} has {probs.shape[1]} positions, not a downscaled {size[0]}×{size[1]} grid")
            grid = probs.reshape(-1, 1, size[0] // f, size[1] // f)
            total = total + F.interpolate(grid, size=size, mode="bilinear", align_corners=False)[:, 0]
        low = total.amin(dim=(1, 2), keepdim=True)
        return (total - low) / (total.amax(dim=(1, 2), keepdim=True) - low).clamp_min(1e-12)


@contextmanager
def capture_attention(unet: torch.nn.Module, per_step: bool = False):
    """Record the cross-attention probabilities of every transformer block of `unet` during the
    generate calls inside (in this thread): the maps are a controller, active for the enclosed block."""
    from .speed import CompiledUNet

    if isinstance(unet, CompiledUNet):  # one fused graph: no Python hook runs inside it
        raise BadValue("capture_attention needs the UNet as written, and this one is compiled "
                       "(load(..., compile=True)): load the model without compile to read its attention")
    maps = AttentionMaps(per_step=per_step, names={m.site: name for name, m in unet.named_modules()
                                                    if name.endswith("cross_attn") and m.site is not None})
    with intervene([maps]):
        yield maps
