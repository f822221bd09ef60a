"""argparse types shared by the command lines (demo, bench, the profiling scripts): a bad
value is a usage error naming the option, before any work starts."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path


def int_at_least(low: int):
    """An integer >= ``low``."""
    what = "a positive integer" if low == 1 else f"an integer >= {low}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value
    return parse


def finite_positive(unit: str = ""):
    """A finite number > 0; ``unit`` (" of seconds") goes into the message."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number{unit}, got {text!r}") from None
        if not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(f"expected a finite number{unit} > 0, got {text}")
        return value
    return parse


def new_file(suffix: str):
    """A file name ending in ``suffix`` (".png") in a folder that exists, not a folder, that
    this process can write: checked before the work whose result it will hold. The write
    check opens the file: an existing one for appending (its content is left as it is), a
    new one is created and removed again, so a read-only file system, a folder without
    write permission or a pseudo file system (/proc) is refused here, not after the work."""
    def parse(text: str) -> Path:
        path = Path(text)
        if not text.lower().endswith(suffix) or path.name in ("", suffix):
            raise argparse.ArgumentTypeError(f"expected a file name ending in {suffix}, got "
                                             f"{text!r}")
        if not path.parent.is_dir():
            raise argparse.ArgumentTypeError(f"the folder '{path.parent}' does not exist")
        if path.is_dir():
            raise argparse.ArgumentTypeError(f"{text!r} is a folder")
        reason = _cannot_write(path)
        if reason:
            raise argparse.ArgumentTypeError(f"cannot write {text!r}: {reason}")
        return path
    return parse


def _cannot_write(path: Path) -> str:
    """Why ``path`` cannot be written ("" if it can). Its folder must be writable (results
    are written beside the name and renamed over it). A new name is created and removed at
    once (this finds read-only and pseudo file systems, /proc); an existing regular file is
    opened for appending (nothing is written); anything else that exists (a FIFO, a device,
    a dangling link) is only asked about (``os.access``): opening a FIFO would block, or
    hand its reader an early end of file."""
    folder = path.parent
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"the folder '{folder}' is not writable"
    if os.path.lexists(path) and not path.is_file():
        if path.is_symlink() and not path.exists():         # dangling: its target is made
            return ""
        return "" if os.access(path, os.W_OK) else "permission denied"
    existed = path.exists()
    try:
        with open(path, "ab" if existed else "xb"):
            pass
    except OSError as e:
        return e.strerror or str(e)
    if not existed:
        try:
            path.unlink()
        except OSError:
            pass
    return ""
