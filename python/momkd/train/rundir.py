"""The run directory: where a run goes, whether it may start or resume there (configuration
differences, trained folds), and its configuration, data report and splits once the inputs are
checked; :func:`finished_folds` for the summary and fold-parallel runs."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from momkd.config import RunConfig, config_to_dict, load_config, save_config
from momkd.errors import ConfigError
from momkd.train.splits import (
    Split,
    write_splits,
)

__all__ = ["config_differences", "finished_folds", "resolve_run_dir", "start_run_dir"]

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


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


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


def resolve_run_dir(cfg: RunConfig, out_dir: str | os.PathLike[str] | None, resume: bool) -> Path:
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


def start_run_dir(
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

    from momkd._io import write_json

    run_dir.mkdir(parents=True, exist_ok=True)
    if not (resume and (run_dir / "config.yaml").is_file()):
        # A resumed run keeps its file (it matched, up to run-time keys such as train.folds).
        saved = dataclasses.replace(cfg, output=dataclasses.replace(cfg.output, dir=run_dir))
        save_config(saved, run_dir / "config.yaml")
    write_json(run_dir / "data.json", data_report)
    if write:
        write_splits(splits, run_dir / "splits")


def finished_folds(run_dir: str | os.PathLike[str]) -> list[int]:
    """Folds of ``run_dir`` whose ``fold_<k>/result.json`` exists, in increasing order."""
    out = []
    for p in Path(run_dir).glob("fold_*/result.json"):
        suffix = p.parent.name.removeprefix("fold_")
        if suffix.isdigit():
            out.append(int(suffix))
    return sorted(out)
