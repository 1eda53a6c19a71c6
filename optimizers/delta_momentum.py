"""DeltaMomentum: momentum as an ℓ2-regression memory, updated by the delta rule
(see ``deepopt.rules.delta``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from deepopt.rules import delta_momentum

from .base import MemoryOptimizer


class DeltaMomentum(MemoryOptimizer):
    """Delta-rule momentum (Nested Learning Eq. 21–22 / 48–49), keys = normalized gradients::

        m ← α·m − β·⟨m, k̂⟩·k̂ + P g,  k̂ = g/‖g‖;     W ← W − lr·σ(m)

    ``momentum`` is α, ``beta`` the erasure strength (0 ≤ β ≤ 1 + α; β = 0 is ``Momentum``).
    ``keys="rows"`` uses the rows of 2-D gradients as keys, ``m(αI − βK̂ᵀK̂)``.  Further options:
    ``weight_decay``, ``decoupled_weight_decay``, ``preconditioner`` ("identity" | "adam"),
    ``nonlinearity`` (None | "newton_schulz"), ``foreach``, ``nonfinite``.
    """

    rule = delta_momentum

    def __init__(self, params: Any, lr: float = 1e-3, momentum: float = 0.9, beta: float = 0.5,
                 keys: str = "tensor", weight_decay: float = 0.0, **options: Any) -> None:
        super().__init__(params, lr=lr, momentum=momentum, beta=beta, keys=keys, weight_decay=weight_decay,
                         **options)

    def _fast_step(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> bool:
        """``m ← α m + c·g`` with ``c = 1 − β⟨m, g⟩/‖g‖²`` per tensor (the ``keys="tensor"`` rule)."""
        if (group["keys"] != "tensor" or group["preconditioner"] != "identity"
                or group["nonlinearity"] is not None or isinstance(group["lr"], Tensor)):
            return False
        lr, alpha, beta = group["lr"], group["momentum"], group["beta"]
        bufs = [self.state[p]["momentum_buffer"] for p in params]
        grads = self._foreach_weight_decay(group, params, grads)
        flat = [(m.reshape(-1), g.reshape(-1)) for m, g in zip(bufs, grads)]
        dots = torch.stack([torch.dot(m, g).double() for m, g in flat])
        sq = torch.stack([torch.dot(g, g).double() for _, g in flat])
        coefs = (1 - beta * dots / torch.where(sq > 0, sq, torch.ones_like(sq))).tolist()
        for m, g, c in zip(bufs, grads, coefs):
            m.mul_(alpha).add_(g, alpha=c)
        torch._foreach_add_(params, bufs, alpha=-lr)
        return True
