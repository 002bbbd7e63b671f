"""What a record must say so that a result can be made again: the software, the machine and the
precision that made it. Every manifest line, run.json and sweep spec.json carries `environment(…)`
beside the model folder's fingerprint (folder.fingerprint: config and weights).

    environment(device, dtype) → {"altdiff_min": "0.1.0", "git_commit": "…" | None, "git_dirty": bool | None,
                                  "torch": "2.13.0+cpu", "device": "cpu", "device_name": "…",
                                  "dtype": "fp32", "threads": 2}

Every picture carries its record inside the PNG too (`png_bytes`): as JSON in an "altdiff-min" text
chunk, which `generate --replay PICTURE.png` reads back (`record_of_png`), and as the "parameters" text
the Stable Diffusion web UIs write (`parameters`), so the tools that read theirs show ours. The
record holds only what makes the picture (no time, no file name), so a replay on the same machine
writes the same bytes. `generate` builds its record itself; a sweep's pictures, a training run's
samples and the web page's pictures take theirs from `picture_record` (the same entries, in the
same order).

The thread count is there because it changes pixels: a CPU matmul sums in another order with another
number of threads (docs/robustness.md, on reproducibility), so a picture made with 16 threads can
differ in its last bits from one made with 2.
"""
from __future__ import annotations

import functools
import importlib.metadata
import inspect
import io
import json
import os
import platform
import subprocess

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ..errors import BadFile
from .files import parse_json

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@functools.lru_cache(maxsize=1)
def software() -> dict:
    """altdiff-min's version, and its git commit when it runs from a checkout (None otherwise; dirty:
    whether the checkout has changes the commit does not hold), and torch's version. Read once."""
    try:
        version = importlib.metadata.version("altdiff-min")
    except importlib.metadata.PackageNotFoundError:
        version = None
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # altdiff_min/ (this is storage/provenance.py)
    top = os.path.dirname(package)
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


def picture_record(model, prompt: str, sample: int, arguments: dict, size: tuple[int, int], model_folder: dict | None,
                   environment: dict, **more) -> dict:
    """The record of picture `sample` (0-based) of `model.generate(prompt, **arguments)`, `size` = (width,
    height) pixels: the entries `altdiff-min generate` records, in its order (so `generate --replay` of
    the picture writes the same bytes), generate's defaults filled in from its signature. model_folder:
    folder.fingerprint of the folder the weights came from (None: weights no folder holds, a training
    run's); environment: environment(…) of the run. text_layer and cross_attention are recorded only
    where they are not generate's defaults (generate --replay cannot set them: it refuses such a
    record); more: further entries (an init picture's, a training sample's), before the environment."""
    from ..sampling.guidance import guidance_rule

    given = {name: p.default for name, p in inspect.signature(model.generate).parameters.items()} | arguments
    width, height = size
    weight = model.unet.conv_in.weight
    record = {"prompt": prompt, "sample": sample, "negative_prompt": given["negative_prompt"], "seed": given["seed"],
              "n_samples": given["n_samples"], "sampler": given["sampler"], "steps": given["steps"], "scale": given["scale"],
              "guidance": str(guidance_rule(given["guidance"])), "eta": given["eta"], "height": height, "width": width,
              "dtype": DTYPE_NAMES.get(weight.dtype, str(weight.dtype).removeprefix("torch.")), "model": model_folder,
              "safety_checker": model.safety_checker is not None and given["safety_checker"] is not False}
    if given["text_layer"] is not None:
        record["text_layer"] = given["text_layer"]
    if given["cross_attention"] is not True:
        record["cross_attention"] = given["cross_attention"]
    return {**record, **more, "environment": environment}


RECORD_CHUNK = "altdiff-min"  # the PNG text chunk holding a picture's record, as JSON
# The web UIs' sampler names, for their "parameters" text (AUTOMATIC1111's spelling).
UI_SAMPLER_NAMES = {"ddim": "DDIM", "plms": "PLMS", "dpm++2m": "DPM++ 2M", "dpm++2m-karras": "DPM++ 2M Karras",
                    "euler": "Euler", "euler_a": "Euler a"}


def parameters(record: dict) -> str:
    """A picture's settings as the web UIs' "parameters" text: the prompt, "Negative prompt: …", then
    "Key: value" pairs (Steps, Sampler, CFG scale, Seed, Size as WxH, Model hash = the weights'
    SHA-256 cut to 10 hex digits as their AutoV2 hash, …)."""
    fields = {"Steps": record["steps"], "Sampler": UI_SAMPLER_NAMES.get(record["sampler"], record["sampler"]),
              "CFG scale": record["scale"], "Seed": record["seed"], "Size": f"{record['width']}x{record['height']}"}
    if record.get("eta"):  # only DDIM takes η (schedule.ROUTES), so it is 0 elsewhere
        fields["Eta"] = record["eta"]
    if record.get("guidance", "cfg") != "cfg":
        fields["Guidance"] = quoted(record["guidance"])
    model = record.get("model") or {}
    if model.get("weights_sha256"):
        fields["Model hash"] = model["weights_sha256"][:10]
    if model.get("path"):
        fields["Model"] = os.path.basename(model["path"].rstrip("/\\"))
    if record.get("init_img"):
        fields["Denoising strength"] = record["strength"]
    if record.get("text_layer") is not None:  # a sweep's ablations (picture_record): only when not generate's default
        fields["Text layer"] = record["text_layer"]
    if "cross_attention" in record:  # the UNet parts that read the text: "none" (False), a part, or a list
        parts = record["cross_attention"]
        fields["Cross attention"] = quoted(", ".join(map(str, parts)) if isinstance(parts, list) and parts
                                           else "none" if parts in (False, []) else str(parts))
    if training := record.get("training"):  # a training run's sample: the run's weights at that step
        fields["Training step"] = training["step"]
        fields["Training run"] = os.path.basename(training["run"].rstrip("/\\"))
    fields.update({"Batch size": record["n_samples"], "Batch pos": record["sample"], "Precision": record["dtype"],
                   "Version": f"altdiff-min {(record.get('environment') or {}).get('altdiff_min')}"})
    prompt = record["prompt"]
    lora = record.get("lora") or []  # a list; one dict in records of the time generate took one LoRA file
    for file in [lora] if isinstance(lora, dict) else lora:  # A1111's prompt tag: it carries the scale, and
        prompt += f" <lora:{os.path.splitext(os.path.basename(file['path']))[0]}:{file['scale']:g}>"  # applies the LoRA
    lines = [prompt] + ([f"Negative prompt: {record['negative_prompt']}"] if record.get("negative_prompt") else [])
    return "\n".join(lines + [", ".join(f"{k}: {v}" for k, v in fields.items())])


def quoted(value: str) -> str:
    """A "parameters" value holding a comma, quoted as the web UIs quote theirs."""
    return json.dumps(value, ensure_ascii=False) if "," in value else value


def text_chunks(record: dict) -> dict[str, str]:
    """The PNG text chunks that carry `record`, in the order they are written: the web UIs'
    "parameters" and RECORD_CHUNK (JSON). A PIL image whose .info holds them keeps them where the
    writer copies .info's text into the PNG (Gradio's PNG output does)."""
    return {"parameters": parameters(record), RECORD_CHUNK: json.dumps(record, ensure_ascii=False, allow_nan=False)}


def png_bytes(image: Image.Image, record: dict) -> bytes:
    """The picture as PNG bytes carrying `record` (RECORD_CHUNK, JSON) and its web-UI "parameters"."""
    info = PngInfo()
    for key, text in text_chunks(record).items():
        info.add_text(key, text)  # Pillow writes iTXt where the text is not Latin-1
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def record_of_png(path: str, what: str = "picture") -> dict | None:
    """The record a picture carries (png_bytes), or None for a PNG without one; only the header and the
    text chunks before the pixels are read (no decoding). A file that is not a PNG is one line."""
    try:
        with Image.open(path) as image:
            if image.format != "PNG":
                raise BadFile(f"{what} {path} is a {image.format} file, not a PNG that altdiff-min wrote")
            text = image.info.get(RECORD_CHUNK)
    except FileNotFoundError:
        raise BadFile(f"{what} {path} is not there") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadFile(f"{what} {path} is not a picture PIL can read ({type(e).__name__})") from None
    if text is None:
        return None
    record = parse_json(text, f"{what} {path}'s {RECORD_CHUNK} record")
    if not isinstance(record, dict):
        raise BadFile(f"{what} {path}'s {RECORD_CHUNK} record is not an object")
    return record
