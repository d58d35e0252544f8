"""Models: MoMKD (histology + omics branches sharing a class memory) and its building blocks."""

from __future__ import annotations

from momkd.model.histology import GraphEncoder, SphereProjector, make_classifier
from momkd.model.momkd import LossWeights, ModelConfig, MoMKD, MoMKDOutput
from momkd.model.omics import OmicsDecoder, OmicsEncoder

__all__ = [
    "GraphEncoder",
    "LossWeights",
    "MoMKD",
    "MoMKDOutput",
    "ModelConfig",
    "OmicsDecoder",
    "OmicsEncoder",
    "SphereProjector",
    "make_classifier",
]
