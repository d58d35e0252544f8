"""Python-level tests of the Rust extension ``momkd._core``.

Stores are written with zarr-python alone, following docs/FORMAT.md, and read back both through
zarr-python (the oracle) and through the Rust reader. k-NN graphs are checked against scikit-learn
and a numpy brute force; float16 conversion against numpy's ``astype``.
"""

from __future__ import annotations

import ast
import gc
import json
import os
import pickle
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from momkd import _core
from momkd._core import (
    BagPrefetcher,
    ConfigError,
    DataError,
    MomkdError,
    SlideNotFoundError,
    Store,
    StoreError,
)
from zarr.codecs import BloscCodec, ZstdCodec

D = 6
LENGTHS = {"slide-a": 5, "slide-b": 13, "slide-c": 1, "slide-d": 9}


def make_bags(
    lengths: dict[str, int], dim: int = D, seed: int = 0
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Random features and unique grid coordinates (so each row can be identified by its coords)."""
    rng = np.random.default_rng(seed)
    bags = {}
    start = 0
    for sid, p in lengths.items():
        feats = rng.normal(size=(p, dim)).astype(np.float32)
        cells = np.arange(start, start + p)
        coords = np.stack([(cells % 37) * 256, (cells // 37) * 256], axis=1)
        bags[sid] = (feats, coords)
        start += p
    return bags


def write_store(
    path: Path,
    bags: dict[str, tuple[np.ndarray, np.ndarray]],
    *,
    dtype: str = "float16",
    chunk_rows: int = 4,
    coords_dtype: str = "int32",
    compressors: Any = None,
    header: dict[str, Any] | None = None,
    coords_chunk_rows: int | None = None,
    offsets_chunk: int | None = None,
    **feature_kwargs: Any,
) -> Path:
    """Write a cohort store with zarr-python exactly as docs/FORMAT.md describes."""
    ids = list(bags)
    feats = np.concatenate([bags[s][0] for s in ids]).astype(dtype)
    coords = np.concatenate([bags[s][1] for s in ids]).astype(coords_dtype)
    offsets = np.concatenate([[0], np.cumsum([len(bags[s][0]) for s in ids])]).astype(np.int64)
    comp = ZstdCodec(level=3, checksum=True) if compressors is None else compressors
    cfg = {"write_empty_chunks": True}
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    root.create_array(
        "features",
        data=feats,
        chunks=(chunk_rows, feats.shape[1]),
        compressors=comp,
        config=cfg,
        **feature_kwargs,
    )
    root.create_array(
        "coords",
        data=coords,
        chunks=(coords_chunk_rows or chunk_rows, 2),
        compressors=comp,
        config=cfg,
    )
    root.create_array(
        "offsets",
        data=offsets,
        chunks=(offsets_chunk or len(offsets),),
        compressors=comp,
        config=cfg,
    )
    attrs = {
        "format": "momkd-cohort",
        "format_version": 1,
        "complete": True,
        "feature_dim": int(feats.shape[1]),
        "n_slides": len(ids),
        "n_patches": len(feats),
        "slide_ids": ids,
        "encoder": "test",
        "magnification": 20,
        "patch_size": 256,
    }
    attrs.update(header or {})
    root.attrs["momkd"] = attrs
    return path


def set_header(path: Path, **changes: Any) -> None:
    """Edit the momkd header in the root zarr.json."""
    meta_path = path / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["momkd"].update(changes)
    meta_path.write_text(json.dumps(meta))


def chunk_of(row: int, chunk_rows: int) -> str:
    return f"features/c/{row // chunk_rows}/0"


@pytest.fixture
def bags() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return make_bags(LENGTHS)


@pytest.fixture
def store_path(tmp_path: Path, bags: dict[str, tuple[np.ndarray, np.ndarray]]) -> Path:
    return write_store(tmp_path / "cohort.zarr", bags, chunk_rows=4)


# ---------------------------------------------------------------------------------- reading


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("chunk_rows", [1, 3, 4, 7, 64])
def test_read_matches_zarr_python(
    tmp_path: Path, bags: dict[str, tuple[np.ndarray, np.ndarray]], dtype: str, chunk_rows: int
) -> None:
    path = write_store(tmp_path / "s.zarr", bags, dtype=dtype, chunk_rows=chunk_rows)
    store = Store.open(str(path))
    oracle = zarr.open_group(str(path), mode="r")
    off = oracle["offsets"][:]

    assert store.path == str(path)
    assert store.slide_ids == list(bags)
    assert len(store) == len(bags)
    assert store.feature_dim == D
    assert store.n_patches == sum(LENGTHS.values())
    assert store.dtype == dtype
    assert store.chunk_rows == chunk_rows
    assert json.loads(store.header_json) == dict(oracle.attrs["momkd"])
    got_off = store.offsets()
    assert got_off.dtype == np.int64
    np.testing.assert_array_equal(got_off, off)

    for i, sid in enumerate(bags):
        feats, coords = store.read(i)
        want_f = oracle["features"][off[i] : off[i + 1]].astype(np.float32)
        want_c = oracle["coords"][off[i] : off[i + 1]].astype(np.int64)
        assert feats.dtype == np.float32 and coords.dtype == np.int64
        assert feats.flags.c_contiguous and coords.flags.c_contiguous
        assert feats.shape == (LENGTHS[sid], D) and coords.shape == (LENGTHS[sid], 2)
        np.testing.assert_array_equal(feats, want_f)
        np.testing.assert_array_equal(coords, want_c)
        # And against the data that went in.
        np.testing.assert_array_equal(feats, bags[sid][0].astype(dtype).astype(np.float32))
        np.testing.assert_array_equal(coords, bags[sid][1])
        assert store.index_of(sid) == i


def test_int64_coords_gzip_other_chunking_and_pathlike(tmp_path: Path) -> None:
    from zarr.codecs import GzipCodec

    bags = make_bags({"x": 7, "y": 3, "z": 12})
    path = write_store(
        tmp_path / "s.zarr",
        bags,
        coords_dtype="int64",
        compressors=GzipCodec(level=5),
        chunk_rows=5,
        coords_chunk_rows=3,  # coords chunks need not line up with feature chunks
        offsets_chunk=2,  # offsets spread over several chunks
    )
    store = Store.open(path)
    np.testing.assert_array_equal(store.offsets(), [0, 7, 10, 22])
    for i, sid in enumerate(bags):
        feats, coords = store.read(i)
        np.testing.assert_array_equal(coords, bags[sid][1])
        np.testing.assert_array_equal(feats, bags[sid][0].astype(np.float16).astype(np.float32))


def test_store_survives_its_arrays(store_path: Path) -> None:
    # The returned arrays own their memory: they outlive the store and each other.
    store = Store.open(str(store_path))
    feats, coords = store.read(1)
    copy = feats.copy()
    del store
    gc.collect()
    np.testing.assert_array_equal(feats, copy)
    feats[0, 0] = 42.0  # writable
    # Zero-copy hand-off: numpy wraps the Rust allocation instead of owning a copy.
    assert not feats.flags.owndata and not coords.flags.owndata
    assert type(feats.base).__name__ == "PySliceContainer"


def test_numpy_integers_accepted(store_path: Path) -> None:
    store = Store.open(str(store_path))
    f1, _ = store.read(np.int64(1), max_patches=np.int32(4), seed=np.uint64(2**63 + 5))
    f2, _ = store.read(1, max_patches=4, seed=2**63 + 5)
    np.testing.assert_array_equal(f1, f2)
    got = [b[0] for b in BagPrefetcher(store, np.array([2, 0]), knn_k=None)]
    assert got == [2, 0]
    with pytest.raises(ConfigError, match="seed"):
        store.read(0, seed=-1)
    with pytest.raises(ConfigError, match="epoch"):
        BagPrefetcher(store, [0], epoch=2**64)


# ------------------------------------------------------------------------------- subsampling


def rows_of(coords_sub: np.ndarray, coords_full: np.ndarray) -> np.ndarray:
    """Row indices in the full bag of each subsampled row (coords are unique per row)."""
    lookup = {tuple(c): i for i, c in enumerate(coords_full.tolist())}
    return np.array([lookup[tuple(c)] for c in coords_sub.tolist()])


def test_max_patches_is_a_sorted_subset_and_deterministic(store_path: Path) -> None:
    store = Store.open(str(store_path))
    full_f, full_c = store.read(1)  # 13 rows
    sub_f, sub_c = store.read(1, max_patches=5, seed=3, epoch=2)
    assert sub_f.shape == (5, D) and sub_c.shape == (5, 2)
    rows = rows_of(sub_c, full_c)
    assert np.all(np.diff(rows) > 0)  # storage order, no repeats
    np.testing.assert_array_equal(sub_f, full_f[rows])
    again_f, again_c = store.read(1, max_patches=5, seed=3, epoch=2)
    np.testing.assert_array_equal(again_f, sub_f)
    np.testing.assert_array_equal(again_c, sub_c)
    # Other seeds/epochs give other subsets (checked over several draws to avoid a fluke).
    draws = {
        tuple(rows_of(store.read(1, 5, seed=s, epoch=e)[1], full_c))
        for s in range(4)
        for e in range(4)
    }
    assert len(draws) > 8
    # Not subsampled when max_patches >= P.
    f13, _ = store.read(1, max_patches=13)
    np.testing.assert_array_equal(f13, full_f)
    f99, _ = store.read(1, max_patches=99)
    np.testing.assert_array_equal(f99, full_f)


def test_max_patches_is_uniform(store_path: Path) -> None:
    store = Store.open(str(store_path))
    _, full_c = store.read(3)  # 9 rows
    counts = np.zeros(9)
    n = 900
    for epoch in range(n):
        counts[rows_of(store.read(3, max_patches=3, seed=1, epoch=epoch)[1], full_c)] += 1
    expected = n * 3 / 9
    # Binomial sd ~ sqrt(900 * 1/3 * 2/3) ~ 14; allow ~5 sd.
    assert np.all(np.abs(counts - expected) < 70), counts


def test_max_patches_rejects_zero(store_path: Path) -> None:
    store = Store.open(str(store_path))
    with pytest.raises(ConfigError, match="max_patches"):
        store.read(0, max_patches=0)


# ---------------------------------------------------------------------------------- k-NN graph


def brute_knn(coords: np.ndarray, k: int) -> np.ndarray:
    """Oracle: sort all other points by (squared distance, index)."""
    pts = coords.astype(np.float64)
    p = len(pts)
    kk = min(k, max(p - 1, 0))
    src, dst = [], []
    for i in range(p):
        d2 = ((pts - pts[i]) ** 2).sum(axis=1)
        order = np.lexsort((np.arange(p), d2))
        order = order[order != i][:kk]
        src.extend([i] * kk)
        dst.extend(order.tolist())
    return np.array([src, dst], dtype=np.int64).reshape(2, p * kk)


@pytest.mark.parametrize("p,k", [(50, 8), (400, 8), (1000, 4), (60, 20)])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_knn_matches_sklearn(p: int, k: int, dtype: type) -> None:
    from sklearn.neighbors import NearestNeighbors

    rng = np.random.default_rng(p + k)
    coords = (rng.random((p, 2)) * 5000).astype(dtype)
    edges = _core.knn_graph(coords, k)
    assert edges.dtype == np.int64 and edges.shape == (2, p * k)
    nn = NearestNeighbors(n_neighbors=k + 1, algorithm="brute").fit(coords.astype(np.float64))
    _, ind = nn.kneighbors(coords.astype(np.float64))
    assert np.all(ind[:, 0] == np.arange(p))  # no duplicate points: self comes first
    np.testing.assert_array_equal(edges[0], np.repeat(np.arange(p), k))
    np.testing.assert_array_equal(edges[1].reshape(p, k), ind[:, 1:])


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.float32, np.float64])
def test_knn_grid_ties_break_by_lower_index(dtype: type) -> None:
    # Patch-grid coordinates in a ragged region: nearly every distance is tied.
    rng = np.random.default_rng(5)
    xs, ys = np.meshgrid(np.arange(25), np.arange(20))
    keep = rng.random(xs.shape) < 0.8
    coords = np.stack([xs[keep], ys[keep]], axis=1) * 256
    coords = coords[rng.permutation(len(coords))]  # index order unrelated to position
    coords = np.concatenate([coords, coords[:3]])  # exact duplicates
    for k in (1, 4, 8):
        np.testing.assert_array_equal(
            _core.knn_graph(coords.astype(dtype), k), brute_knn(coords, k)
        )


def test_knn_small_bags_and_default_k() -> None:
    assert _core.knn_graph(np.zeros((0, 2), np.int64)).shape == (2, 0)
    assert _core.knn_graph(np.array([[3, 4]], np.int32)).shape == (2, 0)
    np.testing.assert_array_equal(
        _core.knn_graph(np.array([[0, 0], [5, 5]], np.int64)), [[0, 1], [1, 0]]
    )
    # k > P - 1: every other patch, nearest first.
    pts = np.array([[0.0, 0.0], [10.0, 0.0], [1.0, 0.0]])
    np.testing.assert_array_equal(_core.knn_graph(pts, 5), [[0, 0, 1, 1, 2, 2], [2, 1, 2, 0, 0, 1]])
    rng = np.random.default_rng(0)
    many = rng.random((30, 2))
    assert _core.knn_graph(many).shape == (2, 30 * 8)  # default k = 8
    # Non-contiguous input is read correctly.
    wide = np.asfortranarray(rng.random((40, 2)))
    np.testing.assert_array_equal(_core.knn_graph(wide, 3), brute_knn(wide, 3))


def test_knn_errors() -> None:
    with pytest.raises(DataError, match=r"shape \(P, 2\)"):
        _core.knn_graph(np.zeros((4, 3)))
    with pytest.raises(DataError, match="int8"):
        _core.knn_graph(np.zeros((4, 2), np.int8))
    with pytest.raises(DataError, match="row 2"):
        _core.knn_graph(np.array([[0.0, 0.0], [1.0, 1.0], [np.nan, 0.0]]))
    with pytest.raises(ConfigError):
        _core.knn_graph(np.zeros((4, 2)), -1)


# ------------------------------------------------------------------------------- prefetcher


@pytest.mark.parametrize("num_threads,prefetch", [(1, 1), (2, 4), (3, 2)])
def test_prefetcher_order_and_equality(store_path: Path, num_threads: int, prefetch: int) -> None:
    store = Store.open(str(store_path))
    order = [3, 0, 2, 1, 1, 0, 3]
    it = BagPrefetcher(store, order, num_threads=num_threads, prefetch=prefetch)
    assert len(it) == len(order)
    assert iter(it) is it
    got = list(it)
    assert [g[0] for g in got] == order
    for index, feats, coords, edges in got:
        want_f, want_c = store.read(index)
        np.testing.assert_array_equal(feats, want_f)
        np.testing.assert_array_equal(coords, want_c)
        assert edges is not None and edges.dtype == np.int64
        np.testing.assert_array_equal(edges, brute_knn(want_c, 8))
    with pytest.raises(StopIteration):
        next(it)


def test_prefetcher_subsampling_and_no_graph(store_path: Path) -> None:
    store = Store.open(str(store_path))
    order = [1, 3, 1]
    got = list(BagPrefetcher(store, order, max_patches=4, seed=9, epoch=1, knn_k=None))
    for index, feats, coords, edges in got:
        want_f, want_c = store.read(index, max_patches=4, seed=9, epoch=1)
        np.testing.assert_array_equal(feats, want_f)
        np.testing.assert_array_equal(coords, want_c)
        assert edges is None
    got_k3 = list(BagPrefetcher(store, [2, 1], knn_k=3))
    assert got_k3[0][3].shape == (2, 0)  # single-patch slide
    np.testing.assert_array_equal(got_k3[1][3], brute_knn(got_k3[1][2], 3))
    assert list(BagPrefetcher(store, [])) == []


def _os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def test_prefetcher_early_drop_does_not_hang_or_leak(store_path: Path) -> None:
    store = Store.open(str(store_path))
    if not os.path.isdir("/proc/self/task"):
        pytest.skip("needs /proc to count threads")
    list(BagPrefetcher(store, [0], num_threads=1))  # warm-up
    gc.collect()
    time.sleep(0.2)
    before = _os_threads()
    for _ in range(5):
        it = BagPrefetcher(store, [0, 1, 2, 3] * 50, num_threads=3, prefetch=8)
        next(it)
        assert _os_threads() >= before + 3  # the pool's own threads
        del it
    gc.collect()
    # The pools' threads exit once their current bag is done.
    deadline = time.monotonic() + 10
    while _os_threads() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _os_threads() <= before


def test_prefetcher_raises_bag_error_then_stops(tmp_path: Path) -> None:
    bags = make_bags(LENGTHS)
    path = write_store(tmp_path / "s.zarr", bags, chunk_rows=4)
    # slide-b owns rows 5..18 -> chunks 1..4; chunk 3 (rows 12..16) belongs to slide-b only.
    (path / "features" / "c" / "3" / "0").unlink()
    store = Store.open(str(path))
    it = BagPrefetcher(store, [0, 1, 2, 3], prefetch=4)
    assert next(it)[0] == 0
    with pytest.raises(StoreError, match=r"slide-b.*features/c/3/0"):
        next(it)
    with pytest.raises(StopIteration):
        next(it)


def test_prefetcher_argument_errors(store_path: Path) -> None:
    store = Store.open(str(store_path))
    with pytest.raises(SlideNotFoundError, match="out of range"):
        BagPrefetcher(store, [0, 4])
    with pytest.raises(SlideNotFoundError):
        BagPrefetcher(store, [-1])
    with pytest.raises(ConfigError, match="num_threads"):
        BagPrefetcher(store, [0], num_threads=0)
    with pytest.raises(ConfigError, match="prefetch"):
        BagPrefetcher(store, [0], prefetch=0)
    with pytest.raises(ConfigError, match="max_patches"):
        BagPrefetcher(store, [0], max_patches=0)


# ------------------------------------------------------------------------------------ errors


def assert_one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and msg
    return msg


def test_error_hierarchy() -> None:
    from momkd import errors

    assert issubclass(MomkdError, Exception)
    for cls in (StoreError, SlideNotFoundError, DataError, ConfigError, _core.IngestError):
        assert issubclass(cls, MomkdError)
        assert cls.__module__ == "momkd._core"
    assert issubclass(SlideNotFoundError, KeyError)
    assert issubclass(DataError, ValueError)
    assert issubclass(ConfigError, ValueError)
    assert errors.StoreError is StoreError
    assert errors.SlideNotFoundError is SlideNotFoundError
    # KeyError's repr-quoting is not applied to the message.
    assert str(SlideNotFoundError("no slide x")) == "no slide x"
    # Errors cross process boundaries (DataLoader workers, multiprocessing).
    for cls in (MomkdError, StoreError, SlideNotFoundError, DataError, ConfigError):
        err = pickle.loads(pickle.dumps(cls("store s: slide a")))
        assert type(err) is cls and str(err) == "store s: slide a"


def flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    for i in range(mid, min(mid + 8, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "empty", "wrong-size"])
def test_damaged_chunk_names_store_slide_and_chunk(store_path: Path, damage: str) -> None:
    # slide-d owns rows 19..28 -> chunks 4..6 of 4 rows; damage chunk 5.
    chunk = store_path / "features" / "c" / "5" / "0"
    if damage == "flip":
        flip_bytes(chunk)
    elif damage == "truncate":
        data = chunk.read_bytes()
        chunk.write_bytes(data[: len(data) // 2])
    elif damage == "delete":
        chunk.unlink()
    elif damage == "empty":
        chunk.write_bytes(b"")
    else:  # a valid, checksummed zstd frame holding too few values
        from numcodecs import Zstd

        small = np.ones((2, D), dtype=np.float16).tobytes()
        chunk.write_bytes(Zstd(level=3, checksum=True).encode(small))
    store = Store.open(str(store_path))  # chunks are checked when read
    with pytest.raises(StoreError) as exc:
        store.read(3)
    msg = assert_one_line(exc)
    assert str(store_path) in msg and "slide-d" in msg and "features/c/5/0" in msg
    if damage == "delete":
        assert "missing" in msg
    # Other slides are unaffected.
    np.testing.assert_array_equal(store.read(0)[1], make_bags(LENGTHS)["slide-a"][1])


def test_damaged_coords_chunk(store_path: Path) -> None:
    flip_bytes(store_path / "coords" / "c" / "0" / "0")
    store = Store.open(str(store_path))
    with pytest.raises(StoreError, match=r"slide-a.*coords/c/0/0"):
        store.read(0)


def test_nan_feature_names_slide_row_and_chunk(tmp_path: Path) -> None:
    bags = make_bags(LENGTHS)
    bags["slide-b"][0][6, 2] = np.nan  # global row 11 -> chunk 2 with 4 rows per chunk
    bags["slide-d"][0][8, 0] = np.inf  # global row 27 -> chunk 6
    path = write_store(tmp_path / "s.zarr", bags, chunk_rows=4)
    store = Store.open(str(path))
    with pytest.raises(DataError) as exc:
        store.read(1)
    msg = assert_one_line(exc)
    assert "slide-b" in msg and "row 6" in msg and chunk_of(11, 4) in msg and str(path) in msg
    with pytest.raises(DataError, match=r"slide-d.*row 8.*features/c/6/0"):
        store.read(3)
    # A subsample that skips the bad row reads fine; one that includes it fails.
    outcomes = set()
    for seed in range(30):
        try:
            store.read(1, max_patches=3, seed=seed)
            outcomes.add("ok")
        except DataError as e:
            assert "row 6" in str(e)
            outcomes.add("nan")
    assert outcomes == {"ok", "nan"}


def test_missing_array(store_path: Path) -> None:
    shutil.rmtree(store_path / "coords")
    with pytest.raises(StoreError) as exc:
        Store.open(str(store_path))
    msg = assert_one_line(exc)
    assert "'coords'" in msg and str(store_path) in msg


def test_wrong_dtype(tmp_path: Path, bags: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    path = write_store(tmp_path / "s.zarr", bags, dtype="int8")
    with pytest.raises(StoreError, match=r"'features'.*int8"):
        Store.open(str(path))
    path = write_store(tmp_path / "c.zarr", bags, coords_dtype="float32")
    with pytest.raises(StoreError, match=r"'coords'.*float32"):
        Store.open(str(path))


def test_unsupported_codec_and_sharded_store(
    tmp_path: Path, bags: dict[str, tuple[np.ndarray, np.ndarray]]
) -> None:
    # blosc (with or without a crc32c checksum) is part of the format; a codec outside it is not.
    path = write_store(tmp_path / "b.zarr", bags, compressors=BloscCodec())
    assert len(Store.open(str(path))) == len(bags)
    meta_file = path / "features" / "zarr.json"
    meta = json.loads(meta_file.read_text())
    meta["codecs"][1] = {"name": "bz2", "configuration": {"level": 1}}
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(StoreError, match=r"'features'.*bz2"):
        Store.open(str(path))
    # Sharding is format version 1.1 (tests/test_sharding.py): read like the unsharded store.
    path = write_store(tmp_path / "s.zarr", bags, chunk_rows=4, shards=(8, D))
    sharded, plain = Store.open(str(path)), Store.open(str(write_store(tmp_path / "p.zarr", bags)))
    assert sharded.shard_rows == 8 and sharded.chunk_rows == 4 and plain.shard_rows is None
    for i in range(len(bags)):
        assert np.array_equal(sharded.read(i)[0], plain.read(i)[0])


@pytest.mark.parametrize(
    "changes,needle",
    [
        ({"complete": False}, "incomplete"),
        ({"slide_ids": ["slide-a", "slide-b", "slide-a", "slide-d"]}, "duplicate slide id"),
        ({"slide_ids": ["slide-a", "../x", "slide-c", "slide-d"]}, "path separator"),
        ({"slide_ids": ["slide-a", "", "slide-c", "slide-d"]}, "empty"),
        ({"slide_ids": [".a", "b", "c", "d"]}, "starts with '.'"),
        ({"slide_ids": ["a", "b", "c"]}, "n_slides"),
        ({"format": "something-else"}, "format"),
        ({"format_version": 2}, "newer"),
        ({"feature_dim": D + 1}, "feature_dim"),
        ({"n_patches": 3}, "n_patches"),
    ],
)
def test_bad_header(store_path: Path, changes: dict[str, Any], needle: str) -> None:
    set_header(store_path, **changes)
    with pytest.raises(StoreError) as exc:
        Store.open(str(store_path))
    msg = assert_one_line(exc)
    assert needle in msg and str(store_path) in msg


def test_missing_header_and_not_a_store(store_path: Path, tmp_path: Path) -> None:
    meta = json.loads((store_path / "zarr.json").read_text())
    del meta["attributes"]["momkd"]
    (store_path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="no momkd header"):
        Store.open(str(store_path))
    (store_path / "zarr.json").write_text("{not json")
    with pytest.raises(StoreError, match="not valid JSON"):
        Store.open(str(store_path))
    with pytest.raises(StoreError, match="not a directory"):
        Store.open(str(tmp_path / "nope.zarr"))


def test_bad_offsets(tmp_path: Path, bags: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    path = write_store(tmp_path / "s.zarr", bags)
    off = zarr.open_array(str(path / "offsets"), mode="r+")
    good = off[:]
    off[1] = off[2]  # empty bag
    with pytest.raises(StoreError, match=r"'offsets'.*no patches"):
        Store.open(str(path))
    bad = good.copy()
    bad[-1] -= 1
    off[:] = bad
    with pytest.raises(StoreError, match=r"'offsets'.*ends at"):
        Store.open(str(path))
    bad = good.copy()
    bad[0] = 1
    off[:] = bad
    with pytest.raises(StoreError, match=r"'offsets'.*starts at 1"):
        Store.open(str(path))


def test_unknown_slide(store_path: Path) -> None:
    store = Store.open(str(store_path))
    with pytest.raises(SlideNotFoundError) as exc:
        store.index_of("slide-zz")
    msg = assert_one_line(exc)
    assert "slide-zz" in msg and str(store_path) in msg
    with pytest.raises(KeyError):
        store.index_of("slide-zz")
    with pytest.raises(SlideNotFoundError, match="out of range"):
        store.read(4)
    with pytest.raises(SlideNotFoundError, match="out of range"):
        store.read(-1)


# ---------------------------------------------------------------------------- float conversion


@pytest.mark.parametrize("src_dtype", [np.float32, np.float64])
def test_to_float16_matches_numpy(src_dtype: type) -> None:
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(57, 33)) * rng.choice([1e-6, 1e-3, 1, 300, 20000], size=(57, 33))).astype(
        src_dtype
    )
    x[0, :4] = [65504.0, -65504.0, 6e-8, -0.0]
    got = _core.to_float16_checked(x, "x")
    assert got.dtype == np.float16 and got.shape == x.shape
    np.testing.assert_array_equal(got.view(np.uint16), x.astype(np.float16).view(np.uint16))
    # Non-contiguous input.
    got_t = _core.to_float16_checked(x.T, "xt")
    np.testing.assert_array_equal(got_t.view(np.uint16), x.T.astype(np.float16).view(np.uint16))


@pytest.mark.parametrize("src_dtype", [np.float32, np.float64])
def test_to_float16_errors(src_dtype: type) -> None:
    x = np.ones((10, 4), dtype=src_dtype)
    x[7, 3] = 70000.0
    with pytest.raises(DataError) as exc:
        _core.to_float16_checked(x, "slide-q features")
    msg = assert_one_line(exc)
    assert "slide-q features" in msg and "row 7" in msg and "overflows float16" in msg
    x[3, 0] = np.nan
    with pytest.raises(DataError, match=r"slide-q features: row 3 .*non-finite"):
        _core.to_float16_checked(x, "slide-q features")
    with pytest.raises(DataError, match="float32 or float64"):
        _core.to_float16_checked(np.ones((2, 2), np.int32), "ints")


def test_check_finite() -> None:
    for dtype in (np.float16, np.float32):
        x = np.zeros((6, 5), dtype=dtype)
        assert _core.check_finite(x, "ok") is None
        x[4, 1] = np.inf
        with pytest.raises(DataError) as exc:
            _core.check_finite(x, "feats.h5")
        msg = assert_one_line(exc)
        assert "feats.h5" in msg and "row 4" in msg
        x[2, 4] = np.nan
        with pytest.raises(ValueError, match="row 2"):
            _core.check_finite(x, "feats.h5")
    with pytest.raises(DataError):
        _core.check_finite(np.zeros((2, 2), np.int64), "ints")


# --------------------------------------------------------------------------------- the stub


def _stub_tree() -> ast.Module:
    stub = Path(_core.__file__).with_name("_core.pyi")
    if not stub.exists():  # installed without the stub next to the binary
        stub = Path(__file__).resolve().parents[1] / "python" / "momkd" / "_core.pyi"
    return ast.parse(stub.read_text())


def _stub_names() -> Iterator[tuple[str, ast.stmt]]:
    for node in _stub_tree().body:
        if isinstance(node, ast.ClassDef | ast.FunctionDef):
            yield node.name, node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            yield node.target.id, node
        elif isinstance(node, ast.Assign):
            for t in node.targets:
                if isinstance(t, ast.Name):
                    yield t.id, node


def test_stub_matches_binary() -> None:
    names = dict(_stub_names())
    public = {n for n in dir(_core) if not n.startswith("_")} | {"__version__"}
    assert public <= set(names) | {"__all__"}, public - set(names)
    assert set(_core.__all__) <= set(names)
    for name, node in names.items():
        assert hasattr(_core, name), name
        obj = getattr(_core, name)
        if isinstance(node, ast.ClassDef):
            assert isinstance(obj, type), name
            for member in node.body:
                if isinstance(member, ast.FunctionDef):
                    assert hasattr(obj, member.name), f"{name}.{member.name}"
                    is_prop = any(
                        isinstance(d, ast.Name) and d.id == "property"
                        for d in member.decorator_list
                    )
                    attr = obj.__dict__.get(member.name)
                    if is_prop:
                        assert attr is not None and not callable(attr), f"{name}.{member.name}"
                    else:
                        assert callable(getattr(obj, member.name)), f"{name}.{member.name}"
        elif isinstance(node, ast.FunctionDef):
            assert callable(obj) and not isinstance(obj, type), name
        else:
            assert not callable(obj), name
    assert isinstance(_core.__version__, str) and _core.__version__


def test_stubtest_if_available() -> None:
    stubtest = pytest.importorskip("mypy.stubtest")
    assert stubtest.test_stubs(stubtest.parse_options(["momkd._core"])) == 0
