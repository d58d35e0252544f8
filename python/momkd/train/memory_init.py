"""The class memory's initialisation in a fold: spherical k-means of the untrained model's patch
projections, per class (docs/METHOD.md §2.5), the same for any number of data-parallel ranks."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from momkd.data.loader import Bag
from momkd.errors import DataError
from momkd.train.batching import collate
from momkd.train.distributed import Dist

__all__ = ["init_class_memory"]

log = logging.getLogger(__name__)


@torch.no_grad()
def init_class_memory(
    model: nn.Module,
    train_units: Sequence[str],
    labels: Mapping[str, int],
    loader_for: Callable[[list[str]], Iterable[Bag]],
    *,
    fold: int,
    per_class: int,
    memory_k: int,
    kmeans_iters: int,
    n_classes: int = 2,
    seed: int,
    device: torch.device,
    dist: Dist,
) -> None:
    """Spherical k-means initialisation of every class memory (C+ and C- for two classes) from the
    untrained ``model``.

    Per class, the training units are visited in a seeded order until ``per_class`` patch
    projections are collected (then subsampled to that bound). In a data-parallel run the visit is
    split over the ranks in rounds (rank ``r`` projects unit ``j * W + r``); the per-unit counts are
    shared after each round, so every rank knows where a single process would have stopped, the
    projections up to that unit are gathered on rank 0 in visiting order, rank 0 runs k-means and
    the memory is broadcast. The result does not depend on the number of ranks.

    Parameters
    ----------
    model : nn.Module
        A model with a class memory (``init_memory``, ``memory``).
    train_units : sequence of str
        The fold's training units (slides or patients).
    labels : mapping
        Unit -> class.
    loader_for : callable
        Units -> their bags, in order, with the k-NN graph (the fold's training loader, epoch 0).
    fold : int
        Named in errors and the log.
    per_class : int
        ``memory.init_per_class``.
    memory_k : int
        Components per class memory (``model.memory_k``).
    n_classes : int
        Classes (one memory each); visited from the last class to class 0, so that two classes
        give C+ then C-.
    kmeans_iters : int
        ``memory.kmeans_iters``.
    seed : int
        The fold's seed (visiting order, subsampling and k-means).
    device : torch.device
    dist : Dist
        This process's rank (every rank must call).

    Raises
    ------
    DataError
        A class without training units, or fewer projections than memory components.
    """
    rng = np.random.default_rng([seed, 2_000_003])
    classes = range(n_classes)
    by_class = {c: [s for s in train_units if labels[s] == c] for c in classes}
    if not all(by_class.values()):
        which = "both classes" if n_classes == 2 else "every class"
        raise DataError(
            f"fold {fold}: the training set needs slides of {which} to initialise the memory"
        )
    n_slides = min(len(v) for v in by_class.values())
    d = dist
    embeddings: dict[int, Tensor] = {}
    totals: dict[int, int] = {}
    model.eval()
    for c in reversed(classes):
        order = [by_class[c][i] for i in rng.permutation(len(by_class[c]))[:n_slides]]
        mine: dict[int, Tensor] = {}  # position in `order` -> (P, S) projections
        sizes: list[int] = []  # projections per visited slide, in visiting order
        it = iter(loader_for(order[d.rank :: d.world_size]))
        j = 0
        while j < len(order) and sum(sizes) < per_class:
            n_local = 0
            if j + d.rank < len(order):
                feats, edges, _ = collate([next(it)], device, graph=True)
                proj = model(feats, edges).patch_proj.float().cpu()
                mine[j + d.rank] = proj
                n_local = proj.shape[0]
            sizes.extend(d.all_gather_object(n_local, "memory initialisation")[: len(order) - j])
            j += d.world_size
        # The first slide at which a single process would have stopped.
        stop = int(np.searchsorted(np.cumsum(sizes), per_class)) + 1
        total = int(sum(sizes[:stop]))
        keep = None
        if total > per_class:
            keep = torch.from_numpy(np.sort(rng.choice(total, size=per_class, replace=False)))
        gathered = d.gather_object(
            [(p, t) for p, t in mine.items() if p < stop], "memory initialisation"
        )
        if gathered is not None:
            parts = sorted((p for rank_parts in gathered for p in rank_parts), key=lambda x: x[0])
            emb = torch.cat([t for _, t in parts])
            embeddings[c] = emb if keep is None else emb[keep]
        totals[c] = min(total, per_class)
    k = memory_k
    for c, n in totals.items():
        if n < k:
            raise DataError(
                f"fold {fold}: {n} patch projections of class {c} for {k} memory components; "
                "lower model.memory_k"
            )
    if d.is_main and n_classes == 2:
        model.init_memory(  # type: ignore[operator]
            embeddings[1].to(device),
            embeddings[0].to(device),
            iters=kmeans_iters,
            seed=seed,
        )
    elif d.is_main:
        model.init_memory_classes(  # type: ignore[operator]
            [embeddings[c].to(device) for c in classes], iters=kmeans_iters, seed=seed
        )
    d.broadcast_module(model.memory, "broadcast of the initial memory")  # type: ignore[arg-type]
    model.train()
    log.info(
        "fold %d: memory initialised from %s projections",
        fold,
        " / ".join(str(totals[c]) for c in reversed(classes)),
    )
