"""Gated-attention MIL (Ilse, Tomczak and Welling, ICML 2018): the ``method: abmil`` baseline.

Histology only. For a bag of patch features ``x`` (P, D)::

    h   = Dropout(ReLU(Linear(D -> H)(x)))                    (P, H)
    a   = tanh(Linear(H -> 128)(h))                           (P, 128)
    b   = sigmoid(Linear(H -> 128)(h))                        (P, 128)
    s   = Linear(128 -> 1)(a * b)                             (P,)
    w   = softmax of s over the bag's patches                 (P,)
    V   = sum_i w_i h_i                                       (H,)
    logits = Linear(H -> C)(V)                                (C,)

C = ``n_classes`` is 2 for binary labels and the number of classes otherwise (softmax head).

Several bags can be processed at once: their patches are concatenated and ``segment_offsets``
(B + 1,) marks where each bag starts; the softmax and the pooling then run per bag.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from momkd.errors import ConfigError

if TYPE_CHECKING:
    from momkd.config import RunConfig

__all__ = [
    "ABMIL",
    "ABMILConfig",
    "GatedAttentionPool",
    "MILOutput",
    "segment_ids",
    "segment_softmax",
    "segment_sum",
]


def segment_ids(segment_offsets: Tensor | None, n: int, device: torch.device) -> Tensor:
    """Bag index of every row.

    Parameters
    ----------
    segment_offsets : Tensor | None
        (B + 1,) int64, ``offsets[0] == 0`` and ``offsets[-1] == n``; ``None`` means one bag.
    n : int
        Number of rows (patches) N.
    device : torch.device
        Device of the result.

    Returns
    -------
    Tensor
        (N,) int64 bag index per row.
    """
    if segment_offsets is None:
        return torch.zeros(n, dtype=torch.long, device=device)
    offsets = segment_offsets.to(device=device, dtype=torch.long)
    if offsets.ndim != 1 or offsets.numel() < 2 or int(offsets[0]) != 0 or int(offsets[-1]) != n:
        raise ValueError(
            f"segment_offsets must be (B+1,) from 0 to {n}, got {tuple(offsets.tolist())[:8]}"
        )
    sizes = offsets[1:] - offsets[:-1]
    if bool((sizes <= 0).any()):
        raise ValueError("segment_offsets describe an empty bag")
    return torch.repeat_interleave(torch.arange(sizes.numel(), device=device), sizes)


def segment_softmax(scores: Tensor, seg: Tensor, n_segments: int) -> Tensor:
    """Softmax of ``scores`` within each segment.

    Parameters
    ----------
    scores : Tensor
        (N,) float.
    seg : Tensor
        (N,) int64 segment index of every entry.
    n_segments : int
        B, the number of segments.

    Returns
    -------
    Tensor
        (N,) weights summing to one within every segment.
    """
    seg_max = torch.full((n_segments,), float("-inf"), dtype=scores.dtype, device=scores.device)
    seg_max = seg_max.scatter_reduce(0, seg, scores.detach(), reduce="amax", include_self=True)
    ex = torch.exp(scores - seg_max[seg])
    denom = torch.zeros(n_segments, dtype=scores.dtype, device=scores.device).index_add(0, seg, ex)
    return ex / denom[seg]


def segment_sum(values: Tensor, seg: Tensor, n_segments: int) -> Tensor:
    """Sum the rows of ``values`` (N, H) per segment -> (B, H)."""
    out = torch.zeros(n_segments, values.shape[1], dtype=values.dtype, device=values.device)
    return out.index_add(0, seg, values)


class GatedAttentionPool(nn.Module):
    """Gated attention pooling: (N, H) features -> (B, H) bag vectors and (N,) weights."""

    def __init__(self, hidden: int, attn_dim: int = 128, dropout: float = 0.0) -> None:
        super().__init__()
        self.attention_a = nn.Sequential(nn.Linear(hidden, attn_dim), nn.Tanh())
        self.attention_b = nn.Sequential(nn.Linear(hidden, attn_dim), nn.Sigmoid())
        self.attention_drop = nn.Dropout(dropout)
        self.attention_c = nn.Linear(attn_dim, 1)

    def forward(self, h: Tensor, seg: Tensor, n_segments: int) -> tuple[Tensor, Tensor]:
        """Pool ``h`` (N, H) per segment; returns pooled (B, H) and attention (N,)."""
        gated = self.attention_drop(self.attention_a(h) * self.attention_b(h))
        scores = self.attention_c(gated).squeeze(-1)
        attention = segment_softmax(scores, seg, n_segments)
        pooled = segment_sum(attention.unsqueeze(-1) * h, seg, n_segments)
        return pooled, attention


@dataclass
class ABMILConfig:
    """Dimensions of the gated-attention MIL baseline (``n_classes`` C >= 2 outputs)."""

    d_in: int = 1536
    hidden: int = 512
    attn_dim: int = 128
    dropout: float = 0.25
    n_classes: int = 2

    def __post_init__(self) -> None:
        _check_n_classes(self.n_classes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_n_classes(n: Any) -> None:
    """Raise :class:`ConfigError` unless ``n`` is an integer number of classes >= 2."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 2:
        raise ConfigError(f"model.n_classes must be an integer >= 2, got {n!r}")


@dataclass
class MILOutput:
    """Output of a histology MIL model.

    Attributes
    ----------
    logits : Tensor
        (B, n_classes).
    attention : Tensor
        (N,) attention weight of every patch (sums to one per bag).
    pooled : Tensor
        (B, H) attention-pooled bag vectors.
    """

    logits: Tensor
    attention: Tensor
    pooled: Tensor


class ABMIL(nn.Module):
    """Gated-attention MIL classifier (histology only).

    Parameters
    ----------
    cfg : ABMILConfig
        Dimensions and dropout.
    """

    uses_expression = False
    uses_graph = False

    def __init__(self, cfg: ABMILConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.fc = nn.Sequential(nn.Linear(cfg.d_in, cfg.hidden), nn.ReLU(), nn.Dropout(cfg.dropout))
        self.pool = GatedAttentionPool(cfg.hidden, cfg.attn_dim, cfg.dropout)
        self.classifier = nn.Linear(cfg.hidden, cfg.n_classes)

    def forward(
        self,
        features: Tensor,
        edge_index: Tensor | None = None,
        expression: Tensor | None = None,
        segment_offsets: Tensor | None = None,
    ) -> MILOutput:
        """Classify one bag or several concatenated bags.

        Parameters
        ----------
        features : Tensor
            (N, D) patch features of one bag, or of B bags concatenated.
        edge_index : Tensor | None
            Ignored (accepted for a common interface with MoMKD).
        expression : Tensor | None
            Ignored (histology only).
        segment_offsets : Tensor | None
            (B + 1,) int64 bag boundaries; ``None`` for a single bag.

        Returns
        -------
        MILOutput
            logits (B, C), attention (N,), pooled (B, H).
        """
        del edge_index, expression
        seg = segment_ids(segment_offsets, features.shape[0], features.device)
        n_bags = 1 if segment_offsets is None else int(segment_offsets.numel()) - 1
        h = self.fc(features)
        pooled, attention = self.pool(h, seg, n_bags)
        return MILOutput(logits=self.classifier(pooled), attention=attention, pooled=pooled)

    def loss(
        self,
        out: MILOutput,
        y: Tensor,
        expression: Tensor | None = None,
        weights: Any = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Cross-entropy over the bags.

        Parameters
        ----------
        out : MILOutput
            The forward output for B bags.
        y : Tensor
            (B,) int64 labels in ``[0, C)``.
        expression, weights
            Ignored (common interface).

        Returns
        -------
        tuple[Tensor, dict[str, Tensor]]
            The total loss (scalar) and its terms (``ce``).
        """
        del expression, weights
        ce = F.cross_entropy(out.logits, y)
        return ce, {"ce": ce.detach()}

    @torch.no_grad()
    def predict(self, features: Tensor, edge_index: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Histology-only prediction for one bag: class probabilities (C,) and attention (N,)."""
        out = self.forward(features, edge_index)
        return torch.softmax(out.logits[0], dim=-1), out.attention


# ------------------------------------------------------------- hooks of the method registry


def params_from_config(cfg: RunConfig, method: str, d_in: int, genes: int | None) -> dict[str, Any]:
    """:class:`ABMILConfig` arguments from a run configuration (:mod:`momkd.methods`)."""
    m = cfg.model
    return {
        "d_in": d_in,
        "hidden": m.hidden,
        "attn_dim": m.attention_dim,
        "dropout": m.dropout,
        "n_classes": cfg.n_classes,
    }


def build(params: dict[str, Any]) -> ABMIL:
    """The model of :func:`params_from_config`'s arguments (as stored in a checkpoint)."""
    return ABMIL(ABMILConfig(**params))
