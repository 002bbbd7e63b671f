"""Multilingual CLIP score of pictures and their prompts with AltCLIP-m9: `altdiff-min score PATH --clip ALTCLIP`.

    clip = load_clip("altclip-m9")                  an AltCLIP folder (`altdiff-min convert BAAI/AltCLIP-m9 altclip-m9`)
    clip.score(pictures, prompts)                   (N,) float32: one score per (picture, prompt) pair
    read_pairs(PATH)                                [(picture path, prompt), …]
    score_pictures(PATH, clip, out="scores.csv")    [{file, prompt, clip_score}, …], and the CSV

The score of a pair is altclip.clip_score: 100 · max(cos(image embedding, text embedding), 0), Hessel
et al.'s per-pair CLIPScore at torchmetrics' scale (torchmetrics clamps only its mean, so the means
differ where some cosine is negative). AltCLIP's text tower reads the nine m9 languages, so prompts in
any of them are scored against the same image embedding.

PATH is what `altdiff-min generate` wrote (an --outdir holding manifest.jsonl, or that manifest.jsonl
itself: each line's "file", relative to the manifest's folder, and its "prompt"), or a captioned
folder as `altdiff-min train` reads it (metadata.jsonl, or NAME.txt beside each NAME.png). Pictures
the safety checker replaced by a placeholder are left out (their score would be the placeholder's);
so are the images a captioned folder cannot use (without a caption, corrupt): both are reported.
"""
from __future__ import annotations

import csv
import math
import os
import sys
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from ..checks import check_int
from ..errors import BadFile, BadValue, Exists, Missing
from ..model.tokenizer import Tokenizer, check_prompt
from ..storage.files import atomic_file, locked, make_folder, read_log
from ..storage.pictures import open_picture, read_picture
from .altclip import AltCLIP, clip_score

REQUIRE = ("altclip",)  # what read_config must find in the folder given as the CLIP model
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MAX_BATCH = 4096  # pictures per forward pass; far above what fits a GPU at 224², it only stops typos


@dataclass
class Scorer:
    """An AltCLIP model and its tokenizer, from the folder `path` (load_clip)."""
    model: AltCLIP
    tokenizer: Tokenizer
    path: str

    def score(self, images, prompts: Sequence[str], batch_size: int = 32, progress: bool = False) -> torch.Tensor:
        """CLIP score of each (image, prompt) pair → (N,) float32 on the CPU.

        images: PIL images, picture files (opened a batch at a time, as `train` reads them: EXIF
        orientation applied, 16-bit scaled, transparency over white) or a float tensor (N, 3, H, W)
        in [0, 1]; prompts: one per image, any of the nine languages."""
        from tqdm import tqdm

        check_int("batch_size", batch_size, 1, MAX_BATCH)
        if isinstance(prompts, str):
            prompts = [prompts]
        if len(images) != len(prompts):
            raise BadValue(f"the CLIP score scores pairs: got {len(images)} pictures and {len(prompts)} prompts")
        scores = []
        with tqdm(total=len(prompts), desc="CLIP score", unit="pair", disable=not progress, leave=False) as bar:
            for start in range(0, len(prompts), batch_size):
                batch = images[start:start + batch_size]
                if not isinstance(batch, torch.Tensor):
                    batch = [read_picture(im) if isinstance(im, (str, os.PathLike)) else im for im in batch]
                scores.append(clip_score(self.model, self.tokenizer, batch, list(prompts[start:start + batch_size])).cpu())
                bar.update(len(batch))
        return torch.cat(scores) if scores else torch.zeros(0)


def check_picture_file(path: str, where: str = "") -> None:
    """A picture file that decodes (PIL's verify: its structure and checksums) and is within
    pictures.open_picture's bound on pixels, checked before any model loads."""
    from PIL import Image

    with open_picture(path, where) as image:
        try:
            image.verify()
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise BadFile(f"{where}{path} is not a picture PIL can read ({e})") from None


def load_clip(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
              check_finite: bool = True) -> Scorer:
    """The AltCLIP model of a model folder and its tokenizer; no network, no random init. dtype None:
    the folder's default_dtype if its config names one, else the dtype it was written in. An
    AltDiffusion folder (or anything else without the module altclip) is refused before any weight is read.
    check_finite: a weight holding NaN or infinity is refused (errors.NotFinite, naming the tensor)."""
    from ..arguments import check_device, check_dtype
    from ..storage.folder import read_folder, resolve

    device, dtype = check_device(device), check_dtype(dtype)
    path = resolve(path)
    if not isinstance(check_finite, bool):
        from ..errors import BadType

        raise BadType(f"check_finite must be True or False, got {check_finite!r}")
    _, tokenizer, modules = read_folder(path, REQUIRE, device, dtype, names=REQUIRE, check_finite=check_finite)
    return Scorer(modules["altclip"], tokenizer, os.fspath(path))


def read_pairs(path: str | os.PathLike) -> list[tuple[str, str]]:
    """(picture path, prompt) of every picture under PATH: a generate --outdir, its manifest.jsonl,
    or a captioned folder (see the module's docstring). Picture paths are absolute. A manifest line
    that is not generate's (torn by a killed write, edited) is skipped and reported; one that names a
    missing picture is an error naming the line; so is finding no pair at all."""
    from ..storage.files import MANIFEST

    path = os.fspath(path)
    if not os.path.lexists(path):
        raise Missing(f"pictures not found: {path}")
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, MANIFEST)):
        return captioned_pairs(path)
    manifest = os.path.join(path, MANIFEST) if os.path.isdir(path) else path
    folder, pairs, flagged = os.path.dirname(os.path.abspath(manifest)), [], 0
    rows, unread = read_log(manifest, "manifest")
    for n, row in rows:
        try:
            file, prompt = row["file"], row["prompt"]
            if not isinstance(file, str) or not isinstance(prompt, str):
                raise TypeError("'file' and 'prompt' must be strings")
            check_prompt(prompt)
        except (ValueError, KeyError, TypeError):
            unread.append(n)
            continue
        if row.get("flagged"):
            flagged += 1
            continue
        picture = os.path.join(folder, file)
        if not os.path.isfile(picture):
            raise Missing(f"{manifest} line {n}: picture not found: {picture}")
        check_picture_file(picture, f"{manifest} line {n}: ")
        pairs.append((picture, prompt))
    if unread:
        print(f"{manifest}: skipped {len(unread)} line(s) that are not generate's manifest lines (a write cut "
              f"short, or an edit): line {', '.join(map(str, sorted(unread)[:5]))}{' …' if len(unread) > 5 else ''}",
              file=sys.stderr)
    if flagged:
        print(f"{manifest}: left out {flagged} picture(s) the safety checker replaced by a placeholder", file=sys.stderr)
    if not pairs:
        raise BadValue(f"{manifest} names no picture to score")
    return pairs


def captioned_pairs(path: str) -> list[tuple[str, str]]:
    """Every (image, caption) of a captioned folder, read by dataset.CaptionedFolder: an image with
    several captions gives a pair for each; what it skips is reported."""
    from ..training.dataset import CaptionedFolder

    # Resolution 1: any picture is large enough. CaptionedFolder resizes only in pixels(), which is
    # not called; it decodes every image once, so a corrupt one is found before the model loads.
    data = CaptionedFolder(path, resolution=1)
    if data.skipped:
        print(f"{path}: skipped {data.report()}", file=sys.stderr)
    return [(os.path.join(data.path, file), text) for file, texts in zip(data.files, data.captions) for text in texts]


def check_out(out: str, force: bool) -> None:
    """OUT may be written: absent, or (force) a file; its folder is made."""
    if os.path.isdir(out):
        raise Exists(f"--out: {out} is a folder; name the CSV file to write")
    if os.path.lexists(out) and not force:
        raise Exists(f"{out} already exists; pass --force (force=True) to replace it")
    make_folder(os.path.dirname(os.path.abspath(out)), "--out")


def score_pictures(path: str | os.PathLike, clip: Scorer | str | os.PathLike, out: str | None = None,
                   batch_size: int = 32, progress: bool = True, force: bool = False,
                   device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> list[dict]:
    """The CLIP score of every picture under PATH (read_pairs) → rows {file, prompt, clip_score}, in
    PATH's order; with `out`, also written there as a CSV (atomically; an existing file is replaced
    only with force=True). clip: a Scorer, or an AltCLIP folder, loaded with device and dtype once
    PATH, out and batch_size have been checked."""
    from ..storage.folder import read_config

    check_int("batch_size", batch_size, 1, MAX_BATCH)
    if not isinstance(clip, Scorer):
        read_config(clip, require=REQUIRE)  # the folder's config: cheap, so before the pictures are read
    pairs = read_pairs(path)
    if out is not None:
        out = os.fspath(out)
        check_out(out, force)
    with locked(out) if out is not None else nullcontext():  # a second run writing the same CSV is told at once
        if not isinstance(clip, Scorer):
            clip = load_clip(clip, device, dtype)
        scores = clip.score([p for p, _ in pairs], [t for _, t in pairs], batch_size, progress)
        rows = [{"file": p, "prompt": t, "clip_score": s} for (p, t), s in zip(pairs, scores.tolist())]
        if out is not None:
            check_out(out, force)  # something else wrote OUT while the pictures were scored: it is kept
            with atomic_file(out) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
                writer = csv.DictWriter(f, fieldnames=["file", "prompt", "clip_score"])
                writer.writeheader()
                writer.writerows(rows)
    return rows


def summary(rows: list[dict]) -> str:
    """'N pictures: mean CLIP score X.XX (std Y.YY)', or where a picture has several captions 'N pairs of
    M pictures: …' (each (picture, prompt) pair is scored): the standard deviation of the scores
    themselves (ddof 0, numpy's default), not the standard error of the mean."""
    scores = [r["clip_score"] for r in rows]
    mean = sum(scores) / len(scores)
    std = math.sqrt(sum((s - mean) ** 2 for s in scores) / len(scores))
    pictures = len({r["file"] for r in rows})
    counted = f"{pictures} pictures" if pictures == len(rows) else f"{len(rows)} pairs of {pictures} pictures"
    return f"{counted}: mean CLIP score {mean:.2f} (std {std:.2f})"


def run(args) -> int:
    """`altdiff-min score`: every argument is checked before the model loads."""
    from ..arguments import check_device

    check_int("--batch-size", args.batch_size, 1, MAX_BATCH)
    device = check_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rows = score_pictures(args.path, args.clip, args.out, args.batch_size, not args.no_progress, args.force,
                          device, DTYPES[args.dtype])
    if args.out:
        print(args.out)
    print(summary(rows))
    return 0
