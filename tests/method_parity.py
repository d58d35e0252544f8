"""Fingerprints of a fixed-seed training run of every method (the behaviour-preservation check).

A refactor of the training code must not change what training does. This module trains each method
on one small synthetic cohort with ``train.deterministic`` on and reduces the run to a fingerprint:

* the epoch history without its timing columns;
* every prediction CSV, value by value;
* the kept model and the last training state (model, optimizer, sampler), tensor by tensor: a
  SHA-256 of the raw bytes and the float64 sum.

``python tests/method_parity.py --write`` records the fingerprints in
``tests/data/method_parity.json`` together with the torch version and platform they were taken on;
``tests/test_method_parity.py`` trains again and compares. On the platform of the record every value
must be bit-identical; on another torch or platform the floating-point values are compared with a
small tolerance instead (kernels and reductions may round differently there).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import platform
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from records import emit

RECORD = Path(__file__).parent / "data" / "method_parity.json"

METHODS = ("momkd", "momkd_histo", "abmil", "batchkd", "meanpool")

_CONFIG = """\
data:
  store: {data}/cohort.zarr
  clinical: {data}/clinical.csv
  expression: {data}/expression.csv
  label_column: pr
  positive: [Positive]
  negative: [Negative]
  external: {{store: {data}/external.zarr, clinical: {data}/external_clinical.csv}}
splits: {{k: 2, seed: 1}}
genomics: {{n_genes: 10}}
model: {{method: {method}, hidden: 12, omics_width: 8, omics_hidden: 8, sphere: 8, memory_k: 2,
        classifier_hidden: 6, attention_dim: 8}}
memory: {{init_per_class: 200}}
train: {{epochs: 3, min_epochs: 3, patience: 3, deterministic: true, max_patches: 12,
        folds: [0], bootstrap: 50}}
"""

# Columns of history.json that measure time, not training.
_TIMING = ("seconds", "wait")


def platform_key() -> str:
    """What bit-identity depends on besides the code."""
    return f"torch {torch.__version__} numpy {np.__version__} {platform.machine()}"


def make_cohort(folder: Path) -> Path:
    """The fixed cohort every fingerprint is taken on."""
    from momkd.synth import generate_cohort

    data = folder / "data"
    if not (data / "cohort.zarr").exists():
        generate_cohort(
            data, patients=40, external=8, dim=32, genes=30, patches=20, seed=4, progress=False
        )
    return data


def _history(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if not any(t in k for t in _TIMING)} for r in rows]


def _csv(path: Path) -> list[list[str]]:
    with path.open(newline="") as f:
        return list(csv.reader(f))


def _tensors(state: Any, prefix: str, out: dict[str, Any]) -> None:
    """Every tensor (and number) reachable in a checkpoint entry, by dotted path."""
    if isinstance(state, torch.Tensor):
        t = state.detach().cpu().contiguous()
        out[prefix] = {
            "sha256": hashlib.sha256(t.numpy().tobytes()).hexdigest(),
            "sum": float(t.double().sum()) if t.numel() else 0.0,
            "shape": list(t.shape),
        }
    elif isinstance(state, dict):
        for k in sorted(state, key=str):
            _tensors(state[k], f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            _tensors(v, f"{prefix}.{i}", out)
    elif isinstance(state, (int, float, bool, str)) or state is None:
        out[prefix] = state


def fingerprint(method: str, folder: Path) -> dict[str, Any]:
    """Train ``method`` on the fixed cohort under ``folder`` and return its fingerprint."""
    from momkd.config import load_config
    from momkd.train import train

    # Reductions split over several threads round differently: one intra-op thread, as in the tests.
    torch.set_num_threads(1)
    data = make_cohort(folder)
    cfg_path = folder / f"{method}.yaml"
    cfg_path.write_text(_CONFIG.format(data=data, method=method))
    run = folder / f"run_{method}"
    shutil.rmtree(run, ignore_errors=True)
    train(load_config(cfg_path), out_dir=run)
    fold = run / "fold_0"
    ckpt: dict[str, Any] = {}
    best = torch.load(fold / "best.pt", map_location="cpu", weights_only=True)
    last = torch.load(fold / "last.pt", map_location="cpu", weights_only=True)
    _tensors(best["model"], "best.model", ckpt)
    for key in ("model", "optimizer", "sampler", "monitor"):
        _tensors(last[key], f"last.{key}", ckpt)
    result = json.loads((fold / "result.json").read_text())
    return {
        "history": _history(json.loads((fold / "history.json").read_text())),
        "predictions": {
            name: _csv(fold / name)
            for name in ("val_predictions.csv", "test_predictions.csv", "external_predictions.csv")
        },
        "checkpoint": ckpt,
        "test": result["test"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help=f"record the fingerprints in {RECORD}")
    ap.add_argument("--work", default=None, help="work folder (default: a temporary one)")
    args = ap.parse_args(argv)
    import os
    import tempfile

    os.environ["MOMKD_PROGRESS"] = "0"

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        record = {"platform": platform_key(), "methods": {m: fingerprint(m, work) for m in METHODS}}
    return emit(record, RECORD, args.write)


if __name__ == "__main__":
    raise SystemExit(main())
