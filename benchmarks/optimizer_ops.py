"""aten ops dispatched by one ``step()`` of every ``deepopt bench`` optimizer over GPT-2 small's 148 parameter
shapes and over its 2-layer cut (28 tensors), with parameters on the ``meta`` device: no memory is allocated
and no kernel runs, but the ops are those the multi-tensor paths dispatch on an accelerator (a ``_foreach``
or fused op counts once), and any host read of device data would fail.  torch's fused and foreach Adam are
counted the same way for reference.

    python benchmarks/optimizer_ops.py
"""

from __future__ import annotations

import torch

from deepopt.bench import OPTIMIZERS, count_step_ops, gpt2_shapes


def count(name: str, shapes: list[tuple[int, ...]]) -> int | str:
    params = [torch.empty(s, device="meta", requires_grad=True) for s in shapes]
    for p in params:
        p.grad = torch.empty_like(p)
    try:
        opt = OPTIMIZERS[name](params)
        opt.step()  # the first step builds the state
        return count_step_ops(opt).total
    except (RuntimeError, NotImplementedError) as err:  # an op without a meta kernel
        return f"n/a ({type(err).__name__})"


def main() -> None:
    print("| optimizer | aten ops per step, 148 tensors (GPT-2 small) | 28 tensors (2 layers) |")
    print("|---|---:|---:|")
    for name in OPTIMIZERS:
        print(f"| {name} | {count(name, gpt2_shapes())} | {count(name, gpt2_shapes(layers=2))} |")


if __name__ == "__main__":
    main()
