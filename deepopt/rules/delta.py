"""Delta-rule (ℓ2-regression) momentum: the memory ``m`` minimises ‖m·kᵀ − P g‖² over normalized
gradient keys, one gradient step per gradient (Nested Learning Eq. 21–22 / 48–49).

``keys="tensor"`` (default, O(N)): the whole gradient is one key ``k̂ = g/‖g‖``::

    m ← α·m − β·⟨m, k̂⟩·k̂ + P g          W ← W − lr·σ(m)

``keys="rows"``: the rows of the 2-D gradient ``G`` are the keys, ``K̂ = G/‖G‖_F``::

    m ← m·(α I − β K̂ᵀK̂) + P G          evaluated as (m K̂ᵀ) K̂ or m (K̂ᵀ K̂), whichever is cheaper

The term ``−β⟨m, k̂⟩k̂`` erases the memory's old association along the current key; with
0 ≤ β ≤ 1 + α the map ``αI − βk̂ᵀk̂`` is a contraction.  At β = 0 this is ``Momentum`` (α = μ).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import transforms as T
from .base import Hparams, Rule, State, check_choice, check_range

KEYS = ("tensor", "rows")
DEFAULTS = {"lr": 1e-3, "momentum": 0.9, "beta": 0.5, "keys": "tensor", **T.SHARED_DEFAULTS}


def init(param: Tensor, hp: Hparams) -> State:
    return {"momentum_buffer": torch.zeros_like(param), **T.init_preconditioner(param, hp)}


def erase_along_key(m: Tensor, key: Tensor, beta) -> Tensor:
    """``β⟨m, k̂⟩k̂`` with ``k̂ = key/‖key‖`` (zero when the key is zero)."""
    sq = (key * key).sum()
    coef = (m * key).sum() / torch.where(sq > 0, sq, torch.ones_like(sq))
    return (beta * coef) * key


def erase_along_rows(m: Tensor, key: Tensor, beta) -> Tensor:
    """``β·m K̂ᵀK̂`` for the 2-D view of ``m`` and ``K̂ = G/‖G‖_F``, in the cheaper evaluation order."""
    m2, g2 = m.reshape(m.shape[0], -1), key.reshape(key.shape[0], -1)
    sq = (g2 * g2).sum()
    scale = beta / torch.where(sq > 0, sq, torch.ones_like(sq))
    rows, cols = g2.shape
    erased = (m2 @ g2.mT) @ g2 if rows <= cols else m2 @ (g2.mT @ g2)
    return (scale * erased).reshape(m.shape)


def update(grad: Tensor, state: State, param: Tensor, hp: Hparams) -> tuple[Tensor, State]:
    g = T.coupled_weight_decay(grad, param, hp)
    value, pstate = T.precondition(g, state, hp)
    m = state["momentum_buffer"]
    erase = erase_along_rows if hp["keys"] == "rows" and g.dim() >= 2 else erase_along_key
    buf = hp["momentum"] * m - erase(m, g, hp["beta"]) + value
    delta = T.descend(T.output_nonlinearity(buf, hp), param, hp)
    return delta, {"momentum_buffer": buf, **pstate}


def validate(hp: Hparams) -> None:
    T.validate_shared(hp)
    check_range("momentum", hp["momentum"], 0.0, 1.0, high_open=True)
    check_range("beta", hp["beta"], 0.0, 1.0 + float(hp["momentum"]))
    check_choice("keys", hp["keys"], KEYS)


delta_momentum = Rule(
    "delta_momentum", DEFAULTS, init, update, validate, doc=__doc__,
    # keys="tensor" on the real view is the conjugated inner product Re⟨m, g⟩ of a complex parameter
    complex_ok=lambda hp: hp["keys"] == "tensor" and hp["nonlinearity"] is None,
)
