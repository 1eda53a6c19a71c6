"""DeepMomentum: momentum with a per-coordinate memory and a deep read-out (see ``deepopt.rules.deep``)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from deepopt.checkpoint import load_pretrained
from deepopt.rules import deep_momentum
from deepopt.rules import transforms as T
from deepopt.rules.deep import decayed_lr

from .base import MemoryOptimizer, is_dtensor
from .delta_momentum import _inner_products, _squared_norms
from .momentum import foreach_output_nonlinearity, foreach_precondition

# activations with an in-place multi-tensor op (the others take the rule path)
_FOREACH_ACTIVATIONS = {
    "tanh": torch._foreach_tanh_,
    "relu": lambda ts: torch._foreach_clamp_min_(ts, 0.0),
    "identity": lambda ts: None,
}


@dataclass
class _Blocks:
    """Flat work buffers for one list of parameters, each tensor zero-padded to whole key blocks, with views
    made once: ``as_param[i]`` shaped like parameter i (for ``_foreach_copy_`` in), ``rows[i]`` its
    ``(n_i, key_dim)`` block view and ``cols[i]`` that view transposed."""

    buffer: Tensor
    as_param: list[Tensor]
    rows: list[Tensor]
    cols: list[Tensor]
    sqrt_counts: Tensor  # √n_i, blocks per tensor

    @classmethod
    def like(cls, params: list[Tensor], key_dim: int) -> _Blocks:
        sizes = [math.ceil(p.numel() / key_dim) * key_dim for p in params]
        buffer = params[0].new_zeros(sum(sizes))
        as_param, rows = [], []
        for p, part in zip(params, buffer.split(sizes)):
            as_param.append(part[: p.numel()].view(p.shape))
            rows.append(part.view(-1, key_dim))
        counts = torch.tensor([r.shape[0] for r in rows], dtype=buffer.dtype)
        return cls(buffer, as_param, rows, [r.mT for r in rows], counts.sqrt().to(buffer.device))


class DeepMomentum(MemoryOptimizer):
    """Deep Momentum Gradient Descent (Nested Learning Eq. 23 / 50)::

        m ← α·m + P g                          (objective="dot";  "l2": m ← α·m − β⟨m, k̂⟩k̂ + P g)
        W₁ ← α·W₁ − η·∇_{W₁} ℓ(W₁; Φ̂(K), V),   Φ̂(K) = σ(K W₂ᵀ)/r      (K, V: normalised key/value blocks)
        W ← W − lr_t·σ_out(m + s_v·Φ̂(K) W₁ᵀ),   lr_t = lr/(1 + lr_decay·(t − 1))

    ``momentum`` is α; ``eta`` the read-out's inner learning rate; ``hidden`` its width (0: no deep
    branch, then this is ``Momentum``, or ``DeltaMomentum`` with ``objective="l2"``); ``key_dim`` the
    coordinates per key block; ``key_source`` keys on the raw ("gradient") or preconditioned gradient.
    ``memory_init=(W1, W2)`` sets θ₀ (what meta-training learns; see ``from_pretrained``), else W₁ = 0 and
    W₂ ~ init_scale·N(0, 1) drawn from ``seed``.  Further options: ``weight_decay``,
    ``decoupled_weight_decay``, ``preconditioner`` ("identity" | "adam"), ``nonlinearity``, ``foreach``,
    ``nonfinite``.  The full equations are in ``deepopt.rules.deep``.
    """

    rule = deep_momentum

    def __init__(self, params: Any, lr: float = 1e-3, momentum: float = 0.9, eta: float = 0.1,
                 hidden: int = 16, key_dim: int = 16, objective: str = "dot", **options: Any) -> None:
        super().__init__(params, lr=lr, momentum=momentum, eta=eta, hidden=hidden, key_dim=key_dim,
                         objective=objective, **options)
        self._blocks: dict[tuple, _Blocks] = {}  # work buffers (not state: rebuilt on demand)

    def __getstate__(self) -> dict[str, Any]:  # copies and pickles leave the work buffers behind
        return {**super().__getstate__(), "_blocks": {}}

    def _work(self, params: list[Tensor], key_dim: int, role: str) -> _Blocks:
        key = (role, key_dim, *map(id, params))
        if key not in self._blocks:
            if len(self._blocks) > 4 * (len(self.param_groups) + 1):
                self._blocks.clear()
            self._blocks[key] = _Blocks.like(params, key_dim)
        return self._blocks[key]

    def _fast_step(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> bool:
        """The rule over all tensors at once, in a number of kernels that does not grow with the number of
        tensors: the per-coordinate memory with ``_foreach`` ops, the deep read-out on block views of flat
        work buffers with ``_foreach_mm`` in the transposed layout (``Φᵀ = σ(W₂ Kᵀ/s)``, ``h × n``), so no
        per-tensor view is made after the first step::

            Φᵀ = σ((W₂/s_k) Kᵀ),  r = ‖Φ‖/√n,  C = ΦᵀV/(s_v r n)
            dot: W₁ᵀ ← α W₁ᵀ + η C;   l2: W₁ᵀ ← α W₁ᵀ − η(Φᵀ(Φ W₁ᵀ/r − V/s_v)/(r n))
            u = m + (W₁ s_v/r Φᵀ)ᵀ
        """
        hidden = group["hidden"]
        if (any(isinstance(group[k], Tensor) for k in ("momentum", "eta", "beta", "weight_decay", "lr_decay",
                                                          "beta2", "eps"))
                or (hidden and group["activation"] not in _FOREACH_ACTIVATIONS)
                or (group["lr_decay"] != 0 and group["decoupled_weight_decay"] and group["weight_decay"] != 0)
                or len({(p.dtype, p.device) for p in params}) > 1):
            return False
        states = [self.state[p] for p in params]
        bufs = [st["momentum_buffer"] for st in states]
        grads = self._foreach_weight_decay(group, params, grads)
        values = foreach_precondition(group, states, grads)
        if group["preconditioner"] != "adam":
            torch._foreach_add_([st["step"] for st in states], 1)
        keys = values if group["key_source"] == "preconditioned" else grads
        if group["objective"] == "l2":  # −β⟨m, k⟩/‖k‖² per tensor, read before the α scaling
            coef = _inner_products(bufs, keys) / _squared_norms(keys) * -group["beta"]
        torch._foreach_mul_(bufs, group["momentum"])
        if group["objective"] == "l2":
            torch._foreach_addcmul_(bufs, keys, list(coef.unbind()))
        torch._foreach_add_(bufs, values)
        direction = bufs
        if hidden:
            direction = self._deep_read(group, params, states, keys, values)
        lr = group["lr"]
        if group["lr_decay"] != 0:
            steps = T.step_float(torch.stack([st["step"] for st in states]), params[0])  # fp32 for bf16 params
            lr = decayed_lr(lr, group["lr_decay"], steps)
            direction = torch._foreach_mul(direction, list(lr.unbind()))
            lr = 1.0
        self._foreach_descend(params, foreach_output_nonlinearity(group, direction), lr)
        return True

    def _deep_read(self, group: dict[str, Any], params: list[Tensor], states: list[dict[str, Tensor]],
                   keys: list[Tensor], values: list[Tensor]) -> list[Tensor]:
        """Updates every W₁ and returns ``u = m + s_v·Φ̂W₁ᵀ`` as views (shaped like the parameters) of a
        work buffer.  With ``N_x = ‖x‖`` per tensor, ``s = N/√n`` and ``r = N_Φ/√n``, so the scale factors
        are ``√n/N_k`` (keys), ``1/(N_v N_Φ)`` (C) and ``N_v/N_Φ`` (read)."""
        kd, alpha, eta = group["key_dim"], group["momentum"], group["eta"]
        key_blocks = self._work(params, kd, "keys")
        torch._foreach_copy_(key_blocks.as_param, keys)
        value_blocks = key_blocks
        if values is not keys:
            value_blocks = self._work(params, kd, "values")
            torch._foreach_copy_(value_blocks.as_param, values)

        def norms(tensors: list[Tensor]) -> Tensor:  # ‖t‖ per tensor, 1 for a zero tensor
            n = torch.stack(torch._foreach_norm(tensors))
            return n.masked_fill(n == 0, 1.0)

        n_k = norms(key_blocks.rows)
        n_v = n_k if value_blocks is key_blocks else norms(value_blocks.rows)
        w2 = torch.stack([st["W2"] for st in states]) * (key_blocks.sqrt_counts / n_k).view(-1, 1, 1)
        phi_t = torch._foreach_mm(list(w2.unbind()), key_blocks.cols)  # Φᵀ = σ(W₂Kᵀ/s_k), (h, n) each
        _FOREACH_ACTIVATIONS[group["activation"]](phi_t)
        n_phi = norms(phi_t)
        w1 = torch.stack([st["W1"] for st in states])  # (T, kd, h)
        corr = torch.stack(torch._foreach_mm(phi_t, value_blocks.rows)).mT  # VᵀΦ, (T, kd, h)
        step = corr * (eta / (n_v * n_phi)).view(-1, 1, 1)  # η V̂ᵀΦ̂/n
        if group["objective"] == "l2":  # − η(Φ̂W₁ᵀ)ᵀΦ̂/n, via Φ̂W₁ᵀ in a work buffer
            read_t = torch._foreach_mm(list(w1.unbind()), phi_t)  # (kd, n) each, times r
            read = self._work(params, kd, "read")
            torch._foreach_copy_(read.cols, read_t)
            gram_w1 = torch.stack(torch._foreach_mm(phi_t, read.rows)).mT
            step = step - gram_w1 * (eta / (n_phi * n_phi)).view(-1, 1, 1)
        w1 = torch.add(step, w1, alpha=alpha)
        for st, w in zip(states, w1.unbind()):
            st["W1"] = w
        out_t = torch._foreach_mm(list((w1 * (n_v / n_phi).view(-1, 1, 1)).unbind()), phi_t)  # (kd, n) each
        out = self._work(params, kd, "direction")
        torch._foreach_copy_(out.cols, out_t)
        torch._foreach_add_(out.as_param, [st["momentum_buffer"] for st in states])
        return out.as_param

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        if any(is_dtensor(p) for p in group.get("params", ()) if isinstance(p, Tensor)):
            raise TypeError("DeepMomentum does not take sharded DTensor parameters (FSDP2) yet: its memory "
                            "reads whole gradient tensors; use DistributedDataParallel, or another deepopt "
                            "optimizer under FSDP2")

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, params: Any, **overrides: Any) -> DeepMomentum:
        """A ``DeepMomentum`` from a folder written by ``deepopt.checkpoint.save_pretrained``.

        The saved hyperparameters and memory state θ₀ (``W1``, ``W2``) are used; ``overrides`` replace
        any hyperparameter (e.g. ``lr``).
        """
        name, hparams, tensors = load_pretrained(path)
        if name != cls.__name__:
            raise ValueError(f"{path} holds a {name}, not a {cls.__name__}")
        if set(tensors) != {"W1", "W2"}:
            raise ValueError(f"{path}: memory tensors must be W1 and W2, found {sorted(tensors)}")
        hparams.pop("memory_init", None)
        kwargs = {**hparams, "memory_init": (tensors["W1"], tensors["W2"]), **overrides}
        return cls(params, **kwargs)
