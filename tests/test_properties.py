"""Property-based checks over random shapes and hyperparameters (hypothesis)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import deepopt
from deepopt.rules import delta_momentum

shapes = st.lists(st.integers(1, 9), min_size=1, max_size=4).map(tuple)


@settings(max_examples=40, deadline=None)
@given(shape=shapes, alpha=st.floats(0.0, 0.99), beta_frac=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_delta_map_is_a_contraction(shape, alpha, beta_frac, seed):
    """For 0 ≤ β ≤ 1 + α the old memory shrinks by α across k̂ and by |α − β| ≤ 1 along it."""
    gen = torch.Generator().manual_seed(seed)
    m, g = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(2))
    beta = beta_frac * (1 + alpha)
    hp = delta_momentum.hparams(momentum=alpha, beta=beta)
    _, state = delta_momentum.update(g, {"momentum_buffer": m}, torch.zeros_like(m), hp)
    kept = state["momentum_buffer"] - g
    assert kept.norm() <= max(alpha, abs(alpha - beta)) * m.norm() + 1e-12


@settings(max_examples=25, deadline=None)
@given(shapes_=st.lists(shapes, min_size=1, max_size=3), name=st.sampled_from(sorted(deepopt.OPTIMIZERS)),
       seed=st.integers(0, 2**16))
def test_fast_path_equals_rule_on_any_shapes(shapes_, name, seed):
    """Fast and per-tensor paths agree for any parameter shapes (1-D, 3-D, sizes not divisible by the
    DeepMomentum key block)."""
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes_]
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes_] for _ in range(4)]
    finals = []
    for foreach in (True, False):
        params = [p.clone().requires_grad_() for p in init]
        opt = deepopt.OPTIMIZERS[name](params, lr=0.05, weight_decay=0.01, foreach=foreach)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            opt.step()
        finals.append(params)
    for a, b in zip(*finals):
        assert torch.allclose(a, b, atol=1e-12, rtol=0)
