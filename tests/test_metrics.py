"""Metrics against scikit-learn and hand-computed values."""

from __future__ import annotations

import math
import statistics
import warnings

import numpy as np
import pytest
from momkd.errors import DataError
from momkd.metrics import (
    THRESHOLD_METRICS,
    MetricWarning,
    aggregate,
    best_f1_threshold,
    binary_metrics,
    bootstrap_auc_ci,
    delong_test,
    evaluate_with_threshold,
    paired_auc_test,
    patient_level,
)
from oracles import delong_by_loops, stratified_draws
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    f1_score,
    recall_score,
    roc_auc_score,
)


def _sample(seed: int, n: int = 57, ties: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(np.int64)
    y[:2] = [0, 1]
    p = 1 / (1 + np.exp(-(rng.normal(size=n) + 1.2 * y)))
    if ties:
        p = np.round(p, 1)  # many tied scores
    return y, p


def _sklearn_metrics(y: np.ndarray, p: np.ndarray, thr: float) -> dict[str, float]:
    pred = (p > thr).astype(np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            "auc": roc_auc_score(y, p),
            "auprc": average_precision_score(y, p),
            "accuracy": accuracy_score(y, pred),
            "balanced_accuracy": balanced_accuracy_score(y, pred),
            "f1": f1_score(y, pred, average="macro"),
            "sensitivity": recall_score(y, pred, pos_label=1, zero_division=np.nan),
            "specificity": recall_score(y, pred, pos_label=0, zero_division=np.nan),
        }


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("thr", [0.5, 0.3, 0.75])
def test_binary_metrics_match_sklearn(seed: int, ties: bool, thr: float) -> None:
    y, p = _sample(seed, ties=ties)
    ours = binary_metrics(y, p, thr)
    ref = _sklearn_metrics(y, p, thr)
    for key, value in ref.items():
        assert ours[key] == pytest.approx(value, abs=1e-12, nan_ok=True), key
    assert ours["n"] == len(y)
    assert ours["n_pos"] == int(y.sum())


def test_threshold_half_is_argmax_of_two_logits() -> None:
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(40, 2))
    y = rng.integers(0, 2, 40)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    ours = binary_metrics(y, probs[:, 1])
    assert ours["accuracy"] == pytest.approx(accuracy_score(y, logits.argmax(1)))


def test_extreme_thresholds_match_sklearn() -> None:
    y, p = _sample(11)
    for thr in (-1.0, 2.0):  # everything positive / everything negative
        ours = binary_metrics(y, p, thr)
        ref = _sklearn_metrics(y, p, thr)
        for key in ("accuracy", "balanced_accuracy", "f1", "sensitivity", "specificity"):
            assert ours[key] == pytest.approx(ref[key], nan_ok=True), (thr, key)


def test_single_class_gives_nan_auc_with_warning() -> None:
    y = np.zeros(6, dtype=int)
    p = np.array([0.1, 0.7, 0.2, 0.9, 0.4, 0.3])
    with pytest.warns(MetricWarning, match="AUC is undefined"):
        m = binary_metrics(y, p)
    assert math.isnan(m["auc"]) and math.isnan(m["auprc"]) and math.isnan(m["sensitivity"])
    assert m["accuracy"] == pytest.approx(accuracy_score(y, p > 0.5))
    assert m["specificity"] == pytest.approx(4 / 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert m["f1"] == pytest.approx(f1_score(y, p > 0.5, average="macro"))
        assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, p > 0.5))


def test_all_positive_single_class() -> None:
    y = np.ones(5, dtype=int)
    p = np.array([0.2, 0.6, 0.7, 0.9, 0.1])
    with pytest.warns(MetricWarning):
        m = binary_metrics(y, p)
    assert math.isnan(m["auc"])
    assert m["auprc"] == pytest.approx(average_precision_score(y, p))
    assert m["sensitivity"] == pytest.approx(3 / 5)


@pytest.mark.parametrize(
    ("y", "p", "msg"),
    [
        ([0, 1], [0.1], "shape"),
        ([0, 2], [0.1, 0.2], "0 or 1"),
        ([0, 1], [0.1, float("nan")], "NaN"),
        ([], [], "no samples"),
    ],
)
def test_bad_inputs_raise_data_error(y: list, p: list, msg: str) -> None:
    with pytest.raises(DataError, match=msg):
        binary_metrics(np.array(y), np.array(p))


def test_best_f1_threshold_hand_computed() -> None:
    # Splits of the sorted scores: all positive F1 2/3, >0.1 -> 4/5, >0.35 -> 1/2, >0.4 -> 2/3.
    y = np.array([0, 0, 1, 1])
    p = np.array([0.1, 0.4, 0.35, 0.8])
    thr = best_f1_threshold(y, p)
    assert thr == pytest.approx((0.1 + 0.35) / 2)


@pytest.mark.parametrize("seed", range(8))
def test_best_f1_threshold_is_optimal_against_sklearn(seed: int) -> None:
    y, p = _sample(seed, n=41, ties=seed % 2 == 0)
    thr = best_f1_threshold(y, p)
    achieved = f1_score(y, p > thr)
    # Every achievable prediction is "score > t" for t below all scores or at a distinct score.
    cands = np.r_[p.min() - 1.0, np.unique(p)]
    best = max(f1_score(y, p > t, zero_division=0.0) for t in cands)
    assert achieved == pytest.approx(best)


def test_best_f1_threshold_without_positives_warns() -> None:
    with pytest.warns(MetricWarning):
        assert best_f1_threshold([0, 0, 0], [0.2, 0.3, 0.9]) == 0.5


def test_evaluate_with_threshold_keys_and_values() -> None:
    y, p = _sample(5)
    thr = 0.37
    out = evaluate_with_threshold(y, p, thr)
    at_half = _sklearn_metrics(y, p, 0.5)
    at_thr = _sklearn_metrics(y, p, thr)
    for key, value in at_half.items():
        assert out[key] == pytest.approx(value, nan_ok=True)
    for key in THRESHOLD_METRICS:
        assert out[f"thr_{key}"] == pytest.approx(at_thr[key], nan_ok=True)
    assert out["threshold"] == thr
    assert "thr_auc" not in out


def test_aggregate_mean_and_sample_std() -> None:
    folds = [
        {"auc": 0.7, "f1": 0.5, "n": 10, "name": "a", "flag": True},
        {"auc": 0.8, "f1": 0.6, "n": 12, "name": "b", "flag": False},
        {"auc": 0.9, "f1": 0.4, "n": 11, "name": "c", "flag": True},
    ]
    mean, std = aggregate(folds)
    assert set(mean) == {"auc", "f1", "n"}
    assert mean["auc"] == pytest.approx(statistics.mean([0.7, 0.8, 0.9]))
    assert std["auc"] == pytest.approx(statistics.stdev([0.7, 0.8, 0.9]))
    assert std["f1"] == pytest.approx(np.std([0.5, 0.6, 0.4], ddof=1))
    assert mean["n"] == pytest.approx(11.0)


def test_aggregate_nan_and_single_fold() -> None:
    mean, std = aggregate([{"auc": 0.6}, {"auc": float("nan")}, {"auc": 0.8}])
    assert mean["auc"] == pytest.approx(0.7)
    assert std["auc"] == pytest.approx(statistics.stdev([0.6, 0.8]))
    mean, std = aggregate([{"auc": 0.6}])
    assert mean["auc"] == 0.6 and math.isnan(std["auc"])
    assert aggregate([]) == ({}, {})


@pytest.mark.parametrize("ties", [False, True])
def test_bootstrap_ci_matches_sklearn_on_the_same_stratified_resamples(ties: bool) -> None:
    y, p = _sample(2, n=60, ties=ties)
    n, seed = 200, 7
    low, high = bootstrap_auc_ci(y, p, n=n, seed=seed)
    rows = stratified_draws(y, n, seed)
    for r in rows:  # every resample keeps the class counts
        assert y[r].sum() == y.sum() and len(r) == len(y)
    aucs = [roc_auc_score(y[r], p[r]) for r in rows]
    ref_low, ref_high = np.percentile(aucs, [2.5, 97.5])
    assert low == pytest.approx(ref_low, abs=1e-12) and high == pytest.approx(ref_high, abs=1e-12)
    assert low < roc_auc_score(y, p) < high


def test_bootstrap_ci_deterministic_and_single_class() -> None:
    y, p = _sample(4)
    assert bootstrap_auc_ci(y, p, n=50, seed=1) == bootstrap_auc_ci(y, p, n=50, seed=1)
    assert bootstrap_auc_ci(y, p, n=50, seed=1) != bootstrap_auc_ci(y, p, n=50, seed=2)
    with pytest.warns(MetricWarning):
        low, high = bootstrap_auc_ci([1, 1, 1], [0.2, 0.5, 0.7], n=10)
    assert math.isnan(low) and math.isnan(high)
    with pytest.raises(DataError, match="resamples"):
        bootstrap_auc_ci(y, p, n=0)


def _binormal(seed: int, n_pos: int, n_neg: int, d: float) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    p = np.r_[rng.normal(d, 1.0, n_pos), rng.normal(0.0, 1.0, n_neg)]
    return np.r_[np.ones(n_pos, np.int64), np.zeros(n_neg, np.int64)], p


def _coverage(seeds: range, n_pos: int, n_neg: int, d: float, resamples: int) -> float:
    # Binormal scores with unit variances: AUC = P(X_pos > X_neg) = Phi(d / sqrt(2)).
    true_auc = 0.5 * math.erfc(-d / 2.0)
    hits = 0
    for seed in seeds:
        y, p = _binormal(seed, n_pos, n_neg, d)
        low, high = bootstrap_auc_ci(y, p, n=resamples, seed=seed + 10_000)
        hits += low <= true_auc <= high
    return hits / len(seeds)


def test_bootstrap_ci_covers_the_true_auc_at_about_the_nominal_rate() -> None:
    # 300 data sets: the binomial standard error of a 95% coverage is 1.3 points.
    coverage = _coverage(range(300), n_pos=40, n_neg=60, d=1.0, resamples=500)
    assert 0.91 <= coverage <= 0.98, coverage


@pytest.mark.slow
def test_bootstrap_ci_coverage_many_seeds() -> None:
    coverage = _coverage(range(2000), n_pos=60, n_neg=140, d=1.2, resamples=2000)
    assert abs(coverage - 0.95) <= 0.02, coverage


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("ties", [False, True])
def test_delong_matches_an_independent_quadratic_computation(seed: int, ties: bool) -> None:
    y, pa = _sample(seed, n=45, ties=ties)
    rng = np.random.default_rng(seed + 100)
    pb = np.clip(pa + rng.normal(0, 0.15, len(pa)), 0, 1)  # a correlated second method
    if ties:
        pb = np.round(pb, 1)
    ours = delong_test(y, pa, pb)
    diff, p_value = delong_by_loops(y, pa, pb)
    assert ours["auc_a"] == pytest.approx(roc_auc_score(y, pa), abs=1e-12)
    assert ours["auc_b"] == pytest.approx(roc_auc_score(y, pb), abs=1e-12)
    assert ours["auc_diff"] == pytest.approx(diff, abs=1e-12)
    assert ours["p_value"] == pytest.approx(p_value, rel=1e-7, abs=1e-12)
    assert 0.0 < ours["p_value"] <= 1.0


def test_delong_degenerate_cases() -> None:
    y, p = _sample(1)
    same = delong_test(y, p, p)
    assert same["auc_diff"] == 0.0 and same["p_value"] == 1.0
    with pytest.warns(MetricWarning):
        few = delong_test([0, 0, 1], [0.1, 0.2, 0.9], [0.3, 0.2, 0.1])
    assert math.isnan(few["p_value"]) and few["auc_a"] == 1.0 and few["auc_b"] == 0.0


def test_paired_bootstrap_matches_sklearn_on_the_same_resamples() -> None:
    y, pa = _sample(5, n=70)
    pb = np.random.default_rng(9).permutation(pa)  # an unrelated, weaker method
    n, seed = 150, 3
    out = paired_auc_test(y, pa, pb, n=n, seed=seed)
    diffs = np.array(
        [
            roc_auc_score(y[r], pa[r]) - roc_auc_score(y[r], pb[r])
            for r in stratified_draws(y, n, seed)
        ]
    )
    low, high = np.percentile(diffs, [2.5, 97.5])
    assert out["ci_low"] == pytest.approx(low, abs=1e-12)
    assert out["ci_high"] == pytest.approx(high, abs=1e-12)
    p_boot = min(1.0, 2 * min(np.mean(diffs <= 0), np.mean(diffs >= 0)))
    assert out["p_value_bootstrap"] == pytest.approx(p_boot)
    assert out["auc_diff"] == pytest.approx(roc_auc_score(y, pa) - roc_auc_score(y, pb))
    assert out["p_value"] == pytest.approx(delong_by_loops(y, pa, pb)[1], rel=1e-7)
    assert (out["n"], out["n_pos"], out["n_resamples"]) == (len(y), int(y.sum()), n)


def test_paired_bootstrap_uses_the_same_resamples_for_both_methods() -> None:
    # Identical methods: every paired difference is exactly 0, so the CI collapses to a point.
    y, p = _sample(6, n=80)
    out = paired_auc_test(y, p, p.copy(), n=300, seed=0)
    assert out["ci_low"] == 0.0 and out["ci_high"] == 0.0 and out["p_value"] == 1.0
    # An unpaired bootstrap of each AUC would give a wide interval for the difference.
    shifted = paired_auc_test(y, p, np.where(y == 1, p - 0.05, p), n=300, seed=0)
    assert shifted["ci_low"] >= 0.0 and shifted["auc_diff"] > 0.0


def test_patient_level_matches_a_hand_computation() -> None:
    cases = ["P1", "P1", "P2", "P3", "P3", "P3", ""]
    slides = ["s1", "s2", "s3", "s4", "s5", "s6", "s7"]
    labels = [1, 1, 0, 0, 0, 0, 1]
    probs = [0.9, 0.3, 0.4, 0.2, 0.5, 0.8, 0.7]
    ids, y, p = patient_level(cases, labels, probs, slide_ids=slides)
    assert ids == ["P1", "P2", "P3", "s7"]
    assert y.tolist() == [1, 0, 0, 1]
    assert p == pytest.approx([0.6, 0.4, 0.5, 0.7])
    # AUC over patients by hand: positives 0.6, 0.7 vs negatives 0.4, 0.5 -> 4/4.
    assert binary_metrics(y, p)["auc"] == 1.0
    assert binary_metrics(labels, probs)["auc"] == pytest.approx(roc_auc_score(labels, probs))
    # One row per patient already: the identity.
    ids2, y2, p2 = patient_level(ids, y, p)
    assert ids2 == ids and y2.tolist() == y.tolist() and p2.tolist() == p.tolist()
    with pytest.raises(DataError, match="'P1'"):
        patient_level(["P1", "P1"], [0, 1], [0.2, 0.3])
