"""Median optimizer step time of every deepopt optimizer as a ratio to torch.optim.Adam (fused and
foreach), for 1M and 10M fp32 parameters in 10 tensors and a transformer-shaped set of 2-D weights.

    python benchmarks/optimizer_step.py [--device cuda] [--repeats 15]

Same options as ``deepopt bench``.
"""

import sys

from deepopt.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["bench", *sys.argv[1:]]))
