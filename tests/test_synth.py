"""Tests of the synthetic cohort generator (momkd.synth, docs/SYNTHETIC.md).

Outputs are read back with independent tools (zarr-python, h5py, torch, csv) and the documented
generative model is checked with numpy / scikit-learn estimators, never against stored numbers.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import zarr
from momkd.cli import main
from momkd.errors import ConfigError
from momkd.synth import SynthConfig, draw_patients, generate_cohort, task_directions
from sklearn.metrics import roc_auc_score

GRID = 256


# ------------------------------------------------------------------------------------- helpers


def read_store(path: Path) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray]:
    root = zarr.open_group(str(path), mode="r")
    header = dict(root.attrs["momkd"])
    return header, root["offsets"][:], root["features"][:], root["coords"][:]


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def read_expression(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    header, body = rows[0], rows[1:]
    x = np.array([[float(v) for v in r[1:]] for r in body])
    return header[1:], [r[0] for r in body], x


def small_config() -> SynthConfig:
    return dataclasses.replace(SynthConfig(), multi_slide_share=0.4)


SMALL = {"patients": 14, "external": 6, "dim": 32, "genes": 40, "patches": 24, "seed": 7}


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth_small")
    report = generate_cohort(out, **SMALL, h5=True, pt=True, config=small_config(), progress=False)
    return out, report


@pytest.fixture(scope="module")
def medium(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """Many patients with tiny slides: enough statistics for the expression model."""
    out = tmp_path_factory.mktemp("synth_medium")
    report = generate_cohort(
        out, patients=200, external=0, dim=32, genes=400, patches=4, seed=3, progress=False
    )
    return out, report


# ------------------------------------------------------------------------------ files and store


def test_store_readable_by_zarr_and_matches_clinical(small: tuple[Path, dict]) -> None:
    out, report = small
    for store, table in (
        ("cohort.zarr", "clinical.csv"),
        ("external.zarr", "external_clinical.csv"),
    ):
        header, off, feats, coords = read_store(out / store)
        rows = read_csv(out / table)
        assert header["complete"] is True
        assert header["feature_dim"] == SMALL["dim"] == feats.shape[1]
        assert feats.dtype == np.float16 and np.isfinite(feats).all()
        assert header["slide_ids"] == [r["slide_id"] for r in rows]
        assert off[0] == 0 and off[-1] == len(feats) == len(coords)
        assert np.all(np.diff(off) > 0)
        assert list(rows[0]) == ["case_id", "slide_id", "her2", "pr", "odx", "subtype"]
    assert report["cohort"]["slides"] == len(read_csv(out / "clinical.csv"))
    assert report["cohort"]["patches"] == read_store(out / "cohort.zarr")[1][-1]


def test_oracle_json_is_the_returned_report(small: tuple[Path, dict]) -> None:
    out, report = small
    on_disk = json.loads((out / "oracle.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert on_disk["seed"] == SMALL["seed"]
    assert on_disk["config"]["latent_dim"] == SynthConfig().latent_dim
    assert on_disk["label_mapping"]["her2"]["positive"] == ["Positive"]
    assert on_disk["label_mapping"]["odx"] == {
        "positive": ["High"],
        "negative": ["Low"],
        "excluded": [],
    }


def test_coordinates_on_grid_unique_and_counts_clipped(small: tuple[Path, dict]) -> None:
    out, _ = small
    _, off, _, coords = read_store(out / "cohort.zarr")
    cfg = small_config()
    lo = min(cfg.patch_count_min, SMALL["patches"])
    hi = int(cfg.patch_count_max_factor * SMALL["patches"])
    for i in range(len(off) - 1):
        c = coords[off[i] : off[i + 1]]
        assert lo <= len(c) <= hi
        assert np.all(c % GRID == 0) and np.all(c >= 0)
        assert len(np.unique(c, axis=0)) == len(c)
        # row-major order, like a tiler walking the grid
        keys = c[:, 1].astype(np.int64) * 10**9 + c[:, 0]
        assert np.all(np.diff(keys) > 0)


def test_tissue_is_one_connected_blob_like_region(small: tuple[Path, dict]) -> None:
    """Most patches have a grid neighbour (no salt-and-pepper scatter)."""
    out, _ = small
    _, off, _, coords = read_store(out / "cohort.zarr")
    for i in range(len(off) - 1):
        cells = {tuple(x) for x in (coords[off[i] : off[i + 1]] // GRID).tolist()}
        with_nb = sum(
            any((x + dx, y + dy) in cells for dx, dy in ((1, 0), (-1, 0), (0, 1), (0, -1)))
            for x, y in cells
        )
        assert with_nb >= 0.9 * len(cells)


def test_multi_slide_patients_share_case_and_labels(small: tuple[Path, dict]) -> None:
    out, report = small
    rows = read_csv(out / "clinical.csv")
    by_case: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        by_case.setdefault(r["case_id"], []).append(r)
        assert r["slide_id"].startswith(r["case_id"] + "-01Z-00-DX")
    multi = {c: rs for c, rs in by_case.items() if len(rs) > 1}
    assert multi, "the fixture is expected to contain multi-slide patients"
    assert report["cohort"]["multi_slide_patients"] == len(multi)
    for rs in multi.values():
        assert [r["slide_id"][-3:] for r in rs] == ["DX1", "DX2"]
        for task in ("her2", "pr", "odx"):
            assert len({r[task] for r in rs}) == 1
    assert len(by_case) == SMALL["patients"]


def test_label_values_are_tcga_like_strings(small: tuple[Path, dict]) -> None:
    out, _ = small
    allowed = {
        "her2": {"Positive", "Negative", "Equivocal", "[Not Available]"},
        "pr": {"Positive", "Negative", "Indeterminate", "[Not Available]"},
        "odx": {"High", "Low"},
    }
    for table in ("clinical.csv", "external_clinical.csv"):
        for r in read_csv(out / table):
            for task, values in allowed.items():
                assert r[task] in values


def test_h5_trident_layout_matches_store(small: tuple[Path, dict]) -> None:
    import h5py
    import torch

    out, _ = small
    header, off, feats, coords = read_store(out / "cohort.zarr")
    ext_header, _, _, _ = read_store(out / "external.zarr")
    # Each cohort's files in its own folder: ingesting h5/ gives the internal store's slides only.
    assert sorted(p.stem for p in (out / "h5").glob("*.h5")) == sorted(header["slide_ids"])
    assert sorted(p.stem for p in (out / "h5_external").glob("*.h5")) == sorted(
        ext_header["slide_ids"]
    )
    assert sorted(p.stem for p in (out / "pt").glob("*.pt")) == sorted(header["slide_ids"])
    assert sorted(p.stem for p in (out / "pt_external").glob("*.pt")) == sorted(
        ext_header["slide_ids"]
    )
    for i, sid in enumerate(header["slide_ids"]):
        with h5py.File(out / "h5" / f"{sid}.h5", "r") as fh:
            f, c = fh["features"], fh["coords"]
            assert f.dtype == np.float32 and c.dtype == np.int64
            assert f.chunks == (1, SMALL["dim"]) and f.compression is None
            assert f.maxshape == (None, SMALL["dim"])
            assert c.attrs["patch_size"] == GRID
            fa, ca = f[()], c[()]
        np.testing.assert_array_equal(fa.astype(np.float16), feats[off[i] : off[i + 1]])
        np.testing.assert_array_equal(ca, coords[off[i] : off[i + 1]])
        pt = torch.load(out / "pt" / f"{sid}.pt", weights_only=True)
        assert pt.dtype == torch.float32 and tuple(pt.shape) == fa.shape
        np.testing.assert_array_equal(pt.numpy(), fa)


def test_ingesting_each_h5_folder_rebuilds_its_own_store(
    small: tuple[Path, dict], tmp_path: Path
) -> None:
    from momkd.data.ingest import ingest

    out, _ = small
    for folder, store in (("h5", "cohort.zarr"), ("h5_external", "external.zarr")):
        ingest(out / folder, tmp_path / store, progress=False)
        header, off, feats, _ = read_store(out / store)
        got_header, got_off, got_feats, _ = read_store(tmp_path / store)
        assert sorted(got_header["slide_ids"]) == sorted(header["slide_ids"])
        for i, sid in enumerate(header["slide_ids"]):
            j = got_header["slide_ids"].index(sid)
            np.testing.assert_array_equal(
                got_feats[got_off[j] : got_off[j + 1]], feats[off[i] : off[i + 1]]
            )


def test_truth_patches_align_with_store(small: tuple[Path, dict]) -> None:
    out, _ = small
    header, off, _, _ = read_store(out / "cohort.zarr")
    with np.load(out / "truth" / "cohort_patches.npz") as z:
        assert z["slide_ids"].tolist() == header["slide_ids"]
        np.testing.assert_array_equal(z["offsets"], off)
        tissue, signal = z["tissue"], z["signal"]
        assert z["tissue_types"][0] == "tumour"
    assert np.all(tissue[signal] == 0)  # the morphology signal lives on tumour patches only
    for i in range(len(off) - 1):
        t = tissue[off[i] : off[i + 1]]
        assert (t == 0).any() and signal[off[i] : off[i + 1]].any()


# ----------------------------------------------------------------------------------- determinism


def test_deterministic_for_a_seed_and_different_across_seeds(tmp_path: Path) -> None:
    kw = {"patients": 5, "external": 2, "dim": 32, "genes": 20, "patches": 16, "progress": False}
    generate_cohort(tmp_path / "a", seed=11, **kw)
    generate_cohort(tmp_path / "b", seed=11, **kw)
    generate_cohort(tmp_path / "c", seed=12, **kw)
    for store in ("cohort.zarr", "external.zarr"):
        sa, sb, sc = (read_store(tmp_path / d / store) for d in "abc")
        assert sa[0]["slide_ids"] == sb[0]["slide_ids"]
        for xa, xb in zip(sa[1:], sb[1:], strict=True):
            np.testing.assert_array_equal(xa, xb)
        assert sa[2].shape != sc[2].shape or not np.array_equal(sa[2], sc[2])
    for name in ("clinical.csv", "expression.csv", "external_clinical.csv", "truth/latent.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "expression.csv").read_bytes() != (
        tmp_path / "c" / "expression.csv"
    ).read_bytes()


def test_patient_draws_do_not_depend_on_order_or_sizes(tmp_path: Path) -> None:
    full = draw_patients(12, seed=5)
    head = draw_patients(4, seed=5)
    np.testing.assert_array_equal(full.u[:4], head.u)
    np.testing.assert_array_equal(full.labels[:4], head.labels)
    # labels and patient latents are the same whatever the feature / gene dimensions
    kw = {"patients": 6, "external": 0, "patches": 16, "seed": 5, "progress": False}
    generate_cohort(tmp_path / "d32", dim=32, genes=10, **kw)
    generate_cohort(tmp_path / "d64", dim=64, genes=30, **kw)
    assert (tmp_path / "d32" / "clinical.csv").read_bytes() == (
        tmp_path / "d64" / "clinical.csv"
    ).read_bytes()
    np.testing.assert_array_equal(
        read_store(tmp_path / "d32" / "cohort.zarr")[3],
        read_store(tmp_path / "d64" / "cohort.zarr")[3],
    )


# ------------------------------------------------------------------------------ labels and latent


def test_task_directions_match_documented_cosines() -> None:
    w, a = task_directions(SynthConfig())
    np.testing.assert_allclose(np.linalg.norm(w, axis=1), 1.0, atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-12)
    # hand-computed from the mixing rows (1, -0.3, 0), (0, 1, 0), (0, -0.6, 1)
    n1, n3 = math.sqrt(1.09), math.sqrt(1.36)
    expected = np.array(
        [
            [1.0, -0.3 / n1, 0.18 / (n1 * n3)],
            [-0.3 / n1, 1.0, -0.6 / n3],
            [0.18 / (n1 * n3), -0.6 / n3, 1.0],
        ]
    )
    np.testing.assert_allclose(w @ w.T, expected, atol=1e-12)
    # half of each direction's variance is visible in morphology (first L_m latent dims)
    lm = SynthConfig().morph_dims
    np.testing.assert_allclose((w[:, :lm] ** 2).sum(axis=1), 0.5, atol=1e-12)


@pytest.mark.parametrize("external", [False, True])
def test_prevalences_and_exclusion_rates(external: bool) -> None:
    cfg = SynthConfig()
    draw = draw_patients(20000, seed=1, external=external, config=cfg)
    for t, task in enumerate(cfg.tasks):
        lab = draw.labels[:, t]
        target = task.external_prevalence if external else task.prevalence
        assert abs(lab[lab >= 0].mean() - target) < 0.015, task.name
        values = np.array([row[t] for row in draw.values])
        for value, rate in task.excluded:
            assert abs((values == value).mean() - rate) < 0.006, (task.name, value)
        assert np.all((values == task.positive) == (lab == 1))
    assert abs((draw.n_slides == 2).mean() - cfg.multi_slide_share) < 0.012
    assert set(np.unique(draw.n_slides)) <= {1, 2}


def test_labels_follow_the_latent_score_not_other_directions() -> None:
    cfg = SynthConfig()
    draw = draw_patients(4000, seed=2, config=cfg)
    w, _ = task_directions(cfg)
    rng = np.random.default_rng(0)
    r = rng.standard_normal(cfg.latent_dim)
    r -= w.T @ np.linalg.lstsq(w.T, r, rcond=None)[0]  # orthogonal to every task direction
    r /= np.linalg.norm(r)
    for t in range(len(cfg.tasks)):
        ok = draw.labels[:, t] >= 0
        y = draw.labels[ok, t]
        np.testing.assert_allclose(draw.scores[:, t], draw.u @ w[t], atol=1e-12)
        assert roc_auc_score(y, draw.scores[ok, t]) > 0.9
        assert abs(roc_auc_score(y, draw.u[ok] @ r) - 0.5) < 0.04
    # overlapping directions: PR and ODX labels are negatively associated
    ok = (draw.labels[:, 1] >= 0) & (draw.labels[:, 2] >= 0)
    assert np.corrcoef(draw.labels[ok, 1], draw.labels[ok, 2])[0, 1] < -0.2


def test_written_latents_and_oracle_aucs_are_consistent(medium: tuple[Path, dict]) -> None:
    out, report = medium
    lat = {r["case_id"]: r for r in read_csv(out / "truth" / "latent.csv")}
    draw = draw_patients(200, seed=3)
    u = np.array([[float(lat[c][f"u_{k:02d}"]) for k in range(1, 17)] for c in draw.case_ids])
    np.testing.assert_allclose(u, draw.u, rtol=1e-5, atol=1e-5)
    first = {}
    for r in read_csv(out / "clinical.csv"):
        first.setdefault(r["case_id"], r)
    for task, pos, neg in (
        ("her2", "Positive", "Negative"),
        ("pr", "Positive", "Negative"),
        ("odx", "High", "Low"),
    ):
        cases = [c for c, r in first.items() if r[task] in (pos, neg)]
        y = np.array([first[c][task] == pos for c in cases], dtype=int)
        score = np.array([float(lat[c][f"score_{task}"]) for c in cases])
        auc = report["oracle_auc"][task]
        assert auc["latent"] == pytest.approx(roc_auc_score(y, score), abs=1e-3)
        assert auc["latent"] > auc["morphology_latent"] > 0.55
        assert auc["latent"] > auc["expression"] > 0.6
        assert 0.5 < auc["histology"] <= 1.0


# ------------------------------------------------------------------------------------ expression


def test_expression_table(medium: tuple[Path, dict]) -> None:
    out, report = medium
    genes, cases, x = read_expression(out / "expression.csv")
    assert genes == [f"G{g:05d}" for g in range(1, 401)]
    assert cases == sorted({r["case_id"] for r in read_csv(out / "clinical.csv")})
    assert x.shape == (200, 400) and np.isfinite(x).all() and (x >= 0).all()
    assert report["external"] is None and not (out / "external.zarr").exists()


def test_expression_follows_the_log_linear_model(medium: tuple[Path, dict]) -> None:
    """log2(x + 1) regressed on u recovers the loadings written in truth/genes.csv."""
    out, _ = medium
    _, cases, x = read_expression(out / "expression.csv")
    lat = {r["case_id"]: r for r in read_csv(out / "truth" / "latent.csv")}
    u = np.array([[float(lat[c][f"u_{k:02d}"]) for k in range(1, 17)] for c in cases])
    genes = read_csv(out / "truth" / "genes.csv")
    a = np.array([[float(g[f"a_{k:02d}"]) for k in range(1, 17)] for g in genes])
    mu = np.array([float(g["mean_log2"]) for g in genes])
    keep = mu > 6.0  # well above zero: the clip max(2^x - 1, 0) never bites
    assert keep.sum() >= 10
    design = np.column_stack([np.ones(len(u)), u])
    coef, *_ = np.linalg.lstsq(design, np.log2(x[:, keep] + 1.0), rcond=None)
    np.testing.assert_allclose(coef[1:].T, a[keep], atol=0.35)
    np.testing.assert_allclose(coef[0], mu[keep], atol=0.35)


def mean_abs_corr(x: np.ndarray, y: np.ndarray) -> float:
    """Mean |Pearson r| between y and the non-constant columns of x."""
    x = x[:, x.std(axis=0) > 0]
    return float(np.mean(np.abs([np.corrcoef(col, y)[0, 1] for col in x.T])))


def test_signal_genes_carry_label_signal_noise_genes_do_not(medium: tuple[Path, dict]) -> None:
    out, report = medium
    genes, cases, x = read_expression(out / "expression.csv")
    logx = np.log2(x + 1.0)
    loadings = {
        g["gene"]: any(float(v) != 0 for k, v in g.items() if k.startswith("a_"))
        for g in read_csv(out / "truth" / "genes.csv")
    }
    noise = [i for i, g in enumerate(genes) if not loadings[g]]
    first = {}
    for r in read_csv(out / "clinical.csv"):
        first.setdefault(r["case_id"], r)
    for task, pos, neg in (
        ("her2", "Positive", "Negative"),
        ("pr", "Positive", "Negative"),
        ("odx", "High", "Low"),
    ):
        ok = np.array([first[c][task] in (pos, neg) for c in cases])
        y = np.array([first[c][task] == pos for c in cases])[ok].astype(float)
        signal = [genes.index(g) for g in report["expression"]["signal_genes"][task][:10]]
        assert all(loadings[genes[i]] for i in signal)

        assert mean_abs_corr(logx[ok][:, signal], y) > 2.0 * mean_abs_corr(logx[ok][:, noise], y)


# ---------------------------------------------------------------------------- histology signal


def _ols_with_se(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least squares y ~ x (no intercept) with the coefficients' standard errors."""
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    resid = y - x @ coef
    sigma2 = (resid**2).sum(axis=0) / (len(x) - x.shape[1])
    se = np.sqrt(np.outer(np.diag(np.linalg.inv(x.T @ x)), sigma2))
    return coef, se


def test_morphology_shift_on_signal_patches_follows_u(tmp_path: Path) -> None:
    """On signal tumour patches the features move by beta * M u[:L_m]; elsewhere they do not."""
    from momkd.synth import _feature_params

    cfg = dataclasses.replace(SynthConfig(), multi_slide_share=0.0)  # slide i = patient i
    seed, dim, n = 4, 32, 80
    generate_cohort(
        tmp_path,
        patients=n,
        external=0,
        dim=dim,
        genes=5,
        patches=300,
        seed=seed,
        config=cfg,
        progress=False,
    )
    _, off, feats, _ = read_store(tmp_path / "cohort.zarr")
    with np.load(tmp_path / "truth" / "cohort_patches.npz") as z:
        tissue, signal = z["tissue"], z["signal"]
    m = _feature_params(cfg, dim, seed).m.astype(np.float64)  # (D, L_m), orthonormal
    u_vis = draw_patients(n, seed=seed, config=cfg).u[:, : cfg.morph_dims]
    est_sig, est_stroma, targets = [], [], []
    f = feats.astype(np.float64)
    for i in range(len(off) - 1):
        sl = slice(off[i], off[i + 1])
        t, s = tissue[sl], signal[sl]
        plain_tumour = (t == 0) & ~s
        if plain_tumour.sum() < 5 or s.sum() < 5 or (t == 1).sum() < 5:
            continue
        ref = f[sl][plain_tumour].mean(axis=0)
        est_sig.append((f[sl][s].mean(axis=0) - ref) @ m)
        est_stroma.append(f[sl][t == 1].mean(axis=0) @ m)
        targets.append(u_vis[i])
    assert len(targets) >= 30
    x = np.array(targets)
    coef, se = _ols_with_se(x, np.array(est_sig))
    expected = cfg.morph_strength * np.eye(cfg.morph_dims)
    assert np.all(np.abs(coef - expected) < 4.5 * se + 1e-3)
    assert np.all(np.diag(coef) > 0.3)
    stroma = np.array(est_stroma) - np.mean(est_stroma, axis=0)
    coef, se = _ols_with_se(x, stroma)
    assert np.all(np.abs(coef) < 4.5 * se + 1e-3)


# ------------------------------------------------------------------------------------- external


def test_external_cohort_site_shift_and_no_expression(tmp_path: Path) -> None:
    kw = {
        "patients": 3,
        "external": 8,
        "dim": 32,
        "genes": 10,
        "patches": 40,
        "seed": 9,
        "progress": False,
    }
    generate_cohort(tmp_path / "shift", **kw)
    plain = dataclasses.replace(
        SynthConfig(), site_scale=1.0, site_scale_jitter=0.0, site_offset_sd=0.0
    )
    generate_cohort(tmp_path / "plain", config=plain, **kw)
    # the internal cohort is untouched by the site shift
    np.testing.assert_array_equal(
        read_store(tmp_path / "shift" / "cohort.zarr")[2],
        read_store(tmp_path / "plain" / "cohort.zarr")[2],
    )
    shifted = read_store(tmp_path / "shift" / "external.zarr")[2].astype(np.float64)
    base = read_store(tmp_path / "plain" / "external.zarr")[2].astype(np.float64)
    # per dimension, shifted = scale_d * base + offset_d (up to float16 rounding)
    scales, offsets = [], []
    for d in range(base.shape[1]):
        (s, o), *_ = np.linalg.lstsq(
            np.column_stack([base[:, d], np.ones(len(base))]), shifted[:, d], rcond=None
        )
        resid = shifted[:, d] - (s * base[:, d] + o)
        assert np.abs(resid).max() < 0.02
        scales.append(s)
        offsets.append(o)
    cfg = SynthConfig()
    assert abs(np.mean(np.log(scales)) - math.log(cfg.site_scale)) < 0.05
    assert 0.5 * cfg.site_offset_sd < np.std(offsets) < 1.6 * cfg.site_offset_sd
    # no expression for external patients
    _, cases, _ = read_expression(tmp_path / "shift" / "expression.csv")
    ext_cases = {r["case_id"] for r in read_csv(tmp_path / "shift" / "external_clinical.csv")}
    assert all(c.startswith("EXT-") for c in ext_cases)
    assert not ext_cases & set(cases)
    assert all(c.startswith("SYN-") for c in cases)


def test_external_prevalence_shift_keeps_labelling_mechanism() -> None:
    """Same P(y | u) in both cohorts: labels given the score follow the same threshold."""
    cfg = SynthConfig()
    draws = [draw_patients(20000, seed=8, external=e, config=cfg) for e in (False, True)]
    for t in range(len(cfg.tasks)):
        rates = []
        for d in draws:
            ok = d.labels[:, t] >= 0
            s, y = d.scores[ok, t], d.labels[ok, t]
            win = (s > 0.4) & (s < 0.8)  # positive rate among patients with similar scores
            rates.append(y[win].mean())
        assert abs(rates[0] - rates[1]) < 0.06
    # while the prevalences do differ
    assert abs(draws[0].labels[:, 2].mean() - draws[1].labels[:, 2].mean()) > 0.1


# ---------------------------------------------------------------------------------------- errors


def test_refuses_to_overwrite_without_flag(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    kw = {"patients": 2, "external": 0, "dim": 32, "genes": 5, "patches": 16, "progress": False}
    generate_cohort(tmp_path, **kw)
    with pytest.raises(ConfigError, match="cohort.zarr") as err:
        generate_cohort(tmp_path, **kw)
    assert str(err.value).endswith("already exists; pass --overwrite to replace it")
    assert main(["synth", str(tmp_path), "-q"]) == 2
    assert (
        capsys.readouterr().err.strip().endswith("already exists; pass --overwrite to replace it")
    )
    generate_cohort(tmp_path, overwrite=True, **kw)
    assert json.loads((tmp_path / "oracle.json").read_text())["arguments"]["patients"] == 2


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"dim": 8}, "dim"),
        ({"patients": 0}, "patients"),
        ({"seed": -1}, "seed"),
        ({"genes": 0}, "genes"),
    ],
)
def test_bad_arguments_raise_config_error(tmp_path: Path, kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        generate_cohort(tmp_path, progress=False, **kwargs)


def test_bad_config_names_the_key() -> None:
    with pytest.raises(ConfigError, match="label_noise_sd"):
        SynthConfig(label_noise_sd=-1.0)
    with pytest.raises(ConfigError, match="tissue_mix"):
        SynthConfig(tissue_mix=(1.0, 1.0))


# ------------------------------------------------------------------------------ subtype column

CLASSES = ("LumA", "LumB", "HER2", "Basal")
# docs/SYNTHETIC.md §1.6: class shares of the internal and external populations
DOC_PREVALENCE = {
    False: {"LumA": 0.345, "LumB": 0.200, "HER2": 0.200, "Basal": 0.255},
    True: {"LumA": 0.208, "LumB": 0.234, "HER2": 0.250, "Basal": 0.308},
}
SUBTYPE_ARGS = {"patients": 400, "external": 200, "dim": 32, "genes": 300, "patches": 6, "seed": 5}


@pytest.fixture(scope="module")
def subtyped(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """Enough patients in both cohorts for every subtype class and its oracles."""
    out = tmp_path_factory.mktemp("synth_subtype")
    return out, generate_cohort(out, **SUBTYPE_ARGS, progress=False)


def _first_rows(path: Path) -> dict[str, dict[str, str]]:
    first: dict[str, dict[str, str]] = {}
    for r in read_csv(path):
        first.setdefault(r["case_id"], r)
    return first


def _subtype_rule(noisy: np.ndarray, a: float, b: float, c: float) -> list[str]:
    """The documented rule, written out case by case."""
    out = []
    for h, p, o in noisy:
        if h > a:
            out.append("HER2")
        elif p <= b:
            out.append("Basal")
        elif o > c:
            out.append("LumB")
        else:
            out.append("LumA")
    return out


def test_subtype_column_has_four_values_in_both_clinical_tables(
    subtyped: tuple[Path, dict],
) -> None:
    out, report = subtyped
    for table, cohort in (("clinical.csv", "cohort"), ("external_clinical.csv", "external")):
        rows = read_csv(out / table)
        assert list(rows[0])[-1] == "subtype"
        by_case: dict[str, set[str]] = {}
        for r in rows:
            by_case.setdefault(r["case_id"], set()).add(r["subtype"])
        assert all(len(v) == 1 for v in by_case.values()), "one subtype per patient"
        values = [next(iter(v)) for v in by_case.values()]
        assert set(values) == set(CLASSES)
        counts = report[cohort]["prevalence"]["subtype"]["counts"]
        assert counts == {k: values.count(k) for k in CLASSES}
        assert report[cohort]["prevalence"]["subtype"]["labelled_patients"] == len(values)
    assert report["label_mapping"]["subtype"] == {"classes": list(CLASSES), "excluded": []}
    assert report["subtype"]["classes"] == list(CLASSES)


def test_subtype_is_the_documented_function_of_the_noisy_scores(
    subtyped: tuple[Path, dict],
) -> None:
    """Recompute the column from truth/ and oracle.json, and tie the noisy scores to the labels."""
    out, report = subtyped
    truth = read_csv(out / "truth" / "subtype.csv")
    latent = {r["case_id"]: r for r in read_csv(out / "truth" / "latent.csv")}
    thr = report["subtype"]["thresholds"]
    assert report["subtype"]["tasks"] == {"her2": "her2", "pr": "pr", "split": "odx"}
    # the HER2 and PR thresholds are the binary tasks' label thresholds
    for task in ("her2", "pr"):
        assert round(thr[task], 6) == report["tasks"][task]["threshold"]
    noisy = np.array([[float(r[f"noisy_{t}"]) for t in ("her2", "pr", "odx")] for r in truth])
    assert [r["subtype"] for r in truth] == _subtype_rule(
        noisy, thr["her2"], thr["pr"], thr["split"]
    )
    clinical = {**_first_rows(out / "clinical.csv"), **_first_rows(out / "external_clinical.csv")}
    assert [r["case_id"] for r in truth] == list(clinical)
    assert [r["subtype"] for r in truth] == [clinical[r["case_id"]]["subtype"] for r in truth]
    # noisy score = noiseless score + N(0, 0.5^2) label noise, and it is what the labels threshold
    for j, (task, pos, neg) in enumerate(
        (("her2", "Positive", "Negative"), ("pr", "Positive", "Negative"), ("odx", "High", "Low"))
    ):
        score = np.array([float(latent[r["case_id"]][f"score_{task}"]) for r in truth])
        resid = noisy[:, j] - score
        assert abs(resid.mean()) < 0.06 and abs(resid.std() - 0.5) < 0.04
        theta = report["tasks"][task]["threshold"]
        for r, x in zip(truth, noisy[:, j], strict=True):
            value = clinical[r["case_id"]][task]
            if value in (pos, neg) and abs(x - theta) > 1e-5:
                assert (value == pos) == (x > theta), (r["case_id"], task)
    # hence HER2 subtype <=> her2 Positive, and Basal => her2 and pr Negative (where labelled)
    for r in truth:
        row = clinical[r["case_id"]]
        if row["her2"] in ("Positive", "Negative"):
            assert (r["subtype"] == "HER2") == (row["her2"] == "Positive")
        if r["subtype"] == "Basal" and row["pr"] in ("Positive", "Negative"):
            assert row["pr"] == "Negative"


def test_subtype_split_threshold_and_targets_by_simulation(subtyped: tuple[Path, dict]) -> None:
    """The split threshold gives LumB its configured share; the targets match a simulation from
    the task directions and thresholds in oracle.json (an independent route to the same numbers)."""
    _, report = subtyped
    w = np.array([report["tasks"][t]["direction"] for t in ("her2", "pr", "odx")])
    thr = report["subtype"]["thresholds"]
    rng = np.random.default_rng(123)
    n = 400_000
    for external, cohort in ((False, "cohort"), (True, "external")):
        mean = np.array(report["external"]["latent_mean_shift"]) if external else 0.0
        u = mean + rng.standard_normal((n, w.shape[1]))
        noisy = u @ w.T + 0.5 * rng.standard_normal((n, 3))
        her2 = noisy[:, 0] > thr["her2"]
        basal = ~her2 & (noisy[:, 1] <= thr["pr"])
        lumb = ~her2 & ~basal & (noisy[:, 2] > thr["split"])
        share = {"HER2": her2.mean(), "Basal": basal.mean(), "LumB": lumb.mean()}
        share["LumA"] = 1.0 - sum(share.values())
        target = report[cohort]["prevalence"]["subtype"]["target"]
        for k in CLASSES:
            assert target[k] == pytest.approx(share[k], abs=0.004), (cohort, k)
            assert target[k] == pytest.approx(DOC_PREVALENCE[external][k], abs=0.0006)
    assert report["cohort"]["prevalence"]["subtype"]["target"]["LumB"] == 0.2


@pytest.mark.parametrize("external", [False, True])
def test_subtype_prevalences_in_the_documented_range(external: bool) -> None:
    draw = draw_patients(20000, seed=2, external=external)
    assert draw.subtype is not None
    share = np.bincount(draw.subtype, minlength=4) / len(draw.subtype)
    for k, name in enumerate(CLASSES):
        assert abs(share[k] - DOC_PREVALENCE[external][name]) < 0.012, name
        assert share[k] > 0.18  # no class is rare at the defaults
    # a patient's subtype does not depend on the cohort size
    small = draw_patients(50, seed=2, external=external)
    assert small.subtype is not None
    np.testing.assert_array_equal(small.subtype, draw.subtype[:50])


def test_subtype_probabilities_match_scipy() -> None:
    """The quadrature against scipy's multivariate normal CDF, on a correlated covariance."""
    from momkd.synth import subtype_probabilities, subtype_thresholds
    from scipy.stats import multivariate_normal, norm

    a, b, c = subtype_thresholds()
    rng = np.random.default_rng(4)
    mean = rng.normal(0.0, 0.8, (5, 3))
    cov = np.array([[0.9, -0.3, 0.1], [-0.3, 0.8, -0.35], [0.1, -0.35, 0.7]])
    got = subtype_probabilities(mean, cov, (a, b, c))
    flip = np.diag([1.0, -1.0, -1.0])  # P(h <= a, p > b, o > c) = P(h <= a, -p < -b, -o < -c)
    for m, g in zip(mean, got, strict=True):
        her2 = 1.0 - norm.cdf(a, m[0], math.sqrt(cov[0, 0]))
        basal = multivariate_normal.cdf([a, b], m[:2], cov[:2, :2], abseps=1e-8, releps=1e-8)
        lumb = multivariate_normal.cdf(
            [a, -b, -c],
            flip @ m,
            flip @ cov @ flip,
            maxpts=200_000,
            abseps=1e-7,
            releps=1e-7,
            rng=np.random.default_rng(0),
        )
        want = [1.0 - her2 - basal - lumb, lumb, her2, basal]
        np.testing.assert_allclose(g, want, atol=2e-5)
    # diagonal covariance: products of normal CDFs
    diag = np.diag([0.25, 0.25, 0.25])
    got = subtype_probabilities(mean, diag, (a, b, c))
    ph, pp, po = (norm.cdf(t, mean[:, j], 0.5) for j, t in enumerate((a, b, c)))
    want = np.stack([ph * (1 - pp) * po, ph * (1 - pp) * (1 - po), 1 - ph, ph * pp], axis=1)
    np.testing.assert_allclose(got, want, atol=1e-12)


def test_subtype_oracle_aucs_match_scikit_learn(subtyped: tuple[Path, dict]) -> None:
    """Latent: the exact posterior from truth/latent.csv; expression: the documented ridge
    protocol on expression.csv; both scored with roc_auc_score(multi_class="ovr")."""
    from scipy.stats import norm
    from sklearn.linear_model import RidgeClassifierCV
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    out, report = subtyped
    auc = report["oracle_auc"]["subtype"]
    thr = report["subtype"]["thresholds"]
    truth = read_csv(out / "truth" / "subtype.csv")
    latent = {r["case_id"]: r for r in read_csv(out / "truth" / "latent.csv")}
    for cohort, key in (("internal", "latent"), ("external", "external_latent")):
        rows = [r for r in truth if r["cohort"] == cohort]
        y = np.array([CLASSES.index(r["subtype"]) for r in rows])
        s = np.array(
            [
                [float(latent[r["case_id"]][f"score_{t}"]) for t in ("her2", "pr", "odx")]
                for r in rows
            ]
        )
        ph, pp, po = (norm.cdf(thr[t], s[:, j], 0.5) for j, t in enumerate(("her2", "pr", "split")))
        prob = np.stack([ph * (1 - pp) * po, ph * (1 - pp) * (1 - po), 1 - ph, ph * pp], axis=1)
        want = roc_auc_score(y, prob, multi_class="ovr", average="macro")
        assert auc[key] == pytest.approx(want, abs=1e-3), key
    _, genes, x = read_expression(out / "expression.csv")
    cases = [r["case_id"] for r in read_csv(out / "expression.csv")]
    sub = {r["case_id"]: r["subtype"] for r in truth}
    y = np.array([CLASSES.index(sub[c]) for c in cases])
    model = make_pipeline(StandardScaler(), RidgeClassifierCV(alphas=np.logspace(0, 5, 11)))
    cv = StratifiedKFold(5, shuffle=True, random_state=SUBTYPE_ARGS["seed"])
    score = cross_val_predict(model, np.log2(x + 1), y, cv=cv, method="decision_function")
    want = np.mean([roc_auc_score(y == k, score[:, k]) for k in range(4)])
    assert auc["expression"] == pytest.approx(want, abs=0.01)
    # the documented ordering of the oracles
    assert auc["latent"] > auc["expression"] > 0.6
    assert auc["latent"] > auc["morphology_latent"] > 0.6
    assert auc["external_latent"] > auc["external_morphology_latent"] > 0.6
    assert 0.55 < auc["histology"] < auc["latent"]
    assert 0.55 < auc["external_histology"] < auc["external_latent"]
    assert set(auc) == set(report["oracle_auc"]["her2"])


def test_without_subtype_every_other_output_is_identical(tmp_path: Path) -> None:
    """Switching the subtype off changes nothing but the column, truth/subtype.csv and the
    report's subtype entries: it takes no random draw of its own."""
    kw = {**SMALL, "h5": True, "pt": True, "progress": False}
    on, off = tmp_path / "on", tmp_path / "off"
    rep_on = generate_cohort(on, **kw, config=small_config())
    rep_off = generate_cohort(
        off, **kw, config=dataclasses.replace(small_config(), subtype_tasks=None)
    )
    files_on = sorted(p.relative_to(on) for p in on.rglob("*") if p.is_file())
    files_off = sorted(p.relative_to(off) for p in off.rglob("*") if p.is_file())
    assert sorted(set(files_on) - set(files_off)) == [Path("truth/subtype.csv")]
    assert not set(files_off) - set(files_on)
    for rel in files_off:
        if rel.name in ("clinical.csv", "external_clinical.csv", "oracle.json"):
            continue
        assert (on / rel).read_bytes() == (off / rel).read_bytes(), rel
    for table in ("clinical.csv", "external_clinical.csv"):
        with_col = [{k: v for k, v in r.items() if k != "subtype"} for r in read_csv(on / table)]
        assert with_col == read_csv(off / table)
    assert "subtype" not in read_csv(off / "clinical.csv")[0]

    def strip(obj: object, root: str) -> object:
        if isinstance(obj, dict):
            return {
                k: strip(v, root)
                for k, v in obj.items()
                if k not in ("subtype", "subtype_tasks", "out_dir")
            }
        if isinstance(obj, list):
            return [strip(v, root) for v in obj]
        return obj.replace(root, "<out>") if isinstance(obj, str) else obj

    assert rep_off["subtype"] is None and "subtype" not in rep_off["oracle_auc"]
    assert strip(json.loads(json.dumps(rep_on)), str(on)) == strip(
        json.loads(json.dumps(rep_off)), str(off)
    )


def test_bad_subtype_config_names_the_key() -> None:
    with pytest.raises(ConfigError, match="subtype_tasks"):
        SynthConfig(subtype_tasks=("her2", "pr", "grade"))
    with pytest.raises(ConfigError, match="subtype_tasks"):
        SynthConfig(subtype_tasks=("her2", "her2", "odx"))
    with pytest.raises(ConfigError, match="subtype_lumb_prevalence"):
        SynthConfig(subtype_lumb_prevalence=0.0)
    with pytest.raises(ConfigError, match="subtype_lumb_prevalence"):
        draw_patients(3, config=SynthConfig(subtype_lumb_prevalence=0.9))


# --------------------------------------------------------------- earlier outputs stay unchanged


def _differences(got: object, want: object, path: str, exact: bool) -> list[str]:
    """Where ``got`` differs from the recorded ``want``; ``got`` may have keys ``want`` lacks."""
    if isinstance(want, dict) and isinstance(got, dict):
        missing = sorted(set(want) - set(got))
        if missing:
            return [f"{path}: missing keys {missing}"]
        keys = [k for k in want if exact or k != "sha256"]
        return [d for k in keys for d in _differences(got[k], want[k], f"{path}.{k}", exact)]
    if isinstance(want, list) and isinstance(got, list):
        if len(want) != len(got):
            return [f"{path}: length {len(got)} != {len(want)}"]
        return [
            d
            for i, (a, b) in enumerate(zip(got, want))
            for d in _differences(a, b, f"{path}[{i}]", exact)
        ]
    if exact or not isinstance(want, float) or not isinstance(got, float):
        return [] if got == want else [f"{path}: {got!r} != {want!r}"]
    return (
        [] if math.isclose(got, want, rel_tol=1e-4, abs_tol=1e-4) else [f"{path}: {got} != {want}"]
    )


def test_earlier_outputs_match_the_record_taken_before_the_subtype_column(tmp_path: Path) -> None:
    """Every output that existed before the subtype column is unchanged (tests/synth_record.py).

    The record was taken with the generator before the column was added; on its platform every
    array, table and report value must be bit-identical, elsewhere the sums agree closely.
    """
    import synth_record

    record = json.loads(synth_record.RECORD.read_text())
    assert record["args"] == synth_record.ARGS
    got = json.loads(json.dumps(synth_record.fingerprint(synth_record.make(tmp_path))))
    want = record["fingerprint"]
    exact = record["platform"] == synth_record.platform_key()
    if not exact:  # report values are rounded floats; only the file contents are compared elsewhere
        got.pop("oracle")
        want = {k: v for k, v in want.items() if k != "oracle"}
    diffs = _differences(got, want, "cohort", exact)
    assert not diffs, f"{len(diffs)} differences: " + "; ".join(diffs[:8])


def test_the_record_comparison_sees_a_changed_value() -> None:
    import synth_record

    want = json.loads(synth_record.RECORD.read_text())["fingerprint"]
    assert not _differences(json.loads(json.dumps(want)), want, "cohort", exact=True)
    changed = json.loads(json.dumps(want))
    changed["clinical"]["clinical.csv"][1][2] = "Equivocal"
    assert _differences(changed, want, "cohort", exact=False)
    changed = json.loads(json.dumps(want))
    changed["stores"]["cohort.zarr"]["arrays"]["features"]["sha256"] = "0" * 64
    assert _differences(changed, want, "cohort", exact=True)
    changed["stores"]["cohort.zarr"]["arrays"]["features"]["sum"] += 1.0
    assert _differences(changed, want, "cohort", exact=False)
