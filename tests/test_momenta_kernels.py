"""The shipped learned optimizer's step (DeepMomentum, ``keys="momenta"``: Adam preconditioner, tanh features, dot
objective, W₂ fixed, decoupled weight decay) run fused: the C kernel (``deep_cpu.momenta_step_``) and the Triton
kernels (``deep_kernels.momenta_step_``, under the interpreter) against the equations in float64."""

import platform
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import run_under_triton_interpreter
from deepopt.optimizers import deep_cpu

import deepopt

SHAPES = [(7, 5), (1500,), (40, 33), (3,), (70000,)]  # tails of 3, 12, 8, 3 and a tensor the threads split
H, J = 8, 2


def reference(p, g, m, v, e, w1, w2, w1_0, lr, bc2, gammas, alpha, beta2, eps, eta, wd, features=torch.tanh):
    """The rule's equations for one tensor in float64 (``features``: Φ's map, tanh in the rule): returns new
    (p, m, v, e, w1)."""
    p, g, m, v, e, w1, w2, w1_0 = (x.double() for x in (p, g, m, v, e, w1, w2, w1_0))
    v = beta2 * v + (1 - beta2) * g * g
    pre = g / ((v / bc2).sqrt() + eps)
    m = alpha * m + pre
    gam = gammas.double().reshape(-1, *(1,) * g.dim())
    e = gam * e + (1 - gam) * pre
    keys = torch.stack([pre, (1 - alpha) * m, *e.unbind(0)], dim=-1).reshape(-1, 2 + J)
    phi = features(keys @ w2.mT)
    read = (phi @ w1.mT).reshape(g.shape)
    p = p - lr * (m + read) - lr * wd * p
    w1 = alpha * w1 + (1 - alpha) * w1_0 + eta * (pre.reshape(-1) @ phi / pre.numel()).unsqueeze(0)
    return p, m, v, e, w1


def case(seed=0, hidden=H, per_tensor_eps=False):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=1.0: scale * torch.randn(*s, generator=gen)
    ps, gs, ms = [r(*s) for s in SHAPES], [r(*s, scale=0.1) for s in SHAPES], [r(*s) for s in SHAPES]
    vs = [r(*s).square() * 0.01 for s in SHAPES]
    es = [r(J, *s) for s in SHAPES]
    w1s, w2s = [r(1, hidden, scale=0.3) for _ in SHAPES], [r(hidden, 2 + J) for _ in SHAPES]
    hp = dict(w1_0=r(1, hidden, scale=0.1), lr=torch.rand(len(SHAPES), generator=gen) * 0.01 + 1e-3,
              bc2=torch.rand(len(SHAPES), generator=gen) * 0.5 + 0.1, gammas=torch.tensor([0.5, 0.99]),
              alpha=0.9, beta2=0.95, eps=1e-8, eta=0.2, wd=0.1)
    if per_tensor_eps:  # relative_eps's ε + κρ per tensor, of the size of the gradients' RMS
        hp["eps"] = torch.rand(len(SHAPES), generator=gen) * 0.02 + 1e-3
    return ps, gs, ms, vs, es, w1s, w2s, hp


def eps_at(hp, i):
    """Tensor i's ε: the case's number, or its entry of a per-tensor ``(T,)`` eps."""
    return hp["eps"][i] if isinstance(hp["eps"], torch.Tensor) else hp["eps"]


def check(got, want, tol):
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol)


def origins_of(ps, seed=5):
    """W₀ for ``lr_adapt="dog"``: each parameter moved by noise (as if some steps had been taken)."""
    gen = torch.Generator().manual_seed(seed)
    return [p + 0.1 * torch.randn(p.shape, generator=gen) for p in ps]


def dog_sums(olds, wants, origins, hp):
    """``(‖u‖², ‖W_new − W₀‖²)`` per tensor from the equations' step ``W_new = W − lr(u + wd W)``, float64."""
    rows = []
    for i, (old, want, x0) in enumerate(zip(olds, wants, origins)):
        u = (old.double() - want[0]) / float(hp["lr"][i]) - hp["wd"] * old.double()
        rows.append([u.square().sum(), (want[0] - x0.double()).square().sum()])
    return torch.tensor(rows, dtype=torch.float64)


FEATURES = {"tanh": torch.tanh, "softsign": torch.nn.functional.softsign}


@pytest.mark.parametrize("threads,hidden,activation,dog,per_tensor_eps", [
    (1, H, "tanh", False, False), (2, H, "tanh", False, False), (2, 1, "tanh", False, False),
    (2, 64, "tanh", False, False), (1, H, "softsign", False, False), (2, 2, "softsign", False, False),
    (1, H, "tanh", True, False), (2, 2, "softsign", True, False), (2, H, "tanh", True, True)])
def test_c_kernel_equals_the_equations(threads, hidden, activation, dog, per_tensor_eps):
    """The step, and with ``origins`` (``lr_adapt="dog"``) the per-tensor sums ‖u‖², ‖W_new − W₀‖² it returns;
    ``per_tensor_eps``: a ``(T,)`` ε (``relative_eps``)."""
    if not deep_cpu.momenta_available(hidden, J, activation, dog):
        pytest.skip("no C compiler")
    ps, gs, ms, vs, es, w1s, w2s, hp = case(hidden=hidden, per_tensor_eps=per_tensor_eps)
    olds, origins = [p.clone() for p in ps], origins_of(ps)
    want = [reference(*xs, hp["w1_0"], hp["lr"][i], hp["bc2"][i], hp["gammas"], hp["alpha"], hp["beta2"],
                      eps_at(hp, i), hp["eta"], hp["wd"], features=FEATURES[activation])
            for i, xs in enumerate(zip(ps, gs, ms, vs, es, w1s, w2s))]
    sums = deep_cpu.momenta_step_(ps, gs, ms, vs, es, w1s, w2s, hp["w1_0"], hp["lr"], hp["bc2"], hp["gammas"],
                                  hp["alpha"], hp["beta2"], hp["eps"], hp["eta"], hp["wd"], activation=activation,
                                  threads=threads, origins=origins if dog else None)
    for i, w in enumerate(want):
        check((ps[i], ms[i], vs[i], es[i], w1s[i]), w, 2e-5)
    if dog:
        torch.testing.assert_close(sums, dog_sums(olds, want, origins, hp), rtol=1e-4, atol=1e-6)
    else:
        assert sums is None


@pytest.mark.parametrize("hidden", [1, H])
@pytest.mark.parametrize("activation", ["tanh", "softsign"])
@pytest.mark.parametrize("scale", [4.0, 100.0])
def test_c_kernel_features_to_float32_precision(hidden, activation, scale):
    """Φ itself, read back through the step, over pre-activations from −1.4·scale to 1.4·scale (from −6 to 6, and
    far past where e^(2|a|) overflows float32), to 1e-6: the step's tolerance above (2e-5, relative) would pass an
    exponential off by 1e-5.  With α = 0, γ = 1, W = 0, lr = 1, W₂'s first row (scale, 0, 0, 0), W₁ = (1, 0, …),
    the kernel stores p in m and W_new = −(p + Φ₀), Φ₀ = σ(scale·p); v is set so that p spans (−√2, √2)."""
    if not deep_cpu.momenta_available(hidden, J, activation):
        pytest.skip("no C compiler")
    n = 4099  # a tail of 3
    g = torch.linspace(-1, 1, n)
    v = torch.linspace(0, 2, n).flip(0)
    p, m, e = torch.zeros(n), torch.zeros(n), torch.zeros(J, n)
    w1, w2 = torch.zeros(1, hidden), torch.zeros(hidden, 2 + J)
    w1[0, 0], w2[0, 0] = 1.0, scale
    deep_cpu.momenta_step_([p], [g], [m], [v], [e], [w1], [w2], torch.zeros(1, hidden), torch.ones(1),
                           torch.ones(1), torch.ones(J), 0.0, 0.5, 0.0, 0.0, 0.0, activation=activation, threads=1)
    phi = -(p.double() + m.double())
    want = FEATURES[activation](scale * m.double())
    assert m.abs().max() > 1.4 and (scale * m).abs().min() < 1e-2 * scale  # the range it claims
    assert (phi - want).abs().max() <= 1e-6


def test_roofline_linear_kernel_computes_linear_features():
    """``benchmarks/momenta_roofline.py`` times a what-if kernel whose softsign line is replaced by Φ = z: it must
    compute the equations with linear features, or its rows would time something else."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import momenta_roofline
    lib = momenta_roofline.variant_library("linear", H, J)
    if lib is None:
        pytest.skip("no C compiler")
    ps, gs, ms, vs, es, w1s, w2s, hp = case()
    want = [reference(*xs, hp["w1_0"], hp["lr"][i], hp["bc2"][i], hp["gammas"], hp["alpha"], hp["beta2"],
                      hp["eps"], hp["eta"], hp["wd"], features=lambda z: z)
            for i, xs in enumerate(zip(ps, gs, ms, vs, es, w1s, w2s))]
    with momenta_roofline.routed_to(lib):
        deep_cpu.momenta_step_(ps, gs, ms, vs, es, w1s, w2s, hp["w1_0"], hp["lr"], hp["bc2"], hp["gammas"],
                               hp["alpha"], hp["beta2"], hp["eps"], hp["eta"], hp["wd"], activation="softsign",
                               threads=2)
    for i, w in enumerate(want):
        check((ps[i], ms[i], vs[i], es[i], w1s[i]), w, 2e-5)
    assert deep_cpu._momenta_library(H, J, "softsign") is not lib   # the softsign kernel is untouched


def test_c_kernel_on_each_thread_team_equals_the_equations(team):
    """The kernel on torch's OpenMP pool and on pthreads of its own (where the process has no GNU OpenMP, or with
    ``DEEPOPT_CPU_KERNEL_OPENMP=0``), three threads splitting the large tensor."""
    if not deep_cpu.momenta_available(H, J, "tanh", True):
        pytest.skip("no C compiler")
    assert deep_cpu.team_kind(deep_cpu._momenta_library(H, J, "tanh", True)) == team
    test_c_kernel_equals_the_equations(3, H, "tanh", True, True)


@pytest.mark.parametrize("isa_flags", ["-mno-avx512f", "-mno-avx512f -mno-avx2 -mno-fma"])
def test_c_kernel_equals_the_equations_on_each_instruction_set(isa_flags, monkeypatch):
    """The AVX2 + FMA and the plain-vector code paths (an AVX-512 machine takes neither by default) built with
    those instruction sets turned off; on a CPU without them the build is the default one again."""
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86 instruction-set flags")
    monkeypatch.setenv("DEEPOPT_CPU_KERNEL_FLAGS", isa_flags)
    deep_cpu._momenta_library.cache_clear()
    try:
        assert deep_cpu.momenta_available(H, J) and deep_cpu.momenta_available(H, J, "softsign")
        for activation, dog in (("tanh", False), ("softsign", False), ("tanh", True)):
            test_c_kernel_equals_the_equations(2, H, activation, dog, dog)
            test_c_kernel_features_to_float32_precision(H, activation, 100.0)
    finally:
        deep_cpu._momenta_library.cache_clear()


TRITON_CHECK = textwrap.dedent("""
    import sys
    import torch
    sys.path.insert(0, "tests")
    from deepopt.optimizers import deep_kernels
    from test_momenta_kernels import FEATURES, case, check, dog_sums, eps_at, origins_of, reference

    for activation, dog in [(a, d) for a in FEATURES for d in (False, True)]:
        ps, gs, ms, vs, es, w1s, w2s, hp = case(seed=1, per_tensor_eps=dog)  # a (T,) eps with DoG, as shipped
        olds, origins = [p.clone() for p in ps], origins_of(ps)
        want = [reference(*xs, hp["w1_0"], hp["lr"][i], hp["bc2"][i], hp["gammas"], hp["alpha"], hp["beta2"],
                          eps_at(hp, i), hp["eta"], hp["wd"], features=FEATURES[activation])
                for i, xs in enumerate(zip(ps, gs, ms, vs, es, w1s, w2s))]
        sums = deep_kernels.momenta_step_(ps, gs, ms, vs, es, w1s, w2s, hp["w1_0"], hp["lr"], hp["bc2"],
                                          hp["gammas"], hp["alpha"], hp["beta2"], hp["eps"], hp["eta"], hp["wd"],
                                          activation=activation, origins=origins if dog else None)
        for i, w in enumerate(want):
            check((ps[i], ms[i], vs[i], es[i], w1s[i]), w, 2e-5)
        if dog:
            torch.testing.assert_close(sums.double(), dog_sums(olds, want, origins, hp), rtol=1e-4, atol=1e-6)
        else:
            assert sums is None
    print("kernels equal the equations")
""")


def test_triton_kernels_equal_the_equations_under_the_interpreter():
    pytest.importorskip("triton")
    run_under_triton_interpreter(TRITON_CHECK, "kernels equal the equations")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("activation", list(FEATURES))
def test_triton_kernels_on_cuda_equal_the_equations(dtype, tol, activation):
    ps, gs, ms, vs, es, w1s, w2s, hp = case(seed=2)
    ps, gs, ms, vs, es = ([x.to(dtype) for x in xs] for xs in (ps, gs, ms, vs, es))
    want = [reference(*xs, hp["w1_0"], hp["lr"][i], hp["bc2"][i], hp["gammas"], hp["alpha"], hp["beta2"],
                      hp["eps"], hp["eta"], hp["wd"], features=FEATURES[activation])
            for i, xs in enumerate(zip(ps, gs, ms, vs, es, w1s, w2s))]
    cuda = [[x.cuda() for x in xs] for xs in (ps, gs, ms, vs, es, w1s, w2s)]
    from deepopt.optimizers import deep_kernels

    deep_kernels.momenta_step_(*cuda, hp["w1_0"].cuda(), hp["lr"].cuda(), hp["bc2"].cuda(), hp["gammas"].cuda(),
                               hp["alpha"], hp["beta2"], hp["eps"], hp["eta"], hp["wd"], activation=activation)
    for i, w in enumerate(want):
        check([cuda[k][i].cpu() for k in (0, 2, 3, 4, 5)], w, tol)


# ------------------------------------------------------------------ routed: DeepMomentum's step runs these kernels
# (300, 300): past the C kernel's SMALL (2¹⁶ on pthreads, 2¹² on torch's pool), split between its threads
ROUTE_SHAPES = [(7, 5), (1500,), (3,), (40, 33), (300, 300), (64,)]


def routed_run(make, steps=10, shapes=ROUTE_SHAPES, dtype=torch.float32, schedule=True):
    """``steps`` steps of the optimizer ``make(params)`` builds, with the group lr set every step by a warm-up +
    cosine scheduler (as a script written for AdamW does); returns (params, optimizer)."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in shapes]
    opt = make(params)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=opt.param_groups[0]["lr"], total_steps=steps,
                                                pct_start=0.3) if schedule else None
    for _ in range(steps):
        for i, p in enumerate(params):
            p.grad = (torch.randn(p.shape, generator=gen) * 0.1 * (1 + i)).to(dtype)
        opt.step()
        if sched is not None:
            sched.step()
    return params, opt


def assert_same_run(a, opt_a, b, opt_b, tol):
    """Parameters and every state entry equal (the C kernel sums C in double, the rule in fp32 over up to 9e4
    coordinates: W₁ differs by ~3e-5 there, W's by ~2e-6; DoG's G = Σ‖u‖² by up to 1.6e-4 relative, the fp32
    rule's sums being the farther from float64's)."""
    for p, q in zip(a, b):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=tol, atol=tol)
        assert opt_a.state[p].keys() == opt_b.state[q].keys()
        for key, value in opt_a.state[p].items():
            loose = 10 * tol if key == "dog_sum_sq" else tol
            torch.testing.assert_close(value, opt_b.state[q][key], rtol=loose, atol=tol, msg=key)


@pytest.fixture
def c_kernel_calls(monkeypatch):
    """Counts the C kernel's calls: a spy that runs the real ``deep_cpu.momenta_step_`` (with two threads, so
    the large tensor is split between them)."""
    if not deep_cpu.momenta_available(8, 2):
        pytest.skip("no C compiler")
    calls, real = [], deep_cpu.momenta_step_

    def spy(*args, **kwargs):
        calls.append(len(args[0]))
        return real(*args, threads=2, **kwargs)

    monkeypatch.setattr(deep_cpu, "momenta_step_", spy)
    return calls


@pytest.mark.parametrize("overrides", [dict(), dict(weight_decay=0.1)])
def test_shipped_optimizer_routes_to_the_c_kernel_and_equals_the_rule_path(c_kernel_calls, overrides):
    """``DeepMomentum.pretrained`` (the shipped configuration: momenta keys, Adam, learned schedule over
    ``total_steps``) on fp32 CPU parameters takes the C kernel, one call per step for the whole list, and its 10
    steps under a script's warm-up + cosine lr equal the rule path's (``foreach=False``), state included."""

    ours, opt = routed_run(lambda ps: deepopt.DeepMomentum.pretrained(ps, total_steps=20, **overrides))
    assert c_kernel_calls == [len(ROUTE_SHAPES)] * 10
    ref, ref_opt = routed_run(lambda ps: deepopt.DeepMomentum.pretrained(ps, total_steps=20, foreach=False,
                                                                         **overrides))
    assert len(c_kernel_calls) == 10  # the rule path does not call it
    assert_same_run(ours, opt, ref, ref_opt, 1e-4)
    assert all(float(opt.state[p]["step"]) == 10 for p in ours)


@pytest.mark.parametrize("options", [dict(hidden=64, timescales=(0.5, 0.9, 0.99)),
                                     dict(hidden=1, timescales=(0.8,), lr_decay=0.1, weight_decay=0.05),
                                     dict(hidden=2, timescales=(0.9,), activation="softsign"),
                                     dict(lr_adapt="dog", lr=1.0, weight_decay=0.1, lr_horizon=6),
                                     dict(lr_adapt="dog", lr=1.0, relative_eps=3.0),
                                     dict(hidden=2, timescales=(0.9,), activation="softsign", lr_adapt="dog", lr=0.5)])
def test_momenta_configurations_route_and_equal_the_rule_path(c_kernel_calls, options):
    """Other widths, time scales and features the kernel takes (hidden 1…64, 1–4 time scales, a 1/t schedule,
    softsign, DoG's step sizes) route too and equal the rule path."""
    kw = dict(keys="momenta", preconditioner="adam", lr=3e-3, eta=0.2, memory_init=None) | options
    ours, opt = routed_run(lambda ps: deepopt.DeepMomentum(ps, **kw), steps=6)
    ref, ref_opt = routed_run(lambda ps: deepopt.DeepMomentum(ps, foreach=False, **kw), steps=6)
    assert c_kernel_calls == [len(ROUTE_SHAPES)] * 6
    assert_same_run(ours, opt, ref, ref_opt, 1e-4)


def test_routed_state_dict_continues_on_the_rule_path(c_kernel_calls):
    """The routed step keeps the rule path's state layout: 5 routed steps, the state dict loaded into a
    ``foreach=False`` optimizer, 5 more steps there equal 10 routed steps (schedule and Adam counters included)."""

    def make(params, **kw):
        return deepopt.DeepMomentum.pretrained(params, total_steps=10, weight_decay=0.1, **kw)

    ours, opt = routed_run(make, schedule=False)
    first, first_opt = routed_run(make, steps=5, schedule=False)
    second = [p.detach().clone().requires_grad_() for p in first]
    second_opt = make(second)
    second_opt.load_state_dict(first_opt.state_dict())
    second_opt.param_groups[0]["foreach"] = False  # the loaded groups carry the routed run's foreach=None
    gen = torch.Generator().manual_seed(0)  # replay the gradients of steps 6..10
    for s in ROUTE_SHAPES:
        torch.randn(s, generator=gen)
    for step in range(10):
        grads = [torch.randn(p.shape, generator=gen) * 0.1 * (1 + i) for i, p in enumerate(second)]
        if step >= 5:
            for p, g in zip(second, grads):
                p.grad = g
            second_opt.step()
    assert c_kernel_calls == [len(ROUTE_SHAPES)] * 15  # 10 + 5 routed steps, none after the load
    assert_same_run(ours, opt, second, second_opt, 1e-4)


@pytest.mark.parametrize("change", [dict(keys="blocks", key_dim=16), dict(hidden=0), dict(preconditioner="identity"),
                                    dict(activation="relu"), dict(eta2=0.1), dict(nonlinearity="newton_schulz"),
                                    dict(weight_decay=0.1, decoupled_weight_decay=False)])
def test_momenta_kernels_take_the_shipped_options_only(change):
    """``_momenta_options`` (the CPU and CUDA routes' shared predicate) holds for the shipped configuration, with
    or without a schedule and decoupled decay, and fails for each option the kernels do not implement."""
    from deepopt.optimizers.deep_momentum import _momenta_options

    from deepopt import DeepMomentum

    shipped = DeepMomentum.pretrained([torch.zeros(3, requires_grad=True)], total_steps=20, weight_decay=0.1)
    group = shipped.param_groups[0]
    assert _momenta_options(group) and _momenta_options({**group, "lr_horizon": 0, "weight_decay": 0.0})
    assert not _momenta_options({**group, **change})


def test_rule_path_options_fall_back_from_the_c_kernel(c_kernel_calls):
    """Options the kernel does not take, fp64 and non-contiguous parameters run the torch paths: no call."""

    kw = dict(keys="momenta", hidden=8, preconditioner="adam", lr=1e-3)
    routed_run(lambda ps: deepopt.DeepMomentum(ps, activation="relu", **kw), steps=2, schedule=False)
    routed_run(lambda ps: deepopt.DeepMomentum(ps, **kw), steps=2, dtype=torch.float64, schedule=False)
    strided = torch.zeros(6, 4)[:, ::2].requires_grad_()
    opt = deepopt.DeepMomentum([strided], **kw)
    strided.grad = torch.ones_like(strided)
    opt.step()
    assert c_kernel_calls == []
    routed_run(lambda ps: deepopt.DeepMomentum(ps, **kw), steps=2, schedule=False)
    assert c_kernel_calls == [len(ROUTE_SHAPES)] * 2


def test_triton_route_takes_dense_fp32_bf16_lists_and_hidden_up_to_64():
    """The CUDA route's tensor predicate (``deep_kernels.momenta_available``; the device check is the caller's),
    on the metadata of CPU tensors: dense non-empty fp32/bf16 lists of one dtype, ``hidden`` a power of two ≤ 64."""
    pytest.importorskip("triton")
    from deepopt.optimizers import deep_kernels

    fp32 = [torch.zeros(5, 3), torch.zeros(7)]
    assert deep_kernels.momenta_available(fp32, 8) and deep_kernels.momenta_available(fp32, 64)
    assert deep_kernels.momenta_available([t.bfloat16() for t in fp32], 1)
    assert not deep_kernels.momenta_available(fp32, 12) and not deep_kernels.momenta_available(fp32, 128)
    assert not deep_kernels.momenta_available([t.double() for t in fp32], 8)
    assert not deep_kernels.momenta_available([torch.zeros(6, 4)[:, ::2]], 8)
    assert not deep_kernels.momenta_available([torch.zeros(0)], 8)
    assert not deep_kernels.momenta_available([fp32[0], fp32[1].bfloat16()], 8)


@pytest.mark.parametrize("dtype,routed", [(torch.float32, True), (torch.bfloat16, True), (torch.float16, False),
                                          (torch.float64, False)])
def test_cuda_route_decision_on_fake_cuda_tensors(dtype, routed):
    """On CUDA tensors (fakes: shapes, dtypes and the device, no GPU) the shipped optimizer's list goes to the
    Triton kernels for fp32/bf16, to the torch path otherwise; the blocks layout never goes to them."""
    pytest.importorskip("triton")
    from deepopt.optimizers import deep_kernels
    from deepopt.optimizers.deep_momentum import _momenta_kernel

    from deepopt.bench import cuda_tensor, fake_cuda
    from deepopt.rules.deep import init

    one = [torch.zeros(1, requires_grad=True)]
    groups = [deepopt.DeepMomentum.pretrained(one, total_steps=20, weight_decay=0.1).param_groups[0],
              deepopt.DeepMomentum(one, hidden=16).param_groups[0]]
    with fake_cuda() as mode:
        params = [torch.nn.Parameter(cuda_tensor(mode, s, dtype)) for s in ROUTE_SHAPES]
        for group in groups:
            states = [init(p, group) for p in params]
            want = routed and group["keys"] == "momenta"
            assert (_momenta_kernel(group, params, states) is deep_kernels.momenta_step_) == want


TRITON_ROUTE_CHECK = textwrap.dedent("""
    import sys
    import torch
    sys.path.insert(0, "tests")
    import deepopt
    from deepopt.optimizers import deep_kernels, deep_momentum
    from test_momenta_kernels import assert_same_run, routed_run

    # the CUDA branch of the route without its device check: the real Triton kernels, interpreted on CPU tensors
    calls = []

    def cuda_route(group, params, states):
        if deep_momentum._momenta_options(group) and deep_kernels.momenta_available(params, group["hidden"]):
            calls.append(len(params))
            return deep_kernels.momenta_step_
        return None

    deep_momentum._momenta_kernel = cuda_route
    shapes = [(7, 5), (1500,), (3,), (40, 33), (5000,)]
    # bf16 with the fixed-lr shipped optimizer: DoG's first bf16 steps are about an ulp, where the interpreter's
    # fp32 -> bf16 cast (it truncates; torch and the GPU round to nearest) decides which coordinates move
    for dtype, tol, name in ((torch.float32, 1e-4, "dmgd-dog"), (torch.bfloat16, 5e-2, "dmgd-general")):
        make = lambda ps, **kw: deepopt.DeepMomentum.from_pretrained(name, ps, total_steps=20, weight_decay=0.1,
                                                                     **kw)
        ours, opt = routed_run(make, steps=4, shapes=shapes, dtype=dtype)
        ref, ref_opt = routed_run(lambda ps: make(ps, foreach=False), steps=4, shapes=shapes, dtype=dtype)
        assert_same_run(ours, opt, ref, ref_opt, tol)
    assert calls == [len(shapes)] * 8, calls
    print("routed Triton step equals the rule path")
""")


def test_routed_triton_step_equals_the_rule_path_under_the_interpreter():
    """The CUDA route's glue (per-tensor lr_t and 1 − β₂ᵗ from the step counters, the counters advanced, DoG's
    r̄ and G carried, fp32 copies of a bf16 memory written back) with the real Triton kernels under the interpreter,
    fp32 (the default, DoG) and bf16 (the fixed-lr ``dmgd-general``), equal the rule path over 4 scheduled steps."""
    pytest.importorskip("triton")
    run_under_triton_interpreter(TRITON_ROUTE_CHECK, "routed Triton step equals the rule path")
