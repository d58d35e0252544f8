"""Markdown tables of the recipe study (``python scripts/recipe_study.py table``).

Reads the results CSV written by ``scripts/recipe_study.py`` and writes one Markdown file with:

* the screen: fold-mean test AUC of every recipe on every development cohort and method, and
  each method's mean over those cohorts;
* the study cohorts (plan ``final``, the chosen recipe) next to the protocol as it stood before
  (plan ``released``): per cohort the fold-mean test AUC ± std of meanpool, ABMIL and MoMKD, and
  the margins ABMIL − meanpool and MoMKD − meanpool, misses of the target (≥ −0.01) marked;
* the confirmation on fresh seeds (plan ``confirm``), in the same form.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path

METHOD_ORDER = ("meanpool", "abmil", "momkd", "momkd_histo")
#: What each knob of the ``knobs`` plan changes (scripts/recipe_study.py, KNOBS).
KNOB_TEXT = {
    "base": "the recipe: `loss.align_omics` 0.05, gradient memory, K 4, margin 0.3",
    "align_omics0.2": "`loss.align_omics` 0.2",
    "align_omics0.5": "`loss.align_omics` 0.5 and `loss.mse` 0.2",
    "momentum": "`memory.update: momentum` (both models)",
    "memory_k8": "`model.memory_k: 8` (both models)",
    "margin0.5": "`loss.align_margin` 0.5 (both models)",
}
TARGET = -0.01


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _f(v: str | float | None) -> float:
    try:
        return float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


def _deep(method: str) -> str:
    return "momkd" if method == "momkd_histo" else method


def screen_table(rows: list[dict[str, str]]) -> str:
    screen = [r for r in rows if r["plan"] == "screen"]
    if not screen:
        return ""
    cohorts = list(dict.fromkeys(r["cohort"] for r in screen))
    methods = [m for m in METHOD_ORDER if any(r["method"] == m for r in screen)]
    recipes = list(dict.fromkeys(r["recipe"] for r in screen))
    val = {(r["recipe"], r["cohort"], r["method"]): _f(r["auc_mean"]) for r in screen}
    cols = [(c, m) for m in methods for c in cohorts if (("base", c, m) in val)]
    head = "| recipe | " + " | ".join(f"{m} {c}" for c, m in cols)
    head += " | " + " | ".join(f"{m} mean" for m in methods) + " |"
    lines = [head, "|" + "---|" * (1 + len(cols) + len(methods))]
    for rec in recipes:
        cells = [val.get((rec, c, m), math.nan) for c, m in cols]
        means = []
        for m in methods:
            vs = [val.get((rec, c, m), math.nan) for c, mm in cols if mm == m]
            means.append(
                sum(vs) / len(vs) if vs and not any(math.isnan(v) for v in vs) else math.nan
            )
        lines.append(
            f"| {rec} | "
            + " | ".join("—" if math.isnan(v) else f"{v:.3f}" for v in cells)
            + " | "
            + " | ".join("—" if math.isnan(v) else f"**{v:.3f}**" for v in means)
            + " |"
        )
    return "\n".join(lines)


def cohort_table(rows: list[dict[str, str]], plan: str, recipe: str | None = None) -> str:
    sel = [r for r in rows if r["plan"] == plan and (recipe is None or r["recipe"] == recipe)]
    if not sel:
        return ""
    by: dict[str, dict[str, dict[str, str]]] = defaultdict(dict)
    kinds = ("demo", "default", "mil")

    def order(r: dict[str, str]) -> tuple[int, str]:
        kind = r["cohort"].split("-")[0]
        return (kinds.index(kind) if kind in kinds else len(kinds), r["cohort"])

    for r in sorted(sel, key=order):
        by[r["cohort"]][_deep(r["method"])] = r
    lines = [
        "| cohort | meanpool | ABMIL | MoMKD | ABMIL − meanpool | MoMKD − meanpool |",
        "|---|---|---|---|---|---|",
    ]
    misses = {"abmil": 0, "momkd": 0}
    n = 0
    for co, ms in by.items():

        def cell(m: str) -> str:
            r = ms.get(m)
            if r is None:
                return "—"
            tag = " (histo)" if r["method"] == "momkd_histo" else ""
            return f"{_f(r['auc_mean']):.3f} ± {_f(r['auc_std']):.3f}{tag}"

        base = _f(ms["meanpool"]["auc_mean"]) if "meanpool" in ms else math.nan
        diffs = []
        for m in ("abmil", "momkd"):
            if m not in ms or math.isnan(base):
                diffs.append("—")
                continue
            d = _f(ms[m]["auc_mean"]) - base
            miss = d < TARGET
            misses[m] += int(miss)
            diffs.append(f"{d:+.3f}{' ✗' if miss else ''}")
        n += 1
        lines.append(
            f"| {co} | {cell('meanpool')} | {cell('abmil')} | {cell('momkd')} | "
            + " | ".join(diffs)
            + " |"
        )
    # Means over the cohorts where all three methods ran, so that the columns compare alike.
    full = [ms for ms in by.values() if all(m in ms for m in ("meanpool", "abmil", "momkd"))]
    means = {
        m: sum(_f(ms[m]["auc_mean"]) for ms in full) / len(full) if full else math.nan
        for m in ("meanpool", "abmil", "momkd")
    }
    lines.append(
        f"| **mean of the {len(full)} cohorts with all three** | **{means['meanpool']:.3f}** | "
        f"**{means['abmil']:.3f}** | **{means['momkd']:.3f}** | misses: {misses['abmil']} of "
        f"{n} | misses: {misses['momkd']} of {len(full)} |"
    )
    return "\n".join(lines)


def _diff(pair: dict[str, object]) -> str:
    d, lo, hi, p = (_f(pair.get(k)) for k in ("auc_diff", "ci_low", "ci_high", "p_value"))  # type: ignore[arg-type]
    return f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}], p = {p:.2g}"


def _pair(block: dict[str, object], a: str, b: str) -> dict[str, object] | None:
    for pair in block.get("paired", []):  # type: ignore[union-attr]
        if pair["a"] == a and pair["b"] == b:
            return pair  # type: ignore[no-any-return]
    return None


def _auc(block: dict[str, object], method: str) -> str:
    """The pooled test AUC of ``method`` in a comparison block, or a dash."""
    v = block["pooled_auc"].get(method)  # type: ignore[attr-defined]
    return "—" if v is None else f"{_f(v['value']):.3f}"


def paired_tables(paired: dict[str, dict[str, dict[str, dict[str, object]]]]) -> list[str]:
    parts: list[str] = []
    curve = paired.get("curve") or {}
    if curve:
        parts += [
            "## What the teacher adds: learning curves (pooled test AUC, paired differences)",
            "",
            "| cohort | training share | MoMKD | ablation | ABMIL | meanpool | MoMKD − ablation | MoMKD − meanpool |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for co, per in curve.items():
            for frac, block in per.items():
                if not block:
                    continue
                d1 = _pair(block, "momkd", "momkd_histo")
                d2 = _pair(block, "momkd", "meanpool")
                aucs = [_auc(block, m) for m in ("momkd", "momkd_histo", "abmil", "meanpool")]
                parts.append(
                    f"| {co} | {frac} | " + " | ".join(aucs) + " | "
                    f"{_diff(d1) if d1 else '—'} | {_diff(d2) if d2 else '—'} |"
                )
        parts.append("")
    knobs = paired.get("knobs") or {}
    if knobs:
        parts += [
            "## MoMKD's own knobs: MoMKD − ablation at each setting (pooled test AUC)",
            "",
            "| cohort | setting | MoMKD | ablation | MoMKD − ablation |",
            "|---|---|---|---|---|",
        ]
        for co, per in knobs.items():
            for name, block in per.items():
                if not block:
                    continue
                d = _pair(block, "momkd", "momkd_histo")
                parts.append(
                    f"| {co} | {KNOB_TEXT.get(name, name)} | {_auc(block, 'momkd')} | "
                    f"{_auc(block, 'momkd_histo')} | {_diff(d) if d else '—'} |"
                )
        parts.append("")
    momentum = {co: b for co, b in (paired.get("momentum") or {}).items() if b}
    if momentum:
        parts += [
            "## The momentum memory on fresh seeds (pooled test AUC, paired differences)",
            "",
            "| cohort | MoMKD, momentum | ablation, momentum | MoMKD (recipe) | meanpool | "
            "momentum: MoMKD − ablation | MoMKD momentum − recipe | MoMKD momentum − meanpool |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for co, block in momentum.items():
            cells = []
            for b in ("momkd_histo_momentum", "momkd", "meanpool"):
                d = _pair(block, "momkd_momentum", b)
                cells.append(_diff(d) if d else "—")
            runs = ("momkd_momentum", "momkd_histo_momentum", "momkd", "meanpool")
            aucs = [_auc(block, m) for m in runs]
            parts.append(f"| {co} | " + " | ".join(aucs + cells) + " |")
        parts.append("")
    return parts


def curve_plot(
    paired: dict[str, dict[str, dict[str, dict[str, object]]]], out: Path
) -> Path | None:
    """MoMKD - ablation and MoMKD - meanpool (paired pooled-AUC differences with their 95 % CIs)
    against the training share, one panel per learning-curve cohort."""
    curve = {co: per for co, per in (paired.get("curve") or {}).items() if any(per.values())}
    if not curve:
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * len(curve), 3.4), layout="constrained")
    axes = fig.subplots(1, len(curve), squeeze=False)[0]
    for ax, (co, per) in zip(axes, curve.items()):
        for k, (b, label, colour) in enumerate(
            (
                ("momkd_histo", "MoMKD − ablation (genomics)", "C0"),
                ("meanpool", "MoMKD − meanpool", "C1"),
            )
        ):
            xs, ds, lo, hi = [], [], [], []
            for frac, block in per.items():
                pair = _pair(block, "momkd", b) if block else None
                if pair is None:
                    continue
                d = _f(pair["auc_diff"])  # type: ignore[arg-type]
                xs.append(float(frac) * (1 + 0.04 * (k - 0.5)))
                ds.append(d)
                lo.append(d - _f(pair["ci_low"]))  # type: ignore[arg-type]
                hi.append(_f(pair["ci_high"]) - d)  # type: ignore[arg-type]
            if xs:
                ax.errorbar(xs, ds, yerr=[lo, hi], marker="o", capsize=3, color=colour, label=label)
        ax.axhline(0.0, color="0.5", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_xticks([0.25, 0.5, 1.0], labels=["25 %", "50 %", "100 %"])
        ax.set_xlabel("share of each fold's training patients")
        ax.set_ylabel("paired Δ pooled test AUC [95 % CI]")
        ax.set_title(co)
    axes[0].legend(fontsize=8, loc="best")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out


def write_tables(results: Path, out: Path, paired_path: Path | None = None) -> Path:
    import json

    rows = _rows(results)
    parts = [
        "# Recipe study: tables",
        "",
        f"Made by `python scripts/recipe_study.py table` from `{results.name}`. Fold-mean test AUC "
        "(± std over folds) on identical split files per cohort; docs/RECIPE.md explains the "
        "study and the choices. ✗: below meanpool − 0.01. (histo): MoMKD's genomics-free "
        "ablation `momkd_histo`, on cohorts without expression.",
        "",
    ]
    screen = screen_table(rows)
    if screen:
        parts += ["## Screen (development cohorts, one axis at a time)", "", screen, ""]
    for plan, title, recipe in (
        ("final", "Study cohorts, chosen recipe", "chosen"),
        ("released", "Study cohorts, the protocol before the study", "released"),
        ("confirm", "Fresh seeds (played no part in choosing), chosen recipe", "chosen"),
    ):
        table = cohort_table(rows, plan, recipe)
        if table:
            parts += [f"## {title}", "", table, ""]
    if paired_path is not None and paired_path.is_file():
        paired = json.loads(paired_path.read_text())
        parts += paired_tables(paired)
        png = curve_plot(paired, out.parent.parent / "img" / "genomics_learning_curve.png")
        if png is not None:
            parts += [f"![MoMKD against its ablation and meanpool](../img/{png.name})", ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(parts))
    return out
