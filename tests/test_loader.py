"""BagLoader: bags equal direct reads, deterministic order, sharding, subsampling, k-NN graph."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from momkd import _core
from momkd.data import Bag, BagLoader, CohortStore, StoreWriter
from momkd.errors import ConfigError, SlideNotFoundError
from sklearn.neighbors import NearestNeighbors

D = 6
SIZES = [40, 1, 2, 9, 130, 17, 64, 300, 5, 77, 3]


def unique_coords(rng: np.random.Generator, p: int) -> np.ndarray:
    """Distinct random coordinates (P, 2) over a wide range, so that distance ties are rare."""
    flat = rng.choice(10**12, size=p, replace=False)
    return np.stack([flat % 10**6, flat // 10**6], axis=1).astype(np.int64)


def is_tie_free(coords: np.ndarray, k: int) -> bool:
    """Whether every point's k+1 nearest other points have pairwise different distances."""
    diff = coords[:, None, :].astype(np.float64) - coords[None, :, :]
    d2 = (diff**2).sum(-1)
    np.fill_diagonal(d2, np.inf)
    nearest = np.sort(d2, axis=1)[:, : k + 1]
    return bool((np.diff(nearest, axis=1) > 0).all())


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> tuple[Path, dict[str, tuple[np.ndarray, np.ndarray]]]:
    rng = np.random.default_rng(11)
    bags = {}
    for i, p in enumerate(SIZES):
        bags[f"s{i:02d}"] = (rng.normal(size=(p, D)).astype(np.float32), unique_coords(rng, p))
    path = tmp_path_factory.mktemp("loader") / "cohort.zarr"
    with StoreWriter(path, D, chunk_rows=64) as w:
        for sid, (f, c) in bags.items():
            w.append(sid, f, c)
    return path, bags


def ids_of(loader) -> list[str]:
    return [b.slide_id for b in loader]


def test_bags_equal_direct_reads(cohort):
    path, bags = cohort
    store = CohortStore.open(path)
    loader = BagLoader(store, num_threads=2, prefetch=2)
    assert len(loader) == len(SIZES)
    seen = []
    for bag in loader:
        assert isinstance(bag, Bag)
        direct = store.read(bag.slide_id)
        assert bag.index == store.index_of(bag.slide_id)
        assert bag.features.dtype == torch.float32 and bag.coords.dtype == torch.int64
        assert bag.features.shape == (SIZES[bag.index], D)
        np.testing.assert_array_equal(bag.features.numpy(), direct.features)
        np.testing.assert_array_equal(bag.coords.numpy(), direct.coords)
        f, c = bags[bag.slide_id]
        np.testing.assert_array_equal(bag.features.numpy(), f.astype(np.float16).astype(np.float32))
        np.testing.assert_array_equal(bag.coords.numpy(), c)
        assert bag.edge_index is not None and bag.edge_index.dtype == torch.int64
        seen.append(bag.slide_id)
    assert seen == store.slide_ids


@pytest.mark.parametrize(("readahead", "io_threads"), [(0, 1), (1, 1), (6, 3), (50, 8)])
def test_readahead_settings_yield_the_same_bags(cohort, readahead, io_threads):
    path, bags = cohort
    order = ["s05", "s01", "s07", "s01", "s00"]
    loader = BagLoader(
        path, slide_ids=order, knn_k=None, readahead=readahead, io_threads=io_threads, prefetch=1
    )
    got = [(b.slide_id, b.features.numpy(), b.coords.numpy()) for b in loader]
    assert [g[0] for g in got] == order
    for sid, feats, coords in got:
        f, c = bags[sid]
        np.testing.assert_array_equal(feats, f.astype(np.float16).astype(np.float32))
        np.testing.assert_array_equal(coords, c)


def test_path_and_subset_in_given_order(cohort):
    path, _ = cohort
    wanted = ["s07", "s00", "s03"]
    loader = BagLoader(str(path), slide_ids=wanted, knn_k=None)
    bags = list(loader)
    assert [b.slide_id for b in bags] == wanted
    assert all(b.edge_index is None for b in bags)


def test_unknown_slide_id_at_construction(cohort):
    path, _ = cohort
    with pytest.raises(SlideNotFoundError, match="missing-slide") as info:
        BagLoader(path, slide_ids=["s00", "missing-slide"])
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "kw",
    [
        {"rank": 2, "world_size": 2},
        {"world_size": 0},
        {"max_patches": 0},
        {"num_threads": 0},
        {"io_threads": 0},
    ],
)
def test_bad_options(cohort, kw):
    with pytest.raises(ConfigError):
        BagLoader(cohort[0], **kw)


def test_shuffle_deterministic_per_seed_and_epoch(cohort):
    path, _ = cohort
    ids = CohortStore.open(path).slide_ids
    a = BagLoader(path, shuffle=True, seed=3, knn_k=None)
    b = BagLoader(path, shuffle=True, seed=3, knn_k=None)
    for epoch in (0, 1, 5):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        expected = [ids[i] for i in np.random.default_rng([3, epoch]).permutation(len(ids))]
        assert ids_of(a) == ids_of(b) == expected
    a.set_epoch(0)
    e0 = ids_of(a)
    a.set_epoch(1)
    e1 = ids_of(a)
    assert e0 != e1 and sorted(e0) == sorted(e1) == sorted(ids)
    other_seed = BagLoader(path, shuffle=True, seed=4, knn_k=None)
    assert ids_of(other_seed) != e0


def test_epoch_auto_increments_without_set_epoch(cohort):
    path, _ = cohort
    loader = BagLoader(path, shuffle=True, seed=9, knn_k=None)
    passes = [ids_of(loader) for _ in range(3)]
    ref = BagLoader(path, shuffle=True, seed=9, knn_k=None)
    for epoch, got in enumerate(passes):
        ref.set_epoch(epoch)
        assert got == ids_of(ref)
    assert passes[0] != passes[1]
    assert loader.epoch == 3
    # once the epoch is set by hand it stays put
    loader.set_epoch(1)
    assert ids_of(loader) == ids_of(loader) == passes[1]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("shuffle", [False, True])
def test_sharding_covers_every_slide_once(cohort, world_size, shuffle):
    path, _ = cohort
    all_ids = CohortStore.open(path).slide_ids
    counts: Counter[str] = Counter()
    lengths = []
    for rank in range(world_size):
        loader = BagLoader(
            path, shuffle=shuffle, seed=1, rank=rank, world_size=world_size, knn_k=None
        )
        loader.set_epoch(2)
        got = ids_of(loader)
        assert len(got) == len(loader)
        lengths.append(len(got))
        counts.update(got)
    assert sorted(counts) == sorted(all_ids) and set(counts.values()) == {1}
    assert max(lengths) - min(lengths) <= 1

    even = [
        len(
            ids_of(
                BagLoader(
                    path,
                    shuffle=shuffle,
                    rank=r,
                    world_size=world_size,
                    knn_k=None,
                    drop_uneven=True,
                )
            )
        )
        for r in range(world_size)
    ]
    assert even == [len(all_ids) // world_size] * world_size


def test_max_patches_subsample(cohort):
    path, bags = cohort
    m = 20
    loader = BagLoader(path, max_patches=m, seed=5, knn_k=None)

    def run(epoch):
        loader.set_epoch(epoch)
        return {b.slide_id: (b.features.numpy().copy(), b.coords.numpy().copy()) for b in loader}

    e0, e0_again, e1 = run(0), run(0), run(1)
    for sid, (f, c) in bags.items():
        feats, coords = e0[sid]
        assert feats.shape == (min(len(f), m), D) and coords.shape == (min(len(f), m), 2)
        # every kept row is a row of the full bag (coords are unique within a slide)
        row_of = {tuple(xy): i for i, xy in enumerate(c.tolist())}
        rows = [row_of[tuple(xy)] for xy in coords.tolist()]
        assert len(set(rows)) == len(rows)
        np.testing.assert_array_equal(feats, f[rows].astype(np.float16).astype(np.float32))
        np.testing.assert_array_equal(e0_again[sid][1], coords)
        if len(f) <= m:
            assert sorted(rows) == list(range(len(f)))
    big = [sid for sid, (f, _) in bags.items() if len(f) > 3 * m]
    assert big
    assert any(
        set(map(tuple, e0[s][1].tolist())) != set(map(tuple, e1[s][1].tolist())) for s in big
    )


def test_edge_index_matches_core_and_sklearn(cohort):
    path, _ = cohort
    k = 8
    checked = 0
    for bag in BagLoader(path, knn_k=k):
        coords = bag.coords.numpy()
        np.testing.assert_array_equal(bag.edge_index.numpy(), _core.knn_graph(coords, k))
        p = len(coords)
        kk = min(k, p - 1)
        assert bag.edge_index.shape == (2, p * kk)
        if p < 2:
            continue
        # sklearn oracle on slides whose neighbour lists are unambiguous
        if not is_tie_free(coords, kk):
            continue
        nn = NearestNeighbors(n_neighbors=min(kk + 2, p)).fit(coords.astype(np.float64))
        _, idx = nn.kneighbors(coords.astype(np.float64))
        checked += 1
        expected = set()
        for i in range(p):
            nbrs = [j for j in idx[i] if j != i][:kk]
            expected.update((i, int(j)) for j in nbrs)
        got = set(zip(bag.edge_index[0].tolist(), bag.edge_index[1].tolist(), strict=True))
        assert got == expected
        assert all(s != t for s, t in got)
    assert checked >= len(SIZES) - 2


def test_knn_graph_tie_free_slide_vs_sklearn():
    rng = np.random.default_rng(0)
    coords = unique_coords(rng, 200)
    while not is_tie_free(coords, 8):
        coords = unique_coords(rng, 200)
    edges = _core.knn_graph(coords, 8)
    nn = NearestNeighbors(n_neighbors=9).fit(coords)
    _, idx = nn.kneighbors(coords)
    expected = {(i, int(j)) for i in range(200) for j in idx[i, 1:]}
    assert set(zip(edges[0].tolist(), edges[1].tolist(), strict=True)) == expected
