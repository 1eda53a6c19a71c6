"""Tuned optimizer comparison: every optimizer gets 5 learning rates around its recommended one, the best
(validation loss, seed 0) is run at 3 seeds; final validation loss, mean and 95% CI, on a digits MLP, a
digits CNN, a char-level Transformer++ LM and the HOPE LM (standard-library bytes).

    python benchmarks/compare.py --threads 1 --out runs/compare        # CPU sizes (~25 min on one core)
    python benchmarks/compare.py --device cuda --out runs/compare-cuda  # nanoGPT-sized LMs
    python benchmarks/compare.py --smoke                                 # seconds (CI)

Same options as ``deepopt compare``.
"""

import sys

from deepopt.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["compare", *sys.argv[1:]]))
