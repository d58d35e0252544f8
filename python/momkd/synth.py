"""Synthetic paired histology-genomics cohorts with known ground truth (``momkd synth``).

No real paired whole-slide / RNA-seq data ships with momkd, so models are compared on cohorts drawn
from the fixed generative model below. Its equations, every parameter and its default, the files it
writes and the oracle AUCs at the defaults are documented in ``docs/SYNTHETIC.md``. In short, per
patient ``i``:

* latent biology ``u_i ~ N(m_c, I_L)`` (``m_c = 0`` in the internal cohort, a mean shift in the
  external one that changes the prevalences but not the labelling mechanism);
* labels ``y_it = 1[w_t . u_i + e_it > theta_t]`` with unit directions ``w_t`` that are partly shared
  between tasks and half visible in morphology;
* a four-class ``subtype`` (LumA, LumB, HER2, Basal) read off the same noisy scores
  ``w_t . u_i + e_it`` of her2, pr and odx (no random draw of its own);
* log2 expression ``x_ig = mu_g + A_g . u_i + B_g . v_i + b_i + s_g n_ig`` with a sparse ``A``,
  written as TPM-like values ``max(2^x - 1, 0)``;
* slides: a blob of patches on a 256-px grid, Voronoi tissue regions (tumour, stroma, immune,
  adipose, necrosis), features = type prototype + slide nuisance + smooth within-slide variation +
  (on tumour patches of signal regions only) ``beta * M u_i[:L_m]`` + white noise;
* an external cohort with a site shift ``f -> scale * f + offset`` and no expression.

Everything is drawn from ``numpy`` generators seeded by ``SeedSequence(seed, spawn_key=...)`` per
parameter block, patient and slide, so a patient's draws do not depend on the order of generation
or on the sizes of the other blocks (changing ``dim`` does not change any label).
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import math
import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np

from momkd._io import atomic_open, atomic_write_text
from momkd.errors import ConfigError, DataError

log = logging.getLogger(__name__)

__all__ = [
    "SUBTYPE_CLASSES",
    "SUBTYPE_COLUMN",
    "PatientDraw",
    "SynthConfig",
    "TaskSpec",
    "draw_patients",
    "generate_cohort",
    "subtype_probabilities",
    "subtype_thresholds",
    "task_directions",
]

FORMAT_VERSION = 1

# spawn_key roots: one independent stream per parameter block and per (cohort, patient, part).
_KEY_GENES = (0, 1)
_KEY_FEATURES = (0, 2)
_KEY_SITE = (0, 3)
_COHORT_KEYS = {"internal": 1, "external": 2}
_PART_LABELS, _PART_EXPRESSION, _PART_SLIDE = 0, 1, 2
_RFF_FEATURES = 16  # random Fourier features per smooth field

# The four-class subtype column (docs/SYNTHETIC.md §1.6); class indices follow this order.
SUBTYPE_COLUMN = "subtype"
SUBTYPE_CLASSES = ("LumA", "LumB", "HER2", "Basal")
_LUMA, _LUMB, _HER2, _BASAL = range(4)
_GL_NODES = 64  # Gauss-Legendre nodes per dimension of the subtype probabilities
_GL_SPAN = 9.0  # the integrals are truncated at 9 standard deviations


# --------------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class TaskSpec:
    """One binary task of the synthetic cohort.

    Parameters
    ----------
    name
        Column name in the clinical tables.
    prevalence, external_prevalence
        Target share of positives among labelled patients, internal and external cohort.
    positive, negative
        The string values written for the two classes.
    mixing
        Coefficients of the task direction on the label factors (length ``<= L_m`` and
        ``<= L - L_m``); tasks whose mixing rows overlap have correlated labels.
    excluded
        ``(value, rate)`` pairs: each patient independently gets ``value`` instead of its label with
        probability ``rate`` (missing completely at random), like TCGA's "Equivocal".
    """

    name: str
    prevalence: float
    external_prevalence: float
    positive: str
    negative: str
    mixing: tuple[float, ...]
    excluded: tuple[tuple[str, float], ...] = ()


def _default_tasks() -> tuple[TaskSpec, ...]:
    return (
        TaskSpec(
            "her2",
            0.20,
            0.25,
            "Positive",
            "Negative",
            (1.0, -0.3, 0.0),
            (("Equivocal", 0.05), ("[Not Available]", 0.03)),
        ),
        TaskSpec(
            "pr",
            0.65,
            0.55,
            "Positive",
            "Negative",
            (0.0, 1.0, 0.0),
            (("Indeterminate", 0.01), ("[Not Available]", 0.03)),
        ),
        TaskSpec("odx", 0.20, 0.35, "High", "Low", (0.0, -0.6, 1.0)),
    )


@dataclass(frozen=True)
class SynthConfig:
    """Every parameter of the generative model, with its default (see ``docs/SYNTHETIC.md``).

    Scales of feature-space terms are standard deviations *per direction* of the term's subspace
    (per dimension for isotropic terms), so they do not depend on the feature dimension ``D``.
    """

    # latent biology and labels
    latent_dim: int = 16
    morph_dims: int = 8
    morph_label_share: float = 0.5
    label_noise_sd: float = 0.5
    tasks: tuple[TaskSpec, ...] = field(default_factory=_default_tasks)
    # four-class subtype (the tasks whose noisy scores define it; None: no subtype column)
    subtype_tasks: tuple[str, str, str] | None = ("her2", "pr", "odx")
    subtype_lumb_prevalence: float = 0.20
    multi_slide_share: float = 0.10
    # expression (log2 scale)
    expr_mean: float = 4.0
    expr_mean_sd: float = 2.0
    signal_gene_share: float = 0.20
    factors_per_signal_gene: int = 2
    signal_loading_sd: float = 1.0
    other_factors: int = 8
    other_gene_share: float = 0.30
    other_loading_sd: float = 0.8
    expr_noise_sd: float = 0.5
    expr_noise_log_sd: float = 0.3
    sample_offset_sd: float = 0.25
    # slide geometry
    patch_size: int = 256
    magnification: int = 20
    patch_count_sigma: float = 0.6
    patch_count_min: int = 16
    patch_count_max_factor: float = 8.0
    tissue_fill: float = 0.45
    max_ellipses: int = 3
    blob_noise: float = 0.3
    blob_noise_length: float = 0.15
    origin_max_cells: int = 64
    # tissue types (the first type carries the morphology signal)
    tissue_types: tuple[str, ...] = ("tumour", "stroma", "immune", "adipose", "necrosis")
    tissue_mix: tuple[float, ...] = (0.40, 0.30, 0.12, 0.10, 0.08)
    tissue_concentration: float = 10.0
    patches_per_region: int = 50
    max_regions: int = 48
    signal_region_share: float = 0.5
    # patch features
    feature_mean_sd: float = 0.5
    prototype_sd: float = 0.5
    nuisance_rank: int = 8
    nuisance_sd: float = 1.0
    heterogeneity_rank: int = 16
    heterogeneity_sd: float = 1.0
    heterogeneity_length: float = 4.0
    patch_noise_sd: float = 1.0
    morph_strength: float = 0.5
    # external site shift
    site_scale: float = 1.2
    site_scale_jitter: float = 0.05
    site_offset_sd: float = 0.3
    # oracles
    oracle_folds: int = 5
    oracle_alphas: tuple[float, ...] = tuple(10.0 ** (k / 2) for k in range(11))

    def __post_init__(self) -> None:
        def need(ok: bool, key: str, what: str) -> None:
            if not ok:
                raise ConfigError(f"SynthConfig.{key}: {what}, got {getattr(self, key)!r}")

        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                need(False, f.name, "must be finite")
        need(self.latent_dim >= 2, "latent_dim", "must be >= 2")
        need(1 <= self.morph_dims < self.latent_dim, "morph_dims", "must be in [1, latent_dim)")
        need(0.0 <= self.morph_label_share <= 1.0, "morph_label_share", "must be in [0, 1]")
        need(self.label_noise_sd >= 0.0, "label_noise_sd", "must be >= 0")
        need(len(self.tasks) >= 1, "tasks", "needs at least one task")
        names = [t.name for t in self.tasks]
        need(len(set(names)) == len(names), "tasks", "task names must be unique")
        n_fac = min(self.morph_dims, self.latent_dim - self.morph_dims)
        for t in self.tasks:
            need(bool(t.name) and t.name not in ("case_id", "slide_id"), "tasks", "bad task name")
            need(0.0 < t.prevalence < 1.0, "tasks", f"{t.name}: prevalence must be in (0, 1)")
            need(
                0.0 < t.external_prevalence < 1.0,
                "tasks",
                f"{t.name}: external_prevalence must be in (0, 1)",
            )
            need(t.positive != t.negative, "tasks", f"{t.name}: positive == negative")
            need(
                1 <= len(t.mixing) <= n_fac and any(c != 0 for c in t.mixing),
                "tasks",
                f"{t.name}: mixing needs 1..{n_fac} coefficients, not all zero",
            )
            rates = [r for _, r in t.excluded]
            need(
                all(r >= 0 for r in rates) and sum(rates) < 1.0,
                "tasks",
                f"{t.name}: excluded rates must be >= 0 and sum to < 1",
            )
            values = [t.positive, t.negative, *(v for v, _ in t.excluded)]
            need(len(set(values)) == len(values), "tasks", f"{t.name}: label values not unique")
        if self.subtype_tasks is not None:
            need(
                len(self.subtype_tasks) == 3
                and len(set(self.subtype_tasks)) == 3
                and set(self.subtype_tasks) <= set(names),
                "subtype_tasks",
                "needs three distinct task names (HER2 task, PR task, proliferation task) or None",
            )
            need(
                SUBTYPE_COLUMN not in names, "subtype_tasks", f"a task is named {SUBTYPE_COLUMN!r}"
            )
        need(
            0.0 < self.subtype_lumb_prevalence < 1.0,
            "subtype_lumb_prevalence",
            "must be in (0, 1)",
        )
        need(0.0 <= self.multi_slide_share <= 1.0, "multi_slide_share", "must be in [0, 1]")
        for key in ("signal_gene_share", "other_gene_share", "tissue_fill", "signal_region_share"):
            need(0.0 <= getattr(self, key) <= 1.0, key, "must be in [0, 1]")
        need(self.tissue_fill > 0.0, "tissue_fill", "must be > 0")
        need(
            1 <= self.factors_per_signal_gene <= self.latent_dim,
            "factors_per_signal_gene",
            "must be in [1, latent_dim]",
        )
        for key in ("other_factors", "nuisance_rank", "heterogeneity_rank"):
            need(getattr(self, key) >= 0, key, "must be >= 0")
        for key in (
            "expr_mean_sd",
            "signal_loading_sd",
            "other_loading_sd",
            "expr_noise_sd",
            "expr_noise_log_sd",
            "sample_offset_sd",
            "patch_count_sigma",
            "blob_noise",
            "feature_mean_sd",
            "prototype_sd",
            "nuisance_sd",
            "heterogeneity_sd",
            "patch_noise_sd",
            "morph_strength",
            "site_scale_jitter",
            "site_offset_sd",
        ):
            need(getattr(self, key) >= 0.0, key, "must be >= 0")
        for key in (
            "blob_noise_length",
            "heterogeneity_length",
            "site_scale",
            "tissue_concentration",
        ):
            need(getattr(self, key) > 0.0, key, "must be > 0")
        need(self.patch_size >= 1, "patch_size", "must be >= 1")
        need(self.patch_count_min >= 1, "patch_count_min", "must be >= 1")
        need(self.patch_count_max_factor >= 1.0, "patch_count_max_factor", "must be >= 1")
        need(self.max_ellipses >= 1, "max_ellipses", "must be >= 1")
        need(self.origin_max_cells >= 0, "origin_max_cells", "must be >= 0")
        need(len(self.tissue_types) >= 1, "tissue_types", "needs at least one type")
        need(
            len(self.tissue_mix) == len(self.tissue_types) and all(p > 0 for p in self.tissue_mix),
            "tissue_mix",
            "needs one positive weight per tissue type",
        )
        need(self.patches_per_region >= 1, "patches_per_region", "must be >= 1")
        need(self.max_regions >= 1, "max_regions", "must be >= 1")
        need(self.oracle_folds >= 2, "oracle_folds", "must be >= 2")
        need(
            len(self.oracle_alphas) >= 1 and all(c > 0 for c in self.oracle_alphas),
            "oracle_alphas",
            "needs positive values",
        )

    @property
    def min_dim(self) -> int:
        """Smallest feature dimension: the signal, nuisance and variation subspaces are disjoint."""
        return self.morph_dims + self.nuisance_rank + self.heterogeneity_rank


# ------------------------------------------------------------------------------ latent and labels


def task_directions(config: SynthConfig) -> tuple[np.ndarray, np.ndarray]:
    """Unit label directions of the tasks in latent space.

    Parameters
    ----------
    config
        The generator configuration.

    Returns
    -------
    w : np.ndarray, shape (T, L)
        ``w_t = sqrt(rho) a_t + sqrt(1 - rho) b_t``: the direction of the noiseless label score.
    a : np.ndarray, shape (T, L_m)
        ``a_t``: the unit morphology-visible part (coordinates on the first ``L_m`` latent dims).
    """
    lat, lm, rho = config.latent_dim, config.morph_dims, config.morph_label_share
    t_count = len(config.tasks)
    w = np.zeros((t_count, lat))
    a = np.zeros((t_count, lm))
    for t, task in enumerate(config.tasks):
        c = np.asarray(task.mixing, dtype=np.float64)
        c = c / np.linalg.norm(c)
        a[t, : len(c)] = c
        w[t, : len(c)] = math.sqrt(rho) * c
        w[t, lm : lm + len(c)] = math.sqrt(1.0 - rho) * c
    return w, a


def _thresholds(config: SynthConfig) -> np.ndarray:
    """theta_t such that P(w_t . u + e > theta_t) = prevalence_t for u ~ N(0, I)."""
    sd = math.sqrt(1.0 + config.label_noise_sd**2)
    return np.array([sd * NormalDist().inv_cdf(1.0 - t.prevalence) for t in config.tasks])


def _external_mean(config: SynthConfig) -> np.ndarray:
    """Minimum-norm latent mean shift m with P(w_t . u + e > theta_t) = external_prevalence_t.

    Only the case mix changes: P(y | u) is the same in both cohorts.
    """
    w, _ = task_directions(config)
    sd = math.sqrt(1.0 + config.label_noise_sd**2)
    nd = NormalDist()
    b = np.array(
        [
            sd * (nd.inv_cdf(1 - t.prevalence) - nd.inv_cdf(1 - t.external_prevalence))
            for t in config.tasks
        ]
    )
    m, *_ = np.linalg.lstsq(w, b, rcond=None)
    return m


def _seq(seed: int, *key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=key)))


@dataclass
class PatientDraw:
    """Patient-level draws of one cohort.

    Attributes
    ----------
    case_ids : list[str], length n
    u : np.ndarray, shape (n, L)        latent biology
    scores : np.ndarray, shape (n, T)   noiseless label scores ``w_t . u``
    labels : np.ndarray, shape (n, T)   int8: 1 positive, 0 negative, -1 excluded value
    values : list[list[str]], n x T     the strings written to the clinical table
    n_slides : np.ndarray, shape (n,)   slides per patient (1 or 2)
    noisy : np.ndarray, shape (n, T)    the noisy label scores ``w_t . u + e`` the labels threshold
    subtype : np.ndarray, shape (n,) or None
        int8 index into :data:`SUBTYPE_CLASSES` (None when ``config.subtype_tasks`` is None)
    """

    case_ids: list[str]
    u: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    values: list[list[str]]
    n_slides: np.ndarray
    noisy: np.ndarray
    subtype: np.ndarray | None


def draw_patients(
    n: int, *, seed: int = 0, external: bool = False, config: SynthConfig | None = None
) -> PatientDraw:
    """Draw the latent vectors, labels and slide counts of ``n`` patients (no slides, no genes).

    Patient ``i`` of a cohort draws from its own stream, so ``draw_patients(n)`` is a prefix of
    ``draw_patients(n + k)`` and equals what :func:`generate_cohort` writes for the same seed.

    Parameters
    ----------
    n
        Number of patients.
    seed
        Non-negative random seed.
    external
        Draw the external cohort (shifted latent mean, ``EXT-`` ids) instead of the internal one.
    config
        Generator configuration (default :class:`SynthConfig()`).

    Returns
    -------
    PatientDraw
    """
    cfg = config or SynthConfig()
    _check_seed(seed)
    if n < 0:
        raise ConfigError(f"patients: must be >= 0, got {n}")
    cohort = "external" if external else "internal"
    ckey = _COHORT_KEYS[cohort]
    w, _ = task_directions(cfg)
    theta = _thresholds(cfg)
    mean = _external_mean(cfg) if external else np.zeros(cfg.latent_dim)
    lat, t_count = cfg.latent_dim, len(cfg.tasks)
    prefix = "EXT" if external else "SYN"
    width = max(4, len(str(n)))
    u = np.empty((n, lat))
    labels = np.empty((n, t_count), dtype=np.int8)
    values: list[list[str]] = []
    n_slides = np.empty(n, dtype=np.int64)
    noisy_all = np.empty((n, t_count))
    for i in range(n):
        rng = _seq(seed, ckey, i, _PART_LABELS)
        u[i] = mean + rng.standard_normal(lat)
        noisy = w @ u[i] + cfg.label_noise_sd * rng.standard_normal(t_count)
        noisy_all[i] = noisy
        r_excl = rng.random(t_count)
        n_slides[i] = 1 + int(rng.random() < cfg.multi_slide_share)
        row: list[str] = []
        for t, task in enumerate(cfg.tasks):
            pos = bool(noisy[t] > theta[t])
            value, lab = (task.positive, 1) if pos else (task.negative, 0)
            acc = 0.0
            for excl_value, rate in task.excluded:
                acc += rate
                if r_excl[t] < acc:
                    value, lab = excl_value, -1
                    break
            row.append(value)
            labels[i, t] = lab
        values.append(row)
    case_ids = [f"{prefix}-{i + 1:0{width}d}" for i in range(n)]
    subtype = None
    if cfg.subtype_tasks is not None:
        subtype = _assign_subtype(noisy_all[:, _subtype_index(cfg)], subtype_thresholds(cfg))
    return PatientDraw(case_ids, u, u @ w.T, labels, values, n_slides, noisy_all, subtype)


# -------------------------------------------------------------------------------------- subtype


def _subtype_index(cfg: SynthConfig) -> list[int]:
    """Positions in ``cfg.tasks`` of the HER2, PR and proliferation tasks of the subtype."""
    if cfg.subtype_tasks is None:
        raise ConfigError("SynthConfig.subtype_tasks: the subtype is switched off (None)")
    names = [t.name for t in cfg.tasks]
    return [names.index(name) for name in cfg.subtype_tasks]


def _assign_subtype(noisy: np.ndarray, thr: tuple[float, float, float]) -> np.ndarray:
    """Subtype index from the noisy scores (n, 3) of the HER2, PR and proliferation tasks.

    HER2 when the HER2 score is above its label threshold; otherwise Basal when the PR score is at
    or below its threshold; otherwise LumB when the proliferation score is above the split
    threshold, else LumA. HER2 and Basal therefore agree with the binary her2 and pr labels.
    """
    a, b, c = thr
    out = np.where(noisy[:, 2] > c, _LUMB, _LUMA)
    out = np.where(noisy[:, 1] > b, out, _BASAL)
    out = np.where(noisy[:, 0] > a, _HER2, out)
    return out.astype(np.int8)


_ncdf_object = np.frompyfunc(lambda x: 0.5 * math.erfc(-x / math.sqrt(2.0)), 1, 1)


def _below(x: np.ndarray, sd: float) -> np.ndarray:
    """P(N(0, sd^2) <= x), elementwise (a step function when sd == 0)."""
    if sd > 0:
        return np.asarray(_ncdf_object(np.asarray(x, dtype=np.float64) / sd), dtype=np.float64)
    return (np.asarray(x) >= 0).astype(np.float64)


def _std_limit(x: np.ndarray, sd: float) -> np.ndarray:
    """x / sd clipped to the integration span (+-span for sd == 0, by the sign of x)."""
    if sd > 0:
        return np.clip(np.asarray(x, dtype=np.float64) / sd, -_GL_SPAN, _GL_SPAN)
    return np.where(np.asarray(x) >= 0, _GL_SPAN, -_GL_SPAN)


def _gauss_legendre(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights (..., K) of the Gauss-Legendre rule on [lo, hi] (empty when hi <= lo)."""
    x, wts = np.polynomial.legendre.leggauss(_GL_NODES)
    half = np.maximum(hi - lo, 0.0)[..., None] / 2.0
    return lo[..., None] + half * (x + 1.0), half * wts


def _phi(t: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * t * t) / math.sqrt(2.0 * math.pi)


def subtype_probabilities(
    mean: np.ndarray, cov: np.ndarray, thresholds: tuple[float, float, float]
) -> np.ndarray:
    """Class probabilities of the subtype when the three noisy scores are ``N(mean, cov)``.

    Parameters
    ----------
    mean : np.ndarray, shape (n, 3)
        Means of the (HER2, PR, proliferation) noisy scores, one row per patient.
    cov : np.ndarray, shape (3, 3)
        Their covariance, shared by all rows.
    thresholds
        ``(theta_HER2, theta_PR, theta_split)``, as from :func:`subtype_thresholds`.

    Returns
    -------
    np.ndarray, shape (n, 4)
        Probabilities in the order of :data:`SUBTYPE_CLASSES`. With a diagonal ``cov`` they are
        products of normal CDFs; otherwise the Basal probability is a 1-D and the LumB probability
        a 2-D Gauss-Legendre integral (the HER2 score integrated out analytically), accurate to
        about 1e-8 for the covariances of the generator.
    """
    mean = np.atleast_2d(np.asarray(mean, dtype=np.float64))
    cov = np.asarray(cov, dtype=np.float64)
    a, b, c = thresholds
    sd = np.sqrt(np.maximum(np.diag(cov), 0.0))
    mh, mp, mo = mean[:, 0], mean[:, 1], mean[:, 2]
    h_low = _below(a - mh, sd[0])  # P(h <= a)
    probs = np.empty((len(mean), 4))
    probs[:, _HER2] = 1.0 - h_low
    if np.count_nonzero(cov - np.diag(np.diag(cov))) == 0:
        p_low = _below(b - mp, sd[1])
        o_low = _below(c - mo, sd[2])
        probs[:, _BASAL] = h_low * p_low
        probs[:, _LUMB] = h_low * (1.0 - p_low) * (1.0 - o_low)
        probs[:, _LUMA] = h_low * (1.0 - p_low) * o_low
        return probs
    # Basal: P(h <= a, p <= b) = int_{p <= b} phi(t) P(h <= a | p) dt, with p = mp + sd_p t
    k_hp = cov[0, 1] / sd[1] if sd[1] > 0 else 0.0
    sd_h_p = math.sqrt(max(cov[0, 0] - k_hp**2, 0.0))
    t, wt = _gauss_legendre(np.full(len(mean), -_GL_SPAN), _std_limit(b - mp, sd[1]))
    inner = _below(a - mh[:, None] - k_hp * t, sd_h_p)
    probs[:, _BASAL] = (wt * _phi(t) * inner).sum(axis=1)
    # LumB: P(h <= a, p > b, o > c): p = mp + sd_p t1, o = mo + k_op t1 + sd_o|p t2
    k_op = cov[2, 1] / sd[1] if sd[1] > 0 else 0.0
    sd_o_p = math.sqrt(max(cov[2, 2] - k_op**2, 0.0))
    t1, w1 = _gauss_legendre(_std_limit(b - mp, sd[1]), np.full(len(mean), _GL_SPAN))
    lo2 = _std_limit(c - mo[:, None] - k_op * t1, sd_o_p)
    t2, w2 = _gauss_legendre(lo2, np.full_like(lo2, _GL_SPAN))  # (n, K, K)
    # h | (p, o): regression on the deviations (dp, do) = (sd_p t1, k_op t1 + sd_o|p t2)
    s_po = cov[1:, 1:]
    beta = np.linalg.pinv(s_po) @ cov[1:, 0]
    sd_h_po = math.sqrt(max(cov[0, 0] - float(cov[0, 1:] @ beta), 0.0))
    dp = sd[1] * t1[:, :, None]
    do = k_op * t1[:, :, None] + sd_o_p * t2
    inner2 = _below(a - mh[:, None, None] - beta[0] * dp - beta[1] * do, sd_h_po)
    lumb = (w1[:, :, None] * _phi(t1)[:, :, None] * w2 * _phi(t2) * inner2).sum(axis=(1, 2))
    probs[:, _LUMB] = lumb
    probs[:, _LUMA] = np.clip(1.0 - probs[:, _HER2] - probs[:, _BASAL] - lumb, 0.0, 1.0)
    return probs


def _subtype_population(cfg: SynthConfig, external: bool) -> tuple[np.ndarray, np.ndarray]:
    """Mean (3,) and covariance (3, 3) of the noisy subtype scores over a cohort's population."""
    w, _ = task_directions(cfg)
    ws = w[_subtype_index(cfg)]
    mean = ws @ _external_mean(cfg) if external else np.zeros(3)
    return mean, ws @ ws.T + cfg.label_noise_sd**2 * np.eye(3)


def subtype_thresholds(config: SynthConfig | None = None) -> tuple[float, float, float]:
    """Thresholds ``(theta_HER2, theta_PR, theta_split)`` on the noisy scores of the subtype.

    The first two are the label thresholds of the HER2 and PR tasks; the split threshold on the
    proliferation task's noisy score makes LumB's share of the internal population
    ``config.subtype_lumb_prevalence`` (solved by bisection on :func:`subtype_probabilities`).

    Raises
    ------
    momkd.errors.ConfigError
        The subtype is switched off, or the LumB share is not below the luminal share.
    """
    cfg = config or SynthConfig()
    return _subtype_thresholds(cfg)


@functools.lru_cache(maxsize=16)
def _subtype_thresholds(cfg: SynthConfig) -> tuple[float, float, float]:
    idx = _subtype_index(cfg)
    theta = _thresholds(cfg)
    a, b = float(theta[idx[0]]), float(theta[idx[1]])
    mean, cov = _subtype_population(cfg, external=False)
    target = cfg.subtype_lumb_prevalence
    span = _GL_SPAN * math.sqrt(cov[2, 2])

    def lumb(c: float) -> float:
        return float(subtype_probabilities(mean[None, :], cov, (a, b, c))[0, _LUMB])

    lo, hi = -span, span
    if not lumb(lo) > target:
        raise ConfigError(
            "SynthConfig.subtype_lumb_prevalence: must be below the luminal share "
            f"{lumb(lo):.4f}, got {target!r}"
        )
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if lumb(mid) > target else (lo, mid)
    return a, b, 0.5 * (lo + hi)


# ------------------------------------------------------------------------------------ expression


@dataclass
class _GeneParams:
    names: list[str]
    mu: np.ndarray  # (G,)
    a: np.ndarray  # (G, L)
    b: np.ndarray  # (G, M)
    noise_sd: np.ndarray  # (G,)


def _gene_params(cfg: SynthConfig, genes: int, seed: int) -> _GeneParams:
    rng = _seq(seed, *_KEY_GENES)
    lat, m = cfg.latent_dim, cfg.other_factors
    mu = rng.normal(cfg.expr_mean, cfg.expr_mean_sd, genes)
    is_signal = rng.random(genes) < cfg.signal_gene_share
    # k distinct random factors per gene: the k smallest of L uniforms
    picks = np.argsort(rng.random((genes, lat)), axis=1)[:, : cfg.factors_per_signal_gene]
    loads = rng.normal(0.0, cfg.signal_loading_sd, (genes, cfg.factors_per_signal_gene))
    a = np.zeros((genes, lat))
    np.put_along_axis(a, picks, loads, axis=1)
    a[~is_signal] = 0.0
    is_other = rng.random(genes) < cfg.other_gene_share
    other_pick = rng.integers(0, max(m, 1), genes)
    other_load = rng.normal(0.0, cfg.other_loading_sd, genes)
    b = np.zeros((genes, m))
    if m:
        rows = np.flatnonzero(is_other)
        b[rows, other_pick[rows]] = other_load[rows]
    noise_sd = cfg.expr_noise_sd * np.exp(rng.normal(0.0, cfg.expr_noise_log_sd, genes))
    width = max(5, len(str(genes)))
    names = [f"G{g + 1:0{width}d}" for g in range(genes)]
    return _GeneParams(names, mu, a, b, noise_sd)


def _expression(
    cfg: SynthConfig, gp: _GeneParams, u: np.ndarray, seed: int, cohort: str
) -> np.ndarray:
    """TPM-like expression, shape (n, G) float64."""
    n, genes = u.shape[0], gp.mu.shape[0]
    ckey = _COHORT_KEYS[cohort]
    x = np.empty((n, genes))
    for i in range(n):
        rng = _seq(seed, ckey, i, _PART_EXPRESSION)
        v = rng.standard_normal(cfg.other_factors)
        offset = cfg.sample_offset_sd * rng.standard_normal()
        noise = rng.standard_normal(genes)
        x[i] = gp.mu + gp.a @ u[i] + gp.b @ v + offset + gp.noise_sd * noise
    return np.maximum(np.exp2(x) - 1.0, 0.0)


# ---------------------------------------------------------------------------------------- slides


@dataclass
class _FeatureParams:
    base: np.ndarray  # (K, D) float32: c + tau * g_k
    m: np.ndarray  # (D, L_m) float32 morphology signal basis
    nuis: np.ndarray  # (D, r_n) float32
    het: np.ndarray  # (r_h, D) float32, already scaled by heterogeneity_sd
    oracle_dirs: np.ndarray  # (D, T) float32: M a_t, unit columns


def _feature_params(cfg: SynthConfig, dim: int, seed: int) -> _FeatureParams:
    rng = _seq(seed, *_KEY_FEATURES)
    k = len(cfg.tissue_types)
    c = rng.normal(0.0, cfg.feature_mean_sd, dim)
    g = rng.standard_normal((k, dim))
    lm, rn, rh = cfg.morph_dims, cfg.nuisance_rank, cfg.heterogeneity_rank
    q, _ = np.linalg.qr(rng.standard_normal((dim, lm + rn + rh)))
    m, nuis, het = q[:, :lm], q[:, lm : lm + rn], q[:, lm + rn :]
    _, a = task_directions(cfg)
    f32 = np.float32
    return _FeatureParams(
        base=(c + cfg.prototype_sd * g).astype(f32),
        m=m.astype(f32),
        nuis=nuis.astype(f32),
        het=(cfg.heterogeneity_sd * het.T).astype(f32),
        oracle_dirs=(m @ a.T).astype(f32),
    )


def _site_params(cfg: SynthConfig, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = _seq(seed, *_KEY_SITE)
    scale = np.exp(rng.normal(math.log(cfg.site_scale), cfg.site_scale_jitter, dim))
    offset = rng.normal(0.0, cfg.site_offset_sd, dim)
    return scale.astype(np.float32), offset.astype(np.float32)


def _smooth_field(
    rng: np.random.Generator, xy: np.ndarray, length: float, n_fields: int
) -> np.ndarray:
    """Unit-variance smooth random fields at points ``xy`` (P, 2): random Fourier features of a
    Gaussian-kernel process with the given length scale. Returns (P, n_fields)."""
    omega = rng.standard_normal((2, n_fields * _RFF_FEATURES)) / length
    phase = rng.uniform(0.0, 2.0 * math.pi, n_fields * _RFF_FEATURES)
    feats = np.cos(xy @ omega + phase).reshape(len(xy), n_fields, _RFF_FEATURES)
    return feats.sum(axis=2) * math.sqrt(2.0 / _RFF_FEATURES)


def _patch_count(cfg: SynthConfig, rng: np.random.Generator, median: int) -> int:
    lo = min(cfg.patch_count_min, median)
    hi = max(lo, math.floor(cfg.patch_count_max_factor * median))
    p = round(median * math.exp(cfg.patch_count_sigma * rng.standard_normal()))
    return int(min(max(p, lo), hi))


def _tissue_cells(cfg: SynthConfig, rng: np.random.Generator, p: int) -> np.ndarray:
    """Grid cells (row, col) of a blob-shaped tissue region with exactly p cells, row-major."""
    side = math.ceil(math.sqrt(p / cfg.tissue_fill)) + 2
    rows, cols = np.divmod(np.arange(side * side), side)
    pts = (np.stack([cols, rows], axis=1) + 0.5) / side  # (x, y) in (0, 1)
    n_ell = int(rng.integers(1, cfg.max_ellipses + 1))
    centers = rng.uniform(0.3, 0.7, (n_ell, 2))
    axes = rng.uniform(0.15, 0.35, (n_ell, 2))
    angles = rng.uniform(0.0, math.pi, n_ell)
    field_val = np.full(side * side, -np.inf)
    for e in range(n_ell):
        d = pts - centers[e]
        ca, sa = math.cos(angles[e]), math.sin(angles[e])
        r2 = ((d[:, 0] * ca + d[:, 1] * sa) / axes[e, 0]) ** 2 + (
            (-d[:, 0] * sa + d[:, 1] * ca) / axes[e, 1]
        ) ** 2
        field_val = np.maximum(field_val, 1.0 - r2)
    field_val += cfg.blob_noise * _smooth_field(rng, pts, cfg.blob_noise_length, 1)[:, 0]
    keep = np.sort(np.argpartition(-field_val, p - 1)[:p])
    return np.stack([rows[keep], cols[keep]], axis=1)


@dataclass
class _Slide:
    coords: np.ndarray  # (P, 2) int64 level-0 (x, y)
    features: np.ndarray  # (P, D) float32
    tissue: np.ndarray  # (P,) int8 index into tissue_types
    signal: np.ndarray  # (P,) bool: carries the morphology shift


def _make_slide(
    cfg: SynthConfig,
    fp: _FeatureParams,
    site: tuple[np.ndarray, np.ndarray] | None,
    u: np.ndarray,
    rng: np.random.Generator,
    median: int,
) -> _Slide:
    p = _patch_count(cfg, rng, median)
    cells = _tissue_cells(cfg, rng, p)
    origin = rng.integers(0, cfg.origin_max_cells + 1, 2)
    coords = ((cells[:, ::-1] + origin) * cfg.patch_size).astype(np.int64)

    # tissue regions: Voronoi cells of random seed patches, typed from a per-slide mixture
    k = len(cfg.tissue_types)
    n_reg = min(p, int(np.clip(round(p / cfg.patches_per_region), 3, cfg.max_regions)))
    seeds = rng.choice(p, n_reg, replace=False)
    mix = rng.dirichlet(cfg.tissue_concentration * np.asarray(cfg.tissue_mix))
    reg_type = rng.choice(k, n_reg, p=mix)
    reg_type[0] = 0  # every slide has tumour
    reg_draw = rng.random(n_reg)
    first_tumour = np.arange(n_reg) == 0
    reg_signal = (reg_type == 0) & ((reg_draw < cfg.signal_region_share) | first_tumour)
    cf = cells.astype(np.float64)
    d2 = ((cf[:, None, :] - cf[seeds][None, :, :]) ** 2).sum(axis=2)
    region = np.argmin(d2, axis=1)
    tissue = reg_type[region].astype(np.int8)
    signal = reg_signal[region]

    # features
    d = fp.base.shape[1]
    z = np.asarray(rng.standard_normal(fp.nuis.shape[1]), dtype=np.float32)
    base = fp.base + (fp.nuis @ (cfg.nuisance_sd * z))[None, :]
    het = _smooth_field(rng, cf, cfg.heterogeneity_length, fp.het.shape[0]).astype(np.float32)
    feats = rng.standard_normal((p, d), dtype=np.float32)
    feats *= np.float32(cfg.patch_noise_sd)
    feats += base[tissue]
    feats += het @ fp.het
    if signal.any():
        shift = fp.m @ np.asarray(cfg.morph_strength * u[: cfg.morph_dims], dtype=np.float32)
        feats[signal] += shift
    if site is not None:
        feats *= site[0]
        feats += site[1]
    return _Slide(coords, feats, tissue, signal)


# --------------------------------------------------------------------------------------- writing


def _atomic_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _write_csv(path: Path, header: list[str], rows: Iterator[list[Any]] | list[list[Any]]) -> None:
    with atomic_open(path) as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _write_h5(path: Path, slide_id: str, sl: _Slide, cfg: SynthConfig) -> None:
    import h5py

    tmp = _atomic_path(path)
    p, d = sl.features.shape
    with h5py.File(tmp, "w") as fh:
        # TRIDENT grows resizable datasets row by row, giving one HDF5 chunk per patch
        feats = fh.create_dataset(
            "features", shape=(p, d), maxshape=(None, d), chunks=(1, d), dtype="float32"
        )
        feats[...] = sl.features
        coords = fh.create_dataset(
            "coords", shape=(p, 2), maxshape=(None, 2), chunks=(1, 2), dtype="int64"
        )
        coords[...] = sl.coords
        feats.attrs["name"] = slide_id
        feats.attrs["encoder"] = "synthetic"
        coords.attrs.update(
            {
                "name": slide_id,
                "patch_size": cfg.patch_size,
                "patch_size_level0": cfg.patch_size,
                "level0_magnification": cfg.magnification,
                "target_magnification": cfg.magnification,
                "overlap": 0,
            }
        )
    os.replace(tmp, path)


def _write_pt(path: Path, sl: _Slide) -> None:
    import torch

    tmp = _atomic_path(path)
    torch.save(torch.from_numpy(sl.features), tmp)
    os.replace(tmp, path)


def _slide_ids(case_id: str, n: int) -> list[str]:
    return [f"{case_id}-01Z-00-DX{j + 1}" for j in range(n)]


# ---------------------------------------------------------------------------------------- oracles


def _auc(score: np.ndarray, y: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    if len(np.unique(y)) < 2:
        return None
    return round(float(roc_auc_score(y, score)), 4)


def _macro_auc(score: np.ndarray, y: np.ndarray) -> float | None:
    """Macro one-vs-rest AUC over :data:`SUBTYPE_CLASSES`: the mean over classes k of the AUC of
    ``score[:, k]`` for ``y == k`` against the rest (scikit-learn's ``multi_class="ovr"``,
    ``average="macro"``, which also accepts scores that are not probabilities). None unless every
    class is present. Shapes: ``score`` (n, 4), ``y`` (n,) class indices."""
    from sklearn.metrics import roc_auc_score

    k = len(SUBTYPE_CLASSES)
    if len(y) == 0 or len(np.unique(y)) < k:
        return None
    onehot = (y[:, None] == np.arange(k)[None, :]).astype(np.int64)
    return round(float(roc_auc_score(onehot, score, average="macro")), 4)


def _ridge_model(cfg: SynthConfig) -> Any:
    from sklearn.linear_model import RidgeClassifierCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), RidgeClassifierCV(alphas=list(cfg.oracle_alphas)))


def _ridge_cv_scores(
    cfg: SynthConfig, x: np.ndarray, y: np.ndarray, seed: int
) -> np.ndarray | None:
    """Cross-validated decision scores of a ridge classifier on ``x`` (n, F).

    Stratified k-fold predictions, ``x`` z-scored inside each training fold, the ridge penalty
    chosen by leave-one-out on the training fold only (nested, leak-free). With two classes the
    scores are (n,); with more, one one-vs-rest score per class, (n, C). None when a class has
    fewer than two members.
    """
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from threadpoolctl import threadpool_limits

    classes = np.unique(y)
    folds = min([cfg.oracle_folds, *(int((y == c).sum()) for c in classes)])
    if len(classes) < 2 or folds < 2:
        return None
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed % (2**32))
    # small dense problems: threaded BLAS only adds contention
    with threadpool_limits(limits=1, user_api="blas"):
        return np.asarray(
            cross_val_predict(_ridge_model(cfg), x, y, cv=cv, method="decision_function")
        )


def _expression_oracle(cfg: SynthConfig, tpm: np.ndarray, y: np.ndarray, seed: int) -> float | None:
    """Cross-validated AUC of expression alone: :func:`_ridge_cv_scores` on log2(x + 1).

    Shapes: ``tpm`` (n, G), ``y`` (n,) in {0, 1}.
    """
    if min(int((y == 0).sum()), int((y == 1).sum())) < 2:
        return None
    score = _ridge_cv_scores(cfg, np.log2(tpm + 1.0), y, seed)
    return None if score is None else _auc(score, y)


def _subtype_histology_oracles(
    cfg: SynthConfig,
    hist: np.ndarray,
    y: np.ndarray,
    hist_ext: np.ndarray | None,
    y_ext: np.ndarray | None,
    seed: int,
) -> tuple[float | None, float | None]:
    """Macro AUCs of ridge classifiers on the hidden-direction histology scores (n, 3).

    Internal: cross-validated as :func:`_ridge_cv_scores`. External: the classifier fitted on the
    whole internal cohort, applied to the external scores; its one-vs-rest scores are linear in
    them, so the site shift's offset does not change their ranking.
    """
    score = _ridge_cv_scores(cfg, hist, y, seed) if len(np.unique(y)) == 4 else None
    internal = None if score is None else _macro_auc(score, y)
    external = None
    if hist_ext is not None and y_ext is not None and len(np.unique(y)) == 4 and len(y_ext):
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=1, user_api="blas"):
            model = _ridge_model(cfg).fit(hist, y)
            external = _macro_auc(np.asarray(model.decision_function(hist_ext)), y_ext)
    return internal, external


# ---------------------------------------------------------------------------------------- cohorts


def _check_seed(seed: int) -> None:
    if not isinstance(seed, int | np.integer) or seed < 0:
        raise ConfigError(f"seed: must be a non-negative integer, got {seed!r}")


def _write_cohort(
    out: Path,
    name: str,
    pats: PatientDraw,
    cfg: SynthConfig,
    fp: _FeatureParams,
    site: tuple[np.ndarray, np.ndarray] | None,
    *,
    dim: int,
    patches: int,
    seed: int,
    h5_dir: Path | None,
    pt_dir: Path | None,
    bar: Any,
) -> dict[str, Any]:
    """Stream one cohort's slides into ``<name>.zarr``; return per-patient histology sums."""
    from momkd.data.store_writer import StoreWriter

    cohort = "external" if name == "external" else "internal"
    ckey = _COHORT_KEYS[cohort]
    n, t_count = len(pats.case_ids), len(cfg.tasks)
    hist_sum = np.zeros((n, t_count))
    hist_cnt = np.zeros(n)
    slide_rows: list[list[str]] = []
    truth_ids: list[str] = []
    truth_tissue: list[np.ndarray] = []
    truth_signal: list[np.ndarray] = []
    n_patches = 0
    attrs = {
        "encoder": "synthetic",
        "magnification": cfg.magnification,
        "patch_size": cfg.patch_size,
        "provenance": {"source": "momkd synth", "cohort": cohort, "seed": seed},
    }
    with StoreWriter(out / f"{name}.zarr", dim, dtype="float16", attrs=attrs) as writer:
        for i, case_id in enumerate(pats.case_ids):
            for j, slide_id in enumerate(_slide_ids(case_id, int(pats.n_slides[i]))):
                rng = _seq(seed, ckey, i, _PART_SLIDE, j)
                sl = _make_slide(cfg, fp, site, pats.u[i], rng, patches)
                writer.append(slide_id, sl.features, sl.coords)
                if h5_dir is not None:
                    _write_h5(h5_dir / f"{slide_id}.h5", slide_id, sl, cfg)
                if pt_dir is not None:
                    _write_pt(pt_dir / f"{slide_id}.pt", sl)
                tumour = sl.tissue == 0
                hist_sum[i] += (sl.features[tumour] @ fp.oracle_dirs).sum(axis=0, dtype=np.float64)
                hist_cnt[i] += int(tumour.sum())
                row = [case_id, slide_id, *pats.values[i]]
                if pats.subtype is not None:
                    row.append(SUBTYPE_CLASSES[pats.subtype[i]])
                slide_rows.append(row)
                truth_ids.append(slide_id)
                truth_tissue.append(sl.tissue)
                truth_signal.append(sl.signal)
                n_patches += len(sl.features)
                bar.update(1)
    header = ["case_id", "slide_id", *(t.name for t in cfg.tasks)]
    if pats.subtype is not None:
        header.append(SUBTYPE_COLUMN)
    clinical = "clinical.csv" if name == "cohort" else f"{name}_clinical.csv"
    _write_csv(out / clinical, header, slide_rows)
    truth = out / "truth"
    lengths = np.array([len(t) for t in truth_tissue], dtype=np.int64)
    tmp = _atomic_path(truth / f"{name}_patches.npz")
    with open(tmp, "wb") as fh:
        np.savez_compressed(
            fh,
            slide_ids=np.array(truth_ids),
            offsets=np.concatenate([[0], np.cumsum(lengths)]),
            tissue=np.concatenate(truth_tissue),
            signal=np.concatenate(truth_signal),
            tissue_types=np.array(cfg.tissue_types),
        )
    os.replace(tmp, truth / f"{name}_patches.npz")
    return {
        "store": str(out / f"{name}.zarr"),
        "clinical": str(out / clinical),
        "slides": len(slide_rows),
        "patches": n_patches,
        "histology_score": hist_sum / np.maximum(hist_cnt, 1)[:, None],
    }


def _cohort_summary(
    cfg: SynthConfig,
    pats: PatientDraw,
    written: dict[str, Any],
    a_dirs: np.ndarray,
    external: bool,
) -> tuple[dict[str, Any], dict[str, dict[str, float | None]]]:
    summary: dict[str, Any] = {
        "store": written["store"],
        "clinical": written["clinical"],
        "patients": len(pats.case_ids),
        "multi_slide_patients": int((pats.n_slides > 1).sum()),
        "slides": written["slides"],
        "patches": written["patches"],
    }
    prevalence: dict[str, Any] = {}
    aucs: dict[str, dict[str, float | None]] = {}
    u_morph = pats.u[:, : cfg.morph_dims]
    for t, task in enumerate(cfg.tasks):
        lab = pats.labels[:, t]
        ok = lab >= 0
        y = lab[ok].astype(np.int64)
        observed = float(y.mean()) if len(y) else None
        counts = {task.positive: int((lab == 1).sum()), task.negative: int((lab == 0).sum())}
        for value, _ in task.excluded:
            counts[value] = sum(1 for row in pats.values if row[t] == value)
        target = task.external_prevalence if external else task.prevalence
        summary[f"prevalence_{task.name}"] = round(observed, 4) if observed is not None else None
        prevalence[task.name] = {
            "target": target,
            "observed": round(observed, 4) if observed is not None else None,
            "labelled_patients": int(ok.sum()),
            "counts": counts,
        }
        aucs[task.name] = {
            "latent": _auc(pats.scores[ok, t], y),
            "morphology_latent": _auc(u_morph[ok] @ a_dirs[t], y),
            "histology": _auc(written["histology_score"][ok, t], y),
        }
    if pats.subtype is not None:
        prevalence[SUBTYPE_COLUMN], aucs[SUBTYPE_COLUMN] = _subtype_summary(
            cfg, pats, written["histology_score"], external
        )
    summary["prevalence"] = prevalence
    summary["oracle_auc"] = aucs
    return summary, aucs


def _subtype_summary(
    cfg: SynthConfig, pats: PatientDraw, histology: np.ndarray, external: bool
) -> tuple[dict[str, Any], dict[str, float | None]]:
    """Prevalences and the latent / morphology-latent oracles of the subtype in one cohort."""
    assert pats.subtype is not None
    idx = _subtype_index(cfg)
    thr = subtype_thresholds(cfg)
    w, _ = task_directions(cfg)
    ws, lm = w[idx], cfg.morph_dims
    y = pats.subtype.astype(np.int64)
    n = len(y)
    pop_mean, pop_cov = _subtype_population(cfg, external)
    target = subtype_probabilities(pop_mean[None, :], pop_cov, thr)[0]
    counts = np.bincount(y, minlength=len(SUBTYPE_CLASSES))
    prevalence = {
        "target": {k: round(float(p), 4) for k, p in zip(SUBTYPE_CLASSES, target, strict=True)},
        "observed": {
            k: round(float(c) / n, 4) if n else None
            for k, c in zip(SUBTYPE_CLASSES, counts, strict=True)
        },
        "labelled_patients": n,
        "counts": {k: int(c) for k, c in zip(SUBTYPE_CLASSES, counts, strict=True)},
    }
    noise = cfg.label_noise_sd**2 * np.eye(3)
    # latent: exact posterior given u (independent label noise); morphology_latent: exact
    # posterior given the visible dims u[:L_m], the others drawn from the cohort's distribution
    latent = subtype_probabilities(pats.u @ ws.T, noise, thr)
    hidden_mean = (_external_mean(cfg) if external else np.zeros(cfg.latent_dim))[lm:]
    morph_mean = pats.u[:, :lm] @ ws[:, :lm].T + hidden_mean @ ws[:, lm:].T
    morph = subtype_probabilities(morph_mean, ws[:, lm:] @ ws[:, lm:].T + noise, thr)
    aucs = {
        "latent": _macro_auc(latent, y),
        "morphology_latent": _macro_auc(morph, y),
        "histology": None,  # filled in by generate_cohort (needs the internal cohort's fit)
    }
    return prevalence, aucs


def generate_cohort(
    out_dir: str | os.PathLike[str],
    *,
    patients: int = 300,
    external: int = 100,
    dim: int = 512,
    genes: int = 2000,
    patches: int = 400,
    seed: int = 0,
    h5: bool = False,
    pt: bool = False,
    config: SynthConfig | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write a synthetic paired histology-genomics cohort and its oracle report.

    Slides are generated and written one at a time (memory is bounded by one slide, whatever the
    cohort size); the expression matrix is held in memory (patients x genes).

    Parameters
    ----------
    out_dir
        Output folder (created). Written: ``cohort.zarr``, ``clinical.csv``, ``expression.csv``,
        ``external.zarr`` + ``external_clinical.csv`` (when ``external > 0``), ``truth/``,
        ``oracle.json``; ``h5/<slide_id>.h5`` with ``h5=True``; ``pt/<slide_id>.pt`` with
        ``pt=True``; the external cohort's files in ``h5_external/`` and ``pt_external/``. See
        ``docs/SYNTHETIC.md``.
    patients, external
        Patients in the internal (with expression) and external (no expression) cohorts.
    dim
        Feature dimension D (at least ``config.min_dim``, 32 by default).
    genes
        Number of genes G in ``expression.csv``.
    patches
        Median patches per slide (patch counts are log-normal around it, clipped).
    seed
        Non-negative random seed; the output is a deterministic function of the arguments.
    h5, pt
        Also write TRIDENT-layout ``.h5`` files (features float32 (P, D), coords int64 (P, 2), one
        HDF5 chunk per row) and CLAM-style ``.pt`` tensors (float32 (P, D)).
    config
        Generator parameters (default :class:`SynthConfig()`).
    progress
        Show a tqdm progress bar over slides.
    overwrite
        Replace outputs of an earlier run in ``out_dir``; without it existing outputs are an error.

    Returns
    -------
    dict
        The content of ``oracle.json``: arguments, configuration, per-cohort summaries
        (``cohort``, ``external``: paths, patients, slides, patches, prevalences) and
        ``oracle_auc[task]`` with keys ``latent``, ``morphology_latent``, ``histology``,
        ``expression`` and ``external_*`` counterparts (for ``subtype``: macro one-vs-rest AUCs),
        and ``subtype`` (classes, source tasks, thresholds, rule).

    Raises
    ------
    momkd.errors.ConfigError
        Invalid argument, or outputs already present without ``overwrite``.
    """
    from tqdm.auto import tqdm

    cfg = config or SynthConfig()
    _check_seed(seed)
    for key, value, lo in (
        ("patients", patients, 1),
        ("external", external, 0),
        ("genes", genes, 1),
        ("patches", patches, 1),
        ("dim", dim, cfg.min_dim),
    ):
        if not isinstance(value, int | np.integer) or value < lo:
            raise ConfigError(f"{key}: must be an integer >= {lo}, got {value!r}")
    seed, dim, genes, patches = int(seed), int(dim), int(genes), int(patches)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: output path exists and is not a folder")
    outputs = [
        "cohort.zarr",
        "clinical.csv",
        "expression.csv",
        "external.zarr",
        "external_clinical.csv",
        "oracle.json",
        "truth",
        "h5",
        "pt",
        "h5_external",
        "pt_external",
    ]
    present = [name for name in outputs if (out / name).exists()]
    if present and not overwrite:
        raise ConfigError(f"{out / present[0]}: already exists; pass --overwrite to replace it")
    for name in present:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / "truth").mkdir()
    # The external cohort's files go to their own folders, so that `momkd ingest h5/` builds the
    # internal cohort's store and `momkd ingest h5_external/` the external one, as the two stores.
    h5_dir = out / "h5" if h5 else None
    pt_dir = out / "pt" if pt else None
    h5_ext = out / "h5_external" if h5 and external else None
    pt_ext = out / "pt_external" if pt and external else None
    for d in (h5_dir, pt_dir, h5_ext, pt_ext):
        if d is not None:
            d.mkdir()

    w, a_dirs = task_directions(cfg)
    pats = draw_patients(patients, seed=seed, config=cfg)
    ext = draw_patients(external, seed=seed, external=True, config=cfg) if external else None
    fp = _feature_params(cfg, dim, seed)
    site = _site_params(cfg, dim, seed)
    gp = _gene_params(cfg, genes, seed)

    total = int(pats.n_slides.sum()) + (int(ext.n_slides.sum()) if ext else 0)
    log.info("synth: %d patients, %d external, %d slides -> %s", patients, external, total, out)
    kwargs: dict[str, Any] = {"dim": dim, "patches": patches, "seed": seed}
    with tqdm(total=total, desc="synth", unit="slide", disable=not progress) as bar:
        written = _write_cohort(
            out, "cohort", pats, cfg, fp, None, bar=bar, h5_dir=h5_dir, pt_dir=pt_dir, **kwargs
        )
        written_ext = (
            _write_cohort(
                out, "external", ext, cfg, fp, site, bar=bar, h5_dir=h5_ext, pt_dir=pt_ext, **kwargs
            )
            if ext
            else None
        )

    tpm = _expression(cfg, gp, pats.u, seed, "internal")
    _write_csv(
        out / "expression.csv",
        ["case_id", *gp.names],
        ([cid, *(f"{v:.6g}" for v in row)] for cid, row in zip(pats.case_ids, tpm, strict=True)),
    )
    width = len(str(cfg.latent_dim))
    lat_header = [
        "case_id",
        "cohort",
        *(f"u_{k + 1:0{width}d}" for k in range(cfg.latent_dim)),
        *(f"score_{t.name}" for t in cfg.tasks),
    ]
    lat_rows = [
        [cid, "internal", *(f"{x:.6g}" for x in pats.u[i]), *(f"{x:.6g}" for x in pats.scores[i])]
        for i, cid in enumerate(pats.case_ids)
    ]
    if ext is not None:
        lat_rows += [
            [cid, "external", *(f"{x:.6g}" for x in ext.u[i]), *(f"{x:.6g}" for x in ext.scores[i])]
            for i, cid in enumerate(ext.case_ids)
        ]
    _write_csv(out / "truth" / "latent.csv", lat_header, lat_rows)
    if pats.subtype is not None:
        _write_subtype_truth(out / "truth" / "subtype.csv", cfg, pats, ext)
    _write_csv(
        out / "truth" / "genes.csv",
        ["gene", "mean_log2", "noise_sd", *(f"a_{k + 1:0{width}d}" for k in range(cfg.latent_dim))],
        (
            [g, f"{gp.mu[i]:.6g}", f"{gp.noise_sd[i]:.6g}", *(f"{x:.6g}" for x in gp.a[i])]
            for i, g in enumerate(gp.names)
        ),
    )

    cohort_summary, aucs = _cohort_summary(cfg, pats, written, a_dirs, external=False)
    cohort_summary["expression"] = str(out / "expression.csv")
    signal_genes: dict[str, list[str]] = {}
    for t, task in enumerate(cfg.tasks):
        lab = pats.labels[:, t]
        ok = lab >= 0
        aucs[task.name]["expression"] = _expression_oracle(
            cfg, tpm[ok], lab[ok].astype(np.int64), seed
        )
        load = np.abs(gp.a @ w[t])
        order = np.argsort(-load, kind="stable")
        signal_genes[task.name] = [gp.names[g] for g in order if load[g] > 0]
    sub_idx = _subtype_index(cfg) if pats.subtype is not None else []
    if pats.subtype is not None:
        y_sub = pats.subtype.astype(np.int64)
        score = _ridge_cv_scores(cfg, np.log2(tpm + 1.0), y_sub, seed)
        sub_hist, sub_hist_ext = _subtype_histology_oracles(
            cfg,
            written["histology_score"][:, sub_idx],
            y_sub,
            written_ext["histology_score"][:, sub_idx] if written_ext else None,
            ext.subtype.astype(np.int64) if ext is not None and ext.subtype is not None else None,
            seed,
        )
        aucs[SUBTYPE_COLUMN]["histology"] = sub_hist
        aucs[SUBTYPE_COLUMN]["expression"] = (
            None if score is None or len(np.unique(y_sub)) < 4 else _macro_auc(score, y_sub)
        )

    ext_summary: dict[str, Any] | None = None
    if ext is not None and written_ext is not None:
        ext_summary, ext_aucs = _cohort_summary(cfg, ext, written_ext, a_dirs, external=True)
        ext_summary["latent_mean_shift"] = [round(float(x), 6) for x in _external_mean(cfg)]
        if pats.subtype is not None:
            ext_aucs[SUBTYPE_COLUMN]["histology"] = sub_hist_ext
        for name in ext_aucs:
            for kind, auc in ext_aucs[name].items():
                aucs[name][f"external_{kind}"] = auc

    from momkd import __version__

    report: dict[str, Any] = {
        "generator": "momkd.synth",
        "format_version": FORMAT_VERSION,
        "momkd_version": __version__,
        "seed": seed,
        "arguments": {
            "patients": patients,
            "external": external,
            "dim": dim,
            "genes": genes,
            "patches": patches,
            "h5": bool(h5),
            "pt": bool(pt),
        },
        "out_dir": str(out),
        "cohort": cohort_summary,
        "external": ext_summary,
        "oracle_auc": aucs,
        "label_mapping": {
            **{
                t.name: {
                    "positive": [t.positive],
                    "negative": [t.negative],
                    "excluded": [v for v, _ in t.excluded],
                }
                for t in cfg.tasks
            },
            **(
                {SUBTYPE_COLUMN: {"classes": list(SUBTYPE_CLASSES), "excluded": []}}
                if pats.subtype is not None
                else {}
            ),
        },
        "tasks": {
            t.name: {
                "direction": [round(float(x), 6) for x in w[i]],
                "threshold": round(float(_thresholds(cfg)[i]), 6),
            }
            for i, t in enumerate(cfg.tasks)
        },
        "subtype": _subtype_report(cfg) if pats.subtype is not None else None,
        "expression": {
            "genes": genes,
            "signal_genes_any": int((np.abs(gp.a).sum(axis=1) > 0).sum()),
            "signal_genes": signal_genes,
        },
        "files": {
            "h5": str(h5_dir) if h5_dir else None,
            "pt": str(pt_dir) if pt_dir else None,
            "h5_external": str(h5_ext) if h5_ext else None,
            "pt_external": str(pt_ext) if pt_ext else None,
            "truth": str(out / "truth"),
        },
        "config": _config_dict(cfg),
    }
    _check_report_finite(report)
    _write_json(out / "oracle.json", report)
    return report


def _subtype_report(cfg: SynthConfig) -> dict[str, Any]:
    a, b, c = subtype_thresholds(cfg)
    her2, pr, split = cfg.subtype_tasks or ("", "", "")
    return {
        "column": SUBTYPE_COLUMN,
        "classes": list(SUBTYPE_CLASSES),
        "tasks": {"her2": her2, "pr": pr, "split": split},
        # full precision: truth/subtype.csv and these reproduce the column exactly
        "thresholds": {"her2": a, "pr": b, "split": c},
        "rule": (
            f"HER2 if noisy_{her2} > her2; else Basal if noisy_{pr} <= pr; "
            f"else LumB if noisy_{split} > split; else LumA"
        ),
    }


def _write_subtype_truth(
    path: Path, cfg: SynthConfig, pats: PatientDraw, ext: PatientDraw | None
) -> None:
    """``truth/subtype.csv``: the noisy scores that define the subtype, at full precision."""
    idx = _subtype_index(cfg)
    names = cfg.subtype_tasks or ()
    rows: list[list[str]] = []
    for cohort, draw in (("internal", pats), ("external", ext)):
        if draw is None or draw.subtype is None:
            continue
        for i, cid in enumerate(draw.case_ids):
            noisy = (repr(float(draw.noisy[i, t])) for t in idx)
            rows.append([cid, cohort, *noisy, SUBTYPE_CLASSES[draw.subtype[i]]])
    _write_csv(path, ["case_id", "cohort", *(f"noisy_{n}" for n in names), SUBTYPE_COLUMN], rows)


def _config_dict(cfg: SynthConfig) -> dict[str, Any]:
    d = asdict(cfg)
    d["tasks"] = [asdict(t) for t in cfg.tasks]
    return d


def _check_report_finite(obj: Any, path: str = "report") -> None:
    if isinstance(obj, float) and not math.isfinite(obj):
        raise DataError(f"{path}: non-finite value in the synthetic cohort report")
    if isinstance(obj, dict):
        for k, v in obj.items():
            _check_report_finite(v, f"{path}.{k}")
    elif isinstance(obj, list | tuple):
        for k, v in enumerate(obj):
            _check_report_finite(v, f"{path}[{k}]")
