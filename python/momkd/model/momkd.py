"""The MoMKD model (docs/METHOD.md §2): histology branch, omics branch, class memory and losses.

Data flow for B bags of N patches in total::

    features (N, D_in) --G-encoder--> F (N, H) --patch projector--> p (N, S)
    p, F, memory (detached) --memory attention (segment softmax)--> a (N,), V (B, H)
    V --classifier--> logits (B, 2);   V --pool projector--> z_w (B, S)
    expression (B, G) --omics encoder--> (B, R) --normaliser--> z_o (B, S); --decoder--> recon (B, G)

Inference needs only the first three lines (no omics).

With C > 2 classes (momkd's extension, docs/METHOD.md §2.11) there is one memory per class and one
attention map per class: a (N, C), V (B, C * H), logits (B, C). The fused kernels cover two classes;
C > 2 runs the eager functions of :mod:`momkd.memory` and :mod:`momkd.losses`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from momkd import kernels
from momkd.errors import ConfigError, DataError
from momkd.losses import (
    align_loss_classes,
    batched_commitment_loss_classes,
    class_phi,
    orthogonality_loss,
    orthogonality_loss_classes,
)
from momkd.memory import (
    MEMORY_MODES,
    ClassMemory,
    ReduceFn,
    attention_maps,
    kmeans_class_memories,
    memory_attention_pool_classes,
)
from momkd.model.histology import (
    INPUT_RESIDUALS,
    GraphEncoder,
    SphereProjector,
    make_classifier,
)
from momkd.model.omics import OmicsDecoder, OmicsEncoder

if TYPE_CHECKING:
    from momkd.config import RunConfig

__all__ = ["LossWeights", "MoMKD", "MoMKDOutput", "ModelConfig"]

logger = logging.getLogger(__name__)

MOMENTUM_SOURCES = ("omics", "wsi")

_NOTED_EAGER = False


def _note_eager(n_classes: int) -> None:
    """Log once per process that C > 2 classes run the eager memory math."""
    global _NOTED_EAGER
    if not _NOTED_EAGER:
        _NOTED_EAGER = True
        logger.info(
            "%d classes: the fused memory kernels cover two classes; the memory attention and "
            "losses run the eager PyTorch implementation",
            n_classes,
        )


_T = TypeVar("_T", "ModelConfig", "LossWeights")


def _replace(obj: _T, section: str, overrides: dict[str, Any]) -> _T:
    names = {f.name for f in dataclasses.fields(obj)}
    for key in overrides:
        if key not in names:
            raise ConfigError(f"{section}: unknown key {key!r}; known keys: {sorted(names)}")
    return dataclasses.replace(obj, **overrides)


@dataclass
class ModelConfig:
    """Dimensions and hyper-parameters of MoMKD (defaults = the released implementation).

    ``omics_hidden`` is the intermediate width of the omics encoder and decoder (512 in the method).
    ``n_classes`` is the number of classes C (one memory each; C > 2 is momkd's extension,
    docs/METHOD.md §2.11).
    ``momentum_sources`` selects the teacher embeddings of the momentum update: ``omics`` (z_o)
    and/or ``wsi`` (z_w). ``input_residual`` is the encoder's first residual: ``auto`` (identity
    when ``d_in == hidden``, else a Linear, as released) or ``linear`` (always a Linear).
    """

    d_in: int = 1536
    hidden: int = 512
    omics_width: int = 512
    sphere: int = 64
    memory_k: int = 16
    genes: int = 768
    dropout: float = 0.5
    omics_dropout: float = 0.25
    attn_dropout: float = 0.5
    tau_init: float = 0.2
    tau_min: float = 0.01
    tau_max: float = 2.0
    classifier_hidden: int = 128
    n_classes: int = 2
    memory_update: str = "gradient"
    momentum: float = 0.99
    dead_after: int = 100
    momentum_sources: tuple[str, ...] = ("omics",)
    omics_hidden: int = 512
    input_residual: str = "auto"
    omics: bool = True

    def __post_init__(self) -> None:
        self.momentum_sources = tuple(self.momentum_sources)
        keys = ["d_in", "hidden", "sphere", "memory_k", "classifier_hidden", "dead_after"]
        if self.omics:
            keys += ["omics_width", "genes", "omics_hidden"]
        elif "omics" in self.momentum_sources:
            raise ConfigError(
                "memory.momentum_sources: 'omics' needs the omics branch (method momkd_histo has "
                "none; use [wsi])"
            )
        for key in keys:
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"model.{key} must be a positive integer, got {value!r}")
        if self.hidden % 2:
            raise ConfigError(f"model.hidden must be even (2 attention heads), got {self.hidden}")
        if (
            not isinstance(self.n_classes, int)
            or isinstance(self.n_classes, bool)
            or self.n_classes < 2
        ):
            raise ConfigError(f"model.n_classes must be an integer >= 2, got {self.n_classes!r}")
        for key in ("dropout", "omics_dropout", "attn_dropout"):
            value = getattr(self, key)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"model.{key} must lie in [0, 1), got {value!r}")
        if not 0.0 < self.tau_min < self.tau_max:
            raise ConfigError(
                f"model.tau_min/tau_max must satisfy 0 < tau_min < tau_max, got "
                f"{self.tau_min}, {self.tau_max}"
            )
        if not self.tau_init > 0.0:
            raise ConfigError(f"model.tau_init must be > 0, got {self.tau_init}")
        if self.memory_update not in MEMORY_MODES:
            raise ConfigError(
                f"memory.update must be one of {list(MEMORY_MODES)}, got {self.memory_update!r}"
            )
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"memory.momentum must lie in [0, 1), got {self.momentum}")
        if self.input_residual not in INPUT_RESIDUALS:
            raise ConfigError(
                f"model.input_residual must be one of {list(INPUT_RESIDUALS)}, got "
                f"{self.input_residual!r}"
            )
        bad = [s for s in self.momentum_sources if s not in MOMENTUM_SOURCES]
        if bad or not self.momentum_sources:
            raise ConfigError(
                f"memory.momentum_sources must be a non-empty subset of {list(MOMENTUM_SOURCES)}, "
                f"got {list(self.momentum_sources)}"
            )

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """``official`` (the released code's dims, the defaults) or ``paper`` (H=256, S=128)."""
        if name == "official":
            base = cls()
        elif name == "paper":
            base = cls(hidden=256, sphere=128)
        else:
            raise ConfigError(f"model preset must be 'official' or 'paper', got {name!r}")
        return _replace(base, "model", overrides)


@dataclass
class LossWeights:
    """Loss weights and alignment constants (docs/METHOD.md §2.4).

    ``L = ce*L_ce + mem*(L_commit + orth*L_orth) + align_omics*L_align^omics
    + align_wsi*L_align^wsi + mse*L_mse``.
    """

    ce: float = 0.5
    mem: float = 0.1
    align_omics: float = 0.05
    align_wsi: float = 0.2
    mse: float = 0.05
    orth: float = 10.0
    align_margin: float = 0.3
    align_scale: float = 20.0
    align_temp: float = 5.0

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> LossWeights:
        """``official`` (defaults) or ``paper`` (mse = 0.01)."""
        if name == "official":
            base = cls()
        elif name == "paper":
            base = cls(mse=0.01)
        else:
            raise ConfigError(f"loss preset must be 'official' or 'paper', got {name!r}")
        return _replace(base, "loss", overrides)


@dataclass
class MoMKDOutput:
    """Outputs of :meth:`MoMKD.forward` for B bags with N patches in total.

    With two classes the shapes are those of the paper's model; with C > 2 classes (docs/METHOD.md
    §2.11) there is one attention map per class.

    Attributes
    ----------
    logits : (B, C)
    attention : (N,) attention weights, summing to 1 within each bag; (N, C) for C > 2, column c
        the map of class c
    score : (N,) memory score; (N, C) one-vs-rest scores for C > 2
    patch_proj : (N, S) normalised patch projections p
    features : (N, H) encoder features F
    pooled : (B, H) attention-pooled features V; (B, C * H), the maps' V concatenated, for C > 2
    z_w : (B, S) normalised slide embedding
    z_o : (B, S) normalised omics embedding, or None without expression
    recon : (B, G) reconstructed expression, or None without expression
    assign : tuple of C (N,) int64, indexed by class: argmax-cosine component of each class memory
        per patch (``assign[1]`` is C+, ``assign[0]`` C- with two classes)
    segment_offsets : (B + 1,) int64 bag offsets
    assign_pos, assign_neg : properties, two classes only: ``assign[1]`` and ``assign[0]``
    """

    logits: Tensor
    attention: Tensor
    score: Tensor
    patch_proj: Tensor
    features: Tensor
    pooled: Tensor
    z_w: Tensor
    z_o: Tensor | None
    recon: Tensor | None
    assign: tuple[Tensor, ...]
    segment_offsets: Tensor = field(repr=False)

    @property
    def n_classes(self) -> int:
        """Number of classes C (one assignment per class memory)."""
        return len(self.assign)

    @property
    def assign_pos(self) -> Tensor:
        """(N,) int64 component of C+ per patch (two classes only; ``assign[1]``)."""
        return self._binary_assign(1)

    @property
    def assign_neg(self) -> Tensor:
        """(N,) int64 component of C- per patch (two classes only; ``assign[0]``)."""
        return self._binary_assign(0)

    def _binary_assign(self, c: int) -> Tensor:
        if len(self.assign) != 2:
            raise AttributeError(
                f"assign_pos/assign_neg exist for two classes; this output has {len(self.assign)} "
                "(use assign[c])"
            )
        return self.assign[c]


class MoMKD(nn.Module):
    """Momentum Memory Knowledge Distillation model.

    Parameters
    ----------
    cfg : ModelConfig
        Dimensions and hyper-parameters.

    Attributes
    ----------
    histology_encoder : GraphEncoder
        The G-encoder, (N, D_in) -> (N, H).
    patch_projector, pool_projector : SphereProjector
        (N, H) -> p (N, S) and (B, H) -> z_w (B, S).
    classifier : nn.Sequential
        (B, H) -> (B, 2); (B, C * H) -> (B, C) for C > 2 classes.
    log_tau : nn.Parameter
        () attention temperature parameter theta, ``tau = clamp(exp(theta), tau_min, tau_max)``.
    omics_encoder, omics_decoder, omics_projector
        Omics branch, (B, G) -> (B, R) -> z_o (B, S) and recon (B, G).
    memory : ClassMemory
        C+ and C- (K, S); one (K, S) memory per class for C > 2.
    maps : tuple of int
        Classes with an attention map: ``(1,)`` for two classes, every class for C > 2.
    """

    def __init__(self, cfg: ModelConfig | None = None) -> None:
        super().__init__()
        cfg = cfg if cfg is not None else ModelConfig()
        self.cfg = cfg
        self.histology_encoder = GraphEncoder(
            cfg.d_in,
            cfg.hidden,
            cfg.dropout,
            cfg.attn_dropout,
            input_residual=cfg.input_residual,
        )
        self.maps = attention_maps(cfg.n_classes)
        pooled_width = len(self.maps) * cfg.hidden
        self.patch_projector = SphereProjector(cfg.hidden, cfg.sphere)
        self.pool_projector = SphereProjector(pooled_width, cfg.sphere)
        self.classifier = make_classifier(
            pooled_width, cfg.classifier_hidden, cfg.n_classes, cfg.dropout
        )
        self.log_tau = nn.Parameter(torch.tensor(math.log(cfg.tau_init), dtype=torch.float32))
        # Without the omics branch (``omics=False``, the ``momkd_histo`` ablation) the model has no
        # omics parameters at all, so no genomics term can reach the histology branch.
        self.omics_encoder: OmicsEncoder | None = None
        self.omics_decoder: OmicsDecoder | None = None
        self.omics_projector: SphereProjector | None = None
        if cfg.omics:
            self.omics_encoder = OmicsEncoder(
                cfg.genes, cfg.omics_width, cfg.omics_hidden, cfg.omics_dropout
            )
            self.omics_decoder = OmicsDecoder(
                cfg.omics_width, cfg.genes, cfg.omics_hidden, cfg.omics_dropout
            )
            self.omics_projector = SphereProjector(cfg.omics_width, cfg.sphere)
        self.memory = ClassMemory(
            cfg.memory_k,
            cfg.sphere,
            cfg.memory_update,
            cfg.momentum,
            cfg.dead_after,
            n_classes=cfg.n_classes,
        )

    @property
    def tau(self) -> Tensor:
        """() current attention temperature ``clamp(exp(theta), tau_min, tau_max)``."""
        return self.log_tau.detach().exp().clamp(self.cfg.tau_min, self.cfg.tau_max)

    def _check_bag(self, features: Tensor, edge_index: Tensor) -> None:
        if features.dim() != 2 or features.shape[1] != self.cfg.d_in:
            raise DataError(
                f"features: expected shape (N, {self.cfg.d_in}), got {tuple(features.shape)}"
            )
        if features.shape[0] == 0:
            raise DataError("features: empty bag (0 patches)")
        if edge_index.dim() != 2 or edge_index.shape[0] != 2:
            raise DataError(f"edge_index: expected shape (2, E), got {tuple(edge_index.shape)}")
        if edge_index.dtype != torch.int64:
            raise DataError(f"edge_index: expected dtype int64, got {edge_index.dtype}")

    def _expression(self, expression: Tensor, b: int) -> Tensor:
        g = expression.unsqueeze(0) if expression.dim() == 1 else expression
        if g.dim() != 2 or g.shape[0] != b or g.shape[1] != self.cfg.genes:
            raise DataError(
                f"expression: expected shape ({b}, {self.cfg.genes}) for {b} bag(s), got "
                f"{tuple(expression.shape)}"
            )
        return g.float()

    def forward(
        self,
        features: Tensor,
        edge_index: Tensor,
        expression: Tensor | None = None,
        segment_offsets: Tensor | None = None,
    ) -> MoMKDOutput:
        """Run the model on one bag or B bags batched as disjoint graphs.

        Parameters
        ----------
        features : Tensor
            (N, D_in) patch features of one bag, or of B bags concatenated.
        edge_index : Tensor
            (2, E) int64 k-NN edges (row 0 source, row 1 target) indexing the N patches; bags must
            not be connected to each other.
        expression : Tensor, optional
            (B, G) or, for one bag, (G,) preprocessed expression. Without it the omics outputs are
            None (histology-only inference).
        segment_offsets : Tensor, optional
            (B + 1,) int64 bag offsets; default one bag ``[0, N]``.

        Returns
        -------
        MoMKDOutput
        """
        self._check_bag(features, edge_index)
        n = features.shape[0]
        if segment_offsets is None:
            segment_offsets = torch.tensor([0, n], dtype=torch.int64, device=features.device)
        segment_offsets = segment_offsets.to(features.device, torch.int64)
        b = segment_offsets.numel() - 1

        feats = self.histology_encoder(features, edge_index)
        p = self.patch_projector(feats)
        assign: tuple[Tensor, ...]
        if self.cfg.n_classes == 2:
            c_pos_hat, c_neg_hat = self.memory.normalized()
            pooled, attention, score, assign_pos, assign_neg = kernels.memory_attention_pool(
                p,
                feats,
                c_pos_hat,
                c_neg_hat,
                self.log_tau,
                segment_offsets,
                tau_min=self.cfg.tau_min,
                tau_max=self.cfg.tau_max,
            )
            assign = (assign_neg, assign_pos)
        else:
            _note_eager(self.cfg.n_classes)
            pooled, attention, score, assign = memory_attention_pool_classes(
                p,
                feats,
                self.memory.normalized_classes(),
                self.log_tau,
                segment_offsets,
                tau_min=self.cfg.tau_min,
                tau_max=self.cfg.tau_max,
                maps=self.maps,
            )
        logits = self.classifier(pooled)
        z_w = self.pool_projector(pooled)

        z_o: Tensor | None = None
        recon: Tensor | None = None
        if expression is not None and self.cfg.omics:
            z_o, recon = self._omics(self._expression(expression, b))
        return MoMKDOutput(
            logits=logits,
            attention=attention,
            score=score,
            patch_proj=p,
            features=feats,
            pooled=pooled,
            z_w=z_w,
            z_o=z_o,
            recon=recon,
            assign=assign,
            segment_offsets=segment_offsets,
        )

    def _omics(self, g: Tensor) -> tuple[Tensor, Tensor]:
        assert self.omics_encoder is not None and self.omics_projector is not None
        assert self.omics_decoder is not None
        h_o = self.omics_encoder(g)
        return self.omics_projector(h_o), self.omics_decoder(h_o)

    @torch.no_grad()
    def teacher_score(self, expression: Tensor, temp: float = 5.0) -> Tensor:
        """The omics branch's own class score, Δ(z_o) = φ(z_o, C⁺) − φ(z_o, C⁻) (docs/METHOD.md
        §2.4), for B patients in the current mode: how well the teacher separates the classes.
        With C > 2 classes the class scores φ(z_o, C^c) of every class (docs/METHOD.md §2.11).

        Parameters
        ----------
        expression : Tensor
            (B, G) preprocessed expression.
        temp : float
            Temperature of the log-sum-exp similarity φ (``loss.align_temp``).

        Returns
        -------
        Tensor
            (B,) float32, higher means closer to the positive memory; for C > 2 classes (B, C)
            float32, column c = φ(z_o, C^c) (higher means closer to class c's memory).
        """
        from momkd.losses import phi

        if not self.cfg.omics:
            raise ConfigError("teacher_score: this model has no omics branch")
        z_o, _ = self._omics(self._expression(expression, expression.shape[0]))
        z = z_o.float()
        if self.cfg.n_classes != 2:
            return class_phi(z, self.memory.normalized_classes(), temp)
        c_pos_hat, c_neg_hat = self.memory.normalized()
        return phi(z, c_pos_hat, temp) - phi(z, c_neg_hat, temp)

    @torch.no_grad()
    def predict(self, features: Tensor, edge_index: Tensor) -> tuple[Tensor, Tensor]:
        """Histology-only prediction for one bag, in eval mode (the previous mode is restored).

        Parameters
        ----------
        features : Tensor
            (N, D_in) patch features.
        edge_index : Tensor
            (2, E) int64 k-NN edges.

        Returns
        -------
        probs : Tensor
            (C,) softmax class probabilities (with two classes index 1 = positive class).
        attention : Tensor
            (N,) attention weights; (N, C) for C > 2 classes.
        """
        was_training = self.training
        self.eval()
        try:
            out = self.forward(features, edge_index)
        finally:
            self.train(was_training)
        return torch.softmax(out.logits[0].float(), dim=-1), out.attention

    @torch.no_grad()
    def embed_patches(self, features: Tensor, edge_index: Tensor) -> Tensor:
        """Normalised patch projections p (N, S) of one bag in eval mode, for memory initialisation."""
        self._check_bag(features, edge_index)
        was_training = self.training
        self.eval()
        try:
            p: Tensor = self.patch_projector(self.histology_encoder(features, edge_index))
            return p
        finally:
            self.train(was_training)

    def _labels(self, y: Tensor, b: int, device: torch.device) -> Tensor:
        y = torch.as_tensor(y).reshape(-1)
        if y.numel() != b:
            raise DataError(f"labels: expected {b} label(s) for {b} bag(s), got {y.numel()}")
        c = self.cfg.n_classes
        if c == 2:
            if y.is_floating_point() or bool(((y != 0) & (y != 1)).any()):
                raise DataError(f"labels: expected integer values 0 or 1, got {y.tolist()}")
        elif y.is_floating_point() or bool(((y < 0) | (y >= c)).any()):
            raise DataError(f"labels: expected integer values in [0, {c}), got {y.tolist()}")
        return y.to(device, torch.int64)

    def loss(
        self,
        out: MoMKDOutput,
        y: Tensor,
        expression: Tensor | None = None,
        w: LossWeights | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Total training loss and its terms (docs/METHOD.md §2.4).

        For B bags, ce and the alignment terms are averaged over bags; the commitment and
        orthogonality terms are computed per bag with the bag's own class memory and averaged.

        Parameters
        ----------
        out : MoMKDOutput
            Output of :meth:`forward` (with expression for the omics terms).
        y : Tensor
            (B,) int64 labels in {0, 1} (in ``[0, C)`` for C classes).
        expression : Tensor, optional
            (B, G) or (G,) expression, the reconstruction target; without it ``mse`` is 0.
        w : LossWeights, optional
            Weights; defaults to :class:`LossWeights()`.

        Returns
        -------
        total : Tensor
            () weighted sum.
        terms : dict
            Unweighted terms ``ce, commit, orth, mem, align_omics, align_wsi, mse`` (each ()),
            with ``mem = commit + w.orth * orth``.
        """
        w = w if w is not None else LossWeights()
        b = out.logits.shape[0]
        y = self._labels(y, b, out.logits.device)
        if self.cfg.n_classes != 2:
            ce, commit, orth, mem, align_omics, align_wsi = self._class_terms(out, y, w)
        else:
            c_pos_hat, c_neg_hat = self.memory.normalized()
            zero = torch.zeros((), device=out.logits.device, dtype=torch.float32)

            ce = F.cross_entropy(out.logits.float(), y)
            commit = kernels.batched_commitment_loss(
                out.patch_proj, self.memory.pos, self.memory.neg, y, out.segment_offsets
            )
            n_pos = (y == 1).to(torch.float32).sum()
            orth = (
                n_pos * orthogonality_loss(c_pos_hat) + (b - n_pos) * orthogonality_loss(c_neg_hat)
            ) / b
            mem = commit + w.orth * orth
            align = {"margin": w.align_margin, "scale": w.align_scale, "temp": w.align_temp}
            align_wsi = kernels.align_loss(out.z_w, y, c_pos_hat, c_neg_hat, **align).mean()
            align_omics = (
                kernels.align_loss(out.z_o, y, c_pos_hat, c_neg_hat, **align).mean()
                if out.z_o is not None
                else zero
            )
        if expression is not None and out.recon is not None:
            target = self._expression(expression, b).to(out.recon.device)
            mse = F.mse_loss(out.recon.float(), target)
        else:
            mse = torch.zeros((), device=out.logits.device, dtype=torch.float32)
        total = (
            w.ce * ce
            + w.mem * mem
            + w.align_omics * align_omics
            + w.align_wsi * align_wsi
            + w.mse * mse
        )
        terms = {
            "ce": ce,
            "commit": commit,
            "orth": orth,
            "mem": mem,
            "align_omics": align_omics,
            "align_wsi": align_wsi,
            "mse": mse,
        }
        return total, terms

    def _class_terms(
        self, out: MoMKDOutput, y: Tensor, w: LossWeights
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``ce, commit, orth, mem, align_omics, align_wsi`` for C > 2 classes (docs/METHOD.md
        §2.11), in eager PyTorch; with two classes they equal the binary terms."""
        _note_eager(self.cfg.n_classes)
        c_hats = self.memory.normalized_classes()
        zero = torch.zeros((), device=out.logits.device, dtype=torch.float32)
        align = {"margin": w.align_margin, "scale": w.align_scale, "temp": w.align_temp}
        ce = F.cross_entropy(out.logits.float(), y)
        commit = batched_commitment_loss_classes(
            out.patch_proj, self.memory.memories(), y, out.segment_offsets
        )
        orth = orthogonality_loss_classes(c_hats, y)
        mem = commit + w.orth * orth
        align_wsi = align_loss_classes(out.z_w, y, c_hats, **align).mean()
        align_omics = (
            align_loss_classes(out.z_o, y, c_hats, **align).mean() if out.z_o is not None else zero
        )
        return ce, commit, orth, mem, align_omics, align_wsi

    @torch.no_grad()
    def init_memory(
        self, pos_embeddings: Tensor, neg_embeddings: Tensor, *, iters: int = 20, seed: int = 0
    ) -> None:
        """Initialise C+ and C- of a two-class model by spherical k-means (docs/METHOD.md §2.5).

        Parameters
        ----------
        pos_embeddings, neg_embeddings : Tensor
            (M+, S) and (M-, S) patch projections of training slides of each class (M >= K).
        iters : int
            k-means iterations.
        seed : int
            Seed of the positive memory's initial points; the negative memory uses ``seed + 1``.
        """
        if self.cfg.n_classes != 2:
            raise ConfigError(
                f"init_memory: the model has {self.cfg.n_classes} classes; use init_memory_classes"
            )
        self.init_memory_classes([neg_embeddings, pos_embeddings], iters=iters, seed=seed)

    @torch.no_grad()
    def init_memory_classes(
        self, embeddings: Sequence[Tensor], *, iters: int = 20, seed: int = 0
    ) -> None:
        """Initialise every class memory by per-class spherical k-means (docs/METHOD.md §2.5,
        §2.11).

        Parameters
        ----------
        embeddings : sequence of Tensor
            Indexed by class: ``embeddings[c]`` is (M_c, S), M_c >= K, patch projections of
            training slides of class c.
        iters : int
            k-means iterations.
        seed : int
            Class c uses ``seed + (C - 1 - c)``: with two classes C+ ``seed`` and C- ``seed + 1``,
            as :meth:`init_memory`.
        """
        n = self.cfg.n_classes
        if len(embeddings) != n:
            raise DataError(
                f"init_memory_classes: expected embeddings of {n} classes, got {len(embeddings)}"
            )
        centroids = kmeans_class_memories(embeddings, self.cfg.memory_k, iters=iters, seed=seed)
        device = self.memory.class_memory(0).device
        self.memory.set_class_memories([c.to(device) for c in centroids])
        logger.debug(
            "memory initialised from %s embeddings per class",
            " / ".join(str(len(e)) for e in embeddings),
        )

    @torch.no_grad()
    def after_optimizer_step(
        self, out: MoMKDOutput, y: Tensor, *, reduce_fn: ReduceFn | None = None
    ) -> None:
        """Momentum update of the memory from this step's teacher embeddings (no-op unless
        ``memory_update == "momentum"``).

        Parameters
        ----------
        out : MoMKDOutput
            The step's forward output (z_o and/or z_w per ``momentum_sources``).
        y : Tensor
            (B,) int64 labels in ``[0, C)``.
        reduce_fn : callable, optional
            Combines ``(sums, counts)`` across data-parallel ranks before the update.
        """
        if self.cfg.memory_update != "momentum":
            return
        b = out.logits.shape[0]
        y = self._labels(y, b, out.logits.device)
        embs, labels = [], []
        for source in self.cfg.momentum_sources:
            z = out.z_o if source == "omics" else out.z_w
            if z is not None:
                embs.append(z.detach())
                labels.append(y)
        if embs:
            emb, lab = torch.cat(embs), torch.cat(labels)
        else:
            emb = out.z_w.new_zeros(0, self.cfg.sphere)
            lab = y.new_zeros(0)
        self.memory.momentum_update(emb, lab, reduce_fn=reduce_fn)


# ------------------------------------------------------------- hooks of the method registry


def params_from_config(cfg: RunConfig, method: str, d_in: int, genes: int | None) -> dict[str, Any]:
    """:class:`ModelConfig` arguments from a run configuration (:mod:`momkd.methods`): ``momkd``
    with its omics branch, ``momkd_histo`` (the ablation) without it.

    Raises
    ------
    ConfigError
        Not 2 GATv2 heads; ``momkd`` without expression (``genes`` None).
    """
    m = cfg.model
    omics = method == "momkd"
    if m.heads != 2:
        raise ConfigError(f"model.heads: MoMKD uses 2 GATv2 heads, got {m.heads}")
    if omics and genes is None:
        raise ConfigError("data.expression: required by method momkd")
    sources = list(cfg.memory.momentum_sources) if omics else ["wsi"]
    return {
        "d_in": d_in,
        "hidden": m.hidden,
        "omics_width": m.omics_width,
        "omics_hidden": m.omics_hidden,
        "sphere": m.sphere,
        "memory_k": m.memory_k,
        "genes": genes if omics else 0,
        "dropout": m.dropout,
        "omics_dropout": m.omics_dropout,
        "attn_dropout": m.attn_dropout,
        "tau_init": m.tau_init,
        "tau_min": m.tau_min,
        "tau_max": m.tau_max,
        "classifier_hidden": m.classifier_hidden,
        "n_classes": cfg.n_classes,
        "memory_update": cfg.memory.update,
        "momentum": cfg.memory.momentum,
        "dead_after": cfg.memory.dead_after,
        "momentum_sources": sources,
        "input_residual": m.input_residual,
        "omics": omics,
    }


def build(params: dict[str, Any]) -> MoMKD:
    """The model of :func:`params_from_config`'s arguments (as stored in a checkpoint)."""
    params = dict(params)
    params["momentum_sources"] = tuple(params.get("momentum_sources", ("omics",)))
    # Checkpoints written before the released residual rule always used a Linear.
    params.setdefault("input_residual", "linear")
    return MoMKD(ModelConfig(**params))


def loss_weights(cfg: RunConfig) -> LossWeights:
    """:class:`LossWeights` from the ``loss`` section of a run configuration."""
    names = {f for f in LossWeights.__dataclass_fields__}
    return LossWeights(**{k: getattr(cfg.loss, k) for k in names if hasattr(cfg.loss, k)})
