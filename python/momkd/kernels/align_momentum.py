"""Fused alignment loss and momentum-memory update (docs/METHOD.md §2.4, §2.5, §7).

Alignment loss, per embedding z_b with label y_b (s = +1 for y = 1, -1 for y = 0)::

    phi(z, C)  = (1/T) log sum_k exp(T <z, c_k>)
    Delta(z)   = phi(z, C+) - phi(z, C-)
    L_b        = softplus(scale * (margin - s * Delta(z_b)))

``_align_loss_fwd_kernel`` computes L for a tile of embeddings with the similarities in registers;
``_align_loss_bwd_kernel`` recomputes them and produces dz and the gradients of both (normalised)
memories in one program that sweeps the batch (B is a batch of bags: small), so the memory
gradients are reduced deterministically without atomics.

Momentum update (``memory.update: momentum``): every embedding is assigned to the most similar
component (argmax cosine, ties -> lowest index) of its own class memory and, for every component
that received embeddings, ``c_k <- normalize(m * c_hat_k + (1 - m) * mean of assigned)``.

* ``momentum_stats`` / ``momentum_apply``: the two halves with the statistics ``(sums, counts)``
  materialised in between, so data-parallel ranks can all-reduce them (docs/METHOD.md §7);
* ``momentum_step``: everything of :meth:`momkd.memory.ClassMemory.momentum_update` without a
  reduction — assignment, statistics, EMA, dead-component ageing, the ring buffer of recent class
  embeddings and re-seeding — in one launch, one program per class memory, in place.

All arithmetic is fp32.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from momkd.errors import DataError
from momkd.kernels._dot import sim_dot
from momkd.kernels._triton_utils import block_size, interpreting, precision_code

__all__ = ["align_loss", "momentum_apply", "momentum_stats", "momentum_step"]

_EPS = 1e-12  # F.normalize's eps


# --------------------------------------------------------------------------------------------------
# shared device helpers
# --------------------------------------------------------------------------------------------------


@triton.jit
def _log1p(t):
    """log(1 + t) for t >= 0, accurate for tiny t (Goldberg's trick; no libdevice needed)."""
    u = 1.0 + t
    d = tl.where(u == 1.0, 1.0, u - 1.0)
    return tl.where(u == 1.0, t, tl.log(u) * (t / d))


@triton.jit
def _memory_sims(
    x_ptr,  # (R, S) rows, any float dtype
    rows,
    rmask,
    cpos_ptr,  # (K, S) fp32
    cneg_ptr,  # (K, S) fp32
    ks,
    kmask,
    S,
    PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_SC: tl.constexpr,
):
    """<x_r, c+_k> and <x_r, c-_k> as (BLOCK_R, BLOCK_K) fp32 tiles, summed over S in chunks of
    BLOCK_SC columns (only chunks of x and of the memories are live: no spills at any K, S)."""
    sim_pos = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
    sim_neg = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
    for s0 in range(0, S, BLOCK_SC):
        cs = s0 + tl.arange(0, BLOCK_SC)
        csmask = cs < S
        x = tl.load(
            x_ptr + rows[:, None] * S + cs[None, :],
            mask=rmask[:, None] & csmask[None, :],
            other=0.0,
        ).to(tl.float32)
        c_off = ks[None, :] * S + cs[:, None]  # (BLOCK_SC, BLOCK_K): the transposed memory
        cmask = csmask[:, None] & kmask[None, :]
        sim_pos = sim_dot(x, tl.load(cpos_ptr + c_off, mask=cmask, other=0.0), sim_pos, PRECISION)
        sim_neg = sim_dot(x, tl.load(cneg_ptr + c_off, mask=cmask, other=0.0), sim_neg, PRECISION)
    return sim_pos, sim_neg


@triton.jit
def _soft_max_sim(sim, kmask, temp):
    """phi and softmax weights of (BLOCK_B, BLOCK_K) similarities <z, c_k>."""
    t = temp * sim
    t = tl.where(kmask[None, :], t, float("-inf"))
    mx = tl.max(t, axis=1)
    e = tl.exp(t - mx[:, None])
    se = tl.sum(e, axis=1)
    phi = (mx + tl.log(se)) / temp
    return phi, e / se[:, None]


@triton.jit
def _normalize_rows(x):
    """F.normalize(x, dim=1) of a 2-D fp32 tile."""
    norm = tl.sqrt(tl.sum(x * x, axis=1))
    return x / tl.maximum(norm, 1e-12)[:, None]


@triton.jit
def _momentum_accumulate(
    mem_ptr,  # (K, S) fp32 memory of class ``cls`` (normalised unless NORMALIZE)
    emb_ptr,  # (M, S) embeddings
    label_ptr,  # (M,) int64
    cls,
    M,
    K,
    S,
    NORMALIZE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_SC: tl.constexpr,
):
    """Sums (BLOCK_K, BLOCK_S) and counts (BLOCK_K,) of class-``cls`` embeddings per component.

    With NORMALIZE the embeddings and the memory rows are L2-normalised first (F.normalize). The
    similarities are summed over S chunks straight from memory, so the memory itself is never held
    in registers; the row scale of an embedding does not change its arg-max and is left out there.
    """
    ks = tl.arange(0, BLOCK_K)
    kmask = ks < K
    inv_norm = tl.full([BLOCK_K], 1.0, tl.float32)
    if NORMALIZE:
        sq = tl.zeros([BLOCK_K], dtype=tl.float32)
        for s0 in range(0, S, BLOCK_SC):
            cs = s0 + tl.arange(0, BLOCK_SC)
            c = tl.load(
                mem_ptr + ks[:, None] * S + cs[None, :],
                mask=kmask[:, None] & (cs < S)[None, :],
                other=0.0,
            )
            sq += tl.sum(c * c, axis=1)
        inv_norm = 1.0 / tl.maximum(tl.sqrt(sq), 1e-12)
    cols = tl.arange(0, BLOCK_S)
    smask = cols < S
    sums = tl.zeros([BLOCK_K, BLOCK_S], dtype=tl.float32)
    counts = tl.zeros([BLOCK_K], dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        valid = rows < M
        lab = tl.load(label_ptr + rows, mask=valid, other=-1)
        mine = valid & (lab == cls)
        sim = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
        for s0 in range(0, S, BLOCK_SC):
            cs = s0 + tl.arange(0, BLOCK_SC)
            csmask = cs < S
            e = tl.load(
                emb_ptr + rows[:, None] * S + cs[None, :],
                mask=mine[:, None] & csmask[None, :],
                other=0.0,
            ).to(tl.float32)
            c_t = tl.load(
                mem_ptr + ks[None, :] * S + cs[:, None],
                mask=csmask[:, None] & kmask[None, :],
                other=0.0,
            )
            sim = sim_dot(e, c_t, sim, PRECISION)
        sim = tl.where(kmask[None, :], sim * inv_norm[None, :], float("-inf"))
        _, arg = tl.max(sim, axis=1, return_indices=True, return_indices_tie_break_left=True)
        onehot = tl.where(mine[:, None] & (ks[None, :] == arg[:, None]), 1.0, 0.0)
        e = tl.load(
            emb_ptr + rows[:, None] * S + cols[None, :],
            mask=mine[:, None] & smask[None, :],
            other=0.0,
        ).to(tl.float32)
        if NORMALIZE:
            e = _normalize_rows(e)
        sums += tl.dot(tl.trans(onehot), e, input_precision="ieee")
        counts += tl.sum(onehot, axis=0)
    return sums, counts


@triton.jit
def _momentum_mix(mem, sums, counts, m, one_minus_m):
    """normalize(m * c_hat + (1 - m) * mean) where counted, else the memory row unchanged."""
    c_hat = _normalize_rows(mem)
    mean = sums / tl.maximum(counts, 1.0)[:, None]
    upd = _normalize_rows(m * c_hat + one_minus_m * mean)
    return tl.where(counts[:, None] > 0, upd, mem)


# --------------------------------------------------------------------------------------------------
# alignment loss kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _align_loss_fwd_kernel(
    z_ptr,  # (B, S) embeddings, any float dtype
    y_ptr,  # (B,) int64 labels in {0, 1}
    cpos_ptr,  # (K, S) fp32 normalised positive memory
    cneg_ptr,  # (K, S) fp32 normalised negative memory
    loss_ptr,  # out (B,) fp32
    B,
    K,
    S,
    margin,
    scale,
    temp,
    PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_SC: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    ks = tl.arange(0, BLOCK_K)
    kmask = ks < K
    sim_pos, sim_neg = _memory_sims(
        z_ptr, rows, rmask, cpos_ptr, cneg_ptr, ks, kmask, S,
        PRECISION=PRECISION, BLOCK_R=BLOCK_B, BLOCK_K=BLOCK_K, BLOCK_SC=BLOCK_SC,
    )  # fmt: skip
    phi_pos, _ = _soft_max_sim(sim_pos, kmask, temp)
    phi_neg, _ = _soft_max_sim(sim_neg, kmask, temp)
    sign = 2.0 * tl.load(y_ptr + rows, mask=rmask, other=0).to(tl.float32) - 1.0
    x = scale * (margin - sign * (phi_pos - phi_neg))
    loss = tl.maximum(x, 0.0) + _log1p(tl.exp(-tl.abs(x)))
    tl.store(loss_ptr + rows, loss, mask=rmask)


@triton.jit
def _align_loss_bwd_kernel(
    z_ptr,  # (B, S) embeddings
    y_ptr,  # (B,) int64
    cpos_ptr,  # (K, S) fp32
    cneg_ptr,  # (K, S) fp32
    dloss_ptr,  # (B,) fp32 gradient of the per-sample loss
    dz_ptr,  # out (B, S) in the dtype of z
    dcpos_ptr,  # out (K, S) fp32
    dcneg_ptr,  # out (K, S) fp32
    B,
    K,
    S,
    margin,
    scale,
    temp,
    PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_SC: tl.constexpr,
    BLOCK_SO: tl.constexpr,
):
    # One program per chunk of BLOCK_SO columns of dz and of the memory gradients. Each program
    # recomputes the (small: B x K) softmax weights from the whole rows instead of holding the
    # memories, and sweeps the batch, so the memory gradients are reduced without atomics.
    cols = tl.program_id(0) * BLOCK_SO + tl.arange(0, BLOCK_SO)
    smask = cols < S
    ks = tl.arange(0, BLOCK_K)
    kmask = ks < K
    cmask = kmask[:, None] & smask[None, :]
    c_off = ks[:, None] * S + cols[None, :]
    acc_pos = tl.zeros([BLOCK_K, BLOCK_SO], dtype=tl.float32)
    acc_neg = tl.zeros([BLOCK_K, BLOCK_SO], dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        rmask = rows < B
        sim_pos, sim_neg = _memory_sims(
            z_ptr, rows, rmask, cpos_ptr, cneg_ptr, ks, kmask, S,
            PRECISION=PRECISION, BLOCK_R=BLOCK_B, BLOCK_K=BLOCK_K, BLOCK_SC=BLOCK_SC,
        )  # fmt: skip
        phi_pos, w_pos = _soft_max_sim(sim_pos, kmask, temp)
        phi_neg, w_neg = _soft_max_sim(sim_neg, kmask, temp)
        sign = 2.0 * tl.load(y_ptr + rows, mask=rmask, other=0).to(tl.float32) - 1.0
        x = scale * (margin - sign * (phi_pos - phi_neg))
        sig = 1.0 / (1.0 + tl.exp(-x))  # d softplus / dx
        g = tl.load(dloss_ptr + rows, mask=rmask, other=0.0) * sig * (-scale) * sign  # dL/dDelta
        gp = g[:, None] * w_pos  # (BLOCK_B, BLOCK_K) dL/d<z, c+_k>
        gn = g[:, None] * w_neg
        cpos = tl.load(cpos_ptr + c_off, mask=cmask, other=0.0)
        cneg = tl.load(cneg_ptr + c_off, mask=cmask, other=0.0)
        dz = tl.dot(gp, cpos, input_precision="ieee") - tl.dot(gn, cneg, input_precision="ieee")
        zmask = rmask[:, None] & smask[None, :]
        tl.store(
            dz_ptr + rows[:, None] * S + cols[None, :], dz.to(dz_ptr.dtype.element_ty), mask=zmask
        )
        z = tl.load(z_ptr + rows[:, None] * S + cols[None, :], mask=zmask, other=0.0).to(tl.float32)
        acc_pos += tl.dot(tl.trans(gp), z, input_precision="ieee")
        acc_neg -= tl.dot(tl.trans(gn), z, input_precision="ieee")
    tl.store(dcpos_ptr + c_off, acc_pos, mask=cmask)
    tl.store(dcneg_ptr + c_off, acc_neg, mask=cmask)


# --------------------------------------------------------------------------------------------------
# momentum kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _momentum_stats_kernel(
    mems_hat_ptr,  # (C, K, S) fp32 normalised memories, index = class
    emb_ptr,  # (M, S) normalised embeddings
    label_ptr,  # (M,) int64 class of each embedding
    sums_ptr,  # out (C, K, S) fp32
    counts_ptr,  # out (C, K) fp32
    M,
    K,
    S,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_SC: tl.constexpr,
):
    cls = tl.program_id(0)
    cols = tl.arange(0, BLOCK_S)
    ks = tl.arange(0, BLOCK_K)
    cmask = (ks < K)[:, None] & (cols < S)[None, :]
    offs = cls * K * S + ks[:, None] * S + cols[None, :]
    sums, counts = _momentum_accumulate(
        mems_hat_ptr + cls * K * S, emb_ptr, label_ptr, cls, M, K, S,
        NORMALIZE=False, PRECISION=PRECISION, BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, BLOCK_S=BLOCK_S,
        BLOCK_SC=BLOCK_SC,
    )  # fmt: skip
    tl.store(sums_ptr + offs, sums, mask=cmask)
    tl.store(counts_ptr + cls * K + ks, counts, mask=ks < K)


@triton.jit
def _momentum_apply_kernel(
    mems_ptr,  # (C, K, S) fp32 raw memories
    sums_ptr,  # (C, K, S) fp32
    counts_ptr,  # (C, K) fp32
    out_ptr,  # out (C, K, S) fp32
    K,
    S,
    m,
    one_minus_m,
    BLOCK_K: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    cls = tl.program_id(0)
    cols = tl.arange(0, BLOCK_S)
    ks = tl.arange(0, BLOCK_K)
    kmask = ks < K
    cmask = kmask[:, None] & (cols < S)[None, :]
    offs = cls * K * S + ks[:, None] * S + cols[None, :]
    mem = tl.load(mems_ptr + offs, mask=cmask, other=0.0)
    sums = tl.load(sums_ptr + offs, mask=cmask, other=0.0)
    counts = tl.load(counts_ptr + cls * K + ks, mask=kmask, other=0.0)
    tl.store(out_ptr + offs, _momentum_mix(mem, sums, counts, m, one_minus_m), mask=cmask)


@triton.jit
def _momentum_step_kernel(
    neg_ptr,  # (K, S) fp32 raw negative memory, updated in place
    pos_ptr,  # (K, S) fp32 raw positive memory, updated in place
    unused_ptr,  # (2, K) int64 steps since each component was last assigned, in place
    recent_ptr,  # (2, R, S) fp32 ring buffer of recent class embeddings, in place
    recent_count_ptr,  # (2,) int64 entries ever written to each ring, in place
    emb_ptr,  # (M, S) embeddings (normalised here)
    label_ptr,  # (M,) int64 class of each embedding in {0, 1}
    M,
    K,
    S,
    R,
    dead_after,
    m,
    one_minus_m,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_SC: tl.constexpr,
):
    cls = tl.program_id(0)
    cols = tl.arange(0, BLOCK_S)
    smask = cols < S
    ks = tl.arange(0, BLOCK_K)
    kmask = ks < K
    cmask = kmask[:, None] & smask[None, :]
    offs = ks[:, None] * S + cols[None, :]
    if cls == 0:
        sums, counts = _momentum_accumulate(
            neg_ptr, emb_ptr, label_ptr, cls, M, K, S,
            NORMALIZE=True, PRECISION=PRECISION, BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K,
            BLOCK_S=BLOCK_S, BLOCK_SC=BLOCK_SC,
        )  # fmt: skip
        mem = tl.load(neg_ptr + offs, mask=cmask, other=0.0)
    else:
        sums, counts = _momentum_accumulate(
            pos_ptr, emb_ptr, label_ptr, cls, M, K, S,
            NORMALIZE=True, PRECISION=PRECISION, BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K,
            BLOCK_S=BLOCK_S, BLOCK_SC=BLOCK_SC,
        )  # fmt: skip
        mem = tl.load(pos_ptr + offs, mask=cmask, other=0.0)
    new = _momentum_mix(mem, sums, counts, m, one_minus_m)

    # Bookkeeping, in the order of ClassMemory.momentum_update.
    seen = tl.sum(counts, axis=0) > 0
    unused = tl.load(unused_ptr + cls * K + ks, mask=kmask, other=0)
    unused = tl.where(seen, unused + 1, unused)
    unused = tl.where(counts > 0, 0, unused)

    count_old = tl.load(recent_count_ptr + cls)
    slot = count_old % R
    class_sum = tl.sum(sums, axis=0)
    class_emb = class_sum / tl.maximum(tl.sqrt(tl.sum(class_sum * class_sum, axis=0)), 1e-12)
    count_new = count_old + seen.to(tl.int64)
    filled = tl.minimum(count_new, R)
    # Scalar conditions enter masks as "ks < bound": the interpreter turns "tensor & scalar" into
    # int64.
    dead = (unused >= dead_after) & (ks < tl.where(filled > 0, K, 0))
    rank = tl.maximum(tl.cumsum(dead.to(tl.int64), axis=0) - 1, 0)
    back = rank % tl.maximum(filled, 1)
    idx = tl.where(dead, count_new - 1 - back, 0) % R
    # The ring entry written this step is taken from registers, so no load waits on the store.
    seeds = tl.load(
        recent_ptr + cls * R * S + idx[:, None] * S + cols[None, :],
        mask=dead[:, None] & smask[None, :],
        other=0.0,
    )
    fresh = idx == tl.where(seen, slot, -1)
    seeds = tl.where(fresh[:, None], class_emb[None, :], seeds)
    new = tl.where(dead[:, None], seeds, new)
    unused = tl.where(dead, 0, unused)

    if cls == 0:
        tl.store(neg_ptr + offs, new, mask=cmask)
    else:
        tl.store(pos_ptr + offs, new, mask=cmask)
    tl.store(unused_ptr + cls * K + ks, unused, mask=kmask)
    tl.store(
        recent_ptr + cls * R * S + slot * S + cols, class_emb, mask=cols < tl.where(seen, S, 0)
    )
    tl.store(recent_count_ptr + cls, count_new)


# --------------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------------


def _momentum_blocks(k: int, s: int) -> dict[str, int]:
    """Tiles, warps and register ceiling of ``_momentum_stats_kernel`` and ``_momentum_step_kernel``.

    A program holds a class's (K, S) statistics and memory update in registers; there is one
    program per class, so occupancy is irrelevant and ``maxnreg=255`` lets ptxas use the whole
    register file instead of its occupancy-driven target (64-96 registers on sm_90, which spilled
    4-16 bytes at K = 64). ``benches/kernel_aot.py`` checks that these choices compile without
    register spills.
    """
    block_k, block_s = block_size(k), block_size(s)
    return {
        "BLOCK_M": 16,
        "BLOCK_K": block_k,
        "BLOCK_S": block_s,
        "BLOCK_SC": _block_sc(s),
        "num_warps": 8 if block_k * block_s >= 2048 else 4,
        "maxnreg": 255,
    }


def _block_b(b: int) -> int:
    return block_size(b, maximum=16 if interpreting() else 64)


def _block_sc(s: int) -> int:
    """Columns per chunk of the similarity sums over S (``BLOCK_SC``); 16, the smallest tile
    ``tl.dot`` takes, keeps the fp32 FMA products' operands small."""
    return min(block_size(s), 16)


def _align_bwd_blocks(b: int, k: int, s: int) -> dict[str, int]:
    """Tiles, warps and grid width of ``_align_loss_bwd_kernel``: one program per BLOCK_SO columns.

    ``benches/kernel_aot.py`` checks that these choices compile without register spills.
    """
    block_k = block_size(k)
    return {
        "BLOCK_B": _block_b(b),
        "BLOCK_K": block_k,
        "BLOCK_SC": _block_sc(s),
        "BLOCK_SO": 16,
        "num_warps": 4 if block_k <= 16 else 8,
    }


class _AlignLoss(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        z: torch.Tensor,
        y: torch.Tensor,
        c_pos_hat: torch.Tensor,
        c_neg_hat: torch.Tensor,
        margin: float,
        scale: float,
        temp: float,
    ) -> torch.Tensor:
        b, s = z.shape
        k = c_pos_hat.shape[0]
        loss = torch.empty(b, dtype=torch.float32, device=z.device)
        if b > 0:
            block_b = _block_b(b)
            _align_loss_fwd_kernel[(triton.cdiv(b, block_b),)](
                z, y, c_pos_hat, c_neg_hat, loss, b, k, s, margin, scale, temp,
                PRECISION=precision_code(), BLOCK_B=block_b, BLOCK_K=block_size(k),
                BLOCK_SC=_block_sc(s), num_warps=4,
            )  # fmt: skip
        ctx.precision = precision_code()
        ctx.save_for_backward(z, y, c_pos_hat, c_neg_hat)
        ctx.consts = (margin, scale, temp)
        return loss

    @staticmethod
    def backward(ctx: Any, d_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        z, y, c_pos, c_neg = ctx.saved_tensors
        margin, scale, temp = ctx.consts
        b, s = z.shape
        k = c_pos.shape[0]
        dz = torch.empty_like(z)
        d_pos = torch.empty((k, s), dtype=torch.float32, device=z.device)
        d_neg = torch.empty((k, s), dtype=torch.float32, device=z.device)
        blocks = _align_bwd_blocks(b, k, s)
        _align_loss_bwd_kernel[(triton.cdiv(s, blocks["BLOCK_SO"]),)](
            z, y, c_pos, c_neg, d_loss.to(torch.float32).contiguous(), dz, d_pos, d_neg,
            b, k, s, margin, scale, temp, PRECISION=ctx.precision, **blocks,
        )  # fmt: skip
        return dz, None, d_pos, d_neg, None, None, None


def align_loss(
    z: torch.Tensor,
    y: torch.Tensor,
    c_pos_hat: torch.Tensor,
    c_neg_hat: torch.Tensor,
    margin: float = 0.3,
    scale: float = 20.0,
    temp: float = 5.0,
) -> torch.Tensor:
    """Per-sample alignment loss ``softplus(scale * (margin - s * Delta(z)))`` (fused kernels).

    Parameters
    ----------
    z
        ``(B, S)`` normalised embeddings (z_o or z_w).
    y
        ``(B,)`` int64 labels in {0, 1}; s = +1 for y = 1, -1 for y = 0.
    c_pos_hat, c_neg_hat
        ``(K, S)`` normalised memory rows; they receive gradients (no stop-gradient).
    margin, scale, temp
        0.3, 20 and 5 by default; the loss is not divided by ``scale``.

    Returns
    -------
    Tensor
        ``(B,)`` float32 loss per sample; differentiable with respect to ``z``, ``c_pos_hat`` and
        ``c_neg_hat``.

    Raises
    ------
    DataError
        On mismatched shapes.
    """
    if z.dim() != 2 or y.shape != (z.shape[0],):
        raise DataError(
            f"align_loss: expected z (B, S) and y (B,), got {tuple(z.shape)} and {tuple(y.shape)}"
        )
    if (
        c_pos_hat.dim() != 2
        or c_pos_hat.shape != c_neg_hat.shape
        or c_pos_hat.shape[1] != z.shape[1]
    ):
        raise DataError(
            f"align_loss: expected memories (K, {z.shape[1]}), got {tuple(c_pos_hat.shape)} and "
            f"{tuple(c_neg_hat.shape)}"
        )
    loss: torch.Tensor = _AlignLoss.apply(
        z.contiguous(),
        y.to(device=z.device, dtype=torch.int64).contiguous(),
        c_pos_hat.to(torch.float32).contiguous(),
        c_neg_hat.to(torch.float32).contiguous(),
        float(margin),
        float(scale),
        float(temp),
    )
    return loss


def _check_memories(mems: torch.Tensor, name: str) -> tuple[int, int, int]:
    if mems.dim() != 3:
        raise DataError(f"{name}: expected stacked memories (C, K, S), got {tuple(mems.shape)}")
    c, k, s = mems.shape
    return c, k, s


@torch.no_grad()
def momentum_stats(
    mems_hat: torch.Tensor, emb: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-component sums and counts of the embeddings assigned to their own class memory.

    Embedding m goes to ``argmax_k <emb_m, mems_hat[labels_m, k]>`` (ties -> lowest k). One
    launch, one program per class, no atomics (deterministic).

    Parameters
    ----------
    mems_hat
        ``(C, K, S)`` normalised class memories (index = class label).
    emb
        ``(M, S)`` normalised embeddings (M may be 0).
    labels
        ``(M,)`` int64 class of each embedding in ``[0, C)``.

    Returns
    -------
    sums
        ``(C, K, S)`` float32.
    counts
        ``(C, K)`` float32.
    """
    c, k, s = _check_memories(mems_hat, "momentum_stats: mems_hat")
    if emb.dim() != 2 or emb.shape[1] != s or labels.shape != (emb.shape[0],):
        raise DataError(
            f"momentum_stats: expected emb (M, {s}) and labels (M,), got {tuple(emb.shape)} and "
            f"{tuple(labels.shape)}"
        )
    dev = mems_hat.device
    sums = torch.empty((c, k, s), dtype=torch.float32, device=dev)
    counts = torch.empty((c, k), dtype=torch.float32, device=dev)
    _momentum_stats_kernel[(c,)](
        mems_hat.to(torch.float32).contiguous(), emb.contiguous(),
        labels.to(device=dev, dtype=torch.int64).contiguous(), sums, counts,
        emb.shape[0], k, s, PRECISION=precision_code(), **_momentum_blocks(k, s),
    )  # fmt: skip
    return sums, counts


@torch.no_grad()
def momentum_apply(
    mems: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor, m: float
) -> torch.Tensor:
    """Momentum step ``c_k <- normalize(m * c_hat_k + (1 - m) * mean_k)`` for assigned components.

    Parameters
    ----------
    mems
        ``(C, K, S)`` current raw memories.
    sums, counts
        ``(C, K, S)`` and ``(C, K)`` statistics of :func:`momentum_stats` (possibly all-reduced).
    m
        Momentum in [0, 1).

    Returns
    -------
    Tensor
        ``(C, K, S)`` float32 new memories; rows with zero count are returned unchanged.
    """
    c, k, s = _check_memories(mems, "momentum_apply: mems")
    if sums.shape != mems.shape or counts.shape != (c, k):
        raise DataError(
            f"momentum_apply: expected sums {tuple(mems.shape)} and counts {(c, k)}, got "
            f"{tuple(sums.shape)} and {tuple(counts.shape)}"
        )
    out = torch.empty((c, k, s), dtype=torch.float32, device=mems.device)
    _momentum_apply_kernel[(c,)](
        mems.to(torch.float32).contiguous(), sums.to(torch.float32).contiguous(),
        counts.to(torch.float32).contiguous(), out, k, s, float(m), 1.0 - float(m),
        BLOCK_K=block_size(k), BLOCK_S=block_size(s), num_warps=4,
    )  # fmt: skip
    return out


@torch.no_grad()
def momentum_step(
    pos: torch.Tensor,
    neg: torch.Tensor,
    unused_steps: torch.Tensor,
    recent: torch.Tensor,
    recent_count: torch.Tensor,
    emb: torch.Tensor,
    labels: torch.Tensor,
    m: float,
    dead_after: int,
) -> None:
    """One complete momentum update of both class memories, in place, in a single launch.

    Equals :meth:`momkd.memory.ClassMemory.momentum_update` without ``reduce_fn``: embeddings are
    normalised, assigned to the nearest component of their own class memory, the assigned
    components move by EMA; a class that received embeddings pushes their normalised sum into its
    ring buffer, its unassigned components age by one step and the assigned ones reset; components
    aged ``dead_after`` are re-seeded from the ring (the j-th dead component of a class from the
    j-th most recent entry).

    Parameters
    ----------
    pos, neg
        ``(K, S)`` float32 raw memories C+ and C-, contiguous; updated in place.
    unused_steps
        ``(2, K)`` int64 (row 0 = negative class); updated in place.
    recent
        ``(2, R, S)`` float32 ring buffers; updated in place.
    recent_count
        ``(2,)`` int64 entries ever written to each ring; updated in place.
    emb
        ``(M, S)`` teacher embeddings (any float dtype).
    labels
        ``(M,)`` int64 class of each embedding in {0, 1}.
    m
        Momentum in [0, 1).
    dead_after
        Steps without assignment after which a component is re-seeded (>= 1).
    """
    k, s = pos.shape
    r = recent.shape[1]
    state = {
        "neg": (neg, torch.float32, (k, s)),
        "unused_steps": (unused_steps, torch.int64, (2, k)),
        "recent": (recent, torch.float32, (2, r, s)),
        "recent_count": (recent_count, torch.int64, (2,)),
    }
    if pos.dtype != torch.float32 or not pos.is_contiguous():
        raise DataError("momentum_step: pos must be a contiguous float32 tensor")
    for name, (t, dtype, shape) in state.items():
        if (
            t.dtype != dtype
            or tuple(t.shape) != shape
            or not t.is_contiguous()
            or t.device != pos.device
        ):
            raise DataError(
                f"momentum_step: {name} must be a contiguous {dtype} tensor of shape {shape} on "
                f"{pos.device}, got {t.dtype} {tuple(t.shape)} on {t.device}"
            )
    if emb.dim() != 2 or emb.shape[1] != s or labels.shape != (emb.shape[0],):
        raise DataError(
            f"momentum_step: expected emb (M, {s}) and labels (M,), got {tuple(emb.shape)} and "
            f"{tuple(labels.shape)}"
        )
    _momentum_step_kernel[(2,)](
        neg, pos, unused_steps, recent, recent_count,
        emb.to(pos.device).contiguous(),
        labels.to(device=pos.device, dtype=torch.int64).contiguous(),
        emb.shape[0], k, s, r, int(dead_after), float(m), 1.0 - float(m),
        PRECISION=precision_code(), **_momentum_blocks(k, s),
    )  # fmt: skip
