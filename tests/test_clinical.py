"""Clinical tables and expression matrices."""

from __future__ import annotations

import csv
import logging
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from momkd.data.clinical import load_clinical, load_expression, require_cases
from momkd.errors import ConfigError, DataError


def _write(path: Path, rows: list[list[str]], delimiter: str = ",", bom: bool = False) -> Path:
    with open(path, "w", newline="", encoding="utf-8-sig" if bom else "utf-8") as fh:
        csv.writer(fh, delimiter=delimiter).writerows(rows)
    return path


ROWS = [
    ["case_id", "slide_id", "her2", "age"],
    ["P1", "P1-DX1", "Positive", "50"],
    ["P1", "P1-DX2", "Positive", "50"],
    ["P2", "P2-DX1", "Negative", "61"],
    ["P3", "P3-DX1", "Equivocal", "47"],
    ["P4", "P4-DX1", "[Not Available]", "70"],
    ["P5", "P5-DX1", " Negative ", "38"],
    ["P6", "P6-DX1", "", "55"],
    ["P7", "P7-DX1", "Equivocal", "59"],
]


def test_unmapped_labels_excluded_and_counted(tmp_path: Path) -> None:
    path = _write(tmp_path / "clin.csv", ROWS)
    t = load_clinical(path, "case_id", "slide_id", "her2", ["Positive"], ["Negative"])
    assert t.slide_ids == ["P1-DX1", "P1-DX2", "P2-DX1", "P5-DX1"]
    assert t.case_ids == ["P1", "P1", "P2", "P5"]
    assert t.labels.dtype == np.int64 and t.labels.tolist() == [1, 1, 0, 0]
    assert t.excluded == Counter({"Equivocal": 2, "[Not Available]": 1, "": 1})
    assert t.n_excluded == 4 and len(t) == 4
    assert t.dropped == {"P3-DX1": "P3", "P4-DX1": "P4", "P6-DX1": "P6", "P7-DX1": "P7"}


def test_numeric_labels_compared_as_strings(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rows = [
        ["case_id", "slide_id", "y"],
        ["a", "a1", "1"],
        ["b", "b1", "0"],
        ["c", "c1", "1.0"],
        ["d", "d1", "2"],
    ]
    path = _write(tmp_path / "clin.csv", rows)
    with caplog.at_level(logging.WARNING):
        t = load_clinical(path, label_col="y", positive=[1], negative=[0])
    assert t.labels.tolist() == [1, 0]
    assert t.excluded == Counter({"1.0": 1, "2": 1})
    assert "1.0" in caplog.text  # a numeric near miss is pointed out
    t2 = load_clinical(path, label_col="y", positive=[1, "1.0"], negative=["0"])
    assert t2.labels.tolist() == [1, 0, 1]


def test_tsv_by_extension_sniffing_and_bom(tmp_path: Path) -> None:
    tsv = _write(tmp_path / "clin.tsv", ROWS, delimiter="\t", bom=True)
    t = load_clinical(tsv, label_col="her2", positive=["Positive"], negative=["Negative"])
    assert len(t) == 4
    txt = _write(tmp_path / "clin.txt", ROWS, delimiter=";")
    t = load_clinical(txt, label_col="her2", positive=["Positive"], negative=["Negative"])
    assert t.slide_ids[0] == "P1-DX1"


def test_missing_column_names_column_and_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "clin.csv", ROWS)
    with pytest.raises(DataError, match=r"clin\.csv: label column 'pr' not found") as err:
        load_clinical(path, label_col="pr", positive=["Positive"], negative=["Negative"])
    assert "her2" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(DataError, match=r"clin\.csv: slide column 'slide'"):
        load_clinical(path, slide_col="slide", label_col="her2", positive=["x"], negative=["y"])


def test_duplicate_slide_error(tmp_path: Path) -> None:
    rows = [*ROWS, ["P9", "P2-DX1", "Negative", "1"]]
    path = _write(tmp_path / "clin.csv", rows)
    with pytest.raises(
        DataError, match=r"clin\.csv: duplicate slide_id 'P2-DX1' \(lines 4 and 10\)"
    ):
        load_clinical(path, label_col="her2", positive=["Positive"], negative=["Negative"])


def test_other_clinical_errors(tmp_path: Path) -> None:
    path = _write(tmp_path / "clin.csv", [["case_id", "slide_id", "y"], ["a", "", "1"]])
    with pytest.raises(DataError, match="line 2: empty slide_id"):
        load_clinical(path, label_col="y", positive=[1], negative=[0])
    path = _write(tmp_path / "c2.csv", [["case_id", "slide_id", "y"], ["a", "a1", "x"]])
    with pytest.raises(DataError, match="no slide has a y value"):
        load_clinical(path, label_col="y", positive=[1], negative=[0])
    with pytest.raises(ConfigError, match="both positive and negative"):
        load_clinical(path, label_col="y", positive=[1], negative=["1"])
    with pytest.raises(DataError, match="file not found"):
        load_clinical(tmp_path / "nope.csv", label_col="y", positive=[1], negative=[0])
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match="empty file"):
        load_clinical(tmp_path / "empty.csv", label_col="y", positive=[1], negative=[0])


def _matrix() -> tuple[list[str], list[str], np.ndarray]:
    rng = np.random.default_rng(0)
    return ["P1", "P2", "P5"], ["G1", "G2", "G3", "G4"], rng.gamma(2.0, 10.0, size=(3, 4))


def _write_matrix(
    path: Path, rows: list[str], cols: list[str], m: np.ndarray, corner: str, delimiter: str = ","
) -> Path:
    table = [[corner, *cols]] + [[r, *[repr(float(v)) for v in m[i]]] for i, r in enumerate(rows)]
    return _write(path, table, delimiter)


def test_expression_orientations_agree(tmp_path: Path) -> None:
    cases, genes, m = _matrix()
    a = load_expression(_write_matrix(tmp_path / "pxg.csv", cases, genes, m, "case_id"))
    b = load_expression(
        _write_matrix(tmp_path / "gxp.tsv", genes, cases, m.T, "gene", "\t"), "genes_x_patients"
    )
    for e in (a, b):
        assert e.case_ids == cases and e.gene_names == genes
        assert e.matrix.dtype == np.float64
        np.testing.assert_array_equal(e.matrix, m)
    np.testing.assert_array_equal(a.rows(["P5", "P1", "P1"]), m[[2, 0, 0]])
    with pytest.raises(DataError, match="no expression for patients 'P9'"):
        a.rows(["P9"])
    sub = load_expression(tmp_path / "pxg.csv", case_ids=["P5", "P9", "P1"])
    assert sub.case_ids == ["P5", "P1"]
    np.testing.assert_array_equal(sub.matrix, m[[2, 0]])


@pytest.mark.parametrize(
    ("cell", "is_log", "msg"),
    [
        ("abc", False, "patient 'P2', gene 'G3': non-numeric value 'abc'"),
        ("", False, "patient 'P2', gene 'G3': non-numeric value an empty cell"),
        ("nan", False, "patient 'P2', gene 'G3': non-finite value"),
        ("-1.5", False, "patient 'P2', gene 'G3': negative value -1.5"),
    ],
)
def test_expression_bad_values(tmp_path: Path, cell: str, is_log: bool, msg: str) -> None:
    cases, genes, m = _matrix()
    path = _write_matrix(tmp_path / "expr.csv", cases, genes, m, "case_id")
    rows = list(csv.reader(path.open()))
    rows[2][3] = cell
    _write(path, rows)
    with pytest.raises(DataError, match=msg) as err:
        load_expression(path, is_log=is_log)
    assert str(err.value).startswith(str(path))


def test_expression_log_scale_allows_negative(tmp_path: Path) -> None:
    cases, genes, m = _matrix()
    path = _write_matrix(tmp_path / "expr.csv", cases, genes, np.log2(m + 1) - 5, "case_id")
    assert (load_expression(path, is_log=True).matrix < 0).any()


def test_expression_structure_errors(tmp_path: Path) -> None:
    _write(tmp_path / "dup.csv", [["id", "G1", "G1"], ["P1", "1", "2"]])
    with pytest.raises(DataError, match="duplicate gene ids 'G1'"):
        load_expression(tmp_path / "dup.csv")
    _write(tmp_path / "dupp.csv", [["id", "G1"], ["P1", "1"], ["P1", "2"]])
    with pytest.raises(DataError, match="duplicate patient ids 'P1'"):
        load_expression(tmp_path / "dupp.csv")
    _write(tmp_path / "ragged.csv", [["id", "G1", "G2"], ["P1", "1"]])
    with pytest.raises(DataError, match="line 2: 2 fields, the header has 3"):
        load_expression(tmp_path / "ragged.csv")
    with pytest.raises(ConfigError, match="orientation"):
        load_expression(tmp_path / "dup.csv", "rows")  # type: ignore[arg-type]


def test_parquet_without_pyarrow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    (tmp_path / "e.parquet").write_bytes(b"PAR1")
    with pytest.raises(ConfigError, match="needs pyarrow"):
        load_expression(tmp_path / "e.parquet")


def test_parquet_with_pyarrow(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    cases, genes, m = _matrix()
    table = pa.table({"case_id": cases, **{g: m[:, j] for j, g in enumerate(genes)}})
    pq.write_table(table, tmp_path / "e.parquet")
    e = load_expression(tmp_path / "e.parquet")
    assert e.case_ids == cases and e.gene_names == genes
    np.testing.assert_array_equal(e.matrix, m)


def test_require_cases(tmp_path: Path) -> None:
    clin = _write(tmp_path / "clin.csv", ROWS)
    table = load_clinical(clin, label_col="her2", positive=["Positive"], negative=["Negative"])
    cases, genes, m = _matrix()  # P1, P2, P5 -> all labelled patients covered
    expr = load_expression(_write_matrix(tmp_path / "e.csv", cases, genes, m, "case_id"))
    same, missing = require_cases(table, expr)
    assert same is table and missing == []

    partial = load_expression(tmp_path / "e.csv", case_ids=["P1"])
    with pytest.raises(
        DataError, match=r"2 patients of .*clin\.csv have no expression: 'P2', 'P5'"
    ):
        require_cases(table, partial)
    kept, missing = require_cases(table, partial, skip_missing=True)
    assert missing == ["P2", "P5"]
    assert kept.slide_ids == ["P1-DX1", "P1-DX2"] and kept.labels.tolist() == [1, 1]
    assert {"P2-DX1", "P5-DX1"} <= set(kept.dropped)
