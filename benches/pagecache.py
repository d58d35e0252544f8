"""Dropping the page cache for the cold-read benchmarks (Linux, root)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

DROP_CACHES = Path("/proc/sys/vm/drop_caches")


def cold_unavailable() -> str | None:
    """Why the page cache cannot be dropped here (``None`` when it can)."""
    if not DROP_CACHES.exists():
        return f"{DROP_CACHES} does not exist (not Linux?)"
    if not os.access(DROP_CACHES, os.W_OK):
        return f"no permission to write {DROP_CACHES} (cold reads need root)"
    return None


def drop_page_cache() -> None:
    """Flush dirty pages and drop the page cache (clean pages, dentries and inodes)."""
    subprocess.run(["sync"], check=True)
    DROP_CACHES.write_text("3\n")
