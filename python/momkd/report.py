"""A self-contained HTML report of a training run (``report.html``).

:func:`write_report` reads a run directory (``config.yaml``, ``summary.json``,
``fold_<k>/history.json``, ``fold_<k>/test_predictions.csv``, external-cohort and ``eval_*``
results when present) and writes ``report.html`` — inline CSS, every figure embedded as a base64
PNG, no external assets — plus the same figures as PNG files in ``report/``:

* the resolved configuration (collapsible);
* the data summary (slides, patients, excluded label values with counts);
* per-fold test metrics at the argmax rule and at the validation-chosen F1 threshold, validation
  metrics, with mean ± std over folds (as in ``summary.json``);
* ROC and precision-recall curves per fold (scikit-learn, from the prediction CSVs);
* calibration: a reliability diagram over the pooled test predictions (plus Brier score and ECE);
* training curves per fold (loss terms, validation AUC, learning rate, temperature tau);
* memory usage dynamics per fold (:func:`momkd.explain.dynamics.plot_memory_dynamics`);
* external-cohort metrics (per fold, mean ± std, fold ensemble) when the run has one;
* the pooled test AUC and the external fold-ensemble AUC with their 95% bootstrap CIs, and the
  patient-level metrics (slide probabilities averaged per patient: per fold, mean ± std, pooled).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from momkd._io import atomic_write_text, class_prob_columns
from momkd.errors import DataError, MomkdError
from momkd.htmlkit import (
    COLOURS,
    as_number,
    class_roc_figure,
    confusion_figure,
    escape,
    figure_html,
    fmt_number,
    html_page,
    kv_table,
    new_figure,
    roc_pr_figure,
    save_figure,
    section,
)

__all__ = [
    "METRIC_LABELS",
    "THRESHOLD_LABELS",
    "calibration_bins",
    "expected_calibration_error",
    "read_predictions",
    "write_report",
]

logger = logging.getLogger(__name__)

#: Metric keys of the per-fold tables and their column headers.
METRIC_LABELS: dict[str, str] = {
    "auc": "AUC",
    "auprc": "AUPRC",
    "accuracy": "Accuracy",
    "balanced_accuracy": "Bal. accuracy",
    "f1": "Macro-F1",
    "sensitivity": "Sensitivity",
    "specificity": "Specificity",
    "auc_ci_low": "AUC 95% CI low",
    "auc_ci_high": "AUC 95% CI high",
}
#: Keys of the metrics at the validation-chosen threshold.
THRESHOLD_LABELS: dict[str, str] = {
    "threshold": "Threshold",
    "thr_accuracy": "Accuracy",
    "thr_balanced_accuracy": "Bal. accuracy",
    "thr_f1": "Macro-F1",
    "thr_sensitivity": "Sensitivity",
    "thr_specificity": "Specificity",
}


# ------------------------------------------------------------------------------------ inputs


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise MomkdError(f"{path}: cannot read JSON ({exc})") from None


def read_predictions(
    path: str | os.PathLike[str], column: str | None = None
) -> dict[str, np.ndarray]:
    """Read a per-slide prediction CSV.

    Parameters
    ----------
    path : path
        CSV with ``slide_id``, ``label`` and a probability column.
    column : str, optional
        The probability column; default the first of ``prob``, ``prob_pos``, ``prob_ensemble``,
        ``ensemble``, ``p_pos``.

    Returns
    -------
    dict
        ``slide_id`` (n,) str, ``label`` (n,) int64 (-1 where missing), ``prob`` (n,) float64, or
        ``(n, C)`` from the ``prob_<class>`` columns of a multi-class file.

    Raises
    ------
    DataError
        Missing columns or non-numeric values (names the file and column).
    """
    path = Path(path)
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        cols = reader.fieldnames or []
        rows = list(reader)
    candidates = (column,) if column else ("prob", "prob_pos", "prob_ensemble", "ensemble", "p_pos")
    prob_col = next((c for c in candidates if c in cols), None)
    class_cols = [] if column or prob_col else class_prob_columns(cols)
    if class_cols:
        prob_col = class_cols[0]
    if prob_col is None:
        raise DataError(f"{path}: no probability column ({' or '.join(candidates)}) in {cols}")
    label_col = "label" if "label" in cols else ("y" if "y" in cols else None)
    try:
        if class_cols:
            prob = np.array([[float(r[c]) for c in class_cols] for r in rows], dtype=np.float64)
            prob = prob.reshape(len(rows), len(class_cols))
        else:
            prob = np.array([float(r[prob_col]) for r in rows], dtype=np.float64)
        label = np.array(
            [
                int(float(r[label_col])) if label_col and r[label_col] not in ("", None) else -1
                for r in rows
            ],
            dtype=np.int64,
        )
    except ValueError as exc:
        raise DataError(
            f"{path}: non-numeric value in column {prob_col!r} or label ({exc})"
        ) from None
    sid_col = "slide_id" if "slide_id" in cols else cols[0]
    return {"slide_id": np.array([r[sid_col] for r in rows]), "label": label, "prob": prob}


def _ensemble_predictions(path: Path) -> dict[str, dict[str, np.ndarray]]:
    """Per-fold (``prob_fold<k>``/``prob_pos_fold<k>``) and ensemble curves of one labelled CSV."""
    with open(path, newline="") as fh:
        cols = next(csv.reader(fh), [])
    out: dict[str, dict[str, np.ndarray]] = {}
    for c in cols:
        m = re.fullmatch(r"prob(?:_pos)?_fold(\d+)", c)
        if m:
            out[f"fold {int(m.group(1))}"] = read_predictions(path, c)
    out["fold ensemble"] = read_predictions(path)
    return {k: v for k, v in out.items() if v["label"].size and np.all(v["label"] >= 0)}


def _fold_dirs(run: Path) -> list[tuple[int, Path]]:
    found = []
    for p in run.iterdir():
        m = re.fullmatch(r"fold_(\d+)", p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def _history(path: Path) -> list[Mapping[str, Any]]:
    data = _read_json(path)
    if isinstance(data, Mapping):
        for key in ("epochs", "history", "records"):
            if isinstance(data.get(key), list):
                data = data[key]
                break
    return [r for r in data if isinstance(r, Mapping)] if isinstance(data, list) else []


# ------------------------------------------------------------------------------- calibration


def calibration_bins(y: Any, p: Any, n_bins: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reliability-diagram bins over ``[0, 1]`` (equal width).

    A probability equal to an inner bin edge falls into the lower bin (the convention of
    ``sklearn.calibration.calibration_curve(strategy="uniform")``).

    Parameters
    ----------
    y : array_like, shape (n,)
        Labels in {0, 1}.
    p : array_like, shape (n,)
        Predicted probabilities of class 1.
    n_bins : int

    Returns
    -------
    mean_pred, frac_pos, count : np.ndarray, shape (m,)
        Per non-empty bin: mean predicted probability, share of positives, number of samples.
    """
    yy = np.asarray(y, dtype=np.float64).reshape(-1)
    pp = np.asarray(p, dtype=np.float64).reshape(-1)
    if yy.shape != pp.shape or yy.size == 0:
        raise DataError(f"calibration: need equal, non-empty y and p, got {yy.shape}, {pp.shape}")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    ids = np.searchsorted(edges[1:-1], pp)
    count = np.bincount(ids, minlength=n_bins).astype(np.float64)
    sum_p = np.bincount(ids, weights=pp, minlength=n_bins)
    sum_y = np.bincount(ids, weights=yy, minlength=n_bins)
    nz = count > 0
    return sum_p[nz] / count[nz], sum_y[nz] / count[nz], count[nz].astype(np.int64)


def expected_calibration_error(y: Any, p: Any, n_bins: int = 10) -> float:
    """ECE: ``sum_b (n_b / n) * |frac_pos_b - mean_pred_b|`` over equal-width bins."""
    mean_pred, frac, count = calibration_bins(y, p, n_bins)
    return float(np.sum(count / count.sum() * np.abs(frac - mean_pred)))


# ----------------------------------------------------------------------------------- figures


def _calibration_figure(preds: Mapping[str, dict[str, np.ndarray]], path: Path) -> Path | None:
    ys, ps = [], []
    for d in preds.values():
        ok = d["label"] >= 0
        ys.append(d["label"][ok])
        ps.append(d["prob"][ok])
    if not ys or sum(len(y) for y in ys) == 0:
        return None
    y_all, p_all = np.concatenate(ys), np.concatenate(ps)
    fig = new_figure(6.5, 6.5)
    ax, ax_h = fig.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    ax.plot([0, 1], [0, 1], color="0.6", ls="--", lw=1, label="perfect calibration")
    for i, (name, y, p) in enumerate(zip(preds, ys, ps, strict=True)):
        if len(y):
            mp, fp, _ = calibration_bins(y, p, 10)
            ax.plot(
                mp,
                fp,
                "o-",
                ms=3,
                lw=0.8,
                alpha=0.55,
                color=COLOURS[i % len(COLOURS)],
                label=name,
            )
    mp, fp, _ = calibration_bins(y_all, p_all, 10)
    ece = expected_calibration_error(y_all, p_all, 10)
    brier = float(np.mean((p_all - y_all) ** 2))
    ax.plot(mp, fp, "s-", color="k", lw=2, ms=5, label=f"pooled (ECE {ece:.3f}, Brier {brier:.3f})")
    ax.set(
        ylabel="fraction of positives",
        title="Reliability diagram (test predictions)",
        xlim=(0, 1),
        ylim=(-0.02, 1.02),
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    ax_h.hist(
        [p_all[y_all == 0], p_all[y_all == 1]],
        bins=np.linspace(0, 1, 11),
        stacked=True,
        color=["#2471a3", "#c0392b"],
        label=["negative", "positive"],
    )
    ax_h.set(xlabel="predicted probability (positive class)", ylabel="slides")
    ax_h.legend(fontsize=8)
    return save_figure(fig, path)


def _flatten(rec: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in rec.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            if key in ("memory", "memory_usage", "val_memory"):
                continue
            out.update(_flatten(value, f"{name}."))
        else:
            v = as_number(value)
            if v is not None:
                out[name] = v
    return out


_SKIP_CURVE = re.compile(
    r"(^|[._])(epoch|step|steps|seconds|time|wait|n|n_pos|best)([._]|$)|"
    r"seconds|wait|_time|time_"
)
_LOSS_TERMS = {
    "ce",
    "mem",
    "commit",
    "orth",
    "align_omics",
    "align_wsi",
    "mse",
    "kd",
    "total",
    "relational",
    "logit_kd",
    "teacher_ce",
}


#: Legend names of curves whose key alone does not say what they are.
_CURVE_LABELS = {
    "val_auc": "val_auc (histology branch: the student)",
    "val_auc_teacher": "val_auc_teacher (omics branch alone: the teacher)",
    "train_align_omics": "train_align_omics (teacher to memory)",
    "train_align_wsi": "train_align_wsi (slide to memory)",
}


def _curve_groups(history: Sequence[Mapping[str, Any]]) -> dict[str, list[str]]:
    keys: dict[str, None] = {}
    for rec in history:
        for k in _flatten(rec):
            keys.setdefault(k, None)
    groups: dict[str, list[str]] = {"loss": [], "auc": [], "lr": [], "tau": []}
    for k in keys:
        low = k.lower()
        last = low.rsplit(".", 1)[-1]
        if _SKIP_CURVE.search(low):
            continue
        if "auc" in low:
            groups["auc"].append(k)
        elif last in ("lr", "learning_rate") or low.endswith("_lr"):
            groups["lr"].append(k)
        elif "tau" in last:
            groups["tau"].append(k)
        elif "loss" in low or last in _LOSS_TERMS or last.removeprefix("train_") in _LOSS_TERMS:
            groups["loss"].append(k)
    return groups


def _training_figure(history: Sequence[Mapping[str, Any]], path: Path, title: str) -> Path | None:
    from matplotlib.ticker import MaxNLocator

    if not history:
        return None
    flat = [_flatten(r) for r in history]
    epochs = np.array([f.get("epoch", i) for i, f in enumerate(flat)], dtype=np.float64)
    groups = _curve_groups(history)
    if not any(groups.values()):
        return None
    fig = new_figure(11, 7.5)
    axes = fig.subplots(2, 2).ravel()
    spec = [
        ("loss", "Loss terms", "loss"),
        ("auc", "AUC", "AUC"),
        ("lr", "Learning rate", "lr"),
        ("tau", "Attention temperature tau", "tau"),
    ]
    for ax, (group, name, ylabel) in zip(axes, spec, strict=True):
        keys = groups[group]
        if not keys:
            ax.text(
                0.5,
                0.5,
                f"no {name.lower()} recorded",
                ha="center",
                va="center",
                transform=ax.transAxes,
            )
            ax.set_axis_off()
            continue
        for key in keys:
            vals = np.array([f.get(key, np.nan) for f in flat], dtype=np.float64)
            if np.all(np.isnan(vals)):
                continue
            label = _CURVE_LABELS.get(key, key)
            ax.plot(epochs, vals, lw=1.4, ls="--" if key.startswith("val") else "-", label=label)
        ax.set(xlabel="epoch", ylabel=ylabel, title=name)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if group == "lr" and all(np.nanmin([f.get(k, np.nan) for f in flat]) > 0 for k in keys):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2 if len(keys) > 4 else 1)
    fig.suptitle(title)
    return save_figure(fig, path)


# -------------------------------------------------------------------------------------- HTML


def _cell(v: Any, fold: str, metric: str, table: str) -> str:
    f = as_number(v)
    data = "" if f is None else f' data-value="{escape(repr(f))}"'
    return (
        f'<td data-table="{escape(table)}" data-fold="{escape(fold)}" data-metric="{escape(metric)}"{data}>'
        f"{fmt_number(v)}</td>"
    )


def _metric_table(
    table: str,
    rows: Sequence[tuple[str, Mapping[str, Any]]],
    labels: Mapping[str, str],
    mean: Mapping[str, Any] | None = None,
    std: Mapping[str, Any] | None = None,
    extra: Sequence[tuple[str, Mapping[str, Any], str]] = (),
) -> str:
    present = [k for k in labels if any(k in r for _, r in rows) or (mean and k in mean)]
    if not present:
        return '<p class="note">no metrics recorded</p>'
    out = [f'<table class="metrics" data-table="{escape(table)}"><thead><tr><th>fold</th>']
    out += [f"<th>{escape(labels[k])}</th>" for k in present]
    out.append("</tr></thead><tbody>")
    for name, r in rows:
        out.append(f"<tr><td>{escape(name)}</td>")
        out += [_cell(r.get(k), name, k, table) for k in present]
        out.append("</tr>")
    if mean:
        out.append('<tr class="agg"><td>mean ± std</td>')
        for k in present:
            m = as_number(mean.get(k))
            s = as_number((std or {}).get(k))
            text = fmt_number(m) + ("" if s is None else f" ± {fmt_number(s)}")
            attrs = "" if m is None else f' data-value="{escape(repr(m))}"'
            attrs += "" if s is None else f' data-std="{escape(repr(s))}"'
            out.append(
                f'<td data-table="{escape(table)}" data-fold="mean" data-metric="{escape(k)}"{attrs}>'
                f"{text}</td>"
            )
        out.append("</tr>")
    for name, r, css in extra:
        out.append(f'<tr class="{escape(css)}"><td>{escape(name)}</td>')
        out += [_cell(r.get(k), name, k, table) for k in present]
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _fold_name(entry: Mapping[str, Any], i: int) -> str:
    f = entry.get("fold")
    return (
        f"fold {int(f)}" if isinstance(f, int | float) and not isinstance(f, bool) else f"fold {i}"
    )


def _split_mean(block: Any, part: str) -> Mapping[str, Any]:
    """``summary['mean']`` may be flat (test metrics) or split by ``val``/``test``."""
    if not isinstance(block, Mapping):
        return {}
    if isinstance(block.get(part), Mapping):
        return block[part]  # type: ignore[no-any-return]
    if part == "test" and not any(isinstance(v, Mapping) for v in block.values()):
        return block
    return {}


def _external_section(summary: Mapping[str, Any], folds: Sequence[Mapping[str, Any]]) -> str:
    ext = summary.get("external")
    per_fold: list[tuple[str, Mapping[str, Any]]] = []
    for i, f in enumerate(folds):
        if isinstance(f.get("external"), Mapping):
            e = f["external"]
            per_fold.append(
                (_fold_name(f, i), e.get("metrics", e) if isinstance(e, Mapping) else e)
            )
    mean: Mapping[str, Any] = {}
    std: Mapping[str, Any] = {}
    extra: list[tuple[str, Mapping[str, Any], str]] = []
    if isinstance(ext, Mapping):
        raw_folds = ext.get("folds") or ext.get("per_fold")
        if not per_fold and isinstance(raw_folds, list):
            per_fold = [
                (_fold_name(f, i), f.get("metrics", f))
                for i, f in enumerate(raw_folds)
                if isinstance(f, Mapping)
            ]
        m_raw, s_raw = ext.get("mean"), ext.get("std")
        mean = m_raw if isinstance(m_raw, Mapping) else {}
        std = s_raw if isinstance(s_raw, Mapping) else {}
        if isinstance(ext.get("ensemble"), Mapping):
            extra.append(("fold ensemble", ext["ensemble"], "ens"))
    if not per_fold and not mean and not extra:
        return ""
    return _metric_table("external", per_fold, METRIC_LABELS, mean, std, extra)


def _pooled_section(summary: Mapping[str, Any]) -> str:
    """Pooled AUCs with CIs (slide and patient level) and the per-fold patient-level table."""
    pooled = summary.get("pooled")
    patient = summary.get("patient")
    if not isinstance(pooled, Mapping) and not isinstance(patient, Mapping):
        return ""
    if not isinstance(patient, Mapping):
        patient = {}
    ext_raw, p_ext_raw = summary.get("external"), patient.get("external")
    ext: Mapping[str, Any] = ext_raw if isinstance(ext_raw, Mapping) else {}
    p_ext: Mapping[str, Any] = p_ext_raw if isinstance(p_ext_raw, Mapping) else {}
    rows: list[str] = []

    def row(name: str, metrics: Any, ci: Any, mean: Any, std: Any) -> None:
        if not isinstance(metrics, Mapping) or not metrics:
            return
        low = high = None
        if isinstance(ci, Mapping) and isinstance(ci.get("auc"), list) and len(ci["auc"]) == 2:
            low, high = ci["auc"]
        m, sd = as_number((mean or {}).get("auc")), as_number((std or {}).get("auc"))
        spread = "" if m is None else fmt_number(m) + ("" if sd is None else f" ± {fmt_number(sd)}")
        rows.append(
            f"<tr><td>{escape(name)}</td>"
            + "".join(
                _cell(v, name, k, "pooled")
                for k, v in (
                    ("n", metrics.get("n")),
                    ("n_pos", metrics.get("n_pos")),
                    ("auc", metrics.get("auc")),
                    ("auc_ci_low", low),
                    ("auc_ci_high", high),
                )
            )
            + f"<td>{spread}</td>{_cell(metrics.get('auprc'), name, 'auprc', 'pooled')}</tr>"
        )

    row("test, slides", pooled, summary.get("ci"), summary.get("mean"), summary.get("std"))
    row(
        "test, patients",
        patient.get("pooled"),
        patient.get("ci"),
        patient.get("mean"),
        patient.get("std"),
    )
    row(
        "external ensemble, slides",
        ext.get("ensemble"),
        ext.get("ci"),
        ext.get("mean"),
        ext.get("std"),
    )
    row("external ensemble, patients", p_ext.get("ensemble"), p_ext.get("ci"), None, None)
    if not rows:
        return ""
    ci = summary.get("ci") if isinstance(summary.get("ci"), Mapping) else {}
    note = (
        f"95% CI: stratified percentile bootstrap, {ci.get('resamples')} resamples."
        if ci
        else "CIs off (train.ci_resamples: 0)."
    )
    out = [
        '<table class="pooled"><thead><tr><th>predictions</th><th>n</th><th>positive</th>'
        "<th>pooled AUC</th><th>95% CI low</th><th>95% CI high</th>"
        "<th>AUC mean ± std over folds</th>"
        "<th>pooled AUPRC</th></tr></thead><tbody>",
        *rows,
        "</tbody></table>",
        f'<p class="note">{escape(note)} Pooled: all folds\' test predictions ranked together. '
        "Patient level: the mean slide probability of each patient.</p>",
    ]
    folds = patient.get("folds")
    if isinstance(folds, list) and folds:
        prow = [
            (_fold_name(f, i), f.get("test") or {})
            for i, f in enumerate(folds)
            if isinstance(f, Mapping)
        ]
        out.append("<h3>Test, patient level, per fold</h3>")
        out.append(
            _metric_table(
                "patient", prow, METRIC_LABELS, patient.get("mean") or {}, patient.get("std") or {}
            )
        )
    return "".join(out)


def _eval_sections(run: Path, out_png: Path) -> list[tuple[str, str]]:
    """Sections for ``eval_*`` folders written by ``momkd eval`` (metrics JSON + predictions)."""
    sections = []
    for d in sorted(p for p in run.glob("eval_*") if p.is_dir()):
        data: Any = None
        for name in ("metrics.json", "eval.json"):
            if (d / name).is_file():
                data = _read_json(d / name)
                break
        if not isinstance(data, Mapping):
            continue
        body: list[str] = []
        f_raw = data.get("folds")
        folds = f_raw if isinstance(f_raw, list) else []
        rows = [
            (_fold_name(f, i), f.get("metrics", f.get("test", f)))
            for i, f in enumerate(folds)
            if isinstance(f, Mapping)
        ]
        extra = []
        if isinstance(data.get("ensemble"), Mapping):
            extra.append(("fold ensemble", data["ensemble"], "ens"))
        body.append(
            _metric_table(
                d.name,
                rows,
                METRIC_LABELS,
                _split_mean(data.get("mean"), "test"),
                _split_mean(data.get("std"), "test"),
                extra,
            )
        )
        info = {
            k: data[k]
            for k in (
                "store",
                "clinical",
                "label_column",
                "classes",
                "n_slides",
                "n_pos",
                "excluded",
            )
            if k in data
        }
        if info:
            body.insert(0, kv_table(info))
        pred_path = d / "predictions.csv"
        if pred_path.is_file():
            try:
                preds = _ensemble_predictions(pred_path)
            except DataError as exc:
                logger.warning("report: %s", exc)
                preds = {}
            classes = data.get("classes")
            if preds and classes:
                fig = class_roc_figure(
                    preds,
                    classes,
                    out_png / f"{d.name}_roc_classes.png",
                    f"ROC per class: {d.name}",
                )
                body.append(figure_html(fig, f"One-vs-rest ROC curves per class, {d.name}"))
            else:
                fig = (
                    roc_pr_figure(
                        preds,
                        out_png / f"{d.name}_roc_pr.png",
                        f"ROC and precision-recall: {d.name}",
                    )
                    if preds
                    else None
                )
                body.append(figure_html(fig, f"ROC and precision-recall curves, {d.name}"))
        sections.append((d.name, "".join(body)))
    return sections


# ------------------------------------------------------------------------------- write_report


def write_report(
    run_dir: str | os.PathLike[str], out: str | os.PathLike[str] | None = None
) -> Path:
    """Write the self-contained HTML report of a run.

    Parameters
    ----------
    run_dir : path
        Run directory written by ``momkd train`` (``summary.json``, ``fold_<k>/``...). A run in
        progress (no ``summary.json`` yet) gives a report of what exists.
    out : path, optional
        Output folder (default ``run_dir``): ``report.html`` and the PNGs in ``report/``.

    Returns
    -------
    Path
        The written ``report.html``.

    Raises
    ------
    MomkdError
        If ``run_dir`` is not a folder or a JSON file of the run cannot be read.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise MomkdError(f"run directory {run} does not exist")
    out_dir = Path(out) if out is not None else run
    png_dir = out_dir / "report"
    png_dir.mkdir(parents=True, exist_ok=True)
    summary: Mapping[str, Any] = {}
    if (run / "summary.json").is_file():
        loaded = _read_json(run / "summary.json")
        summary = loaded if isinstance(loaded, Mapping) else {}
    else:
        logger.warning("run %s has no summary.json; reporting what exists", run)
    folds = [f for f in summary.get("folds", []) if isinstance(f, Mapping)]
    fold_dirs = _fold_dirs(run)

    sections: list[tuple[str, str, str]] = []  # (anchor, title, html)

    # configuration
    cfg_path = run / "config.yaml"
    if cfg_path.is_file():
        sections.append(
            (
                "config",
                "Configuration",
                (
                    "<details><summary>resolved config.yaml</summary>"
                    f"<pre>{escape(cfg_path.read_text())}</pre></details>"
                ),
            )
        )

    # data
    data = summary.get("data")
    if isinstance(data, Mapping) and data:
        sections.append(("data", "Data", kv_table(data)))

    # metrics
    if folds:
        test_rows = [(_fold_name(f, i), f.get("test") or {}) for i, f in enumerate(folds)]
        val_rows = [(_fold_name(f, i), f.get("val") or {}) for i, f in enumerate(folds)]
        mean_t, std_t = (
            _split_mean(summary.get("mean"), "test"),
            _split_mean(summary.get("std"), "test"),
        )
        mean_v = summary.get("val_mean") or _split_mean(summary.get("mean"), "val")
        std_v = summary.get("val_std") or _split_mean(summary.get("std"), "val")
        tables = [
            "<h3>Test, argmax rule</h3>",
            _metric_table("test", test_rows, METRIC_LABELS, mean_t, std_t),
            "<h3>Test, at the F1-optimal threshold chosen on validation</h3>",
            _metric_table("test_threshold", test_rows, THRESHOLD_LABELS, mean_t, std_t),
            "<h3>Validation (best epoch)</h3>",
            _metric_table("val", val_rows, METRIC_LABELS, mean_v, std_v),
        ]
        sections.append(("metrics", "Metrics per fold", "".join(tables)))
    pooled_html = _pooled_section(summary)
    if pooled_html:
        sections.append(("pooled", "Pooled AUC, confidence intervals, patient level", pooled_html))

    # predictions: ROC/PR and calibration
    preds: dict[str, dict[str, np.ndarray]] = {}
    for k, d in fold_dirs:
        path = d / "test_predictions.csv"
        if path.is_file():
            preds[f"fold {k}"] = read_predictions(path)
    classes = summary.get("classes")
    if preds and classes:
        roc = class_roc_figure(
            preds, classes, png_dir / "roc_classes.png", "Test one-vs-rest ROC per class and fold"
        )
        curves = figure_html(roc, "One-vs-rest ROC curves per class and fold (test predictions)")
        confusion = (summary.get("pooled") or {}).get("confusion")
        if confusion:
            cm_png = confusion_figure(
                confusion, classes, png_dir / "confusion.png", "Pooled test predictions"
            )
            curves += figure_html(
                cm_png, "Confusion matrix of the pooled test predictions (most probable class)"
            )
        sections.append(("curves", "ROC per class and confusion matrix", curves))
    elif preds:
        roc = roc_pr_figure(preds, png_dir / "roc_pr.png", "Test ROC and precision-recall per fold")
        cal = _calibration_figure(preds, png_dir / "calibration.png")
        curves = figure_html(roc, "ROC and precision-recall curves per fold (test predictions)")
        if cal is not None:
            y = np.concatenate([d["label"][d["label"] >= 0] for d in preds.values()])
            p = np.concatenate([d["prob"][d["label"] >= 0] for d in preds.values()])
            curves += figure_html(cal, "Reliability diagram of the pooled test predictions")
            curves += kv_table(
                {
                    "slides": int(y.size),
                    "Brier score": float(np.mean((p - y) ** 2)),
                    "expected calibration error (10 bins)": expected_calibration_error(y, p),
                }
            )
        sections.append(("curves", "ROC, precision-recall and calibration", curves))

    # training curves and memory dynamics
    train_body: list[str] = []
    mem_body: list[str] = []
    for k, d in fold_dirs:
        hpath = d / "history.json"
        if not hpath.is_file():
            continue
        history = _history(hpath)
        fig = _training_figure(history, png_dir / f"training_fold_{k}.png", f"Training, fold {k}")
        train_body.append(figure_html(fig, f"Training curves, fold {k}"))
        from momkd.explain.dynamics import memory_history, plot_memory_dynamics

        if memory_history(history):
            mfig = plot_memory_dynamics(
                history, png_dir / f"memory_fold_{k}.png", title=f"Memory dynamics, fold {k}"
            )
            mem_body.append(figure_html(mfig, f"Memory usage on validation slides, fold {k}"))
    if any(train_body):
        sections.append(("training", "Training curves", "".join(train_body)))
    if mem_body:
        sections.append(("memory", "Memory dynamics", "".join(mem_body)))

    # external cohort
    ext_html = _external_section(summary, folds)
    ext_preds: dict[str, dict[str, np.ndarray]] = {}
    if (run / "external_predictions.csv").is_file():
        ext_preds = _ensemble_predictions(run / "external_predictions.csv")
    else:
        for k, d in fold_dirs:
            if (d / "external_predictions.csv").is_file():
                ext_preds[f"fold {k}"] = read_predictions(d / "external_predictions.csv")
        ext_preds = {k: v for k, v in ext_preds.items() if np.all(v["label"] >= 0)}
    if ext_preds and classes:
        ext_png = class_roc_figure(
            ext_preds,
            classes,
            png_dir / "external_roc_classes.png",
            "External cohort one-vs-rest ROC per class",
        )
        if ext_png is not None:
            ext_html += figure_html(ext_png, "External cohort one-vs-rest ROC curves per class")
    elif ext_preds:
        fig = roc_pr_figure(
            ext_preds,
            png_dir / "external_roc_pr.png",
            "External cohort ROC and precision-recall per fold",
        )
        ext_html += figure_html(fig, "External cohort ROC and precision-recall curves")
    if ext_html:
        sections.append(("external", "External cohort", ext_html))

    for name, eval_html in _eval_sections(run, png_dir):
        sections.append((name, f"Evaluation: {name.removeprefix('eval_')}", eval_html))

    timing = summary.get("timing")
    if isinstance(timing, Mapping) and timing:
        sections.append(("timing", "Timing", kv_table(timing)))

    method = ""
    if cfg_path.is_file():
        m = re.search(r"^\s*method:\s*(\S+)", cfg_path.read_text(), flags=re.MULTILINE)
        method = m.group(1) if m else ""
    headline = ""
    mean_t = _split_mean(summary.get("mean"), "test")
    if as_number(mean_t.get("auc")) is not None:
        s = as_number(_split_mean(summary.get("std"), "test").get("auc"))
        headline = f" — test AUC {fmt_number(mean_t['auc'])}" + (
            "" if s is None else f" ± {fmt_number(s)}"
        )
        ci = summary.get("ci")
        pooled = summary.get("pooled")
        if isinstance(ci, Mapping) and isinstance(pooled, Mapping) and ci.get("auc"):
            low, high = ci["auc"]
            headline += f", pooled {fmt_number(pooled.get('auc'))} (95% CI {fmt_number(low)}–{fmt_number(high)})"
    subtitle = (
        f"{escape(method) + ' · ' if method else ''}{len(fold_dirs)} fold(s){escape(headline)} · "
    )
    body = [section(anchor, title, text) for anchor, title, text in sections]
    if not body:
        body = ['<section><p class="note">nothing to report yet</p></section>']
    page = html_page(
        f"momkd report: {run.name}",
        f"momkd run report: {run.name}",
        subtitle,
        body,
        nav=[(anchor, title) for anchor, title, _ in sections],
    )
    out_html = out_dir / "report.html"
    atomic_write_text(out_html, page)
    logger.info("wrote run report %s", out_html)
    return out_html
