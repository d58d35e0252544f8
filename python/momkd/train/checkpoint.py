"""Training checkpoints: atomic writes, ``weights_only``-safe contents, RNG state capture.

A checkpoint is a ``dict`` saved with ``torch.save`` that holds only tensors, plain Python
containers, numbers, strings, booleans and ``None``, so ``torch.load(path, weights_only=True)``
reads it without unpickling arbitrary objects. Numpy arrays are converted to tensors on the way in
(:func:`to_safe`); random-number-generator states are stored as tensors and lists.

Keys written by the training loop (``format`` = ``"momkd-checkpoint"``, ``version`` = 1):

``method``, ``model_config`` (dict), ``config`` (the resolved run configuration as a dict),
``fold``, ``model`` (state dict), ``optimizer``, ``scheduler``, ``sampler`` (state dicts),
``genomics`` (the fold's fitted preprocessor state or ``None``), ``rng`` (:func:`capture_rng_state`),
``epoch`` (epochs completed), ``step`` (optimizer steps done), ``early_stopping`` (dict),
``history`` (list of per-epoch dicts), ``kind`` (``"last"`` or ``"best"``).
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from momkd._io import temp_file_beside
from momkd.errors import MomkdError

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "capture_rng_state",
    "load_checkpoint",
    "restore_rng_state",
    "save_checkpoint",
    "to_safe",
]

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "momkd-checkpoint"
CHECKPOINT_VERSION = 1


def to_safe(obj: Any) -> Any:
    """Convert ``obj`` into something ``torch.load(weights_only=True)`` accepts.

    numpy arrays become tensors (string arrays become lists of ``str``), numpy scalars become Python
    scalars, tuples and lists are converted element-wise, mappings get ``str`` keys kept as they are.

    Raises
    ------
    TypeError
        For any other object type (so an unsafe checkpoint is caught when written, not when read).
    """
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind in "US":
            return [str(v) for v in obj.tolist()]
        if obj.dtype.kind == "O":
            return [to_safe(v) for v in obj.tolist()]
        return torch.from_numpy(np.ascontiguousarray(obj)).clone()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: to_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_safe(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(to_safe(v) for v in obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot store an object of type {type(obj).__name__} in a checkpoint")


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (temporary file in the same folder + ``os.replace``).

    Parameters
    ----------
    path : path-like
        Destination (``*.pt``).
    state : dict
        Checkpoint contents; converted with :func:`to_safe`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    safe = to_safe(state)
    fd, tmp = temp_file_beside(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(safe, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint with ``torch.load(weights_only=True)``.

    Raises
    ------
    MomkdError
        When the file is missing, truncated, not a momkd checkpoint or of a newer version.
    """
    path = Path(path)
    if not path.is_file():
        raise MomkdError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MomkdError(f"checkpoint {path} is unreadable: {first}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise MomkdError(f"checkpoint {path} is not a momkd checkpoint")
    if int(state.get("version", 0)) > CHECKPOINT_VERSION:
        raise MomkdError(
            f"checkpoint {path} has version {state.get('version')}, this momkd reads up to "
            f"{CHECKPOINT_VERSION}"
        )
    return state


def capture_rng_state() -> dict[str, Any]:
    """The states of Python's, numpy's and torch's global generators as tensors and lists."""
    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {
            "version": int(py_version),
            "state": torch.tensor(py_state, dtype=torch.int64),
            "gauss": py_gauss,
        },
        "numpy": {
            "kind": str(np_kind),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
        "cuda": [],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore the generators saved by :func:`capture_rng_state`."""
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state(
        (
            npst["kind"],
            npst["keys"].numpy().astype(np.uint32),
            int(npst["pos"]),
            int(npst["has_gauss"]),
            float(npst["gauss"]),
        )
    )
    torch.set_rng_state(state["torch"].to(torch.uint8))
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.to(torch.uint8) for s in cuda])
        else:
            log.warning(
                "checkpoint holds %d CUDA generator states, this machine has %d devices; "
                "CUDA generators not restored",
                len(cuda),
                torch.cuda.device_count(),
            )
