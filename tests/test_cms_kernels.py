"""``deepopt::cms_scan``: a CMS level's chunk recurrence as one op.  Its hand-written backward equals autograd
through the reference (float64), the op passes ``torch.library.opcheck``, a level on the op equals the Python
chunk loop (values and gradients), its dispatched ops do not grow with the context, and the Triton kernels
equal the reference under ``TRITON_INTERPRET=1`` (and on CUDA when a device is present)."""

import copy
import textwrap
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from conftest import run_under_triton_interpreter

from deepopt.bench import OpCounter
from deepopt.hope import cms_kernels
from deepopt.hope.model import CMSLevel, HopeConfig
from deepopt.rules.deep import ACTIVATIONS

TINY = {"d_model": 16, "n_heads": 2, "mem_hidden": 8, "cms_hidden": 12}


def inputs(B=2, T=11, d=6, hid=5, period=3, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, T, d, generator=g, dtype=dtype)
    err = torch.randn(B, T, d, generator=g, dtype=dtype)
    w1 = 0.3 * torch.randn(d, hid, generator=g, dtype=dtype)
    w2 = torch.randn(hid, d, generator=g, dtype=dtype)
    rho = torch.tensor(0.4, dtype=dtype)
    return [t.requires_grad_() for t in (k, w1, w2, rho)], err, period


def objective(y, s1, s2, seed=1):
    """A loss that reads every output: the reads, every W₁ state and the final W₂ state."""
    g = torch.Generator().manual_seed(seed)
    return sum((t * torch.randn(t.shape, generator=g, dtype=t.dtype)).sum() for t in (y, s1, s2[:, -1]))


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("T, period", [(11, 3), (12, 4), (5, 1), (4, 7)], ids=["partial", "whole", "p1", "no-step"])
def test_hand_written_backward_equals_autograd_float64(activation, T, period):
    (k, w1, w2, rho), err, _ = inputs(T=T, period=period)
    lr = F.softplus(rho) / period
    y, s1, s2 = cms_kernels.cms_scan(k, err, w1, w2, lr, period, activation)
    want = cms_kernels.scan_reference(k, err, w1, w2, F.softplus(rho) / period, period, activation)
    for a, b in zip((y, s1, s2), want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    got = torch.autograd.grad(objective(y, s1, s2), (k, w1, w2, rho))
    ref = torch.autograd.grad(objective(*want), (k, w1, w2, rho), allow_unused=True, materialize_grads=True)
    for name, a, b in zip(("k", "w1", "w2", "rho"), got, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=name)
    assert ref[3].abs() > 0 or T < period  # the steps really depend on lr


def test_backward_with_only_the_reads_used():
    """Unused state outputs reach the backward op as ``None`` (no zero cotangents the size of every state)."""
    (k, w1, w2, rho), err, period = inputs()
    y, _, _ = cms_kernels.cms_scan(k, err, w1, w2, F.softplus(rho) / period, period, "silu")
    with mock.patch.object(cms_kernels, "scan_backward_reference", wraps=cms_kernels.scan_backward_reference) as bwd:
        got = torch.autograd.grad((y ** 2).sum(), (k, w1, w2, rho))
    assert bwd.call_args.args[1] is None and bwd.call_args.args[2] is None
    y_ref, _, _ = cms_kernels.scan_reference(k, err, w1, w2, F.softplus(rho) / period, period, "silu")
    for a, b in zip(got, torch.autograd.grad((y_ref ** 2).sum(), (k, w1, w2, rho))):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_opcheck():
    (k, w1, w2, rho), err, period = inputs()
    lr = (F.softplus(rho) / period).detach().requires_grad_()
    torch.library.opcheck(torch.ops.deepopt.cms_scan.default, (k, err, w1, w2, lr, period, "silu"))
    y, s1, s2 = torch.ops.deepopt.cms_scan(k, err, w1, w2, lr, period, "silu")
    args = (torch.randn_like(y), torch.randn_like(s1), None, k.detach(), err, s1.detach(), s2.detach(),
            lr.detach(), period, "silu")
    torch.library.opcheck(torch.ops.deepopt.cms_scan_backward.default, args)


@pytest.mark.parametrize("bad, err", [
    ({"period": 0}, ValueError), ({"activation": "swish"}, ValueError), ({"w2": torch.zeros(6, 5)}, ValueError),
    ({"err": torch.zeros(2, 11, 6, dtype=torch.float32)}, ValueError), ({"k": torch.zeros(2, 11, 6)}, TypeError),
], ids=["period", "activation", "w2-shape", "err-shape", "dtype"])
def test_bad_input_is_rejected(bad, err):
    (k, w1, w2, rho), e, period = inputs()
    args = {"k": k, "err": e, "w1": w1, "w2": w2, "lr": rho, "period": period, "activation": "silu"}
    if "err" in bad:
        bad = {"err": torch.zeros(2, 10, 6, dtype=torch.float64)}
    with pytest.raises(err):
        cms_kernels.cms_scan(**{**args, **bad})


def loop_and_scan_levels(period: int, seed: int = 0, recompute: bool = True):
    torch.manual_seed(seed)
    cfg = HopeConfig(**TINY, cms_periods=(period,), cms_lr=0.8, recompute_chunks=recompute)
    scan = CMSLevel(cfg, period).double()
    with torch.no_grad():
        for p in scan.parameters():
            p.add_(0.1 * torch.randn_like(p))
    loop = copy.deepcopy(scan)
    loop.scans = False
    assert scan.scans
    return cfg, scan, loop


@pytest.mark.parametrize("recompute", [True, False], ids=["op", "kept"])
@pytest.mark.parametrize("period, T", [(4, 18), (5, 5), (1, 6)])
def test_level_on_the_op_equals_the_chunk_loop_with_gradients(period, T, recompute):
    """A level on the scan (the op, or with ``recompute_chunks=False`` on the CPU its loop keeping each chunk
    for the backward pass) == the Python chunk loop, values, states and gradients."""
    cfg, scan, loop = loop_and_scan_levels(period, recompute=recompute)
    x = torch.randn(2, T, cfg.d_model, dtype=torch.float64)
    err = 0.05 * torch.randn_like(x)
    out = []
    for level in (scan, loop):
        xi = x.clone().requires_grad_()
        y, (w1, w2, n) = level(xi, err, return_state=True)
        loss = (y * torch.cos(y)).sum() + (w1 ** 2).sum() + w2.sum()
        out.append((y, w1, w2, n, torch.autograd.grad(loss, (xi, *level.parameters()))))
    (y, w1, w2, n, g), (y_, w1_, w2_, n_, g_) = out
    assert n == n_ == T // period
    for a, b in zip((y, w1, w2, *g), (y_, w1_, w2_, *g_)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    names = [n for n, _ in scan.named_parameters()]
    assert g[1 + names.index("eta_rho")].abs() > 0  # η's ρ gets a gradient through the steps


@pytest.mark.parametrize("T, period", [(11, 3), (12, 4), (4, 7)], ids=["partial", "whole", "no-step"])
def test_kept_chunks_give_the_op_and_its_gradients(T, period):
    """``cms_scan(keep=True)`` (``KeptChunks``: the reference loop with each chunk's factors saved for the
    backward pass) == the op: outputs, and every input's gradient for an objective reading all outputs and for
    the reads alone (state cotangents None), float64; the op is not called."""
    (k, w1, w2, rho), err, _ = inputs(T=T, period=period)
    lr = F.softplus(rho) / period
    with mock.patch.object(torch.ops.deepopt, "cms_scan", side_effect=AssertionError("the op ran")):
        kept = cms_kernels.cms_scan(k, err, w1, w2, lr, period, "silu", keep=True)
    op = cms_kernels.cms_scan(k, err, w1, w2, lr, period, "silu")
    for a, b in zip(kept, op):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for loss in (objective, lambda y, s1, s2: (y * y).sum()):
        got, want = (torch.autograd.grad(loss(*outs), (k, w1, w2, rho), retain_graph=True) for outs in (kept, op))
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    with torch.no_grad(), mock.patch.object(cms_kernels.KeptChunks, "apply", side_effect=AssertionError("kept")):
        cms_kernels.cms_scan(k, err, w1, w2, lr, period, "silu", keep=True)  # no backward pass: the op


def test_a_kept_scan_s_backward_pass_recomputes_no_chunk():
    """With ``keep`` the backward pass runs no chunk's ``cms_factors`` again; the op runs it once per chunk."""
    (k, w1, w2, rho), err, period = inputs()  # 11 tokens: 3 chunks of 3 and a partial one
    for keep, calls in ((True, 0), (False, 4)):
        y, _, _ = cms_kernels.cms_scan(k, err, w1, w2, F.softplus(rho) / period, period, "silu", keep=keep)
        with mock.patch.object(cms_kernels, "cms_factors", wraps=cms_kernels.cms_factors) as factors:
            torch.autograd.grad(y.sum(), (k, w1, w2, rho))
        assert factors.call_count == calls, (keep, factors.call_count)


def test_ops_dispatched_by_a_level_do_not_grow_with_the_context():
    """Forward and backward of a learning level dispatch the same ops at context 64 and 256 (4 and 16 chunks):
    the recurrence is one ``deepopt::cms_scan`` and one ``deepopt::cms_scan_backward`` (``recompute_chunks``; the
    CPU loop that keeps chunks dispatches per chunk)."""
    _, level, _ = loop_and_scan_levels(16)
    counts = {}
    for T in (64, 256):
        x = torch.randn(2, T, level.W1.shape[0], dtype=torch.float64, requires_grad=True)
        err = 0.05 * torch.randn_like(x)
        level.zero_grad(set_to_none=True)  # both passes create (not accumulate) the parameters' gradients
        with OpCounter() as counter:
            level(x, err).sum().backward()
        counts[T] = counter.ops
    assert counts[64] == counts[256], (counts[64], counts[256])
    assert counts[64]["deepopt.cms_scan.default"] == counts[64]["deepopt.cms_scan_backward.default"] == 1


KERNEL_CHECK = textwrap.dedent("""
    import copy
    from unittest import mock
    import torch
    from deepopt.hope import cms_kernels as ck
    from deepopt.hope.model import CMSLevel, HopeConfig

    def check(B, T, d, hid, period, act, dtype=torch.float32, tol=2e-5, gs=(True, True), seed=0):
        g = torch.Generator().manual_seed(seed)
        k, err = torch.randn(B, T, d, generator=g), torch.randn(B, T, d, generator=g)
        w1, w2, lr = 0.3 * torch.randn(d, hid, generator=g), torch.randn(hid, d, generator=g), torch.tensor(0.3)
        want = ck.scan_reference(k.double(), err.double(), w1.double(), w2.double(), lr.double(), period, act)
        got = ck.scan_triton(k.to(dtype), err.to(dtype), w1, w2, lr, period, act)
        gy = torch.randn(B, T, d, generator=g)
        g1, g2 = (torch.randn(t.shape, generator=g) if on else None for t, on in zip(got[1:], gs))
        want += ck.scan_backward_reference(gy.double(), *(None if t is None else t.double() for t in (g1, g2)),
                                           k.double(), err.double(), *want[1:], lr.double(), period, act)
        got += ck.scan_backward_triton(gy.to(dtype), g1, g2, k.to(dtype), err.to(dtype), *got[1:], lr, period, act)
        for name, a, b in zip(("y", "W1 states", "W2 states", "dk", "dW1", "dW2", "dlr"), got, want):
            scale = 1 + b.abs().max()
            assert a.dtype == (dtype if name in ("y", "dk") else torch.float32), (name, a.dtype)
            assert ((a.double() - b).abs().max() / scale) < tol, (B, T, d, hid, period, act, dtype, name)

    for act in ("silu", "tanh", "gelu", "relu", "identity"):
        check(2, 11, 6, 5, 3, act)  # 3 full chunks and a partial one
    check(2, 5, 6, 5, 1, "silu", gs=(False, True))  # period 1; only the final W2 state used
    check(2, 4, 6, 5, 7, "silu", gs=(False, False))  # no full chunk: reads only (scratch of T < period rows)
    check(2, 37, 36, 33, 17, "silu", gs=(True, False))  # several tiles along tokens, d and hid
    check(2, 11, 6, 5, 3, "gelu", dtype=torch.bfloat16, tol=2e-2)

    # the tiled kernels (chunks above MAX_CHUNK_WORK: a launch per phase of a chunk, a program per tile)
    with mock.patch.object(ck, "MAX_CHUNK_WORK", 0):
        for act in ("silu", "tanh"):
            check(2, 11, 6, 5, 3, act)
        check(2, 5, 6, 5, 1, "relu", gs=(False, True))
        check(2, 4, 6, 5, 7, "silu")
        check(2, 37, 36, 33, 17, "silu", gs=(True, False))  # tiles along tokens, d and hid: partial sums
        check(3, 40, 70, 66, 16, "gelu", gs=(False, True))  # three hidden tiles (partial-sum tables of 3 columns)
        check(2, 11, 6, 5, 3, "identity", dtype=torch.bfloat16, tol=2e-2)
        torch.set_float32_matmul_precision("high")  # TF32 products: 64-token tiles (TILED_ROWS)
        try:
            check(2, 200, 36, 33, 80, "silu")  # two token tiles per chunk (64 + 16), a partial chunk of 40
        finally:
            torch.set_float32_matmul_precision("highest")

    # a CMS level on the op, forced onto the kernels, against the level's Python chunk loop (values, gradients)
    torch.manual_seed(0)
    cfg = HopeConfig(d_model=8, n_heads=2, mem_hidden=4, cms_hidden=6, cms_periods=(4,))
    level = CMSLevel(cfg, 4)
    loop = copy.deepcopy(level)
    loop.scans = False
    x = torch.randn(2, 10, 8)
    err = 0.05 * torch.randn_like(x)
    launches = []

    class Counted:  # counts a kernel's launches
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            launches.append(self.kernel.fn.__name__)
            return self.kernel[grid]

    def run(lv):
        xi = x.clone().requires_grad_()
        y, (w1, w2, _) = lv(xi, err, return_state=True)
        grads = torch.autograd.grad((y.sin()).sum() + w1.sum() + (w2 ** 2).sum(), (xi, *lv.parameters()))
        return y, w1, w2, *grads

    tiled_names = ["_tiled_hidden_kernel", "_tiled_read_kernel", "_tiled_step_kernel", "_tiled_products_kernel",
                   "_tiled_pointwise_kernel", "_tiled_dk_kernel", "_tiled_grads_kernel"]
    counted = [mock.patch.object(ck, name, Counted(getattr(ck, name)))
               for name in ("_scan_fwd_kernel", "_scan_bwd_kernel", *tiled_names)]
    want = run(loop)
    for limit in (ck.MAX_CHUNK_WORK, 0):
        launches.clear()
        with mock.patch.object(ck, "triton_applies", lambda *_: True), mock.patch.object(ck, "MAX_CHUNK_WORK", limit):
            for patch in counted:
                patch.start()
            try:
                got = run(level)
            finally:
                for patch in counted:
                    patch.stop()
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        if limit:  # 2 full chunks of 4 and a partial one (10 tokens): one launch each way
            assert launches == ["_scan_fwd_kernel", "_scan_bwd_kernel"], launches
        else:  # three per full chunk and two for the partial one forward; four per chunk backward
            fwd = ["_tiled_hidden_kernel", "_tiled_read_kernel", "_tiled_step_kernel"]
            assert launches == fwd * 2 + fwd[:2] + tiled_names[3:] * 3, launches
    print("kernels equal the reference")
""")


def test_kernels_equal_the_reference_under_the_triton_interpreter():
    pytest.importorskip("triton")
    run_under_triton_interpreter(KERNEL_CHECK, "kernels equal the reference")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("tiled", [False, True])
def test_level_on_cuda_equals_the_float64_chunk_loop(dtype, tol, tiled, monkeypatch):
    """The op on CUDA (the kernels: ``triton_applies``; ``tiled``: the per-tile kernels of large chunks) against
    the CPU float64 Python chunk loop, gradients included; the states stay float32 with bfloat16 activations."""
    if tiled:
        monkeypatch.setattr(cms_kernels, "MAX_CHUNK_WORK", 0)
    cfg, scan, loop = loop_and_scan_levels(16)
    scan = scan.float().cuda()
    x = torch.randn(3, 100, cfg.d_model, dtype=torch.float64)  # 6 full chunks and a partial one
    err = 0.05 * torch.randn_like(x)
    assert cms_kernels.triton_applies(x.cuda().to(dtype), scan.W1)
    out = []
    for level, xi, ei in ((scan, x.cuda().to(dtype), err.cuda().to(dtype)), (loop, x, err)):
        xi = xi.clone().requires_grad_()
        y, (w1, w2, _) = level(xi, ei, return_state=True)
        loss = y.float().sin().sum() + w1.float().sum() + (w2.float() ** 2).sum()
        grads = torch.autograd.grad(loss, (xi, *level.parameters()))
        out.append([t.detach().cpu().double() for t in (y, w1, w2, *grads)])
    for a, b in zip(*out):
        assert (a - b).abs().max() / (1 + b.abs().max()) < tol
