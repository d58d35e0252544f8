"""A four-class run end to end (the synthetic ``subtype`` label): predictions, fold metrics, the
pooled summary, the external fold ensemble, the report and a comparison, each checked against
scikit-learn on the written prediction files."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, f1_score, roc_auc_score

CLASSES = ["LumA", "LumB", "HER2", "Basal"]

CONFIG = """\
data:
  store: {data}/cohort.zarr
  clinical: {data}/clinical.csv
  expression: {data}/expression.csv
  label_column: subtype
  classes: [LumA, LumB, HER2, Basal]
  external: {{store: {data}/external.zarr, clinical: {data}/external_clinical.csv}}
splits: {{k: 2, seed: 1}}
genomics: {{n_genes: 12}}
model: {{hidden: 12, omics_width: 8, omics_hidden: 8, sphere: 8, memory_k: 2,
        classifier_hidden: 6, attention_dim: 8}}
memory: {{init_per_class: 200}}
train: {{epochs: 2, min_epochs: 2, patience: 2, deterministic: true, max_patches: 12,
        ci_resamples: 100}}
"""


def _macro_auc(y: np.ndarray, p: np.ndarray) -> float:
    return float(np.mean([roc_auc_score(y == c, p[:, c]) for c in range(p.shape[1])]))


def _read(path: Path) -> tuple[list[dict[str, str]], np.ndarray, np.ndarray]:
    rows = list(csv.DictReader(path.open()))
    y = np.array([int(r["label"]) for r in rows])
    p = np.array([[float(r[f"prob_{c}"]) for c in CLASSES] for r in rows])
    return rows, y, p


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import os

    from momkd.config import load_config
    from momkd.synth import generate_cohort
    from momkd.train import train

    os.environ["MOMKD_PROGRESS"] = "0"
    root = tmp_path_factory.mktemp("multiclass")
    data = root / "data"
    generate_cohort(
        data, patients=48, external=12, dim=32, genes=30, patches=16, seed=3, progress=False
    )
    (root / "run.yaml").write_text(CONFIG.format(data=data))
    out = {}
    for method in ("meanpool", "momkd"):
        cfg = load_config(
            root / "run.yaml",
            [f"model.method={method}"]
            + ([f"splits.dir={out['meanpool'] / 'splits'}"] if out else []),
        )
        train(cfg, root / method, progress=False)
        out[method] = root / method
    return out


@pytest.mark.parametrize("method", ["meanpool", "momkd"])
def test_fold_predictions_and_metrics(runs: dict[str, Path], method: str) -> None:
    for k in (0, 1):
        fold = runs[method] / f"fold_{k}"
        rows, y, p = _read(fold / "test_predictions.csv")
        assert list(rows[0])[:8] == [
            "slide_id",
            "case_id",
            "label",
            *[f"prob_{c}" for c in CLASSES],
            "pred",
        ]
        np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-6)
        assert [int(r["pred"]) for r in rows] == np.argmax(p, axis=1).tolist()
        test = json.loads((fold / "result.json").read_text())["test"]
        pred = np.argmax(p, axis=1)
        assert test["auc"] == pytest.approx(_macro_auc(y, p), abs=1e-9)
        for c, name in enumerate(CLASSES):
            assert test[f"auc_{name}"] == pytest.approx(roc_auc_score(y == c, p[:, c]), abs=1e-9)
        assert test["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
        assert test["f1"] == pytest.approx(f1_score(y, pred, average="macro"))
        assert test["confusion"] == confusion_matrix(y, pred, labels=range(4)).tolist()
        history = json.loads((fold / "history.json").read_text())
        if method == "momkd":
            assert {f"mem_c{c}_usage" for c in range(4)} <= set(history[-1])


@pytest.mark.parametrize("method", ["meanpool", "momkd"])
def test_pooled_summary_and_external_ensemble(runs: dict[str, Path], method: str) -> None:
    run = runs[method]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["classes"] == CLASSES
    ys, ps = zip(*(_read(run / f"fold_{k}" / "test_predictions.csv")[1:] for k in (0, 1)))
    y, p = np.concatenate(ys), np.concatenate(ps)
    assert summary["pooled"]["auc"] == pytest.approx(_macro_auc(y, p), abs=1e-9)
    low, high = summary["ci"]["auc"]
    assert low <= summary["pooled"]["auc"] <= high
    ens_rows, y_ext, p_ext = _read(run / "external_predictions.csv")
    folds = [_read(run / f"fold_{k}" / "external_predictions.csv") for k in (0, 1)]
    order = [r["slide_id"] for r in ens_rows]
    for rows, _, pf in folds:
        assert [r["slide_id"] for r in rows] == order
    np.testing.assert_allclose(p_ext, np.mean([pf for _, _, pf in folds], axis=0), atol=1e-9)
    assert summary["external"]["ensemble"]["auc"] == pytest.approx(_macro_auc(y_ext, p_ext))
    text = (run / "summary.txt").read_text()
    assert "confusion matrix" in text and "auc_Basal" in text


def test_report_and_comparison(runs: dict[str, Path], tmp_path: Path) -> None:
    from momkd.compare import summarise_runs
    from momkd.report import write_report

    html = write_report(runs["momkd"]).read_text()
    assert "confusion.png" in html or "Confusion matrix" in html
    assert (runs["momkd"] / "report" / "roc_classes.png").is_file()
    result = summarise_runs(
        {"meanpool": runs["meanpool"], "momkd": runs["momkd"]}, tmp_path / "cmp", resamples=100
    )
    pair: dict[str, Any] = result["paired"][0]
    p_by: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, run in runs.items():
        parts = [_read(run / f"fold_{k}" / "test_predictions.csv") for k in (0, 1)]
        ids = [r["slide_id"] for rows, _, _ in parts for r in rows]
        order = np.argsort(ids)
        p_by[name] = (
            np.concatenate([y for _, y, _ in parts])[order],
            np.concatenate([p for _, _, p in parts])[order],
        )
    y = p_by["meanpool"][0]
    want = _macro_auc(y, p_by["meanpool"][1]) - _macro_auc(y, p_by["momkd"][1])
    assert pair["a"] == "meanpool" and pair["auc_diff"] == pytest.approx(want, abs=1e-9)
    assert pair["ci_low"] <= pair["auc_diff"] <= pair["ci_high"]
    assert 0.0 <= pair["p_value"] <= 1.0
    assert result["classes"] == CLASSES
    assert (tmp_path / "cmp" / "comparison" / "roc.png").is_file()


def test_eval_and_predict_on_the_external_cohort(runs: dict[str, Path], tmp_path: Path) -> None:
    from momkd.train.evaluate import evaluate_run, predict

    run = runs["momkd"]
    data = Path(json.loads((run / "data.json").read_text())["store"]).parent
    result = evaluate_run(
        run, data / "external.zarr", data / "external_clinical.csv", out=tmp_path / "ev"
    )
    rows = list(csv.DictReader((tmp_path / "ev" / "predictions.csv").open()))
    y = np.array([int(r["label"]) for r in rows])
    ens = np.array([[float(r[f"prob_{c}"]) for c in CLASSES] for r in rows])
    folds = [
        np.array([[float(r[f"prob_fold{k}_{c}"]) for c in CLASSES] for r in rows]) for k in (0, 1)
    ]
    np.testing.assert_allclose(ens, np.mean(folds, axis=0), atol=1e-12)
    assert [int(r["pred"]) for r in rows] == np.argmax(ens, axis=1).tolist()
    assert result["classes"] == CLASSES
    assert result["ensemble"]["auc"] == pytest.approx(_macro_auc(y, ens))
    for k, p in enumerate(folds):
        assert result["folds"][k]["auc"] == pytest.approx(_macro_auc(y, p))
    # The run's own external fold predictions are the same model on the same slides.
    _, _, p_run = _read(run / "fold_0" / "external_predictions.csv")
    np.testing.assert_allclose(folds[0], p_run, atol=1e-6)
    n = predict(run, data / "external.zarr", tmp_path / "pred.csv")
    header = (tmp_path / "pred.csv").read_text().splitlines()[0].split(",")
    assert n == len(rows) and header[-5:] == [*[f"prob_{c}" for c in CLASSES], "pred"]


def test_report_with_an_eval_cohort_holding_two_of_the_classes(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    from momkd.report import write_report
    from momkd.train.evaluate import evaluate_run

    run = runs["meanpool"]
    data = Path(json.loads((run / "data.json").read_text())["store"]).parent
    rows = list(csv.DictReader((data / "external_clinical.csv").open()))
    kept = [r for r in rows if r["subtype"] in ("LumA", "Basal")]
    with (tmp_path / "two.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(kept)
    result = evaluate_run(run, data / "external.zarr", tmp_path / "two.csv", out=run / "eval_two")
    assert result["ensemble"]["n_LumB"] == 0 and "n_pos" not in result
    html = write_report(run).read_text()
    assert "eval_two" in html
    assert (run / "report" / "eval_two_roc_classes.png").is_file()
    assert not (run / "report" / "eval_two_roc_pr.png").exists()
