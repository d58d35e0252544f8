"""Packaging: one version (from Cargo.toml) everywhere; a clear error for a missing extra."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import tomllib
from pathlib import Path

import momkd
import momkd._core

CARGO_TOML = Path(__file__).resolve().parents[1] / "Cargo.toml"


def test_version_matches_the_installed_metadata() -> None:
    assert momkd.__version__ == importlib.metadata.version("momkd")
    assert momkd._core.__version__ == momkd.__version__


def test_version_comes_from_cargo_toml() -> None:
    cargo = tomllib.loads(CARGO_TOML.read_text())
    assert momkd.__version__ == cargo["package"]["version"]


def test_cli_version_reports_the_metadata_version() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "momkd.cli", "--version"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"momkd {importlib.metadata.version('momkd')}"


def test_missing_training_extra_is_a_one_line_error(tmp_path: Path) -> None:
    # `pip install momkd` without [train] has no scikit-learn; the synthetic cohort's oracle needs it.
    code = (
        "import sys; sys.modules['sklearn'] = None\n"
        "from momkd.cli import main\n"
        "sys.exit(main(sys.argv[1:]))"
    )
    args = ["synth", str(tmp_path / "c"), "--patients", "12", "--external", "0", "--dim", "32"]
    args += ["--genes", "10", "--patches", "5", "-q"]
    res = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert lines[0] == "momkd synth: error: needs scikit-learn: pip install 'momkd[train]'"
