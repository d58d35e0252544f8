"""Whole-bag read throughput: momkd's Rust loader against what users run today.

All contenders read the same bags in the same random order (features and coordinates, decoded to
float32 numpy arrays) from the same cohort in their own layout:

* ``momkd``            — ``momkd.BagLoader`` (Rust, zarrs, own thread pool, prefetch) on the store;
* ``zarr-python``      — zarr-python slicing the same store (rows of one slide per read);
* ``h5py-trident``     — h5py on TRIDENT-layout ``.h5`` (float32, one HDF5 chunk per patch row);
* ``torch-load-pt``    — ``torch.load`` of CLAM-style ``.pt`` tensors (float32, features only);
* ``codec-ceiling``    — only reading the store's chunk files and decoding them with the codec
  libraries (numcodecs blosc/zstd, google-crc32c; same thread count), no float32 conversion and no
  copy into bags: an upper bound for any reader of this store.

Run with ``bash scripts/dev.sh bench`` (or ``pytest benches --benchmark-only``). Every contender's
output is checked against the others after timing. Throughput is reported as float32-equivalent
GB/s (patches x D x 4 bytes per second) so the layouts compare on the same amount of delivered data.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

THREADS = int(os.environ.get("MOMKD_BENCH_THREADS", min(4, os.cpu_count() or 1)))
ROUNDS = int(os.environ.get("MOMKD_BENCH_ROUNDS", 3))


def _dir_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def setup(bench_cohort):
    from momkd.data.store import CohortStore

    root = Path(bench_cohort["dir"])
    store = CohortStore.open(root / "cohort.zarr")
    ids = list(store.slide_ids)
    n = int(os.environ.get("MOMKD_BENCH_BAGS", len(ids)))
    order = [ids[i] for i in np.random.default_rng(7).permutation(len(ids))[:n]]
    sizes = dict(zip(ids, store.bag_sizes.tolist(), strict=True))
    patches = sum(sizes[s] for s in order)
    f32_bytes = patches * store.feature_dim * 4
    return {
        "root": root,
        "store": store,
        "order": order,
        "f32_bytes": f32_bytes,
        "disk": {
            "store": _dir_bytes(root / "cohort.zarr"),
            "h5": sum(_dir_bytes(root / "h5" / f"{s}.h5") for s in ids),
            "pt": sum(_dir_bytes(root / "pt" / f"{s}.pt") for s in ids),
        },
    }


def _run(benchmark, fn, setup, disk_key):
    result = benchmark.pedantic(fn, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    median = benchmark.stats.stats.median
    benchmark.extra_info["gbps_f32"] = setup["f32_bytes"] / median / 1e9
    benchmark.extra_info["bytes_on_disk"] = setup["disk"][disk_key]
    benchmark.extra_info["bags"] = len(setup["order"])
    benchmark.extra_info["threads"] = THREADS
    return result


def _checksum(arrays) -> float:
    # Cheap content fingerprint: sums of a few rows per bag, so results can be compared afterwards.
    return float(sum(np.float64(a[:: max(1, len(a) // 7)].sum()) for a in arrays))


# --------------------------------------------------------------------------- contenders


def read_momkd(setup) -> float:
    from momkd.data.loader import BagLoader

    loader = BagLoader(
        setup["store"], slide_ids=setup["order"], knn_k=None, num_threads=THREADS, prefetch=8
    )
    return _checksum(bag.features.numpy() for bag in loader)


def read_zarr_python(setup) -> float:
    import zarr

    root = zarr.open_group(str(setup["root"] / "cohort.zarr"), mode="r")
    feats, coords = root["features"], root["coords"]
    offsets = root["offsets"][:]
    index = {s: i for i, s in enumerate(root.attrs["momkd"]["slide_ids"])}
    out = []
    for sid in setup["order"]:
        i = index[sid]
        f = feats[offsets[i] : offsets[i + 1]].astype(np.float32)
        coords[offsets[i] : offsets[i + 1]]
        out.append(f)
    return _checksum(out)


def read_h5py(setup) -> float:
    import h5py

    out = []
    for sid in setup["order"]:
        with h5py.File(setup["root"] / "h5" / f"{sid}.h5", "r") as f:
            feats = f["features"][:]
            f["coords"][:]
        out.append(feats)
    return _checksum(out)


def read_torch_pt(setup) -> float:
    import torch

    out = []
    for sid in setup["order"]:
        t = torch.load(setup["root"] / "pt" / f"{sid}.pt", weights_only=True)
        out.append(t.numpy())
    return _checksum(out)


def _chunk_decoder(meta: dict):
    """The store's bytes-to-bytes codec chain, decoded with the codec libraries alone."""
    import google_crc32c
    from numcodecs import Blosc, GZip, Zstd

    steps = []
    for codec in reversed(meta["codecs"][1:]):
        name = codec["name"]
        if name == "crc32c":

            def crc(buf: bytes) -> bytes:
                body, tail = buf[:-4], buf[-4:]
                if google_crc32c.value(body) != int.from_bytes(tail, "little"):
                    raise ValueError("crc32c mismatch")
                return body

            steps.append(crc)
        else:
            steps.append({"blosc": Blosc(), "zstd": Zstd(), "gzip": GZip()}[name].decode)

    def decode(buf: bytes) -> int:
        for step in steps:
            buf = step(buf)
        return len(buf)

    return decode


def read_codec_ceiling(setup) -> int:
    """Read and decode exactly the feature chunks each bag touches (no conversion, no copy out)."""
    root = setup["root"] / "cohort.zarr"
    meta = json.loads((root / "features" / "zarr.json").read_text())
    rows = meta["chunk_grid"]["configuration"]["chunk_shape"][0]
    decode_bytes = _chunk_decoder(meta)
    store = setup["store"]
    offsets = np.asarray(store.offsets)
    index = {s: i for i, s in enumerate(store.slide_ids)}

    def decode(path: Path) -> int:
        return decode_bytes(path.read_bytes())

    total = 0
    with ThreadPoolExecutor(THREADS) as pool:
        for sid in setup["order"]:
            i = index[sid]
            first, last = offsets[i] // rows, (offsets[i + 1] - 1) // rows
            paths = [root / "features" / "c" / str(c) / "0" for c in range(first, last + 1)]
            total += sum(pool.map(decode, paths))
    return total


# --------------------------------------------------------------------------- benchmarks


@pytest.mark.benchmark(group="whole-bag reads")
def test_momkd_loader(benchmark, setup):
    _run(benchmark, lambda: read_momkd(setup), setup, "store")


@pytest.mark.benchmark(group="whole-bag reads")
def test_momkd_loader_zstd_store(benchmark, setup):
    """The same loader on the same bags stored with ``--codec zstd`` (if that store exists)."""
    from momkd.data.store import CohortStore

    path = setup["root"] / "cohort_zstd.zarr"
    if not path.exists():
        pytest.skip("no cohort_zstd.zarr next to the benchmark cohort")
    alt = {**setup, "store": CohortStore.open(path)}
    alt["disk"] = {**setup["disk"], "zstd": _dir_bytes(path)}
    _run(benchmark, lambda: read_momkd(alt), alt, "zstd")


@pytest.mark.benchmark(group="whole-bag reads")
def test_zarr_python(benchmark, setup):
    _run(benchmark, lambda: read_zarr_python(setup), setup, "store")


@pytest.mark.benchmark(group="whole-bag reads")
def test_h5py_trident(benchmark, setup):
    _run(benchmark, lambda: read_h5py(setup), setup, "h5")


@pytest.mark.benchmark(group="whole-bag reads")
def test_torch_load_pt(benchmark, setup):
    _run(benchmark, lambda: read_torch_pt(setup), setup, "pt")


@pytest.mark.benchmark(group="whole-bag reads")
def test_codec_ceiling(benchmark, setup):
    _run(benchmark, lambda: read_codec_ceiling(setup), setup, "store")


def test_contenders_agree(setup):
    """All readers deliver the same data (float16 store vs float32 sources within fp16 rounding)."""
    a = read_momkd(setup)
    b = read_zarr_python(setup)
    c = read_h5py(setup)
    d = read_torch_pt(setup)
    assert a == pytest.approx(b, rel=1e-9)
    assert c == pytest.approx(d, rel=1e-9)
    assert a == pytest.approx(c, rel=1e-2, abs=1e-2 * len(setup["order"]))
