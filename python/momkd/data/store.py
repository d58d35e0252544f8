"""Reading a cohort store: a Zarr v3 hierarchy of patch features and coordinates (``docs/FORMAT.md``).

:class:`CohortStore` opens a finished store through the Rust reader (``momkd._core.Store``), which
validates it and decodes slides with the GIL released. :func:`read_header` reads the header of any
store, complete or not, without validating it.

The store is written by :class:`momkd.data.store_writer.StoreWriter`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from momkd import _core
from momkd.errors import ConfigError, SlideNotFoundError, StoreError

logger = logging.getLogger(__name__)

__all__ = [
    "COUNT_LIMIT",
    "CohortStore",
    "SlideArrays",
    "check_count",
    "describe_error",
    "read_header",
    "read_root_meta",
]


#: Exclusive upper bound of counts, seeds and epochs handed to the Rust core (a signed 64-bit int).
COUNT_LIMIT = 2**63


def check_count(name: str, value: Any, minimum: int, where: str = "") -> int:
    """Check an integer option (``max_patches``, an epoch, ...) and return it as ``int``.

    The message is the same wherever the option is given: ``{name} must be an integer, at least
    {minimum} and below 2**63, got {value}``.

    Raises
    ------
    ConfigError
        ``value`` is not an integer (``bool`` is not one) or lies outside ``[minimum, 2**63)``.
    """
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, np.integer))
        or not minimum <= value < COUNT_LIMIT
    ):
        prefix = f"{where}: " if where else ""
        raise ConfigError(
            f"{prefix}{name} must be an integer, at least {minimum} and below 2**63, got {value!r}"
        )
    return int(value)


def describe_error(exc: BaseException) -> str:
    """``Type: first line of the message`` (error messages stay on one line)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def read_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read the momkd header (``attributes["momkd"]`` of the root ``zarr.json``) without validation.

    Raises
    ------
    StoreError
        If the root metadata is missing, not JSON, or has no momkd header.
    """
    meta = read_root_meta(Path(path))
    header = meta.get("attributes", {}).get("momkd")
    if not isinstance(header, dict):
        raise StoreError(f"store {path}: zarr.json has no 'momkd' header attribute")
    return header


def read_root_meta(path: Path) -> dict[str, Any]:
    """The root ``zarr.json`` of the store at ``path`` (Zarr v3 group metadata), unvalidated otherwise.

    Raises
    ------
    StoreError
        If ``path`` is not a directory, or its ``zarr.json`` is missing, not JSON or not a group's.
    """
    meta_path = path / "zarr.json"
    if not path.is_dir():
        raise StoreError(f"store {path}: not a directory")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StoreError(f"store {path}: zarr.json is missing (not a Zarr v3 group)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StoreError(
            f"store {path}: zarr.json is not valid JSON ({describe_error(exc)})"
        ) from None
    if (
        not isinstance(meta, dict)
        or meta.get("zarr_format") != 3
        or meta.get("node_type") != "group"
    ):
        raise StoreError(f"store {path}: zarr.json is not Zarr v3 group metadata")
    return meta


# ---------------------------------------------------------------------------------------------- reader


@dataclass(frozen=True)
class SlideArrays:
    """One slide read from a :class:`CohortStore`.

    Attributes
    ----------
    slide_id : str
    index : int
        Position of the slide in the store.
    features : np.ndarray, float32, shape (P, D)
    coords : np.ndarray, int64, shape (P, 2)
        Level-0 pixel ``(x, y)`` of each patch's top-left corner.
    """

    slide_id: str
    index: int
    features: np.ndarray
    coords: np.ndarray

    @property
    def n_patches(self) -> int:
        """``P``."""
        return int(self.features.shape[0])


class CohortStore:
    """A validated, read-only cohort store (use :meth:`open`).

    Attributes
    ----------
    path : str
    slide_ids : list of str
        In storage order.
    feature_dim : int
    dtype : str
        Storage type of the features (reads return float32 unless asked for float16).
    chunk_rows : int
        Rows per chunk of ``features`` (per inner chunk of a sharded store).
    shard_rows : int or None
        Rows per shard of a sharded (format version 1.1) store, else ``None``.
    header : dict
        The store header (``docs/FORMAT.md``).
    """

    def __init__(self, core: Any) -> None:
        self._core = core
        self.path: str = str(core.path)
        self.slide_ids: list[str] = list(core.slide_ids)
        self.feature_dim: int = int(core.feature_dim)
        self.dtype: str = str(core.dtype)
        self.chunk_rows: int = int(core.chunk_rows)
        shard_rows = getattr(core, "shard_rows", None)
        self.shard_rows: int | None = None if shard_rows is None else int(shard_rows)
        self.n_patches: int = int(core.n_patches)
        header = json.loads(core.header_json)
        if (
            isinstance(header, dict)
            and "format" not in header
            and isinstance(header.get("momkd"), dict)
        ):
            header = header["momkd"]
        self.header: dict[str, Any] = header
        self._index = {sid: i for i, sid in enumerate(self.slide_ids)}
        self._offsets: np.ndarray | None = None

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> CohortStore:
        """Open and validate a store (``docs/FORMAT.md``, "What opening a store checks").

        Raises
        ------
        StoreError
            If the store is missing, malformed or incomplete; the message names the store and the
            offending array or key.
        """
        p = Path(path)
        if not p.is_dir():
            raise StoreError(f"store {p}: no such directory")
        return cls(_core.Store.open(str(p)))

    @property
    def grid_coords(self) -> list[str]:
        """Slides whose coordinates are a stand-in grid (ingested with ``--no-coords``)."""
        ids = self.header.get("grid_coords")
        return [str(s) for s in ids] if isinstance(ids, list) else []

    def warn_grid_coords(self, slide_ids: Iterable[str], user: str) -> int:
        """Log one warning if any of ``slide_ids`` has stand-in grid coordinates.

        Parameters
        ----------
        slide_ids
            The slides about to be used.
        user
            Who relies on the patch graph, for the message (e.g. ``"method momkd"``).

        Returns
        -------
        int
            How many of ``slide_ids`` have grid coordinates.
        """
        grid = set(self.grid_coords)
        hits = [s for s in slide_ids if s in grid] if grid else []
        if hits:
            logger.warning(
                "store %s: %d slides (e.g. %r) have no patch coordinates (ingested with "
                "--no-coords, laid on a grid); the k-NN patch graph used by %s is arbitrary for them",
                self.path,
                len(hits),
                hits[0],
                user,
            )
        return len(hits)

    @property
    def core(self) -> Any:
        """The underlying ``momkd._core.Store``."""
        return self._core

    @property
    def offsets(self) -> np.ndarray:
        """np.ndarray, int64, shape (S + 1,): slide ``i`` owns rows ``offsets[i]:offsets[i+1]``."""
        if self._offsets is None:
            self._offsets = np.asarray(self._core.offsets(), dtype=np.int64)
        return self._offsets

    @property
    def bag_sizes(self) -> np.ndarray:
        """np.ndarray, int64, shape (S,): patches per slide."""
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.slide_ids)

    def __contains__(self, slide_id: object) -> bool:
        return slide_id in self._index

    def __iter__(self) -> Iterator[str]:
        return iter(self.slide_ids)

    def __repr__(self) -> str:
        return (
            f"CohortStore({self.path!r}, slides={len(self)}, patches={self.n_patches}, "
            f"D={self.feature_dim}, dtype={self.dtype})"
        )

    def index_of(self, slide_id: str) -> int:
        """Position of ``slide_id`` in the store.

        Raises
        ------
        SlideNotFoundError
            Naming the store and the id.
        """
        try:
            return self._index[slide_id]
        except (KeyError, TypeError):
            raise SlideNotFoundError(f"store {self.path}: slide {slide_id!r} not found") from None

    def read(
        self,
        slide_id: str,
        *,
        max_patches: int | None = None,
        seed: int = 0,
        epoch: int = 0,
        dtype: str = "float32",
    ) -> SlideArrays:
        """Read one slide, decoded to float32 (or float16).

        Parameters
        ----------
        slide_id : str
        max_patches : int, optional
            Keep a random subset of at most this many rows (deterministic per seed, epoch, slide).
        dtype : {"float32", "float16"}
            Type of the returned features.

        Returns
        -------
        SlideArrays
            ``features`` ``dtype`` (P, D), ``coords`` int64 (P, 2).

        Raises
        ------
        SlideNotFoundError
            Unknown id.
        ConfigError
            ``max_patches`` is not an integer in ``[1, 2**63)``.
        StoreError
            A missing, truncated or corrupt chunk, or non-finite features (names store, slide, chunk).
        """
        idx = self.index_of(slide_id)
        if max_patches is not None:
            max_patches = check_count("max_patches", max_patches, 1, f"store {self.path}")
        feats, coords = self._core.read(idx, max_patches, seed, epoch, dtype)
        return SlideArrays(slide_id=slide_id, index=idx, features=feats, coords=coords)

    def __getitem__(self, slide_id: str) -> SlideArrays:
        return self.read(slide_id)
