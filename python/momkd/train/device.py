"""The process environment of training: seeding, the torch device, progress bars."""

from __future__ import annotations

import os
import random
import sys

import numpy as np
import torch

from momkd.config import RunConfig
from momkd.errors import ConfigError

__all__ = ["progress_enabled", "seed_everything", "select_device"]


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def select_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; otherwise ``torch.device(name)``.

    Raises
    ------
    ConfigError
        A CUDA/MPS device that is not available.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device: {name} requested but CUDA is not available")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"train.device: {name} requested but MPS is not available")
    return dev


def progress_enabled(cfg: RunConfig) -> bool:
    """Progress bars: ``train.progress`` when the configuration has it, else only on a terminal."""
    setting = getattr(cfg.train, "progress", None)
    if setting is not None:
        return bool(setting)
    if os.environ.get("MOMKD_PROGRESS", "").strip() in ("0", "false", "no"):
        return False
    return sys.stderr.isatty()
