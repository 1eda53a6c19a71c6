"""HOPE model: chunk-parallel == token-sequential, CMS update periods, reductions, gradient flow."""

import copy

import pytest
import torch
import torch.nn.functional as F

from deepopt.hope.model import (
    VARIANTS,
    CausalConv,
    CMSLevel,
    HopeConfig,
    LanguageModel,
    SelfModifyingTitans,
    _ShiftedSums,
    apply_variant,
    compile_model,
    matched_transformer,
    n_params,
    set_in_context_learning,
)
from deepopt.hope.train import model_config

TINY = {"d_model": 16, "n_heads": 2, "n_layers": 2, "mem_hidden": 8, "chunk_size": 5, "cms_periods": (3, 7, None),
        "cms_hidden": 12}


def perturbed(cfg: HopeConfig, seed: int = 0) -> LanguageModel:
    """A float64 model with all parameters jittered so no piece sits at a special initial value."""
    torch.manual_seed(seed)
    m = LanguageModel(cfg).double()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
        for blk in m.blocks:  # larger learning rates and forgetting so the memories really move
            blk.titans.f.b_eta.fill_(2.0)
            blk.titans.f.b_alpha.fill_(1.0)
    return m


@pytest.mark.parametrize("overrides", [
    {},
    {"inner_rule": "momentum", "inner_hparams": {"momentum": 0.7}},
    {"inner_rule": "momentum", "inner_hparams": {"momentum": 0.5, "nesterov": True, "weight_decay": 0.1}},
    {"self_modifying": False},
    {"delta_gd": False, "cms_rule": "momentum"},
    {"titans_inputs": "per_memory", "titans_w2_init": "orthogonal"},
    {"titans_inputs": "per_memory", "self_modifying": False},
], ids=["gd", "momentum", "nesterov-wd", "no-selfmod", "no-delta", "per-memory-inputs", "per-memory-no-selfmod"])
def test_chunk_parallel_equals_token_sequential_float64(overrides):
    cfg = HopeConfig(**TINY, eta_max=1.0, **overrides)
    m = perturbed(cfg)
    idx = torch.randint(0, 256, (2, 23))  # 23: the last Titans and CMS chunks are partial
    par, _ = m(idx)
    seq, _ = m(idx, reference=True)
    assert (par - seq).abs().max() <= 1e-8
    x = torch.randn(2, 23, cfg.d_model, dtype=torch.float64)
    titans = m.blocks[0].titans.f
    _, w_par = titans(x, return_state=True)
    _, w_seq = titans(x, reference=True, return_state=True)
    init = titans._initial_state(2)
    for a, b, w0 in zip(w_par, w_seq, init):
        assert (a - b).abs().max() <= 1e-8
        assert (a - w0).abs().max() > 1e-3  # the memories did update
    err = 0.05 * torch.randn_like(x)
    for level in m.blocks[0].cms:
        _, (p1, p2, n_par) = level(x, err, return_state=True)
        _, (s1, s2, n_seq) = level(x, err, reference=True, return_state=True)
        assert n_par == n_seq == (0 if level.period is None else 23 // level.period)
        assert max((p1 - s1).abs().max(), (p2 - s2).abs().max()) <= 1e-8


@pytest.mark.parametrize("period", [1, 4, 5])
def test_cms_level_updates_exactly_every_period(period):
    torch.manual_seed(0)
    cfg = HopeConfig(**{**TINY, "cms_periods": (period,)}, cms_lr=1.0)
    level = CMSLevel(cfg, period).double()
    T = 20
    x = torch.randn(1, T, cfg.d_model, dtype=torch.float64)
    err = 0.05 * torch.randn_like(x)  # the size of a next-token loss's error signals
    y, (_, _, n_updates) = level(x, err, return_state=True)
    assert n_updates == T // period
    # Perturbing token s changes token t != s only once the chunk holding s has been applied to the state:
    # exactly the tokens from the next multiple of `period` on.
    for s in range(T):
        xp = x.clone()
        xp[0, s] += 1.0
        changed = ((level(xp, err) - y).abs().amax(-1)[0] > 1e-12).nonzero().flatten().tolist()
        first = (s // period + 1) * period
        assert changed == [s] + list(range(max(first, s + 1), T)), (s, changed)


def test_infinite_periods_and_frozen_memory_reduce_to_residual_mlp_block():
    cfg = HopeConfig(**{**TINY, "cms_periods": (None, None), "n_layers": 1})
    m = perturbed(cfg)
    blk = m.blocks[0]
    titans = blk.titans.f
    with torch.no_grad():  # frozen memory: η = 0 and α = 1 exactly
        titans.b_eta.fill_(-1e4)
        titans.b_alpha.fill_(1e4)
    x = torch.randn(2, 11, cfg.d_model, dtype=torch.float64)
    # static read of the initial output memory, then two plain residual MLPs h + W₁σ(W₂ norm(h))
    _, q = titans._project(blk.titans.norm(x))
    w1, w2 = titans.W1[:, -1], titans.W2[:, -1]
    y = q + F.silu(q @ w2.mT) @ w1.mT
    h = x + titans.out_proj(y.transpose(1, 2).reshape(2, 11, -1))
    for level in blk.cms:
        h = h + F.silu(level.norm(h) @ level.W2.mT) @ level.W1.mT
    assert torch.allclose(blk(x), h, atol=1e-12, rtol=0)
    _, w_end = titans(blk.titans.norm(x), return_state=True)
    assert torch.equal(w_end[0], titans.W1.expand_as(w_end[0]))  # no memory moved


@pytest.mark.parametrize("self_modifying", [True, False])
def test_gradients_reach_meta_learned_initial_states(self_modifying):
    cfg = HopeConfig(**TINY, self_modifying=self_modifying)
    m = perturbed(cfg)
    idx = torch.randint(0, 256, (2, 23))
    _, loss = m(idx, idx)
    loss.backward()
    titans = m.blocks[0].titans.f
    for g in (titans.W1.grad, titans.W2.grad):
        per_memory = g.abs().sum(dim=(0, 2, 3))
        assert (per_memory > 0).all(), per_memory  # every memory's θ₀ (k, v, η, α, mem) gets a gradient
    # the gradient also flows through the in-context updates: it changes when the memory learns faster
    g_slow = titans.W1.grad.clone()
    m.zero_grad()
    with torch.no_grad():
        titans.b_eta.add_(3.0)
    m(idx, idx)[1].backward()
    assert not torch.allclose(g_slow, titans.W1.grad)
    for level in m.blocks[0].cms:
        assert level.W1.grad.abs().sum() > 0 and level.W2.grad.abs().sum() > 0
        if level.period is not None:
            assert level.eta_rho.grad.abs() > 0  # η^{(ℓ)} only matters through the in-context updates


def test_transformer_matches_hope_parameter_count_and_variants_build():
    cfg = HopeConfig()
    hope, tf = n_params(cfg), n_params(matched_transformer(cfg))
    assert abs(tf - hope) / hope < 0.01
    idx = torch.randint(0, 256, (1, 9))
    for name in VARIANTS:
        logits, loss = LanguageModel(apply_variant(HopeConfig(**TINY), name))(idx, idx)
        assert logits.shape == (1, 9, 256) and torch.isfinite(loss), name


@pytest.mark.parametrize("bad, err", [
    ({"model": "rnn"}, ValueError), ({"d_model": 15}, ValueError), ({"cms_periods": (0,)}, ValueError),
    ({"inner_rule": "adam"}, ValueError), ({"inner_rule": "nope"}, ValueError), ({"eta_max": 2.5}, ValueError),
    ({"inner_hparams": {"momentum": 0.9, "nonlinearity": "newton_schulz"}, "inner_rule": "momentum"}, ValueError),
    ({"inner_hparams": {"bogus": 1}}, TypeError), ({"activation": "swish"}, ValueError), ({"cms_lr": 0.0}, ValueError),
])
def test_bad_config_is_rejected_with_the_argument_named(bad, err):
    with pytest.raises(err):
        HopeConfig(**bad)


@pytest.mark.parametrize("bad", [{"eta_form": "per_chunk"}, {"cms_error": "global"}, {"memory_carry": "all"},
                                 {"eta_bias": float("nan")}, {"eta_max": -0.1}, {"titans_inputs": "separate"},
                                 {"titans_w2_init": "uniform"}])
def test_bad_memory_options_are_rejected_with_the_option_named(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        HopeConfig(**bad)


def test_config_round_trips_through_dict():
    cfg = HopeConfig(**TINY)
    assert HopeConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown"):
        HopeConfig.from_dict({"width": 3})


def test_a_config_saved_before_the_memory_options_loads_with_their_former_forms():
    """A saved config without ``eta_form``/``cms_error``/``memory_carry`` (written before they existed) means the
    forms of its time: chunk-capped steps, the shared δ, no carry; a partial dict takes today's defaults."""
    saved = HopeConfig(eta_form="chunk_capped").to_dict()
    for name in ("eta_form", "cms_error", "memory_carry", "titans_inputs", "titans_w2_init"):
        del saved[name]
    old = HopeConfig.from_dict(saved)
    assert (old.eta_form, old.cms_error, old.memory_carry, old.eta_bias) == ("chunk_capped", "shared", "none", -1.0)
    assert (old.titans_inputs, old.titans_w2_init) == ("shared", "gaussian")
    new = HopeConfig.from_dict({"d_model": 32})
    assert (new.eta_form, new.cms_error, new.eta_bias) == ("per_token", "per_level", -1.0)
    assert (new.titans_inputs, new.titans_w2_init) == ("per_memory", "orthogonal")


def test_titans_inputs_and_orthogonal_w2_init():
    """``titans_inputs="per_memory"``: M_k, M_v, M_η, M_α read four different projections of the token (one
    broadcast input with "shared"); ``titans_w2_init="orthogonal"``: every singular value of W₂ is its gain."""
    x = torch.randn(2, 9, TINY["d_model"])
    for inputs, distinct in (("per_memory", True), ("shared", False)):
        layer = SelfModifyingTitans(HopeConfig(**TINY, titans_inputs=inputs))
        u, q = layer._project(x)
        assert u.shape == (2, layer.cfg.n_heads, 4, 9, layer.dh) and q.shape == (2, layer.cfg.n_heads, 9, layer.dh)
        assert bool((u[:, :, 0] - u[:, :, 1]).abs().max() > 1e-3) is distinct
    gains = (1.0, 2.0, 3.0, 0.5, 2.0)
    for hid in (4, TINY["d_model"] // TINY["n_heads"], 40):  # wide, square and tall W₂
        layer = SelfModifyingTitans(HopeConfig(**{**TINY, "mem_hidden": hid}, titans_w2_init="orthogonal",
                                               titans_w2_gain=gains))
        sv = torch.linalg.svdvals(layer.W2.detach())  # (H, 5, min(hid, d_head))
        torch.testing.assert_close(sv, torch.tensor(gains)[:, None].expand_as(sv), rtol=1e-5, atol=1e-5)


def test_titans_layer_is_causal():
    cfg = HopeConfig(**TINY)
    torch.manual_seed(0)
    layer = SelfModifyingTitans(cfg).double()
    x = torch.randn(1, 12, cfg.d_model, dtype=torch.float64)
    y = layer(x)
    xp = x.clone()
    xp[0, 7] += 1.0
    diff = (layer(xp) - y).abs().amax(-1)[0]
    assert (diff[:7] == 0).all() and diff[7] > 0


@pytest.mark.parametrize("variant", ["hope", "transformer"])
def test_compile_model_gives_the_eager_loss_and_gradients(variant):
    """``compile_model`` swaps in compiled chunk functions / blocks (aot_eager here: the graphs inductor
    would get, without its C++ build time) and changes no number."""
    cfg = model_config(variant, "smoke")
    torch.manual_seed(0)
    eager = LanguageModel(cfg).double()
    compiled = copy.deepcopy(eager)
    compile_model(compiled, backend="aot_eager", dynamic=False)
    block = compiled.blocks[0]
    if variant == "hope":
        assert hasattr(block.titans.f._parallel_chunk, "_torchdynamo_orig_callable")
        assert all(hasattr(level._chunk, "_torchdynamo_orig_callable") for level in block.cms)
    else:
        assert block._compiled_call_impl is not None
    x = torch.randint(0, cfg.vocab_size, (2, 21))
    losses = []
    for m in (eager, compiled):
        _, loss = m(x[:, :-1], x[:, 1:])
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-12, atol=1e-12)
    for (n, a), b in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-10, atol=1e-12, msg=n)


@pytest.mark.parametrize("size", ["smoke", "tiny", "small", "base"])
def test_every_size_preset_builds_and_the_transformer_matches_its_parameter_count(size):
    hope_cfg, transformer_cfg = model_config("hope", size), model_config("transformer", size)
    h, t = n_params(hope_cfg), n_params(matched_transformer(transformer_cfg))
    assert abs(h - t) / h < 0.01


def test_cms_step_is_eq71_gradient_descent_on_the_error_signal():
    """One period's update equals θ₀ − η/C·∇_θ Σ_t⟨M_θ(k_t), δ̃_t⟩ (autograd), η = softplus(ρ), with the
    normalised-LMS scalings: δ̃ = δ/(1 + ‖h‖²) for W₁, δ/((1 + ‖W₁‖²)·d) for W₂."""
    torch.manual_seed(1)
    cfg = HopeConfig(**{**TINY, "cms_periods": (6,)}, cms_lr=0.7)
    level = CMSLevel(cfg, 6).double()
    x, err = torch.randn(1, 6, cfg.d_model, dtype=torch.float64), torch.randn(1, 6, cfg.d_model, dtype=torch.float64)
    _, (w1, w2, n) = level(x, err, return_state=True)
    y = level(x)  # θ₀ read throughout
    h = F.silu(level.norm(x) @ level.W2.mT)
    g1 = torch.autograd.grad((y * err / (1 + (h * h).sum(-1, keepdim=True))).sum(), level.W1, retain_graph=True)[0]
    g2 = torch.autograd.grad((y * err).sum(), level.W2)[0] / ((1 + (level.W1 ** 2).sum()) * cfg.d_model)
    eta = F.softplus(level.eta_rho)
    assert n == 1 and abs(float(eta.detach()) - 0.7) < 1e-6
    torch.testing.assert_close(w1[0], level.W1 - eta / 6 * g1, rtol=0, atol=1e-12)
    torch.testing.assert_close(w2[0], level.W2 - eta / 6 * g2, rtol=0, atol=1e-12)


@pytest.mark.parametrize("cms_error", ["per_level", "shared"])
def test_forward_shares_block0_titans_branch_between_error_pass_and_model_pass(cms_error):
    """``LanguageModel.forward`` computes block 0's Titans branch once for both passes: its loss and every
    gradient equal those of the two passes run separately (δ from ``cms_errors`` alone, then every block)."""
    m = perturbed(HopeConfig(**TINY, cms_error=cms_error))
    idx = torch.randint(0, 256, (2, 13))
    _, loss = m(idx, idx)
    grads = torch.autograd.grad(loss, list(m.parameters()), allow_unused=True)
    errors = m.cms_errors(idx)
    x = m.embed(idx)
    for blk, err in zip(m.blocks, errors, strict=True):
        x = blk(x, err)
    ref = F.cross_entropy((m.norm(x) @ m.embed.weight.mT).flatten(0, 1), idx.flatten())
    ref_grads = torch.autograd.grad(ref, list(m.parameters()), allow_unused=True)
    torch.testing.assert_close(loss, ref, rtol=0, atol=1e-12)
    for g, r in zip(grads, ref_grads, strict=True):
        assert (g is None) == (r is None)
        if g is not None:
            torch.testing.assert_close(g, r, rtol=0, atol=1e-12)


@pytest.mark.parametrize("cms_error", ["per_level", "shared"])
def test_cms_error_signals_are_next_token_loss_gradients_and_the_model_stays_causal(cms_error):
    """δ_t = ∂ℓ_t/∂(the level's output) at position t with the Titans branches held constant (per_level), or at the
    final residual stream (shared), of the model whose CMS levels do not learn; the model stays causal."""
    cfg = HopeConfig(**{**TINY, "cms_periods": (4, 6, None)}, cms_error=cms_error)
    m = perturbed(cfg)
    idx = torch.randint(0, 256, (1, 13))
    errors = m.cms_errors(idx)
    assert [len(row) for row in errors] == [3] * cfg.n_layers
    assert all((row[2] is None) == (cms_error == "per_level") for row in errors)  # period ∞: no δ of its own
    set_in_context_learning(m, cms=False)
    x = m.embed(idx)
    outputs, branches = [], []
    for blk in m.blocks:
        branch = blk.titans.f(blk.titans.norm(x)).detach()  # held constant: only position-wise paths remain
        branches.append(branch)
        x = x + branch
        for level in blk.cms:
            x = level(x)
            outputs.append(x)
    losses = F.cross_entropy(m.norm(x)[0] @ m.embed.weight.mT, torch.cat([idx[0, 1:], idx[0, :1]]), reduction="none")
    flat = [e for row in errors for e in row]
    for out, err in zip(outputs, flat, strict=True):
        target = x if cms_error == "shared" else out
        if err is None:
            continue
        assert err.shape == (1, 13, cfg.d_model)
        assert err[0, -1].abs().max() == 0 and err[0, :-1].abs().amax(-1).min() > 0  # no target after T−1
        for t in (0, 5, 11):
            grad = torch.autograd.grad(losses[t], target, retain_graph=True)[0]
            torch.testing.assert_close(grad[0, t], err[0, t])
            assert grad[0, t + 1:].abs().max() == 0  # ℓ_t reaches no later position: the pass is causal
    if cms_error == "per_level":  # the levels' signals differ (the Jacobians of the levels above them)
        assert (flat[0] - flat[1]).abs().max() > 1e-6 and (flat[0] - flat[3]).abs().max() > 1e-6
    set_in_context_learning(m, cms=True)
    logits, _ = m(idx)
    for s in (3, 4, 9):
        other = idx.clone()
        other[0, s] = (idx[0, s] + 1) % 256
        diff = (m(other)[0] - logits).abs().amax(-1)[0]
        assert (diff[:s] == 0).all() and diff[s] > 0, s


def test_switching_in_context_learning_off_freezes_every_memory_at_its_initial_state():
    cfg = HopeConfig(**TINY)
    m = perturbed(cfg)
    frozen = copy.deepcopy(m)
    with torch.no_grad():
        for blk in frozen.blocks:
            blk.titans.f.b_eta.fill_(-1e4)
            blk.titans.f.b_alpha.fill_(1e4)
            for level in blk.cms:
                level.period = None
    idx = torch.randint(0, 256, (2, 17))
    learning, _ = m(idx)
    set_in_context_learning(m, cms=False)
    no_cms, _ = m(idx)
    set_in_context_learning(m, titans=False)
    assert not m.cms_learns
    torch.testing.assert_close(m(idx)[0], frozen(idx)[0], rtol=0, atol=1e-12)
    assert (no_cms - learning).abs().max() > 1e-6 and (m(idx)[0] - no_cms).abs().max() > 1e-6
    set_in_context_learning(m, cms=True, titans=True)
    torch.testing.assert_close(m(idx)[0], learning, rtol=0, atol=0)


def test_single_cms_variant_is_one_middle_level_with_every_level_s_width():
    for size in ("tiny", "small"):
        base, single = model_config("hope", size), model_config("hope-single-cms", size)
        finite = [p for p in base.cms_periods if p is not None]
        assert single.cms_periods == (finite[len(finite) // 2],)
        assert single.cms_hidden == base.cms_hidden * len(base.cms_periods)
        assert single == apply_variant(base, "hope-single-cms")  # one definition, whichever path builds it


@pytest.mark.parametrize("size, low, high", [("125m", 115e6, 140e6), ("340m", 320e6, 360e6)])
def test_paper_scale_presets_are_parameter_matched_without_allocating_them(size, low, high):
    """Counted on the meta device (``n_params``): no 340M floats are allocated."""
    hope_cfg = model_config("hope", size, vocab_size=32000)
    h, t = n_params(hope_cfg), n_params(matched_transformer(model_config("transformer", size, vocab_size=32000)))
    assert low <= h <= high and abs(h - t) / h < 0.01, (h, t)


def test_compiled_chunk_functions_serve_every_chunk_with_one_graph():
    """``compile_model`` compiles the per-chunk functions: the first chunk of a sequence and every later one must
    share one graph (same tensor types, ranks and layouts), so no chunk recompiles and the compile cache cannot
    overflow into eager. One Titans layer and one learning CMS level, 4 chunks each, one grad mode. The Titans layer
    compiles three frames: its scan and, run by the scan op's chunk loop on the CPU, the chunk math's step and VJP."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter

    cfg = HopeConfig(**TINY)
    torch.manual_seed(0)
    x = torch.randn(2, 4 * cfg.chunk_size, cfg.d_model)
    for layer, args, frames in ((SelfModifyingTitans(cfg), (), 3),
                                (CMSLevel(cfg, cfg.chunk_size), (0.05 * torch.randn_like(x),), 1)):
        torch._dynamo.reset()
        counter = CompileCounter()
        model = torch.nn.Sequential(layer)
        compile_model(model, backend=counter)
        layer(x, *args).sum().backward()
        assert counter.frame_count == frames, (type(layer).__name__, counter.frame_count)
    torch._dynamo.reset()


def test_compiled_model_compiles_once_whatever_the_number_of_chunks():
    """``compile_model``: every chunk of a sequence reuses the chunk functions' graphs (states of one type, rank
    and layout from the first chunk on), so the graphs compiled do not grow with the context, and a second
    training step compiles nothing."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter

    frames = {}
    for context in (64, 128):  # 8 and 16 Titans chunks; CMS periods 8 and 16
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = LanguageModel(model_config("hope", "smoke"))
        counter = CompileCounter()
        compile_model(model, backend=counter)
        x = torch.randint(0, 256, (2, context + 1))
        model(x[:, :-1], x[:, 1:])[1].backward()
        first = counter.frame_count
        model(x[:, :-1], x[:, 1:])[1].backward()
        assert counter.frame_count == first, "the second step recompiled"
        frames[context] = first
    torch._dynamo.reset()
    assert frames[64] == frames[128], frames


def test_recomputing_chunk_states_in_backward_gives_the_same_loss_and_gradients():
    """``recompute_chunks=True`` keeps no chunk activations for the backward pass (it recomputes them there):
    the loss and every parameter's gradient are those of the stored-activation model."""
    results = []
    for recompute in (False, True):
        torch.manual_seed(0)
        model = LanguageModel(model_config("hope", "smoke", recompute_chunks=recompute)).double()
        x = torch.randint(0, 256, (2, 49), generator=torch.Generator().manual_seed(1))
        loss = model(x[:, :-1], x[:, 1:])[1]
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters()]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    assert all(torch.allclose(a, b, rtol=0, atol=1e-12) for a, b in zip(grads_a, grads_b))


def test_cms_carry_over_keeps_each_level_s_change_across_sequences_in_training_only():
    """``memory_carry="cms"``: a training pass leaves carry = mean over the batch of (final state − θ₀); the next
    sequences start from θ₀ + carry (scan op and chunk loop alike); evaluation reads it and leaves it alone; the
    default keeps no such state."""
    cfg = HopeConfig(**{**TINY, "cms_periods": (4, None)}, memory_carry="cms")
    assert not any("carry" in n for n, _ in LanguageModel(HopeConfig(**TINY)).named_buffers())
    m = perturbed(cfg)
    level = m.blocks[0].cms[0]
    assert level.carries and not m.blocks[0].cms[1].carries
    x, err = torch.randn(3, 13, cfg.d_model, dtype=torch.float64), 0.05 * torch.randn(3, 13, cfg.d_model,
                                                                                      dtype=torch.float64)
    m.train()
    _, (w1, w2, _) = level(x, err, return_state=True)
    torch.testing.assert_close(level.carry_w1, (w1.mean(0) - level.W1).detach())
    torch.testing.assert_close(level.carry_w2, (w2.mean(0) - level.W2).detach())
    assert level.carry_w1.abs().max() > 1e-4
    loop = copy.deepcopy(level)
    loop.scans = False
    for lv in (level, loop):  # both paths start the next sequence from θ₀ + carry
        lv.eval()
        y = lv(x)  # no error signal: reads the start state throughout
        torch.testing.assert_close(y, x + F.silu(lv.norm(x) @ (lv.W2 + lv.carry_w2).mT) @ (lv.W1 + lv.carry_w1).mT)
    before = level.carry_w1.clone()
    level(x, err)  # evaluation: carry unchanged
    assert torch.equal(level.carry_w1, before)
    state = m.state_dict()
    assert "blocks.0.cms.0.carry_w1" in state
    fresh = LanguageModel(cfg).double()
    fresh.load_state_dict(state)
    assert torch.equal(fresh.blocks[0].cms[0].carry_w1, before)


@pytest.mark.parametrize("length", [1, 2, 3, 9])
def test_causal_conv_is_the_shifted_sum_and_differentiable_twice(length):
    """``CausalConv``'s in-place shifted sums and hand-written reverse mode: equal to ``Σ_j c_j ⊙ x_{t−j}`` over a
    zero-padded copy (sequences shorter than the width too), gradcheck and gradgradcheck in float64."""
    torch.manual_seed(length)
    conv = CausalConv(5, 4, tap_std=0.5).double()
    x = torch.randn(2, length, 5, dtype=torch.float64, requires_grad=True)
    c = conv.weight
    padded = F.pad(x, (0, 0, 3, 0))
    expected = sum(c[j] * padded[:, 3 - j:3 - j + length] for j in range(4))
    torch.testing.assert_close(conv(x), expected, rtol=0, atol=1e-15)
    gy = torch.randn_like(expected)
    torch.testing.assert_close(torch.autograd.grad(conv(x), (x, c), gy), torch.autograd.grad(expected, (x, c), gy))
    assert torch.autograd.gradcheck(_ShiftedSums.apply, (x, c))
    assert torch.autograd.gradgradcheck(_ShiftedSums.apply, (x, c))
