"""The inputs of a run: the store, the clinical table with its label mapping, the expression matrix,
the external cohort, the splits and their checks (:func:`check_trainable`, :func:`check_folds`),
patient bags, and the per-fold genomics preprocessing."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from momkd.config import RunConfig
from momkd.data.clinical import (
    ClinicalTable,
    Expression,
    load_clinical,
    load_expression,
    require_both_classes,
    require_cases,
    require_classes,
)
from momkd.errors import ConfigError, DataError
from momkd.methods import METHODS
from momkd.train.genomics import preprocessor_from_config
from momkd.train.splits import (
    Split,
    make_splits,
    read_splits,
    resolve_splits,
    write_splits,
)

__all__ = [
    "check_folds",
    "check_trainable",
    "external_units",
    "fold_genomics",
    "load_clinical_table",
    "load_external",
    "load_inputs",
    "patient_units",
    "patients_of",
    "plan_splits",
    "run_splits",
    "with_expression",
]

log = logging.getLogger(__name__)


_PREVIEW = 5


def _preview(items: Sequence[str]) -> str:
    shown = ", ".join(f"'{s}'" for s in items[:_PREVIEW])
    return shown + (f" and {len(items) - _PREVIEW} more" if len(items) > _PREVIEW else "")


def _check_in_store(table: ClinicalTable, store: Any, store_path: Path) -> None:
    missing = [s for s in table.slide_ids if s not in store]
    if missing:
        raise DataError(
            f"{table.path}: slide {_preview(missing)} not in store {store_path} "
            f"({len(missing)} of {len(table)} labelled slides missing)"
        )


def load_clinical_table(cfg: RunConfig, path: Any = None) -> ClinicalTable:
    """The configured clinical table (or the one at ``path``, e.g. an external cohort's) with the
    run's columns and label mapping (``data.*`` keys)."""
    d = cfg.data
    path = d.clinical if path is None else path
    assert path is not None
    return load_clinical(
        path,
        d.case_column,
        d.slide_column,
        d.label_column,
        d.positive,
        d.negative,
        case_insensitive=d.label_case_insensitive,
        classes=d.classes,
    )


def with_expression(
    cfg: RunConfig, table: ClinicalTable
) -> tuple[ClinicalTable, Expression, list[str]]:
    """Load the expression matrix for ``table``'s patients and keep the slides of patients that
    have expression (``data.skip_missing``), as methods trained with expression need.

    Raises
    ------
    ConfigError
        ``data.expression`` is not set.
    DataError
        Patients without expression (unless skipped).
    """
    d = cfg.data
    if d.expression is None:
        raise ConfigError("data.expression: required by momkd and batchkd, not set")
    expression = load_expression(
        d.expression,
        d.expression_orientation,
        case_ids=list(dict.fromkeys(table.case_ids)),
        is_log=d.expression_is_log,
    )
    table, skipped = require_cases(table, expression, skip_missing=d.skip_missing)
    return table, expression, skipped


def load_inputs(
    cfg: RunConfig,
) -> tuple[Any, ClinicalTable, Expression | None, dict[str, Any]]:
    from momkd.data.store import CohortStore

    cfg.require_inputs()
    d = cfg.data
    assert d.store is not None and d.clinical is not None
    store = CohortStore.open(d.store)
    table = load_clinical_table(cfg)
    _check_in_store(table, store, d.store)
    if METHODS[cfg.model.method].graph:  # MoMKD's encoder reads the patch graph
        store.warn_grid_coords(table.slide_ids, f"method {cfg.model.method}")
    expression = None
    skipped: list[str] = []
    n_before = len(table)
    if METHODS[cfg.model.method].expression:
        table, expression, skipped = with_expression(cfg, table)
    report = {
        "store": str(d.store),
        "clinical": str(d.clinical),
        "label_column": d.label_column,
        "slides": len(table),
        "patients": len(set(table.case_ids)),
        **_label_counts(table),
        "excluded": dict(table.excluded),
        "n_excluded": int(sum(table.excluded.values())),
        "skipped_no_expression": {"patients": len(skipped), "slides": n_before - len(table)},
        "store_slides": len(store),
        "feature_dim": int(store.feature_dim),
    }
    if expression is not None:
        report["genes_available"] = len(expression.gene_names)
    counts = report.get("classes") or {"positive": report["positive"]}
    log.info(
        "data: %d slides of %d patients (%s), %d excluded labels %s",
        report["slides"],
        report["patients"],
        ", ".join(f"{v} {k}" for k, v in counts.items()),
        report["n_excluded"],
        report["excluded"],
    )
    return store, table, expression, report


def load_external(
    cfg: RunConfig,
) -> tuple[Any, list[str], dict[str, int] | None, dict[str, str], dict[str, Any]] | None:
    ext = cfg.data.external
    if ext is None:
        return None
    from momkd.data.store import CohortStore

    store = CohortStore.open(ext.store)
    if ext.clinical is None:
        ids = list(store.slide_ids)
        return store, ids, None, {}, {"store": str(ext.store), "slides": len(ids)}
    table = load_clinical_table(cfg, ext.clinical)
    _check_in_store(table, store, ext.store)
    report = {
        "store": str(ext.store),
        "clinical": str(ext.clinical),
        "slides": len(table),
        "patients": len(set(table.case_ids)),
        **_label_counts(table, negative=False),
        "excluded": dict(table.excluded),
    }
    return store, list(table.slide_ids), table.label_of(), table.case_of(), report


def plan_splits(
    cfg: RunConfig, run_dir: Path, table: ClinicalTable, resume: bool
) -> tuple[list[Split], bool]:
    """The folds of a run, without writing them: the run's own files on resume, else the user's
    ``splits.dir`` resolved against ``table``, else new seeded splits. The flag says whether they
    still have to be written to ``run_dir/splits``."""
    split_dir = run_dir / "splits"
    ignore = list(table.dropped)
    if resume and split_dir.is_dir() and any(split_dir.glob("splits_*.csv")):
        raw, source = read_splits(split_dir), split_dir
    elif cfg.splits.dir is not None:
        raw, source = read_splits(cfg.splits.dir), cfg.splits.dir
    else:
        splits = make_splits(
            table.case_ids,
            table.labels,
            k=cfg.splits.k,
            val_fraction=cfg.splits.val_fraction,
            seed=cfg.splits.seed,
            slide_ids=table.slide_ids,
        )
        return splits, True
    splits = resolve_splits(raw, table.slide_ids, table.case_ids, ignore=ignore, source=source)
    return splits, source != split_dir


def run_splits(cfg: RunConfig, run_dir: Path, table: ClinicalTable, resume: bool) -> list[Split]:
    """The folds of a run (:func:`plan_splits`), written to ``run_dir/splits``."""
    splits, write = plan_splits(cfg, run_dir, table, resume)
    if write:
        write_splits(splits, run_dir / "splits")
    return splits


def check_trainable(cfg: RunConfig, table: ClinicalTable, expression: Expression | None) -> None:
    """The checks of the labels and the genomics settings that would otherwise fail only inside a
    fold, after the run directory was written (:func:`check_folds` follows for the splits).

    Raises
    ------
    ConfigError
        ``genomics.n_genes`` above the matrix's genes, a missing optional package.
    DataError
        One class only (naming label values that differ from the mapping only in case), genes of
        ``genomics.gene_list`` not in the matrix.
    """
    if cfg.data.classes:
        require_classes(table, folds=cfg.splits.k if cfg.splits.dir is None else None)
    else:
        require_both_classes(table, cfg.data.positive, cfg.data.negative)
    if expression is not None:
        preprocessor_from_config(cfg).check_genes(expression.gene_names, expression.path)


def check_folds(cfg: RunConfig, table: ClinicalTable, splits: Sequence[Split]) -> list[int]:
    """Check the configured folds against the splits; returns the folds to train.

    Raises
    ------
    ConfigError
        ``train.folds`` out of range.
    DataError
        A fold whose training slides have one class.
    """
    folds = list(cfg.train.folds) if cfg.train.folds is not None else list(range(len(splits)))
    bad = [f for f in folds if not 0 <= f < len(splits)]
    if bad:
        raise ConfigError(f"train.folds: {bad} out of range for {len(splits)} splits")
    label_of = table.label_of()
    for f in folds:
        classes = {label_of[s] for s in splits[f].train if s in label_of}
        if len(classes) < table.n_classes and cfg.data.classes:
            missing = [table.class_names[c] for c in range(table.n_classes) if c not in classes]
            raise DataError(
                f"splits: fold {f}'s training slides have no {table.label_column} "
                f"{', '.join(map(repr, missing))}; every fold needs every class in training "
                "(check splits.dir or use more patients of that class)"
            )
        if len(classes) < 2:
            raise DataError(
                f"splits: fold {f}'s training slides all have class {min(classes, default=0)}; "
                "every fold needs both classes in training (check splits.dir or use more patients "
                "of the smaller class)"
            )
    return folds


def external_units(cfg: RunConfig, external: Any) -> tuple[Any, dict[str, list[str]] | None]:
    """With ``data.bag: patient``, the labelled external cohort as patient units (and their
    slides); otherwise unchanged."""
    if cfg.data.bag != "patient" or external is None or external[2] is None:
        return external, None
    ext_store, ext_ids, ext_labels, ext_cases, ext_report = external
    assert cfg.data.external is not None
    ext_members, ext_unit_labels = patient_units(
        ext_ids, ext_labels, ext_cases, str(cfg.data.external.clinical)
    )
    units = (ext_store, list(ext_members), ext_unit_labels, {u: u for u in ext_members}, ext_report)
    return units, ext_members


def patients_of(slides: Sequence[str], case_of: Mapping[str, str]) -> list[str]:
    """The patients of ``slides``, in order of first appearance."""
    return list(dict.fromkeys(case_of[s] for s in slides))


def patient_units(
    slide_ids: Sequence[str],
    label_of: Mapping[str, int],
    case_of: Mapping[str, str],
    source: str,
) -> tuple[dict[str, list[str]], dict[str, int]]:
    """Group slides into patient bags (``data.bag: patient``).

    Parameters
    ----------
    slide_ids : sequence of str
    label_of, case_of : mapping
        Slide -> label, slide -> patient.
    source : str
        The clinical table (named in errors).

    Returns
    -------
    members : dict
        Patient -> its slides (table order).
    labels : dict
        Patient -> label.

    Raises
    ------
    DataError
        A patient whose slides carry different labels.
    """
    members: dict[str, list[str]] = {}
    labels: dict[str, int] = {}
    for s in slide_ids:
        c = case_of[s]
        members.setdefault(c, []).append(s)
        if labels.setdefault(c, int(label_of[s])) != int(label_of[s]):
            raise DataError(
                f"{source}: patient {c!r} has slides with different labels; data.bag: patient "
                "needs one label per patient (use data.bag: slide)"
            )
    return members, labels


def fold_genomics(
    cfg: RunConfig,
    split: Split,
    expression: Expression,
    label_of: Mapping[str, int],
    case_of: Mapping[str, str],
) -> tuple[dict[str, np.ndarray], dict[str, Any], dict[str, np.ndarray]]:
    """Fit the preprocessing on the fold's training patients; transform those patients, and the
    validation patients with the same (training) statistics for the teacher's validation AUC."""
    cases: dict[str, int] = {}
    for s in split.train:
        cases.setdefault(case_of[s], label_of[s])
    train_cases = list(cases)
    x = expression.rows(train_cases)
    y = np.array([cases[c] for c in train_cases], dtype=np.int64)
    pre = preprocessor_from_config(cfg)
    z = pre.fit(x, y, expression.gene_names).transform(x)
    val_cases = [c for c in dict.fromkeys(case_of[s] for s in split.val) if c not in cases]
    have = set(expression.case_ids)
    val_cases = [c for c in val_cases if c in have]
    val = pre.transform(expression.rows(val_cases)) if val_cases else np.zeros((0, z.shape[1]))
    return (
        {c: z[i] for i, c in enumerate(train_cases)},
        pre.state_dict(),
        {c: val[i] for i, c in enumerate(val_cases)},
    )


def _label_counts(table: ClinicalTable, negative: bool = True) -> dict[str, Any]:
    """Slides per class for a data report: ``positive`` (and ``negative``) for a binary table,
    ``classes: {name: slides}`` for a multi-class one."""
    if table.n_classes > 2:
        return {"classes": dict(zip(table.class_names, table.class_counts(), strict=True))}
    n_pos = int(table.labels.sum())
    counts = {"positive": n_pos}
    if negative:
        counts["negative"] = len(table) - n_pos
    return counts
