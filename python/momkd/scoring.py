"""Metrics of predictions whatever the number of classes: one entry point per question, binary
labels to :mod:`momkd.metrics` (unchanged), more classes to :mod:`momkd.multiclass_metrics`.

Probabilities are ``(n,)`` positive-class probabilities for two classes and ``(n, C)`` class
probabilities for more, as prediction CSVs hold them (``prob``, or one ``prob_<class>`` column per
class). The headline ``auc`` is the binary AUC or the macro one-vs-rest AUC.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from momkd.metrics import (
    binary_metrics,
    bootstrap_auc_ci,
    evaluate_with_threshold,
    paired_auc_test,
)
from momkd.multiclass_metrics import (
    bootstrap_macro_auc_ci,
    multiclass_metrics,
    paired_macro_auc_test,
    predicted_class,
)

__all__ = [
    "auc_ci",
    "is_multiclass",
    "metrics",
    "metrics_at_threshold",
    "paired_test",
    "predictions",
]


def is_multiclass(probs: Any) -> bool:
    """Whether ``probs`` are ``(n, C)`` class probabilities rather than ``(n,)`` binary ones."""
    return bool(np.ndim(probs) == 2)


def predictions(probs: Any, threshold: float = 0.5) -> np.ndarray:
    """Predicted classes: ``p > threshold`` (binary) or the argmax (ties to the lower class)."""
    if is_multiclass(probs):
        return predicted_class(probs)
    return (np.asarray(probs, dtype=np.float64) > threshold).astype(np.int64)


def metrics(y: Any, probs: Any, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """:func:`~momkd.metrics.binary_metrics` or :func:`~momkd.multiclass_metrics.
    multiclass_metrics`."""
    if is_multiclass(probs):
        return multiclass_metrics(y, probs, class_names)
    return binary_metrics(y, probs)


def metrics_at_threshold(
    y: Any, probs: Any, thr: float, class_names: Sequence[str] | None = None
) -> dict[str, Any]:
    """Binary: :func:`~momkd.metrics.evaluate_with_threshold` (argmax metrics plus ``thr_*`` at the
    validation threshold). More classes have no threshold: their :func:`metrics`."""
    if is_multiclass(probs):
        return multiclass_metrics(y, probs, class_names)
    return evaluate_with_threshold(y, probs, thr)


def auc_ci(y: Any, probs: Any, n: int, seed: int) -> tuple[float, float]:
    """Stratified percentile bootstrap 95% CI of the AUC (binary) or the macro AUC."""
    if is_multiclass(probs):
        return bootstrap_macro_auc_ci(y, probs, n=n, seed=seed)
    return bootstrap_auc_ci(y, probs, n=n, seed=seed)


def paired_test(y: Any, probs_a: Any, probs_b: Any, n: int, seed: int) -> dict[str, float]:
    """Two methods on the same samples: DeLong plus a paired bootstrap (binary), or the paired
    bootstrap of the macro AUC (more classes; its ``p_value`` is the bootstrap's)."""
    if is_multiclass(probs_a):
        return paired_macro_auc_test(y, probs_a, probs_b, n=n, seed=seed)
    return paired_auc_test(y, probs_a, probs_b, n=n, seed=seed)
