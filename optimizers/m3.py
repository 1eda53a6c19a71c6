"""M3, Multi-scale Momentum Muon: fast and slow momentum memories, orthogonalised (see ``deepopt.rules.m3``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from deepopt.rules import m3, sharding
from deepopt.rules import transforms as T
from deepopt.rules.m3 import orthogonalize_many

from .base import MemoryOptimizer

_SCALARS = ("lr", "momentum", "slow_momentum", "beta2", "alpha", "eps", "weight_decay")
# Algorithm 1 as printed (``M3(paper=True)``)
PAPER = {"accumulate": "sum", "second_moment": True, "nesterov": False}


class M3(MemoryOptimizer):
    """Multi-scale Momentum Muon (Nested Learning §7.2, Algorithm 1)::

        M¹ ← β₁M¹ + (1 − β₁)g                                   every step (fast memory)
        W  ← W − lr·(NS(M¹) + α·O²) [/ √(V̂ + ε)] − lr·wd·W        (V̂: Adam's second moment, second_moment=True)
        every ``chunk`` steps: M² ← β₃M² + (1 − β₃)·Σ_chunk g;  O² ← NS(M²)   (slow memory)

    ``momentum`` is β₁, ``slow_momentum`` β₃, ``beta2`` β₂; ``nesterov`` orthogonalises Muon's look-ahead
    ``(1 − β₁)g + β₁M¹``; ``accumulate="sum"`` is Algorithm 1's accumulation (``M ← M + βx``, no decay).
    Newton–Schulz (``ns_steps`` iterations, in ``ns_dtype``: None = the parameter's dtype, or "bfloat16"
    as torch.optim.Muon does, or "float32") applies to tensors with ≥ 2 dims; on the others M3 is EMA
    momentum (Adam-like with ``second_moment=True``) — or give them their own optimizer, as Muon users
    do (AdamW for embeddings, biases and norms).  With ``alpha=0, second_moment=False`` it is
    ``torch.optim.Muon(lr, momentum=β₁, nesterov=…, weight_decay=wd)``.  Weight decay is decoupled.

    ``paper=True`` is Algorithm 1 as printed: ``accumulate="sum", second_moment=True, nesterov=False``
    (passing one of those three as well is an error).  The defaults depart from it in three ways, each
    measured (``docs/m3.md``): EMA memories instead of sums, no second moment (dividing an orthogonalised
    step by √V̂ makes it ``lr·O/|g|``), and Nesterov's look-ahead (Muon's default, absent from the paper).

    The chunk phase (whether step t ends a chunk) is read from the ``step`` counter in the state, on the
    device: a state restored by any route (``load_state_dict``, ``deepcopy``, pickling, ``opt.state[p] =
    …``, ``ZeroRedundancyOptimizer``) steps as the uninterrupted run would, and ``torch.compile`` has no
    Python counter to guard on.  So that no step reads it on the host, each step orthogonalises the slow
    memory's candidate ``β₃M² + (1 − β₃)S`` in the same batch as the fast memory and keeps it only where a
    chunk ends (``torch.where``): the fast path's Newton–Schulz batch is twice as large as a
    host-scheduled one (``docs/m3.md`` measures the cost).

    Works under DDP and FSDP2: on sharded DTensor parameters Newton–Schulz runs on whole matrices, each
    assembled on one rank and orthogonalised there, as microsoft/dion distributes it
    (``deepopt.rules.sharding``); the rest of the step is element-wise on the shards.
    Options: ``foreach``, ``nonfinite``, ``capturable`` (see ``MemoryOptimizer``).
    """

    rule = m3

    def __init__(self, params: Any, lr: float = 0.02, momentum: float = 0.95, slow_momentum: float = 0.9,
                 alpha: float = 0.1, chunk: int = 10, second_moment: bool | None = None,
                 weight_decay: float = 0.0, *, paper: bool = False, **options: Any) -> None:
        if not isinstance(paper, bool):
            raise TypeError(f"paper must be a bool, got {type(paper).__name__}")
        if paper:
            clash = sorted(k for k in PAPER if (second_moment if k == "second_moment" else options.get(k)) is not None)
            if clash:
                raise TypeError(f"M3(paper=True) sets {sorted(PAPER)} to Algorithm 1's values; drop {clash} "
                                "or drop paper=True")
            options.update({k: v for k, v in PAPER.items() if k != "second_moment"})
            second_moment = True
        super().__init__(params, lr=lr, momentum=momentum, slow_momentum=slow_momentum, alpha=alpha, chunk=chunk,
                         second_moment=False if second_moment is None else second_moment,
                         weight_decay=weight_decay, **options)

    _fast_path_takes_dtensors = True

    def _fast_step(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> bool:
        """The rule with ``torch._foreach_*`` ops, Newton–Schulz batched over same-shape matrices (the fast
        memories' and the slow memories' candidates in one batch) and the chunk-end writes selected per
        shape on the device (``_keep_at_chunk_ends``).  Sharded DTensors (FSDP2) step on their local shards,
        all but Newton–Schulz, which gets them back as DTensors and orthogonalises whole matrices."""
        if any(isinstance(group[k], Tensor) for k in _SCALARS):
            return False
        dtensors = params
        params, grads = [sharding.local(p) for p in params], [sharding.local(g) for g in grads]
        states = [{k: sharding.local(v) for k, v in self.state[p].items()} for p in dtensors]
        lr, mu, wd, ema = group["lr"], group["momentum"], group["weight_decay"], group["accumulate"] == "ema"
        steps = [s["step"] for s in states]
        torch._foreach_add_(steps, 1)
        fast, sums = [s["fast"] for s in states], [s["chunk_sum"] for s in states]
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
        torch._foreach_add_(sums, grads)
        slow = [s["slow"] for s in states]
        if ema:
            candidate = torch._foreach_mul(slow, group["slow_momentum"])
            torch._foreach_add_(candidate, sums, alpha=1 - group["slow_momentum"])
        else:
            candidate = torch._foreach_add(slow, sums, alpha=group["slow_momentum"])
        ortho = orthogonalize_many([sharding.like(x, p) for x, p in zip([*lookahead, *candidate], dtensors * 2)],
                                   group)
        direction, candidate_ortho = [sharding.local(o) for o in ortho[:len(params)]], ortho[len(params):]
        candidate_ortho = [sharding.local(o) for o in candidate_ortho]
        if group["alpha"] != 0:
            direction = torch._foreach_add(direction, [s["slow_ortho"] for s in states], alpha=group["alpha"])
        if group["second_moment"]:
            v = [s["exp_avg_sq"] for s in states]
            b2 = group["beta2"]
            if ema:
                torch._foreach_mul_(v, b2)
                torch._foreach_addcmul_(v, grads, grads, value=1 - b2)
                correction = torch._foreach_pow(b2, [T.step_float(t, p) for t, p in zip(steps, params)])
                torch._foreach_neg_(correction)
                torch._foreach_add_(correction, 1)  # 1 − β₂ᵗ, on the device
                denom = torch._foreach_div(v, correction)
                torch._foreach_add_(denom, group["eps"])
            else:
                torch._foreach_addcmul_(v, grads, grads, value=b2)
                denom = torch._foreach_add(v, group["eps"])
            torch._foreach_sqrt_(denom)
            direction = torch._foreach_div(direction, denom)
        self._foreach_descend(params, direction, lr)
        _keep_at_chunk_ends(states, steps, group["chunk"], candidate, candidate_ortho)
        return True


def _accumulate_(memories: list[Tensor], values: list[Tensor], beta: float, ema: bool) -> None:
    """In place: ``M ← β·M + (1 − β)·x`` (ema) or ``M ← M + β·x`` (sum), as ``rules.m3.accumulate``."""
    if ema:
        torch._foreach_mul_(memories, beta)
        torch._foreach_add_(memories, values, alpha=1 - beta)
    else:
        torch._foreach_add_(memories, values, alpha=beta)


def _keep_at_chunk_ends(states: list[dict[str, Tensor]], steps: list[Tensor], chunk: int, slow: list[Tensor],
                        slow_ortho: list[Tensor]) -> None:
    """Where ``step % chunk == 0`` (decided on the device): ``M² ← slow``, ``O² ← slow_ortho``, ``S ← 0``;
    elsewhere the state keeps its values.  Tensors of one shape and dtype are stacked, so the launches grow
    with the number of shapes, not of tensors (as the batched Newton–Schulz's do)."""
    buckets: dict[tuple, list[int]] = {}
    for i, st in enumerate(states):
        buckets.setdefault((st["slow"].shape, st["slow"].dtype, st["slow"].device), []).append(i)
    for (shape, _, _), idx in buckets.items():
        ends = torch.stack([steps[i] for i in idx]).remainder(chunk).eq(0).view(-1, *(1,) * len(shape))
        for key, new in (("slow", slow), ("slow_ortho", slow_ortho), ("chunk_sum", None)):
            old = [states[i][key] for i in idx]
            stacked = torch.stack(old)
            picked = (torch.where(ends, 0.0, stacked) if new is None
                      else torch.where(ends, torch.stack([new[i] for i in idx]), stacked))
            torch._foreach_copy_(old, list(picked.unbind(0)))
