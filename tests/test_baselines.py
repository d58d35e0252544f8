"""The ABMIL and batch-local KD baselines: forward passes against numpy, losses against hand
computations, gradient routing, and training/prediction under the common protocol."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from momkd.config import load_config
from momkd.model.abmil import ABMIL, ABMILConfig
from momkd.model.batchkd import BatchKD, BatchKDConfig, logit_kd_loss, relational_kd_loss


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def _abmil_numpy(model: ABMIL, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gated attention MIL (Ilse et al. 2018) written out in numpy for one bag."""
    w1, b1 = _np(model.fc[0].weight), _np(model.fc[0].bias)
    wa, ba = _np(model.pool.attention_a[0].weight), _np(model.pool.attention_a[0].bias)
    wb, bb = _np(model.pool.attention_b[0].weight), _np(model.pool.attention_b[0].bias)
    wc, bc = _np(model.pool.attention_c.weight), _np(model.pool.attention_c.bias)
    wo, bo = _np(model.classifier.weight), _np(model.classifier.bias)
    h = np.maximum(x @ w1.T + b1, 0.0)
    a = np.tanh(h @ wa.T + ba)
    g = 1.0 / (1.0 + np.exp(-(h @ wb.T + bb)))
    s = ((a * g) @ wc.T + bc)[:, 0]
    w = np.exp(s - s.max())
    w /= w.sum()
    v = w @ h
    return v @ wo.T + bo, w


def test_abmil_matches_numpy_gated_attention() -> None:
    torch.manual_seed(0)
    model = ABMIL(ABMILConfig(d_in=12, hidden=10, attn_dim=6, dropout=0.25)).eval()
    x = torch.randn(9, 12)
    out = model(x)
    logits, w = _abmil_numpy(model, x.double().numpy())
    np.testing.assert_allclose(_np(out.logits[0]), logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_np(out.attention), w, rtol=1e-5, atol=1e-7)
    probs, att = model.predict(x)
    e = np.exp(logits - logits.max())
    np.testing.assert_allclose(_np(probs), e / e.sum(), rtol=1e-5)
    np.testing.assert_allclose(_np(att), w, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("cls", ["abmil", "batchkd"])
def test_batched_bags_equal_separate_bags(cls: str) -> None:
    torch.manual_seed(1)
    if cls == "abmil":
        model: torch.nn.Module = ABMIL(ABMILConfig(d_in=8, hidden=6, attn_dim=4)).eval()
    else:
        model = BatchKD(
            BatchKDConfig(
                d_in=8,
                hidden=6,
                attn_dim=4,
                genes=5,
                omics_width=4,
                omics_hidden=4,
                classifier_hidden=3,
            )
        ).eval()
    bags = [torch.randn(n, 8) for n in (1, 7, 4)]
    offsets = torch.tensor([0, 1, 8, 12])
    with torch.no_grad():
        batched = model(torch.cat(bags), None, None, offsets)
    for i, b in enumerate(bags):
        with torch.no_grad():
            single = model(b)
        torch.testing.assert_close(batched.logits[i], single.logits[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(
            batched.attention[offsets[i] : offsets[i + 1]], single.attention, rtol=1e-5, atol=1e-6
        )
        assert float(batched.attention[offsets[i] : offsets[i + 1]].sum()) == pytest.approx(1.0)


def test_relational_and_logit_kd_match_hand_computation() -> None:
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(4, 5)), rng.normal(size=(4, 3))
    sn = s / np.linalg.norm(s, axis=1, keepdims=True)
    tn = t / np.linalg.norm(t, axis=1, keepdims=True)
    expected = np.mean((sn @ sn.T - tn @ tn.T) ** 2)
    got = relational_kd_loss(torch.tensor(s), torch.tensor(t))
    assert float(got) == pytest.approx(expected, rel=1e-10)

    ls, lt, temp = rng.normal(size=(4, 2)), rng.normal(size=(4, 2)), 2.0

    def softmax(z: np.ndarray) -> np.ndarray:
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    ps, pt = softmax(ls / temp), softmax(lt / temp)
    kl = np.sum(pt * (np.log(pt) - np.log(ps))) / 4 * temp**2
    got = logit_kd_loss(torch.tensor(ls), torch.tensor(lt), temp)
    assert float(got) == pytest.approx(kl, rel=1e-10)


def test_batchkd_gradient_routing() -> None:
    """KD terms move only the student; the teacher learns only from its own cross-entropy."""
    torch.manual_seed(2)
    cfg = BatchKDConfig(
        d_in=8,
        hidden=6,
        attn_dim=4,
        genes=5,
        omics_width=4,
        omics_hidden=4,
        classifier_hidden=3,
        dropout=0.0,
        omics_dropout=0.0,
    )
    model = BatchKD(cfg)
    feats = torch.randn(10, 8)
    offsets = torch.tensor([0, 3, 6, 10])
    expr = torch.randn(3, 5)
    y = torch.tensor([1, 0, 1])
    teacher = {
        n
        for n, _ in model.named_parameters()
        if n.startswith(("omics_encoder", "teacher_classifier"))
    }
    assert teacher

    def grads(term: str) -> dict[str, bool]:
        model.zero_grad(set_to_none=True)
        out = model(feats, None, expr, offsets)
        _, terms = model.loss(out, y, expr)
        value = {
            "ce": torch.nn.functional.cross_entropy(out.logits, y),
            "teacher_ce": torch.nn.functional.cross_entropy(out.teacher_logits, y),
            "rkd": relational_kd_loss(out.pooled, out.teacher_embedding),
            "kd": logit_kd_loss(out.logits, out.teacher_logits, cfg.temperature),
        }[term]
        assert float(value.detach()) == pytest.approx(float(terms[term]), rel=1e-6)
        value.backward()
        return {
            n: p.grad is not None and bool(p.grad.abs().sum() > 0)
            for n, p in model.named_parameters()
        }

    for term in ("ce", "rkd", "kd"):
        g = grads(term)
        assert not any(g[n] for n in teacher), term
        assert any(v for n, v in g.items() if n not in teacher), term
    g = grads("teacher_ce")
    assert all(not v for n, v in g.items() if n not in teacher)
    assert any(g[n] for n in teacher)

    out = model(feats, None, expr, offsets)
    total, terms = model.loss(out, y, expr)
    expected = terms["ce"] + terms["teacher_ce"] + cfg.kd_weight * (terms["rkd"] + terms["kd"])
    assert float(total) == pytest.approx(float(expected), rel=1e-6)


# ------------------------------------------------------------------------ training and predict


def _config(expression: bool) -> str:
    expr = "  expression: expression.csv\n" if expression else ""
    return (
        "data:\n  store: cohort.zarr\n  clinical: clinical.csv\n"
        + expr
        + "  label_column: pr\n  positive: [Positive]\n  negative: [Negative]\n"
        "splits: {k: 2}\ngenomics: {n_genes: 10}\n"
        "model: {hidden: 12, omics_width: 8, omics_hidden: 8, attention_dim: 6,"
        " classifier_hidden: 6, batchkd_batch: 4}\n"
        "train: {epochs: 2, min_epochs: 1, patience: 2, folds: [0]}\n"
    )


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from momkd.synth import generate_cohort

    root = tmp_path_factory.mktemp("cohort")
    generate_cohort(
        root, patients=24, external=0, dim=32, genes=30, patches=12, seed=11, progress=False
    )
    (root / "with_expr.yaml").write_text(_config(True))
    (root / "no_expr.yaml").write_text(_config(False))
    return root


@pytest.mark.parametrize("method", ["abmil", "batchkd", "meanpool", "momkd_histo"])
def test_baseline_trains_and_predicts(
    method: str, cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from momkd.train.evaluate import predict
    from momkd.train.runner import train

    config = cohort / ("with_expr.yaml" if method == "batchkd" else "no_expr.yaml")
    cfg = load_config(config, overrides=[f"model.method={method}"])
    summary = train(cfg, out_dir=tmp_path / "run", progress=False)
    assert summary["method"] == method
    assert len(summary["folds"]) == 1
    fold = summary["folds"][0]
    assert 0.0 <= fold["test"]["auc"] <= 1.0 or math.isnan(fold["test"]["auc"])
    hist = json.loads((tmp_path / "run" / "fold_0" / "history.json").read_text())
    assert len(hist) == 2
    ckpt = torch.load(tmp_path / "run" / "fold_0" / "best.pt", weights_only=True)
    assert ckpt["method"] == method
    if method == "batchkd":
        assert {"train_rkd", "train_kd", "train_teacher_ce"} <= set(hist[0])
        assert hist[0]["steps"] == math.ceil(fold["n_train"] / 4)
        assert ckpt["genomics"] is not None
    else:
        assert hist[0]["steps"] == fold["n_train"]
        assert ckpt["genomics"] is None

    from momkd.data import clinical

    def no_expression(*args: object, **kwargs: object) -> None:
        raise AssertionError("predict must not read expression")

    monkeypatch.setattr(clinical, "load_expression", no_expression)
    dest = tmp_path / "preds.csv"
    n = predict(
        tmp_path / "run" / "fold_0" / "best.pt",
        store=cohort / "cohort.zarr",
        out=dest,
        progress=False,
    )
    with open(dest, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert n == len(rows) > 0
    with open(tmp_path / "run" / "fold_0" / "test_predictions.csv", newline="") as fh:
        test = {r["slide_id"]: float(r["prob"]) for r in csv.DictReader(fh)}
    got = {r["slide_id"]: float(r["prob_pos"]) for r in rows}
    for s, p in test.items():
        assert got[s] == pytest.approx(p, abs=1e-6)
