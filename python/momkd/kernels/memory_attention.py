"""Fused memory-guided attention pooling over a batch of bags (docs/METHOD.md §2.3, §2.4 commitment).

For every patch ``i`` of bag ``b`` (rows ``offsets[b]:offsets[b+1]``)::

    score_i = max_k <p_i, sg(c+_k)> - max_k <p_i, sg(c-_k)>        (hard max, memories detached)
    tau     = clamp(exp(log_tau), tau_min, tau_max)
    a_i     = softmax over the bag of score_i / tau
    V_b     = sum_i a_i F_i

and, optionally, the commitment loss against each bag's own-class raw memory ``C^y``::

    k*_i     = argmin_k ||p_i - c^y_k||            (raw rows, ties -> lowest index)
    commit_b = mean over the bag's P x S entries of (p_i - sg(c^y_{k*_i}))^2

Layout of the computation (flash-decoding style, so that a single large bag still fills the GPU):

1. ``_memory_attention_fwd_kernel``: one program per chunk of ``BLOCK_N`` rows of one bag. It
   computes the similarities to both memories in registers (never an ``N x 2K`` tensor in memory),
   the score and arg-maxima, the chunk's softmax statistics (max, sum of exponentials) and the
   chunk's un-normalised pooled vector, plus the commitment partial sums.
2. ``_memory_attention_combine_kernel``: one program per (bag, feature tile) merges the chunk
   statistics (online-softmax rescaling) into ``V_b`` and the bag's softmax max/normaliser.
3. ``_memory_attention_norm_kernel``: one program per chunk writes the attention weights.

The backward pass reads ``F`` once and writes ``dF`` once (``_memory_attention_bwd_kernel``); it
needs one scalar per bag, ``D_b = sum_i a_i dL/da_i``, obtained from ``V_b . dL/dV_b`` plus (when
the attention output itself receives a gradient) ``_segment_dot_kernel``.

The commitment term also exists on its own (:func:`batched_commitment_loss`, kernels
``_commitment_fwd_kernel`` / ``_chunk_mean_kernel`` / ``_commitment_bwd_kernel``) with the signature of
:func:`momkd.losses.batched_commitment_loss`, for callers that compute it apart from the pooling.

All arithmetic is fp32; fp16/bf16 ``patch_proj``/``feats`` are up-cast on load and gradients are
returned in the input dtypes. Float outputs are float32, like the eager reference's.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from momkd.errors import DataError
from momkd.kernels._dot import sim_dot
from momkd.kernels._triton_utils import (
    block_size,
    chunk_map,
    interpreting,
    precision_code,
    validate_offsets,
)

__all__ = ["batched_commitment_loss", "memory_attention_pool", "memory_attention_pool_commit"]


# --------------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _chunk_rows(chunk_bag_ptr, chunk_start_ptr, off_ptr, B, BLOCK_N: tl.constexpr):
    """This program's rows: (bag clamped to B-1, row ids, row mask, bag start, bag end)."""
    pid = tl.program_id(0)
    bag = tl.load(chunk_bag_ptr + pid)
    active = bag < B
    bag = tl.minimum(bag, B - 1)
    lo = tl.load(off_ptr + bag)
    hi = tl.load(off_ptr + bag + 1)
    first_chunk = tl.load(chunk_start_ptr + bag)
    rows = lo + (pid - first_chunk) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    # Idle programs get an empty row range (a comparison rather than "& active": the interpreter
    # promotes a scalar boolean to int64 in "&").
    hi = tl.where(active, hi, lo)
    rmask = rows < hi
    return bag, rows, rmask, lo, hi


@triton.jit
def _nearest_raw(p, c_ptr, K, S, cols, smask, BLOCK_N: tl.constexpr):
    """Squared distance to, and index of, the nearest row of the (K, S) fp32 memory at ``c_ptr``.

    ``p`` is a (BLOCK_N, BLOCK_S) fp32 tile. Exact squared differences rather than
    ``|c|^2 - 2 <p, c>`` keep the distances accurate; strict "<" keeps the lowest index on ties.
    """
    best = tl.full([BLOCK_N], float("inf"), tl.float32)
    best_k = tl.zeros([BLOCK_N], dtype=tl.int32)
    for k in range(K):
        ck = tl.load(c_ptr + k * S + cols, mask=smask, other=0.0)
        diff = p - ck[None, :]
        dist = tl.sum(diff * diff, axis=1)
        better = dist < best
        best = tl.where(better, dist, best)
        best_k = tl.where(better, k, best_k)
    return best, best_k


@triton.jit
def _running_max(best, best_k, sim, k0, K, BLOCK_K: tl.constexpr):
    """Merge the (BLOCK_N, BLOCK_K) similarities of components ``ks`` into a running maximum and
    its index; strict ">" keeps the lowest index on ties, within and across chunks."""
    ks = k0 + tl.arange(0, BLOCK_K)
    sim = tl.where((ks < K)[None, :], sim, float("-inf"))
    mx, arg = tl.max(sim, axis=1, return_indices=True, return_indices_tie_break_left=True)
    better = mx > best
    return tl.where(better, mx, best), tl.where(better, arg + k0, best_k)


@triton.jit
def _memory_attention_fwd_kernel(
    p_ptr,  # (N, S) patch projections, any float dtype
    f_ptr,  # (N, H) encoder features, any float dtype
    cpos_ptr,  # (K, S) fp32 L2-normalised positive memory
    cneg_ptr,  # (K, S) fp32 L2-normalised negative memory
    craw_ptr,  # (2, K, S) fp32 raw memories [negative, positive]; read only if COMMIT
    label_ptr,  # (B,) int64 bag labels in {0, 1}; read only if COMMIT
    off_ptr,  # (B+1,) int64 segment offsets
    chunk_bag_ptr,  # (G,) int64 bag of each chunk, >= B for idle programs
    chunk_start_ptr,  # (B+1,) int64 first chunk of each bag
    tau_ptr,  # () fp32 temperature
    score_ptr,  # out (N,) fp32
    amax_pos_ptr,  # out (N,) int64
    amax_neg_ptr,  # out (N,) int64
    kstar_ptr,  # out (N,) int32 commitment assignment; written only if COMMIT
    part_m_ptr,  # out (G,) fp32 chunk max of score / tau
    part_l_ptr,  # out (G,) fp32 chunk sum of exp(score / tau - max)
    part_acc_ptr,  # out (G, H) fp32 chunk sum of exp(score / tau - max) * F
    part_commit_ptr,  # out (G,) fp32 chunk sum of squared commitment residuals; if COMMIT
    B,
    K,
    S,
    H,
    COMMIT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_SC: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0)
    bag, rows, rmask, _lo, _hi = _chunk_rows(chunk_bag_ptr, chunk_start_ptr, off_ptr, B, BLOCK_N)

    # Similarities in (BLOCK_N, BLOCK_K) tiles, each summed over S in chunks of BLOCK_SC: only
    # chunks of p and of the memories are ever live, whatever K and S (no register spills).
    # PRECISION 0 ("ieee") gives arg-maxima equal to an fp32 matmul's up to summation order.
    max_pos = tl.full([BLOCK_N], float("-inf"), tl.float32)
    max_neg = tl.full([BLOCK_N], float("-inf"), tl.float32)
    arg_pos = tl.zeros([BLOCK_N], dtype=tl.int32)
    arg_neg = tl.zeros([BLOCK_N], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        sim_pos = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        sim_neg = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for s0 in range(0, S, BLOCK_SC):
            cs = s0 + tl.arange(0, BLOCK_SC)
            csmask = cs < S
            p = tl.load(
                p_ptr + rows[:, None] * S + cs[None, :],
                mask=rmask[:, None] & csmask[None, :],
                other=0.0,
            ).to(tl.float32)
            cmask = csmask[:, None] & kmask[None, :]
            c_off = ks[None, :] * S + cs[:, None]  # (BLOCK_SC, BLOCK_K): the transposed memory
            cpos_t = tl.load(cpos_ptr + c_off, mask=cmask, other=0.0)
            sim_pos = sim_dot(p, cpos_t, sim_pos, PRECISION)
            cneg_t = tl.load(cneg_ptr + c_off, mask=cmask, other=0.0)
            sim_neg = sim_dot(p, cneg_t, sim_neg, PRECISION)
        max_pos, arg_pos = _running_max(max_pos, arg_pos, sim_pos, k0, K, BLOCK_K)
        max_neg, arg_neg = _running_max(max_neg, arg_neg, sim_neg, k0, K, BLOCK_K)
    score = max_pos - max_neg
    tl.store(score_ptr + rows, score, mask=rmask)
    tl.store(amax_pos_ptr + rows, arg_pos.to(tl.int64), mask=rmask)
    tl.store(amax_neg_ptr + rows, arg_neg.to(tl.int64), mask=rmask)

    if COMMIT:
        cols = tl.arange(0, BLOCK_S)
        smask = cols < S
        pmask = rmask[:, None] & smask[None, :]
        p = tl.load(p_ptr + rows[:, None] * S + cols[None, :], mask=pmask, other=0.0)
        label = tl.load(label_ptr + bag)
        best, best_k = _nearest_raw(
            p.to(tl.float32), craw_ptr + label * K * S, K, S, cols, smask, BLOCK_N
        )
        tl.store(kstar_ptr + rows, best_k, mask=rmask)
        tl.store(part_commit_ptr + pid, tl.sum(tl.where(rmask, best, 0.0), axis=0))

    tau = tl.load(tau_ptr)
    s = tl.where(rmask, score / tau, float("-inf"))
    m = tl.max(s, axis=0)
    m_safe = tl.where(m > float("-inf"), m, 0.0)  # idle programs: no row, no (-inf) - (-inf)
    e = tl.where(rmask, tl.exp(s - m_safe), 0.0)
    tl.store(part_m_ptr + pid, m)
    tl.store(part_l_ptr + pid, tl.sum(e, axis=0))
    for h0 in range(0, H, BLOCK_H):
        hs = h0 + tl.arange(0, BLOCK_H)
        hmask = hs < H
        f = tl.load(
            f_ptr + rows[:, None] * H + hs[None, :], mask=rmask[:, None] & hmask[None, :], other=0.0
        ).to(tl.float32)
        tl.store(part_acc_ptr + pid * H + hs, tl.sum(e[:, None] * f, axis=0), mask=hmask)


@triton.jit
def _memory_attention_combine_kernel(
    part_m_ptr,  # (G,) fp32
    part_l_ptr,  # (G,) fp32
    part_acc_ptr,  # (G, H) fp32
    part_commit_ptr,  # (G,) fp32; read only if COMMIT
    chunk_start_ptr,  # (B+1,) int64
    off_ptr,  # (B+1,) int64
    pooled_ptr,  # out (B, H) fp32
    bag_m_ptr,  # out (B,) fp32 bag max of score / tau
    bag_l_ptr,  # out (B,) fp32 bag softmax normaliser
    commit_ptr,  # out (B,) fp32 per-bag commitment loss; written only if COMMIT
    S,
    H,
    COMMIT: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    bag = tl.program_id(0)
    pid_h = tl.program_id(1)
    c0 = tl.load(chunk_start_ptr + bag)
    c1 = tl.load(chunk_start_ptr + bag + 1)

    m_run = tl.full([BLOCK_C], float("-inf"), tl.float32)
    for cb in range(c0, c1, BLOCK_C):
        cs = cb + tl.arange(0, BLOCK_C)
        m_run = tl.maximum(m_run, tl.load(part_m_ptr + cs, mask=cs < c1, other=float("-inf")))
    m_bag = tl.max(m_run, axis=0)

    hs = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = hs < H
    l_run = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc = tl.zeros([BLOCK_C, BLOCK_H], dtype=tl.float32)
    for cb in range(c0, c1, BLOCK_C):
        cs = cb + tl.arange(0, BLOCK_C)
        cmask = cs < c1
        m_c = tl.load(part_m_ptr + cs, mask=cmask, other=float("-inf"))
        scale = tl.where(cmask, tl.exp(m_c - m_bag), 0.0)
        l_run += scale * tl.load(part_l_ptr + cs, mask=cmask, other=0.0)
        a_c = tl.load(
            part_acc_ptr + cs[:, None] * H + hs[None, :],
            mask=cmask[:, None] & hmask[None, :],
            other=0.0,
        )
        acc += scale[:, None] * a_c
    l_bag = tl.sum(l_run, axis=0)
    inv_l = tl.where(l_bag > 0, 1.0 / l_bag, 0.0)  # an empty bag pools to zero
    tl.store(pooled_ptr + bag * H + hs, tl.sum(acc, axis=0) * inv_l, mask=hmask)

    first = pid_h == 0
    tl.store(bag_m_ptr + bag, m_bag, mask=first)
    tl.store(bag_l_ptr + bag, l_bag, mask=first)
    if COMMIT:
        c_run = tl.zeros([BLOCK_C], dtype=tl.float32)
        for cb in range(c0, c1, BLOCK_C):
            cs = cb + tl.arange(0, BLOCK_C)
            c_run += tl.load(part_commit_ptr + cs, mask=cs < c1, other=0.0)
        n_bag = (tl.load(off_ptr + bag + 1) - tl.load(off_ptr + bag)).to(tl.float32)
        denom = tl.maximum(n_bag, 1.0) * S
        tl.store(commit_ptr + bag, tl.sum(c_run, axis=0) / denom, mask=first)


@triton.jit
def _memory_attention_norm_kernel(
    score_ptr,  # (N,) fp32
    bag_m_ptr,  # (B,) fp32
    bag_l_ptr,  # (B,) fp32
    off_ptr,  # (B+1,) int64
    chunk_bag_ptr,  # (G,) int64
    chunk_start_ptr,  # (B+1,) int64
    tau_ptr,  # () fp32
    attn_ptr,  # out (N,) fp32
    B,
    BLOCK_N: tl.constexpr,
):
    bag, rows, rmask, _lo, _hi = _chunk_rows(chunk_bag_ptr, chunk_start_ptr, off_ptr, B, BLOCK_N)
    tau = tl.load(tau_ptr)
    m_bag = tl.load(bag_m_ptr + bag)
    l_bag = tl.load(bag_l_ptr + bag)
    score = tl.load(score_ptr + rows, mask=rmask, other=0.0)
    # Same expression as in the forward kernel so that the weights sum to one to rounding.
    a = tl.exp(score / tau - m_bag) / l_bag
    tl.store(attn_ptr + rows, a, mask=rmask)


@triton.jit
def _segment_dot_kernel(
    x_ptr,  # (N,) fp32
    y_ptr,  # (N,) any float dtype
    off_ptr,  # (B+1,) int64
    out_ptr,  # out (B,) fp32: sum over the bag's rows of x * y
    BLOCK: tl.constexpr,
):
    bag = tl.program_id(0)
    lo = tl.load(off_ptr + bag)
    hi = tl.load(off_ptr + bag + 1)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for r0 in range(lo, hi, BLOCK):
        rows = r0 + tl.arange(0, BLOCK)
        m = rows < hi
        x = tl.load(x_ptr + rows, mask=m, other=0.0)
        y = tl.load(y_ptr + rows, mask=m, other=0.0).to(tl.float32)
        acc += x * y
    tl.store(out_ptr + bag, tl.sum(acc, axis=0))


@triton.jit
def _memory_attention_bwd_kernel(
    p_ptr,  # (N, S) patch projections; read only if COMMIT
    f_ptr,  # (N, H) encoder features
    cpos_ptr,  # (K, S) fp32 normalised positive memory
    cneg_ptr,  # (K, S) fp32 normalised negative memory
    craw_ptr,  # (2, K, S) fp32 raw memories [negative, positive]; if COMMIT
    label_ptr,  # (B,) int64; if COMMIT
    off_ptr,  # (B+1,) int64
    chunk_bag_ptr,  # (G,) int64
    chunk_start_ptr,  # (B+1,) int64
    tau_ptr,  # () fp32
    attn_ptr,  # (N,) fp32 attention weights of the forward pass
    score_ptr,  # (N,) fp32 scores of the forward pass
    amax_pos_ptr,  # (N,) int64
    amax_neg_ptr,  # (N,) int64
    kstar_ptr,  # (N,) int32; if COMMIT
    dpooled_ptr,  # (B, H) fp32 gradient of the pooled vectors
    dbag_ptr,  # (B,) fp32 D_b = sum_i a_i dL/da_i
    dattn_ptr,  # (N,) gradient of the attention output; read only if HAS_DATTN
    dscore_ptr,  # (N,) gradient of the score output; read only if HAS_DSCORE
    dcommit_ptr,  # (B,) fp32 gradient of the per-bag commitment loss; if COMMIT
    dp_ptr,  # out (N, S) in the dtype of patch_proj
    df_ptr,  # out (N, H) in the dtype of feats
    part_dtau_ptr,  # out (G,) fp32 chunk sum of dL/ds_i * score_i
    B,
    K,
    S,
    H,
    COMMIT: tl.constexpr,
    HAS_DATTN: tl.constexpr,
    HAS_DSCORE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0)
    bag, rows, rmask, lo, hi = _chunk_rows(chunk_bag_ptr, chunk_start_ptr, off_ptr, B, BLOCK_N)
    a = tl.load(attn_ptr + rows, mask=rmask, other=0.0)

    # dF_i = a_i dV_b and g_i = F_i . dV_b in one sweep over F.
    g = tl.zeros([BLOCK_N], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        hs = h0 + tl.arange(0, BLOCK_H)
        hmask = hs < H
        fmask = rmask[:, None] & hmask[None, :]
        f = tl.load(f_ptr + rows[:, None] * H + hs[None, :], mask=fmask, other=0.0).to(tl.float32)
        dv = tl.load(dpooled_ptr + bag * H + hs, mask=hmask, other=0.0)
        g += tl.sum(f * dv[None, :], axis=1)
        df = a[:, None] * dv[None, :]
        tl.store(
            df_ptr + rows[:, None] * H + hs[None, :], df.to(df_ptr.dtype.element_ty), mask=fmask
        )
    if HAS_DATTN:
        g += tl.load(dattn_ptr + rows, mask=rmask, other=0.0).to(tl.float32)

    tau = tl.load(tau_ptr)
    ds = a * (g - tl.load(dbag_ptr + bag))  # softmax backward, d loss / d (score / tau)
    score = tl.load(score_ptr + rows, mask=rmask, other=0.0)
    tl.store(part_dtau_ptr + pid, tl.sum(tl.where(rmask, ds * score, 0.0), axis=0))
    dsc = ds / tau
    if HAS_DSCORE:
        dsc += tl.load(dscore_ptr + rows, mask=rmask, other=0.0).to(tl.float32)

    kp = tl.load(amax_pos_ptr + rows, mask=rmask, other=0)
    kn = tl.load(amax_neg_ptr + rows, mask=rmask, other=0)
    if COMMIT:
        label = tl.load(label_ptr + bag)
        n_bag = (hi - lo).to(tl.float32)
        coef = tl.load(dcommit_ptr + bag) * 2.0 / (tl.maximum(n_bag, 1.0) * S)
        kc = tl.load(kstar_ptr + rows, mask=rmask, other=0)
    # dp in column chunks: a handful of (BLOCK_N, BLOCK_S) tiles stays live, not the whole row.
    for s0 in range(0, S, BLOCK_S):
        cols = s0 + tl.arange(0, BLOCK_S)
        pmask = rmask[:, None] & (cols < S)[None, :]
        cp = tl.load(cpos_ptr + kp[:, None] * S + cols[None, :], mask=pmask, other=0.0)
        cn = tl.load(cneg_ptr + kn[:, None] * S + cols[None, :], mask=pmask, other=0.0)
        dp = dsc[:, None] * (cp - cn)
        if COMMIT:
            p = tl.load(p_ptr + rows[:, None] * S + cols[None, :], mask=pmask, other=0.0)
            target = tl.load(
                craw_ptr + label * K * S + kc[:, None] * S + cols[None, :], mask=pmask, other=0.0
            )
            dp += coef * (p.to(tl.float32) - target)
        tl.store(
            dp_ptr + rows[:, None] * S + cols[None, :], dp.to(dp_ptr.dtype.element_ty), mask=pmask
        )


@triton.jit
def _commitment_fwd_kernel(
    p_ptr,  # (N, S) patch projections, any float dtype
    craw_ptr,  # (2, K, S) fp32 raw memories [negative, positive]
    label_ptr,  # (B,) int64 bag labels in {0, 1}
    off_ptr,  # (B+1,) int64
    chunk_bag_ptr,  # (G,) int64
    chunk_start_ptr,  # (B+1,) int64
    kstar_ptr,  # out (N,) int32 nearest raw row of the bag's own-class memory
    part_ptr,  # out (G,) fp32 chunk sum of squared residuals
    B,
    K,
    S,
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    pid = tl.program_id(0)
    bag, rows, rmask, _lo, _hi = _chunk_rows(chunk_bag_ptr, chunk_start_ptr, off_ptr, B, BLOCK_N)
    cols = tl.arange(0, BLOCK_S)
    smask = cols < S
    pmask = rmask[:, None] & smask[None, :]
    p = tl.load(p_ptr + rows[:, None] * S + cols[None, :], mask=pmask, other=0.0).to(tl.float32)
    label = tl.load(label_ptr + bag)
    best, best_k = _nearest_raw(p, craw_ptr + label * K * S, K, S, cols, smask, BLOCK_N)
    tl.store(kstar_ptr + rows, best_k, mask=rmask)
    tl.store(part_ptr + pid, tl.sum(tl.where(rmask, best, 0.0), axis=0))


@triton.jit
def _chunk_mean_kernel(
    part_ptr,  # (G,) fp32 chunk partial sums
    chunk_start_ptr,  # (B+1,) int64
    off_ptr,  # (B+1,) int64
    out_ptr,  # out (B,) fp32: sum of the bag's partials / (rows of the bag * S)
    S,
    BLOCK_C: tl.constexpr,
):
    bag = tl.program_id(0)
    c0 = tl.load(chunk_start_ptr + bag)
    c1 = tl.load(chunk_start_ptr + bag + 1)
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for cb in range(c0, c1, BLOCK_C):
        cs = cb + tl.arange(0, BLOCK_C)
        acc += tl.load(part_ptr + cs, mask=cs < c1, other=0.0)
    n_bag = (tl.load(off_ptr + bag + 1) - tl.load(off_ptr + bag)).to(tl.float32)
    tl.store(out_ptr + bag, tl.sum(acc, axis=0) / (tl.maximum(n_bag, 1.0) * S))


@triton.jit
def _commitment_bwd_kernel(
    p_ptr,  # (N, S) patch projections
    craw_ptr,  # (2, K, S) fp32 raw memories [negative, positive]
    label_ptr,  # (B,) int64
    off_ptr,  # (B+1,) int64
    chunk_bag_ptr,  # (G,) int64
    chunk_start_ptr,  # (B+1,) int64
    kstar_ptr,  # (N,) int32 from the forward pass
    dcommit_ptr,  # (B,) fp32 gradient of the per-bag loss
    dp_ptr,  # out (N, S) in the dtype of patch_proj
    B,
    K,
    S,
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    bag, rows, rmask, lo, hi = _chunk_rows(chunk_bag_ptr, chunk_start_ptr, off_ptr, B, BLOCK_N)
    cols = tl.arange(0, BLOCK_S)
    smask = cols < S
    pmask = rmask[:, None] & smask[None, :]
    p = tl.load(p_ptr + rows[:, None] * S + cols[None, :], mask=pmask, other=0.0).to(tl.float32)
    label = tl.load(label_ptr + bag)
    kc = tl.load(kstar_ptr + rows, mask=rmask, other=0)
    target = tl.load(
        craw_ptr + label * K * S + kc[:, None] * S + cols[None, :], mask=pmask, other=0.0
    )
    n_bag = (hi - lo).to(tl.float32)
    coef = tl.load(dcommit_ptr + bag) * 2.0 / (tl.maximum(n_bag, 1.0) * S)
    dp = coef * (p - target)
    tl.store(dp_ptr + rows[:, None] * S + cols[None, :], dp.to(dp_ptr.dtype.element_ty), mask=pmask)


# --------------------------------------------------------------------------------------------------
# host launchers
# --------------------------------------------------------------------------------------------------

_DEFAULT_BLOCK_N = 32  # with 4 warps: no spills at any K, S (benches/kernel_aot.py)
_DEFAULT_BLOCK_H = 128
_INTERPRET_BLOCK_N = 16  # the interpreter's cost grows with tile area; small tiles keep tests fast


def _fwd_blocks(k: int, s: int) -> dict[str, int]:
    """Tile sizes and warps of ``_memory_attention_fwd_kernel`` for memories (K, S).

    Similarities are computed in (BLOCK_N, BLOCK_K) tiles over S chunks of BLOCK_SC columns, so the
    live registers do not grow with K or S; BLOCK_S covers a whole row for the commitment term.
    Two pipeline stages (one S chunk loaded ahead) instead of Triton's default three: the third
    stage's buffers made ptxas spill a few bytes on sm_90 (official preset, fp16 inputs, tf32).
    ``benches/kernel_aot.py`` checks that these choices compile without register spills.
    """
    return {
        "BLOCK_K": 16,
        "BLOCK_S": block_size(s),
        "BLOCK_SC": 16,
        "num_warps": 4,
        "num_stages": 2,
    }


def _bwd_block_s(s: int) -> int:
    """Columns per chunk of the dp sweep of ``_memory_attention_bwd_kernel``."""
    return min(block_size(s), 16 if interpreting() else 64)


def _pick_block_n(block_n: int | None) -> int:
    if block_n is not None:
        if block_n < 16 or block_n & (block_n - 1):
            raise DataError(f"block_n: must be a power of two >= 16, got {block_n}")
        return block_n
    return _INTERPRET_BLOCK_N if interpreting() else _DEFAULT_BLOCK_N


def _launch_forward(
    p: torch.Tensor,
    f: torch.Tensor,
    c_pos: torch.Tensor,
    c_neg: torch.Tensor,
    craw: torch.Tensor | None,
    labels: torch.Tensor | None,
    offsets: torch.Tensor,
    tau: torch.Tensor,
    block_n: int,
) -> dict[str, Any]:
    n, s = p.shape
    h = f.shape[1]
    k = c_pos.shape[0]
    b = offsets.numel() - 1
    dev = p.device
    chunk_bag, chunk_start, grid = chunk_map(offsets, block_n, n)
    commit = craw is not None
    blocks = _fwd_blocks(k, s)
    block_h = min(_DEFAULT_BLOCK_H, block_size(h))

    score = torch.empty(n, dtype=torch.float32, device=dev)
    amax_pos = torch.empty(n, dtype=torch.int64, device=dev)
    amax_neg = torch.empty(n, dtype=torch.int64, device=dev)
    kstar = torch.empty(n if commit else 1, dtype=torch.int32, device=dev)
    part_m = torch.empty(grid, dtype=torch.float32, device=dev)
    part_l = torch.empty(grid, dtype=torch.float32, device=dev)
    part_acc = torch.empty((grid, h), dtype=torch.float32, device=dev)
    part_commit = torch.empty(grid if commit else 1, dtype=torch.float32, device=dev)
    dummy = score  # stands in for pointers a constexpr branch never reads
    _memory_attention_fwd_kernel[(grid,)](
        p, f, c_pos, c_neg,
        craw if commit else dummy, labels if commit else dummy,
        offsets, chunk_bag, chunk_start, tau,
        score, amax_pos, amax_neg, kstar, part_m, part_l, part_acc, part_commit,
        b, k, s, h,
        COMMIT=commit, PRECISION=precision_code(), BLOCK_N=block_n, **blocks, BLOCK_H=block_h,
    )  # fmt: skip

    pooled = torch.empty((b, h), dtype=torch.float32, device=dev)
    bag_m = torch.empty(b, dtype=torch.float32, device=dev)
    bag_l = torch.empty(b, dtype=torch.float32, device=dev)
    commit_loss = torch.empty(b if commit else 1, dtype=torch.float32, device=dev)
    block_c = 16 if interpreting() else 32
    _memory_attention_combine_kernel[(b, triton.cdiv(h, block_h))](
        part_m, part_l, part_acc, part_commit, chunk_start, offsets,
        pooled, bag_m, bag_l, commit_loss, s, h,
        COMMIT=commit, BLOCK_C=block_c, BLOCK_H=block_h, num_warps=4,
    )  # fmt: skip

    attn = torch.empty(n, dtype=torch.float32, device=dev)
    _memory_attention_norm_kernel[(grid,)](
        score, bag_m, bag_l, offsets, chunk_bag, chunk_start, tau, attn, b,
        BLOCK_N=block_n, num_warps=4,
    )  # fmt: skip
    return {
        "pooled": pooled,
        "attention": attn,
        "score": score,
        "argmax_pos": amax_pos,
        "argmax_neg": amax_neg,
        "kstar": kstar,
        "commit": commit_loss if commit else None,
        "chunk_bag": chunk_bag,
        "chunk_start": chunk_start,
        "grid": grid,
    }


class _MemoryAttentionPool(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        patch_proj: torch.Tensor,
        feats: torch.Tensor,
        c_pos_hat: torch.Tensor,
        c_neg_hat: torch.Tensor,
        tau: torch.Tensor,
        offsets: torch.Tensor,
        craw: torch.Tensor | None,
        labels: torch.Tensor | None,
        block_n: int,
    ) -> tuple[torch.Tensor, ...]:
        out = _launch_forward(
            patch_proj, feats, c_pos_hat, c_neg_hat, craw, labels, offsets, tau, block_n
        )
        commit = craw is not None
        ctx.save_for_backward(
            patch_proj, feats, c_pos_hat, c_neg_hat, tau, offsets,
            craw if commit else None, labels if commit else None,
            out["attention"], out["score"], out["argmax_pos"], out["argmax_neg"],
            out["kstar"], out["pooled"], out["chunk_bag"], out["chunk_start"],
        )  # fmt: skip
        ctx.grid = out["grid"]
        ctx.block_n = block_n
        ctx.commit = commit
        ctx.mark_non_differentiable(out["argmax_pos"], out["argmax_neg"])
        result = [
            out["pooled"],
            out["attention"],
            out["score"],
            out["argmax_pos"],
            out["argmax_neg"],
        ]
        if commit:
            result.append(out["commit"])
        return tuple(result)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        (
            p, f, c_pos, c_neg, tau, offsets, craw, labels,
            attn, score, amax_pos, amax_neg, kstar, pooled, chunk_bag, chunk_start,
        ) = ctx.saved_tensors  # fmt: skip
        d_pooled, d_attn, d_score = grads[0], grads[1], grads[2]
        d_commit = grads[5] if ctx.commit else None
        s = p.shape[1]
        h = f.shape[1]
        k = c_pos.shape[0]
        b = offsets.numel() - 1
        dev = p.device

        dv = (
            torch.zeros((b, h), dtype=torch.float32, device=dev)
            if d_pooled is None
            else d_pooled.to(torch.float32).contiguous()
        )
        d_bag = (pooled * dv).sum(dim=1)
        if d_attn is not None:
            d_attn = d_attn.contiguous()
            seg = torch.empty(b, dtype=torch.float32, device=dev)
            _segment_dot_kernel[(b,)](
                attn, d_attn, offsets, seg, BLOCK=1024 if not interpreting() else 64
            )
            d_bag = d_bag + seg
        d_bag = d_bag.contiguous()
        if d_score is not None:
            d_score = d_score.contiguous()
        has_commit_grad = d_commit is not None
        if d_commit is not None:
            d_commit = d_commit.to(torch.float32).contiguous()

        dp = torch.empty_like(p)
        df = torch.empty_like(f)
        part_dtau = torch.empty(ctx.grid, dtype=torch.float32, device=dev)
        _memory_attention_bwd_kernel[(ctx.grid,)](
            p, f, c_pos, c_neg,
            craw if has_commit_grad else attn, labels if has_commit_grad else attn,
            offsets, chunk_bag, chunk_start, tau,
            attn, score, amax_pos, amax_neg, kstar if has_commit_grad else attn,
            dv, d_bag,
            d_attn if d_attn is not None else attn,
            d_score if d_score is not None else attn,
            d_commit if has_commit_grad else attn,
            dp, df, part_dtau,
            b, k, s, h,
            COMMIT=has_commit_grad, HAS_DATTN=d_attn is not None, HAS_DSCORE=d_score is not None,
            BLOCK_N=ctx.block_n, BLOCK_S=_bwd_block_s(s),
            BLOCK_H=min(_DEFAULT_BLOCK_H, block_size(h)), num_warps=4,
        )  # fmt: skip
        d_tau = -part_dtau.sum() / (tau * tau)
        return dp, df, None, None, d_tau.reshape(tau.shape), None, None, None, None


class _Commitment(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        patch_proj: torch.Tensor,
        craw: torch.Tensor,
        labels: torch.Tensor,
        offsets: torch.Tensor,
        block_n: int,
    ) -> torch.Tensor:
        n, s = patch_proj.shape
        k = craw.shape[1]
        b = offsets.numel() - 1
        dev = patch_proj.device
        chunk_bag, chunk_start, grid = chunk_map(offsets, block_n, n)
        kstar = torch.empty(n, dtype=torch.int32, device=dev)
        part = torch.empty(grid, dtype=torch.float32, device=dev)
        _commitment_fwd_kernel[(grid,)](
            patch_proj, craw, labels, offsets, chunk_bag, chunk_start, kstar, part, b, k, s,
            BLOCK_N=block_n, BLOCK_S=block_size(s), num_warps=4,
        )  # fmt: skip
        per_bag = torch.empty(b, dtype=torch.float32, device=dev)
        _chunk_mean_kernel[(b,)](
            part, chunk_start, offsets, per_bag, s, BLOCK_C=16 if interpreting() else 32
        )
        ctx.save_for_backward(patch_proj, craw, labels, offsets, chunk_bag, chunk_start, kstar)
        ctx.grid = grid
        ctx.block_n = block_n
        return per_bag

    @staticmethod
    def backward(ctx: Any, d_per_bag: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        p, craw, labels, offsets, chunk_bag, chunk_start, kstar = ctx.saved_tensors
        s = p.shape[1]
        dp = torch.empty_like(p)
        _commitment_bwd_kernel[(ctx.grid,)](
            p, craw, labels, offsets, chunk_bag, chunk_start, kstar,
            d_per_bag.to(torch.float32).contiguous(), dp, offsets.numel() - 1, craw.shape[1], s,
            BLOCK_N=ctx.block_n, BLOCK_S=block_size(s), num_warps=4,
        )  # fmt: skip
        return dp, None, None, None, None


# --------------------------------------------------------------------------------------------------
# public functions
# --------------------------------------------------------------------------------------------------


def _prepare(
    patch_proj: torch.Tensor,
    feats: torch.Tensor,
    c_pos_hat: torch.Tensor,
    c_neg_hat: torch.Tensor,
    log_tau: torch.Tensor,
    segment_offsets: torch.Tensor,
    tau_min: float,
    tau_max: float,
) -> tuple[torch.Tensor, ...]:
    if patch_proj.dim() != 2 or feats.dim() != 2 or patch_proj.shape[0] != feats.shape[0]:
        raise DataError(
            f"patch_proj/feats: expected (N, S) and (N, H) with the same N, got "
            f"{tuple(patch_proj.shape)} and {tuple(feats.shape)}"
        )
    if c_pos_hat.dim() != 2 or c_pos_hat.shape != c_neg_hat.shape:
        raise DataError(
            f"c_pos_hat/c_neg_hat: expected two (K, S) memories, got {tuple(c_pos_hat.shape)} "
            f"and {tuple(c_neg_hat.shape)}"
        )
    if c_pos_hat.shape[1] != patch_proj.shape[1]:
        raise DataError(
            f"c_pos_hat: memory width {c_pos_hat.shape[1]} differs from patch_proj width "
            f"{patch_proj.shape[1]}"
        )
    if patch_proj.shape[0] == 0:
        raise DataError("patch_proj: empty input (N = 0)")
    validate_offsets(segment_offsets, patch_proj.shape[0])
    devices = {t.device for t in (patch_proj, feats, c_pos_hat, c_neg_hat)}
    if len(devices) != 1:
        raise DataError(
            f"memory_attention_pool: inputs on several devices {sorted(map(str, devices))}"
        )
    # The temperature stays in autograd: exp and clamp give d tau / d log_tau, zero when clamped.
    tau = log_tau.to(torch.float32).exp().clamp(tau_min, tau_max).reshape(())
    return (
        patch_proj.contiguous(),
        feats.contiguous(),
        c_pos_hat.detach().to(torch.float32).contiguous(),
        c_neg_hat.detach().to(torch.float32).contiguous(),
        tau,
        segment_offsets.to(device=patch_proj.device, dtype=torch.int64).contiguous(),
    )


def _commit_inputs(
    p: torch.Tensor,
    c_pos: torch.Tensor,
    c_neg: torch.Tensor,
    labels: torch.Tensor,
    off: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack the raw memories as (2, K, S) fp32 [negative, positive] and check the bag labels."""
    if c_pos.dim() != 2 or c_pos.shape != c_neg.shape or c_pos.shape[1] != p.shape[1]:
        raise DataError(
            f"c_pos/c_neg: expected two raw memories of shape (K, {p.shape[1]}), got "
            f"{tuple(c_pos.shape)} and {tuple(c_neg.shape)}"
        )
    if labels.shape != (off.numel() - 1,):
        raise DataError(
            f"labels: expected shape ({off.numel() - 1},) (one per bag), got {tuple(labels.shape)}"
        )
    craw = torch.stack([c_neg.detach(), c_pos.detach()]).to(p.device, torch.float32).contiguous()
    lab = labels.to(device=p.device, dtype=torch.int64).contiguous()
    if not bool(((lab == 0) | (lab == 1)).all()):
        raise DataError("labels: slide labels must be 0 or 1")
    return craw, lab


def memory_attention_pool(
    patch_proj: torch.Tensor,
    feats: torch.Tensor,
    c_pos_hat: torch.Tensor,
    c_neg_hat: torch.Tensor,
    log_tau: torch.Tensor,
    segment_offsets: torch.Tensor,
    *,
    tau_min: float = 0.01,
    tau_max: float = 2.0,
    block_n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Memory-guided attention pooling of B bags with fused Triton kernels.

    Parameters
    ----------
    patch_proj
        ``(N, S)`` L2-normalised patch projections p_i of all bags, concatenated.
    feats
        ``(N, H)`` encoder features F_i (the pooled quantity).
    c_pos_hat, c_neg_hat
        ``(K, S)`` L2-normalised class memories; used detached (no gradient).
    log_tau
        ``()`` or ``(1,)`` learnable θ; tau = clamp(exp(θ), tau_min, tau_max).
    segment_offsets
        ``(B+1,)`` int64, bag b owns rows ``segment_offsets[b]:segment_offsets[b+1]``.
    tau_min, tau_max
        Temperature clamp.
    block_n
        Rows per kernel program (power of two >= 16); ``None`` picks a default.

    Returns
    -------
    pooled
        ``(B, H)`` float32 V_b = Σ_i a_i F_i.
    attention
        ``(N,)`` float32 softmax weights a_i (sum to one within each bag).
    score
        ``(N,)`` float32 max_k <p_i, ĉ⁺_k> - max_k <p_i, ĉ⁻_k>.
    argmax_pos, argmax_neg
        ``(N,)`` int64 arg-maxima of the two similarity rows (ties -> lowest index).

    Gradients flow to ``patch_proj`` (through the hard maxima), ``feats`` and ``log_tau``.

    Raises
    ------
    DataError
        On mismatched shapes, ``N = 0``, malformed offsets or an empty bag.
    """
    p, f, cp, cn, tau, off = _prepare(
        patch_proj, feats, c_pos_hat, c_neg_hat, log_tau, segment_offsets, tau_min, tau_max
    )
    out = _MemoryAttentionPool.apply(p, f, cp, cn, tau, off, None, None, _pick_block_n(block_n))
    return out[0], out[1], out[2], out[3], out[4]


def memory_attention_pool_commit(
    patch_proj: torch.Tensor,
    feats: torch.Tensor,
    c_pos_hat: torch.Tensor,
    c_neg_hat: torch.Tensor,
    log_tau: torch.Tensor,
    segment_offsets: torch.Tensor,
    c_pos: torch.Tensor,
    c_neg: torch.Tensor,
    labels: torch.Tensor,
    *,
    tau_min: float = 0.01,
    tau_max: float = 2.0,
    block_n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`memory_attention_pool` fused with the commitment loss of every bag.

    Parameters
    ----------
    patch_proj, feats, c_pos_hat, c_neg_hat, log_tau, segment_offsets, tau_min, tau_max, block_n
        As in :func:`memory_attention_pool`.
    c_pos, c_neg
        ``(K, S)`` raw (un-normalised) class memories; the commitment target, detached.
    labels
        ``(B,)`` int64 slide labels in {0, 1}; bag b commits to ``c_pos`` if ``labels[b] == 1``.

    Returns
    -------
    pooled, attention, score, argmax_pos, argmax_neg
        As in :func:`memory_attention_pool`.
    commit
        ``(B,)`` float32, commit_b = mean over the bag's P_b x S entries of
        (p_i - sg(c^y_{k*_i}))², k*_i = argmin_k ||p_i - c^y_k|| (ties -> lowest index). Its
        gradient reaches ``patch_proj`` only. An empty bag has commit 0.
    """
    p, f, cp, cn, tau, off = _prepare(
        patch_proj, feats, c_pos_hat, c_neg_hat, log_tau, segment_offsets, tau_min, tau_max
    )
    craw, lab = _commit_inputs(p, c_pos, c_neg, labels, off)
    out = _MemoryAttentionPool.apply(p, f, cp, cn, tau, off, craw, lab, _pick_block_n(block_n))
    return out[0], out[1], out[2], out[3], out[4], out[5]


def batched_commitment_loss(
    p: torch.Tensor,
    c_pos_raw: torch.Tensor,
    c_neg_raw: torch.Tensor,
    y: torch.Tensor,
    segment_offsets: torch.Tensor,
    *,
    block_n: int | None = None,
) -> torch.Tensor:
    """Commitment loss of B bags against their own class memories, averaged over bags.

    The stand-alone form of the commitment term fused into :func:`memory_attention_pool_commit`,
    with the signature of :func:`momkd.losses.batched_commitment_loss`.

    Parameters
    ----------
    p
        ``(N, S)`` patch projections of B concatenated bags.
    c_pos_raw, c_neg_raw
        ``(K, S)`` raw memory rows (the detached target).
    y
        ``(B,)`` int64 bag labels in {0, 1}.
    segment_offsets
        ``(B+1,)`` int64 bag offsets.
    block_n
        Rows per kernel program (power of two >= 16); ``None`` picks a default.

    Returns
    -------
    Tensor
        ``()`` float32, mean over bags of mean over the bag's P_b x S entries of
        (p_i - sg(c^y_{k*_i}))², k*_i = argmin_k ||p_i - c^y_k||. Gradient to ``p`` only.
    """
    if p.dim() != 2 or p.shape[0] == 0:
        raise DataError(f"p: expected non-empty patch projections (N, S), got {tuple(p.shape)}")
    validate_offsets(segment_offsets, p.shape[0])
    off = segment_offsets.to(device=p.device, dtype=torch.int64).contiguous()
    craw, lab = _commit_inputs(p, c_pos_raw, c_neg_raw, y, off)
    per_bag = _Commitment.apply(p.contiguous(), craw, lab, off, _pick_block_n(block_n))
    return per_bag.mean()
