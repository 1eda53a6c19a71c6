"""Numerical parity: deepopt optimizers vs torch.optim, the class vs the pure rule, fast vs loop path."""

import pytest
import torch
from conftest import CONFIGS, loss_fn, make, small_mlp, train

import deepopt
from deepopt.rules import deep_momentum

STEPS = 100


def max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


TORCH_TWINS = [
    ("sgd", dict(lr=0.1), torch.optim.SGD, dict(lr=0.1)),
    ("sgd", dict(lr=0.1, weight_decay=0.01), torch.optim.SGD, dict(lr=0.1, weight_decay=0.01)),
    ("momentum", dict(lr=0.05, momentum=0.9), torch.optim.SGD, dict(lr=0.05, momentum=0.9)),
    ("momentum", dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.01), torch.optim.SGD,
     dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.01)),
    ("adam", dict(lr=0.01), torch.optim.Adam, dict(lr=0.01)),
    ("adam", dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.01), torch.optim.Adam,
     dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.01)),
    ("adamw", dict(lr=0.01, weight_decay=0.1), torch.optim.AdamW, dict(lr=0.01, weight_decay=0.1)),
]


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("name,ours,torch_cls,theirs", TORCH_TWINS)
def test_matches_torch_optim(name, ours, torch_cls, theirs, foreach):
    a, b = small_mlp(), small_mlp()
    train(a, deepopt.OPTIMIZERS[name](a.parameters(), foreach=foreach, **ours), STEPS)
    train(b, torch_cls(b.parameters(), **theirs), STEPS)
    assert max_diff(a, b) <= 1e-10


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_decoupled_weight_decay_matches_rule(foreach, nesterov):
    a, b = small_mlp(), small_mlp()
    kw = dict(lr=0.05, momentum=0.9, nesterov=nesterov, weight_decay=0.1, decoupled_weight_decay=True)
    train(a, deepopt.Momentum(a.parameters(), foreach=foreach, **kw), 30)
    train(b, deepopt.Momentum(b.parameters(), foreach=False, **kw), 30)
    assert max_diff(a, b) <= 1e-12


@pytest.mark.parametrize("foreach", [True, False])
def test_delta_momentum_at_beta_zero_is_momentum(foreach):
    a, b = small_mlp(), small_mlp()
    train(a, deepopt.DeltaMomentum(a.parameters(), lr=0.05, momentum=0.9, beta=0.0, foreach=foreach), STEPS)
    train(b, deepopt.Momentum(b.parameters(), lr=0.05, momentum=0.9), STEPS)
    assert max_diff(a, b) <= 1e-10


OPTION_SETS = {
    "momentum": [dict(), dict(preconditioner="adam"), dict(nonlinearity="newton_schulz", nesterov=True)],
    "delta_momentum": [dict(), dict(beta=1.5), dict(keys="rows"), dict(weight_decay=0.01),
                       dict(weight_decay=0.01, decoupled_weight_decay=True), dict(preconditioner="adam")],
    "deep_momentum": [dict(), dict(objective="l2", preconditioner="adam"), dict(activation="relu"),
                      dict(nonlinearity="newton_schulz"), dict(lr_decay=0.1, weight_decay=0.01,
                                                               decoupled_weight_decay=True),
                      dict(lr_decay=0.05, preconditioner="adam"),
                      dict(key_source="preconditioned", preconditioner="adam")],
    "sgd": [dict(), dict(weight_decay=0.1)],
    "adam": [dict(), dict(weight_decay=0.1), dict(weight_decay=0.1, decoupled_weight_decay=True)],
    "adamw": [dict()],
}


@pytest.mark.parametrize("name,options", [(n, o) for n, opts in OPTION_SETS.items() for o in opts])
def test_class_equals_pure_rule_trajectory(name, options):
    """The optimizer (default fast path) and a functional loop over the pure rule agree."""
    model, ref = small_mlp(), small_mlp()
    opt = make(name, model.parameters(), **options)
    train(model, opt, 40)
    rule = opt.rule
    hp = {k: v for k, v in opt.param_groups[0].items() if k in rule.defaults}
    params = {k: v.detach().clone() for k, v in ref.named_parameters()}
    states = {k: rule.init(v, hp) for k, v in params.items()}
    for t in range(40):
        grads = torch.func.grad(lambda p, t=t: loss_fn_functional(ref, p, t))(params)
        for k in params:
            delta, states[k] = rule.update(grads[k], states[k], params[k], hp)
            params[k] = params[k] + delta
    for k, p in model.named_parameters():
        assert (p - params[k]).abs().max().item() <= 1e-12, k


def loss_fn_functional(module, params, step):
    class Bound(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.module = module

        def forward(self, x):
            return torch.func.functional_call(module, params, (x,))

        def parameters(self, recurse=True):
            return iter(params.values())

    return loss_fn(Bound(), step)


def test_deep_momentum_linear_limit_closed_form():
    """σ = identity: θ follows W₁ ← αW₁ + ηCW₂ᵀ, W₂ ← αW₂ + ηW₁ᵀC with C = KᵀK/n; step = −lr·s(K + K W₂ᵀW₁ᵀ)."""
    torch.manual_seed(0)
    lr, alpha, eta, d, h = 0.1, 0.8, 0.3, 4, 3
    w = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    opt = deepopt.DeepMomentum([w], lr=lr, alpha=alpha, eta=eta, hidden=h, key_dim=d, activation="identity")
    w1 = torch.zeros(d, h, dtype=torch.float64)
    w2 = deep_momentum.init(w, opt.param_groups[0])["W2"]
    expected = w.detach().clone()
    for _ in range(5):
        g = torch.randn(6, 8, dtype=torch.float64)
        w.grad = g.clone()
        opt.step()
        blocks = g.reshape(-1, d)
        s = blocks.norm() / blocks.shape[0] ** 0.5
        k = blocks / s
        c = k.T @ k / k.shape[0]
        w1, w2 = alpha * w1 + eta * c @ w2.T, alpha * w2 + eta * w1.T @ c
        expected = expected - lr * (s * (k + k @ w2.T @ w1.T)).reshape(6, 8)
        assert torch.allclose(w.detach(), expected, atol=1e-12, rtol=0)
    assert torch.allclose(opt.state[w]["W1"], w1, atol=1e-12) and torch.allclose(opt.state[w]["W2"], w2, atol=1e-12)


@pytest.mark.parametrize("activation", ["tanh", "relu", "gelu", "silu", "identity"])
@pytest.mark.parametrize("objective", ["dot", "l2"])
def test_deep_momentum_memory_gradients_match_autograd(activation, objective):
    """The closed-form ∇θ of the internal objective equals autograd of the objective itself."""
    from deepopt.rules.deep import ACTIVATIONS, memory_grads

    torch.manual_seed(1)
    k, v = torch.randn(10, 4, dtype=torch.float64), torch.randn(10, 4, dtype=torch.float64)
    w1, w2 = torch.randn(4, 3, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    act = ACTIVATIONS[activation][0]

    def objective_fn(w1, w2):
        out = k + act(k @ w2.T) @ w1.T
        if objective == "dot":
            return -(out * v).sum() / k.shape[0]
        return 0.5 * ((out - v) ** 2).sum() / k.shape[0]

    want = torch.func.grad(objective_fn, argnums=(0, 1))(w1, w2)
    got = memory_grads(w1, w2, k, v, dict(activation=activation, objective=objective))
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-12)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fast_path_equals_rule_path(name):
    a, b = small_mlp(), small_mlp()
    train(a, make(name, a.parameters(), foreach=True), 50)
    train(b, make(name, b.parameters(), foreach=False), 50)
    assert max_diff(a, b) <= 1e-12


@pytest.mark.parametrize("options", [dict(), dict(preconditioner="adam")])
def test_deep_momentum_lr_decay_is_a_1_over_t_schedule(options):
    """``lr_decay=c`` equals a LambdaLR schedule ``1/(1 + c·t)`` on a constant-lr DeepMomentum."""
    a, b = small_mlp(), small_mlp()
    train(a, deepopt.DeepMomentum(a.parameters(), lr=0.05, lr_decay=0.2, **options), STEPS)
    opt = deepopt.DeepMomentum(b.parameters(), lr=0.05, **options)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 / (1 + 0.2 * t))
    opt.register_step_post_hook(lambda *_: sched.step())
    train(b, opt, STEPS)
    assert max_diff(a, b) <= 1e-12
    with pytest.raises(ValueError, match="lr_decay"):
        deepopt.DeepMomentum(a.parameters(), lr_decay=-1.0)


def test_deep_momentum_keyed_on_the_preconditioned_gradient_with_a_frozen_zero_memory_is_adam_without_momentum():
    """``key_source="preconditioned"``: the memory's skip path is the preconditioned step, so with W₁ = 0
    kept there (η = 0) DMGD is Adam with β₁ = 0."""
    a, b = small_mlp(), small_mlp()
    train(a, deepopt.DeepMomentum(a.parameters(), lr=0.01, eta=0.0, key_source="preconditioned",
                                  preconditioner="adam"), STEPS)
    train(b, deepopt.Adam(b.parameters(), lr=0.01, betas=(0.0, 0.999)), STEPS)
    assert max_diff(a, b) <= 1e-10
    with pytest.raises(ValueError, match="key_source"):
        deepopt.DeepMomentum(a.parameters(), key_source="values")
