"""Gradient routing of every loss term, one at a time (docs/METHOD.md §2.4).

The memory is detached in the attention path and in the commitment target; nothing else is
detached. Each term alone is back-propagated and the set of parameter groups that receive a
non-zero gradient is compared with the groups the term may reach.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from momkd.model import ModelConfig, MoMKD

GROUPS = {
    "histology_encoder": "histology_encoder.",
    "patch_projector": "patch_projector.",
    "pool_projector": "pool_projector.",
    "classifier": "classifier.",
    "tau": "log_tau",
    "memory_pos": "memory.pos",
    "memory_neg": "memory.neg",
    "omics_encoder": "omics_encoder.",
    "omics_projector": "omics_projector.",
    "omics_decoder": "omics_decoder.",
}

HISTOLOGY = {"histology_encoder", "patch_projector"}

# z_w pools the encoder features with the attention weights, which depend on the patch projections
# and tau; only the memory is detached in that path, so align_wsi reaches them too.
EXPECTED = {
    "ce": HISTOLOGY | {"classifier", "tau"},
    "commit": HISTOLOGY,
    "align_omics": {"omics_encoder", "omics_projector", "memory_pos", "memory_neg"},
    "align_wsi": HISTOLOGY | {"pool_projector", "tau", "memory_pos", "memory_neg"},
    "mse": {"omics_encoder", "omics_decoder"},
}


def _bag(n: int = 9, d: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    x = torch.tensor(rng.normal(size=(n, d)), dtype=torch.float32)
    src = np.repeat(np.arange(n), 3)
    dst = (src + np.tile([1, 2, 3], n)) % n
    return x, torch.tensor(np.stack([src, dst]), dtype=torch.int64)


def _reached(model: MoMKD) -> set[str]:
    reached = set()
    for name, param in model.named_parameters():
        if param.grad is None or not bool(param.grad.abs().sum() > 0):
            continue
        for group, prefix in GROUPS.items():
            if name.startswith(prefix):
                reached.add(group)
    return reached


def _term_gradients(term: str, y: int) -> set[str]:
    torch.manual_seed(0)
    cfg = ModelConfig(
        d_in=12,
        hidden=8,
        omics_width=6,
        sphere=4,
        memory_k=3,
        genes=10,
        omics_hidden=7,
        classifier_hidden=5,
    )
    model = MoMKD(cfg).eval()  # dropout off: routing is structural, not stochastic
    names = {n for n, _ in model.named_parameters()}
    assert all(any(n.startswith(p) for p in GROUPS.values()) for n in names)
    x, ei = _bag()
    g = torch.randn(10)
    out = model(x, ei, g)
    _, terms = model.loss(out, torch.tensor([y]), g)
    model.zero_grad(set_to_none=True)
    terms[term].backward()
    return _reached(model)


@pytest.mark.parametrize("term", sorted(EXPECTED))
@pytest.mark.parametrize("y", [0, 1])
def test_term_reaches_exactly_its_groups(term: str, y: int) -> None:
    assert _term_gradients(term, y) == EXPECTED[term]


@pytest.mark.parametrize("y,own", [(1, "memory_pos"), (0, "memory_neg")])
def test_orthogonality_reaches_only_own_class_memory(y: int, own: str) -> None:
    assert _term_gradients("orth", y) == {own}


def test_ce_never_reaches_memory_or_omics() -> None:
    reached = _term_gradients("ce", 1)
    assert not reached & {
        "memory_pos",
        "memory_neg",
        "omics_encoder",
        "omics_projector",
        "omics_decoder",
        "pool_projector",
    }


def test_memory_moves_only_through_alignment_and_orthogonality() -> None:
    movers = {
        t
        for t in ("ce", "commit", "align_omics", "align_wsi", "mse", "orth")
        if _term_gradients(t, 1) & {"memory_pos", "memory_neg"}
    }
    assert movers == {"align_omics", "align_wsi", "orth"}
