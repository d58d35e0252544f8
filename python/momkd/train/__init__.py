"""Training protocol: splits, per-fold genomics preprocessing and the training run.

This package module stays light (no torch import); the training loop lives in
:mod:`momkd.train.runner`.
"""

from __future__ import annotations

from typing import Any

from momkd.train.genomics import GenomicsPreprocessor, preprocessor_from_config, read_gene_list
from momkd.train.splits import Split, make_splits, read_splits, resolve_splits, write_splits

__all__ = [
    "GenomicsPreprocessor",
    "Split",
    "make_splits",
    "preprocessor_from_config",
    "read_gene_list",
    "read_splits",
    "resolve_splits",
    "train",
    "write_splits",
]


def train(config: Any, out_dir: Any = None, resume: bool = False, **kwargs: Any) -> dict[str, Any]:
    """Run k-fold training from a :class:`momkd.config.RunConfig` (or a YAML path); returns the summary.

    A thin wrapper that imports :func:`momkd.train.runner.train` on first use, so that
    ``import momkd.train`` does not import torch.
    """
    from momkd.train.runner import train as _train

    return _train(config, out_dir=out_dir, resume=resume, **kwargs)
