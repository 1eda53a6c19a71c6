"""Properties of the pure rules: differentiable, vmap-able, and the math the docstrings state."""

import pytest
import torch

from deepopt.rules import RULES, delta_momentum, get_rule, newton_schulz
from deepopt.rules.delta import erase_along_rows


def test_get_rule_lists_choices():
    assert get_rule("adam") is RULES["adam"]
    with pytest.raises(ValueError, match="accepted"):
        get_rule("lion")


@pytest.mark.parametrize("name", sorted(RULES))
def test_update_is_pure_and_differentiable_in_hyperparameters(name):
    """No input is modified, and d(param after 3 steps)/d(lr) exists and matches finite differences."""
    rule = RULES[name]
    torch.manual_seed(0)
    param = torch.randn(4, 6, dtype=torch.float64)
    grads = [torch.randn(4, 6, dtype=torch.float64) for _ in range(3)]

    def unroll(lr):
        hp = rule.hparams()
        hp["lr"] = lr
        p, state = param, rule.init(param, hp)
        for g in grads:
            snapshot = (g.clone(), {k: v.clone() for k, v in state.items()}, p.clone())
            delta, new_state = rule.update(g, state, p, hp)
            assert torch.equal(g, snapshot[0]) and torch.equal(p, snapshot[2])
            assert all(torch.equal(state[k], snapshot[1][k]) for k in state)
            p, state = p + delta * (1 + p.sum() * 0), new_state
        return (p**2).sum()

    lr = torch.tensor(0.01, dtype=torch.float64)
    dlr = torch.func.grad(unroll)(lr)
    h = 1e-6
    fd = (unroll(lr + h) - unroll(lr - h)) / (2 * h)
    assert torch.allclose(dlr, fd, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", sorted(RULES))
def test_rules_vmap_over_tasks(name):
    rule = RULES[name]
    hp = rule.hparams(lr=0.1)
    params, grads = torch.randn(3, 4, 5), torch.randn(3, 4, 5)

    def one(p, g):
        return rule.update(g, rule.init(p, hp), p, hp)[0]

    batched = torch.vmap(one, randomness="same")(params, grads)  # seeded DeepMomentum init
    looped = torch.stack([one(p, g) for p, g in zip(params, grads)])
    assert torch.allclose(batched, looped, atol=1e-6)


def test_newton_schulz_orthogonalises():
    torch.manual_seed(0)
    for shape in [(16, 32), (32, 16), (20, 20)]:
        u = newton_schulz(torch.randn(*shape, dtype=torch.float64))
        s = torch.linalg.svdvals(u) / max(1.0, shape[0] / shape[1]) ** 0.5
        assert s.min() > 0.6 and s.max() < 1.25  # Muon's quintic keeps singular values in ~[0.7, 1.2]


def test_delta_rows_evaluation_orders_agree_and_erase_along_keys():
    torch.manual_seed(0)
    for shape in [(3, 8), (8, 3)]:
        m, g = torch.randn(*shape, dtype=torch.float64), torch.randn(*shape, dtype=torch.float64)
        k = g / g.norm()
        want = 0.7 * m @ (k.T @ k)
        assert torch.allclose(erase_along_rows(m, g, 0.7), want, atol=1e-12)


def test_delta_rule_forgets_along_the_current_key():
    """The map αI − βk̂k̂ᵀ scales the component along k̂ by α − β and keeps the rest×α."""
    hp = delta_momentum.hparams(momentum=0.9, beta=0.9)
    m = torch.tensor([1.0, 1.0], dtype=torch.float64)
    g = torch.tensor([1.0, 0.0], dtype=torch.float64)
    _, st = delta_momentum.update(g, {"momentum_buffer": m}, torch.zeros(2, dtype=torch.float64), hp)
    # along k̂ = e₁: (0.9 − 0.9)·1 + 1 (new gradient); orthogonal: 0.9·1
    assert torch.allclose(st["momentum_buffer"], torch.tensor([1.0, 0.9], dtype=torch.float64))


def test_hparams_rejects_unknown_names():
    with pytest.raises(TypeError, match="accepted"):
        RULES["sgd"].hparams(beta=0.9)


ELEMENTWISE_CASES = [("sgd", {}), ("adam", {}), ("momentum", {"nesterov": True}),
                     ("momentum", {"preconditioner": "adam"}), ("momentum", {"nonlinearity": "newton_schulz"}),
                     ("delta_momentum", {}), ("deep_momentum", {})]


@pytest.mark.parametrize("name,overrides", ELEMENTWISE_CASES)
def test_elementwise_rules_step_a_concatenation_like_its_parts(name, overrides):
    """``rule.elementwise(hp)`` is what lets the meta-trainer step all tensors as one flat vector: the
    update of a concatenation must be the concatenation of the updates (and it must not be for the rest)."""
    rule = RULES[name]
    hp = rule.hparams(lr=0.1, **overrides)
    torch.manual_seed(0)
    params = [torch.randn(5, 4, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)]
    flat = torch.cat([p.reshape(-1) for p in params])
    states = [rule.init(p, hp) for p in params]
    fstate = rule.init(flat, hp)
    same = True
    for _ in range(3):
        grads = [torch.randn_like(p) for p in params]
        out = [rule.update(g, s, p, hp) for g, s, p in zip(grads, states, params)]
        fdelta, fstate = rule.update(torch.cat([g.reshape(-1) for g in grads]), fstate, flat, hp)
        joined = torch.cat([d.reshape(-1) for d, _ in out])
        same = same and torch.allclose(fdelta, joined, rtol=1e-12, atol=1e-15)
        params = [p + d for p, (d, _) in zip(params, out)]
        states = [s for _, s in out]
        flat = flat + fdelta
    assert same == rule.elementwise(hp)


@pytest.mark.parametrize("rule_name", ["momentum", "deep_momentum"])
def test_relative_eps_floors_adams_denominator_at_the_peak_gradient_rms(rule_name):
    """``relative_eps`` κ: P g = g/(√v̂_t + ε + κρ_t), q_t = β₂q_{t−1} + (1 − β₂)mean(g_t²), ρ_t = max(ρ_{t−1},
    √(q_t/(1 − β₂ᵗ))), checked against those equations in float64 on gradients whose scale grows, then collapses
    1000×: Adam's P g keeps its size, the floored one shrinks with the gradients; κ = 0 is Adam's (no new state)."""
    rule = RULES[rule_name]
    torch.manual_seed(0)
    scales = [1.0, 3.0, 1.0, 0.1, 1e-2] + [1e-3] * 40
    grads = [s * torch.randn(5, 8, dtype=torch.float64) for s in scales]
    kappa, beta2, eps = 3.0, 0.5, 1e-8  # a short second moment: Adam forgets the large gradients in 40 steps
    hp = rule.hparams(preconditioner="adam", beta2=beta2, eps=eps, relative_eps=kappa)
    state = rule.init(torch.zeros(5, 8, dtype=torch.float64), hp)
    assert float(state["peak_rms"]) == 0.0 and float(state["mean_sq"]) == 0.0
    plain_state = rule.init(torch.zeros(5, 8, dtype=torch.float64), {**hp, "relative_eps": 0.0})
    assert "peak_rms" not in plain_state and "mean_sq" not in plain_state
    v, q, peak = torch.zeros(5, 8, dtype=torch.float64), 0.0, 0.0
    from deepopt.rules import transforms
    for t, g in enumerate(grads, start=1):
        v = beta2 * v + (1 - beta2) * g * g
        q = beta2 * q + (1 - beta2) * float(g.square().mean())
        peak = max(peak, (q / (1 - beta2 ** t)) ** 0.5)
        want = g / ((v / (1 - beta2 ** t)).sqrt() + eps + kappa * peak)
        got, new = transforms.precondition(g, state, hp)
        adam, plain_state = transforms.precondition(g, plain_state, {**hp, "relative_eps": 0.0})
        state = {**state, **new}
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0.0)
        assert float(state["peak_rms"]) == pytest.approx(peak, rel=1e-6)
        torch.testing.assert_close(adam, g / ((v / (1 - beta2 ** t)).sqrt() + eps))
    # the last step: gradients 1000× below their peak; Adam normalises them back up, the floor does not
    assert adam.square().mean().sqrt() > 0.3
    assert got.square().mean().sqrt() < 3e-3
