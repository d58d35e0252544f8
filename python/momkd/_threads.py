"""PyTorch intra-op thread count, shared by ``momkd train``, ``eval``, ``predict`` and the demo."""

from __future__ import annotations

import logging
import os

from momkd.errors import ConfigError

__all__ = ["available_cores", "set_torch_threads"]

log = logging.getLogger(__name__)


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the platform reports one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def set_torch_threads(threads: int | None, key: str = "train.torch_threads") -> int:
    """Set PyTorch's intra-op thread count.

    PyTorch picks its own default (the physical cores, or ``OMP_NUM_THREADS``), which can leave
    cores idle or oversubscribe a machine shared with momkd's Rust loader threads; momkd sets it
    explicitly instead.

    Parameters
    ----------
    threads : int or None
        Threads to use; ``None`` uses every available core (:func:`available_cores`).
    key : str
        Where the value came from, for the error message.

    Returns
    -------
    int
        The thread count now in effect.

    Raises
    ------
    ConfigError
        ``threads`` is not a positive integer.
    """
    import torch

    if threads is None:
        threads = available_cores()
    elif isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"{key}: must be an integer >= 1 or null, got {threads!r}")
    torch.set_num_threads(threads)
    log.info("PyTorch intra-op threads: %d", threads)
    return torch.get_num_threads()
