"""Memory kernels: dispatch between fused Triton kernels and the eager PyTorch reference.

The model calls the functions of this module only. Each picks, per call:

* the eager reference (:mod:`momkd.kernels.reference`) when ``MOMKD_FORCE_EAGER=1``, when any input
  is not on a CUDA device, or when no fused implementation can be loaded;
* otherwise the fused Triton implementation of the op.

Fused implementations plug in by name: ``_FUSED_SOURCES`` maps an op to ``(module, attribute)`` and
the module is imported lazily on first CUDA use; :func:`register_fused` installs one explicitly. A fused
function must have the reference's signature and return the same values (up to per-dtype
tolerances) and gradients. A fallback on CUDA tensors is logged once per op.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from collections.abc import Callable
from typing import Any

from torch import Tensor

from momkd.kernels import reference
from momkd.kernels.reference import segment_ids

__all__ = [
    "align_loss",
    "batched_commitment_loss",
    "force_eager",
    "fused_available",
    "memory_attention_pool",
    "momentum_apply",
    "momentum_stats",
    "reference",
    "register_fused",
    "segment_ids",
]

logger = logging.getLogger(__name__)

_REFERENCE: dict[str, Callable[..., Any]] = {
    "memory_attention_pool": reference.memory_attention_pool_reference,
    "align_loss": reference.align_loss_reference,
    "batched_commitment_loss": reference.batched_commitment_loss_reference,
    "momentum_stats": reference.momentum_stats_reference,
    "momentum_apply": reference.momentum_apply_reference,
}

_FUSED_SOURCES: dict[str, tuple[str, str]] = {
    "memory_attention_pool": ("momkd.kernels.memory_attention", "memory_attention_pool"),
    "align_loss": ("momkd.kernels.align_momentum", "align_loss"),
    "batched_commitment_loss": ("momkd.kernels.memory_attention", "batched_commitment_loss"),
    "momentum_stats": ("momkd.kernels.align_momentum", "momentum_stats"),
    "momentum_apply": ("momkd.kernels.align_momentum", "momentum_apply"),
}

_REGISTERED: dict[str, Callable[..., Any]] = {}


def force_eager() -> bool:
    """True when the environment variable ``MOMKD_FORCE_EAGER`` asks for the eager reference."""
    return os.environ.get("MOMKD_FORCE_EAGER", "").strip().lower() in {"1", "true", "yes", "on"}


def register_fused(op: str, fn: Callable[..., Any]) -> None:
    """Install ``fn`` as the fused implementation of ``op`` (one of the dispatch function names)."""
    if op not in _REFERENCE:
        raise KeyError(f"unknown kernel op {op!r}; known: {sorted(_REFERENCE)}")
    _REGISTERED[op] = fn
    _load_fused.cache_clear()


@functools.cache
def _load_fused(op: str) -> Callable[..., Any] | None:
    if op in _REGISTERED:
        return _REGISTERED[op]
    module_name, attr = _FUSED_SOURCES[op]
    try:
        importlib.import_module("triton")
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        logger.info("fused kernel %r unavailable (%s); using the eager reference", op, exc)
        return None
    return fn  # type: ignore[no-any-return]


def fused_available(op: str) -> bool:
    """Whether a fused implementation of ``op`` can be loaded (ignores ``MOMKD_FORCE_EAGER``)."""
    return _load_fused(op) is not None


def _pick(op: str, *tensors: Tensor) -> Callable[..., Any]:
    if force_eager() or not all(t.is_cuda for t in tensors):
        return _REFERENCE[op]
    fn = _load_fused(op)
    return fn if fn is not None else _REFERENCE[op]


def memory_attention_pool(
    patch_proj: Tensor,
    feats: Tensor,
    c_pos_hat: Tensor,
    c_neg_hat: Tensor,
    log_tau: Tensor,
    segment_offsets: Tensor,
    *,
    tau_min: float = 0.01,
    tau_max: float = 2.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Memory-guided attention pooling; see :func:`reference.memory_attention_pool_reference`.

    Shapes: patch_proj (N, S), feats (N, H), c_pos_hat / c_neg_hat (K, S), log_tau (),
    segment_offsets (B + 1,) -> pooled (B, H), attention (N,), score (N,), argmax_pos (N,),
    argmax_neg (N,).
    """
    fn = _pick("memory_attention_pool", patch_proj, feats, c_pos_hat, c_neg_hat)
    return fn(  # type: ignore[no-any-return]
        patch_proj,
        feats,
        c_pos_hat,
        c_neg_hat,
        log_tau,
        segment_offsets,
        tau_min=tau_min,
        tau_max=tau_max,
    )


def align_loss(
    z: Tensor,
    y: Tensor,
    c_pos_hat: Tensor,
    c_neg_hat: Tensor,
    margin: float = 0.3,
    scale: float = 20.0,
    temp: float = 5.0,
) -> Tensor:
    """Per-sample alignment loss; see :func:`reference.align_loss_reference`.

    Shapes: z (B, S), y (B,), c_pos_hat / c_neg_hat (K, S) -> (B,).
    """
    fn = _pick("align_loss", z, c_pos_hat, c_neg_hat)
    return fn(z, y, c_pos_hat, c_neg_hat, margin, scale, temp)  # type: ignore[no-any-return]


def batched_commitment_loss(
    p: Tensor, c_pos_raw: Tensor, c_neg_raw: Tensor, y: Tensor, segment_offsets: Tensor
) -> Tensor:
    """Commitment loss of B bags to their own class memories, averaged over bags; see
    :func:`reference.batched_commitment_loss_reference`.

    Shapes: p (N, S), c_pos_raw / c_neg_raw (K, S), y (B,), segment_offsets (B + 1,) -> ().
    """
    fn = _pick("batched_commitment_loss", p, c_pos_raw, c_neg_raw)
    return fn(p, c_pos_raw, c_neg_raw, y, segment_offsets)  # type: ignore[no-any-return]


def momentum_stats(mems_hat: Tensor, emb: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Assignment statistics for the momentum update; see :func:`reference.momentum_stats_reference`.

    Shapes: mems_hat (C, K, S), emb (M, S), labels (M,) -> sums (C, K, S), counts (C, K).
    """
    fn = _pick("momentum_stats", mems_hat, emb)
    return fn(mems_hat, emb, labels)  # type: ignore[no-any-return]


def momentum_apply(mems: Tensor, sums: Tensor, counts: Tensor, m: float) -> Tensor:
    """Momentum step from (reduced) statistics; see :func:`reference.momentum_apply_reference`.

    Shapes: mems (C, K, S), sums (C, K, S), counts (C, K) -> (C, K, S).
    """
    fn = _pick("momentum_apply", mems, sums, counts)
    return fn(mems, sums, counts, m)  # type: ignore[no-any-return]
