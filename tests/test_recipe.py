"""The training recipe: the meanpool baseline against a hand-computed mean-pool model, the
genomics-free MoMKD ablation's gradient routing, patch dropout, the weight average, the
learning-rate schedules, and exact replay of a resumed run with every recipe option on."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from momkd.config import load_config
from momkd.model.meanpool import MeanPool, MeanPoolConfig
from momkd.train.ema import WeightEMA
from momkd.train.standardize import FeatureStats, attach_input_dropout, attach_standardizer


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


# ------------------------------------------------------------------------------------ meanpool


@pytest.mark.parametrize("hidden", [None, 5])
def test_meanpool_equals_hand_computed_mean_pool_model(hidden: int | None) -> None:
    torch.manual_seed(0)
    model = MeanPool(MeanPoolConfig(d_in=6, hidden=hidden, dropout=0.3)).eval()
    rng = np.random.default_rng(0)
    raw = rng.normal(3.0, 2.0, size=(40, 6))
    stats = FeatureStats(6)
    stats.update(raw)
    attach_standardizer(model, 6, stats)
    bag = rng.normal(3.0, 2.0, size=(7, 6))
    out = model(torch.tensor(bag, dtype=torch.float32))
    # By hand: standardise with the training statistics (ddof 0), average, apply the head.
    mean, std = raw.mean(axis=0), raw.std(axis=0)
    m = ((bag - mean) / std).mean(axis=0)
    if hidden is None:
        w, b = _np(model.head.weight), _np(model.head.bias)
        logits = m @ w.T + b
    else:
        w1, b1 = _np(model.head[0].weight), _np(model.head[0].bias)
        w2, b2 = _np(model.head[3].weight), _np(model.head[3].bias)
        logits = np.maximum(m @ w1.T + b1, 0.0) @ w2.T + b2
    np.testing.assert_allclose(_np(out.logits[0]), logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_np(out.attention), np.full(7, 1 / 7), rtol=1e-6)


def test_meanpool_batched_bags_equal_separate_bags() -> None:
    torch.manual_seed(1)
    model = MeanPool(MeanPoolConfig(d_in=4)).eval()
    a, b = torch.randn(3, 4), torch.randn(5, 4)
    joint = model(torch.cat([a, b]), segment_offsets=torch.tensor([0, 3, 8]))
    for i, x in enumerate((a, b)):
        torch.testing.assert_close(joint.logits[i], model(x).logits[0])
    np.testing.assert_allclose(_np(joint.attention), [1 / 3] * 3 + [1 / 5] * 5, rtol=1e-6)


# --------------------------------------------------------------------- the genomics-free ablation


def test_ablation_has_no_path_from_omics_into_histology() -> None:
    from momkd.config import RunConfig
    from momkd.train.factory import build_model, loss_weights_for, model_spec_for

    cfg = RunConfig()
    cfg.model.method = "momkd_histo"
    cfg.model.hidden, cfg.model.sphere, cfg.model.memory_k = 8, 4, 2
    cfg.model.classifier_hidden = 4
    spec = model_spec_for(cfg, d_in=6, genes=None)
    assert spec["params"]["omics"] is False and spec["params"]["momentum_sources"] == ["wsi"]
    torch.manual_seed(0)
    model = build_model(spec)
    weights = loss_weights_for(cfg)
    assert weights is not None and weights.align_omics > 0 and weights.mse > 0  # weights unused
    assert not [n for n, _ in model.named_parameters() if n.startswith("omics")]
    model.init_memory(torch.randn(20, 4), torch.randn(20, 4), iters=3, seed=0)

    x = torch.randn(9, 6)
    edges = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8]])
    y = torch.tensor([1])
    expression = torch.randn(1, 30, requires_grad=True)

    def grads(expr: torch.Tensor | None) -> dict[str, torch.Tensor]:
        torch.manual_seed(5)  # the same dropout masks in both passes
        model.zero_grad(set_to_none=True)
        out = model(x, edges, expr)
        assert out.z_o is None and out.recon is None
        loss, terms = model.loss(out, y, expr, weights)
        assert float(terms["align_omics"]) == 0.0 and float(terms["mse"]) == 0.0
        if expr is not None:
            # autograd: the expression does not enter the loss at all.
            (g,) = torch.autograd.grad(loss, [expr], retain_graph=True, allow_unused=True)
            assert g is None
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    with_expr, without = grads(expression), grads(None)
    assert set(with_expr) == set(without) and "histology_encoder.gat1.lin_l.weight" in with_expr
    for name, g in with_expr.items():
        assert torch.equal(g, without[name]), name


# ------------------------------------------------------------------------------ patch dropout


def test_drop_patches_keeps_the_subgraph_of_kept_patches() -> None:
    from momkd.data.loader import Bag
    from momkd.train.batching import drop_patches

    torch.manual_seed(3)
    n = 10
    feats = torch.arange(n * 2, dtype=torch.float32).reshape(n, 2)
    coords = torch.stack([torch.arange(n), torch.zeros(n, dtype=torch.int64)], 1)
    src = torch.randint(0, n, (30,))
    dst = torch.randint(0, n, (30,))
    bag = Bag("s", 0, feats, coords, torch.stack([src, dst]))
    out = drop_patches(bag, 0.4)
    assert out.n_patches == 6
    kept = [int(v) for v in out.features[:, 0] // 2]  # row i of the original has value 2i
    assert kept == sorted(kept) and len(set(kept)) == 6
    assert torch.equal(out.coords[:, 0], torch.tensor(kept))
    # Brute force: the edges of the original graph between kept patches, renumbered, in order.
    pos = {old: new for new, old in enumerate(kept)}
    pairs = zip(src.tolist(), dst.tolist(), strict=True)
    want = [(pos[a], pos[b]) for a, b in pairs if a in pos and b in pos]
    assert want, "the draw should keep some edges"
    assert out.edge_index is not None
    assert [tuple(e) for e in out.edge_index.t().tolist()] == want
    assert drop_patches(bag, 0.0) is bag
    one = Bag("t", 0, feats[:1], coords[:1], torch.zeros(2, 0, dtype=torch.int64))
    assert drop_patches(one, 0.9).n_patches == 1


def test_input_dropout_acts_on_standardised_features_in_training_only() -> None:
    model = MeanPool(MeanPoolConfig(d_in=3))
    stats = FeatureStats(3)
    stats.update(np.array([[0.0, 10.0, 5.0], [2.0, 30.0, 7.0]]))
    attach_standardizer(model, 3, stats)
    attach_input_dropout(model, 0.5)
    seen: list[torch.Tensor] = []
    model.head.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
    x = torch.tensor([[1.0, 20.0, 6.0]] * 200)  # exactly the training mean
    model.eval()
    model(x)
    model.train()
    torch.manual_seed(0)
    model(x + torch.tensor([1.0, 10.0, 1.0]))  # one standard deviation above the mean
    assert torch.equal(seen[0], torch.zeros(1, 3))
    # Standardised value 1, kept with probability 1/2 and scaled by 2: the mean of 0s and 2s.
    assert 0.8 < float(seen[1].mean()) < 1.2


# ------------------------------------------------------------------------- weight average (EMA)


def test_weight_ema_matches_hand_computed_average() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ema = WeightEMA(model, 0.9)
    w0 = model.weight.detach().clone()
    expected = w0.clone()
    for step in range(40):
        with torch.no_grad():
            model.weight.add_(step + 1.0)
        ema.update(model)
        d = min(0.9, (1 + step) / (10 + step))  # warm-up: 0.1, 0.18, ... then capped at 0.9
        expected = d * expected + (1 - d) * model.weight.detach()
    torch.testing.assert_close(ema.average["weight"], expected)
    live = model.weight.detach().clone()
    with ema.applied(model):
        torch.testing.assert_close(model.weight.detach(), expected)
    assert torch.equal(model.weight.detach(), live)
    state = ema.model_state(model)
    torch.testing.assert_close(state["weight"], expected)
    other = WeightEMA(model, 0.9)
    other.load_state_dict(ema.state_dict())
    torch.testing.assert_close(other.average["bias"], ema.average["bias"])
    assert other.updates == 40 and ema.decay_at(0) == pytest.approx(0.1)


# ------------------------------------------------------------- schedules and exact resume


CONFIG = """
data:
  store: cohort.zarr
  clinical: clinical.csv
  expression: expression.csv
  label_column: pr
  positive: [Positive]
  negative: [Negative]
splits: {k: 2, seed: 1, val_fraction: 0.3}
genomics: {n_genes: 10}
model: {hidden: 12, omics_width: 8, omics_hidden: 8, sphere: 8, memory_k: 2,
        classifier_hidden: 6}
memory: {init_per_class: 300}
train: {epochs: 4, min_epochs: 4, deterministic: true, max_patches: 12, folds: [0],
        schedule: cosine, warmup_epochs: 1.5, ema: 0.9, patch_dropout: 0.25,
        feature_dropout: 0.1, monitor: last, lr: 0.001}
"""


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from momkd.synth import generate_cohort

    root = tmp_path_factory.mktemp("recipe")
    generate_cohort(
        root, patients=40, external=0, dim=32, genes=30, patches=20, seed=4, progress=False
    )
    (root / "run.yaml").write_text(CONFIG)
    return root


def _expected_lr(step: int, steps: int, epochs: int, warmup: float, lr: float) -> float:
    warm = round(warmup * steps)
    if step < warm:
        return lr * (step + 1) / warm
    t = (step - warm) / (epochs * steps - warm)
    return lr * 0.5 * (1 + math.cos(math.pi * t))


@pytest.mark.parametrize("method", ["momkd", "meanpool"])
def test_recipe_replays_exactly_after_an_interruption(
    method: str, cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from momkd.train import trainer as fold_trainer
    from momkd.train.runner import train

    cfg = load_config(cohort / "run.yaml", [f"model.method={method}"])
    train(cfg, tmp_path / "ref", progress=False)
    ref = json.loads((tmp_path / "ref" / "fold_0" / "history.json").read_text())
    assert len(ref) == 4 and [r["best"] for r in ref] == [True] * 4  # monitor: last
    steps = ref[0]["steps"]
    # The history's lr is the rate of each epoch's last step, as the schedule prescribes.
    for r in ref:
        want = _expected_lr((r["epoch"] + 1) * steps - 1, steps, 4, 1.5, 1e-3)
        assert r["lr"] == pytest.approx(want, rel=1e-12)
    if method == "momkd":
        assert all(0.0 <= r["val_auc_teacher"] <= 1.0 for r in ref)

    # Interrupt after epoch 1 has been written, then resume.
    real = fold_trainer.FoldTrainer._write_history

    def stop_after_two(self: fold_trainer.FoldTrainer) -> None:
        real(self)
        if len(self.state.history) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(fold_trainer.FoldTrainer, "_write_history", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut", progress=False)
    monkeypatch.setattr(fold_trainer.FoldTrainer, "_write_history", real)
    train(cfg, tmp_path / "cut", resume=True, progress=False)
    got = json.loads((tmp_path / "cut" / "fold_0" / "history.json").read_text())
    drop = {"seconds", "train_seconds", "val_seconds", "loader_wait_s", "loader_wait_share"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in got] == [
        {k: v for k, v in r.items() if k not in drop} for r in ref
    ]
    a = torch.load(tmp_path / "ref" / "fold_0" / "best.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "cut" / "fold_0" / "best.pt", weights_only=True)["model"]
    for name, tensor in a.items():
        assert torch.equal(tensor, b[name]), name
    last = torch.load(tmp_path / "ref" / "fold_0" / "last.pt", weights_only=True)
    # best.pt holds the weight average, last.pt the live weights and the average.
    for name, avg in last["ema"]["average"].items():
        assert torch.equal(a[name], avg), name
