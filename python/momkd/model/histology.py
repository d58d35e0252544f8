"""Histology branch of MoMKD (docs/METHOD.md §2.2): graph encoder, sphere projectors and classifier."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

with warnings.catch_warnings():
    # PyG scripts a few helpers at import time, which recent torch reports as deprecated; the
    # warning concerns PyG's internals, not anything momkd (or its users) can act on.
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)
    from torch_geometric.nn import GATv2Conv

__all__ = ["INPUT_RESIDUALS", "GraphEncoder", "SphereProjector", "make_classifier"]

#: Choices of the first residual branch: ``auto`` (the released rule: identity when D_in = H, else a
#: Linear) or ``linear`` (always a Linear, as momkd built it before following that rule).
INPUT_RESIDUALS = ("auto", "linear")


class GraphEncoder(nn.Module):
    """Two GATv2 layers with LayerNorm, ELU, dropout and residuals (the G-encoder).

    ``h1 = Dropout(ELU(LN1(GAT1(x)))) + res_proj1(x)``, ``h2 = Dropout(ELU(LN2(GAT2(h1)))) + h1``,
    ``F = max(h1, h2)`` elementwise. Each GATv2 layer has 2 heads of width H/2, concatenated, with
    attention dropout and self-loops added inside the layer (PyG ``GATv2Conv`` semantics).

    ``res_proj1`` is ``Linear(D_in, H)``, except that with ``input_residual="auto"`` and
    ``D_in == H`` it is the identity (no parameters), as in the authors' released encoder
    (docs/METHOD.md §2.2).

    Parameters
    ----------
    d_in : int
        Patch feature dimension D_in.
    hidden : int
        Output width H (even).
    dropout : float
        Dropout after the activation.
    attn_dropout : float
        Dropout on the GATv2 attention coefficients.
    heads : int
        Attention heads per layer.
    input_residual : {"auto", "linear"}
        ``auto``: identity residual when ``d_in == hidden``, else a Linear; ``linear``: always a
        Linear.
    """

    def __init__(
        self,
        d_in: int,
        hidden: int,
        dropout: float = 0.5,
        attn_dropout: float = 0.5,
        heads: int = 2,
        input_residual: str = "auto",
    ) -> None:
        super().__init__()
        if input_residual not in INPUT_RESIDUALS:
            raise ValueError(
                f"input_residual must be one of {INPUT_RESIDUALS}, got {input_residual!r}"
            )
        width = hidden // heads
        self.gat1 = GATv2Conv(
            d_in, width, heads=heads, concat=True, dropout=attn_dropout, add_self_loops=True
        )
        self.ln1 = nn.LayerNorm(hidden)
        self.res_proj1: nn.Module = (
            nn.Identity()
            if input_residual == "auto" and d_in == hidden
            else nn.Linear(d_in, hidden)
        )
        self.gat2 = GATv2Conv(
            hidden, width, heads=heads, concat=True, dropout=attn_dropout, add_self_loops=True
        )
        self.ln2 = nn.LayerNorm(hidden)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        """Encode patches.

        Parameters
        ----------
        x : Tensor
            (N, D_in) patch features (one bag or several disjoint bags).
        edge_index : Tensor
            (2, E) int64, row 0 source, row 1 target, indices into the N patches.

        Returns
        -------
        Tensor
            (N, H) features F.
        """
        h1 = self.dropout(F.elu(self.ln1(self.gat1(x, edge_index)))) + self.res_proj1(x)
        h2 = self.dropout(F.elu(self.ln2(self.gat2(h1, edge_index)))) + h1
        return torch.maximum(h1, h2)


class SphereProjector(nn.Module):
    """``x -> normalize(Linear(x))``: projection onto the shared unit sphere of dimension S.

    Parameters
    ----------
    d_in : int
        Input width.
    sphere : int
        Sphere dimension S.
    """

    def __init__(self, d_in: int, sphere: int) -> None:
        super().__init__()
        self.linear = nn.Linear(d_in, sphere)

    def forward(self, x: Tensor) -> Tensor:
        """(..., d_in) -> (..., S) unit-norm rows."""
        return F.normalize(self.linear(x), dim=-1)


def make_classifier(
    hidden: int, width: int = 128, n_classes: int = 2, dropout: float = 0.5
) -> nn.Sequential:
    """``LayerNorm(H) -> Linear(H, width) -> ReLU -> Dropout -> Linear(width, n_classes)``.

    Maps the pooled slide vector (B, H) to logits (B, n_classes).
    """
    return nn.Sequential(
        nn.LayerNorm(hidden),
        nn.Linear(hidden, width),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(width, n_classes),
    )
