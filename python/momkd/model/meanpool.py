"""Mean pooling: the ``method: meanpool`` baseline, the floor every MIL method must clear.

Histology only. For a bag of (already standardised) patch features ``x`` (P, D)::

    m      = mean_i x_i                                       (D,)
    logits = Linear(D -> C)(m)                                (hidden null: a linear model)
    logits = Linear(h -> C)(Dropout(ReLU(Linear(D -> h)(m)))) (hidden h: a one-hidden-layer MLP)

C = ``n_classes`` is 2 for binary labels and the number of classes otherwise (softmax head; with a
linear head and C > 2 a multinomial logistic regression).

With the linear head this is an L2-regularised logistic regression on each slide's mean patch
feature (weight decay plays the role of the L2 penalty), trained by the same protocol as every
other method. Attention MIL contains it as the special case of uniform attention.

Several bags can be processed at once: their patches are concatenated and ``segment_offsets``
(B + 1,) marks where each bag starts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from momkd.model.abmil import MILOutput, _check_n_classes, segment_ids, segment_sum

if TYPE_CHECKING:
    from momkd.config import RunConfig

__all__ = ["MeanPool", "MeanPoolConfig"]


@dataclass
class MeanPoolConfig:
    """Dimensions of the mean-pool baseline (``hidden`` None: linear head)."""

    d_in: int = 1536
    hidden: int | None = None
    dropout: float = 0.0
    n_classes: int = 2

    def __post_init__(self) -> None:
        _check_n_classes(self.n_classes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class MeanPool(nn.Module):
    """Mean of the patch features followed by a linear head or a one-hidden-layer MLP.

    Parameters
    ----------
    cfg : MeanPoolConfig
        Input dimension, optional hidden width and dropout.
    """

    uses_expression = False
    uses_graph = False

    def __init__(self, cfg: MeanPoolConfig) -> None:
        super().__init__()
        self.cfg = cfg
        if cfg.hidden is None:
            self.head: nn.Module = nn.Linear(cfg.d_in, cfg.n_classes)
        else:
            self.head = nn.Sequential(
                nn.Linear(cfg.d_in, cfg.hidden),
                nn.ReLU(),
                nn.Dropout(cfg.dropout),
                nn.Linear(cfg.hidden, cfg.n_classes),
            )

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
        edge_index, expression : Tensor | None
            Ignored (common interface with the other methods).
        segment_offsets : Tensor | None
            (B + 1,) int64 bag boundaries; ``None`` for a single bag.

        Returns
        -------
        MILOutput
            logits (B, C), attention (N,) uniform within each bag, pooled (B, D) bag means.
        """
        del edge_index, expression
        n = features.shape[0]
        seg = segment_ids(segment_offsets, n, features.device)
        n_bags = 1 if segment_offsets is None else int(segment_offsets.numel()) - 1
        sizes = torch.bincount(seg, minlength=n_bags).to(features.dtype)
        attention = (1.0 / sizes)[seg]
        pooled = segment_sum(attention.unsqueeze(-1) * features, seg, n_bags)
        return MILOutput(logits=self.head(pooled), attention=attention, pooled=pooled)

    def loss(
        self,
        out: MILOutput,
        y: Tensor,
        expression: Tensor | None = None,
        weights: Any = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Cross-entropy over the bags; returns the loss and its terms (``ce``)."""
        del expression, weights
        ce = F.cross_entropy(out.logits, y)
        return ce, {"ce": ce.detach()}


# ------------------------------------------------------------- hooks of the method registry


def params_from_config(cfg: RunConfig, method: str, d_in: int, genes: int | None) -> dict[str, Any]:
    """:class:`MeanPoolConfig` arguments from a run configuration (:mod:`momkd.methods`)."""
    return {
        "d_in": d_in,
        "hidden": cfg.model.meanpool_hidden,
        "dropout": cfg.model.dropout,
        "n_classes": cfg.n_classes,
    }


def build(params: dict[str, Any]) -> MeanPool:
    """The model of :func:`params_from_config`'s arguments (as stored in a checkpoint)."""
    return MeanPool(MeanPoolConfig(**params))
