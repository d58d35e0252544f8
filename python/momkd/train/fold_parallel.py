"""Fold-parallel training: ``momkd train --fold-parallel N`` (docs/METHOD.md §7).

The simplest way to use several devices: the folds are independent, so N folds train at once, each
in its own ``momkd train`` process with ``train.folds=[k]``, into the same run directory. On CUDA
each process sees one GPU (``CUDA_VISIBLE_DEVICES``, round robin over the visible devices); on the
CPU the cores are split between the processes. This process first prepares the run directory
(configuration, splits), so the fold processes only resume into it; every fold process merges the
finished folds into the summary when it ends (under a lock), and a final
:func:`~momkd.train.summary.summarize` writes the complete summary.

The same layout serves a SLURM job array (one fold per array task, then ``momkd summarize``); see
the README section "Training on several GPUs or nodes".
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from momkd.config import RunConfig
from momkd.errors import MomkdError

__all__ = ["run_fold_parallel"]

log = logging.getLogger(__name__)


def _device_env(slot: int, n: int) -> tuple[dict[str, str], list[str]]:
    """Environment and extra arguments of the ``slot``-th of ``n`` concurrent fold processes."""
    import torch

    env = dict(os.environ)
    args: list[str] = []
    for key in (
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
    ):
        env.pop(key, None)  # each fold process is a single-process run
    # The n processes share this machine's RAM (and GPUs): a cohort cache takes its part of it.
    env["MOMKD_HOST_PROCESSES"] = str(n)
    if torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = (
            [v for v in visible.split(",") if v.strip()]
            if visible
            else [str(i) for i in range(torch.cuda.device_count())]
        )
        env["CUDA_VISIBLE_DEVICES"] = ids[slot % len(ids)]
        env["MOMKD_DEVICE_PROCESSES"] = str(-(-n // len(ids)))
    else:
        from momkd._threads import available_cores

        threads = str(max(1, available_cores() // n))
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = threads
        args = ["--set", f"train.torch_threads={threads}"]
    return env, args


def run_fold_parallel(
    cfg: RunConfig,
    out_dir: str | os.PathLike[str] | None,
    n: int,
    *,
    resume: bool = False,
    extra_args: Sequence[str] = (),
) -> dict[str, Any]:
    """Train the configured folds, ``n`` at a time, each in its own process.

    Parameters
    ----------
    cfg : RunConfig
        Resolved configuration (``train.folds`` selects the folds; null: all).
    out_dir : path, optional
        Run directory (default ``output.dir``).
    n : int
        Concurrent fold processes.
    resume : bool
        Continue an interrupted run (finished folds are skipped).
    extra_args : sequence of str
        Further arguments of every ``momkd train`` process (e.g. ``--verbose`` is global; this is
        for ``--set`` pairs of run-time keys).

    Returns
    -------
    dict
        The merged summary.

    Raises
    ------
    MomkdError
        A fold process failed (its exit code and last message; its log is ``fold_<k>.log``).
    """
    from momkd.train.runner import prepare_run
    from momkd.train.summary import summarize

    run_dir, folds = prepare_run(cfg, out_dir, resume)
    log.info("fold-parallel: folds %s, %d at a time, in %s", folds, n, run_dir)
    pending = list(folds)
    running: list[tuple[int, int, subprocess.Popen[bytes], Any]] = []
    failed: list[str] = []
    free = list(range(min(n, len(folds)) or 1))
    try:
        while pending or running:
            while pending and free:
                fold, slot = pending.pop(0), free.pop(0)
                env, device_args = _device_env(slot, min(n, len(folds)) or 1)
                cmd = [
                    sys.executable, "-m", "momkd", "train",
                    "--config", str(run_dir / "config.yaml"), "--out", str(run_dir), "--resume",
                    "--set", f"train.folds=[{fold}]", *device_args, *extra_args,
                ]  # fmt: skip
                fh = open(run_dir / f"fold_{fold}.log", "wb")
                proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
                running.append((fold, slot, proc, fh))
            time.sleep(0.2)
            for item in list(running):
                fold, slot, proc, fh = item
                rc = proc.poll()
                if rc is None:
                    continue
                fh.close()
                running.remove(item)
                free.append(slot)
                if rc != 0:
                    lines = (run_dir / f"fold_{fold}.log").read_text(errors="replace").splitlines()
                    last = next((ln for ln in reversed(lines) if ln.strip()), "")
                    failed.append(f"fold {fold} (exit {rc}: {last.strip()})")
    finally:
        for _, _, proc, fh in running:
            proc.kill()
            proc.wait()
            fh.close()
    if failed:
        raise MomkdError(
            f"{run_dir}: {', '.join(failed)}; see {run_dir}/fold_<k>.log, then rerun with --resume"
        )
    return summarize(run_dir)
