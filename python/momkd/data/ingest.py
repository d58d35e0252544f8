"""Convert a folder of TRIDENT/CLAM feature files into one cohort store (``momkd ingest``).

Sources
-------
* ``.h5`` / ``.hdf5`` (TRIDENT, CLAM ``h5_files``): a features dataset (``features`` or ``feats``; the
  ``key`` argument picks one and the other is the fallback) of shape (P, D) or (1, P, D), and
  ``coords`` of shape (P, 2) (or (1, P, 2)).
* ``.pt`` / ``.pth`` (CLAM ``pt_files``): a float tensor (P, D) (or (1, P, D)), with the coordinates
  taken from a sibling ``.h5`` of the same stem in ``../h5_files/`` or in the same folder; or a dict
  with ``features`` (or ``feats``) and ``coords`` entries.

A ``.h5`` with the same stem as a ``.pt`` in the same folder is that tensor's coordinate file, not a
source of its own. A folder without feature files but with a ``h5_files/`` subfolder (a CLAM output
folder) ingests ``h5_files/``. The slide id is the file stem; slides are stored in sorted stem order.

Files without coordinates are an error unless ``grid_coords_ok=True`` (``momkd ingest
--no-coords``): their rows are then laid on a square grid in row order (row ``i`` of ``P`` at
``(i % W, i // W)`` with ``W = ceil(sqrt(P))``), one warning is logged, and the slide ids are
recorded in the store header under ``grid_coords``. The k-NN patch graph of such slides joins
patches that are neighbours in file order, not in the tissue, so training ``method: momkd`` on
them warns. An interrupted ingest may be resumed with or without ``--no-coords``.

Files are read, validated and converted to the storage dtype on a thread pool; the store is written
in order on the calling thread. The store stays resumable throughout (see :mod:`momkd.data.store_writer`):
rerunning the same ingest on an interrupted output continues after the last committed slide.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections import deque
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from momkd._io import dir_bytes
from momkd.data.info import decoded_bytes
from momkd.data.store import describe_error, read_header
from momkd.data.store_writer import (
    FEATURE_DTYPES,
    StoreWriter,
    default_chunk_rows,
    prepare_bag,
    shard_rows_for,
    validate_slide_id,
)
from momkd.errors import DataError, IngestError, MomkdError, StoreError

logger = logging.getLogger(__name__)

__all__ = ["SourceFile", "discover_sources", "grid_coords", "ingest", "read_source"]

H5_SUFFIXES = (".h5", ".hdf5")
PT_SUFFIXES = (".pt", ".pth")
FEATURE_KEYS = ("features", "feats")
#: Minimum seconds between two header commits while ingesting.
COMMIT_INTERVAL_S = 0.5


@dataclass(frozen=True)
class SourceFile:
    """One feature file to ingest.

    Attributes
    ----------
    slide_id : str
        The file stem.
    path : Path
        The features file.
    coords_path : Path or None
        For a ``.pt`` tensor: the ``.h5`` that holds its coordinates, if one was found.
    """

    slide_id: str
    path: Path
    coords_path: Path | None = None


@dataclass
class _Discovery:
    sources: list[SourceFile]
    duplicates: list[tuple[Path, str]] = field(default_factory=list)


def _feature_files(folder: Path) -> list[Path]:
    out = []
    for entry in folder.iterdir():
        if entry.name.startswith(".") or not entry.is_file():
            continue
        if entry.suffix.lower() in H5_SUFFIXES + PT_SUFFIXES:
            out.append(entry)
    return sorted(out)


def _discover(src: Path) -> _Discovery:
    if not src.is_dir():
        raise IngestError(f"source {src}: not a directory")
    files = _feature_files(src)
    if not files and (src / "h5_files").is_dir():
        src = src / "h5_files"
        files = _feature_files(src)
    pt_stems = {f.stem for f in files if f.suffix.lower() in PT_SUFFIXES}
    by_stem: dict[str, list[SourceFile]] = {}
    for f in files:
        is_pt = f.suffix.lower() in PT_SUFFIXES
        if not is_pt and f.stem in pt_stems:
            continue  # the coordinates of a .pt tensor
        coords_path = None
        if is_pt:
            for cand in (
                *(src.parent / "h5_files" / f"{f.stem}{s}" for s in H5_SUFFIXES),
                *(src / f"{f.stem}{s}" for s in H5_SUFFIXES),
            ):
                if cand.is_file():
                    coords_path = cand
                    break
        by_stem.setdefault(f.stem, []).append(SourceFile(f.stem, f, coords_path))
    sources: list[SourceFile] = []
    duplicates: list[tuple[Path, str]] = []
    for stem in sorted(by_stem):
        group = by_stem[stem]
        sources.append(group[0])
        for dup in group[1:]:
            duplicates.append(
                (dup.path, f"duplicate slide id {stem!r} (also {group[0].path.name})")
            )
    return _Discovery(sources, duplicates)


def discover_sources(src: str | os.PathLike[str]) -> list[SourceFile]:
    """List the feature files of a source folder in ingest order (see the module docstring).

    Raises
    ------
    IngestError
        If ``src`` is not a folder, or two files have the same stem (naming both).
    """
    found = _discover(Path(src))
    if found.duplicates:
        path, why = found.duplicates[0]
        raise IngestError(f"{path}: {why}")
    return found.sources


# ------------------------------------------------------------------------------------------- reading


def _squeeze_leading(arr: np.ndarray, ndim: int) -> np.ndarray:
    if arr.ndim == ndim + 1 and arr.shape[0] == 1:
        return arr[0]
    return arr


def _json_scalar(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, (str, int, float, bool)) or value is None:
        if isinstance(value, float) and not np.isfinite(value):
            return None
        return value
    return None


def _h5_attrs(obj: Any) -> dict[str, Any]:
    out = {}
    for k, v in obj.attrs.items():
        val = _json_scalar(v)
        if val is not None:
            out[str(k)] = val
    return out


def _read_h5(path: Path, key: str) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    import h5py

    keys = [key] + [k for k in FEATURE_KEYS if k != key]
    with h5py.File(path, "r") as fh:
        name = next((k for k in keys if k in fh), None)
        if name is None:
            raise IngestError(
                f"{path}: no features dataset (looked for {', '.join(map(repr, keys))})"
            )
        ds = fh[name]
        if not isinstance(ds, h5py.Dataset):
            raise IngestError(f"{path}: {name!r} is not a dataset")
        feats = np.asarray(ds[()])
        coords = None
        attrs: dict[str, Any] = {}
        if "coords" in fh and isinstance(fh["coords"], h5py.Dataset):
            coords = np.asarray(fh["coords"][()])
            attrs = _h5_attrs(fh["coords"])
    return feats, coords, attrs


def _read_h5_coords(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    import h5py

    with h5py.File(path, "r") as fh:
        if "coords" not in fh or not isinstance(fh["coords"], h5py.Dataset):
            raise IngestError(f"{path}: no 'coords' dataset")
        return np.asarray(fh["coords"][()]), _h5_attrs(fh["coords"])


def _tensor_to_numpy(obj: Any, what: str, path: Path) -> np.ndarray:
    import torch

    if isinstance(obj, np.ndarray):
        return obj
    if not isinstance(obj, torch.Tensor):
        raise IngestError(f"{path}: {what} is a {type(obj).__name__}, expected a tensor")
    t = obj.detach().cpu()
    if t.dtype in (torch.bfloat16,):
        t = t.float()
    return t.numpy()


def _read_pt(
    src: SourceFile, key: str, allow_missing_coords: bool = False
) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    import torch

    path = src.path
    obj = torch.load(path, map_location="cpu", weights_only=True)
    coords = None
    attrs: dict[str, Any] = {}
    if isinstance(obj, Mapping):
        keys = [key] + [k for k in FEATURE_KEYS if k != key]
        name = next((k for k in keys if k in obj), None)
        if name is None:
            raise IngestError(f"{path}: dict without a features entry (looked for {keys})")
        feats = _tensor_to_numpy(obj[name], repr(name), path)
        if "coords" in obj:
            coords = _tensor_to_numpy(obj["coords"], "'coords'", path)
    else:
        feats = _tensor_to_numpy(obj, "the content", path)
    if coords is None:
        if src.coords_path is None:
            if allow_missing_coords:
                return feats, None, attrs
            raise IngestError(
                f"{path}: no coordinates (no 'coords' entry and no {path.stem}.h5 in ../h5_files/ "
                "or the same folder)"
            )
        coords, attrs = _read_h5_coords(src.coords_path)
    return feats, coords, attrs


def grid_coords(n: int) -> np.ndarray:
    """Stand-in coordinates for ``n`` patches without any: a square grid in row order.

    Row ``i`` goes to ``(x, y) = (i % W, i // W)`` with ``W = ceil(sqrt(n))``.

    Returns
    -------
    np.ndarray, int64, shape (n, 2)
    """
    width = max(1, math.isqrt(max(n - 1, 0)) + 1)
    i = np.arange(n, dtype=np.int64)
    return np.stack([i % width, i // width], axis=1)


def read_source(
    src: SourceFile, key: str = "features", allow_missing_coords: bool = False
) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """Read one feature file.

    Parameters
    ----------
    src : SourceFile
    key : str
        Features dataset name.
    allow_missing_coords : bool
        Return ``None`` as ``coords`` for a file without coordinates instead of raising.

    Returns
    -------
    features : np.ndarray, shape (P, D), as stored in the file
    coords : np.ndarray, shape (P, 2), or None
        None only for a file without coordinates when ``allow_missing_coords``.
    attrs : dict
        JSON-able attributes of the coords dataset (TRIDENT/CLAM patching metadata).

    Raises
    ------
    IngestError
        Unreadable file, missing dataset or coordinates; the message names the file.
    """
    suffix = src.path.suffix.lower()
    try:
        if suffix in PT_SUFFIXES:
            feats, coords, attrs = _read_pt(src, key, allow_missing_coords)
        else:
            feats, coords, attrs = _read_h5(src.path, key)
    except MomkdError:
        raise
    except Exception as exc:  # noqa: BLE001 - h5py / torch raise many types for unreadable files
        raise IngestError(f"{src.path}: cannot read ({describe_error(exc)})") from None
    if coords is None:
        if allow_missing_coords:
            return _squeeze_leading(feats, 2), None, attrs
        raise IngestError(
            f"{src.path}: no 'coords' dataset (pass --no-coords to lay the rows on a grid)"
        )
    return _squeeze_leading(feats, 2), _squeeze_leading(coords, 2), attrs


def _load(
    src: SourceFile, key: str, dtype: str, allow_grid: bool = False
) -> tuple[np.ndarray, np.ndarray, dict[str, Any], int, bool]:
    """Worker: read, validate and convert one file (runs on the thread pool).

    The last item is true when the file had no coordinates and got :func:`grid_coords`.
    """
    validate_slide_id(src.slide_id, str(src.path))
    feats, coords, attrs = read_source(src, key, allow_missing_coords=allow_grid)
    gridded = coords is None
    if coords is None:
        # a malformed features array is reported by prepare_bag below
        coords = grid_coords(int(feats.shape[0]) if np.ndim(feats) == 2 else 0)
    feats16, coords32 = prepare_bag(feats, coords, dtype=dtype, name=str(src.path))
    size = src.path.stat().st_size
    return feats16, coords32, attrs, size, gridded


# -------------------------------------------------------------------------------------------- ingest


def _fingerprint(sources: list[SourceFile], key: str, dtype: str) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"key": key, "dtype": dtype}).encode())
    for s in sources:
        h.update(json.dumps([s.slide_id, s.path.name, s.path.stat().st_size]).encode())
    return h.hexdigest()


def _header_hints(attrs: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "patch_size_level0" in attrs:
        out["patch_size"] = attrs["patch_size_level0"]
    elif "patch_size" in attrs and attrs.get("patch_level", 0) == 0:
        out["patch_size"] = attrs["patch_size"]
    for k in ("target_magnification", "magnification"):
        if k in attrs:
            out["magnification"] = attrs[k]
            break
    return out


def _initial_attrs(
    file_attrs: Mapping[str, Any], attrs: Mapping[str, Any] | None
) -> dict[str, Any]:
    """Header keys of a new store: hints from the first file's coordinate attributes, the caller's
    ``attrs``, and ``provenance.source_attrs`` (those attributes). They are in the header from its
    first commit on, so a resumed ingest finishes with the same provenance as an uninterrupted one.
    """
    out = {**_header_hints(file_attrs), **dict(attrs or {})}
    provenance = out.get("provenance")
    if file_attrs and (provenance is None or isinstance(provenance, Mapping)):
        out["provenance"] = {"source_attrs": dict(file_attrs), **dict(provenance or {})}
    return out


def _version() -> str:
    try:
        from momkd._core import __version__

        return str(__version__)
    except Exception:  # noqa: BLE001  # pragma: no cover
        return "unknown"


def _ordered_results(
    pool: ThreadPoolExecutor,
    todo: Iterable[SourceFile],
    key: str,
    dtype: str,
    window: int,
    allow_grid: bool = False,
) -> Iterable[tuple[SourceFile, Future[Any]]]:
    pending: deque[tuple[SourceFile, Future[Any]]] = deque()
    for src in todo:
        pending.append((src, pool.submit(_load, src, key, dtype, allow_grid)))
        if len(pending) >= window:
            yield pending.popleft()
    while pending:
        yield pending.popleft()


def ingest(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    key: str = "features",
    dtype: str = "float16",
    threads: int | None = None,
    chunk_rows: int | None = None,
    codec: str = "lz4",
    skip_bad: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    attrs: Mapping[str, Any] | None = None,
    grid_coords_ok: bool = False,
    shard_mb: float | None = None,
) -> dict[str, Any]:
    """Ingest a folder of ``.h5`` / ``.pt`` feature files into a cohort store.

    Parameters
    ----------
    src : path
        Folder of feature files (see the module docstring).
    out : path
        Store to write (``*.zarr``). An incomplete store from an interrupted ingest of the same
        files and settings is resumed; a complete one is an error unless ``overwrite``.
    key : str
        Features dataset name (``features`` or ``feats``; the other is tried as a fallback).
    dtype : {"float16", "float32"}
        Storage type (float16 conversion is overflow-checked).
    threads : int, optional
        Reader threads (default ``min(8, os.cpu_count())``).
    chunk_rows : int, optional
        Rows per chunk (default about 1.5 MiB per feature chunk; a resumed store keeps its own).
    codec : {"lz4", "zstd", "none"}
        Feature compression (see :class:`~momkd.data.store_writer.StoreWriter`).
    shard_mb : float, optional
        Write a sharded store (format version 1.1): ``features`` shards of about this many MiB
        (decoded; 64-256 suit HPC file systems and object stores), ``coords`` sharded alike.
        Resuming an interrupted ingest needs the same value (or none again for an unsharded
        store), as it needs the same ``codec``.
    skip_bad : bool
        Log and count a bad file and go on, instead of stopping at it.
    overwrite : bool
        Replace an existing store at ``out``.
    progress : bool
        Show a tqdm progress bar.
    attrs : mapping, optional
        Extra header keys (``encoder``, ``magnification``, ``patch_size``, ...).
    grid_coords_ok : bool
        Accept files without coordinates and lay their rows on a grid (``--no-coords``; see the
        module docstring). One warning is logged; the slides are listed in the header's
        ``grid_coords``.

    Returns
    -------
    dict
        ``slides_written`` (this run), ``slides_resumed`` (already in the store), ``slides_skipped``
        (bad files this run) and ``skipped`` (file and reason), ``slides_total``, ``patches``
        (store total), ``patches_written`` (this run), ``feature_dim``, ``dtype``, ``chunk_rows``,
        ``slides_grid_coords`` (slides of the store whose coordinates are a stand-in grid),
        ``bytes_on_disk``, ``bytes_decoded`` (the decoded size of the stored arrays, as
        :func:`momkd.data.info.describe` reports it), ``seconds``, ``mb_per_s`` (source bytes read
        this run per second), ``out``, ``source``.

    Raises
    ------
    IngestError
        Bad source folder, bad file (unless ``skip_bad``), an ``out`` that is complete or was
        started from other files or settings, or nothing to ingest; the message names the file.
    DataError
        A file with NaN/Inf, an empty bag, a wrong shape or feature dim (unless ``skip_bad``).
    """
    t0 = time.perf_counter()
    src_path, out_path = Path(src), Path(out)
    if dtype not in FEATURE_DTYPES:
        raise IngestError(
            f"ingest {out_path}: dtype must be one of {FEATURE_DTYPES}, got {dtype!r}"
        )
    if key not in FEATURE_KEYS:
        logger.info("using features dataset %r (fallback %r)", key, FEATURE_KEYS[0])
    if threads is None:
        threads = min(8, os.cpu_count() or 1)
    if threads < 1:
        raise IngestError(f"ingest {out_path}: threads must be >= 1, got {threads}")
    found = _discover(src_path)
    sources = found.sources
    skipped: list[dict[str, str]] = []
    for path, why in found.duplicates:
        if not skip_bad:
            raise IngestError(f"{path}: {why}")
        logger.warning("skipping %s: %s", path, why)
        skipped.append({"file": str(path), "error": why})
    if not sources:
        raise IngestError(f"source {src_path}: no .h5 or .pt feature files")
    fingerprint = _fingerprint(sources, key, dtype)
    meta = {
        "fingerprint": fingerprint,
        "source": str(src_path.resolve()),
        "key": key,
        "n_sources": len(sources),
    }

    if shard_mb is not None and not shard_mb > 0:
        raise IngestError(f"ingest {out_path}: shard_mb must be > 0, got {shard_mb!r}")
    writer = _open_existing(out_path, meta, dtype, chunk_rows, overwrite, codec, shard_mb)
    fresh_overwrite = overwrite or (out_path.exists() and writer is None)
    resumed = writer.resumed_slides if writer is not None else 0
    todo = sources
    previously_skipped = 0
    if writer is not None:
        todo, previously_skipped = _remaining(writer, sources, out_path)
        skipped_before = writer.ingest_meta.get("skipped", [])
    else:
        skipped_before = []

    from tqdm.auto import tqdm

    bar = tqdm(
        total=len(sources),
        initial=len(sources) - len(todo),
        disable=not progress,
        unit="slide",
        desc=f"ingest {out_path.name}",
        dynamic_ncols=True,
    )
    written = patches_written = bytes_read = 0
    gridded: list[str] = []
    if writer is not None:  # resuming: keep the committed slides laid on a grid earlier
        gridded = [s for s in writer.attrs.get("grid_coords") or [] if s in writer]
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="momkd-ingest")
    try:
        for source, fut in _ordered_results(
            pool, todo, key, dtype, window=2 * threads, allow_grid=grid_coords_ok
        ):
            try:
                feats, coords, file_attrs, size, on_grid = fut.result()
                if writer is not None and feats.shape[1] != writer.feature_dim:
                    raise DataError(
                        f"{source.path}: feature dim {feats.shape[1]} does not match the store's "
                        f"{writer.feature_dim}"
                    )
            except (MomkdError, ValueError) as exc:
                if not isinstance(exc, MomkdError):
                    exc = IngestError(f"{source.path}: {describe_error(exc)}")
                if not skip_bad:
                    raise exc from None
                logger.warning("skipping %s", exc)
                skipped.append({"file": str(source.path), "error": str(exc)})
                if writer is not None:
                    writer.update_ingest_meta({"skipped": skipped_before + skipped})
                bar.update(1)
                continue
            if writer is None:
                header_attrs = _initial_attrs(file_attrs, attrs)
                rows = chunk_rows or default_chunk_rows(feats.shape[1], dtype)
                writer = StoreWriter(
                    out_path,
                    feats.shape[1],
                    dtype=dtype,
                    chunk_rows=rows,
                    codec=codec,
                    shard_rows=None
                    if shard_mb is None
                    else shard_rows_for(shard_mb, feats.shape[1], rows, dtype),
                    attrs=header_attrs,
                    overwrite=fresh_overwrite,
                    ingest_meta={**meta, "skipped": skipped_before + skipped},
                    commit_interval=COMMIT_INTERVAL_S,
                )
            if on_grid:
                if not gridded:
                    logger.warning(
                        "%s: no patch coordinates; laying the rows on a grid (--no-coords). The "
                        "k-NN patch graph of such slides is arbitrary (further files without "
                        "coordinates are only counted)",
                        source.path,
                    )
                gridded.append(source.slide_id)
                writer.update_attrs({"grid_coords": list(gridded)})
            writer.append_prepared(source.slide_id, feats, coords)
            written += 1
            patches_written += feats.shape[0]
            bytes_read += size
            bar.update(1)
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
        if writer is not None and not writer.closed:
            try:
                writer.commit()
            except Exception:  # keep the original error
                logger.exception("ingest %s: commit after an error failed", out_path)
        raise
    pool.shutdown(wait=True)
    bar.close()

    if writer is None or len(writer) == 0:
        raise IngestError(
            f"source {src_path}: no slide could be ingested ({len(skipped)} bad files)"
        )
    provenance = dict(writer.attrs.get("provenance") or {})
    provenance.update(
        {
            "source": meta["source"],
            "created_by": f"momkd {_version()}",
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "tool": "momkd ingest",
            "key": key,
            "n_source_files": len(sources),
            "skipped": skipped_before + skipped,
        }
    )
    extra: dict[str, Any] = {"provenance": provenance}
    if gridded:
        extra["grid_coords"] = gridded
    writer.update_attrs(extra)
    writer.close()

    seconds = time.perf_counter() - t0
    n_patches = writer.n_patches
    summary = {
        "out": str(out_path),
        "source": str(src_path),
        "slides_written": written,
        "slides_resumed": resumed,
        "slides_skipped": len(skipped),
        "slides_skipped_before": previously_skipped,
        "skipped": skipped,
        "slides_total": len(writer),
        "patches": n_patches,
        "patches_written": patches_written,
        "feature_dim": writer.feature_dim,
        "dtype": writer.dtype,
        "chunk_rows": writer.chunk_rows,
        "slides_grid_coords": len(gridded),
        "bytes_on_disk": dir_bytes(out_path),
        "bytes_decoded": decoded_bytes(out_path),
        "seconds": round(seconds, 3),
        "mb_per_s": round(bytes_read / 1e6 / seconds, 2) if seconds > 0 else None,
    }
    logger.info(
        "ingested %s: %d written, %d resumed, %d skipped, %d patches in %.1f s",
        out_path,
        written,
        resumed,
        len(skipped),
        n_patches,
        seconds,
    )
    return summary


def _open_existing(
    out: Path,
    meta: Mapping[str, Any],
    dtype: str,
    chunk_rows: int | None,
    overwrite: bool,
    codec: str = "lz4",
    shard_mb: float | None = None,
) -> StoreWriter | None:
    """Resume ``out`` if it is an interrupted ingest of the same sources and settings; None to
    start afresh."""
    if not (out.exists() or out.is_symlink()):
        return None
    if overwrite:
        return None
    if not out.is_dir():
        raise IngestError(f"output {out}: exists and is not a directory")
    if not (out / "zarr.json").exists():
        if any(out.iterdir()) and not _only_store_remains(out):
            raise IngestError(f"output {out}: directory exists and is not a cohort store")
        return None  # empty, or the remains of a store whose creation was interrupted
    try:
        header = read_header(out)
    except StoreError as exc:
        raise IngestError(f"output {out}: exists and is not a cohort store ({exc})") from None
    if header.get("complete") is True:
        raise IngestError(
            f"output {out}: already exists (a complete store); pass --overwrite to replace it"
        )
    raw_state = header.get("ingest")
    state: dict[str, Any] = raw_state if isinstance(raw_state, dict) else {}
    old = state.get("meta") or {}
    if old.get("fingerprint") != meta["fingerprint"]:
        raise IngestError(
            f"output {out}: an interrupted ingest from other source files or settings "
            f"(source {old.get('source')!r}, key {old.get('key')!r}, dtype {state.get('dtype')!r}); "
            "rerun with the same arguments or pass --overwrite"
        )
    if state.get("dtype") != dtype:
        raise IngestError(f"output {out}: the interrupted ingest used dtype {state.get('dtype')!r}")
    if state.get("codec", "zstd") != codec:
        raise IngestError(
            f"output {out}: the interrupted ingest used codec {state.get('codec', 'zstd')!r}, "
            f"not {codec!r}"
        )
    if chunk_rows is not None and state.get("chunk_rows") != chunk_rows:
        raise IngestError(
            f"output {out}: the interrupted ingest used chunk_rows {state.get('chunk_rows')!r}, "
            f"not {chunk_rows}"
        )
    recorded = state.get("shard_rows")
    try:
        wanted = (
            None
            if shard_mb is None
            else shard_rows_for(
                shard_mb, int(state["feature_dim"]), int(state["chunk_rows"]), dtype
            )
        )
    except (KeyError, TypeError, ValueError):
        wanted = recorded  # a malformed state: StoreWriter.resume below says what is wrong
    if wanted != recorded:
        asked = "no --shard-mb" if shard_mb is None else f"--shard-mb {shard_mb:g}"
        raise IngestError(
            f"output {out}: the interrupted ingest wrote {_layout(recorded)}; this run asks for "
            f"{_layout(wanted)} ({asked}). Rerun with the interrupted ingest's --shard-mb or "
            "pass --overwrite"
        )
    try:
        return StoreWriter.resume(out, commit_interval=COMMIT_INTERVAL_S)
    except StoreError as exc:
        raise IngestError(f"output {out}: cannot resume ({exc}); pass --overwrite") from None


def _layout(shard_rows: Any) -> str:
    return "an unsharded store" if shard_rows is None else f"shards of {shard_rows} rows"


def _only_store_remains(path: Path) -> bool:
    allowed = {"features", "coords", "offsets"}
    return all(e.name in allowed or e.name.startswith("zarr.json.") for e in path.iterdir())


def _remaining(
    writer: StoreWriter, sources: list[SourceFile], out: Path
) -> tuple[list[SourceFile], int]:
    """Sources after the last committed slide, and how many before it were skipped earlier."""
    pos = {s.slide_id: i for i, s in enumerate(sources)}
    last = -1
    for sid in writer.slide_ids:
        i = pos.get(sid)
        if i is None or i <= last:
            raise IngestError(
                f"output {out}: committed slide {sid!r} is not in the source list in order; "
                "pass --overwrite to start again"
            )
        last = i
    return sources[last + 1 :], (last + 1) - len(writer.slide_ids)
