"""The Titans scan op (``deepopt::titans_scan``): hand-derived reverse mode == autograd (float64), the op's
registration (opcheck), the op == the Python chunk loop with gradients, and a training step whose dispatched op
count does not grow with the context."""

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from deepopt.hope import titans_kernels as tk
from deepopt.hope.model import HopeConfig, LanguageModel, SelfModifyingTitans

F64 = torch.float64


def scan_inputs(B=2, H=2, T=13, d=4, hid=3, dtype=F64, device="cpu", seed=0):
    """Random inputs of ``titans_scan`` (tensors requiring grad) with memories that move visibly."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=1.0: (scale * torch.randn(*s, generator=g, dtype=F64)).to(device, dtype).requires_grad_()
    u = r(B, H, T, d)
    q = torch.nn.functional.normalize(torch.randn(B, H, T, d, generator=g, dtype=F64), dim=-1)
    q = q.to(device, dtype).requires_grad_()
    return (u, q, r(H, 5, d, hid, scale=0.5), r(H, 5, hid, d, scale=0.5), r(H, d, scale=0.5), r(H, scale=1.0),
            r(H, d, scale=0.5), r(H, scale=1.0))


@pytest.mark.parametrize("activation", ["silu", "tanh", "gelu", "relu", "identity"])
@pytest.mark.parametrize("delta_gd", [True, False])
def test_chunk_vjp_equals_autograd_float64(activation, delta_gd):
    torch.manual_seed(0)
    B, H, C, d, hid = 2, 2, 5, 4, 3
    w1, w2 = (0.5 * torch.randn(B, H, 5, d, hid, dtype=F64)).requires_grad_(), \
        (0.5 * torch.randn(B, H, 5, hid, d, dtype=F64)).requires_grad_()
    u, q, *params = scan_inputs(B, H, C, d, hid)[:2] + scan_inputs(B, H, C, d, hid)[4:]
    for learns in (True, False):
        consts = {"eta_scale": 0.4, "activation": activation, "delta_gd": delta_gd, "learns": learns, "kappa": -0.8}
        outs = tk.chunk_step(w1, w2, u, q, tuple(params), **consts)
        cots = [torch.randn_like(o) for o in outs]
        want = torch.autograd.grad(sum((o * c).sum() for o, c in zip(outs, cots)), (w1, w2, u, q, *params),
                                   allow_unused=True, materialize_grads=True)
        dw1, dw2, du, dq, dps = tk.chunk_vjp(*(x.detach() for x in (w1, w2, u, q)), tuple(p.detach() for p in params),
                                             *cots, **consts)
        got = (dw1, dw2, du, dq, *(p.sum(0) for p in dps))
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
        assert want[0].abs().max() > 1e-2 and (not learns or want[4].abs().max() > 1e-3)


SCALARS = (4, 1.5, "silu", True, True, -1.0)  # chunk_size, eta_max, activation, delta_gd, learns, kappa


def test_scan_op_passes_opcheck():
    torch.library.opcheck(torch.ops.deepopt.titans_scan.default, (*scan_inputs(), *SCALARS))


@pytest.mark.parametrize("T", [12, 13])  # whole chunks, and a partial last one
def test_scan_op_equals_the_chunk_loop_with_gradients(T):
    """The op (reverse walk of ``chunk_vjp``) against autograd through the torch chunk loop, outputs and final
    states with random cotangents, float64."""
    inputs = scan_inputs(T=T)
    n = -(-T // SCALARS[0])
    y, s1, s2 = tk.titans_scan(*inputs, *SCALARS)
    ry, r1, r2 = tk._scan_reference(*inputs[:4], tuple(inputs[4:]), SCALARS[0], tk._consts(*SCALARS))
    assert s1.shape[2] == n + 1
    for a, b in ((y, ry), (s1, r1), (s2, r2)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    cots = [torch.randn_like(y), torch.randn_like(s1), torch.randn_like(s2)]
    got, want = (torch.autograd.grad(sum((o * c).sum() for o, c in zip(outs, cots)), inputs, retain_graph=True)
                 for outs in ((y, s1, s2), (ry, r1, r2)))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    (g_y,) = torch.autograd.grad(y.sum(), inputs[2])  # only y used: the state cotangents arrive as None/zeros
    (r_y,) = torch.autograd.grad(ry.sum(), inputs[2])
    torch.testing.assert_close(g_y, r_y, rtol=0, atol=1e-10)


class OpCounter(TorchDispatchMode):
    """Counts every op dispatched (a custom op once, whatever it runs inside)."""

    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def test_training_step_dispatches_the_same_ops_at_every_context_length():
    """A HOPE training step (forward + backward) whose CMS levels do not learn in context (their chunk loop is
    another issue's) dispatches the same ops at context 64 and 256: the Titans recurrence is one
    ``deepopt::titans_scan`` forward and one ``titans_scan_backward`` per layer.  The torch chunk loop runs inside
    each op (a dispatch mode sees the op once)."""
    cfg = HopeConfig(d_model=32, n_heads=2, n_layers=2, mem_hidden=16, chunk_size=16, cms_periods=(None,))
    counts = {}
    for context in (64, 256):
        torch.manual_seed(0)
        model = LanguageModel(cfg)
        idx = torch.randint(0, 256, (2, context + 1))
        with OpCounter() as counter:
            model(idx[:, :-1], idx[:, 1:])[1].backward()
        counts[context] = counter.ops
    assert counts[64] == counts[256], set(counts[64].items()) ^ set(counts[256].items())
    assert counts[64]["deepopt.titans_scan.default"] == counts[64]["deepopt.titans_scan_backward.default"] == 2


def test_layer_uses_the_scan_only_where_it_applies():
    base = {"d_model": 16, "n_heads": 2, "mem_hidden": 8, "chunk_size": 4}
    assert SelfModifyingTitans(HopeConfig(**base)).scans()
    assert SelfModifyingTitans(HopeConfig(**base, delta_gd=False, activation="tanh")).scans()
    for other in ({"self_modifying": False}, {"inner_rule": "momentum"}, {"inner_hparams": {"weight_decay": 0.1}}):
        assert not SelfModifyingTitans(HopeConfig(**base, **other)).scans(), other
    layer = SelfModifyingTitans(HopeConfig(**base))
    layer.eta_log = []
    assert not layer.scans()


def test_bad_scan_arguments_are_rejected():
    with pytest.raises(ValueError, match="activation"):
        tk.titans_scan(*scan_inputs(), 4, 1.0, "swish", True, True, -1.0)
    with pytest.raises(ValueError, match="chunk_size"):
        tk.titans_scan(*scan_inputs(), 0, 1.0, "silu", True, True, -1.0)
