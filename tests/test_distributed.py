"""Data-parallel training under torchrun (gloo, 2 CPU processes, small shapes).

The oracle of the end-to-end tests is the single-process run: W ranks x batch 1 must train the same
model as one process x batch W (same bags per step, same averaged gradient), so parameters, memories,
predictions and metrics agree to float tolerance. Runs are bounded by timeouts; the multi-process
tests are marked slow (each torchrun launch starts three Python processes that import torch).
"""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from momkd.train.distributed import Dist, shard, state_checksums, unshard
from momkd.train.sampler import ClassBalancedSampler

WORKER = Path(__file__).with_name("dist_worker.py")
TIMEOUT = 420

CONFIG = """
data:
  store: cohort.zarr
  clinical: clinical.csv
  expression: expression.csv
  label_column: pr
  positive: [Positive]
  negative: [Negative]
  external: {{store: external.zarr, clinical: external_clinical.csv}}
  standardize: {standardize}
splits: {{k: 2, dir: splits}}
genomics: {{n_genes: 10}}
model: {{hidden: 12, omics_width: 8, omics_hidden: 8, sphere: 8, memory_k: 2,
        classifier_hidden: 6, dropout: 0.0, omics_dropout: 0.0, attn_dropout: 0.0}}
memory: {{init_per_class: 60, update: {update}, dead_after: 2}}
train: {{epochs: {epochs}, min_epochs: {epochs}, patience: 5, deterministic: true, max_patches: 12,
        batch_size: {batch}, folds: [0], dist_timeout_s: 120}}
"""


# ------------------------------------------------------------------------------ sampler rules


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("n", [12, 13])
def test_sampler_shards_union_is_the_single_process_draw(world: int, batch: int, n: int) -> None:
    labels = [0] * 4 + [1] * (n - 4)
    single = ClassBalancedSampler(labels, seed=7).indices(3)
    shards = [
        ClassBalancedSampler(labels, seed=7, rank=r, world_size=world).indices(3)
        for r in range(world)
    ]
    # Every rank gets the same number of draws: the draw is padded by wrapping around.
    per_rank = -(-n // world)
    assert all(len(s) == per_rank for s in shards)
    padded = single + single[: per_rank * world - n]
    # Interleaving the shards (rank r takes draws r, r + W, ...) gives the global draw back ...
    assert unshard(shards, per_rank * world) == padded
    # ... and step k of the ranks (batch B each) is step k of one process with batch B * W.
    steps = -(-per_rank // batch)
    for k in range(steps):
        union = sorted(i for s in shards for i in s[k * batch : (k + 1) * batch])
        assert union == sorted(padded[k * batch * world : (k + 1) * batch * world])


def test_shard_unshard_round_trip() -> None:
    items = list(range(11))
    for w in (1, 2, 3, 4):
        parts = [shard(items, Dist(rank=r, world_size=w)) for r in range(w)]
        assert unshard(parts, len(items)) == items


def test_state_checksum_sees_one_bit() -> None:
    m = torch.nn.Linear(4, 3)
    names, a = state_checksums(m)
    with torch.no_grad():
        w = m.weight.view(-1).view(torch.int32)
        w[5] ^= 1  # flip the lowest mantissa bit of one weight
    _, b = state_checksums(m)
    assert names == ["weight", "bias"]
    assert a[0] != b[0] and a[1] == b[1]


# ------------------------------------------------------------------------------- end to end


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MOMKD_PROGRESS": "0", "PYTHONUNBUFFERED": "1"})
    # The worker script imports momkd from wherever the tests import it.
    import momkd

    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(momkd.__file__).parents[1]), env.get("PYTHONPATH", "")]
    )
    return env


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


def _standalone(side: Path, *momkd_args: str) -> list[str]:
    return _torchrun(
        "--standalone", "--nproc_per_node", "2", "--monitor-interval", "0.1", str(WORKER),
        str(side), *momkd_args,
    )  # fmt: skip


def _write_splits(data: Path) -> None:
    """Patient-level splits with an even number of training slides (12) and both classes in every
    part, so that 2 ranks x batch 1 and 1 process x batch 2 see the same epochs."""
    rows = [
        r
        for r in csv.DictReader(open(data / "clinical.csv", encoding="utf-8"))
        if r["pr"] in ("Positive", "Negative")
    ]
    slides: dict[str, list[str]] = defaultdict(list)
    label: dict[str, str] = {}
    for r in rows:
        slides[r["case_id"]].append(r["slide_id"])
        label[r["case_id"]] = r["pr"]
    parts: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    negs = [c for c in sorted(slides) if label[c] == "Negative"]
    poss = [c for c in sorted(slides) if label[c] == "Positive"]
    for i, c in enumerate(negs):
        parts["train" if i < 3 else "val" if i < 5 else "test"].extend(slides[c])
    for c in poss:
        target = "train" if len(parts["train"]) < 12 else "val" if len(parts["val"]) < 6 else "test"
        if target == "train" and len(parts["train"]) + len(slides[c]) > 12:
            target = "val"
        parts[target].extend(slides[c])
    assert len(parts["train"]) == 12
    (data / "splits").mkdir()
    for k in (0, 1):
        n = max(len(v) for v in parts.values())
        with open(data / "splits" / f"splits_{k}.csv", "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["train", "val", "test"])
            for i in range(n):
                w.writerow([parts[p][i] if i < len(parts[p]) else "" for p in parts])


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from momkd.synth import generate_cohort

    data = tmp_path_factory.mktemp("ddp") / "data"
    generate_cohort(
        data, patients=32, external=6, dim=32, genes=30, patches=16, seed=4, progress=False
    )
    _write_splits(data)
    for update in ("gradient", "momentum"):
        for batch in (1, 2):
            (data / f"{update}_b{batch}.yaml").write_text(
                CONFIG.format(
                    update=update,
                    batch=batch,
                    epochs=3,
                    # momentum runs also fit the feature statistics over the ranks' shares
                    standardize="train" if update == "momentum" else "none",
                )
            )
    return data


def _run(cmd: list[str], log: Path, timeout: float = TIMEOUT) -> int:
    with open(log, "w") as fh:
        try:
            return subprocess.run(
                cmd, stdout=fh, stderr=subprocess.STDOUT, env=_env(), timeout=timeout, check=False
            ).returncode
        except subprocess.TimeoutExpired:
            pytest.fail(f"{cmd[:6]} did not finish in {timeout} s:\n{log.read_text()[-3000:]}")


def _ddp(cohort: Path, update: str) -> tuple[Path, Path]:
    """(run_dir, side) of 2 ranks x batch 1, launched once per module and mode."""
    root = cohort.parent / f"ddp_{update}"
    run, side = root / "run", root / "side"
    if not (run / "summary.json").exists():
        root.mkdir(exist_ok=True)
        cmd = _standalone(
            side, "train", "--config", str(cohort / f"{update}_b1.yaml"), "--out", str(run)
        )
        rc = _run(cmd, root / "log.txt")
        assert rc == 0, (root / "log.txt").read_text()[-4000:]
    return run, side


def _single(cohort: Path, update: str) -> Path:
    """One process x batch 2, in this process."""
    from momkd.train.runner import train

    run = cohort.parent / f"single_{update}"
    if not (run / "summary.json").exists():
        train(cohort / f"{update}_b2.yaml", out_dir=run, progress=False)
    return run


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
@pytest.mark.parametrize("update", ["gradient", "momentum"])
def test_two_ranks_batch_one_equal_one_process_batch_two(cohort: Path, update: str) -> None:
    ddp, side = _ddp(cohort, update)
    single = _single(cohort, update)
    # Parameters and memories after the last epoch (3 epochs of 6 steps).
    a = torch.load(single / "fold_0" / "last.pt", weights_only=True)["model"]
    b = torch.load(ddp / "fold_0" / "last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-6, rtol=0, msg=name)
    assert any(k.startswith("memory.") for k in a)
    # Same training losses epoch by epoch (the ranks' losses averaged).
    ha = json.loads((single / "fold_0" / "history.json").read_text())
    hb = json.loads((ddp / "fold_0" / "history.json").read_text())
    np.testing.assert_allclose(
        [h["train_loss"] for h in hb], [h["train_loss"] for h in ha], rtol=1e-5
    )
    assert [h["steps"] for h in ha] == [h["steps"] for h in hb] == [6, 6, 6]
    # Sharded inference gathered in slide order: same rows, same probabilities.
    for name in ("val_predictions.csv", "test_predictions.csv", "external_predictions.csv"):
        pa, pb = _csv(single / "fold_0" / name), _csv(ddp / "fold_0" / name)
        assert [r["slide_id"] for r in pa] == [r["slide_id"] for r in pb], name
        np.testing.assert_allclose(
            [float(r["prob"]) for r in pb], [float(r["prob"]) for r in pa], atol=1e-6
        )
    ra = json.loads((single / "fold_0" / "result.json").read_text())
    rb = json.loads((ddp / "fold_0" / "result.json").read_text())
    assert ra["best_epoch"] == rb["best_epoch"]
    for part in ("val", "test", "external"):
        for key, value in ra[part].items():
            if value is None:
                assert rb[part][key] is None
            else:
                assert rb[part][key] == pytest.approx(value, abs=1e-6), (part, key)


@pytest.mark.slow
@pytest.mark.parametrize("update", ["gradient", "momentum"])
def test_ranks_hold_bit_identical_models_and_only_rank0_writes(cohort: Path, update: str) -> None:
    run, side = _ddp(cohort, update)
    s0 = torch.load(side / "rank0_fold0.pt", weights_only=True)
    s1 = torch.load(side / "rank1_fold0.pt", weights_only=True)
    for name in s0:
        assert torch.equal(s0[name], s1[name]), name
    if update == "momentum":  # the memory moved away from its k-means initialisation
        assert int(s0["memory.recent_count"].sum()) > 0
    # Rank 1 opened nothing for writing below the run directory, while rank 0 wrote it all.
    assert json.loads((side / "writes_rank1.json").read_text()) == []
    assert (run / "fold_0" / "best.pt").is_file() and (run / "summary.json").is_file()
    assert (run / "report.html").is_file()


@pytest.mark.slow
def test_two_ranks_share_one_host_cache(cohort: Path) -> None:
    plain, _ = _ddp(cohort, "gradient")
    root = cohort.parent / "ddp_shared_cache"
    run, side = root / "run", root / "side"
    root.mkdir()
    config = str(cohort / "gradient_b1.yaml")
    cmd = _standalone(
        side, "train", "--config", config, "--out", str(run), "--set", "data.cache=host"
    )  # fmt: skip
    rc = _run(cmd, root / "log.txt")
    assert rc == 0, (root / "log.txt").read_text()[-4000:]
    # The same training as without the cache.
    a = torch.load(plain / "fold_0" / "last.pt", weights_only=True)["model"]
    b = torch.load(run / "fold_0" / "last.pt", weights_only=True)["model"]
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # Both ranks used one shared cache; every bag in it was written by exactly one rank.
    info = [json.loads((side / f"cache_rank{r}_fold0.json").read_text()) for r in (0, 1)]
    assert [i["type"] for i in info] == ["SharedHostCache"] * 2
    assert info[0]["directory"] == info[1]["directory"]
    written = [set(i["written"]) for i in info]
    assert written[0] and written[1] and not written[0] & written[1]
    assert set(info[0]["bags"]) | set(info[1]["bags"]) == written[0] | written[1]
    # Each rank holds bags the other one read (it mapped them instead of reading the store).
    assert set(info[0]["bags"]) - written[0] and set(info[1]["bags"]) - written[1]
    # The ranks removed their files when they ended.
    assert not Path(info[0]["directory"]).exists()


@pytest.mark.slow
def test_two_node_rendezvous_on_loopback(cohort: Path) -> None:
    ref, _ = _ddp(cohort, "gradient")
    root = cohort.parent / "two_nodes"
    run = root / "run"
    port = _free_port()
    procs = []
    root.mkdir()
    for node in (0, 1):
        cmd = _torchrun(
            "--nnodes", "2", "--node_rank", str(node), "--nproc_per_node", "1",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
            "--rdzv-id", "momkd-test", "--local-addr", "127.0.0.1", str(WORKER),
            str(root / f"side{node}"), "train", "--config", str(cohort / "gradient_b1.yaml"),
            "--out", str(run),
        )  # fmt: skip
        log = open(root / f"node{node}.log", "w")
        procs.append(
            subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(), cwd=root)
        )
    try:
        for node, p in enumerate(procs):
            assert p.wait(timeout=TIMEOUT) == 0, (root / f"node{node}.log").read_text()[-4000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    a = json.loads((ref / "summary.json").read_text())
    b = json.loads((run / "summary.json").read_text())
    assert a["folds"][0]["test"] == b["folds"][0]["test"]
    assert json.loads((root / "side1" / "writes_rank1.json").read_text()) == []


@pytest.mark.slow
def test_kill_one_rank_then_resume_matches_uninterrupted(cohort: Path) -> None:
    ref, _ = _ddp(cohort, "gradient")
    root = cohort.parent / "killed"
    run, side = root / "run", root / "side"
    root.mkdir()
    cmd = _standalone(
        side, "train", "--config", str(cohort / "gradient_b1.yaml"), "--out", str(run)
    )
    with open(root / "log1.txt", "w") as log:
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env())
        try:
            marker = run / "fold_0" / "history.json"
            deadline = time.monotonic() + TIMEOUT
            while not marker.exists():
                assert p.poll() is None, (root / "log1.txt").read_text()[-4000:]
                assert time.monotonic() < deadline, "no epoch finished in time"
                time.sleep(0.05)
            os.kill(int((side / "pid_rank1").read_text()), signal.SIGKILL)
            rc = p.wait(timeout=120)  # torchrun stops rank 0 and fails
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert rc != 0
    assert not (run / "fold_0" / "result.json").exists(), "the fold finished before the kill"
    resume = _standalone(
        side, "train", "--config", str(cohort / "gradient_b1.yaml"), "--out", str(run), "--resume"
    )
    assert _run(resume, root / "log2.txt") == 0, (root / "log2.txt").read_text()[-4000:]
    a = json.loads((ref / "summary.json").read_text())
    b = json.loads((run / "summary.json").read_text())
    for key in ("val", "test", "external", "best_epoch", "threshold"):
        assert a["folds"][0][key] == b["folds"][0][key], key
    ha = json.loads((ref / "fold_0" / "history.json").read_text())
    hb = json.loads((run / "fold_0" / "history.json").read_text())
    assert [h["train_loss"] for h in ha] == [h["train_loss"] for h in hb]
    sa = torch.load(ref / "fold_0" / "best.pt", weights_only=True)["model"]
    sb = torch.load(run / "fold_0" / "best.pt", weights_only=True)["model"]
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


@pytest.mark.slow
def test_bad_chunk_on_one_rank_stops_every_rank(cohort: Path, tmp_path: Path) -> None:
    from momkd.data.store import CohortStore
    from momkd.data.store_writer import StoreWriter

    data = tmp_path / "data"
    data.mkdir()
    for name in ("clinical.csv", "expression.csv", "external.zarr", "external_clinical.csv"):
        os.symlink(cohort / name, data / name)
    os.symlink(cohort / "splits", data / "splits")
    # The cohort again with 8-row chunks, so that one chunk holds one or two slides.
    src = CohortStore.open(cohort / "cohort.zarr")
    with StoreWriter(data / "cohort.zarr", src.feature_dim, chunk_rows=8) as w:
        for s in src.slide_ids:
            bag = src.read(s)
            w.append(s, bag.features, bag.coords)
    # data.standardize: train reads every training slide once, each rank its share: the rank
    # whose share holds the victim meets the bad chunk while the other rank is healthy.
    split = _csv(cohort / "splits" / "splits_0.csv")
    victim = [r["train"] for r in split if r["train"]][5]
    store = CohortStore.open(data / "cohort.zarr")
    row = int(store.offsets[store.index_of(victim)])
    chunk = data / "cohort.zarr" / "features" / "c" / str(row // 8) / "0"
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0x5A
    chunk.write_bytes(bytes(raw))
    (data / "run.yaml").write_text(
        CONFIG.format(update="gradient", batch=1, epochs=2, standardize="train").replace(
            "dist_timeout_s: 120", "dist_timeout_s: 60"
        )
    )
    side, run = tmp_path / "side", tmp_path / "run"
    t0 = time.monotonic()
    proc = subprocess.run(
        _standalone(side, "train", "--config", str(data / "run.yaml"), "--out", str(run)),
        capture_output=True,
        text=True,
        env=_env(),
        timeout=TIMEOUT,
        check=False,
    )
    elapsed = time.monotonic() - t0
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    errors = [line for line in out.splitlines() if line.startswith("momkd train: error:")]
    # The rank that met the chunk names slide and chunk in one line and exits with 2 ...
    assert sum(victim in line and "chunk" in line for line in errors) == 1, out[-4000:]
    # The other rank, if torchrun has not stopped it first, says in one line that a peer stopped.
    assert len(errors) <= 2
    assert all(victim in line or "another rank stopped" in line for line in errors)
    assert "exitcode  : 2" in out
    # ... no Python traceback through momkd, and the other rank did not wait for the timeout.
    frames = [ln for ln in out.splitlines() if ln.strip().startswith("File ")]
    assert not [ln for ln in frames if "momkd" in ln and "torch" not in ln], out[-4000:]
    assert elapsed < 60 + 60
