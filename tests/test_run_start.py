"""Starting a run: every input is checked before the run folder is written, so a failed start
leaves nothing behind and the corrected command runs as it is; a folder that cannot be resumed
says what to do; the saved configuration names the folder it is in."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from csvfiles import read_rows, write_rows
from momkd.config import RunConfig, load_config, preset_yaml, selects_as_released
from momkd.errors import ConfigError, DataError
from momkd.train.runner import prepare_run, train
from momkd.train.splits import Split, write_splits


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from momkd.synth import generate_cohort

    root = tmp_path_factory.mktemp("start") / "cohort"
    generate_cohort(
        root, patients=20, external=0, dim=32, genes=20, patches=10, seed=9, progress=False
    )
    return root


def _cfg(cohort: Path, *overrides: str, clinical: Path | None = None) -> RunConfig:
    base = [
        f"data.store={cohort / 'cohort.zarr'}",
        f"data.clinical={clinical or cohort / 'clinical.csv'}",
        f"data.expression={cohort / 'expression.csv'}",
        "data.label_column=pr",
        "data.positive=[Positive]",
        "data.negative=[Negative]",
        "splits.k=2",
        "genomics.n_genes=8",
        "model.hidden=8",
        "model.sphere=4",
        "train.epochs=1",
    ]
    return load_config(None, [*base, *overrides])


def test_too_many_genes_fails_before_the_run_folder(cohort: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    for start in (train, prepare_run):
        with pytest.raises(ConfigError, match=r"genomics\.n_genes: 768 exceeds the 20 genes"):
            start(_cfg(cohort, "genomics.n_genes=768"), run, False)
        assert not run.exists()
    # The corrected command runs as it is: no folder to remove, no --resume needed.
    run_dir, folds = prepare_run(_cfg(cohort), run, False)
    assert run_dir == run.absolute() and folds == [0, 1]


def test_gene_list_and_folds_fail_before_the_run_folder(cohort: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    genes = tmp_path / "genes.txt"
    genes.write_text("G00001\nNOT_A_GENE\n")
    with pytest.raises(DataError, match="NOT_A_GENE"):
        prepare_run(
            _cfg(cohort, "genomics.selection=list", f"genomics.gene_list={genes}"), run, False
        )
    # User splits whose fold 1 trains on negatives only.
    rows = read_rows(cohort / "clinical.csv")
    col = rows[0].index("pr")
    label = {r[0]: r[col] for r in rows[1:] if r[col] in ("Positive", "Negative")}
    pos = [c for c, v in label.items() if v == "Positive"]
    neg = [c for c, v in label.items() if v == "Negative"]

    def slides(cases: list[str]) -> tuple[str, ...]:
        return tuple(r[1] for r in rows[1:] if r[0] in cases and r[0] in label)

    folds = {
        0: (slides(pos[::2] + neg[::2]), slides(pos[1::2] + neg[1::2])),
        1: (slides(neg[1::2]), slides(pos + neg[::2])),
    }
    split_dir = tmp_path / "splits"
    write_splits([Split(train=tr, val=(), test=te) for tr, te in folds.values()], split_dir)
    with pytest.raises(DataError, match="fold 1's training slides all have class 0"):
        prepare_run(_cfg(cohort, f"splits.dir={split_dir}"), run, False)
    assert not run.exists()


def _lower_case(cohort: Path, tmp_path: Path) -> tuple[Path, int]:
    """The clinical table with every positive pr value written in lower case."""
    rows = read_rows(cohort / "clinical.csv")
    col = rows[0].index("pr")
    n = 0
    for r in rows[1:]:
        if r[col] == "Positive":
            r[col], n = "positive", n + 1
    return write_rows(tmp_path / "clinical.csv", rows), n


def test_lower_case_labels_fail_early_in_one_line(cohort: Path, tmp_path: Path) -> None:
    clinical, n = _lower_case(cohort, tmp_path)
    assert n > 0
    run = tmp_path / "run"
    with pytest.raises(DataError) as exc:
        train(_cfg(cohort, clinical=clinical), run, False)
    text = str(exc.value)
    assert "\n" not in text
    for needle in (str(clinical), "pr", f"'positive' ({n} slides)", "label_case_insensitive"):
        assert needle in text, needle
    assert not run.exists()
    # The advice works.
    prepare_run(_cfg(cohort, "data.label_case_insensitive=true", clinical=clinical), run, False)


def test_transposed_expression_points_to_the_orientation(cohort: Path, tmp_path: Path) -> None:
    rows = read_rows(cohort / "expression.csv")
    transposed = [list(col) for col in zip(*rows, strict=True)]
    transposed[0][0] = "gene"
    expr = write_rows(tmp_path / "expression_t.csv", transposed)
    run = tmp_path / "run"
    for skip in ("false", "true"):  # skipping patients is not the fix, so it is not suggested
        with pytest.raises(DataError) as exc:
            prepare_run(
                _cfg(cohort, f"data.expression={expr}", f"data.skip_missing={skip}"), run, False
            )
        text = str(exc.value)
        assert "data.expression_orientation: genes_x_patients" in text
        assert "skip_missing" not in text and str(expr) in text
    assert not run.exists()
    cfg = _cfg(cohort, f"data.expression={expr}", "data.expression_orientation=genes_x_patients")
    prepare_run(cfg, run, False)


def test_saved_config_names_the_run_folder(cohort: Path, tmp_path: Path) -> None:
    run = tmp_path / "given_by_out"
    prepare_run(_cfg(cohort, f"output.dir={tmp_path / 'from_yaml'}"), run, False)
    assert load_config(run / "config.yaml").output.dir == run.absolute()
    assert not (tmp_path / "from_yaml").exists()


def test_an_untrained_folder_says_how_to_start_again(cohort: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    prepare_run(_cfg(cohort), run, False)  # a folder in which no fold has trained
    with pytest.raises(ConfigError) as exc:
        prepare_run(_cfg(cohort), run, False)
    assert "--resume" in str(exc.value) and f"rm -r {run.absolute()}" in str(exc.value)
    with pytest.raises(ConfigError) as exc:
        prepare_run(_cfg(cohort, "genomics.n_genes=6"), run, True)
    text = str(exc.value)
    assert "genomics.n_genes" in text and f"rm -r {run.absolute()}" in text
    # Same configuration: --resume goes on.
    assert prepare_run(_cfg(cohort), run, True)[1] == [0, 1]
    # Once a fold has trained, removing the folder is no longer the advice.
    (run / "fold_0").mkdir()
    (run / "fold_0" / "last.pt").write_bytes(b"")
    with pytest.raises(ConfigError) as exc:
        prepare_run(_cfg(cohort, "genomics.n_genes=6"), run, True)
    assert "rm -r" not in str(exc.value) and "--config" in str(exc.value)


def test_failed_cli_start_is_one_line_and_leaves_no_folder(cohort: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        preset_yaml("official")
        .replace("store: cohort.zarr", f"store: {cohort / 'cohort.zarr'}")
        .replace("clinical: clinical.csv", f"clinical: {cohort / 'clinical.csv'}")
        .replace("expression: expression.csv", f"expression: {cohort / 'expression.csv'}")
    )
    run = tmp_path / "run"
    env = dict(os.environ, MOMKD_PROGRESS="0")
    res = subprocess.run(
        [sys.executable, "-m", "momkd", "train", "--config", str(cfg), "--out", str(run)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr
    assert lines[0].startswith("momkd train: error: genomics.n_genes: 768 exceeds the 20 genes")
    assert not run.exists()


# ------------------------------------------------------------------ small validation sets


def _small_splits() -> tuple[list[Split], dict[str, int], dict[str, str]]:
    """Five folds whose validation sets hold 3 + f slides: f + 1 positive."""
    labels: dict[str, int] = {}
    splits = []
    for f in range(5):
        val = [f"v{f}_{i}" for i in range(3 + f)]
        for i, s in enumerate(val):
            labels[s] = int(i <= f)
        splits.append(Split(train=(), val=tuple(val), test=()))
    return splits, labels, {s: s for s in labels}


def _warnings(cfg: RunConfig, caplog: pytest.LogCaptureFixture) -> list[str]:
    from momkd.train.runner import _warn_small_validation

    splits, labels, cases = _small_splits()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="momkd"):
        _warn_small_validation(cfg, splits, list(range(5)), labels, cases)
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_official_preset_warns_once_that_it_selects_on_purpose(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "official.yaml").write_text(preset_yaml("official"))
    official = load_config(tmp_path / "official.yaml")
    assert selects_as_released(official)
    assert not selects_as_released(load_config(None))

    (message,) = _warnings(official, caplog)
    for f in range(5):
        assert f"fold {f}: {3 + f} slides, {f + 1} positive, 2 negative" in message
    assert "train.monitor: val_auc" in message and "on purpose" in message

    # The preset with a shorter budget still selects as released.
    shorter = load_config(tmp_path / "official.yaml", ["train.epochs=3", "train.min_epochs=1"])
    (message,) = _warnings(shorter, caplog)
    assert "on purpose" in message

    other = load_config(tmp_path / "official.yaml", ["train.monitor=val_loss"])
    (message,) = _warnings(other, caplog)
    assert "on purpose" not in message and "prefer train.monitor: last" in message
    assert _warnings(load_config(None), caplog) == []  # monitor last: nothing is selected
