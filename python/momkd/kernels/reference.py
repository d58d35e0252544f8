"""Eager PyTorch references of the memory operations (docs/METHOD.md §2.3-2.5).

Every function here is the test oracle for the fused Triton kernel of the same name and the runtime
fallback when no kernel applies (CPU tensors, no Triton, ``MOMKD_FORCE_EAGER=1``). The code favours
readability over speed; all memory math runs in float32 with autocast disabled, and every output is
float32 (index outputs are int64).

Conventions: ``N`` patches over ``B`` bags (``segment_offsets`` is the CSR index of the bags, ``B + 1``
int64 entries from 0 to N), ``H`` histology width, ``S`` sphere dim, ``K`` components per class
memory, ``C`` stacked class memories (index 0 = negative class, 1 = positive class).
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F
from torch import Tensor

from momkd.errors import DataError

__all__ = [
    "align_loss_reference",
    "batched_commitment_loss_reference",
    "commitment_loss_reference",
    "fp32",
    "memory_attention_pool_reference",
    "momentum_apply_reference",
    "momentum_stats_reference",
    "momentum_update_reference",
    "nearest_raw_reference",
    "phi_reference",
    "segment_ids",
]


def fp32(t: Tensor) -> AbstractContextManager[None]:
    """Context in which autocast is off for ``t``'s device, so memory math stays in float32."""
    return torch.autocast(device_type=t.device.type, enabled=False)


def segment_ids(segment_offsets: Tensor, n: int) -> tuple[Tensor, int]:
    """Bag index of every patch.

    Parameters
    ----------
    segment_offsets : Tensor
        (B + 1,) int64, ``0 = o_0 < o_1 < ... < o_B = n``; bag b holds patches ``o_b .. o_{b+1}-1``.
    n : int
        Number of patches N.

    Returns
    -------
    seg : Tensor
        (N,) int64 bag id per patch, on the device of ``segment_offsets``.
    b : int
        Number of bags B.

    Raises
    ------
    DataError
        Offsets that are not 1-D, do not start at 0, do not end at ``n`` or contain an empty bag.
    """
    if segment_offsets.dim() != 1 or segment_offsets.numel() < 2:
        raise DataError(
            f"segment_offsets must be a 1-D tensor of B + 1 >= 2 entries, got shape "
            f"{tuple(segment_offsets.shape)}"
        )
    offs = segment_offsets.to(torch.int64)
    counts = offs[1:] - offs[:-1]
    first, last = int(offs[0]), int(offs[-1])
    if first != 0 or last != n:
        raise DataError(f"segment_offsets must run from 0 to N={n}, got {first}..{last}")
    if bool((counts <= 0).any()):
        bag = int(torch.nonzero(counts <= 0)[0, 0])
        raise DataError(f"segment_offsets: bag {bag} is empty (every bag needs >= 1 patch)")
    b = counts.numel()
    seg = torch.repeat_interleave(torch.arange(b, device=offs.device), counts, output_size=n)
    return seg, b


def memory_attention_pool_reference(
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
    """Memory-guided attention pooling over B bags (docs/METHOD.md §2.3).

    ``score_i = max_k <p_i, sg(c+_k)> - max_k <p_i, sg(c-_k)>`` (hard max, memories detached),
    ``a = softmax(score / tau)`` within each bag with ``tau = clamp(exp(log_tau), tau_min, tau_max)``,
    and ``V_b = sum_{i in b} a_i F_i``.

    Parameters
    ----------
    patch_proj : Tensor
        (N, S) normalised patch projections p.
    feats : Tensor
        (N, H) encoder features F that are pooled.
    c_pos_hat, c_neg_hat : Tensor
        (K, S) L2-normalised rows of the positive / negative memory; no gradient flows into them.
    log_tau : Tensor
        () learnable temperature parameter theta.
    segment_offsets : Tensor
        (B + 1,) int64 bag offsets into the N patches.
    tau_min, tau_max : float
        Clamp range of tau; outside it the gradient with respect to ``log_tau`` is zero.

    Returns
    -------
    pooled : Tensor
        (B, H) float32 attention-pooled features V.
    attention : Tensor
        (N,) float32 attention weights a (sum to 1 within each bag).
    score : Tensor
        (N,) float32 memory score.
    argmax_pos, argmax_neg : Tensor
        (N,) int64 index of the most similar component of each memory (ties: lowest index).
    """
    n = patch_proj.shape[0]
    seg, b = segment_ids(segment_offsets.to(patch_proj.device), n)
    with fp32(patch_proj):
        p = patch_proj.float()
        sim_pos = p @ c_pos_hat.detach().float().T  # (N, K)
        sim_neg = p @ c_neg_hat.detach().float().T
        max_pos, argmax_pos = sim_pos.max(dim=1)
        max_neg, argmax_neg = sim_neg.max(dim=1)
        score = max_pos - max_neg
        tau = log_tau.float().exp().clamp(tau_min, tau_max)
        logits = score / tau
        # Softmax is shift invariant, so the per-bag maximum can be a constant (detached).
        seg_max = torch.full((b,), -math.inf, device=p.device, dtype=torch.float32)
        seg_max = seg_max.scatter_reduce(0, seg, logits.detach(), reduce="amax", include_self=True)
        e = torch.exp(logits - seg_max[seg])
        denom = torch.zeros(b, device=p.device, dtype=torch.float32).index_add(0, seg, e)
        attention = e / denom[seg]
        f = feats.float()
        pooled = torch.zeros(b, f.shape[1], device=f.device, dtype=torch.float32)
        pooled = pooled.index_add(0, seg, attention[:, None] * f)
    return pooled, attention, score, argmax_pos, argmax_neg


def phi_reference(z: Tensor, c_hat: Tensor, temp: float = 5.0) -> Tensor:
    """Soft maximum similarity ``(1/temp) log sum_k exp(temp <z, c_k>)``: z (B, S), c_hat (K, S) -> (B,)."""
    with fp32(z):
        return torch.logsumexp(temp * (z.float() @ c_hat.float().T), dim=-1) / temp


def align_loss_reference(
    z: Tensor,
    y: Tensor,
    c_pos_hat: Tensor,
    c_neg_hat: Tensor,
    margin: float = 0.3,
    scale: float = 20.0,
    temp: float = 5.0,
) -> Tensor:
    """Per-sample alignment loss ``softplus(scale * (margin - s * Delta(z)))`` (docs/METHOD.md §2.4).

    Parameters
    ----------
    z : Tensor
        (B, S) normalised embeddings (z_o or z_w).
    y : Tensor
        (B,) int64 labels in {0, 1}; ``s = +1`` for y = 1 and ``-1`` for y = 0.
    c_pos_hat, c_neg_hat : Tensor
        (K, S) normalised memory rows; gradients flow into them (no stop-gradient).
    margin, scale, temp : float
        0.3, 20 and 5 by default. The loss is not divided by ``scale``.

    Returns
    -------
    Tensor
        (B,) float32 loss per sample.
    """
    with fp32(z):
        delta = phi_reference(z, c_pos_hat, temp) - phi_reference(z, c_neg_hat, temp)
        s = 2.0 * y.to(delta.dtype) - 1.0
        return F.softplus(scale * (margin - s * delta))


@torch.no_grad()
def nearest_raw_reference(p: Tensor, c_raw: Tensor) -> Tensor:
    """``argmin_k ||p_i - c_k||`` over raw memory rows: p (N, S), c_raw (K, S) -> (N,) int64.

    Ties go to the lowest k.
    """
    with fp32(p):
        c = c_raw.float()
        # ||p - c||^2 = ||p||^2 - 2 <p, c> + ||c||^2; the first term does not change the argmin.
        d = (c * c).sum(dim=1)[None, :] - 2.0 * (p.float() @ c.T)
        return d.argmin(dim=1)


def commitment_loss_reference(p: Tensor, c_y_raw: Tensor) -> Tensor:
    """Commitment loss of one bag: p (N, S), c_y_raw (K, S) -> () float32.

    ``mean over the N x S entries of (p_i - sg(c_{k*_i}))^2`` with ``k*_i`` from
    :func:`nearest_raw_reference`; the gradient reaches ``p`` only.
    """
    k = nearest_raw_reference(p, c_y_raw)
    with fp32(p):
        target = c_y_raw.detach().float()[k]
        return ((p.float() - target) ** 2).mean()


def batched_commitment_loss_reference(
    p: Tensor, c_pos_raw: Tensor, c_neg_raw: Tensor, y: Tensor, segment_offsets: Tensor
) -> Tensor:
    """Commitment loss of B bags against their own class memories, averaged over bags.

    Parameters
    ----------
    p : Tensor
        (N, S) patch projections of B concatenated bags.
    c_pos_raw, c_neg_raw : Tensor
        (K, S) raw memory rows (the detached targets).
    y : Tensor
        (B,) int64 bag labels in {0, 1}; bag b commits to ``c_pos_raw`` when ``y_b = 1``.
    segment_offsets : Tensor
        (B + 1,) int64 bag offsets.

    Returns
    -------
    Tensor
        () float32 ``mean_b commitment_loss_reference(p[bag b], C^{y_b})``; gradient to ``p`` only.
    """
    n, s = p.shape
    seg, b = segment_ids(segment_offsets.to(p.device), n)
    y_patch = y.to(p.device)[seg] == 1
    k_pos = nearest_raw_reference(p, c_pos_raw)
    k_neg = nearest_raw_reference(p, c_neg_raw)
    with fp32(p):
        target = torch.where(
            y_patch[:, None], c_pos_raw.detach().float()[k_pos], c_neg_raw.detach().float()[k_neg]
        )
        per_patch = ((p.float() - target) ** 2).sum(dim=1)  # (N,)
        per_bag = torch.zeros(b, device=p.device, dtype=torch.float32).index_add(0, seg, per_patch)
        offs = segment_offsets.to(p.device, torch.int64)
        sizes = (offs[1:] - offs[:-1]).to(torch.float32)
        return (per_bag / (sizes * s)).mean()


def momentum_stats_reference(
    mems_hat: Tensor, emb: Tensor, labels: Tensor
) -> tuple[Tensor, Tensor]:
    """Per-component sums and counts of the embeddings assigned to their own class memory.

    Each embedding m is assigned to ``k = argmax_k <emb_m, mems_hat[labels_m, k]>`` (ties: lowest k).
    The statistics are plain sums so that data-parallel ranks can all-reduce them before the update.

    Parameters
    ----------
    mems_hat : Tensor
        (C, K, S) normalised class memories (index = class label).
    emb : Tensor
        (M, S) normalised teacher embeddings (M may be 0).
    labels : Tensor
        (M,) int64 class of each embedding, in ``[0, C)``.

    Returns
    -------
    sums : Tensor
        (C, K, S) float32 sum of the embeddings assigned to each component.
    counts : Tensor
        (C, K) float32 number of embeddings assigned to each component.
    """
    c, k, s = mems_hat.shape
    with fp32(emb):
        e = emb.float()
        labels = labels.to(torch.int64)
        sims = torch.einsum("ms,mks->mk", e, mems_hat.float()[labels])  # (M, K)
        assign = sims.argmax(dim=1) if e.shape[0] > 0 else labels.new_zeros(0)
        flat = labels * k + assign
        sums = torch.zeros(c * k, s, device=e.device, dtype=torch.float32).index_add_(0, flat, e)
        counts = torch.zeros(c * k, device=e.device, dtype=torch.float32)
        counts.index_add_(0, flat, torch.ones_like(flat, dtype=torch.float32))
    return sums.view(c, k, s), counts.view(c, k)


def momentum_apply_reference(mems: Tensor, sums: Tensor, counts: Tensor, m: float) -> Tensor:
    """Momentum step ``c_k <- normalize(m * c_hat_k + (1 - m) * mean_k)`` for assigned components.

    Parameters
    ----------
    mems : Tensor
        (C, K, S) current memories (rows are normalised before mixing).
    sums, counts : Tensor
        (C, K, S) and (C, K) statistics from :func:`momentum_stats_reference` (possibly all-reduced).
    m : float
        Momentum in [0, 1).

    Returns
    -------
    Tensor
        (C, K, S) float32 new memories; components with zero count are returned unchanged.
    """
    with fp32(mems):
        c_hat = F.normalize(mems.float(), dim=-1)
        mean = sums.float() / counts.float().clamp_min(1.0)[..., None]
        upd = F.normalize(m * c_hat + (1.0 - m) * mean, dim=-1)
        return torch.where((counts > 0)[..., None], upd, mems.float())


def momentum_update_reference(mem: Tensor, emb: Tensor, m: float) -> Tensor:
    """Momentum update of one class memory with embeddings of that class.

    Parameters
    ----------
    mem : Tensor
        (K, S) memory.
    emb : Tensor
        (M, S) normalised embeddings of the memory's class.
    m : float
        Momentum.

    Returns
    -------
    Tensor
        (K, S) float32 updated memory.
    """
    labels = torch.zeros(emb.shape[0], dtype=torch.int64, device=emb.device)
    mems = mem[None]
    sums, counts = momentum_stats_reference(F.normalize(mems.float(), dim=-1), emb, labels)
    return momentum_apply_reference(mems, sums, counts, m)[0]
