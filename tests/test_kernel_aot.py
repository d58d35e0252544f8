"""Ahead-of-time compiles of every Triton kernel (benches/kernel_aot.py), no GPU needed.

The launch configurations come from the launchers themselves (captured launches); ptxas -v is the
oracle for registers and spills. The default run covers the official, paper and demo presets at
K in {16, 64} (K = 4 launches the same configurations as K = 16: tiles are at least 16 wide), fp32
and fp16 inputs, at the default precision (ieee); the slow run adds K = 4, the tf32 and bf16
precisions and the full grid.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benches" / "kernel_aot.py"
KERNELS = {
    "_memory_attention_fwd_kernel", "_memory_attention_combine_kernel",
    "_memory_attention_norm_kernel", "_segment_dot_kernel", "_memory_attention_bwd_kernel",
    "_commitment_fwd_kernel", "_chunk_mean_kernel", "_commitment_bwd_kernel",
    "_align_loss_fwd_kernel", "_align_loss_bwd_kernel", "_momentum_stats_kernel",
    "_momentum_apply_kernel", "_momentum_step_kernel",
}  # fmt: skip


def _report(tmp_path: Path, *args: str) -> list[dict[str, Any]]:
    out = tmp_path / "aot.json"
    # The same interpreter and installed package as the tests; only the interpreter mode is off.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--arch", "80,90", "--json", str(out), *args],
        env=env, capture_output=True, text=True, timeout=3000, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    records: list[dict[str, Any]] = json.loads(out.read_text())
    return records


def _check(records: list[dict[str, Any]]) -> None:
    assert {r["kernel"] for r in records} == KERNELS
    assert {r["arch"] for r in records} == {"sm_80", "sm_90"}
    failed = [(r["kernel"], r["arch"], r["error"]) for r in records if not r["ok"]]
    assert not failed
    spills = [
        (r["kernel"], r["arch"], r["preset"], r["shape"], r["spill_bytes"])
        for r in records
        if r["preset"] is not None and r["spill_bytes"] != 0
    ]
    assert not spills
    for r in records:
        assert 0 < r["registers"] <= 255
        assert 0 <= r["shared_bytes"] <= 227 * 1024


def test_presets_compile_without_spills(tmp_path: Path) -> None:
    records = _report(
        tmp_path, "--grid", "presets", "--k", "16,64", "--dtype", "float32,float16",
        "--precision", "ieee",
    )  # fmt: skip
    _check(records)
    assert {r["preset"] for r in records} == {"official", "paper", "demo"}
    assert {r["shape"]["K"] for r in records} == {16, 64}


@pytest.mark.slow
def test_full_grid_compiles(tmp_path: Path) -> None:
    records = _report(tmp_path, "--grid", "all")
    _check(records)
    # tf32 and bf16 similarity products use tensor cores on both architectures.
    fwd = [r for r in records if r["kernel"] == "_memory_attention_fwd_kernel"]
    assert all(r["tensor_cores"] == (r["shape"]["precision"] != "ieee") for r in fwd)
