"""Compatibility with the released implementation's state dict (docs/METHOD.md §2.8)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from momkd.compat import (
    RELEASED_KEYS,
    RESIDUAL_KEYS,
    export_released_state_dict,
    load_released_state_dict,
    model_from_released,
    released_keys,
)
from momkd.errors import ConfigError
from momkd.model import ModelConfig, MoMKD

# Names and shapes at the official dims (H = R = 512, S = 64, K = 16, G = 768, D_in = 1536).
OFFICIAL_SHAPES = {
    "attn_log_tau": (),
    "rna_tower.encoder.0.weight": (512, 768),
    "rna_tower.encoder.0.bias": (512,),
    "rna_tower.encoder.1.weight": (512,),
    "rna_tower.encoder.1.bias": (512,),
    "rna_tower.encoder.4.weight": (512, 512),
    "rna_tower.encoder.4.bias": (512,),
    "rna_decoder.decoder.0.weight": (512, 512),
    "rna_decoder.decoder.0.bias": (512,),
    "rna_decoder.decoder.1.weight": (512,),
    "rna_decoder.decoder.1.bias": (512,),
    "rna_decoder.decoder.4.weight": (768, 512),
    "rna_decoder.decoder.4.bias": (768,),
    "wsi_encoder.gat1.att": (1, 2, 256),
    "wsi_encoder.gat1.bias": (512,),
    "wsi_encoder.gat1.lin_l.weight": (512, 1536),
    "wsi_encoder.gat1.lin_l.bias": (512,),
    "wsi_encoder.gat1.lin_r.weight": (512, 1536),
    "wsi_encoder.gat1.lin_r.bias": (512,),
    "wsi_encoder.gat2.att": (1, 2, 256),
    "wsi_encoder.gat2.bias": (512,),
    "wsi_encoder.gat2.lin_l.weight": (512, 512),
    "wsi_encoder.gat2.lin_l.bias": (512,),
    "wsi_encoder.gat2.lin_r.weight": (512, 512),
    "wsi_encoder.gat2.lin_r.bias": (512,),
    "wsi_encoder.res_proj1.weight": (512, 1536),
    "wsi_encoder.res_proj1.bias": (512,),
    "wsi_encoder.ln1.weight": (512,),
    "wsi_encoder.ln1.bias": (512,),
    "wsi_encoder.ln2.weight": (512,),
    "wsi_encoder.ln2.bias": (512,),
    "rna_projector.weight": (64, 512),
    "rna_projector.bias": (64,),
    "wsi_patch_projector.weight": (64, 512),
    "wsi_patch_projector.bias": (64,),
    "wsi_pool_projector.weight": (64, 512),
    "wsi_pool_projector.bias": (64,),
    "mem_pos._codebook.embed": (1, 16, 64),
    "mem_neg._codebook.embed": (1, 16, 64),
    "wsi_classifier_proto.0.weight": (512,),
    "wsi_classifier_proto.0.bias": (512,),
    "wsi_classifier_proto.1.weight": (128, 512),
    "wsi_classifier_proto.1.bias": (128,),
    "wsi_classifier_proto.4.weight": (2, 128),
    "wsi_classifier_proto.4.bias": (2,),
}
INERT = {
    f"mem_{c}._codebook.{b}"
    for c in ("pos", "neg")
    for b in ("initted", "cluster_size", "embed_avg")
}


def _bag(n: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    x = torch.tensor(rng.normal(size=(n, d)), dtype=torch.float32)
    src = np.repeat(np.arange(n), 4)
    dst = (src + np.tile([1, 2, 3, 5], n)) % n
    return x, torch.tensor(np.stack([src, dst]), dtype=torch.int64)


def _randomise(model: MoMKD, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        model.log_tau.fill_(-1.3)


@pytest.fixture(scope="module")
def official_pair() -> tuple[MoMKD, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = MoMKD(ModelConfig())
    _randomise(model, 1)
    return model.eval(), export_released_state_dict(model)


def test_export_has_the_51_released_keys_and_shapes(official_pair) -> None:
    _, sd = official_pair
    assert len(sd) == 51 and set(sd) == set(RELEASED_KEYS)
    assert set(sd) == set(OFFICIAL_SHAPES) | INERT
    for key, shape in OFFICIAL_SHAPES.items():
        assert tuple(sd[key].shape) == shape, key


@torch.no_grad()
def test_round_trip_gives_identical_logits_and_attention(official_pair) -> None:
    model, sd = official_pair
    torch.manual_seed(5)
    fresh = MoMKD(ModelConfig()).eval()
    assert load_released_state_dict(fresh, sd) == ([], [])
    x, ei = _bag(13, 1536, seed=2)
    g = torch.randn(768)
    a, b = model(x, ei, g), fresh(x, ei, g)
    assert torch.equal(a.logits, b.logits)
    assert torch.equal(a.attention, b.attention)
    assert torch.equal(a.z_o, b.z_o) and torch.equal(a.recon, b.recon)
    assert torch.equal(fresh.log_tau, model.log_tau)


@torch.no_grad()
def test_loads_into_momentum_mode_and_infers_dims() -> None:
    cfg = ModelConfig(
        d_in=20,
        hidden=10,
        omics_width=6,
        sphere=5,
        memory_k=4,
        genes=9,
        omics_hidden=7,
        classifier_hidden=3,
    )
    src = MoMKD(cfg)
    _randomise(src, 3)
    sd = export_released_state_dict(src)
    built = model_from_released(sd, memory_update="momentum").eval()
    assert built.cfg.d_in == 20 and built.cfg.hidden == 10 and built.cfg.omics_hidden == 7
    assert (
        built.cfg.memory_k == 4 and built.cfg.genes == 9 and built.cfg.memory_update == "momentum"
    )
    x, ei = _bag(8, 20, seed=4)
    src.eval()
    torch.testing.assert_close(built(x, ei).logits, src(x, ei).logits, rtol=0, atol=0)
    torch.testing.assert_close(built.memory.pos, src.memory.pos.detach(), rtol=0, atol=0)
    # a DataParallel-style "module." prefix is accepted
    prefixed = {f"module.{k}": v for k, v in sd.items()}
    again = model_from_released(prefixed).eval()
    assert torch.equal(again(x, ei).logits, src(x, ei).logits)


def _small_sd() -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    cfg = ModelConfig(
        d_in=12,
        hidden=8,
        omics_width=6,
        sphere=4,
        memory_k=3,
        genes=10,
        omics_hidden=7,
        classifier_hidden=5,
    )
    return cfg, export_released_state_dict(MoMKD(cfg))


def test_missing_key_is_named() -> None:
    cfg, sd = _small_sd()
    del sd["wsi_encoder.gat2.att"]
    with pytest.raises(ConfigError, match=r"missing keys: wsi_encoder\.gat2\.att") as info:
        load_released_state_dict(MoMKD(cfg), sd)
    assert "\n" not in str(info.value)
    missing, unexpected = load_released_state_dict(MoMKD(cfg), sd, strict=False)
    assert missing == ["wsi_encoder.gat2.att"] and unexpected == []


def test_unexpected_key_is_named() -> None:
    cfg, sd = _small_sd()
    sd["wsi_classifier_proto.7.weight"] = torch.zeros(2)
    with pytest.raises(ConfigError, match=r"unexpected keys: wsi_classifier_proto\.7\.weight"):
        load_released_state_dict(MoMKD(cfg), sd)
    assert load_released_state_dict(MoMKD(cfg), sd, strict=False)[1] == [
        "wsi_classifier_proto.7.weight"
    ]


def test_shape_mismatch_is_named_even_when_not_strict() -> None:
    cfg, sd = _small_sd()
    sd["mem_neg._codebook.embed"] = torch.zeros(1, 5, 4)
    with pytest.raises(
        ConfigError, match=r"mem_neg\._codebook\.embed has shape \(1, 5, 4\).*\(1, 3, 4\)"
    ):
        load_released_state_dict(MoMKD(cfg), sd, strict=False)
    _, sd = _small_sd()
    model = MoMKD(cfg)
    before = model.classifier[4].weight.clone()
    sd["wsi_classifier_proto.4.weight"] = torch.ones(3, 5)
    with pytest.raises(ConfigError, match="wsi_classifier_proto.4.weight"):
        load_released_state_dict(model, sd)
    assert torch.equal(model.classifier[4].weight, before)  # nothing copied on failure


def test_model_from_released_needs_dimension_keys() -> None:
    _, sd = _small_sd()
    del sd["wsi_encoder.res_proj1.weight"]
    with pytest.raises(ConfigError, match="res_proj1.weight"):
        model_from_released(sd)


# ---- D_in = H: the released encoder's first residual is the identity ----------------------------


def _released_shapes(d: int, h: int, r: int, s: int, k: int, g: int, o: int, c: int) -> dict:
    """Learned tensors of a released state dict at D_in = H, written out from the key list in
    docs/METHOD.md §2.8 (no ``wsi_encoder.res_proj1.*``)."""
    assert d == h
    shapes: dict[str, tuple[int, ...]] = {"attn_log_tau": ()}
    for prefix, (n_in, n_out) in (("rna_tower.encoder", (g, r)), ("rna_decoder.decoder", (r, g))):
        shapes.update(
            {
                f"{prefix}.0.weight": (o, n_in),
                f"{prefix}.0.bias": (o,),
                f"{prefix}.1.weight": (o,),
                f"{prefix}.1.bias": (o,),
                f"{prefix}.4.weight": (n_out, o),
                f"{prefix}.4.bias": (n_out,),
            }
        )
    for layer, n_in in (("gat1", d), ("gat2", h)):
        shapes.update(
            {
                f"wsi_encoder.{layer}.att": (1, 2, h // 2),
                f"wsi_encoder.{layer}.bias": (h,),
                f"wsi_encoder.{layer}.lin_l.weight": (h, n_in),
                f"wsi_encoder.{layer}.lin_l.bias": (h,),
                f"wsi_encoder.{layer}.lin_r.weight": (h, n_in),
                f"wsi_encoder.{layer}.lin_r.bias": (h,),
            }
        )
    for ln in ("ln1", "ln2"):
        shapes.update({f"wsi_encoder.{ln}.weight": (h,), f"wsi_encoder.{ln}.bias": (h,)})
    for proj, n_in in (("rna_projector", r), ("wsi_patch_projector", h), ("wsi_pool_projector", h)):
        shapes.update({f"{proj}.weight": (s, n_in), f"{proj}.bias": (s,)})
    shapes.update({"mem_pos._codebook.embed": (1, k, s), "mem_neg._codebook.embed": (1, k, s)})
    shapes.update(
        {
            "wsi_classifier_proto.0.weight": (h,),
            "wsi_classifier_proto.0.bias": (h,),
            "wsi_classifier_proto.1.weight": (c, h),
            "wsi_classifier_proto.1.bias": (c,),
            "wsi_classifier_proto.4.weight": (2, c),
            "wsi_classifier_proto.4.bias": (2,),
        }
    )
    return shapes


def _released_sd_at_d_equal_h() -> dict[str, torch.Tensor]:
    shapes = _released_shapes(d=16, h=16, r=6, s=5, k=3, g=9, o=7, c=4)
    gen = torch.Generator().manual_seed(11)
    sd = {key: torch.randn(shape, generator=gen) * 0.3 for key, shape in shapes.items()}
    for c in ("pos", "neg"):
        sd[f"mem_{c}._codebook.initted"] = torch.ones(1)
        sd[f"mem_{c}._codebook.cluster_size"] = torch.ones(1, 3)
        sd[f"mem_{c}._codebook.embed_avg"] = sd[f"mem_{c}._codebook.embed"].clone()
    return sd


def _hand_encoder(sd: dict[str, torch.Tensor], x: torch.Tensor, ei: torch.Tensor) -> torch.Tensor:
    """The released encoder at D_in = H computed from the released tensors by hand."""
    from types import SimpleNamespace

    from test_model import _elu, _gatv2_hand

    def conv(layer: str) -> SimpleNamespace:
        w = f"wsi_encoder.{layer}."
        return SimpleNamespace(
            att=sd[w + "att"],
            bias=sd[w + "bias"],
            lin_l=SimpleNamespace(weight=sd[w + "lin_l.weight"], bias=sd[w + "lin_l.bias"]),
            lin_r=SimpleNamespace(weight=sd[w + "lin_r.weight"], bias=sd[w + "lin_r.bias"]),
        )

    def ln(v: torch.Tensor, name: str) -> torch.Tensor:
        mu = v.mean(dim=1, keepdim=True)
        var = ((v - mu) ** 2).mean(dim=1, keepdim=True)
        w, b = sd[f"wsi_encoder.{name}.weight"], sd[f"wsi_encoder.{name}.bias"]
        return (v - mu) / torch.sqrt(var + 1e-5) * w + b

    edges = [(int(s), int(t)) for s, t in ei.T]
    h1 = _elu(ln(_gatv2_hand(conv("gat1"), x, edges), "ln1")) + x  # identity residual
    h2 = _elu(ln(_gatv2_hand(conv("gat2"), h1, edges), "ln2")) + h1
    return torch.where(h1 > h2, h1, h2)


@torch.no_grad()
def test_round_trip_at_d_in_equal_to_hidden() -> None:
    sd = _released_sd_at_d_equal_h()
    assert len(sd) == 49 and not any("res_proj1" in key for key in sd)
    model = model_from_released(sd).eval()
    assert model.cfg.d_in == model.cfg.hidden == 16
    assert model.cfg.input_residual == "auto"
    assert isinstance(model.histology_encoder.res_proj1, torch.nn.Identity)
    assert set(released_keys(model)) == set(sd) == set(RELEASED_KEYS) - set(RESIDUAL_KEYS)
    back = export_released_state_dict(model)
    assert set(back) == set(sd)
    for key, value in sd.items():
        assert torch.equal(back[key], value.reshape(back[key].shape)), key
    # the loaded encoder is the released one: compare with a hand-written encoder on its tensors
    x, ei = _bag(9, 16, seed=6)
    torch.testing.assert_close(
        model.histology_encoder(x, ei), _hand_encoder(sd, x, ei), rtol=1e-4, atol=1e-5
    )
    # a fresh model of the same config loads it strictly and gives the same logits
    fresh = MoMKD(model.cfg).eval()
    assert load_released_state_dict(fresh, sd) == ([], [])
    assert torch.equal(fresh(x, ei).logits, model(x, ei).logits)


def test_residual_projection_at_d_in_equal_to_hidden_is_not_released() -> None:
    sd = _released_sd_at_d_equal_h()
    sd["wsi_encoder.res_proj1.weight"] = torch.zeros(16, 16)
    sd["wsi_encoder.res_proj1.bias"] = torch.zeros(16)
    cfg = model_from_released(_released_sd_at_d_equal_h()).cfg
    with pytest.raises(ConfigError, match=r"unexpected keys: wsi_encoder\.res_proj1"):
        load_released_state_dict(MoMKD(cfg), sd)
    # a momkd model built with input_residual: linear exports and re-imports its projection
    linear = model_from_released(sd)
    assert linear.cfg.input_residual == "linear"
    assert set(export_released_state_dict(linear)) == set(RELEASED_KEYS)
