"""Doing less per step, per call: two published speed paths as attention controllers (interventions.py).

    ToMe(ratio=0.5)            token merging for SD (Bolya & Hoffman 2023): before each self-attention of
                               the finest levels, merge the most similar tokens, attend over fewer, unmerge
    DeepCache(interval=3)      feature caching (Ma et al. 2024): every `interval`-th UNet evaluation runs
                               whole; the others recompute only the shallow branch and reuse the deep
                               blocks' outputs of the last whole one

    images = pipe.generate("…", controllers=[ToMe(0.5), DeepCache(3)])     this call only; off by default

Each equals its reference package run on diffusers' UNet (tomesd 0.1.3's apply_patch, DeepCache 0.1.1's
DeepCacheSDHelper; tests/test_skipping.py). They are controllers, not load-time speed paths (speed.py):
they change the sums (the pictures move a little) and take settings per call, so they live where
the other per-call changes of the UNet live, compose with them, and cost nothing when not asked for.
A ToMe or DeepCache object holds its run's state (the random generator, the cache): one call at a time.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from ..errors import BadType, BadValue
from .interventions import Controller, Moment, Site

Merge = Callable[[torch.Tensor], torch.Tensor]


def bipartite_soft_matching(metric: torch.Tensor, h: int, w: int, sx: int, sy: int, r: int,
                            generator: torch.Generator | None = None) -> tuple[Merge, Merge]:
    """ToMe for SD's matching of (B, N = h·w, C) tokens on their h×w grid (Bolya & Hoffman 2023, §3–4):

    dst: one token in each sy×sx cell of the grid (whole cells only), at a place drawn from `generator`
         (randint(sy·sx) per cell, in raster order of the cells) or, without one, the cell's top-left;
    src: every other token. Each src token's most similar dst by the cosine of `metric`; the r src
         tokens most similar to theirs are merged into it, the others kept.

    Returns merge: (B, N, C) → (B, N − r, C), the kept src tokens then every dst token averaged with
    the tokens merged into it; and unmerge, back to (B, N, C): each merged token gets its dst's value."""
    b, n, _ = metric.shape
    hs, ws, device = h // sy, w // sx, metric.device
    r = min(r, n - hs * ws)  # at most every src token
    if r <= 0:
        return (lambda x: x), (lambda x: x)
    with torch.no_grad():  # the matching is a choice, not a function to differentiate
        place = (torch.randint(sy * sx, (hs, ws), generator=generator).to(device) if generator is not None
                 else torch.zeros(hs, ws, dtype=torch.long, device=device))
        rows = torch.arange(hs, device=device)[:, None] * sy + place // sx
        cols = torch.arange(ws, device=device)[None, :] * sx + place % sx
        dst = (rows * w + cols).flatten()
        is_dst = torch.zeros(n, dtype=torch.bool, device=device)
        is_dst[dst] = True
        src = (~is_dst).nonzero().squeeze(1)
        unit = metric / metric.norm(dim=-1, keepdim=True)
        best, target = (unit[:, src] @ unit[:, dst].transpose(1, 2)).max(dim=-1)  # each src's nearest dst
        order = best.argsort(dim=-1, descending=True)
        merged, kept = order[:, :r], order[:, r:]  # positions among the src tokens
        into = target.gather(1, merged)  # their dst, a position among the dst tokens
        merged_at, kept_at = src[merged], src[kept]  # (B, r), (B, Ns − r): positions in the grid

    def rows_of(index: torch.Tensor, c: int) -> torch.Tensor:
        return index[..., None].expand(-1, -1, c)

    def merge(x: torch.Tensor) -> torch.Tensor:
        c = x.shape[-1]
        averaged = x[:, dst].scatter_reduce(1, rows_of(into, c), x.gather(1, rows_of(merged_at, c)), reduce="mean")
        return torch.cat([x.gather(1, rows_of(kept_at, c)), averaged], dim=1)

    def unmerge(y: torch.Tensor) -> torch.Tensor:
        c, n_kept = y.shape[-1], kept_at.shape[1]
        out = y.new_empty(b, n, c)
        out[:, dst] = y[:, n_kept:]
        out.scatter_(1, rows_of(kept_at, c), y[:, :n_kept])
        return out.scatter_(1, rows_of(merged_at, c), y[:, n_kept:].gather(1, rows_of(into, c)))

    return merge, unmerge


def whole(name: str, value, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadType(f"{name} must be a whole number, got {value!r}")
    if value < least:
        raise BadValue(f"{name} must be at least {least}, got {value}")
    return value


class ToMe(Controller):
    """Token merging for Stable Diffusion (Bolya & Hoffman 2023), tomesd 0.1.3's `apply_patch` as a controller.

    In every transformer block whose grid is at most `max_downsample` times smaller than the latents'
    (1: the finest level only), the block's input tokens choose a matching (`bipartite_soft_matching`,
    r = int(N · ratio) tokens merged, dst cells sx × sy); the self-attention (merge_attn) and, if asked,
    the cross-attention (merge_crossattn) then attend from the merged tokens, and their outputs are
    unmerged back to N. The attention's queries, keys and values are merged after their projections
    (the `qkv` hook), which is the same sum as projecting merged tokens: the projections are linear.
    use_rand: each cell's dst is drawn at random, from this object's generator seeded with `seed` at the
    run's first UNet evaluation (tomesd forks torch's global generator once), and the top-left when
    the batch is odd (as tomesd: guidance's [∅; c] halves then match alike). merge_mlp (merging before
    the feed-forward too, which tomesd advises against) has no hook here and is refused."""

    def __init__(self, ratio: float = 0.5, max_downsample: int = 1, sx: int = 2, sy: int = 2, use_rand: bool = True,
                 merge_attn: bool = True, merge_crossattn: bool = False, merge_mlp: bool = False, seed: int = 0):
        sx, sy = whole("ToMe sx", sx, 1), whole("ToMe sy", sy, 1)
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
            raise BadType(f"ToMe ratio must be a number, got {ratio!r}")
        if not 0 <= ratio <= (most := 1 - 1 / (sx * sy)):
            raise BadValue(f"ToMe ratio must be in [0, {most:g}] (1 − 1/(sx·sy): one token of each cell stays), got {ratio!r}")
        for name, flag in (("use_rand", use_rand), ("merge_attn", merge_attn), ("merge_crossattn", merge_crossattn),
                           ("merge_mlp", merge_mlp)):
            if not isinstance(flag, bool):
                raise BadType(f"ToMe {name} must be True or False, got {flag!r}")
        if merge_mlp:
            raise BadValue("ToMe merge_mlp=True is not supported: the door has no hook around the feed-forward "
                           "(tomesd advises against it)")
        self.ratio, self.sx, self.sy = float(ratio), sx, sy
        self.max_downsample, self.seed = whole("ToMe max_downsample", max_downsample, 1), whole("ToMe seed", seed, 0)
        self.use_rand, self.merge_attn, self.merge_crossattn = use_rand, merge_attn, merge_crossattn
        self.generator, self.when, self.matching = None, None, None

    def settings(self) -> dict:
        """The arguments that make this ToMe again (a manifest's record)."""
        return {"ratio": self.ratio, "max_downsample": self.max_downsample, "sx": self.sx, "sy": self.sy,
                "use_rand": self.use_rand, "merge_attn": self.merge_attn, "merge_crossattn": self.merge_crossattn,
                "seed": self.seed}

    def tokens(self, site: Site, when: Moment, x: torch.Tensor) -> None:
        if when is not self.when:
            if when.call == 0 or self.generator is None:  # a run's first evaluation: the draws start again
                self.generator = torch.Generator().manual_seed(self.seed)
            self.when = when
        self.matching = None
        if site.scale > self.max_downsample:
            return None
        if not all(when.size):
            raise BadValue("ToMe needs the latents' size: use it in a sampling run (generate, sample) or "
                           "inside interventions.evaluation(t, guided, size)")
        h, w = math.ceil(when.size[0] / site.scale), math.ceil(when.size[1] / site.scale)
        rand = self.use_rand and x.shape[0] % 2 == 0
        self.matching = bipartite_soft_matching(x, h, w, self.sx, self.sy, int(x.shape[1] * self.ratio),
                                                self.generator if rand else None)
        return None

    def merges(self, site: Site) -> bool:
        return self.matching is not None and (self.merge_attn if site.kind == "self" else self.merge_crossattn)

    def qkv(self, site, when, q, k, v):
        if not self.merges(site):
            return None
        merge = self.matching[0]
        return (merge(q), merge(k), merge(v)) if site.kind == "self" else (merge(q), k, v)  # the text is not merged

    def output(self, site, when, out):
        return self.matching[1](out) if self.merges(site) else None


class DeepCache(Controller):
    """DeepCache (Ma et al. 2024, CVPR), DeepCache 0.1.1's DeepCacheSDHelper (skip_mode "uniform") as a controller.

    The UNet's skips are its branches, numbered from the shallowest: 0 is conv_in's, then one per res
    block and downsampler on the way down (m9: 12, 0–11). Branch k keeps the blocks above it: those
    whose depth (UNet.forward: the skips above a block) is at most k. Every `interval`-th UNet
    evaluation of the run (0, N, 2N, …) runs whole and keeps the outputs of the blocks below; the
    others run only the blocks above, the deep ones handing back their kept outputs. Branch 0 thus
    runs conv_in, the last res block and transformer of the way up, and the output layers. The
    helper's cache_branch_id is this branch for SD's layout (3 skips a level: block = id // 3,
    layer = id % 3). An evaluation whose batch or size differs from the kept one's (guidance switched
    off on an interval of the route) runs whole and keeps its own."""

    def __init__(self, interval: int = 3, branch: int = 0):
        self.interval, self.branch = whole("DeepCache interval", interval, 1), whole("DeepCache branch", branch, 0)
        self.when, self.whole, self.kept, self.of, self.skips = None, True, {}, None, 0

    def settings(self) -> dict:
        return {"interval": self.interval, "branch": self.branch}

    def block(self, when, depth, block, compute):
        if when is not self.when:  # a new UNet evaluation
            self.when, shape = when, (when.guided, when.size)
            self.whole = when.call % self.interval == 0 or shape != self.of
            if self.whole:
                self.kept, self.of, self.skips = {}, shape, 0
            elif self.branch >= self.skips:
                raise BadValue(f"DeepCache branch {self.branch}: this UNet has {self.skips} skip branches "
                               f"(0–{self.skips - 1})")
        if self.whole:
            self.skips = max(self.skips, depth)  # the middle block's depth: how many skips there are
        if depth <= self.branch:
            return compute()
        if self.whole:
            self.kept[block] = out = compute()
            return out
        return self.kept[block]


def skip_branches(unet_config) -> int:
    """How many skips (DeepCache branches) a UNet of this config has: conv_in's, and per level one per
    res block and one for the downsampler (not on the last level)."""
    return len(unet_config.channels) * (unet_config.layers + 1)


# A manifest's (and a sweep's) names of the two, each with the argument a lone number sets.
SKIPPERS = {"tome": (ToMe, "ratio"), "deepcache": (DeepCache, "interval")}


def from_settings(settings: dict) -> dict[str, Controller]:
    """{"tome": 0.5 or ToMe's arguments, "deepcache": 3 or DeepCache's arguments; None: off} (a sweep's
    axes, a picture record's `settings()`) → the controllers, by name. Unknown names or arguments: one line."""
    made = {}
    for key, value in settings.items():
        if key not in SKIPPERS:
            raise BadValue(f"{key!r} is not a way of skipping work; choose from {sorted(SKIPPERS)}")
        kind, lone = SKIPPERS[key]
        if value is None:
            continue
        arguments, known = (value if isinstance(value, dict) else {lone: value}), sorted(kind().settings())
        if unknown := sorted(set(arguments) - set(known)):
            raise BadValue(f"{key}: {unknown} are not {kind.__name__}'s settings; it has {known}")
        made[key] = kind(**arguments)
    return made
