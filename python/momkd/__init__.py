"""momkd: Momentum Memory Knowledge Distillation for computational pathology.

Training pairs whole-slide images (bags of patch features) with bulk RNA-seq; inference needs
histology only. The public API:

* :class:`CohortStore`, :class:`StoreWriter` — the Zarr v3 cohort store (``docs/FORMAT.md``);
* :class:`BagLoader` — the multithreaded Rust bag loader (features, coordinates, k-NN graph);
* :func:`momkd.train.train` — k-fold training from a run configuration, returning the summary;
* :mod:`momkd.errors` — the exception hierarchy.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from momkd import errors
from momkd._core import __version__

__all__ = ["Bag", "BagLoader", "CohortStore", "StoreWriter", "__version__", "errors"]

_LAZY = {
    "Bag": ("momkd.data.loader", "Bag"),
    "BagLoader": ("momkd.data.loader", "BagLoader"),
    "CohortStore": ("momkd.data.store", "CohortStore"),
    "StoreWriter": ("momkd.data.store_writer", "StoreWriter"),
}


def __getattr__(name: str) -> Any:
    # Lazy imports keep `import momkd` (and the CLI's start-up) free of torch until it is needed.
    try:
        module, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'momkd' has no attribute {name!r}") from None
    return getattr(import_module(module), attr)
