"""Loss terms of MoMKD against values computed by hand / with numpy (docs/METHOD.md §2.4)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from momkd.losses import (
    align_loss,
    batched_commitment_loss,
    commitment_loss,
    orthogonality_loss,
    phi,
)


def _unit(rows: list[list[float]]) -> np.ndarray:
    a = np.asarray(rows, dtype=np.float64)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.tensor(a, dtype=torch.float32)


Z = _unit([[0.3, 1.0], [1.0, -0.2]])
C_POS = _unit([[1.0, 0.0], [0.0, 1.0]])
C_NEG = _unit([[0.6, 0.8], [-1.0, 0.0], [0.2, -1.0]])


def _phi_np(z: np.ndarray, c: np.ndarray, temp: float = 5.0) -> np.ndarray:
    return np.array([math.log(sum(math.exp(temp * float(zi @ ck)) for ck in c)) / temp for zi in z])


def test_phi_matches_numpy() -> None:
    got = phi(_t(Z), _t(C_NEG))
    np.testing.assert_allclose(got.numpy(), _phi_np(Z, C_NEG), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("label", [0, 1])
def test_align_loss_formula_both_labels(label: int) -> None:
    delta = _phi_np(Z, C_POS) - _phi_np(Z, C_NEG)
    s = 1.0 if label == 1 else -1.0
    # softplus(20 * (0.3 - s * Delta)), not divided by 20
    expected = np.array([math.log1p(math.exp(20.0 * (0.3 - s * d))) for d in delta])
    y = torch.full((2,), label, dtype=torch.int64)
    got = align_loss(_t(Z), y, _t(C_POS), _t(C_NEG))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-5)
    # the two labels are mirror images: swapping the memories swaps the labels
    got_swapped = align_loss(_t(Z), 1 - y, _t(C_NEG), _t(C_POS))
    np.testing.assert_allclose(got_swapped.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_align_loss_custom_constants_and_mixed_labels() -> None:
    delta = _phi_np(Z, C_POS, 2.0) - _phi_np(Z, C_NEG, 2.0)
    y = np.array([1, 0])
    s = 2.0 * y - 1.0
    expected = np.log1p(np.exp(7.0 * (0.1 - s * delta)))
    got = align_loss(_t(Z), torch.tensor(y), _t(C_POS), _t(C_NEG), margin=0.1, scale=7.0, temp=2.0)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_align_loss_gradient_reaches_both_memories() -> None:
    z = _t(Z).requires_grad_()
    cp = _t(C_POS).requires_grad_()
    cn = _t(C_NEG).requires_grad_()
    align_loss(z, torch.tensor([1, 0]), cp, cn).sum().backward()
    for g in (z.grad, cp.grad, cn.grad):
        assert g is not None and g.abs().sum() > 0


def test_commitment_loss_by_hand_uses_raw_rows() -> None:
    p = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    c = torch.tensor([[3.0, 0.0], [0.8, 0.1], [0.0, 2.0]], requires_grad=True)
    # p0: squared distances 4, 0.05, 5 -> row 1 (cosine would pick row 0); residual (0.2, -0.1)
    # p1: squared distances 10, 1.45, 1 -> row 2; residual (0, -1)
    expected = (0.04 + 0.01 + 0.0 + 1.0) / 4.0
    loss = commitment_loss(p, c)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert c.grad is None  # the target is detached: the memory never moves
    expected_grad = 2.0 / 4.0 * torch.tensor([[0.2, -0.1], [0.0, -1.0]])
    torch.testing.assert_close(p.grad, expected_grad)


def test_orthogonality_loss_by_hand() -> None:
    c = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    c_hat = c / c.norm(dim=1, keepdim=True)
    # Gram = [[1, s], [s, 1]] with s = 1/sqrt(2): mean of squares = (1 + .5 + .5 + 1) / 4, minus 1/K
    assert orthogonality_loss(c_hat).item() == pytest.approx(0.75 - 0.5, abs=1e-6)
    assert orthogonality_loss(torch.eye(3)).item() == pytest.approx(0.0, abs=1e-7)
    same = torch.tensor([[1.0, 0.0]] * 4)
    assert orthogonality_loss(same).item() == pytest.approx(1.0 - 0.25, abs=1e-6)


def test_batched_commitment_equals_mean_of_bags() -> None:
    g = torch.Generator().manual_seed(0)
    p = torch.nn.functional.normalize(torch.randn(9, 4, generator=g), dim=1)
    c_pos, c_neg = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    offsets = torch.tensor([0, 2, 7, 9])
    y = torch.tensor([1, 0, 1])
    got = batched_commitment_loss(p, c_pos, c_neg, y, offsets)
    per_bag = [
        commitment_loss(p[int(offsets[b]) : int(offsets[b + 1])], c_pos if y[b] == 1 else c_neg)
        for b in range(3)
    ]
    torch.testing.assert_close(got, torch.stack(per_bag).mean())
