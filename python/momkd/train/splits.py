"""Patient-level, label-stratified k-fold splits (docs/METHOD.md §1.2, §2.6).

Every patient lands in exactly one test fold; the validation set of a fold is a stratified
``val_fraction`` of the remaining patients, and the rest is the training set. All slides of a
patient are always on the same side. Split files follow the CLAM convention: ``splits_<i>.csv`` with columns
``train``, ``val`` and ``test`` of different lengths, padded with empty cells. Files written by CLAM
(with an extra unnamed index column) are read as well.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from momkd._io import atomic_write_text
from momkd.errors import DataError

__all__ = [
    "Split",
    "make_splits",
    "read_splits",
    "resolve_splits",
    "subsample_train",
    "write_splits",
]

log = logging.getLogger(__name__)

_COLUMNS = ("train", "val", "test")
_FILE_RE = re.compile(r"^splits_(\d+)\.csv$")
_SHOW = 5


def _preview(items: Sequence[str]) -> str:
    shown = ", ".join(repr(s) for s in items[:_SHOW])
    return shown + (f", ... ({len(items)} in total)" if len(items) > _SHOW else "")


@dataclass(frozen=True)
class Split:
    """One fold: disjoint id sets (slide ids or patient ids, see :func:`make_splits`)."""

    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]

    def __post_init__(self) -> None:
        for name in _COLUMNS:
            object.__setattr__(self, name, tuple(getattr(self, name)))


def _patient_labels(case_ids: Sequence[str], labels: np.ndarray) -> dict[str, int]:
    out: dict[str, int] = {}
    for case, label in zip(case_ids, labels.tolist(), strict=True):
        prev = out.setdefault(case, label)
        if prev != label:
            raise DataError(f"patient '{case}' has slides with different labels (0 and 1)")
    return out


def _round_half_up(x: float) -> int:
    return int(np.floor(x + 0.5))


def make_splits(
    case_ids: Sequence[str],
    labels: Sequence[int] | np.ndarray,
    k: int = 5,
    val_fraction: float = 0.2,
    seed: int = 0,
    *,
    slide_ids: Sequence[str] | None = None,
) -> list[Split]:
    """Patient-level, label-stratified k-fold splits.

    Patients of each class are shuffled (seeded) and dealt round-robin to the ``k`` test folds,
    continuing the deal across classes, so that fold sizes differ by at most one and each class's
    count per fold differs by at most one. For fold ``i`` the validation set takes
    ``round(val_fraction * n_c)`` of the remaining patients of each class ``c`` (at least one per
    class when the class has two or more, so that validation AUC is defined, and never all of them).
    The result does not depend on the order of the input rows.

    Parameters
    ----------
    case_ids
        ``(n,)`` patient id of each slide (or of each patient).
    labels
        ``(n,)`` class index (0/1, or 0..C-1 for C classes) of each slide; all slides of a
        patient must agree.
    k
        Number of folds (>= 2).
    val_fraction
        Share of the non-test patients used for validation, in ``[0, 1)``.
    seed
        Seed of the assignment.
    slide_ids
        ``(n,)`` slide ids. If given, the splits list slide ids (all slides of each patient);
        otherwise they list patient ids.

    Returns
    -------
    list[Split]
        ``k`` splits; ids sorted within each set.

    Raises
    ------
    DataError
        Mismatched lengths, negative or non-integer labels, a patient with conflicting labels, or
        fewer patients than folds.
    """
    y = np.asarray(labels)
    cases = [str(c) for c in case_ids]
    if y.ndim != 1 or len(y) != len(cases):
        raise DataError(f"make_splits: {len(cases)} case ids but labels of shape {y.shape}")
    if slide_ids is not None and len(slide_ids) != len(cases):
        raise DataError(f"make_splits: {len(cases)} case ids but {len(slide_ids)} slide ids")
    if not cases:
        raise DataError("make_splits: no slides to split")
    if y.dtype.kind == "f" and np.isfinite(y).all() and (y == np.round(y)).all():
        y = y.astype(np.int64)  # 0.0/1.0 from a float column
    if y.dtype.kind not in "iub" or (y < 0).any():
        raise DataError(
            f"make_splits: labels must be class indices >= 0, got {sorted(set(y.tolist()))[:10]}"
        )
    if k < 2:
        raise DataError(f"make_splits: k must be >= 2, got {k}")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"make_splits: val_fraction must be in [0, 1), got {val_fraction}")

    patient_label = _patient_labels(cases, y.astype(np.int64))
    if len(patient_label) < k:
        raise DataError(f"make_splits: {len(patient_label)} patients cannot fill {k} folds")
    classes = range(max(2, int(y.max()) + 1))
    by_class = {c: sorted(p for p, lab in patient_label.items() if lab == c) for c in classes}
    for c, members in by_class.items():
        if len(members) < k:
            log.warning(
                "class %d has %d patients for %d folds: some test folds have none",
                c,
                len(members),
                k,
            )

    rng = np.random.default_rng(seed)
    fold_of: dict[str, int] = {}
    offset = 0
    for c in classes:
        members = by_class[c]
        for i, j in enumerate(rng.permutation(len(members))):
            fold_of[members[j]] = (offset + i) % k
        offset = (offset + len(members)) % k

    members_of: dict[str, list[str]] = defaultdict(list)
    if slide_ids is None:
        for p in patient_label:
            members_of[p].append(p)
    else:
        for case, slide in zip(cases, slide_ids, strict=True):
            members_of[case].append(str(slide))

    splits = []
    for fold in range(k):
        fold_rng = np.random.default_rng([seed, fold])
        test = [p for p in patient_label if fold_of[p] == fold]
        val: list[str] = []
        for c in classes:
            rest = [p for p in by_class[c] if fold_of[p] != fold]
            n_val = 0
            if val_fraction > 0 and len(rest) >= 2:
                n_val = min(max(1, _round_half_up(val_fraction * len(rest))), len(rest) - 1)
            order = fold_rng.permutation(len(rest))
            val.extend(rest[j] for j in order[:n_val])
        val_set, test_set = set(val), set(test)
        train = [p for p in patient_label if p not in val_set and p not in test_set]

        def expand(patients: Iterable[str]) -> tuple[str, ...]:
            return tuple(sorted(m for p in patients for m in members_of[p]))

        splits.append(Split(expand(train), expand(val), expand(test)))
    return splits


def write_splits(splits: Sequence[Split], directory: str | os.PathLike[str]) -> list[Path]:
    """Write ``splits_<i>.csv`` files (columns ``train,val,test``, short columns padded empty).

    Parameters
    ----------
    splits
        The folds, written as ``splits_0.csv`` ... ``splits_<k-1>.csv``.
    directory
        Destination folder, created if needed. Each file is written atomically.

    Returns
    -------
    list[Path]
        The written files.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, split in enumerate(splits):
        cols = [split.train, split.val, split.test]
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(_COLUMNS)
        for r in range(max(len(c) for c in cols)):
            writer.writerow([c[r] if r < len(c) else "" for c in cols])
        path = out / f"splits_{i}.csv"
        atomic_write_text(path, buf.getvalue())
        paths.append(path)
    return paths


def _read_one(path: Path) -> Split:
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read split file: {exc}") from None
    if not rows:
        raise DataError(f"{path}: empty split file")
    header = [h.strip() for h in rows[0]]
    index = {}
    for name in _COLUMNS:
        hits = [i for i, h in enumerate(header) if h == name]
        if len(hits) != 1:
            what = "missing" if not hits else "repeated"
            raise DataError(f"{path}: column '{name}' {what} (header: {','.join(header)})")
        index[name] = hits[0]
    sets: dict[str, list[str]] = {name: [] for name in _COLUMNS}
    for row in rows[1:]:
        for name, i in index.items():
            cell = row[i].strip() if i < len(row) else ""
            if cell:
                sets[name].append(cell)
    owner: dict[str, str] = {}
    for name, ids in sets.items():
        dupes = sorted(i for i, n in Counter(ids).items() if n > 1)
        if dupes:
            raise DataError(f"{path}: column '{name}' lists ids twice: {_preview(dupes)}")
        for ident in ids:
            if ident in owner:
                raise DataError(f"{path}: id '{ident}' is in both '{owner[ident]}' and '{name}'")
            owner[ident] = name
    if not sets["train"]:
        raise DataError(f"{path}: column 'train' is empty")
    if not sets["test"]:
        raise DataError(f"{path}: column 'test' is empty")
    return Split(tuple(sets["train"]), tuple(sets["val"]), tuple(sets["test"]))


def read_splits(directory: str | os.PathLike[str]) -> list[Split]:
    """Read ``splits_<i>.csv`` files written by :func:`write_splits`, CLAM or by hand.

    Other files in the folder (e.g. CLAM's ``splits_0_bool.csv``) are ignored. Each file needs the
    columns ``train``, ``val`` and ``test`` (any other column is ignored); empty cells are padding.

    Parameters
    ----------
    directory
        Folder holding ``splits_0.csv`` ... ``splits_<k-1>.csv``.

    Returns
    -------
    list[Split]
        In file index order; ids as written (slide or patient ids, see :func:`resolve_splits`).

    Raises
    ------
    DataError
        No split files, a gap in the numbering, a missing column, an id repeated within a column
        or present in two columns; each message names the file.
    """
    folder = Path(directory)
    if not folder.is_dir():
        raise DataError(f"{folder}: split folder not found")
    found = {}
    for p in folder.iterdir():
        m = _FILE_RE.match(p.name)
        if m and p.is_file():
            found[int(m.group(1))] = p
    if not found:
        raise DataError(f"{folder}: no splits_<i>.csv files")
    expected = list(range(len(found)))
    if sorted(found) != expected:
        gap = next(i for i in expected if i not in found)
        raise DataError(f"{folder}: splits_{gap}.csv is missing (found {len(found)} split files)")
    return [_read_one(found[i]) for i in expected]


def resolve_splits(
    splits: Sequence[Split],
    slide_ids: Sequence[str],
    case_ids: Sequence[str],
    *,
    ignore: Iterable[str] = (),
    source: str | os.PathLike[str] | None = None,
) -> list[Split]:
    """Express user splits in slide ids and check that they are patient-level.

    Each id in a split may be a slide id or a patient id (standing for all the patient's slides).

    Parameters
    ----------
    splits
        Splits as read by :func:`read_splits`.
    slide_ids, case_ids
        ``(n,)`` the labelled slides of the cohort and their patients.
    ignore
        Ids known to exist but not used (e.g. slides whose label is unmapped); they are dropped with
        a log message instead of raising.
    source
        The split folder, for messages.

    Returns
    -------
    list[Split]
        The same folds, listing slide ids.

    Raises
    ------
    DataError
        Unknown ids, or a patient whose slides are in two sets of one fold; the message names the
        split file.
    """
    where = Path(source) if source is not None else Path("splits")
    slide_case = dict(zip(slide_ids, case_ids, strict=True))
    slides_of: dict[str, list[str]] = defaultdict(list)
    for s, c in slide_case.items():
        slides_of[c].append(s)
    skip = set(ignore)
    out = []
    for i, split in enumerate(splits):
        name = where / f"splits_{i}.csv"
        resolved: dict[str, list[str]] = {}
        side_of_case: dict[str, str] = {}
        dropped = 0
        for col in _COLUMNS:
            slides: list[str] = []
            unknown = []
            for ident in getattr(split, col):
                if ident in slide_case:
                    members = [ident]
                elif ident in slides_of:
                    members = slides_of[ident]
                elif ident in skip:
                    dropped += 1
                    continue
                else:
                    unknown.append(ident)
                    continue
                for s in members:
                    case = slide_case[s]
                    prev = side_of_case.setdefault(case, col)
                    if prev != col:
                        raise DataError(
                            f"{name}: patient '{case}' has slides in both '{prev}' and '{col}'"
                        )
                    slides.append(s)
            if unknown:
                raise DataError(
                    f"{name}: column '{col}' has ids that are neither labelled slides nor patients "
                    f"of the cohort: {_preview(unknown)}"
                )
            resolved[col] = sorted(set(slides))
        if dropped:
            log.info("%s: %d ids dropped (unlabelled or skipped)", name, dropped)
        if not resolved["train"] or not resolved["test"]:
            raise DataError(f"{name}: no labelled slide left in 'train' or 'test'")
        out.append(Split(tuple(resolved["train"]), tuple(resolved["val"]), tuple(resolved["test"])))
    return out


def subsample_train(
    split: Split,
    case_of: Mapping[str, str],
    label_of: Mapping[str, int],
    fraction: float,
    *,
    seed: int = 0,
    fold: int = 0,
) -> Split:
    """Keep a stratified share of a fold's training patients (learning curves).

    Per class ``c`` with ``n_c`` training patients, ``max(1, round(fraction * n_c))`` patients are
    kept, with all their slides. The patients of each class are ordered by a permutation seeded with
    ``(seed, fold, c)`` that does not depend on ``fraction``, and the first ones are kept, so the
    subsets are nested: the patients kept at 0.25 are among those kept at 0.5. Validation and test
    sets are unchanged.

    Parameters
    ----------
    split
        The fold (slide ids).
    case_of, label_of
        Slide -> patient and slide -> label for the training slides.
    fraction
        Share in ``(0, 1]``; 1 returns ``split`` unchanged.
    seed, fold
        Seed of the subsampling (``splits.seed``) and the fold index.

    Returns
    -------
    Split
        The fold with the reduced training set (slide ids sorted).

    Raises
    ------
    DataError
        ``fraction`` outside ``(0, 1]``.
    """
    if not 0.0 < fraction <= 1.0:
        raise DataError(f"subsample_train: fraction must be in (0, 1], got {fraction}")
    if fraction == 1.0:
        return split
    patient_label: dict[str, int] = {}
    slides_of: dict[str, list[str]] = defaultdict(list)
    for s in split.train:
        patient_label.setdefault(case_of[s], int(label_of[s]))
        slides_of[case_of[s]].append(s)
    kept: list[str] = []
    for c in range(max([1, *patient_label.values()]) + 1):
        members = sorted(p for p, lab in patient_label.items() if lab == c)
        if not members:
            continue
        n_keep = max(1, _round_half_up(fraction * len(members)))
        order = np.random.default_rng([seed, fold, c]).permutation(len(members))
        kept.extend(members[j] for j in order[:n_keep])
    train = tuple(sorted(s for p in kept for s in slides_of[p]))
    return Split(train, split.val, split.test)
