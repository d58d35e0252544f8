"""Memory usage statistics and their per-epoch dynamics (docs/METHOD.md §8, the paper's Figure 3).

For one class memory with K components and a set of patches, ``u_k`` is the share of patches whose
argmax-cosine component is ``k``; the active ratio is the share of components with ``u_k > 0``; the
perplexity is ``exp(-sum_k u_k ln u_k)`` (``0 ln 0 = 0``), between 1 (one component takes every
patch) and K (uniform usage).

The training loop records these statistics on the validation slides after every epoch by calling
:func:`memory_usage_on_bags`; each epoch record of ``fold_<k>/history.json`` then carries them under
the key ``memory``::

    {"epoch": 3, ..., "memory": {"pos": {"usage": [...K floats], "active_ratio": 0.75,
                                          "perplexity": 9.1},
                                  "neg": {...}}}

:func:`memory_history` reads them back (also from a few flat spellings), and
:func:`plot_memory_dynamics` draws active ratio and perplexity per epoch for C+ and C- plus a usage
heat map (epoch x component) per memory.

With C > 2 classes (docs/METHOD.md §2.11) the memories are named ``c0``, ``c1``, ... by class
(:func:`memory_names`) and every function here handles one set of statistics per class memory.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from momkd.errors import DataError

if TYPE_CHECKING:
    import torch

    from momkd.data.loader import Bag

__all__ = [
    "MEMORIES",
    "assignments_by_memory",
    "memory_class",
    "memory_history",
    "memory_label",
    "memory_names",
    "memory_usage_on_bags",
    "plot_memory_dynamics",
    "usage_from_counts",
]

logger = logging.getLogger(__name__)

#: The two class memories, in the order used everywhere in this package: C+ then C-.
MEMORIES = ("pos", "neg")
_MEMORY_LABEL = {"pos": "C+ (positive)", "neg": "C- (negative)"}


def memory_names(n_classes: int) -> tuple[str, ...]:
    """Names of the class memories in display order: :data:`MEMORIES` (C+ then C-) for two
    classes, ``("c0", "c1", ...)`` (class order) for more."""
    if n_classes == 2:
        return MEMORIES
    return tuple(f"c{c}" for c in range(n_classes))


def memory_class(name: str) -> int:
    """The class index of memory ``name`` (``pos`` 1, ``neg`` 0, ``c<j>`` j)."""
    if name in MEMORIES:
        return 1 if name == "pos" else 0
    if re.fullmatch(r"c\d+", name):
        return int(name[1:])
    raise DataError(f"memory usage: unknown memory name {name!r}")


def memory_label(name: str, class_names: Sequence[str] | None = None) -> str:
    """Display label of memory ``name``: ``C+ (positive)``, ``C- (negative)``, or ``C^j`` with the
    class name when given."""
    if name in _MEMORY_LABEL:
        return _MEMORY_LABEL[name]
    c = memory_class(name)
    if class_names is not None and c < len(class_names):
        return f"C^{c} ({class_names[c]})"
    return f"C^{c}"


def assignments_by_memory(out: Any) -> dict[str, Any]:
    """Memory name -> (P,) component assignments of a MoMKD forward output, in display order
    (``assign`` indexed by class; ``assign_pos``/``assign_neg`` for outputs that only have those)."""
    assign = getattr(out, "assign", None)
    if assign is None:
        return {"pos": out.assign_pos, "neg": out.assign_neg}
    return {name: assign[memory_class(name)] for name in memory_names(len(assign))}


def usage_from_counts(counts: Sequence[float] | np.ndarray) -> dict[str, Any]:
    """Usage statistics of one class memory from per-component patch counts.

    Parameters
    ----------
    counts : array_like, shape (K,)
        Number of patches assigned (argmax cosine) to each component.

    Returns
    -------
    dict
        ``usage`` (list of K floats, sums to 1), ``active_ratio`` (float), ``perplexity`` (float),
        ``n_patches`` (int, the total count).

    Raises
    ------
    DataError
        Negative or non-finite counts, or no patch at all.
    """
    c = np.asarray(counts, dtype=np.float64).reshape(-1)
    if c.size == 0 or not np.all(np.isfinite(c)) or np.any(c < 0):
        raise DataError(f"memory usage: counts must be finite and >= 0, got {c.tolist()}")
    total = float(c.sum())
    if total <= 0:
        raise DataError("memory usage: no patches (empty bag set)")
    u = c / total
    nz = u[u > 0]
    return {
        "usage": [float(v) for v in u],
        "active_ratio": float(np.mean(u > 0)),
        "perplexity": float(math.exp(-float(np.sum(nz * np.log(nz))))),
        "n_patches": round(total),
    }


def memory_usage_on_bags(
    model: torch.nn.Module,
    bags: Iterable[Bag],
    device: str | torch.device | None = None,
) -> dict[str, dict[str, Any]]:
    """Memory usage of every class memory over the patches of some slides (e.g. the validation
    set).

    The model runs in eval mode without gradients (its previous mode is restored); only the
    per-component counts are kept, so memory does not grow with the number of slides.

    Parameters
    ----------
    model : MoMKD
        A model whose ``forward(features, edge_index)`` returns ``assign`` (per class, (P,) int64
        argmax-cosine component of each patch) or ``assign_pos`` and ``assign_neg``.
    bags : iterable of Bag
        Bags with ``features`` (P, D) and ``edge_index`` (2, E), e.g. a ``BagLoader``.
    device : str or torch.device, optional
        Where to run; default the device of the model's parameters.

    Returns
    -------
    dict
        ``{"pos": stats, "neg": stats}`` (two classes) or ``{"c0": stats, ...}`` (C > 2) with the
        JSON-ready dicts of :func:`usage_from_counts`.

    Raises
    ------
    DataError
        If ``bags`` is empty or a bag has no k-NN graph.
    """
    import torch

    cfg: Any = getattr(model, "cfg", None)
    if cfg is None or not hasattr(cfg, "memory_k"):
        raise DataError("memory usage: the model has no class memory (cfg.memory_k)")
    k = int(cfg.memory_k)
    if device is None:
        device = next(model.parameters()).device
    names = memory_names(int(getattr(cfg, "n_classes", 2)))
    counts = torch.zeros(len(names), k, dtype=torch.int64)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for bag in bags:
                if bag.edge_index is None:
                    raise DataError(f"slide {bag.slide_id!r}: bag has no k-NN graph (knn_k=None)")
                out = model(bag.features.to(device), bag.edge_index.to(device))
                assign = assignments_by_memory(out)
                for i, name in enumerate(names):
                    a = assign[name].reshape(-1).cpu()
                    counts[i] += torch.bincount(a, minlength=k)[:k]
    finally:
        model.train(was_training)
    if int(counts[0].sum()) == 0:
        raise DataError("memory usage: no slides given")
    return {name: usage_from_counts(counts[i].numpy()) for i, name in enumerate(names)}


# ----------------------------------------------------------------------------- reading history


def _epochs_of(history: Any) -> list[Mapping[str, Any]]:
    if isinstance(history, str | os.PathLike):
        import json

        history = json.loads(Path(history).read_text())
    if isinstance(history, Mapping):
        for key in ("epochs", "history", "records"):
            if isinstance(history.get(key), list):
                history = history[key]
                break
        else:
            raise DataError("history: expected a list of epoch records or a dict with 'epochs'")
    if not isinstance(history, list):
        raise DataError(f"history: expected a list of epoch records, got {type(history).__name__}")
    return [r for r in history if isinstance(r, Mapping)]


def _memory_record(rec: Mapping[str, Any], name: str) -> Mapping[str, Any] | None:
    """The usage stats of memory ``name`` in one epoch record, whatever the spelling."""
    for key in ("memory", "memory_usage", "val_memory", "usage"):
        block = rec.get(key)
        if isinstance(block, Mapping):
            for sub in (name, f"c_{name}", f"C_{name}", "C+" if name == "pos" else "C-"):
                if isinstance(block.get(sub), Mapping):
                    return block[sub]  # type: ignore[no-any-return]
    flat: dict[str, Any] = {}
    for field in ("usage", "active_ratio", "perplexity"):
        for key in (
            f"memory_{name}_{field}",
            f"mem_{name}_{field}",
            f"{field}_{name}",
            f"val_memory_{name}_{field}",
        ):
            if key in rec:
                flat[field] = rec[key]
                break
    return flat or None


def _history_names(records: Sequence[Mapping[str, Any]]) -> tuple[str, ...]:
    """The memory names a history records: :data:`MEMORIES`, plus ``c0``, ``c1``, ... (C > 2)
    in class order when its ``memory`` blocks name them."""
    extra: set[int] = set()
    for rec in records:
        for key in ("memory", "memory_usage", "val_memory", "usage"):
            block = rec.get(key)
            if isinstance(block, Mapping):
                extra.update(int(n[1:]) for n in block if re.fullmatch(r"c\d+", str(n)))
    return MEMORIES + tuple(f"c{c}" for c in sorted(extra))


def memory_history(history: Any) -> dict[str, dict[str, np.ndarray]]:
    """Per-epoch memory usage statistics from a fold's history.

    Parameters
    ----------
    history : list of dict, dict, or path
        The content of ``fold_<k>/history.json`` (or its path): one record per epoch.

    Returns
    -------
    dict
        For each memory that the history records (``pos`` and ``neg``, or ``c0``, ``c1``, ... with
        C > 2 classes), in that order: ``epoch`` (E,) int,
        ``usage`` (E, K) float (NaN rows where an epoch lacks the vector), ``active_ratio`` (E,),
        ``perplexity`` (E,). Active ratio and perplexity are recomputed from ``usage`` where the
        record has the vector but not the scalar. Empty when no epoch has memory statistics.
    """
    records = _epochs_of(history)
    out: dict[str, dict[str, np.ndarray]] = {}
    for name in _history_names(records):
        epochs: list[int] = []
        usages: list[np.ndarray | None] = []
        ratios: list[float] = []
        perps: list[float] = []
        for i, rec in enumerate(records):
            mem = _memory_record(rec, name)
            if mem is None:
                continue
            u = mem.get("usage")
            u_arr = None if u is None else np.asarray(u, dtype=np.float64).reshape(-1)
            ratio = mem.get("active_ratio")
            perp = mem.get("perplexity")
            if u_arr is not None and u_arr.size and u_arr.sum() > 0:
                stats = usage_from_counts(u_arr)
                ratio = stats["active_ratio"] if ratio is None else ratio
                perp = stats["perplexity"] if perp is None else perp
            if u_arr is None and ratio is None and perp is None:
                continue
            ep = rec.get("epoch", i)
            epochs.append(int(ep) if isinstance(ep, int | float) else i)
            usages.append(u_arr)
            ratios.append(math.nan if ratio is None else float(ratio))
            perps.append(math.nan if perp is None else float(perp))
        if not epochs:
            continue
        k = max((u.size for u in usages if u is not None), default=0)
        usage = np.full((len(epochs), k), np.nan)
        for row, u in enumerate(usages):
            if u is not None and u.size == k:
                usage[row] = u
        out[name] = {
            "epoch": np.asarray(epochs, dtype=np.int64),
            "usage": usage,
            "active_ratio": np.asarray(ratios, dtype=np.float64),
            "perplexity": np.asarray(perps, dtype=np.float64),
        }
    return out


# ------------------------------------------------------------------------------------ plotting


def plot_memory_dynamics(
    history: Any,
    out_png: str | os.PathLike[str],
    title: str = "",
    class_names: Sequence[str] | None = None,
) -> Path:
    """Plot memory usage dynamics of one fold (the paper's Figure 3 analogue).

    Top row: active ratio and perplexity per epoch for C+ and C- (for every class memory with
    C > 2 classes). Below: usage heat maps (epoch x component), one per memory, with a colour bar
    (two per row).

    Parameters
    ----------
    history : list of dict, dict, or path
        A fold's ``history.json`` content or path (see :func:`memory_history`).
    out_png : path
        The PNG to write (parent folders are created).
    title : str
        Figure title (e.g. the fold).
    class_names : sequence of str, optional
        Class names for the labels of C > 2 class memories.

    Returns
    -------
    Path
        ``out_png``.

    Raises
    ------
    DataError
        If the history has no memory usage statistics.
    """
    import matplotlib
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    dyn = memory_history(history)
    if not dyn:
        raise DataError(
            "history: no memory usage statistics (expected per-epoch 'memory': {'pos': ..., "
            "'neg': ...})"
        )
    multi = tuple(n for n in dyn if n not in MEMORIES)  # c0, c1, ... of C > 2 classes
    heat_names = multi if multi else MEMORIES
    colours: dict[str, Any] = {"pos": "#c0392b", "neg": "#2471a3"}
    if multi:
        cmap = matplotlib.colormaps["tab10"]
        colours = {n: cmap(i % 10) for i, n in enumerate(multi)}
    heat_rows = (len(heat_names) + 1) // 2
    fig = Figure(figsize=(11, 3.75 * (1 + heat_rows)), dpi=100, layout="constrained")
    axes = np.asarray(fig.subplots(1 + heat_rows, 2))
    ax_ratio, ax_perp = axes[0]
    _label = {n: memory_label(n, class_names) for n in heat_names}
    for name in (n for n in heat_names if n in dyn):
        d = dyn[name]
        ax_ratio.plot(
            d["epoch"],
            d["active_ratio"],
            "o-",
            ms=3,
            color=colours[name],
            label=_label[name],
        )
        ax_perp.plot(
            d["epoch"], d["perplexity"], "o-", ms=3, color=colours[name], label=_label[name]
        )
    ax_ratio.set(xlabel="epoch", ylabel="active ratio", title="Active components", ylim=(0, 1.05))
    k_max = max((d["usage"].shape[1] for d in dyn.values()), default=0)
    ax_perp.set(xlabel="epoch", ylabel="perplexity", title="Usage perplexity")
    if k_max:
        ax_perp.axhline(k_max, color="0.6", ls="--", lw=1, label=f"K = {k_max} (uniform)")
        ax_perp.set_ylim(0, k_max * 1.08)
    for ax in (ax_ratio, ax_perp):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    heat_axes = list(axes[1:].flat)
    for ax in heat_axes[len(heat_names) :]:
        ax.set_axis_off()
    for ax, name in zip(heat_axes, heat_names, strict=False):
        dm = dyn.get(name)
        if dm is None or dm["usage"].size == 0 or np.all(np.isnan(dm["usage"])):
            ax.text(
                0.5,
                0.5,
                f"no usage vectors for {_label[name]}",
                ha="center",
                va="center",
                transform=ax.transAxes,
            )
            ax.set_axis_off()
            continue
        usage = np.ma.masked_invalid(dm["usage"])
        ep = dm["epoch"]
        img = ax.imshow(
            usage.T,
            aspect="auto",
            origin="lower",
            interpolation="nearest",
            cmap="magma",
            vmin=0.0,
            extent=(ep[0] - 0.5, ep[-1] + 0.5, -0.5, usage.shape[1] - 0.5),
        )
        ax.set(xlabel="epoch", ylabel="component k", title=f"Usage u_k of {_label[name]}")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        fig.colorbar(img, ax=ax, label="share of patches")
    if title:
        fig.suptitle(title)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    logger.debug("wrote memory dynamics plot %s", out)
    return out
