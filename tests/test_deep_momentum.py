"""DeepMomentum's design requirements (issue 11): its limits, its capacity, its stability, its shape-free θ₀."""

import copy
import functools
import json
import math
import warnings

import pytest
import torch
from conftest import batch, small_mlp, train

import deepopt
from deepopt.data import digits_cnn, fit_digits, load_classification
from deepopt.rules import deep_momentum
from deepopt.rules.deep import features, readout_grad

F64 = torch.float64


def flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def trajectory(make, steps: int = 100) -> torch.Tensor:
    model = small_mlp()
    train(model, make(model.parameters()), steps)
    return flat(model)


# ------------------------------------------------------------------ (a) limits: Momentum and the delta rule
@pytest.mark.parametrize("off", [dict(hidden=0), dict(eta=0.0)])
@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("extra", [dict(), dict(preconditioner="adam"), dict(weight_decay=0.01)])
def test_deep_branch_off_is_momentum(off, foreach, extra):
    """hidden = 0, or η = 0 with W₁⁰ = 0: ``Momentum`` with μ = α, exactly (fp64, 100 steps; relative to
    the weights' size, which reach ~10 with the Adam preconditioner)."""
    ours = trajectory(lambda p: deepopt.DeepMomentum(p, lr=0.05, momentum=0.9, foreach=foreach, **off, **extra))
    ref = trajectory(lambda p: deepopt.Momentum(p, lr=0.05, momentum=0.9, **extra))
    assert (ours - ref).abs().max() <= 1e-12 * max(1.0, float(ref.abs().max()))


@pytest.mark.parametrize("foreach", [True, False])
def test_l2_objective_linear_limit_is_the_delta_rule(foreach):
    """``objective="l2"`` without the deep branch is DeltaMomentum (``m ← αm − β⟨m, k̂⟩k̂ + g``)."""
    ours = trajectory(lambda p: deepopt.DeepMomentum(p, lr=0.05, momentum=0.8, beta=1.2, hidden=0,
                                                      objective="l2", foreach=foreach))
    ref = trajectory(lambda p: deepopt.DeltaMomentum(p, lr=0.05, momentum=0.8, beta=1.2))
    assert (ours - ref).abs().max() <= 1e-12


# ------------------------------------------------------------------ (b) the deep branch adds capacity
@pytest.mark.parametrize("objective", ["dot", "l2"])
def test_deep_branch_changes_the_trajectory_and_neither_objective_is_sgd(objective):
    on = trajectory(lambda p: deepopt.DeepMomentum(p, lr=0.05, objective=objective, eta=0.5))
    linear = trajectory(lambda p: deepopt.DeepMomentum(p, lr=0.05, objective=objective, hidden=0))
    sgd = trajectory(lambda p: torch.optim.SGD(p, lr=0.05 / (1 - 0.9)))  # the same long-run step size
    assert (on - linear).norm() / linear.norm() > 1e-3
    assert (on - sgd).norm() / sgd.norm() > 1e-2


@pytest.mark.parametrize("objective", ["dot", "l2"])
def test_consistent_gradients_accumulate(objective):
    """The issue's measurement: on consistent noisy gradients the step grows like momentum's,
    |u|/|g| ≈ 1/(1 − α) (dot), or the delta rule's 1/(1 − α + β) (l2), not SGD's |u|/|g| = 1."""
    gen = torch.Generator().manual_seed(0)
    w = torch.zeros(64, 32, dtype=F64, requires_grad=True)
    opt = deepopt.DeepMomentum([w], lr=1.0, objective=objective)
    mean = torch.randn(64, 32, generator=gen, dtype=F64)
    for _ in range(50):
        g = mean + 0.3 * torch.randn(64, 32, generator=gen, dtype=F64)
        before = w.detach().clone()
        w.grad = g
        opt.step()
    step = before - w.detach()
    assert step.norm() / g.norm() > (5 if objective == "dot" else 1.5)
    assert torch.nn.functional.cosine_similarity(step.reshape(-1), mean.reshape(-1), dim=0) > 0.9


# ------------------------------------------------------------------ (c) stability
@pytest.mark.parametrize("objective,eta", [("dot", 0.1), ("dot", 2.0), ("l2", 0.5), ("l2", 1.9)])
def test_readout_update_contracts(objective, eta):
    """W₁ ↦ αW₁ − η∇ℓ is a contraction with factor ρ = max(α, |α − η|) (dot: α), whatever the keys:
    the features are normalised, ‖Φ̂ᵀΦ̂/n‖ ≤ 1."""
    alpha = 0.9
    gen = torch.Generator().manual_seed(1)
    keys = torch.randn(40, 8, generator=gen, dtype=F64) * 50
    keys[20:] = keys[0]  # repeated keys
    values = torch.randn(40, 8, generator=gen, dtype=F64)
    phi = features(keys, torch.randn(6, 8, generator=gen, dtype=F64), "identity")

    def step(w1):
        return alpha * w1 - eta * readout_grad(w1, phi, values, objective)

    a, b = torch.randn(8, 6, generator=gen, dtype=F64), torch.randn(8, 6, generator=gen, dtype=F64)
    rho = alpha if objective == "dot" else max(alpha, abs(alpha - eta))
    assert (step(a) - step(b)).norm() <= rho * (a - b).norm() + 1e-12


@pytest.mark.parametrize("activation", ["identity", "tanh", "relu"])
@pytest.mark.parametrize("objective", ["dot", "l2"])
def test_deep_read_stays_bounded_on_repeated_keys(activation, objective):
    """The issue's divergence cases (identity/tanh activation, identical key blocks, 500 steps):
    ‖u − m‖ ≤ ‖v‖·‖W₁‖_F and ‖W₁‖_F ≤ η/(1 − ρ)."""
    eta, alpha = 0.5, 0.9
    hp = deep_momentum.hparams(lr=1.0, eta=eta, momentum=alpha, hidden=8, key_dim=4, activation=activation,
                               objective=objective, init_scale=3.0)
    w = torch.zeros(16, 4, dtype=F64)
    g = torch.ones(16, 4, dtype=F64)  # every key block the same
    state = deep_momentum.init(w, hp)
    rho = alpha if objective == "dot" else max(alpha, abs(alpha - eta))
    for _ in range(500):
        delta, state = deep_momentum.update(g, state, w, hp)
        deep_read = -delta - state["momentum_buffer"]
        assert state["W1"].norm() <= eta / (1 - rho) + 1e-9
        assert deep_read.norm() <= g.norm() * state["W1"].norm() + 1e-9
    assert math.isfinite(float(delta.norm()))


@functools.cache
def _digits() -> tuple[torch.Tensor, ...]:
    return load_classification("digits", test_fraction=0.2, seed=0)


def _digits_mlp_loss(make, steps: int = 100) -> tuple[float, float]:
    xtr, ytr, _, _ = _digits()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10))
    opt = make(model.parameters())
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        first = float(torch.nn.functional.cross_entropy(model(xtr), ytr))
    for _ in range(steps):
        idx = torch.randint(0, len(xtr), (64,), generator=gen)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
        opt.step()
    with torch.no_grad():
        return first, float(torch.nn.functional.cross_entropy(model(xtr), ytr))


@functools.cache
def _momentum_digits_mlp_loss(lr: float) -> tuple[float, float]:
    return _digits_mlp_loss(lambda p: deepopt.Momentum(p, lr=lr, momentum=0.9))


@pytest.mark.parametrize("objective", ["dot", "l2"])
def test_no_lr_where_momentum_converges_makes_it_diverge(objective):
    for lr in (0.1, 0.3, 1.0, 3.0):  # from where both train well to where Momentum diverges
        first, mom = _momentum_digits_mlp_loss(lr)
        if not (math.isfinite(mom) and mom < first):
            continue
        _, ours = _digits_mlp_loss(lambda p, lr=lr: deepopt.DeepMomentum(p, lr=lr, objective=objective))
        assert math.isfinite(ours) and ours < first, (lr, mom, ours)


RECOMMENDED_LR = 0.03  # docs/notes/deep-momentum.md: DeepMomentum and Momentum (μ = 0.9) at lr 0.03


def test_recommended_lr_trains_the_digits_cnn_as_well_as_momentum():
    def cnn_run(make) -> tuple[float, float]:
        model = digits_cnn(0)
        return fit_digits(model, make(model.parameters()), 200)

    ours = cnn_run(lambda p: deepopt.DeepMomentum(p, lr=RECOMMENDED_LR))
    ref = cnn_run(lambda p: deepopt.Momentum(p, lr=RECOMMENDED_LR, momentum=0.9))
    assert ours[0] >= ref[0] and ours[1] <= ref[1], (ours, ref)
    assert ours[0] > 0.9


# ------------------------------------------------------------------ (d) θ₀ does not depend on shapes
def test_one_memory_init_serves_any_shapes():
    gen = torch.Generator().manual_seed(2)
    theta0 = (0.1 * torch.randn(8, 4, generator=gen), torch.randn(4, 8, generator=gen))
    for shapes in ([(3,), (5, 7)], [(2, 3, 4, 5)], [(1,)]):
        params = [torch.randn(s, requires_grad=True) for s in shapes]
        opt = deepopt.DeepMomentum(params, lr=0.01, hidden=4, key_dim=8, memory_init=theta0)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        for p in params:
            assert opt.state[p]["W1"].shape == (8, 4) and opt.state[p]["W2"].shape == (4, 8)
            assert torch.equal(opt.state[p]["W2"], theta0[1])  # W₂ is meta-learned, not moved online
            assert p.isfinite().all()


def test_zero_gradient_with_zero_state_does_not_move():
    w = torch.randn(5, 6, dtype=F64, requires_grad=True)
    before = w.detach().clone()
    opt = deepopt.DeepMomentum([w], lr=0.1, preconditioner="adam")
    w.grad = torch.zeros_like(w)
    opt.step()
    assert torch.equal(w.detach(), before)


def test_momentum_name_lets_one_cycle_cycle_it():
    w = torch.zeros(3, requires_grad=True)
    opt = deepopt.DeepMomentum([w], lr=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10, cycle_momentum=True)
    moments = []
    for _ in range(5):
        w.grad = torch.ones(3)
        opt.step()
        sched.step()
        moments.append(opt.param_groups[0]["momentum"])
    assert len(set(moments)) > 1


# ------------------------------------------------------------------ (e) the fast paths are the rule
LOOP_OPTIONS = [dict(), dict(activation="relu"), dict(activation="identity", key_dim=5, hidden=3),
                dict(weight_decay=0.01), dict(weight_decay=0.01, decoupled_weight_decay=True, momentum=0.8),
                dict(lr=torch.tensor(0.05))]


@pytest.mark.parametrize("chunk", [16, 48, 1 << 18])
@pytest.mark.parametrize("options", LOOP_OPTIONS)
def test_cpu_loop_equals_the_rule(chunk, options, monkeypatch):
    """The CPU loop (chunks of ``_CPU_CHUNK`` coordinates, ragged last blocks, σ(2z) − ½ for tanh) follows
    the rule's trajectory in fp64, whether a tensor spans one chunk or several."""
    from deepopt.optimizers import deep_momentum as module

    monkeypatch.setattr(module, "_CPU_CHUNK", chunk)
    calls = []
    loop = module.DeepMomentum._cpu_loop_step
    monkeypatch.setattr(module.DeepMomentum, "_cpu_loop_step", lambda self, *a: calls.append(1) or loop(self, *a))
    kw = {"lr": 0.05, "eta": 0.5, **options}
    ours = trajectory(lambda p: deepopt.DeepMomentum(p, **kw), 60)
    ref = trajectory(lambda p: deepopt.DeepMomentum(p, foreach=False, **kw), 60)
    assert len(calls) == 60
    assert (ours - ref).abs().max() <= 1e-12


@pytest.mark.parametrize("options", [dict(), dict(activation="relu"), dict(activation="softsign"),
                                     dict(objective="l2", preconditioner="adam"),
                                     dict(key_source="preconditioned", preconditioner="adam"),
                                     dict(weight_decay=0.01, key_dim=5, hidden=3)])
def test_multi_tensor_path_equals_the_rule_on_cpu_too(options, monkeypatch):
    """On the CPU the default options take the loop; the multi-tensor path that accelerators take is checked
    against the rule here all the same (a second call reuses its work buffers and persistent W₁, W₂)."""
    from deepopt.optimizers import deep_momentum as module

    monkeypatch.setattr(module, "_cpu_loop_applies", lambda *_: False)
    ours = trajectory(lambda p: deepopt.DeepMomentum(p, lr=0.05, eta=0.5, **options), 60)
    ref = trajectory(lambda p: deepopt.DeepMomentum(p, lr=0.05, eta=0.5, foreach=False, **options), 60)
    assert (ours - ref).abs().max() <= 1e-12 * max(1.0, float(ref.abs().max()))


def test_multi_tensor_path_restacks_its_memory_after_a_load_or_rule_steps(monkeypatch):
    """The multi-tensor path updates W₁ in place in a stack the states hold views of; a state that holds
    another tensor (after ``load_state_dict`` or steps of the rule path) makes it stack the states again."""
    from deepopt.optimizers import deep_momentum as module

    monkeypatch.setattr(module, "_cpu_loop_applies", lambda *_: False)
    a, b = small_mlp(), small_mlp()
    ours, ref = deepopt.DeepMomentum(a.parameters(), lr=0.05, eta=0.5), deepopt.DeepMomentum(
        b.parameters(), lr=0.05, eta=0.5, foreach=False)
    train(b, ref, 30)
    train(a, ours, 10)
    ours.load_state_dict(copy.deepcopy(ours.state_dict()))
    train(a, ours, 5, start=10)
    ours.param_groups[0]["foreach"] = False
    train(a, ours, 5, start=15)
    ours.param_groups[0]["foreach"] = None
    train(a, ours, 10, start=20)
    assert (flat(a) - flat(b)).abs().max() <= 1e-12


def test_an_empty_parameter_does_not_stop_the_fast_path():
    """A zero-element parameter in the list (the CPU loop leaves such a list to the multi-tensor path): the
    other parameters follow the rule."""
    def run(foreach):
        gen = torch.Generator().manual_seed(0)
        params = [torch.zeros(0, 4, dtype=F64, requires_grad=True), torch.zeros(6, 5, dtype=F64, requires_grad=True)]
        opt = deepopt.DeepMomentum(params, lr=0.1, foreach=foreach)
        for _ in range(5):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen, dtype=F64)
            opt.step()
        return params[1].detach()

    assert (run(None) - run(False)).abs().max() <= 1e-12


# ------------------------------------------------------------------ (f) the momenta layout (the shipped one)
MOMENTA = dict(lr=0.01, keys="momenta", hidden=5, preconditioner="adam", eta=0.3, timescales=(0.5, 0.99))


def _theta0(hidden: int = 5, features: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return torch.randn(1, hidden, generator=gen, dtype=F64), torch.randn(hidden, features, generator=gen, dtype=F64)


def _run_lists(make, steps: int = 8, shapes=((7, 5), (300,), (3,), (2, 3, 40), (0, 4))):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen, dtype=F64).requires_grad_() for s in shapes]
    opt = make(params)
    for _ in range(steps):
        for i, p in enumerate(params):
            p.grad = torch.randn(p.shape, generator=gen, dtype=F64) * (1 + i)
        opt.step()
    return params, opt


@pytest.mark.parametrize("options", [dict(), dict(eta2=0.2), dict(memory_init=_theta0(), eta2=0.2),
                                     dict(lr_horizon=5, lr_power=0.7, lr_warmup=0.3, weight_decay=0.1),
                                     dict(weight_decay=0.1, decoupled_weight_decay=False, activation="relu"),
                                     dict(hidden=0, lr_decay=0.1)])
def test_momenta_multi_tensor_path_equals_the_rule(options):
    """The momenta layout's multi-tensor path (chunked, batched over chunks with each tensor's W₁, W₂, per-tensor
    sums by index_add) follows the rule per tensor in fp64, with W₂ online, a θ₀, a schedule and weight decay,
    ragged tensors and an empty one; the memories match too."""
    kw = {**MOMENTA, **options}
    ours, opt = _run_lists(lambda ps: deepopt.DeepMomentum(ps, **kw))
    ref, ref_opt = _run_lists(lambda ps: deepopt.DeepMomentum(ps, foreach=False, **kw))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-12, atol=1e-12)
        for key in ("W1", "W2", "momentum_buffer", "timescale_buffers"):
            torch.testing.assert_close(opt.state[a][key], ref_opt.state[b][key], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("foreach", [None, False])
def test_momenta_without_the_deep_branch_is_adam_preconditioned_momentum(foreach):
    """``hidden=0``: ``Momentum(preconditioner="adam")`` exactly, decoupled weight decay included."""
    kw = dict(lr=0.02, momentum=0.85, preconditioner="adam", weight_decay=0.05)
    ours = trajectory(lambda p: deepopt.DeepMomentum(p, keys="momenta", hidden=0, foreach=foreach, **kw), 50)
    ref = trajectory(lambda p: deepopt.Momentum(p, **kw), 50)
    assert (ours - ref).abs().max() <= 1e-12 * max(1.0, float(ref.abs().max()))


def test_momenta_memory_retains_towards_theta0_and_stays_bounded():
    """With η = η₂ = 0 the memory stays θ₀ exactly (αθ₀ + (1 − α)θ₀); with writes on, 300 steps of random
    gradients keep ‖W₁ − W₁⁰‖ ≤ η·max|v|·√H/(1 − α) (|v| ≤ 1/√(1 − β₂) under Adam's P) and W₂ finite and bounded."""
    w1_0, w2_0 = _theta0()
    _, still = _run_lists(lambda ps: deepopt.DeepMomentum(ps, **{**MOMENTA, "eta": 0.0, "memory_init": (w1_0, w2_0)}))
    for st in still.state.values():
        assert torch.equal(st["W1"], w1_0) and torch.equal(st["W2"], w2_0)
    kw = {**MOMENTA, "eta": 0.5, "eta2": 0.5, "beta2": 0.9, "momentum": 0.9, "memory_init": (w1_0, w2_0)}
    params, opt = _run_lists(lambda ps: deepopt.DeepMomentum(ps, **kw), steps=300)
    bound = 0.5 * (1 / (1 - 0.9)) ** 0.5 * 5 ** 0.5 / (1 - 0.9)
    for p in params:
        st = opt.state[p]
        assert float((st["W1"] - w1_0).norm()) <= bound
        assert st["W2"].isfinite().all() and float(st["W2"].abs().max()) < 1e3


def test_momenta_deep_branch_uses_several_time_scales():
    """The read depends on the slow momenta: two gradient histories that end alike but differ earlier give
    different deep reads (the time scales are keys), and ``timescales`` are validated."""
    def last_step(history):
        w = torch.zeros(64, dtype=F64, requires_grad=True)
        opt = deepopt.DeepMomentum([w], **{**MOMENTA, "memory_init": _theta0(), "eta": 0.0})
        for g in history:
            w.grad = g.clone()
            before = w.detach().clone()
            opt.step()
        return (w.detach() - before) / 0.01 - opt.state[w]["momentum_buffer"]  # −D
    gen = torch.Generator().manual_seed(0)
    tail = [torch.randn(64, generator=gen, dtype=F64) for _ in range(3)]
    a = last_step([torch.ones(64, dtype=F64)] * 30 + tail)
    b = last_step([-torch.ones(64, dtype=F64)] * 30 + tail)
    assert (a - b).abs().max() > 1e-3
    for bad in ((1.0,), (0.5, -0.1), (0.1,) * 5):
        with pytest.raises(ValueError, match="timescales"):
            deepopt.DeepMomentum([torch.zeros(2, requires_grad=True)], keys="momenta", timescales=bad)
    with pytest.raises(ValueError, match="memory_init shapes"):
        deepopt.DeepMomentum([torch.zeros(2, requires_grad=True)], keys="momenta", hidden=5,
                             memory_init=_theta0(features=3))
    with pytest.raises(ValueError, match="eta2"):
        deepopt.DeepMomentum([torch.zeros(2, requires_grad=True)], eta2=0.1)


# ------------------------------------------------------------------ (g) scripts written for AdamW
@pytest.mark.parametrize("cls,kw", [(deepopt.Momentum, dict(momentum=0.9)), (deepopt.DeltaMomentum, dict()),
                                    (deepopt.DeepMomentum, dict()), (deepopt.DeepMomentum, MOMENTA)])
def test_weight_decay_is_decoupled_with_the_adam_preconditioner(cls, kw):
    """``weight_decay`` in a param group is AdamW's (decoupled) wherever the Adam preconditioner is used, as
    scripts written for AdamW expect, and coupled (L2) with the identity preconditioner (``torch.optim.SGD``'s
    meaning); ``decoupled_weight_decay=True/False`` forces either."""
    kw = {"lr": 0.02, **kw, "preconditioner": "adam"}
    default = trajectory(lambda p: cls(p, weight_decay=0.1, **kw), 30)
    decoupled = trajectory(lambda p: cls(p, weight_decay=0.1, decoupled_weight_decay=True, **kw), 30)
    coupled = trajectory(lambda p: cls(p, weight_decay=0.1, decoupled_weight_decay=False, **kw), 30)
    assert torch.equal(default, decoupled) and not torch.allclose(default, coupled)
    identity = {**kw, "preconditioner": "identity"}
    default = trajectory(lambda p: cls(p, weight_decay=0.1, **identity), 30)
    coupled = trajectory(lambda p: cls(p, weight_decay=0.1, decoupled_weight_decay=False, **identity), 30)
    assert torch.equal(default, coupled)


@pytest.mark.parametrize("foreach", [None, False])
@pytest.mark.parametrize("cls,kw", [(deepopt.Momentum, dict(momentum=0.9)), (deepopt.Momentum, dict(nesterov=True)),
                                    (deepopt.DeltaMomentum, dict(momentum=0.8)),
                                    (deepopt.DeepMomentum, dict(momentum=0.85)),
                                    (deepopt.DeepMomentum, {**MOMENTA, "momentum": 0.889, "memory_init": _theta0()})])
def test_decoupled_decay_rate_is_adamws_at_the_matching_lr(cls, kw, foreach):
    """With the Adam preconditioner a sum-form momentum's update is 1/(1 − μ) Adam steps (AdamW-equivalent lr
    lr/(1 − μ)), so the decoupled decay is ``W ← (1 − lr·wd/(1 − μ))·W``: with zero gradients (P g = 0, the deep read
    σ(W₂·0) = 0) exactly that, on the foreach path, the momenta kernel and the rule loop; Newton–Schulz's update and
    the identity preconditioner keep ``lr·wd``."""
    mu = kw.get("momentum", 0.9)
    for precond, nonlinearity, rate in (("adam", None, 0.1 / (1 - mu)), ("identity", None, 0.1),
                                        ("adam", "newton_schulz", 0.1)):
        if nonlinearity and cls is not deepopt.Momentum:
            continue
        w = torch.randn(6, 16, generator=torch.Generator().manual_seed(0))
        live = w.clone().requires_grad_()
        opt = cls([live], **{**kw, "lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True,
                             "preconditioner": precond, "nonlinearity": nonlinearity, "foreach": foreach})
        for _ in range(5):
            live.grad = torch.zeros_like(live)
            opt.step()
        torch.testing.assert_close(live.detach(), w * (1 - 0.01 * rate) ** 5, rtol=1e-6, atol=1e-7)
    assert deepopt.rules.transforms.decoupled_rate({"weight_decay": 0.1, "preconditioner": "adam",
                                                    "momentum": 0.0, "nonlinearity": None}) == 0.1


@pytest.mark.parametrize("scheduler", ["warmup_cosine", "one_cycle"])
@pytest.mark.parametrize("foreach", [None, False])
def test_learned_schedule_multiplies_the_scripts_lr(scheduler, foreach):
    """A script's scheduler sets ``group["lr"]`` every step (LambdaLR warm-up + cosine; OneCycleLR, which cycles
    the momentum too); with ``total_steps = N`` the step taken is exactly that lr times the learned schedule s_t:
    the same run as an unscheduled optimizer whose lr is set to ``group_lr·s_t`` (and its momentum to the
    scheduler's) before each step."""
    from deepopt.rules.deep import lr_factor

    total, kw = 12, {**MOMENTA, "memory_init": _theta0(), "lr_power": 0.8, "lr_warmup": 0.25, "weight_decay": 0.1}
    model, twin = small_mlp(), small_mlp()
    opt = deepopt.DeepMomentum(model.parameters(), total_steps=total, foreach=foreach, **kw)
    ref = deepopt.DeepMomentum(twin.parameters(), foreach=foreach, **kw)
    if scheduler == "warmup_cosine":
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda t: min(1.0, (t + 1) / 3) * 0.5 * (1 + math.cos(math.pi * t / total)))
    else:
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=total)
    for t in range(1, total + 1):
        group = opt.param_groups[0]
        s_t = float(lr_factor(torch.tensor(float(t)), {**group, "lr_decay": 0.0}, torch.zeros((), dtype=F64)))
        ref.param_groups[0].update(lr=group["lr"] * s_t, momentum=group["momentum"])
        for m, o in ((model, opt), (twin, ref)):
            train(m, o, 1, start=t)
        sched.step()
    torch.testing.assert_close(flat(model), flat(twin), rtol=1e-10, atol=1e-12)


def test_stepping_past_the_horizon_warns_once_and_keeps_training(recwarn):
    """A learned schedule never stops silently: past ``total_steps`` the step keeps the schedule's last size
    (|ΔW| > 0) and the optimizer warns once; a resumed optimizer knows how far it got (warns on its first step
    past the horizon)."""
    import warnings

    w = torch.ones(8, dtype=F64, requires_grad=True)
    opt = deepopt.DeepMomentum([w], total_steps=3, **MOMENTA)
    moved = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(6):
            before = w.detach().clone()
            w.grad = torch.ones_like(w)
            opt.step()
            moved.append(float((w.detach() - before).abs().max()))
    assert [str(c.message).startswith("DeepMomentum: step 4 passes lr_horizon = 3") for c in caught] == [True]
    assert all(m > 0 for m in moved)
    resumed = deepopt.DeepMomentum([w], total_steps=3, **MOMENTA)
    resumed.load_state_dict(opt.state_dict())
    with pytest.warns(UserWarning, match="step 7 passes lr_horizon = 3"):
        w.grad = torch.ones_like(w)
        resumed.step()
    with pytest.raises(ValueError, match="total_steps"):
        deepopt.DeepMomentum([w], total_steps=3, lr_horizon=4)


def test_the_shipped_learned_optimizer_loads_by_name_and_trains():
    """``DeepMomentum.pretrained`` loads the package's default (package data: config, θ₀ and its recipe),
    ``from_pretrained`` takes its name or a folder; without ``total_steps`` it has no horizon, with it the learned
    schedule runs over it; it lowers a digits MLP's loss untuned; an unknown name lists the shipped ones."""
    from deepopt import pretrained

    assert pretrained.DEFAULT in pretrained.names()
    folder = pretrained.resolve(pretrained.DEFAULT)
    recipe = json.loads((folder / "recipe.json").read_text())
    assert recipe["keys"] == "momenta" and recipe["family"] == "general"
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    free = deepopt.DeepMomentum.pretrained(model.parameters())
    assert free.defaults["lr_horizon"] == 0 and free.defaults["keys"] == "momenta"
    assert not deepopt.rules.transforms.is_zero(free.defaults["lr"])
    opt = deepopt.DeepMomentum.from_pretrained(pretrained.DEFAULT, model.parameters(), total_steps=100,
                                               weight_decay=0.1)
    assert opt.defaults["lr_horizon"] == 100 and opt.defaults["weight_decay"] == 0.1
    x, y, _, _ = load_classification("digits")
    losses = []
    for t in range(100):
        idx = torch.randint(len(x), (64,), generator=torch.Generator().manual_seed(t))
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert sum(losses[-10:]) < 0.3 * sum(losses[:10])
    with pytest.raises(FileNotFoundError, match="shipped"):
        deepopt.DeepMomentum.from_pretrained("no-such-optimizer", model.parameters())


# ------------------------------------------------------------------ (h) distance-over-gradients step sizes
def _dog_by_hand(params: list[torch.Tensor], grads: list[list[torch.Tensor]], c: float, alpha: float,
                 reps: float) -> list[torch.Tensor]:
    """Layer-wise DoG on a sum momentum with G lagged by a step, written out per tensor: x ← x − c·(r̄/√G)·m
    (no step while G = 0), then G += ‖m‖², r̄ = max(r̄, ‖x − x₀‖)."""
    out = []
    for x, gs in zip(params, grads):
        x0, m, distance, sum_sq = x.clone(), torch.zeros_like(x), reps * (1 + x.norm()), torch.zeros((), dtype=F64)
        for g in gs:
            m = alpha * m + g
            if sum_sq > 0:
                x = x - c * distance / sum_sq.sqrt() * m
            sum_sq = sum_sq + m.square().sum()
            distance = torch.maximum(distance, (x - x0).norm())
        out.append(x)
    return out


@pytest.mark.parametrize("keys", ["blocks", "momenta"])
def test_dog_step_size_is_layerwise_distance_over_gradients(keys):
    """``lr_adapt="dog"`` scales each tensor's step by r̄_t/√G_{t−1} (its own distance from x₀ over the norms of its
    updates), the lr a multiplier: with the deep branch off, the hand-written L-DoG of momentum."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(7, 5, generator=gen, dtype=F64), torch.zeros(3, dtype=F64)]
    grads = [[torch.randn(p.shape, generator=gen, dtype=F64) for _ in range(6)] for p in params]
    live = [p.clone().requires_grad_() for p in params]
    opt = deepopt.DeepMomentum(live, lr=0.7, momentum=0.8, hidden=0, keys=keys, lr_adapt="dog", dog_reps=1e-3)
    for t in range(6):
        for p, gs in zip(live, grads):
            p.grad = gs[t].clone()
        opt.step()
    for got, want in zip(live, _dog_by_hand(params, grads, 0.7, 0.8, 1e-3)):
        torch.testing.assert_close(got.detach(), want, rtol=1e-12, atol=1e-14)


def test_dog_makes_the_lr_independent_of_the_gradients_scale():
    """DoG's step does not depend on the scale of the gradients: the loss ×1000 takes the same path (with the
    identity preconditioner, where a fixed lr would take 1000× larger steps), and the deep branch reads the same."""
    paths = []
    for scale in (1.0, 1000.0):
        model = small_mlp()
        opt = deepopt.DeepMomentum(model.parameters(), lr=1.0, lr_adapt="dog", hidden=4, key_dim=4)
        for t in range(15):
            opt.zero_grad()
            x, y = batch(t)
            (scale * torch.nn.functional.mse_loss(model(x), y)).backward()
            opt.step()
        paths.append(flat(model))
    assert not torch.equal(paths[0], flat(small_mlp()))
    torch.testing.assert_close(paths[0], paths[1], rtol=1e-6, atol=1e-9)


def test_dog_first_step_is_at_least_the_dtype_resolution_so_bf16_parameters_train():
    """r_ε = max(dog_reps, ε_dtype)·(1 + ‖W₀‖): fp32 keeps dog_reps, bf16 takes its epsilon 2⁻⁷. Without the floor a
    bf16 digits MLP under the shipped (DoG) optimizer never moves (its first steps round away: loss at chance)."""
    for dtype, eps in ((torch.float32, 1e-4), (torch.bfloat16, 2.0 ** -7)):
        w = torch.randn(40, 30).to(dtype).requires_grad_()
        opt = deepopt.DeepMomentum([w], lr=1.0, lr_adapt="dog", dog_reps=1e-4)
        w.grad = torch.ones_like(w)
        opt.step()
        want = eps * (1 + w.detach().double().norm())
        assert float(opt.state[w]["dog_distance"]) == pytest.approx(float(want), rel=1e-5)
    x, y, _, _ = load_classification("digits")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)).to(torch.bfloat16)
    opt = deepopt.DeepMomentum.pretrained(model.parameters(), total_steps=150)
    assert opt.defaults["lr_adapt"] == "dog"
    for t in range(150):
        idx = torch.randint(len(x), (64,), generator=torch.Generator().manual_seed(t))
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[idx].bfloat16()).float(), y[idx]).backward()
        opt.step()
    with torch.no_grad():
        assert float(torch.nn.functional.cross_entropy(model(x.bfloat16()).float(), y)) < 0.5  # chance: 2.30


def _train_loss(opt, model, steps, scheduler=None):
    """``model``'s MSE on one fixed batch after ``steps`` steps of ``opt`` on it."""
    x, y = batch(0)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
    with torch.no_grad():
        return float(torch.nn.functional.mse_loss(model(x), y))


def test_dog_warns_once_when_its_lr_is_an_adamw_step_size():
    """With DoG the lr is a multiplier of order 1: an AdamW-sized lr (given to the class, or as a scheduler's base
    lr) warns once, and such a run does barely move; the shipped lr under a warm-up from 0 + cosine does not warn."""
    start = _train_loss(deepopt.DeepMomentum.pretrained(small_mlp().parameters()), small_mlp(), 0)
    with pytest.warns(UserWarning, match="lr is 0.003, below 0.05") as caught:
        model = small_mlp()
        stalled = _train_loss(deepopt.DeepMomentum.pretrained(model.parameters(), lr=3e-3, total_steps=150), model, 150)
    assert sum("below 0.05" in str(w.message) for w in caught) == 1
    model = small_mlp()
    opt = deepopt.DeepMomentum.pretrained(model.parameters(), total_steps=150)
    with pytest.warns(UserWarning, match="max_lr is 0.003") as caught:
        _train_loss(opt, model, 5, torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=150))
    assert sum("below 0.05" in str(w.message) for w in caught) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = small_mlp()
        opt = deepopt.DeepMomentum.pretrained(model.parameters(), total_steps=150)
        schedule = lambda t: min(1.0, t / 10) * 0.5 * (1 + math.cos(math.pi * t / 150))  # noqa: E731
        warm = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        trained = _train_loss(opt, model, 150, warm)
        deepopt.DeepMomentum(small_mlp().parameters(), lr=3e-3)  # a fixed lr is a step size: no warning
    assert start - trained > 20 * (start - stalled) > 0


def test_dog_options_are_checked():
    w = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="lr_adapt"):
        deepopt.DeepMomentum([w], lr_adapt="prodigy")
    with pytest.raises(ValueError, match="dog_reps"):
        deepopt.DeepMomentum([w], lr_adapt="dog", dog_reps=0.0)
