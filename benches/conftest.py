"""Shared fixtures for the momkd benchmark suites.

The loader benchmarks need a cohort on disk in four layouts (cohort store, TRIDENT `.h5`, CLAM `.pt`).
It is generated once with ``momkd synth`` and cached under ``$MOMKD_BENCH_DIR`` (default
``.benchmarks/data``). Size through the environment:

* ``MOMKD_BENCH_SLIDES`` (default 40), ``MOMKD_BENCH_PATCHES`` (median patches per slide, 3000),
  ``MOMKD_BENCH_DIM`` (1536): the defaults give ~0.5 GB of float16 features (~1 GB as float32),
  enough for stable figures without crowding a small machine; scale up for a bigger one.
* ``MOMKD_BENCH_BAGS`` (default: all slides): how many bags each contender reads per round.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


@pytest.fixture(scope="session")
def bench_cohort() -> dict:
    from momkd.synth import generate_cohort

    slides = _env_int("MOMKD_BENCH_SLIDES", 40)
    patches = _env_int("MOMKD_BENCH_PATCHES", 3000)
    dim = _env_int("MOMKD_BENCH_DIM", 1536)
    root = Path(os.environ.get("MOMKD_BENCH_DIR", ".benchmarks/data"))
    tag = f"s{slides}_p{patches}_d{dim}"
    out = root / tag
    marker = out / "bench_ready.json"
    if not marker.exists():
        generate_cohort(
            out,
            patients=slides,
            external=0,
            dim=dim,
            genes=64,
            patches=patches,
            seed=1234,
            h5=True,
            pt=True,
            progress=True,
            overwrite=True,
        )
        marker.write_text(json.dumps({"slides": slides, "patches": patches, "dim": dim}))
    return {"dir": out, "slides": slides, "patches": patches, "dim": dim}


def _short(name: str) -> str:
    """``test_read[warm-momkd]`` -> ``momkd`` (also ``cold-``, ``first-read-``); other names
    unchanged."""
    if "[" in name and name.endswith("]"):
        inner = name[name.index("[") + 1 : -1]
        for prefix in ("warm-", "cold-", "first-read-"):
            if inner.startswith(prefix):
                return inner[len(prefix) :]
        return inner
    return name


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Print throughput and ratios per benchmark group.

    ``momkd is`` compares each contender with momkd's default reader (>1: momkd is faster);
    ``of raw`` is the share of the raw-read ceiling of the same group where there is one. Both are
    given for the medians and for the best rounds (on a shared machine noise only adds time, so
    the best rounds are the steadier comparison).
    """
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    groups: dict[str, list] = {}
    for bench in session.benchmarks:
        if bench.stats is None or not getattr(bench.stats, "data", None):
            continue  # a benchmark whose test failed or skipped before timing
        groups.setdefault(bench.group or "", []).append(bench)
    tr = terminalreporter
    tr.section("momkd benchmark ratios (median times; >1 means momkd is faster)")
    for group, benches in sorted(groups.items()):
        names = {_short(b.name): b for b in benches}
        base = names.get("momkd") or next((b for b in benches if "momkd" in b.name), None)
        raw = names.get("raw-read-ceiling")
        tr.write_line(f"[{group}]")
        for b in sorted(benches, key=lambda b: b.stats.median):
            info = b.extra_info or {}
            gbps = info.get("gbps_f32")
            disk = info.get("bytes_on_disk")
            parts = [f"  {_short(b.name):<34} median {b.stats.median:8.3f}s"]
            if gbps is not None:
                parts.append(f"{gbps:6.2f} GB/s(f32)")
            if disk is not None:
                parts.append(f"disk {disk / 1e9:6.2f} GB")
            # Ratios of medians, and of best rounds (noise on a shared machine only adds time).
            if base is not None and b is not base:
                parts.append(
                    f"momkd is {b.stats.median / base.stats.median:5.2f}x"
                    f" (best {b.stats.min / base.stats.min:4.2f}x)"
                )
            if raw is not None and b is not raw:
                parts.append(
                    f"{raw.stats.median / b.stats.median:6.1%} of raw"
                    f" (best {raw.stats.min / b.stats.min:4.0%})"
                )
            tr.write_line("  ".join(parts))
