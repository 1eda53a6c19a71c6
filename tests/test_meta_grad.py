"""Meta-gradients of the unroll engine: finite differences, checkpointing, higher, ES."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from deepopt.meta_train import AntitheticES, Backprop, InnerState, MetaParams, Unroll
from deepopt.meta_train.tasks import TaskStack, digits_task, mlp_task, quadratic_task

import deepopt

F64 = torch.float64
# Small configurations with a non-trivial inner trajectory (digits seed 1: width 16, tanh, batch 32).
RULES = {
    "sgd": dict(lr=0.1),
    "momentum": dict(lr=0.1, momentum=0.8),
    "adam": dict(lr=0.01),
    "delta_momentum": dict(lr=0.1, beta=0.5),
    "deep_momentum": dict(lr=0.05, hidden=4, key_dim=8, momentum=0.8, eta=0.3),
}


@pytest.fixture(scope="module")
def task():
    t = digits_task(1, dtype=F64)
    assert "tanh" in t.name  # smooth activation: finite differences are exact to O(eps²)
    return t


def directional_fd(unroll: Unroll, inner: InnerState, direction: dict, eps: float = 1e-5) -> float:
    raw = {k: v.detach() for k, v in unroll.meta.raw.items()}
    with torch.no_grad():
        plus = unroll.loss({k: raw[k] + eps * direction[k] for k in raw}, inner)[0]
        minus = unroll.loss({k: raw[k] - eps * direction[k] for k in raw}, inner)[0]
    return float((plus - minus) / (2 * eps))


def dot(grads: dict, direction: dict) -> float:
    return float(sum((grads[k] * direction[k]).sum() for k in grads))


@pytest.mark.parametrize("outer", ["train", "log_train", "heldout"])
@pytest.mark.parametrize("rule", sorted(RULES))
def test_meta_gradient_matches_central_differences(task, rule, outer):
    meta = MetaParams(rule, dtype=F64, **RULES[rule])
    unroll = Unroll(meta, task, steps=4, outer=outer)
    # Second truncation of a TBPTT run: the carried (detached) state is part of the input.
    inner = Backprop()(unroll, InnerState.fresh(task)).inner
    for start in (InnerState.fresh(task), inner):
        est = Backprop()(unroll, start)
        gen = torch.Generator().manual_seed(0)
        for _ in range(2):
            direction = {k: torch.randn(v.shape, generator=gen, dtype=F64) for k, v in meta.raw.items()}
            fd, exact = directional_fd(unroll, start, direction), dot(est.grads, direction)
            assert abs(exact - fd) <= 1e-6 * abs(fd), (exact, fd)


def test_meta_gradient_of_the_learned_lr_decay_matches_central_differences(task):
    meta = MetaParams("deep_momentum", learn=("lr", "lr_decay", "W1"), dtype=F64,
                      **{**RULES["deep_momentum"], "lr_decay": 0.2})
    unroll = Unroll(meta, task, steps=5)
    est = Backprop()(unroll, InnerState.fresh(task))
    assert est.grads["lr_decay"].abs() > 0
    direction = {k: torch.zeros_like(v) for k, v in meta.raw.items()}
    direction["lr_decay"] = torch.ones_like(direction["lr_decay"])
    fd = directional_fd(unroll, InnerState.fresh(task), direction)
    assert abs(dot(est.grads, direction) - fd) <= 1e-6 * abs(fd)
    with pytest.raises(ValueError, match="lr_decay starts at 0.0"):
        MetaParams("deep_momentum", learn=("lr_decay",))


def test_meta_gradients_of_the_learned_lr_power_and_beta2_match_central_differences(task):
    """The training-progress schedule h_t = max(1 − (t − 1)/N, 1/N)^p and its warm-up: the power p and the warm-up
    fraction get the exact meta-gradient, also over an unroll that runs past N (steps 6 and 7 of N = 5 keep step
    N's lr); so does the Adam preconditioner's β₂ (learned through a logit, like the momentum α)."""
    meta = MetaParams("deep_momentum", learn=("lr", "lr_power", "beta2", "W1", "lr_warmup"), dtype=F64,
                      **{**RULES["deep_momentum"], "lr_horizon": 5, "lr_power": 1.5, "preconditioner": "adam",
                         "beta2": 0.9, "lr_warmup": 0.5})
    unroll = Unroll(meta, task, steps=7)
    est = Backprop()(unroll, InnerState.fresh(task))
    assert all(g.isfinite().all() for g in est.grads.values())
    for name in ("lr_power", "beta2", "lr_warmup"):
        assert est.grads[name].abs() > 0
        direction = {k: torch.zeros_like(v) for k, v in meta.raw.items()}
        direction[name] = torch.ones_like(direction[name])
        fd = directional_fd(unroll, InnerState.fresh(task), direction)
        assert abs(dot(est.grads, direction) - fd) <= 1e-6 * abs(fd), name
    # after N the weights keep moving (at step N's step size)
    params = Unroll(meta, task, steps=5).loss(dict(meta.raw), InnerState.fresh(task))[1].params
    assert all(not torch.equal(v, params[k].detach()) for k, v in est.inner.params.items())


def _higher():
    """``higher`` and deepopt's backend on it, or a skip where it is not installed (the H200 image has none)."""
    higher = pytest.importorskip("higher")
    from deepopt.meta_train import higher_unroll_loss

    return higher, higher_unroll_loss


DEAD_UNIT_RULES = [("adam", RULES["adam"]),
                   ("deep_momentum", {**RULES["deep_momentum"], "preconditioner": "adam"})]


def _dead_unit_unroll(rule, hp):
    """A saturated tanh unit gets exactly-zero gradients, so Adam's second moment stays 0 there and
    d√v/dv = ∞: 4 steps of ``rule`` on such a model, and its backprop estimate."""
    task = mlp_task("dead_unit", "digits", (16,), "tanh", 32, seed=1, dtype=F64)
    with torch.no_grad():
        task.model[0].bias[0] = -1e3
    meta = MetaParams(rule, dtype=F64, **hp)
    unroll = Unroll(meta, task, steps=4)
    est = Backprop()(unroll, InnerState.fresh(task))
    assert float(est.inner.state["0.weight"]["exp_avg_sq"][0].abs().max()) == 0.0
    return meta, task, unroll, est


@pytest.mark.parametrize("rule,hp", DEAD_UNIT_RULES)
def test_exactly_zero_gradients_give_finite_meta_gradients(rule, hp):
    """The meta-gradient through exactly-zero gradients is finite and matches finite differences."""
    meta, task, unroll, est = _dead_unit_unroll(rule, hp)
    assert all(g.isfinite().all() for g in est.grads.values())
    direction = {k: torch.ones_like(v) for k, v in meta.raw.items()}
    fd, exact = directional_fd(unroll, InnerState.fresh(task), direction), dot(est.grads, direction)
    assert abs(exact - fd) <= 1e-6 * abs(fd), (exact, fd)


@pytest.mark.parametrize("rule,hp", DEAD_UNIT_RULES)
def test_exactly_zero_gradients_match_higher(rule, hp):
    _, higher_unroll_loss = _higher()
    meta, _, unroll, est = _dead_unit_unroll(rule, hp)
    raw = dict(meta.raw)
    grads = torch.autograd.grad(higher_unroll_loss(unroll, raw), list(raw.values()))
    for k, g in zip(raw, grads):
        torch.testing.assert_close(g, est.grads[k], rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("rule", sorted(RULES))
def test_checkpointed_backprop_equals_full_graph(task, rule):
    meta = MetaParams(rule, dtype=F64, **RULES[rule])
    unroll = Unroll(meta, task, steps=7)
    full = Backprop()(unroll, InnerState.fresh(task))
    for every in (1, 3):
        ck = Backprop(checkpoint_every=every)(unroll, InnerState.fresh(task))
        assert torch.allclose(ck.loss, full.loss, rtol=0, atol=1e-14)
        for k in full.grads:
            torch.testing.assert_close(ck.grads[k], full.grads[k], rtol=1e-12, atol=1e-15)
        for k in full.inner.params:
            assert torch.equal(ck.inner.params[k], full.inner.params[k])
        assert ck.inner.step == full.inner.step == 7


@pytest.mark.parametrize("outer", ["train", "log_train", "heldout"])
@pytest.mark.parametrize("rule", sorted(RULES))
def test_higher_backend_matches_torch_func(task, rule, outer):
    _, higher_unroll_loss = _higher()
    meta = MetaParams(rule, dtype=F64, **RULES[rule])
    unroll = Unroll(meta, task, steps=5, outer=outer)
    est = Backprop()(unroll, InnerState.fresh(task))
    raw = dict(meta.raw)
    loss = higher_unroll_loss(unroll, raw)
    grads = torch.autograd.grad(loss, list(raw.values()))
    assert abs(float(loss.detach()) - float(est.loss)) <= 1e-12
    for k, g in zip(raw, grads):
        assert (g - est.grads[k]).abs().max() <= 1e-8 * max(1.0, float(est.grads[k].abs().max())), k


@pytest.mark.parametrize("name", sorted(deepopt.OPTIMIZERS))
def test_higher_innerloop_with_deepopt_optimizer_matches_eager_steps(task, name):
    """``higher.innerloop_ctx(model, deepopt.X(...))`` takes the same steps as ``deepopt.X`` itself."""
    higher, _ = _higher()
    kwargs = {"adamw": dict(lr=0.01, weight_decay=0.1), "adam": dict(lr=0.01)}.get(name, dict(lr=0.05))
    model = copy.deepcopy(task.model)
    eager = copy.deepcopy(task.model)
    eager_opt = deepopt.OPTIMIZERS[name](eager.parameters(), **kwargs)
    with higher.innerloop_ctx(model, deepopt.OPTIMIZERS[name](model.parameters(), **kwargs)) as (
        fmodel,
        diffopt,
    ):
        for t in range(4):
            x, y = task.train_batch(t)
            diffopt.step(task.criterion(fmodel(x), y))
            eager_opt.zero_grad()
            task.criterion(eager(x), y).backward()
            eager_opt.step()
        for fast, slow in zip(fmodel.parameters(), eager.parameters()):
            torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-12)
        # the unroll is differentiable with respect to the initial weights
        x, y = task.train_batch(99)
        g = torch.autograd.grad(task.criterion(fmodel(x), y), next(fmodel.parameters(time=0)))[0]
        assert g.abs().sum() > 0


@pytest.mark.parametrize(
    "rule,hp", [("momentum", dict(lr=0.1)), ("deep_momentum", dict(lr=0.1, hidden=2, key_dim=4))]
)
def test_antithetic_es_agrees_with_exact_meta_gradient(rule, hp):
    task = quadratic_task(0, dtype=F64)
    meta = MetaParams(rule, dtype=F64, **hp)
    unroll = Unroll(meta, task, steps=10)
    exact = Backprop()(unroll, InnerState.fresh(task))
    es = AntitheticES(sigma=1e-3, pairs=500)(unroll, InnerState.fresh(task), key=1)
    a = torch.cat([exact.grads[k].flatten() for k in exact.grads])
    b = torch.cat([es.grads[k].flatten() for k in exact.grads])
    assert float(a @ b / (a.norm() * b.norm())) > 0.9
    assert torch.allclose(es.loss, exact.loss)
    for k in exact.inner.params:  # ES carries the unperturbed inner state, like backprop
        torch.testing.assert_close(es.inner.params[k], exact.inner.params[k])


def test_es_vectorized_equals_loop():
    task = quadratic_task(3, dtype=F64)
    unroll = Unroll(MetaParams("adam", dtype=F64, lr=0.05), task, steps=5)
    a = AntitheticES(sigma=0.01, pairs=4, vectorize=True, chunk=3)(unroll, InnerState.fresh(task), key=7)
    b = AntitheticES(sigma=0.01, pairs=4, vectorize=False)(unroll, InnerState.fresh(task), key=7)
    for k in a.grads:
        torch.testing.assert_close(a.grads[k], b.grads[k], rtol=1e-10, atol=1e-12)


def test_bad_arguments_raise_clear_errors(task):
    meta = MetaParams("momentum", dtype=F64)
    with pytest.raises(ValueError, match="outer"):
        Unroll(meta, task, 3, outer="test")
    with pytest.raises(ValueError, match="steps"):
        Unroll(meta, task, 0)
    with pytest.raises(ValueError, match="checkpoint_every"):
        Backprop(checkpoint_every=-1)
    with pytest.raises(ValueError, match="sigma"):
        AntitheticES(sigma=0.0)
    with pytest.raises(ValueError, match="pairs"):
        AntitheticES(pairs=0)
    with pytest.raises(ValueError, match="learn"):
        MetaParams("momentum", learn=("eta",))
    with pytest.raises(ValueError, match="unknown rule"):
        MetaParams("lion")


def _stack_members(kind: str) -> list:
    if kind == "quadratic":  # different curvatures (buffers), centres and weights
        return [quadratic_task(s, dim=6, dtype=F64) for s in range(3)]
    return [mlp_task(f"m{s}", "digits", (8,), "tanh", 16, seed=s, dtype=F64) for s in range(3)]


@pytest.mark.parametrize("kind", ["quadratic", "mlp"])
@pytest.mark.parametrize("rule", sorted(RULES))
def test_task_stack_under_vmap_equals_the_mean_of_its_tasks(rule, kind):
    """A TaskStack (vmap over tasks) gives the mean of the per-task meta-gradients, losses and final
    states, over two TBPTT truncations, with and without segment checkpointing."""
    meta = MetaParams(rule, dtype=F64, **RULES[rule])
    tasks = _stack_members(kind)
    stack = TaskStack(tuple(tasks))
    singles = [InnerState.fresh(t) for t in tasks]
    stacked = InnerState.fresh(stack)
    for estimator in (Backprop(), Backprop(checkpoint_every=2)):
        ests = [estimator(Unroll(meta, t, 3), inner) for t, inner in zip(tasks, singles)]
        est = estimator(Unroll(meta, stack, 3), stacked)
        assert float(est.loss) == pytest.approx(sum(float(e.loss) for e in ests) / 3, rel=1e-12)
        for k, g in est.grads.items():
            mean = sum(e.grads[k] for e in ests) / 3
            torch.testing.assert_close(g, mean, rtol=1e-10, atol=1e-14)
        for mine, theirs in zip(est.inner.unstack(), ests):
            assert mine.step == theirs.inner.step
            for k in theirs.inner.params:
                torch.testing.assert_close(mine.params[k], theirs.inner.params[k], rtol=1e-12, atol=1e-14)
        singles, stacked = [e.inner for e in ests], est.inner


def test_task_stack_refuses_tasks_of_different_structure():
    a = mlp_task("a", "digits", (8,), "tanh", 16, seed=0)
    with pytest.raises(ValueError, match="differs in structure"):
        TaskStack((a, mlp_task("b", "digits", (8,), "relu", 16, seed=1)))
    with pytest.raises(ValueError, match="differs in structure"):
        TaskStack((a, mlp_task("c", "digits", (8,), "tanh", 32, seed=1)))
    with pytest.raises(ValueError, match="non-empty"):
        TaskStack(())
    with pytest.raises(ValueError, match="share their step"):
        InnerState.stack([InnerState.fresh(a), InnerState(a.init_params(), None, 3)])


@pytest.mark.parametrize("outer", ["log_train", "heldout"])
def test_task_stack_other_outer_losses_and_es(outer):
    tasks = _stack_members("quadratic")
    stack = TaskStack(tuple(tasks))
    meta = MetaParams("momentum", dtype=F64, lr=0.1)
    est = Backprop()(Unroll(meta, stack, 4, outer), InnerState.fresh(stack))
    singles = [Backprop()(Unroll(meta, t, 4, outer), InnerState.fresh(t)) for t in tasks]
    for k, g in est.grads.items():
        torch.testing.assert_close(g, sum(s.grads[k] for s in singles) / 3, rtol=1e-10, atol=1e-14)
    es = AntitheticES(sigma=0.01, pairs=16)(Unroll(meta, stack, 4, outer), InnerState.fresh(stack), key=1)
    cos = dot(es.grads, est.grads) / (dot(es.grads, es.grads) * dot(est.grads, est.grads)) ** 0.5
    assert cos > 0.9


def test_meta_grad_benchmark_smoke(tmp_path):
    _higher()  # the benchmark compares the torch.func engine with higher
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "meta_grad.json"
    res = subprocess.run([sys.executable, str(root / "benchmarks" / "meta_grad.py"), "--smoke", "--json", str(out)],
                         capture_output=True, text=True, timeout=240, check=False,
                         env={**os.environ, "PYTHONPATH": str(root)})
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(out.read_text())
    assert len(report["variants"]) == 7 and all(v["seconds"] > 0 for v in report["variants"].values())
    assert set(report["checkpointing"]) == {"4", "16"}


def test_momenta_layout_meta_gradients_match_central_differences(task):
    """The shipped layout (keys from momenta at two time scales, Adam's P, W₂ online, a horizon schedule with
    warm-up): every learnable part, θ₀ = (W₁, W₂), the time scales, η, η₂, α, β₂ and the schedule, gets its exact
    meta-gradient on fresh and carried state."""
    hp = dict(lr=0.02, keys="momenta", hidden=3, momentum=0.8, eta=0.3, eta2=0.2, preconditioner="adam", beta2=0.9,
              timescales=(0.5, 0.95), lr_horizon=6, lr_power=1.2, lr_warmup=0.3)
    learn = ("W1", "W2", "timescales", "eta", "eta2", "momentum", "beta2", "lr", "lr_power", "lr_warmup")
    meta = MetaParams("deep_momentum", learn=learn, dtype=F64, **hp)
    with torch.no_grad():  # W₁⁰ ≠ 0, so W₂ shapes the first read too
        meta.raw["W1"].normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    unroll = Unroll(meta, task, steps=4, outer="log_train")
    carried = Backprop()(unroll, InnerState.fresh(task)).inner
    for start in (InnerState.fresh(task), carried):
        est = Backprop()(unroll, start)
        assert all(g.abs().sum() > 0 for k, g in est.grads.items() if start.step == 0 or k != "lr_warmup")
        gen = torch.Generator().manual_seed(0)
        for _ in range(2):
            direction = {k: torch.randn(v.shape, generator=gen, dtype=F64) for k, v in meta.raw.items()}
            fd, exact = directional_fd(unroll, start, direction), dot(est.grads, direction)
            assert abs(exact - fd) <= 1e-6 * abs(fd), (exact, fd)


def test_pes_is_unbiased_over_truncations():
    """PES summed over the truncations of a horizon estimates the gradient of the whole horizon's outer loss
    (backprop through the full unroll), which truncated backprop does not: on a noisy quadratic (horizon 12 in 3
    truncations of 4, momentum rule), 2048 antithetic pairs give cosine > 0.99 with the full gradient, and the
    particles are carried between truncations in ``InnerState.particles``."""
    from deepopt.meta_train import PES

    task = quadratic_task(3, dim=8, dtype=F64)
    meta = MetaParams("momentum", dtype=F64, lr=0.3, momentum=0.7)
    full = Backprop()(Unroll(meta, task, steps=12), InnerState.fresh(task)).grads
    pes, truncated = PES(sigma=1e-3, pairs=2048), Backprop()
    inner, carried = InnerState.fresh(task), InnerState.fresh(task)
    total = {k: torch.zeros_like(v) for k, v in full.items()}
    total_truncated = {k: torch.zeros_like(v) for k, v in full.items()}
    for i in range(3):
        est = pes(Unroll(meta, task, steps=4), inner, key=i)
        inner = est.inner
        assert inner.step == 4 * (i + 1) and inner.particles["xi"]["lr"].shape == (2048,)
        tb = truncated(Unroll(meta, task, steps=4), carried)
        carried = tb.inner
        for k in total:
            total[k] += est.grads[k] / 3
            total_truncated[k] += tb.grads[k] / 3

    def cosine(a, b):
        va, vb = torch.stack([a[k] for k in sorted(a)]), torch.stack([b[k] for k in sorted(b)])
        return float(va @ vb / (va.norm() * vb.norm()))

    assert cosine(total, full) > 0.99
    assert cosine(total, full) > cosine(total_truncated, full)
