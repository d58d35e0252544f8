"""Cohort store: StoreWriter / CohortStore round trips against zarr-python, validation, resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import momkd.data.store_writer as writer_mod
import numpy as np
import pytest
import zarr
import zarr.storage._local as zarr_local
from momkd.data.store import CohortStore, read_header
from momkd.data.store_writer import StoreWriter, default_chunk_rows
from momkd.errors import DataError, SlideNotFoundError, StoreError
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

SIZES = [1, 150, 700, 1, 64, 33, 129]
D = 12


def make_bags(
    sizes: list[int], dim: int = D, seed: int = 0
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    bags = {}
    for i, p in enumerate(sizes):
        feats = rng.normal(size=(p, dim)).astype(np.float32) * 3
        coords = rng.integers(0, 100_000, size=(p, 2)).astype(np.int64)
        bags[f"TCGA-{i:02d}-slide"] = (feats, coords)
    return bags


def write_store(path: Path, bags, **kw) -> Path:
    dim = next(iter(bags.values()))[0].shape[1]
    with StoreWriter(path, dim, **kw) as w:
        for sid, (f, c) in bags.items():
            w.append(sid, f, c)
    return path


def write_with_zarr_python(path: Path, bags, dtype: str = "float16", chunk: int = 512) -> None:
    """The FORMAT.md example, followed literally (only the dtype and chunk rows vary)."""
    ids = list(bags)
    feats = np.concatenate([bags[s][0] for s in ids]).astype(dtype)
    coords = np.concatenate([bags[s][1] for s in ids]).astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum([len(bags[s][0]) for s in ids])]).astype(np.int64)

    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    zstd = ZstdCodec(level=3, checksum=True)
    lz4 = [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle", typesize=2), Crc32cCodec()]
    every = {"write_empty_chunks": True}
    root.create_array(
        "features", data=feats, chunks=(chunk, feats.shape[1]), compressors=lz4, config=every
    )
    root.create_array("coords", data=coords, chunks=(chunk, 2), compressors=zstd, config=every)
    root.create_array(
        "offsets", data=offsets, chunks=(len(offsets),), compressors=zstd, config=every
    )
    root.attrs["momkd"] = {
        "format": "momkd-cohort",
        "format_version": 1,
        "complete": True,
        "feature_dim": int(feats.shape[1]),
        "n_slides": len(ids),
        "n_patches": len(feats),
        "slide_ids": ids,
    }


def chunk_files(path: Path, array: str) -> list[Path]:
    return sorted(p for p in (path / array / "c").rglob("*") if p.is_file())


# ------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("chunk_rows", [64, 100, 512])
def test_writer_then_zarr_python_reads_identical(tmp_path, dtype, chunk_rows):
    bags = make_bags(SIZES)
    attrs = {
        "encoder": "uni_v2",
        "magnification": 20,
        "patch_size": 256,
        "provenance": {"x": [1, 2]},
    }
    path = write_store(tmp_path / "c.zarr", bags, dtype=dtype, chunk_rows=chunk_rows, attrs=attrs)

    root = zarr.open_group(str(path), mode="r")
    header = root.attrs["momkd"]
    ids = list(bags)
    assert header["slide_ids"] == ids
    assert header["complete"] is True
    assert header["format"] == "momkd-cohort" and header["format_version"] == 1
    assert header["n_slides"] == len(ids) and header["n_patches"] == sum(SIZES)
    assert header["feature_dim"] == D
    for k, v in attrs.items():
        assert header[k] == v
    assert "ingest" not in header

    feats, coords, off = root["features"], root["coords"], root["offsets"]
    assert feats.dtype == np.dtype(dtype) and coords.dtype == np.int32 and off.dtype == np.int64
    assert feats.chunks == (chunk_rows, D) and coords.chunks == (chunk_rows, 2)
    np.testing.assert_array_equal(off[:], np.concatenate([[0], np.cumsum(SIZES)]))
    blosc, crc = feats.compressors
    assert isinstance(blosc, BloscCodec) and blosc.cname.value == "lz4"
    assert blosc.shuffle.value == "shuffle" and blosc.typesize == np.dtype(dtype).itemsize
    assert isinstance(crc, Crc32cCodec)
    for codec in (coords.compressors[0], off.compressors[0]):
        assert isinstance(codec, ZstdCodec) and codec.level == 3 and codec.checksum is True
    o = off[:]
    for i, sid in enumerate(ids):
        np.testing.assert_array_equal(feats[o[i] : o[i + 1]], bags[sid][0].astype(dtype))
        np.testing.assert_array_equal(coords[o[i] : o[i + 1]], bags[sid][1])

    # and momkd's own reader agrees with zarr-python
    cs = CohortStore.open(path)
    assert cs.slide_ids == ids and len(cs) == len(ids) and cs.feature_dim == D and cs.dtype == dtype
    np.testing.assert_array_equal(cs.bag_sizes, SIZES)
    for sid in ids:
        bag = cs.read(sid)
        assert bag.features.dtype == np.float32 and bag.coords.dtype == np.int64
        np.testing.assert_array_equal(bag.features, bags[sid][0].astype(dtype).astype(np.float32))
        np.testing.assert_array_equal(bag.coords, bags[sid][1])


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("chunk", [64, 100, 512])
def test_zarr_python_written_store_reads_in_momkd(tmp_path, dtype, chunk):
    bags = make_bags(SIZES, seed=1)
    path = tmp_path / "ext.zarr"
    write_with_zarr_python(path, bags, dtype=dtype, chunk=chunk)
    cs = CohortStore.open(path)
    assert cs.slide_ids == list(bags)
    assert cs.feature_dim == D and cs.dtype == dtype
    assert cs.header["n_patches"] == sum(SIZES)
    for sid, (f, c) in bags.items():
        assert sid in cs
        bag = cs.read(sid)
        assert bag.slide_id == sid
        np.testing.assert_array_equal(bag.features, f.astype(dtype).astype(np.float32))
        np.testing.assert_array_equal(bag.coords, c)


def test_default_chunk_rows():
    assert default_chunk_rows(1536, "float16") == 512
    assert default_chunk_rows(1536, "float32") == 256
    assert default_chunk_rows(1024, "float16") in (512, 1024)
    assert default_chunk_rows(100_000, "float32") == 64
    for dim in (3, 17, 384, 768, 1280, 2560):
        r = default_chunk_rows(dim)
        assert r >= 64 and r & (r - 1) == 0
        assert 0.5 * 2**20 <= r * dim * 2 <= 3 * 2**20 or r in (64, 1024)
        assert r <= 1024


def test_every_chunk_written_once(tmp_path, monkeypatch):
    writes: list[str] = []
    real_put = zarr_local._put

    def counting_put(path, value, exclusive=False):
        writes.append(str(path))
        return real_put(path, value, exclusive=exclusive)

    monkeypatch.setattr(zarr_local, "_put", counting_put)
    bags = make_bags(SIZES)
    path = write_store(tmp_path / "c.zarr", bags, chunk_rows=64, commit_interval=0)
    feature_chunks = [w for w in writes if "/features/c/" in w]
    coord_chunks = [w for w in writes if "/coords/c/" in w]
    n_chunks = -(-sum(SIZES) // 64)
    assert len(feature_chunks) == len(set(feature_chunks)) == n_chunks
    assert len(coord_chunks) == len(set(coord_chunks)) == n_chunks
    assert len(chunk_files(path, "features")) == n_chunks


def test_store_is_incomplete_while_writing(tmp_path):
    bags = make_bags(SIZES)
    path = tmp_path / "c.zarr"
    w = StoreWriter(path, D, chunk_rows=64, commit_interval=0)
    for sid, (f, c) in list(bags.items())[:4]:
        w.append(sid, f, c)
    header = read_header(path)
    assert header["complete"] is False
    assert header["ingest"]["slides_done"] == w.committed_slides >= 1
    with pytest.raises(StoreError, match="complete"):
        CohortStore.open(path)
    for sid, (f, c) in list(bags.items())[4:]:
        w.append(sid, f, c)
    w.close()
    assert read_header(path)["complete"] is True
    assert len(CohortStore.open(path)) == len(bags)


# ------------------------------------------------------------------------------- append validation


def _expect_rejected(w: StoreWriter, sid, feats, coords, exc=DataError, match=None):
    before = (w.slide_ids, w.n_patches)
    with pytest.raises(exc, match=match) as info:
        w.append(sid, feats, coords)
    assert (w.slide_ids, w.n_patches) == before
    return str(info.value)


def test_append_rejects_bad_slides_and_names_them(tmp_path):
    path = tmp_path / "c.zarr"
    w = StoreWriter(path, 4, chunk_rows=64)
    good_f = np.ones((5, 4), np.float32)
    good_c = np.zeros((5, 2), np.int64)
    nan = good_f.copy()
    nan[3, 1] = np.nan
    msg = _expect_rejected(w, "s_nan", nan, good_c)
    assert "s_nan" in msg and "3" in msg
    inf = good_f.copy()
    inf[2, 0] = -np.inf
    assert "s_inf" in _expect_rejected(w, "s_inf", inf, good_c)
    big = good_f.copy()
    big[4, 2] = 1e6  # overflows float16
    assert "s_big" in _expect_rejected(w, "s_big", big, good_c)
    assert "s_empty" in _expect_rejected(
        w, "s_empty", np.zeros((0, 4), np.float32), np.zeros((0, 2))
    )
    assert "s_dim" in _expect_rejected(w, "s_dim", np.ones((5, 3), np.float32), good_c)
    assert "s_1d" in _expect_rejected(w, "s_1d", np.ones(5, np.float32), good_c)
    assert "s_cshape" in _expect_rejected(w, "s_cshape", good_f, np.zeros((5, 3)))
    assert "s_crows" in _expect_rejected(w, "s_crows", good_f, np.zeros((4, 2)))
    assert "s_cfrac" in _expect_rejected(w, "s_cfrac", good_f, good_c + 0.5)
    for bad_id in ["", "../escape", "a/b", "a\\b", ".hidden", "x\x00y", 7]:
        _expect_rejected(w, bad_id, good_f, good_c)
    w.append("ok", good_f, good_c.astype(np.float64))  # integer-valued float coords are accepted
    assert "ok" in _expect_rejected(w, "ok", good_f, good_c, match="duplicate")
    w.close()
    cs = CohortStore.open(path)
    assert cs.slide_ids == ["ok"]
    np.testing.assert_array_equal(cs.read("ok").features, good_f)


def test_float32_store_keeps_values_beyond_float16(tmp_path):
    path = tmp_path / "c.zarr"
    f = np.array([[1e6, -3.25e-9], [7.0, 1e30]], np.float32)
    with StoreWriter(path, 2, dtype="float32") as w:
        w.append("s", f, np.array([[0, 0], [256, 0]]))
    np.testing.assert_array_equal(CohortStore.open(path).read("s").features, f)


def test_close_without_slides_and_closed_writer(tmp_path):
    w = StoreWriter(tmp_path / "c.zarr", 4)
    with pytest.raises(DataError, match="no slides"):
        w.close()
    w.append("a", np.ones((2, 4)), np.zeros((2, 2), int))
    w.close()
    w.close()  # idempotent
    with pytest.raises(StoreError, match="closed"):
        w.append("b", np.ones((2, 4)), np.zeros((2, 2), int))


def test_existing_path_and_overwrite(tmp_path):
    bags = make_bags([3, 4])
    path = write_store(tmp_path / "c.zarr", bags)
    with pytest.raises(StoreError, match="already exists"):
        StoreWriter(path, D)
    write_store(path, make_bags([5], seed=3), overwrite=True)
    assert CohortStore.open(path).slide_ids == ["TCGA-00-slide"]
    other = tmp_path / "notastore"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    with pytest.raises(StoreError, match="refusing"):
        StoreWriter(other, D, overwrite=True)
    assert (other / "precious.txt").exists()


# ----------------------------------------------------------------------------------------- resume


def _arrays(path: Path):
    root = zarr.open_group(str(path), mode="r")
    return (
        root.attrs["momkd"]["slide_ids"],
        root["features"][:],
        root["coords"][:],
        root["offsets"][:],
    )


def _assert_same_store(a: Path, b: Path) -> None:
    ids_a, fa, ca, oa = _arrays(a)
    ids_b, fb, cb, ob = _arrays(b)
    assert ids_a == ids_b
    np.testing.assert_array_equal(fa, fb)
    np.testing.assert_array_equal(ca, cb)
    np.testing.assert_array_equal(oa, ob)
    cs = CohortStore.open(b)
    assert cs.slide_ids == ids_a


@pytest.mark.parametrize("stop_after", range(1, len(SIZES)))
def test_resume_after_abandoned_writer(tmp_path, stop_after):
    bags = make_bags(SIZES)
    ref = write_store(tmp_path / "ref.zarr", bags, chunk_rows=64)
    path = tmp_path / "c.zarr"
    w = StoreWriter(path, D, chunk_rows=64, commit_interval=0)
    items = list(bags.items())
    for sid, (f, c) in items[:stop_after]:
        w.append(sid, f, c)
    del w  # the process "dies" here: nothing more is written
    w2 = StoreWriter.resume(path)
    done = w2.slide_ids
    assert done == [s for s, _ in items[: len(done)]]
    assert w2.resumed_slides == len(done) <= stop_after
    for sid, (f, c) in items[len(done) :]:
        w2.append(sid, f, c)
    w2.close()
    _assert_same_store(ref, path)


class _Killed(Exception):
    pass


class _Killer:
    """Counts the writer's file writes (zarr chunks/metadata and the header) and can fail all writes
    from the n-th on, like a process killed at that instant (each write is atomic)."""

    def __init__(self, monkeypatch) -> None:
        self.n = 0
        self.kill_at = -1
        real_put, real_json = zarr_local._put, writer_mod._write_json_atomic

        def put(path, value, exclusive=False):
            self._gate()
            return real_put(path, value, exclusive=exclusive)

        def write_json(target, obj):
            self._gate()
            return real_json(target, obj)

        monkeypatch.setattr(zarr_local, "_put", put)
        monkeypatch.setattr(writer_mod, "_write_json_atomic", write_json)

    def _gate(self) -> None:
        if 0 <= self.kill_at <= self.n:
            raise _Killed
        self.n += 1

    def run(self, kill_at: int, fn) -> bool:
        """Run ``fn`` with writes failing from ``kill_at`` on; True if it was killed."""
        self.n, self.kill_at = 0, kill_at
        try:
            fn()
            return False
        except (_Killed, StoreError):
            return True
        finally:
            self.kill_at = -1


KILL_BAGS = make_bags([40, 1, 90, 3, 64, 20], dim=5, seed=7)
KILL_ITEMS = list(KILL_BAGS.items())


def _write_all(path: Path) -> None:
    w = StoreWriter(path, 5, chunk_rows=32, commit_interval=0)
    for sid, (f, c) in KILL_ITEMS:
        w.append(sid, f, c)
    w.close()


def _resume_all(path: Path) -> None:
    w = StoreWriter.resume(path, commit_interval=0)
    for sid, (f, c) in KILL_ITEMS[len(w.slide_ids) :]:
        w.append(sid, f, c)
    w.close()


def _finish(path: Path) -> str:
    """Bring an interrupted store to completion the way a user would; returns what was needed."""
    if not (path / "zarr.json").exists():
        with pytest.raises(StoreError):
            CohortStore.open(path)
        _write_all_overwrite(path)
        return "restarted"
    if read_header(path)["complete"]:
        return "complete"
    with pytest.raises(StoreError, match="complete"):
        CohortStore.open(path)
    _resume_all(path)
    return "resumed"


def _write_all_overwrite(path: Path) -> None:
    w = StoreWriter(path, 5, chunk_rows=32, commit_interval=0, overwrite=True)
    for sid, (f, c) in KILL_ITEMS:
        w.append(sid, f, c)
    w.close()


def test_interruption_at_any_write_resumes_or_is_refused(tmp_path, monkeypatch):
    """Kill the writer before each of its file writes in turn; every outcome must be refused by
    readers until it is resumed, and the resumed store must equal an uninterrupted one."""
    ref = tmp_path / "ref.zarr"
    _write_all(ref)
    killer = _Killer(monkeypatch)
    assert not killer.run(-1, lambda: _write_all(tmp_path / "count.zarr"))
    total = killer.n
    assert total > 10
    outcomes = set()
    for k in range(total + 1):
        path = tmp_path / f"k{k}.zarr"
        assert killer.run(k, lambda p=path: _write_all(p)) == (k < total)
        outcomes.add(_finish(path))
        _assert_same_store(ref, path)
    assert outcomes == {"restarted", "resumed", "complete"}


def test_interruption_during_resume_is_resumable(tmp_path, monkeypatch):
    """Kill a writer mid-way, then kill its resumption before each of its writes in turn."""
    ref = tmp_path / "ref.zarr"
    _write_all(ref)
    killer = _Killer(monkeypatch)
    killer.run(-1, lambda: _write_all(tmp_path / "count.zarr"))
    total = killer.n
    # a first kill point whose committed rows end inside a chunk, so resuming reads rows back
    for k0 in range(total // 3, total):
        probe = tmp_path / f"probe{k0}.zarr"
        killer.run(k0, lambda p=probe: _write_all(p))
        header = read_header(probe)
        if header["ingest"]["rows_done"] % 32 and header["ingest"]["slides_done"] >= 2:
            break
    else:
        pytest.fail("no kill point leaves a partial chunk")
    shutil.copytree(probe, tmp_path / "count2.zarr")
    killer.run(-1, lambda: _resume_all(tmp_path / "count2.zarr"))
    total2 = killer.n
    assert total2 > 3
    for j in range(total2):
        path = tmp_path / f"j{j}.zarr"
        shutil.copytree(probe, path)
        assert killer.run(j, lambda p=path: _resume_all(p))
        assert _finish(path) in ("resumed", "complete")
        _assert_same_store(ref, path)


def test_resume_refuses_complete_or_foreign_store(tmp_path):
    path = write_store(tmp_path / "c.zarr", make_bags([3]))
    with pytest.raises(StoreError, match="already complete"):
        StoreWriter.resume(path)
    with pytest.raises(StoreError, match="complete"):
        StoreWriter.open_or_resume(path, D)
    w = StoreWriter.open_or_resume(path, D, overwrite=True)
    w.append("x", np.ones((2, D)), np.zeros((2, 2), int))
    w.close()
    assert CohortStore.open(path).slide_ids == ["x"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="zarr.json"):
        StoreWriter.resume(tmp_path / "empty")


def test_open_or_resume_checks_settings(tmp_path):
    path = tmp_path / "c.zarr"
    w = StoreWriter(path, D, chunk_rows=64, commit_interval=0)
    for sid, (f, c) in make_bags([100, 100]).items():
        w.append(sid, f, c)
    del w
    with pytest.raises(StoreError, match="dtype"):
        StoreWriter.open_or_resume(path, D, dtype="float32", chunk_rows=64)
    w = StoreWriter.open_or_resume(path, D)
    assert w.chunk_rows == 64 and w.resumed_slides >= 1


# --------------------------------------------------------------------------------- reader errors


@pytest.fixture()
def small_store(tmp_path) -> tuple[Path, dict]:
    bags = make_bags([70, 10, 130], seed=5)
    return write_store(tmp_path / "s.zarr", bags, chunk_rows=64), bags


def test_unknown_slide_id(small_store):
    path, _ = small_store
    cs = CohortStore.open(path)
    with pytest.raises(SlideNotFoundError, match="nope") as info:
        cs.read("nope")
    assert str(path) in str(info.value)
    assert isinstance(info.value, KeyError)
    with pytest.raises(SlideNotFoundError):
        cs.read("../TCGA-00-slide")
    assert "nope" not in cs


def _first_feature_chunk(path: Path) -> Path:
    return path / "features" / "c" / "0" / "0"


def test_truncated_chunk(small_store):
    path, _ = small_store
    chunk = _first_feature_chunk(path)
    chunk.write_bytes(chunk.read_bytes()[:-7])
    cs = CohortStore.open(path)
    with pytest.raises(StoreError) as info:
        cs.read("TCGA-00-slide")
    msg = str(info.value)
    assert "TCGA-00-slide" in msg and "chunk" in msg.lower()
    cs.read("TCGA-02-slide")  # rows 80..210 live in chunks 1..3, untouched


def test_corrupted_chunk_bytes_flipped(small_store):
    path, _ = small_store
    chunk = path / "features" / "c" / "1" / "0"
    raw = bytearray(chunk.read_bytes())
    mid = len(raw) // 2
    raw[mid : mid + 4] = bytes(b ^ 0xFF for b in raw[mid : mid + 4])
    chunk.write_bytes(bytes(raw))
    cs = CohortStore.open(path)
    # chunk 1 holds rows 64..127: the end of slide 0, all of slide 1, the start of slide 2
    for sid in ("TCGA-00-slide", "TCGA-01-slide", "TCGA-02-slide"):
        with pytest.raises(StoreError) as info:
            cs.read(sid)
        assert sid in str(info.value) and "chunk" in str(info.value).lower()


def test_deleted_chunk(small_store):
    path, _ = small_store
    (path / "coords" / "c" / "2" / "0").unlink()
    cs = CohortStore.open(path)
    cs.read("TCGA-00-slide")
    with pytest.raises(StoreError) as info:
        cs.read("TCGA-02-slide")
    assert "TCGA-02-slide" in str(info.value) and "chunk" in str(info.value).lower()


def test_missing_array(small_store):
    path, _ = small_store
    shutil.rmtree(path / "coords")
    with pytest.raises(StoreError, match="coords"):
        CohortStore.open(path)


def test_wrong_dtype(tmp_path):
    bags = make_bags([5, 6])
    path = tmp_path / "w.zarr"
    write_with_zarr_python(path, bags, dtype="float64")
    with pytest.raises(StoreError, match="features"):
        CohortStore.open(path)


def test_incomplete_header_refused(small_store):
    path, _ = small_store
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["momkd"]["complete"] = False
    (path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="complete"):
        CohortStore.open(path)


def test_duplicate_ids_in_header_refused(tmp_path):
    bags = make_bags([2, 3])
    path = tmp_path / "d.zarr"
    write_with_zarr_python(path, bags)
    root = zarr.open_group(str(path), mode="r+")
    header = dict(root.attrs["momkd"])
    header["slide_ids"] = [header["slide_ids"][0]] * 2
    root.attrs["momkd"] = header
    with pytest.raises(StoreError, match="duplicate|unique"):
        CohortStore.open(path)


def test_not_a_store(tmp_path):
    with pytest.raises(StoreError):
        CohortStore.open(tmp_path / "missing.zarr")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError):
        CohortStore.open(tmp_path / "empty")


@pytest.mark.parametrize("codec", ["lz4", "zstd"])
def test_both_feature_codecs_round_trip(tmp_path, codec):
    rng = np.random.default_rng(3)
    bags = {
        f"s{i}": (rng.normal(size=(n, 24)).astype(np.float32), rng.integers(0, 9999, (n, 2)))
        for i, n in enumerate([70, 1, 200])
    }
    path = write_store(tmp_path / "c.zarr", bags, chunk_rows=64, codec=codec)
    names = [c["name"] for c in json.loads((path / "features" / "zarr.json").read_text())["codecs"]]
    assert names == (["bytes", "blosc", "crc32c"] if codec == "lz4" else ["bytes", "zstd"])
    store = CohortStore.open(path)
    root = zarr.open_group(str(path), mode="r")
    off = root["offsets"][:]
    for i, (sid, (f, c)) in enumerate(bags.items()):
        got = store.read(sid)
        np.testing.assert_array_equal(got.features, f.astype(np.float16).astype(np.float32))
        np.testing.assert_array_equal(got.coords, c)
        np.testing.assert_array_equal(root["features"][off[i] : off[i + 1]], f.astype(np.float16))


def test_unknown_codec_is_refused(tmp_path):
    with pytest.raises(DataError, match="codec"):
        StoreWriter(tmp_path / "c.zarr", 8, codec="brotli")
