"""The method registry (momkd.methods): a method added as one model module with the registry hooks
plus one registry entry trains, predicts and reloads with no other change to the package."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from momkd.methods import METHODS, MethodInfo

# A max-pool MIL model: the bag's per-feature maximum into a linear head. Its module carries the
# registry hooks and nothing else of momkd's training code.
_TOY = textwrap.dedent(
    """
    from dataclasses import dataclass

    import torch
    import torch.nn.functional as F
    from torch import nn

    from momkd.model.abmil import MILOutput


    @dataclass
    class MaxPoolConfig:
        d_in: int
        scale: float


    class MaxPool(nn.Module):
        def __init__(self, cfg):
            super().__init__()
            self.cfg = cfg
            self.head = nn.Linear(cfg.d_in, 2)

        def forward(self, features, edge_index=None, expression=None, segment_offsets=None):
            assert segment_offsets is None, "one bag per step"
            pooled = features.max(dim=0, keepdim=True).values * self.cfg.scale
            attention = torch.zeros(features.shape[0], device=features.device)
            return MILOutput(logits=self.head(pooled), attention=attention, pooled=pooled)

        def loss(self, out, y, expression=None, weights=None):
            ce = F.cross_entropy(out.logits, y)
            return ce, {"ce": ce.detach()}


    def params_from_config(cfg, method, d_in, genes):
        return {"d_in": d_in, "scale": 0.5}


    def build(params):
        return MaxPool(MaxPoolConfig(**params))
    """
)

_CONFIG = """\
data:
  store: {data}/cohort.zarr
  clinical: {data}/clinical.csv
  label_column: pr
  positive: [Positive]
  negative: [Negative]
  standardize: none
splits: {{k: 2, seed: 1}}
model: {{method: maxpool_toy}}
train: {{epochs: 2, min_epochs: 2, patience: 2, deterministic: true, folds: [0], lr: 0.01}}
"""


@pytest.fixture
def toy_method(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "maxpool_toy_model.py").write_text(_TOY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(
        METHODS,
        "maxpool_toy",
        MethodInfo("maxpool_toy", False, False, False, "max-pool MIL", "maxpool_toy_model"),
    )
    yield "maxpool_toy"
    sys.modules.pop("maxpool_toy_model", None)


def test_a_registered_method_trains_predicts_and_reloads(
    toy_method: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from momkd.config import load_config
    from momkd.synth import generate_cohort
    from momkd.train import train
    from momkd.train.evaluate import load_fold_models
    from momkd.train.inference import run_inference

    monkeypatch.setenv("MOMKD_PROGRESS", "0")
    data = tmp_path / "data"
    generate_cohort(
        data, patients=30, external=0, dim=32, genes=20, patches=12, seed=3, progress=False
    )
    (tmp_path / "run.yaml").write_text(_CONFIG.format(data=data))
    cfg = load_config(tmp_path / "run.yaml")
    summary = train(cfg, tmp_path / "run", progress=False)
    assert summary["method"] == toy_method
    fold = tmp_path / "run" / "fold_0"
    history = json.loads((fold / "history.json").read_text())
    assert [r["epoch"] for r in history] == [0, 1]
    assert all(np.isfinite(r["train_loss"]) for r in history)

    # The kept checkpoint rebuilds through the registry and reproduces the saved test predictions
    # with an independent forward pass: the max over patches into the saved head.
    (model,) = [fm.model for fm in load_fold_models(tmp_path / "run")]
    rows = [r.split(",") for r in (fold / "test_predictions.csv").read_text().splitlines()[1:]]
    from momkd.data.store import CohortStore

    store = CohortStore.open(data / "cohort.zarr")
    res = run_inference(
        model, store, [r[0] for r in rows], method=toy_method, device=torch.device("cpu")
    )
    np.testing.assert_allclose(res.probs, [float(r[3]) for r in rows], rtol=0, atol=1e-12)
    w, b = model.head.weight.detach().double(), model.head.bias.detach().double()
    for slide, p in zip(res.slide_ids, res.probs, strict=True):
        x = torch.from_numpy(np.asarray(store.read(slide).features, dtype=np.float64))
        logits = (x.max(dim=0).values * 0.5) @ w.T + b
        assert p == pytest.approx(float(torch.softmax(logits, 0)[1]), abs=1e-5)


def test_an_unregistered_method_is_a_config_error(tmp_path: Path) -> None:
    from momkd.config import load_config
    from momkd.errors import ConfigError

    (tmp_path / "run.yaml").write_text("model: {method: maxpool_toy}\n")
    with pytest.raises(ConfigError, match=r"model.method: expected momkd \| .*got 'maxpool_toy'"):
        load_config(tmp_path / "run.yaml")
