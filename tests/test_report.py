"""Run report: calibration helpers, figures, HTML tables equal to summary.json, browser rendering."""

from __future__ import annotations

import base64
import csv
import io
import json
import math
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
from momkd.errors import MomkdError
from momkd.report import (
    calibration_bins,
    expected_calibration_error,
    read_predictions,
    write_report,
)
from sklearn.calibration import calibration_curve
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    brier_score_loss,
    f1_score,
    recall_score,
    roc_auc_score,
)

METRICS = ("auc", "auprc", "accuracy", "balanced_accuracy", "f1", "sensitivity", "specificity")
K = 4


def sk_metrics(y: np.ndarray, p: np.ndarray, thr: float = 0.5) -> dict[str, float]:
    pred = (p > thr).astype(int)
    return {
        "auc": roc_auc_score(y, p),
        "auprc": average_precision_score(y, p),
        "accuracy": accuracy_score(y, pred),
        "balanced_accuracy": balanced_accuracy_score(y, pred),
        "f1": f1_score(y, pred, average="macro"),
        "sensitivity": recall_score(y, pred, pos_label=1),
        "specificity": recall_score(y, pred, pos_label=0),
        "n": len(y),
        "n_pos": int(y.sum()),
    }


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


def make_run(root: Path, folds: int = 3, external: bool = True) -> Path:
    """A run directory in the layout `momkd train` writes, with metrics computed by sklearn."""
    rng = np.random.default_rng(3)
    run = root / "run"
    run.mkdir()
    (run / "config.yaml").write_text(
        "# resolved configuration\nmodel:\n  method: momkd\n  hidden: 16\ntrain:\n  epochs: 8\n"
    )
    results, ext_probs = [], []
    y_ext = rng.integers(0, 2, size=30)
    for f in range(folds):
        d = run / f"fold_{f}"
        y = np.r_[np.zeros(12, int), np.ones(8, int)]
        p = np.clip(0.3 + 0.35 * y + rng.normal(0, 0.2, size=20), 0.01, 0.99)
        yv = np.r_[np.zeros(5, int), np.ones(5, int)]
        pv = np.clip(0.35 + 0.3 * yv + rng.normal(0, 0.2, size=10), 0.01, 0.99)
        thr = 0.45
        test = sk_metrics(y, p)
        at_thr = sk_metrics(y, p, thr)
        test |= {f"thr_{k}": at_thr[k] for k in METRICS[2:]} | {"threshold": thr}
        write_csv(
            d / "test_predictions.csv",
            ["slide_id", "case_id", "label", "prob", "pred", "pred_thr"],
            [
                [
                    f"f{f}_s{i}",
                    f"c{f}_{i}",
                    int(y[i]),
                    float(p[i]),
                    int(p[i] > 0.5),
                    int(p[i] > thr),
                ]
                for i in range(20)
            ],
        )
        result = {
            "fold": f,
            "val": sk_metrics(yv, pv) | {"loss": 0.6},
            "test": test,
            "threshold": thr,
            "best_epoch": 5,
            "epochs": 8,
        }
        if external:
            pe = np.clip(0.35 + 0.25 * y_ext + rng.normal(0, 0.25, size=30), 0.01, 0.99)
            ext_probs.append(pe)
            result["external"] = sk_metrics(y_ext, pe)
            write_csv(
                d / "external_predictions.csv",
                ["slide_id", "case_id", "label", "prob", "pred", "pred_thr"],
                [
                    [
                        f"e{i}",
                        f"ec{i}",
                        int(y_ext[i]),
                        float(pe[i]),
                        int(pe[i] > 0.5),
                        int(pe[i] > thr),
                    ]
                    for i in range(30)
                ],
            )
        results.append(result)
        history = []
        for e in range(8):
            row = {
                "epoch": e,
                "train_loss": 1.2 * 0.8**e,
                "train_ce": 0.7 * 0.85**e,
                "train_mem": 0.3 * 0.9**e,
                "train_align_wsi": 0.5 - 0.03 * e,
                "train_seconds": 1.0,
                "loader_wait_s": 0.01,
                "loader_wait_share": 0.01,
                "steps": 20,
                "val_auc": 0.6 + 0.03 * e,
                "val_loss": 0.7 - 0.02 * e,
                "val_seconds": 0.2,
                "lr": 2e-4 if e < 5 else 4e-5,
                "tau": 0.2 - 0.005 * e,
                "best": e == 5,
                "seconds": 1.3,
            }
            for name in ("pos", "neg"):
                c = rng.integers(0, 6, size=K) + 1
                u = c / c.sum()
                row[f"mem_{name}_usage"] = u.tolist()
                row[f"mem_{name}_active_ratio"] = float(np.mean(u > 0))
                row[f"mem_{name}_perplexity"] = float(np.exp(-(u * np.log(u)).sum()))
            history.append(row)
        (d / "history.json").write_text(json.dumps(history))
    tests = [r["test"] for r in results]
    keys = [k for k in tests[0]]
    summary = {
        "method": "momkd",
        "folds": results,
        "mean": {k: float(np.mean([t[k] for t in tests])) for k in keys},
        "std": {k: float(np.std([t[k] for t in tests], ddof=1)) for k in keys},
        "val_mean": {k: float(np.mean([r["val"][k] for r in results])) for k in METRICS},
        "val_std": {k: float(np.std([r["val"][k] for r in results], ddof=1)) for k in METRICS},
        "data": {
            "slides": 60,
            "patients": 55,
            "positive": 24,
            "negative": 36,
            "excluded": {"Equivocal": 4, "[Not Available]": 2},
            "n_excluded": 6,
        },
        "timing": {"seconds": 12.5, "device": "cpu"},
    }
    if external:
        per = [r["external"] for r in results]
        pe = np.mean(ext_probs, axis=0)
        summary["external"] = {
            "folds": per,
            "mean": {k: float(np.mean([m[k] for m in per])) for k in METRICS},
            "std": {k: float(np.std([m[k] for m in per], ddof=1)) for k in METRICS},
            "ensemble": sk_metrics(y_ext, pe),
        }
        write_csv(
            run / "external_predictions.csv",
            ["slide_id", "case_id", "label"]
            + [f"prob_fold{f}" for f in range(folds)]
            + ["prob", "pred"],
            [
                [f"e{i}", f"ec{i}", int(y_ext[i])]
                + [float(q[i]) for q in ext_probs]
                + [float(pe[i]), int(pe[i] > 0.5)]
                for i in range(30)
            ],
        )
    (run / "summary.json").write_text(json.dumps(summary))
    return run


class Cells(HTMLParser):
    """Collects metric cells (data-* attributes and text), images and external references."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: dict[tuple[str, str, str], dict] = {}
        self.images: list[str] = []
        self.external: list[str] = []
        self.details = 0
        self._cur: dict | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "td" and "data-metric" in a:
            self._cur = {"attrs": a, "text": ""}
            self.cells[(a["data-table"], a["data-fold"], a["data-metric"])] = self._cur
        if tag == "img":
            self.images.append(a.get("src", ""))
        if tag == "details":
            self.details += 1
        for key in ("src", "href"):
            v = a.get(key) or ""
            if v and not v.startswith(("data:", "#")):
                self.external.append(v)
        if tag in ("script", "link", "iframe"):
            self.external.append(tag)

    def handle_data(self, data):
        if self._cur is not None:
            self._cur["text"] += data

    def handle_endtag(self, tag):
        if tag == "td":
            self._cur = None


def assert_not_blank_image(img: np.ndarray) -> None:
    rgb = img[..., :3].reshape(-1, 3).astype(np.float64)
    if rgb.max() > 1.5:
        rgb = rgb / 255.0
    assert rgb.std() > 0.01
    differs = np.any(np.abs(rgb - rgb[0]) > 0.02, axis=1)
    assert differs.mean() > 0.01


# ---------------------------------------------------------------------------------- helpers


def test_calibration_bins_match_sklearn():
    rng = np.random.default_rng(0)
    p = rng.random(200)
    p[:5] = [0.1, 0.2, 0.5, 0.0, 1.0]  # bin edges
    y = (rng.random(200) < p).astype(int)
    mean_pred, frac, count = calibration_bins(y, p, 10)
    sk_frac, sk_mean = calibration_curve(y, p, n_bins=10, strategy="uniform")
    np.testing.assert_allclose(frac, sk_frac)
    np.testing.assert_allclose(mean_pred, sk_mean)
    assert count.sum() == 200


def test_expected_calibration_error_by_hand():
    y = np.array([0, 1, 1, 0])
    p = np.array([0.05, 0.15, 0.95, 0.85])
    # bins: [0, .1): {0.05} -> |0 - .05|; [.1, .2): {.15} -> |1 - .15|; [.8, .9): {.85} -> |0 - .85|;
    # [.9, 1]: {.95} -> |1 - .95|; each with weight 1/4
    assert expected_calibration_error(y, p) == pytest.approx((0.05 + 0.85 + 0.85 + 0.05) / 4)
    perfect_y = np.r_[np.zeros(9), np.ones(1)]
    assert expected_calibration_error(perfect_y, np.full(10, 0.1)) == pytest.approx(0.0)


def test_read_predictions(tmp_path):
    write_csv(
        tmp_path / "p.csv",
        ["slide_id", "case_id", "label", "prob", "pred"],
        [["a", "x", 1, 0.9, 1], ["b", "y", "", 0.2, 0]],
    )
    d = read_predictions(tmp_path / "p.csv")
    assert d["slide_id"].tolist() == ["a", "b"]
    assert d["label"].tolist() == [1, -1]
    np.testing.assert_allclose(d["prob"], [0.9, 0.2])


# ----------------------------------------------------------------------------------- report


def test_report_tables_equal_summary(tmp_path):
    run = make_run(tmp_path)
    path = write_report(run)
    assert path == run / "report.html"
    text = path.read_text()
    parser = Cells()
    parser.feed(text)
    summary = json.loads((run / "summary.json").read_text())
    for i, fold in enumerate(summary["folds"]):
        for table, part, keys in (
            ("test", "test", METRICS),
            ("test_threshold", "test", ("threshold", "thr_accuracy", "thr_f1", "thr_sensitivity")),
            ("val", "val", METRICS),
            ("external", "external", METRICS),
        ):
            for k in keys:
                cell = parser.cells[(table, f"fold {i}", k)]
                expected = fold[part][k]
                assert float(cell["attrs"]["data-value"]) == expected
                assert cell["text"] == f"{expected:.4f}"
    for table, mean, std in (("test", "mean", "std"), ("val", "val_mean", "val_std")):
        for k in METRICS:
            cell = parser.cells[(table, "mean", k)]
            assert float(cell["attrs"]["data-value"]) == summary[mean][k]
            assert float(cell["attrs"]["data-std"]) == summary[std][k]
            assert cell["text"] == f"{summary[mean][k]:.4f} ± {summary[std][k]:.4f}"
    ext = summary["external"]
    for k in METRICS:
        assert float(parser.cells[("external", "mean", k)]["attrs"]["data-value"]) == ext["mean"][k]
        cell = parser.cells[("external", "fold ensemble", k)]
        assert float(cell["attrs"]["data-value"]) == ext["ensemble"][k]
    # data summary with excluded label counts, collapsible config
    assert "Equivocal" in text and "[Not Available]" in text
    assert parser.details == 1 and "resolved configuration" in text
    # self-contained: every image is an embedded, non-blank PNG; no external resource
    assert parser.external == []
    assert len(parser.images) >= 6  # ROC/PR, calibration, 3 training, 3 memory, external
    for src in parser.images:
        assert src.startswith("data:image/png;base64,")
        img = mpimg.imread(io.BytesIO(base64.b64decode(src.split(",", 1)[1])), format="png")
        assert_not_blank_image(img)
    pngs = sorted(p.name for p in (run / "report").glob("*.png"))
    assert {
        "roc_pr.png",
        "calibration.png",
        "training_fold_0.png",
        "memory_fold_2.png",
        "external_roc_pr.png",
    } <= set(pngs)


def test_report_calibration_numbers(tmp_path):
    run = make_run(tmp_path, folds=2, external=False)
    text = write_report(run, out=tmp_path / "elsewhere").read_text()
    assert (tmp_path / "elsewhere" / "report" / "calibration.png").is_file()
    assert not (run / "report.html").exists()
    ys, ps = [], []
    for f in range(2):
        d = read_predictions(run / f"fold_{f}" / "test_predictions.csv")
        ys.append(d["label"])
        ps.append(d["prob"])
    y, p = np.concatenate(ys), np.concatenate(ps)
    assert f"{brier_score_loss(y, p):.4f}" in text
    assert "External cohort" not in text


def test_report_of_an_unfinished_run(tmp_path):
    run = tmp_path / "run"
    (run / "fold_0").mkdir(parents=True)
    (run / "fold_0" / "history.json").write_text(
        json.dumps([{"epoch": 0, "train_loss": 1.0, "val_auc": 0.5, "lr": 1e-4, "tau": 0.2}])
    )
    text = write_report(run).read_text()
    assert "Training curves" in text and "Metrics per fold" not in text
    with pytest.raises(MomkdError):
        write_report(tmp_path / "nope")


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def test_report_renders_in_a_headless_browser(tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    run = make_run(tmp_path)
    html_path = write_report(run)
    shot = tmp_path / "shot.png"
    cmd = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={shot}",
        "--window-size=1200,2000",
        html_path.resolve().as_uri(),
    ]
    try:
        subprocess.run(cmd, capture_output=True, timeout=120, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail("chromium did not finish within 120 s")
    assert shot.is_file(), "no screenshot written"
    img = mpimg.imread(shot)
    assert img.shape[0] >= 1000 and img.shape[1] >= 1000
    assert_not_blank_image(img)
    # the page is not a single colour: header, tables and figures differ from the background
    rgb = img[..., :3].reshape(-1, 3)
    assert len(np.unique((rgb * 255).astype(np.uint8), axis=0)) > 50
    assert not math.isnan(float(img.mean()))


# ------------------------------------------------------------------- end to end, real training


def test_report_and_explain_after_a_real_training_run(tmp_path):
    """Two folds x two epochs of MoMKD on a tiny synthetic cohort, then report and explain."""
    from momkd.config import load_config
    from momkd.explain import explain_run
    from momkd.synth import generate_cohort
    from momkd.train.runner import train

    syn = tmp_path / "syn"
    generate_cohort(
        syn, patients=16, external=6, dim=32, genes=30, patches=24, seed=2, progress=False
    )
    cfg = load_config(
        None,
        [
            f"data.store={syn / 'cohort.zarr'}",
            f"data.clinical={syn / 'clinical.csv'}",
            f"data.expression={syn / 'expression.csv'}",
            "data.label_column=pr",
            "data.positive=[Positive]",
            "data.negative=[Negative]",
            (
                f"data.external={{store: {syn / 'external.zarr'}, clinical: "
                f"{syn / 'external_clinical.csv'}}}"
            ),
            "splits.k=2",
            "genomics.n_genes=12",
            "model.hidden=16",
            "model.sphere=8",
            "model.memory_k=4",
            "model.omics_width=16",
            "model.omics_hidden=16",
            "model.classifier_hidden=8",
            "memory.init_per_class=100",
            "train.epochs=2",
            "train.min_epochs=1",
            "train.device=cpu",
            "train.num_threads=1",
        ],
    )
    run = tmp_path / "run"
    summary = train(cfg, out_dir=run, progress=False)
    parser = Cells()
    parser.feed(write_report(run).read_text())
    saved = json.loads((run / "summary.json").read_text())
    for i, fold in enumerate(saved["folds"]):
        for k in METRICS:
            v = fold["test"][k]
            cell = parser.cells[("test", f"fold {fold['fold']}", k)]
            if isinstance(v, float) and math.isnan(v):
                assert cell["text"] == "n/a"
            else:
                assert float(cell["attrs"]["data-value"]) == v
    for k in METRICS:
        m = saved["mean"][k]
        if not math.isnan(m):
            assert float(parser.cells[("test", "mean", k)]["attrs"]["data-value"]) == m
    assert summary["mean"].keys() == saved["mean"].keys()
    pngs = {p.name for p in (run / "report").glob("*.png")}
    assert {"training_fold_0.png", "memory_fold_1.png", "roc_pr.png"} <= pngs
    assert_not_blank_image(mpimg.imread(run / "report" / "memory_fold_0.png"))

    res = explain_run(run, syn / "cohort.zarr", top_k=2, fold=1, device="cpu", progress=False)
    with open(res["topk_csv"]) as fh:
        assert len(list(csv.DictReader(fh))) == 2 * 4 * 2
    assert res["maps"] and all(Path(p).is_file() for p in res["maps"])
    assert Path(res["memory_dynamics"]).is_file()
