"""A `generate` output folder: OUTDIR/samples/NNNNN.png, one line per picture in OUTDIR/manifest.jsonl,
and a grid per command. Each line records how to make its picture again (`generate --replay`).

    recover(outdir)              before a run: killed writes' partial files are removed, and a picture
                                 whose writer was killed before its line was appended gets one
                                 ("incomplete": true; its settings read from the picture's own record)
    save_picture(outdir, png, row)  the picture under the next free number, then its line, in that order
    job_rows(outdir, job)        one command's lines, in (prompt, sample) order

Order of the writes: the picture is linked to its number first and its line appended after, while the
writer still holds the lock on the picture (files.save_numbered's `then`). A kill in between leaves a
picture without a line, and the lock tells the next run that its writer is gone (a picture under way
in a concurrent run is still locked, and left alone). Lines that cannot be read (a torn last line)
are skipped by every reader (files.read_log).
"""
from __future__ import annotations

import json
import os
import re

from .files import MANIFEST, append_line, clean_partials, read_log, save_numbered
from .provenance import record_of_png

SAMPLES = "samples"
PICTURE = "{:05}.png"
NUMBERED = re.compile(r"\d+\.png")
INCOMPLETE = "the run that made this picture was stopped before it recorded it; settings read from the picture"


def paths(outdir: str) -> tuple[str, str]:
    """(the samples folder, the manifest) of an output folder."""
    return os.path.join(outdir, SAMPLES), os.path.join(outdir, MANIFEST)


def recorded_files(manifest: str) -> set[str]:
    return {row["file"] for _, row in read_log(manifest, "manifest")[0] if isinstance(row, dict)
            and isinstance(row.get("file"), str)}


def recover(outdir: str) -> tuple[list[str], list[str]]:
    """Finish what killed runs left in `outdir`: → (partial files removed, pictures given an
    "incomplete" line). Safe while other runs write into the same folder: only files no living writer
    holds are touched, and a picture is recorded only if its line is still missing once it is locked."""
    import fcntl

    samples, manifest = paths(outdir)
    removed = clean_partials(samples) + clean_partials(outdir)
    if not os.path.isdir(samples):
        return removed, []
    known = recorded_files(manifest)
    candidates = sorted(n for n in os.listdir(samples) if NUMBERED.fullmatch(n) and os.path.join(SAMPLES, n) not in known)
    held, recorded = [], []
    try:
        for name in candidates:
            try:
                fd = os.open(os.path.join(samples, name), os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            except OSError:
                continue  # removed meanwhile, or a link: not ours
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)  # its writer is alive: its line is on the way
                continue
            held.append((name, fd))
        if held:
            known = recorded_files(manifest)  # read again: a writer may have finished before we locked
        for name, _ in held:
            file = os.path.join(SAMPLES, name)
            if file in known:
                continue
            try:
                record = record_of_png(os.path.join(samples, name))
            except Exception:  # noqa: BLE001 — not a picture altdiff-min wrote: not ours to record
                record = None
            if record is None:
                continue
            append_line(manifest, json.dumps({"file": file, **record, "incomplete": True, "why": INCOMPLETE},
                                             ensure_ascii=False))
            recorded.append(file)
    finally:
        for _, fd in held:
            os.close(fd)
    return removed, recorded


def save_picture(outdir: str, png: bytes, row: dict) -> str:
    """Write `png` as the next free samples/NNNNN.png, then append its manifest line ({"file": …, **row}).
    → the picture's path."""
    samples, manifest = paths(outdir)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(png)

    def record(path: str) -> None:
        append_line(manifest, json.dumps({"file": os.path.relpath(path, outdir), **row}, ensure_ascii=False))

    return save_numbered(samples, PICTURE, write, then=record)


def job_rows(outdir: str, job: str) -> list[dict]:
    """The manifest lines of one generate command (all its processes), in prompt order then sample order.
    Lines that cannot be read (one a user edited, or one a killed write cut short) are not this job's."""
    rows = [row for _, row in read_log(paths(outdir)[1], "manifest")[0] if isinstance(row, dict) and row.get("job") == job]
    return sorted(rows, key=lambda r: (r["index"], r["sample"]))
