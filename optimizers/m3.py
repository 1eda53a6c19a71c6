"""M3, Multi-scale Momentum Muon: fast and slow momentum memories, orthogonalised (see ``deepopt.rules.m3``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from deepopt.rules import m3
from deepopt.rules.m3 import orthogonalize_many

from .base import MemoryOptimizer, is_dtensor

_SCALARS = ("lr", "momentum", "slow_momentum", "beta2", "alpha", "eps", "weight_decay")


class M3(MemoryOptimizer):
    """Multi-scale Momentum Muon (Nested Learning §7.2, Algorithm 1)::

        M¹ ← β₁M¹ + (1 − β₁)g                                   every step (fast memory)
        W  ← W − lr·(NS(M¹) + α·O²) [/ √(V̂ + ε)] − lr·wd·W        (V̂: Adam's second moment, second_moment=True)
        every ``chunk`` steps: M² ← β₃M² + (1 − β₃)·Σ_chunk g;  O² ← NS(M²)   (slow memory)

    ``momentum`` is β₁, ``slow_momentum`` β₃, ``beta2`` β₂; ``nesterov`` orthogonalises Muon's look-ahead
    ``(1 − β₁)g + β₁M¹``; ``accumulate="sum"`` is Algorithm 1 as printed (``M ← M + βx``, no decay).
    Newton–Schulz (``ns_steps`` iterations, in ``ns_dtype``: None = the parameter's dtype, or "bfloat16"
    as torch.optim.Muon does, or "float32") applies to tensors with ≥ 2 dims; on the others M3 is EMA
    momentum (Adam-like with ``second_moment=True``) — or give them their own optimizer, as Muon users
    do (AdamW for embeddings, biases and norms).  With ``alpha=0, second_moment=False`` it is
    ``torch.optim.Muon(lr, momentum=β₁, nesterov=…, weight_decay=wd)``.  Weight decay is decoupled.
    Works under DDP; sharded DTensor parameters (FSDP2) are refused, since Newton–Schulz needs the whole
    matrix.  Options: ``foreach``, ``nonfinite`` (see ``MemoryOptimizer``).
    """

    rule = m3

    def __init__(self, params: Any, lr: float = 0.02, momentum: float = 0.95, slow_momentum: float = 0.9,
                 alpha: float = 0.1, chunk: int = 10, second_moment: bool = False, weight_decay: float = 0.0,
                 **options: Any) -> None:
        super().__init__(params, lr=lr, momentum=momentum, slow_momentum=slow_momentum, alpha=alpha, chunk=chunk,
                         second_moment=second_moment, weight_decay=weight_decay, **options)
        # Steps taken per parameter, on the host, so the fast path knows where a chunk ends without
        # reading the device step counter (rebuilt from the counters by ``__setstate__``).
        self._steps_taken: dict[Tensor, int | None] = {}

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        if any(is_dtensor(p) for p in group.get("params", ()) if isinstance(p, Tensor)):
            raise TypeError("M3 does not take sharded DTensor parameters (FSDP2): Newton–Schulz needs whole "
                            "matrices; use DistributedDataParallel")

    def __setstate__(self, state: dict[str, Any]) -> None:
        """After ``load_state_dict``, ``deepcopy`` and unpickling (torch keeps only defaults, state and
        groups): the host step counts, read once from the state's counters."""
        super().__setstate__(state)
        self._steps_taken = {p: int(s["step"]) for p, s in self.state.items() if "step" in s}

    def _rule_step(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                   found_inf: Tensor | None = None) -> None:
        super()._rule_step(group, params, grads, found_inf)
        for p in params:  # a step masked on the device (nonfinite="skip") leaves the host count unknown
            taken = self._steps_taken.get(p, 0)
            self._steps_taken[p] = None if found_inf is not None or taken is None else taken + 1

    def _fast_step(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> bool:
        """The rule with ``torch._foreach_*`` ops and Newton–Schulz batched over same-shape matrices; the
        slow memory is orthogonalised only at the end of a chunk, known from the host step count (unknown
        after a ``nonfinite="skip"`` step, which therefore leaves that parameter on the rule path).  A
        ``capturable`` group takes the rule path, whose chunk ends are decided on the device: a CUDA graph
        replays the host's decision of the step it captured."""
        if (group["capturable"] or any(isinstance(group[k], Tensor) for k in _SCALARS)
                or any(self._steps_taken.get(p, 0) is None for p in params)):
            return False
        states = [self.state[p] for p in params]
        lr, mu, wd, ema = group["lr"], group["momentum"], group["weight_decay"], group["accumulate"] == "ema"
        fast = [s["fast"] for s in states]
        if wd != 0:
            torch._foreach_mul_(params, 1 - lr * wd)
        _accumulate_(fast, grads, mu, ema)
        if not group["nesterov"]:
            lookahead = fast
        elif ema:
            lookahead = torch._foreach_mul(fast, mu)
            torch._foreach_add_(lookahead, grads, alpha=1 - mu)
        else:
            lookahead = torch._foreach_add(fast, grads, alpha=mu)
        direction = orthogonalize_many(lookahead, group)
        if group["alpha"] != 0:
            direction = torch._foreach_add(direction, [s["slow_ortho"] for s in states], alpha=group["alpha"])
        taken = [self._steps_taken.get(p, 0) + 1 for p in params]
        if group["second_moment"]:
            v = [s["exp_avg_sq"] for s in states]
            b2 = group["beta2"]
            if ema:
                torch._foreach_mul_(v, b2)
                torch._foreach_addcmul_(v, grads, grads, value=1 - b2)
                denom = torch._foreach_div(v, [1 - b2**t for t in taken])
                torch._foreach_add_(denom, group["eps"])
            else:
                torch._foreach_addcmul_(v, grads, grads, value=b2)
                denom = torch._foreach_add(v, group["eps"])
            torch._foreach_sqrt_(denom)
            direction = torch._foreach_div(direction, denom)
        self._foreach_descend(params, direction, lr)
        torch._foreach_add_([s["step"] for s in states], 1)
        sums = [s["chunk_sum"] for s in states]
        torch._foreach_add_(sums, grads)
        ends = [i for i, t in enumerate(taken) if t % group["chunk"] == 0]
        if ends:
            slow = [states[i]["slow"] for i in ends]
            _accumulate_(slow, [sums[i] for i in ends], group["slow_momentum"], ema)
            torch._foreach_copy_([states[i]["slow_ortho"] for i in ends], orthogonalize_many(slow, group))
            torch._foreach_zero_([sums[i] for i in ends])
        for p, t in zip(params, taken):
            self._steps_taken[p] = t
        return True


def _accumulate_(memories: list[Tensor], values: list[Tensor], beta: float, ema: bool) -> None:
    """In place: ``M ← β·M + (1 − β)·x`` (ema) or ``M ← M + β·x`` (sum), as ``rules.m3.accumulate``."""
    if ema:
        torch._foreach_mul_(memories, beta)
        torch._foreach_add_(memories, values, alpha=1 - beta)
    else:
        torch._foreach_add_(memories, values, alpha=beta)
