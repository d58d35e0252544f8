"""Class memory: spherical k-means, momentum update, dead re-seeding, usage statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from momkd import kernels
from momkd.errors import ConfigError, DataError
from momkd.kernels.reference import momentum_update_reference
from momkd.memory import ClassMemory, spherical_kmeans, usage_stats
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score


def _kmeans_loop(x: np.ndarray, init: np.ndarray, iters: int) -> np.ndarray:
    """Straightforward spherical k-means with explicit loops, from the given initial indices."""
    pts = x / np.linalg.norm(x, axis=1, keepdims=True)
    cent = pts[init].copy()
    k = len(init)
    for _ in range(iters):
        members: list[list[int]] = [[] for _ in range(k)]
        for i, v in enumerate(pts):
            sims = [float(v @ c) for c in cent]
            members[sims.index(max(sims))].append(i)
        for j in range(k):
            if members[j]:
                m = pts[members[j]].sum(axis=0)
                cent[j] = m / np.linalg.norm(m)
    return cent


def _init_indices(m: int, k: int, seed: int) -> np.ndarray:
    return torch.randperm(m, generator=torch.Generator().manual_seed(seed))[:k].numpy()


def test_spherical_kmeans_matches_loop_reference() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 5))
    got = spherical_kmeans(torch.tensor(x, dtype=torch.float32), 4, iters=7, seed=3)
    expected = _kmeans_loop(x, _init_indices(60, 4, 3), 7)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got.numpy(), axis=1), 1.0, atol=1e-6)


def test_spherical_kmeans_empty_cluster_keeps_centroid() -> None:
    # 10 copies of one direction and 2 of another: find a seed whose initial points contain two
    # copies of the same direction, so one cluster receives no point (ties go to the lowest index).
    x = np.array([[1.0, 0.0, 0.0]] * 10 + [[0.0, 1.0, 0.0]] * 2)
    seed = next(s for s in range(100) if np.sum(_init_indices(12, 3, s) < 10) >= 2)
    init = _init_indices(12, 3, seed)
    got = spherical_kmeans(torch.tensor(x, dtype=torch.float32), 3, iters=5, seed=seed)
    np.testing.assert_allclose(got.numpy(), _kmeans_loop(x, init, 5), atol=1e-6)
    rows = {tuple(np.round(r, 6)) for r in got.numpy()}
    assert rows == {(1.0, 0.0, 0.0), (0.0, 1.0, 0.0)}  # the duplicate centroid was kept as is


def test_spherical_kmeans_agrees_with_sklearn_on_separated_data() -> None:
    rng = np.random.default_rng(1)
    centers = np.eye(6)[:4] * 3.0
    labels = np.repeat(np.arange(4), 50)
    x = centers[labels] + 0.2 * rng.normal(size=(200, 6))
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    cent = spherical_kmeans(torch.tensor(x, dtype=torch.float32), 4, iters=20, seed=0).numpy()
    ours = np.argmax(xn @ cent.T, axis=1)
    theirs = KMeans(n_clusters=4, n_init=10, random_state=0).fit_predict(xn)
    assert adjusted_rand_score(theirs, ours) == pytest.approx(1.0)
    assert adjusted_rand_score(labels, ours) == pytest.approx(1.0)


def test_spherical_kmeans_rejects_too_few_points() -> None:
    with pytest.raises(DataError, match="at least k=5"):
        spherical_kmeans(torch.randn(3, 4), 5)


def _momentum_loop(pos: np.ndarray, neg: np.ndarray, emb: np.ndarray, labels: np.ndarray, m: float):
    out = {1: pos.copy(), 0: neg.copy()}
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    for c, mem in ((1, pos), (0, neg)):
        c_hat = mem / np.linalg.norm(mem, axis=1, keepdims=True)
        groups: dict[int, list[np.ndarray]] = {}
        for v, lab in zip(e, labels):
            if lab != c:
                continue
            sims = [float(v @ ck) for ck in c_hat]
            groups.setdefault(sims.index(max(sims)), []).append(v)
        for k, vs in groups.items():
            u = m * c_hat[k] + (1 - m) * np.mean(vs, axis=0)
            out[c][k] = u / np.linalg.norm(u)
    return out[1], out[0]


def _momentum_memory(k: int = 4, s: int = 5, m: float = 0.9, dead_after: int = 100, seed: int = 0):
    torch.manual_seed(seed)
    mem = ClassMemory(k, s, mode="momentum", momentum=m, dead_after=dead_after)
    return mem


def test_momentum_update_matches_hand_loop() -> None:
    mem = _momentum_memory()
    with torch.no_grad():
        mem.pos.mul_(torch.tensor([1.0, 2.0, 0.5, 3.0])[:, None])  # raw rows need not be unit
    pos0, neg0 = mem.pos.numpy().copy(), mem.neg.numpy().copy()
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(9, 5, generator=g)
    labels = torch.tensor([1, 0, 1, 1, 0, 1, 0, 1, 1])
    mem.momentum_update(emb, labels)
    exp_pos, exp_neg = _momentum_loop(pos0, neg0, emb.numpy(), labels.numpy(), 0.9)
    np.testing.assert_allclose(mem.pos.numpy(), exp_pos, atol=1e-6)
    np.testing.assert_allclose(mem.neg.numpy(), exp_neg, atol=1e-6)


def test_momentum_update_reference_single_memory() -> None:
    g = torch.Generator().manual_seed(2)
    mem = torch.randn(3, 4, generator=g)
    emb = F.normalize(torch.randn(7, 4, generator=g), dim=1)
    got = momentum_update_reference(mem, emb, 0.8)
    expected, _ = _momentum_loop(mem.numpy(), mem.numpy(), emb.numpy(), np.ones(7, int), 0.8)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-6)


def test_masked_update_leaves_other_memory_untouched() -> None:
    mem = _momentum_memory()
    neg_before = mem.neg.clone()
    pos_before = mem.pos.clone()
    mem.momentum_update(torch.randn(3, 5), torch.tensor([1, 1, 1]))
    assert torch.equal(mem.neg, neg_before)
    assert not torch.equal(mem.pos, pos_before)
    pos_after = mem.pos.clone()
    mem.momentum_update(torch.randn(2, 5), torch.tensor([0, 0]))
    assert torch.equal(mem.pos, pos_after)
    assert not torch.equal(mem.neg, neg_before)


def test_reduce_fn_makes_ranks_identical_and_equal_to_global_update() -> None:
    g = torch.Generator().manual_seed(3)
    emb_a, emb_b = torch.randn(4, 5, generator=g), torch.randn(3, 5, generator=g)
    lab_a, lab_b = torch.tensor([1, 0, 0, 1]), torch.tensor([0, 1, 1])
    ranks = [_momentum_memory(seed=5) for _ in range(2)]
    single = _momentum_memory(seed=5)

    def local_stats(mem: ClassMemory, emb: torch.Tensor, lab: torch.Tensor):
        mems = F.normalize(torch.stack([mem.neg, mem.pos]), dim=-1)
        return kernels.momentum_stats(mems, F.normalize(emb, dim=1), lab)

    # Simulated all-reduce: each rank adds the other rank's statistics, in its own order.
    s_b, c_b = local_stats(ranks[1], emb_b, lab_b)
    s_a, c_a = local_stats(ranks[0], emb_a, lab_a)
    ranks[0].momentum_update(emb_a, lab_a, reduce_fn=lambda s, c: (s + s_b, c + c_b))
    ranks[1].momentum_update(emb_b, lab_b, reduce_fn=lambda s, c: (s_a + s, c_a + c))
    single.momentum_update(torch.cat([emb_a, emb_b]), torch.cat([lab_a, lab_b]))
    for name in ("pos", "neg", "unused_steps", "recent", "recent_count"):
        assert torch.equal(getattr(ranks[0], name), getattr(ranks[1], name)), name
        torch.testing.assert_close(getattr(ranks[0], name), getattr(single, name))


def test_dead_components_are_reseeded_from_recent_embeddings() -> None:
    mem = ClassMemory(3, 3, mode="momentum", momentum=0.5, dead_after=2)
    mem.set_memories(torch.eye(3), -torch.eye(3))
    neg_before = mem.neg.clone()
    v1 = torch.tensor([[1.0, 0.1, 0.0]])
    v2 = torch.tensor([[1.0, 0.0, 0.2]])
    mem.momentum_update(v1, torch.tensor([1]))
    assert mem.unused_steps[1].tolist() == [0, 1, 1]
    assert mem.unused_steps[0].tolist() == [0, 0, 0]  # the other class did not age
    assert torch.equal(mem.pos[1:], torch.eye(3)[1:])
    mem.momentum_update(v2, torch.tensor([1]))
    n1, n2 = F.normalize(v1, dim=1)[0], F.normalize(v2, dim=1)[0]
    # two dead components: the first gets the most recent class embedding, the second the one before
    torch.testing.assert_close(mem.pos[1], n2)
    torch.testing.assert_close(mem.pos[2], n1)
    e1 = F.normalize(0.5 * torch.eye(3)[0] + 0.5 * n1, dim=0)
    torch.testing.assert_close(mem.pos[0], F.normalize(0.5 * e1 + 0.5 * n2, dim=0))
    assert mem.unused_steps.tolist() == [[0, 0, 0], [0, 0, 0]]
    assert mem.recent_count.tolist() == [0, 2]
    assert torch.equal(mem.neg, neg_before)


def test_modes_parameters_and_buffers() -> None:
    grad = ClassMemory(2, 3, mode="gradient")
    assert {n for n, _ in grad.named_parameters()} == {"pos", "neg"}
    fixed = ClassMemory(2, 3, mode="fixed")
    assert list(fixed.parameters()) == []
    assert not fixed.pos.requires_grad and set(fixed.state_dict()) == {"pos", "neg"}
    with pytest.raises(ConfigError, match="fixed"):
        fixed.momentum_update(torch.randn(1, 3), torch.tensor([1]))
    mom = ClassMemory(2, 3, mode="momentum")
    assert set(mom.state_dict()) == {"pos", "neg", "unused_steps", "recent", "recent_count"}
    with pytest.raises(ConfigError, match="memory.update"):
        ClassMemory(2, 3, mode="ema")


def test_momentum_update_validates_inputs() -> None:
    mem = _momentum_memory()
    with pytest.raises(DataError, match="labels must be 0 or 1"):
        mem.momentum_update(torch.randn(2, 5), torch.tensor([1, 2]))
    with pytest.raises(DataError, match="embeddings"):
        mem.momentum_update(torch.randn(2, 4), torch.tensor([1, 0]))
    before = mem.pos.clone()
    mem.momentum_update(torch.zeros(0, 5), torch.zeros(0, dtype=torch.int64))  # no-op step
    assert torch.equal(mem.pos, before)


def test_usage_stats_by_hand() -> None:
    stats = usage_stats(torch.tensor([0, 0, 1, 3]), 4)
    np.testing.assert_allclose(stats["usage"].numpy(), [0.5, 0.25, 0.0, 0.25])
    assert stats["active_ratio"] == pytest.approx(0.75)
    entropy = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert stats["perplexity"] == pytest.approx(math.exp(entropy))
    single = usage_stats(torch.zeros(5, dtype=torch.int64), 3)
    assert single["perplexity"] == pytest.approx(1.0)
    assert single["active_ratio"] == pytest.approx(1 / 3)
    with pytest.raises(DataError):
        usage_stats(torch.tensor([4]), 4)
