"""Expected failures: bad arguments, bad files, a full disk. Each is one line that names the argument or
the file and the problem; the command line prints it and exits with 2. Anything else is a bug and
keeps its traceback.

The classes also derive from the built-in they refine, so `except ValueError` still catches them.
"""
from __future__ import annotations

import os


class AltDiffError(Exception):
    """Base of every expected failure."""


class BadValue(AltDiffError, ValueError):
    """An argument or config value outside what the model can take."""


class BadType(AltDiffError, TypeError):
    """An argument or config value of the wrong type."""


class BadFile(AltDiffError, ValueError):
    """A file that is missing, unreadable, corrupt, or not what it should be; the message names it."""


class TooManyPixels(BadFile):
    """A picture whose header promises more pixels than PIL's guard against decompression bombs
    (Image.MAX_IMAGE_PIXELS) allows: refused before a byte of it is decoded."""


class Missing(AltDiffError, FileNotFoundError):
    """A path that does not exist."""


class Exists(AltDiffError, FileExistsError):
    """A destination that exists and may not be replaced."""


class Busy(AltDiffError, RuntimeError):
    """Another process is writing the same destination."""


class NotFinite(AltDiffError, ArithmeticError):
    """NaN or infinity where numbers must be finite (latents, weights, pictures)."""


def io_error(path: str | os.PathLike, e: OSError, doing: str = "write") -> BadFile:
    """An OSError while reading or writing `path` (read-only or full disk, a folder where a file should
    be, …) as one line naming the path."""
    return BadFile(f"cannot {doing} {os.fspath(path)}: {e.strerror or e}")
