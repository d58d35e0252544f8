"""A large cohort end to end: ingest, cold epoch reads, the loader's share of an epoch, the host cache,
and peak memory.

The cohort is synthesised: ``MOMKD_BENCH_COHORT_SLIDES`` slides (default 2,000; ``MOMKD_BENCH_SLIDES``
is honoured too) of about ``MOMKD_BENCH_PATCHES`` patches (3,000) x ``MOMKD_BENCH_DIM`` (1,536)
float16 features, i.e. ~18 GB of store at the defaults. It is written once under
``$MOMKD_BENCH_DIR/cohort_*`` with :class:`momkd.data.StoreWriter` (``MOMKD_BENCH_SHARD_MB`` > 0 writes
a sharded store) from float16 bags made in memory, so the ingest figure is momkd's writing
(validation, conversion, compression, checksums, files), not the reading of source files.

Figures (printed as one table at the end and written to ``$MOMKD_BENCH_DIR/cohort_results.json``):

* ``ingest``: GB/s of float16 features written;
* ``cold epoch read``: one consume-and-drop pass over every bag with the page cache dropped first
  (skipped without root), GB/s of float32 delivered;
* ``abmil epoch``: one training epoch of the ABMIL baseline (batch size 1; on CUDA when there is
  one, with the float16 hand-off, else float32 on the CPU), uncached, then with a host cache (first
  epoch fills it, second is served from it): epoch seconds and the share of the epoch spent waiting
  for the loader. On a CPU the model step dominates and the share is small;
* ``peak RSS`` of this process after each step (it includes the host cache);
* ``rss flat``: peak RSS of ``momkd train`` (one fold, one epoch), ``momkd predict`` and
  ``momkd explain``, cache off, on two synthetic cohorts of ``MOMKD_BENCH_RSS_PATIENTS`` (default
  ``150,1500``) patients, each run in its own process (its own ``VmHWM``, read as it exits).

Run with ``bash scripts/dev.sh bench -k cohort`` and scale with the variables above; run it on a
quiet machine (cold reads drop the page cache of every process).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pagecache import cold_unavailable, drop_page_cache

SLIDES = int(
    os.environ.get("MOMKD_BENCH_COHORT_SLIDES", os.environ.get("MOMKD_BENCH_SLIDES", 2000))
)
PATCHES = int(os.environ.get("MOMKD_BENCH_PATCHES", 3000))
DIM = int(os.environ.get("MOMKD_BENCH_DIM", 1536))
SHARD_MB = float(os.environ.get("MOMKD_BENCH_SHARD_MB", 0))
THREADS = int(os.environ.get("MOMKD_BENCH_THREADS", min(4, os.cpu_count() or 1)))
RSS_PATIENTS = [int(v) for v in os.environ.get("MOMKD_BENCH_RSS_PATIENTS", "150,1500").split(",")]
ROOT = Path(os.environ.get("MOMKD_BENCH_DIR", ".benchmarks/data"))

RESULTS: dict[str, Any] = {
    "machine": {"cpus": os.cpu_count(), "threads": THREADS},
    "cohort": {"slides": SLIDES, "patches_median": PATCHES, "dim": DIM, "shard_mb": SHARD_MB},
}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.fixture(scope="module")
def cohort() -> Path:
    """The store (written once, timed the first time)."""
    from momkd.data import StoreWriter
    from momkd.data.store_writer import default_chunk_rows, shard_rows_for

    tag = f"cohort_s{SLIDES}_p{PATCHES}_d{DIM}" + (f"_sh{SHARD_MB:g}" if SHARD_MB else "")
    path = ROOT / tag / "cohort.zarr"
    marker = ROOT / tag / "ingest.json"
    if marker.exists():
        RESULTS["ingest"] = json.loads(marker.read_text())
        return path
    rng = np.random.default_rng(0)
    # A pool of float16 rows; each slide takes a random window of it with a random sign flip, so
    # bags differ without generating 10^9 normals.
    pool = rng.normal(size=(PATCHES * 4, DIM)).astype(np.float16)
    sizes = np.clip(rng.lognormal(np.log(PATCHES), 0.35, SLIDES), 64, PATCHES * 3).astype(int)
    rows = default_chunk_rows(DIM)
    shard = shard_rows_for(SHARD_MB, DIM, rows) if SHARD_MB else None
    t0 = time.perf_counter()
    with StoreWriter(path, DIM, chunk_rows=rows, shard_rows=shard, overwrite=True) as w:
        for i, p in enumerate(sizes):
            start = int(rng.integers(0, len(pool) - p))
            feats = pool[start : start + p] * np.float16(1 if i % 2 else -1)
            side = int(np.ceil(np.sqrt(p)))
            grid = np.arange(p)
            coords = np.stack([grid % side, grid // side], axis=1).astype(np.int32) * 256
            w.append_prepared(f"slide_{i:05d}", np.ascontiguousarray(feats), coords)
    seconds = time.perf_counter() - t0
    gb = float(sizes.sum()) * DIM * 2 / 1e9
    RESULTS["ingest"] = {
        "seconds": seconds,
        "gb_float16": gb,
        "gbps": gb / seconds,
        "patches": int(sizes.sum()),
    }
    marker.write_text(json.dumps(RESULTS["ingest"]))
    return path


def _epoch_read(path: Path) -> dict[str, float]:
    from momkd.data import BagLoader, CohortStore

    store = CohortStore.open(path)
    t0 = time.perf_counter()
    total = 0
    for bag in BagLoader(store, knn_k=None, num_threads=THREADS, shuffle=True, seed=1):
        total += bag.features.shape[0]
        del bag
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "gbps_f32": total * store.feature_dim * 4 / seconds / 1e9}


def _once(benchmark, fn):
    """Time ``fn`` once with pytest-benchmark (so that ``--benchmark-only`` runs it); its result."""
    return benchmark.pedantic(fn, rounds=1, iterations=1)


@pytest.mark.benchmark(group="cohort")
def test_cold_epoch_read(benchmark, cohort):
    why = cold_unavailable()
    if why is not None:
        pytest.skip(f"cold reads: {why}")
    RESULTS["cold_epoch_read"] = benchmark.pedantic(
        _epoch_read, args=(cohort,), setup=drop_page_cache, rounds=1, iterations=1
    )
    RESULTS["cold_epoch_read"]["peak_rss_mb"] = _peak_rss_mb()


def _abmil_epochs(path: Path, cache_kind: str, epochs: int) -> list[dict[str, float]]:
    import torch
    import torch.nn.functional as F
    from momkd.config import load_config
    from momkd.data import BagLoader, CohortStore
    from momkd.data.cache import shared_cache
    from momkd.train.factory import build_model, model_spec_for

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    store = CohortStore.open(path)
    cfg = load_config(None, overrides=["model.method=abmil"])
    model = build_model(model_spec_for(cfg, store.feature_dim, None)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    cache = shared_cache(store, cache_kind, device=device, knn_k=None)
    labels = {s: i % 2 for i, s in enumerate(store.slide_ids)}
    half = "float16" if device.type == "cuda" else "float32"
    loader = BagLoader(
        store,
        shuffle=True,
        seed=0,
        knn_k=None,
        num_threads=THREADS,
        cache=cache,
        dtype=half,
        pin_memory=device.type == "cuda",
    )
    out = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        wait = 0.0
        t0 = time.perf_counter()
        it = iter(loader)
        while True:
            tw = time.perf_counter()
            bag = next(it, None)
            wait += time.perf_counter() - tw
            if bag is None:
                break
            x = bag.features.to(device, non_blocking=True).float()
            res = model(x, None)
            y = torch.tensor([labels[bag.slide_id]], device=device)
            loss = F.cross_entropy(res.logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        out.append(
            {
                "seconds": seconds,
                "loader_wait_share": wait / seconds,
                "peak_rss_mb": _peak_rss_mb(),
                "cached_bags": 0 if cache is None else len(cache),
            }
        )
    return out


@pytest.mark.benchmark(group="abmil epoch")
def test_abmil_epoch_uncached(benchmark, cohort):
    RESULTS["abmil_uncached"] = _once(benchmark, lambda: _abmil_epochs(cohort, "none", 1))[0]


@pytest.mark.benchmark(group="abmil epoch")
def test_abmil_epoch_host_cache(benchmark, cohort):
    from momkd.data import CohortStore
    from momkd.data.cache import HOST_FRACTION, cohort_bytes, free_host_bytes

    need = cohort_bytes(CohortStore.open(cohort), None)
    if need > HOST_FRACTION * free_host_bytes():
        pytest.skip(f"the cohort ({need / 1e9:.1f} GB) does not fit in half the free RAM")
    first, second = _once(benchmark, lambda: _abmil_epochs(cohort, "host", 2))
    RESULTS["abmil_host_cache_fill"] = first
    RESULTS["abmil_host_cache_served"] = second


# Runs the momkd CLI and, at exit, writes the process's VmHWM (peak RSS of its own address space)
# to $MOMKD_BENCH_HWM. The ru_maxrss that wait4 reports is not that: Linux carries over the peak
# RSS of the address space a process had before exec, i.e. of this (large) benchmark process at
# the fork, so every child would report at least this process's size.
_HWM_LAUNCHER = """
import atexit, os, sys

def _hwm():
    out = os.environ.get("MOMKD_BENCH_HWM")
    if out:
        with open("/proc/self/status", encoding="ascii") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        with open(out, "w", encoding="ascii") as f:
            f.write(str(kb))

atexit.register(_hwm)
from momkd.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _run_measured(cmd: list[str], cwd: Path) -> tuple[float, float]:
    """Run ``cmd`` (a :data:`_HWM_LAUNCHER` command); return (seconds, peak RSS in MB) of that
    process alone."""
    hwm = cwd / ".peak_rss_kb"
    hwm.unlink(missing_ok=True)
    env = dict(os.environ, MOMKD_BENCH_HWM=str(hwm))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace")
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {err[-2000:]}")
    if not hwm.exists():
        raise RuntimeError(f"{' '.join(cmd)} did not report its peak RSS (/proc needed)")
    return seconds, int(hwm.read_text()) / 1024


@pytest.mark.benchmark(group="rss")
def test_rss_flat_train_predict_explain(benchmark, tmp_path):
    _once(benchmark, lambda: _rss_flat(tmp_path))


def _rss_flat(tmp_path: Path) -> None:
    from momkd.config import preset_yaml

    momkd = [sys.executable, "-c", _HWM_LAUNCHER]
    rows: dict[str, dict[str, float]] = {}
    for patients in RSS_PATIENTS:
        data = tmp_path / f"p{patients}"
        subprocess.run(
            [*momkd, "synth", str(data), "--patients", str(patients), "--external", "0",
             "--dim", "64", "--genes", "64", "--patches", "200", "-q"],
            check=True,
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        (data / "run.yaml").write_text(preset_yaml("demo"), encoding="utf-8")
        run = data / "run"
        sets = [
            "data.cache=none", "data.external=null", "train.epochs=1", "train.min_epochs=0", "train.folds=[0]",
            "genomics.n_genes=32", "memory.init_per_class=2000", "model.hidden=32",
            "model.sphere=16", "model.omics_width=32", "model.omics_hidden=32",
        ]  # fmt: skip
        train_cmd = [*momkd, "train", "--config", str(data / "run.yaml"), "--out", str(run)]
        train_cmd += [f"--set={s}" for s in [f"data.store={data / 'cohort.zarr'}", *sets]]
        t_s, t_rss = _run_measured(train_cmd, data)
        p_s, p_rss = _run_measured(
            [*momkd, "predict", str(run), "--store", str(data / "cohort.zarr"),
             "--out", str(data / "preds.csv")],
            data,
        )  # fmt: skip
        e_s, e_rss = _run_measured(
            [*momkd, "explain", str(run), "--store", str(data / "cohort.zarr")], data
        )
        rows[str(patients)] = {
            "train_peak_rss_mb": t_rss,
            "predict_peak_rss_mb": p_rss,
            "explain_peak_rss_mb": e_rss,
            "train_s": t_s,
            "predict_s": p_s,
            "explain_s": e_s,
        }
    RESULTS["rss_flat"] = rows
    small, large = rows[str(min(RSS_PATIENTS))], rows[str(max(RSS_PATIENTS))]
    for key in ("train_peak_rss_mb", "predict_peak_rss_mb", "explain_peak_rss_mb"):
        RESULTS["rss_flat"][f"{key}_ratio"] = large[key] / small[key]


@pytest.mark.benchmark(group="report")
def test_zz_report(benchmark, cohort):
    """Print the table and write the results file (runs last)."""
    _once(benchmark, lambda: None)
    RESULTS["peak_rss_mb_bench_process"] = _peak_rss_mb()
    out = ROOT / "cohort_results.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(RESULTS, indent=2))
    lines = [f"cohort: {json.dumps(RESULTS['cohort'])}"]
    ing = RESULTS.get("ingest", {})
    if ing:
        lines.append(f"ingest: {ing['gbps']:.3f} GB/s float16 ({ing['gb_float16']:.2f} GB)")
    cold = RESULTS.get("cold_epoch_read")
    if cold:
        lines.append(
            f"cold epoch read: {cold['gbps_f32']:.2f} GB/s float32 ({cold['seconds']:.1f} s), "
            f"peak RSS {cold['peak_rss_mb']:.0f} MB"
        )
    for key in ("abmil_uncached", "abmil_host_cache_fill", "abmil_host_cache_served"):
        r = RESULTS.get(key)
        if r:
            lines.append(
                f"{key}: {r['seconds']:.1f} s, loader wait {r['loader_wait_share']:.1%}, "
                f"peak RSS {r['peak_rss_mb']:.0f} MB"
            )
    if "rss_flat" in RESULTS:
        lines.append(f"rss flat: {json.dumps(RESULTS['rss_flat'])}")
    print("\n" + "\n".join(lines))
