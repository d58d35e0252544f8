"""Multi-class metrics (momkd.multiclass_metrics) against scikit-learn and explicit resampling."""

from __future__ import annotations

import math

import numpy as np
import pytest
from momkd.errors import DataError
from momkd.metrics import MetricWarning
from momkd.multiclass_metrics import (
    bootstrap_macro_auc_ci,
    multiclass_metrics,
    paired_macro_auc_test,
)
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    roc_auc_score,
)


def _data(
    n: int, c: int, seed: int, signal: float = 0.4, ties: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    p = rng.dirichlet(np.ones(c), n)
    p[np.arange(n), y] += signal
    p = p / p.sum(axis=1, keepdims=True)
    # Ties within a column, as rounded probabilities have (rows then sum to 1 only roughly).
    return y, np.round(p, 2) if ties else p


def _sk_macro_auc(y: np.ndarray, p: np.ndarray) -> float:
    """scikit-learn's one-vs-rest macro AUC, class by class (its multi_class="ovr" refuses rows
    that do not sum to 1)."""
    return float(np.mean([roc_auc_score(y == i, p[:, i]) for i in range(p.shape[1])]))


@pytest.mark.parametrize(("n", "c", "seed"), [(60, 3, 0), (97, 4, 1), (40, 5, 2)])
def test_metrics_match_scikit_learn(n: int, c: int, seed: int) -> None:
    y, p = _data(n, c, seed)
    names = [f"k{i}" for i in range(c)]
    m = multiclass_metrics(y, p, names)
    pred = np.argmax(p, axis=1)
    assert m["auc"] == pytest.approx(_sk_macro_auc(y, p))
    y2, p2 = _data(n, c, seed, ties=False)
    assert multiclass_metrics(y2, p2)["auc"] == pytest.approx(
        roc_auc_score(y2, p2, multi_class="ovr", average="macro")
    )
    for i, name in enumerate(names):
        assert m[f"auc_{name}"] == pytest.approx(roc_auc_score(y == i, p[:, i]))
        assert m[f"n_{name}"] == int(np.sum(y == i))
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert m["confusion"] == confusion_matrix(y, pred, labels=list(range(c))).tolist()
    assert m["n"] == n


def test_absent_class_is_left_out_of_the_macro_auc() -> None:
    y, p = _data(50, 4, 3)
    y[y == 2] = 0
    with pytest.warns(MetricWarning, match="class 2"):
        m = multiclass_metrics(y, p)
    assert math.isnan(m["auc_2"])
    want = np.mean([roc_auc_score(y == i, p[:, i]) for i in (0, 1, 3)])
    assert m["auc"] == pytest.approx(want)


def test_bad_inputs_are_data_errors() -> None:
    with pytest.raises(DataError, match="class indices"):
        multiclass_metrics([0, 3], np.full((2, 3), 1 / 3))
    with pytest.raises(DataError, match="shape"):
        multiclass_metrics([0, 1, 2], np.full((2, 3), 1 / 3))
    with pytest.raises(DataError, match="non-finite"):
        multiclass_metrics([0, 1], np.array([[np.nan, 0.5, 0.5], [0.2, 0.3, 0.5]]))


def _explicit_macro_aucs(y: np.ndarray, ps: list[np.ndarray], n: int, seed: int) -> np.ndarray:
    """The documented resampling drawn the slow way: per chunk of 256, class by class, indices
    into the class's members; each resample's macro AUC by scikit-learn."""
    members = [np.flatnonzero(y == k) for k in range(ps[0].shape[1])]
    rng = np.random.default_rng(seed)
    out = []
    for start in range(0, n, 256):
        c = min(256, n - start)
        draws = [rng.integers(0, len(m), size=(c, len(m))) for m in members]
        for b in range(c):
            idx = np.concatenate([m[d[b]] for m, d in zip(members, draws, strict=True)])
            out.append([_sk_macro_auc(y[idx], p[idx]) for p in ps])
    return np.array(out)


def test_bootstrap_ci_equals_explicit_resampling() -> None:
    y, p = _data(45, 3, 4)
    aucs = _explicit_macro_aucs(y, [p], 200, seed=7)[:, 0]
    low, high = bootstrap_macro_auc_ci(y, p, n=200, seed=7)
    assert low == pytest.approx(np.percentile(aucs, 2.5))
    assert high == pytest.approx(np.percentile(aucs, 97.5))
    assert low < multiclass_metrics(y, p)["auc"] < high


def test_paired_test_equals_explicit_resampling() -> None:
    y, pa = _data(45, 3, 5, signal=0.6)
    _, pb = _data(45, 3, 6, signal=0.0)
    aucs = _explicit_macro_aucs(y, [pa, pb], 200, seed=3)
    diffs = aucs[:, 0] - aucs[:, 1]
    out = paired_macro_auc_test(y, pa, pb, n=200, seed=3)
    assert out["auc_diff"] == pytest.approx(_sk_macro_auc(y, pa) - _sk_macro_auc(y, pb))
    assert out["ci_low"] == pytest.approx(np.percentile(diffs, 2.5))
    assert out["ci_high"] == pytest.approx(np.percentile(diffs, 97.5))
    want_p = min(1.0, 2 * min(np.mean(diffs <= 0), np.mean(diffs >= 0)))
    assert out["p_value"] == pytest.approx(want_p)
    # The same method against itself: no difference, p = 1.
    same = paired_macro_auc_test(y, pa, pa, n=100, seed=3)
    assert same["auc_diff"] == 0.0 and same["p_value"] == 1.0


def test_patient_level_averages_each_class_column() -> None:
    from momkd.metrics import patient_level

    p = np.array([[0.2, 0.3, 0.5], [0.4, 0.4, 0.2], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]])
    ids, y, pm = patient_level(
        ["a", "b", "a", ""], [2, 0, 2, 1], p, slide_ids=["s1", "s2", "s3", "s4"]
    )
    assert ids == ["a", "b", "s4"] and y.tolist() == [2, 0, 1]
    np.testing.assert_allclose(pm, [[0.15, 0.55, 0.3], [0.4, 0.4, 0.2], [0.3, 0.3, 0.4]])
    with pytest.raises(DataError, match="patient 'a'"):
        patient_level(["a", "a"], [0, 1], p[:2])
