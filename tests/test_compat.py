"""Compatibility with the released implementation's state dict (docs/METHOD.md §2.8)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from momkd.compat import (
    RELEASED_KEYS,
    export_released_state_dict,
    load_released_state_dict,
    model_from_released,
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
