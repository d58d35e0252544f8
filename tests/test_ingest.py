"""ingest: TRIDENT/CLAM .h5 and .pt folders into a cohort store; bad files; resume after a kill."""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import zarr
from momkd.cli import main
from momkd.data import CohortStore, ingest
from momkd.data.store import read_header
from momkd.errors import DataError, IngestError, StoreError

# `momkd.data.ingest` the attribute is the function; the module is reached through importlib
ingest_mod = importlib.import_module("momkd.data.ingest")

D = 8
SIZES = [30, 1, 75, 12, 140, 7, 64, 23]


def make_bag(rng: np.random.Generator, p: int, dim: int = D) -> tuple[np.ndarray, np.ndarray]:
    feats = rng.normal(size=(p, dim)).astype(np.float32)
    coords = (rng.integers(0, 500, size=(p, 2)) * 256).astype(np.int64)
    return feats, coords


def write_h5(
    path: Path, feats, coords, key: str = "features", leading: bool = False, **attrs
) -> None:
    with h5py.File(path, "w") as fh:
        fh.create_dataset(key, data=feats[None] if leading else feats)
        ds = fh.create_dataset("coords", data=coords[None] if leading else coords)
        for k, v in attrs.items():
            ds.attrs[k] = v


def trident_folder(root: Path, sizes=SIZES, seed: int = 0) -> tuple[Path, dict]:
    rng = np.random.default_rng(seed)
    src = root / "feats_h5"
    src.mkdir(parents=True)
    bags = {}
    for i, p in enumerate(sizes):
        sid = f"TCGA-{i:02d}-DX1"
        bags[sid] = make_bag(rng, p)
        write_h5(
            src / f"{sid}.h5",
            *bags[sid],
            leading=(i == 2),
            patch_size_level0=512,
            target_magnification=20,
        )
    return src, bags


def read_all(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    cs = CohortStore.open(path)
    return {sid: (cs.read(sid).features, cs.read(sid).coords) for sid in cs.slide_ids}


def assert_store_matches(path: Path, bags: dict, dtype: str = "float16") -> None:
    root = zarr.open_group(str(path), mode="r")
    ids = root.attrs["momkd"]["slide_ids"]
    assert ids == sorted(bags)
    off = root["offsets"][:]
    for i, sid in enumerate(ids):
        f, c = bags[sid]
        np.testing.assert_array_equal(root["features"][off[i] : off[i + 1]], f.astype(dtype))
        np.testing.assert_array_equal(root["coords"][off[i] : off[i + 1]], c)
    got = read_all(path)
    for sid, (f, c) in bags.items():
        np.testing.assert_array_equal(got[sid][0], f.astype(dtype).astype(np.float32))
        np.testing.assert_array_equal(got[sid][1], c)


@pytest.fixture(autouse=True)
def _fast_commits(monkeypatch):
    monkeypatch.setattr(ingest_mod, "COMMIT_INTERVAL_S", 0.0)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_ingest_trident_h5(tmp_path, dtype):
    src, bags = trident_folder(tmp_path)
    out = tmp_path / "c.zarr"
    summary = ingest(src, out, dtype=dtype, threads=2, chunk_rows=64, progress=False)
    assert_store_matches(out, bags, dtype)
    assert summary["slides_written"] == len(SIZES) == summary["slides_total"]
    assert summary["slides_skipped"] == 0 and summary["slides_resumed"] == 0
    assert summary["patches"] == sum(SIZES) == summary["patches_written"]
    assert summary["feature_dim"] == D and summary["dtype"] == dtype and summary["chunk_rows"] == 64
    on_disk = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert summary["bytes_on_disk"] == on_disk
    assert summary["seconds"] >= 0
    json.dumps(summary)
    header = read_header(out)
    assert header["complete"] is True and "ingest" not in header
    assert header["patch_size"] == 512 and header["magnification"] == 20
    prov = header["provenance"]
    assert prov["source"] == str(src.resolve()) and prov["created_by"].startswith("momkd")
    assert prov["key"] == "features" and prov["n_source_files"] == len(SIZES)


def test_key_fallback_and_feats_key(tmp_path):
    rng = np.random.default_rng(1)
    src = tmp_path / "src"
    src.mkdir()
    bags = {"a": make_bag(rng, 5), "b": make_bag(rng, 9)}
    write_h5(src / "a.h5", *bags["a"], key="feats")
    write_h5(src / "b.h5", *bags["b"], key="features")
    ingest(src, tmp_path / "x.zarr", key="features", progress=False)
    assert_store_matches(tmp_path / "x.zarr", bags)
    ingest(src, tmp_path / "y.zarr", key="feats", progress=False)
    assert_store_matches(tmp_path / "y.zarr", bags)


def test_clam_pt_files(tmp_path):
    rng = np.random.default_rng(2)
    root = tmp_path / "clam"
    (root / "pt_files").mkdir(parents=True)
    (root / "h5_files").mkdir()
    bags = {f"slide{i}": make_bag(rng, p) for i, p in enumerate([4, 20, 1])}
    for sid, (f, c) in bags.items():
        torch.save(torch.from_numpy(f), root / "pt_files" / f"{sid}.pt")
        write_h5(root / "h5_files" / f"{sid}.h5", f, c)
    ingest(root / "pt_files", tmp_path / "pt.zarr", progress=False)
    assert_store_matches(tmp_path / "pt.zarr", bags)
    # a CLAM output folder itself ingests its h5_files
    ingest(root, tmp_path / "root.zarr", progress=False)
    assert_store_matches(tmp_path / "root.zarr", bags)


def test_pt_dict_and_same_folder_sibling(tmp_path):
    rng = np.random.default_rng(3)
    src = tmp_path / "mixed"
    src.mkdir()
    bags = {"d": make_bag(rng, 6), "s": make_bag(rng, 3)}
    torch.save(
        {"features": torch.from_numpy(bags["d"][0]), "coords": torch.from_numpy(bags["d"][1])},
        src / "d.pt",
    )
    torch.save(torch.from_numpy(bags["s"][0])[None], src / "s.pt")
    with h5py.File(src / "s.h5", "w") as fh:  # coordinates only
        fh.create_dataset("coords", data=bags["s"][1])
    summary = ingest(src, tmp_path / "m.zarr", progress=False)
    assert summary["slides_written"] == 2
    assert_store_matches(tmp_path / "m.zarr", bags)


def test_pt_without_coords(tmp_path):
    src = tmp_path / "pt"
    src.mkdir()
    torch.save(torch.ones(3, D), src / "lonely.pt")
    with pytest.raises(IngestError, match="lonely.pt"):
        ingest(src, tmp_path / "o.zarr", progress=False)


# ------------------------------------------------------------------------------------ bad files


def _bad_folder(tmp_path: Path, bad_name: str, make_bad) -> tuple[Path, dict]:
    src, bags = trident_folder(tmp_path, sizes=[70, 80, 90, 10])
    make_bad(src / bad_name)
    return src, bags


def nan_file(path: Path) -> None:
    f, c = make_bag(np.random.default_rng(9), 12)
    f[7, 3] = np.nan
    write_h5(path, f, c)


def empty_file(path: Path) -> None:
    write_h5(path, np.zeros((0, D), np.float32), np.zeros((0, 2), np.int64))


def dim_file(path: Path) -> None:
    write_h5(path, *make_bag(np.random.default_rng(9), 4, dim=D + 1))


def shape_file(path: Path) -> None:
    write_h5(path, np.ones((2, 3, D), np.float32), np.zeros((3, 2), np.int64))


def missing_dataset(path: Path) -> None:
    with h5py.File(path, "w") as fh:
        fh.create_dataset("coords", data=np.zeros((3, 2), np.int64))


def garbage_file(path: Path) -> None:
    path.write_bytes(b"this is not an HDF5 file" * 10)


def missing_coords(path: Path) -> None:
    with h5py.File(path, "w") as fh:
        fh.create_dataset("features", data=np.ones((3, D), np.float32))


@pytest.mark.parametrize(
    ("maker", "exc", "pattern"),
    [
        (nan_file, DataError, "row 7"),
        (empty_file, DataError, "empty"),
        (dim_file, DataError, "dim"),
        (shape_file, DataError, "shape"),
        (missing_dataset, IngestError, "features"),
        (garbage_file, IngestError, "cannot read"),
        (missing_coords, IngestError, "coords"),
    ],
)
def test_bad_file_stops_names_file_and_stays_resumable(tmp_path, maker, exc, pattern):
    src, bags = _bad_folder(tmp_path, "TCGA-02-bad.h5", maker)
    out = tmp_path / "c.zarr"
    with pytest.raises(exc, match=pattern) as info:
        ingest(src, out, chunk_rows=64, progress=False, threads=2)
    assert "TCGA-02-bad.h5" in str(info.value)
    header = read_header(out)
    assert header["complete"] is False
    with pytest.raises(StoreError):
        CohortStore.open(out)
    # rerun with skip_bad: the bad file is logged and counted, the rest is written
    summary = ingest(src, out, chunk_rows=64, progress=False, skip_bad=True)
    assert summary["slides_skipped"] == 1
    assert "TCGA-02-bad.h5" in summary["skipped"][0]["file"]
    assert summary["slides_resumed"] + summary["slides_written"] == len(bags)
    assert_store_matches(out, bags)
    assert read_header(out)["provenance"]["skipped"][0]["file"].endswith("TCGA-02-bad.h5")


def test_bad_first_file_creates_nothing(tmp_path):
    src, _ = _bad_folder(tmp_path, "AAA-first.h5", nan_file)
    with pytest.raises(DataError, match="AAA-first.h5"):
        ingest(src, tmp_path / "c.zarr", progress=False)
    assert not (tmp_path / "c.zarr").exists()


def test_duplicate_stem(tmp_path):
    src, bags = trident_folder(tmp_path, sizes=[3, 4])
    write_h5(src / "TCGA-00-DX1.hdf5", *make_bag(np.random.default_rng(4), 5))
    with pytest.raises(IngestError, match="duplicate") as info:
        ingest(src, tmp_path / "c.zarr", progress=False)
    assert "TCGA-00-DX1.hdf5" in str(info.value)
    summary = ingest(src, tmp_path / "c.zarr", progress=False, skip_bad=True)
    assert summary["slides_skipped"] == 1 and summary["slides_total"] == 2
    assert_store_matches(tmp_path / "c.zarr", bags)


def test_unsafe_stem_is_bad_file(tmp_path):
    src, _bags = trident_folder(tmp_path, sizes=[3])
    write_h5(src / "bad\\name.h5", *make_bag(np.random.default_rng(4), 5))
    with pytest.raises(DataError, match="unsafe"):
        ingest(src, tmp_path / "c.zarr", progress=False)


def test_empty_source_and_not_a_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(IngestError, match="no .h5"):
        ingest(tmp_path / "empty", tmp_path / "c.zarr", progress=False)
    with pytest.raises(IngestError, match="not a directory"):
        ingest(tmp_path / "nope", tmp_path / "c.zarr", progress=False)


def test_complete_output_exists(tmp_path):
    src, bags = trident_folder(tmp_path, sizes=[3, 4])
    out = tmp_path / "c.zarr"
    ingest(src, out, progress=False)
    with pytest.raises(IngestError, match="already exists"):
        ingest(src, out, progress=False)
    summary = ingest(src, out, progress=False, overwrite=True, dtype="float32")
    assert summary["slides_written"] == 2
    assert_store_matches(out, bags, "float32")


# ------------------------------------------------------------------------------------- resuming


def _interrupt_with_failing_reader(monkeypatch, src, out, fail_on: str, **kw) -> None:
    real = ingest_mod.read_source

    def failing(source, key="features", **kw):
        if source.slide_id == fail_on:
            raise IngestError(f"{source.path}: simulated read failure")
        return real(source, key, **kw)

    monkeypatch.setattr(ingest_mod, "read_source", failing)
    with pytest.raises(IngestError, match="simulated"):
        ingest(src, out, **{"chunk_rows": 64, "threads": 1, "progress": False, **kw})
    monkeypatch.setattr(ingest_mod, "read_source", real)


def _record_reads(monkeypatch) -> list[str]:
    seen: list[str] = []
    real = ingest_mod.read_source

    def recording(source, key="features", **kw):
        seen.append(source.slide_id)
        return real(source, key, **kw)

    monkeypatch.setattr(ingest_mod, "read_source", recording)
    return seen


def test_resume_after_failure_equals_uninterrupted(tmp_path, monkeypatch):
    src, bags = trident_folder(tmp_path)
    ref = tmp_path / "ref.zarr"
    ingest(src, ref, chunk_rows=64, progress=False)
    out = tmp_path / "c.zarr"
    _interrupt_with_failing_reader(monkeypatch, src, out, fail_on="TCGA-06-DX1")
    header = read_header(out)
    committed = header["slide_ids"]
    assert header["complete"] is False and len(committed) >= 3

    seen = _record_reads(monkeypatch)
    summary = ingest(src, out, chunk_rows=64, progress=False)
    assert not set(seen) & set(committed), "finished slides were read again"
    assert summary["slides_resumed"] == len(committed)
    assert summary["slides_written"] == len(bags) - len(committed)
    assert_store_matches(out, bags)
    for name in ("features", "coords", "offsets"):
        a = zarr.open_array(str(ref / name), mode="r")[:]
        b = zarr.open_array(str(out / name), mode="r")[:]
        np.testing.assert_array_equal(a, b)


def test_resume_refuses_other_sources_or_settings(tmp_path, monkeypatch):
    src, _ = trident_folder(tmp_path)
    out = tmp_path / "c.zarr"
    _interrupt_with_failing_reader(monkeypatch, src, out, fail_on="TCGA-05-DX1")
    with pytest.raises(IngestError, match="other source files or settings"):
        ingest(src, out, dtype="float32", chunk_rows=64, progress=False)
    with pytest.raises(IngestError, match="chunk_rows"):
        ingest(src, out, chunk_rows=128, progress=False)
    write_h5(src / "ZZZ-new.h5", *make_bag(np.random.default_rng(5), 4))
    with pytest.raises(IngestError, match="other source files"):
        ingest(src, out, chunk_rows=64, progress=False)
    summary = ingest(src, out, chunk_rows=64, progress=False, overwrite=True)
    assert summary["slides_resumed"] == 0 and summary["slides_total"] == len(SIZES) + 1


def test_resumed_ingest_has_the_header_of_an_uninterrupted_one(tmp_path, monkeypatch):
    src, _ = trident_folder(tmp_path)
    ref = tmp_path / "ref.zarr"
    ingest(src, ref, chunk_rows=64, progress=False)
    out = tmp_path / "c.zarr"
    _interrupt_with_failing_reader(monkeypatch, src, out, fail_on="TCGA-05-DX1")
    ingest(src, out, chunk_rows=64, progress=False)
    want, got = read_header(ref), read_header(out)
    # The coordinate attributes of the first file (trident_folder writes them on every file).
    attrs = {"patch_size_level0": 512, "target_magnification": 20}
    assert want["provenance"]["source_attrs"] == got["provenance"]["source_attrs"] == attrs
    assert want["patch_size"] == got["patch_size"] == 512
    for header in (want, got):
        del header["provenance"]["created"]  # the time each ingest finished
    assert got == want


def test_resume_removes_the_temporary_files_of_the_interrupted_write(tmp_path, monkeypatch):
    """A writer killed while zarr-python writes a file leaves its `.partial` temporary (zarr's
    local store writes `<name>.<32 hex digits>.partial`, then renames it), and one killed while
    replacing the header leaves `zarr.json.<pid>.tmp`. A completed resume leaves none of them."""
    src, bags = trident_folder(tmp_path)
    out = tmp_path / "c.zarr"
    _interrupt_with_failing_reader(monkeypatch, src, out, fail_on="TCGA-05-DX1")
    hexes = iter(f"{i:032x}" for i in range(1, 10))
    planted = [
        out / "features" / "c" / "0" / f"0.{next(hexes)}.partial",
        out / "features" / "c" / "9" / f"0.{next(hexes)}.partial",  # beyond the committed rows
        out / "coords" / "c" / "1" / f"0.{next(hexes)}.partial",
        out / "offsets" / "c" / f"0.{next(hexes)}.partial",
        out / "features" / f"zarr.{next(hexes)}.partial",
        out / "zarr.json.4242.tmp",
    ]
    for i, p in enumerate(planted):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x" * (7 * i))  # the first one empty, as a kill right after open leaves it
    summary = ingest(src, out, chunk_rows=64, progress=False)
    assert summary["slides_resumed"] >= 3
    assert_store_matches(out, bags)
    leftovers = [p for p in out.rglob("*") if p.name.endswith((".partial", ".tmp"))]
    assert leftovers == []


def test_resume_refuses_another_shard_size(tmp_path, monkeypatch, capsys):
    src, bags = trident_folder(tmp_path)
    # D = 8 float16 is 16 B a row: 0.002 MiB is 131 rows, 2 chunks of 64 = 128 rows a shard.
    ref = tmp_path / "ref.zarr"
    ingest(src, ref, chunk_rows=64, shard_mb=0.002, progress=False)
    out = tmp_path / "c.zarr"
    _interrupt_with_failing_reader(monkeypatch, src, out, fail_on="TCGA-06-DX1", shard_mb=0.002)
    state = read_header(out)["ingest"]
    assert state["shard_rows"] == 128 and state["slides_done"] >= 3
    with pytest.raises(IngestError, match=r"shards of 128 rows; .*shards of 256 rows"):
        ingest(src, out, chunk_rows=64, shard_mb=0.004, progress=False)
    with pytest.raises(IngestError, match=r"shards of 128 rows; .*unsharded store \(no --shard"):
        ingest(src, out, chunk_rows=64, progress=False)
    cli = ["ingest", str(src), str(out), "-q", "--chunk-rows", "64"]
    assert main([*cli, "--shard-mb", "0.004"]) == 2
    assert "--shard-mb 0.004" in capsys.readouterr().err
    assert read_header(out)["ingest"] == state  # the refusals changed nothing
    # Another size that rounds to the same shard resumes it.
    summary = ingest(src, out, chunk_rows=64, shard_mb=0.0021, progress=False)
    assert summary["slides_resumed"] == state["slides_done"]
    assert CohortStore.open(out).shard_rows == 128
    assert_store_matches(out, bags)
    for name in ("features", "coords", "offsets"):
        np.testing.assert_array_equal(
            zarr.open_array(str(ref / name), mode="r")[:],
            zarr.open_array(str(out / name), mode="r")[:],
        )
    # An interrupted unsharded ingest is not resumed sharded either.
    plain = tmp_path / "plain.zarr"
    _interrupt_with_failing_reader(monkeypatch, src, plain, fail_on="TCGA-06-DX1")
    with pytest.raises(IngestError, match=r"an unsharded store; .*shards of 128 rows"):
        ingest(src, plain, chunk_rows=64, shard_mb=0.002, progress=False)


_CHILD = textwrap.dedent(
    """
    import importlib, sys, time
    m = importlib.import_module("momkd.data.ingest")
    real = m.read_source
    def slow(source, key="features", **kw):
        time.sleep(0.15)
        return real(source, key, **kw)
    m.read_source = slow
    m.COMMIT_INTERVAL_S = 0.0
    m.ingest(sys.argv[1], sys.argv[2], chunk_rows=16, threads=1, progress=False)
    """
)


def test_sigkill_then_rerun(tmp_path, monkeypatch):
    sizes = [20, 3, 17, 40, 5, 33, 16, 9, 50, 2, 21, 12]
    src, bags = trident_folder(tmp_path, sizes=sizes, seed=8)
    out = tmp_path / "killed.zarr"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(src), str(out)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    committed: list[str] = []
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            try:
                header = read_header(out)
                committed = header["slide_ids"]
            except (StoreError, KeyError, json.JSONDecodeError):
                committed = []
            if len(committed) >= 3:
                break
            time.sleep(0.02)
        assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    header = read_header(out)
    assert header["complete"] is False
    committed = header["slide_ids"]
    assert 3 <= len(committed) < len(sizes)
    with pytest.raises(StoreError):
        CohortStore.open(out)

    seen = _record_reads(monkeypatch)
    summary = ingest(src, out, chunk_rows=16, threads=2, progress=False)
    assert not set(seen) & set(committed)
    assert summary["slides_resumed"] == len(committed)
    assert_store_matches(out, bags)
    ref = tmp_path / "ref.zarr"
    ingest(src, ref, chunk_rows=16, progress=False)
    for name in ("features", "coords", "offsets"):
        np.testing.assert_array_equal(
            zarr.open_array(str(ref / name), mode="r")[:],
            zarr.open_array(str(out / name), mode="r")[:],
        )
    assert [p for p in out.rglob("*") if p.name.endswith((".partial", ".tmp"))] == []
