"""The rough edges a new user meets: file modes, torch threads, --set paths, ingest without
coordinates, summary columns, decoded sizes, label case, count bounds and --overwrite wording."""

from __future__ import annotations

import logging
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import zarr
from momkd import cli
from momkd._io import atomic_open, atomic_write_text, current_umask, write_csv, write_json
from momkd._threads import available_cores, set_torch_threads
from momkd.config import RunConfig, load_config, save_config
from momkd.data import BagLoader, CohortStore, ingest
from momkd.data.clinical import load_clinical
from momkd.data.info import describe
from momkd.data.store_writer import StoreWriter
from momkd.errors import ConfigError, IngestError
from momkd.train.checkpoint import save_checkpoint
from momkd.train.evaluate import format_eval
from momkd.train.summary import format_summary

# ------------------------------------------------------------------------------------ file modes


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_current_umask_reads_the_process_mask(umask_022: None) -> None:
    assert current_umask() == 0o022
    os.umask(0o027)
    assert current_umask() == 0o027


def test_written_files_honour_the_umask(tmp_path: Path, umask_022: None) -> None:
    # What a plain open() creates under the same umask is the oracle (0o644 under 022).
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert _mode(plain) == 0o644
    written = {
        "text": atomic_write_text(tmp_path / "a.txt", "hello\n"),
        "config.yaml": save_config(RunConfig(), tmp_path / "config.yaml"),
    }
    with atomic_open(tmp_path / "table.csv") as fh:
        fh.write("a,b\n")
    written["table.csv"] = tmp_path / "table.csv"
    write_json(tmp_path / "summary.json", {"auc": 0.5})
    written["summary.json"] = tmp_path / "summary.json"
    write_csv(tmp_path / "predictions.csv", ["slide_id", "prob"], [["s1", 0.25]])
    written["predictions.csv"] = tmp_path / "predictions.csv"
    save_checkpoint(tmp_path / "best.pt", {"model": {"w": torch.zeros(2)}})
    written["best.pt"] = tmp_path / "best.pt"
    for name, path in written.items():
        assert _mode(path) == 0o644, (name, oct(_mode(path)))
    # a stricter umask gives stricter modes: the mask is honoured, not a fixed 0644
    os.umask(0o077)
    save_checkpoint(tmp_path / "last.pt", {"model": {"w": torch.zeros(2)}})
    assert _mode(tmp_path / "last.pt") == 0o600


def test_synth_tables_honour_the_umask(tmp_path: Path, umask_022: None) -> None:
    from momkd.synth import generate_cohort

    generate_cohort(
        tmp_path / "c", patients=8, external=0, dim=32, genes=20, patches=5, seed=1, progress=False
    )
    tables = [p for p in (tmp_path / "c").iterdir() if p.suffix in (".csv", ".json")]
    assert tables
    for path in tables:
        assert _mode(path) == 0o644, (path.name, oct(_mode(path)))


# --------------------------------------------------------------------------------- torch threads


@pytest.fixture
def restore_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(before)


def test_set_torch_threads(restore_threads: None) -> None:
    assert set_torch_threads(1) == 1 == torch.get_num_threads()
    assert set_torch_threads(None) == len(os.sched_getaffinity(0)) == available_cores()
    for bad in (0, -2, True, 1.5):
        with pytest.raises(ConfigError, match="train.torch_threads: must be an integer >= 1"):
            set_torch_threads(bad)  # type: ignore[arg-type]


def test_train_command_sets_torch_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restore_threads: None
) -> None:
    import momkd.train.runner as runner

    seen: list[int] = []

    def fake_train(cfg: RunConfig, out_dir: object = None, resume: bool = False) -> dict:
        seen.append(torch.get_num_threads())
        return {"method": cfg.model.method, "folds": []}

    monkeypatch.setattr(runner, "train", fake_train)
    config = tmp_path / "run.yaml"
    config.write_text("train: {epochs: 1, min_epochs: 1}\n")
    torch.set_num_threads(2)
    assert cli.main(["train", "--config", str(config), "--set", "train.torch_threads=1"]) == 0
    torch.set_num_threads(1)
    assert cli.main(["train", "--config", str(config)]) == 0
    assert seen == [1, available_cores()]
    assert load_config(config).train.torch_threads is None  # the default: all cores


def test_predict_command_uses_the_runs_torch_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restore_threads: None
) -> None:
    import momkd.train.evaluate as evaluate

    seen: list[int] = []

    def fake_predict(source: object, store: object, out: object, slides: object) -> int:
        seen.append(torch.get_num_threads())
        return 0

    monkeypatch.setattr(evaluate, "predict", fake_predict)
    run = tmp_path / "run"
    cfg = load_config(None, ["train.torch_threads=1"])
    save_config(cfg, run / "config.yaml")
    torch.set_num_threads(2)
    args = ["predict", str(run), "--store", "x.zarr", "--out", str(tmp_path / "p.csv")]
    assert cli.main(args) == 0
    assert cli.main([*args, "--torch-threads", "2"]) == 0
    assert seen == [1, 2]


# --------------------------------------------------------------------------------- --set paths


def test_set_paths_resolve_against_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf_dir, work = tmp_path / "conf", tmp_path / "work"
    conf_dir.mkdir()
    work.mkdir()
    (conf_dir / "run.yaml").write_text("data:\n  store: s.zarr\n  clinical: c.csv\n")
    monkeypatch.chdir(work)
    cfg = load_config(conf_dir / "run.yaml", ["data.store=x.zarr"])
    assert cfg.data.store == work / "x.zarr"  # from --set: the working directory
    assert cfg.data.clinical == conf_dir / "c.csv"  # from the file: the file's folder
    assert cfg.origin("data.store") == "--set data.store=x.zarr"
    assert cfg.origin("data.clinical") == str((conf_dir / "run.yaml").resolve())
    with pytest.raises(ConfigError) as err:
        cfg.require_inputs()
    assert str(err.value) == f"--set data.store=x.zarr: data.store: not found: {work / 'x.zarr'}"
    # a key set in the file is reported against the file
    (work / "x.zarr").mkdir()
    with pytest.raises(ConfigError, match=r"run\.yaml: data\.clinical: not found"):
        cfg.require_inputs()


def test_set_path_error_through_the_cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "run.yaml").write_text("train: {epochs: 1, min_epochs: 1}\n")
    monkeypatch.chdir(tmp_path)
    args = ["train", "--config", "run.yaml", "--out", "run", "--set", "data.store=missing.zarr"]
    code = cli.main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == (
        "momkd train: error: --set data.store=missing.zarr: data.store: not found: "
        f"{tmp_path / 'missing.zarr'}"
    )


# ------------------------------------------------------------------------- ingest without coords


def _h5(path: Path, feats: np.ndarray, coords: np.ndarray | None) -> None:
    with h5py.File(path, "w") as fh:
        fh.create_dataset("features", data=feats)
        if coords is not None:
            fh.create_dataset("coords", data=coords)


def _no_coords_folder(root: Path) -> tuple[Path, dict[str, np.ndarray]]:
    rng = np.random.default_rng(3)
    src = root / "h5"
    src.mkdir()
    feats = {
        sid: rng.normal(size=(p, 4)).astype(np.float32) for sid, p in (("a", 7), ("b", 5), ("c", 1))
    }
    _h5(src / "a.h5", feats["a"], None)
    _h5(src / "b.h5", feats["b"], np.array([[0, 0], [256, 0], [0, 256], [256, 256], [512, 0]]))
    _h5(src / "c.h5", feats["c"], None)
    return src, feats


def test_ingest_without_coords_needs_the_flag(tmp_path: Path) -> None:
    src, _ = _no_coords_folder(tmp_path)
    with pytest.raises(IngestError, match=r"a\.h5: no 'coords' dataset \(pass --no-coords"):
        ingest(src, tmp_path / "s.zarr", progress=False)


def test_ingest_no_coords_lays_rows_on_a_grid(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src, feats = _no_coords_folder(tmp_path)
    out = tmp_path / "s.zarr"
    with caplog.at_level(logging.WARNING, logger="momkd"):
        summary = ingest(src, out, progress=False, grid_coords_ok=True, dtype="float32")
    warnings = [r for r in caplog.records if "no patch coordinates" in r.getMessage()]
    assert len(warnings) == 1  # two files without coords, one warning
    assert summary["slides_grid_coords"] == 2
    store = CohortStore.open(out)
    assert store.grid_coords == ["a", "c"]
    # 7 rows on a 3-wide grid, row-major, written out by hand
    expected = [[0, 0], [1, 0], [2, 0], [0, 1], [1, 1], [2, 1], [0, 2]]
    np.testing.assert_array_equal(store.read("a").coords, expected)
    np.testing.assert_array_equal(store.read("c").coords, [[0, 0]])
    np.testing.assert_array_equal(store.read("b").coords[:, 0], [0, 256, 0, 256, 512])
    np.testing.assert_array_equal(store.read("a").features, feats["a"])
    # graph methods are told the graph is arbitrary for those slides
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="momkd"):
        assert store.warn_grid_coords(["b", "c", "a"], "method momkd") == 2
        assert store.warn_grid_coords(["b"], "method momkd") == 0
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 and "2 slides" in msgs[0] and "arbitrary" in msgs[0]


def test_ingest_cli_no_coords(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, _ = _no_coords_folder(tmp_path)
    assert cli.main(["ingest", str(src), str(tmp_path / "s.zarr"), "-q"]) == 2
    assert "--no-coords" in capsys.readouterr().err
    assert cli.main(["ingest", str(src), str(tmp_path / "t.zarr"), "-q", "--no-coords"]) == 0
    assert CohortStore.open(tmp_path / "t.zarr").grid_coords == ["a", "c"]


def test_training_warns_when_momkd_reads_grid_coords(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from momkd.synth import generate_cohort
    from momkd.train.inputs import load_inputs

    root = tmp_path / "c"
    generate_cohort(
        root, patients=8, external=0, dim=32, genes=20, patches=5, seed=2, progress=False, h5=True
    )
    bare = tmp_path / "bare"
    bare.mkdir()
    for path in sorted((root / "h5").glob("*.h5")):
        with h5py.File(path, "r") as fh:
            _h5(bare / path.name, fh["features"][()], None)
    ingest(bare, tmp_path / "grid.zarr", progress=False, grid_coords_ok=True)
    base = [
        f"data.store={tmp_path / 'grid.zarr'}",
        f"data.clinical={root / 'clinical.csv'}",
        f"data.expression={root / 'expression.csv'}",
        "data.label_column=her2",
        "data.positive=[Positive]",
        "data.negative=[Negative]",
    ]
    for method, warned in (("momkd", True), ("abmil", False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="momkd"):
            load_inputs(load_config(None, [*base, f"model.method={method}"]))
        hits = [r.getMessage() for r in caplog.records if "arbitrary" in r.getMessage()]
        assert len(hits) == (1 if warned else 0), (method, hits)


# ------------------------------------------------------------------------ --overwrite, bytes


def test_ingest_onto_complete_store_says_overwrite_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src, _ = _no_coords_folder(tmp_path)
    out = tmp_path / "s.zarr"
    ingest(src, out, progress=False, grid_coords_ok=True)
    with pytest.raises(IngestError) as err:
        ingest(src, out, progress=False, grid_coords_ok=True)
    assert str(err.value) == (
        f"output {out}: already exists (a complete store); pass --overwrite to replace it"
    )
    assert cli.main(["ingest", str(src), str(out), "-q", "--no-coords"]) == 2
    text = capsys.readouterr().err
    assert "pass --overwrite" in text and "overwrite=True" not in text


def test_ingest_and_info_report_the_same_decoded_bytes(tmp_path: Path) -> None:
    src, _ = _no_coords_folder(tmp_path)
    out = tmp_path / "s.zarr"
    summary = ingest(src, out, progress=False, grid_coords_ok=True)
    group = zarr.open_group(str(out), mode="r")
    oracle = sum(group[name].nbytes for name in ("features", "coords", "offsets"))
    assert summary["bytes_decoded"] == describe(out)["bytes_decoded"] == oracle


# ----------------------------------------------------------------------------- summary columns


def _summary() -> dict:
    test = {
        "auc": 0.81,
        "auprc": 0.7,
        "accuracy": 0.625,
        "balanced_accuracy": 0.6,
        "f1": 0.55,
        "thr_accuracy": 0.7125,
        "thr_balanced_accuracy": 0.65,
        "thr_f1": 0.5,
    }
    return {
        "method": "momkd",
        "label_column": "her2",
        "folds": [{"fold": 0, "epochs": 3, "best_epoch": 1, "val": {"auc": 0.9}, "test": test}],
        "mean": test,
        "std": {k: 0.0 for k in test},
    }


def test_summary_table_shows_accuracy_with_full_headers() -> None:
    lines = format_summary(_summary()).splitlines()
    header = next(line for line in lines if line.lstrip().startswith("fold"))
    names = header.split()
    assert names[5:] == [
        "auc",
        "auprc",
        "accuracy",
        "balanced_accuracy",
        "f1",
        "thr_accuracy",
        "thr_balanced_accuracy",
        "thr_f1",
    ]
    row = lines[lines.index(header) + 1]
    assert row.split()[5:] == [
        "0.810",
        "0.700",
        "0.625",
        "0.600",
        "0.550",
        "0.713",
        "0.650",
        "0.500",
    ]
    # right-aligned: every value ends in the same text column as its name
    ends = [m.end() for m in re.finditer(r"\S+", header)]
    assert [m.end() for m in re.finditer(r"\S+", row)] == ends
    assert "accuracy 0.625 ± 0.000" in format_summary(_summary())


def test_summary_explains_every_column_and_the_time_line() -> None:
    text = format_summary(_summary())
    lines = text.splitlines()
    header = next(line for line in lines if line.lstrip().startswith("fold"))
    legend = "\n".join(lines[: lines.index(header)])
    for name in ("epochs:", "best:", "val_auc:", "thr:", "thr_*:", "argmax"):
        assert name in legend, name
    assert "counted from 0" in legend
    s = _summary()
    s["timing"] = {"seconds": 12.34, "device": "cuda:0"}
    assert format_summary(s).splitlines()[-1] == "time: 12.3 s on cuda:0"
    s["timing"] = {"seconds": 8.6}  # no device recorded: none is invented
    assert format_summary(s).splitlines()[-1] == "time: 8.6 s"


def test_eval_table_shows_accuracy_with_full_headers() -> None:
    s = _summary()
    result = {"folds": [{"fold": 0, **s["mean"]}], "mean": s["mean"], "std": s["std"]}
    lines = format_eval(result).splitlines()
    header = next(line for line in lines if line.lstrip().startswith("model"))
    assert "thr_balanced_accuracy" in header.split() and "accuracy" in header.split()


# ------------------------------------------------------------------------------------ label case


def test_label_case_mismatch_warns_with_value_and_count(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    table = tmp_path / "clinical.csv"
    rows = [
        ("Positive", 2),
        ("positive", 3),
        (" POSITIVE ", 1),
        ("Negative", 2),
        ("negative", 1),
        ("Equivocal", 1),
    ]
    lines, i = ["case_id,slide_id,label"], 0
    for value, n in rows:
        for _ in range(n):
            lines.append(f"p{i},s{i},{value}")
            i += 1
    table.write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING, logger="momkd"):
        t = load_clinical(table, positive=["Positive"], negative=["Negative"])
    assert len(t) == 4 and dict(t.excluded) == {
        "positive": 3,
        "POSITIVE": 1,
        "negative": 1,
        "Equivocal": 1,
    }
    case = [r.getMessage() for r in caplog.records if "only in case" in r.getMessage()]
    assert len(case) == 1
    for needle in (
        "'positive' (3 slides",
        "'POSITIVE' (1 slides",
        "'negative' (1 slides",
        "data.label_case_insensitive",
    ):
        assert needle in case[0], needle
    assert "Equivocal" not in case[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="momkd"):
        t = load_clinical(
            table, positive=["Positive"], negative=["Negative"], case_insensitive=True
        )
    assert not [r for r in caplog.records if "only in case" in r.getMessage()]
    assert dict(t.excluded) == {"Equivocal": 1}
    assert t.labels.tolist() == [1, 1, 1, 1, 1, 1, 0, 0, 0]
    assert load_config(None).data.label_case_insensitive is False
    with pytest.raises(ConfigError, match="ignoring case"):
        load_clinical(table, positive=["pos"], negative=["POS"], case_insensitive=True)


# ------------------------------------------------------------------------------------ count bounds

BOUNDS = "max_patches must be an integer, at least 1 and below 2**63"


@pytest.fixture(scope="module")
def small_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bounds") / "s.zarr"
    rng = np.random.default_rng(0)
    with StoreWriter(path, 3) as w:
        w.append("s0", rng.normal(size=(4, 3)).astype(np.float32), np.arange(8).reshape(4, 2))
    return path


@pytest.mark.parametrize("bad", [0, -3, 2**63, 2**70])
def test_max_patches_bounds_are_one_message_everywhere(small_store: Path, bad: int) -> None:
    with pytest.raises(ConfigError) as e1:
        BagLoader(small_store, max_patches=bad)
    with pytest.raises(ConfigError) as e2:
        CohortStore.open(small_store).read("s0", max_patches=bad)
    with pytest.raises(ConfigError) as e3:
        load_config(None, [f"train.max_patches={bad}"])
    for err in (e1, e2, e3):
        assert f"{BOUNDS}, got {bad}" in str(err.value)
    assert str(e1.value).startswith("BagLoader: ")
    assert str(e3.value).startswith(f"--set train.max_patches={bad}: train.max_patches: ")


def test_set_epoch_bounds(small_store: Path) -> None:
    loader = BagLoader(small_store, shuffle=True)
    for bad in (-5, 2**70, 1.5):
        with pytest.raises(ConfigError, match=r"epoch must be an integer, at least 0 and below"):
            loader.set_epoch(bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"epoch must be an integer, at least 0"):
        loader.order(-1)
    loader.set_epoch(2**62)
    assert [b.slide_id for b in loader] == ["s0"]


# ---------------------------------------------------------------------------- MOMKD_PROGRESS


class _Terminal:
    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


def test_momkd_progress_turns_bars_off(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from momkd.train.device import progress_enabled
    from momkd.train.evaluate import _progress

    monkeypatch.setattr(sys, "stderr", _Terminal())
    cfg = load_config(None)
    monkeypatch.delenv("MOMKD_PROGRESS", raising=False)
    assert progress_enabled(cfg) is True and _progress(None) is True
    for off in ("0", "false", "no"):
        monkeypatch.setenv("MOMKD_PROGRESS", off)
        assert progress_enabled(cfg) is False and _progress(None) is False
    assert _progress(True) is True  # an explicit choice wins
