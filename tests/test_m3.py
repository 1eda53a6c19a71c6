"""M3 (Multi-scale Momentum Muon): torch.optim.Muon at one level, the two memories' schedule, the paper's
printed form, non-matrix parameters, the fast path (parity, no host reads, op count), resume, gradients."""

import copy
import unittest.mock

import pytest
import torch
import torch.optim._muon as torch_muon

import deepopt
from deepopt.bench import count_step_ops
from deepopt.rules import m3, newton_schulz

F64 = torch.float64


def matrices(seed: int = 0) -> list[torch.nn.Parameter]:
    """Two same-shape matrices (batched Newton–Schulz), a tall one and a wide one."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=F64)) for s in [(6, 4), (6, 4), (9, 3), (3, 7)]]


def feed(params, opt, steps: int, start: int = 0) -> None:
    for t in range(start, start + steps):
        gen = torch.Generator().manual_seed(100 + t)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        opt.step()


def fp64_newton_schulz(*args, **kwargs):
    """torch's Muon Newton–Schulz without its bf16 cast (both sides then compute in float64)."""
    with unittest.mock.patch.object(torch.Tensor, "bfloat16", lambda t: t.clone()):
        return ORIGINAL_NS(*args, **kwargs)


ORIGINAL_NS = torch_muon._zeropower_via_newtonschulz


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_one_level_is_torch_muon(foreach, nesterov, weight_decay):
    """alpha=0, no second moment: ``torch.optim.Muon(lr, momentum=β₁, nesterov, weight_decay)`` exactly."""
    ours, theirs = matrices(), matrices()
    feed(ours, deepopt.M3(ours, lr=0.05, momentum=0.9, alpha=0.0, nesterov=nesterov, weight_decay=weight_decay,
                          foreach=foreach), 30)
    with unittest.mock.patch.object(torch_muon, "_zeropower_via_newtonschulz", fp64_newton_schulz):
        feed(theirs, torch.optim.Muon(theirs, lr=0.05, momentum=0.9, nesterov=nesterov, weight_decay=weight_decay),
             30)
    assert max((a - b).abs().max().item() for a, b in zip(ours, theirs)) <= 1e-12


# (with V the step is lr·O/√V̂, large where gradients are small: a smaller lr keeps the run non-chaotic)
def test_bf16_newton_schulz_is_torch_muons_precision():
    """``ns_dtype="bfloat16"``: float32 parameters and state, Newton–Schulz iterated in bf16 as torch's Muon
    does (the op order differs, so the steps agree to bf16 precision, not bitwise)."""
    ours, theirs = ([torch.nn.Parameter(p.detach().float()) for p in matrices()] for _ in range(2))
    opt = deepopt.M3(ours, lr=0.05, alpha=0.0, ns_dtype="bfloat16")
    feed(ours, opt, 5)
    feed(theirs, torch.optim.Muon(theirs, lr=0.05, weight_decay=0.0), 5)
    start = [p.float() for p in matrices()]
    for a, b, w in zip(ours, theirs, start):
        assert a.dtype == torch.float32 and opt.state[a]["fast"].dtype == torch.float32
        assert (a - b).norm() <= 0.02 * (b - w).norm()


def test_slow_memory_is_written_once_per_chunk_from_that_chunks_gradients():
    """M² changes only at steps f, 2f, …, to β₃M² + (1 − β₃)·(sum of the chunk's gradients); O² = NS(M²)
    then, and the chunk's sum restarts at 0; the first chunk's steps use O² = 0 (fast memory only)."""
    f, b3 = 3, 0.6
    (w,) = params = [torch.nn.Parameter(torch.randn(5, 4, dtype=F64))]
    opt = deepopt.M3(params, lr=0.01, chunk=f, slow_momentum=b3)
    slow, chunk = torch.zeros(5, 4, dtype=F64), torch.zeros(5, 4, dtype=F64)
    for t in range(1, 3 * f + 2):
        g = torch.randn(5, 4, dtype=F64)
        w.grad = g.clone()
        before = copy.deepcopy(opt.state[w]) if opt.state[w] else None
        opt.step()
        st = opt.state[w]
        chunk = chunk + g
        if t % f == 0:
            slow, chunk = b3 * slow + (1 - b3) * chunk, torch.zeros_like(chunk)
        assert torch.allclose(st["slow"], slow, rtol=0, atol=1e-13)
        assert torch.allclose(st["chunk_sum"], chunk, rtol=0, atol=1e-13)
        want_ortho = newton_schulz(slow) if t >= f else torch.zeros_like(slow)
        assert torch.allclose(st["slow_ortho"], want_ortho, rtol=0, atol=1e-12)
        if before is not None and t % f != 0:
            assert torch.equal(st["slow"], before["slow"])


def test_algorithm_1_as_printed():
    """``accumulate="sum"``: M¹ = β₁Σg, V = β₂Σg², M² += β₃·(chunk sum) and
    W ← W − η(NS(M¹) + α·NS(M²)) / √(V + ε), step by step (Algorithm 1 without Nesterov)."""
    b1, b2, b3, alpha, eps, lr, f = 0.9, 0.5, 0.7, 0.4, 1e-6, 0.01, 2
    w = torch.nn.Parameter(torch.randn(4, 6, dtype=F64))
    opt = deepopt.M3([w], lr=lr, momentum=b1, beta2=b2, slow_momentum=b3, alpha=alpha, eps=eps, chunk=f,
                     second_moment=True, nesterov=False, accumulate="sum")
    m1, v, m2, o2, chunk, expected = 0, 0, 0, torch.zeros(4, 6, dtype=F64), 0, w.detach().clone()
    for t in range(1, 8):
        g = torch.randn(4, 6, dtype=F64)
        w.grad = g
        opt.step()
        m1, v, chunk = m1 + b1 * g, v + b2 * g * g, chunk + g
        expected = expected - lr * (newton_schulz(m1) + alpha * o2) / (v + eps).sqrt()
        if t % f == 0:
            m2, chunk = m2 + b3 * chunk, 0
            o2 = newton_schulz(m2)
        assert torch.allclose(w, expected, rtol=0, atol=1e-12)


def test_vectors_are_not_orthogonalised():
    """On a 1-D parameter M3 is EMA momentum ``W ← W − lr·m`` (Adam-like ``m/√(v̂ + ε)`` with V), plus α·M²."""
    lr, mu, b2, eps = 0.1, 0.8, 0.9, 1e-8
    w, w2 = (torch.nn.Parameter(torch.zeros(5, dtype=F64)) for _ in range(2))
    plain = deepopt.M3([w], lr=lr, momentum=mu, alpha=0.0, nesterov=False)
    adam_like = deepopt.M3([w2], lr=lr, momentum=mu, beta2=b2, eps=eps, alpha=0.0, nesterov=False,
                           second_moment=True)
    m, v, want, want2 = 0, 0, torch.zeros(5, dtype=F64), torch.zeros(5, dtype=F64)
    for t in range(1, 6):
        g = torch.randn(5, dtype=F64)
        w.grad, w2.grad = g.clone(), g.clone()
        plain.step()
        adam_like.step()
        m, v = mu * m + (1 - mu) * g, b2 * v + (1 - b2) * g * g
        want, want2 = want - lr * m, want2 - lr * m / (v / (1 - b2**t) + eps).sqrt()
        assert torch.allclose(w, want, atol=1e-14) and torch.allclose(w2, want2, atol=1e-12)


def _ops(n_matrices: int, **options):
    params = [torch.nn.Parameter(torch.randn(8, 8)) for _ in range(n_matrices)]
    params += [torch.nn.Parameter(torch.randn(8)) for _ in range(n_matrices)]
    opt = deepopt.M3(params, lr=0.01, chunk=2, **options)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    return count_step_ops(opt)  # the second step: a chunk end, both memories orthogonalised


@pytest.mark.parametrize("options", [dict(), dict(second_moment=True), dict(accumulate="sum", nesterov=False)])
def test_fast_path_reads_nothing_on_the_host_and_its_op_count_does_not_grow(options):
    few, many = _ops(3, **options), _ops(12, **options)
    assert few.total == many.total
    assert not any("_local_scalar_dense" in op or "item" in op for op in many.ops)


def test_resume_from_a_state_dict_mid_chunk_is_exact():
    """The host step count the fast path uses for chunk ends comes back with ``load_state_dict``."""
    a, b = matrices(), matrices()
    opt_a = deepopt.M3(a, lr=0.02, chunk=4, second_moment=True)
    feed(a, opt_a, 10)
    opt_b = deepopt.M3(b, lr=0.02, chunk=4, second_moment=True)
    feed(b, opt_b, 5)
    saved = copy.deepcopy(opt_b.state_dict())
    resumed = deepopt.M3(b, lr=0.02, chunk=4, second_moment=True)
    resumed.load_state_dict(saved)
    feed(b, resumed, 5, start=5)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copied_optimizer_keeps_the_chunk_phase(how):
    """torch pickles only defaults, state and groups: the host step counts are rebuilt from the state."""
    import pickle

    a = matrices()
    opt = deepopt.M3(a, lr=0.02, chunk=4)
    feed(a, opt, 5)
    b, twin = copy.deepcopy((a, opt)) if how == "deepcopy" else pickle.loads(pickle.dumps((a, opt)))
    feed(a, opt, 6, start=5)
    feed(b, twin, 6, start=5)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_a_skipped_step_keeps_the_chunk_phase():
    """``nonfinite="skip"``: a step skipped on the device does not count towards the chunk."""
    a, b = matrices(), matrices()
    opt_a = deepopt.M3(a, lr=0.02, chunk=3, nonfinite="skip")
    opt_b = deepopt.M3(b, lr=0.02, chunk=3)
    feed(a, opt_a, 2)
    feed(b, opt_b, 2)
    for p in a:
        p.grad = torch.full_like(p, float("nan"))
    opt_a.step()
    feed(a, opt_a, 6, start=2)
    feed(b, opt_b, 6, start=2)
    assert max((x - y).abs().max().item() for x, y in zip(a, b)) <= 1e-12


@pytest.mark.parametrize("name", ["lr", "momentum", "slow_momentum", "alpha", "beta2"])
def test_meta_gradient_through_chunk_ends_matches_finite_differences(name):
    """d(loss after 5 steps)/d(hyperparameter) through the pure rule, across two chunk ends (f = 2), with
    the second moment: torch.func.grad equals central differences."""
    torch.manual_seed(0)
    w0, target = torch.randn(4, 3, dtype=F64), torch.randn(4, 3, dtype=F64)

    def unroll(x):
        hp = m3.hparams(lr=0.05, chunk=2, second_moment=True, alpha=0.7, slow_momentum=0.6, beta2=0.9)
        hp[name] = x
        w, state = w0, m3.init(w0, hp)
        for _ in range(5):
            g = 2 * (w - target) + 0.1 * w**3
            delta, state = m3.update(g, state, w, hp)
            w = w + delta
        return ((w - target) ** 2).sum()

    x = torch.tensor(float(m3.hparams(lr=0.05, alpha=0.7, slow_momentum=0.6, beta2=0.9)[name]), dtype=F64)
    exact = torch.func.grad(unroll)(x)
    h = 1e-6
    fd = (unroll(x + h) - unroll(x - h)) / (2 * h)
    assert exact.abs() > 1e-6 and torch.allclose(exact, fd, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("kwargs,exc,word", [
    (dict(chunk=0), ValueError, "chunk"), (dict(chunk=2.0), TypeError, "chunk"),
    (dict(momentum=1.0), ValueError, "momentum"), (dict(slow_momentum=-0.1), ValueError, "slow_momentum"),
    (dict(alpha=-1.0), ValueError, "alpha"), (dict(eps=0.0), ValueError, "eps"),
    (dict(accumulate="mean"), ValueError, "accumulate"), (dict(second_moment=1), TypeError, "second_moment"),
    (dict(ns_steps=0), ValueError, "ns_steps"), (dict(ns_dtype="float16"), ValueError, "ns_dtype"),
    (dict(betas=(0.9, 0.99)), TypeError, "betas"),
])
def test_bad_hyperparameters_are_named(kwargs, exc, word):
    with pytest.raises(exc, match=word):
        deepopt.M3(matrices(), **kwargs)


def test_complex_parameters_are_refused():
    with pytest.raises(TypeError, match="complex"):
        deepopt.M3([torch.nn.Parameter(torch.randn(3, 3, dtype=torch.complex64))])


def test_paper_preset_is_algorithm_1_as_printed():
    """``M3(paper=True)`` is ``accumulate="sum", second_moment=True, nesterov=False``; naming one of those as
    well is refused (the preset would silently win or lose)."""
    a, b = matrices(), matrices()
    feed(a, deepopt.M3(a, lr=1e-3, chunk=2, paper=True), 7)
    feed(b, deepopt.M3(b, lr=1e-3, chunk=2, accumulate="sum", second_moment=True, nesterov=False), 7)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    group = deepopt.M3(matrices(), paper=True).param_groups[0]
    assert (group["accumulate"], group["second_moment"], group["nesterov"]) == ("sum", True, False)
    for clash in (dict(nesterov=True), dict(second_moment=False), dict(accumulate="ema")):
        with pytest.raises(TypeError, match="paper=True"):
            deepopt.M3(matrices(), paper=True, **clash)
    with pytest.raises(TypeError, match="paper must be a bool"):
        deepopt.M3(matrices(), paper="yes")
