"""train.kernel_precision reaches the kernels for the whole fold loop and is restored after it."""

from __future__ import annotations

from pathlib import Path

import pytest


def test_training_runs_under_the_configured_precision(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from momkd import kernels
    from momkd.config import load_config
    from momkd.synth import generate_cohort
    from momkd.train import train
    from momkd.train import trainer as fold_trainer

    monkeypatch.setenv("MOMKD_PROGRESS", "0")
    data = tmp_path / "data"
    generate_cohort(data, patients=20, external=0, dim=32, genes=20, patches=8, progress=False)
    seen: list[str] = []
    fit = fold_trainer.FoldTrainer.fit

    def spy(self: fold_trainer.FoldTrainer) -> None:
        seen.append(kernels.get_kernel_precision())
        fit(self)

    monkeypatch.setattr(fold_trainer.FoldTrainer, "fit", spy)
    before = kernels.get_kernel_precision()
    cfg = load_config(
        None,
        [
            f"data.store={data / 'cohort.zarr'}",
            f"data.clinical={data / 'clinical.csv'}",
            "data.label_column=her2",
            "data.positive=[Positive]",
            "data.negative=[Negative]",
            "model.method=meanpool",
            "splits.k=2",
            "train.epochs=1",
            "train.folds=[0]",
            "train.kernel_precision=tf32",
        ],
    )
    train(cfg, tmp_path / "run", progress=False)
    assert seen == ["tf32"]
    assert kernels.get_kernel_precision() == before == "ieee"
