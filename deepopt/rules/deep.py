"""Deep Momentum Gradient Descent (DMGD, Nested Learning Eq. 23 / 50): momentum whose memory is a
per-coordinate vector plus a deep (MLP) read-out, both trained online by one gradient step per gradient.

Paper: ``W ← W + m(u)``, ``m ← α·m − η·∇ℓ(m; u, ·)``.  Here the memory ``M = (m, W₁, W₂)`` of a tensor has a
per-coordinate part ``m`` (shaped like the parameter) and a deep part, a 2-layer MLP read-out ``D(K) = σ(K W₂ᵀ)W₁ᵀ``
whose weights are shared by the whole tensor.  With ``g`` the gradient (+ coupled weight decay), ``v = P g`` the
value (P: identity or Adam's diagonal), two key layouts (``keys``):

**``keys="blocks"``** (the default): keys are blocks of ``key_dim`` consecutive coordinates of ``k = g``
(``key_source="gradient"``) or ``k = v`` ("preconditioned")::

    K = blocks(k)/s_k,  V = blocks(v)/s_v          (n blocks of key_dim coordinates; s = RMS block norm)
    Φ̂ = σ(K W₂ᵀ)/r,  r = ‖σ(K W₂ᵀ)‖_F/√n           (normalised features: ‖Φ̂ᵀΦ̂/n‖ ≤ tr = 1)
    dot objective  ℓ = −⟨m, v⟩ − (1/n)⟨Φ̂W₁ᵀ, V⟩:
        m ← α·m + v                                              (Momentum, μ = α)
        W₁ ← α·W₁ + η·VᵀΦ̂/n
    l2 objective   ℓ = ½⟨m, k̂⟩²·β − ⟨m, v⟩ + (1/2n)‖Φ̂W₁ᵀ − V‖²,  k̂ = k/‖k‖:
        m ← α·m − β⟨m, k̂⟩k̂ + v                                  (the delta rule: DeltaMomentum)
        W₁ ← W₁(α·I − η·Φ̂ᵀΦ̂/n) + η·VᵀΦ̂/n
    u = m + s_v·from_blocks(Φ̂ W₁ᵀ)

**``keys="momenta"``** (the shipped learned optimizer's; the Continuum Memory System idea applied to the
optimizer): every coordinate i is one key, built from its momenta at several time scales, and the read-out is a
per-coordinate MLP (H = ``hidden`` units, scalar output) whose weights the tensor's coordinates share::

    m ← α·m + v;   e_j ← γ_j·e_j + (1 − γ_j)·v   (j = 1..J, γ = ``timescales``)
    k_i = (v_i, (1 − α)·m_i, e_1i, …, e_Ji) ∈ R^F,  F = 2 + J          (O(1) entries when P is Adam's)
    Φ_i = σ(W₂ k_i) ∈ R^H,   D_i = W₁·Φ_i                              (W₁: 1×H, W₂: H×F)
    u = m + D                                                          (read with the current W₁, then write:)
    W₁ ← α·W₁ + (1 − α)·W₁⁰ + η·C,           C = (1/n) Σ_i v_i Φ_i               (dot objective)
    W₂ ← α·W₂ + (1 − α)·W₂⁰ + η₂·G/(1 + ‖W₁‖²),  G = (1/n) Σ_i (σ'(W₂k_i) ⊙ W₁ v_i) k_iᵀ   (η₂ = ``eta2`` > 0)

The memory retains towards its meta-learned initial state θ₀ = (W₁⁰, W₂⁰) (``memory_init``), not towards 0, so
what meta-training put in θ₀ is not forgotten after 1/(1 − α) steps; the writes are the dot objective's gradient
steps ``−η∇ℓ``, ``ℓ = −(1/n)Σ_i v_i D(k_i)``, W₂'s divided by a bound on its curvature ``1 + ‖W₁‖²`` (HOPE's
normalised-LMS factor).  Both maps contract (Jacobian αI in W₁, and in W₂ for fixed inputs) and the inputs are
bounded (|Φ| ≤ 1 for tanh, |v_i| ≤ 1/√(1 − β₂) with Adam's P), so ``‖W₁ − W₁⁰‖ ≤ η·max|v|·√H/(1 − α)``.  Reading
before writing keeps the step one pass over the coordinates (the writes need only per-tensor sums).
``objective="dot"`` only.

Both layouts then step::

    W ← W − lr_t·σ_out(u) [− lr_t·λ·W, decoupled weight decay],      lr_t = lr·s_t
    λ = wd/(1 − α) with Adam's P and no σ_out (AdamW's decay at the matching lr lr_t/(1 − α)), else wd
        (``transforms.decoupled_rate``)
    s_t = w_t · 1/(1 + lr_decay·(t − 1)) · h_t
    h_t = 1 (lr_horizon = 0, the default), else h_t = max(1 − (t − 1)/N, 1/N)^p,  N = lr_horizon, p = lr_power
    w_t = min(1, t/(lr_warmup·N)) with lr_warmup > 0 and N > 0, else 1

With ``lr_adapt="dog"`` each tensor's step is scaled by its distance over its updates (layer-wise DoG, Ivgi et
al., 2023, with G lagged by one step)::

    lr_t = lr·s_t·r̄_t/√G_{t−1}   (0 while G_{t−1} = 0: the first step moves nothing)
    r̄_t = max(r_ε, max_{i≤t} ‖W_i − W_0‖),  G_t = Σ_{i≤t} ‖u_i‖²,  r_ε = max(dog_reps, ε_dtype)·(1 + ‖W_0‖)

The step grows with the distance travelled and does not depend on the scale of ``u``, so ``lr`` is a multiplier
of order 1 (DoG's is 1) instead of a step size (state: W_0, r̄ and G per tensor).  DoG divides by √G_t; the lag
lets one pass over the coordinates both take the step and collect ‖u_t‖² and ‖W_{t+1} − W_0‖ for the next.

``lr`` is the param group's: a script's own scheduler (warm-up + cosine, ``OneCycleLR``) sets it and the learned
schedule ``s_t`` multiplies it.  ``h_t`` is an opt-in training-progress schedule (``lr_horizon = N`` > 0: the length
of the run, as VeLO's learned optimizers take it): the lr falls from ``lr`` at step 1 to ``lr·(1/N)^p`` at step N
and stays there (it never reaches 0: a run longer than N keeps training, and ``DeepMomentum`` warns once when it
passes N); ``p`` shapes the fall (1: linear) and is meta-learnable, as are lr, lr_decay and lr_warmup.

``α`` is ``momentum``.  Blocks layout: the inner map contracts, its Jacobian in W₁ is ``αI`` (dot) or
``αI − ηΦ̂ᵀΦ̂/n`` with eigenvalues in ``[α − η, α]`` (l2, 0 ≤ η ≤ 1 + α), so ``‖W₁‖ ≤ α^t‖W₁⁰‖ + η/(1 − α)`` and the
deep read ``RMS(Φ̂W₁ᵀ) ≤ ‖W₁‖`` stays a bounded multiple of one normalised value; ``W₂`` is fixed online there.
Deep branch off (``hidden=0``, or η = 0 with W₁⁰ = 0): ``Momentum`` (dot) or ``DeltaMomentum`` (l2) exactly.
θ₀ = (W₁, W₂) does not depend on the parameter's shape, so a meta-learned θ₀ (``memory_init``) serves any model.
Sharing: W₁ and W₂ are per parameter tensor (each tensor's coordinates or blocks share them, and each tensor's
memory learns online from its own gradients); θ₀ is shared by every tensor of every model.
"""

from __future__ import annotations

import math
from typing import Any

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
    "softsign": (F.softsign, lambda z, h: (1 - h.abs()).square()),   # z/(1 + |z|): σ' = 1/(1 + |z|)² = (1 − |h|)²
    "identity": (lambda z: z, lambda z, h: torch.ones_like(z)),
}
OBJECTIVES = ("dot", "l2")
KEY_SOURCES = ("gradient", "preconditioned")
KEY_LAYOUTS = ("blocks", "momenta")
LR_ADAPTATIONS = ("none", "dog")
MAX_TIMESCALES = 4

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
    "lr_warmup": 0.0,
    "keys": "blocks",
    "timescales": (0.5, 0.99),
    "eta2": 0.0,
    "lr_adapt": "none",
    "dog_reps": 1e-4,
    **T.SHARED_DEFAULTS,
}


def n_features(hp: Hparams) -> int:
    """The key size: ``key_dim`` (blocks) or F = 2 + J, J = ``len(timescales)`` (momenta)."""
    return 2 + len(hp["timescales"]) if hp["keys"] == "momenta" else hp["key_dim"]


def memory_shapes(hp: Hparams) -> tuple[tuple[int, int], tuple[int, int]]:
    """Shapes of θ₀ = (W₁, W₂): ``(key_dim, H), (H, key_dim)`` (blocks) or ``(1, H), (H, F)`` (momenta)."""
    out = 1 if hp["keys"] == "momenta" else hp["key_dim"]
    return (out, hp["hidden"]), (hp["hidden"], n_features(hp))


def initial_memory(hp: Hparams, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """θ₀ = (W₁, W₂): ``memory_init`` if given, else W₁ = 0 and W₂ ~ init_scale·N(0, 1) from ``seed``."""
    if hp["memory_init"] is not None:
        w1, w2 = hp["memory_init"]
        return w1.to(device, dtype).clone(), w2.to(device, dtype).clone()  # keeps θ₀'s graph (meta-training)
    w1_shape, w2_shape = memory_shapes(hp)
    gen = torch.Generator().manual_seed(int(hp["seed"]))
    w2 = torch.randn(*w2_shape, generator=gen, dtype=torch.float64) * float(hp["init_scale"])
    return torch.zeros(*w1_shape, dtype=dtype, device=device), w2.to(device, dtype)


def init(param: Tensor, hp: Hparams) -> State:
    w1, w2 = initial_memory(hp, param.dtype, param.device)
    state = {"momentum_buffer": torch.zeros_like(param), "W1": w1, "W2": w2, "step": T.new_step(param),
             **T.init_preconditioner(param, hp)}
    if hp["keys"] == "momenta":
        # (J, *W.shape); stacked so that a sharded (FSDP2) parameter's buffers shard along W's own dimension
        state["timescale_buffers"] = torch.stack([torch.zeros_like(param) for _ in hp["timescales"]])
    if hp["lr_adapt"] == "dog":
        state.update(init_distance_over_gradients(param, hp))
    return state


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
    new_state = {**pstate, "step": step}
    if hp["keys"] == "momenta":
        direction = _momenta_step(value, state, hp, new_state)
    else:
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
        new_state.update(momentum_buffer=m, W1=w1, W2=state["W2"])
    factor = lr_factor(step, hp, g)
    if hp["lr_adapt"] == "dog":
        factor = dog_step_size(state) if factor is None else factor * dog_step_size(state)
    if factor is not None:
        hp = {**hp, "lr": (hp["lr"] * factor).to(g.dtype)}
    delta = T.descend(T.output_nonlinearity(direction, hp), param, hp)
    if hp["lr_adapt"] == "dog":
        new_state.update(dog_statistics(direction, param + delta, state))
    return delta, new_state


def timescale_column(hp: Hparams, like: Tensor) -> Tensor:
    """γ = ``timescales`` as a ``(J, 1, …, 1)`` tensor that broadcasts against ``(J, *like.shape)``."""
    gammas = hp["timescales"]
    gammas = gammas if isinstance(gammas, Tensor) else torch.tensor(gammas, dtype=torch.float64)
    return gammas.to(like.device, like.dtype).reshape(-1, *(1,) * like.dim())


def momenta_keys(value: Tensor, m: Tensor, e: Tensor, alpha: float | Tensor) -> Tensor:
    """``k = (v, (1 − α)·m, e_1, …, e_J)`` per coordinate, shaped ``(*v.shape, F)``."""
    return torch.stack([value, (1 - alpha) * m, *e.unbind(0)], dim=-1)


def momenta_writes(keys: Tensor, phi: Tensor, pre: Tensor, value: Tensor, w1: Tensor, w2: Tensor,
                   hp: Hparams) -> tuple[Tensor, Tensor]:
    """The memory writes of the momenta layout from one tensor's keys ``(n, F)``, features ``Φ = σ(pre)``
    ``(n, H)`` and values ``(n,)``: ``W₁ ← αW₁ + (1 − α)W₁⁰ + ηC`` and, with η₂ > 0,
    ``W₂ ← αW₂ + (1 − α)W₂⁰ + η₂G/(1 + ‖W₁‖²)`` (module docstring)."""
    alpha, n = hp["momentum"], max(value.shape[0], 1)
    w1_0, w2_0 = anchor(hp, w1, w2)
    corr = (value @ phi / n).unsqueeze(0)  # C, (1, H)
    new_w1 = alpha * w1 + (1 - alpha) * w1_0 + hp["eta"] * corr
    new_w2 = w2
    if not T.is_zero(hp["eta2"]):
        g2 = ACTIVATIONS[hp["activation"]][1](pre, phi) * (w1 * value.unsqueeze(-1))  # (n, H)
        grad_w2 = g2.mT @ keys / n  # G, (H, F)
        new_w2 = alpha * w2 + (1 - alpha) * w2_0 + hp["eta2"] * grad_w2 / (1 + (w1 * w1).sum())
    return new_w1, new_w2


def anchor(hp: Hparams, w1: Tensor, w2: Tensor) -> tuple[Tensor, Tensor]:
    """θ₀ = (W₁⁰, W₂⁰) that the momenta layout's memory retains towards (``initial_memory``, in W's dtype)."""
    return initial_memory(hp, w1.dtype, w1.device)


def _momenta_step(value: Tensor, state: State, hp: Hparams, new_state: State) -> Tensor:
    """The momenta layout (module docstring) for one tensor: fills ``new_state``, returns ``u = m + D``."""
    alpha = hp["momentum"]
    v = sharding.local(value)  # the momenta are element-wise: on a sharded (FSDP2) tensor, each rank's shard
    m = sharding.like(alpha * sharding.local(state["momentum_buffer"]) + v, value)
    gamma = timescale_column(hp, v)
    e = sharding.like(gamma * sharding.local(state["timescale_buffers"]) + (1 - gamma) * v, state["timescale_buffers"])
    w1, w2 = state["W1"], state["W2"]
    new_state.update(momentum_buffer=m, timescale_buffers=e, W1=w1, W2=w2)
    if hp["hidden"] == 0:
        return m
    # the writes average over all of a tensor's coordinates: a sharded (FSDP2) tensor is gathered, its read-out
    # scattered back, so W1, W2 stay identical on every rank
    whole_value = sharding.gathered(value)
    keys = momenta_keys(whole_value, sharding.gathered(m), sharding.gathered(e), alpha).reshape(-1, n_features(hp))
    pre = keys @ w2.mT
    phi = ACTIVATIONS[hp["activation"]][0](pre)  # (n, H)
    read = (phi @ w1.mT).reshape(whole_value.shape)
    new_state["W1"], new_state["W2"] = momenta_writes(keys, phi, pre, whole_value.reshape(-1), w1, w2, hp)
    return m + sharding.scattered(read, m)


def init_distance_over_gradients(param: Tensor, hp: Hparams) -> State:
    """The state of ``lr_adapt="dog"``: the tensor's starting point x₀, the distance r̄ = r_ε = ε·(1 + ‖x₀‖) with
    ε = max(``dog_reps``, the parameter dtype's machine epsilon), and the sum of squared update norms G = 0 (0-dim,
    fp32; fp64 for fp64 parameters).  The epsilon floor matters for bf16/fp16 parameters only (bf16: 2⁻⁷): first
    steps of relative size 1e-4 round away in storage, W never moves, r̄ never grows and training stalls."""
    x0 = param.detach().clone()
    dtype = torch.float64 if param.dtype == torch.float64 else torch.float32
    eps = max(float(hp["dog_reps"]), torch.finfo(param.dtype).eps)
    reps = eps * (1 + _squared_norm(x0, dtype).sqrt())
    return {"dog_origin": x0, "dog_distance": reps, "dog_sum_sq": torch.zeros((), dtype=dtype, device=param.device)}


def _squared_norm(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``‖x‖²`` in ``dtype`` as a plain 0-dim tensor (a sharded (FSDP2) tensor's: its shards' sums all-reduced)."""
    return sharding.gathered(x.to(dtype).square().sum())


def dog_step_size(state: State) -> Tensor:
    """η_t = r̄_t/√G_{t−1} of ``lr_adapt="dog"`` (0 while G = 0: the first step only fills the memories)."""
    sum_sq = state["dog_sum_sq"]
    return state["dog_distance"] / torch.where(sum_sq > 0, sum_sq, torch.ones_like(sum_sq)).sqrt() * (sum_sq > 0)


def dog_statistics(direction: Tensor, new_param: Tensor, state: State) -> State:
    """The sums DoG carries to the next step, taken from this one: ``G_t = G_{t−1} + ‖u_t‖²`` and
    ``r̄_{t+1} = max(r̄_t, ‖W_{t+1} − W_0‖)`` (per-tensor sums of the pass that writes W, as the memory's are)."""
    dtype = state["dog_sum_sq"].dtype
    distance, sum_sq = dog_carry(state["dog_distance"], state["dog_sum_sq"], _squared_norm(direction, dtype),
                                 _squared_norm(new_param.detach() - state["dog_origin"], dtype))
    return {"dog_origin": state["dog_origin"], "dog_distance": distance, "dog_sum_sq": sum_sq}


def dog_carry(distance: Tensor, sum_sq: Tensor, update_sq: Tensor, moved_sq: Tensor) -> tuple[Tensor, Tensor]:
    """``(max(r̄, √moved_sq), G + update_sq)``: DoG's state after a step with ``‖u‖² = update_sq`` that left W at
    ``‖W − W_0‖² = moved_sq`` (elementwise: one tensor's, or stacked ones')."""
    return torch.maximum(distance, moved_sq.to(distance.dtype).sqrt()), sum_sq + update_sq.to(sum_sq.dtype)


def has_schedule(hp: Hparams) -> bool:
    """Whether the group has a learned schedule ``s_t`` (``lr_decay`` > 0 or ``lr_horizon`` > 0)."""
    return not T.is_zero(hp["lr_decay"]) or bool(hp["lr_horizon"])


def lr_factor(step: Tensor, hp: Hparams, like: Tensor) -> Tensor | None:
    """``s_t`` (module docstring) at step ``step`` as a 0-dim fp32 (fp64 for fp64 ``like``) tensor, or ``None``
    when the group has no schedule (``lr_decay = 0`` and ``lr_horizon = 0``)."""
    if not has_schedule(hp):
        return None
    t = T.step_float(step, like)
    factor = decayed_lr(torch.ones_like(t), hp["lr_decay"], t) if not T.is_zero(hp["lr_decay"]) else torch.ones_like(t)
    if hp["lr_horizon"]:
        factor = factor * horizon_factor(t, hp["lr_horizon"], hp["lr_power"])
        if not T.is_zero(hp["lr_warmup"]):
            factor = factor * warmup_factor(t, hp["lr_horizon"], hp["lr_warmup"])
    return factor


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
    """``max(1 − (step − 1)/horizon, 1/horizon)^power``: 1 at step 1, ``(1/horizon)^power`` from step ``horizon``
    on (a run longer than the horizon keeps its last step size instead of stopping)."""
    return (1 - (step - 1) / horizon).clamp(min=1 / horizon) ** power


def warmup_factor(step: Tensor, horizon: int, warmup: float | Tensor) -> Tensor:
    """``min(1, step/(warmup·horizon))``: a linear warm-up over the first ``warmup`` fraction of the run."""
    return (step / (warmup * horizon)).clamp(max=1)


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
    check_range("lr_warmup", hp["lr_warmup"], 0.0, 1.0)
    check_int("seed", hp["seed"], low=0)
    check_choice("keys", hp["keys"], KEY_LAYOUTS)
    check_range("eta2", hp["eta2"], 0.0)
    check_choice("lr_adapt", hp["lr_adapt"], LR_ADAPTATIONS)
    check_range("dog_reps", hp["dog_reps"], 0.0, low_open=True)
    _check_timescales(hp["timescales"])
    if hp["keys"] == "momenta" and hp["objective"] != "dot":
        raise ValueError(f"keys='momenta' takes objective='dot' only, got objective={hp['objective']!r}")
    if hp["keys"] == "blocks" and not T.is_zero(hp["eta2"]):
        raise ValueError("eta2 (W2 learning online) needs keys='momenta'; the blocks layout keeps W2 fixed")
    mem = hp["memory_init"]
    if mem is not None:
        if not (isinstance(mem, (tuple, list)) and len(mem) == 2 and all(isinstance(t, Tensor) for t in mem)):
            raise TypeError("memory_init must be None or a pair of tensors (W1, W2)")
        want = memory_shapes(hp)
        got = tuple(tuple(t.shape) for t in mem)
        if got != want:
            what = "hidden and timescales (keys='momenta')" if hp["keys"] == "momenta" else "key_dim/hidden"
            raise ValueError(f"memory_init shapes must be {want} for {what}, got {got}")


def _check_timescales(gammas: Any) -> None:
    if isinstance(gammas, Tensor):
        if gammas.dim() != 1 or not gammas.is_floating_point():
            raise ValueError(f"timescales must be a 1-D float tensor or a sequence of numbers, got {gammas!r}")
        values = gammas.detach().tolist()
    elif isinstance(gammas, (tuple, list)):
        values = list(gammas)
    else:
        raise TypeError(f"timescales must be a sequence of numbers in [0, 1), got {type(gammas).__name__}")
    if len(values) > MAX_TIMESCALES:
        raise ValueError(f"timescales takes at most {MAX_TIMESCALES} time scales, got {len(values)}")
    for i, gamma in enumerate(values):
        check_range(f"timescales[{i}]", gamma, 0.0, 1.0, high_open=True)


deep_momentum = Rule(
    "deep_momentum", DEFAULTS, init, update, validate, doc=__doc__,
    elementwise=lambda hp: (hp["hidden"] == 0 and hp["objective"] == "dot" and hp["nonlinearity"] is None
                            and hp["keys"] == "blocks"),
)
