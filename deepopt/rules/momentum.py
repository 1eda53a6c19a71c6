"""Momentum as a memory: a vector ``m`` trained on −⟨m, g⟩ (dot product), one step per gradient.

    g ← g + wd·W               (coupled weight decay; decoupled: W ← W − lr·wd·W)
    m ← μ·m + P g              (P: identity or Adam's diagonal preconditioner)
    u ← P g + μ·m  if nesterov else m
    W ← W − lr·σ(u)            (σ: identity or Newton–Schulz; momentum + Newton–Schulz = Muon)

With P = identity and σ = identity this is ``torch.optim.SGD(momentum=μ, nesterov=…)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import transforms as T
from .base import Hparams, Rule, State, check_bool, check_range

DEFAULTS = {"lr": 1e-3, "momentum": 0.9, "nesterov": False, **T.SHARED_DEFAULTS}


def init(param: Tensor, hp: Hparams) -> State:
    return {"momentum_buffer": torch.zeros_like(param), **T.init_preconditioner(param, hp)}


def update(grad: Tensor, state: State, param: Tensor, hp: Hparams) -> tuple[Tensor, State]:
    g = T.coupled_weight_decay(grad, param, hp)
    value, pstate = T.precondition(g, state, hp)
    buf = hp["momentum"] * state["momentum_buffer"] + value
    direction = value + hp["momentum"] * buf if hp["nesterov"] else buf
    delta = T.descend(T.output_nonlinearity(direction, hp), param, hp)
    return delta, {"momentum_buffer": buf, **pstate}


def validate(hp: Hparams) -> None:
    T.validate_shared(hp)
    check_range("momentum", hp["momentum"], 0.0, 1.0, high_open=True)
    check_bool("nesterov", hp["nesterov"])
    if hp["nesterov"] and float(hp["momentum"]) == 0:
        raise ValueError("nesterov=True requires momentum in (0, 1), got momentum=0")


momentum = Rule(
    "momentum", DEFAULTS, init, update, validate, doc=__doc__, elementwise=lambda hp: hp["nonlinearity"] is None,
    complex_ok=lambda hp: hp["nonlinearity"] is None,
)
