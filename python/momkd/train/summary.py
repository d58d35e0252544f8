"""The run summary: every finished fold merged into ``summary.json``, ``summary.txt`` and the
external fold-ensemble CSV (pooled and patient-level metrics with bootstrap CIs), and its text
form (``momkd summarize``).

``summary.json`` keys: ``method``, ``label_column``, ``folds`` (per-fold dicts with ``val``,
``test`` and, with an external cohort, ``external`` metric dicts), ``mean`` and ``std`` (test
metrics over folds, ddof 1), ``val_mean``, ``pooled`` (metrics of all folds' test predictions
pooled), ``ci`` (``auc: [low, high]`` of the pooled test AUC, ``level``, ``resamples``, ``seed``),
``external`` (``folds``, ``mean``, ``std``, ``ensemble`` and its ``ci``), ``patient`` (the same at
patient level: slide probabilities averaged per patient; ``folds``, ``mean``, ``std``, ``pooled``,
``ci``, ``external``), ``data`` (slides, patients, class counts, excluded label values) and
``timing``.

Confidence intervals are stratified percentile bootstraps (:func:`momkd.metrics.bootstrap_auc_ci`,
``train.ci_resamples`` resamples, seeded with ``train.seed``; 0 turns them off). The pooled AUC ranks
predictions of different fold models against each other; the per-fold mean ± std does not.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from momkd._io import class_prob_columns, prob_columns
from momkd.config import RunConfig, load_config
from momkd.errors import ConfigError, DataError
from momkd.metrics import aggregate, patient_level
from momkd.scoring import (
    auc_ci,
    is_multiclass,
    metrics,
    metrics_at_threshold,
    predictions,
)
from momkd.train.inputs import (
    external_units,
    load_external,
    load_inputs,
)
from momkd.train.rundir import finished_folds

__all__ = [
    "METRIC_COLUMNS",
    "fold_threshold",
    "format_summary",
    "metric_columns",
    "read_prediction_table",
    "summarize",
    "write_summary",
]


def write_summary(
    cfg: RunConfig,
    run_dir: Path,
    data_report: dict[str, Any],
    external: Any,
    timing: dict[str, Any] | Callable[[list[int], list[dict[str, Any]]], dict[str, Any]],
) -> dict[str, Any]:
    """Merge every finished fold of ``run_dir`` into ``summary.json``, ``summary.txt`` and the
    external fold-ensemble CSV. ``timing`` is the summary's ``timing`` block, or a function of the
    merged folds and their results that makes it (under the lock, from the same folds).

    Fold processes of one run (``--fold-parallel``, a job array) may finish at the same time: the
    merge runs under an exclusive lock on ``RUN_DIR/.summary.lock``, so the last one to finish sees
    every fold and writes the complete summary.
    """
    import fcntl

    from momkd._io import read_json, write_csv, write_json

    with open(run_dir / ".summary.lock", "a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        folds = finished_folds(run_dir)
        results = [read_json(run_dir / f"fold_{f}" / "result.json") for f in folds]
        summary = _summarise(cfg, run_dir, results, data_report, external, folds)
        summary["timing"] = dict(timing(folds, results) if callable(timing) else timing)
        summary["timing"]["fold_seconds"] = [float(r.get("seconds", 0.0)) for r in results]
        if external is not None and "ensemble_rows" in summary:
            write_csv(
                run_dir / "external_predictions.csv",
                summary.pop("ensemble_header"),
                summary.pop("ensemble_rows"),
            )
        write_json(run_dir / "summary.json", summary)
        summary = read_json(run_dir / "summary.json")
        text = format_summary(summary) + "\n"
        (run_dir / "summary.txt").write_text(text, encoding="utf-8")
    return summary  # type: ignore[no-any-return]


def summarize(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Merge the finished folds of a run directory into ``summary.json`` and ``summary.txt``
    (``momkd summarize``): after fold-parallel runs or a job array with one fold per task.

    Parameters
    ----------
    run_dir : path
        A run directory written by :func:`train` (``config.yaml``, ``fold_<k>/result.json``).

    Returns
    -------
    dict
        The summary, as in :func:`train`.

    Raises
    ------
    ConfigError
        Not a run directory, or no finished fold.
    """
    from momkd._io import read_json

    run = Path(run_dir).expanduser().absolute()
    if not (run / "config.yaml").is_file():
        raise ConfigError(f"{run}: not a momkd run directory (no config.yaml)")
    if not finished_folds(run):
        raise ConfigError(f"{run}: no finished fold (fold_<k>/result.json) to summarise")
    cfg = load_config(run / "config.yaml")
    if (run / "data.json").is_file():
        data_report = read_json(run / "data.json")
    else:
        data_report = load_inputs(cfg)[3]
    external = load_external(cfg)
    if external is not None:
        data_report["external"] = external[4]
        external, _ = external_units(cfg, external)
    return write_summary(
        cfg, run, data_report, external, lambda folds, results: _merged_timing(run, folds, results)
    )


def _merged_timing(run: Path, folds: list[int], results: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``timing`` block of a summary merged by :func:`summarize` from ``folds`` and their
    ``result.json`` contents: the existing summary's own when it already holds exactly these
    folds (nothing new to merge), else the sum of the folds' times on the device(s) they name."""
    from momkd._io import read_json

    previous: dict[str, Any] = {}
    if (run / "summary.json").is_file():
        try:
            previous = read_json(run / "summary.json")
        except (OSError, ValueError):
            previous = {}
    raw = previous.get("timing")
    old: dict[str, Any] = raw if isinstance(raw, dict) else {}
    merged = [r.get("fold") for r in previous.get("folds") or [] if isinstance(r, dict)]
    if old and merged == folds:
        return {k: v for k, v in old.items() if k != "fold_seconds"}
    devices = sorted({str(r["device"]) for r in results if r.get("device")})
    if not devices and old.get("device"):
        devices = [str(old["device"])]
    timing: dict[str, Any] = {
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": float(sum(float(r.get("seconds", 0.0)) for r in results)),
        "seconds_basis": "sum of the folds' times",
    }
    if devices:
        timing["device"] = ", ".join(devices)
    return timing


def fold_threshold(result: Mapping[str, Any]) -> float:
    """A fold's decision threshold (0.5 where there is none: more than two classes)."""
    thr = result.get("threshold", 0.5)
    return 0.5 if thr is None else float(thr)


def _nan_metrics(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (math.nan if v is None else v) for k, v in d.items()}


def read_prediction_table(
    path: str | os.PathLike[str], column: str = "prob"
) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """Slide ids, patient ids, labels and probabilities of a labelled prediction CSV.

    Parameters
    ----------
    path
        A ``test_predictions.csv``/``external_predictions.csv`` written by a run (columns
        ``slide_id``, ``case_id``, ``label`` and ``column``).
    column
        The probability column.

    Returns
    -------
    tuple
        ``slide_ids``, ``case_ids``, ``labels`` ``(n,)`` int64, ``probs`` ``(n,)`` float64 (or
        ``(n, C)`` from the ``prob_<class>`` columns of a multi-class file, when ``column`` is
        ``prob``).

    Raises
    ------
    DataError
        A missing column, an empty or non-numeric label or probability (naming the file).
    """
    import csv

    path = Path(path)
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            fields = reader.fieldnames or []
            rows = list(reader)
    except OSError as exc:
        raise DataError(f"{path}: cannot read predictions: {exc}") from None
    class_cols = class_prob_columns(fields) if column == "prob" else []
    wanted = ["slide_id", "label"] + (class_cols[:1] if class_cols else [column])
    missing = [c for c in wanted if c not in fields]
    if missing:
        raise DataError(f"{path}: missing column {', '.join(missing)}")
    try:
        labels = np.array([int(float(r["label"])) for r in rows], dtype=np.int64)
        if class_cols:
            probs = np.array([[float(r[c]) for c in class_cols] for r in rows], dtype=np.float64)
            probs = probs.reshape(len(rows), len(class_cols))
        else:
            probs = np.array([float(r[column]) for r in rows], dtype=np.float64)
    except ValueError as exc:
        what = "class probability" if class_cols else repr(column)
        raise DataError(f"{path}: empty or non-numeric label or {what} ({exc})") from None
    slides = [r["slide_id"] for r in rows]
    cases = [r.get("case_id") or "" for r in rows]
    return slides, cases, labels, probs


def _ci(y: np.ndarray, p: np.ndarray, cfg: RunConfig) -> dict[str, Any]:
    n = cfg.train.ci_resamples
    if n <= 0:
        return {}
    low, high = auc_ci(y, p, n=n, seed=cfg.train.seed)
    return {
        "auc": [low, high],
        "level": 0.95,
        "resamples": n,
        "seed": cfg.train.seed,
        "method": "stratified percentile bootstrap",
    }


def _pooled_and_patient(
    cfg: RunConfig, run_dir: Path, results: list[dict[str, Any]], folds: list[int]
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Pooled slide-level metrics with CI, and the patient-level block (without external)."""
    names = cfg.class_names
    ys: list[np.ndarray] = []
    ps: list[np.ndarray] = []
    pat_y: list[np.ndarray] = []
    pat_p: list[np.ndarray] = []
    pat_folds: list[dict[str, Any]] = []
    for fold, r in zip(folds, results, strict=True):
        slides, cases, y, p = read_prediction_table(
            run_dir / f"fold_{fold}" / "test_predictions.csv"
        )
        ys.append(y)
        ps.append(p)
        _, y_pat, p_pat = patient_level(cases, y, p, slide_ids=slides)
        pat_y.append(y_pat)
        pat_p.append(p_pat)
        m = metrics_at_threshold(y_pat, p_pat, fold_threshold(r), names)
        pat_folds.append({"fold": fold, "test": m})
    y_all, p_all = np.concatenate(ys), np.concatenate(ps)
    pooled = metrics(y_all, p_all, names)
    ci = _ci(y_all, p_all, cfg)
    yp, pp = np.concatenate(pat_y), np.concatenate(pat_p)
    mean, std = aggregate([f["test"] for f in pat_folds])
    patient = {
        "folds": pat_folds,
        "mean": mean,
        "std": std,
        "pooled": metrics(yp, pp, names),
        "ci": _ci(yp, pp, cfg),
        "aggregation": "mean slide probability per patient",
    }
    return pooled, ci, patient


def _summarise(
    cfg: RunConfig,
    run_dir: Path,
    results: list[dict[str, Any]],
    data_report: dict[str, Any],
    external: Any,
    folds: list[int],
) -> dict[str, Any]:
    from momkd._io import read_csv_predictions

    tests = [_nan_metrics(r["test"]) for r in results]
    vals = [_nan_metrics(r.get("val") or {}) for r in results]
    mean, std = aggregate(tests)
    val_mean, val_std = aggregate(vals) if all(vals) else ({}, {})
    summary: dict[str, Any] = {
        "method": cfg.model.method,
        "run_dir": str(run_dir),
        "label_column": cfg.data.label_column,
        "folds": results,
        "mean": mean,
        "std": std,
        "val_mean": val_mean,
        "val_std": val_std,
        "data": data_report,
    }
    if cfg.n_classes > 2:
        summary["classes"] = cfg.class_names
    summary["pooled"], summary["ci"], summary["patient"] = _pooled_and_patient(
        cfg, run_dir, results, folds
    )
    if external is not None:
        _, ext_ids, ext_labels, ext_cases, _ = external
        per_fold = [_nan_metrics(r["external"]) for r in results if "external" in r]
        probs = []
        for fold in folds:
            rows = read_csv_predictions(run_dir / f"fold_{fold}" / "external_predictions.csv")
            probs.append([rows[s] for s in ext_ids])
        p = np.mean(np.asarray(probs, dtype=np.float64), axis=0)
        thr = float(np.mean([fold_threshold(r) for r in results]))
        names = cfg.class_names
        ext_summary: dict[str, Any] = {"folds": per_fold}
        if per_fold:
            ext_summary["mean"], ext_summary["std"] = aggregate(per_fold)
        if ext_labels is not None:
            y = np.array([ext_labels[s] for s in ext_ids])
            ext_summary["ensemble"] = metrics_at_threshold(y, p, thr, names)
            ext_summary["ci"] = _ci(y, p, cfg)
            cases = [ext_cases.get(s, "") for s in ext_ids]
            _, y_pat, p_pat = patient_level(cases, y, p, slide_ids=ext_ids)
            summary["patient"]["external"] = {
                "ensemble": metrics_at_threshold(y_pat, p_pat, thr, names),
                "ci": _ci(y_pat, p_pat, cfg),
            }
        summary["external"] = ext_summary
        rows_out = []
        if is_multiclass(p):
            # The fold ensemble's class probabilities (each fold's are in its own CSV).
            header = ["slide_id", "case_id", "label", *prob_columns(names), "pred"]
            pred = predictions(p)
            for i, s in enumerate(ext_ids):
                rows_out.append(
                    [s, ext_cases.get(s, ""), "" if ext_labels is None else ext_labels[s]]
                    + [float(v) for v in p[i]]
                    + [int(pred[i])]
                )
        else:
            header = ["slide_id", "case_id", "label"] + [f"prob_fold{f}" for f in folds]
            header += ["prob", "pred"]
            for i, s in enumerate(ext_ids):
                rows_out.append(
                    [s, ext_cases.get(s, ""), "" if ext_labels is None else ext_labels[s]]
                    + [float(pf[i]) for pf in probs]
                    + [float(p[i]), int(p[i] > 0.5)]
                )
        summary["ensemble_header"] = header
        summary["ensemble_rows"] = rows_out
    return summary


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _pm(mean: Mapping[str, Any], std: Mapping[str, Any], key: str) -> str:
    return f"{_fmt(mean.get(key))} ± {_fmt(std.get(key))}"


def _ci_text(ci: Any) -> str:
    """`` (95% CI low-high)`` from a summary ``ci`` block, or nothing."""
    if not isinstance(ci, Mapping) or not isinstance(ci.get("auc"), Sequence):
        return ""
    low, high = ci["auc"]
    level = ci.get("level", 0.95)
    return f" ({100 * float(level):.0f}% CI {_fmt(low)}–{_fmt(high)})"


#: Metric columns of the per-fold tables in ``summary.txt`` and ``momkd eval`` (full names).
METRIC_COLUMNS = (
    "auc",
    "auprc",
    "accuracy",
    "balanced_accuracy",
    "f1",
    "thr_accuracy",
    "thr_balanced_accuracy",
    "thr_f1",
)


def metric_columns(classes: Sequence[str] | None) -> tuple[str, ...]:
    """The metric columns of the per-fold tables: :data:`METRIC_COLUMNS` for two classes; the macro
    AUC, each class's one-vs-rest AUC and the argmax metrics for more."""
    if not classes:
        return METRIC_COLUMNS
    return ("auc", *[f"auc_{c}" for c in classes], "accuracy", "balanced_accuracy", "f1")


def format_summary(summary: Mapping[str, Any]) -> str:
    """A human-readable report of a run summary (the content of ``summary.txt``).

    Parameters
    ----------
    summary : mapping
        As returned by :func:`train` / stored in ``summary.json``.

    Returns
    -------
    str
        Multi-line text: data, per-fold validation/test metrics, mean ± std, external cohort.
    """
    lines = []
    method = summary.get("method", "?")
    lines.append(f"momkd run: method {method}, label {summary.get('label_column', '?')}")
    if summary.get("run_dir"):
        lines.append(f"run directory: {summary['run_dir']}")
    classes = summary.get("classes")
    cols = metric_columns(classes)
    if classes:
        lines.append(
            f"classes: {', '.join(map(str, classes))} (auc: macro one-vs-rest; auc_<class>: that "
            "class against the others; predictions: the most probable class)"
        )
    data = summary.get("data") or {}
    if data and data.get("classes"):
        excl = data.get("excluded") or {}
        excl_s = ", ".join(f"{k or '<empty>'}: {v}" for k, v in excl.items()) or "none"
        counts = ", ".join(f"{k}: {v}" for k, v in data["classes"].items())
        lines.append(
            f"data: {data.get('slides')} slides, {data.get('patients')} patients ({counts}); "
            f"excluded labels: {excl_s}"
        )
    elif data:
        excl = data.get("excluded") or {}
        excl_s = ", ".join(f"{k or '<empty>'}: {v}" for k, v in excl.items()) or "none"
        lines.append(
            f"data: {data.get('slides')} slides, {data.get('patients')} patients "
            f"({data.get('positive')} positive / {data.get('negative')} negative slides); "
            f"excluded labels: {excl_s}"
        )
    skipped = data.get("skipped_no_expression") or {}
    if skipped.get("slides"):
        lines.append(
            f"skipped without expression: {skipped['slides']} slides of "
            f"{skipped['patients']} patients"
        )
    # Each column is as wide as its full name (names are never cut) and at least 5 wide.
    widths = [max(5, len(c)) for c in cols]
    head = f"{'fold':>4} {'epochs':>6} {'best':>4} {'val_auc':>7} {'thr':>5} " + " ".join(
        f"{c:>{w}}" for c, w in zip(cols, widths, strict=True)
    )
    lines.append("")
    lines.append("test metrics per fold:")
    lines.append(
        "  epochs: epochs trained; best: the epoch kept by train.monitor (counted from 0); "
        "val_auc: its validation AUC"
    )
    if not classes:
        lines.append(
            "  thr: the threshold that maximises F1 on the validation slides; auc to f1: at argmax "
            "(probability > 0.5); thr_*: at thr"
        )
    lines.append(head)
    for r in summary.get("folds", []):
        test = r.get("test", {})
        lines.append(
            f"{r.get('fold', '?'):>4} {r.get('epochs', '?'):>6} {r.get('best_epoch', '?'):>4} "
            f"{_fmt((r.get('val') or {}).get('auc')):>7} {_fmt(r.get('threshold'), 2):>5} "
            + " ".join(f"{_fmt(test.get(c)):>{w}}" for c, w in zip(cols, widths, strict=True))
        )
    mean, std = summary.get("mean") or {}, summary.get("std") or {}
    lines.append("")
    lines.append(
        "mean ± std (ddof 1): "
        + ", ".join(
            f"{c} {_pm(mean, std, c)}"
            for c in (cols if classes else ("auc", "auprc", "accuracy", "balanced_accuracy", "f1"))
        )
    )
    pooled = summary.get("pooled") or {}
    if pooled:
        lines.append(
            f"pooled test predictions ({pooled.get('n')} slides): auc {_fmt(pooled.get('auc'))}"
            f"{_ci_text(summary.get('ci'))}"
            + ("" if classes else f", auprc {_fmt(pooled.get('auprc'))}")
        )
        if classes and pooled.get("confusion"):
            width = max(6, *(len(str(c)) for c in classes))
            lines.append("  confusion matrix (rows: true class, columns: predicted):")
            lines.append("  " + " " * width + " " + " ".join(f"{c:>{width}}" for c in classes))
            for c, row in zip(classes, pooled["confusion"], strict=True):
                lines.append(f"  {c:>{width}} " + " ".join(f"{int(v):>{width}}" for v in row))
    patient = summary.get("patient") or {}
    if patient:
        p_mean, p_std = patient.get("mean") or {}, patient.get("std") or {}
        p_pooled = patient.get("pooled") or {}
        lines.append(
            f"patient level (mean slide probability per patient, {p_pooled.get('n')} patients): "
            f"auc {_pm(p_mean, p_std, 'auc')} over folds, pooled {_fmt(p_pooled.get('auc'))}"
            f"{_ci_text(patient.get('ci'))}"
        )
    ext = summary.get("external")
    if ext:
        lines.append("")
        lines.append("external cohort:")
        for i, m in enumerate(ext.get("folds", [])):
            lines.append(
                f"  fold model {i}: auc {_fmt(m.get('auc'))}, "
                + ("" if classes else f"auprc {_fmt(m.get('auprc'))}, ")
                + f"balanced_accuracy {_fmt(m.get('balanced_accuracy'))}"
            )
        if ext.get("mean"):
            lines.append(f"  mean ± std: auc {_pm(ext['mean'], ext.get('std') or {}, 'auc')}")
        ens = ext.get("ensemble")
        if ens:
            lines.append(
                f"  fold ensemble: auc {_fmt(ens.get('auc'))}{_ci_text(ext.get('ci'))}, "
                + ("" if classes else f"auprc {_fmt(ens.get('auprc'))}, ")
                + f"balanced_accuracy {_fmt(ens.get('balanced_accuracy'))}"
            )
        p_ext = (summary.get("patient") or {}).get("external") or {}
        if p_ext.get("ensemble"):
            lines.append(
                f"  fold ensemble, patient level ({p_ext['ensemble'].get('n')} patients): "
                f"auc {_fmt(p_ext['ensemble'].get('auc'))}{_ci_text(p_ext.get('ci'))}"
            )
    timing = summary.get("timing") or {}
    if timing:
        text = f"time: {_fmt(timing.get('seconds'), 1)} s"
        if timing.get("seconds_basis"):
            text += f" ({timing['seconds_basis']})"
        if timing.get("device"):
            text += f" on {timing['device']}"
        lines.append("")
        lines.append(text)
    return "\n".join(lines)
