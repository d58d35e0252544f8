"""The class-conditional memory of MoMKD (docs/METHOD.md §2.3, §2.5, §2.11, §7, §8).

One memory of K x S per class. With two classes they are C+ (positive class, stored as ``pos``) and
C- (negative class, ``neg``), as in the paper; with C > 2 classes (momkd's extension,
docs/METHOD.md §2.11) they are ``c0``, ``c1``, ... Similarities always use L2-normalised rows.
Three update modes:

* ``gradient``: both memories are ``nn.Parameter`` trained by the optimizer (alignment and
  orthogonality losses only; the attention path and the commitment target see them detached);
* ``momentum``: persistent buffers, updated after every optimizer step by :meth:`ClassMemory.momentum_update`
  from teacher embeddings, with dead-component re-seeding;
* ``fixed``: persistent buffers set by the k-means initialisation and never updated.

The momentum update is written for data parallelism: it is a masked update of every memory (no
branch on the label), its statistics are sum/count tensors that a ``reduce_fn`` (e.g. an all-reduce)
combines across ranks before the update, and the re-seeding choice depends only on reduced state, so
every rank ends the step with bit-identical memories.

For C > 2 classes this module also holds the eager memory-guided attention of the extension,
:func:`memory_attention_pool_classes` (the fused kernels of :mod:`momkd.kernels` cover two classes).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from momkd import kernels
from momkd.errors import ConfigError, DataError
from momkd.kernels.reference import (
    fp32,
    momentum_apply_reference,
    momentum_stats_reference,
    segment_ids,
)

__all__ = [
    "MEMORY_MODES",
    "ClassMemory",
    "ReduceFn",
    "attention_maps",
    "class_memory_names",
    "kmeans_class_memories",
    "kmeans_seed",
    "memory_attention_pool_classes",
    "spherical_kmeans",
    "usage_stats",
]

logger = logging.getLogger(__name__)

MEMORY_MODES = ("gradient", "momentum", "fixed")

ReduceFn = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
"""Combines per-rank statistics ``(sums (C, K, S), counts (C, K))``, e.g. by all-reduce (sum)."""


def class_memory_names(n_classes: int) -> tuple[str, ...]:
    """Attribute (and state-dict) name of each class memory, indexed by class.

    Two classes keep the paper's names, ``("neg", "pos")`` (class 0 is C-, class 1 is C+), so every
    binary checkpoint and the released-checkpoint conversion are unchanged; C > 2 classes are named
    ``("c0", "c1", ...)``.
    """
    if n_classes < 2:
        raise ConfigError(f"model.n_classes must be >= 2, got {n_classes}")
    if n_classes == 2:
        return ("neg", "pos")
    return tuple(f"c{c}" for c in range(n_classes))


def kmeans_seed(seed: int, c: int, n_classes: int) -> int:
    """Seed of class ``c``'s k-means initialisation: ``seed + (C - 1 - c)`` (docs/METHOD.md §2.5,
    §2.11), so that with two classes C+ uses ``seed`` and C- ``seed + 1``."""
    return seed + (n_classes - 1 - c)


@torch.no_grad()
def spherical_kmeans(x: Tensor, k: int, iters: int = 20, seed: int = 0) -> Tensor:
    """Spherical k-means (docs/METHOD.md §2.5).

    The rows of ``x`` are L2-normalised; the initial centroids are ``k`` distinct rows drawn with
    ``torch.randperm`` from a CPU ``torch.Generator`` seeded with ``seed``. Each iteration assigns
    every point to its most similar centroid (argmax cosine, ties to the lowest index) and sets each
    centroid to the normalised mean of its points; a centroid without points is kept.

    Parameters
    ----------
    x : Tensor
        (M, S) points, M >= k.
    k : int
        Number of clusters.
    iters : int
        Number of assignment/update iterations.
    seed : int
        Seed of the initial choice.

    Returns
    -------
    Tensor
        (k, S) float32 unit-norm centroids on the device of ``x``.

    Raises
    ------
    DataError
        Fewer than k points, non-finite values, or a bad shape.
    """
    if x.dim() != 2:
        raise DataError(f"spherical_kmeans: expected points of shape (M, S), got {tuple(x.shape)}")
    m = x.shape[0]
    if k < 1 or m < k:
        raise DataError(f"spherical_kmeans: need at least k={k} points, got {m}")
    with fp32(x):
        pts = x.float()
        if not bool(torch.isfinite(pts).all()):
            raise DataError("spherical_kmeans: points contain NaN or Inf")
        pts = F.normalize(pts, dim=1)
        gen = torch.Generator().manual_seed(seed)
        init = torch.randperm(m, generator=gen)[:k].to(pts.device)
        centroids = pts[init].clone()
        for _ in range(iters):
            assign = (pts @ centroids.T).argmax(dim=1)
            sums = torch.zeros_like(centroids).index_add_(0, assign, pts)
            counts = torch.bincount(assign, minlength=k)
            centroids = torch.where((counts > 0)[:, None], F.normalize(sums, dim=1), centroids)
    return centroids


@torch.no_grad()
def kmeans_class_memories(
    embeddings: Sequence[Tensor], k: int, iters: int = 20, seed: int = 0
) -> list[Tensor]:
    """Per-class spherical k-means initialisation of C class memories (docs/METHOD.md §2.5, §2.11).

    Parameters
    ----------
    embeddings : sequence of Tensor
        Indexed by class: ``embeddings[c]`` is (M_c, S), M_c >= k, patch projections of class c.
    k : int
        Components per class K.
    iters : int
        k-means iterations.
    seed : int
        Class c uses ``kmeans_seed(seed, c, C)`` = ``seed + (C - 1 - c)``.

    Returns
    -------
    list of Tensor
        (k, S) float32 unit-norm centroids per class, indexed by class.
    """
    n = len(embeddings)
    if n < 2:
        raise DataError(f"memory initialisation: need embeddings of >= 2 classes, got {n}")
    out: list[Tensor | None] = [None] * n
    for c in reversed(range(n)):  # the highest class first, as C+ before C- with two classes
        out[c] = spherical_kmeans(embeddings[c], k, iters=iters, seed=kmeans_seed(seed, c, n))
    return [t for t in out if t is not None]


def attention_maps(n_classes: int) -> tuple[int, ...]:
    """Classes that get an attention map (docs/METHOD.md §2.11): ``(1,)`` for two classes (the
    binary score; class 0's map is its mirror image), every class for C > 2."""
    return (1,) if n_classes == 2 else tuple(range(n_classes))


def memory_attention_pool_classes(
    patch_proj: Tensor,
    feats: Tensor,
    c_hats: Sequence[Tensor],
    log_tau: Tensor,
    segment_offsets: Tensor,
    *,
    tau_min: float = 0.01,
    tau_max: float = 2.0,
    maps: Sequence[int] | None = None,
) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, ...]]:
    """Memory-guided attention pooling against C class memories (docs/METHOD.md §2.11), eager.

    ``s_ic = max_k <p_i, sg(c_hat^c_k)>`` (hard max, memories detached); the one-vs-rest score of
    class c is ``Score^c_i = s_ic - max_{c' != c} s_ic'``; for each class m in ``maps`` the
    attention ``a^m = softmax(Score^m / tau)`` within each bag (one tau for all maps,
    ``tau = clamp(exp(log_tau), tau_min, tau_max)``) pools ``V^m_b = sum_{i in b} a^m_i F_i``, and
    the pooled output is the concatenation ``[V^m for m in maps]``.

    With two classes and ``maps = (1,)`` this is exactly
    :func:`momkd.kernels.reference.memory_attention_pool_reference` (``Score^1 = s_i1 - s_i0``).

    Parameters
    ----------
    patch_proj : Tensor
        (N, S) normalised patch projections p.
    feats : Tensor
        (N, H) encoder features F.
    c_hats : sequence of Tensor
        Indexed by class, C >= 2 normalised memories (K, S); no gradient flows into them.
    log_tau : Tensor
        () temperature parameter theta.
    segment_offsets : Tensor
        (B + 1,) int64 bag offsets.
    tau_min, tau_max : float
        Clamp range of tau.
    maps : sequence of int, optional
        Classes with an attention map; default :func:`attention_maps` (C).

    Returns
    -------
    pooled : Tensor
        (B, |maps| * H) float32, ``[V^m for m in maps]`` concatenated along the features.
    attention : Tensor
        (N, |maps|) float32, column j the attention of class ``maps[j]`` (sums to 1 per bag).
    score : Tensor
        (N, |maps|) float32 one-vs-rest scores Score^m.
    assign : tuple of Tensor
        Indexed by class, (N,) int64 most similar component of each memory (ties: lowest index).
    """
    n_classes = len(c_hats)
    if n_classes < 2:
        raise DataError(f"memory attention: need >= 2 class memories, got {n_classes}")
    maps = attention_maps(n_classes) if maps is None else tuple(maps)
    if not maps or any(not 0 <= m < n_classes for m in maps):
        raise DataError(f"memory attention: maps must be classes in [0, {n_classes}), got {maps}")
    n = patch_proj.shape[0]
    seg, b = segment_ids(segment_offsets.to(patch_proj.device), n)
    with fp32(patch_proj):
        p = patch_proj.float()
        best: list[Tensor] = []
        assign: list[Tensor] = []
        for c_hat in c_hats:
            sim = p @ c_hat.detach().float().T  # (N, K)
            s_c, a_c = sim.max(dim=1)
            best.append(s_c)
            assign.append(a_c)
        tau = log_tau.float().exp().clamp(tau_min, tau_max)
        f = feats.float()
        pooled, attention, score = [], [], []
        for m in maps:
            others = [best[c] for c in range(n_classes) if c != m]
            rival = others[0] if len(others) == 1 else torch.stack(others, dim=1).amax(dim=1)
            sc = best[m] - rival
            logits = sc / tau
            # Softmax is shift invariant, so the per-bag maximum can be a constant (detached).
            seg_max = torch.full((b,), -math.inf, device=p.device, dtype=torch.float32)
            seg_max = seg_max.scatter_reduce(
                0, seg, logits.detach(), reduce="amax", include_self=True
            )
            e = torch.exp(logits - seg_max[seg])
            denom = torch.zeros(b, device=p.device, dtype=torch.float32).index_add(0, seg, e)
            a = e / denom[seg]
            v = torch.zeros(b, f.shape[1], device=f.device, dtype=torch.float32)
            pooled.append(v.index_add(0, seg, a[:, None] * f))
            attention.append(a)
            score.append(sc)
    return (
        torch.cat(pooled, dim=1),
        torch.stack(attention, dim=1),
        torch.stack(score, dim=1),
        tuple(assign),
    )


def usage_stats(assign: Tensor, k: int) -> dict[str, Tensor | float]:
    """Memory usage statistics of one class memory (docs/METHOD.md §8).

    Parameters
    ----------
    assign : Tensor
        (N,) int64 argmax-cosine component of each patch, in ``[0, k)``.
    k : int
        Number of components K.

    Returns
    -------
    dict
        ``usage`` (K,) float64 share of patches per component, ``active_ratio`` (float) share of
        components with non-zero usage, ``perplexity`` (float) ``exp(-sum_k u_k ln u_k)`` with
        ``0 ln 0 = 0``.
    """
    a = assign.detach().reshape(-1).to("cpu", torch.int64)
    if a.numel() == 0:
        raise DataError("usage_stats: no assignments (empty bag set)")
    if bool((a < 0).any()) or bool((a >= k).any()):
        raise DataError(f"usage_stats: assignments must lie in [0, {k})")
    usage = torch.bincount(a, minlength=k).to(torch.float64) / a.numel()
    nz = usage[usage > 0]
    entropy = float(-(nz * nz.log()).sum())
    return {
        "usage": usage,
        "active_ratio": float((usage > 0).double().mean()),
        "perplexity": math.exp(entropy),
    }


class ClassMemory(nn.Module):
    """One memory of K components per class: C+ and C- for two classes, C^0 .. C^{C-1} for more.

    Parameters
    ----------
    k : int
        Components per class K.
    dim : int
        Sphere dimension S.
    mode : str
        ``gradient`` | ``momentum`` | ``fixed``.
    momentum : float
        EMA momentum m of the ``momentum`` mode.
    dead_after : int
        In ``momentum`` mode, a component that received no embedding in this many consecutive
        updates of its class is re-seeded from a recent embedding of that class.
    ring_size : int
        Number of recent per-class embeddings kept for re-seeding (``momentum`` mode).
    n_classes : int
        Number of classes C >= 2 (one memory each).

    Attributes
    ----------
    pos, neg : Tensor
        Two classes: (K, S) float32 raw memory rows of class 1 and class 0 (parameters in
        ``gradient`` mode, persistent buffers otherwise).
    c0, c1, ... : Tensor
        C > 2 classes: the same, one per class (see :attr:`names` and :meth:`class_memory`).
    unused_steps : Tensor
        (C, K) int64, ``momentum`` mode only: updates of the class since each component was last
        assigned (row = class; with two classes row 0 = negative, row 1 = positive).
    recent : Tensor
        (C, ring_size, S) float32, ``momentum`` mode only: ring buffer of recent class embeddings.
    recent_count : Tensor
        (C,) int64, ``momentum`` mode only: number of entries ever written to each ring.
    """

    pos: Tensor
    neg: Tensor
    unused_steps: Tensor
    recent: Tensor
    recent_count: Tensor

    def __init__(
        self,
        k: int,
        dim: int,
        mode: str = "gradient",
        momentum: float = 0.99,
        dead_after: int = 100,
        ring_size: int = 32,
        n_classes: int = 2,
    ) -> None:
        super().__init__()
        if mode not in MEMORY_MODES:
            raise ConfigError(f"memory.update must be one of {MEMORY_MODES}, got {mode!r}")
        if not 0.0 <= momentum < 1.0:
            raise ConfigError(f"memory.momentum must lie in [0, 1), got {momentum}")
        if dead_after < 1:
            raise ConfigError(f"memory.dead_after must be >= 1, got {dead_after}")
        if k < 1 or dim < 1 or ring_size < 1:
            raise ConfigError(
                f"memory: K, S and ring size must be >= 1, got {k}, {dim}, {ring_size}"
            )
        self.names = class_memory_names(n_classes)
        self.n_classes = n_classes
        self.k, self.dim, self.mode = k, dim, mode
        self.momentum, self.dead_after, self.ring_size = momentum, dead_after, ring_size
        # Registered (and drawn) from the highest class down: pos before neg with two classes.
        for name in reversed(self.names):
            init = F.normalize(torch.randn(k, dim), dim=1)
            if mode == "gradient":
                self.register_parameter(name, nn.Parameter(init))
            else:
                self.register_buffer(name, init, persistent=True)
        if mode == "momentum":
            c = n_classes
            self.register_buffer("unused_steps", torch.zeros(c, k, dtype=torch.int64))
            self.register_buffer("recent", torch.zeros(c, ring_size, dim))
            self.register_buffer("recent_count", torch.zeros(c, dtype=torch.int64))

    def extra_repr(self) -> str:
        extra = f", n_classes={self.n_classes}" if self.n_classes != 2 else ""
        return f"k={self.k}, dim={self.dim}, mode={self.mode!r}{extra}"

    def class_memory(self, c: int) -> Tensor:
        """(K, S) raw rows of class ``c``'s memory (``neg`` / ``pos`` for class 0 / 1 of two)."""
        if not 0 <= c < self.n_classes:
            raise DataError(f"memory: class {c} outside [0, {self.n_classes})")
        t: Tensor = getattr(self, self.names[c])
        return t

    def memories(self) -> tuple[Tensor, ...]:
        """Raw rows of every class memory, indexed by class, each (K, S)."""
        return tuple(self.class_memory(c) for c in range(self.n_classes))

    def normalized(self) -> tuple[Tensor, Tensor]:
        """L2-normalised rows ``(c+_hat (K, S), c-_hat (K, S))`` in float32 (differentiable).

        Two classes only; :meth:`normalized_classes` serves any number.
        """
        if self.n_classes != 2:
            raise ConfigError(
                f"memory.normalized: the model has {self.n_classes} classes; use "
                "normalized_classes()"
            )
        with fp32(self.pos):
            return F.normalize(self.pos.float(), dim=1), F.normalize(self.neg.float(), dim=1)

    def normalized_classes(self) -> tuple[Tensor, ...]:
        """L2-normalised rows of every class memory, indexed by class, each (K, S) float32."""
        mems = self.memories()
        with fp32(mems[0]):
            return tuple(F.normalize(m.float(), dim=1) for m in mems)

    @torch.no_grad()
    def set_memories(self, pos: Tensor, neg: Tensor) -> None:
        """Overwrite both memories of a two-class model with (K, S) tensors and clear the momentum
        bookkeeping."""
        if self.n_classes != 2:
            raise ConfigError(
                f"memory.set_memories: the model has {self.n_classes} classes; use "
                "set_class_memories()"
            )
        self.set_class_memories([neg, pos])

    @torch.no_grad()
    def set_class_memories(self, values: Sequence[Tensor]) -> None:
        """Overwrite every class memory (indexed by class, each (K, S)) and clear the momentum
        bookkeeping."""
        if len(values) != self.n_classes:
            raise DataError(f"memory: expected {self.n_classes} class memories, got {len(values)}")
        for name, value in zip(self.names, values, strict=True):
            if tuple(value.shape) != (self.k, self.dim):
                raise DataError(
                    f"memory {name}: expected shape {(self.k, self.dim)}, got {tuple(value.shape)}"
                )
            if not bool(torch.isfinite(value).all()):
                raise DataError(f"memory {name}: values contain NaN or Inf")
        for c in reversed(range(self.n_classes)):  # pos before neg, as before
            self.class_memory(c).copy_(values[c].float())
        if self.mode == "momentum":
            self.unused_steps.zero_()
            self.recent.zero_()
            self.recent_count.zero_()

    @torch.no_grad()
    def momentum_update(
        self, emb: Tensor, labels: Tensor, reduce_fn: ReduceFn | None = None
    ) -> None:
        """One momentum step over every class memory (docs/METHOD.md §2.5, §2.11, §7).

        Each embedding is assigned to the nearest (argmax cosine) component of its own class
        memory; per component ``c_k <- normalize(m * c_hat_k + (1 - m) * mean of assigned)``.
        The statistics ``(sums (C, K, S), counts (C, K))`` pass through ``reduce_fn`` before they are
        used, so under DDP every rank must call this method at every step (with M = 0 embeddings
        if it has none) and ``reduce_fn`` should all-reduce (sum) both tensors.

        Bookkeeping, from reduced statistics only: a class that received embeddings this step
        pushes the normalised sum of them into its ring buffer; its components that received none
        age by one step, the others reset; components aged ``dead_after`` are re-seeded from the
        most recent ring entries (the j-th dead component of a class gets the j-th most recent).

        With two classes and without ``reduce_fn``, when the kernel mode selects the fused kernels
        (see :mod:`momkd.kernels`), the whole step runs as one launch of
        :func:`momkd.kernels.align_momentum.momentum_step`; otherwise as separate statistics,
        apply and bookkeeping steps (the statistics and apply ops dispatch on their own). With
        C > 2 classes the eager references run (the fused kernels cover two classes).

        Parameters
        ----------
        emb : Tensor
            (M, S) teacher embeddings (normalised here).
        labels : Tensor
            (M,) int64 class of each embedding in ``[0, C)``.
        reduce_fn : callable, optional
            ``(sums, counts) -> (sums, counts)``, applied before the update.
        """
        if self.mode != "momentum":
            raise ConfigError(f"memory.update is {self.mode!r}: momentum updates are not allowed")
        if emb.dim() != 2 or emb.shape[1] != self.dim:
            raise DataError(
                f"momentum_update: expected embeddings (M, {self.dim}), got {tuple(emb.shape)}"
            )
        first = self.class_memory(0)
        labels = labels.reshape(-1).to(first.device, torch.int64)
        if labels.numel() != emb.shape[0]:
            raise DataError(
                f"momentum_update: {emb.shape[0]} embeddings but {labels.numel()} labels"
            )
        binary = self.n_classes == 2
        if binary:
            if bool(((labels != 0) & (labels != 1)).any()):
                raise DataError("momentum_update: labels must be 0 or 1")
        elif bool(((labels < 0) | (labels >= self.n_classes)).any()):
            raise DataError(f"momentum_update: labels must lie in [0, {self.n_classes})")
        emb = emb.detach().to(first.device)
        step = (
            kernels.fused_impl("momentum_step", self.pos, emb)
            if binary and reduce_fn is None
            else None
        )
        if step is not None:  # the whole update, bookkeeping included, in one kernel launch
            step(
                self.pos,
                self.neg,
                self.unused_steps,
                self.recent,
                self.recent_count,
                emb,
                labels,
                self.momentum,
                self.dead_after,
            )
            return
        stats = kernels.momentum_stats if binary else momentum_stats_reference
        apply = kernels.momentum_apply if binary else momentum_apply_reference
        with fp32(first):
            e = F.normalize(emb.float(), dim=1)
            mems = torch.stack(self.memories()).float()  # (C, K, S), index = label
            sums, counts = stats(F.normalize(mems, dim=-1), e, labels)
            if reduce_fn is not None:
                sums, counts = reduce_fn(sums, counts)
            new = apply(mems, sums, counts, self.momentum)

            seen = counts.sum(dim=1) > 0  # (C,) class received embeddings this step
            used = counts > 0  # (C, K)
            aged = torch.where(seen[:, None], self.unused_steps + 1, self.unused_steps)
            unused = torch.where(used, torch.zeros_like(aged), aged)

            rows = torch.arange(self.n_classes, device=mems.device)
            slot = self.recent_count % self.ring_size
            class_emb = F.normalize(sums.sum(dim=1), dim=1)  # (C, S)
            self.recent[rows, slot] = torch.where(seen[:, None], class_emb, self.recent[rows, slot])
            self.recent_count += seen.to(torch.int64)

            filled = self.recent_count.clamp(max=self.ring_size)  # (C,)
            dead = (unused >= self.dead_after) & (filled[:, None] > 0)
            rank = (torch.cumsum(dead.to(torch.int64), dim=1) - 1).clamp_min(0)
            back = rank % filled.clamp_min(1)[:, None]
            idx = (self.recent_count[:, None] - 1 - back) % self.ring_size  # (C, K)
            seeds = self.recent[rows[:, None], idx]  # (C, K, S)
            new = torch.where(dead[..., None], seeds, new)
            unused = torch.where(dead, torch.zeros_like(unused), unused)

            for c in range(self.n_classes):  # neg before pos, as before
                self.class_memory(c).copy_(new[c])
            self.unused_steps.copy_(unused)
