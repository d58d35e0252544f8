"""The built artifacts in dist/ work outside the build tree (``scripts/test_wheel.sh``).

Slow (a fresh virtual environment per artifact, the sdist compiles the Rust extension), so it runs
only with ``-m slow``, after ``bash scripts/build_wheels.sh``.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "test_wheel.sh"


def _artifact(pattern: str) -> Path:
    found = sorted((REPO / "dist").glob(pattern), key=lambda p: p.stat().st_mtime)
    if not found:
        pytest.skip(f"no dist/{pattern}; run `bash scripts/build_wheels.sh` first")
    return found[-1]


@pytest.mark.slow
@pytest.mark.parametrize(
    "pattern", ["momkd-*-manylinux_2_28_x86_64.whl", "momkd-*.tar.gz"], ids=["wheel", "sdist"]
)
def test_artifact_installs_and_runs_end_to_end(pattern: str) -> None:
    artifact = _artifact(pattern)
    res = subprocess.run(
        ["bash", str(SCRIPT), str(artifact)],
        capture_output=True,
        text=True,
        timeout=3600,
        check=False,
    )
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert "test_wheel: OK" in res.stdout
    assert "slide predictions" in res.stdout
