"""More than two classes (docs/METHOD.md §2.11): the C-class model reduces to the binary one at
C = 2, and at C = 3 / 4 its attention, losses, gradient routing, initialisation, momentum update,
baselines and explanations follow the documented equations."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from momkd.errors import ConfigError, DataError
from momkd.kernels.reference import memory_attention_pool_reference
from momkd.losses import (
    align_loss,
    align_loss_classes,
    batched_commitment_loss,
    batched_commitment_loss_classes,
    class_phi,
)
from momkd.memory import (
    ClassMemory,
    kmeans_class_memories,
    memory_attention_pool_classes,
    spherical_kmeans,
)
from momkd.model import LossWeights, ModelConfig, MoMKD, MoMKDOutput
from momkd.model.abmil import ABMIL, ABMILConfig
from momkd.model.batchkd import BatchKD, BatchKDConfig
from momkd.model.meanpool import MeanPool, MeanPoolConfig

SMALL = {
    "d_in": 12,
    "hidden": 8,
    "omics_width": 6,
    "sphere": 4,
    "memory_k": 3,
    "genes": 10,
    "omics_hidden": 7,
    "classifier_hidden": 5,
}
SIZES = (7, 5, 9, 6)


def small_model(n_classes: int = 2, seed: int = 0, **kw: object) -> MoMKD:
    torch.manual_seed(seed)
    return MoMKD(ModelConfig(**{**SMALL, "n_classes": n_classes, **kw}))  # type: ignore[arg-type]


def batch(sizes: tuple[int, ...] = SIZES, d: int = 12, genes: int = 10, seed: int = 0):
    """B bags joined as disjoint ring graphs: features, edges, offsets, expression."""
    rng = np.random.default_rng(seed)
    feats, edges, start = [], [], 0
    for n in sizes:
        feats.append(rng.normal(size=(n, d)))
        src = np.repeat(np.arange(n), 2)
        dst = (src + np.tile([1, 2], n)) % n
        edges.append(np.stack([src, dst]) + start)
        start += n
    offs = torch.tensor(np.concatenate([[0], np.cumsum(sizes)]), dtype=torch.int64)
    x = torch.tensor(np.concatenate(feats), dtype=torch.float32)
    e = torch.tensor(np.concatenate(edges, axis=1), dtype=torch.int64)
    g = torch.tensor(rng.normal(size=(len(sizes), genes)), dtype=torch.float32)
    return x, e, offs, g


def general_forward(model: MoMKD, x, e, offs, g) -> MoMKDOutput:
    """The forward pass through the C-class functions, whatever the number of classes."""
    feats = model.histology_encoder(x, e)
    p = model.patch_projector(feats)
    pooled, att, score, assign = memory_attention_pool_classes(
        p,
        feats,
        model.memory.normalized_classes(),
        model.log_tau,
        offs,
        tau_min=model.cfg.tau_min,
        tau_max=model.cfg.tau_max,
        maps=model.maps,
    )
    z_o, recon = model._omics(g)
    return MoMKDOutput(
        logits=model.classifier(pooled),
        attention=att[:, 0] if att.shape[1] == 1 else att,
        score=score[:, 0] if score.shape[1] == 1 else score,
        patch_proj=p,
        features=feats,
        pooled=pooled,
        z_w=model.pool_projector(pooled),
        z_o=z_o,
        recon=recon,
        assign=assign,
        segment_offsets=offs,
    )


def general_loss(model: MoMKD, out: MoMKDOutput, y, g, w: LossWeights):
    ce, commit, orth, mem, align_omics, align_wsi = model._class_terms(out, y, w)
    assert out.recon is not None
    mse = F.mse_loss(out.recon.float(), g)
    total = w.ce * ce + w.mem * mem + w.align_omics * align_omics + w.align_wsi * align_wsi
    total = total + w.mse * mse
    terms = {
        "ce": ce,
        "commit": commit,
        "orth": orth,
        "mem": mem,
        "align_omics": align_omics,
        "align_wsi": align_wsi,
        "mse": mse,
    }
    return total, terms


def _grads(model: MoMKD, total: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    total.backward()
    return {
        n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
        for n, p in model.named_parameters()
    }


# ----------------------------------------------------------- C = 2: the general path is the binary


@pytest.mark.parametrize("mode", ["gradient", "momentum"])
def test_two_classes_general_path_equals_binary_path(mode: str) -> None:
    model = small_model(2, memory_update=mode).eval()
    x, e, offs, g = batch()
    y = torch.tensor([1, 0, 0, 1])
    w = LossWeights()

    out = model(x, e, g, offs)
    total, terms = model.loss(out, y, g, w)
    grads = _grads(model, total)

    gen = general_forward(model, x, e, offs, g)
    gtotal, gterms = general_loss(model, gen, y, g, w)
    ggrads = _grads(model, gtotal)

    assert model.maps == (1,)
    tol = {"rtol": 1e-6, "atol": 1e-7}
    for name in ("logits", "attention", "score", "pooled", "z_w", "z_o"):
        torch.testing.assert_close(getattr(gen, name), getattr(out, name), **tol)
    assert torch.equal(gen.assign[0], out.assign_neg) and torch.equal(gen.assign[1], out.assign_pos)
    for key, value in terms.items():
        torch.testing.assert_close(gterms[key], value, **tol, msg=key)
    torch.testing.assert_close(gtotal, total, **tol)
    for name, grad in grads.items():
        torch.testing.assert_close(ggrads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_two_classes_eager_functions_equal_the_binary_references() -> None:
    torch.manual_seed(3)
    p = F.normalize(torch.randn(20, 4), dim=1)
    feats = torch.randn(20, 8)
    pos, neg = torch.randn(3, 4), torch.randn(3, 4)
    pos_hat, neg_hat = F.normalize(pos, dim=1), F.normalize(neg, dim=1)
    offs = torch.tensor([0, 6, 20])
    log_tau = torch.tensor(math.log(0.2))
    ref = memory_attention_pool_reference(p, feats, pos_hat, neg_hat, log_tau, offs)
    pooled, att, score, assign = memory_attention_pool_classes(
        p, feats, [neg_hat, pos_hat], log_tau, offs
    )
    assert torch.equal(pooled, ref[0]) and torch.equal(att[:, 0], ref[1])
    assert torch.equal(score[:, 0], ref[2])
    assert torch.equal(assign[1], ref[3]) and torch.equal(assign[0], ref[4])

    z = F.normalize(torch.randn(6, 4), dim=1)
    y = torch.tensor([0, 1, 1, 0, 1, 0])
    assert torch.equal(
        align_loss_classes(z, y, [neg_hat, pos_hat]), align_loss(z, y, pos_hat, neg_hat)
    )
    ycommit = torch.tensor([1, 0])
    torch.testing.assert_close(
        batched_commitment_loss_classes(p, [neg, pos], ycommit, offs),
        batched_commitment_loss(p, pos, neg, ycommit, offs),
        rtol=1e-6,
        atol=0.0,
    )


def test_two_class_checkpoint_round_trips_with_the_binary_names() -> None:
    from momkd.compat import export_released_state_dict, model_from_released
    from momkd.model.momkd import build

    model = small_model(2).eval()
    keys = set(model.state_dict())
    assert {"memory.pos", "memory.neg"} <= keys and not any(".c0" in k for k in keys)
    params = dataclasses.asdict(model.cfg)
    # A checkpoint written before n_classes existed builds the same two-class model.
    old = {k: v for k, v in params.items() if k != "n_classes"}
    for p in (params, old):
        again = build(p).eval()
        again.load_state_dict(model.state_dict())
        x, e, offs, g = batch()
        a, b = model(x, e, g, offs), again(x, e, g, offs)
        assert torch.equal(a.logits, b.logits) and torch.equal(a.attention, b.attention)
    released = model_from_released(export_released_state_dict(model)).eval()
    x, e, offs, _ = batch()
    torch.testing.assert_close(released(x, e, None, offs).logits, model(x, e, None, offs).logits)


def test_released_conversion_refuses_more_than_two_classes() -> None:
    from momkd.compat import export_released_state_dict

    with pytest.raises(ConfigError, match="two classes"):
        export_released_state_dict(small_model(3))


# ------------------------------------------------------------------------------- C = 3 and 4


@pytest.mark.parametrize("n_classes", [3, 4])
def test_shapes_and_attention_sum_to_one_per_bag_per_map(n_classes: int) -> None:
    model = small_model(n_classes)
    x, e, offs, g = batch()
    out = model(x, e, g, offs)
    n, b, h = x.shape[0], len(SIZES), SMALL["hidden"]
    assert out.logits.shape == (b, n_classes)
    assert out.attention.shape == (n, n_classes) and out.score.shape == (n, n_classes)
    assert out.pooled.shape == (b, n_classes * h) and out.z_w.shape == (b, SMALL["sphere"])
    assert len(out.assign) == n_classes and all(a.shape == (n,) for a in out.assign)
    for j in range(b):
        sums = out.attention[offs[j] : offs[j + 1]].sum(dim=0)
        torch.testing.assert_close(sums, torch.ones(n_classes))
    assert model.memory.names == tuple(f"c{c}" for c in range(n_classes))
    assert {f"memory.c{c}" for c in range(n_classes)} <= set(model.state_dict())
    with pytest.raises(AttributeError, match="two classes"):
        _ = out.assign_pos
    probs, att = model.predict(x[:7], e[:, :14])
    assert probs.shape == (n_classes,) and att.shape == (7, n_classes)
    model.eval()  # no dropout in the omics branch
    assert model.teacher_score(g).shape == (b, n_classes)
    torch.testing.assert_close(
        model.teacher_score(g, temp=5.0),
        class_phi(model._omics(g)[0], model.memory.normalized_classes(), 5.0),
    )
    y = torch.arange(b) % n_classes
    total, terms = model.loss(out, y, g)
    assert torch.isfinite(total) and set(terms) >= {"ce", "commit", "orth", "align_wsi"}
    with pytest.raises(DataError, match=f"in \\[0, {n_classes}\\)"):
        model.loss(out, torch.full((b,), n_classes), g)


def test_three_class_attention_matches_a_hand_computation() -> None:
    rng = np.random.default_rng(7)
    n, s, h, k = 11, 4, 5, 3
    p = rng.normal(size=(n, s))
    p /= np.linalg.norm(p, axis=1, keepdims=True)
    feats = rng.normal(size=(n, h))
    mems = [rng.normal(size=(k, s)) for _ in range(3)]
    mems = [m / np.linalg.norm(m, axis=1, keepdims=True) for m in mems]
    offs = [0, 4, 11]
    tau = 0.3
    pooled, att, score, assign = memory_attention_pool_classes(
        torch.tensor(p, dtype=torch.float32),
        torch.tensor(feats, dtype=torch.float32),
        [torch.tensor(m, dtype=torch.float32) for m in mems],
        torch.tensor(math.log(tau)),
        torch.tensor(offs),
    )
    sim = np.stack([(p @ m.T).max(axis=1) for m in mems], axis=1)  # (N, C)
    for c in range(3):
        rival = np.max(np.delete(sim, c, axis=1), axis=1)
        sc = sim[:, c] - rival
        np.testing.assert_allclose(score[:, c].numpy(), sc, atol=1e-6)
        np.testing.assert_array_equal(assign[c].numpy(), (p @ mems[c].T).argmax(axis=1))
        for j in range(2):
            sl = slice(offs[j], offs[j + 1])
            a = np.exp(sc[sl] / tau)
            a /= a.sum()
            np.testing.assert_allclose(att[sl, c].numpy(), a, atol=1e-6)
            np.testing.assert_allclose(
                pooled[j, c * h : (c + 1) * h].numpy(), a @ feats[sl], atol=1e-5
            )


GROUPS = {
    "encoder": ("histology_encoder.", "patch_projector."),
    "pool_projector": ("pool_projector.",),
    "classifier": ("classifier.",),
    "tau": ("log_tau",),
    "omics": ("omics_encoder.", "omics_projector."),
    "decoder": ("omics_decoder.",),
}


def _reached(model: MoMKD) -> set[str]:
    out = set()
    for name, param in model.named_parameters():
        if param.grad is None or not bool(param.grad.abs().sum() > 0):
            continue
        if name.startswith("memory."):
            out.add(name)
            continue
        out |= {g for g, prefixes in GROUPS.items() if name.startswith(prefixes)}
    return out


@pytest.mark.parametrize(
    "term,expected",
    [
        ("ce", {"encoder", "classifier", "tau"}),
        ("commit", {"encoder"}),
        ("align_wsi", {"encoder", "pool_projector", "tau", "memory.c0", "memory.c1", "memory.c2"}),
        ("align_omics", {"omics", "memory.c0", "memory.c1", "memory.c2"}),
        ("orth", {"memory.c0", "memory.c1", "memory.c2"}),
    ],
)
def test_three_class_gradient_routing(term: str, expected: set[str]) -> None:
    model = small_model(3).eval()
    x, e, offs, g = batch(sizes=(7, 5, 9))
    out = model(x, e, g, offs)
    _, terms = model.loss(out, torch.tensor([0, 1, 2]), g)
    model.zero_grad()
    terms[term].backward()
    assert _reached(model) == expected


def test_orthogonality_reaches_only_the_classes_in_the_batch() -> None:
    model = small_model(4).eval()
    x, e, offs, g = batch(sizes=(7, 5))
    _, terms = model.loss(model(x, e, g, offs), torch.tensor([3, 1]), g)
    model.zero_grad()
    terms["orth"].backward()
    assert _reached(model) == {"memory.c1", "memory.c3"}


def test_per_class_kmeans_uses_the_documented_seeds() -> None:
    torch.manual_seed(1)
    embs = [torch.randn(30 + 5 * c, 4) for c in range(4)]
    model = small_model(4)
    model.init_memory_classes(embs, iters=6, seed=11)
    for c in range(4):
        want = spherical_kmeans(embs[c], 3, iters=6, seed=11 + (4 - 1 - c))
        assert torch.equal(model.memory.class_memory(c), want)
    got = kmeans_class_memories(embs, 3, iters=6, seed=11)
    assert all(torch.equal(a, model.memory.class_memory(c)) for c, a in enumerate(got))
    # At two classes: C+ with the seed, C- with seed + 1, as init_memory(pos, neg).
    two_a, two_b = small_model(2), small_model(2)
    two_a.init_memory(embs[1], embs[0], iters=6, seed=11)
    two_b.init_memory_classes([embs[0], embs[1]], iters=6, seed=11)
    assert torch.equal(two_a.memory.pos, spherical_kmeans(embs[1], 3, iters=6, seed=11))
    assert torch.equal(two_a.memory.neg, spherical_kmeans(embs[0], 3, iters=6, seed=12))
    assert torch.equal(two_a.memory.pos, two_b.memory.pos)
    assert torch.equal(two_a.memory.neg, two_b.memory.neg)
    with pytest.raises(DataError, match="3 classes"):
        small_model(3).init_memory_classes(embs, iters=2)


def test_three_class_momentum_update_matches_a_hand_computation() -> None:
    rng = np.random.default_rng(2)
    k, s, m = 3, 4, 0.7
    mem = ClassMemory(k, s, mode="momentum", momentum=m, dead_after=50, n_classes=3)
    init = [rng.normal(size=(k, s)) for _ in range(3)]
    mem.set_class_memories([torch.tensor(v, dtype=torch.float32) for v in init])
    emb = rng.normal(size=(9, s))
    labels = np.array([0, 2, 2, 1, 0, 2, 2, 0, 2])
    mem.momentum_update(torch.tensor(emb, dtype=torch.float32), torch.tensor(labels))
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    for c in range(3):
        c_hat = init[c] / np.linalg.norm(init[c], axis=1, keepdims=True)
        mine = e[labels == c]
        nearest = (mine @ c_hat.T).argmax(axis=1)
        want = init[c].copy()
        for j in range(k):
            if np.any(nearest == j):
                v = m * c_hat[j] + (1 - m) * mine[nearest == j].mean(axis=0)
                want[j] = v / np.linalg.norm(v)
        np.testing.assert_allclose(mem.class_memory(c).numpy(), want, atol=1e-6)
        used = set(nearest.tolist())
        assert mem.unused_steps[c].tolist() == [0 if j in used else 1 for j in range(k)]
    assert mem.recent_count.tolist() == [1, 1, 1]
    with pytest.raises(DataError, match=r"\[0, 3\)"):
        mem.momentum_update(torch.randn(1, s), torch.tensor([3]))


def test_three_class_dead_component_is_reseeded_from_its_own_class() -> None:
    mem = ClassMemory(2, 3, mode="momentum", momentum=0.5, dead_after=1, n_classes=3)
    mem.set_class_memories([torch.eye(3)[:2], -torch.eye(3)[:2], torch.eye(3)[1:]])
    before = [mem.class_memory(c).clone() for c in range(3)]
    v = torch.tensor([[0.0, 1.0, 0.1]])
    mem.momentum_update(v, torch.tensor([2]))
    # class 2: component 0 (e1) takes v, component 1 (e2) is dead after one step and re-seeded.
    torch.testing.assert_close(mem.class_memory(2)[1], F.normalize(v, dim=1)[0])
    assert torch.equal(mem.class_memory(0), before[0]) and torch.equal(
        mem.class_memory(1), before[1]
    )


def test_momkd_after_optimizer_step_updates_each_class_memory() -> None:
    model = small_model(3, memory_update="momentum")
    x, e, offs, g = batch(sizes=(7, 5, 9))
    before = [model.memory.class_memory(c).clone() for c in range(3)]
    out = model(x, e, g, offs)
    model.after_optimizer_step(out, torch.tensor([0, 2, 2]))
    assert not torch.equal(model.memory.class_memory(0), before[0])
    assert torch.equal(model.memory.class_memory(1), before[1])
    assert not torch.equal(model.memory.class_memory(2), before[2])


def test_three_class_alignment_loss_matches_numpy() -> None:
    rng = np.random.default_rng(4)
    z = rng.normal(size=(5, 4))
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    mems = [rng.normal(size=(3, 4)) for _ in range(3)]
    mems = [v / np.linalg.norm(v, axis=1, keepdims=True) for v in mems]
    y = np.array([0, 1, 2, 2, 1])
    got = align_loss_classes(
        torch.tensor(z, dtype=torch.float32),
        torch.tensor(y),
        [torch.tensor(v, dtype=torch.float32) for v in mems],
        margin=0.3,
        scale=20.0,
        temp=5.0,
    ).numpy()

    def phi(zz: np.ndarray, c: np.ndarray) -> float:
        return float(np.log(np.sum(np.exp(5.0 * (c @ zz)))) / 5.0)

    want = []
    for zi, yi in zip(z, y, strict=True):
        phis = [phi(zi, v) for v in mems]
        delta = phis[yi] - max(phis[c] for c in range(3) if c != yi)
        want.append(math.log1p(math.exp(20.0 * (0.3 - delta))))
    np.testing.assert_allclose(got, want, rtol=1e-5)


# ----------------------------------------------------------------------------------- baselines


def test_baselines_have_c_outputs() -> None:
    x, _, offs, g = batch(genes=6)
    b = len(SIZES)
    torch.manual_seed(0)
    models = [
        ABMIL(ABMILConfig(d_in=12, hidden=8, attn_dim=4, n_classes=3)),
        MeanPool(MeanPoolConfig(d_in=12, n_classes=3)),
        MeanPool(MeanPoolConfig(d_in=12, hidden=5, n_classes=3)),
        BatchKD(
            BatchKDConfig(
                d_in=12, hidden=8, attn_dim=4, genes=6, omics_width=5, omics_hidden=5, n_classes=3
            )
        ),
    ]
    y = torch.tensor([0, 2, 1, 2])
    for model in models:
        out = model(x, None, g, offs)
        assert out.logits.shape == (b, 3)
        total, _ = model.loss(out, y)
        total.backward()
    kd = models[-1](x, None, g, offs)
    assert kd.teacher_logits is not None and kd.teacher_logits.shape == (b, 3)
    with pytest.raises(ConfigError, match="n_classes"):
        ABMILConfig(n_classes=1)


def test_meanpool_and_abmil_forward_by_hand_for_three_classes() -> None:
    x, _, offs, _ = batch()
    torch.manual_seed(0)
    mp = MeanPool(MeanPoolConfig(d_in=12, n_classes=3)).eval()
    ab = ABMIL(ABMILConfig(d_in=12, hidden=8, attn_dim=4, n_classes=3)).eval()
    xs = x.double().numpy()
    o = offs.tolist()

    def lin(layer: torch.nn.Linear, v: np.ndarray) -> np.ndarray:
        return v @ layer.weight.detach().double().numpy().T + layer.bias.detach().double().numpy()

    want_mp = np.stack([lin(mp.head, xs[o[j] : o[j + 1]].mean(axis=0)) for j in range(len(SIZES))])
    np.testing.assert_allclose(mp(x, None, None, offs).logits.detach().numpy(), want_mp, atol=1e-5)

    rows = []
    for j in range(len(SIZES)):
        hb = np.maximum(lin(ab.fc[0], xs[o[j] : o[j + 1]]), 0.0)
        a = np.tanh(lin(ab.pool.attention_a[0], hb))
        gate = 1.0 / (1.0 + np.exp(-lin(ab.pool.attention_b[0], hb)))
        sc = lin(ab.pool.attention_c, a * gate)[:, 0]
        wts = np.exp(sc - sc.max())
        wts /= wts.sum()
        rows.append(lin(ab.classifier, wts @ hb))
    np.testing.assert_allclose(
        ab(x, None, None, offs).logits.detach().numpy(), np.stack(rows), atol=1e-5
    )


def test_hooks_take_n_classes_from_the_run_configuration() -> None:
    from momkd.config import load_config
    from momkd.train.factory import build_model

    cfg = load_config(None)
    cfg.data.classes = ["LumA", "LumB", "Basal"]
    assert cfg.n_classes == 3
    for method in ("momkd", "momkd_histo", "abmil", "batchkd", "meanpool"):
        cfg.model.method = method
        module = __import__(
            f"momkd.model.{'momkd' if 'momkd' in method else method}", fromlist=["x"]
        )
        params = module.params_from_config(cfg, method, 12, 10)
        assert params["n_classes"] == 3, method
        model = build_model({"method": method, "params": params})
        assert model.cfg.n_classes == 3, method


# ------------------------------------------------------------------------------------- explain


def test_explain_per_class_for_three_classes(tmp_path: Path) -> None:
    from momkd.data import StoreWriter
    from momkd.explain import explain_run, memory_history, read_topk_csv, usage_from_counts
    from momkd.train.checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, save_checkpoint

    rng = np.random.default_rng(5)
    store = tmp_path / "cohort.zarr"
    with StoreWriter(store, 12, attrs={"patch_size": 256}) as w:
        for i, p in enumerate((20, 31, 26, 17)):
            coords = np.stack([np.arange(p) % 6, np.arange(p) // 6], axis=1) * 256
            w.append(f"s{i}", rng.normal(size=(p, 12)).astype(np.float32), coords)
    model = small_model(3)
    history = []
    for ep in range(3):
        st = {f"c{c}": usage_from_counts(rng.integers(1, 5, size=3)) for c in range(3)}
        history.append({"epoch": ep, "memory": st})
    run = tmp_path / "run"
    save_checkpoint(
        run / "fold_0" / "best.pt",
        {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "method": "momkd",
            "model_config": {"method": "momkd", "params": dataclasses.asdict(model.cfg)},
            "config": {"data": {"classes": ["A", "B", "C"]}, "train": {"knn_k": 4}},
            "fold": 0,
            "kind": "best",
            "model": model.state_dict(),
        },
    )
    (run / "fold_0" / "history.json").write_text(json.dumps(history))
    res = explain_run(run, store, top_k=2, n_maps=1, progress=False)
    rows = read_topk_csv(res["topk_csv"])
    assert {r["memory"] for r in rows} == {"c0", "c1", "c2"}
    usage = json.loads(Path(res["memory_usage"]).read_text())
    assert usage["classes"] == ["A", "B", "C"]
    assert all(usage[f"c{c}"]["n_patches"] == 94 for c in range(3))
    header = Path(res["predictions"]).read_text().splitlines()[0]
    assert header == "slide_id,n_patches,prob_c0,prob_c1,prob_c2"
    names = sorted(p.name for p in res["maps"])
    assert any(n.endswith("_attention_c2.png") for n in names)
    assert any(n.endswith("_assignment.png") for n in names)
    assert res["memory_dynamics"] is not None and Path(res["memory_dynamics"]).is_file()
    assert list(memory_history(history)) == ["c0", "c1", "c2"]


def test_more_than_two_classes_never_dispatch_to_the_kernels(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    from momkd import kernels
    from momkd.model import momkd as momkd_module

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a kernel dispatch was called for C > 2")

    for op in (
        "memory_attention_pool",
        "align_loss",
        "batched_commitment_loss",
        "momentum_stats",
        "momentum_apply",
        "fused_impl",
    ):
        monkeypatch.setattr(kernels, op, refuse)
    monkeypatch.setattr(momkd_module, "_NOTED_EAGER", False)
    model = small_model(3, memory_update="momentum")
    x, e, offs, g = batch(sizes=(7, 5, 9))
    with caplog.at_level(logging.INFO, logger="momkd.model.momkd"):
        for _ in range(2):
            out = model(x, e, g, offs)
            total, _ = model.loss(out, torch.tensor([0, 1, 2]), g)
            total.backward()
            model.after_optimizer_step(out, torch.tensor([0, 1, 2]))
    notes = [r for r in caplog.records if "fused memory kernels cover two classes" in r.message]
    assert len(notes) == 1
