"""Per-feature standardisation of patch features, fitted inside each fold (docs/METHOD.md §2.6).

``data.standardize: train`` computes the mean and standard deviation of every feature over all
patches of the fold's **training** slides (validation, test and external slides never enter), in
float64 and streamed bag by bag, so memory does not grow with the cohort. The statistics become two
buffers of the model (``feature_mean``, ``feature_scale``) applied by a forward pre-hook to the
features, so they are saved with every checkpoint and applied wherever the model runs: training,
validation, ``momkd eval``, ``momkd predict`` and ``momkd explain``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "FeatureStats",
    "attach_input_dropout",
    "attach_standardizer",
    "fit_feature_stats",
    "has_standardizer",
]

#: Features whose standard deviation is below this are only centred (scale 1).
MIN_STD = 1e-6


class FeatureStats:
    """Streaming per-feature mean and variance in float64 (Chan et al.'s pairwise merge).

    Parameters
    ----------
    dim : int
        Feature dimension D.
    """

    def __init__(self, dim: int) -> None:
        self.n = 0
        self.mean = np.zeros(dim, dtype=np.float64)
        self.m2 = np.zeros(dim, dtype=np.float64)

    def update(self, x: np.ndarray | Tensor) -> None:
        """Add a block of rows (P, D)."""
        if isinstance(x, Tensor):
            x = x.detach().cpu().numpy()
        block = np.asarray(x, dtype=np.float64)
        if block.ndim != 2 or block.shape[1] != self.mean.shape[0]:
            raise ValueError(f"FeatureStats: expected (P, {self.mean.shape[0]}), got {block.shape}")
        nb = block.shape[0]
        if nb == 0:
            return
        mb = block.mean(axis=0)
        m2b = ((block - mb) ** 2).sum(axis=0)
        n = self.n + nb
        delta = mb - self.mean
        self.mean = self.mean + delta * (nb / n)
        self.m2 = self.m2 + m2b + delta**2 * (self.n * nb / n)
        self.n = n

    def merge(self, other: FeatureStats) -> None:
        """Add the rows summarised by ``other`` (statistics of another rank's share)."""
        if other.n == 0:
            return
        if self.n == 0:
            self.n, self.mean, self.m2 = other.n, other.mean.copy(), other.m2.copy()
            return
        n = self.n + other.n
        delta = other.mean - self.mean
        self.mean = self.mean + delta * (other.n / n)
        self.m2 = self.m2 + other.m2 + delta**2 * (self.n * other.n / n)
        self.n = n

    @property
    def std(self) -> np.ndarray:
        """Population standard deviation (ddof 0), (D,) float64."""
        if self.n == 0:
            return np.ones_like(self.mean)
        return np.sqrt(self.m2 / self.n)

    def scale(self) -> np.ndarray:
        """The divisor used for standardisation: ``std``, with 1 where it is below ``MIN_STD``."""
        s = self.std
        return np.where(s < MIN_STD, 1.0, s)


def fit_feature_stats(bags: Iterable[Any], dim: int) -> FeatureStats:
    """Statistics over every patch of ``bags`` (objects with ``.features`` of shape (P, D))."""
    stats = FeatureStats(dim)
    for bag in bags:
        stats.update(bag.features)
    return stats


def _standardize_hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    x = args[0]
    mean: Tensor = module.feature_mean  # type: ignore[assignment]
    scale: Tensor = module.feature_scale  # type: ignore[assignment]
    y = (x - mean.to(x.dtype)) / scale.to(x.dtype)
    return (y, *args[1:])


def attach_standardizer(model: nn.Module, dim: int, stats: FeatureStats | None = None) -> nn.Module:
    """Give ``model`` the buffers ``feature_mean`` / ``feature_scale`` (D,) and a forward pre-hook
    that standardises its first argument, the (N, D) features.

    Parameters
    ----------
    model : nn.Module
        A model whose ``forward`` takes the features as its first positional argument.
    dim : int
        Feature dimension D.
    stats : FeatureStats, optional
        Fitted statistics; without them the buffers hold the identity (0, 1) until a state dict is
        loaded.

    Returns
    -------
    nn.Module
        ``model`` itself.
    """
    device = next(model.parameters()).device
    mean = torch.zeros(dim, dtype=torch.float32, device=device)
    scale = torch.ones(dim, dtype=torch.float32, device=device)
    if stats is not None:
        mean = torch.as_tensor(stats.mean, dtype=torch.float32, device=device)
        scale = torch.as_tensor(stats.scale(), dtype=torch.float32, device=device)
    if has_standardizer(model):
        model.feature_mean.copy_(mean)  # type: ignore[operator]
        model.feature_scale.copy_(scale)  # type: ignore[operator]
        return model
    model.register_buffer("feature_mean", mean)
    model.register_buffer("feature_scale", scale)
    model.register_forward_pre_hook(_standardize_hook)
    return model


def has_standardizer(model: nn.Module) -> bool:
    """Whether :func:`attach_standardizer` was applied to ``model``."""
    return isinstance(getattr(model, "feature_mean", None), Tensor)


def _input_dropout_hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    rate = float(module.input_dropout)  # type: ignore[arg-type]
    if not module.training or rate <= 0.0:
        return args
    return (torch.nn.functional.dropout(args[0], rate, training=True), *args[1:])


def attach_input_dropout(model: nn.Module, rate: float) -> nn.Module:
    """Dropout on the model's input features in training mode (``train.feature_dropout``).

    A forward pre-hook registered after the standardiser (attach that first), so entries are
    dropped from the standardised features, i.e. set to the training mean. In eval mode the hook
    does nothing, so checkpoints predict as without it.

    Parameters
    ----------
    model : nn.Module
        A model whose ``forward`` takes the (N, D) features as its first positional argument.
    rate : float
        Drop probability in [0, 1).

    Returns
    -------
    nn.Module
        ``model`` itself.
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"input dropout must be in [0, 1), got {rate}")
    model.input_dropout = float(rate)  # type: ignore[assignment]
    if rate > 0.0:
        model.register_forward_pre_hook(_input_dropout_hook)
    return model
