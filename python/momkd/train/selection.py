"""Model selection and the learning-rate schedule: the monitored validation score behind the kept
checkpoint, early stopping and the plateau cut (:class:`Monitor`), and the warm-up + cosine or
constant schedule (:func:`scheduled_lr`), both docs/METHOD.md §2.6."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from momkd.config import TrainConfig

__all__ = ["Monitor", "scheduled_lr"]


@dataclass
class Monitor:
    """One monitored validation score (higher is better) behind the kept checkpoint, early
    stopping and the learning-rate schedule (docs/METHOD.md §2.6).

    Each epoch's score is compared with the best so far:

    * ``score > best + min_delta``: an improvement;
    * ``best - min_delta <= score <= best + min_delta``: a tie, which keeps the **later** epoch (as
      the released code does with an equal validation AUC); the reference stays the maximum;
    * otherwise a bad epoch.

    An improvement or a tie marks the epoch as the one to keep and resets both counters. Training
    stops after ``patience`` consecutive bad epochs, never before ``min_epochs`` epochs. The
    learning rate is multiplied by the plateau factor when more than ``plateau_patience`` bad epochs
    have passed since the last kept epoch or the last reduction (``ReduceLROnPlateau``'s rule).

    Parameters
    ----------
    patience, min_epochs : int
        Early stopping.
    min_delta : float
        Tie tolerance (>= 0).
    plateau_patience : int, optional
        ``None``: the schedule never reduces.
    """

    patience: int
    min_epochs: int
    min_delta: float = 0.0
    plateau_patience: int | None = None
    best: float = -math.inf
    best_epoch: int = -1
    bad_epochs: int = 0
    plateau_bad: int = 0

    def update(self, score: float, epoch: int) -> bool:
        """Record an epoch's score; True when this epoch is to be kept (improvement or tie)."""
        first = self.best_epoch < 0
        if first or score >= self.best - self.min_delta:
            self.best = score if first else max(self.best, score)
            self.best_epoch, self.bad_epochs, self.plateau_bad = epoch, 0, 0
            return True
        self.bad_epochs += 1
        self.plateau_bad += 1
        return False

    def should_stop(self, epoch: int) -> bool:
        """Whether to stop after ``epoch`` (0-based) has finished."""
        return epoch + 1 >= self.min_epochs and self.bad_epochs >= self.patience

    def should_reduce_lr(self) -> bool:
        """Whether to cut the learning rate now (resets the plateau counter when True)."""
        if self.plateau_patience is None or self.plateau_bad <= self.plateau_patience:
            return False
        self.plateau_bad = 0
        return True

    def state_dict(self) -> dict[str, Any]:
        return {
            "best": self.best,
            "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs,
            "plateau_bad": self.plateau_bad,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best = float(state["best"])
        self.best_epoch = int(state["best_epoch"])
        self.bad_epochs = int(state["bad_epochs"])
        self.plateau_bad = int(state.get("plateau_bad", 0))


def scheduled_lr(train: TrainConfig, base: float, step: int, steps_per_epoch: int) -> float | None:
    """Learning rate of optimizer step ``step`` (0-based) under ``train.schedule``; ``None`` for
    ``plateau``, whose rate lives in the optimizer and is cut by :class:`Monitor`.

    ``constant``: ``base``; ``cosine``: ``base * (1 + cos(pi * t)) / 2`` with ``t`` going from 0 at
    the end of the warm-up to 1 at the last step of ``train.epochs``; both after a linear warm-up
    over ``train.warmup_epochs`` (step ``i`` of ``w`` warm-up steps: ``base * (i+1)/w``). A pure
    function of the step, so a resumed run replays the schedule exactly.

    Parameters
    ----------
    train : TrainConfig
        The ``train`` section (``schedule``, ``warmup_epochs``, ``epochs``).
    base : float
        The resolved learning rate.
    step : int
    steps_per_epoch : int
    """
    if train.schedule == "plateau":
        return None
    warm = int(round(float(train.warmup_epochs) * steps_per_epoch))
    if step < warm:
        return base * (step + 1) / warm
    if train.schedule == "constant":
        return base
    total = int(train.epochs) * steps_per_epoch
    progress = min(1.0, (step - warm) / max(1, total - warm))
    return base * 0.5 * (1.0 + math.cos(math.pi * progress))
