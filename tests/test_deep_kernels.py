"""DeepMomentum's Triton kernels equal the pure rule: on the CPU under ``TRITON_INTERPRET=1`` (a subprocess,
since the interpreter is chosen when the kernels are defined) and on CUDA when a device is present."""

import textwrap

import pytest
import torch
from conftest import INTERPRETER_TRAINING, run_under_triton_interpreter, small_mlp, train

import deepopt

pytest.importorskip("triton")

CHECK = INTERPRETER_TRAINING + textwrap.dedent("""
    import torch
    from unittest import mock
    import deepopt
    from deepopt.optimizers import deep_kernels, deep_momentum
    from deepopt.rules import deep_momentum as rule

    torch.manual_seed(0)
    # numels 35, 1500 (two tiles), 1320, 3, 4200 (two work items of TILES tiles): not multiples of 16
    shapes = [(7, 5), (1500,), (40, 33), (3,), (4200,)]
    cases = [(torch.float32, "tanh", 16, 2e-5, False), (torch.float32, "relu", 16, 2e-5, True),
             (torch.bfloat16, "identity", 16, 3e-2, False), (torch.float32, "tanh", 64, 2e-5, False)]
    assert deep_kernels.BLOCK * deep_kernels.TILES < 4200 and 64 > deep_kernels.HIDDEN_CHUNK  # what is covered
    for dtype, act, hidden, tol, tensor_scalars in cases:
        hp = rule.hparams(lr=0.1, momentum=0.9, eta=0.3, activation=act, hidden=hidden)
        ps, ms, gs = ([torch.randn(s).to(dtype) for s in shapes] for _ in range(3))
        gs[3].zero_()  # a zero gradient: keys and features zero, norms taken as 1
        # a non-zero memory, so the read-out is tested
        w1s = [(torch.randn(16, hidden) / hidden ** 0.5).to(dtype) for _ in shapes]
        w2s = [torch.randn(hidden, 16).to(dtype) for _ in shapes]
        before = [p.float().clone() for p in ps]
        want = [rule.update(g.float(), {"momentum_buffer": m.float().clone(), "W1": a.float(), "W2": b.float(),
                                        "step": torch.tensor(0.0)}, p, hp)
                for p, m, g, a, b in zip(before, ms, gs, w1s, w2s)]
        w1, w2 = torch.stack(w1s), torch.stack(w2s)
        scalars = [torch.tensor(x) if tensor_scalars else x for x in (0.1, 0.9, 0.3)]
        deep_kernels.deep_momentum_step_(ps, gs, ms, w1, w2, *scalars, activation=act)
        for i, (p0, (delta, st), p, m) in enumerate(zip(before, want, ps, ms)):
            torch.testing.assert_close(m.float(), st["momentum_buffer"], rtol=tol, atol=tol)
            torch.testing.assert_close(w1[i].float(), st["W1"], rtol=tol, atol=tol)
            torch.testing.assert_close(p.float(), p0 + delta, rtol=tol, atol=tol)
    # the optimizer class on the kernel path (forced on the CPU) against its normal CPU path
    def run(force):
        with mock.patch.object(deep_momentum, "_triton_applies", lambda *_: force):
            model, opt = train_tiny_mlp(lambda ps: deepopt.DeepMomentum(ps, lr=0.05, weight_decay=0.01))
        return list(model.parameters()), [opt.state[p]["W1"] for p in model.parameters()]
    (pa, wa), (pb, wb) = run(True), run(False)
    for a, b in zip(pa + wa, pb + wb):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    print("kernels equal the rule")
""")


def test_kernels_equal_the_rule_under_the_triton_interpreter():
    run_under_triton_interpreter(CHECK, "kernels equal the rule")


def test_bad_input_raises():
    from deepopt.optimizers import deep_kernels
    p = [torch.zeros(4)]
    with pytest.raises(ValueError, match="activation"):
        deep_kernels.deep_momentum_step_(p, p, p, torch.zeros(1, 16, 16), torch.zeros(1, 16, 16), 0.1, 0.9, 0.1,
                                         activation="gelu")
    with pytest.raises(ValueError, match="w1, w2"):
        deep_kernels.deep_momentum_step_(p, p, p, torch.zeros(2, 16, 16), torch.zeros(2, 16, 16), 0.1, 0.9, 0.1)
    assert not deep_kernels.available([torch.zeros(4, dtype=torch.float64)])
    assert not deep_kernels.available([torch.zeros(4)], key_dim=8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_kernel_path_on_cuda_equals_the_cpu_rule():
    a, b = small_mlp(dtype=torch.float32), small_mlp(dtype=torch.float32).cuda()
    train(a, deepopt.DeepMomentum(a.parameters(), lr=0.05), 20)
    train(b, deepopt.DeepMomentum(b.parameters(), lr=0.05), 20)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q.cpu(), rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_kernel_path_on_cuda_with_tf32_is_within_tf32_rounding_of_the_rule(monkeypatch):
    """With TF32 matmuls allowed the products run on tensor cores: Φ and the read-out carry relative errors of
    about 2⁻¹⁰ (TF32's mantissa), so the trajectory is compared at that scale."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    a, b = small_mlp(dtype=torch.float32), small_mlp(dtype=torch.float32).cuda()
    train(a, deepopt.DeepMomentum(a.parameters(), lr=0.05), 20)
    train(b, deepopt.DeepMomentum(b.parameters(), lr=0.05), 20)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q.cpu(), rtol=1e-2, atol=2e-3)
