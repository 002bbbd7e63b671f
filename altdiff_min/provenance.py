"""What a record must say so that a result can be made again: the software, the machine and the
precision that made it. Every manifest line, run.json and sweep spec.json carries `environment(…)`
beside the model folder's fingerprint (folder.fingerprint: config and weights).

    environment(device, dtype) → {"altdiff_min": "0.1.0", "git_commit": "…" | None, "git_dirty": bool | None,
                                  "torch": "2.13.0+cpu", "device": "cpu", "device_name": "…",
                                  "dtype": "fp32", "threads": 2}

The thread count is there because it changes pixels: a CPU matmul sums in another order with another
number of threads (the README's note on reproducibility), so a picture made with 16 threads can
differ in its last bits from one made with 2.
"""
from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import subprocess

import torch

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@functools.lru_cache(maxsize=1)
def software() -> dict:
    """altdiff-min's version, and its git commit when it runs from a checkout (None otherwise; dirty:
    whether the checkout has changes the commit does not hold), and torch's version. Read once."""
    try:
        version = importlib.metadata.version("altdiff-min")
    except importlib.metadata.PackageNotFoundError:
        version = None
    top = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    commit = dirty = None
    if os.path.exists(os.path.join(top, ".git")):
        try:
            git = ["git", "-C", top]
            commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                                    check=True).stdout.strip() or None
            changes = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no", "--", "altdiff_min",
                                      "weights_convert"], capture_output=True, text=True, timeout=10, check=True)
            dirty = bool(changes.stdout.strip())
        except (OSError, subprocess.SubprocessError):  # no git, or not a repository git can read
            commit = dirty = None
    return {"altdiff_min": version, "git_commit": commit, "git_dirty": dirty, "torch": torch.__version__}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


@functools.lru_cache(maxsize=1)
def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def environment(device: str | torch.device, dtype: torch.dtype | str | None) -> dict:
    """The record of the software, device, dtype and thread count a result is made with."""
    device = torch.device(device)
    if isinstance(dtype, torch.dtype) or dtype is None:
        dtype = DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch.")) if dtype is not None else None
    return {**software(), "device": str(device), "device_name": device_name(device), "dtype": dtype,
            "threads": torch.get_num_threads()}
