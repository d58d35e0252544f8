"""Training protocol: splits, per-fold genomics preprocessing and the training run.

This package module stays light (no torch import); the training loop lives in
:mod:`momkd.train.runner`.
"""

from __future__ import annotations

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
    "write_splits",
]
