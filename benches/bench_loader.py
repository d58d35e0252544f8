"""Whole-bag read throughput, the way training consumes bags: each bag is used and released before
the next one (consume-and-drop), with the files in the page cache (``warm``) and with the page cache
dropped before every timed pass (``cold``).

All contenders read the same bags in the same random order (features decoded to float32 numpy
arrays, plus the coordinates) from the same cohort in their own layout:

* ``raw-read-ceiling`` — the store's own feature and coordinate chunk files of every bag read raw
  (no decoding) by ``MOMKD_BENCH_IO_THREADS`` threads (default 16): what the storage delivers;
* ``decode-ceiling``   — the feature chunks read and decoded with the codec libraries alone
  (numcodecs blosc/zstd, google-crc32c; same thread count as momkd), no float32 conversion and no
  copy into bags: an upper bound for any reader of this store on these cores;
* ``momkd``            — ``momkd.BagLoader`` (Rust, zarrs, own thread pool, read-ahead, prefetch);
* ``momkd-float16``    — the same loader handing over float16 (``dtype="float16"``, half the bytes);
* ``momkd-1-io-thread`` — the same loader with one read-ahead I/O thread instead of the default 8;
* ``momkd-zstd`` / ``momkd-none`` / ``momkd-sharded`` — the loader on the same bags stored with
  ``--codec zstd``, ``--codec none`` (crc32c only) and ``--shard-mb 64`` (the codec and layout
  choices, side by side);
* ``zarr-python``      — zarr-python slicing the default store (rows of one slide per read);
* ``h5py-trident``     — h5py on TRIDENT-layout ``.h5`` (float32);
* ``torch-load-pt``    — ``torch.load`` of CLAM-style ``.pt`` tensors (float32, features only).

Throughput is float32-equivalent GB/s (patches x D x 4 bytes per second), so layouts compare on the
same delivered data; ``disk GB/s`` divides the bytes each contender's files hold on disk instead.

The cold case writes ``3`` to ``/proc/sys/vm/drop_caches`` (after ``sync``) before each timed round,
which needs root; without that permission the cold benchmarks skip with the reason. The machine's
page cache is then dropped for every process on it, so run cold benchmarks on a quiet machine.

``first-read`` goes one step further: before each round the contender's files are copied anew
(new files on the same filesystem, then the page cache dropped), so every timed read is the first
read of those files. On a virtual machine whose host caches the disk image, "cold" reads of files
read before may be served from the host's memory, so the two cases can differ a lot. Timed for
the readers in ``FIRST_READ``.

Run with ``bash scripts/dev.sh bench -k loader`` (size through ``MOMKD_BENCH_SLIDES`` etc., see
``benches/conftest.py``). Every contender's output is checked against the others.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from pagecache import cold_unavailable, drop_page_cache

THREADS = int(os.environ.get("MOMKD_BENCH_THREADS", min(4, os.cpu_count() or 1)))
IO_THREADS = int(os.environ.get("MOMKD_BENCH_IO_THREADS", 16))
ROUNDS = int(os.environ.get("MOMKD_BENCH_ROUNDS", 3))

# Alternative stores written next to the benchmark cohort from its TRIDENT files (same bags).
VARIANTS = {
    "zstd": {"codec": "zstd"},
    "none": {"codec": "none"},
    "sharded": {"codec": "lz4", "shard_mb": 64},
}


def _dir_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _variant_store(root: Path, name: str) -> Path | None:
    """Write (once) the ``name`` variant of the cohort store; ``None`` when it cannot be written."""
    from momkd.data.ingest import ingest

    path = root / f"cohort_{name}.zarr"
    if (path / "zarr.json").exists():
        return path
    try:
        ingest(root / "h5", path, progress=False, overwrite=True, **VARIANTS[name])
    except TypeError:  # an ingest without this option (older momkd)
        return None
    return path


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
    stores = {"default": root / "cohort.zarr"}
    for name in VARIANTS:
        path = _variant_store(root, name)
        if path is not None:
            stores[name] = path
    disk = {name: _dir_bytes(path) for name, path in stores.items()}
    disk["h5"] = sum(_dir_bytes(root / "h5" / f"{s}.h5") for s in order)
    disk["pt"] = sum(_dir_bytes(root / "pt" / f"{s}.pt") for s in order)
    if len(order) < len(ids):  # stores hold every slide; count the share of the bags read
        for name in stores:
            disk[name] = int(disk[name] * patches / store.n_patches)
    return {
        "root": root,
        "store": store,
        "stores": stores,
        "order": order,
        "f32_bytes": patches * store.feature_dim * 4,
        "disk": disk,
    }


def _fingerprint(features: np.ndarray) -> float:
    # Cheap content fingerprint of one bag (a few rows), so that results can be compared.
    return float(np.float64(features[:: max(1, len(features) // 7)].astype(np.float32).sum()))


# --------------------------------------------------------------------------- contenders


def read_momkd(
    setup, store_key: str = "default", dtype: str = "float32", io_threads: int | None = None
) -> float:
    from momkd.data.loader import BagLoader

    kwargs: dict = {} if dtype == "float32" else {"dtype": dtype}
    if io_threads is not None:
        kwargs["io_threads"] = io_threads
    loader = BagLoader(
        str(setup["stores"][store_key]),
        slide_ids=setup["order"],
        knn_k=None,
        num_threads=THREADS,
        prefetch=4,
        **kwargs,
    )
    total = 0.0
    for bag in loader:
        total += _fingerprint(bag.features.numpy())
        del bag
    return total


def read_zarr_python(setup) -> float:
    import zarr

    root = zarr.open_group(str(setup["stores"]["default"]), mode="r")
    feats, coords = root["features"], root["coords"]
    offsets = root["offsets"][:]
    index = {s: i for i, s in enumerate(root.attrs["momkd"]["slide_ids"])}
    total = 0.0
    for sid in setup["order"]:
        i = index[sid]
        f = feats[offsets[i] : offsets[i + 1]].astype(np.float32)
        coords[offsets[i] : offsets[i + 1]]
        total += _fingerprint(f)
        del f
    return total


def read_h5py(setup) -> float:
    import h5py

    total = 0.0
    for sid in setup["order"]:
        with h5py.File(setup["root"] / "h5" / f"{sid}.h5", "r") as f:
            feats = f["features"][:]
            f["coords"][:]
        total += _fingerprint(feats)
        del feats
    return total


def read_torch_pt(setup) -> float:
    import torch

    total = 0.0
    for sid in setup["order"]:
        t = torch.load(setup["root"] / "pt" / f"{sid}.pt", weights_only=True)
        total += _fingerprint(t.numpy())
        del t
    return total


def _bag_chunk_files(setup, array: str) -> Iterator[Path]:
    """The chunk files of ``array`` that each bag touches, bag after bag (default store)."""
    root = setup["stores"]["default"]
    meta = json.loads((root / array / "zarr.json").read_text())
    rows = meta["chunk_grid"]["configuration"]["chunk_shape"][0]
    store = setup["store"]
    offsets = np.asarray(store.offsets)
    index = {s: i for i, s in enumerate(store.slide_ids)}
    for sid in setup["order"]:
        i = index[sid]
        first, last = offsets[i] // rows, (offsets[i + 1] - 1) // rows
        for c in range(first, last + 1):
            yield root / array / "c" / str(c) / "0"


def read_raw_ceiling(setup) -> int:
    """Read every chunk file (features and coordinates) of every bag, raw, on IO_THREADS threads.

    Each thread reads into one reused buffer (``readinto``, no allocation per file), so the figure is
    the storage's and the kernel's, not Python's allocator's.
    """
    local = threading.local()

    def read(path: Path) -> int:
        size = path.stat().st_size
        buf = getattr(local, "buf", None)
        if buf is None or len(buf) < size:
            buf = local.buf = bytearray(max(size, 1 << 22))
        view = memoryview(buf)[:size]
        got = 0
        with open(path, "rb", buffering=0) as f:
            while got < size:
                n = f.readinto(view[got:])
                if not n:
                    break
                got += n
        return got

    paths = [*_bag_chunk_files(setup, "features"), *_bag_chunk_files(setup, "coords")]
    with ThreadPoolExecutor(IO_THREADS) as pool:
        return sum(pool.map(read, paths))


def _chunk_decoder(meta: dict) -> Callable[[bytes], int]:
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


def read_decode_ceiling(setup) -> int:
    """Read and decode exactly the feature chunks each bag touches (no conversion, no copy out)."""
    root = setup["stores"]["default"]
    decode_bytes = _chunk_decoder(json.loads((root / "features" / "zarr.json").read_text()))

    def decode(path: Path) -> int:
        with open(path, "rb", buffering=0) as f:
            return decode_bytes(f.read())

    with ThreadPoolExecutor(THREADS) as pool:
        return sum(pool.map(decode, _bag_chunk_files(setup, "features")))


CONTENDERS: dict[str, tuple[Callable, str]] = {
    # name: (reader, key of the bytes on disk it reads)
    "raw-read-ceiling": (read_raw_ceiling, "default"),
    "decode-ceiling": (read_decode_ceiling, "default"),
    "momkd": (lambda s: read_momkd(s), "default"),
    "momkd-float16": (lambda s: read_momkd(s, dtype="float16"), "default"),
    "momkd-1-io-thread": (lambda s: read_momkd(s, io_threads=1), "default"),
    "momkd-zstd": (lambda s: read_momkd(s, "zstd"), "zstd"),
    "momkd-none": (lambda s: read_momkd(s, "none"), "none"),
    "momkd-sharded": (lambda s: read_momkd(s, "sharded"), "sharded"),
    "zarr-python": (read_zarr_python, "default"),
    "h5py-trident": (read_h5py, "h5"),
    "torch-load-pt": (read_torch_pt, "pt"),
}


def _supports(option: str) -> bool:
    import inspect

    from momkd.data.loader import BagLoader

    return option in inspect.signature(BagLoader).parameters


# --------------------------------------------------------------------------- benchmarks


# The contenders timed on first reads (each round copies their files anew).
FIRST_READ = (
    "raw-read-ceiling",
    "momkd",
    "momkd-float16",
    "zarr-python",
    "h5py-trident",
    "torch-load-pt",
)


def _fresh_files(setup: dict, disk_key: str) -> dict:
    """``setup`` with the files of ``disk_key`` (a store, ``h5`` or ``pt``) replaced by a new copy
    (new files, then the page cache dropped): the next read of them is their first."""
    scratch = Path(setup["root"]) / "first_read"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    fresh = dict(setup)
    if disk_key in ("h5", "pt"):
        shutil.copytree(Path(setup["root"]) / disk_key, scratch / disk_key)
        fresh["root"] = scratch
    else:
        src = setup["stores"][disk_key]
        fresh["stores"] = {**setup["stores"], disk_key: scratch / src.name}
        shutil.copytree(src, scratch / src.name)
    drop_page_cache()
    return fresh


@pytest.mark.parametrize("contender", list(CONTENDERS))
@pytest.mark.parametrize("cache", ["warm", "cold", "first-read"])
def test_read(benchmark, setup, cache, contender):
    reader, disk_key = CONTENDERS[contender]
    if disk_key not in setup["stores"] and disk_key not in ("h5", "pt"):
        pytest.skip(f"no {disk_key} variant of the store (this momkd cannot write it)")
    if contender == "momkd-float16" and not _supports("dtype"):
        pytest.skip("this momkd's BagLoader has no dtype option")
    if contender == "momkd-1-io-thread" and not _supports("io_threads"):
        pytest.skip("this momkd's BagLoader has no io_threads option")
    benchmark.group = f"{cache} consume-and-drop"
    if cache in ("cold", "first-read"):
        why = cold_unavailable()
        if why is not None:
            pytest.skip(f"{cache} reads: {why}")
    if cache == "first-read":
        if contender not in FIRST_READ:
            pytest.skip(f"first reads are timed for {', '.join(FIRST_READ)} only")
        benchmark.pedantic(
            reader,
            setup=lambda: ((_fresh_files(setup, disk_key),), {}),
            rounds=ROUNDS,
            iterations=1,
        )
        shutil.rmtree(Path(setup["root"]) / "first_read", ignore_errors=True)
    elif cache == "cold":
        benchmark.pedantic(
            reader, args=(setup,), setup=drop_page_cache, rounds=ROUNDS, iterations=1
        )
    else:
        benchmark.pedantic(reader, args=(setup,), rounds=ROUNDS, iterations=1, warmup_rounds=1)
    median = benchmark.stats.stats.median
    benchmark.extra_info["gbps_f32"] = setup["f32_bytes"] / median / 1e9
    benchmark.extra_info["bytes_on_disk"] = setup["disk"][disk_key]
    benchmark.extra_info["disk_gbps"] = setup["disk"][disk_key] / median / 1e9
    benchmark.extra_info["bags"] = len(setup["order"])
    benchmark.extra_info["threads"] = IO_THREADS if contender == "raw-read-ceiling" else THREADS


def test_contenders_agree(setup):
    """All readers deliver the same data (float16 store vs float32 sources within fp16 rounding)."""
    a = read_momkd(setup)
    b = read_zarr_python(setup)
    c = read_h5py(setup)
    d = read_torch_pt(setup)
    assert a == pytest.approx(b, rel=1e-9)
    assert c == pytest.approx(d, rel=1e-9)
    assert a == pytest.approx(c, rel=1e-2, abs=1e-2 * len(setup["order"]))
    for key in setup["stores"]:
        if key != "default":  # same float16 values, other codec or layout
            assert read_momkd(setup, key) == pytest.approx(a, rel=1e-9), key
    if _supports("dtype"):
        assert read_momkd(setup, dtype="float16") == pytest.approx(a, rel=1e-9)
