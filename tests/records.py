"""Recorded fingerprints of the tests (tests/data/*.json): writing one, or printing it."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def emit(record: dict[str, Any], path: Path, write: bool) -> int:
    """Write ``record`` as sorted, indented JSON to ``path`` (``write``) or to standard output."""
    text = json.dumps(record, indent=1, sort_keys=True)
    if write:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
        print(f"wrote {path}")
    else:
        sys.stdout.write(text + "\n")
    return 0
