"""Batch-local knowledge distillation: the ``method: batchkd`` baseline (docs/METHOD.md §2.7).

The kind of genomics-to-histology distillation MoMKD argues against: the teacher's knowledge reaches
the student only through comparisons *within the current mini-batch* of B bags, so what the student
learns depends on which slides happen to share a batch.

Teacher (training only): the MoMKD omics encoder
``Linear(G -> 512) -> LayerNorm -> ReLU -> Dropout -> Linear(512 -> R)`` giving ``t`` (B, R), and a
teacher classifier ``LayerNorm -> Linear(R -> 128) -> ReLU -> Dropout -> Linear(128 -> C)``.

Student (the only part used at inference): gated-attention MIL as :class:`~momkd.model.abmil.ABMIL`
giving the slide embedding ``V`` (B, H) and logits ``s`` (B, C). C = ``n_classes`` (2 for binary
labels); both heads are softmax heads and the logit distillation runs over the C classes.

Loss for a mini-batch with labels y::

    L = CE(s, y) + CE(t_logits, y) + lambda * (L_rkd + L_kd)
    L_rkd = mean_{i,j} (cos(V_i, V_j) - sg(cos(t_i, t_j)))^2      (B x B relational KD)
    L_kd  = T^2 * KL(softmax(sg(t_logits) / T) || softmax(s / T))  (logit KD, batch mean)

``sg`` is stop-gradient: the teacher is trained only by its own cross-entropy and is never pulled
towards the student. With B = 1 the relational term is identically zero (a 1 x 1 matrix of ones), so
the baseline is run with mini-batches of ``model.batchkd_batch`` bags (8 by default).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from momkd.errors import ConfigError, DataError
from momkd.model.abmil import GatedAttentionPool, _check_n_classes, segment_ids
from momkd.model.histology import make_classifier
from momkd.model.omics import OmicsEncoder

if TYPE_CHECKING:
    from momkd.config import RunConfig

__all__ = ["BatchKD", "BatchKDConfig", "BatchKDOutput", "logit_kd_loss", "relational_kd_loss"]


@dataclass
class BatchKDConfig:
    """Dimensions and distillation settings of the batch-local KD baseline."""

    d_in: int = 1536
    hidden: int = 512
    attn_dim: int = 128
    dropout: float = 0.25
    genes: int = 768
    omics_width: int = 512
    omics_hidden: int = 512
    omics_dropout: float = 0.25
    classifier_hidden: int = 128
    temperature: float = 2.0
    kd_weight: float = 1.0
    n_classes: int = 2

    def __post_init__(self) -> None:
        _check_n_classes(self.n_classes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class BatchKDOutput:
    """Output of :meth:`BatchKD.forward` for B bags with N patches in total.

    Attributes
    ----------
    logits : Tensor
        (B, C) student logits (histology only).
    attention : Tensor
        (N,) student attention weights.
    pooled : Tensor
        (B, H) student slide embeddings V.
    teacher_logits : Tensor | None
        (B, C), or None without expression.
    teacher_embedding : Tensor | None
        (B, R), or None without expression.
    """

    logits: Tensor
    attention: Tensor
    pooled: Tensor
    teacher_logits: Tensor | None = None
    teacher_embedding: Tensor | None = None


def relational_kd_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Match the B x B cosine-similarity matrices of two sets of slide embeddings.

    Parameters
    ----------
    student : Tensor
        (B, H) student embeddings.
    teacher : Tensor
        (B, R) teacher embeddings (detached inside).

    Returns
    -------
    Tensor
        () mean over the B^2 entries of the squared difference.
    """
    s = F.normalize(student, dim=-1)
    t = F.normalize(teacher.detach(), dim=-1)
    return ((s @ s.T - t @ t.T) ** 2).mean()


def logit_kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Hinton logit distillation ``T^2 * KL(p_teacher^T || p_student^T)``, averaged over bags.

    Parameters
    ----------
    student_logits, teacher_logits : Tensor
        (B, C); the teacher is detached.
    temperature : float
        T > 0.

    Returns
    -------
    Tensor
        () loss.
    """
    t = temperature
    log_p_s = F.log_softmax(student_logits / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.detach() / t, dim=-1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (t * t)


class BatchKD(nn.Module):
    """Omics teacher + gated-attention histology student, aligned within each mini-batch.

    Parameters
    ----------
    cfg : BatchKDConfig
        Dimensions and distillation settings.
    """

    uses_expression = True
    uses_graph = False

    def __init__(self, cfg: BatchKDConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.fc = nn.Sequential(nn.Linear(cfg.d_in, cfg.hidden), nn.ReLU(), nn.Dropout(cfg.dropout))
        self.pool = GatedAttentionPool(cfg.hidden, cfg.attn_dim, cfg.dropout)
        self.classifier = nn.Linear(cfg.hidden, cfg.n_classes)
        self.omics_encoder = OmicsEncoder(
            cfg.genes, cfg.omics_width, cfg.omics_hidden, cfg.omics_dropout
        )
        self.teacher_classifier = make_classifier(
            cfg.omics_width, cfg.classifier_hidden, cfg.n_classes, cfg.omics_dropout
        )

    def forward(
        self,
        features: Tensor,
        edge_index: Tensor | None = None,
        expression: Tensor | None = None,
        segment_offsets: Tensor | None = None,
    ) -> BatchKDOutput:
        """Student on the bags; teacher on the expression when given.

        Parameters
        ----------
        features : Tensor
            (N, D) patch features of B concatenated bags.
        edge_index : Tensor | None
            Ignored (common interface).
        expression : Tensor | None
            (B, G) or (G,) preprocessed expression; None at inference.
        segment_offsets : Tensor | None
            (B + 1,) int64 bag boundaries; None for one bag.

        Returns
        -------
        BatchKDOutput
        """
        del edge_index
        seg = segment_ids(segment_offsets, features.shape[0], features.device)
        n_bags = 1 if segment_offsets is None else int(segment_offsets.numel()) - 1
        h = self.fc(features)
        pooled, attention = self.pool(h, seg, n_bags)
        out = BatchKDOutput(logits=self.classifier(pooled), attention=attention, pooled=pooled)
        if expression is not None:
            g = expression.unsqueeze(0) if expression.dim() == 1 else expression
            if g.shape != (n_bags, self.cfg.genes):
                raise DataError(
                    f"expression: expected shape ({n_bags}, {self.cfg.genes}), got "
                    f"{tuple(expression.shape)}"
                )
            emb = self.omics_encoder(g.float())
            out.teacher_embedding = emb
            out.teacher_logits = self.teacher_classifier(emb)
        return out

    def loss(
        self,
        out: BatchKDOutput,
        y: Tensor,
        expression: Tensor | None = None,
        weights: Any = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Student CE + teacher CE + ``kd_weight * (relational KD + logit KD)``.

        Parameters
        ----------
        out : BatchKDOutput
            Forward output of B bags (with expression for the teacher terms).
        y : Tensor
            (B,) int64 labels in ``[0, C)``.
        expression, weights
            Unused (the teacher output is already in ``out``).

        Returns
        -------
        tuple[Tensor, dict[str, Tensor]]
            Total loss and the unweighted terms ``ce``, ``teacher_ce``, ``rkd``, ``kd``.
        """
        del expression, weights
        ce = F.cross_entropy(out.logits, y)
        zero = ce.new_zeros(())
        if out.teacher_logits is None or out.teacher_embedding is None:
            terms = {"ce": ce, "teacher_ce": zero, "rkd": zero, "kd": zero}
            return ce, {k: v.detach() for k, v in terms.items()}
        teacher_ce = F.cross_entropy(out.teacher_logits, y)
        rkd = relational_kd_loss(out.pooled, out.teacher_embedding)
        kd = logit_kd_loss(out.logits, out.teacher_logits, self.cfg.temperature)
        total = ce + teacher_ce + self.cfg.kd_weight * (rkd + kd)
        terms = {"ce": ce, "teacher_ce": teacher_ce, "rkd": rkd, "kd": kd}
        return total, {k: v.detach() for k, v in terms.items()}

    @torch.no_grad()
    def predict(self, features: Tensor, edge_index: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Histology-only prediction for one bag: probabilities (C,) and attention (N,)."""
        out = self.forward(features)
        return torch.softmax(out.logits[0], dim=-1), out.attention


# ------------------------------------------------------------- hooks of the method registry


def params_from_config(cfg: RunConfig, method: str, d_in: int, genes: int | None) -> dict[str, Any]:
    """:class:`BatchKDConfig` arguments from a run configuration (:mod:`momkd.methods`).

    Raises
    ------
    ConfigError
        No expression (``genes`` None).
    """
    if genes is None:
        raise ConfigError("data.expression: required by method batchkd")
    m = cfg.model
    return {
        "d_in": d_in,
        "hidden": m.hidden,
        "attn_dim": m.attention_dim,
        "dropout": m.dropout,
        "genes": genes,
        "omics_width": m.omics_width,
        "omics_hidden": m.omics_hidden,
        "omics_dropout": m.omics_dropout,
        "classifier_hidden": m.classifier_hidden,
        "temperature": m.batchkd_temperature,
        "kd_weight": cfg.loss.batchkd,
        "n_classes": cfg.n_classes,
    }


def build(params: dict[str, Any]) -> BatchKD:
    """The model of :func:`params_from_config`'s arguments (as stored in a checkpoint)."""
    return BatchKD(BatchKDConfig(**params))


def batch_size(cfg: RunConfig) -> int:
    """Bags per optimizer step: ``model.batchkd_batch`` when ``train.batch_size`` is left at 1
    (the alignment is meaningless within a single bag), else ``train.batch_size``."""
    if cfg.train.batch_size == 1:
        return int(cfg.model.batchkd_batch)
    return int(cfg.train.batch_size)
