"""Fault injection: damaged chunk and shard files give a clear momkd error or the original data.

docs/FORMAT.md promises that a store whose codec chains carry a checksum never hands back silently
different data: a flipped byte or a truncated file anywhere in a chunk or shard file (an inner
chunk, the shard index, either checksum) is a ``StoreError`` (or ``DataError``) naming the store and
the damaged file, or, where the damaged bytes do not carry data (a gzip header's time stamp), a read
bit-identical to the original. Stores without a checksum cannot promise that (FORMAT.md, "What a
checksum cannot catch"); for them the tests only require a momkd error or data, never a panic.

The stores are written by momkd (``StoreWriter``, each ``codec``) and by zarr-python alone, sharded
and unsharded; every one is tiny (89 rows of 8 float16 features), so the seeded fuzz test's 1,200
damaged stores take seconds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import zarr
from momkd.cli import main
from momkd.data import BagLoader, CohortStore, StoreWriter
from momkd.data.cache import BagCache
from momkd.data.info import describe
from momkd.errors import DataError, StoreError
from zarr.codecs import (
    BloscCodec,
    BytesCodec,
    Crc32cCodec,
    GzipCodec,
    ShardingCodec,
    ZstdCodec,
)

D = 8
INNER, SHARD = 8, 32  # rows per (inner) chunk and per shard: 12 inner chunks, 3 shards
SIZES = [5, 21, 1, 40, 13, 9]  # slides start and end inside chunks and shards
N = sum(SIZES)


def _bags() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(16)
    return {
        f"slide_{i}": (
            rng.normal(scale=3.0, size=(p, D)).astype(np.float16),
            rng.integers(1, 10**6, size=(p, 2)).astype(np.int32),
        )
        for i, p in enumerate(SIZES)
    }


BAGS = _bags()


# ------------------------------------------------------------------------------------ the stores


def _lz4() -> list:
    return [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle", typesize=2), Crc32cCodec()]


def _zstd(checksum: bool = True) -> list:
    return [ZstdCodec(level=3, checksum=checksum)]


def write_zarr_python(
    path: Path,
    compressors: list,
    *,
    sharded: bool,
    index_crc: bool = True,
    coord_compressors: list | None = None,
    empty_chunks: bool = True,
    bags: dict | None = None,
) -> Path:
    """A store written with zarr-python alone, as docs/FORMAT.md describes."""
    bags = BAGS if bags is None else bags
    ids = list(bags)
    feats = np.concatenate([bags[s][0] for s in ids])
    coords = np.concatenate([bags[s][1] for s in ids])
    offsets = np.concatenate([[0], np.cumsum([len(bags[s][0]) for s in ids])]).astype(np.int64)
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    config = {"write_empty_chunks": empty_chunks}
    coord_compressors = _zstd() if coord_compressors is None else coord_compressors

    def array(name: str, data: np.ndarray, codecs: list) -> None:
        cols = data.shape[1]
        if not sharded:
            root.create_array(
                name, data=data, chunks=(INNER, cols), compressors=codecs, config=config
            )
        elif index_crc:
            root.create_array(
                name,
                data=data,
                chunks=(INNER, cols),
                shards=(SHARD, cols),
                compressors=codecs,
                config=config,
            )
        else:
            sharding = ShardingCodec(
                chunk_shape=(INNER, cols),
                codecs=[BytesCodec(), *codecs],
                index_codecs=[BytesCodec()],
            )
            arr = root.create_array(
                name,
                shape=data.shape,
                dtype=data.dtype,
                chunks=(SHARD, cols),
                serializer=sharding,
                compressors=None,
                config=config,
            )
            arr[:] = data

    array("features", feats, compressors)
    array("coords", coords, coord_compressors)
    root.create_array("offsets", data=offsets, chunks=(len(offsets),), compressors=_zstd())
    root.attrs["momkd"] = {
        "format": "momkd-cohort",
        "format_version": 1,
        "complete": True,
        "feature_dim": D,
        "n_slides": len(ids),
        "n_patches": int(len(feats)),
        "slide_ids": ids,
    }
    return path


def write_momkd(path: Path, codec: str, *, sharded: bool) -> Path:
    with StoreWriter(
        path,
        D,
        chunk_rows=INNER,
        codec=codec,
        shard_rows=SHARD if sharded else None,
        commit_interval=0,
    ) as w:
        for sid, (f, c) in BAGS.items():
            w.append(sid, f, c)
    return path


@dataclass(frozen=True)
class Kind:
    """One way of writing a store; ``checksummed``: every data byte is under a checksum."""

    name: str
    write: Callable[[Path], Path]
    sharded: bool
    checksummed: bool


def _kinds() -> list[Kind]:
    kinds = []
    for sharded in (False, True):
        tag = "sharded" if sharded else "plain"
        for codec in ("lz4", "zstd", "none"):
            kinds.append(
                Kind(
                    f"momkd-{codec}-{tag}",
                    lambda p, c=codec, s=sharded: write_momkd(p, c, sharded=s),
                    sharded,
                    True,
                )
            )
        for cname, codecs in (
            ("lz4", _lz4),
            ("zstd", _zstd),
            ("crc32c", lambda: [Crc32cCodec()]),
            ("gzip", lambda: [GzipCodec(level=5)]),  # gzip carries a CRC-32 of the data
        ):
            kinds.append(
                Kind(
                    f"zarr-{cname}-{tag}",
                    lambda p, c=codecs, s=sharded: write_zarr_python(p, c(), sharded=s),
                    sharded,
                    True,
                )
            )
        # Without any checksum (FORMAT.md: not detectable by design).
        for cname, codecs in (("raw", list), ("zstd-nocheck", lambda: _zstd(False))):
            kinds.append(
                Kind(
                    f"zarr-{cname}-{tag}",
                    lambda p, c=codecs, s=sharded: write_zarr_python(
                        p, c(), sharded=s, coord_compressors=c()
                    ),
                    sharded,
                    False,
                )
            )
    # Checksummed inner chunks, but an index without a checksum: an entry damaged so that it
    # points at another whole inner chunk of the same size reads that chunk (FORMAT.md).
    kinds.append(
        Kind(
            "zarr-crc32c-index-unchecked",
            lambda p: write_zarr_python(p, [Crc32cCodec()], sharded=True, index_crc=False),
            True,
            False,
        )
    )
    return kinds


KINDS = _kinds()
CHECKED = [k for k in KINDS if k.checksummed]


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("faults")
    return {k.name: k.write(root / f"{k.name}.zarr") for k in KINDS}


def data_files(path: Path) -> list[Path]:
    """Every chunk and shard file of a store (the metadata documents are not data)."""
    return sorted(
        p
        for a in ("features", "coords", "offsets")
        for p in (path / a / "c").rglob("*")
        if p.is_file()
    )


def file_key(store: Path, file: Path) -> str:
    return file.relative_to(store).as_posix()


def shard_regions(shard: Path, n_inner: int) -> list[tuple[int, int]]:
    """Byte ranges of a shard file (index at the end, with its crc32c): each stored inner chunk,
    the index entries and the index checksum, parsed by hand from the Zarr v3 sharding layout."""
    raw = shard.read_bytes()
    start = len(raw) - (16 * n_inner + 4)
    entries = np.frombuffer(raw[start:-4], dtype="<u8").reshape(n_inner, 2)
    regions = [(int(o), int(o + n)) for o, n in entries if o != 2**64 - 1]
    return [*regions, (start, len(raw) - 4), (len(raw) - 4, len(raw))]


# ------------------------------------------------------------------------------------- outcomes


def read_everything(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    store = CohortStore.open(path)
    out = {}
    for sid in store.slide_ids:
        got = store.read(sid, dtype="float16")
        out[sid] = (got.features, got.coords)
    return out


def outcome(path: Path, key: str) -> str:
    """``"error"`` (a one-line momkd error naming the store and the file ``key``), ``"same"``
    (every slide bit-identical to the original) or ``"different"``."""
    try:
        got = read_everything(path)
    except (StoreError, DataError) as exc:
        msg = str(exc)
        assert "\n" not in msg, msg
        assert "internal error" not in msg and "panic" not in msg, msg
        assert f"store {path}" in msg, msg
        assert key in msg, f"{key}: {msg}"
        return "error"
    if list(got) != list(BAGS):
        return "different"
    for sid, (f, c) in BAGS.items():
        gf, gc = got[sid]
        if not (np.array_equal(gf.view(np.uint16), f.view(np.uint16)) and np.array_equal(gc, c)):
            return "different"
    return "same"


class Damage:
    """Change one file of a store and put it back afterwards."""

    def __init__(self, file: Path) -> None:
        self.file = file
        self.original = file.read_bytes()

    def flip(self, pos: int, mask: int = 0x01) -> Damage:
        data = bytearray(self.original)
        data[pos] ^= mask
        self.file.write_bytes(bytes(data))
        return self

    def truncate(self, length: int) -> Damage:
        self.file.write_bytes(self.original[:length])
        return self

    def __enter__(self) -> Damage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.write_bytes(self.original)


# ------------------------------------------------------------------------ every region, each kind


def test_every_store_reads_back_exactly(stores):
    ref = zarr.open_group(str(stores["zarr-lz4-sharded"]), mode="r")
    assert ref["features"].shards == (SHARD, D)
    for kind in KINDS:
        assert outcome(stores[kind.name], "") == "same", kind.name
        assert CohortStore.open(stores[kind.name]).shard_rows == (SHARD if kind.sharded else None)


@pytest.mark.parametrize("kind", CHECKED, ids=lambda k: k.name)
def test_a_flip_in_every_region_is_detected(stores, kind):
    """First, middle and last byte of every inner chunk, index and checksum of every shard file
    (every chunk file of an unsharded store), then truncations of each file."""
    path = stores[kind.name]
    momkd_crc = kind.name.startswith("momkd-") and not kind.name.startswith("momkd-zstd")
    tried = 0
    for file in data_files(path):
        key = file_key(path, file)
        size = file.stat().st_size
        if kind.sharded and not key.startswith("offsets"):
            regions = shard_regions(file, SHARD // INNER)
            assert len(regions) >= 3
        else:
            regions = [(0, size)]
        for lo, hi in regions:
            for pos in sorted({lo, (lo + hi) // 2, hi - 1}):
                with Damage(file).flip(pos, 0x40):
                    got = outcome(path, key)
                tried += 1
                assert got in ("error", "same"), (kind.name, key, pos, got)
                if momkd_crc and key.startswith("features"):
                    # crc32c covers every byte of these files: nothing goes unnoticed.
                    assert got == "error", (kind.name, key, pos)
        for length in sorted({0, 1, size // 2, size - 1}):
            with Damage(file).truncate(length):
                got = outcome(path, key)
            tried += 1
            assert got == "error", (kind.name, key, length, got)
    assert tried > 20


def test_seeded_fuzz_of_flips_and_truncations(stores, capfd):
    """1,200 random byte flips (any bit pattern) and truncations of random chunk and shard files of
    every checksummed kind: each is a momkd error naming the store and the file, or the original
    data; and 300 more over the stores without a checksum, which may read different data but never
    panic."""
    rng = np.random.default_rng(20261201)
    counts = {"error": 0, "same": 0, "different": 0}
    files = {k.name: data_files(stores[k.name]) for k in KINDS}

    def trial(kind: Kind) -> str:
        path = stores[kind.name]
        file = files[kind.name][rng.integers(len(files[kind.name]))]
        size = file.stat().st_size
        damage = Damage(file)
        if rng.random() < 0.8:
            damage.flip(int(rng.integers(size)), int(rng.integers(1, 256)))
        else:
            damage.truncate(int(rng.integers(size)))
        with damage:
            return outcome(path, file_key(path, file))

    for i in range(1200):
        kind = CHECKED[i % len(CHECKED)]
        got = trial(kind)
        assert got != "different", kind.name
        counts[got] += 1
    assert counts["error"] > 1000, counts
    unchecked = [k for k in KINDS if not k.checksummed]
    for i in range(300):
        trial(unchecked[i % len(unchecked)])
    err = capfd.readouterr().err
    assert "panicked" not in err and "internal error" not in err, err[-2000:]


# ----------------------------------------------------------------------- every read path, sharded


def _flip_crc_of_inner_chunk(path: Path, shard: int, inner: int) -> Path:
    """Flip one bit of the crc32c trailer of one inner chunk of ``features``: the data bytes stay
    intact, so only a reader that checks the checksum notices."""
    file = path / "features" / "c" / str(shard) / "0"
    raw = bytearray(file.read_bytes())
    start = len(raw) - (16 * (SHARD // INNER) + 4)
    offset, nbytes = np.frombuffer(bytes(raw[start:-4]), dtype="<u8").reshape(-1, 2)[inner]
    raw[int(offset + nbytes) - 2] ^= 0x08
    file.write_bytes(bytes(raw))
    return file


@pytest.mark.parametrize("codec", ["lz4", "none"])
def test_inner_chunk_checksums_are_checked_on_every_read_path(tmp_path, codec, capsys):
    path = write_momkd(tmp_path / "s.zarr", codec, sharded=True)
    _flip_crc_of_inner_chunk(path, shard=1, inner=1)  # rows 40..48: slide_3 (rows 27..67)
    want = ("features/c/1/0 (inner chunk 1)", "slide_3", f"store {path}")

    def check(exc: BaseException) -> None:
        assert isinstance(exc, StoreError), repr(exc)
        assert all(w in str(exc) for w in want), str(exc)

    store = CohortStore.open(path)
    assert store.read("slide_2").n_patches == 1  # intact chunks still read
    with pytest.raises(StoreError) as api:
        store.read("slide_3")
    check(api.value)
    for kwargs in ({"readahead": 0}, {"readahead": 3, "io_threads": 2}):
        loader = BagLoader(store, knn_k=None, num_threads=2, **kwargs)
        with pytest.raises(StoreError) as got:
            list(loader)
        check(got.value)
    cache = BagCache(store, "host", budget_bytes=10**9)
    loader = BagLoader(store, knn_k=None, num_threads=1, cache=cache)
    with pytest.raises(StoreError) as got:
        list(loader)
    check(got.value)
    assert cache.get(store.index_of("slide_2")) is not None
    assert cache.get(store.index_of("slide_3")) is None
    info = describe(path, check=True, progress=False)
    assert info["valid"] is False and all(w in info["error"] for w in want)
    assert main(["info", str(path), "--check"]) == 2
    status = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("status")]
    assert len(status) == 1 and "INVALID" in status[0] and want[0] in status[0]


# ------------------------------------------------------------------- missing inner chunks, zarr


def test_inner_chunks_left_out_by_zarr_python_are_missing_not_zeros(tmp_path, capsys):
    """zarr-python with write_empty_chunks=False leaves out inner chunks equal to the fill value:
    one marked empty in its shard's index, and a whole shard file when all its inner chunks are
    empty. FORMAT.md: either is a missing chunk, an error, never zeros."""
    bags = {sid: (f.copy(), c.copy()) for sid, (f, c) in BAGS.items()}
    ids = list(bags)
    off = np.concatenate([[0], np.cumsum(SIZES)])
    # Zero rows 8..16 of features (inner chunk 1 of shard 0, inside slide_1: rows 5..26) and rows
    # 32..64 of coords (all of shard 1, inside slide_3: rows 27..67).
    for sid, start in zip(ids, off[:-1], strict=True):
        f = bags[sid][0]
        lo, hi = max(8 - start, 0), min(16 - start, len(f))
        if lo < hi:
            f[lo:hi] = 0
        c = bags[sid][1]
        lo, hi = max(32 - start, 0), min(64 - start, len(c))
        if lo < hi:
            c[lo:hi] = 0
    path = write_zarr_python(
        tmp_path / "z.zarr", _lz4(), sharded=True, empty_chunks=False, bags=bags
    )
    # The layout zarr-python wrote: an empty entry in features shard 0, no coords shard 1.
    feats0 = (path / "features/c/0/0").read_bytes()
    index = np.frombuffer(feats0[-(16 * 4 + 4) : -4], dtype="<u8").reshape(4, 2)
    assert (index[1] == 2**64 - 1).all() and (index[[0, 2, 3]] != 2**64 - 1).all()
    assert not (path / "coords/c/1/0").exists() and (path / "coords/c/0/0").exists()
    # zarr-python itself reads both as zeros, the fill value.
    ref = zarr.open_group(str(path), mode="r")
    assert not ref["features"][8:16].any() and not ref["coords"][32:64].any()

    store = CohortStore.open(path)
    assert store.read("slide_0").n_patches == 5  # rows 0..5: inner chunk 0, present
    with pytest.raises(StoreError) as err:
        store.read("slide_1")  # rows 5..26
    msg = str(err.value)
    assert "features/c/0/0 (inner chunk 1) is missing" in msg and "marks it empty" in msg
    assert "write_empty_chunks" in msg and f"store {path}" in msg and "slide_1" in msg
    with pytest.raises(StoreError, match=r"coords/c/1/0 \(inner chunk 0\) is missing"):
        store.read("slide_3")  # features present, coords shard 1 absent
    info = describe(path, check=True, progress=False)
    assert info["valid"] is False and "is missing" in info["error"]

    # Written with write_empty_chunks=True (as FORMAT.md asks), the same data reads exactly.
    full = write_zarr_python(tmp_path / "full.zarr", _lz4(), sharded=True, bags=bags)
    got = CohortStore.open(full)
    for sid, (f, c) in bags.items():
        assert np.array_equal(
            got.read(sid, dtype="float16").features.view(np.uint16), f.view(np.uint16)
        )
        assert np.array_equal(got.read(sid).coords, c)


def _unchecked_index_store(tmp_path: Path) -> tuple[Path, Path, int]:
    path = write_zarr_python(tmp_path / "u.zarr", [Crc32cCodec()], sharded=True, index_crc=False)
    shard = path / "features" / "c" / "1" / "0"
    return path, shard, shard.stat().st_size - 16 * (SHARD // INNER)


def _set_entry(shard: Path, index_start: int, inner: int, offset: int, nbytes: int) -> None:
    raw = bytearray(shard.read_bytes())
    at = index_start + 16 * inner
    raw[at : at + 16] = np.array([offset, nbytes], dtype="<u8").tobytes()
    shard.write_bytes(bytes(raw))


def test_an_entry_marked_empty_in_an_unchecked_index_is_missing(tmp_path, capsys):
    path, shard, index_start = _unchecked_index_store(tmp_path)
    _set_entry(shard, index_start, 1, 2**64 - 1, 2**64 - 1)
    # zarr-python reads the rows as fill values (zeros); momkd refuses them.
    assert not zarr.open_group(str(path), mode="r")["features"][40:48].any()
    with pytest.raises(StoreError, match=r"features/c/1/0 \(inner chunk 1\) is missing"):
        CohortStore.open(path).read("slide_3")
    assert main(["info", str(path), "--check"]) == 2
    assert "INVALID" in capsys.readouterr().out


@pytest.mark.parametrize("nbytes", [2**63, 2**64 - 1, 2**32])
def test_huge_index_entries_name_the_shard_and_never_panic(tmp_path, nbytes, capfd):
    path, shard, index_start = _unchecked_index_store(tmp_path)
    _set_entry(shard, index_start, 1, 0, nbytes)
    store = CohortStore.open(path)
    with pytest.raises(StoreError) as err:
        store.read("slide_3")
    msg = str(err.value)
    assert f"store {path}: slide slide_3: shard features/c/1/0 of array 'features'" in msg
    assert "corrupt shard index" in msg and f"inner chunk 1 (offset 0, nbytes {nbytes})" in msg
    # The loader (with read-ahead, which skips the bad entry) says the same.
    with pytest.raises(StoreError, match="corrupt shard index"):
        list(BagLoader(store, knn_k=None, num_threads=2, readahead=4, io_threads=2))
    assert main(["info", str(path), "--check"]) == 2
    captured = capfd.readouterr()
    assert "panicked" not in captured.err and "capacity overflow" not in captured.err
    assert "corrupt shard index" in captured.out


def test_an_entry_overlapping_the_index_is_refused(tmp_path):
    path, shard, index_start = _unchecked_index_store(tmp_path)
    _set_entry(shard, index_start, 0, index_start - 4, 36)  # 32 bytes of it inside the index
    with pytest.raises(StoreError, match=rf"inner chunk 0 \(offset {index_start - 4}, nbytes 36\)"):
        CohortStore.open(path).read("slide_3")
