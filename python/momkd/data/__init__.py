"""Cohort stores: writing (:class:`StoreWriter`, :func:`ingest`), reading (:class:`CohortStore`) and
iterating bags as tensors (:class:`BagLoader`). The on-disk format is ``docs/FORMAT.md``."""

from __future__ import annotations

from momkd.data.info import describe, format_info
from momkd.data.ingest import ingest
from momkd.data.loader import Bag, BagLoader
from momkd.data.store import CohortStore, SlideArrays
from momkd.data.store_writer import StoreWriter

__all__ = [
    "Bag",
    "BagLoader",
    "CohortStore",
    "SlideArrays",
    "StoreWriter",
    "describe",
    "format_info",
    "ingest",
]
