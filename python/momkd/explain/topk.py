"""Top-k patches per memory component across a cohort (docs/METHOD.md §8, the paper's Figure 4).

:class:`TopKTracker` keeps, for each of the 2K components (C+ then C-; with C > 2 classes the C * K
components of ``c0``, ``c1``, ...), the k patches of the cohort with the highest cosine similarity
``<p_i, c_hat>`` seen so far. Each bag contributes only its own
top k per component, which is merged into the running table, so memory is O(2K * k) whatever the
number of slides and patches.
"""

from __future__ import annotations

import csv
import importlib
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from momkd._io import atomic_open
from momkd.errors import DataError

__all__ = ["TOPK_COLUMNS", "TopKTracker", "make_gallery", "memory_rank", "read_topk_csv"]

logger = logging.getLogger(__name__)

#: Columns of ``topk_patches.csv``.
TOPK_COLUMNS = ("memory", "component", "rank", "slide_id", "x", "y", "similarity")


def memory_rank(name: str) -> int:
    """Display order of a memory name: ``pos``, ``neg``, then ``c0``, ``c1``, ..."""
    if name == "pos":
        return 0
    if name == "neg":
        return 1
    return 2 + int(name[1:]) if name[1:].isdigit() else 1_000_000


def _component_label(memory: str, comp: int) -> str:
    if memory in ("pos", "neg"):
        return f"C{'+' if memory == 'pos' else '-'}[{comp}]"
    return f"C^{memory[1:]}[{comp}]"


WSI_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif")


class TopKTracker:
    """Running top-k (similarity, slide, patch coordinates) per memory component.

    Parameters
    ----------
    k_components : int
        Components per memory K; the tracker follows ``len(memories) * K`` columns, memory by
        memory (C+ components first with the default).
    top_k : int
        Patches kept per component.
    memories : sequence of str
        Names of the memories in column order: ``("pos", "neg")`` (two classes) or
        ``("c0", "c1", ...)`` (C > 2 classes).

    Attributes
    ----------
    similarity : np.ndarray, float32, shape (2K, top_k)
        Best similarities, descending per row (``-inf`` where fewer patches were seen).
    slide : np.ndarray, int64, shape (2K, top_k)
        Index into :attr:`slide_ids` (-1 where empty).
    xy : np.ndarray, int64, shape (2K, top_k, 2)
        Level-0 patch coordinates.
    slide_ids : list of str
        Slides in the order they were added.
    """

    def __init__(
        self, k_components: int, top_k: int, memories: Sequence[str] = ("pos", "neg")
    ) -> None:
        if k_components < 1 or top_k < 1:
            raise DataError(f"top-k: K and top_k must be >= 1, got {k_components}, {top_k}")
        if len(memories) < 1:
            raise DataError("top-k: no memories")
        self.k_components = int(k_components)
        self.top_k = int(top_k)
        self.memories = tuple(memories)
        c = len(self.memories) * self.k_components
        self.similarity = np.full((c, self.top_k), -np.inf, dtype=np.float32)
        self.slide = np.full((c, self.top_k), -1, dtype=np.int64)
        self.xy = np.zeros((c, self.top_k, 2), dtype=np.int64)
        self.slide_ids: list[str] = []

    def update(self, slide_id: str, sims: Any, coords: Any) -> None:
        """Merge one slide's patches.

        Parameters
        ----------
        slide_id : str
        sims : torch.Tensor or np.ndarray, shape (P, len(memories) * K)
            Cosine similarity of every patch to every component (memory by memory, C+ columns
            first by default); may live on the GPU: only the slide's top k per column is moved to
            the host.
        coords : torch.Tensor or np.ndarray, shape (P, 2)
            Level-0 ``(x, y)`` of each patch.

        Ties keep the patch seen first (earlier slide, then lower patch index within a slide).
        """
        import torch

        s = torch.as_tensor(sims)
        c = len(self.memories) * self.k_components
        if s.dim() != 2 or s.shape[1] != c:
            raise DataError(
                f"slide {slide_id!r}: similarities must have shape (P, {c}), got {tuple(s.shape)}"
            )
        p = s.shape[0]
        if p == 0:
            raise DataError(f"slide {slide_id!r}: empty bag")
        kk = min(self.top_k, p)
        # Sort each column stably (descending) so that equal similarities keep patch order.
        order = torch.sort(s.float(), dim=0, descending=True, stable=True).indices[:kk]  # (kk, 2K)
        idx = order.T.cpu().numpy()  # (2K, kk)
        vals = torch.gather(s.float(), 0, order).T.cpu().numpy().astype(np.float32)
        crd = np.asarray(torch.as_tensor(coords).cpu().numpy(), dtype=np.int64)
        if crd.shape != (p, 2):
            raise DataError(f"slide {slide_id!r}: coords must have shape ({p}, 2), got {crd.shape}")
        sidx = len(self.slide_ids)
        self.slide_ids.append(slide_id)
        all_sim = np.concatenate([self.similarity, vals], axis=1)
        all_slide = np.concatenate([self.slide, np.full((c, kk), sidx, dtype=np.int64)], axis=1)
        all_xy = np.concatenate([self.xy, crd[idx]], axis=1)
        keep = np.argsort(-all_sim, axis=1, kind="stable")[:, : self.top_k]
        self.similarity = np.take_along_axis(all_sim, keep, axis=1)
        self.slide = np.take_along_axis(all_slide, keep, axis=1)
        self.xy = np.take_along_axis(all_xy, keep[..., None], axis=1)

    def rows(self) -> list[dict[str, Any]]:
        """The table as dicts with the keys of :data:`TOPK_COLUMNS` (rank starts at 1)."""
        out: list[dict[str, Any]] = []
        for col in range(len(self.memories) * self.k_components):
            memory = self.memories[col // self.k_components]
            comp = col % self.k_components
            for r in range(self.top_k):
                if self.slide[col, r] < 0:
                    continue
                out.append(
                    {
                        "memory": memory,
                        "component": comp,
                        "rank": r + 1,
                        "slide_id": self.slide_ids[self.slide[col, r]],
                        "x": int(self.xy[col, r, 0]),
                        "y": int(self.xy[col, r, 1]),
                        "similarity": float(self.similarity[col, r]),
                    }
                )
        return out

    def write_csv(self, path: str | os.PathLike[str]) -> Path:
        """Write ``topk_patches.csv`` (columns :data:`TOPK_COLUMNS`) atomically."""
        path = Path(path)
        with atomic_open(path) as fh:
            writer = csv.DictWriter(fh, fieldnames=list(TOPK_COLUMNS))
            writer.writeheader()
            for row in self.rows():
                writer.writerow({**row, "similarity": f"{row['similarity']:.7g}"})
        return path


def read_topk_csv(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read ``topk_patches.csv`` back (ints and floats converted)."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        for key in ("component", "rank", "x", "y"):
            r[key] = int(r[key])
        r["similarity"] = float(r["similarity"])
    return rows


# ------------------------------------------------------------------------------------ gallery


def find_wsi(wsi_dir: str | os.PathLike[str], slide_id: str) -> Path | None:
    """The slide image for ``slide_id`` in ``wsi_dir`` (``<slide_id>.<ext>``, common WSI formats)."""
    root = Path(wsi_dir)
    for ext in WSI_EXTENSIONS:
        cand = root / f"{slide_id}{ext}"
        if cand.is_file():
            return cand
    return None


def _openslide_opener() -> Callable[[Path], Any] | None:
    try:
        openslide = importlib.import_module("openslide")  # optional reader, no type stubs
    except ImportError:
        return None
    opener: Callable[[Path], Any] = openslide.OpenSlide
    return opener


def make_gallery(
    rows: Sequence[dict[str, Any]],
    wsi_dir: str | os.PathLike[str],
    out_png: str | os.PathLike[str],
    patch_size: int,
    *,
    opener: Callable[[Path], Any] | None = None,
    thumb: int = 96,
) -> Path | None:
    """Draw the top-k patch crops per memory component as one image grid.

    Parameters
    ----------
    rows : sequence of dict
        Rows of ``topk_patches.csv`` (:meth:`TopKTracker.rows` or :func:`read_topk_csv`).
    wsi_dir : path
        Folder with one slide image per slide id (``<slide_id>.svs`` etc.).
    out_png : path
        The PNG to write.
    patch_size : int
        Crop size in level-0 pixels.
    opener : callable, optional
        ``opener(path)`` returns an object with ``read_region((x, y), level, (w, h))`` (the
        OpenSlide interface). Default ``openslide.OpenSlide``; without openslide the gallery is
        skipped (returns None, logged).
    thumb : int
        Side of each drawn crop in pixels.

    Returns
    -------
    Path or None
        ``out_png``, or None when skipped.
    """
    from matplotlib.figure import Figure

    if opener is None:
        opener = _openslide_opener()
        if opener is None:
            logger.warning("patch gallery skipped: openslide is not installed")
            return None
    if not rows:
        logger.warning("patch gallery skipped: no top-k patches")
        return None
    cols = max(int(r["rank"]) for r in rows)
    comps = sorted({(memory_rank(r["memory"]), int(r["component"])) for r in rows})
    row_of = {key: i for i, key in enumerate(comps)}
    handles: dict[str, Any] = {}
    missing: set[str] = set()
    fig = Figure(figsize=(1.3 * cols + 1.0, 1.3 * len(comps) + 0.6), dpi=80, layout="constrained")
    axes = np.asarray(fig.subplots(len(comps), cols, squeeze=False))
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    for r in rows:
        key = (memory_rank(r["memory"]), int(r["component"]))
        ax = axes[row_of[key], int(r["rank"]) - 1]
        sid = str(r["slide_id"])
        if sid not in handles and sid not in missing:
            path = find_wsi(wsi_dir, sid)
            if path is None:
                missing.add(sid)
            else:
                try:
                    handles[sid] = opener(path)
                except Exception as exc:  # noqa: BLE001 -- readers raise their own types; blank the crop
                    logger.warning("cannot open slide image %s: %s", path, exc)
                    missing.add(sid)
        if sid in handles:
            region = handles[sid].read_region(
                (int(r["x"]), int(r["y"])), 0, (patch_size, patch_size)
            )
            img = np.asarray(region)
            if img.ndim == 3 and img.shape[2] >= 3:
                img = img[..., :3]
            step = max(1, img.shape[0] // thumb)
            ax.imshow(img[::step, ::step], interpolation="nearest")
        else:
            ax.text(
                0.5, 0.5, "no image", ha="center", va="center", fontsize=7, transform=ax.transAxes
            )
        ax.set_title(f"{sid[:18]}\n{float(r['similarity']):.3f}", fontsize=6)
        if int(r["rank"]) == 1:
            ax.set_ylabel(_component_label(str(r["memory"]), int(r["component"])), fontsize=8)
    for h in handles.values():
        close = getattr(h, "close", None)
        if callable(close):
            close()
    if missing:
        logger.warning("patch gallery: no slide image for %d slide(s) in %s", len(missing), wsi_dir)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.suptitle("Top patches per memory component")
    fig.savefig(out)
    return out
