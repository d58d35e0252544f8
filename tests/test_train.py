"""End-to-end cross-validated training on a tiny synthetic cohort (momkd.train.runner/loop)."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from momkd.config import load_config
from momkd.train.sampler import ClassBalancedSampler
from sklearn.feature_selection import f_classif
from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score

LABEL = "pr"
K_MEM = 2

CONFIG = f"""
data:
  store: cohort.zarr
  clinical: clinical.csv
  expression: expression.csv
  label_column: {LABEL}
  positive: [Positive]
  negative: [Negative]
  external: {{store: external.zarr, clinical: external_clinical.csv}}
splits: {{k: 2, seed: 3}}
genomics: {{n_genes: 12}}
model: {{hidden: 16, omics_width: 16, omics_hidden: 16, sphere: 8, memory_k: {K_MEM},
        classifier_hidden: 8, attention_dim: 8}}
memory: {{init_per_class: 400}}
train: {{epochs: 2, min_epochs: 1, patience: 2, seed: 1, bootstrap: 50}}
"""


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from momkd.synth import generate_cohort

    root = tmp_path_factory.mktemp("cohort")
    generate_cohort(
        root, patients=28, external=8, dim=32, genes=40, patches=16, seed=5, progress=False
    )
    (root / "run.yaml").write_text(CONFIG)
    return root


@pytest.fixture(scope="module")
def run(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    from momkd.train.runner import train

    out = tmp_path_factory.mktemp("run") / "momkd"
    summary = train(load_config(cohort / "run.yaml"), out_dir=out, progress=False)
    return out, summary


def test_summary_structure_and_values_match_prediction_csvs(run: tuple[Path, dict]) -> None:
    out, summary = run
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["mean"] == summary["mean"]
    assert (out / "summary.txt").read_text().startswith("momkd run: method momkd")
    assert (out / "config.yaml").is_file()
    assert len(summary["folds"]) == 2
    aucs = []
    for k, fold in enumerate(summary["folds"]):
        assert set(fold) >= {"val", "test", "threshold", "best_epoch", "external"}
        rows = _read_csv(out / f"fold_{k}" / "test_predictions.csv")
        assert list(rows[0]) == ["slide_id", "case_id", "label", "prob", "pred", "pred_thr"]
        y = np.array([int(r["label"]) for r in rows])
        p = np.array([float(r["prob"]) for r in rows])
        assert fold["test"]["auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
        assert fold["test"]["n"] == len(rows)
        pred = np.array([int(r["pred"]) for r in rows])
        np.testing.assert_array_equal(pred, (p > 0.5).astype(int))
        assert fold["test"]["accuracy"] == pytest.approx(accuracy_score(y, pred))
        pred_thr = np.array([int(r["pred_thr"]) for r in rows])
        np.testing.assert_array_equal(pred_thr, (p > fold["threshold"]).astype(int))
        assert fold["test"]["thr_balanced_accuracy"] == pytest.approx(
            balanced_accuracy_score(y, pred_thr)
        )
        vrows = _read_csv(out / f"fold_{k}" / "val_predictions.csv")
        yv = np.array([int(r["label"]) for r in vrows])
        pv = np.array([float(r["prob"]) for r in vrows])
        assert fold["val"]["auc"] == pytest.approx(roc_auc_score(yv, pv), abs=1e-12)
        assert fold["test"]["auc_ci_low"] <= fold["test"]["auc_ci_high"]
        aucs.append(roc_auc_score(y, p))
    assert summary["mean"]["auc"] == pytest.approx(np.mean(aucs))
    assert summary["std"]["auc"] == pytest.approx(np.std(aucs, ddof=1))


def test_external_per_fold_and_ensemble(run: tuple[Path, dict], cohort: Path) -> None:
    out, summary = run
    ext = summary["external"]
    probs = []
    for k in range(2):
        rows = _read_csv(out / f"fold_{k}" / "external_predictions.csv")
        y = np.array([int(r["label"]) for r in rows])
        p = np.array([float(r["prob"]) for r in rows])
        assert ext["folds"][k]["auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
        assert summary["folds"][k]["external"]["auc"] == ext["folds"][k]["auc"]
        probs.append(p)
    ens = _read_csv(out / "external_predictions.csv")
    p_ens = np.array([float(r["prob"]) for r in ens])
    np.testing.assert_allclose(p_ens, np.mean(probs, axis=0), rtol=1e-12)
    assert ext["ensemble"]["auc"] == pytest.approx(roc_auc_score(y, p_ens), abs=1e-12)
    assert ext["mean"]["auc"] == pytest.approx(np.mean([f["auc"] for f in ext["folds"]]))
    # The external slides are exactly the mapped rows of the external clinical table.
    clin = _read_csv(cohort / "external_clinical.csv")
    mapped = [r["slide_id"] for r in clin if r[LABEL] in ("Positive", "Negative")]
    assert [r["slide_id"] for r in ens] == mapped


def test_unmapped_labels_excluded_and_counted(run: tuple[Path, dict], cohort: Path) -> None:
    _, summary = run
    rows = _read_csv(cohort / "clinical.csv")
    mapped = [r for r in rows if r[LABEL] in ("Positive", "Negative")]
    unmapped = Counter(r[LABEL] for r in rows if r[LABEL] not in ("Positive", "Negative"))
    assert unmapped, "the synthetic cohort should contain unmapped label values"
    data = summary["data"]
    assert data["excluded"] == dict(unmapped)
    assert data["n_excluded"] == sum(unmapped.values())
    assert data["slides"] == len(mapped)
    assert data["positive"] == sum(r[LABEL] == "Positive" for r in mapped)
    assert data["patients"] == len({r["case_id"] for r in mapped})
    # No excluded slide appears in any split or prediction.
    excluded_ids = {r["slide_id"] for r in rows} - {r["slide_id"] for r in mapped}
    out = Path(summary["run_dir"])
    for k in range(2):
        split_ids = {v for r in _read_csv(out / "splits" / f"splits_{k}.csv") for v in r.values()}
        assert not excluded_ids & split_ids


def test_splits_are_patient_level_and_match_predictions(
    run: tuple[Path, dict], cohort: Path
) -> None:
    out, _ = run
    case_of = {r["slide_id"]: r["case_id"] for r in _read_csv(cohort / "clinical.csv")}
    tested: list[str] = []
    for k in range(2):
        rows = _read_csv(out / "splits" / f"splits_{k}.csv")
        sets = {c: {r[c] for r in rows if r[c]} for c in ("train", "val", "test")}
        cases = {c: {case_of[s] for s in ids} for c, ids in sets.items()}
        assert not cases["train"] & cases["val"]
        assert not cases["train"] & cases["test"]
        assert not cases["val"] & cases["test"]
        tested.extend(sets["test"])
        preds = {r["slide_id"] for r in _read_csv(out / f"fold_{k}" / "test_predictions.csv")}
        assert preds == sets["test"]
        vpreds = {r["slide_id"] for r in _read_csv(out / f"fold_{k}" / "val_predictions.csv")}
        assert vpreds == sets["val"]
    assert len(tested) == len(set(tested))


def test_genomics_fitted_on_fold_training_patients_only(
    run: tuple[Path, dict], cohort: Path
) -> None:
    out, _ = run
    clin = {r["slide_id"]: r for r in _read_csv(cohort / "clinical.csv")}
    with open(cohort / "expression.csv", newline="") as fh:
        reader = csv.reader(fh)
        genes = next(reader)[1:]
        table = {row[0]: np.array(row[1:], dtype=np.float64) for row in reader}
    for k in range(2):
        ckpt = torch.load(out / f"fold_{k}" / "best.pt", weights_only=True)
        state = ckpt["genomics"]
        train_slides = [
            r["train"] for r in _read_csv(out / "splits" / f"splits_{k}.csv") if r["train"]
        ]
        cases = list(dict.fromkeys(clin[s]["case_id"] for s in train_slides))
        y = np.array(
            [
                int(
                    clin[next(s for s in train_slides if clin[s]["case_id"] == c)][LABEL]
                    == "Positive"
                )
                for c in cases
            ]
        )
        x = np.log2(np.stack([table[c] for c in cases]) + 1.0)
        mean, std = x.mean(0), x.std(0)
        std[std == 0] = 1.0
        f, _ = f_classif((x - mean) / std, y)
        top = np.sort(np.argsort(-f, kind="stable")[:12])
        assert state["gene_names"] == [genes[i] for i in top]
        np.testing.assert_allclose(state["mean"], mean[top], rtol=1e-10)
        np.testing.assert_allclose(state["std"], std[top], rtol=1e-10)
        # Fitting on all patients would give different statistics (the test is not vacuous).
        x_all = np.log2(np.stack(list(table.values())) + 1.0)
        assert not np.allclose(x_all.mean(0)[top], mean[top])


def test_checkpoints_load_with_weights_only(run: tuple[Path, dict]) -> None:
    from momkd.train.factory import build_model

    out, _ = run
    for name in ("best.pt", "last.pt"):
        ckpt = torch.load(out / "fold_0" / name, weights_only=True)
        assert ckpt["format"] == "momkd-checkpoint"
        assert ckpt["method"] == "momkd"
        model = build_model(ckpt["model_config"])
        model.load_state_dict(ckpt["model"])
    last = torch.load(out / "fold_0" / "last.pt", weights_only=True)
    assert {"optimizer", "sampler", "rng", "monitor", "history"} <= set(last)
    assert last["epoch"] == len(last["history"]) == 2
    assert isinstance(last["rng"]["torch"], torch.Tensor)


def test_history_records_losses_timing_and_memory_usage(run: tuple[Path, dict]) -> None:
    out, summary = run
    hist = json.loads((out / "fold_0" / "history.json").read_text())
    assert [h["epoch"] for h in hist] == [0, 1]
    for h in hist:
        for key in (
            "train_loss",
            "train_ce",
            "train_mem",
            "train_align_omics",
            "train_align_wsi",
            "train_mse",
            "val_auc",
            "val_loss",
            "lr",
            "tau",
            "seconds",
            "loader_wait_s",
            "loader_wait_share",
        ):
            assert key in h, key
        assert 0.0 <= h["loader_wait_share"] <= 1.0
        assert h["tau"] == pytest.approx(0.2, rel=0.2)
        for mem in ("pos", "neg"):
            usage = np.array(h[f"mem_{mem}_usage"])
            assert usage.shape == (K_MEM,)
            assert usage.sum() == pytest.approx(1.0)
            assert h[f"mem_{mem}_active_ratio"] == pytest.approx(np.mean(usage > 0))
            nz = usage[usage > 0]
            assert h[f"mem_{mem}_perplexity"] == pytest.approx(np.exp(-(nz * np.log(nz)).sum()))
    best = summary["folds"][0]["best_epoch"]
    assert hist[best]["best"] is True
    assert summary["folds"][0]["val"]["auc"] == pytest.approx(hist[best]["val_auc"])
    header = _read_csv(out / "fold_0" / "history.csv")
    assert len(header) == 2


def test_predict_needs_no_expression(
    run: tuple[Path, dict], cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from momkd.data import clinical
    from momkd.train.evaluate import predict

    def no_expression(*args: object, **kwargs: object) -> None:
        raise AssertionError("predict must not read expression")

    monkeypatch.setattr(clinical, "load_expression", no_expression)
    out, _ = run
    test0 = {
        r["slide_id"]: float(r["prob"]) for r in _read_csv(out / "fold_0" / "test_predictions.csv")
    }
    dest = tmp_path / "p.csv"
    n = predict(out, store=cohort / "cohort.zarr", out=dest, slides=sorted(test0), progress=False)
    assert n == len(test0)
    rows = _read_csv(dest)
    assert list(rows[0]) == [
        "slide_id",
        "prob_pos_fold0",
        "prob_pos_fold1",
        "prob_pos",
        "pred",
        "pred_thr",
    ]
    # pred: the argmax rule; pred_thr: the mean of the folds' validation F1 thresholds, read here
    # from the folds' result.json independently of the code under test.
    thr = np.mean(
        [json.loads((out / f"fold_{f}" / "result.json").read_text())["threshold"] for f in (0, 1)]
    )
    for r in rows:
        assert float(r["prob_pos_fold0"]) == pytest.approx(test0[r["slide_id"]], abs=1e-6)
        mean = (float(r["prob_pos_fold0"]) + float(r["prob_pos_fold1"])) / 2
        assert float(r["prob_pos"]) == pytest.approx(mean)
        assert int(r["pred"]) == int(mean > 0.5)
        assert int(r["pred_thr"]) == int(mean > thr)

    # Hand-set thresholds on a copy of the run: their mean is the median ensemble probability,
    # so pred_thr splits the slides in half whatever pred says.
    import shutil

    copy = tmp_path / "run_copy"
    shutil.copytree(out, copy)
    probs = sorted(float(r["prob_pos"]) for r in rows)
    mid = (probs[len(probs) // 2 - 1] + probs[len(probs) // 2]) / 2
    for f, t in ((0, mid - 0.01), (1, mid + 0.01)):
        path = copy / f"fold_{f}" / "result.json"
        result = json.loads(path.read_text())
        result["threshold"] = t
        path.write_text(json.dumps(result))
    predict(copy, store=cohort / "cohort.zarr", out=dest, slides=sorted(test0), progress=False)
    again = _read_csv(dest)
    assert [int(r["pred_thr"]) for r in again] == [int(float(r["prob_pos"]) > mid) for r in again]
    assert sum(int(r["pred_thr"]) for r in again) == len(again) - len(again) // 2
    assert [r["pred"] for r in again] == [r["pred"] for r in rows]


def test_evaluate_run_matches_training_external_metrics(
    run: tuple[Path, dict], cohort: Path, tmp_path: Path
) -> None:
    from momkd.train.evaluate import evaluate_run, format_eval

    out, summary = run
    res = evaluate_run(
        out,
        store=cohort / "external.zarr",
        clinical=cohort / "external_clinical.csv",
        out=tmp_path / "ev",
        progress=False,
    )
    for k in range(2):
        assert res["folds"][k]["auc"] == pytest.approx(
            summary["external"]["folds"][k]["auc"], abs=1e-6
        )
    assert res["ensemble"]["auc"] == pytest.approx(summary["external"]["ensemble"]["auc"], abs=1e-6)
    rows = _read_csv(tmp_path / "ev" / "predictions.csv")
    y = np.array([int(r["label"]) for r in rows])
    p = np.array([float(r["prob_pos"]) for r in rows])
    assert res["ensemble"]["auc"] == pytest.approx(roc_auc_score(y, p))
    assert "ensemble" in format_eval(res)


# ------------------------------------------------------------------------------------- sampler


def test_sampler_is_class_balanced_deterministic_and_shardable() -> None:
    labels = np.array([1] * 5 + [0] * 45)
    s = ClassBalancedSampler(labels, seed=7)
    assert len(s) == 50
    draws = np.concatenate([s.global_indices(e) for e in range(200)])
    assert np.mean(labels[draws]) == pytest.approx(0.5, abs=0.02)
    np.testing.assert_array_equal(
        s.global_indices(3), ClassBalancedSampler(labels, seed=7).global_indices(3)
    )
    assert not np.array_equal(s.global_indices(3), s.global_indices(4))
    for world in (1, 2, 3, 4):
        shards = [
            ClassBalancedSampler(labels, seed=7, rank=r, world_size=world) for r in range(world)
        ]
        for sh in shards:
            sh.set_epoch(5)
        parts = [sh.indices() for sh in shards]
        assert len({len(p) for p in parts}) == 1
        merged = np.empty(sum(len(p) for p in parts), dtype=np.int64)
        for r, p in enumerate(parts):
            merged[r::world] = p
        full = ClassBalancedSampler(labels, seed=7).global_indices(5)
        np.testing.assert_array_equal(merged[: len(full)], full)
    plain = ClassBalancedSampler(labels, seed=7, balanced=False)
    assert sorted(plain.indices(2)) == list(range(50))


def test_sampler_state_round_trip() -> None:
    s = ClassBalancedSampler([0, 1, 1, 0, 1], seed=2)
    s.set_epoch(9)
    t = ClassBalancedSampler([0, 1, 1, 0, 1], seed=2)
    t.load_state_dict(s.state_dict())
    assert t.indices() == s.indices()
    from momkd.errors import ConfigError

    with pytest.raises(ConfigError, match="seed"):
        ClassBalancedSampler([0, 1, 1, 0, 1], seed=3).load_state_dict(s.state_dict())


def test_pooled_ci_and_patient_level_from_prediction_csvs(
    run: tuple[Path, dict], cohort: Path
) -> None:
    from collections import defaultdict

    from momkd.metrics import bootstrap_auc_ci

    out, summary = run
    rows = [r for k in range(2) for r in _read_csv(out / f"fold_{k}" / "test_predictions.csv")]
    y = np.array([int(r["label"]) for r in rows])
    p = np.array([float(r["prob"]) for r in rows])
    assert summary["pooled"]["auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert summary["pooled"]["n"] == len(rows)
    ci = summary["ci"]
    assert ci["resamples"] == 2000 and ci["seed"] == 1 and ci["level"] == 0.95
    assert ci["auc"] == pytest.approx(list(bootstrap_auc_ci(y, p, n=2000, seed=1)))
    assert ci["auc"][0] <= summary["pooled"]["auc"] <= ci["auc"][1]

    # Patient level: mean slide probability per patient, by hand, per fold and pooled.
    def by_patient(rs: list[dict[str, str]]) -> tuple[np.ndarray, np.ndarray]:
        acc: dict[str, list[tuple[int, float]]] = defaultdict(list)
        for r in rs:
            acc[r["case_id"]].append((int(r["label"]), float(r["prob"])))
        ys = np.array([v[0][0] for v in acc.values()])
        ps = np.array([np.mean([q for _, q in v]) for v in acc.values()])
        return ys, ps

    patient = summary["patient"]
    per_fold = []
    for k in range(2):
        yk, pk = by_patient(_read_csv(out / f"fold_{k}" / "test_predictions.csv"))
        fold = patient["folds"][k]["test"]
        assert fold["n"] == len(yk)
        assert fold["auc"] == pytest.approx(roc_auc_score(yk, pk), abs=1e-12)
        thr = summary["folds"][k]["threshold"]
        assert fold["thr_balanced_accuracy"] == pytest.approx(
            balanced_accuracy_score(yk, (pk > thr).astype(int))
        )
        per_fold.append(fold["auc"])
    assert patient["mean"]["auc"] == pytest.approx(np.mean(per_fold))
    yp, pp = by_patient(rows)
    assert len(yp) < len(rows), "the cohort should contain two-slide patients"
    assert patient["pooled"]["auc"] == pytest.approx(roc_auc_score(yp, pp), abs=1e-12)
    assert patient["ci"]["auc"][0] <= patient["pooled"]["auc"] <= patient["ci"]["auc"][1]

    ens = _read_csv(out / "external_predictions.csv")
    ye = np.array([int(r["label"]) for r in ens])
    pe = np.array([float(r["prob"]) for r in ens])
    assert summary["external"]["ci"]["auc"] == pytest.approx(
        list(bootstrap_auc_ci(ye, pe, n=2000, seed=1))
    )
    ype, ppe = by_patient(ens)
    assert patient["external"]["ensemble"]["auc"] == pytest.approx(roc_auc_score(ype, ppe))

    text = (out / "summary.txt").read_text()
    assert "pooled test predictions" in text and "95% CI" in text and "patient level" in text


def test_report_shows_pooled_cis_and_patient_level(run: tuple[Path, dict]) -> None:
    import re

    from momkd.report import write_report

    out, summary = run
    text = write_report(out).read_text()
    cells = {
        (fold, metric): float(value)
        for fold, metric, value in re.findall(
            r'data-table="pooled" data-fold="([^"]+)" data-metric="([^"]+)" '
            r'data-value="([^"]+)"',
            text,
        )
    }
    patient = summary["patient"]
    expected = {
        ("test, slides", "auc"): summary["pooled"]["auc"],
        ("test, slides", "auc_ci_low"): summary["ci"]["auc"][0],
        ("test, slides", "auc_ci_high"): summary["ci"]["auc"][1],
        ("test, patients", "auc"): patient["pooled"]["auc"],
        ("test, patients", "n"): patient["pooled"]["n"],
        ("test, patients", "auc_ci_low"): patient["ci"]["auc"][0],
        ("external ensemble, slides", "auc_ci_high"): summary["external"]["ci"]["auc"][1],
        ("external ensemble, patients", "auc"): patient["external"]["ensemble"]["auc"],
    }
    for key, value in expected.items():
        assert cells[key] == pytest.approx(value), key
    # The per-fold patient-level table.
    assert 'data-table="patient" data-fold="fold 1" data-metric="auc"' in text
