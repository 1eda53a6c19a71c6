"""DeltaMomentum's Triton kernels equal the pure rule: on the CPU under ``TRITON_INTERPRET=1`` (a subprocess,
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
    from deepopt.optimizers import delta_kernels, delta_momentum
    from deepopt.rules import delta_momentum as rule

    torch.manual_seed(0)
    shapes = [(7, 5), (3000,), (40, 33), (1,)]
    for dtype, tol in ((torch.float32, 2e-6), (torch.bfloat16, 2e-2)):
        ps, ms, gs = ([torch.randn(s).to(dtype) for s in shapes] for _ in range(3))
        gs[3].zero_()  # a zero key erases nothing
        hp = rule.hparams(lr=0.1, momentum=0.9, beta=0.5)
        before = [p.float().clone() for p in ps]
        want = [rule.update(g.float(), {"momentum_buffer": m.float().clone()}, p, hp)
                for p, m, g in zip(before, ms, gs)]
        lr = 0.1 if dtype == torch.float32 else torch.tensor(0.1)  # a tensor lr is loaded by the kernel
        delta_kernels.delta_momentum_step_(ps, gs, ms, lr, 0.9, 0.5)
        for p0, (delta, st), p, m in zip(before, want, ps, ms):
            torch.testing.assert_close(m.float(), st["momentum_buffer"], rtol=tol, atol=tol)
            torch.testing.assert_close(p.float(), p0 + delta, rtol=tol, atol=tol)
    # the optimizer class on the kernel path (forced on the CPU) against the per-tensor rule
    def run(force):
        make = lambda ps: deepopt.DeltaMomentum(ps, lr=0.05, weight_decay=0.01, foreach=None if force else False)
        with mock.patch.object(delta_momentum, "_cpu_loop_applies", lambda *_: False), \\
             mock.patch.object(delta_momentum, "_triton_applies", lambda *_: force):
            model, _ = train_tiny_mlp(make)
        return list(model.parameters())
    for a, b in zip(run(True), run(False)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    print("kernels equal the rule")
""")


def test_kernels_equal_the_rule_under_the_triton_interpreter():
    run_under_triton_interpreter(CHECK, "kernels equal the rule")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_kernel_path_on_cuda_equals_the_cpu_rule():
    a, b = small_mlp(dtype=torch.float32), small_mlp(dtype=torch.float32).cuda()
    train(a, deepopt.DeltaMomentum(a.parameters(), lr=0.05, foreach=False), 20)
    train(b, deepopt.DeltaMomentum(b.parameters(), lr=0.05), 20)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q.cpu(), rtol=1e-4, atol=1e-5)


def test_a_pointer_table_made_inside_a_graph_capture_pins_no_memory():
    """Gradients allocated by a CUDA-graph capture have new addresses, so their pointer table is built inside the
    capture: from a spare pinned buffer the warm-up's tables left, not by pinning there (on fake CUDA tensors)."""
    from types import SimpleNamespace
    from unittest import mock

    from deepopt.optimizers import delta_kernels

    from deepopt.bench import fake_cuda

    def tensors(base):
        return [SimpleNamespace(device=torch.device("cuda", 0), data_ptr=lambda a=a: a) for a in (base, base + 512)]

    pinned = []
    with fake_cuda(), mock.patch.object(delta_kernels, "_spare_pinned", {}), \
            mock.patch.object(delta_kernels, "_captured_tables", {}), \
            mock.patch.object(delta_kernels, "_pointer_tables", {}), \
            mock.patch.object(torch.Tensor, "pin_memory", lambda t: pinned.append(t) or t):
        delta_kernels._pointers(tensors(1 << 20))  # warm-up: the table and a spare
        assert len(pinned) == 2 and len(delta_kernels._spare_pinned[2]) == 1
        with mock.patch.object(torch.cuda, "is_current_stream_capturing", lambda: True):
            table = delta_kernels._pointers(tensors(1 << 30))
        assert len(pinned) == 2 and not delta_kernels._spare_pinned[2]  # the spare served, nothing pinned
        assert table.device.type == "cuda" and len(delta_kernels._captured_tables) == 1
