"""The door's frame in the model: where research reaches in (its API: altdiff_min/research/interventions.py).

Every attention of the UNet's transformer blocks gets its `Site` when the UNet is built (`label_sites`)
and, when it runs, asks `active()` whether a sampling run with attention controllers is under way in
this thread: one ContextVar read when none is (the fused SDPA path, as without a door). The run (a
research.interventions.Run) is set per call, never process-wide, so two web requests on one model may
use different controllers; a compiled graph never sees one.
"""
from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Site:
    """Where an attention is: part "down", "mid" or "up", its level (0 is the finest on the way down,
    the coarsest on the way up; 0 for mid), the transformer's index in the level, "self" or "cross",
    and `scale`, how many times smaller its pixel grid is than the latents'."""
    part: str
    level: int
    block: int
    kind: str
    scale: int

    @property
    def name(self) -> str:
        """"down.1.0.cross" style: the module path's words."""
        return f"{self.part}.{self.level}.{self.block}.{self.kind}" if self.part != "mid" else f"mid.{self.kind}"

    @property
    def layer(self) -> str:
        """The level as UNet.text_parts names it: "down.1", "mid", "up.2"."""
        return "mid" if self.part == "mid" else f"{self.part}.{self.level}"


def label_sites(unet: torch.nn.Module) -> None:
    """Give every self- and cross-attention of `unet`'s transformer blocks its Site (at build time)."""
    levels = len(unet.down)
    for part, blocks in (("down", unet.down), ("up", unet.up)):
        for i, level in enumerate(blocks):
            scale = 2 ** (i if part == "down" else levels - 1 - i)
            for j, transformer in enumerate(level.attn):
                for kind in ("self", "cross"):
                    getattr(transformer.block, f"{kind}_attn").site = Site(part, i, j, kind, scale)
    for kind in ("self", "cross"):
        getattr(unet.mid_attn.block, f"{kind}_attn").site = Site("mid", 0, 0, kind, 2 ** (levels - 1))


RUN: ContextVar[Any] = ContextVar("interventions", default=None)  # the run under way: research.interventions.intervene sets it


def active():
    """The controllers' run under way in this thread (a research.interventions.Run), or None (the common case)."""
    return None if torch.compiler.is_compiling() else RUN.get()
