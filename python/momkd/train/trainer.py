"""Training of one cross-validation fold (:class:`FoldTrainer`): model construction, the epoch loop,
model selection, checkpoints and resume. The memory initialisation (:mod:`momkd.train.memory_init`)
and the final evaluation (:mod:`momkd.train.fold_eval`) have their own modules.

One :class:`FoldTrainer` owns ``RUN_DIR/fold_<k>/``::

    last.pt                   full training state after the latest finished epoch (resume point)
    best.pt                   model of the kept epoch (train.monitor; + config, genomics state)
    history.json/.csv         one row per epoch: losses, val AUC/loss, lr, tau, timing, memory usage
    val_predictions.csv       slide_id, case_id, label, prob, pred   (best model)
    test_predictions.csv      slide_id, case_id, label, prob, pred, pred_thr
    external_predictions.csv  (when an external cohort is configured)
    result.json               the fold's metrics; its presence marks the fold as finished

Protocol (docs/METHOD.md §2.6): AdamW over all trainable parameters, gradient-norm clipping,
class-balanced sampling with replacement (:class:`~momkd.train.sampler.ClassBalancedSampler`). One
monitored validation quantity (``train.monitor``: ``val_loss`` or ``val_auc``) drives the kept
checkpoint, early stopping and the plateau learning-rate schedule (:class:`~momkd.train.selection.Monitor`); a change within
``train.min_delta`` is a tie and a tie keeps the later epoch. Without a validation set
(``splits.val_fraction: 0``) every epoch runs and the last one is kept. With ``data.standardize:
train`` the features are standardised with statistics of the fold's training patches only
(:mod:`momkd.train.standardize`). With ``data.bag: patient`` a patient's slides form one bag (each
slide keeps its own k-NN graph). Test metrics are reported at the argmax rule and at the F1-optimal
threshold chosen on the validation set.

Data parallelism (``torchrun``, :mod:`momkd.train.distributed`): the model is wrapped in
``DistributedDataParallel``; rank ``r`` of ``W`` trains on the draws ``r, r + W, ...`` of the epoch's
global draw, so W ranks x batch B train as one process x batch B*W; momentum statistics are
all-reduced before each memory update; inference is sharded and gathered in slide order; a checksum
of the model is compared across ranks after every epoch; rank 0 alone writes ``fold_<k>/``.

Reproducibility: every fold seeds Python, numpy and torch with ``train.seed + fold`` before building
its model, the epoch draw depends only on ``(seed, epoch)``, and ``last.pt`` stores every generator
state, so a run resumed from ``last.pt`` replays the following epochs exactly as an uninterrupted
run would (bit-identical on CPU in ``train.deterministic`` mode).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from contextlib import nullcontext as _nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from momkd._io import (
    write_csv,
    write_json,
)
from momkd.config import RunConfig
from momkd.data.cache import shared_cache
from momkd.data.store import CohortStore
from momkd.errors import DataError, MomkdError
from momkd.methods import (
    has_memory,
    learning_rate,
    uses_expression,
    uses_graph,
)
from momkd.scoring import metrics as score_metrics
from momkd.train.batching import (
    UnitLoader,
    batches_of,
    collate,
    drop_patches,
    feature_dtype_for,
)
from momkd.train.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from momkd.train.device import seed_everything
from momkd.train.distributed import Dist, shard
from momkd.train.ema import WeightEMA
from momkd.train.factory import (
    batch_size_for,
    build_model,
    loss_weights_for,
    model_spec_for,
)
from momkd.train.fold_data import FoldData
from momkd.train.fold_eval import evaluate_fold
from momkd.train.inference import InferenceResult, run_inference
from momkd.train.memory_init import init_class_memory
from momkd.train.sampler import ClassBalancedSampler
from momkd.train.selection import Monitor, scheduled_lr
from momkd.train.standardize import (
    FeatureStats,
    attach_standardizer,
    fit_feature_stats,
)

__all__ = ["FoldTrainer"]

log = logging.getLogger(__name__)


@dataclass
class _State:
    epoch: int = 0
    step: int = 0
    finished: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)


class FoldTrainer:
    """Train and evaluate one fold (see the module docstring for the files it writes).

    Parameters
    ----------
    cfg : RunConfig
        Resolved configuration.
    data : FoldData
        Splits, labels, expression of the fold.
    store : CohortStore
        The training cohort store.
    fold_dir : Path
        ``RUN_DIR/fold_<k>``.
    device : torch.device
    progress : bool
        Show tqdm bars.
    dist : Dist, optional
        This process's rank in a data-parallel run (:mod:`momkd.train.distributed`): the model is
        wrapped in ``DistributedDataParallel``, rank ``r`` trains on the draws ``r, r + W, ...`` of
        the epoch, inference is sharded and gathered, and rank 0 alone writes ``fold_dir``.
    """

    def __init__(
        self,
        cfg: RunConfig,
        data: FoldData,
        store: CohortStore,
        fold_dir: Path,
        *,
        device: torch.device,
        progress: bool = False,
        dist: Dist | None = None,
    ) -> None:
        self.cfg = cfg
        self.data = data
        self.store = store
        self.dir = Path(fold_dir)
        self.device = device
        self.dist = dist if dist is not None else Dist()
        self.progress = progress and self.dist.is_main
        self.method = cfg.model.method
        self.seed = int(cfg.train.seed) + int(data.fold)
        genes = None
        if uses_expression(self.method):
            if not data.expression:
                raise DataError(f"fold {data.fold}: method {self.method} needs expression")
            genes = int(next(iter(data.expression.values())).shape[0])
        self.spec = model_spec_for(cfg, store.feature_dim, genes)
        self.lr = learning_rate(self.method, cfg.train.lr)
        self.weights = loss_weights_for(cfg)
        self.batch_size = batch_size_for(cfg)
        self.loader_threads = 1 if cfg.train.deterministic else cfg.train.num_threads
        self.knn_k = int(cfg.train.knn_k)
        self.graph = uses_graph(self.method)
        self.feature_dtype = feature_dtype_for(cfg, device)
        self.cache = shared_cache(
            store,
            cfg.data.cache,
            device=device,
            cache_gb=cfg.data.cache_gb,
            knn_k=self.knn_k if self.graph else None,
        )
        from momkd.config import config_to_dict

        self.config_dict = config_to_dict(cfg)

    # ------------------------------------------------------------------------------ set-up

    def _build(self) -> None:
        seed_everything(self.seed)
        self.model = build_model(self.spec).to(self.device)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            params, lr=self.lr, weight_decay=self.cfg.train.weight_decay
        )
        train_labels = [self.data.labels[s] for s in self.data.train]
        self.sampler = ClassBalancedSampler(
            train_labels,
            balanced=self.cfg.train.balanced_sampling,
            seed=self.seed,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
        )
        t = self.cfg.train
        self.monitor = Monitor(
            t.patience,
            t.min_epochs,
            float(t.min_delta),
            plateau_patience=t.plateau_patience if t.schedule == "plateau" else None,
        )
        self.ema = WeightEMA(self.model, float(t.ema)) if t.ema is not None else None
        # Steps of one epoch: the same on every rank (the draw is padded to a multiple of W).
        self.steps_per_epoch = max(1, math.ceil(len(self.sampler.indices(0)) / self.batch_size))
        self.state = _State()
        self.net: nn.Module = self.model  # the DistributedDataParallel wrapper once training starts
        if self.dist.rank > 0:
            # Every rank built the same model from the same seed; dropout gets its own stream.
            torch.manual_seed(self.seed + 1_000_003 * self.dist.rank)

    def _wrap(self) -> None:
        """Wrap the model in ``DistributedDataParallel`` (data-parallel runs only), after checking
        that every rank starts from the same parameters, memory and feature statistics."""
        if not self.dist.enabled or self.net is not self.model:
            return
        from torch.nn.parallel import DistributedDataParallel

        self.dist.check_identical(self.model, f"fold {self.data.fold}: the initial model")
        # Buffers (momentum memory, feature statistics) are kept identical by construction and
        # checked every epoch, so they are not re-broadcast before each forward.
        import inspect

        kw: dict[str, Any] = {"broadcast_buffers": False}
        if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:
            kw = {"forward_sync_buffers": False}  # the newer name of the same setting
        self.net = DistributedDataParallel(
            self.model,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            **kw,
        )

    def _meta(self, kind: str) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "kind": kind,
            "method": self.method,
            "model_config": self.spec,
            "config": self.config_dict,
            "fold": self.data.fold,
            "genomics": self.data.genomics_state,
            "epoch": self.state.epoch,
            "step": self.state.step,
        }

    def _save_last(self) -> None:
        # Collective: every rank's generator states go into the checkpoint (rank 0 writes it).
        rngs = self.dist.gather_object(capture_rng_state(), "gathering generator states")
        if not self.dist.is_main:
            return
        assert rngs is not None
        state = self._meta("last")
        state.update(
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "sampler": self.sampler.state_dict(),
                "monitor": self.monitor.state_dict(),
                "rng": rngs[0],
                "history": self.state.history,
                "finished": self.state.finished,
                "world_size": self.dist.world_size,
            }
        )
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        if self.dist.enabled:
            state["rng_ranks"] = rngs
        save_checkpoint(self.dir / "last.pt", state)

    def _save_best(self, val_auc: float, score: float) -> None:
        if not self.dist.is_main:
            return
        state = self._meta("best")
        state.update(
            {
                # The kept model is the weight average when train.ema is on.
                "model": self.ema.model_state(self.model)
                if self.ema is not None
                else self.model.state_dict(),
                "val_auc": val_auc,
                "monitor": self.cfg.train.monitor,
                "score": score,
            }
        )
        save_checkpoint(self.dir / "best.pt", state)

    def _load_last(self) -> None:
        # Rank 0 reads the checkpoint and sends it to the others (no shared file system needed).
        ckpt = self.dist.on_main(
            lambda: load_checkpoint(self.dir / "last.pt", map_location="cpu"), "reading last.pt"
        )
        if ckpt.get("method") != self.method or int(ckpt.get("fold", -1)) != self.data.fold:
            raise MomkdError(
                f"checkpoint {self.dir / 'last.pt'} belongs to method {ckpt.get('method')} fold "
                f"{ckpt.get('fold')}, not {self.method} fold {self.data.fold}"
            )
        if "monitor" not in ckpt:
            raise MomkdError(
                f"checkpoint {self.dir / 'last.pt'} was written by an older momkd without "
                "train.monitor; start this run again in a new directory"
            )
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.sampler.load_state_dict(ckpt["sampler"])
        if self.ema is not None:
            if "ema" not in ckpt:
                raise MomkdError(
                    f"checkpoint {self.dir / 'last.pt'} has no weight average (train.ema); resume "
                    "with the configuration it was written with"
                )
            self.ema.load_state_dict(ckpt["ema"])
        self.monitor.load_state_dict(ckpt["monitor"])
        self.state = _State(
            epoch=int(ckpt["epoch"]),
            step=int(ckpt["step"]),
            finished=bool(ckpt.get("finished", False)),
            history=list(ckpt.get("history", [])),
        )
        ranks = ckpt.get("rng_ranks")
        if ranks is not None and len(ranks) == self.dist.world_size:
            restore_rng_state(ranks[self.dist.rank])
        else:
            restore_rng_state(ckpt["rng"])
            if self.dist.world_size != int(ckpt.get("world_size", 1)):
                log.warning(
                    "fold %d: resumed with %d processes from a checkpoint of %d; the run goes on "
                    "but does not replay the uninterrupted one exactly",
                    self.data.fold,
                    self.dist.world_size,
                    int(ckpt.get("world_size", 1)),
                )
        log.info("fold %d: resumed after epoch %d", self.data.fold, self.state.epoch)

    def _loader(
        self, units: Sequence[str], epoch: int, *, train: bool, graph: bool | None = None
    ) -> UnitLoader:
        return UnitLoader(
            self.store,
            list(units),
            self.data.members,
            epoch=epoch,
            seed=self.seed,
            max_patches=self.cfg.train.max_patches if train else None,
            knn_k=self.knn_k if (self.graph if graph is None else graph) else None,
            num_threads=self.loader_threads,
            prefetch=max(1, self.cfg.train.prefetch),
            dtype=self.feature_dtype,
            pin_memory=self.device.type == "cuda",
            cache=self.cache,
        )

    def _fit_standardizer(self) -> None:
        """Feature mean/std over every patch of the training units (all patches, no graph).

        In a data-parallel run each rank reads its share of the units and the per-rank float64
        statistics are gathered and merged in rank order, so every rank holds the same values.
        """
        units = list(dict.fromkeys(self.data.train))
        stats = fit_feature_stats(
            self._loader(shard(units, self.dist), 0, train=False, graph=False),
            self.store.feature_dim,
        )
        if self.dist.enabled:
            parts = self.dist.all_gather_object(stats, "gathering feature statistics")
            stats = FeatureStats(self.store.feature_dim)
            for part in parts:
                stats.merge(part)
        attach_standardizer(self.model, self.store.feature_dim, stats)
        log.info(
            "fold %d: feature standardisation fitted on %d patches of %d training bags",
            self.data.fold,
            stats.n,
            len(units),
        )

    def _check_validation_size(self) -> None:
        """Say when the fold has no validation set. (Validation sets too small for model
        selection get one warning for the whole run, from :mod:`momkd.train.runner`.)"""
        d = self.data
        if not d.val:
            log.info(
                "fold %d: no validation set; training runs train.epochs=%d and keeps the last "
                "epoch's model",
                d.fold,
                self.cfg.train.epochs,
            )

    def _init_memory(self) -> None:
        """Spherical k-means initialisation of the class memory from the untrained model
        (:func:`~momkd.train.memory_init.init_class_memory`)."""
        init_class_memory(
            self.model,
            self.data.train,
            self.data.labels,
            lambda units: self._loader(units, 0, train=True),
            fold=self.data.fold,
            per_class=int(self.cfg.memory.init_per_class),
            memory_k=int(self.spec["params"]["memory_k"]),
            n_classes=self.cfg.n_classes,
            kmeans_iters=int(self.cfg.memory.kmeans_iters),
            seed=self.seed,
            device=self.device,
            dist=self.dist,
        )

    def _train_epoch(self, epoch: int) -> dict[str, Any]:
        from tqdm.auto import tqdm

        model = self.model
        model.train()
        # This rank's share of the epoch's global draw (draws r, r + W, ...); see the sampler.
        positions = self.sampler.indices(epoch)
        ids = [self.data.train[i] for i in positions]
        loader = self._loader(ids, epoch, train=True)
        wait = [0.0]
        sums: dict[str, float] = {}
        n_steps = 0
        t0 = time.perf_counter()
        bar = tqdm(
            total=len(ids),
            desc=f"fold {self.data.fold} epoch {epoch}",
            disable=not self.progress,
            leave=False,
            unit="slide",
        )
        expr_map = self.data.expression
        use_expr = uses_expression(self.method)
        after_step = getattr(model, "after_optimizer_step", None)
        reduce_fn = self.dist.memory_reduce_fn()
        params = [p for p in model.parameters() if p.requires_grad]
        patch_dropout = float(self.cfg.train.patch_dropout)
        for bags in batches_of(iter(loader), len(ids), self.batch_size, wait):
            if patch_dropout > 0.0:
                bags = [drop_patches(b, patch_dropout) for b in bags]
            feats, edges, offsets = collate(bags, self.device, graph=self.graph)
            slide_ids = [b.slide_id for b in bags]
            y = torch.tensor([self.data.labels[s] for s in slide_ids], device=self.device)
            expr = None
            if use_expr:
                assert expr_map is not None
                expr = torch.from_numpy(
                    np.stack([expr_map[self.data.cases[s]] for s in slide_ids])
                ).to(self.device)
            out = self.net(feats, edges, expr, offsets)
            loss, terms = model.loss(out, y, expr, self.weights)  # type: ignore[operator]
            if not torch.isfinite(loss):
                raise DataError(
                    f"fold {self.data.fold} epoch {epoch}: non-finite loss on slides "
                    f"{', '.join(slide_ids)}"
                )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.cfg.train.clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, self.cfg.train.clip_norm)
            lr = self.scheduled_lr(self.state.step)
            if lr is not None:
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update(model)
            if after_step is not None:
                if reduce_fn is not None:  # momentum statistics summed over the ranks
                    after_step(out, y, reduce_fn=reduce_fn)
                else:
                    after_step(out, y)
            self.state.step += 1
            n_steps += 1
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            bar.update(len(bags))
            bar.set_postfix(loss=f"{sums['loss'] / n_steps:.4f}", refresh=False)
        bar.close()
        seconds = time.perf_counter() - t0
        if self.dist.enabled:  # mean losses over every rank's steps
            keys = sorted(sums)
            tot = self.dist.all_reduce_sum(
                torch.tensor([n_steps] + [sums[k] for k in keys], dtype=torch.float64),
                "all-reduce of the epoch losses",
            ).tolist()
            total_steps = max(tot[0], 1.0)
            row: dict[str, Any] = {"train_" + k: v / total_steps for k, v in zip(keys, tot[1:])}
        else:
            row = {"train_" + k: v / max(n_steps, 1) for k, v in sums.items()}
        row.update(
            {
                "train_seconds": seconds,
                "loader_wait_s": wait[0],
                "loader_wait_share": wait[0] / seconds if seconds > 0 else 0.0,
                "steps": n_steps,
            }
        )
        return row

    def scheduled_lr(self, step: int) -> float | None:
        """Learning rate of optimizer step ``step`` (:func:`~momkd.train.selection.scheduled_lr`)."""
        return scheduled_lr(self.cfg.train, self.lr, step, self.steps_per_epoch)

    def _validate(self) -> InferenceResult:
        return run_inference(
            self.model,
            self.store,
            self.data.val,
            method=self.method,
            device=self.device,
            knn_k=self.knn_k,
            labels=self.data.labels,
            collect_usage=has_memory(self.method),
            num_threads=self.loader_threads,
            prefetch=self.cfg.train.prefetch,
            members=self.data.members,
            dtype=self.feature_dtype,
            cache=self.cache,
            dist=self.dist,
        )

    def _val_score(self, res: InferenceResult, epoch: int, val_auc: float) -> float:
        """The monitored score (higher is better): the validation AUC (``train.monitor:
        val_auc``) or the negative validation loss (``val_loss``, and the fallback when the AUC is
        undefined because the validation set has one class).

        Without validation slides, and with ``train.monitor: last``, the score is the epoch number:
        the last epoch is kept and neither the plateau schedule nor early stopping ever triggers.
        """
        if not res.slide_ids or self.cfg.train.monitor == "last":
            return float(epoch)
        if self.cfg.train.monitor == "val_auc" and math.isfinite(val_auc):
            return val_auc
        score = -float(res.loss) if res.loss is not None else -math.inf
        return score if math.isfinite(score) else -math.inf

    def fit(self) -> None:
        """Run (or continue) the epoch loop until early stopping or ``train.epochs``."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        epochs = int(cfg.train.epochs)
        bar = tqdm(
            total=epochs,
            initial=self.state.epoch,
            desc=f"fold {self.data.fold}",
            disable=not self.progress,
            unit="epoch",
        )
        self._wrap()
        while not self.state.finished and self.state.epoch < epochs:
            epoch = self.state.epoch
            t0 = time.perf_counter()
            self.sampler.set_epoch(epoch)
            row: dict[str, Any] = {"epoch": epoch}
            row.update(self._train_epoch(epoch))
            with self.ema.applied(self.model) if self.ema is not None else _nullcontext():
                val = self._validate()
                teacher_auc = self._teacher_auc()
            val_auc = math.nan
            if val.slide_ids and self._val_has_both():
                y_val = np.array([self.data.labels[s] for s in val.slide_ids])
                val_auc = float(score_metrics(y_val, val.probs)["auc"])
            score = self._val_score(val, epoch, val_auc)
            # Every rank holds the same predictions; rank 0's score decides, so that the ranks
            # never take different branches (the kept epoch, the LR cut, early stopping).
            score, val_auc = self.dist.broadcast_object((score, val_auc), "broadcast of the score")
            improved = self.monitor.update(score, epoch)
            if self.monitor.should_reduce_lr():
                for group in self.optimizer.param_groups:
                    group["lr"] = float(group["lr"]) * float(cfg.train.plateau_factor)
            row["val_auc"] = val_auc
            if teacher_auc is not None:
                row["val_auc_teacher"] = teacher_auc
            row["val_loss"] = val.loss
            row["score"] = score
            row["val_seconds"] = val.seconds
            row["lr"] = float(self.optimizer.param_groups[0]["lr"])
            tau = getattr(self.model, "tau", None)
            row["tau"] = float(tau) if tau is not None else None
            if val.usage is not None:
                for name, st in val.usage.items():
                    row[f"mem_{name}_usage"] = st["usage"]
                    row[f"mem_{name}_active_ratio"] = st["active_ratio"]
                    row[f"mem_{name}_perplexity"] = st["perplexity"]
            row["best"] = improved
            self.dist.check_identical(self.model, f"fold {self.data.fold} epoch {epoch}")
            row["seconds"] = time.perf_counter() - t0
            self.state.history.append(row)
            self.state.epoch = epoch + 1
            if self.monitor.should_stop(epoch) or self.state.epoch >= epochs:
                self.state.finished = True
            if improved:
                self._save_best(val_auc, score)
            self._save_last()
            self._write_history()
            if not self.dist.is_main:
                continue
            log.info(
                "fold %d epoch %d: loss %.4f val_auc %.4f val_loss %.4f lr %.2e (%.1fs, loader "
                "wait %.0f%%)",
                self.data.fold,
                epoch,
                row.get("train_loss", math.nan),
                val_auc,
                val.loss if val.loss is not None else math.nan,
                row["lr"],
                row["seconds"],
                100 * row["loader_wait_share"],
            )
            bar.update(1)
            bar.set_postfix(val_auc=f"{val_auc:.3f}", kept=self.monitor.best_epoch)
        bar.close()
        self.state.finished = True

    @torch.no_grad()
    def _teacher_auc(self) -> float | None:
        """Validation AUC of the omics branch alone (MoMKD's teacher): each validation unit's
        patient expression, preprocessed with the fold's training statistics, scored by
        Δ(z_o) = φ(z_o, C⁺) − φ(z_o, C⁻) against the class memory (with more classes, the
        macro AUC of the class scores φ(z_o, C^c)). None for other methods or without validation
        expression."""
        expr = self.data.val_expression
        score_fn = getattr(self.model, "teacher_score", None)
        if (
            not expr
            or score_fn is None
            or not getattr(self.model.cfg, "omics", False)  # type: ignore[union-attr]
            or not self._val_has_both()
        ):
            return None
        units = [u for u in self.data.val if self.data.cases[u] in expr]
        if len({self.data.labels[u] for u in units}) < self.cfg.n_classes:
            return None
        x = torch.from_numpy(np.stack([expr[self.data.cases[u]] for u in units])).to(self.device)
        was_training = self.model.training
        self.model.eval()
        try:
            temp = float(self.cfg.loss.align_temp)
            scores = score_fn(x, temp=temp).float().cpu().numpy().astype(np.float64)
        finally:
            self.model.train(was_training)
        y = np.array([self.data.labels[u] for u in units])
        return float(score_metrics(y, scores)["auc"])

    def _val_has_both(self) -> bool:
        """Whether every class is among the validation units (the AUC is defined)."""
        y = {self.data.labels[s] for s in self.data.val}
        return len(y) == self.cfg.n_classes

    def _write_history(self) -> None:
        if not self.dist.is_main:
            return
        hist = self.state.history
        write_json(self.dir / "history.json", hist)
        keys: list[str] = []
        for row in hist:
            keys.extend(k for k in row if k not in keys)
        write_csv(self.dir / "history.csv", keys, [[row.get(k) for k in keys] for row in hist])

    # ------------------------------------------------------------------------------ evaluation

    def _load_best(self) -> int:
        """Load the kept model (rank 0 reads ``best.pt`` and broadcasts it); returns its epoch
        count."""

        def read() -> int:
            ckpt = load_checkpoint(self.dir / "best.pt", map_location=self.device)
            self.model.load_state_dict(ckpt["model"])
            return int(ckpt.get("epoch", 0))

        epochs = self.dist.on_main(read, "reading best.pt")
        self.dist.broadcast_module(self.model, "broadcast of the kept model")
        return epochs

    def evaluate(self) -> dict[str, Any]:
        """Test the kept model (:func:`~momkd.train.fold_eval.evaluate_fold`); rank 0 returns the
        fold result, the other ranks an empty dict."""
        kept_epochs = self._load_best()
        inference: dict[str, Any] = {
            "method": self.method,
            "device": self.device,
            "knn_k": self.knn_k,
            "num_threads": self.loader_threads,
            "prefetch": self.cfg.train.prefetch,
            "progress": self.progress,
            "dtype": self.feature_dtype,
            "dist": self.dist,
        }
        return evaluate_fold(
            self.model,
            self.data,
            self.store,
            self.dir,
            cfg=self.cfg,
            dist=self.dist,
            inference=inference,
            seed=self.seed,
            epochs=self.state.epoch,
            kept_epochs=kept_epochs,
        )

    def run(self, resume: bool = False) -> dict[str, Any]:
        """Train (or resume) and evaluate the fold; returns the fold result written to
        ``result.json``."""
        t0 = time.perf_counter()
        if self.dist.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
        self._build()
        if self.dist.is_main:
            self._check_validation_size()
        has_last = self.dist.on_main(
            lambda: (self.dir / "last.pt").is_file(), "looking for last.pt"
        )
        if resume and has_last:
            self._load_last()
        else:
            if self.spec.get("standardize"):
                self._fit_standardizer()
            if has_memory(self.method):
                self._init_memory()
        self.fit()
        result = self.evaluate()
        if not self.dist.is_main:
            return result
        result["seconds"] = time.perf_counter() - t0
        result["device"] = str(self.device)
        result["train_seconds"] = float(sum(r.get("seconds", 0.0) for r in self.state.history))
        waits = [r.get("loader_wait_share", 0.0) for r in self.state.history]
        result["loader_wait_share"] = float(np.mean(waits)) if waits else 0.0
        write_json(self.dir / "result.json", result)
        return result
