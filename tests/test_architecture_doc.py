"""docs/ARCHITECTURE.md matches the tree: every file it names exists, and every module of the
training package and every Rust source file is named in it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "ARCHITECTURE.md"


def _named() -> set[str]:
    return set(re.findall(r"[\w/]+\.(?:py|rs)\b", DOC.read_text(encoding="utf-8")))


def test_every_named_file_exists() -> None:
    files = [
        "/" + str(p.relative_to(ROOT))
        for d in ("python/momkd", "rust", "tests")
        for p in (ROOT / d).rglob("*.*")
    ]
    missing = sorted(n for n in _named() if not any(f.endswith("/" + n) for f in files))
    assert not missing, f"docs/ARCHITECTURE.md names files that do not exist: {missing}"


def test_every_training_module_and_rust_file_is_named() -> None:
    named = {Path(n).name for n in _named()}
    wanted = [p for p in (ROOT / "python/momkd/train").glob("*.py") if p.name != "__init__.py"]
    wanted += list((ROOT / "rust").rglob("*.rs"))
    absent = sorted(str(p.relative_to(ROOT)) for p in wanted if p.name not in named)
    assert not absent, f"not described in docs/ARCHITECTURE.md: {absent}"
