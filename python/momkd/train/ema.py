"""Exponential moving average of a model's weights (``train.ema``).

After optimizer step ``t`` (counted from 0) each trainable floating-point parameter ``p`` updates
its average ``a <- d_t * a + (1 - d_t) * p`` with ``d_t = min(d, (1 + t) / (10 + t))`` and ``d`` =
``train.ema``. The average starts at the initial weights; the warm-up of ``d_t`` keeps it from
holding on to them in short runs (it averages over roughly the last ninth of the steps so far until
``d`` caps it at about ``1 / (1 - d)`` steps), so one decay suits small and large cohorts. Buffers (the momentum memory, the feature statistics) are not averaged: the averaged model
uses the live buffers. When the average is on, validation and the kept model (``best.pt``) use the
averaged weights; ``last.pt`` stores both, so a resumed run continues the same average.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["WeightEMA"]


class WeightEMA:
    """Moving average of the trainable parameters of ``model``.

    Parameters
    ----------
    model : nn.Module
        The model (not a DistributedDataParallel wrapper).
    decay : float
        ``d`` in (0, 1), applied once per optimizer step.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.names = [
            n for n, p in model.named_parameters() if p.requires_grad and p.is_floating_point()
        ]
        params = dict(model.named_parameters())
        self.average: dict[str, Tensor] = {n: params[n].detach().clone() for n in self.names}
        self.updates = 0

    def decay_at(self, step: int) -> float:
        """``d_t = min(d, (1 + t) / (10 + t))`` of update ``t`` (0-based)."""
        return min(self.decay, (1.0 + step) / (10.0 + step))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the current parameters of ``model`` into the average (after an optimizer step)."""
        params = dict(model.named_parameters())
        weight = 1.0 - self.decay_at(self.updates)
        for n in self.names:
            self.average[n].lerp_(params[n].detach(), weight)
        self.updates += 1

    def model_state(self, model: nn.Module) -> dict[str, Tensor]:
        """``model.state_dict()`` with the averaged parameters in place of the live ones."""
        state = model.state_dict()
        for n in self.names:
            state[n] = self.average[n].detach().clone()
        return state

    @contextmanager
    def applied(self, model: nn.Module) -> Iterator[None]:
        """Within the block ``model`` holds the averaged parameters; the live ones come back
        afterwards (also on an exception)."""
        params = dict(model.named_parameters())
        live = {n: params[n].detach().clone() for n in self.names}
        with torch.no_grad():
            for n in self.names:
                params[n].copy_(self.average[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n in self.names:
                    params[n].copy_(live[n])

    def state_dict(self) -> dict[str, Any]:
        return {
            "decay": self.decay,
            "updates": self.updates,
            "average": {n: t.clone() for n, t in self.average.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        average = state["average"]
        missing = [n for n in self.names if n not in average]
        if missing:
            raise KeyError(f"EMA state lacks {missing[:3]}")
        for n in self.names:
            self.average[n].copy_(average[n])
        self.updates = int(state["updates"])
