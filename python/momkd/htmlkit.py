"""The HTML and plot toolkit of momkd's self-contained pages (``report.html``, ``comparison.html``).

One page skeleton with inline CSS (:func:`html_page`, :func:`section`), escaping and number
formatting, a key-value table, figures embedded as base64 PNGs (:func:`figure_html`), matplotlib
figures drawn off-screen on the Agg canvas (:func:`new_figure`, :func:`save_figure`) and the ROC and
precision-recall panel both pages show (:func:`roc_pr_figure`).
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "COLOURS",
    "CSS",
    "as_number",
    "class_roc_figure",
    "confusion_figure",
    "escape",
    "figure_html",
    "fmt_number",
    "html_page",
    "kv_table",
    "new_figure",
    "roc_pr_figure",
    "save_figure",
    "section",
]

#: Line colours of successive curves (folds, methods): matplotlib's tab10.
COLOURS = [
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
]

CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:0;color:#1d2433;
background:#f6f7f9;line-height:1.45}
header{background:#1d2b44;color:#fff;padding:18px 32px}
header h1{margin:0;font-size:1.5em}header p{margin:4px 0 0;color:#c9d3e6;font-size:.9em}
nav{padding:8px 32px;background:#e8ecf3;font-size:.9em}nav a{margin-right:14px;color:#1d4f91}
main{padding:8px 32px 40px;max-width:1250px}
section{background:#fff;border:1px solid #dde2ea;border-radius:6px;padding:10px 20px 18px;
margin:18px 0}
h2{font-size:1.2em;border-bottom:2px solid #e2e7ef;padding-bottom:4px}
h3{font-size:1.02em;margin-bottom:6px}
table{border-collapse:collapse;margin:8px 0 12px;font-size:.88em}
th,td{border:1px solid #d5dbe5;padding:4px 9px;text-align:right}
th{background:#eef2f8}td:first-child,th:first-child{text-align:left}
tr.agg td{background:#f3f7ee;font-weight:600}tr.ens td{background:#fdf5e6;font-weight:600}
pre{background:#f4f5f7;border:1px solid #e1e4e8;padding:10px;overflow-x:auto;font-size:.82em}
details summary{cursor:pointer;color:#1d4f91;font-weight:600}
figure{margin:10px 0}figure img{max-width:100%;border:1px solid #e4e7ec}
figcaption{font-size:.85em;color:#555}.note{color:#666;font-size:.9em}
"""


# ------------------------------------------------------------------------------------- text


def escape(text: Any) -> str:
    """``str(text)`` escaped for HTML text and quoted attribute values."""
    return html.escape(str(text), quote=True)


def as_number(v: Any) -> float | None:
    """``v`` as a float if it is an int or float (not a bool), else ``None``."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return float(v)


def fmt_number(v: Any) -> str:
    """A table cell's HTML text: ints as they are, floats with 4 decimals, NaN as ``n/a``,
    ``None`` empty, anything else escaped."""
    f = as_number(v)
    if f is None:
        return "" if v is None else escape(v)
    if math.isnan(f):
        return "n/a"
    if isinstance(v, int):
        return str(v)
    return f"{f:.4f}"


# ------------------------------------------------------------------------------------- HTML


def kv_table(data: Mapping[str, Any]) -> str:
    """A two-column key-value table; nested mappings become nested tables, lists comma-joined
    (at most 50 items)."""
    rows = []
    for key, value in data.items():
        if isinstance(value, Mapping):
            inner = kv_table(value) if value else '<span class="note">none</span>'
            rows.append(f"<tr><th>{escape(key)}</th><td style='text-align:left'>{inner}</td></tr>")
        elif isinstance(value, list):
            text = ", ".join(escape(v) for v in value[:50]) + (" …" if len(value) > 50 else "")
            rows.append(f"<tr><th>{escape(key)}</th><td style='text-align:left'>{text}</td></tr>")
        else:
            rows.append(f"<tr><th>{escape(key)}</th><td>{fmt_number(value)}</td></tr>")
    return '<table class="kv">' + "".join(rows) + "</table>"


def figure_html(path: Path | None, caption: str) -> str:
    """The PNG at ``path`` embedded as a base64 ``<figure>`` with ``caption``; empty for ``None``."""
    if path is None:
        return ""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (
        f'<figure><img alt="{escape(caption)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{escape(caption)}</figcaption></figure>"
    )


def section(anchor: str, title: str, body: str) -> str:
    """One ``<section>`` of a page: an ``id`` to link to, an ``<h2>`` title and its HTML body."""
    return f'<section id="{escape(anchor)}"><h2>{escape(title)}</h2>{body}</section>'


def html_page(
    title: str,
    heading: str,
    subtitle: str,
    body: Sequence[str],
    nav: Sequence[tuple[str, str]] | None = None,
) -> str:
    """A self-contained page: inline CSS, a header, an optional navigation bar, ``<main>``.

    Parameters
    ----------
    title, heading
        Plain text of ``<title>`` and of the header's ``<h1>``.
    subtitle
        HTML of the header line; ``generated <UTC time> by momkd <version>`` follows it.
    body
        HTML of the blocks of ``<main>`` (usually :func:`section` s), one per line.
    nav
        ``(anchor, title)`` links of the navigation bar; no bar when ``None``.
    """
    from momkd import __version__

    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(title)}</title><style>{CSS}</style></head><body>",
        f"<header><h1>{escape(heading)}</h1>",
        f"<p>{subtitle}generated {stamp} by momkd {escape(__version__)}</p></header>",
    ]
    if nav is not None:
        parts.append(
            "<nav>" + "".join(f'<a href="#{escape(a)}">{escape(t)}</a>' for a, t in nav) + "</nav>"
        )
    parts.append("<main>")
    parts += body
    parts.append("</main></body></html>")
    return "\n".join(parts)


# ---------------------------------------------------------------------------------- figures


def new_figure(w: float, h: float) -> Any:
    """A ``w`` x ``h`` inch figure at 100 dpi with constrained layout, drawn by the Agg canvas
    (no display, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Any, path: Path) -> Path:
    """Write ``fig`` to ``path`` (the format from the suffix), creating the folder; returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def roc_pr_figure(
    preds: Mapping[str, Mapping[str, np.ndarray]], path: Path, title: str
) -> Path | None:
    """ROC and precision-recall curves side by side, one curve per entry of ``preds``.

    Parameters
    ----------
    preds
        Curve name -> ``{"label": (n,) int (-1: unlabelled), "prob": (n,) float}``.
    path
        The PNG to write.
    title
        The figure's title.

    Returns
    -------
    Path or None
        ``path``; ``None`` (nothing written) when no entry has both classes among its labels (or
        binary probabilities at all: class probabilities go to :func:`class_roc_figure`).
    """
    from sklearn.metrics import auc as sk_auc
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_curve

    usable = {
        k: d
        for k, d in preds.items()
        if np.ndim(d["prob"]) == 1 and len(set(d["label"][d["label"] >= 0].tolist())) == 2
    }
    if not usable:
        return None
    fig = new_figure(11, 4.8)
    ax_roc, ax_pr = fig.subplots(1, 2)
    prevalences = []
    for i, (name, d) in enumerate(usable.items()):
        ok = d["label"] >= 0
        y, p = d["label"][ok], d["prob"][ok]
        colour = COLOURS[i % len(COLOURS)]
        fpr, tpr, _ = roc_curve(y, p)
        ax_roc.plot(fpr, tpr, color=colour, lw=1.6, label=f"{name} (AUC {sk_auc(fpr, tpr):.3f})")
        prec, rec, _ = precision_recall_curve(y, p)
        ax_pr.step(
            rec,
            prec,
            where="post",
            color=colour,
            lw=1.6,
            label=f"{name} (AP {average_precision_score(y, p):.3f})",
        )
        prevalences.append(float(y.mean()))
    ax_roc.plot([0, 1], [0, 1], color="0.6", ls="--", lw=1)
    ax_roc.set(
        xlabel="false positive rate",
        ylabel="true positive rate",
        title="ROC",
        xlim=(-0.01, 1.01),
        ylim=(-0.01, 1.01),
    )
    ax_pr.axhline(float(np.mean(prevalences)), color="0.6", ls="--", lw=1, label="prevalence")
    ax_pr.set(
        xlabel="recall",
        ylabel="precision",
        title="Precision-recall",
        xlim=(-0.01, 1.01),
        ylim=(-0.01, 1.02),
    )
    for ax in (ax_roc, ax_pr):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right" if ax is ax_roc else "lower left")
    fig.suptitle(title)
    return save_figure(fig, path)


def class_roc_figure(
    preds: Mapping[str, Mapping[str, np.ndarray]],
    class_names: Sequence[str],
    path: Path,
    title: str,
) -> Path | None:
    """One-vs-rest ROC curves of a multi-class label: one panel per class, one curve per entry of
    ``preds``.

    Parameters
    ----------
    preds
        Curve name -> ``{"label": (n,) class index (-1: unlabelled), "prob": (n, C) float}``.
    class_names
        The ``C`` class names, in class order.
    path
        The PNG to write.
    title
        The figure's title.

    Returns
    -------
    Path or None
        ``path``; ``None`` (nothing written) when no class has labelled samples of it and of
        another class.
    """
    from sklearn.metrics import auc as sk_auc
    from sklearn.metrics import roc_curve

    n = len(class_names)
    cols = min(n, 4)
    rows = -(-n // cols)
    fig = new_figure(3.6 * cols, 3.4 * rows + 0.6)
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    drawn = False
    for c, ax in enumerate(axes):
        if c >= n:
            ax.set_axis_off()
            continue
        for i, (name, d) in enumerate(preds.items()):
            ok = d["label"] >= 0
            y = (d["label"][ok] == c).astype(int)
            if y.min(initial=1) == y.max(initial=0):
                continue
            fpr, tpr, _ = roc_curve(y, d["prob"][ok][:, c])
            colour = COLOURS[i % len(COLOURS)]
            ax.plot(fpr, tpr, color=colour, lw=1.4, label=f"{name} ({sk_auc(fpr, tpr):.3f})")
            drawn = True
        ax.plot([0, 1], [0, 1], color="0.6", ls="--", lw=1)
        ax.set(title=f"{class_names[c]} vs rest", xlim=(-0.01, 1.01), ylim=(-0.01, 1.01))
        ax.set_xlabel("false positive rate", fontsize=8)
        ax.set_ylabel("true positive rate", fontsize=8)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7, loc="lower right")
    if not drawn:
        return None
    fig.suptitle(title)
    return save_figure(fig, path)


def confusion_figure(
    confusion: Sequence[Sequence[int]], class_names: Sequence[str], path: Path, title: str
) -> Path:
    """A confusion matrix as a heat map with counts and row shares (rows: true class, columns:
    predicted class)."""
    m = np.asarray(confusion, dtype=np.float64)
    shares = m / np.maximum(m.sum(axis=1, keepdims=True), 1.0)
    n = len(class_names)
    fig = new_figure(1.1 * n + 2.6, 1.0 * n + 1.6)
    ax = fig.subplots()
    ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(n):
        for j in range(n):
            ax.text(
                j,
                i,
                f"{int(m[i, j])}\n{100 * shares[i, j]:.0f}%",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if shares[i, j] > 0.6 else "black",
            )
    ax.set_xticks(range(n), [str(c) for c in class_names], rotation=30, ha="right")
    ax.set_yticks(range(n), [str(c) for c in class_names])
    ax.set(xlabel="predicted class", ylabel="true class", title=title)
    return save_figure(fig, path)
