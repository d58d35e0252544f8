"""Memory kernels: dispatch between fused Triton kernels and the eager PyTorch reference.

The model calls the functions of this module only. The kernel mode (``train.kernels``, set with
:func:`set_kernel_mode` or the :func:`kernel_mode` context) decides, per call:

* ``eager``: always the eager reference (:mod:`momkd.kernels.reference`);
* ``auto`` (default): the fused Triton implementation when every input is on a CUDA device and the
  implementation loads (Triton imports), else the eager reference;
* ``triton``: always the fused implementation; CUDA inputs run compiled, CPU inputs run in Triton's
  interpreter, which must have been switched on with ``TRITON_INTERPRET=1`` before Triton was first
  imported. Anything else raises :class:`~momkd.errors.ConfigError`.

``MOMKD_FORCE_EAGER=1`` in the environment selects the eager reference in every mode.

The kernel precision (``train.kernel_precision``, set with :func:`set_kernel_precision` or the
:func:`kernel_precision` context) decides the input precision of the fused kernels' similarity
products (``<p_i, c_k>``, ``<z, c_k>``, embedding-to-memory assignment): ``ieee`` (fp32, arg-maxima
equal to an fp32 matmul's: the parity path), ``tf32`` or ``bf16`` (tensor cores, fp32
accumulation). The eager reference always computes in fp32. Tolerances against it are in
docs/KERNELS.md ("Kernel precision").

Fused implementations plug in by name: ``_FUSED_SOURCES`` maps an op to ``(module, attribute)`` and
the module is imported lazily on first use; :func:`register_fused` installs one explicitly. A fused
function must have the reference's signature and return the same values (up to per-dtype
tolerances) and gradients. A fallback to the reference on CUDA tensors is logged once per op and
reason. :func:`fused_impl` exposes the choice for ops without a reference of the same signature
(``momentum_step``, used by :meth:`momkd.memory.ClassMemory.momentum_update`).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from momkd.errors import ConfigError
from momkd.kernels import _triton_utils, reference
from momkd.kernels.reference import segment_ids

__all__ = [
    "KERNEL_MODES",
    "KERNEL_PRECISIONS",
    "align_loss",
    "batched_commitment_loss",
    "check_kernel_mode",
    "force_eager",
    "fused_available",
    "fused_impl",
    "get_kernel_mode",
    "get_kernel_precision",
    "kernel_mode",
    "kernel_precision",
    "memory_attention_pool",
    "momentum_apply",
    "momentum_stats",
    "reference",
    "register_fused",
    "segment_ids",
    "set_kernel_mode",
    "set_kernel_precision",
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
    "momentum_step": ("momkd.kernels.align_momentum", "momentum_step"),
}

#: Modes of ``train.kernels``.
KERNEL_MODES = ("auto", "triton", "eager")

#: Values of ``train.kernel_precision``.
KERNEL_PRECISIONS = _triton_utils.PRECISIONS

_REGISTERED: dict[str, Callable[..., Any]] = {}
_MODE = "auto"
_LOGGED: set[tuple[str, str]] = set()


def force_eager() -> bool:
    """True when the environment variable ``MOMKD_FORCE_EAGER`` asks for the eager reference."""
    return os.environ.get("MOMKD_FORCE_EAGER", "").strip().lower() in {"1", "true", "yes", "on"}


def register_fused(op: str, fn: Callable[..., Any]) -> None:
    """Install ``fn`` as the fused implementation of ``op`` (one of the dispatch function names)."""
    if op not in _FUSED_SOURCES:
        raise KeyError(f"unknown kernel op {op!r}; known: {sorted(_FUSED_SOURCES)}")
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
    except (ImportError, AttributeError, OSError, RuntimeError) as exc:
        logger.info("fused kernel %r unavailable (%s); using the eager reference", op, exc)
        return None
    return fn  # type: ignore[no-any-return]


def fused_available(op: str) -> bool:
    """Whether a fused implementation of ``op`` can be loaded (ignores the kernel mode)."""
    return _load_fused(op) is not None


def _log_once(op: str, reason: str) -> None:
    if (op, reason) not in _LOGGED:
        _LOGGED.add((op, reason))
        logger.warning("kernel %r: %s; using the eager reference", op, reason)


def _interpreter_active() -> bool:
    """Whether the Triton interpreter is on and the package's kernels were decorated under it."""
    from momkd.kernels._triton_utils import interpreting

    if not interpreting():
        return False
    try:
        from triton.runtime.interpreter import InterpretedFunction

        from momkd.kernels import memory_attention
    except (ImportError, AttributeError, OSError, RuntimeError):
        return False
    return isinstance(memory_attention._memory_attention_fwd_kernel, InterpretedFunction)


def _require_triton(device: torch.device) -> None:
    """Raise :class:`ConfigError` unless the fused kernels can run on ``device``."""
    if not fused_available("memory_attention_pool"):
        raise ConfigError("train.kernels: 'triton' requested but Triton cannot be imported")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"train.kernels: 'triton' requested on {device} but CUDA is unavailable"
            )
        return
    if device.type != "cpu":
        raise ConfigError(f"train.kernels: 'triton' supports CUDA and CPU tensors, not {device}")
    if not _interpreter_active():
        raise ConfigError(
            "train.kernels: 'triton' on CPU needs the Triton interpreter; set TRITON_INTERPRET=1 "
            "before starting Python"
        )


def get_kernel_mode() -> str:
    """The current kernel mode, one of :data:`KERNEL_MODES`."""
    return _MODE


def check_kernel_mode(mode: str, device: torch.device | str | None = None) -> None:
    """Check that ``mode`` is a kernel mode that can run on ``device``.

    Parameters
    ----------
    mode : str
        ``auto``, ``triton`` or ``eager`` (see the module docstring).
    device : torch.device or str, optional
        Device the run will use; with ``triton`` it is checked that the fused kernels can run there.

    Raises
    ------
    ConfigError
        An unknown mode, or ``triton`` where the kernels cannot run (no Triton, no CUDA, or CPU
        without ``TRITON_INTERPRET=1``).
    """
    if mode not in KERNEL_MODES:
        raise ConfigError(f"train.kernels must be one of {list(KERNEL_MODES)}, got {mode!r}")
    if mode == "triton" and device is not None:
        _require_triton(torch.device(device))


def set_kernel_mode(mode: str, device: torch.device | str | None = None) -> str:
    """Select the kernel path for all following calls (checked with :func:`check_kernel_mode`);
    returns the previous mode."""
    global _MODE
    check_kernel_mode(mode, device)
    previous, _MODE = _MODE, mode
    if mode == "triton" and force_eager():
        logger.warning("MOMKD_FORCE_EAGER=1 overrides train.kernels=triton")
    return previous


@contextlib.contextmanager
def kernel_mode(mode: str, device: torch.device | str | None = None) -> Iterator[None]:
    """Context manager form of :func:`set_kernel_mode`; the previous mode is restored on exit."""
    previous = set_kernel_mode(mode, device)
    try:
        yield
    finally:
        set_kernel_mode(previous)


def get_kernel_precision() -> str:
    """The current kernel precision, one of :data:`KERNEL_PRECISIONS`."""
    return _triton_utils._PRECISION[0]


def set_kernel_precision(precision: str) -> str:
    """Select the input precision of the fused kernels' similarity products for all following
    launches; returns the previous one.

    Raises
    ------
    ConfigError
        ``precision`` is not one of :data:`KERNEL_PRECISIONS`.
    """
    if precision not in KERNEL_PRECISIONS:
        raise ConfigError(
            f"train.kernel_precision must be one of {list(KERNEL_PRECISIONS)}, got {precision!r}"
        )
    previous = _triton_utils._PRECISION[0]
    _triton_utils._PRECISION[0] = precision
    return previous


@contextlib.contextmanager
def kernel_precision(precision: str) -> Iterator[None]:
    """Context manager form of :func:`set_kernel_precision`; the previous precision is restored."""
    previous = set_kernel_precision(precision)
    try:
        yield
    finally:
        set_kernel_precision(previous)


def fused_impl(op: str, *tensors: Tensor) -> Callable[..., Any] | None:
    """The fused implementation of ``op`` the kernel mode selects for ``tensors``, or ``None``
    when the eager reference applies.

    Raises
    ------
    ConfigError
        In ``triton`` mode, when the fused kernel cannot run on the tensors' device.
    """
    if _MODE == "eager" or force_eager():
        return None
    on_cuda = all(t.is_cuda for t in tensors)
    if _MODE == "auto":
        if not on_cuda:
            return None
        fn = _load_fused(op)
        if fn is None:
            _log_once(op, "no fused implementation could be loaded")
        return fn
    if not on_cuda:
        devices = {t.device for t in tensors}
        if len(devices) != 1:
            raise ConfigError(
                f"train.kernels: 'triton' needs all inputs of {op!r} on one device, got "
                f"{sorted(map(str, devices))}"
            )
        _require_triton(next(iter(devices)))
    fn = _load_fused(op)
    if fn is None:
        raise ConfigError(
            f"train.kernels: 'triton' requested but the fused {op!r} cannot be loaded"
        )
    return fn


def _pick(op: str, *tensors: Tensor) -> Callable[..., Any]:
    fn = fused_impl(op, *tensors)
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
