"""Small file-system helpers shared across momkd: atomic writes and folder sizes."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

__all__ = [
    "atomic_open",
    "atomic_write_text",
    "current_umask",
    "dir_bytes",
    "temp_file_beside",
]


def current_umask() -> int:
    """The process's file-mode creation mask.

    Read from ``/proc/self/status`` where the kernel reports it (no side effect); elsewhere it is
    read by setting and restoring it with :func:`os.umask`.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temp_file_beside(dest: Path) -> tuple[int, str]:
    """A new temporary file next to ``dest`` whose mode is what ``open(dest, "w")`` would give.

    :func:`tempfile.mkstemp` creates files with mode 0600 regardless of the umask; a file renamed
    over ``dest`` would keep that mode, so the mode is reset to ``0o666 & ~umask`` here.

    Returns
    -------
    fd, path
        An open descriptor (the caller owns it) and the temporary file's path.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
    except BaseException:
        os.close(fd)
        Path(tmp).unlink(missing_ok=True)
        raise
    return fd, tmp


@contextmanager
def atomic_open(path: str | os.PathLike[str], *, newline: str | None = "") -> Iterator[IO[str]]:
    """Open a text file for writing that appears at ``path`` only once complete.

    Writes go to a temporary file in the same folder, which is flushed, fsynced and renamed over
    ``path`` when the block ends; on an exception the temporary file is removed and ``path`` is
    left as it was. The file gets the mode a plain ``open`` would give (``0o666`` less the umask).
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file_beside(dest)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline=newline) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    with atomic_open(path) as fh:
        fh.write(text)
    return Path(path)


def dir_bytes(path: str | os.PathLike[str]) -> int:
    """Total size in bytes of the files below ``path`` (files that vanish meanwhile count 0)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return total
