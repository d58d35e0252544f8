"""Multi-class labels in the data path: the data.classes mapping, class-stratified splits and the
checks that stop a run before its folder is written."""

from __future__ import annotations

import csv
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from momkd.data.clinical import load_clinical, require_classes
from momkd.errors import ConfigError, DataError
from momkd.train.splits import make_splits


def _write(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["case_id", "slide_id", "subtype"])
        w.writerows(rows)
    return path


def test_classes_map_values_in_list_order_and_exclude_the_rest(tmp_path: Path) -> None:
    rows = [
        ("p1", "s1", "LumA"),
        ("p2", "s2", "Basal"),
        ("p3", "s3", " her2 "),
        ("p4", "s4", "NA"),
        ("p5", "s5", "LumB"),
        ("p6", "s6", ""),
    ]
    path = _write(tmp_path / "c.csv", rows)
    table = load_clinical(
        path, label_col="subtype", classes=["LumA", "LumB", "HER2", "Basal"], case_insensitive=True
    )
    assert table.slide_ids == ["s1", "s2", "s3", "s5"]
    assert table.labels.tolist() == [0, 3, 2, 1]
    assert table.class_names == ["LumA", "LumB", "HER2", "Basal"]
    assert table.n_classes == 4 and table.class_counts() == [1, 1, 1, 1]
    assert dict(table.excluded) == {"NA": 1, "": 1}
    # Case matters unless told otherwise: " her2 " is then excluded.
    strict = load_clinical(path, label_col="subtype", classes=["LumA", "LumB", "HER2", "Basal"])
    assert "s3" not in strict.slide_ids and strict.excluded["her2"] == 1


def test_classes_and_binary_mapping_are_exclusive(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.csv", [("p1", "s1", "A")])
    with pytest.raises(ConfigError, match="not both"):
        load_clinical(path, label_col="subtype", classes=["A", "B"], positive=["A"])
    with pytest.raises(ConfigError, match="two or more distinct"):
        load_clinical(path, label_col="subtype", classes=["A", "a"], case_insensitive=True)


def test_a_class_with_too_few_patients_or_none_is_a_one_line_error(tmp_path: Path) -> None:
    rows = [(f"p{i}", f"s{i}", "ABC"[i % 3] if i < 12 else "A") for i in range(20)]
    rows[2] = ("p2", "s2", "A")  # class C keeps 3 patients
    table = load_clinical(_write(tmp_path / "c.csv", rows), label_col="subtype", classes="ABCD")
    with pytest.raises(DataError) as missing:
        require_classes(table)
    assert "'D'" in str(missing.value) and "\n" not in str(missing.value)
    table = load_clinical(_write(tmp_path / "d.csv", rows), label_col="subtype", classes="ABC")
    require_classes(table, folds=3)
    with pytest.raises(DataError) as few:
        require_classes(table, folds=5)
    text = str(few.value)
    assert "'C' has 3" in text and "splits.k" in text and "\n" not in text


@pytest.mark.parametrize("seed", [0, 1])
def test_splits_are_stratified_over_every_class(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_per = {0: 23, 1: 11, 2: 17, 3: 9}
    cases = [f"p{c}_{i}" for c, n in n_per.items() for i in range(n)]
    labels = [c for c, n in n_per.items() for _ in range(n)]
    order = rng.permutation(len(cases))
    cases = [cases[i] for i in order]
    labels = [labels[i] for i in order]
    label_of = dict(zip(cases, labels, strict=True))
    splits = make_splits(cases, labels, k=4, val_fraction=0.2, seed=seed)
    tests = [Counter(label_of[p] for p in s.test) for s in splits]
    for c, n in n_per.items():
        per_fold = [t[c] for t in tests]
        assert sum(per_fold) == n and max(per_fold) - min(per_fold) <= 1
    for s in splits:
        parts = [set(s.train), set(s.val), set(s.test)]
        assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
        assert set().union(*parts) == set(cases)
        # At least one validation patient of every class with two or more left.
        assert {label_of[p] for p in s.val} == set(n_per)
    # The input order does not matter.
    again = make_splits(cases[::-1], labels[::-1], k=4, val_fraction=0.2, seed=seed)
    assert again == splits


def test_train_refuses_a_class_too_small_for_the_folds_before_writing(tmp_path: Path) -> None:
    from momkd.synth import generate_cohort

    data = tmp_path / "data"
    generate_cohort(data, patients=24, external=0, dim=32, genes=20, patches=8, progress=False)
    rows = list(csv.DictReader((data / "clinical.csv").open()))
    for i, r in enumerate(rows):
        r["three"] = "C" if i < 2 else ("A" if i % 2 else "B")
    with (data / "three.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    out = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(
        f"data: {{store: {data / 'cohort.zarr'}, clinical: {data / 'three.csv'}, "
        "label_column: three, classes: [A, B, C]}\n"
        "model: {method: meanpool}\nsplits: {k: 3}\n"
    )
    cmd = [sys.executable, "-m", "momkd.cli", "train", "--config", str(config), "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode != 0
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and "'C' has 2 patient(s)" in err[0], res.stderr
    assert not out.exists()


def test_small_validation_warning_counts_every_class(caplog: pytest.LogCaptureFixture) -> None:
    from momkd.config import load_config
    from momkd.train.runner import _warn_small_validation
    from momkd.train.splits import Split

    cfg = load_config(None, ["data.classes=[A,B,C]", "train.monitor=val_auc"])
    val = tuple(f"s{i}" for i in range(12))
    label_of = {s: i % 3 for i, s in enumerate(val)}
    with caplog.at_level("WARNING"):
        _warn_small_validation(cfg, [Split((), val, ())], [0], label_of, {s: s for s in val})
    assert "fold 0: 12 slides, 4 A, 4 B, 4 C" in caplog.text


def test_float_labels_split_like_integer_labels() -> None:
    cases = [f"p{i}" for i in range(30)]
    labels = [i % 3 for i in range(30)]
    want = make_splits(cases, labels, k=3, seed=2)
    assert make_splits(cases, np.asarray(labels, dtype=np.float64), k=3, seed=2) == want
    with pytest.raises(DataError, match="class indices"):
        make_splits(cases, np.full(30, 0.5), k=3)


def test_two_listed_classes_with_one_missing_name_it(tmp_path: Path) -> None:
    from momkd.config import load_config
    from momkd.train.inputs import check_trainable

    rows = [(f"p{i}", f"s{i}", "A") for i in range(6)]
    path = _write(tmp_path / "c.csv", rows)
    cfg = load_config(None, ["data.classes=[A,B]", "data.label_column=subtype"])
    table = load_clinical(path, label_col="subtype", classes=["A", "B"])
    with pytest.raises(DataError, match="no slide has subtype 'B'"):
        check_trainable(cfg, table, None)


@pytest.mark.parametrize("name", ["pos", "ensemble", "fold1"])
def test_class_names_that_clash_with_prediction_columns_are_refused(name: str) -> None:
    from momkd.config import load_config

    with pytest.raises(ConfigError, match="cannot name a class"):
        load_config(None, [f"data.classes=[A,{name}]"])
