"""Interpretability: memory usage statistics, dynamics plot, top-k patches, slide maps, explain_run."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from momkd import cli
from momkd.data import BagLoader, StoreWriter
from momkd.errors import DataError, MomkdError, SlideNotFoundError
from momkd.explain import (
    TopKTracker,
    explain_run,
    load_fold_model,
    memory_history,
    memory_usage_on_bags,
    plot_memory_dynamics,
    read_topk_csv,
    usage_from_counts,
)
from momkd.explain.maps import (
    assignment_labels,
    patch_grid,
    plot_assignment_map,
    plot_attention_map,
)
from momkd.explain.topk import make_gallery
from momkd.memory import usage_stats
from momkd.model.momkd import ModelConfig, MoMKD
from momkd.train.checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, save_checkpoint

D = 12
K = 4
PATCH = 256
SIZES = [37, 52, 20, 64, 45, 29, 58, 33]


def assert_not_blank(png: Path) -> None:
    """The PNG exists, has varying pixels and a sizeable share differs from the background."""
    assert png.is_file(), png
    img = mpimg.imread(png)
    rgb = img[..., :3].reshape(-1, 3)
    assert float(rgb.std()) > 0.01
    background = rgb[0]  # top-left corner: figure background
    differs = np.any(np.abs(rgb - background) > 0.02, axis=1)
    assert differs.mean() > 0.02


def blob_coords(rng: np.random.Generator, p: int) -> np.ndarray:
    """P distinct grid positions (level-0 px, multiples of PATCH) in a compact region."""
    side = math.ceil(math.sqrt(p * 1.6))
    cells = rng.choice(side * side, size=p, replace=False)
    return np.stack([cells % side, cells // side], axis=1).astype(np.int64) * PATCH + 1024


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> dict:
    """A store of 8 small slides and a run dir whose fold 0 holds a random-weight MoMKD model."""
    root = tmp_path_factory.mktemp("explain")
    rng = np.random.default_rng(5)
    store_path = root / "cohort.zarr"
    with StoreWriter(store_path, D, attrs={"patch_size": PATCH}) as w:
        for i, p in enumerate(SIZES):
            w.append(f"slide_{i}", rng.normal(size=(p, D)).astype(np.float32), blob_coords(rng, p))
    torch.manual_seed(0)
    cfg = ModelConfig(
        d_in=D,
        hidden=16,
        omics_width=8,
        omics_hidden=8,
        sphere=8,
        memory_k=K,
        genes=10,
        classifier_hidden=8,
    )
    model = MoMKD(cfg)
    run = root / "run"
    # per-epoch rows as the training loop writes them (flat mem_<memory>_<stat> keys)
    history = []
    for e in range(6):
        row = {"epoch": e, "train_loss": 1.0 / (e + 1)}
        for name in ("pos", "neg"):
            st = usage_from_counts(rng.integers(0, 5, size=K) + (np.arange(K) == e % K) * 9)
            row |= {f"mem_{name}_{key}": st[key] for key in ("usage", "active_ratio", "perplexity")}
        history.append(row)
    state = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "method": "momkd",
        "model_config": {"method": "momkd", "params": dataclasses.asdict(cfg)},
        "config": {"model": {"method": "momkd"}, "train": {"knn_k": 4}},
        "fold": 0,
        "kind": "best",
        "model": model.state_dict(),
    }
    save_checkpoint(run / "fold_0" / "best.pt", state)
    (run / "fold_0" / "history.json").write_text(json.dumps(history))
    return {"store": store_path, "run": run, "model": model, "history": history}


def brute_force(model: MoMKD, store_path: Path, knn_k: int = 4) -> dict:
    """Every patch's similarities to the 2K components, predictions and assignments."""
    model.eval()
    sims, ids, xy, probs, assign = [], [], [], {}, {}
    c_pos, c_neg = model.memory.normalized()
    mem = torch.cat([c_pos, c_neg]).detach()
    with torch.no_grad():
        for bag in BagLoader(store_path, knn_k=knn_k):
            out = model(bag.features, bag.edge_index)
            s = out.patch_proj @ mem.T
            sims.append(s.numpy())
            ids += [bag.slide_id] * bag.n_patches
            xy.append(bag.coords.numpy())
            probs[bag.slide_id] = float(torch.softmax(out.logits[0], -1)[1])
            assign[bag.slide_id] = (s[:, :K].argmax(1).numpy(), s[:, K:].argmax(1).numpy())
    return {
        "sims": np.concatenate(sims),
        "ids": np.array(ids),
        "xy": np.concatenate(xy),
        "probs": probs,
        "assign": assign,
    }


# ------------------------------------------------------------------------------------ usage


def test_usage_statistics_by_hand():
    assign = torch.tensor([0, 0, 1, 3, 3, 3])  # K = 5: counts 2, 1, 0, 3, 0
    stats = usage_from_counts(np.bincount(assign.numpy(), minlength=5))
    np.testing.assert_allclose(stats["usage"], [1 / 3, 1 / 6, 0, 1 / 2, 0])
    assert stats["active_ratio"] == pytest.approx(3 / 5)
    # exp(-sum u ln u) = 3^(1/3) * 6^(1/6) * 2^(1/2)
    assert stats["perplexity"] == pytest.approx(3 ** (1 / 3) * 6 ** (1 / 6) * 2**0.5)
    assert stats["n_patches"] == 6
    ref = usage_stats(assign, 5)  # the memory module's per-assignment version agrees
    np.testing.assert_allclose(stats["usage"], ref["usage"].numpy())
    assert stats["perplexity"] == pytest.approx(ref["perplexity"])
    one = usage_from_counts([0, 7, 0])
    assert one["perplexity"] == pytest.approx(1.0) and one["active_ratio"] == pytest.approx(1 / 3)
    assert usage_from_counts([2, 2, 2, 2])["perplexity"] == pytest.approx(4.0)
    with pytest.raises(DataError):
        usage_from_counts([0, 0])
    with pytest.raises(DataError):
        usage_from_counts([1, -1])


def test_memory_usage_on_bags_matches_manual_argmax(tiny_run):
    model = tiny_run["model"]
    model.train()
    got = memory_usage_on_bags(model, BagLoader(tiny_run["store"], knn_k=4))
    assert model.training  # the previous mode is restored
    bf = brute_force(model, tiny_run["store"])
    pos = np.concatenate([a for a, _ in bf["assign"].values()])
    neg = np.concatenate([b for _, b in bf["assign"].values()])
    np.testing.assert_allclose(got["pos"]["usage"], np.bincount(pos, minlength=K) / pos.size)
    np.testing.assert_allclose(got["neg"]["usage"], np.bincount(neg, minlength=K) / neg.size)
    assert got["pos"]["n_patches"] == sum(SIZES)
    json.dumps(got)  # JSON-ready for history.json


def test_memory_history_and_dynamics_plot(tiny_run, tmp_path):
    hist = tiny_run["history"]
    dyn = memory_history(hist)
    assert set(dyn) == {"pos", "neg"}
    np.testing.assert_array_equal(dyn["pos"]["epoch"], np.arange(6))
    assert dyn["pos"]["usage"].shape == (6, K)
    np.testing.assert_allclose(dyn["neg"]["usage"][3], hist[3]["mem_neg_usage"])
    np.testing.assert_allclose(dyn["pos"]["perplexity"], [h["mem_pos_perplexity"] for h in hist])
    # nested spelling with only the usage vector: scalars recomputed from it
    nested = [{"epoch": 0, "memory": {"pos": {"usage": [0.5, 0.5, 0.0, 0.0]}}}]
    d = memory_history(nested)["pos"]
    assert d["active_ratio"][0] == pytest.approx(0.5) and d["perplexity"][0] == pytest.approx(2.0)
    png = plot_memory_dynamics(hist, tmp_path / "dyn.png", title="fold 0")
    assert_not_blank(png)
    with pytest.raises(DataError):
        plot_memory_dynamics([{"epoch": 0, "train": {"loss": 1.0}}], tmp_path / "none.png")


# ------------------------------------------------------------------------------------ top-k


def test_topk_tracker_equals_sort_over_all_patches():
    rng = np.random.default_rng(1)
    tracker = TopKTracker(k_components=3, top_k=4)
    all_s, all_id, all_xy = [], [], []
    for i, p in enumerate([5, 2, 17, 1, 9]):
        s = rng.uniform(-1, 1, size=(p, 6)).astype(np.float32)
        xy = rng.integers(0, 10_000, size=(p, 2))
        tracker.update(f"s{i}", torch.from_numpy(s), xy)
        all_s.append(s)
        all_id += [f"s{i}"] * p
        all_xy.append(xy)
    s, ids, xy = np.concatenate(all_s), np.array(all_id), np.concatenate(all_xy)
    rows = tracker.rows()
    assert len(rows) == 6 * 4
    for col in range(6):
        best = np.argsort(-s[:, col], kind="stable")[:4]
        mem, comp = ("pos", col) if col < 3 else ("neg", col - 3)
        got = [r for r in rows if r["memory"] == mem and r["component"] == comp]
        assert [r["rank"] for r in got] == [1, 2, 3, 4]
        np.testing.assert_allclose([r["similarity"] for r in got], s[best, col])
        assert [r["slide_id"] for r in got] == list(ids[best])
        assert [(r["x"], r["y"]) for r in got] == [tuple(v) for v in xy[best]]


def test_topk_tracker_fewer_patches_than_k_and_bad_shape():
    tracker = TopKTracker(k_components=1, top_k=5)
    tracker.update("a", np.array([[0.2, 0.1], [0.9, -0.3]], dtype=np.float32), [[0, 0], [256, 0]])
    rows = tracker.rows()
    assert [(r["memory"], r["rank"], r["x"]) for r in rows] == [
        ("pos", 1, 256),
        ("pos", 2, 0),
        ("neg", 1, 0),
        ("neg", 2, 256),
    ]
    with pytest.raises(DataError):
        tracker.update("b", np.zeros((3, 3), dtype=np.float32), np.zeros((3, 2)))


# ------------------------------------------------------------------------------------- maps


def test_patch_grid_by_hand():
    coords = np.array([[512, 256], [768, 256], [512, 768], [1024, 1024]])
    row, col, shape, extent = patch_grid(coords, 256)
    assert shape == (4, 3)
    np.testing.assert_array_equal(row, [0, 0, 2, 3])
    np.testing.assert_array_equal(col, [0, 1, 0, 2])
    assert extent == (512.0, 1280.0, 1280.0, 256.0)
    # inferred patch size gives the same grid
    assert patch_grid(coords)[2] == (4, 3)
    # a grid over the cell cap is binned
    row, col, shape, _ = patch_grid(coords, 256, max_cells=4)
    assert shape[0] * shape[1] <= 4


def test_assignment_labels():
    lab = assignment_labels([0.3, -0.1, 0.0], [2, 1, 0], [3, 0, 1], k=4)
    np.testing.assert_array_equal(lab, [2, 4, 5])


def test_maps_on_a_slide_with_120k_patches(tmp_path):
    rng = np.random.default_rng(2)
    side = 400
    cells = rng.choice(side * side, size=120_000, replace=False)
    coords = np.stack([cells % side, cells // side], axis=1) * PATCH
    att = rng.random(120_000)
    att /= att.sum()
    labels = rng.integers(0, 2 * 16, size=120_000)
    a = plot_attention_map("big", coords, att, tmp_path / "a.png", prob=0.8)
    b = plot_assignment_map("big", coords, labels, 16, tmp_path / "b.png", attention=att, prob=0.8)
    assert_not_blank(a)
    assert_not_blank(b)
    with pytest.raises(DataError):
        plot_attention_map("big", coords, att[:-1], tmp_path / "c.png")


def test_gallery_with_a_reader(tmp_path):
    rows = [
        {
            "memory": m,
            "component": c,
            "rank": r,
            "slide_id": f"s{r}",
            "x": 256 * c,
            "y": 0,
            "similarity": 0.9 - 0.1 * r,
        }
        for m in ("pos", "neg")
        for c in range(2)
        for r in (1, 2)
    ]
    wsi = tmp_path / "wsi"
    wsi.mkdir()
    (wsi / "s1.svs").write_bytes(b"")  # s2 has no image: its crops are marked, not fatal
    opened = []

    class FakeSlide:
        def __init__(self, path):
            opened.append(Path(path).name)

        def read_region(self, loc, level, size):
            x, _ = loc
            img = np.zeros((size[1], size[0], 4), dtype=np.uint8)
            img[..., 0] = 40 + x % 200
            img[: size[1] // 2, :, 1] = 180
            img[..., 3] = 255
            return img

    png = make_gallery(rows, wsi, tmp_path / "g.png", 64, opener=FakeSlide)
    assert opened == ["s1.svs"]
    assert_not_blank(png)


# ------------------------------------------------------------------------------ explain_run


def test_explain_run_topk_and_maps(tiny_run, tmp_path):
    res = explain_run(
        tiny_run["run"],
        tiny_run["store"],
        top_k=3,
        out=tmp_path / "ex",
        fold=0,
        device="cpu",
        progress=False,
    )
    bf = brute_force(tiny_run["model"], tiny_run["store"])
    rows = read_topk_csv(res["topk_csv"])
    with open(res["topk_csv"]) as fh:
        assert next(csv.reader(fh)) == [
            "memory",
            "component",
            "rank",
            "slide_id",
            "x",
            "y",
            "similarity",
        ]
    assert len(rows) == 2 * K * 3
    for col in range(2 * K):
        best = np.argsort(-bf["sims"][:, col], kind="stable")[:3]
        mem, comp = ("pos", col) if col < K else ("neg", col - K)
        got = sorted(
            (r for r in rows if r["memory"] == mem and r["component"] == comp),
            key=lambda r: r["rank"],
        )
        np.testing.assert_allclose(
            [r["similarity"] for r in got], bf["sims"][best, col], rtol=1e-5, atol=1e-6
        )
        assert [(r["slide_id"], r["x"], r["y"]) for r in got] == [
            (bf["ids"][i], *map(int, bf["xy"][i])) for i in best
        ]
    # predictions and default map choice: the 3 most positive and the 3 most negative slides
    with open(res["predictions"]) as fh:
        preds = {r["slide_id"]: float(r["prob_pos"]) for r in csv.DictReader(fh)}
    assert preds == pytest.approx(bf["probs"], abs=1e-5)
    order = sorted(preds, key=preds.get)
    expected = set(order[:3]) | set(order[-3:])
    maps = [Path(p) for p in res["maps"]]
    assert {p.name.rsplit("_", 1)[0] for p in maps} == expected
    assert sum(p.name.endswith("_attention.png") for p in maps) == 6
    assert sum(p.name.endswith("_assignment.png") for p in maps) == 6
    for p in maps[:2]:
        assert_not_blank(p)
    # cohort memory usage equals the brute-force argmax counts
    usage = json.loads(Path(res["memory_usage"]).read_text())
    pos = np.concatenate([a for a, _ in bf["assign"].values()])
    np.testing.assert_allclose(usage["pos"]["usage"], np.bincount(pos, minlength=K) / pos.size)
    assert_not_blank(Path(res["memory_dynamics"]))
    assert res["gallery"] is None


def test_explain_run_requested_slides_and_errors(tiny_run, tmp_path):
    res = explain_run(
        tiny_run["run"],
        tiny_run["store"],
        slides=["slide_2"],
        top_k=1,
        out=tmp_path / "ex",
        device="cpu",
        progress=False,
    )
    assert sorted(Path(p).name for p in res["maps"]) == [
        "slide_2_assignment.png",
        "slide_2_attention.png",
    ]
    with pytest.raises(SlideNotFoundError, match="nope"):
        explain_run(
            tiny_run["run"], tiny_run["store"], slides=["nope"], out=tmp_path / "x", device="cpu"
        )
    with pytest.raises(MomkdError, match="fold 3"):
        explain_run(tiny_run["run"], tiny_run["store"], fold=3, out=tmp_path / "x", device="cpu")
    other = tmp_path / "other.zarr"
    with StoreWriter(other, D + 1) as w:
        w.append("a", np.zeros((3, D + 1), np.float32), [[0, 0], [256, 0], [0, 256]])
    with pytest.raises(DataError, match="feature dimension"):
        explain_run(tiny_run["run"], other, out=tmp_path / "x", device="cpu")


def test_explain_refuses_a_non_momkd_checkpoint(tiny_run, tmp_path):
    state = torch.load(tiny_run["run"] / "fold_0" / "best.pt", weights_only=True)
    state["method"] = "abmil"
    state["model_config"] = {"method": "abmil", "params": {"d_in": D, "hidden": 16}}
    save_checkpoint(tmp_path / "run" / "fold_0" / "best.pt", state)
    with pytest.raises(MomkdError, match="abmil"):
        load_fold_model(tmp_path / "run" / "fold_0" / "best.pt")


def test_load_fold_model_restores_weights(tiny_run):
    model, state = load_fold_model(tiny_run["run"] / "fold_0" / "best.pt")
    for key, value in tiny_run["model"].state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value)
    assert not model.training and state["fold"] == 0


def test_cli_explain(tiny_run, tmp_path, capsys):
    out = tmp_path / "cli"
    code = cli.main(
        [
            "explain",
            str(tiny_run["run"]),
            "--store",
            str(tiny_run["store"]),
            "--top-k",
            "2",
            "--slides",
            "slide_0",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "topk_csv:" in printed and (out / "topk_patches.csv").is_file()
    assert len(read_topk_csv(out / "topk_patches.csv")) == 2 * K * 2
    code = cli.main(["explain", str(tmp_path / "missing_run"), "--store", str(tiny_run["store"])])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "missing_run" in err


def test_similarity_is_cosine_to_normalised_memory(tiny_run):
    """The explained similarity is <p_i, c_hat_k> with unit p_i: it lies in [-1, 1]."""
    model = tiny_run["model"]
    bag = next(iter(BagLoader(tiny_run["store"], knn_k=4)))
    with torch.no_grad():
        out = model(bag.features, bag.edge_index)
    np.testing.assert_allclose(out.patch_proj.norm(dim=1).numpy(), 1.0, atol=1e-5)
    c = F.normalize(model.memory.pos.detach(), dim=1)
    s = (out.patch_proj @ c.T).numpy()
    assert np.all(np.abs(s) <= 1 + 1e-5)


def test_explain_gallery_skipped_without_openslide(tiny_run, tmp_path, caplog, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "openslide", None)  # `import openslide` raises ImportError
    wsi = tmp_path / "wsi"
    wsi.mkdir()
    with caplog.at_level("WARNING"):
        res = explain_run(
            tiny_run["run"],
            tiny_run["store"],
            slides=["slide_1"],
            top_k=1,
            out=tmp_path / "ex",
            wsi_dir=wsi,
            device="cpu",
            progress=False,
        )
    assert res["gallery"] is None
    assert "openslide" in caplog.text
    assert (tmp_path / "ex" / "topk_patches.csv").is_file()
