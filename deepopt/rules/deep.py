"""Deep Momentum Gradient Descent (DMGD, Nested Learning Eq. 23 / 50): the momentum is an MLP
memory ``M_θ(x) = x + W₁ σ(W₂ x)`` per parameter tensor, trained online by its own gradient step.

The gradient ``G`` is cut into key blocks of ``key_dim`` coordinates (rows of its flattened,
zero-padded view, ``n`` of them) scaled to unit mean norm, ``K = blocks(G)/s_G`` with
``s_G = ‖G‖_F/√n``; the values are ``V = blocks(P G)/s_PG`` likewise (``V = K`` for P = identity;
``key_source="preconditioned"`` keys on ``P G`` too, ``K = V``, so the memory's skip path is the
preconditioned step, e.g. Adam's without its momentum).  Each step::

    θ ← α·θ − η·∇_θ ℓ(θ; K, V)          θ = (W₁ ∈ R^{key_dim×hidden}, W₂ ∈ R^{hidden×key_dim})
    W ← W − lr_t·σ_out(s_PG · M_θ(K))    (back to the parameter's shape)

with ``lr_t = lr/(1 + lr_decay·(t − 1))`` at step t (``lr_decay = 0``: constant; a learnable 1/t decay
for meta-training, carried by ``from_pretrained``), and the internal objective either the dot product
``ℓ = −(1/n) Σᵢ ⟨M_θ(kᵢ), vᵢ⟩`` (default) or the ℓ2 regression ``ℓ = (1/2n) Σᵢ ‖M_θ(kᵢ) − vᵢ‖²``.
Gradients are written out in closed form (they are plain tensor algebra, so ``torch.func`` differentiates
through them).  The memory's shape does not depend on the parameter's, so a meta-learned initial state θ₀
(``memory_init``) serves any model.  With W₁ = 0 the first step is SGD; a step with a zero gradient and
zero W₁ moves nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from . import transforms as T
from .base import Hparams, Rule, State, check_choice, check_int, check_range

OBJECTIVES = ("dot", "l2")
KEY_SOURCES = ("gradient", "preconditioned")


def _gelu_grad(z: Tensor, h: Tensor) -> Tensor:
    return 0.5 * (1 + torch.erf(z / math.sqrt(2))) + z * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)


def _silu_grad(z: Tensor, h: Tensor) -> Tensor:
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


# name -> (σ(z), σ'(z, h)) where h = σ(z) is passed so σ' can reuse it
ACTIVATIONS = {
    "tanh": (torch.tanh, lambda z, h: 1 - h * h),
    "relu": (torch.relu, lambda z, h: (z > 0).to(z.dtype)),
    "gelu": (F.gelu, _gelu_grad),
    "silu": (F.silu, _silu_grad),
    "identity": (lambda z: z, lambda z, h: torch.ones_like(z)),
}

# For activations whose σ' is a function of h = σ(z): name -> (σ in place, ``a ← a ⊙ σ'`` in place from h),
# which lets the optimizer's fast path run without temporaries.
INPLACE_ACTIVATIONS: dict[str, tuple[Callable[[Tensor], Tensor], Callable[[Tensor, Tensor], Tensor]]] = {
    "tanh": (torch.tanh_, lambda a, h: a.addcmul_(a * h, h, value=-1)),
    "relu": (torch.relu_, lambda a, h: a.mul_(h > 0)),
    "identity": (lambda z: z, lambda a, h: a),
}

DEFAULTS = {
    "lr": 1e-3,
    "alpha": 0.9,
    "eta": 0.5,
    "hidden": 16,
    "key_dim": 16,
    "activation": "tanh",
    "objective": "dot",
    "init_scale": 1.0,
    "seed": 0,
    "memory_init": None,
    "lr_decay": 0.0,
    "key_source": "gradient",
    **T.SHARED_DEFAULTS,
}


def initial_memory(hp: Hparams, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """θ₀ = (W₁, W₂): ``memory_init`` if given, else W₁ = 0 and W₂ ~ init_scale·N(0, 1) from ``seed``."""
    if hp["memory_init"] is not None:
        w1, w2 = hp["memory_init"]
        return w1.to(device, dtype).clone(), w2.to(device, dtype).clone()  # keeps θ₀'s graph (meta-training)
    gen = torch.Generator().manual_seed(int(hp["seed"]))
    w2 = torch.randn(hp["hidden"], hp["key_dim"], generator=gen, dtype=torch.float64) * float(hp["init_scale"])
    return torch.zeros(hp["key_dim"], hp["hidden"], dtype=dtype, device=device), w2.to(device, dtype)


def init(param: Tensor, hp: Hparams) -> State:
    w1, w2 = initial_memory(hp, param.dtype, param.device)
    return {"W1": w1, "W2": w2, "step": torch.zeros((), dtype=T.step_dtype()), **T.init_preconditioner(param, hp)}


def to_blocks(x: Tensor, key_dim: int) -> Tensor:
    """Flatten, zero-pad to a multiple of ``key_dim`` and view as ``(n, key_dim)``."""
    flat = x.reshape(-1)
    pad = (-flat.numel()) % key_dim
    if pad:
        flat = F.pad(flat, (0, pad))
    return flat.reshape(-1, key_dim)


def normalized_blocks(x: Tensor, key_dim: int) -> tuple[Tensor, Tensor]:
    """``(blocks(x)/s, s)`` with ``s = ‖x‖/√n`` the RMS block norm (``s = 1`` for a zero tensor)."""
    blocks = to_blocks(x, key_dim)
    sq = (blocks * blocks).sum()
    scale = (torch.where(sq > 0, sq, torch.ones_like(sq)) / blocks.shape[0]).sqrt()
    return blocks / scale, scale


def from_blocks(blocks: Tensor, like: Tensor) -> Tensor:
    return blocks.reshape(-1)[: like.numel()].reshape(like.shape)


def memory_grads(
    w1: Tensor, w2: Tensor, keys: Tensor, values: Tensor, hp: Hparams
) -> tuple[Tensor, Tensor]:
    """∇_{W₁} ℓ and ∇_{W₂} ℓ of the internal objective on ``(n, key_dim)`` keys and values."""
    act, act_grad = ACTIVATIONS[hp["activation"]]
    n = keys.shape[0]
    z = keys @ w2.mT  # (n, hidden)
    h = act(z)
    if hp["objective"] == "dot":  # ℓ = −(1/n) Σ ⟨k + W₁σ(W₂k), v⟩
        err = -values / n
    else:  # ℓ = (1/2n) Σ ‖k + W₁σ(W₂k) − v‖²
        err = (keys + h @ w1.mT - values) / n
    grad_w1 = err.mT @ h
    grad_w2 = (act_grad(z, h) * (err @ w1)).mT @ keys
    return grad_w1, grad_w2


def apply_memory(w1: Tensor, w2: Tensor, keys: Tensor, activation: str) -> Tensor:
    """``M_θ(K) = K + σ(K W₂ᵀ) W₁ᵀ`` row-wise."""
    return keys + ACTIVATIONS[activation][0](keys @ w2.mT) @ w1.mT


def update(grad: Tensor, state: State, param: Tensor, hp: Hparams) -> tuple[Tensor, State]:
    g = T.coupled_weight_decay(grad, param, hp)
    value, pstate = T.precondition(g, state, hp)
    step = pstate.get("step", state["step"] + 1)  # the preconditioner's count when it keeps one
    if hp["preconditioner"] == "identity" or hp["key_source"] == "preconditioned":
        keys, scale = normalized_blocks(value, hp["key_dim"])
        values = keys
    else:
        keys, _ = normalized_blocks(g, hp["key_dim"])
        values, scale = normalized_blocks(value, hp["key_dim"])
    grad_w1, grad_w2 = memory_grads(state["W1"], state["W2"], keys, values, hp)
    w1 = hp["alpha"] * state["W1"] - hp["eta"] * grad_w1
    w2 = hp["alpha"] * state["W2"] - hp["eta"] * grad_w2
    direction = from_blocks(scale * apply_memory(w1, w2, keys, hp["activation"]), g)
    if not T.is_zero(hp["lr_decay"]):
        hp = {**hp, "lr": decayed_lr(hp["lr"], hp["lr_decay"], step.to(g.dtype))}
    delta = T.descend(T.output_nonlinearity(direction, hp), param, hp)
    return delta, {"W1": w1, "W2": w2, **pstate, "step": step}


def decayed_lr(lr: float | Tensor, lr_decay: float | Tensor, step: float | Tensor) -> float | Tensor:
    """``lr/(1 + lr_decay·(step − 1))``: step 1 takes ``lr``."""
    return lr / (1 + lr_decay * (step - 1))


def validate(hp: Hparams) -> None:
    T.validate_shared(hp)
    check_range("alpha", hp["alpha"], 0.0, 1.0)
    check_range("eta", hp["eta"], 0.0)
    check_int("hidden", hp["hidden"])
    check_int("key_dim", hp["key_dim"])
    check_choice("activation", hp["activation"], tuple(ACTIVATIONS))
    check_choice("objective", hp["objective"], OBJECTIVES)
    check_choice("key_source", hp["key_source"], KEY_SOURCES)
    check_range("init_scale", hp["init_scale"], 0.0)
    check_range("lr_decay", hp["lr_decay"], 0.0)
    check_int("seed", hp["seed"], low=0)
    mem = hp["memory_init"]
    if mem is not None:
        if not (isinstance(mem, (tuple, list)) and len(mem) == 2 and all(isinstance(t, Tensor) for t in mem)):
            raise TypeError("memory_init must be None or a pair of tensors (W1, W2)")
        want = ((hp["key_dim"], hp["hidden"]), (hp["hidden"], hp["key_dim"]))
        got = tuple(tuple(t.shape) for t in mem)
        if got != want:
            raise ValueError(f"memory_init shapes must be {want} for key_dim/hidden, got {got}")


deep_momentum = Rule("deep_momentum", DEFAULTS, init, update, validate, doc=__doc__)
