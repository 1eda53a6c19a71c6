"""Step time of the shipped learned optimizer's fused kernel (DeepMomentum ``keys="momenta"``: Adam preconditioner,
momenta keys at 2 time scales, hidden 8, tanh, W₂ fixed, decoupled weight decay) against torch's fused AdamW, timed
round-robin in the same run on the same parameter shapes (``deepopt bench``'s sets).

    python benchmarks/momenta_step.py [--param-sets transformer-12M gpt2-124M] [--device cpu|cuda] [--repeats 15]

On the CPU the C kernel (``deep_cpu.momenta_step_``) runs, on CUDA the Triton kernels (``deep_kernels``).  The
step includes what the optimizer computes per step besides the kernel: the per-tensor ``lr_t`` and ``1 − β₂ᵗ``
(0-dim device math over a stacked step count).  Until the rule's ``keys="momenta"`` is merged into DeepMomentum
(helper ``learned``), this times the kernel path the class will route to.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from deepopt.optimizers import deep_cpu, deep_kernels

from deepopt.bench import PARAM_SETS

H, TIMESCALES = 8, (0.5, 0.99)


class FusedMomenta:
    """The state and one fused step of the momenta layout over a list of parameters (equations:
    ``deep_cpu.momenta_step_``)."""

    def __init__(self, params: list[torch.Tensor], lr: float = 1e-3, weight_decay: float = 0.1) -> None:
        gen = torch.Generator().manual_seed(0)
        self.params, self.lr, self.wd = params, lr, weight_decay
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.e = [p.new_zeros(len(TIMESCALES), *p.shape) for p in params]
        w2 = torch.randn(H, 2 + len(TIMESCALES), generator=gen).to(params[0].device)
        self.w1 = [p.new_zeros(1, H) for p in params]
        self.w2 = [w2.clone() for _ in params]
        self.w1_0 = params[0].new_zeros(1, H)
        self.steps = params[0].new_zeros(len(params))
        self.gammas = torch.tensor(TIMESCALES, device=params[0].device)

    def step(self) -> None:
        self.steps += 1
        lr = self.lr * torch.clamp(1 - (self.steps - 1) / 1000, min=1e-3)  # a learned schedule's shape: lr_t
        bc2 = 1 - 0.95 ** self.steps
        grads = [p.grad for p in self.params]
        step = deep_kernels.momenta_step_ if self.params[0].is_cuda else deep_cpu.momenta_step_
        step(self.params, grads, self.m, self.v, self.e, self.w1, self.w2, self.w1_0, lr, bc2, self.gammas, 0.9,
             0.95, 1e-8, 0.1, self.wd)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--param-sets", nargs="+", default=["transformer-12M"], choices=list(PARAM_SETS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args(argv)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    for name in args.param_sets:
        gen = torch.Generator().manual_seed(0)
        shapes = PARAM_SETS[name]()
        base = [torch.randn(s, generator=gen) * 0.02 for s in shapes]
        runs = {}
        for label in ("torch AdamW fused", "shipped (fused momenta)"):
            params = [b.clone().to(args.device).requires_grad_() for b in base]
            for q in params:
                q.grad = torch.randn(q.shape, generator=gen).to(args.device) * 1e-3
            runs[label] = (torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1, fused=True) if label.startswith("torch")
                           else FusedMomenta(params))
        times = {k: [] for k in runs}
        with torch.no_grad():
            for i in range(args.warmup + args.repeats):
                for label, opt in runs.items():
                    sync()
                    t0 = time.perf_counter()
                    opt.step()
                    sync()
                    if i >= args.warmup:
                        times[label].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        ref = med["torch AdamW fused"]
        print(f"{name} on {args.device} ({torch.get_num_threads()} threads):")
        for k, v in med.items():
            print(f"  {k:<26} {1e3 * v:9.2f} ms   {v / ref:5.2f}x torch AdamW fused")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
