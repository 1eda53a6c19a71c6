"""Step time of the shipped learned optimizer (``DeepMomentum.pretrained``: ``keys="momenta"``, Adam preconditioner,
momenta keys at 2 time scales, hidden 8, tanh, W₂ fixed, decoupled weight decay, learned lr schedule) against torch's
fused AdamW, on the same parameter shapes (``deepopt bench``'s sets), timed round-robin in the same run; and
``dmgd-general``, the same recipe at a fixed lr (its kernels do not read W₀ nor sum ‖u‖², ‖W − W₀‖² per tensor as
the default's ``lr_adapt="dog"`` does).

    python benchmarks/momenta_step.py [--param-sets transformer-12M gpt2-124M] [--device cpu|cuda] [--repeats 15]
                                      [--threads 1]

The shipped optimizer is the class as a user builds it (``DeepMomentum.pretrained(params, total_steps=...,
weight_decay=0.1)``), so its step includes everything ``step()`` does: the per-tensor ``lr_t`` of the learned
schedule and Adam's ``1 − β₂ᵗ`` (device math over the stacked step counters), then the fused kernel it routes to
(``deep_cpu.momenta_step_`` on the CPU, ``deep_kernels.momenta_step_`` on CUDA; the route is checked before
timing).  "the same, torch path" is that optimizer with the route off (its multi-tensor torch path).  All take
``weight_decay=0.1``; each step is timed alone and the medians over ``--repeats`` round-robin rounds are compared,
so background load hits all alike.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from deepopt.optimizers import deep_cpu, deep_kernels, deep_momentum

import deepopt
from deepopt.bench import PARAM_SETS
from deepopt.pretrained import DEFAULT

REFERENCE, SHIPPED, TORCH_PATH = "torch AdamW fused", "DeepMomentum.pretrained", "  the same, torch path"
FIXED_LR = "  dmgd-general (fixed lr)"


def shipped(params: list[torch.Tensor], name: str = DEFAULT) -> torch.optim.Optimizer:
    # total_steps past the run: the schedule is on (lr_t per tensor) and the horizon warning stays quiet
    return deepopt.DeepMomentum.from_pretrained(name, params, total_steps=10**6, weight_decay=0.1)


class UnroutedStep:
    """The shipped optimizer stepped with its kernel route off: the multi-tensor torch path it takes without the
    fused kernels (what the route replaced)."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        self.opt = shipped(params)

    def step(self) -> None:
        route = deep_momentum._momenta_kernel
        deep_momentum._momenta_kernel = lambda *args: None
        try:
            self.opt.step()
        finally:
            deep_momentum._momenta_kernel = route


OPTIMIZERS = {
    REFERENCE: lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.1, fused=True),
    "torch AdamW foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.1, foreach=True),
    SHIPPED: shipped,
    TORCH_PATH: UnroutedStep,
    FIXED_LR: lambda ps: shipped(ps, "dmgd-general"),
}


def check_route(opt: torch.optim.Optimizer, device: str) -> None:
    """Fails unless one step of the shipped optimizer calls its fused kernel (a spy around the real function)."""
    module = deep_kernels if device.startswith("cuda") else deep_cpu
    real, calls = module.momenta_step_, []

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    module.momenta_step_ = spy
    try:
        opt.step()
    finally:
        module.momenta_step_ = real
    if not calls:
        raise SystemExit(f"the shipped optimizer did not take the fused kernel on {device} (no C compiler/Triton?)")


def kernel_team(opt: torch.optim.Optimizer, device: str) -> str:
    """On the CPU, the threads the shipped optimizer's kernel runs on (``deep_cpu.team_kind``)."""
    if device.startswith("cuda"):
        return ""
    group = opt.param_groups[0]
    lib = deep_cpu._momenta_library(group["hidden"], len(group["timescales"]), group["activation"], True)
    return f" (kernel: {deep_cpu.team_kind(lib)})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--param-sets", nargs="+", default=["transformer-12M"], choices=list(PARAM_SETS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (both optimizers; default torch's)")
    args = p.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    for name in args.param_sets:
        gen = torch.Generator().manual_seed(0)
        shapes = PARAM_SETS[name]()
        base = [torch.randn(s, generator=gen) * 0.02 for s in shapes]
        grads = [torch.randn(s, generator=gen) * 1e-3 for s in shapes]
        runs = {}
        for label, make in OPTIMIZERS.items():
            params = [b.clone().to(args.device).requires_grad_() for b in base]
            for q, g in zip(params, grads):
                q.grad = g.to(args.device)
            runs[label] = make(params)
        check_route(runs[SHIPPED], args.device)
        check_route(runs[FIXED_LR], args.device)
        times = {k: [] for k in runs}
        for i in range(args.warmup + args.repeats):
            for label, opt in runs.items():
                sync()
                t0 = time.perf_counter()
                opt.step()
                sync()
                if i >= args.warmup:
                    times[label].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        ref = med[REFERENCE]
        print(f"{name} ({sum(b.numel() for b in base) / 1e6:.1f}M parameters, {len(base)} tensors) on {args.device}, "
              f"{torch.get_num_threads()} threads{kernel_team(runs[SHIPPED], args.device)}, median of {args.repeats} "
              "round-robin steps:")
        for k, v in med.items():
            print(f"  {k:<26} {1e3 * v:9.2f} ms   {v / ref:5.2f}x {REFERENCE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
