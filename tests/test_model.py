"""MoMKD model: G-encoder vs a hand-written GATv2, memory attention, batching, losses, config."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from momkd import kernels
from momkd.errors import ConfigError, DataError
from momkd.kernels.reference import memory_attention_pool_reference
from momkd.losses import align_loss, commitment_loss, orthogonality_loss
from momkd.memory import spherical_kmeans
from momkd.model import LossWeights, ModelConfig, MoMKD
from sklearn.neighbors import NearestNeighbors

SMALL = {
    "d_in": 12,
    "hidden": 8,
    "omics_width": 6,
    "sphere": 4,
    "memory_k": 3,
    "genes": 10,
    "omics_hidden": 7,
    "classifier_hidden": 5,
}


def small_model(seed: int = 0, **kw: object) -> MoMKD:
    torch.manual_seed(seed)
    return MoMKD(ModelConfig(**{**SMALL, **kw}))  # type: ignore[arg-type]


def knn_edges(coords: np.ndarray) -> torch.Tensor:
    """Edges i -> j for the k = min(8, P - 1) nearest patches j of each patch i (sklearn)."""
    p = len(coords)
    k = min(8, p - 1)
    _, idx = NearestNeighbors(n_neighbors=k + 1).fit(coords).kneighbors(coords)
    src = np.repeat(np.arange(p), k)
    dst = idx[:, 1:].reshape(-1)
    assert not np.any(src == dst)
    return torch.tensor(np.stack([src, dst]), dtype=torch.int64)


def make_bag(n: int, seed: int, d: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    coords = rng.uniform(0, 1000, size=(n, 2))
    feats = torch.tensor(rng.normal(size=(n, d)), dtype=torch.float32)
    return feats, knn_edges(coords)


# ---- an independent GATv2 / G-encoder over an explicit edge list --------------------------------


def _gatv2_hand(
    conv: torch.nn.Module, x: torch.Tensor, edges: list[tuple[int, int]]
) -> torch.Tensor:
    heads, width = conv.att.shape[1], conv.att.shape[2]
    xl = (x @ conv.lin_l.weight.T + conv.lin_l.bias).view(-1, heads, width)
    xr = (x @ conv.lin_r.weight.T + conv.lin_r.bias).view(-1, heads, width)
    att = conv.att[0]
    rows = []
    for i in range(x.shape[0]):
        sources = [j for (j, t) in edges if t == i] + [i]  # incoming edges and the self-loop
        out_heads = []
        for h in range(heads):
            logits = []
            for j in sources:
                v = xl[j, h] + xr[i, h]
                v = torch.where(v > 0, v, 0.2 * v)
                logits.append(float((att[h] * v).sum()))
            mx = max(logits)
            w = [math.exp(e - mx) for e in logits]
            total = sum(w)
            out_heads.append(sum((wj / total) * xl[j, h] for wj, j in zip(w, sources)))
        rows.append(torch.cat(out_heads))
    return torch.stack(rows) + conv.bias


def _ln_hand(v: torch.Tensor, ln: torch.nn.LayerNorm) -> torch.Tensor:
    mu = v.mean(dim=1, keepdim=True)
    var = ((v - mu) ** 2).mean(dim=1, keepdim=True)
    return (v - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def _elu(v: torch.Tensor) -> torch.Tensor:
    return torch.where(v > 0, v, torch.exp(v) - 1.0)


def encoder_hand(enc: torch.nn.Module, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
    edges = [(int(s), int(t)) for s, t in edge_index.T]
    h1 = (
        _elu(_ln_hand(_gatv2_hand(enc.gat1, x, edges), enc.ln1))
        + x @ enc.res_proj1.weight.T
        + enc.res_proj1.bias
    )
    h2 = _elu(_ln_hand(_gatv2_hand(enc.gat2, h1, edges), enc.ln2)) + h1
    return torch.where(h1 > h2, h1, h2)


@torch.no_grad()
def test_graph_encoder_matches_hand_written_gatv2() -> None:
    model = small_model().eval()
    x, ei = make_bag(11, seed=1)
    assert ei.shape == (2, 11 * 8)
    got = model.histology_encoder(x, ei)
    expected = encoder_hand(model.histology_encoder, x, ei)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    # direction matters: with reversed edges the result differs (source -> target flow)
    assert not torch.allclose(model.histology_encoder(x, ei.flip(0)), got, atol=1e-4)


@torch.no_grad()
def test_graph_encoder_tiny_bags() -> None:
    model = small_model().eval()
    for n in (1, 2):
        x, ei = (
            make_bag(n, seed=n)
            if n > 1
            else (torch.randn(1, 12), torch.zeros(2, 0, dtype=torch.int64))
        )
        got = model.histology_encoder(x, ei)
        torch.testing.assert_close(
            got, encoder_hand(model.histology_encoder, x, ei), rtol=1e-4, atol=1e-5
        )


def encoder_hand_identity(
    enc: torch.nn.Module, x: torch.Tensor, edge_index: torch.Tensor
) -> torch.Tensor:
    """The released encoder at D_in = H: the first residual adds ``x`` itself."""
    edges = [(int(s), int(t)) for s, t in edge_index.T]
    h1 = _elu(_ln_hand(_gatv2_hand(enc.gat1, x, edges), enc.ln1)) + x
    h2 = _elu(_ln_hand(_gatv2_hand(enc.gat2, h1, edges), enc.ln2)) + h1
    return torch.where(h1 > h2, h1, h2)


@torch.no_grad()
def test_identity_residual_at_d_in_equal_to_hidden() -> None:
    model = small_model(d_in=8).eval()  # SMALL has hidden 8
    enc = model.histology_encoder
    assert isinstance(enc.res_proj1, torch.nn.Identity)
    assert not [n for n, _ in enc.named_parameters() if n.startswith("res_proj1")]
    x, ei = make_bag(11, seed=3, d=8)
    torch.testing.assert_close(enc(x, ei), encoder_hand_identity(enc, x, ei), rtol=1e-4, atol=1e-5)
    # `linear` keeps a projection at D_in = H: 8*8 + 8 more parameters, and another function
    lin = small_model(d_in=8, input_residual="linear").eval()
    assert isinstance(lin.histology_encoder.res_proj1, torch.nn.Linear)
    n_auto = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in lin.parameters()) - n_auto == 8 * 8 + 8
    lin.histology_encoder.load_state_dict(enc.state_dict(), strict=False)
    assert not torch.allclose(lin.histology_encoder(x, ei), enc(x, ei), atol=1e-4)
    # D_in != H always projects
    assert isinstance(small_model().histology_encoder.res_proj1, torch.nn.Linear)
    with pytest.raises(ConfigError, match="model.input_residual"):
        ModelConfig(input_residual="none")


def test_input_residual_from_config_and_legacy_checkpoints() -> None:
    from momkd.config import load_config
    from momkd.train.factory import build_model, model_spec_for

    for preset in ("official", "paper"):
        cfg = load_config(None, [f"model.preset={preset}"])
        assert cfg.model.input_residual == "auto"
        h = cfg.model.hidden
        spec = model_spec_for(cfg, d_in=h, genes=16)
        assert spec["params"]["input_residual"] == "auto"
        model = build_model(spec)
        assert isinstance(model.histology_encoder.res_proj1, torch.nn.Identity), preset
    cfg = load_config(None, ["model.hidden=8", "model.input_residual=linear"])
    spec = model_spec_for(cfg, d_in=8, genes=16)
    assert isinstance(build_model(spec).histology_encoder.res_proj1, torch.nn.Linear)
    # a spec saved before the option existed describes a model that always had a Linear
    legacy = {"method": "momkd", "params": {**SMALL, "d_in": 8}}
    assert isinstance(build_model(legacy).histology_encoder.res_proj1, torch.nn.Linear)


# ---- memory attention pooling ------------------------------------------------------------------


def test_memory_attention_pool_by_hand() -> None:
    rng = np.random.default_rng(2)
    n, h, s, k = 7, 5, 3, 2
    p = rng.normal(size=(n, s))
    p /= np.linalg.norm(p, axis=1, keepdims=True)
    feats = rng.normal(size=(n, h))
    cp = rng.normal(size=(k, s))
    cp /= np.linalg.norm(cp, axis=1, keepdims=True)
    cn = rng.normal(size=(k, s))
    cn /= np.linalg.norm(cn, axis=1, keepdims=True)
    offsets = [0, 3, 7]
    tau = 0.3
    score = np.array(
        [
            max(p[i] @ cp[j] for j in range(k)) - max(p[i] @ cn[j] for j in range(k))
            for i in range(n)
        ]
    )
    attn = np.zeros(n)
    pooled = np.zeros((2, h))
    for b in range(2):
        sl = slice(offsets[b], offsets[b + 1])
        e = np.exp(score[sl] / tau)
        attn[sl] = e / e.sum()
        pooled[b] = (attn[sl, None] * feats[sl]).sum(axis=0)

    def t(a):
        return torch.tensor(a, dtype=torch.float32)

    got = memory_attention_pool_reference(
        t(p), t(feats), t(cp), t(cn), torch.tensor(math.log(tau)), torch.tensor(offsets)
    )
    np.testing.assert_allclose(got[0].numpy(), pooled, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[1].numpy(), attn, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[2].numpy(), score, rtol=1e-5, atol=1e-6)
    assert got[3].tolist() == list(np.argmax(p @ cp.T, axis=1))
    assert got[4].tolist() == list(np.argmax(p @ cn.T, axis=1))


@pytest.mark.parametrize("theta,tau", [(math.log(1e-4), 0.01), (math.log(50.0), 2.0)])
def test_tau_is_clamped_and_gradient_vanishes(theta: float, tau: float) -> None:
    g = torch.Generator().manual_seed(4)
    p = F.normalize(torch.randn(6, 3, generator=g), dim=1).requires_grad_()
    feats = torch.randn(6, 4, generator=g)
    cp, cn = (
        F.normalize(torch.randn(2, 3, generator=g), dim=1),
        F.normalize(torch.randn(2, 3, generator=g), dim=1),
    )
    log_tau = torch.tensor(theta, requires_grad=True)
    pooled, attn, score, _, _ = memory_attention_pool_reference(
        p, feats, cp, cn, log_tau, torch.tensor([0, 6])
    )
    expected = torch.softmax(score.detach() / tau, dim=0)
    torch.testing.assert_close(attn.detach(), expected)
    pooled.sum().backward()
    assert log_tau.grad is not None and log_tau.grad.item() == 0.0
    # inside the range the temperature does get a gradient
    inside = torch.tensor(math.log(0.2), requires_grad=True)
    memory_attention_pool_reference(p, feats, cp, cn, inside, torch.tensor([0, 6]))[
        0
    ].sum().backward()
    assert inside.grad is not None and inside.grad.item() != 0.0


def test_attention_memory_enters_detached() -> None:
    p = F.normalize(torch.randn(5, 3), dim=1)
    cp = F.normalize(torch.randn(2, 3), dim=1).requires_grad_()
    cn = F.normalize(torch.randn(2, 3), dim=1).requires_grad_()
    out = memory_attention_pool_reference(
        p.requires_grad_(), torch.randn(5, 4), cp, cn, torch.tensor(0.0), torch.tensor([0, 5])
    )
    out[0].sum().backward()
    assert cp.grad is None and cn.grad is None and p.grad is not None


def test_segment_offsets_validation() -> None:
    x = torch.randn(4, 3)
    args = (
        F.normalize(x, dim=1),
        torch.randn(4, 2),
        F.normalize(torch.randn(2, 3), dim=1),
        F.normalize(torch.randn(2, 3), dim=1),
        torch.tensor(0.0),
    )
    with pytest.raises(DataError, match="empty"):
        memory_attention_pool_reference(*args, torch.tensor([0, 2, 2, 4]))
    with pytest.raises(DataError, match="N=4"):
        memory_attention_pool_reference(*args, torch.tensor([0, 3]))


def test_dispatch_uses_reference_on_cpu_and_when_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    kernels.register_fused("align_loss", lambda *a: calls.append(1) or torch.zeros(1))
    try:
        z = F.normalize(torch.randn(2, 3), dim=1)
        c = F.normalize(torch.randn(2, 3), dim=1)
        kernels.align_loss(z, torch.tensor([0, 1]), c, c)  # CPU tensors: reference
        monkeypatch.setenv("MOMKD_FORCE_EAGER", "1")
        assert kernels.force_eager()
        assert (
            kernels._pick("align_loss", z.cuda() if torch.cuda.is_available() else z)
            is kernels.reference.align_loss_reference
        )
        assert calls == []
    finally:
        kernels._REGISTERED.clear()
        kernels._load_fused.cache_clear()


# ---- the full model ----------------------------------------------------------------------------


@torch.no_grad()
def test_forward_shapes_and_predict() -> None:
    model = small_model()
    x, ei = make_bag(9, seed=3)
    out = model(x, ei, torch.randn(10))
    assert out.logits.shape == (1, 2) and out.attention.shape == (9,) and out.score.shape == (9,)
    assert (
        out.patch_proj.shape == (9, 4)
        and out.features.shape == (9, 8)
        and out.pooled.shape == (1, 8)
    )
    assert out.z_w.shape == (1, 4) and out.z_o.shape == (1, 4) and out.recon.shape == (1, 10)
    assert out.assign_pos.dtype == torch.int64 and out.assign_neg.shape == (9,)
    torch.testing.assert_close(out.patch_proj.norm(dim=1), torch.ones(9))
    torch.testing.assert_close(out.z_o.norm(dim=1), torch.ones(1))
    model.train()
    probs, attn = model.predict(x, ei)
    assert model.training  # mode restored
    assert probs.shape == (2,) and attn.shape == (9,)
    assert probs.sum().item() == pytest.approx(1.0) and attn.sum().item() == pytest.approx(
        1.0, abs=1e-6
    )
    model.eval()
    out2 = model(x, ei)
    assert out2.z_o is None and out2.recon is None
    torch.testing.assert_close(probs, torch.softmax(out2.logits[0], dim=0))
    torch.testing.assert_close(
        out2.pooled[0], (out2.attention[:, None] * out2.features).sum(dim=0), rtol=1e-5, atol=1e-6
    )


@torch.no_grad()
def test_batched_forward_equals_separate_forwards() -> None:
    model = small_model(seed=1).eval()
    xa, ea = make_bag(7, seed=10)
    xb, eb = make_bag(12, seed=11)
    ga, gb = torch.randn(10), torch.randn(10)
    x = torch.cat([xa, xb])
    ei = torch.cat([ea, eb + 7], dim=1)
    offsets = torch.tensor([0, 7, 19])
    out = model(x, ei, torch.stack([ga, gb]), segment_offsets=offsets)
    sa, sb = model(xa, ea, ga), model(xb, eb, gb)
    for field in ("logits", "pooled", "z_w", "z_o", "recon"):
        torch.testing.assert_close(
            getattr(out, field),
            torch.cat([getattr(sa, field), getattr(sb, field)]),
            rtol=1e-5,
            atol=1e-6,
        )
    for field in ("attention", "score", "features", "patch_proj"):
        torch.testing.assert_close(
            getattr(out, field),
            torch.cat([getattr(sa, field), getattr(sb, field)]),
            rtol=1e-5,
            atol=1e-6,
        )
    assert torch.equal(out.assign_pos, torch.cat([sa.assign_pos, sb.assign_pos]))


def test_loss_total_and_batched_terms() -> None:
    model = small_model(seed=2).eval()
    xa, ea = make_bag(6, seed=20)
    xb, eb = make_bag(8, seed=21)
    ga, gb = torch.randn(10), torch.randn(10)
    out = model(
        torch.cat([xa, xb]),
        torch.cat([ea, eb + 6], dim=1),
        torch.stack([ga, gb]),
        torch.tensor([0, 6, 14]),
    )
    y = torch.tensor([1, 0])
    w = LossWeights(ce=0.3, mem=0.7, align_omics=0.11, align_wsi=0.13, mse=0.17, orth=3.0)
    total, terms = model.loss(out, y, torch.stack([ga, gb]), w)
    assert set(terms) == {"ce", "commit", "orth", "mem", "align_omics", "align_wsi", "mse"}
    expected_total = (
        0.3 * terms["ce"]
        + 0.7 * (terms["commit"] + 3.0 * terms["orth"])
        + 0.11 * terms["align_omics"]
        + 0.13 * terms["align_wsi"]
        + 0.17 * terms["mse"]
    )
    torch.testing.assert_close(total, expected_total)
    torch.testing.assert_close(terms["mem"], terms["commit"] + 3.0 * terms["orth"])
    # per-bag terms computed independently and averaged over the two bags
    cp, cn = model.memory.normalized()
    sa, sb = model(xa, ea, ga), model(xb, eb, gb)
    ce = (F.cross_entropy(sa.logits, y[:1]) + F.cross_entropy(sb.logits, y[1:])) / 2
    commit = (
        commitment_loss(sa.patch_proj, model.memory.pos)
        + commitment_loss(sb.patch_proj, model.memory.neg)
    ) / 2
    orth = (orthogonality_loss(cp) + orthogonality_loss(cn)) / 2
    aw = (align_loss(sa.z_w, y[:1], cp, cn) + align_loss(sb.z_w, y[1:], cp, cn)).squeeze() / 2
    ao = (align_loss(sa.z_o, y[:1], cp, cn) + align_loss(sb.z_o, y[1:], cp, cn)).squeeze() / 2
    mse = (F.mse_loss(sa.recon[0], ga) + F.mse_loss(sb.recon[0], gb)) / 2
    for name, value in (
        ("ce", ce),
        ("commit", commit),
        ("orth", orth),
        ("align_wsi", aw),
        ("align_omics", ao),
        ("mse", mse),
    ):
        torch.testing.assert_close(terms[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_loss_without_expression_has_zero_omics_terms() -> None:
    model = small_model()
    x, ei = make_bag(5, seed=4)
    out = model(x, ei)
    total, terms = model.loss(out, torch.tensor([0]))
    assert terms["align_omics"].item() == 0.0 and terms["mse"].item() == 0.0
    total.backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.omics_encoder.parameters())


def test_presets_and_config_validation() -> None:
    paper = ModelConfig.preset("paper")
    assert (paper.hidden, paper.sphere, paper.omics_width) == (256, 128, 512)
    assert ModelConfig.preset("official") == ModelConfig()
    assert LossWeights.preset("paper").mse == 0.01 and LossWeights().mse == 0.05
    assert ModelConfig.preset("paper", memory_k=8).memory_k == 8
    with pytest.raises(ConfigError, match="bogus"):
        ModelConfig.preset("official", bogus=1)
    with pytest.raises(ConfigError, match="preset"):
        ModelConfig.preset("huge")
    with pytest.raises(ConfigError, match="memory.update"):
        ModelConfig(memory_update="ema")
    with pytest.raises(ConfigError, match="momentum_sources"):
        ModelConfig(momentum_sources=("rna",))
    with pytest.raises(ConfigError, match="hidden"):
        ModelConfig(hidden=7)
    assert ModelConfig(momentum_sources=["omics", "wsi"]).momentum_sources == ("omics", "wsi")


def test_input_validation_errors() -> None:
    model = small_model()
    x, ei = make_bag(5, seed=5)
    with pytest.raises(DataError, match=r"features: expected shape \(N, 12\)"):
        model(torch.randn(5, 11), ei)
    with pytest.raises(DataError, match="empty bag"):
        model(torch.randn(0, 12), torch.zeros(2, 0, dtype=torch.int64))
    with pytest.raises(DataError, match="expression"):
        model(x, ei, torch.randn(9))
    out = model(x, ei)
    with pytest.raises(DataError, match="labels"):
        model.loss(out, torch.tensor([2]))
    with pytest.raises(DataError, match="labels"):
        model.loss(out, torch.tensor([0, 1]))


def test_init_memory_runs_spherical_kmeans() -> None:
    model = small_model()
    pos, neg = torch.randn(40, 4), torch.randn(30, 4)
    model.init_memory(pos, neg, iters=5, seed=7)
    torch.testing.assert_close(model.memory.pos.data, spherical_kmeans(pos, 3, iters=5, seed=7))
    torch.testing.assert_close(model.memory.neg.data, spherical_kmeans(neg, 3, iters=5, seed=8))
    assert model.memory.pos.requires_grad  # still a parameter in gradient mode


def test_after_optimizer_step_momentum_and_fixed_modes() -> None:
    for mode in ("momentum", "fixed", "gradient"):
        model = small_model(memory_update=mode, momentum_sources=("omics", "wsi"), momentum=0.5)
        x, ei = make_bag(6, seed=6)
        out = model(x, ei, torch.randn(10))
        pos, neg = model.memory.pos.detach().clone(), model.memory.neg.detach().clone()
        model.after_optimizer_step(out, torch.tensor([1]))
        if mode == "momentum":
            assert not torch.equal(model.memory.pos, pos) and torch.equal(model.memory.neg, neg)
            assert int(model.memory.unused_steps[1].sum()) >= 1
        else:
            assert torch.equal(model.memory.pos.detach(), pos) and torch.equal(
                model.memory.neg.detach(), neg
            )


def test_fixed_memory_survives_training_step() -> None:
    model = small_model(memory_update="fixed")
    pos = model.memory.pos.clone()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, ei = make_bag(6, seed=8)
    g = torch.randn(10)
    out = model(x, ei, g)
    total, _ = model.loss(out, torch.tensor([1]), g)
    total.backward()
    opt.step()
    model.after_optimizer_step(out, torch.tensor([1]))
    assert torch.equal(model.memory.pos, pos)
    assert "memory.pos" in model.state_dict()
