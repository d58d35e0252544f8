"""k-fold cross-validated training: ``momkd train`` and :func:`momkd.train`.

:func:`train` resolves the run directory, loads and validates the clinical table, the expression
matrix and the store, makes (or reads) the patient-level splits, saves the resolved ``config.yaml``,
fits the genomics preprocessing inside each fold on that fold's training patients only, trains every
fold with :class:`~momkd.train.trainer.FoldTrainer`, evaluates the external cohort with every fold's
model and the fold ensemble, and writes ``summary.json`` and ``summary.txt``.

Run directory::

    config.yaml            resolved configuration (absolute paths; output.dir = this folder)
    data.json              the inputs as read (counts, excluded labels, external cohort)
    splits/splits_<k>.csv  train/val/test slide ids per fold (CLAM convention)
    fold_<k>/              checkpoints, history, predictions, result.json (see momkd.train.trainer)
    external_predictions.csv   fold-ensemble probabilities on the external cohort (if configured)
    summary.json, summary.txt
    report.html, report/   written by the command line (momkd.report)

Nothing is written before the inputs, the labels, the genomics settings and the splits are checked
(:func:`~momkd.train.inputs.check_trainable`, :func:`~momkd.train.inputs.check_folds`), so a start that fails on its inputs leaves no
folder behind.

The pieces live beside it: :mod:`momkd.train.rundir` (the run directory), :mod:`momkd.train.inputs`
(inputs and splits), :mod:`momkd.train.trainer` (one fold) and :mod:`momkd.train.summary`
(``summary.json``: keys and confidence intervals documented there).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from momkd.config import RunConfig, load_config
from momkd.data.clinical import (
    ClinicalTable,
    Expression,
)
from momkd.train.inputs import (
    check_folds,
    check_trainable,
    external_units,
    fold_genomics,
    load_external,
    load_inputs,
    patient_units,
    patients_of,
    plan_splits,
)
from momkd.train.rundir import (
    finished_folds,
    resolve_run_dir,
    start_run_dir,
)
from momkd.train.splits import (
    Split,
    subsample_train,
)
from momkd.train.summary import write_summary

__all__ = ["prepare_run", "train"]

log = logging.getLogger(__name__)


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
    from momkd.train.device import progress_enabled

    t_start = time.perf_counter()
    started = datetime.now(UTC).isoformat(timespec="seconds")
    run_dir = dist.on_main(
        lambda: resolve_run_dir(cfg, out_dir, resume), "checking the run directory"
    )
    show = progress_enabled(cfg) if progress is None else progress
    kernels.check_kernel_mode(cfg.train.kernels, device)
    store, table, expression, data_report = load_inputs(cfg)
    external = load_external(cfg)
    if external is not None:
        data_report["external"] = external[4]
    check_trainable(cfg, table, expression)
    splits, write = dist.on_main(
        lambda: plan_splits(cfg, run_dir, table, resume), "making the splits"
    )
    folds = check_folds(cfg, table, splits)
    # The run directory is created only once the inputs are known to be valid (by rank 0 alone).
    if dist.is_main:
        start_run_dir(cfg, run_dir, resume, data_report, splits, write)
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
        with (
            kernels.kernel_mode(cfg.train.kernels, device),
            kernels.kernel_precision(cfg.train.kernel_precision),
        ):
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
    summary = write_summary(cfg, run_dir, data_report, summary["external"], timing)
    return dist.broadcast_object(summary, "broadcast of the summary")  # type: ignore[no-any-return]


def prepare_run(
    cfg: RunConfig, out_dir: str | os.PathLike[str] | None, resume: bool
) -> tuple[Path, list[int]]:
    """Check the inputs and create the run directory (configuration, data report, splits) without
    training; returns the run directory and the configured folds not finished yet (fold-parallel
    runs and job arrays resume into it, one fold per process)."""
    run_dir = resolve_run_dir(cfg, out_dir, resume)
    _, table, expression, data_report = load_inputs(cfg)
    external = load_external(cfg)
    if external is not None:
        data_report["external"] = external[4]
    check_trainable(cfg, table, expression)
    splits, write = plan_splits(cfg, run_dir, table, resume)
    folds = check_folds(cfg, table, splits)
    start_run_dir(cfg, run_dir, resume, data_report, splits, write)
    done = set(finished_folds(run_dir))
    return run_dir, [f for f in folds if f not in done]


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
    from momkd.methods import uses_expression
    from momkd.train.fold_data import FoldData
    from momkd.train.trainer import FoldTrainer

    label_of = table.label_of()
    case_of = table.case_of()
    members: dict[str, list[str]] | None = None
    external, ext_members = external_units(cfg, external)
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
            expr_map, genomics_state, val_expr = fold_genomics(
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
                patients_of(part, case_of) for part in (split.train, split.val, split.test)
            )
        trainer = FoldTrainer(cfg, data, store, fold_dir, device=device, progress=show, dist=dist)
        trainer.run(resume=resume)
    # The summary merges every finished fold of the run directory (see write_summary).
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
        if cfg.n_classes > 2:
            counts = np.bincount(values, minlength=cfg.n_classes)
            if len(values) < 20 or counts.min() < 5:
                per = ", ".join(
                    f"{n} {name}" for name, n in zip(cfg.class_names, counts.tolist(), strict=True)
                )
                small.append(f"fold {fold}: {len(values)} {unit}, {per}")
            continue
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
