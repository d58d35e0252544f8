"""Per-fold genomics preprocessing against numpy and scikit-learn."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from momkd.config import load_config
from momkd.errors import ConfigError, DataError
from momkd.train.genomics import GenomicsPreprocessor, preprocessor_from_config
from sklearn.feature_selection import SelectKBest, f_classif


def _raw(n: int = 40, g: int = 60, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """TPM-like non-negative matrix; genes 0-4 carry the label."""
    rng = np.random.default_rng(seed)
    y = np.r_[np.zeros(n // 2), np.ones(n - n // 2)].astype(np.int64)
    rng.shuffle(y)
    logx = rng.normal(4.0, 1.5, size=(n, g))
    logx[:, :5] += 1.5 * y[:, None]
    x = np.exp2(logx) + rng.random((n, g))  # positive, max well above 50
    return x, y, [f"G{i:03d}" for i in range(g)]


def _reference(x_tr: np.ndarray, y_tr: np.ndarray, x_te: np.ndarray, k: int) -> np.ndarray:
    lx_tr, lx_te = np.log2(x_tr + 1), np.log2(x_te + 1)
    mu, sd = lx_tr.mean(0), lx_tr.std(0)
    sd[sd == 0] = 1
    keep = SelectKBest(f_classif, k=k).fit((lx_tr - mu) / sd, y_tr).get_support(indices=True)
    return ((lx_te - mu) / sd)[:, keep]


def test_transform_uses_train_statistics_only() -> None:
    x, y, genes = _raw()
    tr, te = np.arange(30), np.arange(30, 40)
    pre = GenomicsPreprocessor(n_genes=12).fit(x[tr], y[tr], genes)
    assert pre.log_applied
    out = pre.transform(x[te])
    assert out.dtype == np.float32 and out.shape == (10, 12)
    np.testing.assert_allclose(out, _reference(x[tr], y[tr], x[te], 12), rtol=1e-5, atol=1e-5)


def test_anova_selection_equals_selectkbest() -> None:
    x, y, genes = _raw(seed=2)
    pre = GenomicsPreprocessor(n_genes=7, log=True)
    out = pre.fit_transform(x, y, genes)
    z = np.log2(x + 1)
    z = (z - z.mean(0)) / z.std(0)
    sel = SelectKBest(f_classif, k=7).fit(z, y)
    assert pre.gene_names == [genes[i] for i in sel.get_support(indices=True)]
    np.testing.assert_allclose(out, sel.transform(z), rtol=1e-5, atol=1e-5)
    assert set(range(5)) <= set(pre.selected_index.tolist())  # the signal genes


def test_no_leakage_from_test_rows() -> None:
    x, y, genes = _raw(seed=3)
    tr, te = np.arange(28), np.arange(28, 40)
    state = GenomicsPreprocessor(n_genes=10).fit(x[tr], y[tr], genes).state_dict()
    x2 = x.copy()
    x2[te] = x2[te] * 50 + 1000  # wildly different test patients
    pre2 = GenomicsPreprocessor(n_genes=10).fit(x2[tr], y[tr], genes)
    assert pre2.state_dict() == state
    # Test data are standardised with the training statistics, so a shift survives.
    assert np.abs(pre2.transform(x2[te]).mean()) > 1.0


def test_constant_gene_and_log_modes() -> None:
    x, y, genes = _raw(n=20, g=10)
    x[:, 3] = 7.0
    pre = GenomicsPreprocessor(n_genes=10, log=True).fit(x, y, genes)
    assert pre.std[list(pre.selected_index).index(3)] == 1.0
    assert np.all(pre.transform(x)[:, list(pre.selected_index).index(3)] == 0)

    logged = np.log2(x + 1)
    auto = GenomicsPreprocessor(n_genes=4, log="auto").fit(logged, y, genes)
    assert not auto.log_applied  # max < 50: already log-scale
    forced = GenomicsPreprocessor(n_genes=4, log=False).fit(x, y, genes)
    assert not forced.log_applied
    z = (x - x.mean(0)) / np.where(x.std(0) == 0, 1, x.std(0))
    np.testing.assert_allclose(
        forced.transform(x), z[:, forced.selected_index], rtol=1e-5, atol=1e-5
    )
    negative = logged - 3.0
    assert not GenomicsPreprocessor(n_genes=4).fit(negative, y, genes).log_applied
    with pytest.raises(DataError, match="negative value"):
        GenomicsPreprocessor(n_genes=4, log=True).fit(negative, y, genes)


def test_gene_list_selection(tmp_path: Path) -> None:
    x, y, genes = _raw(g=20)
    pre = GenomicsPreprocessor(selection="list", gene_list=["G007", "G002", "G011"])
    out = pre.fit_transform(x, y, genes)
    assert pre.gene_names == ["G007", "G002", "G011"] and out.shape == (40, 3)
    lx = np.log2(x + 1)
    np.testing.assert_allclose(
        out[:, 1], (lx[:, 2] - lx[:, 2].mean()) / lx[:, 2].std(), rtol=1e-5, atol=1e-5
    )
    listing = tmp_path / "genes.txt"
    listing.write_text("# my genes\nG001\nG004, note\n\n")
    assert GenomicsPreprocessor(selection="list", gene_list=listing).fit(
        x, y, genes
    ).gene_names == ["G001", "G004"]
    with pytest.raises(DataError, match="2 genes not in the expression matrix: NOPE1, NOPE2"):
        GenomicsPreprocessor(selection="list", gene_list=["G001", "NOPE1", "NOPE2"]).fit(
            x, y, genes
        )


def test_transform_by_gene_names_and_shape_errors() -> None:
    x, y, genes = _raw()
    pre = GenomicsPreprocessor(n_genes=8).fit(x, y, genes)
    perm = np.random.default_rng(0).permutation(len(genes))
    np.testing.assert_array_equal(
        pre.transform(x[:, perm], gene_names=[genes[i] for i in perm]), pre.transform(x)
    )
    with pytest.raises(DataError, match="fitted on 60 genes"):
        pre.transform(x[:, :50])
    with pytest.raises(ConfigError, match=r"genomics\.n_genes: 100 exceeds the 60 genes"):
        GenomicsPreprocessor(n_genes=100).fit(x, y, genes)
    bad = x.copy()
    bad[4, 7] = np.inf
    with pytest.raises(DataError, match=r"non-finite value .*row 4, column 7"):
        GenomicsPreprocessor(n_genes=5).fit(bad, y, genes)
    with pytest.raises(DataError, match="before fit"):
        GenomicsPreprocessor().transform(x)


def test_state_dict_survives_weights_only_checkpoint(tmp_path: Path) -> None:
    x, y, genes = _raw()
    pre = GenomicsPreprocessor(n_genes=9).fit(x[:30], y[:30], genes)
    torch.save({"genomics": pre.state_dict()}, tmp_path / "ckpt.pt")
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)["genomics"]
    back = GenomicsPreprocessor.from_state_dict(state)
    np.testing.assert_array_equal(back.transform(x[30:]), pre.transform(x[30:]))
    assert back.gene_names == pre.gene_names
    with pytest.raises(DataError, match="missing keys"):
        GenomicsPreprocessor.from_state_dict({"mean": []})


def test_xgboost_missing_gives_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    x, y, genes = _raw()
    monkeypatch.setitem(sys.modules, "xgboost", None)
    with pytest.raises(ConfigError, match=r"pip install 'momkd\[xgboost\]'"):
        GenomicsPreprocessor(n_genes=5, selection="xgboost").fit(x, y, genes)


def test_xgboost_ranking_with_fake_model(monkeypatch: pytest.MonkeyPatch) -> None:
    x, y, genes = _raw()
    importance = np.zeros(len(genes))
    importance[[40, 12, 33]] = [0.5, 0.3, 0.2]

    class FakeXGB:
        def __init__(self, **kwargs: object) -> None:
            self.kwargs = kwargs

        def fit(self, z: np.ndarray, yy: np.ndarray) -> FakeXGB:
            assert z.shape == x.shape
            self.feature_importances_ = importance
            return self

    monkeypatch.setitem(sys.modules, "xgboost", types.SimpleNamespace(XGBClassifier=FakeXGB))
    pre = GenomicsPreprocessor(n_genes=5, selection="xgboost").fit(x, y, genes)
    # Three genes with importance, then ties broken by the ANOVA F score.
    lx = np.log2(x + 1)
    f, _ = f_classif((lx - lx.mean(0)) / lx.std(0), y)
    f[[40, 12, 33]] = -np.inf
    expected = sorted([40, 12, 33, *np.argsort(-f)[:2].tolist()])
    assert pre.selected_index.tolist() == expected


def test_preprocessor_from_config(tmp_path: Path) -> None:
    cfg = load_config(None, ["genomics.n_genes=11", "data.expression_is_log=true"])
    pre = preprocessor_from_config(cfg)
    assert pre.n_genes == 11 and pre.log is False
    cfg = load_config(None, ["genomics.log=true", "data.expression_is_log=true"])
    assert preprocessor_from_config(cfg).log is True
