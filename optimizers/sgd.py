"""Plain SGD, the weights as a memory with a dot-product objective: ``W ← W − lr·(g + wd·W)``."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from deepopt.rules import sgd

from .base import MemoryOptimizer


class SGD(MemoryOptimizer):
    """``W ← W − lr·(g + wd·W)``; equals ``torch.optim.SGD(lr, weight_decay=wd)``."""

    _fast_path_takes_dtensors = True
    rule = sgd

    def __init__(self, params: Any, lr: float = 1e-3, weight_decay: float = 0.0, **options: Any) -> None:
        super().__init__(params, lr=lr, weight_decay=weight_decay, **options)

    def _fast_step(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> bool:
        if isinstance(group["lr"], Tensor):
            return False
        if group["weight_decay"] != 0:
            grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
        torch._foreach_add_(params, grads, alpha=-group["lr"])
        return True
