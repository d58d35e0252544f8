"""Patient-level stratified splits, CLAM-format split files."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from momkd.errors import DataError
from momkd.train.splits import Split, make_splits, read_splits, resolve_splits, write_splits


def _cohort(n_patients: int = 61, seed: int = 0) -> tuple[list[str], list[str], np.ndarray]:
    """Slides of patients with 1-3 slides each and ~30 % positive patients."""
    rng = np.random.default_rng(seed)
    slides, cases, labels = [], [], []
    for i in range(n_patients):
        label = int(rng.random() < 0.3)
        for s in range(int(rng.integers(1, 4))):
            slides.append(f"P{i:03d}-DX{s}")
            cases.append(f"P{i:03d}")
            labels.append(label)
    return slides, cases, np.array(labels)


def _case_sets(split: Split, case_of: dict[str, str]) -> dict[str, set[str]]:
    return {name: {case_of[s] for s in getattr(split, name)} for name in ("train", "val", "test")}


@pytest.mark.parametrize("k", [2, 5])
def test_patient_level_and_complete(k: int) -> None:
    slides, cases, labels = _cohort()
    case_of = dict(zip(slides, cases, strict=True))
    splits = make_splits(cases, labels, k=k, val_fraction=0.2, seed=3, slide_ids=slides)
    assert len(splits) == k
    test_folds: Counter[str] = Counter()
    for split in splits:
        sets = _case_sets(split, case_of)
        assert not sets["train"] & sets["val"]
        assert not sets["train"] & sets["test"]
        assert not sets["val"] & sets["test"]
        # Every slide of the cohort is used exactly once per fold.
        used = list(split.train) + list(split.val) + list(split.test)
        assert sorted(used) == sorted(slides)
        test_folds.update(sets["test"])
    assert set(test_folds) == set(cases)
    assert set(test_folds.values()) == {1}


def test_stratification() -> None:
    _, cases, labels = _cohort(n_patients=100, seed=1)
    patient_label = dict(zip(cases, labels.tolist(), strict=True))
    n_pos = sum(patient_label.values())
    overall = n_pos / len(patient_label)
    splits = make_splits(cases, labels, k=5, val_fraction=0.2, seed=0)  # patient ids
    pos_per_fold = [sum(patient_label[c] for c in s.test) for s in splits]
    size_per_fold = [len(s.test) for s in splits]
    assert max(pos_per_fold) - min(pos_per_fold) <= 1
    assert max(size_per_fold) - min(size_per_fold) <= 1
    for s in splits:
        rest = len(s.train) + len(s.val)
        assert abs(len(s.val) - 0.2 * rest) <= 2
        val_share = sum(patient_label[c] for c in s.val) / len(s.val)
        assert abs(val_share - overall) < 0.12
        assert {patient_label[c] for c in s.val} == {0, 1}


def test_deterministic_and_order_independent() -> None:
    slides, cases, labels = _cohort()
    a = make_splits(cases, labels, seed=4, slide_ids=slides)
    b = make_splits(cases, labels, seed=4, slide_ids=slides)
    assert a == b
    perm = np.random.default_rng(0).permutation(len(slides))
    c = make_splits(
        [cases[i] for i in perm], labels[perm], seed=4, slide_ids=[slides[i] for i in perm]
    )
    assert a == c
    assert make_splits(cases, labels, seed=5, slide_ids=slides) != a


def test_val_fraction_zero_and_small_cohort() -> None:
    cases = ["a", "b", "c", "d"]
    splits = make_splits(cases, [0, 1, 0, 1], k=2, val_fraction=0.0)
    assert all(not s.val for s in splits)
    with pytest.raises(DataError, match="3 patients cannot fill 4 folds"):
        make_splits(["a", "b", "c"], [0, 1, 0], k=4)


def test_conflicting_patient_labels() -> None:
    with pytest.raises(DataError, match="patient 'P1'"):
        make_splits(["P0", "P1", "P1", "P2"], [0, 1, 0, 1], k=2)


def test_csv_round_trip_clam_format(tmp_path: Path) -> None:
    slides, cases, labels = _cohort(n_patients=30)
    splits = make_splits(cases, labels, k=3, seed=0, slide_ids=slides)
    paths = write_splits(splits, tmp_path / "splits")
    assert [p.name for p in paths] == ["splits_0.csv", "splits_1.csv", "splits_2.csv"]
    with open(paths[0], newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["train", "val", "test"]
    longest = max(len(splits[0].train), len(splits[0].val), len(splits[0].test))
    assert len(rows) == 1 + longest
    # Shorter columns are padded with empty cells at the bottom.
    assert rows[-1][0] == splits[0].train[-1] and rows[-1][1] == ""
    assert [r[1] for r in rows[1:] if r[1]] == list(splits[0].val)
    assert read_splits(tmp_path / "splits") == splits
    assert not [p for p in (tmp_path / "splits").iterdir() if p.suffix == ".tmp"]


def test_reads_clam_files_with_index_column(tmp_path: Path) -> None:
    (tmp_path / "splits_0.csv").write_text(",train,val,test\n0,s1,s3,s5\n1,s2,,s6\n2,s4,,\n")
    (tmp_path / "splits_0_bool.csv").write_text(",train,val,test\ns1,True,False,False\n")
    (tmp_path / "splits_0_descriptor.csv").write_text(",train,val,test\n0,1,1,1\n")
    assert read_splits(tmp_path) == [Split(("s1", "s2", "s4"), ("s3",), ("s5", "s6"))]


@pytest.mark.parametrize(
    ("content", "msg"),
    [
        ("train,test\na,b\n", "column 'val' missing"),
        ("train,val,test\na,b,a\n", "id 'a' is in both 'train' and 'test'"),
        ("train,val,test\na,,c\na,,d\n", "column 'train' lists ids twice"),
        ("train,val,test\n,b,c\n", "column 'train' is empty"),
        ("", "empty split file"),
    ],
)
def test_bad_user_csv(tmp_path: Path, content: str, msg: str) -> None:
    (tmp_path / "splits_0.csv").write_text(content)
    with pytest.raises(DataError, match=msg) as err:
        read_splits(tmp_path)
    assert "splits_0.csv" in str(err.value)


def test_missing_split_file_in_numbering(tmp_path: Path) -> None:
    for i in (0, 2):
        (tmp_path / f"splits_{i}.csv").write_text("train,val,test\na,b,c\n")
    with pytest.raises(DataError, match=r"splits_1\.csv is missing"):
        read_splits(tmp_path)
    with pytest.raises(DataError, match="split folder not found"):
        read_splits(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no splits_<i>\.csv"):
        read_splits(tmp_path / "empty")


def test_resolve_user_splits() -> None:
    slides = ["A-1", "A-2", "B-1", "C-1", "D-1"]
    cases = ["A", "A", "B", "C", "D"]
    user = [Split(("A", "B-1"), ("C",), ("D-1", "X-9"))]
    (res,) = resolve_splits(user, slides, cases, ignore={"X-9"}, source="/runs/s")
    assert res == Split(("A-1", "A-2", "B-1"), ("C-1",), ("D-1",))

    with pytest.raises(DataError, match=r"splits_0\.csv: column 'test'.*'Z-1'"):
        resolve_splits([Split(("A",), (), ("Z-1",))], slides, cases, source="/runs/s")
    with pytest.raises(DataError, match=r"splits_0\.csv: patient 'A'"):
        resolve_splits([Split(("A-1", "B-1"), (), ("A-2",))], slides, cases, source="/runs/s")


def test_subsample_train_is_stratified_nested_and_keeps_val_test() -> None:
    from momkd.train.splits import subsample_train

    rng = np.random.default_rng(0)
    cases = [f"P{i:02d}" for i in range(40)]
    labels = {c: int(i < 14) for i, c in enumerate(cases)}  # 14 positive, 26 negative
    slides = [f"{c}-{j}" for c in cases for j in range(1 + int(rng.random() < 0.3))]
    case_of = {s: s.split("-")[0] for s in slides}
    label_of = {s: labels[case_of[s]] for s in slides}
    (split,) = make_splits(
        [case_of[s] for s in slides], [label_of[s] for s in slides], k=2, slide_ids=slides
    )[:1]
    train_patients = {
        c: sorted({case_of[s] for s in split.train if label_of[s] == c}) for c in (0, 1)
    }
    kept_before: set[str] = set()
    for fraction in (0.25, 0.5, 1.0):
        sub = subsample_train(split, case_of, label_of, fraction, seed=3, fold=0)
        assert sub.val == split.val and sub.test == split.test
        patients = {case_of[s] for s in sub.train}
        for c, members in train_patients.items():
            expected = max(1, int(np.floor(fraction * len(members) + 0.5)))
            assert len([p for p in patients if labels[p] == c]) == expected
        # Whole patients only: every slide of a kept patient is kept.
        assert set(sub.train) == {s for s in split.train if case_of[s] in patients}
        assert kept_before <= patients  # nested across fractions
        kept_before = patients
    assert subsample_train(split, case_of, label_of, 1.0) is split
    other = subsample_train(split, case_of, label_of, 0.5, seed=4, fold=0)
    assert other.train != subsample_train(split, case_of, label_of, 0.5, seed=3, fold=0).train
    with pytest.raises(DataError, match="fraction"):
        subsample_train(split, case_of, label_of, 0.0)
