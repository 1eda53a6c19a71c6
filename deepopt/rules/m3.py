"""M3, Multi-scale Momentum Muon (Nested Learning, arXiv 2512.24695 §7.2, Algorithm 1): the Continuum
Memory System applied to the optimizer.  Two momentum memories of the gradients at two frequencies, each
orthogonalised by Newton–Schulz, combined, and divided by a second-moment memory::

    g ← ∇L(W_t);  t ← t + 1
    M¹ ← β₁·M¹ + (1 − β₁)·g                 fast memory, every step
    V  ← β₂·V  + (1 − β₂)·g²                second moment, every step           (second_moment=True)
    O¹ ← NS_T(M¹)   (nesterov: NS_T((1 − β₁)·g + β₁·M¹), Muon's look-ahead)
    W  ← W − lr·(O¹ + α·O²) / √(V/(1 − β₂ᵗ) + ε) − lr·wd·W              (without V: W − lr·(O¹ + α·O²))
    S  ← S + g                               the current chunk's gradients
    every `chunk` (f) steps:  M² ← β₃·M² + (1 − β₃)·S;  O² ← NS_T(M²);  S ← 0     slow memory

so the slow term of the steps ``kf+1 … (k+1)f`` is built from the gradients of the chunks before (the
paper's inner/outer loop; O² = 0 during the first chunk).  ``accumulate="sum"`` is Algorithm 1 as printed:
``M¹ ← M¹ + β₁g``, ``V ← V + β₂g²``, ``M² ← M² + β₃S`` (no decay, no bias correction), where ``β₁, β₃``
only scale what Newton–Schulz normalises away, and the V sum makes the step decay like AdaGrad's; the
default ``"ema"`` reads the paper's "momentum factors 1 > β" as the decays of Muon's and Adam's moving
averages, the two memories M3 is built from.  NS_T is Muon's quintic iteration (``T = ns_steps``,
``transforms.newton_schulz``, which also scales by √max(1, rows/cols) as ``torch.optim.Muon`` does) on
the ``(shape[0], -1)`` view of tensors with ≥ 2 dims, in the tensors' dtype or ``ns_dtype``
(``"bfloat16"``: torch.optim.Muon's precision, and its speed on hardware with fast bf16 matmuls); tensors
with fewer dims are not orthogonalised, so there M3 is EMA momentum (Adam-like with V).  With
``alpha=0, second_moment=False, nesterov=True`` M3 is ``torch.optim.Muon(lr, momentum=β₁,
weight_decay=wd)`` with its default (``"original"``) lr adjustment.  The paper indexes the slow sum from
``(k−1)f`` to ``kf`` (f + 1 gradients); each gradient is counted once here.

Departures from Algorithm 1 as printed, each an option (``M3(paper=True)`` turns all three back):
``accumulate="ema"`` (sums → moving averages), ``second_moment=False`` (no division by √V) and
``nesterov=True`` (Muon's look-ahead, which the paper does not have).  Defaults (the paper gives none):
Muon's β₁ = 0.95 and lr 0.02, f = 10, β₃ = 0.9, α = 0.1.  The second moment is off because dividing an
orthogonalised step element-wise by √V̂ makes it ``lr·O/|g|``, unbounded where gradients are small; with
its own lr sweep it still trains worse than without it (``docs/m3.md``: ``deepopt compare`` with
``m3``, ``m3_v``, ``m3_sum``, ``m3_paper``, each variant with its own 9-lr sweep).

The chunk phase is ``step mod f``, read from the ``step`` counter in the state on the device (here a
``torch.where``), never from a count kept elsewhere: a restored state steps as the uninterrupted run.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import transforms as T
from .base import Hparams, Rule, State, check_bool, check_choice, check_int, check_range

ACCUMULATIONS = ("ema", "sum")
DEFAULTS = {
    "lr": 0.02,
    "momentum": 0.95,
    "slow_momentum": 0.9,
    "beta2": 0.999,
    "alpha": 0.1,
    "chunk": 10,
    "second_moment": False,
    "nesterov": True,
    "accumulate": "ema",
    "ns_steps": 5,
    "ns_dtype": None,
    "eps": 1e-8,
    "weight_decay": 0.0,
}


def init(param: Tensor, hp: Hparams) -> State:
    state = {"step": T.new_step(param), "fast": torch.zeros_like(param), "slow": torch.zeros_like(param),
             "chunk_sum": torch.zeros_like(param), "slow_ortho": torch.zeros_like(param)}
    if hp["second_moment"]:
        state["exp_avg_sq"] = torch.zeros_like(param)
    return state


def accumulate(memory: Tensor, value: Tensor, beta, hp: Hparams) -> Tensor:
    """``β·M + (1 − β)·x`` (``"ema"``) or ``M + β·x`` (``"sum"``, Algorithm 1 as printed)."""
    if hp["accumulate"] == "ema":
        return beta * memory + (1 - beta) * value
    return memory + beta * value


def orthogonalize(x: Tensor, hp: Hparams) -> Tensor:
    """``NS_T(x)`` for tensors with ≥ 2 dims, ``x`` itself for the rest."""
    return orthogonalize_many([x], hp)[0]


def orthogonalize_many(xs: list[Tensor], hp: Hparams) -> list[Tensor]:
    """``[NS_T(x) if x.dim() >= 2 else x for x in xs]`` in ``ns_dtype`` (``transforms.orthogonalize_many``)."""
    return T.orthogonalize_many(xs, hp["ns_dtype"], hp["ns_steps"])


def look_ahead(grad: Tensor, fast: Tensor, hp: Hparams) -> Tensor:
    """What the fast memory would hold after one more step on ``grad`` (Nesterov), or the memory itself."""
    return accumulate(fast, grad, hp["momentum"], hp) if hp["nesterov"] else fast


def update(grad: Tensor, state: State, param: Tensor, hp: Hparams) -> tuple[Tensor, State]:
    step = state["step"] + 1
    fast = accumulate(state["fast"], grad, hp["momentum"], hp)
    direction = orthogonalize(look_ahead(grad, fast, hp), hp) + hp["alpha"] * state["slow_ortho"]
    new = {"step": step, "fast": fast}
    if hp["second_moment"]:
        v = accumulate(state["exp_avg_sq"], grad * grad, hp["beta2"], hp)
        direction = direction / second_moment_denominator(v, step, grad, hp)
        new["exp_avg_sq"] = v
    delta = -hp["lr"] * direction
    if not T.is_zero(hp["weight_decay"]):
        delta = delta - hp["lr"] * hp["weight_decay"] * param
    chunk_sum = state["chunk_sum"] + grad
    boundary = torch.remainder(step, hp["chunk"]) == 0
    slow = accumulate(state["slow"], chunk_sum, hp["slow_momentum"], hp)
    new["slow"] = torch.where(boundary, slow, state["slow"])
    new["slow_ortho"] = torch.where(boundary, orthogonalize(slow, hp), state["slow_ortho"])
    new["chunk_sum"] = torch.where(boundary, torch.zeros_like(chunk_sum), chunk_sum)
    return delta, new


def second_moment_denominator(v: Tensor, step: Tensor, like: Tensor, hp: Hparams) -> Tensor:
    """``√(V/(1 − β₂ᵗ) + ε)`` (``"ema"``) or ``√(V + ε)`` (``"sum"``)."""
    if hp["accumulate"] == "ema":
        v = v / (1 - hp["beta2"] ** T.step_float(step, like))
    return (v + hp["eps"]).sqrt()


def validate(hp: Hparams) -> None:
    check_range("lr", hp["lr"], 0.0)
    for name in ("momentum", "slow_momentum", "beta2"):
        check_range(name, hp[name], 0.0, 1.0, high_open=True)
    check_range("alpha", hp["alpha"], 0.0)
    check_int("chunk", hp["chunk"])
    check_bool("second_moment", hp["second_moment"])
    check_bool("nesterov", hp["nesterov"])
    check_choice("accumulate", hp["accumulate"], ACCUMULATIONS)
    check_int("ns_steps", hp["ns_steps"])
    check_choice("ns_dtype", hp["ns_dtype"], T.NS_DTYPES)
    check_range("eps", hp["eps"], 0.0, low_open=True)
    check_range("weight_decay", hp["weight_decay"], 0.0)


m3 = Rule("m3", DEFAULTS, init, update, validate, doc=__doc__, complex_ok=lambda hp: False)
