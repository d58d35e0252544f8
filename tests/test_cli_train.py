"""``momkd train / eval / predict / demo`` from the command line: exit codes, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from csvfiles import read_rows, write_rows


def _cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["MOMKD_PROGRESS"] = "0"
    return subprocess.run(
        [sys.executable, "-m", "momkd.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )


def _config(root: Path, store: Path, clinical: Path, expression: Path, extra: str = "") -> Path:
    path = root / "run.yaml"
    path.write_text(
        f"data:\n  store: {store}\n  clinical: {clinical}\n"
        f"  expression: {expression}\n  label_column: pr\n  positive: [Positive]\n"
        "  negative: [Negative]\n"
        "splits: {k: 2}\ngenomics: {n_genes: 8}\n"
        "model: {hidden: 8, omics_width: 8, omics_hidden: 8, sphere: 4, memory_k: 2,"
        " classifier_hidden: 4}\n"
        "memory: {init_per_class: 200}\n"
        "train: {epochs: 1, min_epochs: 1, patience: 1}\n" + extra
    )
    return path


def _assert_one_line_error(res: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("momkd train: error: ")
    assert "Traceback" not in res.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from momkd.synth import generate_cohort

    root = tmp_path_factory.mktemp("cli") / "cohort"
    generate_cohort(
        root, patients=20, external=0, dim=32, genes=20, patches=10, seed=9, progress=False
    )
    return root


def test_missing_expression_is_exit_2_naming_the_patient(cohort: Path, tmp_path: Path) -> None:
    rows = read_rows(cohort / "expression.csv")
    dropped = rows[3][0]
    expr = write_rows(tmp_path / "expression.csv", [r for r in rows if r[0] != dropped])
    cfg = _config(tmp_path, cohort / "cohort.zarr", cohort / "clinical.csv", expr)
    res = _cli("train", "--config", str(cfg), "--out", str(tmp_path / "run"))
    _assert_one_line_error(res, dropped, "expression.csv")
    assert not (tmp_path / "run").exists()


def test_slide_missing_from_store_is_exit_2_naming_slide_and_store(
    cohort: Path, tmp_path: Path
) -> None:
    rows = read_rows(cohort / "clinical.csv")
    header = rows[0]
    extra = dict(zip(header, rows[1], strict=True))
    extra["slide_id"] = "NOT-IN-STORE-DX1"
    extra["pr"] = "Positive"
    clin = write_rows(tmp_path / "clinical.csv", rows + [[extra[h] for h in header]])
    cfg = _config(tmp_path, cohort / "cohort.zarr", clin, cohort / "expression.csv")
    res = _cli("train", "--config", str(cfg), "--out", str(tmp_path / "run"))
    _assert_one_line_error(res, "NOT-IN-STORE-DX1", "cohort.zarr")


def test_duplicate_slide_ids_are_exit_2(cohort: Path, tmp_path: Path) -> None:
    rows = read_rows(cohort / "clinical.csv")
    clin = write_rows(tmp_path / "clinical.csv", rows + [rows[2]])
    cfg = _config(tmp_path, cohort / "cohort.zarr", clin, cohort / "expression.csv")
    res = _cli("train", "--config", str(cfg), "--out", str(tmp_path / "run"))
    _assert_one_line_error(res, "duplicate", rows[2][1], "clinical.csv")


def test_train_eval_predict_and_run_directory_guards(cohort: Path, tmp_path: Path) -> None:
    cfg = _config(
        tmp_path, cohort / "cohort.zarr", cohort / "clinical.csv", cohort / "expression.csv"
    )
    run = tmp_path / "run"
    res = _cli("train", "--config", str(cfg), "--out", str(run))
    assert res.returncode == 0, res.stderr
    assert "mean ± std" in res.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert len(summary["folds"]) == 2

    # A finished run is not overwritten; --resume with another configuration is refused.
    res = _cli("train", "--config", str(cfg), "--out", str(run))
    _assert_one_line_error(res, "--resume")
    res = _cli(
        "train", "--config", str(cfg), "--out", str(run), "--resume", "--set", "train.lr=0.1"
    )
    _assert_one_line_error(res, "train.lr")
    # --resume of a finished run recomputes the same summary without training again.
    res = _cli("train", "--config", str(cfg), "--out", str(run), "--resume")
    assert res.returncode == 0, res.stderr
    again = json.loads((run / "summary.json").read_text())
    assert again["mean"] == summary["mean"]

    # momkd summarize with nothing new to merge keeps the time line (seconds and device).
    last_line = (run / "summary.txt").read_text().strip().splitlines()[-1]
    assert last_line.startswith("time: ") and last_line.endswith(" s on cpu")
    from momkd.cli import main

    assert main(["summarize", str(run)]) == 0
    assert (run / "summary.txt").read_text().strip().splitlines()[-1] == last_line
    # Without the earlier summary it sums the folds' times, on the device they record.
    (run / "summary.json").unlink()
    assert main(["summarize", str(run)]) == 0
    seconds = sum(
        json.loads((run / f"fold_{f}/result.json").read_text())["seconds"] for f in (0, 1)
    )
    assert (run / "summary.txt").read_text().strip().splitlines()[-1] == (
        f"time: {seconds:.1f} s (sum of the folds' times) on cpu"
    )

    res = _cli(
        "eval",
        str(run),
        "--store",
        str(cohort / "cohort.zarr"),
        "--clinical",
        str(cohort / "clinical.csv"),
    )
    assert res.returncode == 0, res.stderr
    assert (run / "eval_cohort" / "metrics.json").is_file()

    res = _cli("explain", str(run), "--store", str(cohort / "cohort.zarr"), "--top-k", "1")
    assert res.returncode == 0, res.stderr
    assert "None" not in res.stdout and "gallery" not in res.stdout
    assert (run / "explain").is_dir()

    # Everything in the run folder is in the README's list of its contents.
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    listing = readme[readme.index("* **Run directory**") : readme.index("* **`summary.txt`**")]
    for entry in sorted(run.iterdir()):
        if entry.name.startswith("."):
            continue  # the summary's lock file
        name = entry.name.replace("_0", "_<k>").replace("_1", "_<k>")
        name = name.replace("eval_cohort", "eval_<store name>")
        assert f"`{name}" in listing or f"`{name}/`" in listing, entry.name
    for entry in sorted((run / "fold_0").iterdir()):
        assert f"`{entry.name}`" in listing, entry.name

    res = _cli(
        "predict",
        str(run),
        "--store",
        str(cohort / "cohort.zarr"),
        "--out",
        str(tmp_path / "p.csv"),
    )
    assert res.returncode == 0, res.stderr
    assert len(read_rows(tmp_path / "p.csv")) - 1 == len(read_rows(cohort / "clinical.csv")) - 1

    res = _cli(
        "predict",
        str(run),
        "--store",
        str(cohort / "cohort.zarr"),
        "--out",
        str(tmp_path / "q.csv"),
        "--slides",
        "NO-SUCH-SLIDE",
    )
    assert res.returncode == 2
    assert "NO-SUCH-SLIDE" in res.stderr and "Traceback" not in res.stderr


def test_demo_quick(tmp_path: Path) -> None:
    from momkd.demo import run_demo

    lines: list[str] = []
    report = run_demo(tmp_path / "demo", quick=True, echo=lines.append, progress=False)
    text = "\n".join(lines)
    assert "loader:" in text and "ingest:" in text
    assert "momkd" in text and "abmil" in text and "meanpool" in text
    for method in ("momkd", "abmil", "meanpool"):
        summary = json.loads((tmp_path / "demo" / "runs" / method / "summary.json").read_text())
        r = report["methods"][method]
        assert r["test_auc_mean"] == pytest.approx(summary["mean"]["auc"])
        assert r["external_ensemble_auc"] == pytest.approx(summary["external"]["ensemble"]["auc"])
        assert summary["data"]["store"].endswith("ingested.zarr")
    # Pooled AUCs with CIs and the paired differences on the same test slides, each method
    # against the ones after it: MoMKD - ABMIL, MoMKD - meanpool, ABMIL - meanpool.
    assert "DeLong" in text
    comp = json.loads((tmp_path / "demo" / "comparison.json").read_text())
    pairs = {(p["a"], p["b"]): p for p in comp["paired"]}
    assert set(pairs) == {("momkd", "abmil"), ("momkd", "meanpool"), ("abmil", "meanpool")}
    pooled = {m: comp["methods"][m]["pooled_auc"]["value"] for m in ("momkd", "abmil", "meanpool")}
    names = {"momkd": "MoMKD", "abmil": "ABMIL", "meanpool": "meanpool"}
    for (a, b), pair in pairs.items():
        assert pair["auc_diff"] == pytest.approx(pooled[a] - pooled[b])
        line = (
            f"paired difference {names[a]} - {names[b]} (test slides): AUC {pair['auc_diff']:+.3f}"
        )
        assert line in text
    assert (tmp_path / "demo" / "comparison.html").is_file()
    oracle = json.loads((tmp_path / "demo" / "data" / "oracle.json").read_text())
    assert report["oracle"] == oracle["oracle_auc"][report["label"]]
    assert json.loads((tmp_path / "demo" / "demo_report.json").read_text())["label"] == "her2"
    # A folder the demo did not write is never cleared.
    from momkd.errors import ConfigError

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ConfigError, match="not written by"):
        run_demo(tmp_path / "mine", quick=True, echo=lambda _: None, progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
