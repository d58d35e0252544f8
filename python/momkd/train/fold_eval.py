"""A fold's final evaluation: the kept model on the validation, test and external units, the
decision threshold chosen on validation, the metrics and the prediction CSVs of ``fold_<k>/``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from momkd._io import prob_columns, write_csv
from momkd.config import RunConfig
from momkd.data.store import CohortStore
from momkd.metrics import best_f1_threshold
from momkd.scoring import (
    auc_ci,
    is_multiclass,
    metrics,
    metrics_at_threshold,
    predictions,
)
from momkd.train.distributed import Dist
from momkd.train.fold_data import FoldData
from momkd.train.inference import InferenceResult, run_inference

__all__ = ["PREDICTION_HEADER", "evaluate_fold", "prediction_header", "prediction_rows"]

#: The leading columns of every binary prediction CSV (``pred_thr`` and ``slides`` may follow).
PREDICTION_HEADER = ["slide_id", "case_id", "label", "prob", "pred"]


def prediction_header(class_names: Sequence[str] | None = None) -> list[str]:
    """The leading columns of a prediction CSV: :data:`PREDICTION_HEADER` for two classes, one
    ``prob_<class>`` column per class (and the argmax ``pred``) for more."""
    if class_names is None or len(class_names) <= 2:
        return list(PREDICTION_HEADER)
    return ["slide_id", "case_id", "label", *prob_columns(class_names), "pred"]


def prediction_rows(
    res: InferenceResult,
    labels: Mapping[str, int] | None,
    cases: Mapping[str, str],
    thr: float | None,
    members: Mapping[str, Sequence[str]] | None = None,
) -> list[list[Any]]:
    """One CSV row per predicted unit: id, patient, label (empty without labels), probability (one
    per class for more than two), prediction (at 0.5, or the argmax), at ``thr`` (when given) and
    the unit's slides (patient bags)."""
    if is_multiclass(res.probs):
        pred = predictions(res.probs).tolist()
        rows: list[list[Any]] = []
        for i, s in enumerate(res.slide_ids):
            cells: list[Any] = [s, cases.get(s, ""), "" if labels is None else labels[s]]
            cells += [*res.probs[i].tolist(), pred[i]]
            if members is not None:
                cells.append(";".join(members[s]))
            rows.append(cells)
        return rows
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


def evaluate_fold(
    model: nn.Module,
    data: FoldData,
    store: CohortStore,
    fold_dir: Path,
    *,
    cfg: RunConfig,
    dist: Dist,
    inference: Mapping[str, Any],
    seed: int,
    epochs: int,
    kept_epochs: int,
) -> dict[str, Any]:
    """Test the kept model: threshold from validation, metrics, prediction CSVs, external.

    Inference is sharded over the ranks of a data-parallel run; rank 0 alone computes the metrics
    and writes the files, and returns the result (the other ranks an empty dict).

    Parameters
    ----------
    model : nn.Module
        The kept model, already loaded on every rank.
    data : FoldData
    store : CohortStore
    fold_dir : Path
        Where the prediction CSVs go.
    cfg : RunConfig
    dist : Dist
    inference : mapping
        Keyword arguments of :func:`~momkd.train.inference.run_inference` shared by every split
        (method, device, loader settings, ``dist``).
    seed : int
        Seed of the per-fold bootstrap CI.
    epochs : int
        Epochs trained.
    kept_epochs : int
        Epoch count of the kept model.
    """
    main = dist.is_main
    d = data
    kw = dict(inference)
    names = cfg.class_names
    multi = cfg.n_classes > 2
    header = prediction_header(names)
    thr_col = [] if multi else ["pred_thr"]
    members = d.members
    slides_col = ["slides"] if members is not None else []
    result: dict[str, Any] = {
        "fold": d.fold,
        "best_epoch": kept_epochs - 1,
        "epochs": epochs,
        "stopped_early": epochs < int(cfg.train.epochs),
        "n_train": len(d.train),
        "n_val": len(d.val),
        "n_test": len(d.test),
        "monitor": cfg.train.monitor,
        "bag": "patient" if members is not None else "slide",
    }
    thr = 0.5
    if d.val:
        val = run_inference(
            model,
            store,
            d.val,
            labels=d.labels,
            desc=f"fold {d.fold} val",
            members=members,
            **kw,
        )
    if d.val and main:
        y_val = np.array([d.labels[s] for s in d.val])
        if not multi:
            thr = best_f1_threshold(y_val, val.probs)
        result["val"] = metrics(y_val, val.probs, names)
        result["val"]["loss"] = val.loss
        write_csv(
            fold_dir / "val_predictions.csv",
            header + slides_col,
            prediction_rows(val, d.labels, d.cases, None, members),
        )
    elif main:
        result["val"] = {}
    # More than two classes: the prediction is the argmax, there is no threshold to choose.
    result["threshold"] = None if multi else thr
    test = run_inference(
        model,
        store,
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
            model,
            ext_store,
            ext_ids,
            desc=f"fold {d.fold} external",
            members=ext_members,
            **kw,
        )
    if not main:
        return {}
    y_test = np.array([d.labels[s] for s in d.test])
    result["test"] = metrics_at_threshold(y_test, test.probs, thr, names)
    if cfg.train.bootstrap > 0:
        lo, hi = auc_ci(y_test, test.probs, n=cfg.train.bootstrap, seed=seed)
        result["test"]["auc_ci_low"], result["test"]["auc_ci_high"] = lo, hi
    write_csv(
        fold_dir / "test_predictions.csv",
        header + thr_col + slides_col,
        prediction_rows(test, d.labels, d.cases, None if multi else thr, members),
    )
    if d.external is not None:
        assert ext is not None
        write_csv(
            fold_dir / "external_predictions.csv",
            header + thr_col + (["slides"] if ext_members is not None else []),
            prediction_rows(ext, ext_labels, ext_cases, None if multi else thr, ext_members),
        )
        if ext_labels is not None:
            y_ext = np.array([ext_labels[s] for s in ext_ids])
            result["external"] = metrics_at_threshold(y_ext, ext.probs, thr, names)
    return result
