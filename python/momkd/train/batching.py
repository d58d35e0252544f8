"""Bags into model inputs: collation of several bags into one disjoint graph, patient bags made of
their slides (:func:`merge_bags`, :class:`UnitLoader`), patch dropout, and the loader's hand-off
type."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from momkd.config import RunConfig
from momkd.data.loader import Bag, BagLoader
from momkd.data.store import CohortStore
from momkd.errors import DataError

__all__ = ["UnitLoader", "batches_of", "collate", "drop_patches", "feature_dtype_for", "merge_bags"]


def collate(
    bags: Sequence[Bag], device: torch.device, *, graph: bool
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Concatenate bags into one disjoint graph.

    Parameters
    ----------
    bags : sequence of Bag
        B bags with ``features`` (P_b, D) and, when ``graph``, ``edge_index`` (2, E_b).
    device : torch.device
        Target device.
    graph : bool
        Whether to build the concatenated ``edge_index``.

    Returns
    -------
    features : Tensor
        (N, D) float32, N = sum P_b.
    edge_index : Tensor | None
        (2, E) int64 with each bag's node indices shifted by its offset (None without ``graph``).
    segment_offsets : Tensor | None
        (B + 1,) int64, or None for a single bag.
    """
    if graph and any(b.edge_index is None for b in bags):
        raise DataError("collate: the model needs a k-NN graph but the loader returned none")
    if len(bags) == 1:
        b = bags[0]
        edges = _to(b.edge_index, device) if graph and b.edge_index is not None else None
        return _to(b.features, device).float(), edges, None
    sizes = [b.n_patches for b in bags]
    offsets = torch.zeros(len(bags) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.tensor(sizes, dtype=torch.int64), 0)
    feats = _to(torch.cat([b.features for b in bags]), device).float()
    edges = None
    if graph:
        parts = [
            b.edge_index + int(offsets[i]) for i, b in enumerate(bags) if b.edge_index is not None
        ]
        edges = torch.cat(parts, dim=1).to(device)
    return feats, edges, offsets.to(device)


def _to(t: Tensor, device: torch.device) -> Tensor:
    """``t`` on ``device``; asynchronous from page-locked memory (float16 is widened there)."""
    return t.to(device, non_blocking=t.is_pinned())


def feature_dtype_for(cfg: RunConfig, device: torch.device) -> str:
    """``train.feature_dtype`` resolved: ``auto`` is float16 on CUDA (half the bytes to copy, widened
    on the device) and float32 elsewhere."""
    want = cfg.train.feature_dtype
    if want == "auto":
        return "float16" if device.type == "cuda" else "float32"
    return want


def batches_of(it: Iterator[Bag], total: int, size: int, wait: list[float]) -> Iterator[list[Bag]]:
    """Group ``total`` bags of ``it`` into lists of ``size``; adds time blocked on ``it`` to wait[0]."""
    done = 0
    while done < total:
        batch = []
        for _ in range(min(size, total - done)):
            t0 = time.perf_counter()
            bag = next(it)
            wait[0] += time.perf_counter() - t0
            batch.append(bag)
        done += len(batch)
        yield batch


def merge_bags(unit_id: str, bags: Sequence[Bag]) -> Bag:
    """One bag from several slides (``data.bag: patient``): features and coordinates
    concatenated, each slide keeping its own k-NN graph (a disjoint union, no edge between slides).

    Parameters
    ----------
    unit_id : str
        Id of the merged bag (the patient).
    bags : sequence of Bag
        The patient's slides, in order.

    Returns
    -------
    Bag
        ``slide_id`` = ``unit_id``; ``index`` of the first slide.
    """
    if len(bags) == 1:
        b = bags[0]
        return Bag(unit_id, b.index, b.features, b.coords, b.edge_index)
    feats = torch.cat([b.features for b in bags])
    coords = torch.cat([b.coords for b in bags])
    edges = None
    if all(b.edge_index is not None for b in bags):
        parts = []
        offset = 0
        for b in bags:
            assert b.edge_index is not None
            parts.append(b.edge_index + offset)
            offset += b.n_patches
        edges = torch.cat(parts, dim=1)
    return Bag(unit_id, bags[0].index, feats, coords, edges)


def drop_patches(bag: Bag, rate: float) -> Bag:
    """Patch dropout: a random subset of ``round((1 - rate) * P)`` patches (at least one), in their
    original order, drawn from torch's global generator (seeded per fold and saved in
    checkpoints). The k-NN graph keeps the edges between kept patches, renumbered.

    Parameters
    ----------
    bag : Bag
        A training bag with ``features`` (P, D) and optionally ``edge_index`` (2, E).
    rate : float
        Share of patches to drop, in [0, 1).

    Returns
    -------
    Bag
        The same bag when nothing is dropped, else a new one.
    """
    n = bag.n_patches
    keep = max(1, int(round((1.0 - rate) * n)))
    if rate <= 0.0 or keep >= n:
        return bag
    idx = torch.randperm(n)[:keep].sort().values
    edges = None
    if bag.edge_index is not None:
        new_id = torch.full((n,), -1, dtype=torch.int64)
        new_id[idx] = torch.arange(keep, dtype=torch.int64)
        mapped = new_id[bag.edge_index.to(torch.int64)]
        edges = mapped[:, (mapped >= 0).all(dim=0)].contiguous()
    return Bag(bag.slide_id, bag.index, bag.features[idx], bag.coords[idx], edges)


class UnitLoader:
    """Bags of units: slides (``members`` None) or patients, each the disjoint union of its
    slides (:func:`merge_bags`), read in the given order by one :class:`BagLoader`.

    Parameters
    ----------
    store : CohortStore
    units : sequence of str
        Unit ids (may repeat, e.g. a with-replacement epoch draw).
    members : mapping, optional
        Unit -> its slide ids; ``None`` when every unit is a slide.
    epoch : int
        Passed to :meth:`BagLoader.set_epoch` (seeds the patch subsampling).
    **loader_kw
        Further :class:`BagLoader` arguments.
    """

    def __init__(
        self,
        store: CohortStore,
        units: Sequence[str],
        members: Mapping[str, Sequence[str]] | None = None,
        *,
        epoch: int = 0,
        **loader_kw: Any,
    ) -> None:
        self.units = list(units)
        self.members = members
        slides = self.units if members is None else [s for u in self.units for s in members[u]]
        self.loader = BagLoader(store, slides, shuffle=False, **loader_kw)
        self.loader.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.units)

    def __iter__(self) -> Iterator[Bag]:
        it = iter(self.loader)
        if self.members is None:
            yield from it
            return
        for u in self.units:
            yield merge_bags(u, [next(it) for _ in self.members[u]])
