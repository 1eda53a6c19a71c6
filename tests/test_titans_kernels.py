"""The Titans scan op (``deepopt::titans_scan``): hand-derived reverse mode == autograd (float64), the op's
registration (opcheck), the op == the Python chunk loop with gradients, the Triton kernels == the torch reference
(on the CPU under ``TRITON_INTERPRET=1``, in a subprocess since the interpreter is chosen when the kernels are
defined, and on CUDA when present), and a training step whose dispatched op count does not grow with the context."""

import textwrap
import warnings
from dataclasses import replace
from unittest import mock

import pytest
import torch
from conftest import run_under_triton_interpreter
from torch import Tensor

from deepopt.bench import OpCounter
from deepopt.hope import titans_kernels as tk
from deepopt.hope.model import HopeConfig, LanguageModel, SelfModifyingTitans

F64 = torch.float64


def scan_inputs(B=2, H=2, T=13, d=4, hid=3, dtype=F64, device="cpu", seed=0):
    """Random inputs of ``titans_scan`` (tensors requiring grad) with memories that move visibly."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=1.0: (scale * torch.randn(*s, generator=g, dtype=F64)).to(device, dtype).requires_grad_()
    u = r(B, H, 4, T, d)  # the inputs of M_k, M_v, M_η, M_α
    q = torch.nn.functional.normalize(torch.randn(B, H, T, d, generator=g, dtype=F64), dim=-1)
    q = q.to(device, dtype).requires_grad_()
    return (u, q, r(H, 5, d, hid, scale=0.5), r(H, 5, hid, d, scale=0.5), r(H, d, scale=0.5), r(H, scale=1.0),
            r(H, d, scale=0.5), r(H, scale=1.0))


@pytest.mark.parametrize("activation", sorted(tk.SECOND_DERIVATIVES))
@pytest.mark.parametrize("delta_gd", [True, False])
@pytest.mark.parametrize("sequential", [True, False], ids=["per_token", "chunk_capped"])
def test_chunk_vjp_equals_autograd_float64(activation, delta_gd, sequential):
    torch.manual_seed(0)
    B, H, C, d, hid = 2, 2, 5, 4, 3
    w1, w2 = (0.5 * torch.randn(B, H, 5, d, hid, dtype=F64)).requires_grad_(), \
        (0.5 * torch.randn(B, H, 5, hid, d, dtype=F64)).requires_grad_()
    u, q, *params = scan_inputs(B, H, C, d, hid)[:2] + scan_inputs(B, H, C, d, hid)[4:]
    for learns in (True, False):
        consts = {"eta_scale": 1.5 if sequential else 0.4, "activation": activation, "delta_gd": delta_gd,
                  "learns": learns, "kappa": -0.8, "sequential": sequential}
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


SCALARS = (4, 1.5, "silu", True, True, -1.0, True)  # chunk_size, eta_max, activation, delta_gd, learns, kappa, seq


def test_scan_op_passes_opcheck():
    torch.library.opcheck(torch.ops.deepopt.titans_scan.default, (*scan_inputs(), *SCALARS))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_chunk_math_gives_the_eager_scan_and_gradients(backend):
    """The op's chunk loop with ``deepopt.hope.compiled`` (``compile_model``'s CPU path) against the eager one: outputs,
    boundary states and every input's gradient, float64, 3 chunks (and a partial fourth where compiling is quick)."""
    from deepopt.hope.compiled import compile_options, compiled

    key = compile_options(backend=backend, dynamic=False)
    assert compile_options(backend=backend, dynamic=False) == key  # one key per set of options
    assert compiled(key, tk.chunk_step) is compiled(key, tk.chunk_step) and compiled(0, tk.chunk_vjp) is tk.chunk_vjp
    inputs = scan_inputs(T=13 if backend == "aot_eager" else 12)
    results = []
    for chunk_fns in (0, key):
        outs = tk.titans_scan(*inputs, *SCALARS, chunk_fns)
        cots = [torch.ones_like(o) * 0.1 for o in outs]
        grads = torch.autograd.grad(sum((o * c).sum() for o, c in zip(outs, cots)), inputs)
        results.append((*outs, *grads))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    with pytest.raises(ValueError, match="chunk_fns must be 0"):
        tk.titans_scan(*inputs, *SCALARS, 10**6)


@pytest.mark.parametrize("T", [12, 13])  # whole chunks, and a partial last one
@pytest.mark.parametrize("sequential", [True, False], ids=["per_token", "chunk_capped"])
def test_scan_op_equals_the_chunk_loop_with_gradients(T, sequential):
    """The op (reverse walk of ``chunk_vjp``) against autograd through the torch chunk loop, outputs and final
    states with random cotangents, float64."""
    scalars = (*SCALARS[:-1], sequential)
    inputs = scan_inputs(T=T)
    n = -(-T // scalars[0])
    y, s1, s2 = tk.titans_scan(*inputs, *scalars)
    ry, r1, r2 = tk._scan_reference(*inputs[:4], tuple(inputs[4:]), scalars[0], tk._consts(*scalars))
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


@pytest.mark.parametrize("T", [12, 13])  # whole chunks, and a partial last one
@pytest.mark.parametrize("sequential", [True, False], ids=["per_token", "chunk_capped"])
def test_kept_chunks_give_the_op_and_its_gradients(T, sequential):
    """``scan(keep=True)`` (``KeptChunks``: the chunk loop with each chunk's intermediates saved for the backward
    pass) == the op (which recomputes them): outputs, boundary states, every input's gradient for random
    cotangents and for y alone (the state cotangents arrive as None), float64."""
    scalars = (*SCALARS[:-1], sequential)
    inputs = scan_inputs(T=T)
    with mock.patch.object(tk, "titans_scan", side_effect=AssertionError("the op ran")):
        kept = tk.scan(*inputs, *scalars, keep=True)
    op = tk.titans_scan(*inputs, *scalars)
    for a, b in zip(kept, op):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    cots = [torch.randn_like(o) for o in op]
    for outs in ((kept, op), (kept[:1], op[:1])):
        got, want = (torch.autograd.grad(sum((o * c).sum() for o, c in zip(x, cots)), inputs, retain_graph=True)
                     for x in outs)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_a_kept_scan_s_backward_pass_recomputes_no_chunk():
    """What keeping is for: with ``keep`` the backward pass runs no chunk's forward math (``chunk_forward``) again;
    the op (``keep=False``) runs it once per chunk."""
    inputs = scan_inputs(T=13)  # 4 chunks of 4 (the last partial)
    for keep, calls in ((True, 0), (False, 4)):
        y, _, _ = tk.scan(*inputs, *SCALARS, keep=keep)
        with mock.patch.object(tk, "chunk_forward", wraps=tk.chunk_forward) as forward:
            torch.autograd.grad(y.sum(), inputs)
        assert forward.call_count == calls, (keep, forward.call_count)


def test_scan_keeps_chunks_only_for_an_eager_backward_pass():
    """``scan`` takes the op (recomputing chunks in its backward pass) unless ``keep`` and a backward pass can follow:
    not under ``no_grad``, not for inputs that need no gradient, not under autocast; a layer keeps them unless
    ``recompute_chunks``."""
    inputs = scan_inputs()
    calls = []
    real = tk.KeptChunks.apply

    def spy(*args):
        calls.append(1)
        return real(*args)

    with mock.patch.object(tk.KeptChunks, "apply", side_effect=spy):
        tk.scan(*inputs, *SCALARS, keep=False)
        with torch.no_grad():
            tk.scan(*inputs, *SCALARS, keep=True)
        tk.scan(*(x.detach() for x in inputs), *SCALARS, keep=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the op, as without keep
            tk.scan(*inputs, *SCALARS, keep=True)
        assert not calls
        tk.scan(*inputs, *SCALARS, keep=True)
        assert len(calls) == 1
        base = {"d_model": 16, "n_heads": 2, "mem_hidden": 8, "chunk_size": 4}
        x = torch.randn(2, 9, 16)
        SelfModifyingTitans(HopeConfig(**base, recompute_chunks=True))(x)
        assert len(calls) == 1
        SelfModifyingTitans(HopeConfig(**base))(x)
        assert len(calls) == 2
    with pytest.raises(ValueError, match="u must have shape"):
        tk.scan(inputs[0][:, :, :3], *inputs[1:], *SCALARS, keep=True)


def test_training_step_dispatches_the_same_ops_at_every_context_length():
    """A HOPE training step (forward + backward, CMS levels learning in context: their error pass included)
    dispatches the same ops at context 64 and 256: each layer's Titans recurrence is one ``deepopt::titans_scan``
    per forward pass (block 0's shared by both passes) and one ``titans_scan_backward``, each CMS level's one
    ``cms_scan`` and one ``cms_scan_backward``.  On the CPU the torch chunk loop runs inside each op (a dispatch
    mode sees the op once); on CUDA each is a Triton launch.  (``recompute_chunks``: an eager CPU step otherwise
    runs the Titans loop outside the op, keeping its chunks for the backward pass: ``test_kept_chunks_...``.)"""
    cfg = HopeConfig(d_model=32, n_heads=2, n_layers=2, mem_hidden=16, chunk_size=16, cms_periods=(16, 32, None),
                     recompute_chunks=True)
    counts = {}
    for context in (64, 256):
        torch.manual_seed(0)
        model = LanguageModel(cfg)
        idx = torch.randint(0, 256, (2, context + 1))
        with OpCounter() as counter:
            model(idx[:, :-1], idx[:, 1:])[1].backward()
        counts[context] = counter.ops
    assert counts[64] == counts[256], set(counts[64].items()) ^ set(counts[256].items())
    # per layer the training forward and one backward; the error pass's forward for every layer but block 0, whose
    # branch reads the embeddings in both passes and is computed once (LanguageModel.forward)
    assert counts[64]["deepopt.titans_scan.default"] == 3 and counts[64]["deepopt.titans_scan_backward.default"] == 2
    assert counts[64]["deepopt.cms_scan.default"] == 4 and counts[64]["deepopt.cms_scan_backward.default"] == 4


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
        tk.titans_scan(*scan_inputs(), 4, 1.0, "swish", True, True, -1.0, True)
    with pytest.raises(ValueError, match="chunk_size"):
        tk.titans_scan(*scan_inputs(), 0, 1.0, "silu", True, True, -1.0, True)


TRITON_CHECK = textwrap.dedent("""
    import sys
    from unittest import mock
    import torch
    sys.path.insert(0, "tests")
    from deepopt.hope import titans_kernels as tk
    from test_titans_kernels import scan_inputs

    # T = 48: whole chunks; 40 and 33: a partial last chunk (masked tokens neither step nor decay); both step forms;
    # C = 32: the triangular solve's blocked substitution over two 16-row blocks
    for T, C, delta_gd, learns, with_ds, seq in ((48, 16, True, True, False, True), (40, 16, False, True, True, True),
                                                 (33, 16, True, False, False, True), (40, 16, True, True, True, False),
                                                 (48, 16, False, True, False, False), (70, 32, True, True, True, True)):
        inputs = [x.detach().float() for x in scan_inputs(B=1, H=2, T=T, d=16, hid=16, seed=T)]
        params, consts = tuple(inputs[4:]), tk._consts(C, 2.0, "silu", delta_gd, learns, -1.0, seq)
        want = tk._scan_reference(*inputs[:4], params, C, consts)
        got = tk._triton_forward(*inputs[:4], params, C, consts)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert (want[1][:, :, -1] - want[1][:, :, 0]).abs().max() > 1e-3 or not learns  # the memories moved
        # backward, with cotangents on every boundary state (with_ds) or on y only
        g = torch.Generator().manual_seed(T)
        dy, ds1, ds2 = (torch.randn(x.shape, generator=g) for x in want)
        ds1, ds2 = (ds1, ds2) if with_ds else (None, None)
        grads = [f(dy, ds1, ds2, *inputs[:2], *want[1:], params, C, consts)
                 for f in (tk._triton_backward, tk._scan_backward_reference)]
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        assert grads[1][2].abs().max() > 1e-2 and (not learns or grads[1][6].abs().max() > 1e-3)
    # the backward with the value tiles recomputed (the path of chunks above MAX_HELD_VALUES_WORK, HOPE 125m/340m)
    inputs = [x.detach().float() for x in scan_inputs(B=1, H=2, T=40, d=16, hid=16, seed=5)]
    params, consts = tuple(inputs[4:]), tk._consts(16, 2.0, "silu", True, True, -1.0, True)
    want = tk._scan_reference(*inputs[:4], params, 16, consts)
    g = torch.Generator().manual_seed(5)
    dy, ds1, ds2 = (torch.randn(x.shape, generator=g) for x in want)
    with mock.patch.object(tk, "MAX_HELD_VALUES_WORK", 0):
        got = tk._triton_backward(dy, ds1, ds2, *inputs[:2], *want[1:], params, 16, consts)
    for a, b in zip(got, tk._scan_backward_reference(dy, ds1, ds2, *inputs[:2], *want[1:], params, 16, consts)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # bfloat16 loads and stores (fp32 inside): within bf16 rounding of the fp32 reference on the same inputs
    inputs = [x.detach().bfloat16() for x in scan_inputs(B=1, H=2, T=40, d=16, hid=16, seed=3)]
    params, consts = tuple(inputs[4:]), tk._consts(16, 2.0, "silu", True, True, -1.0, True)
    want = tk._scan_reference(*(x.float() for x in inputs[:4]), tuple(p.float() for p in params), 16, consts)
    got = tk._triton_forward(*inputs[:4], params, 16, consts)
    dy = torch.randn(want[0].shape, generator=torch.Generator().manual_seed(0))
    want += tk._scan_backward_reference(dy, None, None, *(x.float() for x in inputs[:2]), *want[1:],
                                        tuple(p.float() for p in params), 16, consts)
    got += tk._triton_backward(dy.bfloat16(), None, None, *inputs[:2], *(s.bfloat16() for s in want[1:3]), params,
                               16, consts)
    for a, b in zip(got, want):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b, rtol=2e-2, atol=5e-2)
    # the op and its autograd dispatch to the kernels where they apply (forced for CPU tensors here)
    inputs = [x.detach().float().requires_grad_() for x in scan_inputs(B=1, H=2, T=40, d=16, hid=16)]
    runs = []
    for force in (True, False):
        with mock.patch.object(tk, "_triton_applies", lambda *_: force):
            y, s1, s2 = tk.titans_scan(*inputs, 16, 2.0, "silu", True, True, -1.0, True)
            loss = (y * torch.linspace(-1, 1, y.shape[-1])).sum() + s1[:, :, -1].square().sum()
            runs.append((y, s1, s2, *torch.autograd.grad(loss, inputs)))
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    print("kernels equal the reference")
""")


def test_triton_kernels_equal_the_reference_under_the_interpreter():
    pytest.importorskip("triton")
    run_under_triton_interpreter(TRITON_CHECK, "kernels equal the reference")


def test_a_kernel_the_gpu_refuses_falls_back_to_the_reference_once_warned(monkeypatch):
    """A launch refused for its resources (``OutOfResources``: e.g. the small preset's backward, 132 KiB of shared
    memory, on an RTX 4090's 99 KiB) warns once and runs the reference: the op's outputs and gradients are
    the reference's, and a second call with the same key does not try the kernel again."""
    from deepopt.hope import fallback

    pytest.importorskip("triton")
    monkeypatch.setattr(fallback, "refused", set())
    monkeypatch.setattr(tk, "_triton_applies", lambda *a: True)
    tries = {"forward": 0, "backward": 0}

    def refused(name):
        def launch(*a, **k):
            tries[name] += 1
            raise fallback.OutOfResources(135168, 101376, "shared memory")
        return launch

    monkeypatch.setattr(tk, "_triton_forward", refused("forward"))
    monkeypatch.setattr(tk, "_triton_backward", refused("backward"))
    inputs = scan_inputs(T=13)
    scalars = (*SCALARS[:-1], True)
    with pytest.warns(RuntimeWarning, match="cannot run the Triton kernel"):
        y, s1, s2 = tk.titans_scan(*inputs, *scalars)
    with pytest.warns(RuntimeWarning, match="titans_scan_backward"):
        got = torch.autograd.grad(y.square().sum() + s1[:, :, -1].sum(), inputs)
    ry, r1, r2 = tk._scan_reference(*inputs[:4], tuple(inputs[4:]), scalars[0], tk._consts(*scalars))
    want = torch.autograd.grad(ry.square().sum() + r1[:, :, -1].sum(), inputs)
    torch.testing.assert_close(y, ry, rtol=0, atol=1e-12)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning, and no second try
        y2, _, _ = tk.titans_scan(*inputs, *scalars)
        torch.autograd.grad(y2.sum(), inputs[0])
    assert tries == {"forward": 1, "backward": 1}
    torch.testing.assert_close(y2, ry, rtol=0, atol=1e-12)


def test_kernel_precision_follows_torch_where_the_tf32_build_fits_a_block():
    """``_precision``: exact fp32 products under torch's default precision; TF32 where torch allows it, except in the
    backward kernel where its TF32 build needs more shared memory than an H100 block has: float32 chunks above
    ``MAX_TF32_CHUNK_WORK`` (HOPE base: 256 KiB against 227; exact products 192) and every chunk above
    ``MAX_HELD_VALUES_WORK`` (125m bf16: 288 KiB; exact 224); the forward keeps TF32 (base 136 KiB, 125m 152-176)."""
    def meta(d, hid, dtype=torch.float32):
        return torch.empty(1, 2, 4, 64, d, device="meta", dtype=dtype), torch.empty(2, 5, d, hid, device="meta",
                                                                                   dtype=dtype)
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert {tk._precision(*meta(32, 32), 64, bwd) for bwd in (False, True)} == {"ieee"}
        torch.set_float32_matmul_precision("high")
        assert {tk._precision(*meta(32, 32), 64, bwd) for bwd in (False, True)} == {"tf32"}  # small: the limit
        assert tk._precision(*meta(64, 32), 64, False) == "tf32"  # base: the forward
        assert tk._precision(*meta(64, 32), 64, True) == "ieee"  # base: the backward
        assert tk._precision(*meta(64, 32, torch.bfloat16), 64, True) == "tf32"
        assert tk._precision(*meta(64, 64, torch.bfloat16), 64, True) == "ieee"  # 125m: over MAX_HELD_VALUES_WORK
        assert tk._precision(*meta(64, 64, torch.bfloat16), 64, False) == "tf32"
    finally:
        torch.set_float32_matmul_precision(before)


def test_non_power_of_two_shapes_and_cpu_tensors_take_the_torch_reference():
    u, q, w1, w2 = scan_inputs(B=1, H=2, T=20, d=16, hid=16, dtype=torch.float32)[:4]
    assert not tk._triton_applies(u, q, w1, w2, 16, "silu")  # CPU tensors
    meta = [torch.empty(x.shape, device="meta") for x in (u, q, w1, w2)]
    with mock.patch.object(Tensor, "is_cuda", True):
        assert tk.triton is None or tk._triton_applies(*meta, 16, "silu")
        assert not tk._triton_applies(*meta, 12, "silu")  # chunk size not a power of two
        assert not tk._triton_applies(*meta, 8, "silu")  # below tl.dot's 16
        assert not tk._triton_applies(*meta, 16, "tanh")
        assert not tk._triton_applies(*(x.double() for x in meta), 16, "silu")
    wide = [torch.empty(*x.shape[:-1], 64, device="meta") for x in (u, q)]  # d = 64
    w = [torch.empty(2, 5, 64, hid, device="meta") for hid in (32, 64)]  # W₁ of hid 32 (HOPE base) and 64 (125m)
    w2 = [x.transpose(-1, -2) for x in w]
    with mock.patch.object(Tensor, "is_cuda", True):
        assert tk.triton is None or tk._triton_applies(*wide, w[0], w2[0], 64, "silu")  # HOPE base
        assert tk.triton is None or tk._triton_applies(*wide, w[1], w2[1], 64, "silu")  # 125m: C·d·hid = MAX_CHUNK_WORK
        assert not tk._triton_applies(*wide, w[1], w2[1], 128, "silu")  # above: over a block's shared memory


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("T", [256, 200])
@pytest.mark.parametrize("sequential", [True, False], ids=["per_token", "chunk_capped"])
@pytest.mark.parametrize("matmul_precision, tol", [("highest", 1e-4), ("high", 3e-2)], ids=["ieee", "tf32"])
def test_cuda_scan_equals_the_cpu_reference_with_gradients(T, sequential, matmul_precision, tol):
    """The kernels on CUDA against the CPU reference; with torch's float32 matmul precision "high" their products
    run on TF32 tensor cores (``dot_precision``), within TF32 rounding of the fp32 reference."""
    inputs = scan_inputs(B=2, H=4, T=T, d=32, hid=32, dtype=torch.float32, device="cuda")
    cpu = [x.detach().cpu().requires_grad_() for x in inputs]
    args = (64, 2.0, "silu", True, True, -1.0, sequential)
    assert tk._triton_applies(*inputs[:4], 64, "silu")
    want = tk.titans_scan(*cpu, *args)  # the CPU reference at the default precision
    cots = [torch.randn_like(o) for o in want]
    want_grads = torch.autograd.grad(sum((o * c).sum() for o, c in zip(want, cots)), cpu)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(matmul_precision)
    try:
        assert tk.dot_precision(inputs[0]) == ("ieee" if matmul_precision == "highest" else "tf32")
        got = tk.titans_scan(*inputs, *args)
        grads = torch.autograd.grad(sum((o * c.cuda()).sum() for o, c in zip(got, cots)), inputs)
    finally:
        torch.set_float32_matmul_precision(before)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu(), b.detach(), rtol=tol, atol=tol)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a.cpu(), b, rtol=10 * tol, atol=10 * tol)


def test_scan_ops_false_runs_the_python_chunk_loop_with_the_same_numbers():
    """``HopeConfig.scan_ops=False`` takes every memory off the ops (the loop a FLOP counter can see into)."""
    cfg = HopeConfig(d_model=32, n_heads=2, n_layers=1, mem_hidden=16, chunk_size=16, cms_periods=(16, None),
                     recompute_chunks=True)  # the ops, not the CPU loop that keeps chunks for the backward pass
    idx = torch.randint(0, 256, (2, 49), generator=torch.Generator().manual_seed(0))
    runs = []
    for scan_ops in (True, False):
        torch.manual_seed(0)
        model = LanguageModel(replace(cfg, scan_ops=scan_ops)).double()
        assert model.blocks[0].titans.f.scans() is scan_ops and model.blocks[0].cms[0].scans is scan_ops
        with OpCounter() as counter:
            loss = model(idx[:, :-1], idx[:, 1:])[1]
            loss.backward()
        assert (counter.ops.get("deepopt.titans_scan.default", 0) > 0) is scan_ops
        runs.append((loss.detach(), [p.grad for p in model.parameters()]))
    (la, ga), (lb, gb) = runs
    torch.testing.assert_close(la, lb, rtol=0, atol=1e-12)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
