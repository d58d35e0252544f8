"""Model selection on small validation sets: which epoch a fold keeps, and what it costs on test.

Writes a planted-signal synthetic cohort (labels are a thresholded linear function of each
patient's mean patch features, the middle 30 % of patients excluded, as in tests/test_learning.py),
trains one k-fold run per protocol given on the command line and prints, per protocol, the epoch at
which the validation AUC first reaches its maximum ("saturates"), the kept epoch, and the test AUC
(mean ± std over folds, and pooled over all test predictions).

    python scripts/model_selection_study.py OUT_DIR \\
        --protocol auc_ties="train.monitor=val_auc" \\
        --protocol loss="train.monitor=val_loss" \\
        --protocol loss_raw="train.monitor=val_loss;data.standardize=none" \\
        [--method abmil] [--patients 240] [--set key=value ...]

Each ``--protocol NAME=OVERRIDES`` is a ``;``-separated list of ``--set`` items. Results go to
``OUT_DIR/<name>/`` (a normal run directory) and ``OUT_DIR/study.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path

import numpy as np

BASE = [
    "splits.k=5",
    "genomics.n_genes=16",
    "model.hidden=32",
    "model.omics_width=16",
    "model.omics_hidden=16",
    "model.sphere=8",
    "model.memory_k=2",
    "model.classifier_hidden=16",
    "model.attention_dim=16",
    "memory.init_per_class=2000",
    "train.epochs=20",
    "train.min_epochs=10",
    "train.patience=5",
    "train.plateau_patience=2",
    "train.lr=5e-4",
    "train.num_threads=1",
]


def planted_cohort(root: Path, patients: int, seed: int) -> Path:
    """Synthetic cohort whose label ``planted`` is linear in the mean patch features."""
    from momkd.data.store import CohortStore
    from momkd.synth import generate_cohort

    if not (root / "planted.csv").is_file():
        generate_cohort(
            root,
            patients=patients,
            external=0,
            dim=32,
            genes=40,
            patches=32,
            seed=seed,
            progress=False,
            overwrite=True,
        )
        store = CohortStore.open(root / "cohort.zarr")
        with open(root / "clinical.csv", newline="") as fh:
            clinical = list(csv.DictReader(fh))
        direction = np.random.default_rng(seed).standard_normal(store.feature_dim)
        score = {s: float(store.read(s).features.mean(0) @ direction) for s in store.slide_ids}
        per_case: dict[str, list[float]] = {}
        for r in clinical:
            per_case.setdefault(r["case_id"], []).append(score[r["slide_id"]])
        case_score = {c: float(np.mean(v)) for c, v in per_case.items()}
        low, high = np.quantile(list(case_score.values()), [0.35, 0.65])
        tmp = root / "planted.csv.tmp"
        with open(tmp, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["case_id", "slide_id", "planted"])
            for r in clinical:
                s = case_score[r["case_id"]]
                value = "Positive" if s > high else "Negative" if s < low else "Equivocal"
                w.writerow([r["case_id"], r["slide_id"], value])
        tmp.replace(root / "planted.csv")
    return root


def saturation_epoch(aucs: list[float], tol: float = 1e-9) -> int:
    """First epoch whose validation AUC is within ``tol`` of the run's maximum."""
    top = max(aucs)
    return next(i for i, a in enumerate(aucs) if a >= top - tol)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--protocol", action="append", required=True, metavar="NAME=OVERRIDES")
    ap.add_argument("--method", default="abmil")
    ap.add_argument("--patients", type=int, default=240)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--set", action="append", default=[], dest="extra")
    args = ap.parse_args()

    import torch
    from momkd.config import load_config
    from momkd.metrics import binary_metrics
    from momkd.train.runner import train

    torch.set_num_threads(1)
    root = planted_cohort(args.out / "cohort", args.patients, args.seed)
    study: dict[str, dict] = {}
    path = args.out / "study.json"
    if path.is_file():
        study = json.loads(path.read_text())
    for item in args.protocol:
        name, _, text = item.partition("=")
        overrides = [o for o in text.split(";") if o]
        run_dir = args.out / name
        sets = [
            f"data.store={root / 'cohort.zarr'}",
            f"data.clinical={root / 'planted.csv'}",
            f"data.expression={root / 'expression.csv'}",
            "data.label_column=planted",
            "data.positive=[Positive]",
            "data.negative=[Negative]",
            f"model.method={args.method}",
            *BASE,
            *args.extra,
            *overrides,
        ]
        summary = train(load_config(None, sets), out_dir=run_dir, resume=True, progress=False)
        rows = []
        ys, ps = [], []
        for fold in summary["folds"]:
            k = fold["fold"]
            hist = json.loads((run_dir / f"fold_{k}" / "history.json").read_text())
            aucs = [h["val_auc"] for h in hist]
            rows.append(
                {
                    "fold": k,
                    "n_val": fold["n_val"],
                    "saturates": saturation_epoch(aucs),
                    "kept": fold["best_epoch"],
                    "epochs": fold["epochs"],
                    "test_auc": fold["test"]["auc"],
                }
            )
            with open(run_dir / f"fold_{k}" / "test_predictions.csv", newline="") as fh:
                for r in csv.DictReader(fh):
                    ys.append(int(r["label"]))
                    ps.append(float(r["prob"]))
        aucs = [r["test_auc"] for r in rows]
        study[name] = {
            "overrides": overrides,
            "folds": rows,
            "test_auc_mean": statistics.mean(aucs),
            "test_auc_std": statistics.stdev(aucs),
            "pooled_test_auc": binary_metrics(np.array(ys), np.array(ps))["auc"],
            "median_kept": statistics.median(r["kept"] for r in rows),
            "median_saturates": statistics.median(r["saturates"] for r in rows),
        }
        path.write_text(json.dumps(study, indent=2) + "\n")
    print(
        f"{'protocol':<14} {'val n':>5} {'saturates':>9} {'kept':>5} {'test AUC':>15} {'pooled':>7}"
    )
    for name, s in study.items():
        n_val = statistics.median(r["n_val"] for r in s["folds"])
        print(
            f"{name:<14} {n_val:>5.0f} {s['median_saturates']:>9.1f} {s['median_kept']:>5.1f} "
            f"{s['test_auc_mean']:>7.3f} ± {s['test_auc_std']:.3f} {s['pooled_test_auc']:>7.3f}"
        )


if __name__ == "__main__":
    main()
