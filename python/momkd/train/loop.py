"""Training of one cross-validation fold: model construction, memory initialisation, the epoch loop,
early stopping, checkpoints, and the fold's final evaluation.

One :class:`FoldTrainer` owns ``RUN_DIR/fold_<k>/``::

    last.pt                   full training state after the latest finished epoch (resume point)
    best.pt                   model of the kept epoch (train.monitor; + config, genomics state)
    history.json/.csv         one row per epoch: losses, val AUC/loss, lr, tau, timing, memory usage
    val_predictions.csv       slide_id, case_id, label, prob, pred   (best model)
    test_predictions.csv      slide_id, case_id, label, prob, pred, pred_thr
    external_predictions.csv  (when an external cohort is configured)
    result.json               the fold's metrics; its presence marks the fold as finished

Protocol (docs/METHOD.md §2.6): AdamW over all trainable parameters, gradient-norm clipping,
class-balanced sampling with replacement (:class:`~momkd.train.sampler.ClassBalancedSampler`). One
monitored validation quantity (``train.monitor``: ``val_loss`` or ``val_auc``) drives the kept
checkpoint, early stopping and the plateau learning-rate schedule (:class:`Monitor`); a change within
``train.min_delta`` is a tie and a tie keeps the later epoch. Without a validation set
(``splits.val_fraction: 0``) every epoch runs and the last one is kept. With ``data.standardize:
train`` the features are standardised with statistics of the fold's training patches only
(:mod:`momkd.train.standardize`). With ``data.bag: patient`` a patient's slides form one bag (each
slide keeps its own k-NN graph). Test metrics are reported at the argmax rule and at the F1-optimal
threshold chosen on the validation set.

Data parallelism (``torchrun``, :mod:`momkd.train.distributed`): the model is wrapped in
``DistributedDataParallel``; rank ``r`` of ``W`` trains on the draws ``r, r + W, ...`` of the epoch's
global draw, so W ranks x batch B train as one process x batch B*W; momentum statistics are
all-reduced before each memory update; inference is sharded and gathered in slide order; a checksum
of the model is compared across ranks after every epoch; rank 0 alone writes ``fold_<k>/``.

Reproducibility: every fold seeds Python, numpy and torch with ``train.seed + fold`` before building
its model, the epoch draw depends only on ``(seed, epoch)``, and ``last.pt`` stores every generator
state, so a run resumed from ``last.pt`` replays the following epochs exactly as an uninterrupted
run would (bit-identical on CPU in ``train.deterministic`` mode).
"""

from __future__ import annotations

import logging
import math
import os
import random
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import nullcontext as _nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from momkd._io import (  # noqa: F401 - re-exported: the I/O helpers used to live here
    jsonable,
    metrics_from_json,
    read_csv_predictions,
    read_json,
    write_csv,
    write_json,
)
from momkd.config import RunConfig
from momkd.data.cache import BagCache, shared_cache
from momkd.data.loader import Bag, BagLoader
from momkd.data.store import CohortStore
from momkd.errors import ConfigError, DataError, MomkdError
from momkd.methods import METHODS, learning_rate, method_info
from momkd.metrics import binary_metrics, bootstrap_auc_ci, evaluate_with_threshold
from momkd.train.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from momkd.train.distributed import Dist, shard, unshard
from momkd.train.ema import WeightEMA
from momkd.train.sampler import ClassBalancedSampler
from momkd.train.standardize import (
    FeatureStats,
    attach_input_dropout,
    attach_standardizer,
    fit_feature_stats,
)

__all__ = [
    "METHODS",
    "FoldData",
    "Monitor",
    "FoldTrainer",
    "InferenceResult",
    "build_model",
    "collate",
    "drop_patches",
    "loss_weights_for",
    "model_spec_for",
    "read_csv_predictions",
    "run_inference",
    "seed_everything",
    "select_device",
    "write_csv",
    "write_json",
]

log = logging.getLogger(__name__)

_METHOD_NAMES = ", ".join(METHODS)


# ---------------------------------------------------------------------------------- environment


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def select_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; otherwise ``torch.device(name)``.

    Raises
    ------
    ConfigError
        A CUDA/MPS device that is not available.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device: {name} requested but CUDA is not available")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"train.device: {name} requested but MPS is not available")
    return dev


def progress_enabled(cfg: RunConfig) -> bool:
    """Progress bars: ``train.progress`` when the configuration has it, else only on a terminal."""
    setting = getattr(cfg.train, "progress", None)
    if setting is not None:
        return bool(setting)
    if os.environ.get("MOMKD_PROGRESS", "").strip() in ("0", "false", "no"):
        return False
    return sys.stderr.isatty()


# -------------------------------------------------------------------------------------- models


def model_spec_for(cfg: RunConfig, d_in: int, genes: int | None) -> dict[str, Any]:
    """The constructor arguments of the configured model as a plain dict.

    Parameters
    ----------
    cfg : RunConfig
        Resolved configuration (``model``, ``memory``, ``loss`` sections).
    d_in : int
        Feature dimension of the store.
    genes : int | None
        Number of preprocessed genes (None for ``abmil``).

    Returns
    -------
    dict
        ``{"method": str, "params": dict}`` for :func:`build_model`; stored in checkpoints.
    """
    m = cfg.model
    method = m.method
    if method not in METHODS:
        raise ConfigError(f"model.method: unknown method {method!r} ({_METHOD_NAMES})")
    assert m.hidden is not None and m.sphere is not None
    if method in ("momkd", "momkd_histo"):
        omics = method == "momkd"
        if m.heads != 2:
            raise ConfigError(f"model.heads: MoMKD uses 2 GATv2 heads, got {m.heads}")
        if omics and genes is None:
            raise ConfigError("data.expression: required by method momkd")
        sources = list(cfg.memory.momentum_sources) if omics else ["wsi"]
        params: dict[str, Any] = {
            "d_in": d_in,
            "hidden": m.hidden,
            "omics_width": m.omics_width,
            "omics_hidden": m.omics_hidden,
            "sphere": m.sphere,
            "memory_k": m.memory_k,
            "genes": genes if omics else 0,
            "dropout": m.dropout,
            "omics_dropout": m.omics_dropout,
            "attn_dropout": m.attn_dropout,
            "tau_init": m.tau_init,
            "tau_min": m.tau_min,
            "tau_max": m.tau_max,
            "classifier_hidden": m.classifier_hidden,
            "memory_update": cfg.memory.update,
            "momentum": cfg.memory.momentum,
            "dead_after": cfg.memory.dead_after,
            "momentum_sources": sources,
            "input_residual": m.input_residual,
            "omics": omics,
        }
    elif method == "meanpool":
        params = {"d_in": d_in, "hidden": m.meanpool_hidden, "dropout": m.dropout}
    elif method == "abmil":
        params = {
            "d_in": d_in,
            "hidden": m.hidden,
            "attn_dim": m.attention_dim,
            "dropout": m.dropout,
        }
    else:
        if genes is None:
            raise ConfigError("data.expression: required by method batchkd")
        params = {
            "d_in": d_in,
            "hidden": m.hidden,
            "attn_dim": m.attention_dim,
            "dropout": m.dropout,
            "genes": genes,
            "omics_width": m.omics_width,
            "omics_hidden": m.omics_hidden,
            "omics_dropout": m.omics_dropout,
            "classifier_hidden": m.classifier_hidden,
            "temperature": m.batchkd_temperature,
            "kd_weight": cfg.loss.batchkd,
        }
    return {
        "method": method,
        "params": params,
        "standardize": cfg.data.standardize == "train",
        "input_dropout": float(cfg.train.feature_dropout),
    }


def build_model(spec: Mapping[str, Any]) -> nn.Module:
    """Instantiate a model from :func:`model_spec_for`'s dict (as stored in a checkpoint).

    Raises
    ------
    ConfigError
        Unknown method or invalid parameters.
    """
    method = spec.get("method")
    params = dict(spec.get("params", {}))
    model: nn.Module
    if method in ("momkd", "momkd_histo"):
        from momkd.model.momkd import ModelConfig, MoMKD

        params["momentum_sources"] = tuple(params.get("momentum_sources", ("omics",)))
        # Checkpoints written before the released residual rule always used a Linear.
        params.setdefault("input_residual", "linear")
        model = MoMKD(ModelConfig(**params))
    elif method == "abmil":
        from momkd.model.abmil import ABMIL, ABMILConfig

        model = ABMIL(ABMILConfig(**params))
    elif method == "batchkd":
        from momkd.model.batchkd import BatchKD, BatchKDConfig

        model = BatchKD(BatchKDConfig(**params))
    elif method == "meanpool":
        from momkd.model.meanpool import MeanPool, MeanPoolConfig

        model = MeanPool(MeanPoolConfig(**params))
    else:
        raise ConfigError(f"model.method: unknown method {method!r} ({_METHOD_NAMES})")
    if spec.get("standardize"):
        # Identity until the fold's statistics are fitted or a checkpoint's buffers are loaded.
        attach_standardizer(model, int(params["d_in"]))
    # After the standardiser, so that dropped entries are set to the training mean.
    attach_input_dropout(model, float(spec.get("input_dropout", 0.0)))
    return model


def loss_weights_for(cfg: RunConfig) -> Any:
    """:class:`~momkd.model.momkd.LossWeights` from ``cfg.loss`` (MoMKD and its ablation; None
    otherwise)."""
    if not method_info(cfg.model.method).memory:
        return None
    from momkd.model.momkd import LossWeights

    names = {f for f in LossWeights.__dataclass_fields__}
    return LossWeights(**{k: getattr(cfg.loss, k) for k in names if hasattr(cfg.loss, k)})


def uses_graph(method: str) -> bool:
    """Whether the method's histology branch needs the k-NN graph."""
    return method_info(method).graph


def uses_expression(method: str) -> bool:
    """Whether the method trains with expression."""
    return method_info(method).expression


def has_memory(method: str) -> bool:
    """Whether the method has MoMKD's class memory (initialisation, usage statistics)."""
    return method_info(method).memory


def batch_size_for(cfg: RunConfig) -> int:
    """Bags per optimizer step: ``train.batch_size``; batchkd uses ``model.batchkd_batch`` when
    ``train.batch_size`` is left at 1 (its alignment is meaningless within a single bag)."""
    if cfg.model.method == "batchkd" and cfg.train.batch_size == 1:
        return int(cfg.model.batchkd_batch)
    return int(cfg.train.batch_size)


# ------------------------------------------------------------------------------------ batching


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


def _chunks(it: Iterator[Bag], total: int, size: int, wait: list[float]) -> Iterator[list[Bag]]:
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


# ----------------------------------------------------------------------------------- inference


@dataclass
class InferenceResult:
    """Histology-only predictions over a list of slides.

    Attributes
    ----------
    slide_ids : list[str]
    probs : np.ndarray
        (n,) float64 positive-class probabilities.
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
    probs = np.zeros(len(ids), dtype=np.float64)
    ces = np.zeros(len(ids), dtype=np.float64)
    k = int(getattr(getattr(model, "cfg", None), "memory_k", 0) or 0)
    counts = {"pos": np.zeros(k, dtype=np.int64), "neg": np.zeros(k, dtype=np.int64)}
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
                probs[i] = float(torch.softmax(logits[0], dim=-1)[1])
                if labels is not None:
                    y = torch.tensor([labels[bag.slide_id]], device=logits.device)
                    ces[i] = float(F.cross_entropy(logits, y))
                if collect_usage:
                    for name, assign in (("pos", out.assign_pos), ("neg", out.assign_neg)):
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
        counts = {n: np.sum([p[2][n] for p in parts], axis=0) for n in ("pos", "neg")}
    usage = None
    if collect_usage and k and int(counts["pos"].sum()) > 0:
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


# ------------------------------------------------------------------------------ early stopping


@dataclass
class Monitor:
    """One monitored validation score (higher is better) behind the kept checkpoint, early
    stopping and the learning-rate schedule (docs/METHOD.md §2.6).

    Each epoch's score is compared with the best so far:

    * ``score > best + min_delta``: an improvement;
    * ``best - min_delta <= score <= best + min_delta``: a tie, which keeps the **later** epoch (as
      the released code does with an equal validation AUC); the reference stays the maximum;
    * otherwise a bad epoch.

    An improvement or a tie marks the epoch as the one to keep and resets both counters. Training
    stops after ``patience`` consecutive bad epochs, never before ``min_epochs`` epochs. The
    learning rate is multiplied by the plateau factor when more than ``plateau_patience`` bad epochs
    have passed since the last kept epoch or the last reduction (``ReduceLROnPlateau``'s rule).

    Parameters
    ----------
    patience, min_epochs : int
        Early stopping.
    min_delta : float
        Tie tolerance (>= 0).
    plateau_patience : int, optional
        ``None``: the schedule never reduces.
    """

    patience: int
    min_epochs: int
    min_delta: float = 0.0
    plateau_patience: int | None = None
    best: float = -math.inf
    best_epoch: int = -1
    bad_epochs: int = 0
    plateau_bad: int = 0

    def update(self, score: float, epoch: int) -> bool:
        """Record an epoch's score; True when this epoch is to be kept (improvement or tie)."""
        first = self.best_epoch < 0
        if first or score >= self.best - self.min_delta:
            self.best = score if first else max(self.best, score)
            self.best_epoch, self.bad_epochs, self.plateau_bad = epoch, 0, 0
            return True
        self.bad_epochs += 1
        self.plateau_bad += 1
        return False

    def should_stop(self, epoch: int) -> bool:
        """Whether to stop after ``epoch`` (0-based) has finished."""
        return epoch + 1 >= self.min_epochs and self.bad_epochs >= self.patience

    def should_reduce_lr(self) -> bool:
        """Whether to cut the learning rate now (resets the plateau counter when True)."""
        if self.plateau_patience is None or self.plateau_bad <= self.plateau_patience:
            return False
        self.plateau_bad = 0
        return True

    def state_dict(self) -> dict[str, Any]:
        return {
            "best": self.best,
            "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs,
            "plateau_bad": self.plateau_bad,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best = float(state["best"])
        self.best_epoch = int(state["best_epoch"])
        self.bad_epochs = int(state["bad_epochs"])
        self.plateau_bad = int(state.get("plateau_bad", 0))


# --------------------------------------------------------------------------------- fold trainer


@dataclass
class FoldData:
    """Everything one fold trains and evaluates on.

    Attributes
    ----------
    fold : int
    train, val, test : list[str]
        Slide ids.
    labels : dict[str, int]
        Slide -> label for every slide above.
    cases : dict[str, str]
        Slide -> patient.
    expression : dict[str, np.ndarray] | None
        Patient -> preprocessed (G,) float32 expression of the training patients (None for abmil).
    genomics_state : dict | None
        The fold's fitted :class:`~momkd.train.genomics.GenomicsPreprocessor` state.
    val_expression : dict[str, np.ndarray] | None
        Patient -> expression of the validation patients, preprocessed with the statistics fitted
        on the training patients (never used for training; MoMKD's teacher AUC in the history).
    external : tuple | None
        ``(store, slide_ids, labels | None, cases)`` of the external cohort.
    members : dict[str, list[str]] | None
        With ``data.bag: patient``: patient -> slide ids. The ids in ``train``/``val``/``test`` (and
        the keys of ``labels``/``cases``) are then patients, each one bag of its slides.
    external_members : dict[str, list[str]] | None
        The same for the external cohort.
    """

    fold: int
    train: list[str]
    val: list[str]
    test: list[str]
    labels: dict[str, int]
    cases: dict[str, str]
    expression: dict[str, np.ndarray] | None = None
    genomics_state: dict[str, Any] | None = None
    val_expression: dict[str, np.ndarray] | None = None
    external: tuple[CohortStore, list[str], dict[str, int] | None, dict[str, str]] | None = None
    members: dict[str, list[str]] | None = None
    external_members: dict[str, list[str]] | None = None


@dataclass
class _State:
    epoch: int = 0
    step: int = 0
    finished: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)


class FoldTrainer:
    """Train and evaluate one fold (see the module docstring for the files it writes).

    Parameters
    ----------
    cfg : RunConfig
        Resolved configuration.
    data : FoldData
        Splits, labels, expression of the fold.
    store : CohortStore
        The training cohort store.
    fold_dir : Path
        ``RUN_DIR/fold_<k>``.
    device : torch.device
    progress : bool
        Show tqdm bars.
    dist : Dist, optional
        This process's rank in a data-parallel run (:mod:`momkd.train.distributed`): the model is
        wrapped in ``DistributedDataParallel``, rank ``r`` trains on the draws ``r, r + W, ...`` of
        the epoch, inference is sharded and gathered, and rank 0 alone writes ``fold_dir``.
    """

    def __init__(
        self,
        cfg: RunConfig,
        data: FoldData,
        store: CohortStore,
        fold_dir: Path,
        *,
        device: torch.device,
        progress: bool = False,
        dist: Dist | None = None,
    ) -> None:
        self.cfg = cfg
        self.data = data
        self.store = store
        self.dir = Path(fold_dir)
        self.device = device
        self.dist = dist if dist is not None else Dist()
        self.progress = progress and self.dist.is_main
        self.method = cfg.model.method
        self.seed = int(cfg.train.seed) + int(data.fold)
        genes = None
        if uses_expression(self.method):
            if not data.expression:
                raise DataError(f"fold {data.fold}: method {self.method} needs expression")
            genes = int(next(iter(data.expression.values())).shape[0])
        self.spec = model_spec_for(cfg, store.feature_dim, genes)
        self.lr = learning_rate(self.method, cfg.train.lr)
        self.weights = loss_weights_for(cfg)
        self.batch_size = batch_size_for(cfg)
        self.loader_threads = 1 if cfg.train.deterministic else cfg.train.num_threads
        self.knn_k = int(cfg.train.knn_k)
        self.graph = uses_graph(self.method)
        self.feature_dtype = feature_dtype_for(cfg, device)
        self.cache = shared_cache(
            store,
            cfg.data.cache,
            device=device,
            cache_gb=cfg.data.cache_gb,
            knn_k=self.knn_k if self.graph else None,
        )
        from momkd.config import config_to_dict

        self.config_dict = config_to_dict(cfg)

    # ------------------------------------------------------------------------------ set-up

    def _build(self) -> None:
        seed_everything(self.seed)
        self.model = build_model(self.spec).to(self.device)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            params, lr=self.lr, weight_decay=self.cfg.train.weight_decay
        )
        train_labels = [self.data.labels[s] for s in self.data.train]
        self.sampler = ClassBalancedSampler(
            train_labels,
            balanced=self.cfg.train.balanced_sampling,
            seed=self.seed,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
        )
        t = self.cfg.train
        self.monitor = Monitor(
            t.patience,
            t.min_epochs,
            float(t.min_delta),
            plateau_patience=t.plateau_patience if t.schedule == "plateau" else None,
        )
        self.ema = WeightEMA(self.model, float(t.ema)) if t.ema is not None else None
        # Steps of one epoch: the same on every rank (the draw is padded to a multiple of W).
        self.steps_per_epoch = max(1, math.ceil(len(self.sampler.indices(0)) / self.batch_size))
        self.state = _State()
        self.net: nn.Module = self.model  # the DistributedDataParallel wrapper once training starts
        if self.dist.rank > 0:
            # Every rank built the same model from the same seed; dropout gets its own stream.
            torch.manual_seed(self.seed + 1_000_003 * self.dist.rank)

    def _wrap(self) -> None:
        """Wrap the model in ``DistributedDataParallel`` (data-parallel runs only), after checking
        that every rank starts from the same parameters, memory and feature statistics."""
        if not self.dist.enabled or self.net is not self.model:
            return
        from torch.nn.parallel import DistributedDataParallel

        self.dist.check_identical(self.model, f"fold {self.data.fold}: the initial model")
        # Buffers (momentum memory, feature statistics) are kept identical by construction and
        # checked every epoch, so they are not re-broadcast before each forward.
        import inspect

        kw: dict[str, Any] = {"broadcast_buffers": False}
        if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:
            kw = {"forward_sync_buffers": False}  # the newer name of the same setting
        self.net = DistributedDataParallel(
            self.model,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            **kw,
        )

    def _meta(self, kind: str) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "kind": kind,
            "method": self.method,
            "model_config": self.spec,
            "config": self.config_dict,
            "fold": self.data.fold,
            "genomics": self.data.genomics_state,
            "epoch": self.state.epoch,
            "step": self.state.step,
        }

    def _save_last(self) -> None:
        # Collective: every rank's generator states go into the checkpoint (rank 0 writes it).
        rngs = self.dist.gather_object(capture_rng_state(), "gathering generator states")
        if not self.dist.is_main:
            return
        assert rngs is not None
        state = self._meta("last")
        state.update(
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "sampler": self.sampler.state_dict(),
                "monitor": self.monitor.state_dict(),
                "rng": rngs[0],
                "history": self.state.history,
                "finished": self.state.finished,
                "world_size": self.dist.world_size,
            }
        )
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        if self.dist.enabled:
            state["rng_ranks"] = rngs
        save_checkpoint(self.dir / "last.pt", state)

    def _save_best(self, val_auc: float, score: float) -> None:
        if not self.dist.is_main:
            return
        state = self._meta("best")
        state.update(
            {
                # The kept model is the weight average when train.ema is on.
                "model": self.ema.model_state(self.model)
                if self.ema is not None
                else self.model.state_dict(),
                "val_auc": val_auc,
                "monitor": self.cfg.train.monitor,
                "score": score,
            }
        )
        save_checkpoint(self.dir / "best.pt", state)

    def _load_last(self) -> None:
        # Rank 0 reads the checkpoint and sends it to the others (no shared file system needed).
        ckpt = self.dist.on_main(
            lambda: load_checkpoint(self.dir / "last.pt", map_location="cpu"), "reading last.pt"
        )
        if ckpt.get("method") != self.method or int(ckpt.get("fold", -1)) != self.data.fold:
            raise MomkdError(
                f"checkpoint {self.dir / 'last.pt'} belongs to method {ckpt.get('method')} fold "
                f"{ckpt.get('fold')}, not {self.method} fold {self.data.fold}"
            )
        if "monitor" not in ckpt:
            raise MomkdError(
                f"checkpoint {self.dir / 'last.pt'} was written by an older momkd without "
                "train.monitor; start this run again in a new directory"
            )
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.sampler.load_state_dict(ckpt["sampler"])
        if self.ema is not None:
            if "ema" not in ckpt:
                raise MomkdError(
                    f"checkpoint {self.dir / 'last.pt'} has no weight average (train.ema); resume "
                    "with the configuration it was written with"
                )
            self.ema.load_state_dict(ckpt["ema"])
        self.monitor.load_state_dict(ckpt["monitor"])
        self.state = _State(
            epoch=int(ckpt["epoch"]),
            step=int(ckpt["step"]),
            finished=bool(ckpt.get("finished", False)),
            history=list(ckpt.get("history", [])),
        )
        ranks = ckpt.get("rng_ranks")
        if ranks is not None and len(ranks) == self.dist.world_size:
            restore_rng_state(ranks[self.dist.rank])
        else:
            restore_rng_state(ckpt["rng"])
            if self.dist.world_size != int(ckpt.get("world_size", 1)):
                log.warning(
                    "fold %d: resumed with %d processes from a checkpoint of %d; the run goes on "
                    "but does not replay the uninterrupted one exactly",
                    self.data.fold,
                    self.dist.world_size,
                    int(ckpt.get("world_size", 1)),
                )
        log.info("fold %d: resumed after epoch %d", self.data.fold, self.state.epoch)

    def _loader(
        self, units: Sequence[str], epoch: int, *, train: bool, graph: bool | None = None
    ) -> UnitLoader:
        return UnitLoader(
            self.store,
            list(units),
            self.data.members,
            epoch=epoch,
            seed=self.seed,
            max_patches=self.cfg.train.max_patches if train else None,
            knn_k=self.knn_k if (self.graph if graph is None else graph) else None,
            num_threads=self.loader_threads,
            prefetch=max(1, self.cfg.train.prefetch),
            dtype=self.feature_dtype,
            pin_memory=self.device.type == "cuda",
            cache=self.cache,
        )

    def _fit_standardizer(self) -> None:
        """Feature mean/std over every patch of the training units (all patches, no graph).

        In a data-parallel run each rank reads its share of the units and the per-rank float64
        statistics are gathered and merged in rank order, so every rank holds the same values.
        """
        units = list(dict.fromkeys(self.data.train))
        stats = fit_feature_stats(
            self._loader(shard(units, self.dist), 0, train=False, graph=False),
            self.store.feature_dim,
        )
        if self.dist.enabled:
            parts = self.dist.all_gather_object(stats, "gathering feature statistics")
            stats = FeatureStats(self.store.feature_dim)
            for part in parts:
                stats.merge(part)
        attach_standardizer(self.model, self.store.feature_dim, stats)
        log.info(
            "fold %d: feature standardisation fitted on %d patches of %d training bags",
            self.data.fold,
            stats.n,
            len(units),
        )

    def _check_validation_size(self) -> None:
        """Say when the fold has no validation set. (Validation sets too small for model
        selection get one warning for the whole run, from :mod:`momkd.train.runner`.)"""
        d = self.data
        if not d.val:
            log.info(
                "fold %d: no validation set; training runs train.epochs=%d and keeps the last "
                "epoch's model",
                d.fold,
                self.cfg.train.epochs,
            )

    @torch.no_grad()
    def _init_memory(self) -> None:
        """Spherical k-means initialisation of C+ and C- (docs/METHOD.md §2.5) from the untrained
        model.

        Per class, the training slides are visited in a seeded order until ``memory.init_per_class``
        patch projections are collected (then subsampled to that bound). In a data-parallel run the
        visit is split over the ranks in rounds (rank ``r`` projects slide ``j * W + r``); the
        per-slide counts are shared after each round, so every rank knows where a single process
        would have stopped, the projections up to that slide are gathered on rank 0 in visiting
        order, rank 0 runs k-means and the memory is broadcast. The result does not depend on the
        number of ranks.
        """
        per_class = int(self.cfg.memory.init_per_class)
        rng = np.random.default_rng([self.seed, 2_000_003])
        by_class = {c: [s for s in self.data.train if self.data.labels[s] == c] for c in (0, 1)}
        if not by_class[0] or not by_class[1]:
            raise DataError(
                f"fold {self.data.fold}: the training set needs slides of both classes to "
                "initialise the memory"
            )
        n_slides = min(len(by_class[0]), len(by_class[1]))
        d = self.dist
        embeddings: dict[int, Tensor] = {}
        totals: dict[int, int] = {}
        self.model.eval()
        for c in (1, 0):
            order = [by_class[c][i] for i in rng.permutation(len(by_class[c]))[:n_slides]]
            mine: dict[int, Tensor] = {}  # position in `order` -> (P, S) projections
            sizes: list[int] = []  # projections per visited slide, in visiting order
            it = iter(self._loader(order[d.rank :: d.world_size], 0, train=True))
            j = 0
            while j < len(order) and sum(sizes) < per_class:
                n_local = 0
                if j + d.rank < len(order):
                    feats, edges, _ = collate([next(it)], self.device, graph=True)
                    proj = self.model(feats, edges).patch_proj.float().cpu()
                    mine[j + d.rank] = proj
                    n_local = proj.shape[0]
                sizes.extend(
                    d.all_gather_object(n_local, "memory initialisation")[: len(order) - j]
                )
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
                parts = sorted(
                    (p for rank_parts in gathered for p in rank_parts), key=lambda x: x[0]
                )
                emb = torch.cat([t for _, t in parts])
                embeddings[c] = emb if keep is None else emb[keep]
            totals[c] = min(total, per_class)
        k = int(self.spec["params"]["memory_k"])
        for c, n in totals.items():
            if n < k:
                raise DataError(
                    f"fold {self.data.fold}: {n} patch projections of class {c} for "
                    f"{k} memory components; lower model.memory_k"
                )
        if d.is_main:
            self.model.init_memory(  # type: ignore[operator]
                embeddings[1].to(self.device),
                embeddings[0].to(self.device),
                iters=int(self.cfg.memory.kmeans_iters),
                seed=self.seed,
            )
        d.broadcast_module(self.model.memory, "broadcast of the initial memory")  # type: ignore[arg-type]
        self.model.train()
        log.info(
            "fold %d: memory initialised from %d / %d projections",
            self.data.fold,
            totals[1],
            totals[0],
        )

    # ---------------------------------------------------------------------------------- epochs

    def _train_epoch(self, epoch: int) -> dict[str, Any]:
        from tqdm.auto import tqdm

        model = self.model
        model.train()
        # This rank's share of the epoch's global draw (draws r, r + W, ...); see the sampler.
        positions = self.sampler.indices(epoch)
        ids = [self.data.train[i] for i in positions]
        loader = self._loader(ids, epoch, train=True)
        wait = [0.0]
        sums: dict[str, float] = {}
        n_steps = 0
        t0 = time.perf_counter()
        bar = tqdm(
            total=len(ids),
            desc=f"fold {self.data.fold} epoch {epoch}",
            disable=not self.progress,
            leave=False,
            unit="slide",
        )
        expr_map = self.data.expression
        use_expr = uses_expression(self.method)
        after_step = getattr(model, "after_optimizer_step", None)
        reduce_fn = self.dist.memory_reduce_fn()
        params = [p for p in model.parameters() if p.requires_grad]
        patch_dropout = float(self.cfg.train.patch_dropout)
        for bags in _chunks(iter(loader), len(ids), self.batch_size, wait):
            if patch_dropout > 0.0:
                bags = [drop_patches(b, patch_dropout) for b in bags]
            feats, edges, offsets = collate(bags, self.device, graph=self.graph)
            slide_ids = [b.slide_id for b in bags]
            y = torch.tensor([self.data.labels[s] for s in slide_ids], device=self.device)
            expr = None
            if use_expr:
                assert expr_map is not None
                expr = torch.from_numpy(
                    np.stack([expr_map[self.data.cases[s]] for s in slide_ids])
                ).to(self.device)
            out = self.net(feats, edges, expr, offsets)
            loss, terms = model.loss(out, y, expr, self.weights)  # type: ignore[operator]
            if not torch.isfinite(loss):
                raise DataError(
                    f"fold {self.data.fold} epoch {epoch}: non-finite loss on slides "
                    f"{', '.join(slide_ids)}"
                )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.cfg.train.clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, self.cfg.train.clip_norm)
            lr = self.scheduled_lr(self.state.step)
            if lr is not None:
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update(model)
            if after_step is not None:
                if reduce_fn is not None:  # momentum statistics summed over the ranks
                    after_step(out, y, reduce_fn=reduce_fn)
                else:
                    after_step(out, y)
            self.state.step += 1
            n_steps += 1
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            bar.update(len(bags))
            bar.set_postfix(loss=f"{sums['loss'] / n_steps:.4f}", refresh=False)
        bar.close()
        seconds = time.perf_counter() - t0
        if self.dist.enabled:  # mean losses over every rank's steps
            keys = sorted(sums)
            tot = self.dist.all_reduce_sum(
                torch.tensor([n_steps] + [sums[k] for k in keys], dtype=torch.float64),
                "all-reduce of the epoch losses",
            ).tolist()
            total_steps = max(tot[0], 1.0)
            row: dict[str, Any] = {"train_" + k: v / total_steps for k, v in zip(keys, tot[1:])}
        else:
            row = {"train_" + k: v / max(n_steps, 1) for k, v in sums.items()}
        row.update(
            {
                "train_seconds": seconds,
                "loader_wait_s": wait[0],
                "loader_wait_share": wait[0] / seconds if seconds > 0 else 0.0,
                "steps": n_steps,
            }
        )
        return row

    def scheduled_lr(self, step: int) -> float | None:
        """Learning rate of optimizer step ``step`` (0-based) under ``train.schedule``; ``None``
        for ``plateau``, whose rate lives in the optimizer and is cut by :class:`Monitor`.

        ``constant``: ``lr``; ``cosine``: ``lr * (1 + cos(pi * t)) / 2`` with ``t`` going from 0 at
        the end of the warm-up to 1 at the last step of ``train.epochs``; both after a linear
        warm-up over ``train.warmup_epochs`` (step ``i`` of ``w`` warm-up steps: ``lr * (i+1)/w``).
        A pure function of the step, so a resumed run replays the schedule exactly.
        """
        t = self.cfg.train
        if t.schedule == "plateau":
            return None
        base = self.lr
        warm = int(round(float(t.warmup_epochs) * self.steps_per_epoch))
        if step < warm:
            return base * (step + 1) / warm
        if t.schedule == "constant":
            return base
        total = int(t.epochs) * self.steps_per_epoch
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return base * 0.5 * (1.0 + math.cos(math.pi * progress))

    def _validate(self) -> InferenceResult:
        return run_inference(
            self.model,
            self.store,
            self.data.val,
            method=self.method,
            device=self.device,
            knn_k=self.knn_k,
            labels=self.data.labels,
            collect_usage=has_memory(self.method),
            num_threads=self.loader_threads,
            prefetch=self.cfg.train.prefetch,
            members=self.data.members,
            dtype=self.feature_dtype,
            cache=self.cache,
            dist=self.dist,
        )

    def _val_score(self, res: InferenceResult, epoch: int, val_auc: float) -> float:
        """The monitored score (higher is better): the validation AUC (``train.monitor:
        val_auc``) or the negative validation loss (``val_loss``, and the fallback when the AUC is
        undefined because the validation set has one class).

        Without validation slides, and with ``train.monitor: last``, the score is the epoch number:
        the last epoch is kept and neither the plateau schedule nor early stopping ever triggers.
        """
        if not res.slide_ids or self.cfg.train.monitor == "last":
            return float(epoch)
        if self.cfg.train.monitor == "val_auc" and math.isfinite(val_auc):
            return val_auc
        score = -float(res.loss) if res.loss is not None else -math.inf
        return score if math.isfinite(score) else -math.inf

    def fit(self) -> None:
        """Run (or continue) the epoch loop until early stopping or ``train.epochs``."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        epochs = int(cfg.train.epochs)
        bar = tqdm(
            total=epochs,
            initial=self.state.epoch,
            desc=f"fold {self.data.fold}",
            disable=not self.progress,
            unit="epoch",
        )
        self._wrap()
        while not self.state.finished and self.state.epoch < epochs:
            epoch = self.state.epoch
            t0 = time.perf_counter()
            self.sampler.set_epoch(epoch)
            row: dict[str, Any] = {"epoch": epoch}
            row.update(self._train_epoch(epoch))
            with self.ema.applied(self.model) if self.ema is not None else _nullcontext():
                val = self._validate()
                teacher_auc = self._teacher_auc()
            val_auc = math.nan
            if val.slide_ids and self._val_has_both():
                y_val = np.array([self.data.labels[s] for s in val.slide_ids])
                val_auc = float(binary_metrics(y_val, val.probs)["auc"])
            score = self._val_score(val, epoch, val_auc)
            # Every rank holds the same predictions; rank 0's score decides, so that the ranks
            # never take different branches (the kept epoch, the LR cut, early stopping).
            score, val_auc = self.dist.broadcast_object((score, val_auc), "broadcast of the score")
            improved = self.monitor.update(score, epoch)
            if self.monitor.should_reduce_lr():
                for group in self.optimizer.param_groups:
                    group["lr"] = float(group["lr"]) * float(cfg.train.plateau_factor)
            row["val_auc"] = val_auc
            if teacher_auc is not None:
                row["val_auc_teacher"] = teacher_auc
            row["val_loss"] = val.loss
            row["score"] = score
            row["val_seconds"] = val.seconds
            row["lr"] = float(self.optimizer.param_groups[0]["lr"])
            tau = getattr(self.model, "tau", None)
            row["tau"] = float(tau) if tau is not None else None
            if val.usage is not None:
                for name, st in val.usage.items():
                    row[f"mem_{name}_usage"] = st["usage"]
                    row[f"mem_{name}_active_ratio"] = st["active_ratio"]
                    row[f"mem_{name}_perplexity"] = st["perplexity"]
            row["best"] = improved
            self.dist.check_identical(self.model, f"fold {self.data.fold} epoch {epoch}")
            row["seconds"] = time.perf_counter() - t0
            self.state.history.append(row)
            self.state.epoch = epoch + 1
            if self.monitor.should_stop(epoch) or self.state.epoch >= epochs:
                self.state.finished = True
            if improved:
                self._save_best(val_auc, score)
            self._save_last()
            self._write_history()
            if not self.dist.is_main:
                continue
            log.info(
                "fold %d epoch %d: loss %.4f val_auc %.4f val_loss %.4f lr %.2e (%.1fs, loader "
                "wait %.0f%%)",
                self.data.fold,
                epoch,
                row.get("train_loss", math.nan),
                val_auc,
                val.loss if val.loss is not None else math.nan,
                row["lr"],
                row["seconds"],
                100 * row["loader_wait_share"],
            )
            bar.update(1)
            bar.set_postfix(val_auc=f"{val_auc:.3f}", kept=self.monitor.best_epoch)
        bar.close()
        self.state.finished = True

    @torch.no_grad()
    def _teacher_auc(self) -> float | None:
        """Validation AUC of the omics branch alone (MoMKD's teacher): each validation unit's
        patient expression, preprocessed with the fold's training statistics, scored by
        Δ(z_o) = φ(z_o, C⁺) − φ(z_o, C⁻) against the class memory. None for other methods or
        without validation expression."""
        expr = self.data.val_expression
        score_fn = getattr(self.model, "teacher_score", None)
        if (
            not expr
            or score_fn is None
            or not getattr(self.model.cfg, "omics", False)  # type: ignore[union-attr]
            or not self._val_has_both()
        ):
            return None
        units = [u for u in self.data.val if self.data.cases[u] in expr]
        if len({self.data.labels[u] for u in units}) < 2:
            return None
        x = torch.from_numpy(np.stack([expr[self.data.cases[u]] for u in units])).to(self.device)
        was_training = self.model.training
        self.model.eval()
        try:
            temp = float(self.cfg.loss.align_temp)
            scores = score_fn(x, temp=temp).float().cpu().numpy().astype(np.float64)
        finally:
            self.model.train(was_training)
        y = np.array([self.data.labels[u] for u in units])
        return float(binary_metrics(y, scores)["auc"])

    def _val_has_both(self) -> bool:
        y = {self.data.labels[s] for s in self.data.val}
        return len(y) == 2

    def _write_history(self) -> None:
        if not self.dist.is_main:
            return
        hist = self.state.history
        write_json(self.dir / "history.json", hist)
        keys: list[str] = []
        for row in hist:
            keys.extend(k for k in row if k not in keys)
        write_csv(self.dir / "history.csv", keys, [[row.get(k) for k in keys] for row in hist])

    # ------------------------------------------------------------------------------ evaluation

    def _load_best(self) -> int:
        """Load the kept model (rank 0 reads ``best.pt`` and broadcasts it); returns its epoch
        count."""

        def read() -> int:
            ckpt = load_checkpoint(self.dir / "best.pt", map_location=self.device)
            self.model.load_state_dict(ckpt["model"])
            return int(ckpt.get("epoch", 0))

        epochs = self.dist.on_main(read, "reading best.pt")
        self.dist.broadcast_module(self.model, "broadcast of the kept model")
        return epochs

    def _predictions(
        self,
        res: InferenceResult,
        labels: Mapping[str, int] | None,
        cases: Mapping[str, str],
        thr: float | None,
        members: Mapping[str, Sequence[str]] | None = None,
    ) -> list[list[Any]]:
        rows = []
        for s, p in zip(res.slide_ids, res.probs.tolist(), strict=True):
            row: list[Any] = [
                s,
                cases.get(s, ""),
                "" if labels is None else labels[s],
                p,
                int(p > 0.5),
            ]
            if thr is not None:
                row.append(int(p > thr))
            if members is not None:
                row.append(";".join(members[s]))
            rows.append(row)
        return rows

    def evaluate(self) -> dict[str, Any]:
        """Test the best model: threshold from validation, metrics, prediction CSVs, external.

        Inference is sharded over the ranks of a data-parallel run; rank 0 alone computes the
        metrics and writes the files, and returns the result (the other ranks an empty dict).
        """
        from momkd.metrics import best_f1_threshold

        best_epochs = self._load_best()
        main = self.dist.is_main
        d = self.data
        kw: dict[str, Any] = {
            "method": self.method,
            "device": self.device,
            "knn_k": self.knn_k,
            "num_threads": self.loader_threads,
            "prefetch": self.cfg.train.prefetch,
            "progress": self.progress,
            "dtype": self.feature_dtype,
            "dist": self.dist,
        }
        header = ["slide_id", "case_id", "label", "prob", "pred"]
        members = d.members
        slides_col = ["slides"] if members is not None else []
        result: dict[str, Any] = {
            "fold": d.fold,
            "best_epoch": best_epochs - 1,
            "epochs": self.state.epoch,
            "stopped_early": self.state.epoch < int(self.cfg.train.epochs),
            "n_train": len(d.train),
            "n_val": len(d.val),
            "n_test": len(d.test),
            "monitor": self.cfg.train.monitor,
            "bag": "patient" if members is not None else "slide",
        }
        thr = 0.5
        if d.val:
            val = run_inference(
                self.model,
                self.store,
                d.val,
                labels=d.labels,
                desc=f"fold {d.fold} val",
                members=members,
                **kw,
            )
        if d.val and main:
            y_val = np.array([d.labels[s] for s in d.val])
            thr = best_f1_threshold(y_val, val.probs)
            result["val"] = binary_metrics(y_val, val.probs)
            result["val"]["loss"] = val.loss
            write_csv(
                self.dir / "val_predictions.csv",
                header + slides_col,
                self._predictions(val, d.labels, d.cases, None, members),
            )
        elif main:
            result["val"] = {}
        result["threshold"] = thr
        test = run_inference(
            self.model,
            self.store,
            d.test,
            labels=d.labels,
            desc=f"fold {d.fold} test",
            members=members,
            **kw,
        )
        ext = None
        if d.external is not None:
            ext_store, ext_ids, ext_labels, ext_cases = d.external
            ext_members = d.external_members
            ext = run_inference(
                self.model,
                ext_store,
                ext_ids,
                desc=f"fold {d.fold} external",
                members=ext_members,
                **kw,
            )
        if not main:
            return {}
        y_test = np.array([d.labels[s] for s in d.test])
        result["test"] = evaluate_with_threshold(y_test, test.probs, thr)
        if self.cfg.train.bootstrap > 0:
            lo, hi = bootstrap_auc_ci(
                y_test, test.probs, n=self.cfg.train.bootstrap, seed=self.seed
            )
            result["test"]["auc_ci_low"], result["test"]["auc_ci_high"] = lo, hi
        write_csv(
            self.dir / "test_predictions.csv",
            header + ["pred_thr"] + slides_col,
            self._predictions(test, d.labels, d.cases, thr, members),
        )
        if d.external is not None:
            assert ext is not None
            write_csv(
                self.dir / "external_predictions.csv",
                header + ["pred_thr"] + (["slides"] if ext_members is not None else []),
                self._predictions(ext, ext_labels, ext_cases, thr, ext_members),
            )
            if ext_labels is not None:
                y_ext = np.array([ext_labels[s] for s in ext_ids])
                result["external"] = evaluate_with_threshold(y_ext, ext.probs, thr)
        return result

    # ------------------------------------------------------------------------------------- run

    def run(self, resume: bool = False) -> dict[str, Any]:
        """Train (or resume) and evaluate the fold; returns the fold result written to
        ``result.json``."""
        t0 = time.perf_counter()
        if self.dist.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
        self._build()
        if self.dist.is_main:
            self._check_validation_size()
        has_last = self.dist.on_main(
            lambda: (self.dir / "last.pt").is_file(), "looking for last.pt"
        )
        if resume and has_last:
            self._load_last()
        else:
            if self.spec.get("standardize"):
                self._fit_standardizer()
            if has_memory(self.method):
                self._init_memory()
        self.fit()
        result = self.evaluate()
        if not self.dist.is_main:
            return result
        result["seconds"] = time.perf_counter() - t0
        result["device"] = str(self.device)
        result["train_seconds"] = float(sum(r.get("seconds", 0.0) for r in self.state.history))
        waits = [r.get("loader_wait_share", 0.0) for r in self.state.history]
        result["loader_wait_share"] = float(np.mean(waits)) if waits else 0.0
        write_json(self.dir / "result.json", result)
        return result
