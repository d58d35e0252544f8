"""Leak-free expression preprocessing, fitted on one fold's training patients (docs/METHOD.md §2.6).

:class:`GenomicsPreprocessor` applies, in order:

1. ``log2(x + 1)`` — always (``log=True``), never (``log=False``), or with ``log="auto"`` unless
   the training matrix already looks log-scale: it has a negative value or its maximum is below 50.
   Raw counts, TPM and FPKM of a transcriptome always exceed 50 for some gene, while
   ``log2(TPM + 1)`` stays below about 25, so the threshold separates the two with a wide margin;
2. z-scoring with the training mean and standard deviation of each gene (population std; a
   constant gene gets std 1, i.e. it is only centred);
3. selection of ``n_genes`` genes by a supervised ranking on the training patients: ANOVA F
   (scikit-learn ``f_classif``), XGBoost feature importance (optional ``momkd[xgboost]`` extra;
   ties broken by the F score), or a user gene list (kept in the list's order).

ANOVA and XGBoost selections keep the genes in the matrix's column order, like scikit-learn's
``SelectKBest``. Every statistic comes from ``fit``; ``transform`` never looks at the data it
transforms beyond applying them. The fitted state is plain Python data (:meth:`state_dict`), so a
checkpoint holding it loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from momkd.errors import ConfigError, DataError

if TYPE_CHECKING:
    from momkd.config import RunConfig

__all__ = ["AUTO_LOG_MAX", "GenomicsPreprocessor", "preprocessor_from_config", "read_gene_list"]

log = logging.getLogger(__name__)

#: With ``log="auto"``, a non-negative training matrix whose maximum is below this is taken as
#: already log-scale.
AUTO_LOG_MAX = 50.0

LogMode = bool | Literal["auto"]
_STATE_KEYS = (
    "n_genes",
    "selection",
    "log",
    "log_applied",
    "n_input_genes",
    "gene_names",
    "selected_index",
    "mean",
    "std",
    "scores",
)


def read_gene_list(path: str | os.PathLike[str]) -> list[str]:
    """Gene names from a text file: one per line (first comma/tab field), ``#`` comments skipped.

    Raises
    ------
    DataError
        Missing or empty file.
    """
    file = Path(path)
    try:
        lines = file.read_text(encoding="utf-8-sig").splitlines()
    except OSError as exc:
        raise DataError(f"{file}: cannot read gene list: {exc.strerror or exc}") from None
    genes = []
    for line in lines:
        text = line.split("#", 1)[0].replace("\t", ",").split(",", 1)[0].strip()
        if text:
            genes.append(text)
    if not genes:
        raise DataError(f"{file}: gene list is empty")
    return genes


class GenomicsPreprocessor:
    """Per-fold log transform, z-scoring and gene selection.

    Parameters
    ----------
    n_genes
        Number of genes kept (ignored with ``selection="list"``, which keeps the whole list).
    selection
        ``"anova"``, ``"xgboost"`` or ``"list"``.
    gene_list
        Gene names (or a file of them, see :func:`read_gene_list`) for ``selection="list"``.
    log
        ``True``, ``False`` or ``"auto"`` (see the module docstring).
    seed
        Seed of the XGBoost ranking.
    """

    def __init__(
        self,
        n_genes: int = 768,
        selection: Literal["anova", "xgboost", "list"] = "anova",
        gene_list: Sequence[str] | str | os.PathLike[str] | None = None,
        log: LogMode = "auto",
        seed: int = 0,
    ) -> None:
        if selection not in ("anova", "xgboost", "list"):
            raise ConfigError(
                f"genomics.selection: must be anova, xgboost or list, got {selection!r}"
            )
        if log not in (True, False, "auto"):
            raise ConfigError(f"genomics.log: must be true, false or auto, got {log!r}")
        if selection != "list" and n_genes < 1:
            raise ConfigError(f"genomics.n_genes: must be >= 1, got {n_genes}")
        genes: list[str] | None = None
        if selection == "list":
            if gene_list is None:
                raise ConfigError("genomics.gene_list: required when genomics.selection is 'list'")
            if isinstance(gene_list, (str, os.PathLike)):
                gene_list = read_gene_list(gene_list)
            genes = [str(g).strip() for g in gene_list]
            counts = Counter(genes)
            dupes = sorted(g for g, c in counts.items() if c > 1)
            if dupes:
                raise DataError(f"genomics.gene_list: genes listed twice: {dupes[:5]}")
            if not genes:
                raise DataError("genomics.gene_list: empty gene list")
        self.n_genes = len(genes) if genes is not None else int(n_genes)
        self.selection = selection
        self.gene_list = genes
        self.log = log
        self.seed = seed
        self._fitted = False
        self.log_applied = False
        self.n_input_genes = 0
        self.gene_names: list[str] = []
        self.selected_index = np.zeros(0, dtype=np.int64)
        self.mean = np.zeros(0)
        self.std = np.ones(0)
        self.scores = np.zeros(0)

    # ------------------------------------------------------------------------------------- fitting

    def check_genes(self, gene_names: Sequence[str], source: object = None) -> None:
        """Check that the expression matrix's genes can serve this configuration: at least
        ``n_genes`` of them, and every gene of a gene list. Run once before training starts, so
        that a bad value fails before any fold does.

        Parameters
        ----------
        gene_names
            ``(G,)`` column names of the expression matrix.
        source
            The expression file, named in the error when given.

        Raises
        ------
        ConfigError
            ``n_genes`` larger than ``G``.
        DataError
            Genes of the list missing from ``gene_names``.
        """
        where = f" {source}" if source is not None else ""
        if self.selection != "list" and self.n_genes > len(gene_names):
            raise ConfigError(
                f"genomics.n_genes: {self.n_genes} exceeds the {len(gene_names)} genes of the "
                f"expression matrix{where}"
            )
        if self.gene_list is not None:
            have = set(gene_names)
            missing = [g for g in self.gene_list if g not in have]
            if missing:
                shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
                raise DataError(
                    f"genomics.gene_list: {len(missing)} genes not in the expression "
                    f"matrix{where}: {shown}"
                )
        if self.selection == "xgboost":
            try:
                import xgboost  # noqa: F401 - the ranking needs it in every fold
            except ImportError:
                raise ConfigError(_XGBOOST_MISSING) from None

    def fit(
        self,
        x_train: np.ndarray,
        y_train: np.ndarray | Sequence[int],
        gene_names: Sequence[str] | None = None,
    ) -> GenomicsPreprocessor:
        """Fit the transform on training patients only.

        Parameters
        ----------
        x_train
            ``(n, G)`` expression of the fold's training patients (raw or log).
        y_train
            ``(n,)`` class indices of those patients (0/1; 0..C-1 for C classes: the ANOVA F test
            and XGBoost both rank genes across every class).
        gene_names
            ``(G,)`` column names (default ``"0"``, ``"1"``, ...).

        Returns
        -------
        GenomicsPreprocessor
            ``self``.

        Raises
        ------
        DataError
            Shape mismatch, NaN/Inf, labels that are not class indices or a single class, negative
            values when
            the log is applied, genes of the list missing from ``gene_names``.
        ConfigError
            ``n_genes`` larger than ``G``; ``xgboost`` selection without the package.
        """
        x = np.asarray(x_train, dtype=np.float64)
        y = np.asarray(y_train)
        if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
            raise DataError(
                f"genomics: training matrix must be (n, G) and non-empty, got {x.shape}"
            )
        if y.shape != (x.shape[0],):
            raise DataError(f"genomics: {x.shape[0]} training rows but labels of shape {y.shape}")
        if y.dtype.kind == "f" and np.isfinite(y).all() and (y == np.round(y)).all():
            y = y.astype(np.int64)  # 0.0/1.0 from a float column
        if y.dtype.kind not in "iub" or (y < 0).any():
            raise DataError(
                f"genomics: labels must be class indices (0/1, or 0..C-1), got "
                f"{sorted(set(y.tolist()))[:10]}"
            )
        if len(np.unique(y)) < 2 and self.selection != "list":
            raise DataError(
                "genomics: the training patients have a single class; cannot rank genes"
            )
        names = (
            [str(g) for g in gene_names]
            if gene_names is not None
            else [str(i) for i in range(x.shape[1])]
        )
        if len(names) != x.shape[1]:
            raise DataError(f"genomics: {x.shape[1]} columns but {len(names)} gene names")
        _check_finite(x, "training")
        self.check_genes(names)

        if self.log == "auto":
            already_log = bool(x.min() < 0 or x.max() < AUTO_LOG_MAX)
            self.log_applied = not already_log
            log.info(
                "genomics: log2(x+1) %s (auto: training max %.3g, min %.3g)",
                "applied" if self.log_applied else "skipped",
                x.max(),
                x.min(),
            )
        else:
            self.log_applied = bool(self.log)
        xl = self._log(x, "training")
        mean = xl.mean(axis=0)
        std = xl.std(axis=0)
        std[std == 0] = 1.0
        z = (xl - mean) / std

        if self.selection == "list":
            assert self.gene_list is not None
            index = {g: i for i, g in enumerate(names)}
            selected = np.array([index[g] for g in self.gene_list], dtype=np.int64)
            scores = _anova(z, y)[selected] if len(np.unique(y)) >= 2 else np.zeros(len(selected))
        else:
            f_scores = _anova(z, y)
            if self.selection == "anova":
                primary = f_scores
            else:
                primary = _xgboost_importance(z, y, self.seed)
            # Rank by primary score (descending), then F score, then column index.
            order = np.lexsort((np.arange(len(f_scores)), -f_scores, -primary))
            selected = np.sort(order[: self.n_genes]).astype(np.int64)
            scores = primary[selected]

        self.n_input_genes = x.shape[1]
        self.selected_index = selected
        self.gene_names = [names[i] for i in selected]
        self.mean = mean[selected]
        self.std = std[selected]
        self.scores = np.asarray(scores, dtype=np.float64)
        self._fitted = True
        return self

    def _log(self, x: np.ndarray, what: str) -> np.ndarray:
        if not self.log_applied:
            return x
        if (x < 0).any():
            r, c = np.argwhere(x < 0)[0]
            raise DataError(
                f"genomics: negative value {x[r, c]} in the {what} matrix (row {r}, column {c}) "
                "cannot be log-transformed; set genomics.log: false if it is already log-scale"
            )
        return np.log2(x + 1.0)

    # ------------------------------------------------------------------------------------ applying

    def transform(self, x: np.ndarray, gene_names: Sequence[str] | None = None) -> np.ndarray:
        """Apply the fitted transform.

        Parameters
        ----------
        x
            ``(n, G)`` expression with the columns seen in ``fit`` (same order), or any columns
            when ``gene_names`` is given (then the selected genes are picked by name).
        gene_names
            Column names of ``x``.

        Returns
        -------
        np.ndarray
            ``(n, n_genes)`` float32.

        Raises
        ------
        DataError
            Not fitted, wrong width, missing genes, NaN/Inf, or negative values when the log is
            applied.
        """
        if not self._fitted:
            raise DataError("genomics: transform called before fit")
        arr = np.asarray(x, dtype=np.float64)
        if arr.ndim == 1:
            arr = arr[None, :]
        if arr.ndim != 2:
            raise DataError(f"genomics: expected an (n, G) matrix, got shape {arr.shape}")
        if gene_names is not None:
            index = {str(g): i for i, g in enumerate(gene_names)}
            if len(index) != arr.shape[1]:
                raise DataError(
                    f"genomics: {arr.shape[1]} columns but {len(gene_names)} gene names"
                )
            missing = [g for g in self.gene_names if g not in index]
            if missing:
                raise DataError(f"genomics: selected genes missing from the matrix: {missing[:10]}")
            cols = arr[:, [index[g] for g in self.gene_names]]
        else:
            if arr.shape[1] != self.n_input_genes:
                raise DataError(
                    f"genomics: fitted on {self.n_input_genes} genes, got {arr.shape[1]} columns"
                )
            cols = arr[:, self.selected_index]
        _check_finite(cols, "input")
        out = (self._log(cols, "input") - self.mean) / self.std
        return out.astype(np.float32)

    def fit_transform(
        self,
        x_train: np.ndarray,
        y_train: np.ndarray | Sequence[int],
        gene_names: Sequence[str] | None = None,
    ) -> np.ndarray:
        """``fit`` then ``transform`` on the same training matrix; ``(n, n_genes)`` float32."""
        return self.fit(x_train, y_train, gene_names).transform(x_train)

    @property
    def fitted(self) -> bool:
        """Whether :meth:`fit` (or :meth:`from_state_dict`) has run."""
        return self._fitted

    # --------------------------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """The fitted state as plain Python values (lists, numbers, strings)."""
        if not self._fitted:
            raise DataError("genomics: state_dict called before fit")
        return {
            "n_genes": int(self.n_genes),
            "selection": self.selection,
            "log": self.log,
            "log_applied": bool(self.log_applied),
            "n_input_genes": int(self.n_input_genes),
            "gene_names": list(self.gene_names),
            "selected_index": [int(i) for i in self.selected_index],
            "mean": [float(v) for v in self.mean],
            "std": [float(v) for v in self.std],
            "scores": [float(v) for v in self.scores],
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> GenomicsPreprocessor:
        """Rebuild a fitted preprocessor from :meth:`state_dict`.

        Raises
        ------
        DataError
            Missing keys or inconsistent lengths.
        """
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise DataError(f"genomics state: missing keys {missing}")
        n = len(state["gene_names"])
        if any(len(state[k]) != n for k in ("selected_index", "mean", "std", "scores")):
            raise DataError(
                "genomics state: gene_names, selected_index, mean, std differ in length"
            )
        obj = cls.__new__(cls)
        obj.n_genes = int(state["n_genes"])
        obj.selection = state["selection"]
        obj.gene_list = list(state["gene_names"]) if state["selection"] == "list" else None
        obj.log = state["log"]
        obj.seed = 0
        obj.log_applied = bool(state["log_applied"])
        obj.n_input_genes = int(state["n_input_genes"])
        obj.gene_names = [str(g) for g in state["gene_names"]]
        obj.selected_index = np.asarray(state["selected_index"], dtype=np.int64)
        obj.mean = np.asarray(state["mean"], dtype=np.float64)
        obj.std = np.asarray(state["std"], dtype=np.float64)
        obj.scores = np.asarray(state["scores"], dtype=np.float64)
        obj._fitted = True
        return obj


def _check_finite(x: np.ndarray, what: str) -> None:
    bad = ~np.isfinite(x)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise DataError(f"genomics: non-finite value in the {what} matrix (row {r}, column {c})")


def _anova(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    from sklearn.feature_selection import f_classif

    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Features .* are constant", category=UserWarning)
        f, _ = f_classif(z, y)
    # Constant genes give NaN; rank them last, as SelectKBest does.
    return np.where(np.isnan(f), -np.inf, f)


_XGBOOST_MISSING = (
    "genomics.selection: 'xgboost' needs the xgboost package: "
    "pip install 'momkd[xgboost]' (or choose anova)"
)


def _xgboost_importance(z: np.ndarray, y: np.ndarray, seed: int) -> np.ndarray:
    try:
        import xgboost
    except ImportError:
        raise ConfigError(_XGBOOST_MISSING) from None
    model = xgboost.XGBClassifier(
        n_estimators=200,
        max_depth=3,
        learning_rate=0.1,
        subsample=0.8,
        colsample_bytree=0.8,
        random_state=seed,
        n_jobs=1,
        importance_type="gain",
    )
    model.fit(z.astype(np.float32), y.astype(np.int64))
    importance = np.asarray(model.feature_importances_, dtype=np.float64)
    if importance.shape != (z.shape[1],):
        raise DataError(f"genomics: xgboost returned {importance.shape} importances")
    return np.nan_to_num(importance, nan=0.0)


def preprocessor_from_config(cfg: RunConfig) -> GenomicsPreprocessor:
    """A preprocessor configured from ``cfg.genomics`` (and ``cfg.data.expression_is_log``).

    ``genomics.log: auto`` with ``data.expression_is_log: true`` skips the log transform.
    """
    g = cfg.genomics
    mode: LogMode = g.log
    if mode == "auto" and cfg.data.expression_is_log:
        mode = False
    return GenomicsPreprocessor(
        n_genes=g.n_genes,
        selection=g.selection,
        gene_list=g.gene_list,
        log=mode,
        seed=cfg.train.seed,
    )
