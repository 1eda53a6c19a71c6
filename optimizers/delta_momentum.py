"""DeltaMomentum: momentum as an ℓ2-regression memory, updated by the delta rule
(see ``deepopt.rules.delta``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from deepopt.rules import delta_momentum

from . import delta_kernels
from .base import MemoryOptimizer
from .momentum import foreach_output_nonlinearity, foreach_precondition


class DeltaMomentum(MemoryOptimizer):
    """Delta-rule momentum (Nested Learning Eq. 21–22 / 48–49), keys = normalized gradients::

        m ← α·m − β·⟨m, k̂⟩·k̂ + P g,  k̂ = g/‖g‖;     W ← W − lr·σ(m)

    ``momentum`` is α, ``beta`` the erasure strength (0 ≤ β ≤ 1 + α; β = 0 is ``Momentum``).
    ``keys="rows"`` uses the rows of 2-D gradients as keys, ``m(αI − βK̂ᵀK̂)``.  Further options:
    ``weight_decay``, ``decoupled_weight_decay``, ``preconditioner`` ("identity" | "adam"),
    ``nonlinearity`` (None | "newton_schulz"), ``foreach``, ``nonfinite``, ``capturable``.

    Weight decay: **coupled** (L2, ``g + wd·W``) with the identity preconditioner and **decoupled** (AdamW's, at
    the matching lr: ``W ← W − lr·wd/(1 − μ)·W``, ``transforms.decoupled_rate``) with ``preconditioner="adam"``, the
    default of ``decoupled_weight_decay=None``; ``True``/``False`` force either.
    """

    rule = delta_momentum

    def __init__(self, params: Any, lr: float = 1e-3, momentum: float = 0.9, beta: float = 0.5,
                 keys: str = "tensor", weight_decay: float = 0.0, **options: Any) -> None:
        super().__init__(params, lr=lr, momentum=momentum, beta=beta, keys=keys, weight_decay=weight_decay,
                         **options)

    def _fast_step(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> bool:
        """All tensors at once: the per-tensor inner products ``⟨m, g⟩`` and ``‖g‖²`` come from ``_foreach``
        norms, row keys from batched matrix products over same-shape matrices.  On the CPU, where a
        multi-tensor op is a loop anyway and each out-of-place op allocates (and page-faults) a full-size
        temporary, the default options run an in-place loop instead (torch.optim's own CPU default); on CUDA
        they run two Triton launches (``delta_kernels``) when Triton is installed."""
        if any(isinstance(group[k], Tensor)
               for k in ("momentum", "beta", "weight_decay", "beta2", "eps", "relative_eps")):
            return False
        states = [self.state[p] for p in params]
        bufs = [st["momentum_buffer"] for st in states]
        grads = self._foreach_weight_decay(group, params, grads)
        if _cpu_loop_applies(group, params):
            _cpu_loop_step(group, states, params, grads)
            return True
        if _triton_applies(group, params):
            delta_kernels.delta_momentum_step_(params, grads, bufs, group["lr"], group["momentum"], group["beta"])
            return True
        values = foreach_precondition(group, states, grads)
        rows = [i for i, g in enumerate(grads) if group["keys"] == "rows" and g.dim() >= 2]
        keyed = sorted(set(range(len(grads))) - set(rows))
        # both erasures read m before the α scaling
        erased = _erase_along_rows([bufs[i] for i in rows], [grads[i] for i in rows], group["beta"]) if rows else []
        if keyed:  # −β⟨m, g⟩/‖g‖² per tensor-keyed tensor
            keyed_bufs, keyed_grads = [bufs[i] for i in keyed], [grads[i] for i in keyed]
            coef = _inner_products(keyed_bufs, keyed_grads) / _squared_norms(keyed_grads) * -group["beta"]
        torch._foreach_mul_(bufs, group["momentum"])
        if keyed:
            torch._foreach_addcmul_(keyed_bufs, keyed_grads, list(coef.unbind()))
        if rows:
            torch._foreach_sub_([bufs[i] for i in rows], erased)
        torch._foreach_add_(bufs, values)
        self._foreach_descend(params, foreach_output_nonlinearity(group, bufs), group["lr"])
        return True


def _cpu_loop_applies(group: dict[str, Any], params: list[Tensor]) -> bool:
    return _default_layout(group) and all(p.device.type == "cpu" for p in params)


def _triton_applies(group: dict[str, Any], params: list[Tensor]) -> bool:
    return (_default_layout(group) and all(p.device.type == "cuda" for p in params)
            and delta_kernels.available(params))


def _default_layout(group: dict[str, Any]) -> bool:
    return group["preconditioner"] == "identity" and group["nonlinearity"] is None and group["keys"] == "tensor"


def _cpu_loop_step(group: dict[str, Any], states: list[dict[str, Tensor]], params: list[Tensor],
                   grads: list[Tensor]) -> None:
    """``m ← α m + (1 − β⟨m, g⟩/‖g‖²)·g;  W ← W − lr·m`` tensor by tensor, in place, with the coefficient a
    0-dim tensor (nothing read on the host)."""
    lr, alpha, beta = group["lr"], group["momentum"], group["beta"]
    for st, p, g in zip(states, params, grads):
        m = st["momentum_buffer"]
        mf, gf = m.reshape(-1), g.reshape(-1)
        sq = torch.dot(gf, gf)
        coef = 1 - beta * torch.dot(mf, gf) / sq.clamp(min=torch.finfo(sq.dtype).tiny)
        m.mul_(alpha).addcmul_(g, coef)
        if isinstance(lr, Tensor):
            p.addcmul_(m, lr, value=-1)
        else:
            p.add_(m, alpha=-lr)


def _inner_products(a: list[Tensor], b: list[Tensor]) -> Tensor:
    """``[⟨aᵢ, bᵢ⟩]`` as one vector: Σx = 2·Σmax(x, 0) − Σ|x| for x = aᵢ ⊙ bᵢ, from two ℓ1 ``_foreach_norm``
    launches (its rounding error is that of a direct sum, ∝ Σ|x|)."""
    prod = torch._foreach_mul(a, b)
    absolute = torch.stack(torch._foreach_norm(prod, ord=1))
    positive = torch.stack(torch._foreach_norm(torch._foreach_clamp_min(prod, 0.0), ord=1))
    return 2 * positive - absolute


def _squared_norms(tensors: list[Tensor]) -> Tensor:
    """``[‖tᵢ‖²]``; a zero key gives ⟨m, 0⟩ = 0 whatever it is divided by, so clamping at the smallest normal
    number stands in for the rule's ``where(sq > 0, sq, 1)``."""
    sq = torch.stack(torch._foreach_norm(tensors, ord=2)) ** 2
    return sq.clamp(min=torch.finfo(sq.dtype).tiny)


def _erase_along_rows(bufs: list[Tensor], grads: list[Tensor], beta: float) -> list[Tensor]:
    """``β·m K̂ᵀK̂`` per matrix (``keys="rows"``), same-shape matrices stacked into one batched product in
    the cheaper evaluation order."""
    by_shape: dict[torch.Size, list[int]] = {}
    for i, g in enumerate(grads):
        by_shape.setdefault(g.shape, []).append(i)
    out: list[Tensor] = list(bufs)
    for shape, idx in by_shape.items():
        m, g = torch.stack([bufs[i] for i in idx]), torch.stack([grads[i] for i in idx])
        if len(shape) != 2:
            m, g = m.reshape(len(idx), shape[0], -1), g.reshape(len(idx), shape[0], -1)
        sq = torch.linalg.vector_norm(g, dim=(1, 2), keepdim=True) ** 2
        scale = beta / sq.clamp(min=torch.finfo(sq.dtype).tiny)
        rows, cols = g.shape[1:]
        erased = torch.bmm(torch.bmm(m, g.mT), g) if rows <= cols else torch.bmm(m, torch.bmm(g.mT, g))
        erased = scale * erased
        for i, e in zip(idx, (erased if len(shape) == 2 else erased.reshape(len(idx), *shape)).unbind(0)):
            out[i] = e
    return out
