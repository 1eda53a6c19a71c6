"""SGD as a memory: the weights themselves, objective ⟨W k, u⟩ (dot product).

    W ← W − lr·(g + wd·W)
"""

from __future__ import annotations

from torch import Tensor

from .base import Hparams, Rule, State, check_range
from .transforms import is_zero

DEFAULTS = {"lr": 1e-3, "weight_decay": 0.0}


def init(param: Tensor, hp: Hparams) -> State:
    return {}


def update(grad: Tensor, state: State, param: Tensor, hp: Hparams) -> tuple[Tensor, State]:
    if not is_zero(hp["weight_decay"]):
        grad = grad + hp["weight_decay"] * param
    return -hp["lr"] * grad, {}


def validate(hp: Hparams) -> None:
    check_range("lr", hp["lr"], 0.0)
    check_range("weight_decay", hp["weight_decay"], 0.0)


sgd = Rule("sgd", DEFAULTS, init, update, validate, doc=__doc__, elementwise=lambda hp: True)
