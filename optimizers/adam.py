"""Adam and AdamW: two element-wise memories (see ``deepopt.rules.adam``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from deepopt.rules import adam

from .base import MemoryOptimizer

_FUSED_DEVICES = ("cpu", "cuda")


class Adam(MemoryOptimizer):
    """Adam with bias correction (``torch.optim.Adam`` numerically)::

        m ← β₁m + (1−β₁)g;  v ← β₂v + (1−β₂)g²;  W ← W − lr/(1−β₁ᵗ) · m/(√v/√(1−β₂ᵗ) + ε)

    ``weight_decay`` is coupled (``g + wd·W``) unless ``decoupled_weight_decay=True`` (AdamW).
    The fast path is torch's fused Adam kernel (``fused=False`` or ``foreach=False`` run the rule).
    """

    _fast_path_takes_dtensors = True
    rule = adam

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, decoupled_weight_decay: bool = False,
                 *, fused: bool | None = None, **options: Any) -> None:
        if fused is not None and not isinstance(fused, bool):
            raise TypeError(f"fused must be None, True or False, got {fused!r}")
        if fused is False:
            options["foreach"] = False
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         decoupled_weight_decay=decoupled_weight_decay, **options)

    def _fast_step(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> bool:
        if isinstance(group["lr"], Tensor) or any(
            p.device.type not in _FUSED_DEVICES or not p.is_floating_point() for p in params
        ):
            return False
        beta1, beta2 = group["betas"]
        kernel = torch._fused_adamw_ if group["decoupled_weight_decay"] else torch._fused_adam_
        states = [self.state[p] for p in params]
        grouped = _by_device_and_dtype(params, grads, states)
        for p_list, g_list, m_list, v_list, steps in grouped:
            torch._foreach_add_(steps, 1)
            kernel(p_list, g_list, m_list, v_list, [], steps, lr=float(group["lr"]), beta1=float(beta1),
                   beta2=float(beta2), weight_decay=float(group["weight_decay"]), eps=float(group["eps"]),
                   amsgrad=False, maximize=False)
        return True


def _by_device_and_dtype(params: list[Tensor], grads: list[Tensor], states: list[dict[str, Tensor]]):
    """Lists per (device, dtype), as the fused kernel needs them."""
    buckets: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], ...]] = {}
    for p, g, s in zip(params, grads, states):
        b = buckets.setdefault((p.device, p.dtype), ([], [], [], [], []))
        for lst, t in zip(b, (p, g, s["exp_avg"], s["exp_avg_sq"], s["step"])):
            lst.append(t)
    return list(buckets.values())


class AdamW(Adam):
    """Adam with decoupled weight decay, ``W ← W − lr·wd·W`` (``torch.optim.AdamW``)."""

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, **options: Any) -> None:
        options.setdefault("decoupled_weight_decay", True)
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **options)
