"""The class-conditional memory of MoMKD (docs/METHOD.md §2.3, §2.5, §7, §8).

Two memories, C+ (positive class) and C- (negative class), each K x S. Similarities always use
L2-normalised rows. Three update modes:

* ``gradient``: both memories are ``nn.Parameter`` trained by the optimizer (alignment and
  orthogonality losses only; the attention path and the commitment target see them detached);
* ``momentum``: persistent buffers, updated after every optimizer step by :meth:`ClassMemory.momentum_update`
  from teacher embeddings, with dead-component re-seeding;
* ``fixed``: persistent buffers set by the k-means initialisation and never updated.

The momentum update is written for data parallelism: it is a masked update of both memories (no
branch on the label), its statistics are sum/count tensors that a ``reduce_fn`` (e.g. an all-reduce)
combines across ranks before the update, and the re-seeding choice depends only on reduced state, so
every rank ends the step with bit-identical memories.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from momkd import kernels
from momkd.errors import ConfigError, DataError
from momkd.kernels.reference import fp32

__all__ = ["MEMORY_MODES", "ClassMemory", "ReduceFn", "spherical_kmeans", "usage_stats"]

logger = logging.getLogger(__name__)

MEMORY_MODES = ("gradient", "momentum", "fixed")

ReduceFn = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
"""Combines per-rank statistics ``(sums (2, K, S), counts (2, K))``, e.g. by all-reduce (sum)."""


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
    """Positive and negative class memories C+ and C-.

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

    Attributes
    ----------
    pos, neg : Tensor
        (K, S) float32 raw memory rows (parameters in ``gradient`` mode, persistent buffers otherwise).
    unused_steps : Tensor
        (2, K) int64, ``momentum`` mode only: updates of the class since each component was last
        assigned (row 0 = negative class, row 1 = positive class).
    recent : Tensor
        (2, ring_size, S) float32, ``momentum`` mode only: ring buffer of recent class embeddings.
    recent_count : Tensor
        (2,) int64, ``momentum`` mode only: number of entries ever written to each ring.
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
        self.k, self.dim, self.mode = k, dim, mode
        self.momentum, self.dead_after, self.ring_size = momentum, dead_after, ring_size
        pos = F.normalize(torch.randn(k, dim), dim=1)
        neg = F.normalize(torch.randn(k, dim), dim=1)
        if mode == "gradient":
            self.pos = nn.Parameter(pos)
            self.neg = nn.Parameter(neg)
        else:
            self.register_buffer("pos", pos, persistent=True)
            self.register_buffer("neg", neg, persistent=True)
        if mode == "momentum":
            self.register_buffer("unused_steps", torch.zeros(2, k, dtype=torch.int64))
            self.register_buffer("recent", torch.zeros(2, ring_size, dim))
            self.register_buffer("recent_count", torch.zeros(2, dtype=torch.int64))

    def extra_repr(self) -> str:
        return f"k={self.k}, dim={self.dim}, mode={self.mode!r}"

    def normalized(self) -> tuple[Tensor, Tensor]:
        """L2-normalised rows ``(c+_hat (K, S), c-_hat (K, S))`` in float32 (differentiable)."""
        with fp32(self.pos):
            return F.normalize(self.pos.float(), dim=1), F.normalize(self.neg.float(), dim=1)

    @torch.no_grad()
    def set_memories(self, pos: Tensor, neg: Tensor) -> None:
        """Overwrite both memories with (K, S) tensors and clear the momentum bookkeeping."""
        for name, value in (("pos", pos), ("neg", neg)):
            if tuple(value.shape) != (self.k, self.dim):
                raise DataError(
                    f"memory {name}: expected shape {(self.k, self.dim)}, got {tuple(value.shape)}"
                )
            if not bool(torch.isfinite(value).all()):
                raise DataError(f"memory {name}: values contain NaN or Inf")
        self.pos.copy_(pos.float())
        self.neg.copy_(neg.float())
        if self.mode == "momentum":
            self.unused_steps.zero_()
            self.recent.zero_()
            self.recent_count.zero_()

    @torch.no_grad()
    def momentum_update(
        self, emb: Tensor, labels: Tensor, reduce_fn: ReduceFn | None = None
    ) -> None:
        """One momentum step over both memories (docs/METHOD.md §2.5, §7).

        Each embedding is assigned to the nearest (argmax cosine) component of its own class
        memory; per component ``c_k <- normalize(m * c_hat_k + (1 - m) * mean of assigned)``.
        The statistics ``(sums (2, K, S), counts (2, K))`` pass through ``reduce_fn`` before they are
        used, so under DDP every rank must call this method at every step (with M = 0 embeddings
        if it has none) and ``reduce_fn`` should all-reduce (sum) both tensors.

        Bookkeeping, from reduced statistics only: a class that received embeddings this step
        pushes the normalised sum of them into its ring buffer; its components that received none
        age by one step, the others reset; components aged ``dead_after`` are re-seeded from the
        most recent ring entries (the j-th dead component of a class gets the j-th most recent).

        Without ``reduce_fn``, when the kernel mode selects the fused kernels (see
        :mod:`momkd.kernels`), the whole step runs as one launch of
        :func:`momkd.kernels.align_momentum.momentum_step`; otherwise as separate statistics,
        apply and bookkeeping steps (the statistics and apply ops dispatch on their own).

        Parameters
        ----------
        emb : Tensor
            (M, S) teacher embeddings (normalised here).
        labels : Tensor
            (M,) int64 class of each embedding in {0, 1}.
        reduce_fn : callable, optional
            ``(sums, counts) -> (sums, counts)``, applied before the update.
        """
        if self.mode != "momentum":
            raise ConfigError(f"memory.update is {self.mode!r}: momentum updates are not allowed")
        if emb.dim() != 2 or emb.shape[1] != self.dim:
            raise DataError(
                f"momentum_update: expected embeddings (M, {self.dim}), got {tuple(emb.shape)}"
            )
        labels = labels.reshape(-1).to(self.pos.device, torch.int64)
        if labels.numel() != emb.shape[0]:
            raise DataError(
                f"momentum_update: {emb.shape[0]} embeddings but {labels.numel()} labels"
            )
        if bool(((labels != 0) & (labels != 1)).any()):
            raise DataError("momentum_update: labels must be 0 or 1")
        emb = emb.detach().to(self.pos.device)
        step = kernels.fused_impl("momentum_step", self.pos, emb) if reduce_fn is None else None
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
        with fp32(self.pos):
            e = F.normalize(emb.float(), dim=1)
            mems = torch.stack([self.neg, self.pos]).float()  # (2, K, S), index = label
            sums, counts = kernels.momentum_stats(F.normalize(mems, dim=-1), e, labels)
            if reduce_fn is not None:
                sums, counts = reduce_fn(sums, counts)
            new = kernels.momentum_apply(mems, sums, counts, self.momentum)

            seen = counts.sum(dim=1) > 0  # (2,) class received embeddings this step
            used = counts > 0  # (2, K)
            aged = torch.where(seen[:, None], self.unused_steps + 1, self.unused_steps)
            unused = torch.where(used, torch.zeros_like(aged), aged)

            rows = torch.arange(2, device=mems.device)
            slot = self.recent_count % self.ring_size
            class_emb = F.normalize(sums.sum(dim=1), dim=1)  # (2, S)
            self.recent[rows, slot] = torch.where(seen[:, None], class_emb, self.recent[rows, slot])
            self.recent_count += seen.to(torch.int64)

            filled = self.recent_count.clamp(max=self.ring_size)  # (2,)
            dead = (unused >= self.dead_after) & (filled[:, None] > 0)
            rank = (torch.cumsum(dead.to(torch.int64), dim=1) - 1).clamp_min(0)
            back = rank % filled.clamp_min(1)[:, None]
            idx = (self.recent_count[:, None] - 1 - back) % self.ring_size  # (2, K)
            seeds = self.recent[rows[:, None], idx]  # (2, K, S)
            new = torch.where(dead[..., None], seeds, new)
            unused = torch.where(dead, torch.zeros_like(unused), unused)

            self.neg.copy_(new[0])
            self.pos.copy_(new[1])
            self.unused_steps.copy_(unused)
