"""Kernel dispatch in training: ``train.kernels``, the fused momentum step, batched bags, and the
acceptance check that a run through the Triton kernels follows the eager run step by step.

Without CUDA the Triton kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``, set by
``tests/conftest.py`` before Triton is first imported); with CUDA they run compiled.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from momkd import kernels
from momkd.config import load_config
from momkd.errors import ConfigError
from momkd.memory import ClassMemory
from momkd.model.momkd import MoMKD

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
FUSED_OPS = ("memory_attention_pool", "align_loss", "batched_commitment_loss", "momentum_step")


def _triton_runs_here() -> bool:
    try:
        kernels.check_kernel_mode("triton", DEVICE)
    except ConfigError:
        return False
    return True


needs_triton = pytest.mark.skipif(
    not _triton_runs_here(),
    reason="the Triton kernels cannot run in this process (Triton was imported without "
    "TRITON_INTERPRET=1 on a machine without CUDA)",
)


@pytest.fixture(autouse=True)
def _restore_mode() -> Iterator[None]:
    before = kernels.get_kernel_mode()
    yield
    kernels.set_kernel_mode(before)


@pytest.fixture
def fused_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[Counter[str]]:
    """Counts the calls of the real fused implementations (wrapped through ``register_fused``'s
    registry, restored afterwards)."""
    calls: Counter[str] = Counter()

    def wrap(op: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            calls[op] += 1
            return real(*args, **kwargs)

        return counted

    for op in FUSED_OPS:
        real = kernels._load_fused(op)
        assert real is not None, op
        monkeypatch.setitem(kernels._REGISTERED, op, wrap(op, real))
    kernels._load_fused.cache_clear()
    yield calls
    kernels._load_fused.cache_clear()


# --------------------------------------------------------------------------- mode and config


def test_config_key_defaults_and_validation(tmp_path: Path) -> None:
    (tmp_path / "run.yaml").write_text("train: {kernels: triton}\n")
    assert load_config(None).train.kernels == "auto"
    assert load_config(tmp_path / "run.yaml").train.kernels == "triton"
    assert load_config(None, ["train.kernels=eager"]).train.kernels == "eager"
    with pytest.raises(ConfigError, match=r"train\.kernels"):
        load_config(None, ["train.kernels=cuda"])


def test_mode_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MOMKD_FORCE_EAGER", raising=False)
    cpu = torch.zeros(2, 3)
    with pytest.raises(ConfigError, match="train.kernels must be one of"):
        kernels.set_kernel_mode("fast")
    assert kernels.get_kernel_mode() == "auto"
    # auto: the reference for CPU tensors, whatever the interpreter says
    assert kernels.fused_impl("align_loss", cpu) is None
    assert kernels._pick("align_loss", cpu) is kernels.reference.align_loss_reference
    with kernels.kernel_mode("eager"):
        assert kernels.get_kernel_mode() == "eager"
        assert kernels.fused_impl("align_loss", cpu.to(DEVICE)) is None
    assert kernels.get_kernel_mode() == "auto"


@needs_triton
def test_triton_mode_selects_fused_and_env_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    from momkd.kernels import align_momentum

    monkeypatch.delenv("MOMKD_FORCE_EAGER", raising=False)
    x = torch.zeros(2, 3, device=DEVICE)
    with kernels.kernel_mode("triton", DEVICE):
        assert kernels.fused_impl("align_loss", x) is align_momentum.align_loss
        assert kernels.fused_impl("momentum_step", x) is align_momentum.momentum_step
        monkeypatch.setenv("MOMKD_FORCE_EAGER", "1")
        assert kernels.fused_impl("align_loss", x) is None


def test_triton_on_cpu_without_interpreter_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError, match="TRITON_INTERPRET=1") as err:
        kernels.check_kernel_mode("triton", "cpu")
    assert "\n" not in str(err.value)
    # forced at call time on CPU tensors: the same error, never a silent fallback
    monkeypatch.setattr(kernels, "_MODE", "triton")
    with pytest.raises(ConfigError, match="TRITON_INTERPRET=1"):
        kernels.align_loss(
            torch.zeros(1, 2), torch.zeros(1, dtype=torch.int64), torch.eye(2), torch.eye(2)
        )


def test_triton_mode_without_implementation_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(kernels._FUSED_SOURCES, "align_loss", ("momkd.kernels.missing", "f"))
    kernels._load_fused.cache_clear()
    try:
        assert not kernels.fused_available("align_loss")
        monkeypatch.setattr(kernels, "_MODE", "triton")
        with pytest.raises(ConfigError, match="'align_loss' cannot be loaded"):
            kernels.fused_impl("align_loss", torch.zeros(1, device=DEVICE))
    finally:
        kernels._load_fused.cache_clear()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_auto_fallback_on_cuda_is_logged_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("MOMKD_FORCE_EAGER", raising=False)
    monkeypatch.setitem(kernels._FUSED_SOURCES, "align_loss", ("momkd.kernels.missing", "f"))
    monkeypatch.setattr(kernels, "_LOGGED", set())
    kernels._load_fused.cache_clear()
    try:
        z = F.normalize(torch.randn(3, 4, device="cuda"), dim=1)
        y = torch.tensor([0, 1, 1], device="cuda")
        with caplog.at_level(logging.WARNING, logger="momkd.kernels"):
            for _ in range(3):
                got = kernels.align_loss(z, y, z, z)
        want = kernels.reference.align_loss_reference(z, y, z, z)
        torch.testing.assert_close(got, want)
        assert sum("eager reference" in r.getMessage() for r in caplog.records) == 1
    finally:
        kernels._load_fused.cache_clear()


# --------------------------------------------------------------------- momentum update dispatch


@needs_triton
def test_momentum_update_runs_one_fused_step(
    monkeypatch: pytest.MonkeyPatch, fused_calls: Counter[str]
) -> None:
    monkeypatch.delenv("MOMKD_FORCE_EAGER", raising=False)
    torch.manual_seed(0)
    eager = ClassMemory(3, 8, mode="momentum", momentum=0.8, dead_after=2, ring_size=2)
    fused = ClassMemory(3, 8, mode="momentum", momentum=0.8, dead_after=2, ring_size=2)
    eager.to(DEVICE)
    fused.to(DEVICE)
    fused.load_state_dict(eager.state_dict())
    g = torch.Generator().manual_seed(3)
    for step, m_rows in enumerate([4, 0, 3, 5, 1, 2]):
        emb = torch.randn(m_rows, 8, generator=g).to(DEVICE)
        labels = torch.randint(0, 2, (m_rows,), generator=g).to(DEVICE)
        with kernels.kernel_mode("eager"):
            eager.momentum_update(emb, labels)
        with kernels.kernel_mode("triton", DEVICE):
            fused.momentum_update(emb, labels)
        assert fused_calls["momentum_step"] == step + 1
        for name, want in eager.state_dict().items():
            got = fused.state_dict()[name]
            if want.is_floating_point():
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)
            else:
                assert torch.equal(got, want), name
    # with a reduction the statistics stay separate (so ranks can all-reduce them)
    seen = []

    def reduce_fn(sums: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seen.append(counts.sum().item())
        return sums, counts

    with kernels.kernel_mode("triton", DEVICE):
        fused.momentum_update(
            torch.randn(2, 8).to(DEVICE), torch.tensor([0, 1]).to(DEVICE), reduce_fn
        )
    assert seen == [2] and fused_calls["momentum_step"] == 6


# ------------------------------------------------------------------------------ tiny cohort

LABEL = "pr"
CONFIG = """
data: {{store: cohort.zarr, clinical: clinical.csv, expression: expression.csv,
        label_column: pr, positive: [Positive], negative: [Negative]}}
splits: {{k: 2, seed: 3}}
genomics: {{n_genes: 12}}
model: {{hidden: 16, omics_width: 16, omics_hidden: 16, sphere: 8, memory_k: 2,
        classifier_hidden: 8}}
memory: {{init_per_class: 200, kmeans_iters: 5, update: {update}, dead_after: 2}}
train: {{epochs: {epochs}, min_epochs: 1, patience: 2, seed: 1, deterministic: true,
        kernels: {kernels}, batch_size: {batch_size}, folds: {folds}, device: {device}}}
"""


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from momkd.synth import SynthConfig, generate_cohort

    root = tmp_path_factory.mktemp("kcohort")
    small = dataclasses.replace(SynthConfig(), nuisance_rank=4, heterogeneity_rank=4)
    generate_cohort(
        root,
        patients=16,
        external=0,
        dim=16,
        genes=40,
        patches=30,
        seed=3,
        config=small,
        progress=False,
    )
    return root


def _train(
    cohort: Path,
    out: Path,
    monkeypatch: pytest.MonkeyPatch,
    *,
    kernels_mode: str,
    batch_size: int,
    update: str,
    folds: tuple[int, ...] = (0,),
    epochs: int = 2,
) -> tuple[list[float], dict[str, Any]]:
    """Run ``momkd.train`` and return the total loss of every optimizer step and the summary."""
    from momkd.train.runner import train

    text = CONFIG.format(
        kernels=kernels_mode,
        batch_size=batch_size,
        update=update,
        folds=list(folds),
        epochs=epochs,
        device=DEVICE.type,
    )
    (cohort / f"{out.name}.yaml").write_text(text)
    losses: list[float] = []
    real_loss = MoMKD.loss

    def recording_loss(self: MoMKD, *args: Any, **kwargs: Any) -> Any:
        total, terms = real_loss(self, *args, **kwargs)
        losses.append(float(total.detach()))
        return total, terms

    with monkeypatch.context() as m:
        m.setattr(MoMKD, "loss", recording_loss)
        summary = train(load_config(cohort / f"{out.name}.yaml"), out_dir=out, progress=False)
    return losses, summary


def _history(run: Path, fold: int = 0) -> list[dict[str, Any]]:
    import json

    return json.loads((run / f"fold_{fold}" / "history.json").read_text())  # type: ignore[no-any-return]


def _probs(run: Path, fold: int = 0) -> dict[str, float]:
    with open(run / f"fold_{fold}" / "test_predictions.csv", newline="") as fh:
        return {r["slide_id"]: float(r["prob"]) for r in csv.DictReader(fh)}


def test_train_rejects_triton_on_cpu_without_interpreter(
    cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from momkd.train.runner import train

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    text = CONFIG.format(
        kernels="triton", batch_size=1, update="gradient", folds=[0], epochs=1, device="cpu"
    )
    (cohort / "bad.yaml").write_text(text)
    with pytest.raises(ConfigError, match=r"train\.kernels.*TRITON_INTERPRET=1"):
        train(load_config(cohort / "bad.yaml"), out_dir=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    assert kernels.get_kernel_mode() == "auto"


def test_batched_bags_train_end_to_end(
    cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """batch_size=2 for momkd: B bags concatenated with segment offsets from the store, one
    optimizer step per pair, momentum updates from both bags."""
    import zarr
    from momkd.train import trainer as fold_trainer

    group: Any = zarr.open_group(cohort / "cohort.zarr", mode="r")
    store_ids = list(group.attrs["momkd"]["slide_ids"])
    store_off = np.asarray(group["offsets"][:])
    store_feats = np.asarray(group["features"][:], dtype=np.float32)
    batches: list[tuple[list[str], torch.Tensor, torch.Tensor | None, torch.Tensor | None]] = []
    real_collate = fold_trainer.collate

    def spy(bags: Any, device: torch.device, *, graph: bool) -> Any:
        feats, edges, offsets = real_collate(bags, device, graph=graph)
        if len(bags) > 1:
            batches.append(([b.slide_id for b in bags], feats.cpu(), edges, offsets))
        return feats, edges, offsets

    monkeypatch.setattr(fold_trainer, "collate", spy)
    run = tmp_path / "bs2"
    losses, summary = _train(
        cohort, run, monkeypatch, kernels_mode="eager", batch_size=2, update="momentum"
    )
    with open(run / "splits" / "splits_0.csv", newline="") as fh:
        n_train = sum(1 for r in csv.DictReader(fh) if r["train"])
    hist = _history(run)
    assert len(hist) == 2
    for row in hist:
        assert row["steps"] == math.ceil(n_train / 2)
    assert len(losses) == sum(row["steps"] for row in hist)
    assert len(batches) == sum(n_train // 2 for _ in hist)
    assert all(math.isfinite(v) for v in losses)
    first = losses[: hist[0]["steps"]]
    assert hist[0]["train_loss"] == pytest.approx(np.mean(first), rel=1e-9)

    for ids, feats, edges, offsets in batches:
        assert offsets is not None and edges is not None
        idx = [store_ids.index(s) for s in ids]
        sizes = [int(store_off[i + 1] - store_off[i]) for i in idx]
        np.testing.assert_array_equal(
            offsets.cpu().numpy(), np.concatenate([[0], np.cumsum(sizes)])
        )
        want = np.concatenate([store_feats[store_off[i] : store_off[i + 1]] for i in idx])
        np.testing.assert_array_equal(feats.numpy(), want)
        seg = np.repeat(np.arange(len(ids)), sizes)
        e = edges.cpu().numpy()
        assert e.shape[1] > 0 and (seg[e[0]] == seg[e[1]]).all(), "edges must stay within a bag"

    assert summary["folds"][0]["test"]["n"] == len(_probs(run))
    assert (run / "fold_0" / "best.pt").is_file()


@needs_triton
@pytest.mark.parametrize(
    ("batch_size", "update", "folds", "epochs"),
    [
        pytest.param(1, "gradient", (0,), 2, id="bs1-gradient"),
        pytest.param(2, "momentum", (0,), 2, id="bs2-momentum"),
        pytest.param(1, "momentum", (0, 1), 4, id="bs1-momentum-2folds", marks=pytest.mark.slow),
    ],
)
def test_triton_training_follows_eager_loss_curve(
    cohort: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fused_calls: Counter[str],
    batch_size: int,
    update: str,
    folds: tuple[int, ...],
    epochs: int,
) -> None:
    """Acceptance: a short run through the Triton kernels reproduces the eager run's per-step
    total loss (rtol 1e-3) and its test predictions."""
    monkeypatch.delenv("MOMKD_FORCE_EAGER", raising=False)
    kw: dict[str, Any] = {
        "batch_size": batch_size,
        "update": update,
        "folds": folds,
        "epochs": epochs,
    }
    eager, _ = _train(cohort, tmp_path / "eager", monkeypatch, kernels_mode="eager", **kw)
    assert sum(fused_calls.values()) == 0, fused_calls
    fused, _ = _train(cohort, tmp_path / "triton", monkeypatch, kernels_mode="triton", **kw)
    assert kernels.get_kernel_mode() == "auto"

    n_steps = sum(row["steps"] for f in folds for row in _history(tmp_path / "eager", f))
    assert len(eager) == len(fused) == n_steps >= 6
    np.testing.assert_allclose(fused, eager, rtol=1e-3, atol=1e-6)
    # every fused op ran: forward pooling (also in memory init and validation), both losses
    assert fused_calls["memory_attention_pool"] > n_steps
    assert fused_calls["batched_commitment_loss"] == n_steps
    assert fused_calls["align_loss"] == 2 * n_steps  # z_w and z_o
    assert fused_calls["momentum_step"] == (n_steps if update == "momentum" else 0)
    for f in folds:
        pe, pf = _probs(tmp_path / "eager", f), _probs(tmp_path / "triton", f)
        assert pe.keys() == pf.keys()
        np.testing.assert_allclose([pf[s] for s in pe], list(pe.values()), rtol=1e-3, atol=1e-5)
