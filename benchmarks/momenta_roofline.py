"""How fast can the shipped learned optimizer's fused CPU step be?  Its kernel (``deep_cpu.momenta_step_``) at
several memory sizes, and what-if versions of its feature map, against torch's fused AdamW on the same shapes.

    python benchmarks/momenta_roofline.py [--param-set transformer-12M] [--repeats 9] [--threads 1]

Rows: the kernel at hidden H ∈ {8, 4, 2} and J ∈ {2, 1} extra time scales, with tanh features (the shipped
optimizer is tanh, H = 8, J = 2) and softsign features Φ = z/(1 + |z|) (an absolute value, an add and a reciprocal
where tanh takes an exponential): every such row is a configuration ``DeepMomentum(keys="momenta")`` runs on this
kernel.  And ``linear``, a what-if no class runs: the softsign kernel with its feature line replaced by Φ = z, so
what is left is the memory's multiply-adds and the memory traffic.

Each row prints its median step (round-robin rounds, the first dropped) and its ratio to fused AdamW measured in
the same run, beside the ratio of bytes moved per coordinate: the kernel reads p, g, m, v and the J traces and
writes all but g, (7 + 2J)·4 bytes, against fused AdamW's 7·4, so no kernel with this state beats
(7 + 2J)/7 of AdamW where AdamW runs at memory speed.  Kernel calls only: the class's ``step()`` adds its
schedule math (``benchmarks/momenta_step.py`` times that).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from deepopt.optimizers import deep_cpu

from deepopt.bench import PARAM_SETS

# the softsign kernel's feature line (its z is W₂k), and the what-if that replaces it
SOFTSIGN_FEATURES = "static inline vc features_c(vc z) { return z * recip_c(1.0f + (vc)((vci)z & 0x7fffffff)); }"
LINEAR_FEATURES = "static inline vc features_c(vc z) { return z; }"
ACTIVATIONS = ("tanh", "softsign", "linear")


def variant_library(activation: str, hidden: int, scales: int):
    """The momenta kernel for ``hidden``, ``scales`` and features ``activation`` (``linear``: the softsign
    kernel with its feature line replaced by ``LINEAR_FEATURES``)."""
    if activation != "linear":
        return deep_cpu._momenta_library(hidden, scales, activation)
    source = deep_cpu.SOURCE
    if SOFTSIGN_FEATURES not in source:
        raise SystemExit("momenta_roofline.py: the kernel's softsign line changed; update SOFTSIGN_FEATURES")
    deep_cpu.SOURCE = source.replace(SOFTSIGN_FEATURES, LINEAR_FEATURES)
    deep_cpu._momenta_library.cache_clear()
    try:
        return deep_cpu._momenta_library(hidden, scales, "softsign")
    finally:
        deep_cpu.SOURCE = source
        deep_cpu._momenta_library.cache_clear()


@contextmanager
def routed_to(lib) -> Iterator[None]:
    """``deep_cpu.momenta_step_`` runs ``lib`` inside the block (it looks its library up by shape and features,
    so ``lib``'s features are the ones that run, whatever ``activation`` it is passed)."""
    shipped = deep_cpu._momenta_library
    deep_cpu._momenta_library = lambda *shape: lib
    try:
        yield
    finally:
        deep_cpu._momenta_library = shipped


def kernel_step(activation: str, hidden: int, scales: int, params: list[torch.Tensor], grads: list[torch.Tensor]):
    """A closure running one kernel step over ``params`` with fresh state (W₁, W₂ random, v = 1)."""
    lib = variant_library(activation, hidden, scales)
    if lib is None:
        raise SystemExit("momenta_roofline.py: the CPU kernel could not be built (no C compiler?)")
    gen = torch.Generator().manual_seed(0)
    state = dict(bufs=[torch.zeros_like(p) for p in params], exp_avg_sqs=[torch.ones_like(p) for p in params],
                 timescale_bufs=[torch.zeros((scales, *p.shape)) for p in params],
                 w1=[0.1 * torch.randn(1, hidden, generator=gen) for _ in params],
                 w2=[torch.randn(hidden, 2 + scales, generator=gen) for _ in params])
    count = len(params)

    def step() -> None:
        with routed_to(lib):
            deep_cpu.momenta_step_(params, grads, **state, w1_0=torch.zeros(1, hidden), lr=torch.full((count,), 1e-6),
                                   bias_correction2=torch.ones(count), timescales=torch.linspace(0.6, 0.98, scales),
                                   alpha=0.87, beta2=0.9, eps=1e-8, eta=0.13, weight_decay=0.1, threads=1)
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--param-set", default="transformer-12M", choices=sorted(PARAM_SETS))
    parser.add_argument("--repeats", type=int, default=9, help="round-robin rounds, ≥ 2 (default 9)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for fused AdamW (the kernel runs on 1)")
    args = parser.parse_args()
    if args.repeats < 2:
        parser.error("--repeats: at least 2 (the first round is dropped)")
    if args.threads < 1:
        parser.error("--threads: at least 1")
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    shapes = PARAM_SETS[args.param_set]()
    params = [torch.randn(s, generator=gen) for s in shapes]
    grads = [torch.randn(s, generator=gen) for s in shapes]
    adamw = torch.optim.AdamW([torch.nn.Parameter(p.clone()) for p in params], lr=1e-6, weight_decay=0.1, fused=True)
    for p, g in zip(adamw.param_groups[0]["params"], grads):
        p.grad = g.clone()
    steps = {("torch AdamW fused", 0, 0): adamw.step}
    for activation in ACTIVATIONS:
        for hidden in (8, 4, 2):
            for scales in (2, 1):
                steps[(activation, hidden, scales)] = kernel_step(activation, hidden, scales, params, grads)
    times: dict = {key: [] for key in steps}
    for _ in range(args.repeats):
        for key, step in steps.items():
            start = time.perf_counter()
            step()
            times[key].append(time.perf_counter() - start)
    medians = {key: statistics.median(ts[1:]) for key, ts in times.items()}
    reference = medians[("torch AdamW fused", 0, 0)]
    n = sum(p.numel() for p in params)
    print(f"{args.param_set} ({n / 1e6:.1f}M parameters, {len(params)} tensors), kernel on 1 thread, AdamW on "
          f"{args.threads}, median of {args.repeats - 1} round-robin steps")
    print(f"  {'features':10s} {'H':>2s} {'J':>2s} {'ms':>9s} {'× AdamW':>8s} {'bytes × AdamW':>14s}")
    for (activation, hidden, scales), median in medians.items():
        bytes_ratio = f"{(7 + 2 * scales) / 7:14.2f}" if hidden else f"{1:14.2f}"
        print(f"  {activation:10s} {hidden or '':>2} {scales or '':>2} {median * 1e3:9.2f} {median / reference:8.2f} "
              f"{bytes_ratio}")


if __name__ == "__main__":
    main()
