"""DeepMomentum against Momentum (μ 0.9) on the small digits CNN, at the same learning rates.

    python benchmarks/deep_momentum_cnn.py [--steps 300] [--lrs 0.003 0.01 0.03 0.1 0.3] [--smoke]

Prints, per lr, the held-out accuracy and final training loss of Momentum and of DeepMomentum (dot and l2
objectives) trained from the same weights on the same batches, and DeepMomentum's loss as a ratio to Momentum's.
"""

from __future__ import annotations

import argparse

import torch

import deepopt
from deepopt.data import digits_cnn, fit_digits


def cnn_run(make, steps: int, seed: int = 0) -> tuple[float, float]:
    """(test accuracy, full training loss) of the digits CNN after ``steps`` minibatch steps."""
    model = digits_cnn(seed)
    return fit_digits(model, make(model.parameters()), steps, seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.003, 0.01, 0.03, 0.1, 0.3])
    parser.add_argument("--smoke", action="store_true", help="20 steps at one lr")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.lrs = 20, [0.03]
    torch.set_num_threads(1)
    print("| lr | Momentum acc / loss | DeepMomentum dot acc / loss | DeepMomentum l2 acc / loss "
          "| dot loss ÷ Momentum's |")
    print("|---|---|---|---|---:|")
    for lr in args.lrs:
        mom = cnn_run(lambda p, lr=lr: deepopt.Momentum(p, lr=lr, momentum=0.9), args.steps)
        dot = cnn_run(lambda p, lr=lr: deepopt.DeepMomentum(p, lr=lr), args.steps)
        l2 = cnn_run(lambda p, lr=lr: deepopt.DeepMomentum(p, lr=lr, objective="l2"), args.steps)
        cells = " | ".join(f"{a:.3f} / {b:.4f}" for a, b in (mom, dot, l2))
        print(f"| {lr} | {cells} | {dot[1] / mom[1]:.2f} |")


if __name__ == "__main__":
    main()
