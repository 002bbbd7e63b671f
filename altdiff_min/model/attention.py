"""The one attention function of altdiff-min: text encoder, UNet and VAE all call `attention`.

Two paths compute the same thing (Vaswani et al. 2017, eq. 1):
  - "sdpa" (default): torch's fused scaled_dot_product_attention (flash / memory-efficient kernels);
  - "explicit": softmax(QKᵀ/√d)·V written out (`attention_probs`, then ·V), for reading and for
    ablations that change the attention itself. Select it with `attention_backend("explicit")`.
Attention controllers (altdiff_min.research.interventions) reach the probabilities through `attention_probs`.
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from einops import rearrange

from ..errors import BadValue

BACKENDS = ("sdpa", "explicit")
_backend: ContextVar[str] = ContextVar("attention_backend", default="sdpa")


@contextmanager
def attention_backend(name: str):
    """Run the enclosed code with the named attention path ("sdpa" or "explicit"), in this thread."""
    if name not in BACKENDS:
        raise BadValue(f"unknown attention backend {name!r}; choose one of {BACKENDS}")
    token = _backend.set(name)
    try:
        yield
    finally:
        _backend.reset(token)


def split_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, mask: torch.Tensor | None):
    """(B, L, C) tensors → (B, heads, L, C/heads); a (B, Lk) mask → (B, 1, 1, Lk) booleans."""
    q, k, v = (rearrange(t, "b l (h d) -> b h l d", h=heads) for t in (q, k, v))
    return q, k, v, (mask.bool()[:, None, None, :] if mask is not None else None)  # the same for every head and query


def attention_probs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                    mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The probabilities softmax(QKᵀ/√d) (B, heads, Lq, Lk) of (B, L, C) inputs, and the values split
    into heads (B, heads, Lk, C/heads): what an attention controller changes before `probs @ v`."""
    q, k, v, mask = split_heads(q, k, v, heads, mask)
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.float().softmax(dim=-1)  # in fp32: in fp16 the exponentials of large scores overflow
    if mask is not None:  # a query with no key to attend gets no attention (0/0 above), as in torch's SDPA
        probs = probs.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)
    return probs.to(v.dtype), v


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head attention of (B, Lq, C) queries over (B, Lk, C) keys/values → (B, Lq, C).

    mask: optional boolean (B, Lk), True for the keys that may be attended (padding is False).
    """
    # A compiled model (torch.compile) always takes the fused path: the choice is read per call, which
    # a compiled graph cannot do (and "explicit" is for reading and changing, not for speed).
    if torch.compiler.is_compiling() or _backend.get() == "sdpa":
        q, k, v, mask = split_heads(q, k, v, heads, mask)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    else:
        probs, v = attention_probs(q, k, v, heads, mask)
        out = probs @ v
    return rearrange(out, "b h l d -> b l (h d)")
