"""Loss terms of MoMKD (docs/METHOD.md §2.4) as pure functions.

The weighted total is assembled in :meth:`momkd.model.MoMKD.loss`. Memory-related math runs in
float32. Notation: B bags, N patches, S sphere dim, K components per class memory.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from momkd.kernels.reference import (
    align_loss_reference,
    batched_commitment_loss_reference,
    commitment_loss_reference,
    fp32,
    nearest_raw_reference,
    phi_reference,
)

__all__ = [
    "align_loss",
    "batched_commitment_loss",
    "commitment_loss",
    "cross_entropy",
    "nearest_raw",
    "orthogonality_loss",
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
    """Mean cross-entropy: logits (B, 2), y (B,) int64 -> ()."""
    return F.cross_entropy(logits.float(), y)
