import atexit
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

import pytest
import torch

import deepopt

# Tests never write to the real ~/.cache/deepopt: the HOPE corpus and tokenizer cache (deepopt.hope.data.cache_dir
# reads $DEEPOPT_CACHE) lives in a temporary folder for the session, inherited by the subprocesses tests start.
os.environ["DEEPOPT_CACHE"] = tempfile.mkdtemp(prefix="deepopt-test-cache-")
atexit.register(shutil.rmtree, os.environ["DEEPOPT_CACHE"], ignore_errors=True)

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One intra-op thread per xdist worker (and for the processes they spawn): two workers with two
    # OpenMP threads each on two cores spin against each other and run many times slower.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def small_mlp(seed: int = 0, dtype: torch.dtype = torch.float64, width: int = 8) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, width), torch.nn.Tanh(), torch.nn.Linear(width, 3)).to(dtype)


def batch(step: int, dtype: torch.dtype = torch.float64, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(n, 5, generator=g, dtype=dtype), torch.randn(n, 3, generator=g, dtype=dtype)


def loss_fn(model: torch.nn.Module, step: int) -> torch.Tensor:
    """The MSE of ``model`` on ``batch(step)``, in the dtype and on the device of its parameters."""
    p = next(model.parameters())
    x, y = (v.to(p.device) for v in batch(step, p.dtype))
    return torch.nn.functional.mse_loss(model(x), y)


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, start: int = 0) -> None:
    for t in range(start, start + steps):
        opt.zero_grad()
        loss_fn(model, t).backward()
        opt.step()


# One representative configuration per optimizer (lr large enough that the state matters).
CONFIGS = {
    "sgd": dict(lr=0.1),
    "momentum": dict(lr=0.05, momentum=0.9),
    "adam": dict(lr=0.01),
    "adamw": dict(lr=0.01, weight_decay=0.1),
    "delta_momentum": dict(lr=0.05),
    "deep_momentum": dict(lr=0.05),
    "m3": dict(lr=0.02, chunk=3),
}


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    """A (meta-untrained) learned optimizer folder of the shipped layout (``deepopt evaluate``/``select`` tests)."""
    from deepopt.meta_train import MetaParams

    from deepopt.checkpoint import save_pretrained

    meta = MetaParams("deep_momentum", learn=("W1", "W2", "lr"), lr=0.002, keys="momenta", hidden=4,
                      preconditioner="adam", lr_horizon=100, lr_warmup=0.05)
    folder = tmp_path_factory.mktemp("learned")
    save_pretrained(folder, *meta.export())
    return folder


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Tests that run a command with ``--threads N`` change torch's process-wide thread count: put it back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def clear_kernel_libraries() -> None:
    """Forget the C kernels ``deep_cpu`` built and the OpenMP runtime it found (the next use builds anew)."""
    from deepopt.optimizers import deep_cpu

    for cached in (deep_cpu._openmp_runtime, deep_cpu._library, deep_cpu._momenta_library):
        cached.cache_clear()


@pytest.fixture(params=["openmp", "pthreads"])
def team(request, monkeypatch):
    """The C kernels built on each kind of thread team: torch's OpenMP pool (where the process has GNU OpenMP
    loaded) and threads of their own (``DEEPOPT_CPU_KERNEL_OPENMP=0``)."""
    from deepopt.optimizers import deep_cpu

    if request.param == "pthreads":
        monkeypatch.setenv("DEEPOPT_CPU_KERNEL_OPENMP", "0")
    clear_kernel_libraries()
    if request.param == "openmp" and deep_cpu._openmp_runtime() is None:
        pytest.skip("no GNU OpenMP runtime in this process")
    yield request.param
    monkeypatch.delenv("DEEPOPT_CPU_KERNEL_OPENMP", raising=False)
    clear_kernel_libraries()


@pytest.fixture(params=sorted(CONFIGS))
def opt_name(request):
    return request.param


def make(name: str, params, **overrides) -> torch.optim.Optimizer:
    return deepopt.OPTIMIZERS[name](params, **{**CONFIGS[name], **overrides})


# The training loop both kernel checks run inside their interpreter subprocess (prepend it to the script): a
# 5-8-3 tanh MLP, ``steps`` MSE steps on seeded batches, with the optimizer ``make_opt(params)``.
INTERPRETER_TRAINING = textwrap.dedent("""
    import torch


    def train_tiny_mlp(make_opt, steps=10):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        opt = make_opt(model.parameters())
        for t in range(steps):
            g = torch.Generator().manual_seed(t)
            x, y = torch.randn(16, 5, generator=g), torch.randn(16, 3, generator=g)
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        return model, opt
""")


# Triton < 3.7's interpreter converts a scalar kernel argument used as an index (``range(n)``) with
# ``int(array_of_shape_1)``, which NumPy >= 2.4 refuses ("only 0-dimensional arrays can be converted to Python
# scalars"); Triton 3.7 squeezes the array first. Prepended to every interpreter script: the same fix for 3.6.
INTERPRETER_COMPAT = textwrap.dedent("""
    import triton.runtime.interpreter as _interp

    if not hasattr(_interp, "_deepopt_index_fix"):
        _patch_lang_tensor = _interp._patch_lang_tensor

        def _patch_with_index_fix(tensor, scope):
            _patch_lang_tensor(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

        _interp._patch_lang_tensor = _patch_with_index_fix
        _interp._deepopt_index_fix = True
""")


def run_under_triton_interpreter(code: str, marker: str) -> None:
    """Runs ``code`` in a fresh Python with ``TRITON_INTERPRET=1`` (Triton picks its interpreter when the kernels
    are defined, so it cannot be switched on inside this process) and checks that it succeeded and printed
    ``marker``.  Triton < 3.7 gets ``INTERPRETER_COMPAT`` first."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    if _triton_below((3, 7)):
        code = INTERPRETER_COMPAT + code
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr[-3000:]
    assert marker in out.stdout, out.stdout[-3000:]


def _triton_below(version: tuple[int, int]) -> bool:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return tuple(int(x) for x in installed("triton").split(".")[:2]) < version
    except (PackageNotFoundError, ValueError):
        return False
