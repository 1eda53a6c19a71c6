"""Ahead-of-time compile check of every Triton kernel launch deepopt makes, for Hopper (sm_90) and Ampere (sm_80).

    python benchmarks/triton_aot.py                          # every scenario, sm_90 and sm_80, table + JSON
    python benchmarks/triton_aot.py --ci                     # the CI scope; exit 1 on a defect (below)
    python benchmarks/triton_aot.py --only optimizers --targets 90 --json out.json

No GPU is needed.  Each scenario drives deepopt's real entry points (an optimizer's ``step()`` on GPT-2 124M's
148 parameter shapes, HOPE's forward + backward at its size presets) on fake CUDA tensors
(``torch._subclasses.FakeTensor``: shapes, dtypes and the ``cuda`` device, no memory), so the routing decides
what is launched exactly as on a GPU.  ``JITFunction.run`` is replaced while a scenario runs: every launch is
recorded (kernel, grid, arguments) instead of run.  Each recorded launch is then replayed through Triton's own
``JITFunction.run(..., warmup=True)`` under a driver that reports the target GPU: the arguments are bound and
specialised exactly as at launch time (16-divisibility of integers and of the tensors' addresses, which meta
tensors keep from their storage offsets, ``== 1`` integers, constexprs), and ``triton.compile`` builds each
distinct specialisation once for ``GPUTarget("cuda", cc, 32)`` with Triton's bundled ptxas.  Reported per kernel
× specialisation × target:

- status (a frontend or backend compile error is the error's last line),
- registers per thread, spill stores/loads and stack frame (``ptxas -v`` on the kernel's PTX, the flags Triton
  uses), local-memory instructions in the SASS (``LDL``/``STL``, ``nvdisasm``),
- shared memory against the per-block limit (227 KiB on sm_90, 163 KiB on sm_80),
- how each ``tl.dot`` lowers: ``wgmma`` (``ttng.warp_group_dot``), ``mma`` (an ``nvidia_mma`` v2 result
  encoding: ``mma.sync``) or ``fma`` (any other encoding), from the TTGIR, with the SASS's ``HGMMA``/``HMMA`` counts,
- programs launched against the SM count (132 on H100/H200 SXM, 108 on A100).

With ``--ci`` the exit status is 1 on: a compile failure on any target; a spill (spill stores or loads > 0)
in a routed launch (a scenario whose launches the routing makes; probes of unrouted configurations are
reported only) of a kernel not exempted in ``benchmarks/triton_aot_scope.json``; a kernel that some launch
site in the package launches (``name[grid](...)`` in the source of a module with ``@triton.jit`` kernels) but no
scenario covers.  The scope file is data: which kernels are exempt from the spill rule and why.

Compiles are cached by Triton (``TRITON_CACHE_DIR``, default ``~/.triton/cache``: keyed by source, options and
target), the ptxas/nvdisasm readings beside them in ``<cache>/deepopt-aot`` keyed by the PTX's hash, and
``--jobs`` splits the scenarios over processes.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import hashlib
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns unless told; 1 is every version's default

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from deepopt.bench import cuda_tensor, fake_cuda  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCOPE_FILE = Path(__file__).with_name("triton_aot_scope.json")
# per target: SMs of the reference part, shared memory a block may opt into (bytes)
TARGETS = {90: {"name": "sm_90 (H100/H200)", "sms": 132, "smem": 232448},
           80: {"name": "sm_80 (A100)", "sms": 108, "smem": 166912}}
GPT2 = "gpt2-124M"
HOPE_SIZES = ("tiny", "small", "base", "125m", "340m")
HOPE_CONTEXT, HOPE_BATCH = 2048, 2
# HOPE's (dtype, TF32 allowed) configurations: exact fp32 products, fp32 with TF32 products (how `hope train` runs on
# CUDA), and bf16
HOPE_DTYPES = ((torch.float32, False), (torch.float32, True), (torch.bfloat16, False))


# ------------------------------------------------------------------------------------------------ scenarios
@dataclass
class Scenario:
    """A named workload: ``run()`` makes deepopt's launches on fake CUDA tensors.  ``routed``: the launches are
    the ones the routing makes (spills count), else a probe of a configuration the routing leaves to torch."""

    name: str
    group: str  # "optimizers" | "hope"
    run: Callable[[], None]
    routed: bool = True
    ci: tuple[int, ...] = (90,)  # the targets it is compiled for in the --ci scope (empty: not in it)


@contextlib.contextmanager
def _tf32(allowed: bool) -> Iterator[None]:
    """``torch.backends.cuda.matmul.allow_tf32`` set as a training script sets it."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def _optimizer_scenario(label: str, make: Callable[[list[Tensor]], torch.optim.Optimizer], dtype: torch.dtype,
                        shapes: list[tuple[int, ...]] | None = None, routed: bool = True,
                        ci: tuple[int, ...] = (90,), tf32: bool = False) -> Scenario:
    def run() -> None:
        from deepopt.bench import gpt2_shapes

        with fake_cuda() as mode, _tf32(tf32):
            params = []
            for s in shapes or gpt2_shapes():
                p = torch.nn.Parameter(cuda_tensor(mode, s, dtype))
                p.grad = cuda_tensor(mode, s, dtype)
                params.append(p)
            opt = make(params)
            opt.step()  # creates the state
            opt.step()

    name = (f"{label} {str(dtype).removeprefix('torch.')}{' tf32' if tf32 else ''} "
            f"{GPT2 if shapes is None else 'shapes ' + str(shapes)}")
    return Scenario(name, "optimizers", run, routed, ci)


def _momenta_scenario(dtype: torch.dtype, hidden: int = 8, scales: int = 2, activation: str = "tanh",
                      dog: bool = False) -> Scenario:
    """The momenta layout's kernels (``deep_kernels.momenta_step_``; the shipped learned optimizer's: hidden 8, two
    time scales, tanh; ``dog``: with ``lr_adapt="dog"``'s sums) on GPT-2 124M's shapes, as
    ``benchmarks/momenta_step.py`` and DeepMomentum's ``keys="momenta"`` route them."""
    def run() -> None:
        from deepopt.optimizers import deep_kernels

        from deepopt.bench import gpt2_shapes

        with fake_cuda() as mode:
            ps = [cuda_tensor(mode, s, dtype) for s in gpt2_shapes()]
            gs, ms, vs = ([torch.empty_like(p) for p in ps] for _ in range(3))
            es = [cuda_tensor(mode, (scales, *p.shape), dtype) for p in ps]
            w1 = [cuda_tensor(mode, (1, hidden), torch.float32) for _ in ps]
            w2 = [cuda_tensor(mode, (hidden, 2 + scales), torch.float32) for _ in ps]
            vec = cuda_tensor(mode, (len(ps),), torch.float32)
            deep_kernels.momenta_step_(ps, gs, ms, vs, es, w1, w2, cuda_tensor(mode, (1, hidden), torch.float32), vec,
                                       vec, cuda_tensor(mode, (scales,), torch.float32), 0.9, 0.95, 1e-8, 0.1, 0.1,
                                       activation=activation,
                                       origins=[torch.empty_like(p) for p in ps] if dog else None)

    label = "shipped (momenta h8 J2)" if (hidden, scales, activation) == (8, 2, "tanh") else \
        f"momenta h{hidden} J{scales} {activation}"
    label += " dog" if dog else ""
    return Scenario(f"DeepMomentum {label} {str(dtype).removeprefix('torch.')} {GPT2}", "optimizers", run)


def _hope_scenario(size: str, dtype: torch.dtype, ci: tuple[int, ...] = (), tf32: bool = False) -> Scenario:
    """HOPE's forward + backward at a size preset (batch ``HOPE_BATCH`` × ``HOPE_CONTEXT`` tokens) on the meta
    device: the custom ops' real implementations are called on the inputs they receive, seen as CUDA tensors
    (``Tensor.is_cuda``), so their routing (``_triton_applies``, ``triton_applies``) decides what launches (their
    fake kernels produce the outputs the model goes on with).  bfloat16: the whole model in bf16 (the kernels'
    bf16 loads and stores; ``--amp bf16``'s autocast has no meta-device form).  ``tf32``: float32 matmuls allowed
    on TF32 tensor cores, as ``hope train`` on CUDA sets them (``train.resolve_device``): the kernels' products then
    lower to tensor-core dots (``dot_precision``)."""
    def run() -> None:
        from deepopt.hope.model import LanguageModel
        from deepopt.hope.train import model_config

        torch.manual_seed(0)
        with _tf32(tf32):
            with torch.device("meta"):  # recompute_chunks: the layers call the ops as on CUDA (off CUDA, as meta
                # tensors are, eager training would run the loop that keeps chunks instead: deepopt.hope.kept)
                model = LanguageModel(model_config("hope", size, recompute_chunks=True)).to(dtype)
                tokens = torch.zeros(HOPE_BATCH, HOPE_CONTEXT + 1, dtype=torch.int64)
            with _CustomOpsCalled():
                _, loss = model(tokens[:, :-1], tokens[:, 1:])
                loss.backward()

    return Scenario(f"HOPE {size} ctx{HOPE_CONTEXT} {str(dtype).removeprefix('torch.')}{' tf32' * tf32}", "hope", run,
                    True, ci)


def _cms_scenario(size: str, dtype: torch.dtype, ci: tuple[int, ...] = (), tf32: bool = False) -> Scenario:
    """The learning CMS levels of a HOPE size preset alone, forward + backward (batch ``HOPE_BATCH`` ×
    ``HOPE_CONTEXT`` tokens, meta device, as ``_hope_scenario``): from base up their chunks are above
    ``cms_kernels.MAX_CHUNK_WORK`` and take the tiled kernels, which CI compiles here without the minutes that
    the same preset's Titans kernels take (``tf32``: as ``_hope_scenario``)."""
    def run() -> None:
        from deepopt.hope.model import CMSLevel
        from deepopt.hope.train import model_config

        torch.manual_seed(0)
        cfg = model_config("hope", size, recompute_chunks=True)
        with torch.device("meta"):
            levels = [CMSLevel(cfg, period).to(dtype) for period in cfg.cms_periods if period is not None]
            x = torch.zeros(HOPE_BATCH, HOPE_CONTEXT, cfg.d_model, dtype=dtype, requires_grad=True)
        with _CustomOpsCalled(), _tf32(tf32):
            sum(level(x, torch.zeros_like(x)).sum() for level in levels).backward()

    return Scenario(f"HOPE {size} CMS levels ctx{HOPE_CONTEXT} {str(dtype).removeprefix('torch.')}{' tf32' * tf32}",
                    "hope", run, True, ci)


class _CustomOpsCalled(torch.utils._python_dispatch.TorchDispatchMode):
    """Runs the Python implementation of every ``deepopt::`` custom op on the fake inputs (where the Triton
    launches happen) before its fake kernel produces the outputs."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "deepopt":
            impl = _custom_op_impls().get(func.name().split("::")[1].split(".")[0])
            if impl is not None:
                with mock.patch.object(Tensor, "is_cuda", property(lambda self: True)):
                    impl(*args, **kwargs)
        return func(*args, **kwargs)


def _custom_op_impls() -> dict[str, Callable[..., Any]]:
    """``deepopt::`` custom op name → its Python implementation, from the kernel modules."""
    from torch._library.custom_ops import CustomOpDef

    impls = {}
    for module in kernel_modules():
        for value in vars(importlib.import_module(module)).values():
            if isinstance(value, CustomOpDef) and value._namespace == "deepopt":
                impls[value._name] = value._init_fn
    return impls


def scenarios() -> list[Scenario]:
    """Every scenario; ``ci``: the default configurations on sm_90 and sm_80, the other routed ones on sm_90,
    HOPE at its tiny preset (the four scan kernels; the larger presets compile minutes longer) and the base
    preset's CMS levels (the tiled CMS kernels)."""
    import deepopt

    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    both = (90, 80)
    out = [
        *(_optimizer_scenario("DeltaMomentum", lambda ps: deepopt.DeltaMomentum(ps, lr=1e-3), dt,
                              ci=both if dt == f32 else (90,)) for dt in (f32, bf16, f16)),
        *(_optimizer_scenario("DeltaMomentum tensor-lr", lambda ps: deepopt.DeltaMomentum(
            ps, lr=torch.tensor(1e-3), capturable=True), dt) for dt in (f32, bf16)),
        *(_optimizer_scenario("DeepMomentum h16 tanh", lambda ps: deepopt.DeepMomentum(ps, lr=1e-3), dt, tf32=tf32,
                              ci=both if dt == f32 and not tf32 else (90,))
          for dt in (f32, bf16) for tf32 in (False, True)),
        *(_optimizer_scenario("DeepMomentum h16 tanh tensor-lr", lambda ps: deepopt.DeepMomentum(
            ps, lr=torch.tensor(1e-3), capturable=True), dt) for dt in (f32, bf16)),
        _optimizer_scenario("DeepMomentum h16 relu", lambda ps: deepopt.DeepMomentum(ps, activation="relu"), f32),
        _optimizer_scenario("DeepMomentum h16 identity", lambda ps: deepopt.DeepMomentum(
            ps, activation="identity"), bf16),
        *(_optimizer_scenario(f"DeepMomentum h{h} kd{kd}", lambda ps, h=h, kd=kd: deepopt.DeepMomentum(
            ps, hidden=h, key_dim=kd), f32, tf32=tf32, ci=(90,) if (h, kd) in ((64, 16), (256, 16)) else ())
          for h, kd in ((32, 16), (64, 16), (128, 16), (256, 16), (16, 32), (64, 64)) for tf32 in (False, True)),
        *(_momenta_scenario(dt) for dt in (f32, bf16)),
        _momenta_scenario(f32, 2, 1, "softsign"),
        *(_momenta_scenario(dt, dog=True) for dt in (f32, bf16)),
        *(_hope_scenario(size, dt, ci=(90,) if (size, dt) == ("tiny", f32) else (), tf32=tf32) for size in HOPE_SIZES
          for dt, tf32 in HOPE_DTYPES),
        *(_cms_scenario(size, dt, ci=(both if (dt, tf32) == (f32, False) else (90,)) if size == "base" else (),
                        tf32=tf32) for size in HOPE_SIZES[2:] for dt, tf32 in HOPE_DTYPES),
    ]
    return out


# ----------------------------------------------------------------------------------------------- capture
@dataclass
class Launch:
    kernel: str  # module.name
    scenario: str
    routed: bool
    grid: tuple[int, ...]
    args: tuple
    kwargs: dict
    targets: tuple[int, ...]  # compiled for these


def kernel_modules() -> list[str]:
    """Modules of the package that define ``@triton.jit`` functions (found in the source, so a new one is
    covered without listing it here)."""
    mods = []
    for path in sorted([*(ROOT / "deepopt").rglob("*.py"), *(ROOT / "optimizers").glob("*.py")]):
        if "triton.jit" in path.read_text():
            rel = path.relative_to(ROOT).with_suffix("")
            parts = ("deepopt", *rel.parts) if rel.parts[0] == "optimizers" else rel.parts
            mods.append(".".join(parts))
    return mods


def launch_sites() -> dict[str, list[str]]:
    """Kernel (module.name) → the functions that launch it (``name[grid](...)`` in the module's source)."""
    import triton

    sites: dict[str, list[str]] = {}
    for module in kernel_modules():
        mod = importlib.import_module(module)
        jitted = {k for k, v in vars(mod).items() if isinstance(v, triton.runtime.jit.JITFunction)}
        tree = ast.parse(Path(mod.__file__).read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript)
                        and isinstance(node.func.value, ast.Name) and node.func.value.id in jitted):
                    sites.setdefault(f"{module}.{node.func.value.id}", []).append(fn.name)
    return sites


def _to_meta(x: Any) -> Any:
    """A fake tensor as a meta tensor of the same dtype, shape, strides and storage offset (``data_ptr()`` of a
    meta tensor is its offset in bytes: the alignment Triton specialises on)."""
    if isinstance(x, Tensor):
        return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta") if x.storage_offset() == 0 \
            else torch.empty(x.storage_offset() + x.numel() + 1, dtype=x.dtype, device="meta").as_strided(
                x.shape, x.stride(), x.storage_offset())
    if isinstance(x, tuple):
        return tuple(_to_meta(v) for v in x)
    return x


def capture(scenario: Scenario, targets: tuple[int, ...] = tuple(TARGETS)) -> tuple[list[Launch], str | None]:
    """The launches ``scenario`` makes, and the error that stopped it (None when it ran through)."""
    from triton.runtime.jit import JITFunction

    launches: list[Launch] = []

    def record(self, *args, grid, warmup, **kwargs):
        args, kwargs = _to_meta(args), {k: _to_meta(v) for k, v in kwargs.items()}
        if callable(grid):
            bound = dict(zip(self.arg_names, args)) | kwargs
            grid = grid(bound)
        grid = tuple(int(g) for g in grid)
        launches.append(Launch(f"{self.fn.__module__}.{self.fn.__name__}", scenario.name, scenario.routed, grid,
                               args, kwargs, targets))

    with mock.patch.object(JITFunction, "run", record):
        try:
            scenario.run()
        except Exception as err:  # noqa: BLE001 - reported, not raised: one broken scenario must not hide the rest
            return launches, f"{type(err).__name__}: {_last_line(err)}"
    return launches, None


def _last_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    cause = err.__cause__
    if cause is not None and str(cause).strip():
        text = str(cause).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return " ".join(lines[-1].split())[:400] if lines else text


# ----------------------------------------------------------------------------------------------- compile
class _TargetDriver:
    """A driver that reports ``GPUTarget("cuda", cc, 32)`` (one fake device per target, so Triton's
    per-device kernel caches keep the targets apart); nothing is launched through it."""

    def __init__(self) -> None:
        self.cc = 90

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", self.cc, 32)

    def get_current_device(self) -> int:
        return self.cc

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("meta")

    def is_active(self) -> bool:
        return True


@dataclass
class Compiled:
    kernel: str
    target: int
    key: str  # the specialisation: constexprs and attributes
    status: str = "ok"
    error: str = ""
    num_warps: int = 0
    num_stages: int = 0
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    stack: int = 0
    local_sass: int = 0
    shared: int = 0
    smem_limit: int = 0
    dots: dict[str, int] = field(default_factory=dict)
    sass_mma: dict[str, int] = field(default_factory=dict)
    programs: int = 0
    sms: int = 0
    scenarios: list[str] = field(default_factory=list)
    routed: bool = False
    seconds: float = 0.0

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads


def _tool(name: str) -> str | None:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(path) if path.exists() else shutil.which(name)


def _cache_dir() -> Path:
    base = os.environ.get("TRITON_CACHE_DIR") or str(Path.home() / ".triton" / "cache")
    path = Path(base) / "deepopt-aot"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _ptxas(cc: int) -> str | None:
    """The ptxas Triton itself uses for this target (3.9 takes its newer ``ptxas-blackwell`` for sm_90 too)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(cc).path
    except Exception:  # noqa: BLE001 - an older layout: the bundled binary
        return _tool("ptxas")


def _ptxas_reading(ptx: str, cc: int, fp_fusion: bool) -> dict[str, int]:
    """``ptxas -v`` on the PTX (Triton's ptxas and flags), cached by the PTX's hash: registers, spills, stack
    frame (-1 each when ptxas cannot be run)."""
    arch = f"sm_{cc}a" if cc >= 90 else f"sm_{cc}"
    ptxas = _ptxas(cc)
    digest = hashlib.sha256(f"{arch}{fp_fusion}{ptxas}\n{ptx}".encode()).hexdigest()[:24]
    cached = _cache_dir() / f"ptxas-{digest}.json"
    if cached.exists():
        return json.loads(cached.read_text())
    reading = {"registers": -1, "spill_stores": -1, "spill_loads": -1, "stack": -1}
    if ptxas is None:
        return reading
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        cmd = [ptxas, *([] if fp_fusion else ["--fmad=false"]), "-v", f"--gpu-name={arch}", str(src), "-o",
               str(Path(tmp) / "k.cubin")]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"ptxas -v failed: {_last_line(RuntimeError(done.stderr))}")
    for key, pattern in (("registers", r"Used (\d+) registers"), ("spill_stores", r"(\d+) bytes spill stores"),
                         ("spill_loads", r"(\d+) bytes spill loads"), ("stack", r"(\d+) bytes stack frame")):
        found = re.findall(pattern, done.stderr)
        reading[key] = max(map(int, found)) if found else 0
    cached.write_text(json.dumps(reading))
    return reading


def _sass_reading(cubin: bytes) -> dict[str, int]:
    """Tensor-core and local-memory instructions in the SASS (``nvdisasm``), cached by the cubin's hash."""
    digest = hashlib.sha256(cubin).hexdigest()[:24]
    cached = _cache_dir() / f"sass-{digest}.json"
    if cached.exists():
        return json.loads(cached.read_text())
    tool = _tool("nvdisasm")
    counts = {"HGMMA": -1, "HMMA": -1, "local": -1}
    if tool is not None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "k.cubin"
            path.write_bytes(cubin)
            sass = subprocess.run([tool, "-c", str(path)], capture_output=True, text=True, timeout=600).stdout
        counts = {"HGMMA": len(re.findall(r"\bHGMMA\.", sass)), "HMMA": len(re.findall(r"\bHMMA\.", sass)),
                  "local": len(re.findall(r"\b(?:LDL|STL)\b", sass))}
        cached.write_text(json.dumps(counts))
    return counts


def dot_lowering(ttgir: str) -> dict[str, int]:
    """Each ``tl.dot`` in the TTGIR: ``wgmma`` (``ttng.warp_group_dot``), ``mma`` (``tt.dot`` into an
    ``nvidia_mma`` v2 layout: ``mma.sync``) or ``fma`` (``tt.dot`` into any other layout)."""
    aliases = dict(re.findall(r"^(#[\w]+) = (#ttg\.[\w]+<.*?>)\s*$", ttgir, flags=re.M))
    counts = {"wgmma": 0, "mma": 0, "fma": 0}
    for line in ttgir.splitlines():
        if "ttng.warp_group_dot " in line and "_wait" not in line:
            counts["wgmma"] += 1
        elif re.search(r"= tt\.dot ", line):
            result = line.rsplit("->", 1)[-1]
            enc = re.findall(r"(#[\w.]+(?:<[^>]*>)?)>", result)
            name = enc[-1] if enc else ""
            layout = aliases.get(name, name)
            counts["mma" if "nvidia_mma" in layout or "mma" in name else "fma"] += 1
    return {k: v for k, v in counts.items() if v}


def compile_launches(launches: list[Launch], targets: list[int]) -> list[Compiled]:
    """Each distinct specialisation of the launches compiled for each target (``JITFunction.run`` with
    ``warmup=True`` under ``_TargetDriver``: Triton's own binding, specialisation and ``triton.compile``)."""
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    fake, previous = _TargetDriver(), getattr(driver, "_active", None)
    driver.set_active(fake)
    results: dict[tuple, Compiled] = {}
    try:
        for cc in targets:
            fake.cc = cc
            for launch in launches:
                if cc not in launch.targets:
                    continue
                module, _, name = launch.kernel.rpartition(".")
                fn = getattr(importlib.import_module(module), name)
                t0 = time.perf_counter()
                err = None
                try:
                    kernel = JITFunction.run(fn, *launch.args, grid=launch.grid, warmup=True, **launch.kwargs)
                    key = _specialisation(kernel)
                except Exception as e:  # noqa: BLE001 - a compile failure is a result
                    kernel, err = None, e
                    key = "error: " + _signature_text(launch)
                ident = (launch.kernel, cc, key)
                entry = results.get(ident)
                if entry is None:
                    entry = results[ident] = Compiled(launch.kernel, cc, key, sms=TARGETS[cc]["sms"],
                                                      smem_limit=TARGETS[cc]["smem"])
                    if err is not None:
                        entry.status, entry.error = "compile error", f"{type(err).__name__}: {_last_line(err)}"
                    else:
                        _analyse(entry, kernel, cc)
                    entry.seconds = time.perf_counter() - t0
                entry.programs = max(entry.programs, _programs(launch.grid))
                entry.routed = entry.routed or launch.routed
                if launch.scenario not in entry.scenarios:
                    entry.scenarios.append(launch.scenario)
    finally:
        driver._active = previous  # not reset_active(): that looks for a real GPU driver
    return list(results.values())


def _programs(grid: tuple[int, ...]) -> int:
    n = 1
    for g in grid:
        n *= g
    return n


def _specialisation(kernel: Any) -> str:
    src = kernel.src if hasattr(kernel, "src") else None
    meta = kernel.metadata
    parts = []
    if src is not None:
        parts.append("constexprs " + ", ".join(f"{_path(k)}={_value(v)}" for k, v in sorted(
            src.constants.items(), key=lambda kv: str(kv[0]))))
        parts.append("attrs " + ", ".join(f"{_path(k)}:{v}" for k, v in sorted(src.attrs.items(),
                                                                                 key=lambda kv: str(kv[0]))))
        parts.append("sig " + ",".join(str(v) for v in src.signature.values()))
    parts.append(f"warps {meta.num_warps} stages {meta.num_stages}")
    return "; ".join(parts)


def _path(k: Any) -> str:
    return ".".join(map(str, k)) if isinstance(k, tuple) else str(k)


def _value(v: Any) -> str:
    return str(v).removeprefix("triton.language.")


def _signature_text(launch: Launch) -> str:
    def one(a: Any) -> str:
        if isinstance(a, Tensor):
            return f"*{str(a.dtype).removeprefix('torch.')}"
        return _value(a)
    return ", ".join([*(one(a) for a in launch.args), *(f"{k}={one(v)}" for k, v in launch.kwargs.items())])


def _analyse(entry: Compiled, kernel: Any, cc: int) -> None:
    meta = kernel.metadata
    entry.num_warps, entry.num_stages, entry.shared = meta.num_warps, meta.num_stages, meta.shared
    asm = kernel.asm
    reading = _ptxas_reading(asm["ptx"], cc, getattr(meta, "enable_fp_fusion", True))
    entry.registers, entry.spill_stores, entry.spill_loads, entry.stack = (
        reading["registers"], reading["spill_stores"], reading["spill_loads"], reading["stack"])
    entry.dots = dot_lowering(asm["ttgir"])
    sass = _sass_reading(asm["cubin"])
    entry.local_sass = sass["local"]
    entry.sass_mma = {k: sass[k] for k in ("HGMMA", "HMMA") if sass[k]}
    if entry.shared > entry.smem_limit:
        entry.status = "over shared memory"


# ------------------------------------------------------------------------------------------------- report
def _worker(names: list[str], targets: list[int], ci: bool = False, part: int = 0, parts: int = 1) -> dict[str, Any]:
    """Capture the scenarios (all of them: it is quick and deterministic) and compile launches ``part``,
    ``part + parts``, … of them: ``parts`` workers share the compiles, even of one scenario."""
    torch.set_num_threads(1)
    chosen = [s for s in scenarios() if s.name in names]
    launches, errors, counts = [], {}, {}
    for s in chosen:
        found, err = capture(s, tuple(t for t in targets if not ci or t in s.ci))
        counts[s.name] = len(found)
        if err is not None:
            errors[s.name] = err
        launches.extend(found)
    compiled = compile_launches(launches[part::parts], targets)
    return {"compiled": [asdict(c) for c in compiled], "errors": errors, "launches": counts}


def run(selected: list[Scenario], targets: list[int], jobs: int, ci: bool = False) -> dict[str, Any]:
    names = [s.name for s in selected]
    if jobs > 1:
        import multiprocessing

        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            outs = list(pool.map(_worker, [names] * jobs, [targets] * jobs, [ci] * jobs, range(jobs), [jobs] * jobs))
    else:
        outs = [_worker(names, targets, ci)]
    merged: dict[tuple, dict] = {}
    errors, counts = {}, {}
    for out in outs:
        errors |= out["errors"]
        counts |= out["launches"]
        for c in out["compiled"]:
            ident = (c["kernel"], c["target"], c["key"])
            have = merged.get(ident)
            if have is None:
                merged[ident] = c
            else:
                have["routed"] = have["routed"] or c["routed"]
                have["programs"] = max(have["programs"], c["programs"])
                have["scenarios"] += [s for s in c["scenarios"] if s not in have["scenarios"]]
    rows = sorted(merged.values(), key=lambda c: (c["kernel"], -c["target"], c["key"]))
    return {"targets": targets, "scenarios": {n: counts.get(n, 0) for n in names}, "scenario_errors": errors,
            "kernels": rows}


def check(report: dict[str, Any], scope: dict[str, Any], full_scope: bool) -> list[str]:
    """The CI rules (module doc); returns one line per defect."""
    problems = []
    exempt = scope.get("spill_exempt", {})
    for name, err in report["scenario_errors"].items():
        problems.append(f"scenario {name!r} failed: {err}")
    for c in report["kernels"]:
        where = f"{c['kernel']} sm_{c['target']} [{c['key']}]"
        if c["status"] != "ok":
            problems.append(f"{where}: {c['status']} {c['error']}".rstrip())
        elif c["routed"] and (c["spill_stores"] > 0 or c["spill_loads"] > 0) and c["kernel"] not in exempt:
            problems.append(f"{where}: spills {c['spill_stores']}/{c['spill_loads']} bytes (stores/loads) in a "
                            f"routed launch ({', '.join(c['scenarios'][:3])})")
    if full_scope:
        covered = {c["kernel"] for c in report["kernels"]}
        for kernel, funcs in sorted(launch_sites().items()):
            if kernel not in covered:
                problems.append(f"{kernel} (launched in {', '.join(sorted(set(funcs)))}) is covered by no scenario")
    return problems


def format_table(report: dict[str, Any]) -> str:
    lines = ["| kernel | target | routed | status | warps | regs | spill st/ld (B) | stack | smem KiB | dots "
             "| SASS mma | programs/SMs | scenarios |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---|---|---:|---|"]
    for c in report["kernels"]:
        dots = " ".join(f"{k}×{v}" for k, v in c["dots"].items()) or "–"
        mma = " ".join(f"{k}×{v}" for k, v in c["sass_mma"].items()) or "–"
        status = c["status"] if c["status"] == "ok" else f"**{c['status']}**: {c['error'][:160]}"
        spills = f"{c['spill_stores']}/{c['spill_loads']}"
        if c["spill_stores"] or c["spill_loads"]:
            spills = f"**{spills}**"
        scen = "; ".join(c["scenarios"][:2]) + (f" (+{len(c['scenarios']) - 2})" if len(c["scenarios"]) > 2 else "")
        lines.append(f"| {c['kernel'].rsplit('.', 2)[-2]}.{c['kernel'].rsplit('.', 1)[-1]} | sm_{c['target']} "
                     f"| {'yes' if c['routed'] else 'probe'} | {status} | {c['num_warps']} | {c['registers']} "
                     f"| {spills} | {c['stack']} | {c['shared'] / 1024:.1f}/{c['smem_limit'] / 1024:.0f} | {dots} "
                     f"| {mma} | {c['programs']}/{c['sms']} | {scen} |")
    return "\n".join(lines)


def summary(report: dict[str, Any]) -> str:
    rows = report["kernels"]
    per_target = {}
    for c in rows:
        t = per_target.setdefault(c["target"], {"specialisations": 0, "failed": 0, "spilling": 0, "spilling_routed": 0,
                                                "wgmma": 0, "mma": 0, "fma": 0})
        t["specialisations"] += 1
        t["failed"] += c["status"] != "ok"
        t["spilling"] += (c["spill_stores"] + c["spill_loads"]) > 0
        t["spilling_routed"] += (c["spill_stores"] + c["spill_loads"]) > 0 and c["routed"]
        for k, v in c["dots"].items():
            t[k] += v
    return "\n".join(f"sm_{cc}: " + ", ".join(f"{k} {v}" for k, v in t.items()) for cc, t in sorted(per_target.items()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", nargs="+", type=int, default=[90, 80], choices=sorted(TARGETS),
                   help="compute capabilities to compile for (default 90 80)")
    p.add_argument("--only", choices=("optimizers", "hope"), help="one group of scenarios")
    p.add_argument("--match", help="only scenarios whose name contains this text")
    p.add_argument("--ci", action="store_true",
                   help="the CI scope (each scenario's ci targets; HOPE at its tiny preset); exit 1 on a defect")
    p.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    p.add_argument("--json", type=Path, help="write the report as JSON here")
    p.add_argument("--markdown", type=Path, help="write the table as markdown here")
    p.add_argument("--list", action="store_true", help="list the scenarios and exit")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")
    try:
        import triton  # noqa: F401
    except ImportError:
        print("triton_aot: Triton is not installed; nothing to compile", file=sys.stderr)
        return 2
    selected = [s for s in scenarios() if (args.only is None or s.group == args.only)
                and (args.match is None or args.match in s.name) and (not args.ci or bool(s.ci))]
    if args.list:
        print("\n".join(f"{s.name}{'' if s.routed else ' (probe)'}" for s in selected))
        return 0
    t0 = time.perf_counter()
    report = run(selected, args.targets, args.jobs, args.ci)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    report["triton"] = importlib.import_module("triton").__version__
    report["torch"] = torch.__version__
    scope = json.loads(SCOPE_FILE.read_text()) if SCOPE_FILE.exists() else {}
    problems = check(report, scope, full_scope=args.only is None and args.match is None)
    report["problems"] = problems
    table = format_table(report)
    print(table)
    print(f"\ntriton {report['triton']}, torch {report['torch']}, {len(selected)} scenarios, "
          f"{report['seconds']} s")
    print(summary(report))
    for n, count in report["scenarios"].items():
        if count == 0 and n not in report["scenario_errors"]:
            print(f"note: {n!r} launched no Triton kernel (the routing takes torch there)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str))
    if args.markdown:
        args.markdown.write_text(table + "\n\n" + summary(report) + "\n")
    for line in problems:
        print(f"DEFECT: {line}")
    return 1 if args.ci and problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
