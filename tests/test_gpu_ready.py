"""GPU readiness and torch.optim's generic contract: device placement, no host reads in ``step()``, kernel
counts that do not grow with the number of tensors, CUDA parity and graphs (when CUDA is present), complex,
low-precision and duplicate parameters, state dicts after a load/deepcopy/pickle, schedulers, Muon, packaging."""

import copy
import math
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path
from unittest import mock

import pytest
import torch
from conftest import CONFIGS, batch, loss_fn, make, small_mlp, train
from test_parity import OPTION_SETS, TORCH_TWINS

import deepopt
from deepopt.bench import OpCounter, count_step_ops, cuda_tensor, fake_cuda, gpt2_shapes

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
HOST_READ = "aten._local_scalar_dense.default"

# option sets the sync-free promise covers, per optimizer (on top of CONFIGS)
SYNC_FREE_OPTIONS = [{}, {"nonfinite": "skip"}, {"capturable": True}, {"lr": torch.tensor(0.01)}]
CLASS_OPTIONS = [(n, o) for n, opts in OPTION_SETS.items() for o in opts] + [
    ("adam", {"fused": False}), ("sgd", {"momentum": 0.9, "nesterov": True}),
]


def _params(shapes, device, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    params = []
    for s in shapes:
        if device == "meta":
            p = torch.empty(s, device="meta", dtype=dtype, requires_grad=True)
            p.grad = torch.empty_like(p)
        else:
            p = torch.randn(s, generator=gen, dtype=dtype).to(device).requires_grad_()
            p.grad = torch.randn(s, generator=gen, dtype=dtype).to(device)
        params.append(p)
    return params


# ---------------------------------------------------------------------------------------- device and host reads
@pytest.mark.parametrize("name,options", CLASS_OPTIONS)
def test_state_lives_on_the_parameter_device_and_step_runs_on_meta(name, options):
    """A meta tensor refuses any host read, so a step on meta parameters proves the path sync-free; every
    state tensor (step counters included) must sit on the parameter's device."""
    params = _params([(6, 4), (4,), (3, 6)], "meta", torch.float64)
    opt = make(name, params, **options)
    opt.step()
    opt.step()
    for p in params:
        assert all(t.device.type == "meta" for t in opt.state[p].values() if isinstance(t, torch.Tensor))


def test_loaded_step_counters_move_to_the_parameter_device(opt_name):
    """torch.optim leaves a non-fused optimizer's loaded ``step`` where it was saved (the CPU); the fused
    kernel then fails on CUDA ("state_steps is on cpu"). deepopt moves every counter to its parameter."""
    cpu = _params([(5, 3), (3,)], "cpu", torch.float64)
    src = make(opt_name, cpu)
    src.step()
    meta = _params([(5, 3), (3,)], "meta", torch.float64)
    opt = make(opt_name, meta)
    opt.load_state_dict(src.state_dict())
    assert all(t.device.type == "meta" for st in opt.state.values() for t in st.values()
               if isinstance(t, torch.Tensor))
    opt.step()


@pytest.mark.parametrize("extra", SYNC_FREE_OPTIONS, ids=["default", "skip", "capturable", "tensor-lr"])
def test_step_reads_no_device_value_on_the_host(opt_name, extra):
    params = _params([(8, 5), (5,), (8, 5), (3, 8)], "cpu")
    opt = make(opt_name, params, **extra)
    for _ in range(2):  # the first step initialises the state
        with OpCounter() as counter:
            opt.step()
        assert counter.ops.get(HOST_READ, 0) == 0, counter.ops


def test_raise_policy_is_the_one_that_reads_the_host():
    params = _params([(4, 3)], "cpu")
    with OpCounter() as counter:
        deepopt.SGD(params, nonfinite="raise").step()
    assert counter.ops.get(HOST_READ, 0) == 1


# ------------------------------------------------------------------------------------- kernels per step
# aten ops of one step() over GPT-2 small's 148 parameter shapes (on meta: no memory is allocated)
OP_BUDGET = 30


# Classes outside issue 10's budget, with the reason; their counts must still not grow with the tensor count.
OVER_BUDGET = {
    "m3": "orthogonalises every matrix: Newton–Schulz batched per shape, so launches grow with distinct shapes",
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_aten_ops_per_step_stay_within_budget_whatever_the_number_of_tensors(name):
    counts = {}
    for label, shapes in (("gpt2-124M", gpt2_shapes()), ("gpt2-2-layers", gpt2_shapes(layers=2))):
        opt = make(name, _params(shapes, "meta"))
        opt.step()
        counts[label] = count_step_ops(opt).total
    assert name in OVER_BUDGET or counts["gpt2-124M"] <= OP_BUDGET, counts
    assert counts["gpt2-124M"] == counts["gpt2-2-layers"], counts


@pytest.mark.parametrize("options", OPTION_SETS["delta_momentum"])
def test_delta_momentum_multi_tensor_path_equals_the_rule_on_cpu_too(options):
    """On the CPU DeltaMomentum's default options take an in-place loop; the multi-tensor path that
    accelerators take is checked against the rule here all the same."""
    from deepopt.optimizers import delta_momentum

    a, b = small_mlp(), small_mlp()
    with mock.patch.object(delta_momentum, "_cpu_loop_applies", lambda *_: False):
        train(a, make("delta_momentum", a.parameters(), **options), 40)
    train(b, make("delta_momentum", b.parameters(), foreach=False, **options), 40)
    assert max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters())) <= 1e-12


# ---------------------------------------------------------------------------------------------------- CUDA
@needs_cuda
@pytest.mark.parametrize("name,options", CLASS_OPTIONS)
def test_cuda_trajectory_equals_cpu_in_float64(name, options):
    a, b = small_mlp(), small_mlp().cuda()
    train(a, make(name, a.parameters(), **options), 30)
    train(b, make(name, b.parameters(), **options), 30)
    assert max((p - q.cpu()).abs().max().item() for p, q in zip(a.parameters(), b.parameters())) <= 1e-12


@pytest.mark.parametrize("dtype,fused", [(torch.float64, False), (torch.float32, True), (torch.bfloat16, True)])
def test_adam_takes_torch_fused_cuda_kernel_only_with_fp32_step_counters(dtype, fused):
    """torch's CUDA fused Adam reads each step counter as fp32 whatever its dtype: fp64 parameters, whose counters are
    fp64, would step with garbage bias corrections (the H200's fp64 CUDA = CPU failures). On fake CUDA tensors."""
    calls = []
    with fake_cuda() as mode, mock.patch.object(torch, "_fused_adam_", lambda *a, **k: calls.append(a)):
        params = [torch.nn.Parameter(cuda_tensor(mode, (4, 3), dtype)) for _ in range(2)]
        for p in params:
            p.grad = cuda_tensor(mode, (4, 3), dtype)
        opt = deepopt.Adam(params, lr=0.01)
        opt.step()
        assert opt.state[params[0]]["step"].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert bool(calls) == fused


@needs_cuda
@pytest.mark.parametrize("name,ours,torch_cls,theirs", TORCH_TWINS)
def test_cuda_matches_torch_twin_in_float32(name, ours, torch_cls, theirs):
    a, b = small_mlp(dtype=torch.float32).cuda(), small_mlp(dtype=torch.float32).cuda()
    train(a, deepopt.OPTIMIZERS[name](a.parameters(), **ours), 20)
    train(b, torch_cls(b.parameters(), **theirs), 20)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)  # torch's fused-vs-foreach tolerance


@needs_cuda
def test_whole_training_step_captured_in_a_cuda_graph(opt_name):
    """``capturable=True``: warm up, capture forward + backward + step, replay; equals eager steps."""
    model, ref = small_mlp(dtype=torch.float32).cuda(), small_mlp(dtype=torch.float32).cuda()
    opt, ref_opt = make(opt_name, model.parameters(), capturable=True), make(opt_name, ref.parameters())
    x, y = (v.cuda() for v in batch(0, torch.float32))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):  # recorded, not run: 3 eager steps + 4 replays = 7 steps
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    for _ in range(4):
        graph.replay()
    for _ in range(7):
        ref_opt.zero_grad()
        torch.nn.functional.mse_loss(ref(x), y).backward()
        ref_opt.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_capturable_m3_decides_its_chunk_ends_on_the_device():
    """A CUDA graph replays the host's decisions of the captured step, so M3's chunk ends must be decided on the
    device: its fast path keeps the slow memory's write where ``step % chunk == 0`` by ``torch.where`` (no host
    count), and with ``capturable=True`` it equals the per-tensor rule across chunk ends; the meta-device test above
    proves it reads nothing on the host."""
    a, b = small_mlp(), small_mlp()
    train(a, make("m3", a.parameters(), capturable=True, chunk=2), 5)
    train(b, make("m3", b.parameters(), foreach=False, chunk=2), 5)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------------------- state dicts
@pytest.mark.parametrize("how", ["load", "deepcopy", "pickle"])
def test_state_dict_loads_again_after_a_load_a_deepcopy_or_a_pickle(opt_name, how):
    model = small_mlp()
    opt = make(opt_name, model.parameters())
    train(model, opt, 2)
    sd = opt.state_dict()
    if how == "load":
        opt.load_state_dict(sd)
        again = opt
    elif how == "deepcopy":
        again = copy.deepcopy(opt)
    else:
        again = pickle.loads(pickle.dumps(opt))
    again.load_state_dict(sd)
    again.load_state_dict(again.state_dict())
    assert "differentiable" not in again.defaults


def test_state_dict_of_the_wrong_shape_is_refused_clearly(opt_name):
    opt = make(opt_name, small_mlp().parameters())
    for bad in ({"state": 5, "param_groups": "x"}, {"state": {}, "param_groups": [5]}, {"state": {0: 1},
                                                                                          "param_groups": []}):
        with pytest.raises(TypeError, match="load_state_dict expects"):
            opt.load_state_dict(bad)


# ------------------------------------------------------------------------------------------- tensor lr
def test_tensor_lr_is_validated_as_torch_validates_it(opt_name):
    params = list(small_mlp().parameters())
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        make(opt_name, params, lr=torch.tensor([0.1, 0.2]))
    a, b = small_mlp(), small_mlp()
    train(a, make(opt_name, a.parameters(), lr=torch.tensor([[0.01]], dtype=torch.float64)), 5)
    train(b, make(opt_name, b.parameters(), lr=0.01), 5)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------- complex
COMPLEX_TWINS = [
    ("adam", dict(lr=0.01), torch.optim.Adam, dict(lr=0.01)),
    ("adamw", dict(lr=0.01, weight_decay=0.1), torch.optim.AdamW, dict(lr=0.01, weight_decay=0.1)),
    ("sgd", dict(lr=0.05), torch.optim.SGD, dict(lr=0.05)),
    ("momentum", dict(lr=0.05, momentum=0.9, nesterov=True), torch.optim.SGD,
     dict(lr=0.05, momentum=0.9, nesterov=True)),
]


def _complex_run(make_opt, steps=10, real_view=False):
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(4, 3, dtype=torch.complex128, generator=gen)
    target = torch.randn(4, 3, dtype=torch.complex128, generator=gen)
    p = torch.nn.Parameter(torch.view_as_real(w).clone() if real_view else w.clone())
    opt = make_opt([p])
    for _ in range(steps):
        opt.zero_grad()
        z = torch.view_as_complex(p) if real_view else p
        ((z - target).abs() ** 2).sum().backward()
        opt.step()
    return torch.view_as_complex(p.detach()) if real_view else p.detach()


@pytest.mark.parametrize("foreach", [None, False])
@pytest.mark.parametrize("name,ours,torch_cls,theirs", COMPLEX_TWINS)
def test_complex_parameters_follow_torch(name, ours, torch_cls, theirs, foreach):
    got = _complex_run(lambda ps: deepopt.OPTIMIZERS[name](ps, foreach=foreach, **ours))
    want = _complex_run(lambda ps: torch_cls(ps, **theirs))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name,options", [("delta_momentum", {}), ("momentum", {"preconditioner": "adam"}),
                                          ("deep_momentum", {}), ("delta_momentum", {"preconditioner": "adam"})])
def test_complex_parameters_step_as_their_real_view(name, options):
    """A complex parameter steps exactly as the ``view_as_real`` parameter would: for DeltaMomentum that is
    the conjugated inner product Re⟨m, g⟩."""
    got = _complex_run(lambda ps: make(name, ps, **options))
    want = _complex_run(lambda ps: make(name, ps, **options), real_view=True)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name,options", [("momentum", {"nonlinearity": "newton_schulz"}),
                                          ("delta_momentum", {"keys": "rows"})])
def test_options_that_read_matrix_structure_refuse_complex_parameters(name, options):
    p = torch.nn.Parameter(torch.zeros(3, 3, dtype=torch.complex64))
    with pytest.raises(TypeError, match="complex"):
        make(name, [p], **options)


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_nonfinite_screen_sees_the_imaginary_part(opt_name, policy):
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.complex128))
    if not deepopt.OPTIMIZERS[opt_name].rule.complex_ok({**make(opt_name, [torch.zeros(1)]).defaults}):
        pytest.skip(f"{opt_name}'s default options refuse complex parameters")
    opt = make(opt_name, [p], nonfinite=policy)
    p.grad = torch.tensor([1, 1j * math.nan, 0], dtype=torch.complex128)
    if policy == "raise":
        with pytest.raises(deepopt.NonFiniteGradientError):
            opt.step()
    else:
        opt.step()
    assert torch.equal(p.detach(), torch.ones(3, dtype=torch.complex128))


# ----------------------------------------------------------------------------------------- low precision
@pytest.mark.parametrize("options", [{"foreach": False}, {"fused": False}, {"lr": torch.tensor(0.1)}, {}])
def test_bf16_first_adam_step_moves_like_torch(options):
    """The step count and bias corrections stay fp32: with bf16 ``1 − β₂ᵗ`` would round to 0."""
    p = torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))
    q = torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))
    p.grad = q.grad = torch.full((4,), 0.5, dtype=torch.bfloat16)
    deepopt.Adam([p], **{"lr": 0.1, **options}).step()
    torch.optim.Adam([q], lr=0.1).step()
    torch.testing.assert_close(p.detach(), q.detach(), rtol=2e-2, atol=0)  # bf16 rounding of the same step
    assert p[0].item() == pytest.approx(-0.1, rel=2e-2)


# ------------------------------------------------------------------------------------------- duplicates
# torch's SGD with momentum reads every occurrence's buffer before stepping and keeps the last one written, so
# a repeated parameter does not step twice in sequence there; deepopt's Momentum does (as torch's Adam does)
@pytest.mark.parametrize("foreach", [None, False])
@pytest.mark.parametrize("name,ours,torch_cls,theirs", [t for t in TORCH_TWINS if t[0] != "momentum"])
def test_duplicate_parameters_update_as_torch(name, ours, torch_cls, theirs, foreach):
    moved = []
    for build in (lambda ps: deepopt.OPTIMIZERS[name](ps, foreach=foreach, **ours),
                  lambda ps: torch_cls(ps, foreach=False, **theirs)):
        w = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
        with pytest.warns(UserWarning, match="duplicate"):
            opt = build([w, w])
        for _ in range(3):
            w.grad = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
            opt.step()
        moved.append(w.detach())
    torch.testing.assert_close(moved[0], moved[1], rtol=0, atol=1e-12)


# --------------------------------------------------------------------------------------------- schedulers
def _one_cycle(model, opt, max_lr, steps):
    """Train ``steps`` steps under ``OneCycleLR`` with its defaults (momentum cycled between 0.85 and 0.95)."""
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=steps)
    for t in range(steps):
        opt.zero_grad()
        loss_fn(model, t).backward()
        opt.step()
        sched.step()
    return model


def test_one_cycle_lr_with_its_defaults_works_with_every_class(opt_name):
    model = small_mlp()
    _one_cycle(model, make(opt_name, model.parameters()), 0.01, 10)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_sgd_under_one_cycle_equals_torch_sgd():
    """OneCycleLR cycles SGD's momentum, on torch's SGD and on deepopt's alike."""
    ours, theirs = small_mlp(), small_mlp()
    _one_cycle(ours, deepopt.SGD(ours.parameters(), lr=0.01), 0.1, 20)
    _one_cycle(theirs, torch.optim.SGD(theirs.parameters(), lr=0.01), 0.1, 20)
    for p, q in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------------- Muon
def test_muon_mode_momentum_equals_torch_muon():
    """``torch.optim.Muon(lr, weight_decay=wd, momentum=μ, nesterov=True)`` ==
    ``Momentum(lr, momentum=μ, nesterov=True, nonlinearity="newton_schulz", weight_decay=wd,
    decoupled_weight_decay=True)``, compared in float64 with torch's bf16 cast inside Newton–Schulz removed."""
    import torch.optim._muon as muon

    shapes = [(6, 4), (4, 9), (5, 5)]
    original = muon._zeropower_via_newtonschulz
    runs = []
    for build in (lambda ps: torch.optim.Muon(ps, lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True),
                  lambda ps: deepopt.Momentum(ps, lr=0.02, momentum=0.95, nesterov=True,
                                              nonlinearity="newton_schulz", weight_decay=0.1,
                                              decoupled_weight_decay=True)):
        params = _params(shapes, "cpu", torch.float64)
        opt = build(params)
        for t in range(10):
            gen = torch.Generator().manual_seed(t)
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            with mock.patch.object(muon, "_zeropower_via_newtonschulz",
                                   lambda g, *a: _without_bf16(original, g, *a)):
                opt.step()
        runs.append(params)
    for p, q in zip(*runs):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)


def test_muon_mode_with_bf16_newton_schulz_matches_torch_muon_unpatched():
    """``ns_dtype="bfloat16"`` iterates Newton–Schulz in bf16 as torch does (fast on tensor cores): equal to torch
    Muon to bf16 precision over a few steps."""
    runs = []
    for build in (lambda ps: torch.optim.Muon(ps, lr=0.02, weight_decay=0.0, momentum=0.95, nesterov=True),
                  lambda ps: deepopt.Momentum(ps, lr=0.02, momentum=0.95, nesterov=True,
                                              nonlinearity="newton_schulz", ns_dtype="bfloat16")):
        params = _params([(16, 8), (8, 24)], "cpu")
        opt = build(params)
        for t in range(3):
            gen = torch.Generator().manual_seed(t)
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        runs.append(params)
    start = _params([(16, 8), (8, 24)], "cpu")
    for p, q, p0 in zip(*runs, start):
        assert ((p - q).norm() / (p0 - q).norm()).item() < 0.05  # the difference is bf16 rounding, not the step


def _without_bf16(fn, grad, *args):
    with mock.patch.object(torch.Tensor, "bfloat16", lambda t: t.clone()):
        return fn(grad, *args)


# -------------------------------------------------------------------------------------------------- packaging
def test_wheel_installs_only_under_the_deepopt_namespace(tmp_path):
    # --no-build-isolation builds with this environment's setuptools, which needs the `wheel` package before 70.1
    setuptools = pytest.importorskip("setuptools")
    if tuple(int(x) for x in setuptools.__version__.split(".")[:2]) < (70, 1):
        pytest.importorskip("wheel")
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(root)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("deepopt-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"deepopt"}, top
    assert "deepopt/optimizers/adam.py" in names and "deepopt/meta_train/trainer.py" in names
    assert deepopt.optimizers.Adam is deepopt.Adam


# ------------------------------------------------------------------------------------------ older torch
@pytest.mark.parametrize("options", [{}, {"objective": "l2", "preconditioner": "adam"}])
def test_deep_momentum_multi_tensor_path_runs_without_torch_foreach_mm(monkeypatch, options):
    """torch 2.11 (the H200 image's) has no ``torch._foreach_mm``: DeepMomentum's multi-tensor path then takes
    its own ``deepopt::foreach_mm`` op, with the same trajectory, one op per call and meta tensors working."""
    from deepopt.optimizers import deep_momentum

    a, b = small_mlp(), small_mlp()
    monkeypatch.setattr(deep_momentum, "_cpu_loop_applies", lambda *_: False)  # the path CUDA fp64 and meta take
    train(a, make("deep_momentum", a.parameters(), **options), 10)
    monkeypatch.setattr(deep_momentum, "_foreach_mm", deep_momentum._foreach_mm_op)
    train(b, make("deep_momentum", b.parameters(), **options), 10)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-14)
    counts = []
    for shapes in (gpt2_shapes(), gpt2_shapes(layers=2)):
        opt = make("deep_momentum", _params(shapes, "meta"), **options)
        opt.step()
        counter = count_step_ops(opt)
        counts.append(counter.total)
        assert counter.ops.get("deepopt.foreach_mm.default", 0) >= 3, counter.ops
    assert counts[0] == counts[1] and (options or counts[0] <= OP_BUDGET), counts
