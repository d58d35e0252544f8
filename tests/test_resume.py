"""Checkpoints and resume: atomic weights_only checkpoints, RNG capture, early stopping, and a run
killed with SIGKILL that resumes to exactly the metrics of an uninterrupted run."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from momkd.errors import MomkdError
from momkd.train.checkpoint import (
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    to_safe,
)


def _draws() -> tuple[float, float, list[float]]:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_rng_state_round_trip_through_weights_only_checkpoint(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    _draws()
    np.random.randn()  # leave a cached gaussian in numpy's legacy state
    save_checkpoint(
        tmp_path / "c.pt", {"format": "momkd-checkpoint", "version": 1, "rng": capture_rng_state()}
    )
    expected = _draws()
    _draws()
    state = load_checkpoint(tmp_path / "c.pt")
    restore_rng_state(state["rng"])
    assert _draws() == expected
    # The file holds only weights_only-safe objects.
    torch.load(tmp_path / "c.pt", weights_only=True)


def test_to_safe_converts_numpy_and_rejects_objects() -> None:
    safe = to_safe(
        {
            "a": np.arange(3),
            "b": np.float32(1.5),
            "c": np.array(["x", "y"]),
            "d": (1, [np.int64(2)]),
        }
    )
    assert isinstance(safe["a"], torch.Tensor) and safe["a"].tolist() == [0, 1, 2]
    assert safe["b"] == 1.5 and isinstance(safe["b"], float)
    assert safe["c"] == ["x", "y"]
    assert safe["d"] == (1, [2])
    with pytest.raises(TypeError, match="object"):
        to_safe({"bad": object()})


def test_checkpoint_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"format": "momkd-checkpoint", "version": 1, "epoch": 1})

    def broken_save(obj: object, fh: object) -> None:
        fh.write(b"partial")  # type: ignore[attr-defined]
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"format": "momkd-checkpoint", "version": 1, "epoch": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_truncated_or_foreign_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "best.pt"
    save_checkpoint(path, {"format": "momkd-checkpoint", "version": 1, "x": torch.ones(100)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(MomkdError, match="best.pt"):
        load_checkpoint(path)
    torch.save({"weights": torch.ones(2)}, tmp_path / "other.pt")
    with pytest.raises(MomkdError, match="not a momkd checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(MomkdError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


# ----------------------------------------------------------------------------- kill and resume

CONFIG = """
data:
  store: cohort.zarr
  clinical: clinical.csv
  expression: expression.csv
  label_column: pr
  positive: [Positive]
  negative: [Negative]
  external: {store: external.zarr, clinical: external_clinical.csv}
splits: {k: 2, seed: 1}
genomics: {n_genes: 10}
model: {hidden: 12, omics_width: 8, omics_hidden: 8, sphere: 8, memory_k: 2,
        classifier_hidden: 6}
memory: {init_per_class: 300}
train: {epochs: 3, min_epochs: 3, patience: 3, deterministic: true, max_patches: 12}
"""


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "momkd.cli", *args]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["MOMKD_PROGRESS"] = "0"
    return env


def test_sigkill_mid_training_then_resume_gives_identical_metrics(tmp_path: Path) -> None:
    from momkd.synth import generate_cohort

    data = tmp_path / "data"
    generate_cohort(
        data, patients=24, external=6, dim=32, genes=30, patches=20, seed=4, progress=False
    )
    (data / "run.yaml").write_text(CONFIG)
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    config = str(data / "run.yaml")
    with open(tmp_path / "ref.log", "w") as log_ref, open(tmp_path / "killed.log", "w") as log_k:
        p_ref = subprocess.Popen(
            _cli("train", "--config", config, "--out", str(ref)),
            stdout=log_ref,
            stderr=subprocess.STDOUT,
            env=_env(),
        )
        p_kill = subprocess.Popen(
            _cli("train", "--config", config, "--out", str(killed)),
            stdout=log_k,
            stderr=subprocess.STDOUT,
            env=_env(),
        )
        try:
            # Kill the second run once fold 1 has finished an epoch: fold 0 is complete, fold 1
            # is not; the kill lands in the middle of fold 1's next epoch.
            marker = killed / "fold_1" / "history.json"
            deadline = time.monotonic() + 300
            while not marker.exists():
                assert p_kill.poll() is None, (tmp_path / "killed.log").read_text()
                assert time.monotonic() < deadline, "no epoch finished in time"
                time.sleep(0.05)
            p_kill.send_signal(signal.SIGKILL)
            p_kill.wait()
            assert p_ref.wait(timeout=600) == 0, (tmp_path / "ref.log").read_text()
        finally:
            for proc in (p_ref, p_kill):
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    assert not (killed / "summary.json").exists(), "the run finished before it was killed"
    assert not (killed / "fold_1" / "result.json").exists()
    fold0_mtime = (killed / "fold_0" / "result.json").stat().st_mtime_ns

    resumed = subprocess.run(
        _cli("train", "--config", config, "--out", str(killed), "--resume"),
        capture_output=True,
        text=True,
        env=_env(),
        timeout=600,
        check=False,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert (killed / "fold_0" / "result.json").stat().st_mtime_ns == fold0_mtime  # skipped

    a = json.loads((ref / "summary.json").read_text())
    b = json.loads((killed / "summary.json").read_text())
    for key in ("mean", "std", "external"):
        assert a[key] == b[key], key
    for fa, fb in zip(a["folds"], b["folds"], strict=True):
        for key in ("val", "test", "external", "threshold", "best_epoch", "epochs"):
            assert fa[key] == fb[key], key
    for k in (0, 1):
        for name in ("test_predictions.csv", "val_predictions.csv", "external_predictions.csv"):
            assert (ref / f"fold_{k}" / name).read_text() == (
                killed / f"fold_{k}" / name
            ).read_text()
        ha = json.loads((ref / f"fold_{k}" / "history.json").read_text())
        hb = json.loads((killed / f"fold_{k}" / "history.json").read_text())
        assert [h["train_loss"] for h in ha] == [h["train_loss"] for h in hb]
        assert [h["val_auc"] for h in ha] == [h["val_auc"] for h in hb]
        sa = torch.load(ref / f"fold_{k}" / "best.pt", weights_only=True)["model"]
        sb = torch.load(killed / f"fold_{k}" / "best.pt", weights_only=True)["model"]
        for name, tensor in sa.items():
            assert torch.equal(tensor, sb[name]), name
