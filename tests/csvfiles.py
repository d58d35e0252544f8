"""CSV files as lists of rows, for tests that copy and alter a synthetic cohort's tables."""

from __future__ import annotations

import csv
from pathlib import Path


def read_rows(path: Path) -> list[list[str]]:
    """Every row of ``path``, the header included."""
    with open(path, newline="") as fh:
        return list(csv.reader(fh))


def write_rows(path: Path, rows: list[list[str]]) -> Path:
    """Write ``rows`` to ``path``; returns ``path``."""
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    return path
