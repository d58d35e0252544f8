"""Writing a cohort store: a Zarr v3 hierarchy of patch features and coordinates (``docs/FORMAT.md``).

:class:`StoreWriter` writes a store with zarr-python, appending slides back to back and writing every
chunk once. It keeps the store resumable at all times: the root header says ``complete: false`` and
records the last *committed* slide until :meth:`StoreWriter.close` has written everything, so an
interrupted writer (even one killed with SIGKILL) leaves a store that readers refuse and that
:meth:`StoreWriter.resume` continues. Finished stores are read by
:class:`momkd.data.store.CohortStore`.

Crash-safety invariants of the writer
-------------------------------------
* The header (``zarr.json`` of the root group) is replaced atomically (temporary file, fsync,
  ``os.replace``) and only ever says ``complete: true`` after every array is final.
* ``header["ingest"]["slides_done"] = k`` means: slides ``0 .. k-1`` and ``offsets[0 .. k]`` are on
  disk. Only full chunks are written while appending, so the rows of the first unfinished slide's
  chunk are read back from disk on resume and that chunk is rewritten (atomically, zarr-python's
  local store writes a temporary file and renames it) with the same leading rows.
* Array metadata grows before the chunks beyond the old shape are written, so every chunk file
  lies inside the array's shape; resuming shrinks the arrays to the committed rows, deleting chunks
  written after the last commit.
"""

from __future__ import annotations

import bisect
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import numpy as np

from momkd import _core
from momkd.data.store import describe_error, read_header, read_root_meta
from momkd.errors import DataError, StoreError

logger = logging.getLogger(__name__)

__all__ = [
    "FEATURE_CODECS",
    "FEATURE_DTYPES",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "StoreWriter",
    "default_chunk_rows",
    "prepare_bag",
    "shard_rows_for",
    "validate_slide_id",
]

FORMAT_NAME = "momkd-cohort"
FORMAT_VERSION = 1
# Sharded stores (``sharding_indexed`` on features and coords) are format version 1.1: the header
# keeps ``format_version: 1`` and adds ``format_minor: 1``.
FORMAT_MINOR_SHARDED = 1
FEATURE_DTYPES = ("float16", "float32")
ZSTD_LEVEL = 3
OFFSETS_CHUNK = 4096
_TARGET_CHUNK_BYTES = 3 * 2**19  # 1.5 MiB decoded per feature chunk
_MIN_CHUNK_ROWS = 64
_MAX_CHUNK_ROWS = 1024  # small bags (hundreds of patches) should not decode much more than they use
_ARRAYS = ("features", "coords", "offsets")

_REQUIRED_KEYS = ("format", "format_version", "complete", "feature_dim", "n_slides", "n_patches")
_INT32 = np.iinfo(np.int32)


# --------------------------------------------------------------------------------------------- helpers


def default_chunk_rows(feature_dim: int, dtype: str = "float16") -> int:
    """Rows per chunk so that one feature chunk is about 1.5 MiB decoded.

    Parameters
    ----------
    feature_dim : int
        ``D``, the number of feature columns.
    dtype : {"float16", "float32"}
        Storage type of the features.

    Returns
    -------
    int
        A power of two between 64 and 1024 (512 at ``D = 1536``, float16).
    """
    itemsize = np.dtype(dtype).itemsize
    rows = _TARGET_CHUNK_BYTES / (max(1, feature_dim) * itemsize)
    power = 2 ** round(math.log2(max(rows, 1.0)))
    return int(min(max(power, _MIN_CHUNK_ROWS), _MAX_CHUNK_ROWS))


def shard_rows_for(
    shard_mb: float, feature_dim: int, chunk_rows: int, dtype: str = "float16"
) -> int:
    """Rows per shard so that one ``features`` shard holds about ``shard_mb`` MiB (decoded).

    Parameters
    ----------
    shard_mb : float
        Target shard size in MiB (64-256 suits HPC file systems and object stores).
    feature_dim, chunk_rows : int
        ``D`` and the inner chunk ``R``.
    dtype : {"float16", "float32"}

    Returns
    -------
    int
        A multiple of ``chunk_rows``, at least ``chunk_rows``.

    Raises
    ------
    DataError
        If ``shard_mb`` is not positive.
    """
    if not shard_mb > 0:
        raise DataError(f"shard size must be > 0 MiB, got {shard_mb!r}")
    row_bytes = max(1, feature_dim) * np.dtype(dtype).itemsize
    chunks = round(shard_mb * 2**20 / (row_bytes * chunk_rows))
    return int(max(1, chunks) * chunk_rows)


def validate_slide_id(slide_id: object, where: str = "") -> str:
    """Check that a slide id is a safe, non-empty string and return it.

    Ids must not contain ``/``, ``\\`` or NUL and must not start with ``.`` so that they can never
    name a path outside a store or run directory.

    Raises
    ------
    DataError
        If the id is not a string or is unsafe; the message names ``where`` and the id.
    """
    prefix = f"{where}: " if where else ""
    if not isinstance(slide_id, str):
        raise DataError(f"{prefix}slide id {slide_id!r} is not a string")
    if not slide_id or slide_id.strip() != slide_id:
        raise DataError(f"{prefix}slide id {slide_id!r} is empty or has surrounding whitespace")
    if any(ch in slide_id for ch in ("/", "\\", "\x00")) or slide_id.startswith("."):
        raise DataError(
            f"{prefix}slide id {slide_id!r} is unsafe (contains '/', '\\' or NUL, or starts with '.')"
        )
    if any(ord(ch) < 32 for ch in slide_id):
        raise DataError(f"{prefix}slide id {slide_id!r} contains control characters")
    return slide_id


def _write_json_atomic(target: Path, obj: Mapping[str, Any]) -> None:
    data = json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False).encode("utf-8")
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, target)
    try:
        dir_fd = os.open(target.parent, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(dir_fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(dir_fd)


def _write_header(path: Path, header: Mapping[str, Any]) -> None:
    try:
        meta = read_root_meta(path)
    except StoreError:
        meta = {"zarr_format": 3, "node_type": "group", "attributes": {}}
    attrs = dict(meta.get("attributes") or {})
    attrs["momkd"] = dict(header)
    meta["attributes"] = attrs
    _write_json_atomic(path / "zarr.json", meta)


# zarr-python writes a chunk or metadata file `name` as `name` minus its suffix plus
# `.<32 hex digits>.partial`, then renames it; a killed writer can leave one behind.
_ZARR_PARTIAL = re.compile(r"\.[0-9a-f]{32}\.partial$")
# `_write_json_atomic`'s temporary header: `zarr.json.<pid>.tmp`.
_HEADER_TMP = re.compile(r"^zarr\.json\.\d+\.tmp$")


def _remove_temporaries(path: Path) -> int:
    """Delete the temporary files an interrupted writer left in the store at ``path`` (zarr-python's
    ``*.partial`` files in the arrays, this module's temporary headers); return how many.

    Only a resuming writer calls this: a store has one writer at a time, so no temporary file
    belongs to a write still in progress.
    """
    removed = 0
    candidates = [p for p in path.iterdir() if _HEADER_TMP.match(p.name)]
    for name in _ARRAYS:
        if (path / name).is_dir():
            candidates += [
                p for p in (path / name).rglob("*.partial") if _ZARR_PARTIAL.search(p.name)
            ]
    for p in candidates:
        if p.is_file() and not p.is_symlink():
            p.unlink(missing_ok=True)
            removed += 1
    return removed


def _looks_like_store(path: Path) -> bool:
    """Whether ``path`` holds nothing but (the remains of) a cohort store, so it may be deleted."""
    for entry in path.iterdir():
        name = entry.name
        if name in _ARRAYS and entry.is_dir():
            continue
        if name == "zarr.json" or (name.startswith("zarr.json.") and name.endswith(".tmp")):
            continue
        return False
    return True


def _remove_store(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        raise StoreError(f"store {path}: exists and is not a directory; refusing to overwrite it")
    if not _looks_like_store(path):
        raise StoreError(
            f"store {path}: directory exists and holds files that are not part of a cohort store; "
            "refusing to overwrite it"
        )
    # The header goes first: a deletion interrupted half-way must not leave a header that says
    # `complete: true` above missing chunks.
    (path / "zarr.json").unlink(missing_ok=True)
    shutil.rmtree(path)


def _zstd() -> Any:
    from zarr.codecs import ZstdCodec

    return ZstdCodec(level=ZSTD_LEVEL, checksum=True)


FEATURE_CODECS = ("lz4", "zstd", "none")


def _feature_compressors(codec: str, dtype: str) -> list[Any]:
    """Bytes-to-bytes codecs of the ``features`` array.

    ``lz4`` (default): blosc with byte shuffle and LZ4, then a CRC-32C checksum of the chunk. Patch
    embeddings are close to incompressible noise for entropy coders; byte shuffling isolates the
    compressible exponent bytes and LZ4 decodes several times faster than zstd, so reading stays
    ahead of the model. ``zstd``: zstd level 3 with its frame checksum (smaller on very redundant
    features, slower to decode). ``none``: no compression, only the CRC-32C checksum (the most bytes
    on disk, the least decoding). Every chunk carries a checksum.
    """
    if codec == "zstd":
        return [_zstd()]
    from zarr.codecs import BloscCodec, Crc32cCodec

    if codec == "none":
        return [Crc32cCodec()]

    return [
        BloscCodec(cname="lz4", clevel=5, shuffle="shuffle", typesize=np.dtype(dtype).itemsize),
        Crc32cCodec(),
    ]


def prepare_bag(
    features: Any,
    coords: Any,
    *,
    dtype: str = "float16",
    feature_dim: int | None = None,
    name: str = "",
) -> tuple[np.ndarray, np.ndarray]:
    """Validate one bag and convert it to the storage types (releases the GIL for the big pass).

    Parameters
    ----------
    features : array_like, shape (P, D)
    coords : array_like, shape (P, 2)
        Integer-valued.
    dtype : {"float16", "float32"}
        Storage type of the features.
    feature_dim : int, optional
        Expected ``D``; not checked when ``None``.
    name : str
        Prefix of error messages (the slide or file).

    Returns
    -------
    features : np.ndarray, ``dtype``, shape (P, D), C-contiguous
    coords : np.ndarray, int32, shape (P, 2), C-contiguous

    Raises
    ------
    DataError
        Wrong shape, empty bag, D mismatch, NaN/Inf, float16 overflow, non-integer coords.
    """
    feats = _check_features(features, dtype, feature_dim, name)
    return feats, _check_coords(coords, feats.shape[0], name)


def _check_features(x: Any, dtype: str, feature_dim: int | None, name: str) -> np.ndarray:
    """Validate one bag's features and convert them to the storage type. Returns (P, D)."""
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise DataError(f"{name}: features must be 2-D (P, D), got shape {tuple(arr.shape)}")
    if arr.shape[0] == 0:
        raise DataError(f"{name}: empty bag (0 patches)")
    if feature_dim is not None and arr.shape[1] != feature_dim:
        raise DataError(
            f"{name}: feature dim {arr.shape[1]} does not match the store's {feature_dim}"
        )
    if arr.dtype.kind not in "fiu":
        raise DataError(f"{name}: features have non-numeric dtype {arr.dtype}")
    if dtype == "float16":
        if arr.dtype == np.float16:
            _core.check_finite(np.ascontiguousarray(arr), name)
            return np.ascontiguousarray(arr)
        src = arr if arr.dtype == np.float64 else arr.astype(np.float32, copy=False)
        return np.asarray(_core.to_float16_checked(np.ascontiguousarray(src), name))
    if arr.dtype == np.float64:
        _check_f64_range(arr, name)
    out = np.ascontiguousarray(arr, dtype=np.float32)
    _core.check_finite(out, name)
    return out


def _check_f64_range(arr: np.ndarray, name: str) -> None:
    # float64 -> float32 would turn NaN-free out-of-range values into Inf; report them as such.
    finite = np.isfinite(arr)
    if not finite.all():
        row = int(np.argwhere(~finite)[0][0])
        raise DataError(f"{name}: non-finite feature value (NaN or Inf) in row {row}")
    big = np.abs(arr) > np.finfo(np.float32).max
    if big.any():
        row = int(np.argwhere(big)[0][0])
        raise DataError(f"{name}: feature value out of float32 range in row {row}")


def _check_coords(c: Any, n_rows: int, name: str) -> np.ndarray:
    """Validate coordinates (P, 2) of one bag and return them as int32 (P, 2)."""
    arr = np.asarray(c)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise DataError(f"{name}: coords must have shape (P, 2), got {tuple(arr.shape)}")
    if arr.shape[0] != n_rows:
        raise DataError(f"{name}: {arr.shape[0]} coords rows for {n_rows} feature rows")
    if arr.dtype.kind == "f":
        finite = np.isfinite(arr)
        if not finite.all():
            row = int(np.argwhere(~finite)[0][0])
            raise DataError(f"{name}: non-finite coordinate in row {row}")
        frac = arr != np.round(arr)
        if frac.any():
            row = int(np.argwhere(frac)[0][0])
            raise DataError(
                f"{name}: coords must be integer-valued, row {row} is {arr[row].tolist()}"
            )
    elif arr.dtype.kind not in "iu":
        raise DataError(f"{name}: coords have non-numeric dtype {arr.dtype}")
    if arr.size and (arr.min() < _INT32.min or arr.max() > _INT32.max):
        raise DataError(f"{name}: coords outside the int32 range")
    return np.ascontiguousarray(arr, dtype=np.int32)


def _now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# ---------------------------------------------------------------------------------------------- writer


class StoreWriter:
    """Write a cohort store slide by slide (zarr-python, Zarr v3, checksummed chunks).

    Use as a context manager; leaving the block without an exception calls :meth:`close`, which
    marks the store complete. Leaving it with an exception commits what is on disk and leaves the
    store incomplete and resumable.

    Parameters
    ----------
    path : str or PathLike
        Store directory to create (``*.zarr``).
    feature_dim : int
        ``D``, columns of every bag's features.
    dtype : {"float16", "float32"}
        Storage type of the features (default float16; conversion is overflow-checked).
    chunk_rows : int, optional
        Rows per chunk ``R``; default :func:`default_chunk_rows` (about 1.5 MiB per feature chunk).
    codec : {"lz4", "zstd", "none"}
        Compression of ``features``: blosc-LZ4 with byte shuffle + CRC-32C (default, fastest to
        read), zstd level 3 with checksum, or none (CRC-32C only). ``coords`` and ``offsets``
        always use zstd.
    shard_rows : int, optional
        Write ``features`` and ``coords`` sharded (format version 1.1, ``sharding_indexed``): this
        many rows per shard file, a multiple of ``chunk_rows`` (the inner chunk). See
        :func:`shard_rows_for` for a size in MiB. Default: unsharded (one file per chunk).
    attrs : mapping, optional
        Extra header keys: ``encoder``, ``magnification``, ``patch_size``, ``provenance`` and any
        other JSON value. Required keys (``format``, ``slide_ids``, ...) cannot be overridden.
    overwrite : bool
        Delete an existing store at ``path`` first (only a directory that holds nothing but a cohort
        store is ever deleted).
    ingest_meta : mapping, optional
        JSON object kept in ``header["ingest"]["meta"]`` while the store is incomplete, returned by
        :attr:`ingest_meta` after :meth:`resume` (``momkd ingest`` keeps its source fingerprint here).
    commit_interval : float
        Minimum seconds between two header commits while appending (0 commits after every slide
        that completes a chunk). A shorter interval redoes less work after an interruption.

    Examples
    --------
    >>> with StoreWriter("cohort.zarr", feature_dim=1536) as w:   # doctest: +SKIP
    ...     w.append("slide_a", feats_a, coords_a)   # (P, 1536) float, (P, 2) int
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        feature_dim: int,
        *,
        dtype: str = "float16",
        chunk_rows: int | None = None,
        codec: str = "lz4",
        attrs: Mapping[str, Any] | None = None,
        overwrite: bool = False,
        ingest_meta: Mapping[str, Any] | None = None,
        commit_interval: float = 0.5,
        shard_rows: int | None = None,
    ) -> None:
        self._path = Path(path)
        if codec not in FEATURE_CODECS:
            raise DataError(
                f"store {self._path}: codec must be one of {FEATURE_CODECS}, got {codec!r}"
            )
        self._codec = codec
        if isinstance(feature_dim, bool) or not isinstance(feature_dim, (int, np.integer)):
            raise DataError(
                f"store {self._path}: feature_dim must be an integer, got {feature_dim!r}"
            )
        if feature_dim < 1:
            raise DataError(f"store {self._path}: feature_dim must be >= 1, got {feature_dim}")
        if dtype not in FEATURE_DTYPES:
            raise DataError(
                f"store {self._path}: dtype must be one of {FEATURE_DTYPES}, got {dtype!r}"
            )
        if chunk_rows is None:
            chunk_rows = default_chunk_rows(int(feature_dim), dtype)
        if isinstance(chunk_rows, bool) or int(chunk_rows) != chunk_rows or chunk_rows < 1:
            raise DataError(
                f"store {self._path}: chunk_rows must be a positive integer, got {chunk_rows!r}"
            )
        if shard_rows is not None and (
            isinstance(shard_rows, bool)
            or int(shard_rows) != shard_rows
            or shard_rows < chunk_rows
            or shard_rows % chunk_rows
        ):
            raise DataError(
                f"store {self._path}: shard_rows must be a positive multiple of chunk_rows "
                f"({chunk_rows}), got {shard_rows!r}"
            )
        self._init_state(
            int(feature_dim), dtype, int(chunk_rows), attrs, ingest_meta, commit_interval
        )
        self._shard_rows = None if shard_rows is None else int(shard_rows)
        self._unit = self._shard_rows or self._rows

        if self._path.exists() or self._path.is_symlink():
            if not overwrite:
                raise StoreError(
                    f"store {self._path}: already exists (pass overwrite=True to replace it, or "
                    "StoreWriter.resume to continue an interrupted write)"
                )
            _remove_store(self._path)
        self._path.mkdir(parents=True)
        # Header first: from here on the directory is a recognisable, incomplete store.
        self._write_header_now()
        self._create_arrays()
        logger.debug("created store %s (D=%d, %s, R=%d)", self._path, self._dim, dtype, self._rows)

    def _init_state(
        self,
        feature_dim: int,
        dtype: str,
        chunk_rows: int,
        attrs: Mapping[str, Any] | None,
        ingest_meta: Mapping[str, Any] | None,
        commit_interval: float,
    ) -> None:
        self._dim = feature_dim
        self._dtype = dtype
        self._rows = chunk_rows
        self._attrs: dict[str, Any] = {}
        if attrs:
            self._set_attrs(attrs)
        self._ingest_meta: dict[str, Any] = dict(ingest_meta or {})
        self._commit_interval = float(commit_interval)
        self._ids: list[str] = []
        self._idset: set[str] = set()
        self._offsets: list[int] = [0]
        self._tail_f: list[np.ndarray] = []
        self._tail_c: list[np.ndarray] = []
        self._tail_rows = 0
        self._flushed = 0
        self._committed = 0
        self._last_commit = time.monotonic()
        self._closed = False
        self._resumed_slides = 0
        self._created = _now_iso()
        self._feat: Any = None
        self._coord: Any = None
        self._off: Any = None

    # ------------------------------------------------------------------ construction and resuming

    def _create_arrays(self) -> None:
        import zarr

        store = str(self._path)
        common: dict[str, Any] = {
            "compressors": _zstd(),
            "fill_value": 0,
            "zarr_format": 3,
            "overwrite": True,
            # momkd treats a missing chunk as corruption, so chunks equal to the fill value are
            # written too (zarr-python skips them by default).
            "config": {"write_empty_chunks": True},
        }
        shard = self._shard_rows
        self._feat = zarr.create_array(
            store,
            name="features",
            shape=(0, self._dim),
            dtype=self._dtype,
            chunks=(self._rows, self._dim),
            shards=None if shard is None else (shard, self._dim),
            **{**common, "compressors": _feature_compressors(self._codec, self._dtype)},
        )
        self._coord = zarr.create_array(
            store,
            name="coords",
            shape=(0, 2),
            dtype="int32",
            chunks=(self._rows, 2),
            shards=None if shard is None else (shard, 2),
            **common,
        )
        self._off = zarr.create_array(
            store, name="offsets", shape=(1,), dtype="int64", chunks=(OFFSETS_CHUNK,), **common
        )
        self._off[0:1] = np.zeros(1, dtype=np.int64)

    @classmethod
    def resume(cls, path: str | os.PathLike[str], *, commit_interval: float = 0.5) -> StoreWriter:
        """Reopen an incomplete store to continue writing after its last committed slide.

        The slides in :attr:`slide_ids` are on disk; append the remaining ones in order and call
        :meth:`close`.

        Raises
        ------
        StoreError
            If ``path`` is not an incomplete momkd store with intact committed data.
        """
        path = Path(path)
        header = read_header(path)
        where = f"store {path}: cannot resume"
        if header.get("format") != FORMAT_NAME or header.get("format_version") != FORMAT_VERSION:
            raise StoreError(f"{where}: not a {FORMAT_NAME} v{FORMAT_VERSION} store")
        if header.get("complete") is True:
            raise StoreError(f"{where}: the store is already complete")
        state = header.get("ingest")
        if not isinstance(state, dict):
            raise StoreError(f"{where}: header has no 'ingest' state")
        try:
            dim = int(state["feature_dim"])
            dtype = str(state["dtype"])
            rows = int(state["chunk_rows"])
            done = int(state["slides_done"])
            rows_done = int(state["rows_done"])
            ids = list(header["slide_ids"])
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreError(f"{where}: malformed 'ingest' state ({exc})") from None
        if dtype not in FEATURE_DTYPES or dim < 1 or rows < 1 or len(ids) != done or done < 0:
            raise StoreError(f"{where}: inconsistent 'ingest' state")
        attrs = {
            k: v for k, v in header.items() if k not in _REQUIRED_KEYS + ("slide_ids", "ingest")
        }
        self = cls.__new__(cls)
        self._path = path
        codec = str(state.get("codec", "zstd"))
        if codec not in FEATURE_CODECS:
            raise StoreError(f"{where}: unknown codec {codec!r} in 'ingest' state")
        self._codec = codec
        shard_rows = state.get("shard_rows")
        if shard_rows is not None and (
            not isinstance(shard_rows, int) or shard_rows < rows or shard_rows % rows
        ):
            raise StoreError(f"{where}: inconsistent 'shard_rows' in 'ingest' state")
        self._init_state(dim, dtype, rows, None, state.get("meta") or {}, commit_interval)
        self._shard_rows = shard_rows
        self._unit = shard_rows or rows
        self._attrs = attrs
        self._created = str(state.get("created", self._created))
        for sid in ids:
            validate_slide_id(sid, where)
            if sid in self._idset:
                raise StoreError(f"{where}: duplicate slide id {sid!r} in header")
            self._idset.add(sid)
        self._ids = ids
        removed = _remove_temporaries(path)
        if removed:
            logger.info(
                "store %s: removed %d temporary files of the interrupted write", path, removed
            )
        if done == 0 and rows_done == 0:
            # Interrupted before the first commit: the arrays may not even exist yet.
            self._create_arrays()
        else:
            self._reopen_arrays(done, rows_done, where)
        self._committed = done
        self._resumed_slides = done
        logger.info("resuming store %s after %d committed slides (%d rows)", path, done, rows_done)
        return self

    def _reopen_arrays(self, done: int, rows_done: int, where: str) -> None:
        import zarr

        try:
            with zarr.config.set({"array.write_empty_chunks": True}):
                self._feat = zarr.open_array(str(self._path / "features"), mode="r+", zarr_format=3)
                self._coord = zarr.open_array(str(self._path / "coords"), mode="r+", zarr_format=3)
                self._off = zarr.open_array(str(self._path / "offsets"), mode="r+", zarr_format=3)
        except Exception as exc:  # noqa: BLE001 - zarr raises several types for missing / bad metadata
            raise StoreError(f"{where}: cannot open arrays ({describe_error(exc)})") from None
        feat, coord, off = self._feat, self._coord, self._off
        if (
            feat.ndim != 2
            or feat.shape[1] != self._dim
            or str(feat.dtype) != self._dtype
            or feat.chunks[0] != self._rows
            or (feat.shards[0] if feat.shards is not None else None) != self._shard_rows
            or coord.ndim != 2
            or coord.shape[1] != 2
            or off.ndim != 1
        ):
            raise StoreError(f"{where}: arrays do not match the recorded shape, dtype or chunking")
        if feat.shape[0] < rows_done or coord.shape[0] < rows_done or off.shape[0] < done + 1:
            raise StoreError(f"{where}: arrays are shorter than the committed {rows_done} rows")
        try:
            offsets = np.asarray(off[: done + 1], dtype=np.int64)
        except Exception as exc:  # noqa: BLE001 - zarr raises several types for unreadable chunks
            raise StoreError(f"{where}: offsets cannot be read ({describe_error(exc)})") from None
        if offsets[0] != 0 or np.any(np.diff(offsets) <= 0) or offsets[-1] != rows_done:
            raise StoreError(f"{where}: committed offsets are inconsistent with the header")
        # The unit written at once: a chunk, or a whole shard of a sharded store.
        base = (rows_done // self._unit) * self._unit
        if base < rows_done:
            # zarr-python reads a missing chunk as fill values; committed rows must really be there.
            for name in ("features", "coords"):
                if not (self._path / name / "c" / str(base // self._unit) / "0").is_file():
                    raise StoreError(
                        f"{where}: chunk {name}/c/{base // self._unit}/0 holding committed rows "
                        f"{base}..{rows_done} is missing"
                    )
            try:
                tail_f = np.asarray(feat[base:rows_done])
                tail_c = np.asarray(coord[base:rows_done])
            except Exception as exc:  # noqa: BLE001 - zarr raises several types for unreadable chunks
                raise StoreError(
                    f"{where}: chunk {base // self._unit} holding committed rows {base}..{rows_done} "
                    f"cannot be read ({describe_error(exc)})"
                ) from None
            self._tail_f = [np.ascontiguousarray(tail_f, dtype=self._dtype)]
            self._tail_c = [np.ascontiguousarray(tail_c, dtype=np.int32)]
            self._tail_rows = rows_done - base
        # Drop whatever was written after the last commit. The chunk holding row `rows_done` (if
        # partial) is kept: its leading rows are the committed rows just read back.
        feat.resize((rows_done, self._dim))
        coord.resize((rows_done, 2))
        off.resize((done + 1,))
        self._flushed = base
        self._offsets = [int(v) for v in offsets]

    # ------------------------------------------------------------------------------- properties

    @property
    def path(self) -> Path:
        """The store directory."""
        return self._path

    @property
    def feature_dim(self) -> int:
        """``D``."""
        return self._dim

    @property
    def dtype(self) -> str:
        """Storage type of the features."""
        return self._dtype

    @property
    def chunk_rows(self) -> int:
        """Rows per chunk ``R`` (the inner chunk of a sharded store)."""
        return self._rows

    @property
    def shard_rows(self) -> int | None:
        """Rows per shard of a sharded store, else ``None``."""
        return self._shard_rows

    @property
    def slide_ids(self) -> list[str]:
        """Ids of the slides appended so far (committed and pending), in storage order."""
        return list(self._ids)

    @property
    def n_patches(self) -> int:
        """Rows appended so far."""
        return self._offsets[-1]

    @property
    def committed_slides(self) -> int:
        """Number of slides recorded as on disk in the header."""
        return self._committed

    @property
    def resumed_slides(self) -> int:
        """Number of slides that were already on disk when this writer was resumed."""
        return self._resumed_slides

    @property
    def attrs(self) -> dict[str, Any]:
        """The optional header keys (``encoder``, ``provenance``, ...)."""
        return dict(self._attrs)

    @property
    def ingest_meta(self) -> dict[str, Any]:
        """The ``ingest_meta`` object given at creation (kept across :meth:`resume`)."""
        return dict(self._ingest_meta)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has completed."""
        return self._closed

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, slide_id: object) -> bool:
        return slide_id in self._idset

    def update_attrs(self, attrs: Mapping[str, Any]) -> None:
        """Set optional header keys; written with the next commit or :meth:`close`."""
        self._set_attrs(attrs)

    def _set_attrs(self, attrs: Mapping[str, Any]) -> None:
        for key, value in attrs.items():
            if key in _REQUIRED_KEYS or key in ("slide_ids", "ingest"):
                raise DataError(f"store {self._path}: header key {key!r} is reserved")
            try:
                json.dumps(value, allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise DataError(
                    f"store {self._path}: header key {key!r} is not JSON ({describe_error(exc)})"
                ) from None
            self._attrs[str(key)] = value

    # ---------------------------------------------------------------------------------- writing

    def append(self, slide_id: str, features: Any, coords: Any) -> None:
        """Append one slide.

        Parameters
        ----------
        slide_id : str
            Unique, safe id (see :func:`validate_slide_id`).
        features : array_like, shape (P, D)
            Float (or integer) features, ``P > 0``, all finite; converted to the storage dtype.
        coords : array_like, shape (P, 2)
            Integer-valued level-0 pixel ``(x, y)`` of each patch; stored as int32.

        Raises
        ------
        DataError
            On a bad id, duplicate id, shape, empty bag, NaN/Inf or overflow; names the slide. The
            writer is unchanged by a rejected slide.
        StoreError
            If the writer is closed or a write fails.
        """
        self._check_open()
        name = f"store {self._path}: slide {slide_id!r}"
        validate_slide_id(slide_id, f"store {self._path}")
        if slide_id in self._idset:
            raise DataError(f"{name}: duplicate slide id")
        feats, crd = prepare_bag(
            features, coords, dtype=self._dtype, feature_dim=self._dim, name=name
        )
        self._push(slide_id, feats, crd)

    def append_prepared(self, slide_id: str, features: np.ndarray, coords: np.ndarray) -> None:
        """Append a slide already converted by :func:`prepare_bag` (skips the value checks).

        Parameters
        ----------
        slide_id : str
        features : np.ndarray, storage dtype, shape (P, D)
        coords : np.ndarray, int32, shape (P, 2)
        """
        self._check_open()
        name = f"store {self._path}: slide {slide_id!r}"
        validate_slide_id(slide_id, f"store {self._path}")
        if slide_id in self._idset:
            raise DataError(f"{name}: duplicate slide id")
        if (
            features.dtype != np.dtype(self._dtype)
            or features.ndim != 2
            or features.shape[1] != self._dim
            or features.shape[0] == 0
            or coords.dtype != np.int32
            or coords.shape != (features.shape[0], 2)
        ):
            raise DataError(
                f"{name}: expected prepared arrays ({self._dtype} (P, {self._dim}), int32 (P, 2)), "
                f"got {features.dtype} {tuple(features.shape)} and {coords.dtype} {tuple(coords.shape)}"
            )
        self._push(slide_id, np.ascontiguousarray(features), np.ascontiguousarray(coords))

    def update_ingest_meta(self, meta: Mapping[str, Any]) -> None:
        """Merge keys into :attr:`ingest_meta`; written with the next commit."""
        self._ingest_meta.update(meta)

    def _push(self, slide_id: str, feats: np.ndarray, crd: np.ndarray) -> None:
        self._ids.append(slide_id)
        self._idset.add(slide_id)
        self._offsets.append(self._offsets[-1] + feats.shape[0])
        self._tail_f.append(feats)
        self._tail_c.append(crd)
        self._tail_rows += feats.shape[0]
        if self._tail_rows >= self._unit:
            self._flush_full_chunks()
        self._maybe_commit()

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"store {self._path}: writer is closed")

    def _flush_full_chunks(self) -> None:
        # Whole chunks, or whole shards of a sharded store, so that every file is written once.
        n = (self._tail_rows // self._unit) * self._unit
        feats = self._tail_f[0] if len(self._tail_f) == 1 else np.concatenate(self._tail_f)
        crd = self._tail_c[0] if len(self._tail_c) == 1 else np.concatenate(self._tail_c)
        self._write_rows(feats[:n], crd[:n], self._flushed + n)
        rest = self._tail_rows - n
        self._tail_f = [feats[n:].copy()] if rest else []
        self._tail_c = [crd[n:].copy()] if rest else []
        self._tail_rows = rest

    def _write_rows(self, feats: np.ndarray, crd: np.ndarray, new_len: int) -> None:
        start = self._flushed
        try:
            if self._feat.shape[0] != new_len:
                self._feat.resize((new_len, self._dim))
                self._coord.resize((new_len, 2))
            self._feat[start:new_len] = feats
            self._coord[start:new_len] = crd
        except Exception as exc:
            raise StoreError(
                f"store {self._path}: writing rows {start}..{new_len} failed ({describe_error(exc)})"
            ) from exc
        self._flushed = new_len

    def _maybe_commit(self, force: bool = False) -> None:
        done = bisect.bisect_right(self._offsets, self._flushed) - 1
        if done <= self._committed and not force:
            return
        if not force and time.monotonic() - self._last_commit < self._commit_interval:
            return
        self._commit(done)

    def _commit(self, done: int) -> None:
        if done > self._committed:
            self._write_offsets(done)
        self._committed = max(self._committed, done)
        self._write_header_now()
        self._last_commit = time.monotonic()

    def _write_offsets(self, upto: int) -> None:
        start = self._committed + 1
        try:
            if self._off.shape[0] != upto + 1:
                self._off.resize((upto + 1,))
            self._off[start : upto + 1] = np.asarray(
                self._offsets[start : upto + 1], dtype=np.int64
            )
        except Exception as exc:
            raise StoreError(
                f"store {self._path}: writing offsets failed ({describe_error(exc)})"
            ) from exc

    def commit(self) -> None:
        """Record on disk every slide whose rows are all in written chunks (normally automatic)."""
        self._check_open()
        self._maybe_commit(force=True)

    def _header(self, complete: bool) -> dict[str, Any]:
        n = len(self._ids) if complete else self._committed
        header: dict[str, Any] = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "complete": complete,
            "feature_dim": self._dim,
            "n_slides": n,
            "n_patches": self._offsets[n],
            "slide_ids": self._ids[:n],
        }
        if self._shard_rows is not None:
            header["format_minor"] = FORMAT_MINOR_SHARDED
        header.setdefault("encoder", None)
        header.setdefault("magnification", None)
        header.setdefault("patch_size", None)
        header.update(self._attrs)
        if not complete:
            header["ingest"] = {
                "slides_done": n,
                "rows_done": self._offsets[n],
                "rows_written": self._flushed,
                "feature_dim": self._dim,
                "dtype": self._dtype,
                "chunk_rows": self._rows,
                "shard_rows": self._shard_rows,
                "codec": self._codec,
                "created": self._created,
                "updated": _now_iso(),
                "meta": self._ingest_meta,
            }
        return header

    def _write_header_now(self, complete: bool = False) -> None:
        try:
            _write_header(self._path, self._header(complete))
        except OSError as exc:
            raise StoreError(
                f"store {self._path}: writing zarr.json failed ({describe_error(exc)})"
            ) from exc

    def close(self) -> None:
        """Write the remaining rows and mark the store complete (idempotent).

        Raises
        ------
        DataError
            If no slide was appended.
        """
        if self._closed:
            return
        if not self._ids:
            raise DataError(f"store {self._path}: no slides were appended")
        total = self._offsets[-1]
        if self._tail_rows:
            feats = self._tail_f[0] if len(self._tail_f) == 1 else np.concatenate(self._tail_f)
            crd = self._tail_c[0] if len(self._tail_c) == 1 else np.concatenate(self._tail_c)
            # Set the final shape first so the last (edge) chunk is written whole, once.
            self._write_rows(feats, crd, total)
            self._tail_f, self._tail_c, self._tail_rows = [], [], 0
        elif self._feat.shape[0] != total:
            self._feat.resize((total, self._dim))
            self._coord.resize((total, 2))
        self._write_offsets(len(self._ids))
        self._committed = len(self._ids)
        self._write_header_now(complete=True)
        self._closed = True
        logger.info("wrote store %s: %d slides, %d patches", self._path, len(self._ids), total)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
            return
        if not self._closed:
            try:
                self._maybe_commit(force=True)
            except Exception:  # the original exception matters more
                logger.exception("store %s: commit after an error failed", self._path)

    @classmethod
    def open_or_resume(
        cls,
        path: str | os.PathLike[str],
        feature_dim: int,
        *,
        dtype: str = "float16",
        chunk_rows: int | None = None,
        attrs: Mapping[str, Any] | None = None,
        overwrite: bool = False,
        ingest_meta: Mapping[str, Any] | None = None,
        commit_interval: float = 0.5,
    ) -> StoreWriter:
        """Resume the incomplete store at ``path`` if its settings match, else create a new one.

        A complete store at ``path`` raises :class:`StoreError` unless ``overwrite`` is true.

        Raises
        ------
        StoreError
            If ``path`` is complete (and not ``overwrite``), or an incomplete store there was
            written with another ``feature_dim``, ``dtype`` or ``chunk_rows``.
        """
        p = Path(path)
        if p.exists() and not overwrite:
            header = read_header(p)
            if header.get("complete") is True:
                raise StoreError(f"store {p}: already exists and is complete")
            writer = cls.resume(p, commit_interval=commit_interval)
            want_rows = chunk_rows if chunk_rows is not None else writer.chunk_rows
            if (writer.feature_dim, writer.dtype, writer.chunk_rows) != (
                feature_dim,
                dtype,
                want_rows,
            ):
                raise StoreError(
                    f"store {p}: the interrupted write used D={writer.feature_dim}, "
                    f"dtype={writer.dtype}, chunk_rows={writer.chunk_rows}; asked for D={feature_dim}, "
                    f"dtype={dtype}, chunk_rows={want_rows}"
                )
            if attrs:
                writer.update_attrs(attrs)
            return writer
        return cls(
            p,
            feature_dim,
            dtype=dtype,
            chunk_rows=chunk_rows,
            attrs=attrs,
            overwrite=overwrite,
            ingest_meta=ingest_meta,
            commit_interval=commit_interval,
        )
