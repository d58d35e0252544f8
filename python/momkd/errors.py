"""Exception hierarchy of momkd.

The classes are created in the Rust extension (``momkd._core``) so that errors raised while reading a
store in Rust and errors raised in Python share one hierarchy::

    MomkdError
    ├── StoreError           bad, corrupt or incomplete cohort store (names store, array, chunk)
    ├── SlideNotFoundError   unknown slide id (also a KeyError)
    ├── DataError            bad input data: NaN/Inf, empty bag, shapes, duplicates, labels (a ValueError)
    ├── IngestError          a source file that cannot be ingested
    └── ConfigError          invalid configuration key or value (a ValueError)

Every message is one line naming the file, slide, chunk or key at fault. The command line maps any
``MomkdError`` to exit code 2 without a traceback.
"""

from __future__ import annotations

from momkd._core import (
    ConfigError,
    DataError,
    IngestError,
    MomkdError,
    SlideNotFoundError,
    StoreError,
)

__all__ = [
    "ConfigError",
    "DataError",
    "IngestError",
    "MomkdError",
    "SlideNotFoundError",
    "StoreError",
]


class DistributedError(MomkdError):
    """A data-parallel run cannot go on: a collective failed or timed out (another rank stopped),
    or the ranks' models diverged."""


__all__ += ["DistributedError"]
