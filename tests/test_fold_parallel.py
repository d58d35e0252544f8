"""Fold subsets into one run directory, `momkd summarize`, and `momkd train --fold-parallel`: the
merged summary equals the summary of one run over every fold (deterministic CPU training)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

CONFIG = """
data:
  store: cohort.zarr
  clinical: clinical.csv
  expression: expression.csv
  label_column: pr
  positive: [Positive]
  negative: [Negative]
  external: {store: external.zarr, clinical: external_clinical.csv}
splits: {k: 2, seed: 1}
genomics: {n_genes: 10}
model: {hidden: 12, omics_width: 8, omics_hidden: 8, sphere: 8, memory_k: 2,
        classifier_hidden: 6}
memory: {init_per_class: 100}
train: {epochs: 2, min_epochs: 2, patience: 3, deterministic: true, max_patches: 12}
"""

SAME = ("folds", "mean", "std", "val_mean", "external", "data", "method", "label_column")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from momkd.synth import generate_cohort

    data = tmp_path_factory.mktemp("folds") / "data"
    generate_cohort(
        data, patients=24, external=6, dim=32, genes=30, patches=16, seed=4, progress=False
    )
    (data / "run.yaml").write_text(CONFIG)
    return data


@pytest.fixture(scope="module")
def full(cohort: Path) -> dict:
    from momkd.train.runner import train

    return train(cohort / "run.yaml", out_dir=cohort.parent / "full", progress=False)


def _same(a: dict, b: dict) -> None:
    for key in SAME:
        x, y = a.get(key), b.get(key)
        if key == "folds":  # timing differs between runs
            for fa, fb in zip(x, y, strict=True):
                for k in ("fold", "val", "test", "external", "threshold", "best_epoch"):
                    assert fa[k] == fb[k], (key, k)
        else:
            assert x == y, key


def test_fold_subsets_then_summarize_equal_a_full_run(cohort: Path, full: dict) -> None:
    from momkd.config import load_config
    from momkd.train.rundir import finished_folds
    from momkd.train.runner import train
    from momkd.train.summary import summarize

    run = cohort.parent / "parts"
    first = train(
        load_config(cohort / "run.yaml", overrides=["train.folds=[1]"]), out_dir=run, progress=False
    )
    assert [f["fold"] for f in first["folds"]] == [1]  # only the finished fold so far
    assert finished_folds(run) == [1]
    # The second fold resumes into the same directory; its end merges both folds.
    second = train(
        load_config(cohort / "run.yaml", overrides=["train.folds=[0]"]),
        out_dir=run,
        resume=True,
        progress=False,
    )
    assert [f["fold"] for f in second["folds"]] == [0, 1]
    _same(full, second)
    (run / "summary.json").unlink()
    merged = summarize(run)
    _same(full, merged)
    assert json.loads((run / "summary.json").read_text())["mean"] == full["mean"]
    assert (run / "external_predictions.csv").read_text() == (
        cohort.parent / "full" / "external_predictions.csv"
    ).read_text()


def test_summarize_cli_errors_on_a_folder_without_run(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "momkd", "summarize", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "no config.yaml" in proc.stderr


@pytest.mark.slow
def test_fold_parallel_equals_a_full_run(cohort: Path, full: dict) -> None:
    run = cohort.parent / "parallel"
    env = dict(os.environ, MOMKD_PROGRESS="0")
    proc = subprocess.run(
        [sys.executable, "-m", "momkd", "train", "--config", str(cohort / "run.yaml"),
         "--out", str(run), "--fold-parallel", "2"],
        capture_output=True, text=True, timeout=600, check=False, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "fold_0.log").is_file() and (run / "fold_1.log").is_file()
    _same(full, json.loads((run / "summary.json").read_text()))
    assert (run / "report.html").is_file()


def test_prepare_only_writes_config_and_splits_without_training(cohort: Path) -> None:
    run = cohort.parent / "prepared"
    proc = subprocess.run(
        [sys.executable, "-m", "momkd", "train", "--config", str(cohort / "run.yaml"),
         "--out", str(run), "--prepare-only"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "folds to train: 0, 1" in proc.stdout
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "data.json", "splits"]
    assert sorted(p.name for p in (run / "splits").iterdir()) == ["splits_0.csv", "splits_1.csv"]
