"""Float16 hand-off and the cohort cache: bags identical to the plain float32 / uncached loader."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from momkd.data import BagLoader, CohortStore, StoreWriter
from momkd.data import cache as cache_mod
from momkd.data.cache import BagCache, choose_cache, cohort_bytes, shared_cache
from momkd.errors import ConfigError

D = 6
SIZES = [40, 1, 2, 9, 130, 17, 64, 300, 5, 77, 3]


def _coords(rng: np.random.Generator, p: int) -> np.ndarray:
    flat = rng.choice(10**12, size=p, replace=False)
    return np.stack([flat % 10**6, flat // 10**6], axis=1).astype(np.int64)


def _write(path: Path, dtype: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(5)
    bags = {
        f"s{i:02d}": (rng.normal(size=(p, D)).astype(np.float32) * 3, _coords(rng, p))
        for i, p in enumerate(SIZES)
    }
    with StoreWriter(path, D, dtype=dtype, chunk_rows=32) as w:
        for sid, (f, c) in bags.items():
            w.append(sid, f, c)
    return bags


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    root = tmp_path_factory.mktemp("cache")
    return {
        dt: (root / f"{dt}.zarr", _write(root / f"{dt}.zarr", dt)) for dt in ("float16", "float32")
    }


def _bags(
    loader: BagLoader, epoch: int
) -> list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    loader.set_epoch(epoch)
    return [(b.slide_id, b.features, b.coords, b.edge_index) for b in loader]


# --------------------------------------------------------------------------- float16 hand-off


@pytest.mark.parametrize("store_dtype", ["float16", "float32"])
def test_float16_handoff_equals_float32_after_conversion(stores, store_dtype):
    path, bags = stores[store_dtype]
    store = CohortStore.open(path)
    kw = {"shuffle": True, "seed": 3, "max_patches": 50, "knn_k": 4, "num_threads": 2}
    half = _bags(BagLoader(store, dtype="float16", **kw), 1)
    full = _bags(BagLoader(store, dtype="float32", **kw), 1)
    assert [h[0] for h in half] == [f[0] for f in full]
    for (sid, fh, ch, eh), (_, ff, cf, ef) in zip(half, full, strict=True):
        assert fh.dtype == torch.float16 and ff.dtype == torch.float32
        assert torch.equal(ch, cf) and torch.equal(eh, ef)
        if store_dtype == "float16":
            # The float16 values widened are exactly the float32 hand-off.
            assert torch.equal(fh.float(), ff)
        else:
            # Oracle: numpy's round-to-nearest-even float16 conversion of the float32 read.
            assert np.array_equal(fh.numpy(), ff.numpy().astype(np.float16))
        # And against the source values (at float16 precision) for whole bags.
        if fh.shape[0] == bags[sid][0].shape[0]:
            assert np.array_equal(fh.numpy(), bags[sid][0].astype(np.float16))


def test_bad_dtype_is_a_config_error(stores):
    with pytest.raises(ConfigError, match="dtype"):
        BagLoader(stores["float16"][0], dtype="bfloat16")


# --------------------------------------------------------------------------- the cohort cache


@pytest.mark.parametrize("max_patches", [None, 20])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("store_dtype", ["float16", "float32"])
def test_cached_epochs_are_bit_identical(stores, max_patches, dtype, store_dtype):
    path, _ = stores[store_dtype]
    store = CohortStore.open(path)
    cache = BagCache(store, "host", budget_bytes=10**9)
    kw = {"shuffle": True, "seed": 9, "max_patches": max_patches, "knn_k": 3, "dtype": dtype}
    plain = BagLoader(store, **kw)
    cached = BagLoader(store, cache=cache, **kw)
    for epoch in range(3):
        want, got = _bags(plain, epoch), _bags(cached, epoch)
        assert [g[0] for g in got] == [w[0] for w in want]
        for (sid, fw, cw, ew), (_, fg, cg, eg) in zip(want, got, strict=True):
            assert fg.dtype == fw.dtype and torch.equal(fg, fw), (epoch, sid)
            assert torch.equal(cg, cw), (epoch, sid)
            assert torch.equal(eg, ew), (epoch, sid)
        if epoch == 0:
            assert cache.misses == len(SIZES) and cache.hits == 0
    # After the first epoch every bag came from memory.
    assert len(cache) == len(SIZES)
    assert cache.hits == 2 * len(SIZES)
    if max_patches is not None:  # the cached bag is subsampled anew each epoch, as uncached
        big = store.slide_ids[SIZES.index(300)]
        a = [c for s, _, c, _ in _bags(cached, 0) if s == big][0]
        b = [c for s, _, c, _ in _bags(cached, 1) if s == big][0]
        assert a.shape[0] == max_patches and not torch.equal(a, b)


def test_cache_over_budget_serves_the_rest_from_the_store(stores):
    path, _ = stores["float16"]
    store = CohortStore.open(path)
    # Room for about 400 patches: the other bags are read every epoch, the results are unchanged.
    cache = BagCache(store, "host", budget_bytes=400 * (D * 2 + 16 + 3 * 16))
    kw = {"shuffle": True, "seed": 1, "max_patches": 25, "knn_k": 3}
    plain, cached = BagLoader(store, **kw), BagLoader(store, cache=cache, **kw)
    for epoch in range(2):
        for (s1, f1, c1, e1), (s2, f2, c2, e2) in zip(
            _bags(plain, epoch), _bags(cached, epoch), strict=True
        ):
            assert s1 == s2 and torch.equal(f1, f2) and torch.equal(c1, c2) and torch.equal(e1, e2)
    assert 0 < len(cache) < len(SIZES)
    assert cache.nbytes <= cache.budget_bytes


def test_cache_of_another_store_is_refused(stores):
    other = BagCache(CohortStore.open(stores["float32"][0]), "host", 10**6)
    with pytest.raises(ConfigError, match="cache belongs"):
        BagLoader(stores["float16"][0], cache=other)


def test_auto_chooses_by_free_memory(monkeypatch):
    gb = 10**9

    def fake(host: int, dev: int) -> None:
        monkeypatch.setattr(cache_mod, "free_host_bytes", lambda: host)
        monkeypatch.setattr(cache_mod, "free_device_bytes", lambda device: dev)

    fake(host=64 * gb, dev=80 * gb)
    assert choose_cache("auto", 30 * gb, device="cuda") == ("device", 40 * gb)  # 30 <= 0.5 * 80
    assert choose_cache("auto", 41 * gb, device="cuda") == ("none", 0)  # > 40 GPU, > 32 host
    fake(host=100 * gb, dev=80 * gb)
    assert choose_cache("auto", 41 * gb, device="cuda") == ("host", 50 * gb)
    assert choose_cache("auto", 51 * gb, device="cuda") == ("none", 0)
    fake(host=100 * gb, dev=0)  # no GPU
    assert choose_cache("auto", 10 * gb, device="cpu") == ("host", 50 * gb)
    # cache_gb caps every budget
    fake(host=100 * gb, dev=80 * gb)
    assert choose_cache("auto", 30 * gb, device="cuda", cache_gb=20) == ("none", 0)
    assert choose_cache("auto", 10 * gb, device="cuda", cache_gb=20) == ("device", 20 * gb)
    assert choose_cache("host", 10 * gb, device="cpu", cache_gb=4) == ("host", 4 * gb)
    assert choose_cache("none", 1, device="cuda") == ("none", 0)
    fake(host=100 * gb, dev=0)
    with pytest.raises(ConfigError, match="CUDA"):
        choose_cache("device", 1, device="cpu")
    with pytest.raises(ConfigError, match="data.cache"):
        choose_cache("gpu", 1, device="cpu")


def test_processes_on_one_machine_split_the_budget(monkeypatch, caplog):
    gb = 10**9
    monkeypatch.setattr(cache_mod, "free_host_bytes", lambda: 100 * gb)
    monkeypatch.setattr(
        cache_mod, "free_device_bytes", lambda device: 80 * gb if device == "cuda" else 0
    )
    for key in ("MOMKD_HOST_PROCESSES", "LOCAL_WORLD_SIZE", "MOMKD_DEVICE_PROCESSES"):
        monkeypatch.delenv(key, raising=False)
    assert cache_mod.host_processes() == 1 and cache_mod.device_processes() == 1
    # Four ranks under torchrun: each may take a quarter of the host's safe half.
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert cache_mod.host_processes() == 4
    assert choose_cache("host", 1, device="cpu") == ("host", 12_500_000_000)
    with caplog.at_level("INFO", logger="momkd.data.cache"):
        assert choose_cache("auto", 13 * gb, device="cpu") == ("none", 0)  # 13 > 50 / 4
    assert "4 processes share this machine" in caplog.text
    assert choose_cache("auto", 12 * gb, device="cpu") == ("host", 12_500_000_000)
    # The GPU is each rank's own: the device budget is not split ...
    assert choose_cache("auto", 30 * gb, device="cuda") == ("device", 40 * gb)
    # ... unless processes share it (fold-parallel with more folds than GPUs).
    monkeypatch.setenv("MOMKD_DEVICE_PROCESSES", "2")
    assert choose_cache("auto", 25 * gb, device="cuda") == ("none", 0)  # > 80 / 2 / 2, > 12.5
    assert choose_cache("auto", 15 * gb, device="cuda") == ("device", 20 * gb)
    # The fold-parallel count wins over torchrun's; explicit shares win over both.
    monkeypatch.setenv("MOMKD_HOST_PROCESSES", "2")
    assert choose_cache("host", 1, device="cpu") == ("host", 25 * gb)
    assert choose_cache("host", 1, device="cpu", host_share=1) == ("host", 50 * gb)
    monkeypatch.setenv("MOMKD_HOST_PROCESSES", "two")
    with pytest.raises(ConfigError, match="MOMKD_HOST_PROCESSES"):
        choose_cache("host", 1, device="cpu")


def test_fold_parallel_processes_declare_their_share(monkeypatch):
    from momkd.train import fold_parallel

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    env, _args = fold_parallel._device_env(0, 3)
    assert env["MOMKD_HOST_PROCESSES"] == "3"
    assert "LOCAL_WORLD_SIZE" not in env
    if torch.cuda.is_available():
        assert int(env["MOMKD_DEVICE_PROCESSES"]) == -(-3 // torch.cuda.device_count())


def test_shared_cache_is_one_per_store_and_auto_logs(stores, monkeypatch, caplog):
    store = CohortStore.open(stores["float16"][0])
    monkeypatch.setattr(cache_mod, "free_host_bytes", lambda: 10**12)
    monkeypatch.setattr(cache_mod, "free_device_bytes", lambda device: 0)
    need = cohort_bytes(store, 8)
    assert need == store.n_patches * (D * 2 + 16 + 128)
    with caplog.at_level("INFO", logger="momkd.data.cache"):
        a = shared_cache(store, "auto", device="cpu")
    assert a is not None and a.kind == "host"
    assert "data.cache auto: host" in caplog.text
    assert shared_cache(store, "auto", device="cpu") is a
    assert shared_cache(store, "none") is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("max_patches", [None, 20])
def test_device_cache_is_bit_identical(stores, max_patches):
    path, _ = stores["float16"]
    store = CohortStore.open(path)
    cache = BagCache(store, "device", budget_bytes=10**9, device="cuda")
    kw = {"shuffle": True, "seed": 2, "max_patches": max_patches, "knn_k": 3, "dtype": "float16"}
    plain, cached = BagLoader(store, **kw), BagLoader(store, cache=cache, **kw)
    for epoch in range(3):
        for (s1, f1, c1, e1), (s2, f2, c2, e2) in zip(
            _bags(plain, epoch), _bags(cached, epoch), strict=True
        ):
            assert f2.is_cuda and e2.is_cuda
            assert s1 == s2 and torch.equal(f1, f2.cpu()) and torch.equal(c1, c2)
            assert torch.equal(e1, e2.cpu())
    assert cache.hits == 2 * len(SIZES)


def test_config_keys():
    from momkd.config import load_config
    from momkd.train.batching import feature_dtype_for

    cfg = load_config(None, ["data.cache=auto", "data.cache_gb=12.5"])
    assert cfg.data.cache == "auto" and cfg.data.cache_gb == 12.5
    assert load_config(None).data.cache == "none"
    with pytest.raises(ConfigError, match="data.cache_gb"):
        load_config(None, ["data.cache_gb=0"])
    with pytest.raises(ConfigError, match="data.cache"):
        load_config(None, ["data.cache=gpu"])
    auto = load_config(None)
    assert feature_dtype_for(auto, torch.device("cuda")) == "float16"
    assert feature_dtype_for(auto, torch.device("cpu")) == "float32"
    forced = load_config(None, ["train.feature_dtype=float16"])
    assert feature_dtype_for(forced, torch.device("cpu")) == "float16"


def test_collate_widens_float16_on_the_device(stores):
    from momkd.train.batching import collate

    store = CohortStore.open(stores["float16"][0])
    half = list(BagLoader(store, dtype="float16", knn_k=3))[:3]
    full = list(BagLoader(store, dtype="float32", knn_k=3))[:3]
    for n in (1, 3):
        fh, eh, oh = collate(half[:n], torch.device("cpu"), graph=True)
        ff, ef, of = collate(full[:n], torch.device("cpu"), graph=True)
        assert fh.dtype == torch.float32 and torch.equal(fh, ff) and torch.equal(eh, ef)
        assert (oh is None and of is None) or torch.equal(oh, of)


# --------------------------------------------------------------------------- shared host cache


def _same(a, b) -> None:
    assert [x[0] for x in a] == [y[0] for y in b]
    for (sid, f1, c1, e1), (_, f2, c2, e2) in zip(a, b, strict=True):
        assert f1.dtype == f2.dtype and torch.equal(f1, f2), sid
        assert torch.equal(c1, c2), sid
        assert (e1 is None and e2 is None) or torch.equal(e1, e2), sid


@pytest.mark.parametrize("max_patches", [None, 20])
def test_shared_host_cache_bags_written_once_and_mapped_by_the_others(
    stores, tmp_path, max_patches
):
    path, _ = stores["float16"]
    store = CohortStore.open(path)
    folder = tmp_path / "shm" / "job"
    kw = {"shuffle": True, "seed": 2, "max_patches": max_patches, "knn_k": 3}
    plain = BagLoader(store, **kw)
    # Two "processes" of one job: each has its own cache object on the same folder.
    a = cache_mod.SharedHostCache(store, 10**9, folder)
    b = cache_mod.SharedHostCache(store, 10**9, folder)
    _same(_bags(plain, 0), _bags(BagLoader(store, cache=a, **kw), 0))
    assert a.written == len(SIZES) and a.misses == len(SIZES)
    assert len(list(folder.glob("*.features"))) == len(SIZES)
    # b reads nothing from the store and writes nothing: every bag is mapped from a's files.
    for epoch in (0, 1):
        _same(_bags(plain, epoch), _bags(BagLoader(store, cache=b, **kw), epoch))
    assert b.written == 0 and b.misses == 0 and b.mapped == len(SIZES)
    # b's own memory is only the graphs it built; a's also counts the bags it wrote.
    graphs = sum(
        e.nbytes for i in range(len(SIZES)) for e in map(np.asarray, b.get(i).edges.values())
    )
    assert b.nbytes == graphs < a.nbytes
    # The files hold the store's values exactly (independent reader: numpy).
    sid = store.slide_ids[4]
    on_disk = np.fromfile(folder / f"{store.index_of(sid)}.features", dtype=np.float16)
    assert np.array_equal(on_disk.reshape(-1, D), store.read(sid, dtype="float16").features)
    # a ends: its files go; b keeps serving the bags it mapped, and a new process reads and writes.
    a.close()
    assert not folder.exists()  # b wrote nothing, so a's files were the last ones
    _same(_bags(plain, 2), _bags(BagLoader(store, cache=b, **kw), 2))
    c = cache_mod.SharedHostCache(store, 10**9, folder)
    _same(_bags(plain, 3), _bags(BagLoader(store, cache=c, **kw), 3))
    assert c.written == len(SIZES)
    c.close()
    b.close()
    assert not folder.exists()  # the last process out removes the folder


def test_shared_host_cache_without_room_reads_the_store(stores, tmp_path, monkeypatch):
    path, _ = stores["float16"]
    store = CohortStore.open(path)
    folder = tmp_path / "job"
    cache = cache_mod.SharedHostCache(store, 10**9, folder)
    usage = type("Usage", (), {"free": cache_mod.SHARED_RESERVE - 1})
    monkeypatch.setattr(cache_mod.shutil, "disk_usage", lambda p: usage)
    kw = {"shuffle": True, "seed": 4, "knn_k": 3}
    _same(_bags(BagLoader(store, **kw), 0), _bags(BagLoader(store, cache=cache, **kw), 0))
    assert cache.written == 0 and len(cache) == 0 and not list(folder.iterdir())


def test_shared_cache_is_chosen_for_several_processes(stores, tmp_path, monkeypatch, caplog):
    path, _ = stores["float32"]
    store = CohortStore.open(path)
    monkeypatch.setattr(cache_mod, "SHARED_ROOT", tmp_path)
    monkeypatch.setattr(cache_mod, "free_host_bytes", lambda: 10**12)
    monkeypatch.delenv("MOMKD_HOST_PROCESSES", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with caplog.at_level("INFO", logger="momkd.data.cache"):
        cache = shared_cache(store, "host", device="cpu")
    assert isinstance(cache, cache_mod.SharedHostCache)
    assert cache.directory == cache_mod.shared_cache_dir(store.path, tmp_path)
    assert cache.directory.parent == tmp_path and "shared by the 2 processes" in caplog.text
    # One process alone keeps a private cache.
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    alone = shared_cache(CohortStore.open(path), "host", device="cpu")
    assert type(alone) is BagCache


def test_processes_of_one_job_agree_on_the_folder_and_stale_folders_go(stores, tmp_path):
    import subprocess
    import sys

    path, _ = stores["float16"]
    code = (
        "import sys; from pathlib import Path; from momkd.data.cache import shared_cache_dir;"
        f"print(shared_cache_dir({str(path)!r}, Path({str(tmp_path)!r})))"
    )
    # Two children of this process (as torchrun's ranks are children of its agent): one folder.
    out = [
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        for _ in range(2)
    ]
    assert out[0].stdout == out[1].stdout
    assert cache_mod.shared_cache_dir(path, tmp_path).name not in out[0].stdout  # other parent
    # A folder whose job parent is gone is removed; a live job's folder stays.
    done = subprocess.run([sys.executable, "-c", "pass"], check=True)
    dead_pid = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_pid.wait()
    stale = tmp_path / f"{cache_mod._shared_prefix()}p{dead_pid.pid}-abc"
    live = cache_mod.shared_cache_dir(path, tmp_path)
    for folder in (stale, live):
        folder.mkdir()
        (folder / "0.features.npy").write_bytes(b"x")
    assert done.returncode == 0
    assert cache_mod.remove_stale_shared_caches(tmp_path) == [stale]
    assert not stale.exists() and live.exists()


def test_no_shared_memory_folder_means_a_private_cache(stores, tmp_path, monkeypatch, caplog):
    path, _ = stores["float16"]
    monkeypatch.setattr(cache_mod, "SHARED_ROOT", tmp_path / "absent")
    monkeypatch.setattr(cache_mod, "free_host_bytes", lambda: 10**12)
    monkeypatch.delenv("MOMKD_HOST_PROCESSES", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    with caplog.at_level("INFO", logger="momkd.data.cache"):
        cache = shared_cache(CohortStore.open(path), "host", device="cpu")
    assert type(cache) is BagCache
    assert "not shared between the 3 processes" in caplog.text


def test_shared_host_cache_maps_only_whole_bags_and_keeps_no_descriptors(stores, tmp_path):
    path, _ = stores["float16"]
    store = CohortStore.open(path)
    folder = tmp_path / "job"
    kw = {"shuffle": True, "seed": 6, "knn_k": 3}
    plain = _bags(BagLoader(store, **kw), 0)
    a = cache_mod.SharedHostCache(store, 10**9, folder)
    fds = len(os.listdir("/proc/self/fd"))
    _same(plain, _bags(BagLoader(store, cache=a, **kw), 0))
    assert len(a) == len(SIZES)
    # Mapped bags hold no file descriptor open (a long cohort would otherwise exhaust the limit).
    assert len(os.listdir("/proc/self/fd")) < fds + 3
    # A bag file of the wrong size (truncated, or from another store) is never mapped.
    big = SIZES.index(300)
    with open(folder / f"{big}.features", "r+b") as fh:
        fh.truncate(100)
    b = cache_mod.SharedHostCache(store, 10**9, folder)
    assert big not in b and 0 in b
    _same(plain, _bags(BagLoader(store, cache=b, **kw), 0))  # read from the store instead
    a.close()
    b.close()


def test_shared_host_cache_failed_write_leaves_nothing(stores, tmp_path, monkeypatch):
    path, _ = stores["float16"]
    store = CohortStore.open(path)
    folder = tmp_path / "job"
    cache = cache_mod.SharedHostCache(store, 10**9, folder)
    real_replace = os.replace

    def failing(src, dst):
        if str(dst).endswith(".features"):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(cache_mod.os, "replace", failing)
    got = store.read(store.slide_ids[0], dtype="float16")
    f, c = got.features, got.coords
    assert cache.put(0, f, c, None, None) is False
    assert not list(folder.iterdir()) and cache.nbytes == 0 and len(cache) == 0
    monkeypatch.setattr(cache_mod.os, "replace", real_replace)
    assert cache.put(0, f, c, None, None) is True  # no claim left behind: it can be cached later
    assert torch.equal(cache.get(0).features, torch.from_numpy(f))
    cache.close()


@pytest.mark.parametrize("value", ["0", "-3", "two"])
def test_process_counts_must_be_positive(monkeypatch, value):
    monkeypatch.setenv("MOMKD_HOST_PROCESSES", value)
    with pytest.raises(ConfigError, match="MOMKD_HOST_PROCESSES"):
        cache_mod.host_processes()
