"""Plain SGD, the weights as a memory with a dot-product objective: ``W ← W − lr·(g + wd·W)``."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from deepopt.rules import sgd
from deepopt.rules.sgd import has_momentum

from .base import MemoryOptimizer
from .momentum import foreach_momentum_step


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
        if any(isinstance(group[k], Tensor) for k in ("momentum", "weight_decay")):
            return False
        if has_momentum(group):
            states = [self.state[p] for p in params]
            if any("momentum_buffer" not in st for st in states):
                return False
            foreach_momentum_step({**group, "decoupled_weight_decay": False, "preconditioner": "identity",
                                   "nonlinearity": None}, states, params, grads)
            return True
        grads = self._foreach_weight_decay({**group, "decoupled_weight_decay": False}, params, grads)
        self._foreach_descend(params, grads, group["lr"])
        return True
