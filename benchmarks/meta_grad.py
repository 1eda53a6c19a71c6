"""Wall time and peak memory of one meta-gradient: torch.func engine vs ``higher``.

One meta-gradient = K inner steps of Adam (lr meta-learned, ``lr = exp(r)``) on a digits MLP
(64 → 64 → 64 → 10, tanh, batch 128, float32) from fixed initial weights, outer loss = mean inner
loss, then ∂F/∂r.  Variants, all in this run, same task and batches:

    torch.func          meta_train's engine (functional_call + torch.func.grad + the pure adam rule)
    higher+torch Adam   higher.innerloop_ctx with torch.optim.Adam (higher's DifferentiableAdam)
    higher+deepopt Adam higher.innerloop_ctx with deepopt.Adam (meta_train's registered twin)
    (+ DeepMomentum rows: torch.func vs higher+deepopt DeepMomentum, learning θ₀, α, η, lr)
    torch.func vmap×T   the engine on a ``TaskStack`` of ``--tasks`` T digits MLPs of this architecture
                        (different weights and batches) under ``vmap``, reported per task (time / T;
                        peak memory is the whole stack's); ``higher`` can only loop over tasks

The elementwise rules (Adam here) step all of a task's tensors as one flat vector (``FlatParams``).

Time: median of ``--repeats`` calls after one warm-up, ``torch.set_num_threads(--threads)``.
Peak memory: the largest number of bytes the torch CPU allocator holds live at once during one call,
above what was live before it, from ``torch.profiler`` memory events (``profile_memory=True``) summed
in time order; a separate call from the timed ones.  Checkpointing rows: torch.func with
``Backprop(checkpoint_every=√K)`` at K and 4K (default 20 and 80), vs the full graph.

    python benchmarks/meta_grad.py [--repeats 5] [--threads 1] [--json out.json] [--smoke]
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
from collections.abc import Callable

import higher
import torch
from deepopt.meta_train import Backprop, InnerState, MetaParams, Unroll, higher_unroll_loss
from deepopt.meta_train.tasks import Task, TaskStack, mlp_task
from torch.profiler import ProfilerActivity, profile

import deepopt
from deepopt.checkpoint import atomic_save_json


def digits_task(seed: int = 0) -> Task:
    return mlp_task("bench_digits", "digits", (64, 64), "tanh", 128, seed=seed)


def torch_func_grad(meta: MetaParams, task: Task, k: int, checkpoint_every: int = 0) -> Callable[[], None]:
    unroll, estimator = Unroll(meta, task, k), Backprop(checkpoint_every)
    return lambda: estimator(unroll, InnerState.fresh(task))


def higher_deepopt_grad(meta: MetaParams, task: Task, k: int) -> Callable[[], None]:
    unroll = Unroll(meta, task, k)

    def run() -> None:
        raw = dict(meta.raw)
        torch.autograd.grad(higher_unroll_loss(unroll, raw), list(raw.values()))

    return run


def higher_torch_adam_grad(meta: MetaParams, task: Task, k: int) -> Callable[[], None]:
    def run() -> None:
        raw = meta.raw["lr"]
        model = copy.deepcopy(task.model)
        opt = torch.optim.Adam(model.parameters(), lr=float(meta.static["lr"]))
        total = 0.0
        with higher.innerloop_ctx(model, opt, override={"lr": [raw.exp()]}) as (fmodel, diffopt):
            for t in range(k):
                x, y = task.train_batch(t)
                loss = task.criterion(fmodel(x), y)
                diffopt.step(loss)
                total = total + loss
        torch.autograd.grad(total / k, [raw])

    return run


def wall_time(fn: Callable[[], None], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_bytes(fn: Callable[[], None]) -> int:
    """Peak live bytes of the torch CPU allocator during ``fn`` (profiler memory events, time order)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    live = peak = 0
    for _, n in events:
        live += n
        peak = max(peak, live)
    return peak


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per variant (median reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--k", type=int, default=20, help="inner steps K of the compared unroll")
    parser.add_argument("--tasks", type=int, default=8, help="tasks T of the vmapped rows")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--smoke", action="store_true", help="K = 4, 1 repeat, 2 tasks: seconds, for CI")
    args = parser.parse_args(argv)
    if args.smoke:
        args.k, args.repeats, args.tasks = 4, 1, 2
    torch.set_num_threads(args.threads)
    task, k = digits_task(), args.k
    stack = TaskStack(tuple(digits_task(seed) for seed in range(args.tasks)))
    adam = MetaParams("adam", learn=("lr",), lr=0.01)
    dmgd = MetaParams("deep_momentum", lr=0.03)
    variants = {
        "adam torch.func": torch_func_grad(adam, task, k),
        "adam higher+torch.optim.Adam": higher_torch_adam_grad(adam, task, k),
        "adam higher+deepopt.Adam": higher_deepopt_grad(adam, task, k),
        f"adam torch.func vmap×{args.tasks} (per task)": torch_func_grad(adam, stack, k),
        "deep_momentum torch.func": torch_func_grad(dmgd, task, k),
        "deep_momentum higher+deepopt.DeepMomentum": higher_deepopt_grad(dmgd, task, k),
        f"deep_momentum torch.func vmap×{args.tasks} (per task)": torch_func_grad(dmgd, stack, k),
    }
    rows = {
        name: {"seconds": wall_time(fn, args.repeats) / (args.tasks if "vmap" in name else 1),
               "peak_mb": peak_bytes(fn) / 2**20}
        for name, fn in variants.items()
    }
    for rule in ("adam", "deep_momentum"):
        ref = rows[f"{rule} torch.func"]
        for name, row in rows.items():
            if name.startswith(rule):
                row["time_vs_torch_func"] = row["seconds"] / ref["seconds"]
                row["memory_vs_torch_func"] = row["peak_mb"] / ref["peak_mb"]
    print(
        f"one meta-gradient, K={k}, digits MLP 64-64-64-10, float32, {args.threads} thread(s), "
        f"median of {args.repeats}"
    )
    print(f"{'variant':48s} {'time (s)':>9s} {'× torch.func':>13s} {'peak MiB':>9s} {'× torch.func':>13s}")
    for name, r in rows.items():
        print(
            f"{name:48s} {r['seconds']:9.4f} {r['time_vs_torch_func']:13.2f} {r['peak_mb']:9.2f} "
            f"{r['memory_vs_torch_func']:13.2f}"
        )
    for rule, ref in (("adam", "higher+torch.optim.Adam"), ("deep_momentum", "higher+deepopt.DeepMomentum")):
        h = rows[f"{rule} {ref}"]["seconds"]
        print(f"{rule}: torch.func is {h / rows[f'{rule} torch.func']['seconds']:.2f}x as fast as {ref} on one "
              f"task, {h / rows[f'{rule} torch.func vmap×{args.tasks} (per task)']['seconds']:.2f}x per task "
              f"vmapped over {args.tasks}")

    ck = {}
    short, long = k, 4 * k
    for kk in (short, long):
        every = round(math.sqrt(kk))
        ck[kk] = {
            "full_mb": peak_bytes(torch_func_grad(dmgd, task, kk)) / 2**20,
            "checkpointed_mb": peak_bytes(torch_func_grad(dmgd, task, kk, every)) / 2**20,
            "checkpoint_every": every,
            "checkpointed_seconds": wall_time(torch_func_grad(dmgd, task, kk, every), 1),
            "full_seconds": wall_time(torch_func_grad(dmgd, task, kk), 1),
        }
    print("\nDeepMomentum torch.func, peak MiB (checkpoint_every = round(√K)):")
    for kk, r in ck.items():
        print(
            f"K={kk:3d}: full graph {r['full_mb']:8.2f}   checkpointed {r['checkpointed_mb']:8.2f}   "
            f"time full {r['full_seconds']:.3f}s / checkpointed {r['checkpointed_seconds']:.3f}s"
        )
    print(
        f"K={long} vs K={short} peak: full graph ×{ck[long]['full_mb'] / ck[short]['full_mb']:.2f}, "
        f"checkpointed ×{ck[long]['checkpointed_mb'] / ck[short]['checkpointed_mb']:.2f} (K ×4)"
    )
    if args.json:
        atomic_save_json(
            {"k": k, "threads": args.threads, "variants": rows, "checkpointing": {str(kk): v for kk, v in ck.items()},
             "torch": torch.__version__, "deepopt": deepopt.__version__},
            args.json,
        )


if __name__ == "__main__":
    main()
