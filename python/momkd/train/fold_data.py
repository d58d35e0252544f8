"""What one cross-validation fold trains and evaluates on (:class:`FoldData`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from momkd.data.store import CohortStore

__all__ = ["FoldData"]


@dataclass
class FoldData:
    """Everything one fold trains and evaluates on.

    Attributes
    ----------
    fold : int
    train, val, test : list[str]
        Slide ids.
    labels : dict[str, int]
        Slide -> label for every slide above.
    cases : dict[str, str]
        Slide -> patient.
    expression : dict[str, np.ndarray] | None
        Patient -> preprocessed (G,) float32 expression of the training patients (None for abmil).
    genomics_state : dict | None
        The fold's fitted :class:`~momkd.train.genomics.GenomicsPreprocessor` state.
    val_expression : dict[str, np.ndarray] | None
        Patient -> expression of the validation patients, preprocessed with the statistics fitted
        on the training patients (never used for training; MoMKD's teacher AUC in the history).
    external : tuple | None
        ``(store, slide_ids, labels | None, cases)`` of the external cohort.
    members : dict[str, list[str]] | None
        With ``data.bag: patient``: patient -> slide ids. The ids in ``train``/``val``/``test`` (and
        the keys of ``labels``/``cases``) are then patients, each one bag of its slides.
    external_members : dict[str, list[str]] | None
        The same for the external cohort.
    """

    fold: int
    train: list[str]
    val: list[str]
    test: list[str]
    labels: dict[str, int]
    cases: dict[str, str]
    expression: dict[str, np.ndarray] | None = None
    genomics_state: dict[str, Any] | None = None
    val_expression: dict[str, np.ndarray] | None = None
    external: tuple[CohortStore, list[str], dict[str, int] | None, dict[str, str]] | None = None
    members: dict[str, list[str]] | None = None
    external_members: dict[str, list[str]] | None = None
