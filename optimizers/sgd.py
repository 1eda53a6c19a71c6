"""Plain SGD, the weights as a memory with a dot-product objective: ``W ← W − lr·(g + wd·W)``."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from deepopt.rules import sgd
from deepopt.rules.sgd import as_momentum_hparams, has_momentum

from .base import MemoryOptimizer
from .momentum import foreach_momentum_step, fused_momentum_applies, fused_momentum_step


class SGD(MemoryOptimizer):
    """``W ← W − lr·(g + wd·W)``; equals ``torch.optim.SGD(lr, weight_decay=wd)``.

    ``momentum``/``nesterov`` are accepted as torch's SGD accepts them (a momentum-cycling scheduler such as
    ``OneCycleLR`` sets them); with ``momentum > 0`` the step is ``Momentum``'s.
    """

    _fast_path_takes_dtensors = True
    rule = sgd

    def __init__(self, params: Any, lr: float = 1e-3, momentum: float = 0.0, weight_decay: float = 0.0,
                 nesterov: bool = False, **options: Any) -> None:
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov, **options)

    def _fast_step(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> bool:
        states = self._momentum_states(group, params)
        if states is None:
            return False
        foreach_momentum_step(as_momentum_hparams(group), states, params, grads)
        return True

    def _fast_masked_step(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                          found_inf: Tensor) -> bool:
        states = self._momentum_states(group, params)
        if states is None or not fused_momentum_applies(as_momentum_hparams(group), params, masked=True):
            return False
        fused_momentum_step(as_momentum_hparams(group), states, params, grads, found_inf)
        return True

    def _momentum_states(self, group: dict[str, Any], params: list[Tensor]) -> list[dict[str, Tensor]] | None:
        """The states for the momentum paths, or ``None`` where a tensor hyperparameter or a buffer not made
        yet (momentum switched on mid-run) leaves the step to the rule."""
        if any(isinstance(group[k], Tensor) for k in ("momentum", "weight_decay")):
            return None
        if not has_momentum(group):
            return [{} for _ in params]  # plain SGD keeps no state (and, as torch's, makes no entry in it)
        states = [self.state[p] for p in params]
        if any("momentum_buffer" not in st for st in states):
            return None
        return states
