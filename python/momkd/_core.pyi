"""Type stub of the Rust extension ``momkd._core`` (source: ``rust/``).

Reading the cohort store (docs/FORMAT.md), the prefetching bag loader, the k-NN graph on patch
coordinates and checked float conversions. Public code should use :mod:`momkd.errors`,
:class:`momkd.CohortStore` and :class:`momkd.BagLoader`, which build on these.
"""

import os
from collections.abc import Sequence
from typing import final

import numpy as np
import numpy.typing as npt

__all__ = [
    "BagPrefetcher",
    "ConfigError",
    "DataError",
    "IngestError",
    "MomkdError",
    "SlideNotFoundError",
    "Store",
    "StoreError",
    "__version__",
    "bag_rows",
    "check_finite",
    "knn_graph",
    "to_float16_checked",
]

__version__: str

class MomkdError(Exception):
    """Base class of every momkd error."""

class StoreError(MomkdError):
    """A bad, corrupt, incomplete or unsupported cohort store."""

class SlideNotFoundError(MomkdError, KeyError):
    """A slide id or index that the store does not hold."""

class DataError(MomkdError, ValueError):
    """Invalid data: NaN/Inf, empty bag, bad shapes, duplicate ids, bad labels, missing expression."""

class IngestError(MomkdError):
    """Ingesting feature files into a cohort store failed."""

class ConfigError(MomkdError, ValueError):
    """An invalid configuration value or argument."""

@final
class Store:
    """An open, validated cohort store (docs/FORMAT.md)."""

    @staticmethod
    def open(path: str | os.PathLike[str], *, num_threads: int | None = None) -> Store:
        """Open and validate the store at ``path``.

        Parameters
        ----------
        path
            Directory of the Zarr v3 cohort store.
        num_threads
            Size of the thread pool that :meth:`read` decodes chunks on (default: CPU count,
            at most 4). The pool is created on the first read.

        Raises
        ------
        StoreError
            Any check of FORMAT.md "What opening a store checks" fails; the message names the
            store and the offending key or array.
        ConfigError
            ``num_threads`` is 0 or negative.
        """

    @property
    def path(self) -> str:
        """The path the store was opened with."""

    @property
    def slide_ids(self) -> list[str]:
        """Slide ids in storage order."""

    @property
    def feature_dim(self) -> int:
        """Feature dimension ``D``."""

    @property
    def n_patches(self) -> int:
        """Total number of patches ``N`` over all slides."""

    @property
    def dtype(self) -> str:
        """On-disk feature data type: ``"float16"`` or ``"float32"``."""

    @property
    def chunk_rows(self) -> int:
        """Rows per chunk of ``features`` (per inner chunk of a sharded store)."""

    @property
    def shard_rows(self) -> int | None:
        """Rows per shard of ``features`` in a sharded (format version 1.1) store, else None."""

    @property
    def header_json(self) -> str:
        """The root ``attributes["momkd"]`` as JSON text."""

    def __len__(self) -> int:
        """Number of slides ``S``."""

    def index_of(self, slide_id: str) -> int:
        """Storage index of ``slide_id``.

        Raises
        ------
        SlideNotFoundError
            The store has no such slide (the message names the store and the id).
        """

    def file_ranges(self, index: int) -> list[tuple[str, int, int]]:
        """The file byte ranges ``(path, offset, length)`` that reading slide ``index`` touches
        (length ``0``: to the end of the file), one per chunk file or inner chunk of a shard: what
        the loader's read-ahead threads request. Empty for an index outside the store."""

    def offsets(self) -> npt.NDArray[np.int64]:
        """CSR offsets, int64 ``(S + 1,)``: slide ``i`` owns rows ``offsets[i]:offsets[i + 1]``."""

    def read(
        self,
        index: int,
        max_patches: int | None = None,
        seed: int = 0,
        epoch: int = 0,
        dtype: str = "float32",
    ) -> tuple[npt.NDArray[np.float32] | npt.NDArray[np.float16], npt.NDArray[np.int64]]:
        """Read slide ``index``. The GIL is released during I/O and decoding.

        Parameters
        ----------
        index
            Slide index in storage order.
        max_patches
            If smaller than the slide's patch count ``P``, return a uniformly random subset of
            ``max_patches`` rows drawn without replacement, kept in storage order and
            deterministic in ``(seed, epoch, index)``.
        seed, epoch
            Non-negative integers selecting the subsample.
        dtype
            ``"float32"`` or ``"float16"`` (a float32 store is converted with an overflow check).

        Returns
        -------
        features
            ``dtype`` ``(P, D)``, C-contiguous.
        coords
            int64 ``(P, 2)``: level-0 ``x, y`` of each patch.

        Raises
        ------
        SlideNotFoundError
            ``index`` is out of range.
        StoreError
            A chunk is missing, truncated or corrupt (the message names store, slide and chunk).
        DataError
            A feature value is NaN or infinite (the message names store, slide, row and chunk).
        ConfigError
            ``max_patches`` is 0 or negative, or ``dtype`` is unknown.
        """

@final
class BagPrefetcher:
    """Iterator over bags in the order of ``indices``, decoded ahead of the consumer.

    Up to ``prefetch`` bags are read (and their k-NN graphs built) on a pool of ``num_threads``
    threads owned by this object, with the GIL released. Dropping the iterator early cancels the
    queued work. With ``readahead > 0``, ``io_threads`` separate I/O threads ask the kernel to read
    the chunk files of that many further bags (``posix_fadvise(WILLNEED)``), so a cold page cache
    is read with several requests in flight.
    """

    def __new__(
        cls,
        store: Store,
        indices: Sequence[int],
        *,
        num_threads: int = 2,
        prefetch: int = 4,
        max_patches: int | None = None,
        seed: int = 0,
        epoch: int = 0,
        knn_k: int | None = 8,
        dtype: str = "float32",
        readahead: int = 0,
        io_threads: int = 8,
    ) -> BagPrefetcher:
        """Start reading the first bags.

        Raises
        ------
        SlideNotFoundError
            An index is out of range.
        ConfigError
            ``num_threads``, ``prefetch`` or ``max_patches`` is below 1, or ``knn_k`` is negative.
        """

    def __iter__(self) -> BagPrefetcher: ...
    def __next__(
        self,
    ) -> tuple[
        int,
        npt.NDArray[np.float32] | npt.NDArray[np.float16],
        npt.NDArray[np.int64],
        npt.NDArray[np.int64] | None,
    ]:
        """The next bag: ``(slide index, features (P, D) float32 or dtype, coords (P, 2) int64,
        edge_index (2, E) int64 or None when knn_k is None)``.

        Bags come in exactly the order of ``indices``. A bag's error is raised when that bag is
        reached; the iteration then stops.
        """

    def __len__(self) -> int:
        """Number of bags the iteration yields."""

def bag_rows(
    n: int, max_patches: int | None, seed: int, epoch: int, index: int
) -> npt.NDArray[np.int64] | None:
    """Rows (increasing) of a bag of ``n`` rows that a read with ``max_patches`` keeps, or None
    when the bag is kept whole; the same rows as :meth:`Store.read` for ``(seed, epoch, index)``.
    """

def knn_graph(coords: npt.NDArray[np.generic], k: int = 8) -> npt.NDArray[np.int64]:
    """Exact k-nearest-neighbour graph on patch coordinates (docs/METHOD.md §2.2).

    Parameters
    ----------
    coords
        ``(P, 2)`` int32, int64, float32 or float64.
    k
        Neighbours per patch; each patch gets ``min(k, P - 1)``.

    Returns
    -------
    edge_index
        int64 ``(2, P * min(k, P - 1))``. For each patch ``i`` in order, edges ``i -> j`` to its
        nearest patches ``j != i`` by Euclidean distance, nearest first, ties broken by the lower
        index ``j``. Row 0 holds the sources ``i``, row 1 the neighbours ``j``. ``P <= 1`` gives
        shape ``(2, 0)``.

    Raises
    ------
    DataError
        Wrong shape or dtype, or a NaN/Inf coordinate (the message names the row).
    ConfigError
        ``k`` is negative.
    """

def to_float16_checked(x: npt.NDArray[np.floating], name: str = "") -> npt.NDArray[np.float16]:
    """Convert float32/float64 ``(P, D)`` to float16 ``(P, D)`` (round to nearest even).

    The GIL is released during the conversion.

    Raises
    ------
    DataError
        Naming ``name`` and the first row holding a NaN/Inf or a value with ``|x| > 65504``.
    """

def check_finite(x: npt.NDArray[np.floating], name: str = "") -> None:
    """Check that a float16/float32 ``(P, D)`` array holds no NaN/Inf.

    Raises
    ------
    DataError
        Naming ``name`` and the first row with a non-finite value.
    """
