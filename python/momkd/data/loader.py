"""Iterate over the bags of a cohort store as torch tensors, prefetched by the Rust loader."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from momkd import _core
from momkd.data.store import CohortStore, check_count
from momkd.errors import ConfigError, SlideNotFoundError

if TYPE_CHECKING:
    import torch

    from momkd.data.cache import BagCache

logger = logging.getLogger(__name__)

__all__ = ["FEATURE_OUT_DTYPES", "Bag", "BagLoader", "epoch_order"]

FEATURE_OUT_DTYPES = ("float32", "float16")


@dataclass
class Bag:
    """One slide as model input.

    Attributes
    ----------
    slide_id : str
    index : int
        Position of the slide in the store.
    features : torch.Tensor, float32 (or float16 with ``dtype="float16"``), shape (P, D)
        Shares memory with the buffer the Rust loader filled (no copy; page-locked copy with
        ``pin_memory=True``).
    coords : torch.Tensor, int64, shape (P, 2)
        Level-0 pixel ``(x, y)`` of each patch.
    edge_index : torch.Tensor, int64, shape (2, E), or None
        k-NN graph on ``coords`` (row 0 source, row 1 target); ``None`` when ``knn_k`` is ``None``.
    """

    slide_id: str
    index: int
    features: torch.Tensor
    coords: torch.Tensor
    edge_index: torch.Tensor | None = None

    @property
    def n_patches(self) -> int:
        """``P``."""
        return int(self.features.shape[0])


def epoch_order(n: int, *, shuffle: bool, seed: int, epoch: int) -> np.ndarray:
    """Visiting order of ``n`` items for one epoch.

    Parameters
    ----------
    n : int
    shuffle : bool
        If false, ``arange(n)``.
    seed, epoch : int
        The permutation comes from ``numpy.random.default_rng([seed, epoch])``.

    Returns
    -------
    np.ndarray, int64, shape (n,)
    """
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFFFFFFFFFF, int(epoch)])
    return rng.permutation(n).astype(np.int64)


def _pinned(bag: Bag) -> Bag:
    """``bag`` with its tensors copied to page-locked memory."""
    return Bag(
        slide_id=bag.slide_id,
        index=bag.index,
        features=bag.features.pin_memory(),
        coords=bag.coords.pin_memory(),
        edge_index=None if bag.edge_index is None else bag.edge_index.pin_memory(),
    )


def _check_int(name: str, value: Any, minimum: int) -> int:
    return check_count(name, value, minimum, "BagLoader")


def _check_opt_int(name: str, value: Any, minimum: int) -> int | None:
    return None if value is None else _check_int(name, value, minimum)


class BagLoader:
    """Iterate over slides of a cohort store, yielding :class:`Bag` objects.

    Reading, decoding, patch subsampling and the k-NN graph run in Rust on a thread pool of
    ``num_threads`` with up to ``prefetch`` bags read ahead, in the order below.

    Order per epoch: the given slide order, or (``shuffle=True``) a permutation drawn from
    ``numpy.random.default_rng([seed, epoch])``; then rank ``r`` of ``world_size`` takes
    ``order[r::world_size]``, so every slide is visited exactly once across ranks.
    ``drop_uneven=True`` truncates every rank to ``len(order) // world_size`` slides (equal step
    counts for DDP).

    Epochs: :meth:`set_epoch` fixes the epoch like ``torch.utils.data.DistributedSampler``. If it is
    never called, the epoch starts at 0 and advances by one after each full pass.

    Parameters
    ----------
    store : CohortStore or path
    slide_ids : sequence of str, optional
        Subset (and order) of slides; default all slides in storage order.
    shuffle : bool
    seed : int
    max_patches : int, optional
        Keep at most this many patches per bag (random subset, deterministic per seed, epoch, slide).
    knn_k : int or None
        Neighbours per patch in ``edge_index`` (``min(k, P - 1)``); ``None`` skips the graph.
    num_threads : int, optional
        Reader threads; default ``min(4, os.cpu_count())``.
    prefetch : int
        Bags decoded ahead of the consumer.
    rank, world_size : int
        Shard of this process.
    drop_uneven : bool
    dtype : {"float32", "float16"}
        Type of ``Bag.features``. ``float16`` hands over half the bytes (a float16 store is copied
        as it is; a float32 store is converted with an overflow check); convert on the device.
    pin_memory : bool
        Copy each bag's tensors into page-locked memory so that host-to-GPU copies can run
        asynchronously (``tensor.to(device, non_blocking=True)``). Ignored without CUDA.
    readahead : int, optional
        Bags beyond the ``prefetch`` being decoded whose chunk files the I/O threads ask the
        kernel to read (``posix_fadvise(WILLNEED)``), so that a cold page cache is read with
        several requests in flight whatever ``num_threads`` is. ``0`` turns it off; default
        ``max(8, 2 * prefetch)``. Costs page cache, not process memory.
    io_threads : int
        Threads issuing those requests (reads in flight at once; default 8). On Linux a request
        returns only once its reads are issued, so one thread reads at about a single stream's
        speed; a few keep a disk's queue busy. Idle threads cost nothing.
    cache : BagCache, optional
        A cohort cache of this store (:mod:`momkd.data.cache`): bags it holds are served from host
        or GPU memory; bags it does not hold are read whole, added to it (within its budget) and
        served from it. Subsampling and the graph are applied when serving, so the bags are exactly
        those of an uncached loader. With a device cache, every bag comes on the cache's device.

    Raises
    ------
    SlideNotFoundError
        A requested slide id is not in the store (names the store and the id).
    ConfigError
        Invalid option values.
    """

    def __init__(
        self,
        store: CohortStore | str | os.PathLike[str],
        slide_ids: Sequence[str] | None = None,
        shuffle: bool = False,
        seed: int = 0,
        *,
        max_patches: int | None = None,
        knn_k: int | None = 8,
        num_threads: int | None = None,
        prefetch: int = 4,
        rank: int = 0,
        world_size: int = 1,
        drop_uneven: bool = False,
        dtype: str = "float32",
        pin_memory: bool = False,
        readahead: int | None = None,
        io_threads: int = 8,
        cache: BagCache | None = None,
    ) -> None:
        self.store = store if isinstance(store, CohortStore) else CohortStore.open(store)
        if slide_ids is None:
            self.slide_ids = list(self.store.slide_ids)
        else:
            if isinstance(slide_ids, str):
                raise ConfigError("BagLoader: slide_ids must be a sequence of ids, not one string")
            self.slide_ids = list(slide_ids)
            missing = [s for s in self.slide_ids if s not in self.store]
            if missing:
                more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
                raise SlideNotFoundError(
                    f"store {self.store.path}: slide {missing[0]!r} not found{more}"
                )
        self._indices = np.asarray([self.store.index_of(s) for s in self.slide_ids], dtype=np.int64)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.max_patches = _check_opt_int("max_patches", max_patches, 1)
        self.knn_k = _check_opt_int("knn_k", knn_k, 1)
        if num_threads is None:
            num_threads = min(4, os.cpu_count() or 1)
        self.num_threads = _check_int("num_threads", num_threads, 1)
        self.prefetch = _check_int("prefetch", prefetch, 1)
        self.world_size = _check_int("world_size", world_size, 1)
        self.rank = _check_int("rank", rank, 0)
        assert self.world_size is not None and self.rank is not None
        if self.rank >= self.world_size:
            raise ConfigError(
                f"BagLoader: rank {self.rank} is not below world_size {self.world_size}"
            )
        self.drop_uneven = bool(drop_uneven)
        if dtype not in FEATURE_OUT_DTYPES:
            raise ConfigError(
                f"BagLoader: dtype must be one of {FEATURE_OUT_DTYPES}, got {dtype!r}"
            )
        self.dtype = str(dtype)
        self.pin_memory = bool(pin_memory)
        if readahead is None:
            readahead = max(8, 2 * self.prefetch)
        self.readahead = _check_int("readahead", readahead, 0)
        self.io_threads = _check_int("io_threads", io_threads, 1)
        if cache is not None and cache.store_path != self.store.path:
            raise ConfigError(
                f"BagLoader: the cache belongs to store {cache.store_path}, not {self.store.path}"
            )
        self.cache = cache
        self._epoch = 0
        self._manual_epoch = False

    # ------------------------------------------------------------------------------------ epochs

    @property
    def epoch(self) -> int:
        """The epoch the next pass uses."""
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch`` (an integer >= 0) for the next passes (turns off the automatic advance)."""
        self._epoch = check_count("epoch", epoch, 0, "BagLoader.set_epoch")
        self._manual_epoch = True

    # ------------------------------------------------------------------------------------- order

    def order(self, epoch: int | None = None) -> list[int]:
        """Positions into :attr:`slide_ids` visited by this rank in ``epoch`` (default current)."""
        ep = self._epoch if epoch is None else check_count("epoch", epoch, 0, "BagLoader.order")
        perm = epoch_order(len(self.slide_ids), shuffle=self.shuffle, seed=self.seed, epoch=ep)
        shard = perm[self.rank :: self.world_size]
        if self.drop_uneven:
            shard = shard[: len(perm) // self.world_size]
        return [int(i) for i in shard]

    def epoch_slide_ids(self, epoch: int | None = None) -> list[str]:
        """Slide ids in the order this rank yields them in ``epoch`` (default current)."""
        return [self.slide_ids[i] for i in self.order(epoch)]

    def __len__(self) -> int:
        n = len(self.slide_ids)
        if self.drop_uneven:
            return n // self.world_size
        return len(range(self.rank, n, self.world_size))

    # --------------------------------------------------------------------------------- iteration

    def __iter__(self) -> Iterator[Bag]:
        import torch

        epoch = self._epoch
        positions = self.order(epoch)
        store_indices = [int(self._indices[p]) for p in positions]
        if self.cache is not None:
            yield from self._iter_cached(epoch, positions, store_indices)
            if not self._manual_epoch:
                self._epoch = epoch + 1
            return
        prefetcher = self._prefetcher(store_indices, epoch, self.max_patches, self.dtype)
        pin = self.pin_memory and torch.cuda.is_available()
        for pos, expected in zip(positions, store_indices, strict=True):
            index, feats, coords, edges = next(prefetcher)
            if index != expected:  # the prefetcher is ordered; anything else is a bug
                raise RuntimeError(f"BagLoader: expected slide index {expected}, got {index}")
            bag = Bag(
                slide_id=self.slide_ids[pos],
                index=int(index),
                features=torch.from_numpy(feats),
                coords=torch.from_numpy(coords),
                edge_index=None if edges is None else torch.from_numpy(edges),
            )
            yield _pinned(bag) if pin else bag
        if not self._manual_epoch:
            self._epoch = epoch + 1

    def _prefetcher(
        self, indices: list[int], epoch: int, max_patches: int | None, dtype: str
    ) -> _core.BagPrefetcher:
        """The Rust prefetcher over store ``indices`` with this loader's threads and read-ahead."""
        return _core.BagPrefetcher(
            self.store.core,
            indices,
            num_threads=self.num_threads,
            prefetch=self.prefetch,
            max_patches=max_patches,
            seed=self.seed,
            epoch=epoch,
            knn_k=self.knn_k,
            dtype=dtype,
            readahead=self.readahead,
            io_threads=self.io_threads,
        )

    def _iter_cached(
        self, epoch: int, positions: list[int], store_indices: list[int]
    ) -> Iterator[Bag]:
        """Serve cached bags from the cache; read the others whole, cache and serve them."""
        import torch

        from momkd.data.cache import CachedBag, serve_bag

        cache = self.cache
        assert cache is not None
        cached = {i for i in store_indices if i in cache}
        missing = [i for i in store_indices if i not in cached]
        prefetcher = None
        if missing:
            prefetcher = self._prefetcher(missing, epoch, None, cache.dtype)

        def serve(entry: CachedBag, index: int) -> tuple[Any, Any, Any]:
            return serve_bag(
                entry,
                index,
                max_patches=self.max_patches,
                seed=self.seed,
                epoch=epoch,
                knn_k=self.knn_k,
                dtype=self.dtype,
            )

        pin = self.pin_memory and torch.cuda.is_available() and cache.kind == "host"
        for pos, expected in zip(positions, store_indices, strict=True):
            if expected in cached:
                cache.hits += 1
                feats, coords, edges = cache.serve_entry(expected, serve)
            else:
                assert prefetcher is not None
                index, f, c, e = next(prefetcher)
                if index != expected:  # the prefetcher is ordered; anything else is a bug
                    raise RuntimeError(f"BagLoader: expected slide index {expected}, got {index}")
                cache.misses += 1
                if cache.put(index, f, c, e, self.knn_k):
                    feats, coords, edges = cache.serve_entry(index, serve)
                else:  # over the cache's budget: serve this read alone
                    whole = CachedBag(
                        features=torch.from_numpy(f).to(cache.device),
                        coords=torch.from_numpy(c),
                    )
                    if e is not None and self.knn_k is not None:
                        whole.edges[self.knn_k] = torch.from_numpy(e).to(cache.device)
                    feats, coords, edges = serve(whole, index)
            bag = Bag(
                slide_id=self.slide_ids[pos],
                index=expected,
                features=feats,
                coords=coords,
                edge_index=edges,
            )
            yield _pinned(bag) if pin else bag

    def __repr__(self) -> str:
        return (
            f"BagLoader({self.store.path!r}, slides={len(self.slide_ids)}, shuffle={self.shuffle}, "
            f"rank={self.rank}/{self.world_size}, epoch={self._epoch})"
        )
