"""Momentum, a vector memory trained on −⟨m, g⟩ (see ``deepopt.rules.momentum``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from deepopt.rules import momentum, sharding
from deepopt.rules.transforms import decoupled, is_zero, orthogonalize_many, peak_rms_carry, peak_rms_init

from .base import MemoryOptimizer, by_device_and_dtype, is_dtensor


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

    Weight decay: **coupled** (L2, ``g + wd·W``, as ``torch.optim.SGD``) with the identity preconditioner and
    **decoupled** (AdamW's) with ``preconditioner="adam"``, the default of ``decoupled_weight_decay=None``;
    ``True``/``False`` force either.  Decoupled: ``W ← W − lr·λ·W`` with λ = wd/(1 − μ) under Adam's P and no
    nonlinearity (the sum-form momentum's steps are AdamW's at lr/(1 − μ), and so is the decay), else λ = wd
    (Muon's; ``transforms.decoupled_rate``).
    """

    _fast_path_takes_dtensors = True
    rule = momentum

    def __init__(self, params: Any, lr: float = 1e-3, momentum: float = 0.9, nesterov: bool = False,
                 weight_decay: float = 0.0, **options: Any) -> None:
        super().__init__(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                         **options)

    def _fast_step(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> bool:
        if (any(isinstance(group[k], Tensor) for k in ("momentum", "weight_decay", "beta2", "eps", "relative_eps"))
                or (group["nonlinearity"] is not None and any(map(is_dtensor, params)))):
            return False
        foreach_momentum_step(group, [self.state[p] for p in params], params, grads)
        return True

    def _fast_masked_step(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                          found_inf: Tensor) -> bool:
        if not fused_momentum_applies(group, params, masked=True):
            return False
        fused_momentum_step(group, [self.state[p] for p in params], params, grads, found_inf)
        return True


def foreach_momentum_step(group: dict[str, Any], states: list[dict[str, Tensor]], params: list[Tensor],
                          grads: list[Tensor]) -> None:
    """The ``momentum`` rule over lists of tensors: torch's fused SGD kernel where it applies, else
    ``torch._foreach_*`` ops (and Newton–Schulz batched over same-shape matrices): a kernel count independent
    of the number of tensors."""
    if fused_momentum_applies(group, params):
        fused_momentum_step(group, states, params, grads)
        return
    lr, mu = group["lr"], group["momentum"]
    grads = MemoryOptimizer._foreach_weight_decay(group, params, grads)
    values = foreach_precondition(group, states, grads)
    if is_zero(mu):  # plain SGD keeps no buffer
        MemoryOptimizer._foreach_descend(params, foreach_output_nonlinearity(group, values), lr)
        return
    bufs = [st["momentum_buffer"] for st in states]
    torch._foreach_mul_(bufs, mu)
    torch._foreach_add_(bufs, values)
    direction = torch._foreach_add(values, bufs, alpha=mu) if group["nesterov"] else bufs
    MemoryOptimizer._foreach_descend(params, foreach_output_nonlinearity(group, direction), lr)


_FUSED_DEVICES = ("cpu", "cuda")


def fused_momentum_applies(group: dict[str, Any], params: list[Tensor], masked: bool = False) -> bool:
    """torch's fused SGD kernel computes ``m ← μm + g;  W ← W − lr·(g + μm if nesterov else m)`` with coupled
    weight decay: the rule for identity ``P`` and σ (a decoupled decay is applied before it, except in a
    masked step, which must leave W untouched when skipped)."""
    return (group["preconditioner"] == "identity" and group["nonlinearity"] is None
            and not (masked and decoupled(group) and not is_zero(group["weight_decay"]))
            and not any(isinstance(group[k], Tensor) for k in ("momentum", "weight_decay"))
            and all(p.device.type in _FUSED_DEVICES and not is_dtensor(p) for p in params))  # fused SGD has no
    # DTensor sharding rule (FSDP2 parameters take the _foreach path)


def fused_momentum_step(group: dict[str, Any], states: list[dict[str, Tensor]], params: list[Tensor],
                        grads: list[Tensor], found_inf: Tensor | None = None) -> None:
    """One fused pass per (device, dtype): reads W, g, m, writes W, m (``momentum = 0``: no m)."""
    lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
    if decoupled(group) and not is_zero(wd):
        MemoryOptimizer._foreach_weight_decay(group, params, grads)  # W ← (1 − lr·λ)·W in place
        wd = 0.0
    bufs = [st["momentum_buffer"] for st in states] if not is_zero(mu) else None
    for p_list, g_list, *m_list in by_device_and_dtype(params, grads, *([bufs] if bufs else [])):
        device = p_list[0].device
        torch._fused_sgd_(p_list, g_list, m_list[0] if m_list else [], weight_decay=wd, momentum=mu,
                          lr=lr.to(device) if isinstance(lr, Tensor) else lr, dampening=0.0,
                          nesterov=group["nesterov"], maximize=False, is_first_step=False,
                          found_inf=None if found_inf is None else found_inf.to(device))


def foreach_precondition(group: dict[str, Any], states: list[dict[str, Tensor]], grads: list[Tensor]) -> list[Tensor]:
    """``P g`` over lists (``transforms.precondition``): identity, or Adam's diagonal, updating each state's
    ``step`` and ``exp_avg_sq`` in place."""
    if group["preconditioner"] != "adam":
        return grads
    beta2 = group["beta2"]
    steps, sq = [st["step"] for st in states], [st["exp_avg_sq"] for st in states]
    floors = foreach_relative_eps(group, states, grads)
    torch._foreach_add_(steps, 1)
    torch._foreach_mul_(sq, beta2)
    torch._foreach_addcmul_(sq, grads, grads, value=1 - beta2)
    bias_correction2 = torch._foreach_pow(beta2, steps)
    torch._foreach_neg_(bias_correction2)
    torch._foreach_add_(bias_correction2, 1)
    denom = torch._foreach_div(sq, bias_correction2)
    torch._foreach_sqrt_(denom)
    if floors is None:
        torch._foreach_add_(denom, group["eps"])
    else:  # a DTensor's shards take the floors as numbers (one mixes no plain tensor into DTensor arithmetic)
        torch._foreach_add_(denom, floors.tolist() if any(map(is_dtensor, grads)) else
                            list(floors.to(grads[0].dtype).unbind()))
    return torch._foreach_div(grads, denom)


def foreach_relative_eps(group: dict[str, Any], states: list[dict[str, Tensor]],
                         grads: list[Tensor]) -> Tensor | None:
    """``relative_eps``'s per-tensor ``ε + κ·ρ_t`` as a ``(T,)`` tensor (``transforms.precondition``),
    advancing each state's ``mean_sq`` and ``peak_rms`` (read before ``step`` moves); None where κ = 0.  One
    ``_foreach_norm`` over the gradients and a few ops on the stacked scalars, whatever the number of tensors."""
    if is_zero(group.get("relative_eps", 0.0)):
        return None
    for st, g in zip(states, grads):  # a group given κ after its state was made
        if "peak_rms" not in st:
            st.update(peak_rms_init(g))
    carried = {k: torch.stack([st[k] for st in states]) for k in ("peak_rms", "mean_sq")}
    norms = [sharding.gathered(n).to(carried["mean_sq"].dtype) for n in torch._foreach_norm(grads)]
    mean_sq = torch.stack(torch._foreach_div(torch._foreach_mul(norms, norms), [float(g.numel()) for g in grads]))
    steps = torch.stack([st["step"] for st in states]) + 1
    new = peak_rms_carry(carried, mean_sq, steps, group["beta2"])
    for key, value in new.items():
        torch._foreach_copy_([st[key] for st in states], list(value.unbind()))
    return group["eps"] + group["relative_eps"] * new["peak_rms"]


def foreach_output_nonlinearity(group: dict[str, Any], direction: list[Tensor]) -> list[Tensor]:
    """σ over a list: Newton–Schulz on the tensors with ≥ 2 dims, batched by shape, when asked for."""
    if group["nonlinearity"] != "newton_schulz":
        return direction
    return orthogonalize_many(direction, group["ns_dtype"])
