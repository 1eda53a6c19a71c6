"""Options shared by the memory rules: weight decay, preconditioner ``P`` and output nonlinearity σ.

Each is a small pure function so every rule composes them the same way::

    g      = coupled_weight_decay(grad, param, hp)          # g + wd·W    (coupled)
    v, s   = precondition(g, state, hp)                     # P g         (identity or Adam's diagonal)
    u      = memory update producing the direction
    u      = output_nonlinearity(u, hp)                     # σ(u)        (identity or Newton–Schulz)
    delta  = descend(u, param, hp)                          # −lr·u − lr·wd·W (decoupled)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import Hparams, State, check_bool, check_choice, check_range

PRECONDITIONERS = ("identity", "adam")
NONLINEARITIES = (None, "newton_schulz")

SHARED_DEFAULTS: dict[str, Any] = {
    "weight_decay": 0.0,
    "decoupled_weight_decay": False,
    "preconditioner": "identity",
    "beta2": 0.999,
    "eps": 1e-8,
    "nonlinearity": None,
}


def validate_shared(hp: Hparams) -> None:
    check_range("lr", hp["lr"], 0.0)
    check_range("weight_decay", hp["weight_decay"], 0.0)
    check_bool("decoupled_weight_decay", hp["decoupled_weight_decay"])
    check_choice("preconditioner", hp["preconditioner"], PRECONDITIONERS)
    check_range("beta2", hp["beta2"], 0.0, 1.0, high_open=True)
    check_range("eps", hp["eps"], 0.0)
    check_choice("nonlinearity", hp["nonlinearity"], NONLINEARITIES)


def coupled_weight_decay(grad: Tensor, param: Tensor, hp: Hparams) -> Tensor:
    """``g + wd·W`` for coupled (L2) weight decay, else ``g``."""
    if hp["decoupled_weight_decay"] or is_zero(hp["weight_decay"]):
        return grad
    return grad + hp["weight_decay"] * param


def descend(direction: Tensor, param: Tensor, hp: Hparams) -> Tensor:
    """``delta = −lr·u`` (``− lr·wd·W`` more with decoupled weight decay)."""
    delta = -hp["lr"] * direction
    if hp["decoupled_weight_decay"] and not is_zero(hp["weight_decay"]):
        delta = delta - hp["lr"] * hp["weight_decay"] * param
    return delta


def init_preconditioner(param: Tensor, hp: Hparams) -> State:
    if hp["preconditioner"] == "adam":
        return {"step": new_step(param), "exp_avg_sq": torch.zeros_like(param)}
    return {}


def precondition(grad: Tensor, state: State, hp: Hparams) -> tuple[Tensor, State]:
    """``P g``: identity, or Adam's diagonal ``g / (sqrt(v_t / (1 − β₂ᵗ)) + ε)`` with ``v_t`` the EMA of g²."""
    if hp["preconditioner"] != "adam":
        return grad, {}
    step = state["step"] + 1
    beta2 = hp["beta2"]
    v = state["exp_avg_sq"] * beta2 + (1 - beta2) * grad * grad
    bias_correction2 = 1 - beta2 ** step_float(step, grad)  # 0-dim fp32: does not promote grad
    denom = sqrt0(v / bias_correction2) + hp["eps"]
    return grad / denom, {"step": step, "exp_avg_sq": v}


def sqrt0(v: Tensor) -> Tensor:
    """``√v`` for ``v ≥ 0`` whose derivative is 0, not ∞, where ``v = 0`` (a coordinate whose gradients
    were all zero so far): same values as ``v.sqrt()``, and no NaN meta-gradients through ``0·∞``."""
    positive = v > 0
    return torch.where(positive, torch.where(positive, v, torch.ones_like(v)).sqrt(), torch.zeros_like(v))


def newton_schulz(update: Tensor, steps: int = 5, eps: float = 1e-7) -> Tensor:
    """Approximate orthogonalisation ``U → (U Uᵀ)^{-1/2} U`` by the quintic Newton–Schulz iteration of Muon.

    Applies to the 2-D view ``(shape[0], -1)``; the result is scaled by ``sqrt(max(1, rows/cols))``.
    """
    shape = update.shape
    x = update.reshape(shape[0], -1)
    a, b, c = 3.4445, -4.7750, 2.0315
    transposed = x.shape[0] > x.shape[1]
    if transposed:
        x = x.mT
    x = x / (torch.linalg.matrix_norm(x) + eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    if transposed:
        x = x.mT
    return (x * max(1.0, x.shape[0] / x.shape[1]) ** 0.5).reshape(shape)


def output_nonlinearity(direction: Tensor, hp: Hparams) -> Tensor:
    """σ on the update: Newton–Schulz for tensors with ≥ 2 dims when asked for, identity otherwise."""
    if hp["nonlinearity"] == "newton_schulz" and direction.dim() >= 2:
        return newton_schulz(direction)
    return direction


def is_zero(value: Any) -> bool:
    return not isinstance(value, Tensor) and value == 0


def step_dtype() -> torch.dtype:
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def new_step(param: Tensor) -> Tensor:
    """A fresh step counter: a 0-dim tensor on ``param``'s device (so no kernel waits on the host)."""
    return torch.zeros((), dtype=step_dtype(), device=param.device)


def step_float(step: Tensor, like: Tensor) -> Tensor:
    """``step`` as a float for bias corrections and schedules: fp64 for fp64 tensors, else fp32, so that
    ``1 − β₂ᵗ`` does not round to 0 in bf16/fp16 (the caller casts the small result, as torch does)."""
    return step.to(torch.float64 if like.dtype == torch.float64 else torch.float32)
