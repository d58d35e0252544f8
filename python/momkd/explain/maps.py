"""Per-slide attention and memory-assignment maps drawn on the patch coordinates (docs/METHOD.md §8).

Patches are rasterised onto an image grid built from ``(coords - min) // patch_size``, one pixel
per patch, so drawing costs O(P) time and O(grid) memory even for slides with 100 000+ patches. A
grid larger than ``max_cells`` is binned further (a cell then shows the highest attention of its
patches, and the assignment of the most attended one).
"""

from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from momkd.errors import DataError

__all__ = [
    "assignment_labels",
    "assignment_labels_classes",
    "infer_patch_size",
    "patch_grid",
    "plot_assignment_map",
    "plot_attention_map",
    "safe_name",
]

logger = logging.getLogger(__name__)

MAX_CELLS = 4_000_000


def safe_name(slide_id: str) -> str:
    """A file-name-safe form of a slide id (characters outside ``[A-Za-z0-9._-]`` become ``_``)."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", slide_id).lstrip(".")
    return name or "slide"


def infer_patch_size(coords: np.ndarray) -> int:
    """Smallest positive step between distinct patch coordinates along x or y (1 if none).

    Parameters
    ----------
    coords : np.ndarray, shape (P, 2)
    """
    steps = []
    for axis in range(2):
        vals = np.unique(coords[:, axis])
        if vals.size > 1:
            steps.append(int(np.diff(vals).min()))
    return max(1, min(steps)) if steps else 1


def patch_grid(
    coords: Any, patch_size: int | None = None, max_cells: int = MAX_CELLS
) -> tuple[np.ndarray, np.ndarray, tuple[int, int], tuple[float, float, float, float]]:
    """Grid cell of every patch.

    Parameters
    ----------
    coords : array_like, shape (P, 2)
        Level-0 ``(x, y)`` of each patch's top-left corner.
    patch_size : int, optional
        Patch size in level-0 pixels; default :func:`infer_patch_size`.
    max_cells : int
        Upper bound on grid cells; larger grids are binned by an integer factor.

    Returns
    -------
    row, col : np.ndarray, int64, shape (P,)
        Grid cell of each patch.
    shape : (int, int)
        ``(height, width)`` of the grid.
    extent : (float, float, float, float)
        ``(left, right, bottom, top)`` in level-0 pixels, for ``imshow(..., origin="upper")``.
    """
    xy = np.asarray(coords, dtype=np.int64)
    if xy.ndim != 2 or xy.shape[1] != 2 or xy.shape[0] == 0:
        raise DataError(f"patch map: coords must have shape (P, 2) with P > 0, got {xy.shape}")
    ps = int(patch_size) if patch_size else infer_patch_size(xy)
    lo = xy.min(axis=0)
    cells = (xy - lo) // ps
    w, h = (cells.max(axis=0) + 1).tolist()
    factor = 1
    if w * h > max_cells:
        factor = math.ceil(math.sqrt(w * h / max_cells))
        cells //= factor
        w, h = (cells.max(axis=0) + 1).tolist()
    step = ps * factor
    extent = (float(lo[0]), float(lo[0] + w * step), float(lo[1] + h * step), float(lo[1]))
    return cells[:, 1], cells[:, 0], (int(h), int(w)), extent


def _raster(
    row: np.ndarray,
    col: np.ndarray,
    shape: tuple[int, int],
    values: np.ndarray,
    priority: np.ndarray,
) -> np.ndarray:
    """Grid of ``values``; where patches share a cell, the one with the highest priority wins."""
    grid = np.full(shape, np.nan, dtype=np.float64)
    order = np.argsort(priority, kind="stable")  # later (higher priority) writes win
    grid[row[order], col[order]] = values[order]
    return grid


def _title(slide_id: str, prob: float | None, what: str, prob_of: str = "positive") -> str:
    p = "" if prob is None or not np.isfinite(prob) else f"  (P({prob_of}) = {prob:.3f})"
    return f"{what}: {slide_id}{p}"


def _save(fig: Any, out_png: str | os.PathLike[str]) -> Path:
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out


def _figure(shape: tuple[int, int]) -> Any:
    from matplotlib.figure import Figure

    h, w = shape
    aspect = w / max(h, 1)
    width = 7.5
    height = min(max(width / max(aspect, 1e-3) * 0.85 + 0.8, 3.0), 12.0)
    return Figure(figsize=(width + 1.2, height), dpi=110, layout="constrained")


def plot_attention_map(
    slide_id: str,
    coords: Any,
    attention: Any,
    out_png: str | os.PathLike[str],
    *,
    prob: float | None = None,
    patch_size: int | None = None,
    prob_of: str = "positive",
    what: str = "Attention",
) -> Path:
    """Attention heat map of one slide on its patch grid.

    Colours show the within-slide percentile of each patch's attention (robust to the scale
    differences between small and large slides); the colour bar is labelled accordingly.

    Parameters
    ----------
    slide_id : str
    coords : array_like, shape (P, 2)
        Level-0 ``(x, y)`` of each patch.
    attention : array_like, shape (P,)
        Attention weights (sum to 1).
    out_png : path
    prob : float, optional
        Predicted probability of the positive class, shown in the title.
    patch_size : int, optional
        Patch size in level-0 pixels (default inferred from the coordinates).
    prob_of : str
        The class ``prob`` refers to, in the title (``positive``; a class name with C > 2).
    what : str
        The title's first word(s), e.g. ``Attention of class 2``.

    Returns
    -------
    Path
    """
    import matplotlib

    a = np.asarray(attention, dtype=np.float64).reshape(-1)
    row, col, shape, extent = patch_grid(coords, patch_size)
    if a.size != row.size:
        raise DataError(f"slide {slide_id!r}: {a.size} attention weights for {row.size} patches")
    ranks = np.empty(a.size, dtype=np.float64)
    ranks[np.argsort(a, kind="stable")] = np.arange(a.size)
    pct = ranks / max(a.size - 1, 1)
    grid = _raster(row, col, shape, pct, a)
    cmap = matplotlib.colormaps["inferno"].with_extremes(bad="#e8e8e8")
    fig = _figure(shape)
    ax = fig.add_subplot()
    img = ax.imshow(
        np.ma.masked_invalid(grid),
        cmap=cmap,
        vmin=0.0,
        vmax=1.0,
        origin="upper",
        extent=extent,
        interpolation="nearest",
    )
    ax.set_title(_title(slide_id, prob, what, prob_of), fontsize=10)
    ax.set_xlabel("x (level-0 px)")
    ax.set_ylabel("y (level-0 px)")
    fig.colorbar(img, ax=ax, shrink=0.8, label="attention percentile within slide")
    return _save(fig, out_png)


def assignment_labels(score: Any, assign_pos: Any, assign_neg: Any, k: int) -> np.ndarray:
    """Winning memory component of each patch as one label in ``[0, 2K)``.

    A patch belongs to C+ when its memory score (``max_k <p, c+_k> - max_k <p, c-_k>``) is
    positive, else to C-; label ``k`` is component ``k`` of C+, label ``K + k`` component ``k`` of
    C-.

    Parameters
    ----------
    score, assign_pos, assign_neg : array_like, shape (P,)
    k : int
        Components per memory K.

    Returns
    -------
    np.ndarray, int64, shape (P,)
    """
    s = np.asarray(score).reshape(-1)
    ap = np.asarray(assign_pos, dtype=np.int64).reshape(-1)
    an = np.asarray(assign_neg, dtype=np.int64).reshape(-1)
    return np.where(s > 0, ap, k + an).astype(np.int64)


def assignment_labels_classes(scores: Any, assign: Any, k: int) -> np.ndarray:
    """Winning memory component of each patch as one label in ``[0, C * K)`` (C > 2 classes).

    A patch belongs to the class memory whose one-vs-rest score is largest (the class with the most
    similar memory, docs/METHOD.md §2.11); label ``c * K + k`` is component ``k`` of class c's
    memory.

    Parameters
    ----------
    scores : array_like, shape (P, C)
        One-vs-rest memory scores (``MoMKDOutput.score`` of a C-class model).
    assign : sequence of C array_like, shape (P,)
        Component of each class memory per patch, indexed by class.
    k : int
        Components per memory K.

    Returns
    -------
    np.ndarray, int64, shape (P,)
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or s.shape[1] != len(assign):
        raise DataError(f"assignment: scores of shape (P, {len(assign)}) expected, got {s.shape}")
    win = np.argmax(s, axis=1)
    comp = np.stack([np.asarray(a, dtype=np.int64).reshape(-1) for a in assign], axis=1)
    return (win * k + comp[np.arange(win.size), win]).astype(np.int64)


def _assignment_cmap(k: int, n_memories: int = 2) -> Any:
    import matplotlib
    from matplotlib.colors import ListedColormap

    if n_memories != 2:
        names = ("Reds", "Blues", "Greens", "Purples", "Oranges", "Greys", "YlOrBr", "BuGn")
        parts = [
            matplotlib.colormaps[names[c % len(names)]](np.linspace(0.45, 1.0, k))
            for c in range(n_memories)
        ]
        return ListedColormap(np.concatenate(parts), name="momkd_assign_c").with_extremes(
            bad="#e8e8e8"
        )
    warm = matplotlib.colormaps["YlOrRd"](np.linspace(0.35, 1.0, k))
    cool = matplotlib.colormaps["PuBuGn"](np.linspace(0.45, 1.0, k))
    return ListedColormap(np.concatenate([warm, cool]), name="momkd_assign").with_extremes(
        bad="#e8e8e8"
    )


def plot_assignment_map(
    slide_id: str,
    coords: Any,
    labels: Any,
    k: int,
    out_png: str | os.PathLike[str],
    *,
    attention: Any = None,
    prob: float | None = None,
    patch_size: int | None = None,
    n_memories: int = 2,
) -> Path:
    """Memory-component assignment map of one slide (see :func:`assignment_labels`).

    Warm colours are components of C+, cool colours components of C-; the colour bar names them.
    With ``n_memories`` = C > 2 class memories (labels from :func:`assignment_labels_classes`),
    each class has its own colour family and the colour bar names ``C^c[k]``.

    Parameters
    ----------
    slide_id : str
    coords : array_like, shape (P, 2)
    labels : array_like, shape (P,)
        Labels in ``[0, 2K)`` from :func:`assignment_labels` (``[0, C * K)`` for C > 2).
    k : int
        Components per memory K.
    out_png : path
    attention : array_like, shape (P,), optional
        Decides which patch is shown where patches share a grid cell (the most attended).
    prob : float, optional
        Predicted probability of the positive class, shown in the title.
    patch_size : int, optional
    n_memories : int
        Number of class memories (2, or C > 2).

    Returns
    -------
    Path
    """
    from matplotlib.colors import BoundaryNorm

    n = n_memories * k
    lab = np.asarray(labels, dtype=np.int64).reshape(-1)
    row, col, shape, extent = patch_grid(coords, patch_size)
    if lab.size != row.size:
        raise DataError(f"slide {slide_id!r}: {lab.size} labels for {row.size} patches")
    if lab.size and (lab.min() < 0 or lab.max() >= n):
        raise DataError(f"slide {slide_id!r}: assignment labels must lie in [0, {n})")
    prio = np.zeros(lab.size) if attention is None else np.asarray(attention, dtype=np.float64)
    grid = _raster(row, col, shape, lab.astype(np.float64), prio.reshape(-1))
    cmap = _assignment_cmap(k, n_memories)
    norm = BoundaryNorm(np.arange(n + 1) - 0.5, cmap.N)
    fig = _figure(shape)
    ax = fig.add_subplot()
    img = ax.imshow(
        np.ma.masked_invalid(grid),
        cmap=cmap,
        norm=norm,
        origin="upper",
        extent=extent,
        interpolation="nearest",
    )
    if n_memories == 2:
        share_pos = float(np.mean(lab < k)) if lab.size else math.nan
        title = _title(slide_id, prob, "Memory assignment")
        title += f"\n{share_pos:.0%} of patches closer to C+"
    else:
        shares = np.bincount(lab // k, minlength=n_memories) / max(lab.size, 1)
        top = int(np.argmax(shares))
        title = _title(slide_id, prob, "Memory assignment", "predicted class")
        title += f"\n{shares[top]:.0%} of patches closest to C^{top}"
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("x (level-0 px)")
    ax.set_ylabel("y (level-0 px)")
    step = max(1, n // 16)
    ticks = list(range(0, n, step))
    cbar = fig.colorbar(img, ax=ax, shrink=0.9, ticks=ticks, label="memory component")
    if n_memories == 2:
        names = [f"C+[{t}]" if t < k else f"C-[{t - k}]" for t in ticks]
    else:
        names = [f"C^{t // k}[{t % k}]" for t in ticks]
    cbar.ax.set_yticklabels(names, fontsize=7)
    return _save(fig, out_png)
