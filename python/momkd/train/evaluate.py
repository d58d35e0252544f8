"""Histology-only inference with trained runs: ``momkd eval`` and ``momkd predict``.

Both use the best-validation-AUC model of each fold (``fold_<k>/best.pt``); a run directory gives a
fold ensemble (mean of the folds' positive-class probabilities). No expression is needed: the
omics branch is never evaluated.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from momkd._io import prob_columns
from momkd.errors import ConfigError, DataError, MomkdError
from momkd.scoring import predictions

__all__ = [
    "FoldModel",
    "ensemble_threshold",
    "evaluate_run",
    "format_eval",
    "load_fold_models",
    "predict",
]

log = logging.getLogger(__name__)

_FOLD_RE = re.compile(r"^fold_(\d+)$")


class FoldModel:
    """A trained fold model loaded from a checkpoint.

    Attributes
    ----------
    fold : int
    method : str
    model : torch.nn.Module
        In eval mode on ``device``.
    threshold : float
        The fold's validation F1 threshold (0.5 when unknown).
    knn_k : int
        k-NN graph size used in training.
    config : dict
        The run configuration stored in the checkpoint.
    path : Path
    """

    def __init__(self, path: Path, device: Any) -> None:
        from momkd._io import read_json
        from momkd.train.checkpoint import load_checkpoint
        from momkd.train.factory import build_model
        from momkd.train.summary import fold_threshold

        ckpt = load_checkpoint(path, map_location=device)
        for key in ("model", "model_config", "method"):
            if key not in ckpt:
                raise MomkdError(f"checkpoint {path} has no '{key}' entry")
        self.path = path
        self.fold = int(ckpt.get("fold", 0))
        self.method = str(ckpt["method"])
        self.config: dict[str, Any] = ckpt.get("config") or {}
        self.model = build_model(ckpt["model_config"]).to(device)
        self.model.load_state_dict(ckpt["model"])
        self.model.eval()
        self.knn_k = int((self.config.get("train") or {}).get("knn_k", 8))
        classes = (self.config.get("data") or {}).get("classes") or []
        #: Class names of a multi-class run (empty for a binary one).
        self.classes: list[str] = [str(c).strip() for c in classes]
        self.threshold = 0.5
        result = path.parent / "result.json"
        if result.is_file():
            self.threshold = fold_threshold(read_json(result))


def _device() -> Any:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_fold_models(source: str | os.PathLike[str], device: Any = None) -> list[FoldModel]:
    """Load every ``fold_<k>/best.pt`` of a run directory, or one checkpoint file.

    Parameters
    ----------
    source : path
        Run directory or checkpoint (``*.pt``).
    device : torch.device, optional
        Default: CUDA when available, else CPU.

    Returns
    -------
    list[FoldModel]
        Sorted by fold.

    Raises
    ------
    MomkdError
        No checkpoint found, or an unreadable one.
    """
    src = Path(source)
    dev = device if device is not None else _device()
    if src.is_file():
        return [FoldModel(src, dev)]
    if not src.is_dir():
        raise MomkdError(f"{src}: neither a run directory nor a checkpoint file")
    folds = []
    for child in src.iterdir():
        m = _FOLD_RE.match(child.name)
        if m and (child / "best.pt").is_file():
            folds.append((int(m.group(1)), child / "best.pt"))
    if not folds:
        raise MomkdError(f"{src}: no fold_<k>/best.pt checkpoint in this run directory")
    return [FoldModel(p, dev) for _, p in sorted(folds)]


def _predict_all(
    models: Sequence[FoldModel],
    store: Any,
    slide_ids: Sequence[str],
    progress: bool,
    members: Mapping[str, Sequence[str]] | None = None,
) -> np.ndarray:
    from momkd.train.inference import run_inference

    out: list[np.ndarray] = []
    for fm in models:
        res = run_inference(
            fm.model,
            store,
            slide_ids,
            method=fm.method,
            device=next(fm.model.parameters()).device,
            knn_k=fm.knn_k,
            progress=progress,
            desc=f"fold {fm.fold}",
            members=members,
        )
        out.append(res.probs)
    # (models, n) positive-class probabilities, or (models, n, C) class probabilities.
    return np.stack(out).astype(np.float64)


def _progress(progress: bool | None) -> bool:
    if progress is not None:
        return progress
    import sys

    if os.environ.get("MOMKD_PROGRESS", "").strip() in ("0", "false", "no"):
        return False
    return sys.stderr.isatty()


def predict(
    source: str | os.PathLike[str],
    store: str | os.PathLike[str],
    out: str | os.PathLike[str],
    slides: Sequence[str] | None = None,
    *,
    progress: bool | None = None,
) -> int:
    """Histology-only predictions of a run (fold ensemble) or of one checkpoint.

    Parameters
    ----------
    source : path
        Run directory (every ``fold_<k>/best.pt``) or a checkpoint file.
    store : path
        Cohort store with the slides.
    out : path
        Output CSV with columns ``slide_id``, ``prob_pos_fold<k>`` per fold model, ``prob_pos``
        (mean over folds), ``pred`` (``prob_pos > 0.5``: the argmax rule, as the unthresholded
        test metrics of ``train`` and ``eval``) and ``pred_thr`` (``prob_pos >`` the mean over the
        fold models of their F1 thresholds chosen on validation, ``fold_<k>/result.json``; 0.5
        for a model without one), as the ``thr_*`` metrics.
    slides : sequence of str, optional
        Only these slides (default: every slide of the store).
    progress : bool, optional
        Progress bars (default: on a terminal).

    Returns
    -------
    int
        Number of slides predicted.

    Raises
    ------
    SlideNotFoundError
        A requested slide is not in the store.
    MomkdError
        No usable checkpoint.
    """
    from momkd._io import write_csv
    from momkd.data.store import CohortStore

    models = load_fold_models(source)
    cohort = CohortStore.open(store)
    ids = list(slides) if slides else list(cohort.slide_ids)
    if not ids:
        raise DataError(f"store {store}: no slides to predict")
    missing = [s for s in ids if s not in cohort]
    if missing:
        from momkd.errors import SlideNotFoundError

        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise SlideNotFoundError(f"store {store}: slide '{missing[0]}' not found{more}")
    _check_dims(models, cohort, store)
    probs = _predict_all(models, cohort, ids, _progress(progress))
    mean = probs.mean(axis=0)
    if probs.ndim == 3:
        columns, cells = _class_cells(models, probs)
        header = ["slide_id", *columns]
        rows = [[s, *c] for s, c in zip(ids, cells, strict=True)]
    else:
        thr = ensemble_threshold(models)
        header = ["slide_id"] + [f"prob_pos_fold{fm.fold}" for fm in models]
        header += ["prob_pos", "pred", "pred_thr"]
        rows = [
            [s]
            + [float(probs[j, i]) for j in range(len(models))]
            + [float(mean[i]), int(mean[i] > 0.5), int(mean[i] > thr)]
            for i, s in enumerate(ids)
        ]
    out_path = Path(out)
    write_csv(out_path, header, rows)
    log.info("wrote %d predictions to %s", len(ids), out_path)
    return len(ids)


def _class_cells(
    models: Sequence[FoldModel], probs: np.ndarray
) -> tuple[list[str], list[list[Any]]]:
    """The class columns of a multi-class prediction CSV and each row's cells in them: the class
    probabilities of every fold model (``prob_fold<k>_<class>``), their mean (``prob_<class>``) and
    its argmax (``pred``), from ``(models, n, C)`` probabilities."""
    names = models[0].classes or [str(c) for c in range(probs.shape[2])]
    header = [f"prob_fold{fm.fold}_{c}" for fm in models for c in names]
    header += [*prob_columns(names), "pred"]
    mean = probs.mean(axis=0)
    pred = predictions(mean)
    cells = [
        [float(v) for j in range(len(models)) for v in probs[j, i]]
        + [float(v) for v in mean[i]]
        + [int(pred[i])]
        for i in range(probs.shape[1])
    ]
    return header, cells


def ensemble_threshold(models: Sequence[FoldModel]) -> float:
    """The decision threshold of a fold ensemble's ``pred_thr``: the mean of the fold models'
    validation F1 thresholds (as for the ``thr_*`` metrics of the external fold ensemble)."""
    return float(np.mean([fm.threshold for fm in models]))


def _check_dims(models: Sequence[FoldModel], cohort: Any, store: Any) -> None:
    for fm in models:
        model_cfg: Any = fm.model.cfg
        d_in = int(model_cfg.d_in)
        if d_in != int(cohort.feature_dim):
            raise DataError(
                f"store {store}: feature dim {cohort.feature_dim} but {fm.path} was trained on "
                f"{d_in}"
            )


def evaluate_run(
    run_dir: str | os.PathLike[str],
    store: str | os.PathLike[str],
    clinical: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    label_column: str | None = None,
    *,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Evaluate every fold model of a run on a labelled cohort (histology only).

    The label mapping, case and slide columns come from the run's configuration; ``label_column``
    overrides the column name.

    Parameters
    ----------
    run_dir : path
        Run directory written by ``momkd train``.
    store, clinical : path
        Cohort store and clinical table of the cohort.
    out : path, optional
        Output folder (default ``RUN_DIR/eval_<store name>``): ``predictions.csv`` and
        ``metrics.json``.
    label_column : str, optional
        Label column (default: the run's ``data.label_column``).
    progress : bool, optional
        Progress bars (default: on a terminal).

    Returns
    -------
    dict
        ``folds`` (per-fold metrics at argmax and at each fold's validation threshold), ``mean``,
        ``std`` (ddof 1), ``ensemble`` (metrics of the mean probability), ``n_slides``,
        ``excluded`` label counts, ``out`` folder.
    """
    from momkd._io import write_csv, write_json
    from momkd.data.clinical import load_clinical
    from momkd.data.store import CohortStore
    from momkd.metrics import aggregate
    from momkd.scoring import metrics_at_threshold

    run = Path(run_dir)
    models = load_fold_models(run)
    cfg = models[0].config
    data = cfg.get("data") or {}
    if not data:
        raise ConfigError(f"{run}: the checkpoints carry no run configuration")
    column = label_column or data.get("label_column", "label")
    table = load_clinical(
        clinical,
        data.get("case_column", "case_id"),
        data.get("slide_column", "slide_id"),
        column,
        data.get("positive", []),
        data.get("negative", []),
        case_insensitive=bool(data.get("label_case_insensitive", False)),
        classes=data.get("classes") or [],
    )
    cohort = CohortStore.open(store)
    missing = [s for s in table.slide_ids if s not in cohort]
    if missing:
        raise DataError(
            f"{clinical}: slide '{missing[0]}' not in store {store} ({len(missing)} of "
            f"{len(table)} labelled slides missing)"
        )
    _check_dims(models, cohort, store)
    ids = list(table.slide_ids)
    y = table.labels
    cases = table.case_of()
    members = None
    if data.get("bag") == "patient":
        # The run was trained on patient bags: a patient's slides are predicted as one bag.
        from momkd.train.inputs import patient_units

        members, unit_labels = patient_units(ids, table.label_of(), cases, str(clinical))
        ids = list(members)
        y = np.array([unit_labels[u] for u in ids], dtype=np.int64)
        cases = {u: u for u in ids}
    probs = _predict_all(models, cohort, ids, _progress(progress), members)
    names = table.class_names
    per_fold = []
    for j, fm in enumerate(models):
        m = metrics_at_threshold(y, probs[j], fm.threshold, names)
        m["fold"] = fm.fold
        per_fold.append(m)
    mean, std = aggregate([{k: v for k, v in m.items() if k != "fold"} for m in per_fold])
    ens_p = probs.mean(axis=0)
    ens_thr = ensemble_threshold(models)
    ensemble = metrics_at_threshold(y, ens_p, ens_thr, names)
    out_dir = Path(out) if out is not None else run / f"eval_{Path(store).stem}"
    slides_col = ["slides"] if members is not None else []
    if probs.ndim == 3:
        columns, cells = _class_cells(models, probs)
        header = ["slide_id", "case_id", "label", *columns, *slides_col]
        rows = [
            [s, cases[s], int(y[i]), *cells[i]]
            + ([";".join(members[s])] if members is not None else [])
            for i, s in enumerate(ids)
        ]
    else:
        header = ["slide_id", "case_id", "label"] + [f"prob_pos_fold{fm.fold}" for fm in models]
        header += ["prob_pos", "pred", "pred_thr", *slides_col]
        rows = [
            [s, cases[s], int(y[i])]
            + [float(probs[j, i]) for j in range(len(models))]
            + [float(ens_p[i]), int(ens_p[i] > 0.5), int(ens_p[i] > ens_thr)]
            + ([";".join(members[s])] if members is not None else [])
            for i, s in enumerate(ids)
        ]
    write_csv(out_dir / "predictions.csv", header, rows)
    result = {
        "run_dir": str(run),
        "store": str(store),
        "clinical": str(clinical),
        "label_column": column,
        "method": models[0].method,
        "n_slides": len(table.slide_ids),
        "bag": "patient" if members is not None else "slide",
        "n_bags": len(ids),
        **({"classes": names} if len(names) > 2 else {"n_pos": int(y.sum())}),
        "excluded": dict(table.excluded),
        "folds": per_fold,
        "mean": mean,
        "std": std,
        "ensemble": ensemble,
        "out": str(out_dir),
    }
    write_json(out_dir / "metrics.json", result)
    return result


def _f(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def format_eval(result: Mapping[str, Any]) -> str:
    """A human-readable report of :func:`evaluate_run`'s result."""
    classes = result.get("classes")
    ens = result.get("ensemble") or {}
    counts = (
        ", ".join(f"{c}: {ens.get(f'n_{c}', '?')}" for c in classes)
        if classes
        else f"{result.get('n_pos')} positive"
    )
    lines = [
        (
            f"evaluated {result.get('method', '?')} run {result.get('run_dir')} on "
            f"{result.get('n_slides')} slides ({counts}) of {result.get('store')}"
        )
    ]
    excl = result.get("excluded") or {}
    if excl:
        lines.append(
            "excluded labels: " + ", ".join(f"{k or '<empty>'}: {v}" for k, v in excl.items())
        )
    from momkd.train.summary import metric_columns

    cols = metric_columns(classes)

    widths = [max(5, len(c)) for c in cols]  # full column names, never cut

    def row(label: str, values: Mapping[str, Any]) -> str:
        cells = (f"{_f(values.get(c)):>{w}}" for c, w in zip(cols, widths, strict=True))
        return f"{label:>10} " + " ".join(cells)

    lines.append(
        f"{'model':>10} " + " ".join(f"{c:>{w}}" for c, w in zip(cols, widths, strict=True))
    )
    for m in result.get("folds", []):
        lines.append(row(f"fold {m.get('fold')}", m))
    lines.append(row("mean", result.get("mean") or {}))
    lines.append(row("std", result.get("std") or {}))
    lines.append(row("ensemble", result.get("ensemble") or {}))
    if result.get("out"):
        lines.append(f"predictions and metrics written to {result['out']}")
    return "\n".join(lines)
