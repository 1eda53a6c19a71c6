"""DeepMomentum (DMGD): momentum as an MLP memory trained online (see ``deepopt.rules.deep``)."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from deepopt.checkpoint import load_pretrained
from deepopt.rules import deep_momentum
from deepopt.rules.deep import ACTIVATIONS, INPLACE_ACTIVATIONS, decayed_lr

from .base import MemoryOptimizer, is_dtensor


class DeepMomentum(MemoryOptimizer):
    """Deep Momentum Gradient Descent (Nested Learning Eq. 23 / 50), one MLP memory per tensor::

        K = blocks(g)/s_g,  V = blocks(P g)/s_Pg;   θ ← α·θ − η·∇_θ ℓ(θ; K, V);   W ← W − lr·σ(s_Pg·M_θ(K))

    with ``s = ‖·‖/√n`` the RMS norm of the ``n`` blocks, ``M_θ(x) = x + W₁ act(W₂ x)`` on key blocks of
    ``key_dim`` coordinates, ``hidden`` units, and
    ``objective`` "dot" (``ℓ = −⟨M(k), v⟩``) or "l2" (``ℓ = ½‖M(k) − v‖²``); ``lr_decay`` ≥ 0 gives step t
    the learning rate ``lr/(1 + lr_decay·(t − 1))`` (0: constant, the default).  ``memory_init=(W1, W2)``
    sets the initial state θ₀ (what meta-training learns; see ``from_pretrained``), else W₁ = 0 and
    W₂ ~ init_scale·N(0, 1) drawn from ``seed``.  Further options: ``weight_decay``,
    ``decoupled_weight_decay``, ``preconditioner``, ``nonlinearity``, ``foreach``, ``nonfinite``.
    """

    rule = deep_momentum

    def __init__(self, params: Any, lr: float = 1e-3, alpha: float = 0.9, eta: float = 0.5, hidden: int = 16,
                 key_dim: int = 16, activation: str = "tanh", objective: str = "dot", **options: Any) -> None:
        super().__init__(params, lr=lr, alpha=alpha, eta=eta, hidden=hidden, key_dim=key_dim,
                         activation=activation, objective=objective, **options)

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        if any(is_dtensor(p) for p in group.get("params", ()) if isinstance(p, Tensor)):
            raise TypeError("DeepMomentum does not take sharded DTensor parameters (FSDP2) yet: its memory "
                            "reads whole gradient tensors; use DistributedDataParallel, or another deepopt "
                            "optimizer under FSDP2")

    def _fast_step(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> bool:
        """The dot-objective rule with the key scale folded into the small matrices, so the keys
        ``K = G/s`` are never materialised, the two gradient GEMMs share one pass over ``G``, and the
        step lands on ``W`` in place::

            [Z | A] = G [W₂ᵀ | W₁]/s,  H = σ(Z),  [∇W₁ | ∇W₂ᵀ] = −Gᵀ[H | σ'(Z) ⊙ A]/(n s)
            W ← W − lr·G − lr·s·σ(G W₂'ᵀ/s) W₁'ᵀ

        (right-hand matrices are passed in ``F.linear``'s (out, in) layout, the fast one for
        tall-skinny GEMMs on CPU).
        """
        if (group["objective"] != "dot" or group["preconditioner"] != "identity"
                or group["nonlinearity"] is not None or isinstance(group["lr"], Tensor)
                or any(isinstance(group[k], Tensor) for k in ("alpha", "eta", "weight_decay", "lr_decay"))):
            return False
        alpha, eta, kd, hd = group["alpha"], group["eta"], group["key_dim"], group["hidden"]
        act, act_grad = ACTIVATIONS[group["activation"]]
        act_, scale_by_grad_ = INPLACE_ACTIVATIONS.get(group["activation"], (None, None))
        for p, g in zip(params, grads):
            if p.numel() % kd or not p.is_contiguous():
                self._rule_step(group, [p], [g])
                continue
            state = self.state[p]
            state["step"] += 1
            lr = group["lr"] if group["lr_decay"] == 0 else decayed_lr(group["lr"], group["lr_decay"],
                                                                        float(state["step"]))
            (g,) = self._foreach_weight_decay({**group, "lr": lr}, [p], [g])
            blocks = g.reshape(-1, kd)
            n = blocks.shape[0]
            sq = float(torch.dot(blocks.reshape(-1), blocks.reshape(-1)))
            s = (sq / n) ** 0.5 if sq > 0 else 1.0
            w1, w2 = state["W1"], state["W2"]
            za = F.linear(blocks, torch.cat([w2, w1.mT]) / s)
            z, a = za[:, :hd], za[:, hd:]
            if act_ is not None:  # za ← [σ(Z) | σ'(Z) ⊙ A] without temporaries
                scale_by_grad_(a, act_(z))
            else:
                h = act(z)
                a.mul_(act_grad(z, h))
                z.copy_(h)
            grads_w = (blocks.mT @ za) / (-n * s)
            w1 = state["W1"] = alpha * w1 - eta * grads_w[:, :hd]
            w2 = state["W2"] = alpha * w2 - eta * grads_w[:, hd:].mT
            p.add_(g, alpha=-lr)
            z_new = F.linear(blocks, w2 / s)
            p.view(-1, kd).addmm_(act_(z_new) if act_ is not None else act(z_new), w1.mT, alpha=-lr * s)
        return True

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
