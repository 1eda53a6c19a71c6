"""SGD as a memory: the weights themselves, objective ⟨W k, u⟩ (dot product).

    W ← W − lr·(g + wd·W)

``momentum`` (default 0) and ``nesterov`` are accepted as ``torch.optim.SGD`` accepts them, so a
scheduler that cycles momentum (``OneCycleLR``) works as it does on torch's SGD: with μ > 0 the step is
the ``momentum`` rule's (``m ← μ·m + g``), with μ = 0 SGD keeps no state.
"""

from __future__ import annotations

from torch import Tensor

from . import momentum as momentum_rule
from . import transforms as T
from .base import Hparams, Rule, State, check_bool, check_range

DEFAULTS = {"lr": 1e-3, "momentum": 0.0, "nesterov": False, "weight_decay": 0.0}


def as_momentum_hparams(hp: Hparams) -> dict:
    """SGD's hyperparameters as the ``momentum`` rule's (identity P and σ, coupled weight decay)."""
    return {**T.SHARED_DEFAULTS, **{k: hp[k] for k in DEFAULTS}}


def has_momentum(hp: Hparams) -> bool:
    return not T.is_zero(hp["momentum"])


def init(param: Tensor, hp: Hparams) -> State:
    return momentum_rule.init(param, as_momentum_hparams(hp)) if has_momentum(hp) else {}


def update(grad: Tensor, state: State, param: Tensor, hp: Hparams) -> tuple[Tensor, State]:
    if has_momentum(hp):
        if "momentum_buffer" not in state:  # momentum switched on after the first step (e.g. by a scheduler)
            state = momentum_rule.init(param, as_momentum_hparams(hp))
        return momentum_rule.update(grad, state, param, as_momentum_hparams(hp))
    if not T.is_zero(hp["weight_decay"]):
        grad = grad + hp["weight_decay"] * param
    return -hp["lr"] * grad, {}


def validate(hp: Hparams) -> None:
    check_range("lr", hp["lr"], 0.0)
    check_range("weight_decay", hp["weight_decay"], 0.0)
    check_range("momentum", hp["momentum"], 0.0, 1.0, high_open=True)
    check_bool("nesterov", hp["nesterov"])
    if hp["nesterov"] and float(hp["momentum"]) == 0:
        raise ValueError("nesterov=True requires momentum in (0, 1), got momentum=0")


sgd = Rule("sgd", DEFAULTS, init, update, validate, doc=__doc__, elementwise=lambda hp: True)
