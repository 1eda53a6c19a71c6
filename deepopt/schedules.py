"""The learning-rate schedule the studies give their baselines: linear warm-up, then cosine decay.

    factor(t) = (t + 1)/W                                        for t < W
              = floor + (1 − floor)·½(1 + cos(π·min(1, (t − W)/(N − W))))    after

for the step ``t`` about to be taken (0-based) of a run of ``N`` steps with ``W`` warm-up steps; the lr is
``base · factor(t)``.  ``deepopt evaluate`` and ``deepopt compare`` decay to 0 (``floor=0``) over 5% warm-up, as
AdamW scripts do; ``deepopt hope train`` to 10% of its lr (``floor=0.1``) or holds it (``cosine=False``).
"""

from __future__ import annotations

import math
from typing import Any

WARMUP_FRACTION = 0.05


def warmup_cosine_factor(step: int, steps: int, warmup: int, floor: float = 0.0, cosine: bool = True) -> float:
    """The multiple of the base lr at 0-based ``step`` (above); ``cosine=False`` holds 1 after the warm-up."""
    if step < warmup:
        return (step + 1) / warmup
    if not cosine:
        return 1.0
    frac = min(1.0, (step - warmup) / max(1, steps - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * frac))


def warmup_cosine(optimizer: Any, steps: int, warmup_fraction: float = WARMUP_FRACTION) -> Any:
    """A ``LambdaLR`` on ``optimizer`` (each group's lr as its base): ``round(warmup_fraction·steps)`` (≥ 1)
    warm-up steps, then cosine to 0 at step ``steps``; call its ``step()`` after each ``optimizer.step()``."""
    import torch

    warmup = max(1, round(warmup_fraction * steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: warmup_cosine_factor(t, steps, warmup))
