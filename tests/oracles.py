"""Independent reference computations shared by the tests (not collected: no test_ prefix)."""

from __future__ import annotations

import math
import statistics

import numpy as np


def stratified_draws(y: np.ndarray, n: int, seed: int) -> list[np.ndarray]:
    """The resamples documented for the bootstrap (one chunk: n <= 256), as row indices of y."""
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    rng = np.random.default_rng(seed)
    ip = rng.integers(0, len(pos), size=(n, len(pos)))
    ineg = rng.integers(0, len(neg), size=(n, len(neg)))
    return [np.r_[pos[a], neg[b]] for a, b in zip(ip, ineg, strict=True)]


def delong_by_loops(y: np.ndarray, pa: np.ndarray, pb: np.ndarray) -> tuple[float, float]:
    """DeLong's statistic from the Mann-Whitney kernel, with explicit O(n^2) loops."""
    pos = [i for i in range(len(y)) if y[i] == 1]
    neg = [j for j in range(len(y)) if y[j] == 0]

    def psi(a: float, b: float) -> float:
        return 1.0 if a > b else (0.5 if a == b else 0.0)

    v10, v01 = [], []
    for p in (pa, pb):
        v10.append([sum(psi(p[i], p[j]) for j in neg) / len(neg) for i in pos])
        v01.append([sum(psi(p[i], p[j]) for i in pos) / len(pos) for j in neg])

    def cov(u: list[float], v: list[float]) -> float:
        mu, mv = sum(u) / len(u), sum(v) / len(v)
        return sum((a - mu) * (b - mv) for a, b in zip(u, v, strict=True)) / (len(u) - 1)

    var = 0.0
    for v, n in ((v10, len(pos)), (v01, len(neg))):
        var += (cov(v[0], v[0]) + cov(v[1], v[1]) - 2 * cov(v[0], v[1])) / n
    diff = sum(v10[0]) / len(pos) - sum(v10[1]) / len(pos)
    z = diff / math.sqrt(var)
    return diff, 2 * (1 - statistics.NormalDist().cdf(abs(z)))
