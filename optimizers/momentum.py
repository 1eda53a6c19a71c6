"""Momentum, a vector memory trained on −⟨m, g⟩ (see ``deepopt.rules.momentum``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from deepopt.rules import momentum
from deepopt.rules.transforms import newton_schulz_many

from .base import MemoryOptimizer, is_dtensor


class Momentum(MemoryOptimizer):
    """Heavy-ball / Nesterov momentum, optionally preconditioned and orthogonalised::

        g ← g + wd·W;   m ← μ·m + P g;   u ← P g + μ·m if nesterov else m;   W ← W − lr·σ(u)

    With the defaults it equals ``torch.optim.SGD(lr, momentum=μ, nesterov=…, weight_decay=wd)``;
    ``nesterov=True, nonlinearity="newton_schulz"`` is Muon: ``torch.optim.Muon(lr, weight_decay=wd,
    momentum=μ, nesterov=True)`` equals ``Momentum(lr, momentum=μ, nesterov=True, nonlinearity="newton_schulz",
    weight_decay=wd, decoupled_weight_decay=True)`` (torch's EMA buffer is (1 − μ)·m, and Newton–Schulz is
    scale-invariant; torch runs it in bf16, deepopt in the parameter's dtype).  Further options (keywords):
    ``decoupled_weight_decay``, ``preconditioner`` ("identity" | "adam" with ``beta2``, ``eps``),
    ``nonlinearity`` (None | "newton_schulz"), ``foreach``, ``nonfinite``, ``capturable``.
    """

    _fast_path_takes_dtensors = True
    rule = momentum

    def __init__(self, params: Any, lr: float = 1e-3, momentum: float = 0.9, nesterov: bool = False,
                 weight_decay: float = 0.0, **options: Any) -> None:
        super().__init__(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                         **options)

    def _fast_step(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> bool:
        if (any(isinstance(group[k], Tensor) for k in ("momentum", "weight_decay", "beta2", "eps"))
                or (group["nonlinearity"] is not None and any(map(is_dtensor, params)))):
            return False
        foreach_momentum_step(group, [self.state[p] for p in params], params, grads)
        return True


def foreach_momentum_step(group: dict[str, Any], states: list[dict[str, Tensor]], params: list[Tensor],
                          grads: list[Tensor]) -> None:
    """The ``momentum`` rule over lists of tensors with ``torch._foreach_*`` ops (and Newton–Schulz batched
    over same-shape matrices): a kernel count independent of the number of tensors."""
    lr, mu = group["lr"], group["momentum"]
    grads = MemoryOptimizer._foreach_weight_decay(group, params, grads)
    values = foreach_precondition(group, states, grads)
    bufs = [st["momentum_buffer"] for st in states]
    torch._foreach_mul_(bufs, mu)
    torch._foreach_add_(bufs, values)
    direction = torch._foreach_add(values, bufs, alpha=mu) if group["nesterov"] else bufs
    MemoryOptimizer._foreach_descend(params, foreach_output_nonlinearity(group, direction), lr)


def foreach_precondition(group: dict[str, Any], states: list[dict[str, Tensor]], grads: list[Tensor]) -> list[Tensor]:
    """``P g`` over lists (``transforms.precondition``): identity, or Adam's diagonal, updating each state's
    ``step`` and ``exp_avg_sq`` in place."""
    if group["preconditioner"] != "adam":
        return grads
    beta2 = group["beta2"]
    steps, sq = [st["step"] for st in states], [st["exp_avg_sq"] for st in states]
    torch._foreach_add_(steps, 1)
    torch._foreach_mul_(sq, beta2)
    torch._foreach_addcmul_(sq, grads, grads, value=1 - beta2)
    bias_correction2 = torch._foreach_pow(beta2, steps)
    torch._foreach_neg_(bias_correction2)
    torch._foreach_add_(bias_correction2, 1)
    denom = torch._foreach_div(sq, bias_correction2)
    torch._foreach_sqrt_(denom)
    torch._foreach_add_(denom, group["eps"])
    return torch._foreach_div(grads, denom)


def foreach_output_nonlinearity(group: dict[str, Any], direction: list[Tensor]) -> list[Tensor]:
    """σ over a list: Newton–Schulz on the tensors with ≥ 2 dims, batched by shape, when asked for."""
    if group["nonlinearity"] != "newton_schulz":
        return direction
    matrices = [i for i, d in enumerate(direction) if d.dim() >= 2]
    out = list(direction)
    for i, y in zip(matrices, newton_schulz_many([direction[i] for i in matrices])):
        out[i] = y
    return out

