"""The one attention function of altdiff-min: text encoder, UNet and VAE all call `attention`.

Two paths compute the same thing (Vaswani et al. 2017, eq. 1):
  - "sdpa" (default): torch's fused scaled_dot_product_attention (flash / memory-efficient kernels);
  - "explicit": softmax(QKᵀ/√d)·V written out, for reading, for hooking the probabilities, and
    for ablations that change the attention itself. Select it with `attention_backend("explicit")`.
This function is the single seam for attention ablations: change it here and every model sees it.
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable

import torch
import torch.nn.functional as F
from einops import rearrange

from .errors import BadValue

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


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(QKᵀ/√d)·V on (B, H, L, D) tensors → (output, probabilities (B, H, Lq, Lk)).
    mask is boolean, True where a key may be attended."""
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    # Softmax in fp32: in fp16 the exponentials of large scores overflow.
    probs = scores.float().softmax(dim=-1)
    if mask is not None:  # a query with no key to attend gets no attention (0/0 above), as in torch's SDPA
        probs = probs.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)
    probs = probs.to(v.dtype)
    return probs @ v, probs


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, mask: torch.Tensor | None = None,
              capture: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """Multi-head attention of (B, Lq, C) queries over (B, Lk, C) keys/values → (B, Lq, C).

    mask: optional boolean (B, Lk), True for the keys that may be attended (padding is False).
    capture: called with the (B, heads, Lq, Lk) probabilities; takes the explicit path, which has them.
    """
    q, k, v = (rearrange(t, "b l (h d) -> b h l d", h=heads) for t in (q, k, v))
    if mask is not None:
        mask = mask.bool()[:, None, None, :]  # (B, 1, 1, Lk): the same for every head and query
    # A compiled model (torch.compile) always takes the fused path: the choice is read per call, which
    # a compiled graph cannot do (and "explicit" is for reading and hooking, not for speed).
    if capture is None and (torch.compiler.is_compiling() or _backend.get() == "sdpa"):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    else:
        out, probs = explicit_attention(q, k, v, mask)
        if capture is not None:
            capture(probs)
    return rearrange(out, "b h l d -> b l (h d)")
