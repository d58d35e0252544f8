"""Binary classification metrics (docs/METHOD.md §2.6), computed with numpy.

Predictions are positive when ``p_pos > threshold``. At the default threshold 0.5 this is exactly
the argmax of a two-class softmax (a tie goes to class 0, as ``argmax`` does). The definitions follow
scikit-learn (the tests compare against it):

* ``auc`` — area under the ROC curve (ties in the scores count one half);
* ``auprc`` — average precision, ``sum_n (R_n - R_{n-1}) P_n`` over the distinct score thresholds;
* ``accuracy``; ``sensitivity`` = recall of class 1; ``specificity`` = recall of class 0;
* ``balanced_accuracy`` — mean of the recalls of the classes present in ``y_true``;
* ``f1`` — macro F1 over the classes present in ``y_true`` or the predictions;
* ``n`` and ``n_pos`` — counts.

With a single class in ``y_true`` the AUC is undefined: it is NaN and a :class:`MetricWarning` is
issued (no exception), and so are AUPRC (no positives), sensitivity or specificity when undefined.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from momkd.errors import DataError

__all__ = [
    "THRESHOLD_METRICS",
    "MetricWarning",
    "aggregate",
    "best_f1_threshold",
    "binary_metrics",
    "bootstrap_auc_ci",
    "evaluate_with_threshold",
]

#: Metrics that depend on the decision threshold (prefixed ``thr_`` by evaluate_with_threshold).
THRESHOLD_METRICS = ("accuracy", "balanced_accuracy", "f1", "sensitivity", "specificity")


class MetricWarning(UserWarning):
    """A metric is undefined for the given labels (e.g. AUC with one class)."""


def _inputs(y_true: Any, p_pos: Any) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    p = np.asarray(p_pos, dtype=np.float64)
    if y.ndim != 1 or p.shape != y.shape:
        raise DataError(f"metrics: labels of shape {y.shape} and scores of shape {p.shape}")
    if y.size == 0:
        raise DataError("metrics: no samples")
    if not np.isin(y, (0, 1)).all():
        raise DataError(f"metrics: labels must be 0 or 1, got {sorted(set(y.tolist()))[:5]}")
    if not np.isfinite(p).all():
        raise DataError("metrics: scores contain NaN or Inf")
    return y.astype(np.int64), p


def _midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    # Start index of each run of equal values, and the run it belongs to.
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    run = np.cumsum(np.r_[True, xs[1:] != xs[:-1]]) - 1
    ends = np.r_[starts[1:], len(xs)]
    avg = (starts + ends + 1) / 2.0  # mean of the 1-based ranks starts+1 .. ends
    ranks = np.empty(len(x))
    ranks[order] = avg[run]
    return ranks


def _auc(y: np.ndarray, p: np.ndarray) -> float:
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = _midranks(p)
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _average_precision(y: np.ndarray, p: np.ndarray) -> float:
    n_pos = int(y.sum())
    if n_pos == 0:
        return math.nan
    order = np.argsort(-p, kind="mergesort")
    ys, ps = y[order], p[order]
    last = np.r_[ps[1:] != ps[:-1], True]  # last position of each distinct score
    tp = np.cumsum(ys)[last]
    fp = np.cumsum(1 - ys)[last]
    precision = tp / (tp + fp)
    recall = tp / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _threshold_metrics(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    tp = int(np.sum((y == 1) & (pred == 1)))
    tn = int(np.sum((y == 0) & (pred == 0)))
    fp = int(np.sum((y == 0) & (pred == 1)))
    fn = int(np.sum((y == 1) & (pred == 0)))
    sens = tp / (tp + fn) if tp + fn else math.nan
    spec = tn / (tn + fp) if tn + fp else math.nan
    recalls = [r for r in (sens, spec) if not math.isnan(r)]
    f1s = []
    for t, f_pos, f_neg, present in (
        (tp, fp, fn, (tp + fn + fp) > 0),
        (tn, fn, fp, (tn + fp + fn) > 0),
    ):
        if present:
            f1s.append(2 * t / (2 * t + f_pos + f_neg))
    return {
        "accuracy": (tp + tn) / len(y),
        "balanced_accuracy": float(np.mean(recalls)),
        "f1": float(np.mean(f1s)),
        "sensitivity": sens,
        "specificity": spec,
    }


def binary_metrics(y_true: Any, p_pos: Any, threshold: float = 0.5) -> dict[str, float]:
    """Metrics of positive-class probabilities.

    Parameters
    ----------
    y_true
        ``(n,)`` labels in {0, 1}.
    p_pos
        ``(n,)`` scores of class 1 (probabilities, or any monotone score with a matching threshold).
    threshold
        A sample is predicted positive when ``p_pos > threshold``.

    Returns
    -------
    dict[str, float]
        ``auc``, ``auprc``, ``accuracy``, ``balanced_accuracy``, ``f1`` (macro), ``sensitivity``,
        ``specificity``, ``n``, ``n_pos``.

    Raises
    ------
    DataError
        Empty input, shape mismatch, labels other than 0/1, non-finite scores.
    """
    y, p = _inputs(y_true, p_pos)
    n_pos = int(y.sum())
    if n_pos in (0, len(y)):
        warnings.warn(
            f"metrics: only class {int(y[0])} present in {len(y)} labels; AUC is undefined (NaN)",
            MetricWarning,
            stacklevel=2,
        )
    out: dict[str, float] = {"auc": _auc(y, p), "auprc": _average_precision(y, p)}
    out.update(_threshold_metrics(y, (p > threshold).astype(np.int64)))
    out["n"] = len(y)
    out["n_pos"] = n_pos
    return out


def best_f1_threshold(y_val: Any, p_val: Any) -> float:
    """The threshold that maximises the positive-class F1 on a validation set.

    Candidate thresholds lie halfway between consecutive distinct scores (and just below the
    lowest), so every achievable split of the sorted scores is considered and the decision rule
    ``p > threshold`` is unambiguous. Among equally good thresholds the one closest to 0.5 wins.

    Parameters
    ----------
    y_val
        ``(n,)`` validation labels in {0, 1}.
    p_val
        ``(n,)`` validation scores of class 1.

    Returns
    -------
    float
        The threshold; 0.5 (with a :class:`MetricWarning`) when ``y_val`` has no positive.
    """
    y, p = _inputs(y_val, p_val)
    n_pos = int(y.sum())
    if n_pos == 0:
        warnings.warn(
            "metrics: no positive validation sample; F1 threshold defaults to 0.5",
            MetricWarning,
            stacklevel=2,
        )
        return 0.5
    values, inverse = np.unique(p, return_inverse=True)
    below = values[0] - max(1e-6, 1e-6 * abs(values[0]))
    candidates = np.r_[below, (values[:-1] + values[1:]) / 2.0]
    # Positives and negatives at each distinct score; candidate i predicts values[i:] positive.
    pos_at = np.bincount(inverse, weights=y, minlength=len(values)).astype(np.int64)
    neg_at = np.bincount(inverse, weights=1 - y, minlength=len(values)).astype(np.int64)
    tp = np.cumsum(pos_at[::-1])[::-1]
    fp = np.cumsum(neg_at[::-1])[::-1]
    fn = n_pos - tp
    f1 = 2 * tp / (2 * tp + fp + fn)
    best = np.flatnonzero(f1 == f1.max())
    return float(candidates[best[np.argmin(np.abs(candidates[best] - 0.5))]])


def evaluate_with_threshold(y_test: Any, p_test: Any, thr: float) -> dict[str, float]:
    """Test metrics at the argmax rule (0.5) and at a threshold chosen on validation.

    Parameters
    ----------
    y_test, p_test
        ``(n,)`` test labels and scores of class 1.
    thr
        Threshold from :func:`best_f1_threshold` on the validation set.

    Returns
    -------
    dict[str, float]
        :func:`binary_metrics` at 0.5, plus ``thr_<m>`` for each threshold-dependent metric ``m``
        (:data:`THRESHOLD_METRICS`) at ``thr``, and ``threshold`` = ``thr``.
    """
    out = binary_metrics(y_test, p_test, 0.5)
    y, p = _inputs(y_test, p_test)
    at_thr = _threshold_metrics(y, (p > thr).astype(np.int64))
    out.update({f"thr_{k}": at_thr[k] for k in THRESHOLD_METRICS})
    out["threshold"] = float(thr)
    return out


def aggregate(
    results: Sequence[Mapping[str, Any]],
) -> tuple[dict[str, float], dict[str, float]]:
    """Mean and standard deviation (ddof 1) of per-fold metric dicts.

    Numeric keys present in every dict are aggregated (booleans and strings are skipped). NaN
    values (e.g. an undefined AUC) are left out of that key's mean and std; a key that is NaN in
    every fold stays NaN. With fewer than two values the std is NaN.

    Parameters
    ----------
    results
        Per-fold dicts, e.g. from :func:`evaluate_with_threshold`.

    Returns
    -------
    tuple[dict[str, float], dict[str, float]]
        ``(mean, std)`` keyed like the inputs.
    """
    if not results:
        return {}, {}
    keys = [
        k
        for k, v in results[0].items()
        if _is_number(v) and all(k in r and _is_number(r[k]) for r in results)
    ]
    mean: dict[str, float] = {}
    std: dict[str, float] = {}
    for k in keys:
        vals = np.array([float(r[k]) for r in results])
        vals = vals[~np.isnan(vals)]
        mean[k] = float(vals.mean()) if vals.size else math.nan
        std[k] = float(vals.std(ddof=1)) if vals.size >= 2 else math.nan
    return mean, std


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def bootstrap_auc_ci(
    y: Any, p: Any, n: int = 1000, seed: int = 0, alpha: float = 0.05
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the AUC.

    Resamples are drawn as ``numpy.random.default_rng(seed).integers(0, m, size=(n, m))`` (rows =
    resamples); resamples with a single class are skipped.

    Parameters
    ----------
    y, p
        ``(m,)`` labels and scores of class 1.
    n
        Number of resamples.
    seed
        Seed of the resampling.
    alpha
        ``1 - confidence``; the interval is the ``alpha/2`` and ``1 - alpha/2`` percentiles.

    Returns
    -------
    tuple[float, float]
        ``(low, high)``; ``(nan, nan)`` with a :class:`MetricWarning` when ``y`` has one class.
    """
    yy, pp = _inputs(y, p)
    if n < 1:
        raise DataError(f"metrics: bootstrap needs n >= 1, got {n}")
    if yy.min() == yy.max():
        warnings.warn(
            "metrics: one class only; no AUC confidence interval", MetricWarning, stacklevel=2
        )
        return math.nan, math.nan
    idx = np.random.default_rng(seed).integers(0, len(yy), size=(n, len(yy)))
    aucs = [_auc(yy[row], pp[row]) for row in idx]
    vals = np.array([a for a in aucs if not math.isnan(a)])
    if vals.size == 0:
        return math.nan, math.nan
    low, high = np.percentile(vals, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(low), float(high)
