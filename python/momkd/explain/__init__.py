"""Interpretability of a trained MoMKD run (docs/METHOD.md §8; ``momkd explain``).

* :func:`explain_run` — streams a cohort store through one fold's best model and writes the top-k
  patches per memory component, per-slide attention and memory-assignment maps, cohort memory
  usage, the fold's memory dynamics and (with slide images and openslide) a patch gallery;
* :mod:`momkd.explain.dynamics` — memory usage statistics and their per-epoch plot;
* :mod:`momkd.explain.topk` — the bounded running top-k table and the crop gallery;
* :mod:`momkd.explain.maps` — rasterised per-slide maps.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from momkd.errors import ConfigError, DataError, MomkdError
from momkd.explain.dynamics import (
    assignments_by_memory,
    memory_class,
    memory_history,
    memory_names,
    memory_usage_on_bags,
    plot_memory_dynamics,
    usage_from_counts,
)
from momkd.explain.maps import (
    assignment_labels,
    assignment_labels_classes,
    plot_assignment_map,
    plot_attention_map,
    safe_name,
)
from momkd.explain.topk import TopKTracker, make_gallery, read_topk_csv

if TYPE_CHECKING:
    import torch

    from momkd.data.store import CohortStore
    from momkd.model.momkd import MoMKD

__all__ = [
    "TopKTracker",
    "explain_run",
    "load_fold_model",
    "memory_history",
    "memory_usage_on_bags",
    "plot_assignment_map",
    "plot_attention_map",
    "plot_memory_dynamics",
    "read_topk_csv",
    "usage_from_counts",
]

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ model loading


def _fold_checkpoint(run_dir: Path, fold: int) -> Path:
    fold_dir = run_dir / f"fold_{fold}"
    for name in ("best.pt", "last.pt"):
        path = fold_dir / name
        if path.is_file():
            if name != "best.pt":
                logger.warning("%s: no best.pt, explaining last.pt", fold_dir)
            return path
    raise MomkdError(f"run {run_dir}: fold {fold} has no checkpoint ({fold_dir / 'best.pt'})")


def load_fold_model(
    checkpoint: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> tuple[MoMKD, dict[str, Any]]:
    """Rebuild the MoMKD model of a training checkpoint, in eval mode.

    Parameters
    ----------
    checkpoint : path
        ``fold_<k>/best.pt`` or ``last.pt`` (``momkd.train.checkpoint`` format).
    device : str or torch.device

    Returns
    -------
    model : MoMKD
    state : dict
        The checkpoint contents.

    Raises
    ------
    MomkdError
        Unreadable checkpoint, or one of another method (explanations need the class memory).
    """
    from momkd.methods import METHODS
    from momkd.model.momkd import MoMKD
    from momkd.train.checkpoint import load_checkpoint
    from momkd.train.factory import build_model

    path = Path(checkpoint)
    state = load_checkpoint(path)
    spec = state.get("model_config")
    if not isinstance(spec, dict) or not isinstance(spec.get("params"), dict):
        raise MomkdError(f"checkpoint {path}: no model_config {{method, params}}")
    method = spec.get("method") or state.get("method")
    if method not in METHODS or not METHODS[method].memory:
        raise MomkdError(
            f"checkpoint {path}: method {method!r} has no class memory; explain needs a momkd run"
        )
    try:
        model = build_model(spec)
    except (TypeError, ConfigError) as exc:
        raise MomkdError(f"checkpoint {path}: bad model_config ({exc})") from None
    assert isinstance(model, MoMKD)
    try:
        model.load_state_dict(state["model"])
    except (KeyError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MomkdError(f"checkpoint {path}: model weights do not fit ({first})") from None
    model.to(device).eval()
    return model, state


def _knn_k(state: dict[str, Any]) -> int:
    config = state.get("config")
    if isinstance(config, dict):
        train = config.get("train")
        if isinstance(train, dict) and isinstance(train.get("knn_k"), int):
            return int(train["knn_k"])
    return 8


def _pick_device(device: str | None) -> str:
    import torch

    if device not in (None, "auto"):
        return str(device)
    return "cuda" if torch.cuda.is_available() else "cpu"


# ----------------------------------------------------------------------- slides kept for maps


class _MapKeeper:
    """Keeps the arrays of the slides to map while streaming: the requested ones, or (bounded
    memory) the ``n`` most positive and ``n`` most negative predictions seen so far (one score per
    slide, two classes), or the ``n`` most probable slides of each class (C > 2 scores)."""

    def __init__(self, wanted: Sequence[str] | None, n: int, n_scores: int = 1) -> None:
        self.wanted = list(dict.fromkeys(wanted)) if wanted else None
        self.n = n
        # (sign, score index) of each ranking: most positive and most negative of one score, or
        # the most probable slides of each class.
        self.rankings = (
            [(1.0, 0), (-1.0, 0)] if n_scores == 1 else [(1.0, c) for c in range(n_scores)]
        )
        self.lists: list[list[tuple[float, int, str]]] = [[] for _ in self.rankings]
        self.data: dict[str, dict[str, Any]] = {}
        self._seen = 0

    def offer(
        self, slide_id: str, probs: Sequence[float], make: Callable[[], dict[str, Any]]
    ) -> None:
        self._seen += 1
        if self.wanted is not None:
            if slide_id in self.wanted:
                self.data[slide_id] = make()
            return
        keep: set[str] = set()
        for j, (sign, idx) in enumerate(self.rankings):
            entry = (probs[idx], self._seen, slide_id)

            def key(e: tuple[float, int, str], sign: float = sign) -> tuple[float, int]:
                return (-sign * e[0], e[1])

            self.lists[j] = sorted([*self.lists[j], entry], key=key)[: self.n]
            keep |= {e[2] for e in self.lists[j]}
        if slide_id in keep:
            self.data[slide_id] = make()
        for sid in list(self.data):
            if sid not in keep:
                del self.data[sid]

    def order(self) -> list[str]:
        if self.wanted is not None:
            return [s for s in self.wanted if s in self.data]
        ids = [e[2] for ranked in self.lists for e in ranked]
        return list(dict.fromkeys(ids))


def _class_names(state: dict[str, Any], n_classes: int) -> list[str]:
    """Class names from the checkpoint's configuration (``data.classes``), else ``class <c>``."""
    config = state.get("config")
    data = config.get("data") if isinstance(config, dict) else None
    classes = data.get("classes") if isinstance(data, dict) else None
    if isinstance(classes, list) and len(classes) == n_classes:
        return [str(c).strip() for c in classes]
    if n_classes == 2:
        return ["negative", "positive"]
    return [f"class {c}" for c in range(n_classes)]


# ------------------------------------------------------------------------------- explain_run


def explain_run(
    run_dir: str | os.PathLike[str],
    store: str | os.PathLike[str] | CohortStore,
    slides: Sequence[str] | None = None,
    top_k: int = 3,
    out: str | os.PathLike[str] | None = None,
    fold: int = 0,
    wsi_dir: str | os.PathLike[str] | None = None,
    *,
    n_maps: int = 3,
    device: str | None = None,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Explain one fold model of a run on a cohort store.

    Every slide of ``store`` is streamed once through the fold's best model (eval mode, no
    gradients, all patches). For each of the 2K memory components (C+ then C-) a running top-k of
    ``(cosine similarity <p_i, c_hat_k>, slide, patch coordinates)`` is kept (memory O(2K * top_k),
    never all patches of the cohort).

    A model of C > 2 classes (docs/METHOD.md §2.11) is explained per class: its memories are named
    ``c0``, ``c1``, ... in ``topk_patches.csv`` and ``memory_usage.json`` (which also lists the
    class names), ``slide_predictions.csv`` has one ``prob_c<j>`` column per class, the default
    maps are those of the ``n_maps`` most probable slides of each class, and each mapped slide gets
    one attention map per class, ``maps/<slide>_attention_c<j>.png``, and one assignment map.

    Written to ``out`` (default ``RUN_DIR/explain``):

    * ``topk_patches.csv`` — memory (pos|neg), component, rank (1 = most similar), slide_id, x, y,
      similarity;
    * ``slide_predictions.csv`` — slide_id, n_patches, prob_pos (histology-only prediction);
    * ``memory_usage.json`` — usage of C+ and C- over all patches of the cohort;
    * ``memory_dynamics.png`` — the fold's per-epoch usage dynamics (if the history records them);
    * ``maps/<slide>_attention.png`` and ``maps/<slide>_assignment.png`` for ``slides`` (default:
      the ``n_maps`` most positive and ``n_maps`` most negative predictions);
    * ``topk_gallery.png`` — crops of the top patches, with ``wsi_dir`` and openslide installed.

    Parameters
    ----------
    run_dir : path
        Run directory written by ``momkd train``.
    store : path or CohortStore
        Cohort to explain (features of the run's dimension).
    slides : sequence of str, optional
        Slides to draw maps for.
    top_k : int
        Patches kept per component.
    out : path, optional
        Output folder.
    fold : int
        Which fold's model.
    wsi_dir : path, optional
        Folder of slide images ``<slide_id>.svs|.tif|...`` for the crop gallery.
    n_maps : int
        Default number of most positive / most negative slides to map.
    device : str, optional
        ``cpu``, ``cuda``...; default CUDA when available.
    progress : bool, optional
        Progress bar; default on a terminal only.

    Returns
    -------
    dict
        Paths written: ``out``, ``topk_csv``, ``predictions``, ``memory_usage``,
        ``memory_dynamics`` (or None), ``gallery`` (or None), ``maps`` (list).

    Raises
    ------
    MomkdError
        Missing run, fold or checkpoint; a non-MoMKD run.
    SlideNotFoundError
        A requested slide is not in the store.
    DataError
        The store's feature dimension differs from the model's.
    """
    import torch
    from tqdm.auto import tqdm

    from momkd.data.loader import BagLoader
    from momkd.data.store import CohortStore

    run = Path(run_dir)
    if not run.is_dir():
        raise MomkdError(f"run directory {run} does not exist")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ConfigError(f"explain: top_k must be a positive integer, got {top_k!r}")
    if wsi_dir is not None and not Path(wsi_dir).is_dir():
        # checked before any output is written
        raise MomkdError(f"explain: --wsi-dir {wsi_dir} is not a folder")
    dev = _pick_device(device)
    ckpt_path = _fold_checkpoint(run, fold)
    model, state = load_fold_model(ckpt_path, device=dev)
    cohort = store if isinstance(store, CohortStore) else CohortStore.open(store)
    if cohort.feature_dim != model.cfg.d_in:
        raise DataError(
            f"store {cohort.path}: feature dimension {cohort.feature_dim} differs from the model's "
            f"{model.cfg.d_in} ({ckpt_path})"
        )
    if slides:
        for sid in slides:
            cohort.index_of(sid)  # SlideNotFoundError naming the store and the slide
    out_dir = Path(out) if out is not None else run / "explain"
    out_dir.mkdir(parents=True, exist_ok=True)
    k = int(model.cfg.memory_k)
    n_classes = int(model.cfg.n_classes)
    binary = n_classes == 2
    names = memory_names(n_classes)
    class_names = _class_names(state, n_classes)
    # Maps take the grid step from the coordinates themselves (robust to a header patch size given
    # at another level or to overlapping patches); gallery crops use the header's level-0 size.
    patch_size = cohort.header.get("patch_size")
    patch_size = int(patch_size) if isinstance(patch_size, int) and patch_size > 0 else None

    tracker = TopKTracker(k, top_k, memories=names)
    counts = np.zeros((len(names), k), dtype=np.int64)
    keeper = _MapKeeper(slides, n_maps, 1 if binary else n_classes)
    preds: list[tuple[str, int, list[float]]] = []
    loader = BagLoader(cohort, knn_k=_knn_k(state), max_patches=None)
    disable = None if progress is None else not progress
    with torch.no_grad():
        hats = model.memory.normalized_classes()
        memory = torch.cat([hats[memory_class(n)] for n in names]).to(dev)  # (C * K, S)
        for bag in tqdm(loader, total=len(loader), desc="explain", unit="slide", disable=disable):
            assert bag.edge_index is not None
            res = model(bag.features.to(dev), bag.edge_index.to(dev))
            sims = res.patch_proj.float() @ memory.T  # (P, C * K), C+ first with two classes
            tracker.update(bag.slide_id, sims, bag.coords)
            assign = {n: a.cpu() for n, a in assignments_by_memory(res).items()}
            for i, name in enumerate(names):
                counts[i] += np.bincount(assign[name].numpy(), minlength=k)[:k]
            probs = torch.softmax(res.logits[0].float(), dim=-1).tolist()
            # Two classes: the positive probability, as before; C > 2: every class's.
            scores = [probs[1]] if binary else probs
            preds.append((bag.slide_id, bag.n_patches, scores))

            def arrays(bag: Any = bag, res: Any = res, assign: Any = assign) -> dict[str, Any]:
                score = res.score.float().cpu().numpy()
                if binary:
                    labels = assignment_labels(score, assign["pos"], assign["neg"], k)
                else:
                    by_class = [assign[f"c{c}"] for c in range(n_classes)]
                    labels = assignment_labels_classes(score, by_class, k)
                return {
                    "coords": bag.coords.numpy().copy(),
                    "attention": res.attention.float().cpu().numpy(),
                    "labels": labels,
                }

            keeper.offer(bag.slide_id, scores, arrays)

    result: dict[str, Any] = {"out": out_dir}
    result["topk_csv"] = tracker.write_csv(out_dir / "topk_patches.csv")
    pred_path = out_dir / "slide_predictions.csv"
    with open(pred_path, "w", newline="") as fh:
        w = csv.writer(fh)
        prob_cols = ["prob_pos"] if binary else [f"prob_c{c}" for c in range(n_classes)]
        w.writerow(["slide_id", "n_patches", *prob_cols])
        for sid, n, ps in preds:
            w.writerow([sid, n, *(f"{p:.6f}" for p in ps)])
    result["predictions"] = pred_path

    usage: dict[str, Any] = {name: usage_from_counts(counts[i]) for i, name in enumerate(names)}
    if not binary:
        usage = {"classes": class_names, **usage}
    usage_path = out_dir / "memory_usage.json"
    usage_path.write_text(
        json.dumps(
            {"fold": fold, "store": str(cohort.path), "slides": len(preds), **usage}, indent=2
        )
    )
    result["memory_usage"] = usage_path

    result["memory_dynamics"] = None
    hist_path = run / f"fold_{fold}" / "history.json"
    if hist_path.is_file():
        try:
            result["memory_dynamics"] = plot_memory_dynamics(
                hist_path,
                out_dir / "memory_dynamics.png",
                title=f"Memory dynamics, fold {fold}",
                class_names=None if binary else class_names,
            )
        except DataError as exc:
            logger.info("memory dynamics not plotted: %s", exc)

    maps: list[Path] = []
    prob_of = {sid: ps for sid, _, ps in preds}
    for sid in keeper.order():
        d = keeper.data[sid]
        name = safe_name(sid)
        ps = prob_of[sid]
        if binary:
            maps.append(
                plot_attention_map(
                    sid,
                    d["coords"],
                    d["attention"],
                    out_dir / "maps" / f"{name}_attention.png",
                    prob=ps[0],
                )
            )
        else:
            for c in range(n_classes):
                maps.append(
                    plot_attention_map(
                        sid,
                        d["coords"],
                        d["attention"][:, c],
                        out_dir / "maps" / f"{name}_attention_c{c}.png",
                        prob=ps[c],
                        prob_of=class_names[c],
                        what=f"Attention of C^{c}",
                    )
                )
        maps.append(
            plot_assignment_map(
                sid,
                d["coords"],
                d["labels"],
                k,
                out_dir / "maps" / f"{name}_assignment.png",
                attention=d["attention"] if binary else d["attention"].max(axis=1),
                prob=ps[0] if binary else max(ps),
                n_memories=2 if binary else n_classes,
            )
        )
    result["maps"] = maps

    result["gallery"] = None
    if wsi_dir is not None:
        size = patch_size
        if size is None:
            size = 256
            logger.warning("store %s has no patch_size; gallery crops use 256 px", cohort.path)
        result["gallery"] = make_gallery(
            tracker.rows(), wsi_dir, out_dir / "topk_gallery.png", size
        )
    logger.info("explain: %d slides, outputs in %s", len(preds), out_dir)
    return result
