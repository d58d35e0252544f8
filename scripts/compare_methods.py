"""Compare MoMKD (three memory modes) with the baselines on one synthetic cohort, same protocol.

Usage::

    python scripts/compare_methods.py --cohort runs/synth_default --out runs/compare [--jobs 2]
        [--task her2] [--set key=value ...]

Generates the default ``momkd synth`` cohort into ``--cohort`` when it is missing (the generator's
defaults, seed 0 — never tuned), trains every variant with ``momkd train`` under identical
settings (5 folds, same splits, same seeds), and writes ``comparison.md`` / ``comparison.json``
with the internal test AUC and the external AUC (per-fold mean ± std and the fold ensemble) next to
the generator's oracle AUCs and the wall time per epoch.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

VARIANTS: dict[str, list[str]] = {
    "momkd (gradient)": ["model.method=momkd", "memory.update=gradient"],
    "momkd (momentum)": ["model.method=momkd", "memory.update=momentum"],
    "momkd (fixed)": ["model.method=momkd", "memory.update=fixed"],
    "abmil": ["model.method=abmil"],
    "batchkd": ["model.method=batchkd"],
}

# Shared settings: 5 folds at official memory dims (S 64, K 16) with a narrower histology width
# and fewer epochs than the released code so that five methods x five folds fit on two CPU cores.
COMMON = [
    "splits.k=5",
    "genomics.n_genes=768",
    "model.hidden=128",
    "model.omics_width=128",
    "model.omics_hidden=128",
    "model.sphere=64",
    "model.memory_k=16",
    "model.classifier_hidden=64",
    "model.attention_dim=64",
    "memory.init_per_class=20000",
    "train.epochs=12",
    "train.min_epochs=6",
    "train.patience=5",
    "train.plateau_patience=2",
    "train.max_patches=256",
]


def _momkd() -> list[str]:
    return [sys.executable, "-m", "momkd.cli"]


def _mean_epoch_seconds(run: Path) -> float | None:
    times: list[float] = []
    for hist in sorted(run.glob("fold_*/history.json")):
        data = json.loads(hist.read_text())
        rows = data.get("epochs", data) if isinstance(data, dict) else data
        for row in rows if isinstance(rows, list) else []:
            if isinstance(row, dict) and isinstance(row.get("seconds"), int | float):
                times.append(float(row["seconds"]))
    return sum(times) / len(times) if times else None


def _pm(d: dict, key: str = "auc") -> str:
    mean, std = (d.get("mean") or {}).get(key), (d.get("std") or {}).get(key)
    if mean is None:
        return "n/a"
    return f"{mean:.3f} ± {std:.3f}" if std is not None else f"{mean:.3f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cohort", default="runs/synth_default")
    ap.add_argument("--out", default="runs/compare")
    ap.add_argument("--task", default="her2", choices=["her2", "pr", "odx"])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()

    cohort, out = Path(args.cohort).resolve(), Path(args.out).resolve()
    if not (cohort / "oracle.json").exists():
        subprocess.run([*_momkd(), "synth", str(cohort), "-q"], check=True)
    oracle = json.loads((cohort / "oracle.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    config = out / "base.yaml"
    config.write_text(
        subprocess.run(
            [*_momkd(), "init-config", "--preset", "official"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    positive, negative = {"odx": ("[High]", "[Low]")}.get(args.task, ("[Positive]", "[Negative]"))
    data = [
        f"data.store={cohort / 'cohort.zarr'}",
        f"data.clinical={cohort / 'clinical.csv'}",
        f"data.expression={cohort / 'expression.csv'}",
        f"data.external={{store: {cohort / 'external.zarr'}, "
        f"clinical: {cohort / 'external_clinical.csv'}}}",
        f"data.label_column={args.task}",
        f"data.positive={positive}",
        f"data.negative={negative}",
    ]

    def run(name: str) -> tuple[str, dict, float]:
        run_dir = out / name.replace(" ", "_").replace("(", "").replace(")", "")
        cmd = [*_momkd(), "train", "--config", str(config), "--out", str(run_dir)]
        if (run_dir / "config.yaml").exists():
            cmd.append("--resume")
        for item in [*data, *COMMON, *VARIANTS[name], *args.set]:
            cmd += ["--set", item]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MOMKD_PROGRESS": "0"}
        t0 = time.perf_counter()
        with open(out / f"{run_dir.name}.log", "w") as log:
            subprocess.run(cmd, check=True, env=env, stdout=log, stderr=subprocess.STDOUT)
        return name, json.loads((run_dir / "summary.json").read_text()), time.perf_counter() - t0

    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(run, args.variants))

    task_oracle = (oracle.get("oracle_auc") or {}).get(args.task, {})
    lines = [
        f"# {args.task}: 5-fold test AUC on the default synthetic cohort (mean ± std over folds)",
        "",
        "| method | internal test AUC | external AUC (fold models) | external AUC (fold ensemble) "
        "| s / epoch | wall s |",
        "|---|---|---|---|---|---|",
    ]
    table = []
    for name, summary, wall in results:
        ext = summary.get("external") or {}
        ens = (ext.get("ensemble") or {}).get("auc")
        epoch_s = _mean_epoch_seconds(
            out / name.replace(" ", "_").replace("(", "").replace(")", "")
        )
        lines.append(
            f"| {name} | {_pm(summary)} | {_pm(ext)} | "
            f"{'n/a' if ens is None else f'{ens:.3f}'} | "
            f"{'n/a' if epoch_s is None else f'{epoch_s:.1f}'} | {wall:.0f} |"
        )
        table.append(
            {
                "method": name,
                "summary_mean": summary.get("mean"),
                "summary_std": summary.get("std"),
                "external": ext,
                "epoch_seconds": epoch_s,
                "wall_seconds": wall,
            }
        )
    lines += [
        "",
        "oracle AUCs (generator): "
        + ", ".join(f"{k} {v:.3f}" for k, v in task_oracle.items() if isinstance(v, float)),
    ]
    lines += ["", "settings: " + " ".join(COMMON + args.set)]
    (out / "comparison.md").write_text("\n".join(lines) + "\n")
    (out / "comparison.json").write_text(
        json.dumps({"task": args.task, "oracle": task_oracle, "results": table}, indent=2)
    )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
