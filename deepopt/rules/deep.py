"""Deep Momentum Gradient Descent (DMGD, Nested Learning Eq. 23 / 50): momentum whose memory is a
per-coordinate vector plus a deep (MLP) read-out, both trained online by one gradient step per gradient.

Paper: ``W ← W + m(u)``, ``m ← α·m − η·∇ℓ(m; u, ·)``.  Here the memory ``M = (m, W₁)`` of a tensor has a
per-coordinate part ``m`` (shaped like the parameter) and a shared deep part: a 2-layer MLP read-out
``D(K) = Φ̂(K) W₁ᵀ`` over key blocks, ``Φ̂ = σ(K W₂ᵀ)/r``.  With ``g`` the gradient (+ coupled weight
decay), ``v = P g`` the value (P: identity or Adam's diagonal) and the key ``k = g`` (``key_source=
"gradient"``) or ``k = v`` ("preconditioned"), each step::

    K = blocks(k)/s_k,  V = blocks(v)/s_v          (n blocks of key_dim coordinates; s = RMS block norm)
    Φ̂ = σ(K W₂ᵀ)/r,  r = ‖σ(K W₂ᵀ)‖_F/√n           (normalised features: ‖Φ̂ᵀΦ̂/n‖ ≤ tr = 1)
    dot objective  ℓ = −⟨m, v⟩ − (1/n)⟨Φ̂W₁ᵀ, V⟩:
        m ← α·m + v                                              (Momentum, μ = α)
        W₁ ← α·W₁ + η·VᵀΦ̂/n
    l2 objective   ℓ = ½⟨m, k̂⟩²·β − ⟨m, v⟩ + (1/2n)‖Φ̂W₁ᵀ − V‖²,  k̂ = k/‖k‖:
        m ← α·m − β⟨m, k̂⟩k̂ + v                                  (the delta rule: DeltaMomentum)
        W₁ ← W₁(α·I − η·Φ̂ᵀΦ̂/n) + η·VᵀΦ̂/n
    u = m + s_v·from_blocks(Φ̂ W₁ᵀ);    W ← W − lr_t·σ_out(u),   lr_t = lr/(1 + lr_decay·(t − 1))·h_t
    h_t = 1 (lr_horizon = 0, the default), else h_t = (1 − (t − 1)/N)₊^p,  N = lr_horizon, p = lr_power

``h_t`` is an opt-in training-progress schedule (``lr_horizon = N`` > 0: the length of the run, as VeLO's
learned optimizers take it): the lr falls from ``lr`` at step 1 to ``lr·(1/N)^p`` at step N and is 0 after;
``p`` shapes the fall (1: linear to zero) and is meta-learnable, as are lr and lr_decay.

``α`` is ``momentum``.  The inner map contracts: its Jacobian in W₁ is ``αI`` (dot) or ``αI − ηΦ̂ᵀΦ̂/n``
with eigenvalues in ``[α − η, α]`` (l2, 0 ≤ η ≤ 1 + α), so ``‖W₁‖ ≤ α^t‖W₁⁰‖ + η/(1 − α)`` and the deep
read ``RMS(Φ̂W₁ᵀ) ≤ ‖W₁‖`` stays a bounded multiple of one normalised value.  ``W₂`` (the feature layer)
is not moved online: its gradient through ``σ'`` would feed back on ``W₁`` (the instability of the
previous design); it is what meta-training shapes, with θ₀ = (W₁⁰, W₂), α, η, lr and lr_decay.
Deep branch off (``hidden=0``, or η = 0 with W₁⁰ = 0): ``Momentum`` (dot) or ``DeltaMomentum`` (l2)
exactly.  θ₀ = (W₁ ∈ R^{key_dim×hidden}, W₂ ∈ R^{hidden×key_dim}) does not depend on the parameter's
shape, so a meta-learned θ₀ (``memory_init``) serves any model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from . import sharding
from . import transforms as T
from .base import Hparams, Rule, State, check_choice, check_int, check_range


def _gelu_grad(z: Tensor, h: Tensor) -> Tensor:
    return 0.5 * (1 + torch.erf(z / math.sqrt(2))) + z * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)


def _silu_grad(z: Tensor, h: Tensor) -> Tensor:
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


# name -> (σ(z), σ'(z, h)) where h = σ(z) is passed so σ' can reuse it (HOPE's memories use σ' too)
ACTIVATIONS = {
    "tanh": (torch.tanh, lambda z, h: 1 - h * h),
    "relu": (torch.relu, lambda z, h: (z > 0).to(z.dtype)),
    "gelu": (F.gelu, _gelu_grad),
    "silu": (F.silu, _silu_grad),
    "identity": (lambda z: z, lambda z, h: torch.ones_like(z)),
}
OBJECTIVES = ("dot", "l2")
KEY_SOURCES = ("gradient", "preconditioned")

DEFAULTS = {
    "lr": 1e-3,
    "momentum": 0.9,
    "eta": 0.1,
    "beta": 0.5,
    "hidden": 16,
    "key_dim": 16,
    "activation": "tanh",
    "objective": "dot",
    "init_scale": 1.0,
    "seed": 0,
    "memory_init": None,
    "lr_decay": 0.0,
    "key_source": "gradient",
    "lr_horizon": 0,
    "lr_power": 1.0,
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
    return {"momentum_buffer": torch.zeros_like(param), "W1": w1, "W2": w2, "step": T.new_step(param),
            **T.init_preconditioner(param, hp)}


def to_blocks(x: Tensor, key_dim: int) -> Tensor:
    """Flatten, zero-pad to a multiple of ``key_dim`` and view as ``(n, key_dim)``."""
    flat = x.reshape(-1)
    pad = (-flat.numel()) % key_dim
    if pad:
        flat = F.pad(flat, (0, pad))
    return flat.reshape(-1, key_dim)


def from_blocks(blocks: Tensor, like: Tensor) -> Tensor:
    return blocks.reshape(-1)[: like.numel()].reshape(like.shape)


def safe_rms(sq_sum: Tensor, n: int) -> Tensor:
    """``sqrt(sq_sum/n)``, and 1 where ``sq_sum = 0`` (a zero tensor keeps its zeros)."""
    return (torch.where(sq_sum > 0, sq_sum, torch.ones_like(sq_sum)) / n).sqrt()


def normalized_blocks(x: Tensor, key_dim: int) -> tuple[Tensor, Tensor]:
    """``(blocks(x)/s, s)`` with ``s = ‖x‖/√n`` the RMS block norm (``s = 1`` for a zero tensor)."""
    blocks = to_blocks(x, key_dim)
    scale = safe_rms((blocks * blocks).sum(), blocks.shape[0])
    return blocks / scale, scale


def features(keys: Tensor, w2: Tensor, activation: str) -> Tensor:
    """``Φ̂ = σ(K W₂ᵀ)/r`` with ``r`` the RMS row norm of ``σ(K W₂ᵀ)``."""
    phi = ACTIVATIONS[activation][0](keys @ w2.mT)
    return phi / safe_rms((phi * phi).sum(), phi.shape[0])


def readout_grad(w1: Tensor, phi: Tensor, values: Tensor, objective: str) -> Tensor:
    """∇_{W₁} of the deep part of ℓ: ``−VᵀΦ̂/n`` (dot) or ``(Φ̂W₁ᵀ − V)ᵀΦ̂/n`` (l2)."""
    err = -values if objective == "dot" else phi @ w1.mT - values
    return err.mT @ phi / phi.shape[0]


def apply_memory(w1: Tensor, w2: Tensor, keys: Tensor, activation: str) -> Tensor:
    """``M_θ(K) = K + σ(K W₂ᵀ) W₁ᵀ`` row-wise: the residual MLP memory that HOPE's inner memories use."""
    return keys + ACTIVATIONS[activation][0](keys @ w2.mT) @ w1.mT


def update(grad: Tensor, state: State, param: Tensor, hp: Hparams) -> tuple[Tensor, State]:
    g = T.coupled_weight_decay(grad, param, hp)
    value, pstate = T.precondition(g, state, hp)
    step = pstate.get("step", state["step"] + 1)  # the preconditioner's count when it keeps one
    key = value if hp["key_source"] == "preconditioned" else g
    m = _linear_step(state["momentum_buffer"], key, value, hp)
    w1, direction = state["W1"], m
    if hp["hidden"] > 0:  # on whole tensors: a sharded (FSDP2) key is gathered, its read-out scattered back
        whole_key = sharding.gathered(key)
        keys, _ = normalized_blocks(whole_key, hp["key_dim"])
        values, scale = normalized_blocks(whole_key if value is key else sharding.gathered(value), hp["key_dim"])
        phi = features(keys, state["W2"], hp["activation"])
        w1 = hp["momentum"] * w1 - hp["eta"] * readout_grad(w1, phi, values, hp["objective"])
        direction = m + sharding.scattered(from_blocks(scale * (phi @ w1.mT), whole_key), m)
    if not T.is_zero(hp["lr_decay"]) or hp["lr_horizon"]:
        t = T.step_float(step, g)
        lr = decayed_lr(hp["lr"], hp["lr_decay"], t) if not T.is_zero(hp["lr_decay"]) else hp["lr"]
        if hp["lr_horizon"]:
            lr = lr * horizon_factor(t, hp["lr_horizon"], hp["lr_power"])
        hp = {**hp, "lr": lr.to(g.dtype)}
    delta = T.descend(T.output_nonlinearity(direction, hp), param, hp)
    return delta, {"momentum_buffer": m, "W1": w1, "W2": state["W2"], **pstate, "step": step}


def _linear_step(m: Tensor, key: Tensor, value: Tensor, hp: Hparams) -> Tensor:
    """``α·m + v`` (dot) or the delta rule ``α·m − β⟨m, k̂⟩k̂ + v`` (l2, as ``DeltaMomentum``)."""
    new = hp["momentum"] * m + value
    if hp["objective"] == "l2":
        sq = (key * key).sum()
        new = new - (hp["beta"] * (m * key).sum() / torch.where(sq > 0, sq, torch.ones_like(sq))) * key
    return new


def decayed_lr(lr: float | Tensor, lr_decay: float | Tensor, step: float | Tensor) -> float | Tensor:
    """``lr/(1 + lr_decay·(step − 1))``: step 1 takes ``lr``."""
    return lr / (1 + lr_decay * (step - 1))


def horizon_factor(step: Tensor, horizon: int, power: float | Tensor) -> Tensor:
    """``(1 − (step − 1)/horizon)₊^power``: 1 at step 1, ``(1/horizon)^power`` at step ``horizon``, 0 after
    (where its derivative in ``power`` is 0 too, not NaN)."""
    x = 1 - (step - 1) / horizon
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, torch.ones_like(x)) ** power, torch.zeros_like(x))


def validate(hp: Hparams) -> None:
    T.validate_shared(hp)
    check_range("momentum", hp["momentum"], 0.0, 1.0, high_open=True)
    check_range("eta", hp["eta"], 0.0)
    check_range("beta", hp["beta"], 0.0, 1.0 + float(hp["momentum"]))
    check_int("hidden", hp["hidden"], low=0)
    check_int("key_dim", hp["key_dim"])
    check_choice("activation", hp["activation"], tuple(ACTIVATIONS))
    check_choice("objective", hp["objective"], OBJECTIVES)
    if hp["objective"] == "l2":  # the inner map αI − ηΦ̂ᵀΦ̂/n contracts
        check_range("eta", hp["eta"], 0.0, 1.0 + float(hp["momentum"]))
    check_choice("key_source", hp["key_source"], KEY_SOURCES)
    check_range("init_scale", hp["init_scale"], 0.0)
    check_range("lr_decay", hp["lr_decay"], 0.0)
    check_int("lr_horizon", hp["lr_horizon"], low=0)
    check_range("lr_power", hp["lr_power"], 0.0)
    check_int("seed", hp["seed"], low=0)
    mem = hp["memory_init"]
    if mem is not None:
        if not (isinstance(mem, (tuple, list)) and len(mem) == 2 and all(isinstance(t, Tensor) for t in mem)):
            raise TypeError("memory_init must be None or a pair of tensors (W1, W2)")
        want = ((hp["key_dim"], hp["hidden"]), (hp["hidden"], hp["key_dim"]))
        got = tuple(tuple(t.shape) for t in mem)
        if got != want:
            raise ValueError(f"memory_init shapes must be {want} for key_dim/hidden, got {got}")


deep_momentum = Rule(
    "deep_momentum", DEFAULTS, init, update, validate, doc=__doc__,
    elementwise=lambda hp: hp["hidden"] == 0 and hp["objective"] == "dot" and hp["nonlinearity"] is None,
)
