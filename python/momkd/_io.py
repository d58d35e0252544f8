"""Small file-system helpers shared across momkd: atomic writes, folder sizes, and the strict
JSON / CSV files of a run directory (NaN written as ``null`` / an empty cell)."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np

__all__ = [
    "atomic_open",
    "class_prob_columns",
    "atomic_write_text",
    "current_umask",
    "dir_bytes",
    "jsonable",
    "metrics_from_json",
    "prob_columns",
    "read_csv_predictions",
    "read_json",
    "temp_file_beside",
    "write_csv",
    "write_json",
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


# ------------------------------------------------------------------------------ JSON and CSV


def jsonable(obj: Any) -> Any:
    """``obj`` with NaN/Inf floats as ``None``, numpy and torch scalars as Python numbers."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if type(obj).__module__.startswith("torch") and hasattr(obj, "detach"):  # a tensor
        return jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write strict JSON (NaN as ``null``) atomically."""
    atomic_write_text(Path(path), json.dumps(jsonable(obj), indent=2, allow_nan=False) + "\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file written by :func:`write_json`."""
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def write_csv(
    path: str | os.PathLike[str], header: Sequence[str], rows: Sequence[Sequence[Any]]
) -> None:
    """Write a CSV file atomically; floats with 6 significant digits beyond what they need."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(list(header))
    for row in rows:
        writer.writerow([_cell(v) for v in row])
    atomic_write_text(Path(path), buf.getvalue())


def _cell(v: Any) -> Any:
    if isinstance(v, float | np.floating):
        return repr(float(v))
    if isinstance(v, list | tuple):
        return ";".join(str(_cell(x)) for x in v)
    if v is None:
        return ""
    return v


def prob_columns(class_names: Sequence[str]) -> list[str]:
    """The probability columns of a C-class prediction CSV: ``prob_<class>`` in class order."""
    return [f"prob_{c}" for c in class_names]


def class_prob_columns(header: Sequence[str]) -> list[str]:
    """The ``prob_<class>`` columns of a multi-class prediction CSV header, in order (none for a
    binary one, which has ``prob``; the per-fold ``prob_fold<k>`` columns of an ensemble file are
    not classes)."""
    if "prob" in header:
        return []
    return [c for c in header if c.startswith("prob_") and not c.startswith("prob_fold")]


def read_csv_predictions(path: str | os.PathLike[str], column: str = "prob") -> dict[str, Any]:
    """Slide id -> probability from a prediction CSV written by the training loop; for a
    multi-class file (``prob_<class>`` columns, no ``prob``), slide id -> list of class
    probabilities."""
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        cols = class_prob_columns(header) if column == "prob" else []
        if cols:
            return {row["slide_id"]: [float(row[c]) for c in cols] for row in reader}
        return {row["slide_id"]: float(row[column]) for row in reader}


def metrics_from_json(d: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`jsonable` for a metric dict (``None`` back to NaN)."""
    return {k: (math.nan if v is None else v) for k, v in d.items()}
