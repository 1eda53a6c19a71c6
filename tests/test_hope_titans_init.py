"""Initial state θ₀ of HOPE's Titans memories: config options, their statistics, the planted-write read-back."""

import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from deepopt.hope.model import (
    TITANS_MEMORIES,
    HopeConfig,
    SelfModifyingTitans,
    apply_variant,
    planted_write_readback,
)

SMALL = {"d_model": 64, "n_heads": 4, "mem_hidden": 16}


def _unit_pairs(cfg: HopeConfig, n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shape = (cfg.n_heads, n, cfg.d_model // cfg.n_heads)
    return F.normalize(torch.randn(shape, generator=g), dim=-1), F.normalize(torch.randn(shape, generator=g), dim=-1)


def test_init_options_give_the_stated_statistics():
    std, gain = (0.01, 0.05, 0.1, 0.2, 0.4), (0.5, 1.0, 2.0, 3.0, 4.0)
    cfg = HopeConfig(**SMALL, titans_w1_std=std, titans_w2_gain=gain, titans_w2_init="gaussian", conv_tap_std=0.7)
    torch.manual_seed(0)
    layer = SelfModifyingTitans(cfg)
    dh = cfg.d_model // cfg.n_heads
    for i, name in enumerate(TITANS_MEMORIES):  # 1024 entries per memory: the sample std is within ~5%
        assert layer.W1[:, i].std().item() == pytest.approx(std[i], rel=0.1), name
        assert layer.W2[:, i].std().item() == pytest.approx(gain[i] / dh ** 0.5, rel=0.1), name
    assert torch.equal(layer.conv.weight[0], torch.ones(5 * cfg.d_model))  # u_k, u_v, u_η, u_α and q
    assert layer.conv.weight[1:].std().item() == pytest.approx(0.7, rel=0.1)


def test_scalar_option_means_every_memory_and_round_trips_through_json():
    cfg = HopeConfig(titans_w1_std=0.3, titans_w2_gain=(1, 2, 3, 4, 5))
    assert cfg.titans_w1_std == (0.3,) * 5 and cfg.titans_w2_gain == (1.0, 2.0, 3.0, 4.0, 5.0)
    assert HopeConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize("bad", [
    {"titans_w1_std": -0.1}, {"titans_w1_std": (0.1, 0.2)}, {"titans_w2_gain": float("nan")},
    {"titans_w2_gain": "4"}, {"titans_w2_gain": True}, {"conv_tap_std": -1.0}, {"conv_tap_std": float("inf")},
])
def test_bad_init_options_are_rejected_with_the_argument_named(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        HopeConfig(**bad)


def test_planted_write_is_read_back_far_more_with_the_recall_init_than_the_old_one():
    """The old θ₀ (W₁ std 0.02, W₂ gain 1) reads back ~2% of one write at the chunk-capped form's cap η_max/C = 1/8;
    the shared-input form's θ₀ (docs/notes/hope-recall.md §6) ~9%, limited by the cap: C = 4 doubles it again."""
    new = apply_variant(HopeConfig(**SMALL, eta_form="chunk_capped"), "hope-shared-inputs")
    old = replace(new, titans_w1_std=0.02, titans_w2_gain=1.0, chunk_size=16)
    rho = {}
    for name, cfg in (("old", old), ("new", new)):
        torch.manual_seed(0)
        layer = SelfModifyingTitans(cfg)
        keys, targets = _unit_pairs(cfg)
        rho[name] = planted_write_readback(layer, keys, targets).mean().item()
        # the write decays with α^gap and nothing else moves the state
        later = planted_write_readback(layer, keys, targets, gap=32).mean().item()
        alpha = torch.sigmoid(layer.b_alpha[0]).item()
        assert alpha ** 96 * rho[name] < later < rho[name]
    assert rho["old"] < 0.03
    assert rho["new"] > 3 * rho["old"]
    torch.manual_seed(0)
    short = SelfModifyingTitans(replace(new, chunk_size=4))
    assert planted_write_readback(short, *_unit_pairs(short.cfg)).mean().item() > 1.8 * rho["new"]


def test_per_token_write_strength_does_not_depend_on_the_chunk_size():
    """With per-token steps a write at a given η (the cap, or the initial η_cap·sigmoid(b_η)) reads back the same at
    C = 4 and C = 16; the chunk-capped form's cap falls as 1/C."""
    rho = {}
    for form in ("per_token", "chunk_capped"):
        for C in (4, 16):
            torch.manual_seed(0)
            layer = SelfModifyingTitans(HopeConfig(**SMALL, chunk_size=C, eta_form=form,
                                                   eta_bias=-4.0 if form == "per_token" else -1.0))
            pairs = _unit_pairs(layer.cfg)
            init_eta = layer.eta_cap * torch.sigmoid(layer.b_eta[0]).item()
            rho[form, C] = (planted_write_readback(layer, *pairs, eta=init_eta).mean().item(),
                            planted_write_readback(layer, *pairs).mean().item())
    assert rho["per_token", 4] == rho["per_token", 16]
    assert rho["chunk_capped", 4][0] > 1.8 * rho["chunk_capped", 16][0]
    # η at init: 2·sigmoid(−4) = 0.036 per token, (2/16)·sigmoid(−1) = 0.034 capped at C = 16
    assert rho["per_token", 16][0] == pytest.approx(rho["chunk_capped", 16][0], rel=0.1)
    with pytest.raises(ValueError, match="eta"):
        planted_write_readback(layer, *pairs, eta=2.5)


def test_planted_write_with_full_step_recovers_the_target_for_a_linear_memory():
    """With σ = identity, W₂ = 0 and Delta GD off, M(k) = k + W₁·0 = k, so h = 0 and nothing is written (ρ = 0);
    with W₁ = 0 and σ = identity, h = W₂k and the W₁ step removes η‖h‖²/(1 + ‖h‖²) of the error (exact)."""
    cfg = HopeConfig(**SMALL, activation="identity", delta_gd=False, chunk_size=2, eta_max=2.0,
                     eta_form="chunk_capped", titans_w1_std=0.0, titans_w2_gain=1.0)
    torch.manual_seed(0)
    layer = SelfModifyingTitans(cfg)
    keys, targets = _unit_pairs(cfg)
    h = keys @ layer.W2[:, -1].mT  # (H, N, hid)
    hh = (h * h).sum(-1)
    # W₂'s own step is g₂ = σ'(z) ⊙ W₁ᵀe = 0 with W₁ = 0, so only W₁ moves: read-back η‖h‖²/(1+‖h‖²), η = 1
    torch.testing.assert_close(planted_write_readback(layer, keys, targets), hh / (1 + hh), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="shape"):
        planted_write_readback(layer, keys[:, :, :3], targets[:, :, :3])
    with pytest.raises(ValueError, match="gap"):
        planted_write_readback(layer, keys, targets, gap=-1)
