"""Adam and AdamW: two element-wise memories (see ``deepopt.rules.adam``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from deepopt.rules import adam

from .base import MemoryOptimizer, by_device_and_dtype

_FUSED_DEVICES = ("cpu", "cuda", "meta")


class Adam(MemoryOptimizer):
    """Adam with bias correction (``torch.optim.Adam`` numerically)::

        m ← β₁m + (1−β₁)g;  v ← β₂v + (1−β₂)g²;  W ← W − lr/(1−β₁ᵗ) · m/(√v/√(1−β₂ᵗ) + ε)

    ``weight_decay`` is coupled (``g + wd·W``) unless ``decoupled_weight_decay=True`` (AdamW).
    Paths: torch's fused Adam kernel (default, ``fused=None``/``True``, on CPU and CUDA), a multi-tensor
    ``torch._foreach_*`` path (``fused=False``), the per-tensor pure rule (``foreach=False``).  ``fused`` is kept
    in each param group, as torch.optim.Adam keeps it, so it survives ``load_state_dict``, copies and pickling.
    Step counters live on the parameters' device, so all three run without host synchronisation.
    """

    _fast_path_takes_dtensors = True
    rule = adam

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, decoupled_weight_decay: bool = False,
                 *, fused: bool | None = None, **options: Any) -> None:
        if fused is not None and not isinstance(fused, bool):
            raise TypeError(f"fused must be None, True or False, got {fused!r}")
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         decoupled_weight_decay=decoupled_weight_decay, **options)
        self.defaults["fused"] = fused  # groups added later take it from the defaults, as in torch.optim
        for group in self.param_groups:
            group["fused"] = fused

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        if group.get("fused") is not None and not isinstance(group["fused"], bool):
            raise TypeError(f"fused must be None, True or False, got {group['fused']!r}")

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.defaults.setdefault("fused", None)  # saved before ``fused`` lived in the groups
        for group in self.param_groups:
            group.setdefault("fused", self.defaults["fused"])

    def _fast_step(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> bool:
        if _tensor_options(group):
            return False
        states = [self.state[p] for p in params]
        if _fusable(group, params, states):
            _fused_adam(group, params, grads, states)
        else:
            _foreach_adam(group, params, grads, states)
        return True

    def _fast_masked_step(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                          found_inf: Tensor) -> bool:
        """The fused kernel skips the whole step itself when ``found_inf`` is set (as under GradScaler)."""
        states = [self.state[p] for p in params]
        if _tensor_options(group) or not _fusable(group, params, states):
            return False
        _fused_adam(group, params, grads, states, found_inf)
        return True



def _fusable(group: dict[str, Any], params: list[Tensor], states: list[dict[str, Tensor]]) -> bool:
    """Whether torch's fused kernel takes the group: not switched off, on a device it supports, and on CUDA only with
    fp32 step counters (torch's CUDA kernel reads every counter as fp32 whatever its dtype, so the fp64 counters of
    fp64 parameters take the ``_foreach`` path there)."""
    return group.get("fused") is not False and all(
        p.device.type in _FUSED_DEVICES and (p.device.type != "cuda" or st["step"].dtype == torch.float32)
        for p, st in zip(params, states))


def _tensor_options(group: dict[str, Any]) -> bool:
    """Whether a hyperparameter other than ``lr`` is a tensor (the fast paths take a tensor ``lr`` only)."""
    return any(isinstance(v, Tensor) for v in (group["eps"], group["weight_decay"], *group["betas"]))


def _fused_adam(group: dict[str, Any], params: list[Tensor], grads: list[Tensor], states: list[dict[str, Tensor]],
                found_inf: Tensor | None = None) -> None:
    """torch's fused Adam(W) kernel, one launch per (device, dtype) bucket."""
    beta1, beta2 = group["betas"]
    kernel = torch._fused_adamw_ if group["decoupled_weight_decay"] else torch._fused_adam_
    lr = group["lr"]
    for p_list, g_list, m_list, v_list, steps in by_device_and_dtype(
            params, grads, *([st[k] for st in states] for k in ("exp_avg", "exp_avg_sq", "step"))):
        device = p_list[0].device
        flag = None if found_inf is None else found_inf.to(device)
        if flag is None:
            torch._foreach_add_(steps, 1)
        else:  # a skipped step does not count (a list of 0-dim tensors: the Tensor overload reads it on the host)
            torch._foreach_add_(steps, [1 - flag] * len(steps))
        kernel(p_list, g_list, m_list, v_list, [], steps,
               lr=lr.to(device) if isinstance(lr, Tensor) else lr, beta1=beta1, beta2=beta2,
               weight_decay=group["weight_decay"], eps=group["eps"], amsgrad=False, maximize=False,
               found_inf=flag)


def _foreach_adam(group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                  states: list[dict[str, Tensor]]) -> None:
    """The ``adam`` rule over lists with ``torch._foreach_*`` ops (torch's multi-tensor Adam with device-side
    bias corrections): same arithmetic order as the rule."""
    beta1, beta2 = group["betas"]
    steps = [st["step"] for st in states]
    exp_avg, exp_avg_sq = [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states]
    torch._foreach_add_(steps, 1)
    grads = MemoryOptimizer._foreach_weight_decay(group, params, grads)
    torch._foreach_lerp_(exp_avg, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sq, beta2)
    torch._foreach_addcmul_(exp_avg_sq, grads, grads, value=1 - beta2)
    bias_correction1 = torch._foreach_pow(beta1, steps)
    torch._foreach_neg_(bias_correction1)
    torch._foreach_add_(bias_correction1, 1)  # 1 − β₁ᵗ
    bias_correction2 = torch._foreach_pow(beta2, steps)
    torch._foreach_neg_(bias_correction2)
    torch._foreach_add_(bias_correction2, 1)
    torch._foreach_sqrt_(bias_correction2)  # √(1 − β₂ᵗ)
    denom = torch._foreach_sqrt(exp_avg_sq)
    torch._foreach_div_(denom, bias_correction2)
    torch._foreach_add_(denom, group["eps"])
    torch._foreach_mul_(denom, torch._foreach_div(bias_correction1, -group["lr"]))  # 0-dim: −(1 − β₁ᵗ)/lr
    torch._foreach_addcdiv_(params, exp_avg, denom)  # W ← W − lr/(1 − β₁ᵗ)·m/denom, one pass


class AdamW(Adam):
    """Adam with decoupled weight decay, ``W ← W − lr·wd·W`` (``torch.optim.AdamW``)."""

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, **options: Any) -> None:
        options.setdefault("decoupled_weight_decay", True)
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **options)
