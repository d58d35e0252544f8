"""Interoperability with state dicts saved by the MoMKD authors' released implementation (docs/METHOD.md §2.8).

The released model stores 51 entries: 45 learned tensors that correspond one-to-one to momkd's
parameters (under other names), and per class memory three buffers of its vector-quantisation
codebook (``initted``, ``cluster_size``, ``embed_avg``) that play no role in the forward pass. The
memories themselves are stored as ``mem_{pos,neg}._codebook.embed`` of shape (1, K, S).

When the feature dimension equals the encoder width (D_in = H), the released encoder's first
residual is the identity, so its state dict has 49 entries (no ``wsi_encoder.res_proj1.*``).
momkd builds the same encoder (``input_residual: auto``), and these functions expect, export and
infer the key set that matches the model.

Loading a released state dict gives the same logits and attention as the released model on the same
inputs (float32, dropout off).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from momkd.errors import ConfigError
from momkd.model.momkd import ModelConfig, MoMKD

__all__ = [
    "RELEASED_KEYS",
    "RESIDUAL_KEYS",
    "export_released_state_dict",
    "load_released_state_dict",
    "model_from_released",
    "released_keys",
]

logger = logging.getLogger(__name__)

# Released module prefix -> momkd module prefix, for the modules whose parameter names match below.
_PREFIXES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("rna_tower.encoder.0.", "omics_encoder.net.0.", ("weight", "bias")),
    ("rna_tower.encoder.1.", "omics_encoder.net.1.", ("weight", "bias")),
    ("rna_tower.encoder.4.", "omics_encoder.net.4.", ("weight", "bias")),
    ("rna_decoder.decoder.0.", "omics_decoder.net.0.", ("weight", "bias")),
    ("rna_decoder.decoder.1.", "omics_decoder.net.1.", ("weight", "bias")),
    ("rna_decoder.decoder.4.", "omics_decoder.net.4.", ("weight", "bias")),
    (
        "wsi_encoder.gat1.",
        "histology_encoder.gat1.",
        ("att", "bias", "lin_l.weight", "lin_l.bias", "lin_r.weight", "lin_r.bias"),
    ),
    (
        "wsi_encoder.gat2.",
        "histology_encoder.gat2.",
        ("att", "bias", "lin_l.weight", "lin_l.bias", "lin_r.weight", "lin_r.bias"),
    ),
    ("wsi_encoder.res_proj1.", "histology_encoder.res_proj1.", ("weight", "bias")),
    ("wsi_encoder.ln1.", "histology_encoder.ln1.", ("weight", "bias")),
    ("wsi_encoder.ln2.", "histology_encoder.ln2.", ("weight", "bias")),
    ("rna_projector.", "omics_projector.linear.", ("weight", "bias")),
    ("wsi_patch_projector.", "patch_projector.linear.", ("weight", "bias")),
    ("wsi_pool_projector.", "pool_projector.linear.", ("weight", "bias")),
    ("wsi_classifier_proto.0.", "classifier.0.", ("weight", "bias")),
    ("wsi_classifier_proto.1.", "classifier.1.", ("weight", "bias")),
    ("wsi_classifier_proto.4.", "classifier.4.", ("weight", "bias")),
)

#: Released name -> momkd name of the 45 learned tensors (memories included, theta included).
KEY_MAP: dict[str, str] = {"attn_log_tau": "log_tau"}
for _src, _dst, _leaves in _PREFIXES:
    for _leaf in _leaves:
        KEY_MAP[_src + _leaf] = _dst + _leaf
KEY_MAP["mem_pos._codebook.embed"] = "memory.pos"
KEY_MAP["mem_neg._codebook.embed"] = "memory.neg"

#: Codebook buffers of the released memories that do not influence the forward pass.
INERT_KEYS: tuple[str, ...] = tuple(
    f"mem_{c}._codebook.{b}"
    for c in ("pos", "neg")
    for b in ("initted", "cluster_size", "embed_avg")
)

#: All 51 keys of a released state dict (D_in != H).
RELEASED_KEYS: tuple[str, ...] = tuple(KEY_MAP) + INERT_KEYS

#: Keys of the first residual projection, absent when it is the identity (D_in = H).
RESIDUAL_KEYS: tuple[str, ...] = ("wsi_encoder.res_proj1.weight", "wsi_encoder.res_proj1.bias")


def released_keys(model: MoMKD) -> tuple[str, ...]:
    """The released key set matching ``model``: 51 keys, or 49 when its first residual is the
    identity (D_in = H with ``input_residual: auto``)."""
    if isinstance(model.histology_encoder.res_proj1, torch.nn.Identity):
        return tuple(k for k in RELEASED_KEYS if k not in RESIDUAL_KEYS)
    return RELEASED_KEYS


_MEMORY_KEYS = ("mem_pos._codebook.embed", "mem_neg._codebook.embed")


def _require_binary(model: MoMKD) -> None:
    """The released implementation is binary (C+ and C-): raise for a model of C > 2 classes."""
    if model.cfg.n_classes != 2:
        raise ConfigError(
            f"released state dict: the released implementation has two classes; this model has "
            f"{model.cfg.n_classes}"
        )


def _names(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _as_ours(key: str, value: Tensor, target: Tensor) -> Tensor:
    """Reshape a released tensor to momkd's layout, or raise naming the key and both shapes."""
    v = value
    if key == "attn_log_tau" and v.numel() == 1:
        v = v.reshape(())
    elif key in _MEMORY_KEYS and v.dim() == 3 and v.shape[0] == 1:
        v = v[0]
    if tuple(v.shape) != tuple(target.shape):
        expected = (1, *target.shape) if key in _MEMORY_KEYS else tuple(target.shape)
        raise ConfigError(
            f"released state dict: {key} has shape {tuple(value.shape)}, the model expects {expected}"
        )
    return v


def load_released_state_dict(
    model: MoMKD, sd: Mapping[str, Tensor], strict: bool = True
) -> tuple[list[str], list[str]]:
    """Copy a released state dict into ``model`` in place.

    Parameters
    ----------
    model : MoMKD
        Target model with matching dimensions (any memory update mode).
    sd : Mapping[str, Tensor]
        The released state dict (51 keys, 49 at D_in = H; a ``module.`` prefix from DataParallel
        is stripped).
    strict : bool
        Raise on missing or unexpected keys. Shape mismatches always raise.

    Returns
    -------
    missing, unexpected : list of str
        Released keys absent from ``sd`` and keys of ``sd`` that are not released keys (both empty
        when ``strict`` succeeds).

    Raises
    ------
    ConfigError
        Missing or unexpected keys (strict), or a shape mismatch; the message names the keys.
    """
    items = dict(sd.items())
    if items and all(k.startswith("module.") for k in items):
        items = {k[len("module.") :]: v for k, v in items.items()}
    _require_binary(model)
    expected = released_keys(model)
    missing = [k for k in expected if k not in items]
    unexpected = sorted(k for k in items if k not in expected)
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing keys: {_names(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_names(unexpected)}")
        raise ConfigError("released state dict: " + "; ".join(parts))
    ours: dict[str, Tensor] = dict(model.named_parameters())
    ours.update(dict(model.named_buffers()))
    pending: list[tuple[Tensor, Tensor]] = []
    for key, name in KEY_MAP.items():
        if key not in items or key not in expected:
            continue
        target = ours[name]
        value = items[key]
        if not isinstance(value, Tensor):
            raise ConfigError(
                f"released state dict: {key} is not a tensor ({type(value).__name__})"
            )
        pending.append((target, _as_ours(key, value, target)))
    with torch.no_grad():
        for target, value in pending:
            target.copy_(value.to(device=target.device, dtype=target.dtype))
    if missing or unexpected:
        logger.warning(
            "released state dict loaded non-strictly: %d missing, %d unexpected keys",
            len(missing),
            len(unexpected),
        )
    return missing, unexpected


def model_from_released(sd: Mapping[str, Tensor], **overrides: Any) -> MoMKD:
    """Build a :class:`MoMKD` with dimensions inferred from a released state dict and load it.

    Parameters
    ----------
    sd : Mapping[str, Tensor]
        The released state dict.
    **overrides
        Non-shape :class:`ModelConfig` fields (dropouts, tau range, memory update mode, ...).

    Returns
    -------
    MoMKD
        The loaded model (in training mode, like any new module; call ``.eval()`` for inference).

    Raises
    ------
    ConfigError
        Keys needed to infer the dimensions are missing or inconsistent.
    """
    items = dict(sd.items())
    if items and all(k.startswith("module.") for k in items):
        items = {k[len("module.") :]: v for k, v in items.items()}

    def shape(key: str) -> tuple[int, ...]:
        if key not in items:
            raise ConfigError(
                f"released state dict: missing key {key} (needed to infer dimensions)"
            )
        return tuple(items[key].shape)

    att = shape("wsi_encoder.gat1.att")
    if len(att) != 3 or att[1] != 2:
        raise ConfigError(
            f"released state dict: wsi_encoder.gat1.att has shape {att}, expected (1, 2, H/2)"
        )
    embed = shape("mem_pos._codebook.embed")
    dims: dict[str, Any] = {
        "d_in": shape("wsi_encoder.gat1.lin_l.weight")[1],
        "hidden": shape("wsi_encoder.ln1.weight")[0],
        "genes": shape("rna_tower.encoder.0.weight")[1],
        "omics_hidden": shape("rna_tower.encoder.0.weight")[0],
        "omics_width": shape("rna_tower.encoder.4.weight")[0],
        "sphere": shape("wsi_patch_projector.weight")[0],
        "memory_k": embed[-2] if len(embed) >= 2 else 0,
        "classifier_hidden": shape("wsi_classifier_proto.1.weight")[0],
        "n_classes": shape("wsi_classifier_proto.4.weight")[0],
    }
    if dims["n_classes"] != 2:
        raise ConfigError(
            f"released state dict: wsi_classifier_proto.4.weight has {dims['n_classes']} outputs; "
            "the released implementation has two classes"
        )
    # No residual projection: the released identity residual, possible only at D_in = H. A
    # projection at D_in = H (a state dict exported from a momkd model built with
    # input_residual: linear) keeps its Linear.
    if RESIDUAL_KEYS[0] in items:
        dims["input_residual"] = "linear" if dims["d_in"] == dims["hidden"] else "auto"
    elif dims["d_in"] == dims["hidden"]:
        dims["input_residual"] = "auto"
    else:
        raise ConfigError(
            f"released state dict: missing key {RESIDUAL_KEYS[0]} (needed when the feature "
            f"dimension {dims['d_in']} differs from the encoder width {dims['hidden']})"
        )
    clash = sorted(set(dims) & set(overrides))
    if clash:
        raise ConfigError(f"model_from_released: {clash} are inferred from the state dict")
    model = MoMKD(ModelConfig(**dims, **overrides))  # type: ignore[arg-type]
    load_released_state_dict(model, items, strict=True)
    return model


def export_released_state_dict(model: MoMKD) -> dict[str, Tensor]:
    """The model's weights under the released implementation's key names and shapes.

    51 keys, or 49 without ``wsi_encoder.res_proj1.*`` when the model's first residual is the
    identity (D_in = H), exactly as the released code saves them.

    Memories are exported as (1, K, S); the inert codebook buffers as ``initted`` (1,) = 1,
    ``cluster_size`` (1, K) = 1 and ``embed_avg`` (1, K, S) = the memory.

    Parameters
    ----------
    model : MoMKD

    Returns
    -------
    dict[str, Tensor]
        Detached CPU float32 copies, keyed like :func:`released_keys`.
    """
    if isinstance(getattr(model, "feature_mean", None), Tensor):
        raise ConfigError(
            "export_released_state_dict: the model standardises its input features "
            "(data.standardize: train), which the released implementation does not; train with "
            "data.standardize: none to export"
        )
    _require_binary(model)
    ours: dict[str, Tensor] = dict(model.named_parameters())
    ours.update(dict(model.named_buffers()))
    expected = released_keys(model)
    out: dict[str, Tensor] = {}
    for key, name in KEY_MAP.items():
        if key not in expected:
            continue
        value = ours[name].detach().to("cpu", torch.float32).clone()
        if key in _MEMORY_KEYS:
            value = value[None]
        out[key] = value
    k = model.cfg.memory_k
    for c in ("pos", "neg"):
        embed = out[f"mem_{c}._codebook.embed"]
        out[f"mem_{c}._codebook.initted"] = torch.ones(1)
        out[f"mem_{c}._codebook.cluster_size"] = torch.ones(1, k)
        out[f"mem_{c}._codebook.embed_avg"] = embed.clone()
    return out
