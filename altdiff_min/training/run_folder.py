"""A training run's folder (OUT_DIR of `altdiff-min train`): what it holds and how it is written.

    run.json        what the run is: the base model, the data, the settings, the global batch
    checkpoint.pt   everything a restart needs (weights, optimizer, LR schedule, EMA, grad scaler,
                    rng_states(), step: written by train.train), replaced atomically
    loss.jsonl      one {"step", "loss", "lr", "seconds"} per optimizer step; loss.png draws it
    samples/        step-NNNNNNN-K.png: the --sample-prompt pictures, every --sample-every steps, each
                    carrying its record (prompt, seed, sampler, steps, the training step, the run folder)
    model/          the result, a model folder `altdiff_min.load` reads (written at the end)
    learned_embeds.safetensors   instead, with --train embeddings: the new words' rows (training/words.py)
    lora/           a --lora run's result instead: pytorch_lora_weights.safetensors (diffusers/peft
                    format; its metadata names the base model it belongs to), no model folder

Only rank 0 writes, holding a lock on the folder for the whole run, so two runs never write one
folder. Every file is written under a temporary name and renamed into place: a run killed at any
moment leaves the previous checkpoint whole. `--force` replaces only a folder holding a run.json that
altdiff-min wrote; `--resume` continues the run the folder holds.
"""
from __future__ import annotations

import errno
import json
import os
import random
import shutil
from typing import Any

import numpy as np
import torch

from ..errors import AltDiffError, BadFile, Exists, Missing, io_error
from ..storage.files import (
    atomic_file,
    fsync_path,
    make_folder,
    open_append,
    partial_files,
    read_json,
    read_log,
    refuse_link,
    sibling,
)

FORMAT = "altdiff-min-train"
RUN, CHECKPOINT, LOSSES, CURVE, SAMPLES, MODEL = "run.json", "checkpoint.pt", "loss.jsonl", "loss.png", "samples", "model"
LORA = "lora"


def is_run_folder(path: str) -> bool:
    try:
        return not os.path.islink(path) and read_json(os.path.join(path, RUN), RUN).get("format") == FORMAT
    except (AltDiffError, AttributeError):
        return False


def prepare(path: str, force: bool, resume: bool) -> dict | None:
    """Make OUT_DIR ready (call holding `locked(path)`): new, replaced (force) or resumed. Returns the
    recorded run.json when resuming, else None. Leftover temporary files of a killed run are removed."""
    if force and resume:
        raise AltDiffError("give --force (start again) or --resume (continue), not both")
    if resume:
        if not os.path.isdir(path):
            raise Missing(f"--resume: {path} does not exist; start the run without --resume")
        if not os.path.islink(path):
            check_links(path)
        if not is_run_folder(path):
            raise BadFile(f"--resume: {path} is not a training run folder (no {RUN} that altdiff-min wrote)")
        for folder in (path, os.path.join(path, SAMPLES)):  # writes a kill interrupted (checkpoint, log, curve,
            for leftover in partial_files(folder):        # run.json, samples); the files they were replacing are whole
                os.unlink(leftover)
        return read_json(os.path.join(path, RUN), RUN)
    if os.path.isdir(path) and not os.path.islink(path) and not os.listdir(path):
        return None  # an empty folder (made by hand, or left by a run that failed at once): nothing to lose
    if os.path.lexists(path):
        if not force:
            raise Exists(f"{path} already exists; pass --resume to continue its run or --force to start it again")
        if not is_run_folder(path):
            raise Exists(f"{path} is not a training run folder; --force replaces only a run folder altdiff-min wrote")
        old = sibling(path, "old")
        os.replace(path, old)
        shutil.rmtree(old)
    make_folder(path, "OUT_DIR")
    return None


def write_json(path: str, value: Any) -> None:
    with atomic_file(path) as tmp, open(tmp, "w") as f:
        json.dump(value, f, indent=2, ensure_ascii=False, allow_nan=False)


def write_failed(path: str, e: Exception) -> BadFile:
    """What torch.save and safetensors raise when a write fails (a full disk, a file size limit) — a
    RuntimeError "… unexpected pos …" or a SafetensorError "… I/O error: …", not an OSError — as
    one line naming the file that was being written; io_error's line for an OSError."""
    if isinstance(e, OSError):
        return io_error(path, e)
    return BadFile(f"cannot write {path}: {type(e).__name__}: {str(e).strip()[:200]} (is the disk full?)")


def save_checkpoint(path: str, state: dict) -> None:
    """checkpoint.pt, replaced atomically: a failed write (a full disk) is one line and leaves the
    previous checkpoint as it was."""
    file = os.path.join(path, CHECKPOINT)
    with atomic_file(file) as tmp:
        try:
            torch.save(state, tmp)
        except RuntimeError as e:  # PytorchStreamWriter's "unexpected pos" / "file write failed"
            raise write_failed(file, e) from None


def check_links(path: str) -> None:
    """Raise (one line naming it) if what a run writes in OUT_DIR (run.json, checkpoint.pt, loss.jsonl,
    loss.png, samples/ and its pictures, model/, lora/) is a symbolic link: nothing is written through one,
    and this says so before a resumed run trains rather than at its first write."""
    names = [os.path.join(path, name) for name in (RUN, CHECKPOINT, LOSSES, CURVE, SAMPLES, MODEL, LORA)]
    samples = os.path.join(path, SAMPLES)
    if os.path.isdir(samples) and not os.path.islink(samples):
        names += [os.path.join(samples, name) for name in sorted(os.listdir(samples))]
    for name in names:
        if os.path.islink(name):
            raise BadFile(f"{name} is a symbolic link; altdiff-min does not write a run's files through links (remove it)")


def rng_states() -> dict:
    """Every random generator's state (torch CPU and CUDA, Python's, numpy's): a checkpoint's "rng"."""
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate(), "numpy": [x.tolist() if isinstance(x, np.ndarray) else x for x in np.random.get_state()]}


def set_rng_states(states: dict) -> None:
    """Put back what rng_states() saved (the checkpoint may have been loaded onto a GPU: states are CPU bytes)."""
    torch.set_rng_state(states["torch"].cpu())
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in states["cuda"]])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in states["python"]))
    kind, key, *rest = states["numpy"]
    np.random.set_state((kind, np.array(key, dtype=np.uint32), *rest))


def load_checkpoint(path: str, device: torch.device) -> dict | None:
    """The folder's checkpoint (read with weights_only=True: nothing in it is executed), or None."""
    file = os.path.join(path, CHECKPOINT)
    if not os.path.exists(file):
        return None
    try:
        return torch.load(file, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001 — a checkpoint that does not load is a bad file, whatever the cause
        raise BadFile(f"{file} cannot be read ({type(e).__name__}: {str(e)[:200]})") from None


class LossLog:
    """loss.jsonl, appended one line per step (one write of the whole line); on resume cut back to the
    checkpoint's step, so the log of a resumed run is the log of an uninterrupted one. A line that
    cannot be read (the torn last line of a write cut short by a full disk or a power cut) is dropped,
    as it is past the checkpoint's step anyway. `seconds`: the last kept row's training time, from
    which a resumed run counts on. Written only through open_append (never through a symbolic link)."""

    def __init__(self, path: str, upto: int):
        self.file = os.path.join(path, LOSSES)
        refuse_link(self.file, "log")
        rows, _ = read_log(self.file, LOSSES)
        self.rows = [row for _, row in rows if isinstance(row, dict) and isinstance(row.get("step"), int)
                     and row["step"] <= upto and isinstance(row.get("loss"), (int, float))]
        seconds = [row.get("seconds") for row in self.rows]
        self.seconds = float(seconds[-1]) if seconds and isinstance(seconds[-1], (int, float)) else 0.0
        with atomic_file(self.file) as tmp, open(tmp, "w") as f:
            f.writelines(json.dumps(row, allow_nan=False) + "\n" for row in self.rows)
        self.fd = open_append(self.file, "log")

    def append(self, row: dict) -> None:
        data = (json.dumps(row, allow_nan=False) + "\n").encode("utf-8")
        try:
            if (written := os.write(self.fd, data)) != len(data):
                raise OSError(errno.ENOSPC, f"only {written} of {len(data)} bytes written (is the disk full?)")
        except OSError as e:
            raise io_error(self.file, e, "append to") from None
        self.rows.append(row)

    def close(self) -> None:
        os.close(self.fd)


def draw_curve(losses: list[float], file: str, title: str = "training loss") -> None:
    """loss.png: the loss of every step (light) and its running mean over ~2% of the run (dark), drawn
    with PIL so that training needs no plotting library."""
    from PIL import Image, ImageDraw

    w, h, pad = 640, 360, 48
    image = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle((pad, pad // 2, w - pad // 2, h - pad), outline="black")
    if losses:
        window = max(1, len(losses) // 50)
        smooth = [sum(losses[max(0, i - window + 1):i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(losses))]
        low, high = min(losses), max(losses)
        span = (high - low) or 1.0

        def point(i: int, y: float) -> tuple[float, float]:
            x = pad + (w - 1.5 * pad) * (i / max(1, len(losses) - 1))
            return x, h - pad - (h - 1.5 * pad) * (y - low) / span

        for values, colour in ((losses, (170, 190, 230)), (smooth, (20, 60, 170))):
            draw.line([point(i, y) for i, y in enumerate(values)], fill=colour, width=2 if values is smooth else 1)
        draw.text((4, pad // 2), f"{high:.4g}", fill="black")
        draw.text((4, h - pad - 10), f"{low:.4g}", fill="black")
        draw.text((pad, h - pad + 6), "step 1", fill="black")
        draw.text((w - pad * 2, h - pad + 6), f"step {len(losses)}", fill="black")
    draw.text((pad, 4), title, fill="black")
    with atomic_file(file) as tmp:
        image.save(tmp, format="PNG")


def save_samples(path: str, step: int, images: list, records: list[dict]) -> None:
    """samples/step-NNNNNNN-K.png: picture K, carrying records[K] (provenance.png_bytes: its "parameters"
    text and the altdiff-min record), written atomically."""
    from ..storage.provenance import png_bytes

    folder = os.path.join(path, SAMPLES)
    if os.path.islink(folder):  # make_folder would take the folder it points to
        raise BadFile(f"{folder} is a symbolic link; altdiff-min does not write a run's files through links (remove it)")
    make_folder(folder, "samples")
    for k, (image, record) in enumerate(zip(images, records, strict=True)):
        with atomic_file(os.path.join(folder, f"step-{step:07d}-{k}.png")) as tmp, open(tmp, "wb") as f:
            f.write(png_bytes(image, record))
    fsync_path(folder)
