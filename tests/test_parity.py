"""Numerical parity: deepopt optimizers vs torch.optim, the class vs the pure rule, fast vs loop path."""

import pytest
import torch
from conftest import CONFIGS, loss_fn, make, small_mlp, train

import deepopt

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
    # M3's fast path (foreach ops, batched Newton–Schulz, host-known chunk ends) across several chunk ends
    "m3": [dict(), dict(second_moment=True, lr=1e-3), dict(nesterov=False, alpha=1.0, chunk=1),
           dict(accumulate="sum", second_moment=True, lr=1e-3), dict(accumulate="sum", nesterov=False, chunk=4),
           dict(weight_decay=0.1, slow_momentum=0.5, chunk=2)],
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
