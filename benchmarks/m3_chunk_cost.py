"""The cost of reading M3's chunk phase from the device: this tree's M3 against the M3 of an earlier commit (which
knew chunk ends from a host-side step count and orthogonalised the slow memory only there), timed round-robin in
one process on copies of the same parameters, so load hits both alike.

Prints, per parameter set, the mean and median step time of both over ``--steps`` steps (the mean covers the
chunk ends, where the earlier M3 did its second Newton–Schulz; the median is a step between them) and their
ratio.  Needs the repository's git history (``git show COMMIT:optimizers/m3.py``).

    python benchmarks/m3_chunk_cost.py --before 790488e --param-sets 1M-10 transformer-12M --steps 30
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

import deepopt
from deepopt.bench import PARAM_SETS

ROOT = Path(__file__).resolve().parent.parent


def optimizer_at(commit: str) -> type:
    """The ``M3`` class of ``optimizers/m3.py`` at ``commit``, imported against this tree's base class."""
    source = subprocess.run(["git", "show", f"{commit}:optimizers/m3.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    module = types.ModuleType("m3_before", f"M3 at {commit}")
    module.__package__ = "deepopt.optimizers"
    exec(compile(source, f"{commit}:optimizers/m3.py", "exec"), module.__dict__)
    return module.M3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="git commit holding the M3 to compare against")
    parser.add_argument("--param-sets", nargs="+", default=["1M-10"], choices=list(PARAM_SETS))
    parser.add_argument("--steps", type=int, default=30, help="timed steps each (default 30: three chunk ends)")
    parser.add_argument("--ns-dtype", default=None, choices=[None, "bfloat16", "float32"])
    args = parser.parse_args()
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    before = optimizer_at(args.before)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, M3 chunk 10, ns_dtype {args.ns_dtype}")
    print("| params | M3 now mean / median (ms) | M3 before mean / median (ms) | now/before mean | now/before median |")
    print("|---|---:|---:|---:|---:|")
    for name in args.param_sets:
        gen = torch.Generator().manual_seed(0)
        shapes = [s for s in PARAM_SETS[name]() if len(s) == 2]
        base = [torch.randn(s, generator=gen) * 0.02 for s in shapes]
        grads = [torch.randn(s, generator=gen) * 1e-3 for s in shapes]
        runs = {}
        for label, cls in (("now", deepopt.M3), ("before", before)):
            params = [b.clone().requires_grad_() for b in base]
            for p, g in zip(params, grads):
                p.grad = g.clone()
            runs[label] = cls(params, lr=1e-3, ns_dtype=args.ns_dtype)
        times = {label: [] for label in runs}
        for step in range(args.steps + 1):
            for label, opt in runs.items():
                t0 = time.perf_counter()
                opt.step()
                if step:  # the first step builds the state
                    times[label].append(time.perf_counter() - t0)
        mean = {k: 1e3 * statistics.fmean(v) for k, v in times.items()}
        median = {k: 1e3 * statistics.median(v) for k, v in times.items()}
        print(f"| {name} | {mean['now']:.1f} / {median['now']:.1f} | {mean['before']:.1f} / {median['before']:.1f} "
              f"| {mean['now'] / mean['before']:.2f} | {median['now'] / median['before']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
