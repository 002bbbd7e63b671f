"""Reading and writing files so that nothing is lost: bounded JSON reads, fsync'd atomic writes, and a
lock per destination so that two processes never write the same one.

    with locked(path):                         a sibling .NAME.lock, held with flock; gone after
        with atomic_file(path) as tmp: …       write tmp, fsync, rename over path, fsync the folder
    save_numbered(folder, "{:05}.png", write)  a new numbered file, never replacing one
    append_line(path, text)                    one whole line at the end of a shared log (flock'd)

Every OSError becomes one line naming the path (errors.io_error).
"""
from __future__ import annotations

import json
import os
import stat
import uuid
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from .errors import BadFile, Busy, Missing, io_error

MAX_JSON_BYTES = 16 * 2**20  # a config is a few kB; anything this large is not one

MANIFEST = "manifest.jsonl"  # what generate appends one line to per picture (and score reads)


def read_text(path: str | os.PathLike, what: str = "text file", most: int = 64 * 2**20) -> str:
    """A UTF-8 file that must be a regular file of at most `most` bytes (not a device, FIFO or a huge
    file behind a symlink), without the byte-order mark some editors write; every failure names the file."""
    path = os.fspath(path)
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise BadFile(f"{path} is not a regular file (a folder, device or pipe), so it cannot be a {what}")
        if info.st_size > most:
            raise BadFile(f"{path} is {info.st_size} bytes; a {what} is at most {most} bytes")
        with open(path, "rb") as f:
            return f.read(most + 1).decode("utf-8").removeprefix("\ufeff")  # a byte-order mark is not text
    except FileNotFoundError:
        raise Missing(f"{what} not found: {path}") from None
    except OSError as e:
        raise io_error(path, e, "read") from None
    except UnicodeDecodeError as e:
        raise BadFile(f"{path} is not UTF-8 text (byte {e.start})") from None


def read_json(path: str | os.PathLike, what: str = "config") -> Any:
    """A JSON file, read as read_text reads (at most MAX_JSON_BYTES)."""
    try:
        return json.loads(read_text(path, what, MAX_JSON_BYTES))
    except json.JSONDecodeError as e:
        raise BadFile(f"{os.fspath(path)} is not valid JSON ({e})") from None


def make_folder(path: str, what: str = "folder") -> None:
    """Create `path` and its parents unless they exist; a file in the way, or a failure, is one line."""
    for folder in (os.path.dirname(os.path.abspath(path)), path):
        if os.path.lexists(folder) and not os.path.isdir(folder):
            raise BadFile(f"{what}: {folder} exists and is not a folder")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise io_error(path, e, "create") from None


def fsync_path(path: str) -> None:
    """Flush a file's or a folder's contents (a folder: its entries, after a rename) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sibling(path: str, kind: str) -> str:
    """A fresh hidden name beside `path`: .NAME.KIND-<random>; leftovers are found by their prefix."""
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{kind}-{uuid.uuid4().hex[:12]}")


def leftovers(path: str, kind: str) -> list[str]:
    parent, prefix = os.path.dirname(path), f".{os.path.basename(path)}.{kind}-"
    return sorted(os.path.join(parent, e) for e in os.listdir(parent) if e.startswith(prefix))


@contextmanager
def atomic_file(path: str) -> Iterator[str]:
    """Yield a temporary name beside `path`; once the block has written it, it is fsync'd and renamed
    to `path`, so `path` is either absent, the old file, or the complete new one. On failure the
    temporary file is removed and the error names `path`."""
    tmp = sibling(path, "partial")
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(os.path.dirname(path) or ".")
    except OSError as e:
        raise io_error(path, e) from None
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


@contextmanager
def locked(path: str) -> Iterator[None]:
    """Hold an exclusive lock on writing `path` (a sibling .NAME.lock, flock'd); raise Busy at once if
    another process holds it. The lock file is removed on release; a lock left by a killed process
    is released by the kernel. Without fcntl (Windows) writes are not locked."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover
        yield
        return
    lock = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.lock")
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise io_error(lock, e, "create") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise Busy(f"another process is writing {path} (it holds {lock}); wait for it to finish") from None
        try:  # the holder we waited on may have removed the file: lock the one that is there now
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        os.unlink(lock)
        os.close(fd)


def save_numbered(folder: str, pattern: str, write: Callable[[str], None]) -> str:
    """Write a new file pattern.format(n) in `folder`, n = how many files of that pattern are there
    (FlagAI continues the count), or the next free n: `write(tmp)` fills a temporary file, which is
    fsync'd and then hard-linked to its name. A link never replaces a file, so two processes
    writing into one folder take different numbers, and a failed write leaves nothing."""
    prefix, suffix = pattern.split("{")[0], pattern.rsplit("}", 1)[1]
    tmp = sibling(os.path.join(folder, "new" + suffix), "partial")
    try:
        write(tmp)
        fsync_path(tmp)
        n = sum(1 for f in os.listdir(folder) if f.startswith(prefix) and f.endswith(suffix) and not f.startswith("."))
        while True:
            path = os.path.join(folder, pattern.format(n))
            try:
                os.link(tmp, path)
                break
            except FileExistsError:
                n += 1
        fsync_path(folder)
        return path
    except OSError as e:
        raise io_error(folder, e, "write a new file into") from None
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)



def append_line(path: str, line: str) -> None:
    """Append `line` and a newline to `path` (created if missing) in one write, holding an exclusive
    flock on the file while doing so: lines from concurrent processes never interleave, none is lost.
    A file whose last line lacks its newline (a write cut short) gets one first: the line stays whole."""
    data = (line.rstrip("\n") + "\n").encode("utf-8")
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
    except OSError as e:
        raise io_error(path, e, "open") from None
    try:
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX)  # waits: a writer holds it for one write
        except ImportError:  # pragma: no cover (Windows: O_APPEND alone)
            pass
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data
        written = os.write(fd, data)
        if written != len(data):
            raise OSError(28, f"only {written} of {len(data)} bytes written")
        os.fsync(fd)
    except OSError as e:
        raise io_error(path, e, "append to") from None
    finally:
        os.close(fd)  # releases the lock
