"""checksums.json: the SHA-256 of a model folder's weights, written with them, so that a record of
what made a picture or a run (folder.fingerprint) names the weights without reading gigabytes: the
recorded hash stands while the file's size and mtime are the recorded ones; otherwise, or on demand
(full=True), the file is hashed again.
"""
from __future__ import annotations

import json
import os

from ..errors import AltDiffError, Missing, io_error
from .files import read_json

CHECKSUMS = "checksums.json"  # {"format", "files": {NAME: {"sha256", "size", "mtime_ns"}}}, written with the weights


def file_sha256(file: str) -> str:
    """The SHA-256 of a file, read in 1 MiB pieces (a model is gigabytes; it is never held whole)."""
    import hashlib

    digest, buffer = hashlib.sha256(), bytearray(2**20)
    view = memoryview(buffer)
    with open(file, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def write_checksums(folder: str, name: str) -> None:
    """checksums.json: the SHA-256 of `folder`'s weights as written, with the size and mtime that say
    the file is still the one hashed (`sha256_of`). Call once the weights are written and closed."""
    file = os.path.join(folder, name)
    info = os.stat(file)
    record = {"format": "altdiff-min-checksums", "files": {name: {
        "sha256": file_sha256(file), "size": info.st_size, "mtime_ns": info.st_mtime_ns}}}
    with open(os.path.join(folder, CHECKSUMS), "w") as f:
        json.dump(record, f, indent=2)


def recorded_checksum(folder: str, name: str) -> dict | None:
    """checksums.json's entry for `name` ({"sha256", "size", "mtime_ns"}), or None: no record (a folder
    written before it was kept), or one that is not readable or not well-formed (it only spares a
    hash; the weights are hashed again)."""
    try:
        record = read_json(os.path.join(folder, CHECKSUMS), "checksum record")
        entry = record["files"][name]
    except (AltDiffError, KeyError, TypeError):
        return None
    if (isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and len(entry["sha256"]) == 64
            and all(isinstance(entry.get(k), int) and not isinstance(entry.get(k), bool) for k in ("size", "mtime_ns"))):
        return entry
    return None


HASHED: dict[tuple, str] = {}  # (file, device, inode, size, mtime, ctime) → SHA-256: folders without a record, hashed once a process


def sha256_of(folder: str, name: str, full: bool = False) -> str:
    """The SHA-256 of `folder`'s file `name` (a model folder's model.safetensors). Cheap: checksums.json's, while the file's size
    and mtime are the recorded ones; otherwise (the file was changed, copied, or written before the
    record was kept) the file is hashed. full=True hashes it whatever the record says: a change that
    kept the size and put the mtime back (`touch -d`) is caught only so."""
    file = os.path.join(folder, name)
    try:
        info = os.stat(file)
        if not full:
            entry = recorded_checksum(folder, name)
            if entry is not None and (entry["size"], entry["mtime_ns"]) == (info.st_size, info.st_mtime_ns):
                return entry["sha256"]
        key = (file, info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
        if full or key not in HASHED:
            HASHED[key] = file_sha256(file)
        return HASHED[key]
    except FileNotFoundError:
        raise Missing(f"{folder} has no {name}: it is not a model folder") from None
    except OSError as e:
        raise io_error(file, e, "read") from None
