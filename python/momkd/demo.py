"""``momkd demo``: the whole workflow on a synthetic cohort, MoMKD against ABMIL and mean pooling.

Steps (all under ``OUT``):

1. ``data/``: a synthetic paired histology-genomics cohort (:func:`momkd.synth.generate_cohort`)
   with TRIDENT-layout ``.h5`` copies of the internal slides, and its oracle AUCs;
2. ``data/ingested.zarr``: those ``.h5`` files ingested into a cohort store with
   :func:`momkd.data.ingest.ingest`, followed by one timed pass of the bag loader over it;
3. ``runs/momkd``, ``runs/abmil`` and ``runs/meanpool``: cross-validated training of the three
   methods on the ingested store with the ``demo`` preset of ``momkd init-config`` as it is (no
   further settings), each fold model also predicting the external cohort;
4. a comparison table (internal test AUC mean ± std over folds, pooled test AUC with its 95%
   stratified bootstrap CI, external AUC per-fold mean ± std and fold ensemble with CI, the
   generator's oracle AUCs, wall times) and the paired differences MoMKD − ABMIL, MoMKD − meanpool
   and ABMIL − meanpool on the same test slides (paired bootstrap CI, DeLong p-value;
   :mod:`momkd.compare`), also saved as
   ``demo_report.txt`` / ``demo_report.json`` and ``comparison.json`` / ``comparison.html``.

The default size (800 patients, 64-dim features, about 64 patches per slide, 3 folds) trains in a
few minutes on two CPU cores; ``quick=True`` is a much smaller smoke run.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from momkd.errors import ConfigError

__all__ = ["DemoSize", "run_demo"]

log = logging.getLogger(__name__)

_MARKER = ".momkd-demo"
#: Training and paired-comparison order (differences are earlier minus later method).
_METHODS = ("momkd", "abmil", "meanpool")
#: Order of the table rows: the floor first.
_ROWS = ("meanpool", "abmil", "momkd")
_NAMES = {"momkd": "MoMKD", "abmil": "ABMIL", "meanpool": "meanpool"}


@dataclass(frozen=True)
class DemoSize:
    """Cohort size and run overrides of a demo."""

    patients: int
    external: int
    dim: int
    genes: int
    patches: int
    overrides: tuple[str, ...] = ()


# Large enough that the weak, sparse histology signal of the generator is learnable at all (at 120
# patients even a logistic regression on tumour-patch means is at chance on her2), small enough
# (64-dim features, ~64 patches per slide) to train both methods in a few minutes on two cores.
DEFAULT = DemoSize(
    patients=800,
    external=100,
    dim=64,
    genes=512,
    patches=64,
    overrides=(),
)
QUICK = DemoSize(
    patients=40,
    external=16,
    dim=32,
    genes=64,
    patches=30,
    overrides=(
        "splits.k=2",
        "genomics.n_genes=32",
        "model.hidden=16",
        "model.omics_width=16",
        "model.omics_hidden=16",
        "model.sphere=8",
        "model.memory_k=2",
        "model.classifier_hidden=8",
        "model.attention_dim=8",
        "memory.init_per_class=500",
        "train.epochs=2",
        "train.min_epochs=1",
        "train.patience=2",
    ),
)


def _prepare_out(out: Path) -> None:
    if out.exists():
        if not out.is_dir():
            raise ConfigError(f"demo: {out} exists and is not a folder")
        entries = [e for e in out.iterdir()]
        if entries and not (out / _MARKER).is_file():
            raise ConfigError(
                f"demo: {out} is not empty and was not written by `momkd demo`; choose another --out"
            )
        for name in ("data", "runs"):
            if (out / name).exists():
                shutil.rmtree(out / name)
    out.mkdir(parents=True, exist_ok=True)
    (out / _MARKER).write_text("written by momkd demo\n", encoding="utf-8")


def _loader_pass(store_path: Path) -> dict[str, float]:
    from momkd.data.loader import BagLoader
    from momkd.data.store import CohortStore

    store = CohortStore.open(store_path)
    t0 = time.perf_counter()
    n_bags = n_patches = n_bytes = 0
    for bag in BagLoader(store, shuffle=True, seed=0, knn_k=8):
        n_bags += 1
        n_patches += bag.n_patches
        n_bytes += bag.features.numel() * bag.features.element_size()
    dt = max(time.perf_counter() - t0, 1e-9)
    return {
        "bags": n_bags,
        "patches": n_patches,
        "seconds": dt,
        "bags_per_s": n_bags / dt,
        "gb_per_s": n_bytes / dt / 1e9,
    }


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.3f}"


def _pm(d: dict[str, Any], key: str = "auc") -> str:
    mean, std = (d.get("mean") or {}).get(key), (d.get("std") or {}).get(key)
    return f"{_fmt(mean)} ± {_fmt(std)}"


def format_demo(report: dict[str, Any]) -> str:
    """The comparison table of a demo report."""
    label = report["label"]
    lines = [
        "",
        (
            f"MoMKD, ABMIL and meanpool on the synthetic cohort (label {label}, {report['folds']} folds, "
            f"{report['cohort']['slides']} slides of {report['cohort']['patients']} patients; "
            f"external {report['external_cohort']['slides']} slides)"
        ),
        (
            f"{'method':<8} {'test AUC (mean ± std)':>22} {'external AUC (mean ± std)':>26} "
            f"{'external ensemble':>18} {'time [s]':>9}"
        ),
    ]
    for method in _ROWS:
        r = report["methods"][method]
        lines.append(
            f"{method:<8} {r['test_auc']:>22} {r['external_auc']:>26} "
            f"{_fmt(r['external_ensemble_auc']):>18} {r['seconds']:>9.1f}"
        )
    if report.get("comparison"):
        from momkd.compare import _diff_text, _with_ci

        comp = report["comparison"]
        lines.append("pooled over all folds' test slides, 95% CI (stratified bootstrap):")
        for method in _ROWS:
            m = comp["methods"][method]
            ext = (m.get("external") or {}).get("ensemble_auc")
            lines.append(
                f"  {method:<8} test AUC {_with_ci(m['pooled_auc'])}, patient level "
                f"{_with_ci(m['patient']['pooled_auc'])}, external ensemble {_with_ci(ext)}"
            )
        for key, where in (
            ("paired", "test slides"),
            ("paired_patient", "test patients"),
            ("paired_external", "external cohort"),
        ):
            for pair in comp.get(key) or []:
                names = f"{_NAMES.get(pair['a'], pair['a'])} - {_NAMES.get(pair['b'], pair['b'])}"
                lines.append(
                    f"paired difference {names} ({where}): AUC {_diff_text(pair)} "
                    "(95% paired bootstrap CI, DeLong p)"
                )
    oracle = report.get("oracle") or {}
    if oracle:
        keys = [k for k in ("latent", "expression", "histology") if k in oracle]
        ext_keys = [k for k in ("external_latent", "external_histology") if k in oracle]
        lines.append(
            "oracle AUCs of the generator: "
            + ", ".join(f"{k} {_fmt(oracle[k])}" for k in keys + ext_keys)
        )
    lines.append(
        "(latent: the noiseless score; expression: cross-validated ridge classifier on "
        "expression; histology: the hidden tumour-morphology signal; see docs/SYNTHETIC.md)"
    )
    return "\n".join(lines)


def run_demo(
    out: str | os.PathLike[str] = "demo_out",
    quick: bool = False,
    *,
    echo: Callable[[str], None] | None = None,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Synthesise a cohort, ingest it, train MoMKD, ABMIL and meanpool, and compare them.

    Parameters
    ----------
    out : path
        Output folder (empty, new, or an earlier demo's folder, which is replaced).
    quick : bool
        A much smaller cohort and two epochs (a smoke test).
    echo : callable, optional
        Receives each line of the report (default: written to standard output).
    progress : bool, optional
        Progress bars (default: on a terminal).

    Returns
    -------
    dict
        The report also written to ``OUT/demo_report.json``.
    """
    from momkd._io import write_json
    from momkd.config import load_config, preset_yaml
    from momkd.data.ingest import ingest
    from momkd.report import write_report
    from momkd.synth import generate_cohort
    from momkd.train.runner import train

    def say(line: str) -> None:
        if echo is not None:
            echo(line)
        else:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    show = sys.stderr.isatty() if progress is None else progress
    size = QUICK if quick else DEFAULT
    from momkd._threads import set_torch_threads

    # The demo models are small: one intra-op thread beats two on a 2-core machine where the Rust
    # loader's prefetch threads run alongside.
    set_torch_threads(1)
    out_dir = Path(out).absolute()
    _prepare_out(out_dir)
    data = out_dir / "data"
    t0 = time.perf_counter()
    oracle_report = generate_cohort(
        data,
        patients=size.patients,
        external=size.external,
        dim=size.dim,
        genes=size.genes,
        patches=size.patches,
        seed=0,
        h5=True,
        progress=show,
    )
    cohort = oracle_report.get("cohort", {})
    say(
        f"synthetic cohort: {cohort.get('slides')} slides of {cohort.get('patients')} patients, "
        f"{size.dim}-dim features, {size.genes} genes ({time.perf_counter() - t0:.1f} s) in {data}"
    )

    ingested = data / "ingested.zarr"
    summary = ingest(data / "h5", ingested, progress=show)
    say(
        f"ingest: {summary.get('slides_written')} TRIDENT .h5 files, {summary.get('patches')} "
        f"patches -> {ingested.name} in {summary.get('seconds', 0.0):.2f} s "
        f"({summary.get('mb_per_s', 0.0):.0f} MB/s read)"
    )
    lp = _loader_pass(ingested)
    say(
        f"loader: {lp['bags']} bags ({lp['patches']} patches, with k-NN graphs) in "
        f"{lp['seconds']:.2f} s = {lp['bags_per_s']:.0f} bags/s, {lp['gb_per_s']:.2f} GB/s decoded"
    )

    config_path = data / "demo.yaml"
    config_path.write_text(preset_yaml("demo"), encoding="utf-8")
    base = [f"data.store={ingested}", *size.overrides]
    results: dict[str, Any] = {}
    label = ""
    folds = 0
    for method in _METHODS:
        cfg = load_config(config_path, overrides=[*base, f"model.method={method}"])
        label = cfg.data.label_column
        say(f"training {method} ({cfg.splits.k} folds, up to {cfg.train.epochs} epochs) ...")
        t = time.perf_counter()
        s = train(cfg, out_dir=out_dir / "runs" / method, progress=show)
        seconds = time.perf_counter() - t
        folds = len(s["folds"])
        ext = s.get("external") or {}
        results[method] = {
            "test_auc": _pm(s),
            "test_auc_mean": (s.get("mean") or {}).get("auc"),
            "test_auc_std": (s.get("std") or {}).get("auc"),
            "external_auc": _pm(ext),
            "external_auc_mean": (ext.get("mean") or {}).get("auc"),
            "external_auc_std": (ext.get("std") or {}).get("auc"),
            "external_ensemble_auc": (ext.get("ensemble") or {}).get("auc"),
            "seconds": seconds,
            "run_dir": str(out_dir / "runs" / method),
            "report": str(write_report(out_dir / "runs" / method)),
        }
        say(
            f"  {method}: test AUC {results[method]['test_auc']}, external AUC "
            f"{results[method]['external_auc']} ({seconds:.1f} s)"
        )
    from momkd.compare import summarise_runs

    comparison = summarise_runs(
        {method: out_dir / "runs" / method for method in _METHODS},
        out_dir,
        resamples=cfg.train.ci_resamples,
        seed=cfg.train.seed,
    )
    oracle = (oracle_report.get("oracle_auc") or {}).get(label, {})
    report = {
        "label": label,
        "folds": folds,
        "quick": quick,
        "cohort": {k: cohort.get(k) for k in ("patients", "slides", "patches")},
        "external_cohort": {
            k: (oracle_report.get("external") or {}).get(k) for k in ("patients", "slides")
        },
        "ingest": {k: summary.get(k) for k in ("slides_written", "patches", "seconds", "mb_per_s")},
        "loader": lp,
        "methods": results,
        "oracle": oracle,
        "comparison": comparison,
        "seconds": time.perf_counter() - t0,
    }
    text = format_demo(report)
    for line in text.splitlines():
        say(line)
    say(f"total {report['seconds']:.1f} s; runs in {out_dir / 'runs'}")
    for method, r in results.items():
        say(f"run report ({method}): {r['report']}")
    say(f"comparison: {out_dir / 'comparison.html'}")
    write_json(out_dir / "demo_report.json", report)
    (out_dir / "demo_report.txt").write_text(text + "\n", encoding="utf-8")
    return report
