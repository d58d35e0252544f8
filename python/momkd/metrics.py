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

Uncertainty and comparisons:

* :func:`bootstrap_auc_ci` — stratified percentile bootstrap CI of the AUC (positives and negatives
  resampled separately, so every resample has both classes and the class counts are fixed);
* :func:`paired_auc_test` — two methods scored on the same samples: paired stratified bootstrap CI
  of the AUC difference (the same resamples for both) and DeLong's test (:func:`delong_test`);
* :func:`patient_level` — slide probabilities averaged per patient, for patient-level metrics.
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
    "delong_test",
    "evaluate_with_threshold",
    "paired_auc_test",
    "paired_interval",
    "patient_level",
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


def _class_inputs(y_true: Any, probs: Any) -> tuple[np.ndarray, np.ndarray]:
    """Checked ``(n,)`` class indices and ``(n, C)`` class probabilities."""
    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=np.float64)
    if y.ndim != 1 or p.ndim != 2 or p.shape[0] != y.shape[0]:
        raise DataError(f"metrics: labels of shape {y.shape} and probabilities of shape {p.shape}")
    if y.size == 0:
        raise DataError("metrics: no samples")
    if p.shape[1] < 2:
        raise DataError(f"metrics: probabilities need two or more classes, got {p.shape[1]}")
    if y.dtype.kind not in "iub" or y.min() < 0 or y.max() >= p.shape[1]:
        raise DataError(
            f"metrics: labels must be class indices in [0, {p.shape[1]}), got "
            f"{sorted(set(y.tolist()))[:10]}"
        )
    if not np.isfinite(p).all():
        raise DataError("metrics: non-finite probabilities")
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


#: Bootstrap resamples drawn (and evaluated) at a time; bounds the memory to a few MB per chunk.
_CHUNK = 256


def _class_indices(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.flatnonzero(y == 1), np.flatnonzero(y == 0)


def _resample_counts(idx: np.ndarray, n: int) -> np.ndarray:
    """``(B, m)`` draws in ``[0, n)`` -> ``(B, n)`` multiplicities."""
    b = idx.shape[0]
    flat = (idx + n * np.arange(b)[:, None]).ravel()
    return np.bincount(flat, minlength=b * n).reshape(b, n).astype(np.float64)


def _resampled_auc(
    p_pos: np.ndarray, p_neg: np.ndarray, c_pos: np.ndarray, c_neg: np.ndarray
) -> np.ndarray:
    """AUCs of ``B`` weighted resamples in O(B (n1 + n0)).

    ``c_pos`` ``(B, n1)`` and ``c_neg`` ``(B, n0)`` are the multiplicities of each positive and
    negative sample. For a positive with score ``x``, the weighted number of negatives below it
    (ties count one half) is read off the cumulative negative counts in score order.
    """
    order = np.argsort(p_neg, kind="mergesort")
    neg_sorted = p_neg[order]
    lt = np.searchsorted(neg_sorted, p_pos, side="left")
    le = np.searchsorted(neg_sorted, p_pos, side="right")
    cum = np.zeros((c_neg.shape[0], len(p_neg) + 1))
    np.cumsum(c_neg[:, order], axis=1, out=cum[:, 1:])
    below = 0.5 * (cum[:, lt] + cum[:, le])  # (B, n1)
    return np.asarray((c_pos * below).sum(axis=1) / (len(p_pos) * len(p_neg)))


def _bootstrap_aucs(y: np.ndarray, scores: Sequence[np.ndarray], n: int, seed: int) -> np.ndarray:
    """``(n, len(scores))`` AUCs of the same stratified resamples for every score vector.

    Resamples are drawn in chunks of ``_CHUNK``: for each chunk of ``c`` resamples,
    ``rng.integers(0, n1, size=(c, n1))`` indexes the positives (in the order of
    ``np.flatnonzero(y == 1)``) and then ``rng.integers(0, n0, size=(c, n0))`` the negatives, with
    ``rng = numpy.random.default_rng(seed)``.
    """
    pos, neg = _class_indices(y)
    rng = np.random.default_rng(seed)
    out = np.empty((n, len(scores)))
    for start in range(0, n, _CHUNK):
        c = min(_CHUNK, n - start)
        c_pos = _resample_counts(rng.integers(0, len(pos), size=(c, len(pos))), len(pos))
        c_neg = _resample_counts(rng.integers(0, len(neg), size=(c, len(neg))), len(neg))
        for j, p in enumerate(scores):
            out[start : start + c, j] = _resampled_auc(p[pos], p[neg], c_pos, c_neg)
    return out


def _check_resamples(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise DataError(f"metrics: bootstrap needs n >= 1 resamples, got {n!r}")


def bootstrap_auc_ci(
    y: Any, p: Any, n: int = 2000, seed: int = 0, alpha: float = 0.05
) -> tuple[float, float]:
    """Stratified percentile bootstrap confidence interval of the AUC.

    Each resample draws ``n_pos`` positives from the positives and ``n_neg`` negatives from the
    negatives, with replacement, so that every resample has the original class counts (the AUC is
    conditional on them) and none is skipped for lacking a class. Vectorised: ``n`` resamples of
    ``m`` samples cost O(n m log m).

    Parameters
    ----------
    y, p
        ``(m,)`` labels and scores of class 1.
    n
        Number of resamples.
    seed
        Seed of ``numpy.random.default_rng``; the same seed gives the same interval.
    alpha
        ``1 - confidence``; the interval is the ``alpha/2`` and ``1 - alpha/2`` percentiles
        (numpy's linear interpolation) of the resampled AUCs.

    Returns
    -------
    tuple[float, float]
        ``(low, high)``; ``(nan, nan)`` with a :class:`MetricWarning` when ``y`` has one class.

    Raises
    ------
    DataError
        Bad inputs (see :func:`binary_metrics`) or ``n < 1``.
    """
    yy, pp = _inputs(y, p)
    _check_resamples(n)
    if yy.min() == yy.max():
        warnings.warn(
            "metrics: one class only; no AUC confidence interval", MetricWarning, stacklevel=2
        )
        return math.nan, math.nan
    aucs = _bootstrap_aucs(yy, [pp], int(n), seed)[:, 0]
    low, high = np.percentile(aucs, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(low), float(high)


def _placements(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong's structural components via midranks (O(m log m)).

    ``v10[i]`` = share of negatives scored below positive ``i`` (ties one half), ``v01[j]`` = share
    of positives scored above negative ``j``; ``mean(v10) == mean(v01) == AUC``.
    """
    pos, neg = _class_indices(y)
    n1, n0 = len(pos), len(neg)
    r_all = _midranks(p)
    v10 = (r_all[pos] - _midranks(p[pos])) / n0
    v01 = 1.0 - (r_all[neg] - _midranks(p[neg])) / n1
    return v10, v01


def delong_test(y: Any, p_a: Any, p_b: Any) -> dict[str, float]:
    """DeLong's test of two correlated AUCs (two methods scored on the same samples).

    The variance of ``AUC_a - AUC_b`` is ``c' S10 c / n1 + c' S01 c / n0`` with ``c = (1, -1)`` and
    ``S10``, ``S01`` the covariance matrices (ddof 1) of the methods' placement values over the
    positives and the negatives (DeLong, DeLong & Clarke-Pearson 1988; midrank computation of Sun &
    Xu 2014). The two-sided p-value is that of ``z = diff / se`` under the standard normal.

    Parameters
    ----------
    y
        ``(m,)`` labels in {0, 1}.
    p_a, p_b
        ``(m,)`` scores of class 1 of the two methods, sample by sample.

    Returns
    -------
    dict[str, float]
        ``auc_a``, ``auc_b``, ``auc_diff`` (a - b), ``se``, ``z`` and ``p_value``. With zero
        variance (e.g. identical scores) ``p_value`` is 1 when the AUCs are equal and 0 otherwise;
        with fewer than two samples of a class every entry but the AUCs is NaN (with a
        :class:`MetricWarning`).
    """
    yy, pa = _inputs(y, p_a)
    _, pb = _inputs(y, p_b)
    n1 = int(yy.sum())
    n0 = len(yy) - n1
    if min(n1, n0) < 2:
        warnings.warn(
            f"metrics: DeLong's test needs two samples of each class, got {n1} positive and "
            f"{n0} negative",
            MetricWarning,
            stacklevel=2,
        )
        auc_a, auc_b = _auc(yy, pa), _auc(yy, pb)
        nan = math.nan
        return {
            "auc_a": auc_a,
            "auc_b": auc_b,
            "auc_diff": auc_a - auc_b,
            "se": nan,
            "z": nan,
            "p_value": nan,
        }
    v10a, v01a = _placements(yy, pa)
    v10b, v01b = _placements(yy, pb)
    auc_a, auc_b = float(v10a.mean()), float(v10b.mean())
    d10 = v10a - v10b
    d01 = v01a - v01b
    var = float(d10.var(ddof=1) / n1 + d01.var(ddof=1) / n0)
    diff = auc_a - auc_b
    if var <= 1e-300:
        z = 0.0 if diff == 0 else math.copysign(math.inf, diff)
        p_value = 1.0 if diff == 0 else 0.0
        se = 0.0
    else:
        se = math.sqrt(var)
        z = diff / se
        p_value = math.erfc(abs(z) / math.sqrt(2.0))
    return {"auc_a": auc_a, "auc_b": auc_b, "auc_diff": diff, "se": se, "z": z, "p_value": p_value}


def paired_auc_test(
    y: Any,
    p_a: Any,
    p_b: Any,
    n: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, float]:
    """Compare two methods' AUCs on the same samples.

    The confidence interval of ``AUC_a - AUC_b`` is a paired stratified percentile bootstrap: each
    resample (drawn as in :func:`bootstrap_auc_ci`, same seed, same draws) picks the same samples
    for both methods. The p-value is DeLong's (:func:`delong_test`); the bootstrap's own two-sided
    p-value, ``min(1, 2 min(P*(diff <= 0), P*(diff >= 0)))`` over the resamples, is reported as
    ``p_value_bootstrap`` (its resolution is ``1 / n``).

    Parameters
    ----------
    y
        ``(m,)`` labels in {0, 1}.
    p_a, p_b
        ``(m,)`` scores of the two methods, aligned sample by sample.
    n
        Bootstrap resamples.
    seed
        Seed of the resampling.
    alpha
        ``1 - confidence`` of the interval.

    Returns
    -------
    dict[str, float]
        ``auc_a``, ``auc_b``, ``auc_diff``, ``ci_low``, ``ci_high``, ``p_value`` (DeLong),
        ``p_value_bootstrap``, ``se`` and ``z`` (DeLong), ``n``, ``n_pos``, ``n_resamples``.
        CI and bootstrap p-value are NaN (with a :class:`MetricWarning`) when ``y`` has one class.
    """
    yy, pa = _inputs(y, p_a)
    _, pb = _inputs(y, p_b)
    _check_resamples(n)
    with warnings.catch_warnings():
        # One warning for this comparison, issued below, is enough.
        warnings.simplefilter("ignore", MetricWarning)
        out = delong_test(yy, pa, pb)
    out.update({"n": len(yy), "n_pos": int(yy.sum()), "n_resamples": int(n)})
    if yy.min() == yy.max():
        warnings.warn(
            "metrics: one class only; AUCs cannot be compared", MetricWarning, stacklevel=2
        )
        out.update(ci_low=math.nan, ci_high=math.nan, p_value_bootstrap=math.nan)
        return out
    aucs = _bootstrap_aucs(yy, [pa, pb], int(n), seed)
    low, high, p_boot = paired_interval(aucs[:, 0] - aucs[:, 1], alpha)
    out.update(ci_low=low, ci_high=high, p_value_bootstrap=p_boot)
    return out


def paired_interval(diffs: np.ndarray, alpha: float = 0.05) -> tuple[float, float, float]:
    """Percentile interval and two-sided p-value of bootstrapped paired differences:
    ``(low, high, min(1, 2 min(P*(diff <= 0), P*(diff >= 0))))``."""
    low, high = np.percentile(diffs, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    p = min(1.0, 2.0 * min(float(np.mean(diffs <= 0)), float(np.mean(diffs >= 0))))
    return float(low), float(high), p


def patient_level(
    case_ids: Sequence[str],
    labels: Any,
    probs: Any,
    slide_ids: Sequence[str] | None = None,
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Average slide probabilities per patient.

    Rows that already are one per patient (patient bags) come back unchanged, in the same order.

    Parameters
    ----------
    case_ids
        ``(m,)`` patient of each slide; an empty id stands for the slide itself (then ``slide_ids``
        is needed).
    labels
        ``(m,)`` slide labels in {0, 1} (class indices with ``(m, C)`` probabilities); all slides
        of a patient must agree.
    probs
        ``(m,)`` slide probabilities of class 1, or ``(m, C)`` class probabilities (averaged
        column by column).
    slide_ids
        ``(m,)`` slide ids, for empty patient ids and for messages.

    Returns
    -------
    tuple[list[str], np.ndarray, np.ndarray]
        Patient ids (in order of first appearance), their labels ``(k,)`` int64 and mean
        probabilities ``(k,)`` (or ``(k, C)``) float64.

    Raises
    ------
    DataError
        Mismatched lengths, or a patient whose slides have different labels (named).
    """
    multi = np.ndim(probs) == 2
    y, p = _class_inputs(labels, probs) if multi else _inputs(labels, probs)
    cases = [str(c) for c in case_ids]
    if len(cases) != len(y) or (slide_ids is not None and len(slide_ids) != len(y)):
        raise DataError(
            f"metrics: {len(cases)} patient ids for {len(y)} labels"
            + ("" if slide_ids is None else f" and {len(slide_ids)} slide ids")
        )
    for i, c in enumerate(cases):
        if not c:
            if slide_ids is None:
                raise DataError(f"metrics: row {i} has an empty patient id and no slide id")
            cases[i] = str(slide_ids[i])
    index: dict[str, int] = {}
    inverse = np.array([index.setdefault(c, len(index)) for c in cases], dtype=np.int64)
    k = len(index)
    counts = np.bincount(inverse, minlength=k)
    if multi:
        mean_p = (
            np.stack(
                [np.bincount(inverse, weights=p[:, c], minlength=k) for c in range(p.shape[1])],
                axis=1,
            )
            / counts[:, None]
        )
    else:
        mean_p = np.bincount(inverse, weights=p, minlength=k) / counts
    low = np.full(k, np.iinfo(np.int64).max)
    high = np.full(k, -1)
    np.minimum.at(low, inverse, y)
    np.maximum.at(high, inverse, y)
    mixed = np.flatnonzero(low != high)
    if mixed.size:
        names = list(index)
        j = mixed[0]
        raise DataError(
            f"metrics: patient '{names[j]}' has slides with different labels "
            f"({low[j]} and {high[j]})"
            + (f" ({mixed.size} such patients)" if mixed.size > 1 else "")
        )
    return list(index), low, mean_p
