"""Momentum, a vector memory trained on −⟨m, g⟩ (see ``deepopt.rules.momentum``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from deepopt.rules import momentum

from .base import MemoryOptimizer


class Momentum(MemoryOptimizer):
    """Heavy-ball / Nesterov momentum, optionally preconditioned and orthogonalised::

        g ← g + wd·W;   m ← μ·m + P g;   u ← P g + μ·m if nesterov else m;   W ← W − lr·σ(u)

    With the defaults it equals ``torch.optim.SGD(lr, momentum=μ, nesterov=…, weight_decay=wd)``;
    ``nesterov=True, nonlinearity="newton_schulz"`` is Muon.  Further options (keywords):
    ``decoupled_weight_decay``, ``preconditioner`` ("identity" | "adam" with ``beta2``, ``eps``),
    ``nonlinearity`` (None | "newton_schulz"), ``foreach``, ``nonfinite``.
    """

    _fast_path_takes_dtensors = True
    rule = momentum

    def __init__(self, params: Any, lr: float = 1e-3, momentum: float = 0.9, nesterov: bool = False,
                 weight_decay: float = 0.0, **options: Any) -> None:
        super().__init__(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                         **options)

    def _fast_step(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> bool:
        if group["preconditioner"] != "identity" or group["nonlinearity"] is not None or isinstance(
            group["lr"], Tensor
        ):
            return False
        lr, mu = group["lr"], group["momentum"]
        bufs = [self.state[p]["momentum_buffer"] for p in params]
        grads = self._foreach_weight_decay(group, params, grads)
        torch._foreach_mul_(bufs, mu)
        torch._foreach_add_(bufs, grads)
        direction = torch._foreach_add(grads, bufs, alpha=mu) if group["nesterov"] else bufs
        torch._foreach_add_(params, direction, alpha=-lr)
        return True
