"""Learning sanity of the whole training path (loader -> sampler -> model -> loss -> evaluation).

Two checks that fail when labels reach the model misaligned with their slides, when gradients do
not flow, or when predictions are written against the wrong slides:

* memorisation: with dropout off, ABMIL and MoMKD fit 20 training slides (training AUC > 0.9,
  recomputed with scikit-learn from the prediction CSV, and the training loss falls);
* generalisation: labels planted as a linear function of each patient's mean patch features
  (computed here with numpy from ``CohortStore.read``; the middle 30 % of patients excluded) are
  predicted on held-out folds by a cross-validated ABMIL run (mean test AUC over 3 folds > 0.8,
  checked against scikit-learn).
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from momkd.config import load_config
from sklearn.metrics import roc_auc_score

LABEL = "pr"

CONFIG = f"""
data:
  store: cohort.zarr
  clinical: clinical.csv
  expression: expression.csv
  label_column: {LABEL}
  positive: [Positive]
  negative: [Negative]
genomics: {{n_genes: 16}}
model: {{hidden: 32, omics_width: 16, omics_hidden: 16, sphere: 8, memory_k: 2,
        classifier_hidden: 16, attention_dim: 16, dropout: 0.0, attn_dropout: 0.0,
        omics_dropout: 0.0}}
memory: {{init_per_class: 400}}
train: {{epochs: 14, min_epochs: 14, patience: 14, lr: 1.0e-3, schedule: constant,
        warmup_epochs: 0, ema: null, weight_decay: 1.0e-4, monitor: val_loss, num_threads: 1,
        seed: 0}}
"""


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from momkd.synth import generate_cohort

    root = tmp_path_factory.mktemp("learn")
    generate_cohort(
        root, patients=120, external=0, dim=32, genes=40, patches=24, seed=11, progress=False
    )
    (root / "run.yaml").write_text(CONFIG)
    return root


@pytest.fixture()
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("method", ["abmil", "momkd"])
def test_memorises_a_tiny_training_set(
    cohort: Path, tmp_path: Path, method: str, one_thread: None
) -> None:
    from momkd.data.clinical import load_clinical, load_expression
    from momkd.data.store import CohortStore
    from momkd.train.fold_data import FoldData
    from momkd.train.genomics import preprocessor_from_config
    from momkd.train.trainer import FoldTrainer

    cfg = load_config(cohort / "run.yaml", overrides=[f"model.method={method}"])
    assert cfg.data.clinical is not None
    table = load_clinical(
        cfg.data.clinical, "case_id", "slide_id", LABEL, cfg.data.positive, cfg.data.negative
    )
    labels, cases = table.label_of(), table.case_of()
    # 10 + 10 single-slide patients
    single = [s for s in table.slide_ids if list(table.case_ids).count(cases[s]) == 1]
    pos = [s for s in single if labels[s] == 1][:10]
    neg = [s for s in single if labels[s] == 0][:10]
    assert len(pos) == 10 and len(neg) == 10
    slides = pos + neg
    expression, genomics = None, None
    if method == "momkd":
        assert cfg.data.expression is not None
        expr = load_expression(cfg.data.expression, case_ids=[cases[s] for s in slides])
        x = expr.rows([cases[s] for s in slides])
        y = np.array([labels[s] for s in slides])
        pre = preprocessor_from_config(cfg)
        z = pre.fit(x, y, expr.gene_names).transform(x)
        expression = {cases[s]: z[i] for i, s in enumerate(slides)}
        genomics = pre.state_dict()
    data = FoldData(
        fold=0,
        train=slides,
        val=slides,
        test=slides,
        labels=labels,
        cases=cases,
        expression=expression,
        genomics_state=genomics,
    )
    store = CohortStore.open(cohort / "cohort.zarr")
    trainer = FoldTrainer(cfg, data, store, tmp_path / "fold_0", device=torch.device("cpu"))
    result = trainer.run()

    rows = _read_csv(tmp_path / "fold_0" / "test_predictions.csv")
    assert [r["slide_id"] for r in rows] == slides
    assert [int(r["label"]) for r in rows] == [labels[s] for s in slides]
    auc = roc_auc_score([labels[s] for s in slides], [float(r["prob"]) for r in rows])
    assert auc == pytest.approx(result["test"]["auc"], abs=1e-9)
    assert auc > 0.9, f"{method}: training AUC {auc:.3f} after {result['epochs']} epochs"
    history = trainer.state.history
    assert history[-1]["train_ce"] < 0.7 * history[0]["train_ce"]
    assert all(np.isfinite(r["train_loss"]) for r in history)


def test_planted_signal_generalises_to_held_out_folds(
    cohort: Path, tmp_path: Path, one_thread: None
) -> None:
    from momkd.data.store import CohortStore
    from momkd.train.runner import train

    store = CohortStore.open(cohort / "cohort.zarr")
    clinical = _read_csv(cohort / "clinical.csv")
    direction = np.random.default_rng(0).standard_normal(store.feature_dim)
    slide_score = {s: float(store.read(s).features.mean(0) @ direction) for s in store.slide_ids}
    per_case: dict[str, list[float]] = {}
    for r in clinical:
        per_case.setdefault(r["case_id"], []).append(slide_score[r["slide_id"]])
    case_score = {c: float(np.mean(v)) for c, v in per_case.items()}
    # a margin between the classes: the middle 30 % of patients are excluded
    low, high = np.quantile(list(case_score.values()), [0.35, 0.65])
    planted = cohort / "planted.csv"
    with open(planted, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["case_id", "slide_id", "planted"])
        for r in clinical:
            score = case_score[r["case_id"]]
            value = "Positive" if score > high else "Negative" if score < low else "Equivocal"
            w.writerow([r["case_id"], r["slide_id"], value])

    cfg = load_config(
        cohort / "run.yaml",
        overrides=[
            "model.method=abmil",
            f"data.clinical={planted}",
            "data.label_column=planted",
            "splits.k=3",
            "model.dropout=0.25",
            "train.epochs=10",
            "train.min_epochs=10",
        ],
    )
    out = tmp_path / "run"
    summary = train(cfg, out_dir=out, progress=False)
    assert summary["data"]["excluded"] == {
        "Equivocal": sum(1 for r in clinical if low <= case_score[r["case_id"]] <= high)
    }
    aucs = []
    for fold in summary["folds"]:
        rows = _read_csv(out / f"fold_{fold['fold']}" / "test_predictions.csv")
        y = [int(case_score[r["case_id"]] > high) for r in rows]
        assert [int(r["label"]) for r in rows] == y
        auc = roc_auc_score(y, [float(r["prob"]) for r in rows])
        assert auc == pytest.approx(fold["test"]["auc"], abs=1e-9)
        aucs.append(auc)
    # per fold 40 labelled patients; a misaligned label path gives AUCs around 0.5
    assert min(aucs) > 0.6 and float(np.mean(aucs)) > 0.8, f"held-out AUCs {aucs}"
