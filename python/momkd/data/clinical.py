"""Clinical tables and expression matrices (docs/METHOD.md §1.2).

* :func:`load_clinical` reads a CSV/TSV with one row per slide (patient id, slide id, label column)
  and maps label values explicitly: values listed in ``positive`` become 1, values listed in
  ``negative`` become 0, anything else (``"Equivocal"``, ``"[Not Available]"``, empty) is excluded
  and counted, never silently negative. Values are compared as strings after stripping whitespace, so
  ``positive: [1]`` matches a cell ``1`` (but not ``1.0``).
* :func:`load_expression` reads a patients × genes (or genes × patients) matrix from CSV/TSV, or
  Parquet when ``pyarrow`` is installed. The first column holds the row ids, the header the column
  ids.
* :func:`require_cases` checks that every patient of a clinical table has an expression vector
  (several slides of one patient share it).

Only the standard library and numpy are used (no pandas).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from momkd.errors import ConfigError, DataError

__all__ = [
    "ClinicalTable",
    "Expression",
    "load_clinical",
    "load_expression",
    "require_both_classes",
    "require_cases",
]

log = logging.getLogger(__name__)

_TAB_SUFFIXES = {".tsv", ".tab"}
_PARQUET_SUFFIXES = {".parquet", ".pq"}
_SHOW = 5  # ids listed in an error message before "..."


def _preview(items: Sequence[str], n: int = _SHOW) -> str:
    shown = ", ".join(repr(s) for s in items[:n])
    return shown + (f", ... ({len(items)} in total)" if len(items) > n else "")


# ------------------------------------------------------------------------------------ CSV reading


def _open(path: Path) -> io.TextIOWrapper:
    try:
        return open(path, encoding="utf-8-sig", newline="")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected a CSV/TSV file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from None


def _delimiter(path: Path, sample: str) -> str:
    """Tab for .tsv/.tab, comma for .csv, unless the header clearly says otherwise."""
    first = sample.split("\n", 1)[0]
    guess = "\t" if path.suffix.lower() in _TAB_SUFFIXES else ","
    if path.suffix.lower() in _TAB_SUFFIXES | {".csv"} and guess in first:
        return guess
    try:
        return csv.Sniffer().sniff(sample, delimiters=",\t;|").delimiter
    except csv.Error:
        return guess


def _read_rows(path: Path) -> tuple[list[str], Iterator[tuple[int, list[str]]]]:
    """Header (stripped) and a streaming iterator of (line number, cells) for non-blank rows."""
    fh = _open(path)
    try:
        sample = fh.read(65536)
        fh.seek(0)
        reader = csv.reader(fh, delimiter=_delimiter(path, sample))
        header = next(reader)
    except StopIteration:
        fh.close()
        raise DataError(f"{path}: empty file (no header row)") from None
    except UnicodeDecodeError as exc:
        fh.close()
        raise DataError(f"{path}: not UTF-8 text ({exc.reason})") from None
    except csv.Error as exc:
        fh.close()
        raise DataError(f"{path}: line 1: malformed CSV: {exc}") from None

    def rows() -> Iterator[tuple[int, list[str]]]:
        with fh:
            while True:
                try:
                    cells = next(reader)
                except StopIteration:
                    return
                except UnicodeDecodeError as exc:
                    raise DataError(f"{path}: not UTF-8 text ({exc.reason})") from None
                except csv.Error as exc:
                    raise DataError(
                        f"{path}: line {reader.line_num}: malformed CSV: {exc}"
                    ) from None
                if cells and any(c.strip() for c in cells):
                    yield reader.line_num, cells

    return [h.strip() for h in header], rows()


# -------------------------------------------------------------------------------------- clinical


@dataclass(frozen=True)
class ClinicalTable:
    """Labelled slides of a cohort (only slides whose label is mapped).

    Attributes
    ----------
    path
        The clinical file.
    slide_ids, case_ids
        ``(n,)`` slide ids and the patient of each slide, in file order.
    labels
        ``(n,)`` int64 class indices: 1 = positive, 0 = negative; with ``data.classes`` the index
        of the value in that list.
    excluded
        Count of slides per unmapped label value (stripped text; ``""`` for an empty cell).
    label_column
        The column the labels were read from.
    dropped
        Slide id -> patient id of rows left out: unmapped label, or (after :func:`require_cases`
        with skipping) no expression. Useful to tell such slides from unknown ones.
    class_names
        Name of each class in index order (the ``classes`` values; ``negative``, ``positive`` for
        a binary mapping).
    """

    path: Path
    slide_ids: list[str]
    case_ids: list[str]
    labels: np.ndarray
    excluded: Counter[str] = field(default_factory=Counter)
    label_column: str = "label"
    dropped: dict[str, str] = field(default_factory=dict)
    class_names: list[str] = field(default_factory=lambda: ["negative", "positive"])

    @property
    def n_classes(self) -> int:
        """Number of classes of the label mapping (2 for positive/negative)."""
        return len(self.class_names)

    def class_counts(self) -> list[int]:
        """Slides per class, in class order."""
        return np.bincount(self.labels, minlength=self.n_classes).astype(int).tolist()

    def __len__(self) -> int:
        return len(self.slide_ids)

    @property
    def n_excluded(self) -> int:
        """Number of slides excluded because their label value is not mapped."""
        return sum(self.excluded.values())

    def label_of(self) -> dict[str, int]:
        """Slide id -> label."""
        return dict(zip(self.slide_ids, self.labels.tolist(), strict=True))

    def case_of(self) -> dict[str, str]:
        """Slide id -> patient id."""
        return dict(zip(self.slide_ids, self.case_ids, strict=True))

    def subset(self, slide_ids: Iterable[str]) -> ClinicalTable:
        """The rows of the given slides, in the given order.

        Raises
        ------
        DataError
            A slide id that is not in the table.
        """
        index = {s: i for i, s in enumerate(self.slide_ids)}
        wanted = list(slide_ids)
        missing = [s for s in wanted if s not in index]
        if missing:
            raise DataError(f"{self.path}: slides not in the table: {_preview(missing)}")
        rows = [index[s] for s in wanted]
        return ClinicalTable(
            path=self.path,
            slide_ids=[self.slide_ids[i] for i in rows],
            case_ids=[self.case_ids[i] for i in rows],
            labels=self.labels[rows].copy(),
            excluded=Counter(self.excluded),
            label_column=self.label_column,
            dropped=dict(self.dropped),
            class_names=list(self.class_names),
        )


def _label_strings(values: Iterable[Any]) -> set[str]:
    return {str(v).strip() for v in values}


def _column(path: Path, header: list[str], name: str, key: str) -> int:
    hits = [i for i, h in enumerate(header) if h == name]
    if not hits:
        cols = ", ".join(header[:20]) + (", ..." if len(header) > 20 else "")
        raise DataError(f"{path}: {key} '{name}' not found (columns: {cols})")
    if len(hits) > 1:
        raise DataError(f"{path}: {key} '{name}' appears {len(hits)} times in the header")
    return hits[0]


def load_clinical(
    path: str | os.PathLike[str],
    case_col: str = "case_id",
    slide_col: str = "slide_id",
    label_col: str = "label",
    positive: Sequence[Any] = (),
    negative: Sequence[Any] = (),
    case_insensitive: bool = False,
    classes: Sequence[Any] = (),
) -> ClinicalTable:
    """Read a clinical table and map its labels.

    Parameters
    ----------
    path
        CSV or TSV file (delimiter from the extension, sniffed otherwise), one row per slide.
    case_col, slide_col, label_col
        Column names of the patient id, slide id and label.
    positive, negative
        Label values of class 1 and class 0, compared as stripped strings (``1`` matches ``"1"``).
    case_insensitive
        Also ignore case (``positive`` matches ``Positive``). When false, values that differ from
        a mapped value only in case are excluded and named in one warning with their counts.
    classes
        Instead of ``positive``/``negative``: the ordered label values of a multi-class label,
        value ``i`` mapped to class ``i`` (compared as ``positive`` and ``negative`` are).

    Returns
    -------
    ClinicalTable
        The mapped slides; other values are counted in ``excluded``.

    Raises
    ------
    DataError
        Missing file or column (naming the column and file), empty id, duplicate slide id, a value
        in both mappings, or no slide with a mapped label.
    """
    file = Path(path)
    fold = (lambda v: v.casefold()) if case_insensitive else (lambda v: v)
    names = [str(v).strip() for v in classes]
    if names:
        if positive or negative:
            raise ConfigError(
                f"{file}: label mapping for '{label_col}': give classes or positive/negative, "
                "not both"
            )
        mapping = {fold(v): i for i, v in reversed(list(enumerate(names)))}
        if len(mapping) < len(names) or len(names) < 2:
            raise ConfigError(
                f"{file}: label mapping for '{label_col}' needs two or more distinct classes, "
                f"got {names}" + (" (ignoring case)" if case_insensitive else "")
            )
        pos, neg = set(), set()
        class_names = names
    else:
        pos, neg = _label_strings(positive), _label_strings(negative)
        if not pos or not neg:
            raise ConfigError(
                f"{file}: label mapping for '{label_col}' needs positive and negative values"
            )
        pos, neg = {fold(v) for v in pos}, {fold(v) for v in neg}
        if pos & neg:
            raise ConfigError(
                f"{file}: label values in both positive and negative: {sorted(pos & neg)}"
                + (" (ignoring case)" if case_insensitive else "")
            )
        mapping = {**{v: 0 for v in neg}, **{v: 1 for v in pos}}
        class_names = ["negative", "positive"]
    header, rows = _read_rows(file)
    i_case = _column(file, header, case_col, "case column")
    i_slide = _column(file, header, slide_col, "slide column")
    i_label = _column(file, header, label_col, "label column")
    width = max(i_case, i_slide, i_label) + 1

    slide_ids: list[str] = []
    case_ids: list[str] = []
    labels: list[int] = []
    excluded: Counter[str] = Counter()
    dropped: dict[str, str] = {}
    seen: dict[str, int] = {}
    for line, cells in rows:
        if len(cells) < width:
            cells = cells + [""] * (width - len(cells))
        slide, case, value = cells[i_slide].strip(), cells[i_case].strip(), cells[i_label].strip()
        if not slide:
            raise DataError(f"{file}: line {line}: empty {slide_col}")
        if slide in seen:
            raise DataError(
                f"{file}: duplicate {slide_col} '{slide}' (lines {seen[slide]} and {line})"
            )
        seen[slide] = line
        if not case:
            raise DataError(f"{file}: line {line}: empty {case_col} for slide '{slide}'")
        label = mapping.get(fold(value))
        if label is None:
            excluded[value] += 1
            dropped[slide] = case
            continue
        slide_ids.append(slide)
        case_ids.append(case)
        labels.append(label)

    if excluded:
        shown = ", ".join(f"{v or '<empty>'!s}: {n}" for v, n in excluded.most_common())
        log.info(
            "%s: excluded %d slides with unmapped %s (%s)",
            file,
            sum(excluded.values()),
            label_col,
            shown,
        )
        _warn_numeric_near_miss(file, label_col, excluded, set(mapping))
        if not case_insensitive:
            _warn_case_near_miss(file, label_col, excluded, set(mapping))
    if not slide_ids:
        wanted = (
            f"classes {names}" if names else f"positive {sorted(pos)} or negative {sorted(neg)}"
        )
        raise DataError(f"{file}: no slide has a {label_col} value in {wanted}")
    arr = np.asarray(labels, dtype=np.int64)
    if arr.min() == arr.max():
        log.warning("%s: every labelled slide has %s class %d", file, label_col, int(arr[0]))
    return ClinicalTable(
        file, slide_ids, case_ids, arr, excluded, label_col, dropped, class_names=class_names
    )


def _case_near_misses(excluded: Counter[str], mapped: set[str]) -> list[tuple[str, int, str]]:
    """Excluded values that differ from a mapped value only in case: (value, count, mapped)."""
    folded: dict[str, str] = {}
    for m in sorted(mapped):
        folded.setdefault(m.casefold(), m)
    return [
        (v, n, folded[v.casefold()]) for v, n in excluded.most_common() if v.casefold() in folded
    ]


def require_both_classes(
    table: ClinicalTable, positive: Sequence[Any], negative: Sequence[Any]
) -> None:
    """Check that ``table`` has slides of both classes, as training needs.

    Parameters
    ----------
    table
        Labelled slides (from :func:`load_clinical`).
    positive, negative
        The label mapping (``data.positive``, ``data.negative``), named in the error.

    Raises
    ------
    DataError
        One class only, naming the column, the counts and, when excluded values differ from a
        mapped one only in case, those values and the keys that would keep them.
    """
    n_pos = int(table.labels.sum())
    if 0 < n_pos < len(table):
        return
    pos, neg = sorted(_label_strings(positive)), sorted(_label_strings(negative))
    missing = f"positive {pos}" if n_pos == 0 else f"negative {neg}"
    text = (
        f"{table.path}: no slide has a {table.label_column} value in {missing}; "
        f"{len(table)} slides mapped, all to class {1 if n_pos else 0}, and training needs both "
        "classes"
    )
    near = _case_near_misses(table.excluded, set(pos) | set(neg))
    if near:
        shown = ", ".join(f"'{v}' ({n} slides)" for v, n, _ in near)
        text += (
            f"; values that differ from the mapping only in case were excluded: {shown}: set "
            "data.label_case_insensitive: true or list them in data.positive/data.negative"
        )
    raise DataError(text)


def require_classes(table: ClinicalTable, folds: int | None = None) -> None:
    """Check that every class of a multi-class table has slides, and, when ``folds`` is given,
    at least that many patients (so that every stratified test fold holds each class).

    Raises
    ------
    DataError
        One line naming the column, the class and its counts.
    """
    patients: dict[int, set[str]] = {c: set() for c in range(table.n_classes)}
    for case, label in zip(table.case_ids, table.labels.tolist(), strict=True):
        patients[int(label)].add(case)
    empty = [table.class_names[c] for c, p in patients.items() if not p]
    if empty:
        raise DataError(
            f"{table.path}: no slide has {table.label_column} "
            f"{', '.join(map(repr, empty))}; training needs every class of data.classes "
            f"{table.class_names} (remove the class from data.classes or add its slides)"
        )
    if folds is None:
        return
    few = [(table.class_names[c], len(p)) for c, p in patients.items() if len(p) < folds]
    if few:
        shown = ", ".join(f"{name!r} has {n}" for name, n in few)
        raise DataError(
            f"{table.path}: {table.label_column} class {shown} patient(s), fewer than the "
            f"{folds} folds of splits.k; lower splits.k or merge the class into another"
        )


def _warn_case_near_miss(
    file: Path, label_col: str, excluded: Counter[str], mapped: set[str]
) -> None:
    """Warn once, naming each value and its count, when excluded values differ from a mapped value
    only in case (``positive`` vs ``Positive``)."""
    near = _case_near_misses(excluded, mapped)
    if near:
        shown = ", ".join(f"'{v}' ({n} slides, like '{m}')" for v, n, m in near)
        log.warning(
            "%s: %s values differ from the label mapping only in case and were excluded: %s; "
            "list them in data.positive/data.negative or set data.label_case_insensitive: true",
            file,
            label_col,
            shown,
        )


def _warn_numeric_near_miss(
    file: Path, label_col: str, excluded: Counter[str], mapped: set[str]
) -> None:
    """Warn when an excluded value equals a mapped one as a number (e.g. ``1.0`` vs ``1``)."""

    def number(text: str) -> float | None:
        try:
            return float(text)
        except ValueError:
            return None

    targets = {number(m) for m in mapped} - {None}
    near = [v for v in excluded if number(v) is not None and number(v) in targets]
    if near:
        log.warning(
            "%s: %s values %s were excluded although they equal a mapped value as numbers; "
            "labels are compared as strings, list them explicitly to include them",
            file,
            label_col,
            near,
        )


# ------------------------------------------------------------------------------------ expression


@dataclass(frozen=True)
class Expression:
    """A bulk expression matrix, one row per patient.

    Attributes
    ----------
    path
        The source file.
    case_ids
        ``(n,)`` patient ids.
    gene_names
        ``(G,)`` gene names.
    matrix
        ``(n, G)`` float64 values as read (raw or log-scale).
    orientation
        The file's layout as read: ``patients_x_genes`` or ``genes_x_patients``.
    """

    path: Path
    case_ids: list[str]
    gene_names: list[str]
    matrix: np.ndarray
    orientation: str = "patients_x_genes"

    def __len__(self) -> int:
        return len(self.case_ids)

    def rows(self, case_ids: Sequence[str]) -> np.ndarray:
        """The expression vectors of the given patients.

        Parameters
        ----------
        case_ids
            ``(m,)`` patient ids (repeats allowed, e.g. one per slide).

        Returns
        -------
        np.ndarray
            ``(m, G)`` float64.

        Raises
        ------
        DataError
            Patients without expression, listing the first few.
        """
        index = {c: i for i, c in enumerate(self.case_ids)}
        missing = [c for c in dict.fromkeys(case_ids) if c not in index]
        if missing:
            raise DataError(f"{self.path}: no expression for patients {_preview(missing)}")
        return self.matrix[[index[c] for c in case_ids]]


def _parse_row(
    path: Path, row_id: str, labels: list[str], cells: list[str], rows_are: str, cols_are: str
) -> np.ndarray:
    try:
        return np.array(cells, dtype=np.float64)
    except ValueError:
        pass
    for name, cell in zip(labels, cells, strict=True):
        try:
            float(cell)
        except ValueError:
            shown = repr(cell.strip()) if cell.strip() else "an empty cell"
            raise DataError(
                f"{path}: {rows_are} '{row_id}', {cols_are} '{name}': non-numeric value {shown}"
            ) from None
    raise DataError(f"{path}: {rows_are} '{row_id}': non-numeric values")  # pragma: no cover


def _read_delimited(
    path: Path, rows_are: str, cols_are: str
) -> tuple[list[str], list[str], np.ndarray]:
    header, rows = _read_rows(path)
    col_ids = header[1:]
    if not col_ids:
        raise DataError(f"{path}: header has no {cols_are} columns")
    row_ids: list[str] = []
    values: list[np.ndarray] = []
    for line, cells in rows:
        if len(cells) != len(header):
            raise DataError(
                f"{path}: line {line}: {len(cells)} fields, the header has {len(header)}"
            )
        row_id = cells[0].strip()
        if not row_id:
            raise DataError(f"{path}: line {line}: empty {rows_are} id")
        row_ids.append(row_id)
        values.append(_parse_row(path, row_id, col_ids, cells[1:], rows_are, cols_are))
    if not values:
        raise DataError(f"{path}: no data rows")
    return row_ids, col_ids, np.vstack(values)


def _read_parquet(
    path: Path, rows_are: str, cols_are: str
) -> tuple[list[str], list[str], np.ndarray]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(
            f"{path}: reading Parquet needs pyarrow (pip install pyarrow), or use CSV/TSV"
        ) from None
    try:
        table = pq.read_table(path)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except Exception as exc:  # pyarrow raises several unrelated types for corrupt files
        raise DataError(f"{path}: cannot read Parquet: {exc}") from None
    names = [str(n).strip() for n in table.column_names]
    if len(names) < 2:
        raise DataError(f"{path}: needs an id column and at least one {cols_are} column")
    row_ids = [str(v).strip() for v in table.column(0).to_pylist()]
    columns = []
    for name in names[1:]:
        col = table.column(name)
        try:
            columns.append(np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.float64))
        except (ValueError, TypeError):
            bad = next(
                (i for i, v in enumerate(col.to_pylist()) if not isinstance(v, (int, float))), 0
            )
            raise DataError(
                f"{path}: {rows_are} '{row_ids[bad]}', {cols_are} '{name}': non-numeric value "
                f"{col.to_pylist()[bad]!r}"
            ) from None
    if not row_ids:
        raise DataError(f"{path}: no data rows")
    return row_ids, names[1:], np.column_stack(columns)


def load_expression(
    path: str | os.PathLike[str],
    orientation: Literal["patients_x_genes", "genes_x_patients"] = "patients_x_genes",
    case_ids: Sequence[str] | None = None,
    *,
    is_log: bool = False,
) -> Expression:
    """Read an expression matrix.

    Parameters
    ----------
    path
        CSV/TSV (first column = row ids, header = column ids) or Parquet (first column = row ids;
        needs ``pyarrow``).
    orientation
        ``patients_x_genes`` (one row per patient) or ``genes_x_patients`` (one row per gene).
    case_ids
        If given, keep only these patients, in this order; patients absent from the file are left
        out (use :func:`require_cases` to report them).
    is_log
        ``False`` (raw counts/TPM): negative values are an error. ``True``: log-scale, any finite
        value is accepted.

    Returns
    -------
    Expression
        ``matrix`` is ``(n, G)`` float64.

    Raises
    ------
    DataError
        Unreadable file, ragged rows, non-numeric, NaN/Inf or (raw) negative values naming the
        patient and gene, duplicate patient or gene ids.
    ConfigError
        Bad orientation, or Parquet without pyarrow.
    """
    file = Path(path)
    if orientation == "patients_x_genes":
        rows_are, cols_are = "patient", "gene"
    elif orientation == "genes_x_patients":
        rows_are, cols_are = "gene", "patient"
    else:
        raise ConfigError(
            f"{file}: expression orientation must be patients_x_genes or genes_x_patients, "
            f"got {orientation!r}"
        )
    reader = _read_parquet if file.suffix.lower() in _PARQUET_SUFFIXES else _read_delimited
    row_ids, col_ids, values = reader(file, rows_are, cols_are)
    if orientation == "genes_x_patients":
        cases, genes, matrix = col_ids, row_ids, np.ascontiguousarray(values.T)
    else:
        cases, genes, matrix = row_ids, col_ids, values

    for kind, ids in (("patient", cases), ("gene", genes)):
        if any(not i for i in ids):
            raise DataError(f"{file}: empty {kind} id in the header")
        dupes = [i for i, n in Counter(ids).items() if n > 1]
        if dupes:
            raise DataError(f"{file}: duplicate {kind} ids {_preview(dupes)}")

    bad = ~np.isfinite(matrix)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise DataError(
            f"{file}: patient '{cases[r]}', gene '{genes[c]}': non-finite value {matrix[r, c]} "
            f"({int(bad.sum())} in total)"
        )
    if not is_log:
        neg = matrix < 0
        if neg.any():
            r, c = np.argwhere(neg)[0]
            raise DataError(
                f"{file}: patient '{cases[r]}', gene '{genes[c]}': negative value {matrix[r, c]} "
                "in a raw matrix (set data.expression_is_log: true if it is log-scale)"
            )

    if case_ids is not None:
        index = {c: i for i, c in enumerate(cases)}
        keep = [c for c in dict.fromkeys(case_ids) if c in index]
        matrix = matrix[[index[c] for c in keep]]
        cases = keep
    log.info("%s: expression of %d patients x %d genes", file, matrix.shape[0], matrix.shape[1])
    return Expression(file, list(cases), list(genes), matrix, orientation)


def require_cases(
    table: ClinicalTable, expression: Expression, *, skip_missing: bool = False
) -> tuple[ClinicalTable, list[str]]:
    """Check that every patient of ``table`` has an expression vector.

    Parameters
    ----------
    table
        Labelled slides.
    expression
        The expression matrix.
    skip_missing
        ``False``: missing patients are an error. ``True``: their slides are dropped, logged and
        returned.

    Returns
    -------
    tuple[ClinicalTable, list[str]]
        The table restricted to patients with expression, and the skipped patient ids.

    Raises
    ------
    DataError
        Patients without expression (listing the first few) when skipping is not allowed, or no
        patient left after skipping.
    """
    have = set(expression.case_ids)
    missing = [c for c in dict.fromkeys(table.case_ids) if c not in have]
    if not missing:
        return table, []
    genes = set(expression.gene_names)
    crossed = [c for c in missing if c in genes]
    if crossed:
        # The patient ids are on the gene axis: the file is laid out the other way round, and
        # skipping patients would only skip them all.
        other = (
            "genes_x_patients"
            if expression.orientation == "patients_x_genes"
            else "patients_x_genes"
        )
        axis = "header" if expression.orientation == "patients_x_genes" else "first column"
        raise DataError(
            f"{expression.path}: patients of {table.path} ({_preview(crossed)}) are in the "
            f"{axis}, where data.expression_orientation: {expression.orientation} expects gene "
            f"ids; set data.expression_orientation: {other}"
        )
    if not skip_missing:
        raise DataError(
            f"{expression.path}: {len(missing)} patients of {table.path} have no expression: "
            f"{_preview(missing)} (set data.skip_missing: true to skip them)"
        )
    lost = set(missing)
    keep = [s for s, c in zip(table.slide_ids, table.case_ids, strict=True) if c not in lost]
    if not keep:
        raise DataError(f"{expression.path}: no patient of {table.path} has expression")
    log.warning(
        "%s: skipping %d slides of %d patients without expression: %s",
        expression.path,
        len(table) - len(keep),
        len(missing),
        _preview(missing),
    )
    kept = table.subset(keep)
    dropped = dict(table.dropped)
    dropped.update(
        (s, c) for s, c in zip(table.slide_ids, table.case_ids, strict=True) if c in lost
    )
    return dataclasses.replace(kept, dropped=dropped), missing
