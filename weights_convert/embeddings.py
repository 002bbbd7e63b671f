"""Textual-inversion files: what diffusers' load_textual_inversion reads, and what its textual_inversion
script writes. The maths (added tokens, appended rows) is altdiff_min/research/textual_inversion.py.

  diffusers      learned_embeds.safetensors (or .bin): {TOKEN: rows}, rows (n, D) as the script saves
                 them (n = its --num_vectors), or (D,); one key, the token
  web UI         {"emb_params": (n, D)} (.safetensors) or {"string_to_param": {"*": (n, D)}, "name": NAME,
                 …} (.pt): the token is --embedding FILE:TOKEN's, else the web UI's own rule, the file's
                 name without its extension (diffusers: "emb_params", or NAME)
  several keys   {TOKEN: rows, …}: what `train --train embeddings` writes for several --new-token (one
                 key is diffusers' form; diffusers' loader takes one key a file, or the tensors as a list)

Pickled files are read with torch.load(weights_only=True): tensors and plain values only.
"""
from __future__ import annotations

import os

import torch
from safetensors import SafetensorError, safe_open

from altdiff_min.errors import BadFile, BadValue
from altdiff_min.storage.files import atomic_file, save_safetensors

FILE = "learned_embeds.safetensors"  # diffusers' TEXT_INVERSION_NAME_SAFE
WEB_UI_KEY = "emb_params"


def read_tensors(path: str) -> object:
    """The file's content: a safetensors file's {key: tensor}, or a pickled file's object (weights only)."""
    if not os.path.isfile(path):
        raise BadFile(f"embedding file not found: {path}")
    try:
        with safe_open(path, "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    except (SafetensorError, OSError, ValueError):
        pass  # not safetensors: a pickled .bin/.pt, as diffusers falls back to
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 — torch.load raises many kinds on a file that is not its own
        raise BadFile(f"{path} is neither a safetensors nor a (weights-only) torch file of embeddings: "
                      f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None


def read_embeddings(path: str, token: str | None = None) -> dict[str, torch.Tensor]:
    """{token: rows (D,) or (n, D)} of a textual-inversion file (the forms above); `token` renames its
    one embedding. The rows' width and values are checked where they are added (research.textual_inversion)."""
    content = read_tensors(path)
    stem = os.path.splitext(os.path.basename(path))[0]
    if isinstance(content, torch.Tensor):
        if token is None:
            raise BadFile(f"{path} holds a bare tensor; name its token: --embedding {path}:TOKEN")
        return {token: content}
    if not isinstance(content, dict) or not content:
        raise BadFile(f"{path} holds no embedding ({type(content).__name__})")
    if "string_to_param" in content:  # the web UI's .pt
        params, name = content["string_to_param"], content.get("name")
        if not isinstance(params, dict) or not isinstance(params.get("*"), torch.Tensor):
            raise BadFile(f"{path}: its string_to_param holds no '*' tensor")
        return {token or (name if isinstance(name, str) and name else stem): params["*"]}
    if bad := [k for k, v in content.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]:
        raise BadFile(f"{path}: {bad[0]!r} is not a token and its embedding tensor")
    if len(content) == 1:
        (key, rows), = content.items()
        return {token or (stem if key == WEB_UI_KEY else key): rows}
    if token is not None:
        raise BadValue(f"{path} holds {len(content)} embeddings ({', '.join(content)}); a token can rename only one")
    return dict(content)


def check_width(words: dict[str, torch.Tensor], width: int, path: str) -> None:
    """Before a model is loaded: each embedding is finite floats, (D,) or (n, D), D = `width`."""
    for token, rows in words.items():
        if not rows.is_floating_point() or rows.ndim not in (1, 2) or not rows.numel() or rows.shape[-1] != width:
            raise BadValue(f"{path}: the embedding of {token!r} is {rows.dtype} {tuple(rows.shape)}; this model's "
                           f"tokens are {width} wide ((D,) or (n, D) floats)")
        if not torch.isfinite(rows).all():
            raise BadValue(f"{path}: the embedding of {token!r} holds NaN or infinity")


def write_embeddings(path: str, words: dict[str, torch.Tensor]) -> None:
    """{token: rows (n, D)} as diffusers' textual_inversion script saves them: fp32, metadata format pt; atomic."""
    tensors = {t: rows.detach().float().cpu().reshape(-1, rows.shape[-1]).contiguous() for t, rows in words.items()}
    with atomic_file(path) as tmp:
        save_safetensors(tmp, tensors, {"format": "pt"})
