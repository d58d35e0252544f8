"""k-fold cross-validated training: ``momkd train`` and :func:`momkd.train`.

:func:`train` resolves the run directory, loads and validates the clinical table, the expression
matrix and the store, makes (or reads) the patient-level splits, saves the resolved ``config.yaml``,
fits the genomics preprocessing inside each fold on that fold's training patients only, trains every
fold with :class:`~momkd.train.loop.FoldTrainer`, evaluates the external cohort with every fold's
model and the fold ensemble, and writes ``summary.json`` and ``summary.txt``.

Run directory::

    config.yaml            resolved configuration (absolute paths; output.dir = this folder)
    data.json              the inputs as read (counts, excluded labels, external cohort)
    splits/splits_<k>.csv  train/val/test slide ids per fold (CLAM convention)
    fold_<k>/              checkpoints, history, predictions, result.json (see momkd.train.loop)
    external_predictions.csv   fold-ensemble probabilities on the external cohort (if configured)
    summary.json, summary.txt
    report.html, report/   written by the command line (momkd.report)

Nothing is written before the inputs, the labels, the genomics settings and the splits are checked
(:func:`check_trainable`, :func:`check_folds`), so a start that fails on its inputs leaves no
folder behind.

``summary.json`` keys: ``method``, ``label_column``, ``folds`` (per-fold dicts with ``val``,
``test`` and, with an external cohort, ``external`` metric dicts), ``mean`` and ``std`` (test
metrics over folds, ddof 1), ``val_mean``, ``pooled`` (metrics of all folds' test predictions
pooled), ``ci`` (``auc: [low, high]`` of the pooled test AUC, ``level``, ``resamples``, ``seed``),
``external`` (``folds``, ``mean``, ``std``, ``ensemble`` and its ``ci``), ``patient`` (the same at
patient level: slide probabilities averaged per patient; ``folds``, ``mean``, ``std``, ``pooled``,
``ci``, ``external``), ``data`` (slides, patients, class counts, excluded label values) and
``timing``.

Confidence intervals are stratified percentile bootstraps (:func:`momkd.metrics.bootstrap_auc_ci`,
``train.ci_resamples`` resamples, seeded with ``train.seed``; 0 turns them off). The pooled AUC ranks
predictions of different fold models against each other; the per-fold mean ± std does not.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from momkd.config import RunConfig, config_to_dict, load_config, save_config
from momkd.data.clinical import (
    ClinicalTable,
    Expression,
    load_clinical,
    load_expression,
    require_both_classes,
    require_cases,
)
from momkd.errors import ConfigError, DataError
from momkd.methods import METHODS
from momkd.metrics import (
    aggregate,
    binary_metrics,
    bootstrap_auc_ci,
    evaluate_with_threshold,
    patient_level,
)
from momkd.train.genomics import preprocessor_from_config
from momkd.train.splits import (
    Split,
    make_splits,
    read_splits,
    resolve_splits,
    subsample_train,
    write_splits,
)

__all__ = [
    "check_folds",
    "check_trainable",
    "config_differences",
    "finished_folds",
    "format_summary",
    "plan_splits",
    "read_prediction_table",
    "summarize",
    "train",
]

log = logging.getLogger(__name__)

#: Keys that may differ between the saved and the current configuration when resuming.
_RUNTIME_KEYS = {
    "output.dir",
    "train.device",
    "train.dist_backend",
    "train.dist_timeout_s",
    "train.folds",
    "train.kernels",
    "train.num_threads",
    "train.prefetch",
    "train.torch_threads",
}

_PREVIEW = 5


def _preview(items: Sequence[str]) -> str:
    shown = ", ".join(f"'{s}'" for s in items[:_PREVIEW])
    return shown + (f" and {len(items) - _PREVIEW} more" if len(items) > _PREVIEW else "")


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


# ---------------------------------------------------------------------------------- run folder


def config_differences(old: RunConfig, new: RunConfig) -> list[str]:
    """Dotted keys whose values differ between two configurations, run-time keys excepted.

    Parameters
    ----------
    old, new
        Two resolved configurations (e.g. a run's saved ``config.yaml`` and the current one).

    Returns
    -------
    list[str]
        Sorted dotted keys; empty when a run made with ``old`` may be resumed with ``new``.
    """
    a, b = _flatten(config_to_dict(old)), _flatten(config_to_dict(new))
    return sorted(k for k in set(a) | set(b) if k not in _RUNTIME_KEYS and a.get(k) != b.get(k))


def _has_trained(run_dir: Path) -> bool:
    """Whether any fold of ``run_dir`` has started training (a checkpoint or a result)."""
    return any(
        p.parent.name.removeprefix("fold_").isdigit()
        for pattern in ("fold_*/result.json", "fold_*/last.pt", "fold_*/best.pt")
        for p in run_dir.glob(pattern)
    )


def _resolve_run_dir(cfg: RunConfig, out_dir: str | os.PathLike[str] | None, resume: bool) -> Path:
    if out_dir is not None:
        run_dir = Path(out_dir)
    elif cfg.output.dir is not None:
        run_dir = Path(cfg.output.dir)
    else:
        raise ConfigError("output.dir: no run directory (set output.dir or pass --out)")
    run_dir = run_dir.expanduser().absolute()
    saved = run_dir / "config.yaml"
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: run directory path exists and is not a folder")
    fresh = not run_dir.exists() or not any(run_dir.iterdir())
    # A folder in which no fold has trained (a prepared run, or a start that failed after the
    # folder was written) holds nothing that removing it would lose.
    untrained = not fresh and not _has_trained(run_dir)
    if resume and fresh:
        log.info("%s: nothing to resume yet, starting a new run", run_dir)
    elif resume:
        if not saved.is_file():
            raise ConfigError(
                f"{run_dir}: not a momkd run directory (no config.yaml) to resume; choose another "
                "--out"
            )
        diff = config_differences(load_config(saved), cfg)
        if diff:
            keys = f"{', '.join(diff[:6])}{' ...' if len(diff) > 6 else ''}"
            if untrained:
                advice = (
                    f"no fold has trained there yet, so remove the folder (rm -r {run_dir}) and "
                    "start again, or choose another --out"
                )
            else:
                advice = (
                    f"resume with its own configuration (--config {saved}), or choose another "
                    "--out for the changed one"
                )
            raise ConfigError(
                f"{saved}: the configuration differs from the run being resumed in {keys}; "
                + advice
            )
    elif not fresh:
        if untrained and saved.is_file():
            raise ConfigError(
                f"{run_dir}: run directory exists but no fold has trained there yet; pass "
                f"--resume to start it with the same configuration, or remove the folder "
                f"(rm -r {run_dir}) or choose another --out"
            )
        raise ConfigError(
            f"{run_dir}: run directory exists and is not empty; pass --resume to continue it "
            "or choose another --out"
        )
    return run_dir


# ----------------------------------------------------------------------------------- the inputs


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


def _load_inputs(
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
    labels = table.labels
    report = {
        "store": str(d.store),
        "clinical": str(d.clinical),
        "label_column": d.label_column,
        "slides": len(table),
        "patients": len(set(table.case_ids)),
        "positive": int(labels.sum()),
        "negative": int(len(labels) - labels.sum()),
        "excluded": dict(table.excluded),
        "n_excluded": int(sum(table.excluded.values())),
        "skipped_no_expression": {"patients": len(skipped), "slides": n_before - len(table)},
        "store_slides": len(store),
        "feature_dim": int(store.feature_dim),
    }
    if expression is not None:
        report["genes_available"] = len(expression.gene_names)
    log.info(
        "data: %d slides of %d patients (%d positive), %d excluded labels %s",
        report["slides"],
        report["patients"],
        report["positive"],
        report["n_excluded"],
        report["excluded"],
    )
    return store, table, expression, report


def _load_external(
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
        "positive": int(table.labels.sum()),
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
        if len(classes) < 2:
            raise DataError(
                f"splits: fold {f}'s training slides all have class {min(classes, default=0)}; "
                "every fold needs both classes in training (check splits.dir or use more patients "
                "of the smaller class)"
            )
    return folds


def _start_run_dir(
    cfg: RunConfig,
    run_dir: Path,
    resume: bool,
    data_report: dict[str, Any],
    splits: list[Split],
    write: bool,
) -> None:
    """Write the run directory's configuration, data report and splits (inputs already checked).
    The saved ``output.dir`` is the run directory itself, whatever ``--out`` said."""
    import dataclasses

    from momkd.train.loop import write_json

    run_dir.mkdir(parents=True, exist_ok=True)
    if not (resume and (run_dir / "config.yaml").is_file()):
        # A resumed run keeps its file (it matched, up to run-time keys such as train.folds).
        saved = dataclasses.replace(cfg, output=dataclasses.replace(cfg.output, dir=run_dir))
        save_config(saved, run_dir / "config.yaml")
    write_json(run_dir / "data.json", data_report)
    if write:
        write_splits(splits, run_dir / "splits")


# ---------------------------------------------------------------------------------------- train


def train(
    cfg: RunConfig | str | os.PathLike[str],
    out_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    *,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Cross-validated training of the configured method; returns the run summary.

    Parameters
    ----------
    cfg : RunConfig or path
        Resolved configuration (or a YAML file for :func:`momkd.config.load_config`).
    out_dir : path, optional
        Run directory (default ``cfg.output.dir``).
    resume : bool
        Continue an interrupted run in ``out_dir``: finished folds are skipped, an unfinished fold
        continues from its ``last.pt``.
    progress : bool, optional
        Force progress bars on or off (default: ``train.progress`` if set, else only on a terminal).

    Returns
    -------
    dict
        The content of ``summary.json`` (see the module docstring).

    Raises
    ------
    ConfigError
        Missing inputs, a non-empty run directory without ``resume``, a changed configuration on
        resume.
    DataError
        Labelled slides missing from the store, patients without expression, bad labels or splits.
    """
    from momkd.train.distributed import init_distributed, shutdown_distributed

    if not isinstance(cfg, RunConfig):
        cfg = load_config(cfg)
    # Under torchrun: join the process group (one rank per process); otherwise a single process.
    dist, device = init_distributed(
        cfg.train.dist_backend, cfg.train.device, cfg.train.dist_timeout_s
    )
    try:
        summary = _train(cfg, out_dir, resume, progress, dist, device)
    except RuntimeError as exc:
        raise _as_distributed_error(exc, dist) from exc
    shutdown_distributed(dist)
    return summary


def _as_distributed_error(exc: RuntimeError, dist: Any) -> BaseException:
    """A one-line :class:`~momkd.errors.DistributedError` for a failed collective inside torch
    (e.g. DDP's gradient all-reduce after another rank stopped); other errors unchanged."""
    import torch.distributed

    from momkd.errors import DistributedError, MomkdError

    if not dist.enabled or isinstance(exc, MomkdError):
        return exc
    text = str(exc)
    comm = isinstance(exc, torch.distributed.DistError) or any(
        w in text for w in ("gloo", "Gloo", "NCCL", "nccl", "Connection closed", "timed out")
    )
    if not comm:
        return exc
    from momkd.train.distributed import _first_line

    first = _first_line(exc)
    return DistributedError(
        f"rank {dist.rank}: training stopped: another rank stopped or a collective timed out "
        f"(train.dist_timeout_s={dist.timeout_s:g}): {first}"
    )


def _train(
    cfg: RunConfig,
    out_dir: str | os.PathLike[str] | None,
    resume: bool,
    progress: bool | None,
    dist: Any,
    device: Any,
) -> dict[str, Any]:
    import torch

    from momkd import kernels
    from momkd.train.loop import progress_enabled

    t_start = time.perf_counter()
    started = datetime.now(UTC).isoformat(timespec="seconds")
    run_dir = dist.on_main(
        lambda: _resolve_run_dir(cfg, out_dir, resume), "checking the run directory"
    )
    show = progress_enabled(cfg) if progress is None else progress
    kernels.check_kernel_mode(cfg.train.kernels, device)
    store, table, expression, data_report = _load_inputs(cfg)
    external = _load_external(cfg)
    if external is not None:
        data_report["external"] = external[4]
    check_trainable(cfg, table, expression)
    splits, write = dist.on_main(
        lambda: plan_splits(cfg, run_dir, table, resume), "making the splits"
    )
    folds = check_folds(cfg, table, splits)
    # The run directory is created only once the inputs are known to be valid (by rank 0 alone).
    if dist.is_main:
        _start_run_dir(cfg, run_dir, resume, data_report, splits, write)
    previous = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
    )
    if cfg.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    try:
        with kernels.kernel_mode(cfg.train.kernels, device):
            summary = _run_folds(
                cfg,
                run_dir,
                resume,
                splits,
                folds,
                store,
                table,
                expression,
                external,
                data_report,
                device,
                show,
                dist,
            )
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.benchmark = previous[2]
    if not dist.is_main:
        # Rank 0 writes the summary; every rank returns the same one.
        return dist.broadcast_object(None, "broadcast of the summary")  # type: ignore[no-any-return]
    timing = {
        "started": started,
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": time.perf_counter() - t_start,
        "device": str(device),
    }
    summary = _write_summary(cfg, run_dir, data_report, summary["external"], timing)
    return dist.broadcast_object(summary, "broadcast of the summary")  # type: ignore[no-any-return]


def prepare_run(
    cfg: RunConfig, out_dir: str | os.PathLike[str] | None, resume: bool
) -> tuple[Path, list[int]]:
    """Check the inputs and create the run directory (configuration, data report, splits) without
    training; returns the run directory and the configured folds not finished yet (fold-parallel
    runs and job arrays resume into it, one fold per process)."""
    run_dir = _resolve_run_dir(cfg, out_dir, resume)
    _, table, expression, data_report = _load_inputs(cfg)
    external = _load_external(cfg)
    if external is not None:
        data_report["external"] = external[4]
    check_trainable(cfg, table, expression)
    splits, write = plan_splits(cfg, run_dir, table, resume)
    folds = check_folds(cfg, table, splits)
    _start_run_dir(cfg, run_dir, resume, data_report, splits, write)
    done = set(finished_folds(run_dir))
    return run_dir, [f for f in folds if f not in done]


def finished_folds(run_dir: str | os.PathLike[str]) -> list[int]:
    """Folds of ``run_dir`` whose ``fold_<k>/result.json`` exists, in increasing order."""
    out = []
    for p in Path(run_dir).glob("fold_*/result.json"):
        suffix = p.parent.name.removeprefix("fold_")
        if suffix.isdigit():
            out.append(int(suffix))
    return sorted(out)


def _write_summary(
    cfg: RunConfig,
    run_dir: Path,
    data_report: dict[str, Any],
    external: Any,
    timing: dict[str, Any] | Callable[[list[int], list[dict[str, Any]]], dict[str, Any]],
) -> dict[str, Any]:
    """Merge every finished fold of ``run_dir`` into ``summary.json``, ``summary.txt`` and the
    external fold-ensemble CSV. ``timing`` is the summary's ``timing`` block, or a function of the
    merged folds and their results that makes it (under the lock, from the same folds).

    Fold processes of one run (``--fold-parallel``, a job array) may finish at the same time: the
    merge runs under an exclusive lock on ``RUN_DIR/.summary.lock``, so the last one to finish sees
    every fold and writes the complete summary.
    """
    import fcntl

    from momkd.train.loop import read_json, write_csv, write_json

    with open(run_dir / ".summary.lock", "a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        folds = finished_folds(run_dir)
        results = [read_json(run_dir / f"fold_{f}" / "result.json") for f in folds]
        summary = _summarise(cfg, run_dir, results, data_report, external, folds)
        summary["timing"] = dict(timing(folds, results) if callable(timing) else timing)
        summary["timing"]["fold_seconds"] = [float(r.get("seconds", 0.0)) for r in results]
        if external is not None and "ensemble_rows" in summary:
            write_csv(
                run_dir / "external_predictions.csv",
                summary.pop("ensemble_header"),
                summary.pop("ensemble_rows"),
            )
        write_json(run_dir / "summary.json", summary)
        summary = read_json(run_dir / "summary.json")
        text = format_summary(summary) + "\n"
        (run_dir / "summary.txt").write_text(text, encoding="utf-8")
    return summary  # type: ignore[no-any-return]


def summarize(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Merge the finished folds of a run directory into ``summary.json`` and ``summary.txt``
    (``momkd summarize``): after fold-parallel runs or a job array with one fold per task.

    Parameters
    ----------
    run_dir : path
        A run directory written by :func:`train` (``config.yaml``, ``fold_<k>/result.json``).

    Returns
    -------
    dict
        The summary, as in :func:`train`.

    Raises
    ------
    ConfigError
        Not a run directory, or no finished fold.
    """
    from momkd.train.loop import read_json

    run = Path(run_dir).expanduser().absolute()
    if not (run / "config.yaml").is_file():
        raise ConfigError(f"{run}: not a momkd run directory (no config.yaml)")
    if not finished_folds(run):
        raise ConfigError(f"{run}: no finished fold (fold_<k>/result.json) to summarise")
    cfg = load_config(run / "config.yaml")
    if (run / "data.json").is_file():
        data_report = read_json(run / "data.json")
    else:
        data_report = _load_inputs(cfg)[3]
    external = _load_external(cfg)
    if external is not None:
        data_report["external"] = external[4]
        external, _ = _external_units(cfg, external)
    return _write_summary(
        cfg, run, data_report, external, lambda folds, results: _merged_timing(run, folds, results)
    )


def _merged_timing(run: Path, folds: list[int], results: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``timing`` block of a summary merged by :func:`summarize` from ``folds`` and their
    ``result.json`` contents: the existing summary's own when it already holds exactly these
    folds (nothing new to merge), else the sum of the folds' times on the device(s) they name."""
    from momkd.train.loop import read_json

    previous: dict[str, Any] = {}
    if (run / "summary.json").is_file():
        try:
            previous = read_json(run / "summary.json")
        except (OSError, ValueError):
            previous = {}
    raw = previous.get("timing")
    old: dict[str, Any] = raw if isinstance(raw, dict) else {}
    merged = [r.get("fold") for r in previous.get("folds") or [] if isinstance(r, dict)]
    if old and merged == folds:
        return {k: v for k, v in old.items() if k != "fold_seconds"}
    devices = sorted({str(r["device"]) for r in results if r.get("device")})
    if not devices and old.get("device"):
        devices = [str(old["device"])]
    timing: dict[str, Any] = {
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": float(sum(float(r.get("seconds", 0.0)) for r in results)),
        "seconds_basis": "sum of the folds' times",
    }
    if devices:
        timing["device"] = ", ".join(devices)
    return timing


def _external_units(cfg: RunConfig, external: Any) -> tuple[Any, dict[str, list[str]] | None]:
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


def _run_folds(
    cfg: RunConfig,
    run_dir: Path,
    resume: bool,
    splits: list[Split],
    folds: list[int],
    store: Any,
    table: ClinicalTable,
    expression: Expression | None,
    external: Any,
    data_report: dict[str, Any],
    device: Any,
    show: bool,
    dist: Any,
) -> dict[str, Any]:
    """Train ``folds`` (checked by :func:`check_folds`) of ``splits``, skipping finished ones on
    resume."""
    from momkd.train.loop import FoldData, FoldTrainer, uses_expression

    label_of = table.label_of()
    case_of = table.case_of()
    members: dict[str, list[str]] | None = None
    external, ext_members = _external_units(cfg, external)
    if cfg.data.bag == "patient":
        members, unit_labels = patient_units(table.slide_ids, label_of, case_of, str(table.path))
    todo = [
        f
        for f in folds
        if not (
            resume
            and dist.on_main((run_dir / f"fold_{f}" / "result.json").is_file, "looking for results")
        )
    ]
    for fold in sorted(set(folds) - set(todo)):
        log.info("fold %d: already finished, skipped", fold)
    if dist.is_main:
        _warn_small_validation(cfg, [splits[f] for f in todo], todo, label_of, case_of)
    for fold in todo:
        fold_dir = run_dir / f"fold_{fold}"
        split = splits[fold]
        if cfg.splits.train_fraction < 1.0:
            full = len(split.train)
            split = subsample_train(
                split,
                case_of,
                label_of,
                cfg.splits.train_fraction,
                seed=cfg.splits.seed,
                fold=fold,
            )
            log.info(
                "fold %d: training on %d of %d slides (splits.train_fraction %g)",
                fold,
                len(split.train),
                full,
                cfg.splits.train_fraction,
            )
        expr_map, genomics_state, val_expr = None, None, None
        if uses_expression(cfg.model.method):
            assert expression is not None
            expr_map, genomics_state, val_expr = _fold_genomics(
                cfg, split, expression, label_of, case_of
            )
        data = FoldData(
            fold=fold,
            train=list(split.train),
            val=list(split.val),
            test=list(split.test),
            labels=label_of,
            cases=case_of,
            expression=expr_map,
            genomics_state=genomics_state,
            val_expression=val_expr,
            external=external[:4] if external is not None else None,
        )
        if members is not None:
            data.members = members
            data.external_members = ext_members
            data.labels = unit_labels
            data.cases = {u: u for u in members}
            data.train, data.val, data.test = (
                _units(part, case_of) for part in (split.train, split.val, split.test)
            )
        trainer = FoldTrainer(cfg, data, store, fold_dir, device=device, progress=show, dist=dist)
        trainer.run(resume=resume)
    # The summary merges every finished fold of the run directory (see _write_summary).
    return {"external": external}


def _warn_small_validation(
    cfg: RunConfig,
    splits: Sequence[Split],
    folds: Sequence[int],
    label_of: Mapping[str, int],
    case_of: Mapping[str, str],
) -> None:
    """One warning for the run when validation sets are too small for the configured model
    selection (fewer than 20 bags or fewer than 5 of a class), listing the folds; under the
    released protocol (``init-config --preset official``) it says that the choice is deliberate."""
    if cfg.train.monitor == "last":
        return  # the validation set selects nothing; it only feeds the history
    patient = cfg.data.bag == "patient"
    unit = "patients" if patient else "slides"
    small = []
    for fold, split in zip(folds, splits, strict=True):
        if not split.val:
            continue
        if patient:
            labels = {case_of[s]: label_of[s] for s in split.val}
            values = list(labels.values())
        else:
            values = [label_of[s] for s in split.val]
        n_pos = int(sum(values))
        n_neg = len(values) - n_pos
        if len(values) < 20 or min(n_pos, n_neg) < 5:
            small.append(f"fold {fold}: {len(values)} {unit}, {n_pos} positive, {n_neg} negative")
    if not small:
        return
    from momkd.config import selects_as_released

    if selects_as_released(cfg):
        advice = (
            ": kept on purpose, as the released protocol (init-config --preset official) selects "
            f"and stops on the validation AUC; selection on so few {unit} is noisy, so outside "
            "parity runs prefer the default train.monitor: last or a larger splits.val_fraction"
        )
    else:
        advice = (
            "; model selection on them is noisy: prefer train.monitor: last (a fixed budget, the last "
            "epoch kept) or a larger splits.val_fraction"
        )
    log.warning(
        "small validation sets for train.monitor: %s (%s)%s",
        cfg.train.monitor,
        "; ".join(small),
        advice,
    )


def _units(slides: Sequence[str], case_of: Mapping[str, str]) -> list[str]:
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


def _fold_genomics(
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


def _nan_metrics(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (math.nan if v is None else v) for k, v in d.items()}


def read_prediction_table(
    path: str | os.PathLike[str], column: str = "prob"
) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """Slide ids, patient ids, labels and probabilities of a labelled prediction CSV.

    Parameters
    ----------
    path
        A ``test_predictions.csv``/``external_predictions.csv`` written by a run (columns
        ``slide_id``, ``case_id``, ``label`` and ``column``).
    column
        The probability column.

    Returns
    -------
    tuple
        ``slide_ids``, ``case_ids``, ``labels`` ``(n,)`` int64, ``probs`` ``(n,)`` float64.

    Raises
    ------
    DataError
        A missing column, an empty or non-numeric label or probability (naming the file).
    """
    import csv

    path = Path(path)
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            fields = reader.fieldnames or []
            rows = list(reader)
    except OSError as exc:
        raise DataError(f"{path}: cannot read predictions: {exc}") from None
    missing = [c for c in ("slide_id", "label", column) if c not in fields]
    if missing:
        raise DataError(f"{path}: missing column {', '.join(missing)}")
    try:
        labels = np.array([int(float(r["label"])) for r in rows], dtype=np.int64)
        probs = np.array([float(r[column]) for r in rows], dtype=np.float64)
    except ValueError as exc:
        raise DataError(f"{path}: empty or non-numeric label or {column!r} ({exc})") from None
    slides = [r["slide_id"] for r in rows]
    cases = [r.get("case_id") or "" for r in rows]
    return slides, cases, labels, probs


def _ci(y: np.ndarray, p: np.ndarray, cfg: RunConfig) -> dict[str, Any]:
    n = cfg.train.ci_resamples
    if n <= 0:
        return {}
    low, high = bootstrap_auc_ci(y, p, n=n, seed=cfg.train.seed)
    return {
        "auc": [low, high],
        "level": 0.95,
        "resamples": n,
        "seed": cfg.train.seed,
        "method": "stratified percentile bootstrap",
    }


def _pooled_and_patient(
    cfg: RunConfig, run_dir: Path, results: list[dict[str, Any]], folds: list[int]
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Pooled slide-level metrics with CI, and the patient-level block (without external)."""
    ys: list[np.ndarray] = []
    ps: list[np.ndarray] = []
    pat_y: list[np.ndarray] = []
    pat_p: list[np.ndarray] = []
    pat_folds: list[dict[str, Any]] = []
    for fold, r in zip(folds, results, strict=True):
        slides, cases, y, p = read_prediction_table(
            run_dir / f"fold_{fold}" / "test_predictions.csv"
        )
        ys.append(y)
        ps.append(p)
        _, y_pat, p_pat = patient_level(cases, y, p, slide_ids=slides)
        pat_y.append(y_pat)
        pat_p.append(p_pat)
        m = evaluate_with_threshold(y_pat, p_pat, float(r.get("threshold", 0.5)))
        pat_folds.append({"fold": fold, "test": m})
    y_all, p_all = np.concatenate(ys), np.concatenate(ps)
    pooled = binary_metrics(y_all, p_all)
    ci = _ci(y_all, p_all, cfg)
    yp, pp = np.concatenate(pat_y), np.concatenate(pat_p)
    mean, std = aggregate([f["test"] for f in pat_folds])
    patient = {
        "folds": pat_folds,
        "mean": mean,
        "std": std,
        "pooled": binary_metrics(yp, pp),
        "ci": _ci(yp, pp, cfg),
        "aggregation": "mean slide probability per patient",
    }
    return pooled, ci, patient


def _summarise(
    cfg: RunConfig,
    run_dir: Path,
    results: list[dict[str, Any]],
    data_report: dict[str, Any],
    external: Any,
    folds: list[int],
) -> dict[str, Any]:
    from momkd.train.loop import read_csv_predictions

    tests = [_nan_metrics(r["test"]) for r in results]
    vals = [_nan_metrics(r.get("val") or {}) for r in results]
    mean, std = aggregate(tests)
    val_mean, val_std = aggregate(vals) if all(vals) else ({}, {})
    summary: dict[str, Any] = {
        "method": cfg.model.method,
        "run_dir": str(run_dir),
        "label_column": cfg.data.label_column,
        "folds": results,
        "mean": mean,
        "std": std,
        "val_mean": val_mean,
        "val_std": val_std,
        "data": data_report,
    }
    summary["pooled"], summary["ci"], summary["patient"] = _pooled_and_patient(
        cfg, run_dir, results, folds
    )
    if external is not None:
        _, ext_ids, ext_labels, ext_cases, _ = external
        per_fold = [_nan_metrics(r["external"]) for r in results if "external" in r]
        probs = []
        for fold in folds:
            rows = read_csv_predictions(run_dir / f"fold_{fold}" / "external_predictions.csv")
            probs.append([rows[s] for s in ext_ids])
        p = np.mean(np.asarray(probs, dtype=np.float64), axis=0)
        thr = float(np.mean([r.get("threshold", 0.5) for r in results]))
        ext_summary: dict[str, Any] = {"folds": per_fold}
        if per_fold:
            ext_summary["mean"], ext_summary["std"] = aggregate(per_fold)
        if ext_labels is not None:
            y = np.array([ext_labels[s] for s in ext_ids])
            ext_summary["ensemble"] = evaluate_with_threshold(y, p, thr)
            ext_summary["ci"] = _ci(y, p, cfg)
            cases = [ext_cases.get(s, "") for s in ext_ids]
            _, y_pat, p_pat = patient_level(cases, y, p, slide_ids=ext_ids)
            summary["patient"]["external"] = {
                "ensemble": evaluate_with_threshold(y_pat, p_pat, thr),
                "ci": _ci(y_pat, p_pat, cfg),
            }
        summary["external"] = ext_summary
        header = ["slide_id", "case_id", "label"] + [f"prob_fold{f}" for f in folds]
        header += ["prob", "pred"]
        rows_out = []
        for i, s in enumerate(ext_ids):
            rows_out.append(
                [s, ext_cases.get(s, ""), "" if ext_labels is None else ext_labels[s]]
                + [float(pf[i]) for pf in probs]
                + [float(p[i]), int(p[i] > 0.5)]
            )
        summary["ensemble_header"] = header
        summary["ensemble_rows"] = rows_out
    return summary


# -------------------------------------------------------------------------------------- report


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _pm(mean: Mapping[str, Any], std: Mapping[str, Any], key: str) -> str:
    return f"{_fmt(mean.get(key))} ± {_fmt(std.get(key))}"


#: Metric columns of the per-fold tables in ``summary.txt`` and ``momkd eval`` (full names).
METRIC_COLUMNS = (
    "auc",
    "auprc",
    "accuracy",
    "balanced_accuracy",
    "f1",
    "thr_accuracy",
    "thr_balanced_accuracy",
    "thr_f1",
)


def _ci_text(ci: Any) -> str:
    """`` (95% CI low-high)`` from a summary ``ci`` block, or nothing."""
    if not isinstance(ci, Mapping) or not isinstance(ci.get("auc"), Sequence):
        return ""
    low, high = ci["auc"]
    level = ci.get("level", 0.95)
    return f" ({100 * float(level):.0f}% CI {_fmt(low)}–{_fmt(high)})"


def format_summary(summary: Mapping[str, Any]) -> str:
    """A human-readable report of a run summary (the content of ``summary.txt``).

    Parameters
    ----------
    summary : mapping
        As returned by :func:`train` / stored in ``summary.json``.

    Returns
    -------
    str
        Multi-line text: data, per-fold validation/test metrics, mean ± std, external cohort.
    """
    lines = []
    method = summary.get("method", "?")
    lines.append(f"momkd run: method {method}, label {summary.get('label_column', '?')}")
    if summary.get("run_dir"):
        lines.append(f"run directory: {summary['run_dir']}")
    data = summary.get("data") or {}
    if data:
        excl = data.get("excluded") or {}
        excl_s = ", ".join(f"{k or '<empty>'}: {v}" for k, v in excl.items()) or "none"
        lines.append(
            f"data: {data.get('slides')} slides, {data.get('patients')} patients "
            f"({data.get('positive')} positive / {data.get('negative')} negative slides); "
            f"excluded labels: {excl_s}"
        )
        skipped = data.get("skipped_no_expression") or {}
        if skipped.get("slides"):
            lines.append(
                f"skipped without expression: {skipped['slides']} slides of "
                f"{skipped['patients']} patients"
            )
    # Each column is as wide as its full name (names are never cut) and at least 5 wide.
    widths = [max(5, len(c)) for c in METRIC_COLUMNS]
    head = f"{'fold':>4} {'epochs':>6} {'best':>4} {'val_auc':>7} {'thr':>5} " + " ".join(
        f"{c:>{w}}" for c, w in zip(METRIC_COLUMNS, widths, strict=True)
    )
    lines.append("")
    lines.append("test metrics per fold:")
    lines.append(
        "  epochs: epochs trained; best: the epoch kept by train.monitor (counted from 0); "
        "val_auc: its validation AUC"
    )
    lines.append(
        "  thr: the threshold that maximises F1 on the validation slides; auc to f1: at argmax "
        "(probability > 0.5); thr_*: at thr"
    )
    lines.append(head)
    for r in summary.get("folds", []):
        test = r.get("test", {})
        lines.append(
            f"{r.get('fold', '?'):>4} {r.get('epochs', '?'):>6} {r.get('best_epoch', '?'):>4} "
            f"{_fmt((r.get('val') or {}).get('auc')):>7} {_fmt(r.get('threshold'), 2):>5} "
            + " ".join(
                f"{_fmt(test.get(c)):>{w}}" for c, w in zip(METRIC_COLUMNS, widths, strict=True)
            )
        )
    mean, std = summary.get("mean") or {}, summary.get("std") or {}
    lines.append("")
    lines.append(
        "mean ± std (ddof 1): "
        + ", ".join(
            f"{c} {_pm(mean, std, c)}"
            for c in ("auc", "auprc", "accuracy", "balanced_accuracy", "f1")
        )
    )
    pooled = summary.get("pooled") or {}
    if pooled:
        lines.append(
            f"pooled test predictions ({pooled.get('n')} slides): auc {_fmt(pooled.get('auc'))}"
            f"{_ci_text(summary.get('ci'))}, auprc {_fmt(pooled.get('auprc'))}"
        )
    patient = summary.get("patient") or {}
    if patient:
        p_mean, p_std = patient.get("mean") or {}, patient.get("std") or {}
        p_pooled = patient.get("pooled") or {}
        lines.append(
            f"patient level (mean slide probability per patient, {p_pooled.get('n')} patients): "
            f"auc {_pm(p_mean, p_std, 'auc')} over folds, pooled {_fmt(p_pooled.get('auc'))}"
            f"{_ci_text(patient.get('ci'))}"
        )
    ext = summary.get("external")
    if ext:
        lines.append("")
        lines.append("external cohort:")
        for i, m in enumerate(ext.get("folds", [])):
            lines.append(
                f"  fold model {i}: auc {_fmt(m.get('auc'))}, auprc {_fmt(m.get('auprc'))}, "
                f"balanced_accuracy {_fmt(m.get('balanced_accuracy'))}"
            )
        if ext.get("mean"):
            lines.append(f"  mean ± std: auc {_pm(ext['mean'], ext.get('std') or {}, 'auc')}")
        ens = ext.get("ensemble")
        if ens:
            lines.append(
                f"  fold ensemble: auc {_fmt(ens.get('auc'))}{_ci_text(ext.get('ci'))}, "
                f"auprc {_fmt(ens.get('auprc'))}, "
                f"balanced_accuracy {_fmt(ens.get('balanced_accuracy'))}"
            )
        p_ext = (summary.get("patient") or {}).get("external") or {}
        if p_ext.get("ensemble"):
            lines.append(
                f"  fold ensemble, patient level ({p_ext['ensemble'].get('n')} patients): "
                f"auc {_fmt(p_ext['ensemble'].get('auc'))}{_ci_text(p_ext.get('ci'))}"
            )
    timing = summary.get("timing") or {}
    if timing:
        text = f"time: {_fmt(timing.get('seconds'), 1)} s"
        if timing.get("seconds_basis"):
            text += f" ({timing['seconds_basis']})"
        if timing.get("device"):
            text += f" on {timing['device']}"
        lines.append("")
        lines.append(text)
    return "\n".join(lines)
