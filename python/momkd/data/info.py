"""Describe and validate a cohort store (``momkd info``)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from momkd._io import dir_bytes
from momkd.data.store import CohortStore, read_header
from momkd.errors import MomkdError

logger = logging.getLogger(__name__)

__all__ = ["decoded_bytes", "describe", "format_info"]

_ARRAYS = ("features", "coords", "offsets")


def _array_meta(path: Path, name: str) -> dict[str, Any] | None:
    try:
        meta = json.loads((path / name / "zarr.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(meta, dict) or meta.get("node_type") != "array":
        return None
    chunks = None
    grid = meta.get("chunk_grid")
    if isinstance(grid, dict):
        chunks = (grid.get("configuration") or {}).get("chunk_shape")
    codecs = []
    for codec in meta.get("codecs") or []:
        if isinstance(codec, dict):
            conf = codec.get("configuration") or {}
            desc = str(codec.get("name"))
            if conf and codec.get("name") != "bytes":
                desc += "(" + ", ".join(f"{k}={v}" for k, v in sorted(conf.items())) + ")"
            codecs.append(desc)
    return {
        "shape": meta.get("shape"),
        "dtype": meta.get("data_type"),
        "chunks": chunks,
        "codecs": codecs,
    }


def _nbytes(meta: dict[str, Any] | None) -> int:
    if not meta or not meta.get("shape") or not meta.get("dtype"):
        return 0
    try:
        return int(np.prod(meta["shape"])) * np.dtype(meta["dtype"]).itemsize
    except TypeError:
        return 0


def decoded_bytes(path: str | os.PathLike[str]) -> int:
    """Decoded size in bytes of a store's arrays as stored (features in the store dtype, coords,
    offsets), from their Zarr metadata. ``momkd ingest`` and ``momkd info`` both report this."""
    p = Path(path)
    return sum(_nbytes(_array_meta(p, name)) for name in _ARRAYS)


def describe(
    path: str | os.PathLike[str], check: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Summarise and validate a cohort store.

    Parameters
    ----------
    path : path
        The store directory.
    check : bool
        Also decode every slide (checksums, sizes, finiteness) and report the first failure.
    progress : bool
        Show a progress bar while checking.

    Returns
    -------
    dict
        ``path``, ``valid`` (bool), ``error`` (first validation error or None), ``complete``,
        ``slides``, ``patches``, ``bag_size`` (``min``/``median``/``max``, or None), ``feature_dim``,
        ``dtype``, ``chunk_rows``, ``arrays`` (shape, dtype, chunks, codecs per array),
        ``bytes_on_disk``, ``bytes_decoded`` (as stored, :func:`decoded_bytes`), ``compression_ratio``, ``header`` (the
        header without ``slide_ids``), ``ingest`` (progress of an unfinished ingest or None),
        ``checked`` (bool) and ``slides_checked``.

    Raises
    ------
    StoreError
        If ``path`` is not a directory holding a Zarr v3 group with a momkd header; every other
        problem is reported in ``valid``/``error``.
    """
    p = Path(path)
    header = read_header(p)
    arrays = {name: _array_meta(p, name) for name in _ARRAYS}
    feats = arrays["features"] or {}
    chunk_rows = (feats.get("chunks") or [None])[0]
    bytes_decoded = sum(_nbytes(m) for m in arrays.values())
    bytes_on_disk = dir_bytes(p)
    info: dict[str, Any] = {
        "path": str(p),
        "valid": False,
        "error": None,
        "complete": header.get("complete") is True,
        "slides": header.get("n_slides"),
        "patches": header.get("n_patches"),
        "bag_size": None,
        "feature_dim": header.get("feature_dim"),
        "dtype": feats.get("dtype"),
        "chunk_rows": chunk_rows,
        "arrays": arrays,
        "bytes_on_disk": bytes_on_disk,
        "bytes_decoded": bytes_decoded,
        "compression_ratio": (bytes_decoded / bytes_on_disk) if bytes_on_disk else None,
        "header": {k: v for k, v in header.items() if k != "slide_ids"},
        "ingest": header.get("ingest") if header.get("complete") is not True else None,
        "checked": False,
        "slides_checked": 0,
    }
    try:
        store = CohortStore.open(p)
    except MomkdError as exc:
        info["error"] = str(exc)
        return info
    sizes = store.bag_sizes
    info.update(
        slides=len(store),
        patches=store.n_patches,
        feature_dim=store.feature_dim,
        dtype=store.dtype,
        chunk_rows=store.chunk_rows,
        bag_size={
            "min": int(sizes.min()) if len(sizes) else None,
            "median": float(np.median(sizes)) if len(sizes) else None,
            "max": int(sizes.max()) if len(sizes) else None,
        },
        valid=True,
    )
    if check:
        info["checked"] = True
        info["slides_checked"], error = _check_all(store, progress)
        if error is not None:
            info["valid"] = False
            info["error"] = error
    return info


def _check_all(store: CohortStore, progress: bool) -> tuple[int, str | None]:
    from tqdm.auto import tqdm

    done = 0
    with tqdm(total=len(store), disable=not progress, unit="slide", desc="check") as bar:
        for sid in store.slide_ids:
            try:
                bag = store.read(sid)
            except MomkdError as exc:
                return done, str(exc)
            if bag.features.shape != (int(store.bag_sizes[bag.index]), store.feature_dim):
                return (
                    done,
                    f"store {store.path}: slide {sid!r} decoded to shape {bag.features.shape}",
                )
            done += 1
            bar.update(1)
    return done, None


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def format_info(d: dict[str, Any]) -> str:
    """Render :func:`describe`'s result as human-readable text."""
    lines: list[str] = []

    def row(label: str, value: object) -> None:
        lines.append(f"{label:<15}{'-' if value is None else value}")

    row("store", d["path"])
    if d.get("valid"):
        checked = f" (all {d['slides_checked']} slides decoded)" if d.get("checked") else ""
        row("status", "valid" + checked)
    else:
        row("status", f"INVALID: {d.get('error')}")
    row("complete", "yes" if d.get("complete") else "no")
    row("slides", d.get("slides"))
    row("patches", d.get("patches"))
    bag = d.get("bag_size")
    if bag:
        row("bag size", f"min {bag['min']}, median {bag['median']:g}, max {bag['max']}")
    row("feature dim", d.get("feature_dim"))
    row("dtype", d.get("dtype"))
    row("chunk rows", d.get("chunk_rows"))
    for name, meta in (d.get("arrays") or {}).items():
        if meta is None:
            row(f"  {name}", "missing or unreadable metadata")
        else:
            row(
                f"  {name}",
                f"shape {meta['shape']}, {meta['dtype']}, chunks {meta['chunks']}, "
                f"codecs {' -> '.join(meta['codecs'])}",
            )
    ratio = d.get("compression_ratio")
    row(
        "size",
        f"{_fmt_bytes(d.get('bytes_on_disk'))} on disk, {_fmt_bytes(d.get('bytes_decoded'))} "
        "decoded" + (f" (ratio {ratio:.2f})" if ratio else ""),
    )
    header = d.get("header") or {}
    for key in ("format", "format_version", "encoder", "magnification", "patch_size"):
        if key in header:
            row(key.replace("_", " "), header[key])
    prov = header.get("provenance")
    if isinstance(prov, dict):
        for key in ("source", "created_by", "created"):
            if key in prov:
                row(key.replace("_", " "), prov[key])
        if prov.get("skipped"):
            row("skipped", f"{len(prov['skipped'])} bad source files at ingest")
    ingest = d.get("ingest")
    if isinstance(ingest, dict):
        row(
            "ingest",
            f"interrupted after {ingest.get('slides_done')} slides ({ingest.get('rows_done')} "
            "rows); rerun the same ingest to resume",
        )
    return "\n".join(lines)
