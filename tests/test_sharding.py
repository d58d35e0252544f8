"""Sharded stores (format version 1.1): written by zarr-python or momkd, read bit-exactly by momkd."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from momkd.cli import main
from momkd.data import BagLoader, CohortStore, StoreWriter
from momkd.data.ingest import ingest
from momkd.data.store_writer import shard_rows_for
from momkd.errors import DataError, StoreError
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

D = 12
# Inner chunks of 16 rows, shards of 64 rows: these slides start and end inside chunks and shards,
# and the large ones span several shards.
SIZES = [5, 70, 1, 130, 33, 64, 200, 9]


def _bags(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {
        f"slide_{i}": (
            rng.normal(scale=4.0, size=(p, D)).astype(np.float16),
            rng.integers(0, 10**6, size=(p, 2)).astype(np.int32),
        )
        for i, p in enumerate(SIZES)
    }


def write_with_zarr_python(path: Path, bags: dict, *, inner: int = 16, shard: int = 64) -> Path:
    """A sharded store written with zarr-python alone, as docs/FORMAT.md describes."""
    ids = list(bags)
    feats = np.concatenate([bags[s][0] for s in ids])
    coords = np.concatenate([bags[s][1] for s in ids])
    offsets = np.concatenate([[0], np.cumsum([len(bags[s][0]) for s in ids])]).astype(np.int64)
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    every = {"write_empty_chunks": True}
    lz4 = [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle", typesize=2), Crc32cCodec()]
    zstd = ZstdCodec(level=3, checksum=True)
    root.create_array(
        "features", data=feats, chunks=(inner, D), shards=(shard, D), compressors=lz4, config=every
    )
    root.create_array(
        "coords", data=coords, chunks=(inner, 2), shards=(shard, 2), compressors=zstd, config=every
    )
    root.create_array(
        "offsets", data=offsets, chunks=(len(offsets),), compressors=zstd, config=every
    )
    root.attrs["momkd"] = {
        "format": "momkd-cohort",
        "format_version": 1,
        "format_minor": 1,
        "complete": True,
        "feature_dim": D,
        "n_slides": len(ids),
        "n_patches": int(len(feats)),
        "slide_ids": ids,
    }
    return path


def test_reads_zarr_python_sharded_store_bit_exactly(tmp_path):
    bags = _bags()
    path = write_with_zarr_python(tmp_path / "s.zarr", bags)
    meta = json.loads((path / "features" / "zarr.json").read_text())
    assert meta["codecs"][0]["name"] == "sharding_indexed"
    assert len(list((path / "features" / "c").iterdir())) == -(-sum(SIZES) // 64)  # shard files
    store = CohortStore.open(path)
    assert store.chunk_rows == 16 and store.shard_rows == 64
    for sid, (f, c) in bags.items():
        got = store.read(sid)
        assert got.features.dtype == np.float32
        assert np.array_equal(got.features, f.astype(np.float32))
        assert np.array_equal(got.coords, c.astype(np.int64))
        half = store.read(sid, dtype="float16")
        assert np.array_equal(half.features.view(np.uint16), f.view(np.uint16))  # bit-exact
    # The loader (prefetch, read-ahead, subsampling) agrees with zarr-python's own reads.
    ref = zarr.open_group(str(path), mode="r")
    off = ref["offsets"][:]
    loader = BagLoader(store, shuffle=True, seed=4, max_patches=50, knn_k=None, num_threads=2)
    for bag in loader:
        i = store.index_of(bag.slide_id)
        full = ref["features"][off[i] : off[i + 1]]
        rows = store.core.read(i, 50, 4, 0)[1]  # coords of the picked rows
        assert bag.features.shape[0] == min(50, len(full))
        assert np.array_equal(bag.coords.numpy(), rows)
        direct = store.read(bag.slide_id, max_patches=50, seed=4, epoch=0)
        assert np.array_equal(bag.features.numpy(), direct.features)


def _shard_index(shard: Path, n_inner: int) -> np.ndarray:
    """``(offset, nbytes)`` of each inner chunk, parsed by hand from the end of a shard file
    (index at the end, little-endian uint64 pairs, then its 4-byte crc32c)."""
    raw = shard.read_bytes()
    return np.frombuffer(raw[-(16 * n_inner + 4) : -4], dtype="<u8").reshape(n_inner, 2)


def test_readahead_requests_exactly_the_inner_chunks_a_read_touches(tmp_path):
    path = write_with_zarr_python(tmp_path / "s.zarr", _bags())
    store = CohortStore.open(path)
    off = store.offsets
    for i in range(len(SIZES)):
        want = []
        for array in ("features", "coords"):
            for chunk in range(off[i] // 16, (off[i + 1] - 1) // 16 + 1):
                shard = path / array / "c" / str(chunk // 4) / "0"
                start, size = _shard_index(shard, 4)[chunk % 4]
                want.append((shard.resolve(), int(start), int(size)))
        got = [(Path(p).resolve(), o, n) for p, o, n in store.core.file_ranges(i)]
        assert got == want, store.slide_ids[i]
    assert store.core.file_ranges(len(SIZES)) == []


def test_momkd_writes_sharded_stores_zarr_python_reads(tmp_path):
    bags = _bags(1)
    path = tmp_path / "w.zarr"
    with StoreWriter(path, D, chunk_rows=16, shard_rows=64, commit_interval=0) as w:
        for sid, (f, c) in bags.items():
            w.append(sid, f, c)
    header = json.loads((path / "zarr.json").read_text())["attributes"]["momkd"]
    assert header["format_version"] == 1 and header["format_minor"] == 1
    ref = zarr.open_group(str(path), mode="r")
    assert ref["features"].shards == (64, D) and ref["features"].chunks == (16, D)
    assert ref["coords"].shards == (64, 2)
    off = ref["offsets"][:]
    store = CohortStore.open(path)
    for i, (sid, (f, c)) in enumerate(bags.items()):
        assert np.array_equal(ref["features"][off[i] : off[i + 1]], f)
        assert np.array_equal(ref["coords"][off[i] : off[i + 1]], c)
        assert np.array_equal(store.read(sid).features, f.astype(np.float32))


def test_sharded_write_resumes_after_interruption(tmp_path):
    bags = _bags(2)
    ids = list(bags)
    path = tmp_path / "r.zarr"
    w = StoreWriter(path, D, chunk_rows=16, shard_rows=64, commit_interval=0)
    for sid in ids[:5]:
        w.append(sid, *bags[sid])
    w.commit()
    del w  # interrupted: never closed
    w = StoreWriter.resume(path)
    assert w.shard_rows == 64
    for sid in ids[len(w) :]:
        w.append(sid, *bags[sid])
    w.close()
    store = CohortStore.open(path)
    assert store.slide_ids == ids
    for sid, (f, c) in bags.items():
        got = store.read(sid)
        assert np.array_equal(got.features, f.astype(np.float32))
        assert np.array_equal(got.coords, c.astype(np.int64))


def test_shard_rows_for_sizes():
    # 1536 float16 columns = 3 KiB per row: 64 MiB -> 21845 rows -> 43 chunks of 512 (22016 rows).
    assert shard_rows_for(64, 1536, 512) == 43 * 512
    assert shard_rows_for(0.001, 1536, 512) == 512  # at least one chunk
    with pytest.raises(DataError):
        shard_rows_for(0, 1536, 512)
    with pytest.raises(DataError, match="multiple of chunk_rows"):
        StoreWriter(Path("/nonexistent/x.zarr"), D, chunk_rows=16, shard_rows=40)


def _corrupt_index(path: Path) -> Path:
    shard = path / "features" / "c" / "1" / "0"
    data = bytearray(shard.read_bytes())
    data[-6] ^= 0xFF  # inside the index (at the end), before its crc32c
    shard.write_bytes(bytes(data))
    return shard


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_or_truncated_shard_index_is_one_clear_line(tmp_path, damage, capsys):
    path = write_with_zarr_python(tmp_path / "s.zarr", _bags())
    store = CohortStore.open(path)
    victim = store.slide_ids[3]  # rows 76..206 of shards 1..3
    if damage == "flip":
        _corrupt_index(path)
    else:
        shard = path / "features" / "c" / "1" / "0"
        shard.write_bytes(shard.read_bytes()[:-40])
    with pytest.raises(StoreError) as err:
        CohortStore.open(path).read(victim)
    msg = str(err.value)
    assert "\n" not in msg
    assert "features/c/1/0" in msg and victim in msg and "shard index" in msg
    # Slides of intact shards still read.
    assert CohortStore.open(path).read(store.slide_ids[0]).n_patches == SIZES[0]
    # `momkd info --check` reports it on its status line, with exit code 2.
    assert main(["info", str(path), "--check"]) == 2
    status = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("status")]
    assert len(status) == 1 and "INVALID" in status[0] and "shard index" in status[0]


def test_ingest_shard_mb_matches_unsharded(tmp_path):
    import h5py

    bags = _bags(3)
    src = tmp_path / "h5"
    src.mkdir()
    for sid, (f, c) in bags.items():
        with h5py.File(src / f"{sid}.h5", "w") as h:
            h["features"] = f.astype(np.float32)
            h["coords"] = c
    ingest(src, tmp_path / "plain.zarr", progress=False, chunk_rows=16)
    # D=12 float16 = 24 B/row; 0.003 MiB ~ 131 rows -> 8 chunks of 16 = 128 rows per shard.
    ingest(src, tmp_path / "sharded.zarr", progress=False, chunk_rows=16, shard_mb=0.003)
    a, b = CohortStore.open(tmp_path / "plain.zarr"), CohortStore.open(tmp_path / "sharded.zarr")
    assert a.shard_rows is None and b.shard_rows == 128
    assert a.slide_ids == b.slide_ids
    for sid in a.slide_ids:
        assert np.array_equal(a.read(sid).features, b.read(sid).features)
        assert np.array_equal(a.read(sid).coords, b.read(sid).coords)
    cli = ["ingest", str(src), str(tmp_path / "cli.zarr"), "-q", "--chunk-rows", "16"]
    assert main([*cli, "--shard-mb", "0.003"]) == 0
    assert CohortStore.open(tmp_path / "cli.zarr").shard_rows == b.shard_rows


def test_sharding_anywhere_else_is_refused(tmp_path):
    path = write_with_zarr_python(tmp_path / "s.zarr", _bags())
    meta_path = path / "features" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["codecs"][0]["configuration"]["codecs"].append({"name": "transpose"})
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="'features'.*transpose"):
        CohortStore.open(path)
