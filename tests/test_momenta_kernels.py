"""The shipped learned optimizer's step (DeepMomentum, ``keys="momenta"``: Adam preconditioner, tanh features, dot
objective, W₂ fixed, decoupled weight decay; ``/work`` note ``shipped_config.md``, helper ``learned``'s rule) run fused:
the C kernel (``deep_cpu.momenta_step_``) and the Triton kernels (``deep_kernels.momenta_step_``, under the
interpreter) against the equations in float64."""


import textwrap

import pytest
import torch
from conftest import run_under_triton_interpreter
from deepopt.optimizers import deep_cpu

SHAPES = [(7, 5), (1500,), (40, 33), (3,), (70000,)]  # tails of 3, 12, 8, 3 and a tensor the threads split
H, J = 8, 2


def reference(p, g, m, v, e, w1, w2, w1_0, lr, bc2, gammas, alpha, beta2, eps, eta, wd):
    """The rule's equations for one tensor in float64: returns new (p, m, v, e, w1)."""
    p, g, m, v, e, w1, w2, w1_0 = (x.double() for x in (p, g, m, v, e, w1, w2, w1_0))
    v = beta2 * v + (1 - beta2) * g * g
    pre = g / ((v / bc2).sqrt() + eps)
    m = alpha * m + pre
    gam = gammas.double().reshape(-1, *(1,) * g.dim())
    e = gam * e + (1 - gam) * pre
    keys = torch.stack([pre, (1 - alpha) * m, *e.unbind(0)], dim=-1).reshape(-1, 2 + J)
    phi = torch.tanh(keys @ w2.mT)
    read = (phi @ w1.mT).reshape(g.shape)
    p = p - lr * (m + read) - lr * wd * p
    w1 = alpha * w1 + (1 - alpha) * w1_0 + eta * (pre.reshape(-1) @ phi / pre.numel()).unsqueeze(0)
    return p, m, v, e, w1


def case(seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=1.0: scale * torch.randn(*s, generator=gen)
    ps, gs, ms = [r(*s) for s in SHAPES], [r(*s, scale=0.1) for s in SHAPES], [r(*s) for s in SHAPES]
    vs = [r(*s).square() * 0.01 for s in SHAPES]
    es = [r(J, *s) for s in SHAPES]
    w1s, w2s = [r(1, H, scale=0.3) for _ in SHAPES], [r(H, 2 + J) for _ in SHAPES]
    hp = dict(w1_0=r(1, H, scale=0.1), lr=torch.rand(len(SHAPES), generator=gen) * 0.01 + 1e-3,
              bc2=torch.rand(len(SHAPES), generator=gen) * 0.5 + 0.1, gammas=torch.tensor([0.5, 0.99]),
              alpha=0.9, beta2=0.95, eps=1e-8, eta=0.2, wd=0.1)
    return ps, gs, ms, vs, es, w1s, w2s, hp


def check(got, want, tol):
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol)


@pytest.mark.skipif(not deep_cpu.momenta_available(H, J), reason="no C compiler")
@pytest.mark.parametrize("threads", [1, 2])
def test_c_kernel_equals_the_equations(threads):
    ps, gs, ms, vs, es, w1s, w2s, hp = case()
    want = [reference(*xs, hp["w1_0"], hp["lr"][i], hp["bc2"][i], hp["gammas"], hp["alpha"], hp["beta2"],
                      hp["eps"], hp["eta"], hp["wd"]) for i, xs in enumerate(zip(ps, gs, ms, vs, es, w1s, w2s))]
    deep_cpu.momenta_step_(ps, gs, ms, vs, es, w1s, w2s, hp["w1_0"], hp["lr"], hp["bc2"], hp["gammas"], hp["alpha"],
                           hp["beta2"], hp["eps"], hp["eta"], hp["wd"], threads=threads)
    for i, w in enumerate(want):
        check((ps[i], ms[i], vs[i], es[i], w1s[i]), w, 2e-5)


TRITON_CHECK = textwrap.dedent("""
    import sys
    import torch
    sys.path.insert(0, "tests")
    from deepopt.optimizers import deep_kernels
    from test_momenta_kernels import case, check, reference

    ps, gs, ms, vs, es, w1s, w2s, hp = case(seed=1)
    want = [reference(*xs, hp["w1_0"], hp["lr"][i], hp["bc2"][i], hp["gammas"], hp["alpha"], hp["beta2"], hp["eps"],
                      hp["eta"], hp["wd"]) for i, xs in enumerate(zip(ps, gs, ms, vs, es, w1s, w2s))]
    deep_kernels.momenta_step_(ps, gs, ms, vs, es, w1s, w2s, hp["w1_0"], hp["lr"], hp["bc2"], hp["gammas"],
                               hp["alpha"], hp["beta2"], hp["eps"], hp["eta"], hp["wd"])
    for i, w in enumerate(want):
        check((ps[i], ms[i], vs[i], es[i], w1s[i]), w, 2e-5)
    print("kernels equal the equations")
""")


def test_triton_kernels_equal_the_equations_under_the_interpreter():
    pytest.importorskip("triton")
    run_under_triton_interpreter(TRITON_CHECK, "kernels equal the equations")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
def test_triton_kernels_on_cuda_equal_the_equations(dtype, tol):
    ps, gs, ms, vs, es, w1s, w2s, hp = case(seed=2)
    ps, gs, ms, vs, es = ([x.to(dtype) for x in xs] for xs in (ps, gs, ms, vs, es))
    want = [reference(*xs, hp["w1_0"], hp["lr"][i], hp["bc2"][i], hp["gammas"], hp["alpha"], hp["beta2"],
                      hp["eps"], hp["eta"], hp["wd"]) for i, xs in enumerate(zip(ps, gs, ms, vs, es, w1s, w2s))]
    cuda = [[x.cuda() for x in xs] for xs in (ps, gs, ms, vs, es, w1s, w2s)]
    from deepopt.optimizers import deep_kernels

    deep_kernels.momenta_step_(*cuda, hp["w1_0"].cuda(), hp["lr"].cuda(), hp["bc2"].cuda(), hp["gammas"].cuda(),
                               hp["alpha"], hp["beta2"], hp["eps"], hp["eta"], hp["wd"])
    for i, w in enumerate(want):
        check([cuda[k][i].cpu() for k in (0, 2, 3, 4, 5)], w, tol)
