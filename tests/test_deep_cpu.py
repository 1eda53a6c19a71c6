"""DeepMomentum's compiled CPU kernel (``optimizers/deep_cpu.py``) is the rule, and stays optional."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest
import torch
from conftest import clear_kernel_libraries
from deepopt.optimizers import deep_cpu
from deepopt.optimizers import deep_momentum as module

import deepopt

needs_kernel = pytest.mark.skipif(not deep_cpu.available(16, 16, "tanh"), reason="no C compiler to build the kernel")
# a ragged tensor, a tiny one, and one above the kernel's one-thread threshold (2¹⁶ coordinates; 2¹² on torch's OpenMP
# pool, where (300, 129) is split too), ragged too
SHAPES = ((37,), (300, 129), (5, 3), (263, 257))


def trajectory(steps: int = 20, threads: int = 1, **options) -> tuple[list[torch.Tensor], deepopt.DeepMomentum]:
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen) for s in SHAPES]
    opt = deepopt.DeepMomentum(params, **{"lr": 0.05, "eta": 0.5, **options})
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) + 0.1 * p
        opt.step()
    return params, opt


@pytest.fixture
def kernel_calls(monkeypatch):
    calls = []
    step = deep_cpu.deep_momentum_step_
    monkeypatch.setattr(deep_cpu, "deep_momentum_step_", lambda *a, **k: calls.append(1) or step(*a, **k))
    threads = torch.get_num_threads()
    yield calls
    torch.set_num_threads(threads)


@needs_kernel
@pytest.mark.parametrize("options", [dict(), dict(activation="relu"), dict(activation="identity"),
                                     dict(lr=torch.tensor(0.05)), dict(weight_decay=0.01, momentum=0.8),
                                     dict(key_dim=8, hidden=32)])
def test_kernel_follows_the_rule_in_float32(options, kernel_calls):
    ours, opt = trajectory(threads=2, **options)  # the kernel's threads split the large tensor
    ref, ref_opt = trajectory(threads=1, foreach=False, **options)
    assert len(kernel_calls) == 20
    for a, b in zip(ours, ref):
        assert (a - b).abs().max() <= 2e-5 * b.abs().max()
    for a, b in zip(ours, ref):  # the memory W₁ (updated in place) and the momentum
        for k in ("W1", "momentum_buffer"):
            x, y = opt.state[a][k], ref_opt.state[b][k]
            assert (x - y).abs().max() <= 1e-4 * y.abs().max(), k


@needs_kernel
@pytest.mark.parametrize("isa_flags", ["-mno-avx512f", "-mno-avx512f -mno-avx2 -mno-fma"])
def test_kernel_follows_the_rule_on_each_instruction_set(isa_flags, kernel_calls, monkeypatch):
    """The AVX2 + FMA and plain-vector exponentials (an AVX-512 machine takes neither by default), built with
    those instruction sets turned off (on a CPU without them, the default build again)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86 instruction-set flags")
    monkeypatch.setenv("DEEPOPT_CPU_KERNEL_FLAGS", isa_flags)
    deep_cpu._library.cache_clear()
    try:
        assert deep_cpu.available(16, 16, "tanh")
        test_kernel_follows_the_rule_in_float32({}, kernel_calls)
    finally:
        deep_cpu._library.cache_clear()


@needs_kernel
def test_threads_split_the_work_and_agree(kernel_calls, team):
    assert deep_cpu.team_kind(deep_cpu._library(16, 16)) == team
    one, _ = trajectory(threads=1)
    three, _ = trajectory(threads=3)
    assert len(kernel_calls) == 40
    for a, b in zip(one, three):
        assert (a - b).abs().max() <= 1e-6 * b.abs().max()


def mapped_openmp_runtimes() -> set[str]:
    with open("/proc/self/maps") as f:
        return {line.split()[-1] for line in f if "/libgomp" in line}


@needs_kernel
def test_the_threads_are_torchs_openmp_pool(monkeypatch, tmp_path):
    """Where torch runs its ops on GNU OpenMP (its Linux wheels), the kernels, built afresh, run on that same pool,
    linked against the very library torch loaded: they map no runtime of their own (scikit-learn, imported here,
    brings a second ``libgomp``; the kernels must still pick torch's)."""
    if not platform.system() == "Linux" or "OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("torch's threads are not GNU OpenMP here")
    import sklearn.datasets  # noqa: F401  (its bundled OpenMP runtime, where its wheel has one)

    monkeypatch.setenv("DEEPOPT_CACHE", str(tmp_path))
    clear_kernel_libraries()
    try:
        before = mapped_openmp_runtimes()
        runtime = deep_cpu._openmp_runtime()
        assert runtime is not None and runtime.resolve().is_relative_to(Path(torch.__file__).resolve().parent)
        libs = deep_cpu._library(16, 16), deep_cpu._momenta_library(8, 2, "tanh", True)
        assert [deep_cpu.team_kind(lib) for lib in libs] == ["openmp", "openmp"]
        assert mapped_openmp_runtimes() == before
    finally:
        clear_kernel_libraries()


@needs_kernel
def test_nonfinite_gradients_propagate_as_in_the_rule(kernel_calls):
    p = torch.zeros(100)
    opt = deepopt.DeepMomentum([p], lr=0.1)
    p.grad = torch.ones(100)
    p.grad[7] = float("nan")
    opt.step()
    assert kernel_calls and p.isnan().all() and opt.state[p]["W1"].isnan().all()


@pytest.mark.parametrize("reason", ["switched off", "odd block", "float64"])
def test_the_torch_loop_serves_where_the_kernel_does_not(reason, kernel_calls, monkeypatch):
    options = {"odd block": dict(key_dim=5, hidden=3)}.get(reason, {})
    if reason == "switched off":
        monkeypatch.setenv("DEEPOPT_CPU_KERNELS", "0")
    loop = []
    chunk_loop = module._block_rows
    monkeypatch.setattr(module, "_block_rows", lambda *a: loop.append(1) or chunk_loop(*a))
    params = [torch.randn(40, 7, dtype=torch.float64 if reason == "float64" else torch.float32)]
    opt = deepopt.DeepMomentum(params, lr=0.05, **options)
    params[0].grad = torch.randn_like(params[0])
    opt.step()
    assert not kernel_calls and loop


def test_no_compiler_means_no_kernel_and_the_same_optimizer(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("DEEPOPT_CACHE", str(tmp_path))
    deep_cpu._library.cache_clear()
    try:
        assert not deep_cpu.available(16, 16, "tanh")
        p = torch.ones(64)
        opt = deepopt.DeepMomentum([p], lr=0.1)
        p.grad = torch.ones(64)
        opt.step()
        assert p.lt(1).all()
    finally:
        deep_cpu._library.cache_clear()


@needs_kernel
def test_the_library_is_built_once_and_reused(monkeypatch, tmp_path):
    monkeypatch.setenv("DEEPOPT_CACHE", str(tmp_path))
    deep_cpu._library.cache_clear()
    try:
        assert deep_cpu.available(4, 8, "relu")
        built = list((tmp_path / "kernels").glob("deep_momentum_4x8_*.so"))
        assert len(built) == 1
        stamp = built[0].stat().st_mtime_ns
        deep_cpu._library.cache_clear()
        assert deep_cpu.available(4, 8, "relu") and built[0].stat().st_mtime_ns == stamp
        assert [p.name for p in (tmp_path / "kernels").iterdir()] == [built[0].name]  # no temporary left
    finally:
        deep_cpu._library.cache_clear()
