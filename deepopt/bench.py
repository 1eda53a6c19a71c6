"""``deepopt bench``: median optimizer step time as a ratio to ``torch.optim.Adam`` in the same run.

Optimizers are timed round-robin (one step each, repeated), so background load hits every one alike,
and each reports its median step time over the repeats, divided by that of torch's fused Adam and of
torch's foreach Adam, and the number of aten ops one ``step()`` dispatches (a device-independent proxy for
kernel launches: a ``_foreach`` or fused op counts once, whatever the number of tensors).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import deepopt

from .checkpoint import atomic_save_json, atomic_write
from .runs import add_out_option, check_at_least, check_device, finish, prepare_out, progress_bar

# name -> shapes of the parameter tensors
PARAM_SETS: dict[str, Callable[[], list[tuple[int, ...]]]] = {
    "100k-10": lambda: [(100, 100)] * 10,
    "1M-10": lambda: [(316, 316)] * 10,
    "10M-10": lambda: [(1000, 1000)] * 10,
    "transformer-12M": lambda: [(512, 512)] * 16 + [(2048, 512), (512, 2048)] * 4,
    "gpt2-124M": lambda: gpt2_shapes(),
}


def gpt2_shapes(layers: int = 12, d: int = 768, vocab: int = 50304, context: int = 1024) -> list[tuple[int, ...]]:
    """The 148 parameter shapes of GPT-2 small as nanoGPT builds it (vocabulary padded to 50304, Linear
    weights as (out, in)): 124,475,904 parameters."""
    block = [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    return [(vocab, d), (context, d), *block * layers, (d,), (d,)]


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched while active, by overload name (``counter.total``, ``counter.ops``);
    the profiler's ``record_function`` markers are not ops and are not counted."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace != "profiler":  # torch.optim's record_function markers launch nothing
            self.ops[str(func)] = self.ops.get(str(func), 0) + 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())


@contextlib.contextmanager
def fake_cuda() -> Iterator[Any]:
    """A ``FakeTensorMode`` for tensors on ``cuda:0`` made with ``cuda_tensor`` (shapes, dtypes and the device, no
    memory: CUDA routing runs on a machine without a GPU); host-side CUDA calls that a CPU build of torch cannot
    make (pinning, stream-capture queries) are answered as on a GPU outside a capture."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(torch.Tensor, "pin_memory", lambda self, *a, **k: self))
        stack.enter_context(mock.patch.object(torch.cuda, "is_current_stream_capturing", lambda: False))
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")  # FakeTensor.data_ptr()'s deprecation: pointer tables read it
        stack.enter_context(mode)
        cuda_tensor(mode, (1,), torch.float32)  # the first fake CUDA tensor sets CUDA up for the mode (else a CPU
        yield mode                               # tensor's .to("cuda") asks for a real device)


def cuda_tensor(mode: Any, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A fake tensor on ``cuda:0`` in ``mode`` (``fake_cuda``)."""
    from torch._subclasses.fake_tensor import FakeTensor

    return FakeTensor(mode, torch.empty(shape, dtype=dtype, device="meta"), torch.device("cuda", 0))


def count_step_ops(opt: torch.optim.Optimizer) -> OpCounter:
    """The aten ops of one ``opt.step()``."""
    with OpCounter() as counter:
        opt.step()
    return counter

# label -> factory(params)
OPTIMIZERS: dict[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]] = {
    "torch Adam fused": lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True),
    "torch Adam foreach": lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=True),
    "torch AdamW fused": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.1, fused=True),
    "SGD": lambda ps: deepopt.SGD(ps, lr=1e-3),
    "Momentum": lambda ps: deepopt.Momentum(ps, lr=1e-3),
    "Adam": lambda ps: deepopt.Adam(ps, lr=1e-3),
    "AdamW": lambda ps: deepopt.AdamW(ps, lr=1e-3),
    "Adam fused=False": lambda ps: deepopt.Adam(ps, lr=1e-3, fused=False),
    "Momentum nesterov, Adam-preconditioned": lambda ps: deepopt.Momentum(ps, lr=1e-3, nesterov=True,
                                                                          preconditioner="adam"),
    "DeltaMomentum": lambda ps: deepopt.DeltaMomentum(ps, lr=1e-3),
    "DeltaMomentum keys=rows": lambda ps: deepopt.DeltaMomentum(ps, lr=1e-3, keys="rows"),
    "DeepMomentum h=16": lambda ps: deepopt.DeepMomentum(ps, lr=1e-3, hidden=16),
    "DeepMomentum h=4 relu": lambda ps: deepopt.DeepMomentum(ps, lr=1e-3, hidden=4, activation="relu"),
    "DeepMomentum Adam-preconditioned": lambda ps: deepopt.DeepMomentum(ps, lr=1e-3, preconditioner="adam",
                                                                        key_source="preconditioned"),
    # the shipped learned optimizer as a script written for AdamW builds it (fused kernel: deep_cpu / deep_kernels)
    "DeepMomentum shipped": lambda ps: deepopt.DeepMomentum.pretrained(ps, total_steps=10**6, weight_decay=0.1),
    "Muon (Momentum+NS)": lambda ps: deepopt.Momentum(ps, lr=1e-3, nesterov=True, nonlinearity="newton_schulz"),
    "Muon (Momentum+NS bf16)": lambda ps: deepopt.Momentum([p for p in ps if p.dim() == 2], lr=1e-3, nesterov=True,
                                                           nonlinearity="newton_schulz", ns_dtype="bfloat16"),
    # the 2-D parameters only, the ones torch.optim.Muon takes; "M3" iterates Newton–Schulz in bf16 as it does
    "torch Muon": lambda ps: torch.optim.Muon([p for p in ps if p.dim() == 2], lr=1e-3),
    "M3": lambda ps: deepopt.M3([p for p in ps if p.dim() == 2], lr=1e-3, ns_dtype="bfloat16"),
    "M3 fp32 NS": lambda ps: deepopt.M3([p for p in ps if p.dim() == 2], lr=1e-3),
}
REFERENCES = ("torch Adam fused", "torch Adam foreach")


def time_steps(param_set: str, optimizers: list[str], repeats: int, warmup: int,
               device: str) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Seconds per step of each optimizer, timed round-robin on its own copy of the same parameters, and
    the aten ops of one (warm) step of each."""
    gen = torch.Generator().manual_seed(0)
    shapes = PARAM_SETS[param_set]()
    base = [torch.randn(s, generator=gen) * 0.02 for s in shapes]
    grads = [torch.randn(s, generator=gen) * 1e-3 for s in shapes]
    runs = {}
    for name in optimizers:
        params = [b.clone().to(device).requires_grad_() for b in base]
        for p, g in zip(params, grads):
            p.grad = g.to(device)
        runs[name] = OPTIMIZERS[name](params)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in optimizers}
    for i in range(warmup + repeats):
        for name, opt in runs.items():
            sync()
            t0 = time.perf_counter()
            opt.step()
            sync()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    ops = {name: count_step_ops(opt).total for name, opt in runs.items()}
    return times, ops


def run(param_sets: list[str], optimizers: list[str], repeats: int = 15, warmup: int = 3,
        device: str = "cpu", progress: bool = True) -> list[dict]:
    names = list(dict.fromkeys([*REFERENCES, *optimizers]))
    rows = []
    for ps in progress_bar(param_sets, desc="bench", enabled=progress, unit="parameter set"):
        times, ops = time_steps(ps, names, repeats, warmup, device)
        med = {n: statistics.median(t) for n, t in times.items()}
        for n in names:
            rows.append({"params": ps, "optimizer": n, "median_ms": 1e3 * med[n], "aten_ops": ops[n],
                         "vs_fused_adam": med[n] / med["torch Adam fused"],
                         "vs_foreach_adam": med[n] / med["torch Adam foreach"]})
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| params | optimizer | median step (ms) | × fused Adam | × foreach Adam | aten ops/step |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['params']} | {r['optimizer']} | {r['median_ms']:.2f} | {r['vs_fused_adam']:.2f} "
                     f"| {r['vs_foreach_adam']:.2f} | {r['aten_ops']} |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    smoke = {"param_sets": ["100k-10"], "repeats": 3, "warmup": 1}  # --smoke sizes; explicit options win
    default = {"param_sets": ["1M-10", "10M-10", "transformer-12M"], "repeats": 15, "warmup": 3}
    for key, value in (smoke if args.smoke else default).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    check_at_least(args, 1, "repeats", "threads")
    check_at_least(args, 0, "warmup")
    check_device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = args.tf32 or torch.backends.cuda.matmul.allow_tf32
    out = prepare_out(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rows = run(args.param_sets, args.optimizers, args.repeats, args.warmup, args.device, progress=True)
    table = format_table(rows)
    print(f"device: {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}"
          f"{', TF32 matmuls allowed' if args.tf32 else ''}")
    print(table)
    atomic_save_json({"device": args.device, "torch": torch.__version__, "threads": torch.get_num_threads(),
                      "tf32": args.tf32,
                      "repeats": args.repeats, "warmup": args.warmup, "rows": rows}, out / "bench.json")
    atomic_write(out / "bench.md", lambda tmp: Path(tmp).write_text(table + "\n"))
    finish(out, files=[("bench.md", "the table above"), ("bench.json", "the same with the settings")])
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="optimizer step time as a ratio to torch.optim.Adam",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--param-sets", nargs="+", choices=list(PARAM_SETS),
                   help="parameter sets to time (default: 1M-10 10M-10 transformer-12M; --smoke: 100k-10)")
    p.add_argument("--optimizers", nargs="+", default=[n for n in OPTIMIZERS if n not in REFERENCES],
                   choices=list(OPTIMIZERS), help="optimizers to time besides the two torch Adam references")
    p.add_argument("--repeats", type=int, help="timed steps per optimizer, >= 1 (default 15; --smoke: 3)")
    p.add_argument("--warmup", type=int, help="untimed steps first, >= 0 (default 3; --smoke: 1)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--smoke", action="store_true",
                   help="100k parameters, 3 repeats, 1 warm-up: a quick check (explicit options win)")
    p.add_argument("--tf32", action="store_true",
                   help="allow TF32 matmuls (torch.backends.cuda.matmul.allow_tf32), as training scripts on GPUs do: "
                        "the fp32 products of torch and of deepopt's kernels then run on tensor cores")
    add_out_option(p, "bench", ("bench.json", "bench.md"))
    p.set_defaults(func=main)
