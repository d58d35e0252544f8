"""Models from the method registry (:mod:`momkd.methods`): a run configuration's model as a plain
spec (stored in checkpoints), the model built from a spec, its loss weights and its batch size.

Nothing here names a method: each registry entry points to its model module, whose hooks
(``params_from_config``, ``build`` and optionally ``loss_weights`` and ``batch_size``) do the
method-specific part.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from types import ModuleType
from typing import Any

from torch import nn

from momkd.config import RunConfig
from momkd.errors import ConfigError
from momkd.methods import METHODS
from momkd.train.standardize import attach_input_dropout, attach_standardizer

__all__ = ["batch_size_for", "build_model", "loss_weights_for", "model_spec_for"]

_METHOD_NAMES = ", ".join(METHODS)


def _model_module(method: object) -> ModuleType:
    """The model module of ``method`` (imported on first use).

    Raises
    ------
    ConfigError
        Unknown method.
    """
    info = METHODS.get(method) if isinstance(method, str) else None
    if info is None:
        raise ConfigError(f"model.method: unknown method {method!r} ({_METHOD_NAMES})")
    return importlib.import_module(info.module)


def model_spec_for(cfg: RunConfig, d_in: int, genes: int | None) -> dict[str, Any]:
    """The constructor arguments of the configured model as a plain dict.

    Parameters
    ----------
    cfg : RunConfig
        Resolved configuration (``model``, ``memory``, ``loss`` sections).
    d_in : int
        Feature dimension of the store.
    genes : int | None
        Number of preprocessed genes (None for methods without expression).

    Returns
    -------
    dict
        ``{"method", "params", "standardize", "input_dropout"}`` for :func:`build_model`; stored
        in checkpoints.

    Raises
    ------
    ConfigError
        Unknown method, or settings the method cannot use.
    """
    m = cfg.model
    module = _model_module(m.method)
    assert m.hidden is not None and m.sphere is not None
    return {
        "method": m.method,
        "params": module.params_from_config(cfg, m.method, d_in, genes),
        "standardize": cfg.data.standardize == "train",
        "input_dropout": float(cfg.train.feature_dropout),
    }


def build_model(spec: Mapping[str, Any]) -> nn.Module:
    """Instantiate a model from :func:`model_spec_for`'s dict (as stored in a checkpoint).

    Raises
    ------
    ConfigError
        Unknown method or invalid parameters.
    """
    params = dict(spec.get("params", {}))
    model: nn.Module = _model_module(spec.get("method")).build(params)
    if spec.get("standardize"):
        # Identity until the fold's statistics are fitted or a checkpoint's buffers are loaded.
        attach_standardizer(model, int(params["d_in"]))
    # After the standardiser, so that dropped entries are set to the training mean.
    attach_input_dropout(model, float(spec.get("input_dropout", 0.0)))
    return model


def loss_weights_for(cfg: RunConfig) -> Any:
    """The loss weights the method's ``loss`` takes (its module's ``loss_weights`` hook; None for
    methods without one)."""
    hook = getattr(_model_module(cfg.model.method), "loss_weights", None)
    return hook(cfg) if hook is not None else None


def batch_size_for(cfg: RunConfig) -> int:
    """Bags per optimizer step: the method module's ``batch_size`` hook, else
    ``train.batch_size``."""
    hook = getattr(_model_module(cfg.model.method), "batch_size", None)
    return int(hook(cfg)) if hook is not None else int(cfg.train.batch_size)
