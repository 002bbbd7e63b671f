"""Training data for `altdiff-min train`: pictures with captions.

    CaptionedFolder(path, resolution)   a folder of images, captioned in metadata.jsonl (one
                                        {"file_name": …, "text": …} per line: the Hugging Face
                                        imagefolder convention) or in a NAME.txt beside each NAME.png
    "toy"                               the toy's shapes (toy/world.py registers it): captions in nine languages

Both give example i's pixels(i), (3, R, R) float32 in [−1, 1], and texts(i), its captions: a tuple,
since an example may have several (a list as "text"); training picks one per draw.

A folder is read in full before training starts, so that bad data is found before the first step, not
in the middle of a run: every image is decoded. An image without a caption, a caption without an image,
an image that does not decode (corrupt, truncated, not an image) and an image smaller than the
resolution are skipped, counted and reported (`skipped`); a malformed metadata.jsonl line is an error
naming the line; no usable example at all is an error. Grayscale, palette, RGBA (over white), CMYK and
16-bit images are converted to 8-bit RGB; the EXIF orientation is applied; then the shorter side is
resized to R (bicubic) and the centre R × R is cropped.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ..errors import BadFile, BadValue, Missing, TooManyPixels
from ..model.tokenizer import check_prompt
from ..storage.files import parse_json, read_text
from ..storage.pictures import pixel_limit_reason, read_picture

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
METADATA = "metadata.jsonl"
Example = tuple[torch.Tensor, tuple[str, ...]]


def center_crop(image: Image.Image, resolution: int) -> torch.Tensor:
    """Shorter side resized to `resolution`, the centre square cropped → (3, R, R) in [−1, 1]."""
    w, h = image.size
    scale = resolution / min(w, h)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    image = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=None)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
    return pixels.float() / 127.5 - 1


@dataclass
class CaptionedFolder:
    path: str
    resolution: int
    progress: bool = False
    files: list[str] = field(default_factory=list)  # relative to path, in sorted order
    captions: list[tuple[str, ...]] = field(default_factory=list)
    skipped: dict[str, list[str]] = field(default_factory=dict)  # reason → files (relative)
    source: str = ""  # "metadata.jsonl" or ".txt files"

    def __post_init__(self):
        if not os.path.isdir(self.path):
            raise Missing(f"data folder not found: {self.path}" if not os.path.lexists(self.path)
                          else f"data: {self.path} is not a folder")
        self.path = os.path.abspath(self.path)
        images, texts = self.walk()
        listed = self.read_metadata() if os.path.lexists(os.path.join(self.path, METADATA)) else self.read_txt(images, texts)
        for file in images:
            if file not in listed:
                self.skip("image without a caption", file)
        candidates, present = [], set(images)
        for file, captions in sorted(listed.items()):
            if captions is None:  # skipped already, with its reason
                continue
            if file in present:
                candidates.append((file, captions))
            else:
                self.skip("caption without an image", file)

        for file, captions in tqdm(candidates, desc="checking images", disable=not self.progress, leave=False):
            if not captions:  # an empty caption would train the unconditional model unasked (see --uncond-prob)
                self.skip("empty caption", file)
            elif problem := self.check_image(file):
                self.skip(problem, file)
            else:
                self.files.append(file)
                self.captions.append(captions)
        if not self.files:
            found = f"{len(images)} image(s), {len(listed)} caption(s) ({self.source})"
            raise BadValue(f"data {self.path}: no usable example: {found}" + (f"; skipped {self.report()}" if self.skipped else ""))

    def skip(self, reason: str, file: str) -> None:
        self.skipped.setdefault(reason, []).append(file)

    def walk(self) -> tuple[list[str], list[str]]:
        """The images and the .txt files under the folder (relative paths, sorted; hidden ones skipped).
        Linked sub-folders are read (data often links to shared storage), each real folder once: a
        second way into one (a link loop) is skipped and reported, as is a folder that cannot be read."""
        images, texts, seen = [], [], {os.path.realpath(self.path)}
        unreadable = lambda e: self.skip("folder that cannot be read", os.path.relpath(e.filename, self.path))
        for root, dirs, files in os.walk(self.path, followlinks=True, onerror=unreadable):
            kept = []
            for d in sorted(d for d in dirs if not d.startswith(".")):
                if (real := os.path.realpath(os.path.join(root, d))) in seen:
                    self.skip("folder reached a second time (a link)", os.path.relpath(os.path.join(root, d), self.path))
                else:
                    seen.add(real)
                    kept.append(d)
            dirs[:] = kept
            for f in files:
                if not f.startswith("."):
                    rel = os.path.relpath(os.path.join(root, f), self.path)
                    (images if f.lower().endswith(IMAGE_EXTENSIONS) else texts if f.lower().endswith(".txt") else []).append(rel)
        return sorted(images), sorted(texts)

    def read_metadata(self) -> dict[str, tuple[str, ...]]:
        """file_name → captions from metadata.jsonl; a line that is not {"file_name": str, "text": str or
        [str, …]} is an error naming the line (a broken file is fixed, not silently half-read)."""
        self.source = METADATA
        file = os.path.join(self.path, METADATA)
        listed: dict[str, tuple[str, ...]] = {}
        for n, line in enumerate(read_text(file, METADATA).splitlines(), 1):
            if not line.strip():
                continue
            where = f"{file} line {n}"
            entry = parse_json(line, where)
            if not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str) or "text" not in entry:
                raise BadFile(f"{where}: expected an object with \"file_name\" (a string) and \"text\", got {line.strip()[:80]}")
            texts = entry["text"] if isinstance(entry["text"], list) else [entry["text"]]
            if not texts or not all(isinstance(t, str) for t in texts):
                raise BadFile(f"{where}: \"text\" must be a string or a non-empty list of strings")
            for text in texts:
                try:
                    check_prompt(text)
                except BadValue as e:
                    raise BadFile(f"{where}: {e}") from None
            name = os.path.normpath(entry["file_name"])
            if os.path.isabs(name) or name.startswith(".."):
                raise BadFile(f"{where}: file_name {entry['file_name']!r} is outside the data folder")
            if name in listed:
                raise BadFile(f"{where}: {name} is listed twice")
            listed[name] = tuple(t for t in texts if t.strip())  # () : skipped as an empty caption
        return listed

    def read_txt(self, images: list[str], texts: list[str]) -> dict[str, tuple[str, ...]]:
        """NAME.png → the text of NAME.txt beside it (stripped); a .txt without an image is reported."""
        self.source = ".txt files"
        stems: dict[str, list[str]] = {}
        for f in images:
            stems.setdefault(os.path.splitext(f)[0], []).append(f)
        listed = {}
        for rel in texts:
            found = stems.get(os.path.splitext(rel)[0], [])
            if not found:
                self.skip("caption without an image", rel)
                continue
            if len(found) > 1:  # a.png and a.jpg beside a.txt: which one it describes is anyone's guess
                for image in found:
                    self.skip(f"one caption file for several images ({rel})", image)
                    listed[image] = None
                continue
            text = read_text(os.path.join(self.path, rel), "caption file").strip()
            check_prompt(text)
            listed[found[0]] = (text,) if text else ()
        return listed

    def check_image(self, file: str) -> str | None:
        """Why this image cannot be used, or None: it must decode in full and be at least R on its shorter side."""
        try:
            w, h = read_picture(os.path.join(self.path, file)).size
        except TooManyPixels:
            return pixel_limit_reason()
        except (BadFile, Missing):
            return "corrupt, truncated or not an image"
        if min(w, h) < self.resolution:
            return f"smaller than the resolution ({self.resolution} px)"
        return None

    def __len__(self) -> int:
        return len(self.files)

    def pixels(self, i: int) -> torch.Tensor:
        file = os.path.join(self.path, self.files[i])
        try:
            return center_crop(read_picture(file), self.resolution)
        except (BadFile, Missing) as e:  # it decoded when the run started: it was changed or removed since
            raise BadFile(f"{file} could not be read any more ({e})") from None

    def texts(self, i: int) -> tuple[str, ...]:
        return self.captions[i]

    def __getitem__(self, i: int) -> Example:
        return self.pixels(i), self.texts(i)

    def report(self) -> str:
        """'3 (2 corrupt…: a.png, b.png; 1 image without a caption: c.png)', or '0'."""
        parts = [f"{len(files)} {reason}: {', '.join(files[:3])}{', …' if len(files) > 3 else ''}"
                 for reason, files in self.skipped.items()]
        total = sum(len(files) for files in self.skipped.values())
        return f"{total} ({'; '.join(parts)})" if total else "0"

    def describe(self) -> dict:
        """What the run records about its data; "content": a SHA-256 of every example's file name, size
        and captions, so a resumed run notices rewritten captions or swapped files under the same path."""
        import hashlib

        digest = hashlib.sha256()
        for file, captions in zip(self.files, self.captions):
            size = os.path.getsize(os.path.join(self.path, file))
            digest.update(json.dumps([file, size, list(captions)], ensure_ascii=False).encode("utf-8") + b"\n")
        return {"kind": "folder", "path": self.path, "captions": self.source, "examples": len(self.files),
                "resolution": self.resolution, "skipped": {r: len(f) for r, f in self.skipped.items()},
                "content": digest.hexdigest()}


NAMED: dict[str, Callable[[], Any]] = {}  # data known by a name: "toy", the toy world (toy/world.py registers it)


def register_data(name: str, make: Callable[[], Any]) -> None:
    """Data that DATA `name` of `altdiff-min train` means: make() gives it (len, pixels, texts, resolution,
    describe); make.resolution is its pictures' side, read before the data is made."""
    NAMED[name] = make


def open_data(data: str, resolution: int, progress: bool = False):
    """DATA of `altdiff-min train`: a registered name ("toy": the toy world, 64 px) or a captioned folder."""
    if data in NAMED:
        if os.path.isdir(data):
            raise BadValue(f"data {data!r} names the {data} world, and there is also a folder {data} here: pass "
                           f"./{data} for the folder")
        world = NAMED[data]()
        if resolution != world.resolution:
            raise BadValue(f"the {data} world's pictures are {world.resolution} px; --resolution {resolution} does not fit")
        return world
    return CaptionedFolder(data, resolution, progress)
