"""Model selection and input handling of a fold (docs/METHOD.md §2.6): the monitored quantity and
its tie rule, the learning-rate schedule that follows it, the small-validation warning, feature
standardisation fitted on training slides only, and patient bags."""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from momkd.config import load_config
from momkd.train.selection import Monitor

LABEL = "pr"

CONFIG = f"""
data:
  store: cohort.zarr
  clinical: clinical.csv
  expression: expression.csv
  label_column: {LABEL}
  positive: [Positive]
  negative: [Negative]
splits: {{k: 2, seed: 3}}
genomics: {{n_genes: 12}}
model: {{hidden: 16, omics_width: 16, omics_hidden: 16, sphere: 8, memory_k: 2,
        classifier_hidden: 8, attention_dim: 8}}
memory: {{init_per_class: 400}}
train: {{epochs: 2, min_epochs: 1, patience: 2, seed: 1, num_threads: 1, schedule: plateau,
        monitor: val_loss, lr: 2.0e-4, ema: null}}
"""


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _kept(scores: list[float], *, min_delta: float = 0.0, patience: int = 100) -> list[int]:
    """Epoch kept after each epoch of a hand-written validation history."""
    m = Monitor(patience=patience, min_epochs=0, min_delta=min_delta)
    kept = []
    for epoch, s in enumerate(scores):
        m.update(s, epoch)
        kept.append(m.best_epoch)
    return kept


# ------------------------------------------------------------------------------ the monitor


def test_saturated_auc_keeps_the_later_epoch_like_the_released_code() -> None:
    # A validation AUC flat at 0.984 from epoch 3: ties keep the later epoch.
    aucs = [0.8, 0.95, 0.97, 0.984, 0.984, 0.984, 0.984]
    assert _kept(aucs) == [0, 1, 2, 3, 4, 5, 6]
    # A strict-improvement rule would have kept epoch 3; a dip is not a tie.
    assert _kept([0.8, 0.9, 0.89, 0.9]) == [0, 1, 1, 3]


def test_min_delta_makes_small_changes_ties_and_keeps_the_maximum_as_reference() -> None:
    scores = [0.50, 0.52, 0.515, 0.53, 0.49, 0.528]
    # min_delta 0: strict dips are bad epochs.
    assert _kept(scores) == [0, 1, 1, 3, 3, 3]
    # min_delta 0.01: 0.515 is within 0.01 of 0.52 (tie, later epoch kept); 0.49 is not;
    # 0.528 is within 0.01 of the best 0.53 (a tie).
    assert _kept(scores, min_delta=0.01) == [0, 1, 2, 3, 3, 5]
    m = Monitor(patience=10, min_epochs=0, min_delta=0.01)
    for e, s in enumerate(scores):
        m.update(s, e)
    assert m.best == pytest.approx(0.53)  # a tie never lowers the reference


def test_val_loss_monitor_keeps_the_lowest_loss_epoch() -> None:
    losses = [0.70, 0.62, 0.60, 0.61, 0.65, 0.60]
    # The score is the negative loss; the last epoch ties the best loss and is kept.
    assert _kept([-v for v in losses]) == [0, 1, 2, 2, 2, 5]
    assert _kept([-v for v in losses], min_delta=0.015) == [0, 1, 2, 3, 3, 5]


def test_early_stopping_counts_bad_epochs_since_the_kept_one_and_respects_min_epochs() -> None:
    m = Monitor(patience=2, min_epochs=5)
    scores = [0.6, 0.7, 0.65, 0.7, 0.69, 0.68, 0.8]
    stops = []
    for epoch, s in enumerate(scores):
        m.update(s, epoch)
        stops.append(m.should_stop(epoch))
    # epoch 3 ties 0.7 and resets the count; epochs 4 and 5 are bad -> stop after epoch 5.
    assert stops == [False, False, False, False, False, True, False]
    other = Monitor(2, 5)
    other.load_state_dict(m.state_dict())
    assert other.state_dict() == m.state_dict()


def test_plateau_schedule_follows_the_monitor() -> None:
    # ReduceLROnPlateau's rule: cut after more than plateau_patience bad epochs.
    m = Monitor(patience=100, min_epochs=0, plateau_patience=2)
    cuts = []
    for epoch, s in enumerate([0.5, 0.4, 0.4, 0.4, 0.5, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3]):
        m.update(s, epoch)
        cuts.append(m.should_reduce_lr())
    # bad epochs 1,2,3 -> cut at 3; epoch 4 ties 0.5 (reset); bad 5,6,7 -> cut at 7; 8,9,10 -> 10
    assert [e for e, c in enumerate(cuts) if c] == [3, 7, 10]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from momkd.synth import generate_cohort

    root = tmp_path_factory.mktemp("sel")
    generate_cohort(
        root, patients=28, external=0, dim=32, genes=40, patches=16, seed=5, progress=False
    )
    (root / "run.yaml").write_text(CONFIG)
    return root


def test_lr_schedule_and_kept_epoch_in_a_training_run_follow_the_monitor(
    cohort: Path, tmp_path: Path
) -> None:
    from momkd.train.runner import train

    cfg = load_config(
        cohort / "run.yaml",
        [
            "model.method=abmil",
            "train.monitor=val_loss",
            "train.epochs=6",
            "train.min_epochs=6",
            "train.plateau_patience=0",
            "train.folds=[0]",
        ],
    )
    summary = train(cfg, out_dir=tmp_path / "run", progress=False)
    hist = [
        {k: r[k] for k in ("epoch", "val_loss", "lr", "best")}
        for r in __import__("json").loads((tmp_path / "run/fold_0/history.json").read_text())
    ]
    # Replay the history with an independent loop: lowest loss so far (ties -> later) is kept;
    # with plateau_patience 0 every bad epoch cuts the learning rate by plateau_factor (0.2).
    best, lr, kept = math.inf, cfg.train.lr, -1
    for r in hist:
        if r["val_loss"] <= best:
            best, kept = r["val_loss"], r["epoch"]
            assert r["best"] is True
        else:
            lr *= 0.2
            assert r["best"] is False
        assert r["lr"] == pytest.approx(lr, rel=1e-9)
    assert summary["folds"][0]["best_epoch"] == kept


def test_small_validation_sets_warn_once_per_run(
    cohort: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from momkd.train.runner import train

    cfg = load_config(
        cohort / "run.yaml", ["model.method=abmil", "train.epochs=1", "train.folds=[0]"]
    )
    with caplog.at_level(logging.WARNING, logger="momkd"):
        train(cfg, out_dir=tmp_path / "run", progress=False)
    warnings = [r.getMessage() for r in caplog.records if "small validation set" in r.getMessage()]
    assert len(warnings) == 1
    val = [r["val"] for r in _read_csv(tmp_path / "run/splits/splits_0.csv") if r["val"].strip()]
    assert f"(fold 0: {len(val)} slides, " in warnings[0]
    assert "fold 1" not in warnings[0]  # only the folds being trained
    assert "train.monitor: last" in warnings[0]


def test_without_validation_every_epoch_runs_and_the_last_is_kept(
    cohort: Path, tmp_path: Path
) -> None:
    from momkd.train.runner import train

    cfg = load_config(
        cohort / "run.yaml",
        [
            "model.method=abmil",
            "splits.val_fraction=0",
            "train.epochs=3",
            "train.min_epochs=1",
            "train.patience=1",
            "train.plateau_patience=0",
            "train.folds=[0]",
        ],
    )
    summary = train(cfg, out_dir=tmp_path / "run", progress=False)
    fold = summary["folds"][0]
    assert (fold["epochs"], fold["best_epoch"], fold["n_val"]) == (3, 2, 0)
    assert fold["stopped_early"] is False


# --------------------------------------------------------------------------- standardisation


def test_standardisation_uses_training_slides_only(cohort: Path, tmp_path: Path) -> None:
    """A shift planted in the test slides must not reach the fitted statistics."""
    from momkd.data.store import CohortStore
    from momkd.data.store_writer import StoreWriter
    from momkd.train.runner import train

    src = CohortStore.open(cohort / "cohort.zarr")
    base = load_config(
        cohort / "run.yaml",
        ["model.method=abmil", "train.epochs=1", "train.folds=[0]", "data.standardize=train"],
    )
    # The fold's split, computed once without the shift (splits depend on labels only).
    first = train(base, out_dir=tmp_path / "plain", progress=False)
    split = _read_csv(tmp_path / "plain/splits/splits_0.csv")
    test = {r["test"] for r in split if r["test"].strip()}
    train_ids = [r["train"] for r in split if r["train"].strip()]
    assert test and first["folds"][0]["n_test"] == len(test)

    shifted = tmp_path / "shifted.zarr"
    with StoreWriter(shifted, src.feature_dim) as w:
        for s in src.slide_ids:
            bag = src.read(s)
            f = bag.features + (50.0 if s in test else 0.0)
            w.append(s, f.astype(np.float32), bag.coords)
    cfg = load_config(
        cohort / "run.yaml",
        [
            "model.method=abmil",
            "train.epochs=1",
            "train.folds=[0]",
            "data.standardize=train",
            f"data.store={shifted}",
            f"splits.dir={tmp_path / 'plain/splits'}",
        ],
    )
    train(cfg, out_dir=tmp_path / "run", progress=False)
    ckpt = torch.load(tmp_path / "run/fold_0/best.pt", weights_only=True)
    mean = ckpt["model"]["feature_mean"].double().numpy()
    scale = ckpt["model"]["feature_scale"].double().numpy()
    store = CohortStore.open(shifted)
    x_train = np.concatenate([store.read(s).features.astype(np.float64) for s in train_ids])
    np.testing.assert_allclose(mean, x_train.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(scale, x_train.std(0), rtol=1e-5, atol=1e-6)
    x_all = np.concatenate([store.read(s).features.astype(np.float64) for s in store.slide_ids])
    assert np.abs(x_all.mean(0) - mean).min() > 1.0  # the test shift would have moved it
    # predict applies the saved statistics: same probabilities as the training run's test CSV
    from momkd.train.evaluate import predict

    ids = sorted(test)
    out = tmp_path / "preds.csv"
    predict(tmp_path / "run/fold_0/best.pt", shifted, out, ids, progress=False)
    got = {r["slide_id"]: float(r["prob_pos"]) for r in _read_csv(out)}
    rows = _read_csv(tmp_path / "run/fold_0/test_predictions.csv")
    for r in rows:
        assert got[r["slide_id"]] == pytest.approx(float(r["prob"]), abs=1e-6)


def test_feature_stats_streaming_matches_numpy() -> None:
    from momkd.train.standardize import FeatureStats

    rng = np.random.default_rng(0)
    blocks = [rng.normal(300.0, 40.0, size=(n, 5)).astype(np.float32) for n in (1, 7, 300, 2)]
    blocks[2][:, 3] = 7.0  # a constant feature is centred, not scaled
    st = FeatureStats(5)
    for b in blocks:
        st.update(b)
    x = np.concatenate(blocks).astype(np.float64)
    np.testing.assert_allclose(st.mean, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(st.std, x.std(0), rtol=1e-9)
    assert st.n == x.shape[0]


# ------------------------------------------------------------------------------ patient bags


def test_patient_bag_is_the_disjoint_union_of_its_slides(cohort: Path) -> None:
    from momkd.data.loader import BagLoader
    from momkd.data.store import CohortStore
    from momkd.train.batching import UnitLoader

    store = CohortStore.open(cohort / "cohort.zarr")
    rows = _read_csv(cohort / "clinical.csv")
    members: dict[str, list[str]] = {}
    for r in rows:
        members.setdefault(r["case_id"], []).append(r["slide_id"])
    multi = [c for c, s in members.items() if len(s) >= 2]
    assert multi, "the synthetic cohort has patients with several slides"
    case = multi[0]
    (bag,) = list(UnitLoader(store, [case], members, knn_k=4, num_threads=1))
    singles = list(BagLoader(store, members[case], knn_k=4, num_threads=1))
    sizes = [b.n_patches for b in singles]
    assert bag.slide_id == case and bag.n_patches == sum(sizes)
    torch.testing.assert_close(bag.features, torch.cat([b.features for b in singles]))
    # every edge stays inside one slide: no edge between slides
    slide_of = np.repeat(np.arange(len(sizes)), sizes)
    e = bag.edge_index.numpy()
    assert e.shape[1] == sum(b.edge_index.shape[1] for b in singles)
    assert (slide_of[e[0]] == slide_of[e[1]]).all()
    # and each slide's own graph is the one the loader built for it alone
    start = 0
    for b in singles:
        inside = (e[0] >= start) & (e[0] < start + b.n_patches)
        np.testing.assert_array_equal(e[:, inside] - start, b.edge_index.numpy())
        start += b.n_patches


def test_patient_bags_train_and_predict_one_row_per_patient(cohort: Path, tmp_path: Path) -> None:
    from momkd.train.runner import train

    cfg = load_config(
        cohort / "run.yaml", ["data.bag=patient", "train.epochs=1", "train.folds=[0]"]
    )
    train(cfg, out_dir=tmp_path / "run", progress=False)
    clinical = _read_csv(cohort / "clinical.csv")
    split = _read_csv(tmp_path / "run/splits/splits_0.csv")
    case_of = {r["slide_id"]: r["case_id"] for r in clinical}
    test_slides = [r["test"] for r in split if r["test"].strip()]
    rows = _read_csv(tmp_path / "run/fold_0/test_predictions.csv")
    assert [r["case_id"] for r in rows] == list(dict.fromkeys(case_of[s] for s in test_slides))
    for r in rows:
        assert r["slide_id"] == r["case_id"]
        assert r["slides"].split(";") == [s for s in test_slides if case_of[s] == r["case_id"]]
    # momkd eval on a patient-bag run predicts patients too, with the same fold model
    from momkd.train.evaluate import evaluate_run

    res = evaluate_run(
        tmp_path / "run", cohort / "cohort.zarr", cohort / "clinical.csv", tmp_path / "ev"
    )
    labelled = {r["case_id"] for r in clinical if r[LABEL] in ("Positive", "Negative")}
    assert res["bag"] == "patient" and res["n_bags"] == len(labelled)
    ev = {r["case_id"]: r for r in _read_csv(tmp_path / "ev/predictions.csv")}
    for r in rows:
        assert float(ev[r["case_id"]]["prob_pos_fold0"]) == pytest.approx(
            float(r["prob"]), abs=1e-6
        )
        assert ev[r["case_id"]]["slides"] == r["slides"]


def test_export_to_the_released_format_refuses_a_standardising_model() -> None:
    from momkd.compat import export_released_state_dict
    from momkd.errors import ConfigError
    from momkd.model.momkd import ModelConfig, MoMKD
    from momkd.train.standardize import attach_standardizer

    model = MoMKD(ModelConfig(d_in=12, hidden=8, sphere=4, memory_k=2, genes=6))
    assert len(export_released_state_dict(model)) == 51
    attach_standardizer(model, 12)
    with pytest.raises(ConfigError, match="data.standardize"):
        export_released_state_dict(model)
