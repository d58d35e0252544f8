"""Small file-system helpers shared across momkd: atomic writes and folder sizes."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

__all__ = ["atomic_open", "atomic_write_text", "dir_bytes"]


@contextmanager
def atomic_open(path: str | os.PathLike[str], *, newline: str | None = "") -> Iterator[IO[str]]:
    """Open a text file for writing that appears at ``path`` only once complete.

    Writes go to a temporary file in the same folder, which is flushed, fsynced and renamed over
    ``path`` when the block ends; on an exception the temporary file is removed and ``path`` is
    left as it was.
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
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
