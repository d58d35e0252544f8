"""``momkd compare``: identical splits, resumability, paired numbers against a recomputation."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from momkd.compare import parse_fractions, parse_methods, run_compare
from momkd.errors import ConfigError
from oracles import delong_by_loops, stratified_draws
from sklearn.metrics import roc_auc_score

RESAMPLES = 100  # one bootstrap chunk: the draws can be replayed by the oracle
METHODS = "momkd,abmil:train.lr=0.001"
NAMES = ["momkd", "abmil:train.lr=0.001"]

CONFIG = """
data:
  store: cohort.zarr
  clinical: clinical.csv
  expression: expression.csv
  label_column: pr
  positive: [Positive]
  negative: [Negative]
  external: {store: external.zarr, clinical: external_clinical.csv}
splits: {k: 2, seed: 4}
genomics: {n_genes: 8}
model: {hidden: 8, omics_width: 8, omics_hidden: 8, sphere: 4, memory_k: 2,
        classifier_hidden: 4, attention_dim: 4}
memory: {init_per_class: 200}
train: {epochs: 1, min_epochs: 1, patience: 1, seed: 2}
"""


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from momkd.synth import generate_cohort

    root = tmp_path_factory.mktemp("compare_cohort")
    generate_cohort(
        root, patients=28, external=8, dim=32, genes=20, patches=10, seed=11, progress=False
    )
    (root / "run.yaml").write_text(CONFIG)
    return root


@pytest.fixture(scope="module")
def compared(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("compare") / "out"
    result = run_compare(
        cohort / "run.yaml",
        METHODS,
        out,
        train_fractions="0.5",
        resamples=RESAMPLES,
        progress=False,
        reports=False,
    )
    return out, result


def test_parse_methods_syntax_and_errors() -> None:
    specs = parse_methods("momkd, momkd:memory.update=momentum:memory.momentum=0.9,abmil")
    assert [s.method for s in specs] == ["momkd", "momkd", "abmil"]
    assert specs[1].overrides == ("memory.update=momentum", "memory.momentum=0.9")
    assert specs[1].name == "momkd:memory.update=momentum:memory.momentum=0.9"
    assert len({s.slug for s in specs}) == 3 and all("/" not in s.slug for s in specs)
    # Brackets protect commas and colons inside values.
    (spec,) = parse_methods("momkd:memory.momentum_sources=[omics,wsi]")
    assert spec.overrides == ("memory.momentum_sources=[omics,wsi]",)
    for bad, needle in (
        ("momkd,svm", "unknown method"),
        ("momkd,momkd", "twice"),
        ("momkd:train.lr", "KEY=VALUE"),
        ("abmil:model.method=momkd", "model.method"),
        ("", "no method"),
    ):
        with pytest.raises(ConfigError, match=needle):
            parse_methods(bad)
    assert parse_fractions("0.5,0.25") == [0.25, 0.5, 1.0]
    with pytest.raises(ConfigError, match="train-fraction"):
        parse_fractions("0,1")


def _pooled(run: Path) -> dict[str, tuple[str, int, float]]:
    out = {}
    for fold_dir in sorted(run.glob("fold_*")):
        for r in _rows(fold_dir / "test_predictions.csv"):
            out[r["slide_id"]] = (r["case_id"], int(r["label"]), float(r["prob"]))
    return out


def test_every_method_predicts_the_same_test_slides(compared: tuple[Path, dict]) -> None:
    out, result = compared
    assert list(result["methods"]) == NAMES
    split_files = sorted((out / "splits").glob("splits_*.csv"))
    assert len(split_files) == 2
    for k, path in enumerate(split_files):
        expected = {r["test"] for r in _rows(path) if r["test"]}
        for run in sorted((out / "runs").iterdir()):  # every method, every training fraction
            got = {r["slide_id"] for r in _rows(run / f"fold_{k}" / "test_predictions.csv")}
            assert got == expected, (run.name, k)
            assert (run / "splits" / path.name).read_text() == path.read_text()
    assert {Path(m["run_dir"]).name for m in result["methods"].values()} == {
        "momkd",
        "abmil__train.lr=0.001",
    }


def _paired_oracle(y: np.ndarray, pa: np.ndarray, pb: np.ndarray, seed: int) -> dict:
    diffs = [
        roc_auc_score(y[r], pa[r]) - roc_auc_score(y[r], pb[r])
        for r in stratified_draws(y, RESAMPLES, seed)
    ]
    low, high = np.percentile(diffs, [2.5, 97.5])
    diff, p_value = delong_by_loops(y, pa, pb)
    return {"auc_diff": diff, "ci_low": low, "ci_high": high, "p_value": p_value}


def test_paired_numbers_agree_with_a_recomputation_from_the_csvs(
    compared: tuple[Path, dict],
) -> None:
    out, result = compared
    seed = result["seed"]
    assert seed == 2 and result["resamples"] == RESAMPLES
    runs = {name: Path(m["run_dir"]) for name, m in result["methods"].items()}
    slide = {name: _pooled(run) for name, run in runs.items()}
    ids = sorted(slide["momkd"])
    y = np.array([slide["momkd"][s][1] for s in ids])
    pa = np.array([slide[NAMES[0]][s][2] for s in ids])
    pb = np.array([slide[NAMES[1]][s][2] for s in ids])
    (pair,) = result["paired"]
    assert (pair["a"], pair["b"]) == tuple(NAMES)
    ref = _paired_oracle(y, pa, pb, seed)
    for key, value in ref.items():
        assert pair[key] == pytest.approx(value, rel=1e-7, abs=1e-12), key
    assert result["methods"]["momkd"]["pooled_auc"]["value"] == pytest.approx(roc_auc_score(y, pa))
    assert result["methods"]["momkd"]["n_test"] == len(ids)

    # Patient level: slide probabilities averaged per patient, by hand.
    def per_patient(name: str) -> dict[str, tuple[int, float]]:
        acc: dict[str, list] = defaultdict(list)
        for case, label, prob in slide[name].values():
            acc[case].append((label, prob))
        return {c: (v[0][0], sum(p for _, p in v) / len(v)) for c, v in acc.items()}

    pat_a, pat_b = per_patient(NAMES[0]), per_patient(NAMES[1])
    assert len(pat_a) < len(ids)  # the cohort has two-slide patients
    cases = sorted(pat_a)
    yp = np.array([pat_a[c][0] for c in cases])
    ref_p = _paired_oracle(
        yp, np.array([pat_a[c][1] for c in cases]), np.array([pat_b[c][1] for c in cases]), seed
    )
    (pair_p,) = result["paired_patient"]
    assert pair_p["n"] == len(cases)
    for key, value in ref_p.items():
        assert pair_p[key] == pytest.approx(value, rel=1e-7, abs=1e-12), key
    patient = result["methods"]["momkd"]["patient"]
    assert patient["pooled_auc"]["value"] == pytest.approx(
        roc_auc_score(yp, [pat_a[c][1] for c in cases])
    )

    # External cohort: the fold-ensemble probabilities.
    ext = {
        n: {r["slide_id"]: r for r in _rows(run / "external_predictions.csv")}
        for n, run in runs.items()
    }
    e_ids = sorted(ext["momkd"])
    ye = np.array([int(ext["momkd"][s]["label"]) for s in e_ids])
    ea = np.array([float(ext[NAMES[0]][s]["prob"]) for s in e_ids])
    eb = np.array([float(ext[NAMES[1]][s]["prob"]) for s in e_ids])
    (pair_e,) = result["paired_external"]
    assert pair_e["auc_diff"] == pytest.approx(roc_auc_score(ye, ea) - roc_auc_score(ye, eb))
    on_disk = json.loads((out / "comparison.json").read_text())
    assert on_disk["paired"][0]["p_value"] == pytest.approx(pair["p_value"])
    page = (out / "comparison.html").read_text()
    assert page.count("data:image/png;base64,") >= 3  # forest plot, ROC overlay, learning curve
    assert "abmil:train.lr=0.001" in page


def test_learning_curve_subsamples_training_patients_only(
    compared: tuple[Path, dict], cohort: Path
) -> None:
    out, result = compared
    lc = result["learning_curve"]
    assert lc["fractions"] == [0.5, 1.0]
    label = {r["slide_id"]: r["pr"] for r in _rows(cohort / "clinical.csv")}
    case = {r["slide_id"]: r["case_id"] for r in _rows(cohort / "clinical.csv")}
    for name in NAMES:
        points = {pt["fraction"]: pt for pt in lc["methods"][name]}
        assert set(points) == {0.5, 1.0}
        half, full = Path(points[0.5]["run_dir"]), Path(points[1.0]["run_dir"])
        for k in range(2):
            rows = _rows(out / "splits" / f"splits_{k}.csv")
            train = [r["train"] for r in rows if r["train"]]
            # Expected: per class, round-half-up(0.5 * patients), with all their slides.
            patients = {
                c: sorted({case[s] for s in train if label[s] == c})
                for c in ("Positive", "Negative")
            }
            keep = {c: max(1, math.floor(0.5 * len(p) + 0.5)) for c, p in patients.items()}
            slides_of = defaultdict(int)
            for s in train:
                slides_of[case[s]] += 1
            res_half = json.loads((half / f"fold_{k}" / "result.json").read_text())
            res_full = json.loads((full / f"fold_{k}" / "result.json").read_text())
            assert res_full["n_train"] == len(train)
            assert (
                res_half["n_val"] == res_full["n_val"] and res_half["n_test"] == res_full["n_test"]
            )
            # Patient counts are exact; slide counts lie between the one- and two-slide extremes.
            lo = sum(keep.values())
            hi = sum(
                sum(sorted((slides_of[p] for p in ps), reverse=True)[: keep[c]])
                for c, ps in patients.items()
            )
            assert lo <= res_half["n_train"] <= hi < res_full["n_train"]
        assert points[0.5]["n_train"] < points[1.0]["n_train"]


def _mtimes(run: Path) -> dict[str, int]:
    return {str(p.relative_to(run)): p.stat().st_mtime_ns for p in run.rglob("*.json")}


def test_rerun_skips_finished_methods_and_resumes_unfinished(
    compared: tuple[Path, dict], cohort: Path
) -> None:
    out, first = compared
    runs = out / "runs"
    before = {d.name: _mtimes(d) for d in runs.iterdir()}
    # Interrupt one method: its second fold and its summary are gone.
    victim = runs / "abmil__train.lr=0.001"
    (victim / "summary.json").unlink()
    for f in (victim / "fold_1").iterdir():
        f.unlink()
    again = run_compare(
        cohort / "run.yaml",
        METHODS,
        out,
        train_fractions="0.5",
        resamples=RESAMPLES,
        progress=False,
        reports=False,
    )
    after = {d.name: _mtimes(d) for d in runs.iterdir()}
    for name in before:
        if name == victim.name:
            continue
        assert after[name] == before[name], name  # finished: nothing rewritten
    assert after[victim.name]["fold_0/result.json"] == before[victim.name]["fold_0/result.json"]
    assert (victim / "fold_1" / "result.json").is_file() and (victim / "summary.json").is_file()
    assert again["paired"][0]["a"] == first["paired"][0]["a"]
    assert again["methods"]["momkd"]["pooled_auc"] == first["methods"]["momkd"]["pooled_auc"]

    # A finished run is never silently reused under another configuration.
    with pytest.raises(ConfigError, match="another configuration"):
        run_compare(
            cohort / "run.yaml",
            METHODS,
            out,
            overrides=["train.weight_decay=0.5"],
            resamples=RESAMPLES,
            progress=False,
            reports=False,
        )


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, MOMKD_PROGRESS="0")
    return subprocess.run(
        [sys.executable, "-m", "momkd.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )


def test_cli_compare_prints_the_table_and_reports_bad_methods(
    compared: tuple[Path, dict], cohort: Path
) -> None:
    out, _ = compared
    res = _cli(
        "compare",
        "--config",
        str(cohort / "run.yaml"),
        "--methods",
        METHODS,
        "--out",
        str(out),
        "--train-fraction",
        "0.5,1.0",
        "--resamples",
        str(RESAMPLES),
    )
    assert res.returncode == 0, res.stderr
    assert "pooled test AUC" in res.stdout and "momkd - abmil:train.lr=0.001" in res.stdout
    res = _cli(
        "compare",
        "--config",
        str(cohort / "run.yaml"),
        "--methods",
        "momkd,svm",
        "--out",
        str(out / "x"),
    )
    assert res.returncode == 2
    assert res.stderr.strip().startswith("momkd compare: error:") and "svm" in res.stderr
    assert "Traceback" not in res.stderr
