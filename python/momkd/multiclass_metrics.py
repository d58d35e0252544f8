"""Metrics of C-class predictions (``data.classes``), computed with numpy; the binary ones are in
:mod:`momkd.metrics`. The definitions follow scikit-learn (the tests compare against it):

* ``auc`` — macro one-vs-rest AUC: the mean over classes of the AUC of ``P[:, c]`` for class ``c``
  against all others (``roc_auc_score(y, P, multi_class="ovr", average="macro")``), over the
  classes present in ``y`` with at least one other class present; ``auc_<name>`` per class;
* the prediction is the argmax of the probabilities (a tie goes to the lower class index);
  ``accuracy``, ``balanced_accuracy`` (mean recall over the classes present in ``y``), ``f1``
  (macro F1 over the classes present in ``y`` or the predictions);
* ``confusion`` — the C x C matrix, rows the true class, columns the predicted one;
* ``n`` and ``n_<name>`` — counts.

Uncertainty and comparisons (DeLong's test is binary only, so both are bootstraps):

* :func:`bootstrap_macro_auc_ci` — stratified percentile bootstrap CI of the macro AUC (each class
  resampled within itself, so every resample keeps the class counts);
* :func:`paired_macro_auc_test` — two methods scored on the same samples: the paired stratified
  bootstrap of the macro-AUC difference (the same resamples for both), its percentile CI and the
  two-sided bootstrap p-value ``min(1, 2 min(P*(diff <= 0), P*(diff >= 0)))``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from momkd.errors import DataError
from momkd.metrics import (
    _CHUNK,
    MetricWarning,
    _auc,
    _check_resamples,
    _class_inputs,
    _resample_counts,
    _resampled_auc,
    paired_interval,
)

__all__ = [
    "bootstrap_macro_auc_ci",
    "class_keys",
    "multiclass_metrics",
    "paired_macro_auc_test",
    "predicted_class",
]


def class_keys(class_names: Sequence[str] | None, n_classes: int) -> list[str]:
    """Key suffix of each class: its name, or its index without names."""
    if class_names is None:
        return [str(c) for c in range(n_classes)]
    if len(class_names) != n_classes:
        raise DataError(f"metrics: {len(class_names)} class names for {n_classes} classes")
    return [str(c) for c in class_names]


def predicted_class(probs: Any) -> np.ndarray:
    """``(n,)`` argmax class of ``(n, C)`` probabilities (ties to the lower index)."""
    return np.asarray(np.argmax(np.asarray(probs, dtype=np.float64), axis=1), dtype=np.int64)


def _per_class_aucs(y: np.ndarray, p: np.ndarray) -> list[float]:
    return [_auc((y == c).astype(np.int64), p[:, c]) for c in range(p.shape[1])]


def _macro(aucs: Sequence[float]) -> float:
    """Mean of the defined per-class AUCs (NaN when none is)."""
    defined = [a for a in aucs if not math.isnan(a)]
    return float(np.mean(defined)) if defined else math.nan


def multiclass_metrics(
    y_true: Any, probs: Any, class_names: Sequence[str] | None = None
) -> dict[str, Any]:
    """Metrics of ``(n, C)`` class probabilities.

    Parameters
    ----------
    y_true
        ``(n,)`` class indices in ``[0, C)``.
    probs
        ``(n, C)`` probabilities (any scores whose argmax is the prediction).
    class_names
        ``C`` names for the per-class keys (default: the indices).

    Returns
    -------
    dict
        ``auc`` (macro one-vs-rest), ``auc_<class>``, ``accuracy``, ``balanced_accuracy``, ``f1``
        (macro), ``n``, ``n_<class>`` and ``confusion`` (C x C list of lists).
        A class absent from ``y`` has a NaN AUC and is left out of the macro AUC, with a
        :class:`MetricWarning`.

    Raises
    ------
    DataError
        Empty input, shape mismatch, labels outside ``[0, C)``, non-finite probabilities.
    """
    y, p = _class_inputs(y_true, probs)
    c = p.shape[1]
    keys = class_keys(class_names, c)
    aucs = _per_class_aucs(y, p)
    if any(math.isnan(a) for a in aucs):
        missing = [keys[i] for i, a in enumerate(aucs) if math.isnan(a)]
        warnings.warn(
            f"metrics: class {', '.join(missing)} absent from {len(y)} labels (or the only one "
            "present); its AUC is undefined and left out of the macro AUC",
            MetricWarning,
            stacklevel=2,
        )
    pred = predicted_class(p)
    confusion = np.zeros((c, c), dtype=np.int64)
    np.add.at(confusion, (y, pred), 1)
    true_n = confusion.sum(axis=1)
    pred_n = confusion.sum(axis=0)
    tp = np.diag(confusion)
    recalls = [tp[i] / true_n[i] for i in range(c) if true_n[i] > 0]
    f1s = [2 * tp[i] / (true_n[i] + pred_n[i]) for i in range(c) if true_n[i] + pred_n[i] > 0]
    out: dict[str, Any] = {"auc": _macro(aucs)}
    out.update({f"auc_{k}": a for k, a in zip(keys, aucs, strict=True)})
    out["accuracy"] = float(tp.sum() / len(y))
    out["balanced_accuracy"] = float(np.mean(recalls))
    out["f1"] = float(np.mean(f1s))
    out["n"] = len(y)
    out.update({f"n_{k}": int(n) for k, n in zip(keys, true_n, strict=True)})
    out["confusion"] = confusion.tolist()
    return out


def _bootstrap_macro_aucs(
    y: np.ndarray, scores: Sequence[np.ndarray], n: int, seed: int
) -> np.ndarray:
    """``(n, len(scores))`` macro AUCs of the same stratified resamples for every ``(m, C)`` score
    matrix.

    For each chunk of ``c`` resamples, class after class in index order,
    ``rng.integers(0, m_k, size=(c, m_k))`` indexes the ``m_k`` samples of class ``k`` (in the
    order of ``np.flatnonzero(y == k)``), with ``rng = numpy.random.default_rng(seed)``.
    """
    n_classes = scores[0].shape[1]
    members = [np.flatnonzero(y == k) for k in range(n_classes)]
    present = [k for k in range(n_classes) if 0 < len(members[k]) < len(y)]
    rng = np.random.default_rng(seed)
    out = np.empty((n, len(scores)))
    for start in range(0, n, _CHUNK):
        c = min(_CHUNK, n - start)
        counts = np.zeros((c, len(y)))
        for idx in members:
            if len(idx):
                draws = rng.integers(0, len(idx), size=(c, len(idx)))
                counts[:, idx] = _resample_counts(draws, len(idx))
        for j, p in enumerate(scores):
            per_class = []
            for k in present:
                pos, neg = members[k], np.flatnonzero(y != k)
                per_class.append(
                    _resampled_auc(p[pos, k], p[neg, k], counts[:, pos], counts[:, neg])
                )
            out[start : start + c, j] = np.mean(per_class, axis=0)
    return out


def bootstrap_macro_auc_ci(
    y: Any, probs: Any, n: int = 2000, seed: int = 0, alpha: float = 0.05
) -> tuple[float, float]:
    """Stratified percentile bootstrap confidence interval of the macro one-vs-rest AUC.

    Each resample draws, for every class, as many samples of that class as it has, with
    replacement, so every resample keeps the class counts.

    Parameters
    ----------
    y, probs
        ``(m,)`` class indices and ``(m, C)`` probabilities.
    n
        Number of resamples.
    seed
        Seed of ``numpy.random.default_rng``.
    alpha
        ``1 - confidence``.

    Returns
    -------
    tuple[float, float]
        ``(low, high)``; ``(nan, nan)`` with a :class:`MetricWarning` when ``y`` has one class.
    """
    yy, pp = _class_inputs(y, probs)
    _check_resamples(n)
    if yy.min() == yy.max():
        warnings.warn(
            "metrics: one class only; no macro-AUC confidence interval", MetricWarning, stacklevel=2
        )
        return math.nan, math.nan
    aucs = _bootstrap_macro_aucs(yy, [pp], int(n), seed)[:, 0]
    low, high = np.percentile(aucs, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(low), float(high)


def paired_macro_auc_test(
    y: Any, probs_a: Any, probs_b: Any, n: int = 2000, seed: int = 0, alpha: float = 0.05
) -> dict[str, float]:
    """Compare two methods' macro AUCs on the same samples (paired stratified bootstrap).

    Parameters
    ----------
    y
        ``(m,)`` class indices.
    probs_a, probs_b
        ``(m, C)`` probabilities of the two methods, aligned sample by sample.
    n, seed, alpha
        Resamples, their seed and ``1 - confidence``.

    Returns
    -------
    dict[str, float]
        ``auc_a``, ``auc_b``, ``auc_diff``, ``ci_low``, ``ci_high``, ``p_value`` (the bootstrap's,
        resolution ``1 / n``; also as ``p_value_bootstrap``, the key the binary test gives it),
        ``n``, ``n_resamples``; CI and p-value NaN (with a
        :class:`MetricWarning`) when ``y`` has one class.
    """
    yy, pa = _class_inputs(y, probs_a)
    _, pb = _class_inputs(y, probs_b)
    if pa.shape != pb.shape:
        raise DataError(f"metrics: probabilities of shapes {pa.shape} and {pb.shape}")
    _check_resamples(n)
    auc_a, auc_b = _macro(_per_class_aucs(yy, pa)), _macro(_per_class_aucs(yy, pb))
    out = {
        "auc_a": auc_a,
        "auc_b": auc_b,
        "auc_diff": auc_a - auc_b,
        "n": len(yy),
        "n_resamples": int(n),
    }
    if yy.min() == yy.max():
        warnings.warn(
            "metrics: one class only; macro AUCs cannot be compared", MetricWarning, stacklevel=2
        )
        out.update(ci_low=math.nan, ci_high=math.nan, p_value=math.nan, p_value_bootstrap=math.nan)
        return out
    aucs = _bootstrap_macro_aucs(yy, [pa, pb], int(n), seed)
    low, high, p_value = paired_interval(aucs[:, 0] - aucs[:, 1], alpha)
    out.update(ci_low=low, ci_high=high, p_value=p_value, p_value_bootstrap=p_value)
    return out
