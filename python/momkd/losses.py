"""Loss terms of MoMKD (docs/METHOD.md §2.4) as pure functions.

The weighted total is assembled in :meth:`momkd.model.MoMKD.loss`. Memory-related math runs in
float32. Notation: B bags, N patches, S sphere dim, K components per class memory, C classes.

The ``*_classes`` functions are the C-class forms of momkd's extension (docs/METHOD.md §2.11), in
eager PyTorch; with two classes they equal the binary functions (which dispatch to fused kernels).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from momkd.errors import DataError
from momkd.kernels.reference import (
    align_loss_reference,
    batched_commitment_loss_reference,
    commitment_loss_reference,
    fp32,
    nearest_raw_reference,
    phi_reference,
    segment_ids,
)

__all__ = [
    "align_loss",
    "align_loss_classes",
    "batched_commitment_loss",
    "batched_commitment_loss_classes",
    "class_phi",
    "commitment_loss",
    "cross_entropy",
    "nearest_raw",
    "orthogonality_loss",
    "orthogonality_loss_classes",
    "phi",
]


def phi(z: Tensor, c_hat: Tensor, temp: float = 5.0) -> Tensor:
    """Soft maximum similarity of embeddings to a memory.

    ``phi(z, C) = (1 / temp) * log sum_k exp(temp * <z, c_hat_k>)``.

    Parameters
    ----------
    z : Tensor
        (B, S) embeddings.
    c_hat : Tensor
        (K, S) normalised memory rows.
    temp : float
        Temperature (5 in the method).

    Returns
    -------
    Tensor
        (B,) float32.
    """
    return phi_reference(z, c_hat, temp)


def align_loss(
    z: Tensor,
    y: Tensor,
    c_pos_hat: Tensor,
    c_neg_hat: Tensor,
    margin: float = 0.3,
    scale: float = 20.0,
    temp: float = 5.0,
) -> Tensor:
    """Margin alignment of an embedding to its class memory.

    ``L = softplus(scale * (margin - s * Delta(z)))`` with ``Delta = phi(z, C+) - phi(z, C-)`` and
    ``s = +1`` for y = 1, ``-1`` for y = 0. The loss is not divided by ``scale``. No stop-gradient:
    the gradient reaches z and both memories.

    Parameters
    ----------
    z : Tensor
        (B, S) normalised embeddings.
    y : Tensor
        (B,) int64 labels in {0, 1}.
    c_pos_hat, c_neg_hat : Tensor
        (K, S) normalised memory rows.
    margin, scale, temp : float
        Defaults 0.3, 20, 5.

    Returns
    -------
    Tensor
        (B,) float32 loss per sample.
    """
    return align_loss_reference(z, y, c_pos_hat, c_neg_hat, margin, scale, temp)


def nearest_raw(p: Tensor, c_raw: Tensor) -> Tensor:
    """Index of the Euclidean-nearest raw (un-normalised) memory row for every patch.

    Parameters
    ----------
    p : Tensor
        (N, S) patch projections.
    c_raw : Tensor
        (K, S) raw memory rows.

    Returns
    -------
    Tensor
        (N,) int64 ``argmin_k ||p_i - c_k||`` (ties: lowest k).
    """
    return nearest_raw_reference(p, c_raw)


def commitment_loss(p: Tensor, c_y_raw: Tensor) -> Tensor:
    """Commitment of a bag's patch projections to its own class memory.

    ``k*_i = argmin_k ||p_i - c_k||`` on raw rows, ``L = mean_{i, s} (p_i - sg(c_{k*_i}))^2`` over all
    N x S entries. The target is detached: the loss moves the patches, never the memory.

    Parameters
    ----------
    p : Tensor
        (N, S) patch projections of one bag.
    c_y_raw : Tensor
        (K, S) raw rows of the bag's class memory.

    Returns
    -------
    Tensor
        () float32.
    """
    return commitment_loss_reference(p, c_y_raw)


def batched_commitment_loss(
    p: Tensor, c_pos_raw: Tensor, c_neg_raw: Tensor, y: Tensor, segment_offsets: Tensor
) -> Tensor:
    """Commitment loss per bag against the bag's own class memory, averaged over bags.

    Equals ``mean_b commitment_loss(p[bag b], C^{y_b})``, computed with masks over both memories.

    Parameters
    ----------
    p : Tensor
        (N, S) patch projections of B concatenated bags.
    c_pos_raw, c_neg_raw : Tensor
        (K, S) raw memory rows.
    y : Tensor
        (B,) int64 bag labels in {0, 1}.
    segment_offsets : Tensor
        (B + 1,) int64 bag offsets.

    Returns
    -------
    Tensor
        () float32.
    """
    return batched_commitment_loss_reference(p, c_pos_raw, c_neg_raw, y, segment_offsets)


def orthogonality_loss(c_y_hat: Tensor) -> Tensor:
    """Orthogonality regulariser of one class memory.

    ``L = mean over all K^2 pairs (j, k) of <c_j, c_k>^2, minus 1 / K``; the K diagonal pairs
    contribute exactly ``1 / K``, so the loss is zero for orthonormal rows.

    Parameters
    ----------
    c_y_hat : Tensor
        (K, S) normalised memory rows.

    Returns
    -------
    Tensor
        () float32.
    """
    with fp32(c_y_hat):
        c = c_y_hat.float()
        gram = c @ c.T
        return (gram**2).mean() - 1.0 / c.shape[0]


def cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """Mean cross-entropy: logits (B, C), y (B,) int64 -> ()."""
    return F.cross_entropy(logits.float(), y)


# ------------------------------------------------------------------ C classes (docs/METHOD.md §2.11)


def class_phi(z: Tensor, c_hats: Sequence[Tensor], temp: float = 5.0) -> Tensor:
    """Soft similarity of embeddings to every class memory.

    Parameters
    ----------
    z : Tensor
        (B, S) embeddings.
    c_hats : sequence of Tensor
        Indexed by class, normalised memories (K, S).
    temp : float
        Temperature of :func:`phi`.

    Returns
    -------
    Tensor
        (B, C) float32, column c = ``phi(z, C^c)``.
    """
    return torch.stack([phi_reference(z, c_hat, temp) for c_hat in c_hats], dim=1)


def align_loss_classes(
    z: Tensor,
    y: Tensor,
    c_hats: Sequence[Tensor],
    margin: float = 0.3,
    scale: float = 20.0,
    temp: float = 5.0,
) -> Tensor:
    """Margin alignment to the own class memory against every other class memory.

    ``Delta_y(z) = phi(z, C^y) - max_{c != y} phi(z, C^c)`` and
    ``L = softplus(scale * (margin - Delta_y(z)))``. With two classes ``Delta_y = s * Delta`` and
    this is :func:`align_loss`. No stop-gradient: the gradient reaches z, the own memory and the
    memory that attains the maximum over the other classes.

    Parameters
    ----------
    z : Tensor
        (B, S) normalised embeddings.
    y : Tensor
        (B,) int64 labels in ``[0, C)``.
    c_hats : sequence of Tensor
        Indexed by class, C >= 2 normalised memories (K, S).
    margin, scale, temp : float
        Defaults 0.3, 20, 5.

    Returns
    -------
    Tensor
        (B,) float32 loss per sample.
    """
    n_classes = len(c_hats)
    with fp32(z):
        phis = class_phi(z, c_hats, temp)  # (B, C)
        yy = y.to(phis.device, torch.int64).reshape(-1, 1)
        own = phis.gather(1, yy)[:, 0]
        if n_classes == 2:
            rival = phis.gather(1, 1 - yy)[:, 0]
        else:
            rival = phis.scatter(1, yy, -torch.inf).amax(dim=1)
        return F.softplus(scale * (margin - (own - rival)))


def batched_commitment_loss_classes(
    p: Tensor, c_raws: Sequence[Tensor], y: Tensor, segment_offsets: Tensor
) -> Tensor:
    """Commitment loss per bag against the bag's own class memory, averaged over bags.

    Equals ``mean_b commitment_loss(p[bag b], C^{y_b})`` for C class memories.

    Parameters
    ----------
    p : Tensor
        (N, S) patch projections of B concatenated bags.
    c_raws : sequence of Tensor
        Indexed by class, raw memory rows (K, S) (the detached targets).
    y : Tensor
        (B,) int64 bag labels in ``[0, C)``.
    segment_offsets : Tensor
        (B + 1,) int64 bag offsets.

    Returns
    -------
    Tensor
        () float32; gradient to ``p`` only.
    """
    n, s = p.shape
    seg, b = segment_ids(segment_offsets.to(p.device), n)
    y_patch = y.to(p.device, torch.int64)[seg]  # (N,)
    with fp32(p):
        target = torch.zeros(n, s, device=p.device, dtype=torch.float32)
        for c, c_raw in enumerate(c_raws):
            k_c = nearest_raw_reference(p, c_raw)
            target = torch.where((y_patch == c)[:, None], c_raw.detach().float()[k_c], target)
        per_patch = ((p.float() - target) ** 2).sum(dim=1)  # (N,)
        per_bag = torch.zeros(b, device=p.device, dtype=torch.float32).index_add(0, seg, per_patch)
        offs = segment_offsets.to(p.device, torch.int64)
        sizes = (offs[1:] - offs[:-1]).to(torch.float32)
        return (per_bag / (sizes * s)).mean()


def orthogonality_loss_classes(c_hats: Sequence[Tensor], y: Tensor) -> Tensor:
    """Orthogonality of each bag's own class memory, averaged over the B bags.

    ``(1/B) sum_c n_c * orthogonality_loss(C^c)`` with ``n_c`` the number of bags of class c.

    Parameters
    ----------
    c_hats : sequence of Tensor
        Indexed by class, normalised memories (K, S).
    y : Tensor
        (B,) int64 labels in ``[0, C)``.

    Returns
    -------
    Tensor
        () float32.
    """
    b = y.numel()
    if b == 0:
        raise DataError("orthogonality loss: no bags")
    yy = y.reshape(-1).to(torch.int64)
    total = c_hats[0].new_zeros((), dtype=torch.float32)
    for c, c_hat in enumerate(c_hats):
        n_c = (yy == c).to(torch.float32).sum().to(total.device)
        total = total + n_c * orthogonality_loss(c_hat)
    return total / b
