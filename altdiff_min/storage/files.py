"""Reading and writing files so that nothing is lost: bounded JSON reads, fsync'd atomic writes, and a
lock per destination so that two processes never write the same one.

    read_json(path) / parse_json(text, where)  the one JSON reader: size and depth bounded, one-line errors
    read_log(path, what)                       an append-only JSON-lines log; lines it cannot read (a torn
                                               last line, an edited one) are skipped and counted
    with locked(path):                         a sibling .NAME.lock, held with flock; gone after
        with atomic_file(path) as tmp: …       write tmp, fsync, rename over path, fsync the folder
    save_numbered(folder, "{:05}.png", write)  a new numbered file, never replacing one
    append_line(path, text)                    one whole line at the end of a shared log (flock'd)
    clean_partials(folder)                     remove temporary files no living writer holds

Nothing is written *through* a symbolic link: a destination that is a link, or not a regular file, is
refused in one line (a link named manifest.jsonl could otherwise make altdiff-min append to any file the
user can write). A temporary file is flock'd by its writer from creation to rename, so another run can
tell a killed write's leftover (remove it) from one under way (leave it).

Every OSError becomes one line naming the path (errors.io_error).
"""
from __future__ import annotations

import json
import os
import stat
import uuid
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from ..errors import BadFile, Busy, Missing, io_error

MAX_JSON_BYTES = 16 * 2**20  # a config is a few kB; anything this large is not one
MAX_JSON_DEPTH = 64  # a config nests 3 levels, a manifest line 2; "[" * 100000 is an attack, not data
MAX_LINE_BYTES = 2**20  # one line of a JSON-lines log: a manifest line is ~1 kB

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


def parse_json(text: str | bytes, where: str) -> Any:
    """The one JSON parser: `text` of at most MAX_JSON_BYTES, nesting at most MAX_JSON_DEPTH levels; any
    failure is one BadFile line naming `where` (a file, or a file and a line). Python's parser recurses
    once per level, so deep nesting would otherwise end in a RecursionError traceback."""
    if len(text) > MAX_JSON_BYTES:
        raise BadFile(f"{where} is {len(text)} bytes of JSON; at most {MAX_JSON_BYTES} are read")
    try:
        value = json.loads(text)
    except RecursionError:
        raise BadFile(f"{where} nests JSON deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as e:  # JSONDecodeError, bad UTF-8, an integer of more digits than Python converts
        raise BadFile(f"{where} is not valid JSON ({e})") from None
    if json_depth(value) > MAX_JSON_DEPTH:
        raise BadFile(f"{where} nests JSON deeper than {MAX_JSON_DEPTH} levels")
    return value


def json_depth(value: Any) -> int:
    """How many lists/objects deep `value` nests (0 for a number or string), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, (list, dict)):
            deepest = max(deepest, depth)
            if depth <= MAX_JSON_DEPTH:  # deeper is refused anyway: no need to walk it
                stack.extend((x, depth + 1) for x in (v.values() if isinstance(v, dict) else v))
    return deepest


def read_json(path: str | os.PathLike, what: str = "config") -> Any:
    """A JSON file, read as read_text reads (at most MAX_JSON_BYTES) and parsed by parse_json."""
    return parse_json(read_text(path, what, MAX_JSON_BYTES), os.fspath(path))


def read_log(path: str | os.PathLike, what: str = "log") -> tuple[list[tuple[int, Any]], list[int]]:
    """An append-only JSON-lines file (manifest.jsonl, loss.jsonl) → ([(line number, value)], [line
    numbers not read]). A line that is not JSON, over MAX_LINE_BYTES, or nested too deep is skipped and
    its number returned: a write cut short (disk full, power cut, kill) leaves a torn last line, and one
    bad line must not make the whole log, or every later run that reads it, fail. Blank lines are
    neither. A missing file is an empty log; a path that is not a regular file is one line."""
    path = os.fspath(path)
    rows, unread = [], []
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO must not block the open
    except FileNotFoundError:
        return rows, unread
    except OSError as e:
        raise io_error(path, e, "read") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise BadFile(f"{path} is not a regular file (a folder, device or pipe), so it cannot be a {what}")
    with os.fdopen(fd, "rb") as f:
        try:
            for n, line in enumerate(iter(lambda: f.readline(MAX_LINE_BYTES + 1), b""), 1):
                if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
                    unread.append(n)
                    while (rest := f.readline(MAX_LINE_BYTES + 1)) and not rest.endswith(b"\n"):
                        pass  # the remainder of an over-long line is the same line
                    continue
                if not line.strip():
                    continue
                try:
                    rows.append((n, parse_json(line, f"{path} line {n}")))
                except BadFile:
                    unread.append(n)
        except OSError as e:
            raise io_error(path, e, "read") from None
    return rows, unread


def make_folder(path: str, what: str = "folder") -> None:
    """Create `path` and its parents unless they exist; a file in the way, or a failure, is one line."""
    for folder in (os.path.dirname(os.path.abspath(path)), path):
        if os.path.lexists(folder) and not os.path.isdir(folder):
            raise BadFile(f"{what}: {folder} exists and is not a folder")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise io_error(path, e, "create") from None


def refuse_link(path: str, what: str = "file") -> None:
    """Raise unless `path` is absent or a regular file: altdiff-min never writes through a symbolic
    link, nor onto a folder, device or pipe."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise io_error(path, e, "check") from None
    if stat.S_ISLNK(info.st_mode):
        raise BadFile(f"{path} is a symbolic link; altdiff-min does not write {what}s through links (remove it)")
    if not stat.S_ISREG(info.st_mode):
        raise BadFile(f"{path} is not a regular file (a folder, device or pipe), so it cannot be written as a {what}")


def open_regular(path: str, flags: int, what: str, mode: int = 0o666, doing: str = "open") -> int:
    """A descriptor of `path` (created if missing) opened with `flags`, without following a final
    symbolic link (O_NOFOLLOW) and refused unless it is a regular file; the caller closes it."""
    try:
        fd = os.open(path, flags | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0), mode)
    except OSError as e:
        if os.path.islink(path):
            raise BadFile(f"{path} is a symbolic link; altdiff-min does not write {what}s through links (remove it)") from None
        raise io_error(path, e, doing) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise BadFile(f"{path} is not a regular file (a folder, device or pipe), so it cannot be written as a {what}")
    return fd


def open_append(path: str, what: str = "file") -> int:
    """A descriptor appending to `path` (open_regular: created if missing, no link followed)."""
    return open_regular(path, os.O_RDWR | os.O_APPEND, what)


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


def new_temporary(path: str) -> tuple[str, int]:
    """A fresh `.NAME.partial-*` file beside `path`, created exclusively (never a link someone placed)
    and flock'd: → (its name, the descriptor holding the lock; close it when the write is over). The
    writer fills it by name; the lock is on the file, so it covers a hard link to it as well."""
    tmp = sibling(path, "partial")
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
    except OSError as e:
        raise io_error(tmp, e, "create") from None
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:  # pragma: no cover (Windows: leftovers are not told apart)
        pass
    return tmp, fd


def partial_files(folder: str) -> list[str]:
    """The temporary files (sibling's `.NAME.partial-*`) in `folder`, under way or left by a killed write."""
    if not os.path.isdir(folder):
        return []
    return sorted(os.path.join(folder, e) for e in os.listdir(folder) if e.startswith(".") and ".partial-" in e
                  and os.path.isfile(os.path.join(folder, e)))


def clean_partials(folder: str) -> list[str]:
    """Remove the `.NAME.partial-*` files in `folder` that no process is writing (a killed write's
    leftovers: their writer's flock died with it); leave those under way. → the removed paths."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover
        return []
    removed = []
    try:
        names = sorted(e for e in os.listdir(folder) if e.startswith(".") and ".partial-" in e)
    except FileNotFoundError:
        return removed
    except OSError as e:
        raise io_error(folder, e, "read") from None
    for name in names:
        path = os.path.join(folder, name)
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        except OSError:
            continue  # gone meanwhile, a link, or not ours to read: not a leftover of ours
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a living writer holds it
            if os.path.lexists(path) and os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                os.unlink(path)
                removed.append(path)
        except OSError as e:
            raise io_error(path, e, "remove") from None
        finally:
            os.close(fd)
    return removed


def leftovers(path: str, kind: str) -> list[str]:
    parent, prefix = os.path.dirname(path), f".{os.path.basename(path)}.{kind}-"
    return sorted(os.path.join(parent, e) for e in os.listdir(parent) if e.startswith(prefix))


@contextmanager
def atomic_file(path: str) -> Iterator[str]:
    """Yield a temporary name beside `path`; once the block has written it, it is fsync'd and renamed
    to `path`, so `path` is either absent, the old file, or the complete new one. On failure the
    temporary file is removed and the error names `path`. A `path` that is a symbolic link (or not a
    regular file) is refused before anything is written."""
    refuse_link(path)
    tmp, fd = new_temporary(path)
    try:
        yield tmp
        fsync_path(tmp)
        refuse_link(path)  # a link put there while the file was written
        os.replace(tmp, path)
        fsync_path(os.path.dirname(path) or ".")
    except OSError as e:
        raise io_error(path, e) from None
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        os.close(fd)


def put_in_place(tmp: str, path: str) -> None:
    """Rename the finished folder `tmp` to `path`: an old `path` is moved aside first (`.NAME.old-*`) and
    removed after, the parent fsync'd after each rename; if the new one cannot be put in place the old
    one goes back. A killed process leaves at most the old one beside `path` (folder.recover)."""
    import shutil

    parent, old = os.path.dirname(path), None
    try:
        if os.path.lexists(path):
            old = sibling(path, "old")
            os.replace(path, old)
            fsync_path(parent)
        os.replace(tmp, path)
        fsync_path(parent)
        if old:
            shutil.rmtree(old)
    except OSError:
        if old and not os.path.lexists(path):
            os.replace(old, path)
        raise


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
        fd = open_regular(lock, os.O_RDWR, "lock file", 0o644, "create")
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


def save_numbered(folder: str, pattern: str, write: Callable[[str], None],
                  then: Callable[[str], None] | None = None) -> str:
    """Write a new file pattern.format(n) in `folder`, n = how many files of that pattern are there
    (FlagAI continues the count), or the next free n: `write(tmp)` fills a temporary file, which is
    fsync'd and then hard-linked to its name. A link never replaces a file, so two processes
    writing into one folder take different numbers, and a failed write leaves nothing.
    `then(path)` runs after the link while the writer's lock on the file is still held (generate
    appends the picture's manifest line there): a run that finds a picture unlocked and unrecorded
    knows its writer was killed in between."""
    prefix, suffix = pattern.split("{")[0], pattern.rsplit("}", 1)[1]
    tmp, fd = new_temporary(os.path.join(folder, "new" + suffix))
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
        os.unlink(tmp)
        if then is not None:
            then(path)
        return path
    except OSError as e:
        raise io_error(folder, e, "write a new file into") from None
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        os.close(fd)


def append_line(path: str, line: str) -> None:
    """Append `line` and a newline to `path` (created if missing) in one write, holding an exclusive
    flock on the file while doing so: lines from concurrent processes never interleave, none is lost.
    A file whose last line lacks its newline (a write cut short) gets one first: the line stays whole.
    A `path` that is a symbolic link or not a regular file is refused (open_append)."""
    data = (line.rstrip("\n") + "\n").encode("utf-8")
    fd = open_append(path, "log")
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


def save_safetensors(path: str, tensors: dict, metadata: dict[str, str], mode: int | None = None) -> None:
    """safetensors' file at `path` (a temporary name: atomic_file's, or inside a partial folder) with the
    permissions the umask gives (`mode`, else the existing temporary file's): safetensors writes 0600,
    and a model's files are the user's ordinary files. Its write errors become the OSError they wrap."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    mode = os.stat(path).st_mode & 0o666 if mode is None else mode
    try:
        save_file(tensors, path, metadata=metadata)
    except (SafetensorError, RuntimeError) as e:
        raise safetensors_os_error(e) from None
    os.chmod(path, mode)


def safetensors_os_error(e: Exception) -> OSError:
    """safetensors' write error as the OSError it wraps (its message names the errno), so that it is
    one line naming the folder as every other failed write is (errors.io_error)."""
    import errno
    import re

    code = re.search(r"\bcode: (\d+)|\(os error (\d+)\)", str(e))
    number = int(code.group(1) or code.group(2)) if code else errno.EIO
    return OSError(number, os.strerror(number) if code else f"safetensors could not write the weights ({e})")
