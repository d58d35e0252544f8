"""Omics branch of MoMKD (docs/METHOD.md §2.1): expression encoder, decoder and sphere normaliser.

Used during training only; inference never touches it.
"""

from __future__ import annotations

from torch import Tensor, nn

from momkd.model.histology import SphereProjector

__all__ = ["OmicsDecoder", "OmicsEncoder", "SphereProjector"]


class OmicsEncoder(nn.Module):
    """``Linear(G, hid) -> LayerNorm -> ReLU -> Dropout -> Linear(hid, R)``.

    Parameters
    ----------
    genes : int
        Number of genes G.
    width : int
        Output width R.
    hidden : int
        Intermediate width (512 in the method).
    dropout : float
        Dropout probability (0.25 in the method).
    """

    def __init__(self, genes: int, width: int, hidden: int = 512, dropout: float = 0.25) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(genes, hidden),
            nn.LayerNorm(hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, width),
        )

    def forward(self, g: Tensor) -> Tensor:
        """(B, G) expression -> (B, R) omics features."""
        return self.net(g)  # type: ignore[no-any-return]


class OmicsDecoder(nn.Module):
    """``Linear(R, hid) -> LayerNorm -> ReLU -> Dropout -> Linear(hid, G)`` (reconstruction head).

    Parameters
    ----------
    width : int
        Input width R.
    genes : int
        Number of genes G.
    hidden : int
        Intermediate width.
    dropout : float
        Dropout probability.
    """

    def __init__(self, width: int, genes: int, hidden: int = 512, dropout: float = 0.25) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(width, hidden),
            nn.LayerNorm(hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, genes),
        )

    def forward(self, h: Tensor) -> Tensor:
        """(B, R) omics features -> (B, G) reconstructed expression."""
        return self.net(h)  # type: ignore[no-any-return]
