"""Histology-only inference over a list of units (:func:`run_inference`): the prediction path of
validation, testing, ``momkd eval`` and ``momkd predict``, sharded over data-parallel ranks."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from momkd.data.cache import BagCache
from momkd.data.store import CohortStore
from momkd.methods import uses_graph
from momkd.train.batching import (
    UnitLoader,
    collate,
)
from momkd.train.distributed import Dist, shard, unshard

__all__ = ["InferenceResult", "run_inference"]


@dataclass
class InferenceResult:
    """Histology-only predictions over a list of slides.

    Attributes
    ----------
    slide_ids : list[str]
    probs : np.ndarray
        (n,) float64 positive-class probabilities for two classes; (n, C) class probabilities for
        more.
    loss : float | None
        Mean cross-entropy when labels were given.
    usage : dict | None
        MoMKD memory usage (docs/METHOD.md §8) per class memory when requested.
    seconds : float
    """

    slide_ids: list[str]
    probs: np.ndarray
    loss: float | None = None
    usage: dict[str, Any] | None = None
    seconds: float = 0.0


@torch.no_grad()
def run_inference(
    model: nn.Module,
    store: CohortStore,
    slide_ids: Sequence[str],
    *,
    method: str,
    device: torch.device,
    knn_k: int = 8,
    labels: Mapping[str, int] | None = None,
    collect_usage: bool = False,
    num_threads: int | None = None,
    prefetch: int = 4,
    progress: bool = False,
    desc: str = "predict",
    members: Mapping[str, Sequence[str]] | None = None,
    dtype: str = "float32",
    cache: BagCache | None = None,
    dist: Dist | None = None,
) -> InferenceResult:
    """Predict every slide with the histology branch only (eval mode, all patches).

    In a data-parallel run (``dist`` with several ranks) rank ``r`` predicts the slides
    ``slide_ids[r::world_size]`` and the predictions, losses and memory usage counts are gathered,
    so every rank returns the same result, in the order of ``slide_ids``.

    Parameters
    ----------
    model : nn.Module
        A MoMKD, ABMIL or BatchKD model.
    store : CohortStore
        Store holding the slides.
    slide_ids : sequence of str
        Slides to predict (n).
    method : str
        ``momkd`` | ``abmil`` | ``batchkd`` (whether a graph is needed).
    device : torch.device
    knn_k : int
        k-NN graph size (MoMKD).
    labels : mapping, optional
        Slide -> label; when given the mean cross-entropy is returned.
    collect_usage : bool
        Collect MoMKD memory usage statistics over all patches.
    num_threads, prefetch : loader settings.
    progress : bool
        Show a tqdm bar.
    desc : str
        Bar label.
    members : mapping, optional
        Unit -> slide ids when ``slide_ids`` are patients (``data.bag: patient``): each patient is
        predicted as one bag made of its slides.
    dtype : {"float32", "float16"}
        Loader hand-off type (float16 is widened on ``device``).
    cache : BagCache, optional
        Cohort cache of ``store`` (:mod:`momkd.data.cache`).
    dist : Dist, optional
        Shard the slides over the ranks of a data-parallel run (every rank must call).

    Returns
    -------
    InferenceResult
    """
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    all_ids = list(slide_ids)
    d = dist if dist is not None else Dist()
    ids = shard(all_ids, d)
    n_classes = int(getattr(getattr(model, "cfg", None), "n_classes", 2) or 2)
    multi = n_classes > 2
    probs = np.zeros((len(ids), n_classes) if multi else len(ids), dtype=np.float64)
    ces = np.zeros(len(ids), dtype=np.float64)
    k = int(getattr(getattr(model, "cfg", None), "memory_k", 0) or 0)
    # One memory per class: C+ and C- ("pos", "neg") for two classes, "c<i>" for more.
    names = [f"c{c}" for c in range(n_classes)] if multi else ["pos", "neg"]
    counts = {name: np.zeros(k, dtype=np.int64) for name in names}
    graph = uses_graph(method)
    try:
        if ids:
            loader = UnitLoader(
                store,
                ids,
                members,
                knn_k=knn_k if graph else None,
                num_threads=num_threads,
                prefetch=max(1, prefetch),
                dtype=dtype,
                pin_memory=device.type == "cuda",
                cache=cache,
            )
            bar = tqdm(total=len(ids), desc=desc, disable=not progress, leave=False)
            for i, bag in enumerate(loader):
                feats, edges, _ = collate([bag], device, graph=graph)
                out = model(feats, edges)
                logits = out.logits.float()
                if multi:
                    probs[i] = torch.softmax(logits[0], dim=-1).double().cpu().numpy()
                else:
                    probs[i] = float(torch.softmax(logits[0], dim=-1)[1])
                if labels is not None:
                    y = torch.tensor([labels[bag.slide_id]], device=logits.device)
                    ces[i] = float(F.cross_entropy(logits, y))
                if collect_usage:
                    assigns = out.assign if multi else (out.assign_pos, out.assign_neg)
                    for name, assign in zip(names, assigns, strict=True):
                        a = assign.detach().reshape(-1).cpu().numpy()
                        counts[name] += np.bincount(a, minlength=k)[:k]
                bar.update(1)
            bar.close()
    finally:
        model.train(was_training)
    if d.enabled:
        parts = d.all_gather_object((probs, ces, counts), "gathering predictions")
        probs = np.asarray(unshard([p[0].tolist() for p in parts], len(all_ids)), np.float64)
        ces = np.asarray(unshard([p[1].tolist() for p in parts], len(all_ids)), np.float64)
        counts = {n: np.sum([p[2][n] for p in parts], axis=0) for n in names}
    usage = None
    if collect_usage and k and int(counts[names[0]].sum()) > 0:
        from momkd.memory import usage_stats

        usage = {}
        for name, c in counts.items():
            # The assignments rebuilt from their counts (usage_stats needs only the histogram).
            assign = torch.repeat_interleave(torch.arange(k), torch.from_numpy(c))
            st = usage_stats(assign, k)
            usage[name] = {
                "usage": [float(v) for v in st["usage"]],  # type: ignore[union-attr]
                "active_ratio": float(st["active_ratio"]),  # type: ignore[arg-type]
                "perplexity": float(st["perplexity"]),  # type: ignore[arg-type]
            }
    return InferenceResult(
        slide_ids=all_ids,
        probs=probs,
        loss=sum(ces.tolist()) / len(all_ids) if labels is not None and all_ids else None,
        usage=usage,
        seconds=time.perf_counter() - t0,
    )
