"""``momkd compare``: several methods trained on identical splits, compared with paired tests.

:func:`run_compare` writes one set of split files, trains every method with ``momkd train`` on them
(``splits.dir``), and :func:`summarise_runs` compares the finished runs on the same test slides.
Output folder::

    splits/splits_<k>.csv         the cross-validation splits, written once, used by every run
    runs/<name>/                  one run directory per method (see momkd.train.runner)
    runs/<name>.frac<f>/          learning-curve runs on a share f of each fold's training patients
    comparison.json               the numbers (below)
    comparison.html               self-contained report: table, ROC overlay, forest plot, curve
    comparison/                   the report's figures as PNG files

Methods are given as ``METHOD[:KEY=VALUE[:KEY=VALUE...]]``, comma-separated, e.g.
``momkd,momkd:memory.update=momentum,abmil``. ``METHOD`` is ``momkd``, ``abmil`` or ``batchkd``;
each ``KEY=VALUE`` is a configuration override (as ``--set``) for that method only. The whole entry
is the method's name in the results; its run folder is the name with ``:`` written as ``__`` and
other characters outside ``[A-Za-z0-9._=-]`` as ``_``. Commas and colons inside brackets
(``memory.momentum_sources=[omics,wsi]``) do not split.

``comparison.json``::

    methods: {name: {run_dir, method, overrides, mean, std, n_test, n_pos,
                     pooled_auc: {value, ci_low, ci_high},
                     patient: {mean_auc, std_auc, n, pooled_auc: {...}},
                     external: {mean_auc, std_auc, n, ensemble_auc: {...}}}}
    paired: [{a, b, auc_a, auc_b, auc_diff, ci_low, ci_high, p_value, p_value_bootstrap, n, n_pos}]
    paired_patient: [...]     the same at patient level (slide probabilities averaged per patient)
    paired_external: [...]    the same on the external cohort (fold-ensemble probabilities)
    learning_curve: {fractions, methods: {name: [{fraction, run_dir, n_train, mean_auc, std_auc,
                                                  pooled_auc: {...}}]}}
    resamples, seed, level

``auc_diff`` is ``AUC_a - AUC_b`` for every pair ``a`` before ``b`` in the ``--methods`` order, on
the pooled test predictions of all folds (every method predicts exactly the same slides: this is
checked). The CI is a paired stratified bootstrap (the same resamples for both methods), the
p-value DeLong's test (:func:`momkd.metrics.paired_auc_test`). With more than two classes
(``data.classes``) the AUC is the macro one-vs-rest AUC, and since DeLong's test is binary only the
p-value is the paired bootstrap's (:func:`momkd.multiclass_metrics.paired_macro_auc_test`).

Runs whose rows differ but whose patients agree (``data.bag: slide`` against ``data.bag: patient``)
are compared at patient level only. A rerun with the same arguments skips finished runs (a ``summary.json`` with an unchanged
configuration) and resumes unfinished ones from their last epoch.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from momkd.errors import ConfigError, DataError
from momkd.htmlkit import (
    COLOURS,
    class_roc_figure,
    escape,
    figure_html,
    html_page,
    new_figure,
    roc_pr_figure,
    save_figure,
    section,
)
from momkd.methods import METHODS

__all__ = [
    "MethodSpec",
    "format_comparison",
    "parse_methods",
    "parse_fractions",
    "run_compare",
    "summarise_runs",
]

log = logging.getLogger(__name__)

_METHODS = tuple(METHODS)
_LEVEL = 0.95


# ------------------------------------------------------------------------------------ arguments


@dataclass(frozen=True)
class MethodSpec:
    """One entry of ``--methods``.

    Attributes
    ----------
    name : str
        The entry as given (its name in the results).
    method : str
        ``model.method``.
    overrides : tuple[str, ...]
        ``KEY=VALUE`` configuration overrides of this method.
    slug : str
        Its run folder name.
    """

    name: str
    method: str
    overrides: tuple[str, ...]
    slug: str


def _split_top(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside brackets and braces."""
    parts: list[str] = []
    cur: list[str] = []
    depth = 0
    for ch in text:
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth = max(0, depth - 1)
        if ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def parse_methods(text: str | Sequence[str]) -> list[MethodSpec]:
    """Parse ``--methods`` (see the module docstring for the syntax).

    Parameters
    ----------
    text
        ``"momkd,abmil:train.lr=1e-3"`` or a list of such strings.

    Returns
    -------
    list[MethodSpec]
        In the given order.

    Raises
    ------
    ConfigError
        An empty entry, an unknown method, an override without ``=``, ``model.method`` as an
        override, or a name given twice (the message quotes the entry).
    """
    items = [text] if isinstance(text, str) else list(text)
    entries = [e.strip() for item in items for e in _split_top(item, ",")]
    if not any(entries):
        raise ConfigError("--methods: no method given (e.g. --methods momkd,abmil)")
    specs: list[MethodSpec] = []
    slugs: set[str] = set()
    for entry in entries:
        if not entry:
            raise ConfigError(f"--methods: empty entry in {','.join(entries)!r}")
        method, *overrides = [p.strip() for p in _split_top(entry, ":")]
        if method not in _METHODS:
            raise ConfigError(
                f"--methods: {entry!r}: unknown method {method!r} (one of {', '.join(_METHODS)})"
            )
        for o in overrides:
            key = o.partition("=")[0].strip()
            if "=" not in o or not key:
                raise ConfigError(f"--methods: {entry!r}: override {o!r} is not KEY=VALUE")
            if key == "model.method":
                raise ConfigError(f"--methods: {entry!r}: give the method first, not model.method")
        if any(s.name == entry for s in specs):
            raise ConfigError(f"--methods: {entry!r} given twice")
        slug = re.sub(r"[^A-Za-z0-9._=-]+", "_", entry.replace(":", "__")).strip("._") or method
        base, i = slug, 2
        while slug in slugs:
            slug, i = f"{base}_{i}", i + 1
        slugs.add(slug)
        specs.append(MethodSpec(entry, method, tuple(overrides), slug))
    return specs


def parse_fractions(text: str | Sequence[float] | None) -> list[float]:
    """Training fractions of ``--train-fraction``: sorted, unique, in ``(0, 1]``, always with 1.

    Raises
    ------
    ConfigError
        A value that is not a number in ``(0, 1]``.
    """
    if text is None:
        return [1.0]
    raw = text.split(",") if isinstance(text, str) else list(text)
    out = {1.0}
    for item in raw:
        try:
            f = float(item)
        except (TypeError, ValueError):
            raise ConfigError(f"--train-fraction: {item!r} is not a number") from None
        if not 0.0 < f <= 1.0:
            raise ConfigError(f"--train-fraction: {item!r} is not in (0, 1]")
        out.add(f)
    return sorted(out)


def _run_name(spec: MethodSpec, fraction: float) -> str:
    return spec.slug if fraction == 1.0 else f"{spec.slug}.frac{fraction:g}"


# ----------------------------------------------------------------------------------- training


def _prepare_splits(base: Any, specs: Sequence[MethodSpec], out: Path) -> Path:
    """Write the common split files once (or keep those of an earlier call)."""
    from momkd.train.inputs import load_clinical_table, run_splits, with_expression

    folder = out / "splits"
    if folder.is_dir() and any(folder.glob("splits_*.csv")):
        log.info("compare: reusing the split files in %s", folder)
        return folder
    base.require_inputs()
    table = load_clinical_table(base)
    if any(METHODS[s.method].expression for s in specs):
        # Splits over the slides every method can use: those of patients with expression.
        table, _, _ = with_expression(base, table)
    # The same rule as `momkd train`: user split files resolved against the table, else new ones;
    # written to OUT/splits and handed to every method's run through splits.dir.
    run_splits(base, out, table, resume=False)
    return folder


def _train_one(cfg: Any, run_dir: Path, progress: bool | None) -> str:
    """Train, resume or skip one run; returns what was done."""
    from momkd.config import load_config
    from momkd.train.rundir import config_differences
    from momkd.train.runner import train

    if (run_dir / "summary.json").is_file() and (run_dir / "config.yaml").is_file():
        diff = config_differences(load_config(run_dir / "config.yaml"), cfg)
        if diff:
            raise ConfigError(
                f"{run_dir}: finished with another configuration ({', '.join(diff[:6])}); "
                "choose another --out"
            )
        return "skipped (finished)"
    resume = (run_dir / "config.yaml").is_file()
    train(cfg, out_dir=run_dir, resume=resume, progress=progress)
    return "resumed" if resume else "trained"


def run_compare(
    config: str | os.PathLike[str] | None,
    methods: str | Sequence[str],
    out: str | os.PathLike[str],
    overrides: Sequence[str] = (),
    train_fractions: str | Sequence[float] | None = None,
    *,
    resamples: int | None = None,
    progress: bool | None = None,
    reports: bool = True,
) -> dict[str, Any]:
    """Train every method on identical splits and compare them (``momkd compare``).

    Parameters
    ----------
    config
        The shared run configuration (YAML); ``model.method`` is set per method.
    methods
        ``--methods`` (see :func:`parse_methods`).
    out
        Output folder; an earlier call's folder is resumed.
    overrides
        ``--set`` items applied to every method (before the method's own overrides).
    train_fractions
        ``--train-fraction``: shares of each fold's training patients for a learning curve
        (1 is always run; validation and test sets stay fixed).
    resamples
        Bootstrap resamples of the CIs (default ``train.ci_resamples`` of the configuration).
    progress
        Progress bars (default: on a terminal).
    reports
        Write each full-data run's ``report.html``.

    Returns
    -------
    dict
        The content of ``comparison.json``.

    Raises
    ------
    ConfigError
        Bad arguments or configuration; a finished run in ``out`` made with another configuration.
    DataError
        Bad inputs (as ``momkd train``), or runs that did not predict the same test slides.
    """
    from momkd.config import load_config

    specs = parse_methods(methods)
    fractions = parse_fractions(train_fractions)
    base = load_config(config, overrides=list(overrides))
    out_dir = Path(out).expanduser().absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    split_dir = _prepare_splits(base, specs, out_dir)
    runs: dict[str, Path] = {}
    curve: dict[str, dict[float, Path]] = {s.name: {} for s in specs}
    # Full-data runs first: the comparison is usable before the learning curve is complete.
    for fraction in sorted(fractions, reverse=True):
        for spec in specs:
            items = [
                *overrides,
                f"model.method={spec.method}",
                *spec.overrides,
                f"splits.dir={split_dir}",
                f"splits.train_fraction={fraction!r}",
            ]
            cfg = load_config(config, overrides=items)
            run_dir = out_dir / "runs" / _run_name(spec, fraction)
            log.info("compare: %s (training fraction %g) in %s", spec.name, fraction, run_dir)
            done = _train_one(cfg, run_dir, progress)
            log.info("compare: %s (fraction %g): %s", spec.name, fraction, done)
            curve[spec.name][fraction] = run_dir
            if fraction == 1.0:
                runs[spec.name] = run_dir
                if reports and done != "skipped (finished)":
                    _write_run_report(run_dir)
    n = base.train.ci_resamples if resamples is None else resamples
    return summarise_runs(
        runs,
        out_dir,
        resamples=n,
        seed=base.train.seed,
        curve=curve if len(fractions) > 1 else None,
        overrides={s.name: list(s.overrides) for s in specs},
    )


def _write_run_report(run_dir: Path) -> None:
    from momkd.report import write_report

    try:
        write_report(run_dir)
    except Exception as exc:  # noqa: BLE001 - the run's results are already on disk
        log.warning("%s: could not write the run report: %s", run_dir, exc)


# ----------------------------------------------------------------------------------- analysis


@dataclass
class _Predictions:
    """Pooled labelled predictions of one run, keyed by slide (or patient) id."""

    ids: list[str]
    cases: list[str]
    y: np.ndarray
    p: np.ndarray

    def patients(self) -> _Predictions:
        from momkd.metrics import patient_level

        ids, y, p = patient_level(self.cases, self.y, self.p, slide_ids=self.ids)
        return _Predictions(ids, ids, y, p)


def _read_json(path: Path) -> Any:
    from momkd._io import read_json

    try:
        return read_json(path)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None


def _test_predictions(run: Path, summary: Mapping[str, Any]) -> _Predictions:
    from momkd.train.summary import read_prediction_table

    ids: list[str] = []
    cases: list[str] = []
    ys, ps = [], []
    for i, fold in enumerate(summary.get("folds") or []):
        k = int(fold.get("fold", i))
        s, c, y, p = read_prediction_table(run / f"fold_{k}" / "test_predictions.csv")
        ids += s
        cases += c
        ys.append(y)
        ps.append(p)
    if not ids:
        raise DataError(f"{run}: no test predictions (is the run finished?)")
    return _Predictions(ids, cases, np.concatenate(ys), np.concatenate(ps))


def _external_predictions(run: Path) -> _Predictions | None:
    from momkd.train.summary import read_prediction_table

    path = run / "external_predictions.csv"
    if not path.is_file():
        return None
    try:
        s, c, y, p = read_prediction_table(path)
    except DataError:
        return None  # an unlabelled external cohort: predictions only
    return _Predictions(s, c, y, p)


def _auc_block(pred: _Predictions, resamples: int, seed: int) -> dict[str, Any]:
    from momkd.scoring import auc_ci, metrics

    value = metrics(pred.y, pred.p)["auc"]
    low = high = math.nan
    if resamples > 0:
        low, high = auc_ci(pred.y, pred.p, n=resamples, seed=seed)
    return {"value": value, "ci_low": low, "ci_high": high}


def _aligned(
    a: _Predictions, b: _Predictions, name_a: str, name_b: str, what: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels and both methods' scores over the same ids; raises when the ids differ."""
    ia = {s: i for i, s in enumerate(a.ids)}
    ib = {s: i for i, s in enumerate(b.ids)}
    if len(ia) != len(a.ids) or len(ib) != len(b.ids):
        raise DataError(f"compare: {what}: a slide is predicted twice in {name_a} or {name_b}")
    if set(ia) != set(ib):
        only_a = sorted(set(ia) - set(ib))
        only_b = sorted(set(ib) - set(ia))
        raise DataError(
            f"compare: {what}: {name_a} and {name_b} did not predict the same slides "
            f"({len(only_a)} only in {name_a}, e.g. {only_a[:3]}; {len(only_b)} only in "
            f"{name_b}, e.g. {only_b[:3]})"
        )
    order = sorted(ia)
    ya = a.y[[ia[s] for s in order]]
    yb = b.y[[ib[s] for s in order]]
    if not np.array_equal(ya, yb):
        raise DataError(f"compare: {what}: {name_a} and {name_b} disagree on labels")
    return ya, a.p[[ia[s] for s in order]], b.p[[ib[s] for s in order]]


def _paired(
    preds: Mapping[str, _Predictions],
    resamples: int,
    seed: int,
    what: str,
    patients: Mapping[str, _Predictions] | None = None,
) -> list[dict[str, Any]]:
    """Every pair in order. With ``patients``, a pair whose rows differ but whose patients agree
    (one run with slide bags, the other with patient bags) is left to the patient level."""
    from momkd.scoring import paired_test

    names = list(preds)
    out = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            if (
                patients is not None
                and set(preds[a].ids) != set(preds[b].ids)
                and set(patients[a].ids) == set(patients[b].ids)
            ):
                log.warning(
                    "compare: %s and %s predict different rows for the same patients "
                    "(slide vs patient bags); compared at patient level only",
                    a,
                    b,
                )
                continue
            y, pa, pb = _aligned(preds[a], preds[b], a, b, what)
            res = paired_test(y, pa, pb, n=max(resamples, 1), seed=seed)
            if resamples <= 0:
                res.update(ci_low=math.nan, ci_high=math.nan, p_value_bootstrap=math.nan)
                if pa.ndim == 2:  # more than two classes: the p-value is the bootstrap's
                    res["p_value"] = math.nan
                res["n_resamples"] = 0
            out.append({"a": a, "b": b, **res})
    return out


def _mean_std(block: Any, key: str = "auc") -> tuple[Any, Any]:
    if not isinstance(block, Mapping):
        return None, None
    return (block.get("mean") or {}).get(key), (block.get("std") or {}).get(key)


def summarise_runs(
    runs: Mapping[str, str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    resamples: int = 2000,
    seed: int = 0,
    curve: Mapping[str, Mapping[float, str | os.PathLike[str]]] | None = None,
    overrides: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, Any]:
    """Compare finished runs on their pooled test predictions; write the JSON and HTML.

    Parameters
    ----------
    runs
        Method name -> run directory (finished ``momkd train`` runs on the same splits).
    out
        Folder for ``comparison.json``, ``comparison.html`` and ``comparison/``.
    resamples
        Bootstrap resamples of every CI (0: no CIs; DeLong p-values are still computed).
    seed
        Seed of the resampling (the same resamples for every method and pair).
    curve
        Method name -> {training fraction: run directory} for the learning curve.
    overrides
        Method name -> its configuration overrides (recorded in the JSON).

    Returns
    -------
    dict
        The content of ``comparison.json`` (see the module docstring).

    Raises
    ------
    DataError
        A run without summary or predictions, or runs that did not predict the same slides.
    """
    from momkd._io import write_json

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    methods: dict[str, Any] = {}
    tests: dict[str, _Predictions] = {}
    patients: dict[str, _Predictions] = {}
    externals: dict[str, _Predictions] = {}
    classes: list[str] | None = None
    for name, run_path in runs.items():
        run = Path(run_path)
        summary = _read_json(run / "summary.json")
        if summary.get("classes") and classes is None:
            classes = [str(c) for c in summary["classes"]]
        pred = _test_predictions(run, summary)
        tests[name] = pred
        patients[name] = pred.patients()
        mean_auc, std_auc = _mean_std(summary)
        p_mean, p_std = _mean_std(summary.get("patient"))
        entry: dict[str, Any] = {
            "run_dir": str(run),
            "method": summary.get("method"),
            "overrides": list((overrides or {}).get(name, [])),
            "mean": summary.get("mean") or {},
            "std": summary.get("std") or {},
            "n_test": len(pred.ids),
            "n_pos": None if pred.p.ndim == 2 else int(pred.y.sum()),
            "pooled_auc": _auc_block(pred, resamples, seed),
            "patient": {
                "mean_auc": p_mean,
                "std_auc": p_std,
                "n": len(patients[name].ids),
                "pooled_auc": _auc_block(patients[name], resamples, seed),
            },
        }
        ext = _external_predictions(run)
        if ext is not None:
            externals[name] = ext
            e_mean, e_std = _mean_std(summary.get("external"))
            entry["external"] = {
                "mean_auc": e_mean,
                "std_auc": e_std,
                "n": len(ext.ids),
                "ensemble_auc": _auc_block(ext, resamples, seed),
            }
        methods[name] = entry
    result: dict[str, Any] = {
        "methods": methods,
        "paired": _paired(tests, resamples, seed, "test predictions", patients),
        "paired_patient": _paired(patients, resamples, seed, "patient-level test predictions"),
        "paired_external": (
            _paired(externals, resamples, seed, "external predictions")
            if len(externals) == len(runs)
            else []
        ),
        "resamples": resamples,
        "seed": seed,
        "level": _LEVEL,
    }
    if classes:
        result["classes"] = classes
    if curve:
        result["learning_curve"] = _learning_curve(curve, tests, resamples, seed)
    write_json(out_dir / "comparison.json", result)
    html_path = _write_html(result, tests, out_dir)
    log.info("compare: wrote %s and %s", out_dir / "comparison.json", html_path)
    return result


def _learning_curve(
    curve: Mapping[str, Mapping[float, str | os.PathLike[str]]],
    reference: Mapping[str, _Predictions],
    resamples: int,
    seed: int,
) -> dict[str, Any]:
    fractions = sorted({f for runs in curve.values() for f in runs})
    methods: dict[str, list[dict[str, Any]]] = {}
    for name, runs in curve.items():
        points = []
        for fraction in sorted(runs):
            run = Path(runs[fraction])
            summary = _read_json(run / "summary.json")
            pred = _test_predictions(run, summary)
            ref = reference.get(name)
            if ref is not None:  # the test sets stay fixed along the curve
                _aligned(pred, ref, f"{name} at {fraction:g}", name, "learning curve")
            n_train = [f.get("n_train") for f in summary.get("folds") or []]
            mean_auc, std_auc = _mean_std(summary)
            points.append(
                {
                    "fraction": fraction,
                    "run_dir": str(run),
                    "n_train": float(np.mean(n_train)) if n_train and None not in n_train else None,
                    "mean_auc": mean_auc,
                    "std_auc": std_auc,
                    "pooled_auc": _auc_block(pred, resamples, seed),
                }
            )
        methods[name] = points
    return {"fractions": fractions, "methods": methods}


# ------------------------------------------------------------------------------------- output


def _f3(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{float(v):.3f}"


def _with_ci(block: Mapping[str, Any] | None) -> str:
    if not block:
        return "n/a"
    text = _f3(block.get("value"))
    low, high = block.get("ci_low"), block.get("ci_high")
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        return text
    return f"{text} [{_f3(low)}, {_f3(high)}]"


def _p(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.2g}" if v < 0.001 else f"{v:.3f}"


def _pair_p(pair: Mapping[str, Any]) -> str:
    """The pair's p-value as text; a bootstrap p-value of 0 (no resample crossed zero; more than
    two classes, where ``p_value`` is the bootstrap's) reads ``p < 1/N``."""
    p, n = pair.get("p_value"), pair.get("n_resamples")
    if p == 0 and "z" not in pair and n:
        return f"p < {1 / n:.2g}"
    return f"p = {_p(p)}"


def _diff_text(pair: Mapping[str, Any]) -> str:
    ci = ""
    low, high = pair.get("ci_low"), pair.get("ci_high")
    if low is not None and high is not None and math.isfinite(low) and math.isfinite(high):
        ci = f" [{low:+.3f}, {high:+.3f}]"
    return f"{pair['auc_diff']:+.3f}{ci}, {_pair_p(pair)}"


def format_comparison(result: Mapping[str, Any]) -> str:
    """A text table of a comparison (printed by ``momkd compare``).

    Parameters
    ----------
    result
        As returned by :func:`summarise_runs` (``comparison.json``).

    Returns
    -------
    str
        Per method: test AUC mean ± std over folds, pooled test AUC [95% CI], patient-level pooled
        AUC [CI], external fold-ensemble AUC [CI]; then the paired differences with p-values.
    """
    classes = result.get("classes")
    lines = []
    if classes:
        lines.append(
            f"classes: {', '.join(map(str, classes))}; AUC is the macro one-vs-rest AUC and p the "
            "paired bootstrap's (DeLong's test is binary only)"
        )
    lines.append(
        f"{'method':<34} {'test AUC mean ± std':>20} {'pooled test AUC [95% CI]':>26} "
        f"{'patient AUC [95% CI]':>26} {'external AUC [95% CI]':>26}"
    )
    for name, m in result.get("methods", {}).items():
        mean = (m.get("mean") or {}).get("auc")
        std = (m.get("std") or {}).get("auc")
        ext = (m.get("external") or {}).get("ensemble_auc")
        lines.append(
            f"{name:<34} {_f3(mean) + ' ± ' + _f3(std):>20} {_with_ci(m.get('pooled_auc')):>26} "
            f"{_with_ci((m.get('patient') or {}).get('pooled_auc')):>26} {_with_ci(ext):>26}"
        )
    for key, title in (
        ("paired", "paired differences, pooled test slides"),
        ("paired_patient", "paired differences, patient level"),
        ("paired_external", "paired differences, external cohort (fold ensemble)"),
    ):
        pairs = result.get(key) or []
        if pairs:
            test = "bootstrap" if classes else "DeLong"
            lines.append(f"{title} (AUC a - b [95% CI], {test} p):")
            for pair in pairs:
                lines.append(f"  {pair['a']} - {pair['b']}: {_diff_text(pair)}")
    lc = result.get("learning_curve")
    if lc:
        lines.append("learning curve (pooled test AUC [95% CI] by training fraction):")
        for name, points in lc["methods"].items():
            cells = ", ".join(f"{pt['fraction']:g}: {_with_ci(pt['pooled_auc'])}" for pt in points)
            lines.append(f"  {name}: {cells}")
    return "\n".join(lines)


def _roc_overlay(
    tests: Mapping[str, _Predictions], path: Path, classes: Sequence[str] | None = None
) -> Path | None:
    preds = {name: {"label": t.y, "prob": t.p} for name, t in tests.items()}
    if classes:
        return class_roc_figure(
            preds, classes, path, "Pooled test predictions: one-vs-rest ROC per class"
        )
    return roc_pr_figure(preds, path, "Pooled test predictions: ROC and precision-recall")


def _forest_plot(result: Mapping[str, Any], path: Path) -> Path | None:
    rows = []
    for key, level in (
        ("paired", "slides"),
        ("paired_patient", "patients"),
        ("paired_external", "external"),
    ):
        for pair in result.get(key) or []:
            rows.append((f"{pair['a']} − {pair['b']} ({level})", pair))
    if not rows:
        return None
    fig = new_figure(8.5, 0.9 + 0.45 * len(rows))
    ax = fig.subplots()
    for i, (label, pair) in enumerate(rows):
        yv = len(rows) - 1 - i
        d, lo, hi = pair["auc_diff"], pair.get("ci_low"), pair.get("ci_high")
        if lo is not None and hi is not None and math.isfinite(lo) and math.isfinite(hi):
            ax.plot([lo, hi], [yv, yv], color="#1f77b4", lw=2)
        ax.plot([d], [yv], "o", color="#1f77b4")
        ax.annotate(
            _pair_p(pair),
            (1.01, yv),
            xycoords=("axes fraction", "data"),
            va="center",
            fontsize=8,
        )
    ax.axvline(0.0, color="0.5", ls="--", lw=1)
    ax.set_yticks(range(len(rows)), [r[0] for r in rows][::-1], fontsize=8)
    ax.set_xlabel("AUC difference (a − b) with 95% paired bootstrap CI")
    ax.set_ylim(-0.7, len(rows) - 0.3)
    ax.grid(axis="x", alpha=0.3)
    return save_figure(fig, path)


def _nan(v: Any) -> float:
    return math.nan if v is None else float(v)


def _curve_plot(result: Mapping[str, Any], path: Path) -> Path | None:
    lc = result.get("learning_curve")
    if not lc:
        return None
    fig = new_figure(7.5, 4.8)
    ax = fig.subplots()
    n_methods = len(lc["methods"])
    for i, (name, points) in enumerate(lc["methods"].items()):
        colour = COLOURS[i % len(COLOURS)]
        # Small horizontal offsets keep overlapping error bars apart.
        shift = 0.012 * (i - (n_methods - 1) / 2)
        x = np.array([pt["fraction"] for pt in points]) + shift
        y = np.array([pt["pooled_auc"]["value"] for pt in points], dtype=np.float64)
        lo = np.array([_nan(pt["pooled_auc"]["ci_low"]) for pt in points])
        hi = np.array([_nan(pt["pooled_auc"]["ci_high"]) for pt in points])
        err = np.vstack([y - lo, hi - y])
        ax.errorbar(x, y, yerr=np.nan_to_num(err), fmt="o-", color=colour, capsize=3, label=name)
    ax.set_xlabel("share of each fold's training patients")
    ax.set_ylabel("pooled test AUC (95% CI)")
    ax.set_xticks(lc["fractions"])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Learning curve (validation and test sets fixed)")
    return save_figure(fig, path)


def _write_html(
    result: Mapping[str, Any], tests: Mapping[str, _Predictions], out_dir: Path
) -> Path:
    from momkd._io import atomic_write_text

    png = out_dir / "comparison"
    png.mkdir(parents=True, exist_ok=True)
    body: list[str] = []
    head = (
        "<tr><th>method</th><th>run</th><th>test AUC, mean ± std over folds</th>"
        "<th>pooled test AUC [95% CI]</th><th>patient-level pooled AUC [95% CI]</th>"
        "<th>external fold-ensemble AUC [95% CI]</th><th>test slides (positive)</th></tr>"
    )
    rows = []
    for name, m in result["methods"].items():
        mean = (m.get("mean") or {}).get("auc")
        std = (m.get("std") or {}).get("auc")
        ext = (m.get("external") or {}).get("ensemble_auc")
        rows.append(
            f"<tr><td>{escape(name)}</td><td>{escape(Path(m['run_dir']).name)}</td>"
            f"<td>{_f3(mean)} ± {_f3(std)}</td><td>{escape(_with_ci(m.get('pooled_auc')))}</td>"
            f"<td>{escape(_with_ci((m.get('patient') or {}).get('pooled_auc')))}</td>"
            f"<td>{escape(_with_ci(ext))}</td><td>{m['n_test']}"
            + ("" if m.get("n_pos") is None else f" ({m['n_pos']})")
            + "</td></tr>"
        )
    body.append(
        section(
            "methods",
            "Methods",
            "<table>" + head + "".join(rows) + "</table>"
            f"<p class='note'>CIs: stratified percentile bootstrap, {result['resamples']} resamples, "
            f"seed {result['seed']}. Pooled: all folds' test predictions together.</p>",
        )
    )
    pair_rows = []
    for key, level in (
        ("paired", "slides"),
        ("paired_patient", "patients"),
        ("paired_external", "external (ensemble)"),
    ):
        for pr in result.get(key) or []:
            pair_rows.append(
                f"<tr><td>{escape(pr['a'])} − {escape(pr['b'])}</td><td>{escape(level)}</td>"
                f"<td>{pr['n']}</td><td>{_f3(pr['auc_a'])}</td><td>{_f3(pr['auc_b'])}</td>"
                f"<td>{pr['auc_diff']:+.3f}</td><td>{_f3(pr.get('ci_low'))}, "
                f"{_f3(pr.get('ci_high'))}</td><td>{_pair_p(pr).removeprefix('p = ')}</td>"
                f"<td>{_p(pr.get('p_value_bootstrap'))}</td></tr>"
            )
    if pair_rows:
        forest = _forest_plot(result, png / "forest.png")
        body.append(
            section(
                "paired",
                "Paired differences",
                "<table><tr><th>a − b</th>"
                "<th>level</th><th>n</th><th>AUC a</th><th>AUC b</th><th>difference</th>"
                "<th>95% CI (paired bootstrap)</th><th>p (DeLong; bootstrap for more than two classes)</th>"
                "<th>p (bootstrap)</th></tr>"
                + "".join(pair_rows)
                + "</table>"
                + figure_html(forest, "AUC differences with 95% paired bootstrap CIs"),
            )
        )
    roc = _roc_overlay(tests, png / "roc.png", result.get("classes"))
    if roc is not None:
        body.append(
            section(
                "roc", "ROC overlay", figure_html(roc, "Pooled test predictions of every method")
            )
        )
    lc = result.get("learning_curve")
    if lc:
        fig = _curve_plot(result, png / "learning_curve.png")
        cols = "".join(f"<th>{f:g}</th>" for f in lc["fractions"])
        lrows = []
        for name, points in lc["methods"].items():
            by_f = {pt["fraction"]: pt for pt in points}
            cells = "".join(
                f"<td>{escape(_with_ci(by_f[f]['pooled_auc']))}"
                + (
                    f"<br><span class='note'>{by_f[f]['n_train']:.0f} training slides</span>"
                    if by_f.get(f) and by_f[f].get("n_train") is not None
                    else ""
                )
                + "</td>"
                if f in by_f
                else "<td></td>"
                for f in lc["fractions"]
            )
            lrows.append(f"<tr><td>{escape(name)}</td>{cells}</tr>")
        body.append(
            section(
                "curve",
                "Learning curve",
                "<table><tr><th>method</th>"
                + cols
                + "</tr>"
                + "".join(lrows)
                + "</table>"
                + figure_html(fig, "Pooled test AUC against the share of training patients"),
            )
        )
    page = html_page(
        "momkd comparison",
        "momkd method comparison",
        f"{len(result['methods'])} methods on identical splits · ",
        body,
    )
    path = out_dir / "comparison.html"
    atomic_write_text(path, page)
    return path
