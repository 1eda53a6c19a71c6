"""Options shared by the memory rules: weight decay, preconditioner ``P`` and output nonlinearity σ.

Each is a small pure function so every rule composes them the same way::

    g      = coupled_weight_decay(grad, param, hp)          # g + wd·W    (coupled)
                                                            # (decoupled_weight_decay: None = AdamW's
                                                            #  decoupled decay where P is Adam's)
    v, s   = precondition(g, state, hp)                     # P g         (identity or Adam's diagonal)
    u      = memory update producing the direction
    u      = output_nonlinearity(u, hp)                     # σ(u)        (identity or Newton–Schulz)
    delta  = descend(u, param, hp)                          # −lr·u − lr·λ·W (decoupled; λ = decoupled_rate)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import sharding
from .base import Hparams, State, check_bool, check_choice, check_range

PRECONDITIONERS = ("identity", "adam")
NONLINEARITIES = (None, "newton_schulz")
# the dtype Newton–Schulz iterates in: the tensors' own, or bf16 as torch.optim.Muon does (fast on tensor cores)
NS_DTYPES: dict[str | None, torch.dtype | None] = {None: None, "bfloat16": torch.bfloat16, "float32": torch.float32}

SHARED_DEFAULTS: dict[str, Any] = {
    "weight_decay": 0.0,
    "decoupled_weight_decay": None,  # None: decoupled iff preconditioner == "adam" (``decoupled``)
    "preconditioner": "identity",
    "beta2": 0.999,
    "eps": 1e-8,
    "relative_eps": 0.0,  # κ: a floor under Adam's denominator, κ × the peak gradient RMS (``precondition``)
    "nonlinearity": None,
    "ns_dtype": None,
}


def validate_shared(hp: Hparams) -> None:
    check_range("lr", hp["lr"], 0.0)
    check_range("weight_decay", hp["weight_decay"], 0.0)
    if hp["decoupled_weight_decay"] is not None:
        check_bool("decoupled_weight_decay", hp["decoupled_weight_decay"])
    check_choice("preconditioner", hp["preconditioner"], PRECONDITIONERS)
    check_range("beta2", hp["beta2"], 0.0, 1.0, high_open=True)
    check_range("eps", hp["eps"], 0.0)
    check_range("relative_eps", hp["relative_eps"], 0.0)
    if not is_zero(hp["relative_eps"]) and hp["preconditioner"] != "adam":
        raise ValueError(f"relative_eps floors Adam's denominator: it needs preconditioner='adam', got "
                         f"preconditioner={hp['preconditioner']!r}")
    check_choice("nonlinearity", hp["nonlinearity"], NONLINEARITIES)
    check_choice("ns_dtype", hp["ns_dtype"], NS_DTYPES)


def decoupled(hp: Hparams) -> bool:
    """Whether ``weight_decay`` is decoupled (AdamW's ``W ← W − lr·wd·W``) or coupled (L2, ``g + wd·W``).

    ``decoupled_weight_decay=None`` (the default) means decoupled exactly where the Adam preconditioner is used,
    as a script written for AdamW expects of its param groups' ``weight_decay``; coupled otherwise (so
    ``Momentum``/``SGD`` keep ``torch.optim.SGD``'s meaning).  ``True``/``False`` force either."""
    flag = hp.get("decoupled_weight_decay")
    return hp.get("preconditioner") == "adam" if flag is None else bool(flag)


def coupled_weight_decay(grad: Tensor, param: Tensor, hp: Hparams) -> Tensor:
    """``g + wd·W`` for coupled (L2) weight decay, else ``g``."""
    if decoupled(hp) or is_zero(hp["weight_decay"]):
        return grad
    return grad + hp["weight_decay"] * param


def decoupled_rate(hp: Hparams) -> Any:
    """The rate λ of a decoupled decay ``W ← W − lr·λ·W``: ``weight_decay``, or ``weight_decay/(1 − μ)`` where Adam's
    preconditioner feeds a sum-form momentum ``m ← μm + P g`` (Momentum, DeltaMomentum, DeepMomentum; ``μ`` =
    ``momentum``) read without an output nonlinearity.  Such an update is ``1/(1 − μ)`` Adam steps in steady state,
    so its AdamW-equivalent lr is ``lr/(1 − μ)``, and AdamW decays by that lr times ``weight_decay``: a param group's
    ``weight_decay`` regularises as much as it does under AdamW at the matching lr.  (Adam/AdamW, Muon's
    Newton–Schulz update, whose scale does not grow with m, and the identity preconditioner keep ``lr·wd``.)"""
    wd, mu = hp["weight_decay"], hp.get("momentum", 0.0)
    if hp.get("preconditioner") != "adam" or hp.get("nonlinearity") is not None or is_zero(mu):
        return wd
    return wd / (1 - mu)


def descend(direction: Tensor, param: Tensor, hp: Hparams) -> Tensor:
    """``delta = −lr·u`` (``− lr·λ·W`` more with decoupled weight decay, λ = ``decoupled_rate``)."""
    delta = -hp["lr"] * direction
    if decoupled(hp) and not is_zero(hp["weight_decay"]):
        delta = delta - hp["lr"] * decoupled_rate(hp) * param
    return delta


def init_preconditioner(param: Tensor, hp: Hparams) -> State:
    if hp["preconditioner"] == "adam":
        state = {"step": new_step(param), "exp_avg_sq": torch.zeros_like(param)}
        if not is_zero(hp.get("relative_eps", 0.0)):
            state.update(peak_rms_init(param))
        return state
    return {}


def precondition(grad: Tensor, state: State, hp: Hparams) -> tuple[Tensor, State]:
    """``P g``: identity, or Adam's diagonal ``g / (√v̂_t + ε + κ·ρ_t)``, ``v̂_t = v_t/(1 − β₂ᵗ)``, ``v_t`` the EMA of g².

    ``κ`` = ``relative_eps`` (0, the default: Adam's own denominator) floors the denominator at a multiple of the
    tensor's largest gradient RMS so far (``peak_rms_carry``)::

        q_t = β₂·q_{t−1} + (1 − β₂)·mean(g_t²)   (= mean(v_t): the tensor's mean square gradient)
        ρ_t = max(ρ_{t−1}, √(q_t/(1 − β₂ᵗ)))       (q₀ = ρ₀ = 0)

    Where the gradients stay near their peak scale the step is Adam's, scaled by about 1/(1 + κ); where they
    collapse far below it (a training loss at its floor, the noise of an over-fitted small data set) ``P g ≈
    g/(κρ)`` shrinks with them instead of being normalised back up to a full step."""
    if hp["preconditioner"] != "adam":
        return grad, {}
    step = state["step"] + 1
    beta2 = hp["beta2"]
    extra: State = {}
    eps = hp["eps"]
    if not is_zero(hp.get("relative_eps", 0.0)):
        carried = state if "peak_rms" in state else peak_rms_init(grad)  # a group given κ after its state was made
        grad_mean_sq = sharding.gathered(grad.detach().to(carried["mean_sq"].dtype).square().mean())
        extra = peak_rms_carry(carried, grad_mean_sq, step, beta2)
        floor = hp["relative_eps"] * extra["peak_rms"]
        # a DTensor's shards take the floor as a number (one mixes no plain tensor into DTensor arithmetic)
        eps = eps + (floor.item() if sharding.is_dtensor(grad) else floor.to(grad.dtype))
    v = state["exp_avg_sq"] * beta2 + (1 - beta2) * grad * grad
    bias_correction2 = 1 - beta2 ** step_float(step, grad)  # 0-dim fp32: does not promote grad
    denom = sqrt0(v / bias_correction2) + eps
    return grad / denom, {"step": step, "exp_avg_sq": v, **extra}


def peak_rms_init(like: Tensor) -> State:
    """``relative_eps``'s state: ρ₀ = q₀ = 0, scalars on ``like``'s device (fp64 for fp64 tensors, else fp32)."""
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    return {k: torch.zeros((), dtype=dtype, device=like.device) for k in ("peak_rms", "mean_sq")}


def peak_rms_carry(carried: State, grad_mean_sq: Tensor, step: Tensor, beta2: Any) -> State:
    """``q_t``, ``ρ_t`` of ``relative_eps`` (``precondition``) from ``q_{t−1}``, ``ρ_{t−1}`` (``carried``), the
    gradient's ``mean(g_t²)`` and the step count t: elementwise, so a stack of tensors' scalars works as one."""
    mean_sq = beta2 * carried["mean_sq"] + (1 - beta2) * grad_mean_sq
    rms = (mean_sq / (1 - beta2 ** step.to(mean_sq.dtype))).sqrt()
    return {"peak_rms": torch.maximum(carried["peak_rms"], rms), "mean_sq": mean_sq}


def sqrt0(v: Tensor) -> Tensor:
    """``√v`` for ``v ≥ 0`` whose derivative is 0, not ∞, where ``v = 0`` (a coordinate whose gradients
    were all zero so far): same values as ``v.sqrt()``, and no NaN meta-gradients through ``0·∞``."""
    positive = v > 0
    return torch.where(positive, torch.where(positive, v, torch.ones_like(v)).sqrt(), torch.zeros_like(v))


NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz(update: Tensor, steps: int = 5, eps: float = 1e-7) -> Tensor:
    """Approximate orthogonalisation ``U → (U Uᵀ)^{-1/2} U`` by the quintic Newton–Schulz iteration of Muon.

    Applies to the 2-D view ``(shape[0], -1)`` (or a batch of them: ``(B, rows, cols)`` with ``batched``
    callers, see ``newton_schulz_many``); the input is first divided by ``max(‖U‖_F, eps)`` and the result
    scaled by ``sqrt(max(1, rows/cols))``: ``torch.optim.Muon``'s conventions (its lr adjustment "original").
    """
    shape = update.shape
    return _newton_schulz_3d(update.reshape(1, shape[0], -1), steps, eps).reshape(shape)


def _newton_schulz_3d(x: Tensor, steps: int, eps: float) -> Tensor:
    """Newton–Schulz on a batch ``(B, rows, cols)`` of same-shape matrices (bmm: one launch per product)."""
    a, b, c = NS_COEFFICIENTS
    rows, cols = x.shape[-2:]
    transposed = rows > cols
    if transposed:
        x = x.mT
    x = x / torch.linalg.matrix_norm(x, keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = torch.bmm(x, x.mT)
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    if transposed:
        x = x.mT
    return x * max(1.0, rows / cols) ** 0.5 if rows > cols else x


def newton_schulz_many(updates: list[Tensor], steps: int = 5, eps: float = 1e-7,
                       dtype: torch.dtype | None = None) -> list[Tensor]:
    """``[newton_schulz(u) for u in updates]`` with same-shape matrices stacked and iterated together (in
    ``dtype`` if given, cast back after), so the kernels launched grow with the number of distinct shapes,
    not of tensors."""
    by_shape: dict[tuple[torch.Size, torch.dtype], list[int]] = {}
    for i, u in enumerate(updates):
        by_shape.setdefault((u.shape, u.dtype), []).append(i)
    out: list[Tensor] = list(updates)
    for (shape, own_dtype), idx in by_shape.items():
        x = torch.stack([updates[i] for i in idx])
        if x.dim() != 3:
            x = x.reshape(len(idx), shape[0], -1)
        y = _newton_schulz_3d(x if dtype is None else x.to(dtype), steps, eps).to(own_dtype)
        for i, yi in zip(idx, (y if len(shape) == 2 else y.reshape(len(idx), *shape)).unbind(0)):
            out[i] = yi
    return out


def orthogonalize_many(xs: list[Tensor], ns_dtype: str | None = None, steps: int = 5) -> list[Tensor]:
    """``[newton_schulz(x) if x.dim() >= 2 else x for x in xs]``, same-shape matrices batched
    (``newton_schulz_many``), iterated in ``ns_dtype`` (a key of ``NS_DTYPES``; default the tensors' own).
    Sharded DTensor matrices (FSDP2) are orthogonalised whole, distributed over the ranks (``sharding.map_whole``)."""
    matrices = [i for i, x in enumerate(xs) if x.dim() >= 2]
    out = list(xs)
    whole = sharding.map_whole([xs[i] for i in matrices],
                               lambda ms: newton_schulz_many(ms, steps=steps, dtype=NS_DTYPES[ns_dtype]))
    for i, y in zip(matrices, whole):
        out[i] = y
    return out


def output_nonlinearity(direction: Tensor, hp: Hparams) -> Tensor:
    """σ on the update: Newton–Schulz (in ``ns_dtype``) for tensors with ≥ 2 dims when asked for, identity
    otherwise."""
    if hp["nonlinearity"] == "newton_schulz":
        return orthogonalize_many([direction], hp["ns_dtype"])[0]
    return direction


def is_zero(value: Any) -> bool:
    return not isinstance(value, Tensor) and value == 0


def step_dtype() -> torch.dtype:
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def new_step(param: Tensor) -> Tensor:
    """A fresh step counter: a 0-dim tensor on ``param``'s device (so no kernel waits on the host), fp64 for
    fp64 parameters (or under an fp64 default dtype), else fp32."""
    dtype = torch.float64 if param.dtype == torch.float64 else step_dtype()
    return torch.zeros((), dtype=dtype, device=param.device)


def step_float(step: Tensor, like: Tensor) -> Tensor:
    """``step`` as a float for bias corrections and schedules: fp64 for fp64 tensors, else fp32, so that
    ``1 − β₂ᵗ`` does not round to 0 in bf16/fp16 (the caller casts the small result, as torch does)."""
    return step.to(torch.float64 if like.dtype == torch.float64 else torch.float32)
