"""Adam as a memory: two element-wise memories (1st and 2nd moment), the optimum of an ℓ2
regression of the gradient (Nested Learning, App. B).

    g ← g + wd·W                      (coupled; decoupled = AdamW: W ← W − lr·wd·W)
    m ← β₁ m + (1 − β₁) g
    v ← β₂ v + (1 − β₂) g²
    W ← W − lr/(1 − β₁ᵗ) · m / (sqrt(v)/sqrt(1 − β₂ᵗ) + ε)

Same state names and arithmetic order as ``torch.optim.Adam``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import transforms as T
from .base import Hparams, Rule, State, check_betas, check_bool, check_range

DEFAULTS = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "decoupled_weight_decay": False}


def init(param: Tensor, hp: Hparams) -> State:
    return {
        "step": T.new_step(param),
        "exp_avg": torch.zeros_like(param),
        "exp_avg_sq": torch.zeros_like(param),
    }


def update(grad: Tensor, state: State, param: Tensor, hp: Hparams) -> tuple[Tensor, State]:
    beta1, beta2 = hp["betas"]
    g = T.coupled_weight_decay(grad, param, hp)
    step = state["step"] + 1
    m = state["exp_avg"] + (1 - beta1) * (g - state["exp_avg"])  # lerp, as torch computes it for β₁ > ½
    v = state["exp_avg_sq"] * beta2 + (1 - beta2) * g * g
    t = T.step_float(step, g)  # fp32 for low-precision g: 1 − β₂ᵗ must not round to 0
    denom = T.sqrt0(v) / (1 - beta2**t).sqrt() + hp["eps"]
    delta = T.descend(m / denom / (1 - beta1**t), param, hp)
    return delta, {"step": step, "exp_avg": m, "exp_avg_sq": v}


def validate(hp: Hparams) -> None:
    check_range("lr", hp["lr"], 0.0)
    check_betas("betas", hp["betas"])
    check_range("eps", hp["eps"], 0.0)
    check_range("weight_decay", hp["weight_decay"], 0.0)
    check_bool("decoupled_weight_decay", hp["decoupled_weight_decay"])


adam = Rule("adam", DEFAULTS, init, update, validate, doc=__doc__, elementwise=lambda hp: True)
