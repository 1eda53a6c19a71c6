"""DeepMomentum: momentum with a per-coordinate memory and a deep read-out (see ``deepopt.rules.deep``)."""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from deepopt.checkpoint import load_pretrained
from deepopt.rules import deep_momentum
from deepopt.rules.base import check_int
from deepopt.rules.deep import (
    ACTIVATIONS,
    dog_carry,
    dog_step_size,
    has_schedule,
    initial_memory,
    lr_factor,
    n_features,
    safe_rms,
    to_blocks,
)
from deepopt.rules.transforms import decoupled, decoupled_rate, is_zero, step_float

from . import deep_cpu, deep_kernels
from .base import MemoryOptimizer
from .delta_momentum import _inner_products, _squared_norms
from .momentum import foreach_output_nonlinearity, foreach_precondition, foreach_relative_eps


def _foreach_softsign_(ts: list[Tensor]) -> None:
    """``t ← t/(1 + |t|)`` for each tensor, through one temporary each."""
    denominators = torch._foreach_abs(ts)
    torch._foreach_add_(denominators, 1.0)
    torch._foreach_div_(ts, denominators)


# activations with an in-place multi-tensor op (the others take the rule path)
_FOREACH_ACTIVATIONS = {
    "tanh": torch._foreach_tanh_,
    "relu": lambda ts: torch._foreach_clamp_min_(ts, 0.0),
    "softsign": _foreach_softsign_,
    "identity": lambda ts: None,
}
# the CPU loop's activations, in place on a block of pre-activations z' = pre·z: Φ up to a positive factor, which
# the normalised features Φ̂ = Φ/r cancel (tanh z = 2(σ(2z) − ½), and σ is 6× faster than tanh on the CPU)
_CPU_ACTIVATIONS = {
    "tanh": (2.0, lambda z: z.sigmoid_().sub_(0.5)),
    "relu": (1.0, lambda z: z.clamp_min_(0.0)),
    "identity": (1.0, lambda z: None),
}
_CPU_CHUNK = 1 << 18  # coordinates per chunk of the CPU loop (≈ 1 MiB in fp32: its blocks stay in cache)
_CHUNK = 256  # coordinates per chunk of the momenta layout's batched MLP (a tensor's last chunk is zero-padded)
_MAX_CHUNKS = 1024  # chunks per slice of it (bounds its (chunks, _CHUNK, hidden) temporaries)
# the per-parameter state the momenta kernels read and write in place (the step counter is advanced here)
_MOMENTA_STATE = ("momentum_buffer", "exp_avg_sq", "timescale_buffers", "W1", "W2")
_DOG_STATE = ("dog_distance", "dog_sum_sq")  # and "dog_origin", W₀, which the kernels read
# with lr_adapt="dog" the lr is a multiplier of order 1 (DoG's 1; the shipped optimizer's 0.93, which stalls at 0.1×
# of it): a group lr below this is an AdamW step size written into a DoG group, and it warns
DOG_MIN_LR = 0.05


@torch.library.custom_op("deepopt::foreach_mm", mutates_args=())
def _foreach_mm_op(a: list[Tensor], b: list[Tensor]) -> list[Tensor]:
    """``[aᵢ @ bᵢ]``: what ``torch._foreach_mm`` computes, as one op where torch has none (2.11 has none; 2.13 has it)
    (one dispatched op either way, a loop of ``mm`` inside)."""
    return [torch.mm(x, y) for x, y in zip(a, b)]


@_foreach_mm_op.register_fake
def _(a: list[Tensor], b: list[Tensor]) -> list[Tensor]:
    return [x.new_empty(x.shape[0], y.shape[1]) for x, y in zip(a, b)]


_foreach_mm = getattr(torch, "_foreach_mm", None) or _foreach_mm_op


@dataclass
class _Blocks:
    """Flat work buffers for one list of parameters, each tensor zero-padded to whole key blocks, with views
    made once: ``as_param[i]`` shaped like parameter i (for ``_foreach_copy_`` in), ``rows[i]`` its
    ``(n_i, key_dim)`` block view and ``cols[i]`` that view transposed."""

    buffer: Tensor
    as_param: list[Tensor]
    rows: list[Tensor]
    cols: list[Tensor]
    sqrt_counts: Tensor  # √n_i, blocks per tensor, shaped (T, 1, 1)

    @classmethod
    def like(cls, params: list[Tensor], key_dim: int) -> _Blocks:
        sizes = [math.ceil(p.numel() / key_dim) * key_dim for p in params]
        buffer = params[0].new_zeros(sum(sizes))
        as_param, rows = [], []
        for p, part in zip(params, buffer.split(sizes)):
            as_param.append(part[: p.numel()].view(p.shape))
            rows.append(part.view(-1, key_dim))
        counts = torch.tensor([r.shape[0] for r in rows], dtype=buffer.dtype).view(-1, 1, 1)
        return cls(buffer, as_param, rows, [r.mT for r in rows], counts.sqrt().to(buffer.device))


@dataclass
class _Memory:
    """W₁ ``(T, kd, h)`` and W₂ ``(T, h, kd)`` of one list of parameters stacked, the states holding the views
    ``w1_views``/``w2_views`` (so W₁ is updated in place, through ``w1_t = w1.mT``), and ``(T, 1, 1)`` buffers
    for the per-tensor norms of keys, values and features, with ``(T,)`` views of them to stack into."""

    w1: Tensor
    w2: Tensor
    w1_t: Tensor
    w1_views: list[Tensor]
    w2_views: list[Tensor]
    norms: dict[str, Tensor]
    norm_outs: dict[str, Tensor]

    @classmethod
    def stack(cls, states: list[dict[str, Tensor]]) -> _Memory:
        w1, w2 = (torch.stack([st[k] for st in states]) for k in ("W1", "W2"))
        w1_views, w2_views = list(w1.unbind()), list(w2.unbind())
        for st, a, b in zip(states, w1_views, w2_views):
            st["W1"], st["W2"] = a, b
        norms = {k: w1.new_empty(len(states), 1, 1) for k in ("keys", "values", "features")}
        return cls(w1, w2, w1.mT, w1_views, w2_views, norms, {k: n.view(-1) for k, n in norms.items()})


def _fused_options(group: dict[str, Any]) -> bool:
    """The options the CPU loop and the Triton kernels cover: the deep branch with the dot objective, identity
    preconditioner and no output nonlinearity or 1/t schedule."""
    return (group["hidden"] > 0 and group["keys"] == "blocks" and group["objective"] == "dot"
            and group["preconditioner"] == "identity"
            and group["nonlinearity"] is None and group["lr_decay"] == 0 and group["lr_horizon"] == 0)


def _cpu_loop_applies(group: dict[str, Any], params: list[Tensor]) -> bool:
    """The CPU loop takes the ``_fused_options`` on contiguous, non-empty fp32/fp64 CPU parameters."""
    return _fused_options(group) and all(
        p.device.type == "cpu" and p.dtype in (torch.float32, torch.float64) and p.is_contiguous() and p.numel() > 0
        for p in params)


def _triton_applies(group: dict[str, Any], params: list[Tensor]) -> bool:
    """The Triton kernels (``deep_kernels``) take the ``_fused_options`` on CUDA, with tanh/relu/identity
    features, for dense fp32/bf16 parameters whose ``key_dim``, ``hidden`` the kernels take."""
    return (_fused_options(group) and params[0].device.type == "cuda"
            and group["activation"] in deep_kernels.ACTIVATIONS
            and deep_kernels.available(params, group["key_dim"], group["hidden"]))


def _momenta_options(group: dict[str, Any]) -> bool:
    """The options the momenta kernels (``deep_cpu.momenta_step_``, ``deep_kernels.momenta_step_``) cover, the
    shipped learned optimizer's: ``keys="momenta"`` with a deep branch, Adam preconditioner, tanh or softsign
    features, the dot objective, W₂ fixed (``eta2 = 0``), no output nonlinearity, and decoupled (or no) weight
    decay; any lr schedule (``lr_t`` is passed per tensor).  Hyperparameters held as tensors take the torch
    path."""
    return (group["keys"] == "momenta" and group["hidden"] > 0 and group["preconditioner"] == "adam"
            and group["activation"] in deep_cpu.MOMENTA_ACTIVATIONS and group["objective"] == "dot"
            and group["nonlinearity"] is None
            and is_zero(group["eta2"])
            and (decoupled(group) or is_zero(group["weight_decay"])))


def _momenta_kernel(group: dict[str, Any], params: list[Tensor],
                    states: list[dict[str, Tensor]]) -> Any:
    """The momenta kernel that takes this list, or None (the ``_foreach`` path): ``deep_cpu.momenta_step_`` for
    contiguous fp32 CPU tensors (state included) when its C library is built for ``hidden`` and the number of time
    scales, ``deep_kernels.momenta_step_`` for dense fp32/bf16 CUDA tensors when Triton is importable."""
    if not _momenta_options(group):
        return None
    device, hidden, scales = params[0].device.type, group["hidden"], len(group["timescales"])
    dog = group["lr_adapt"] == "dog"
    names = (*_MOMENTA_STATE, "dog_origin") if dog else _MOMENTA_STATE
    if device == "cpu":
        tensors = [*params, *(st[k] for st in states for k in names)]
        if (all(t.dtype == torch.float32 and t.is_contiguous() for t in tensors)
                and deep_cpu.momenta_available(hidden, scales, group["activation"], dog)):
            return deep_cpu.momenta_step_
    elif device == "cuda" and deep_kernels.momenta_available(params, hidden) and all(
            st[k].is_contiguous() for st in states for k in names):
        return deep_kernels.momenta_step_
    return None


def _foreach_weight_decay(group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                          lr: float | Tensor) -> list[Tensor]:
    """``MemoryOptimizer._foreach_weight_decay`` with the step's lr, which a schedule makes one per tensor: a
    decoupled decay shrinks ``W ← (1 − lr_t·λ)·W`` in place (λ = ``decoupled_rate``), a coupled one returns
    ``g + wd·W``."""
    if isinstance(lr, Tensor) and lr.dim() and decoupled(group) and not is_zero(group["weight_decay"]):
        torch._foreach_mul_(params, list((1 - lr * decoupled_rate(group)).unbind()))
        return grads
    return MemoryOptimizer._foreach_weight_decay({**group, "lr": lr}, params, grads)


def _block_rows(flat: Tensor, whole: Tensor, a: int, b: int) -> Tensor:
    """Rows ``a:b`` of ``to_blocks(flat, key_dim)``: a view of ``whole`` (the whole blocks, ``(rows, key_dim)``)
    where they are whole, else a zero-padded copy of the tail."""
    return whole[a:b] if b <= whole.shape[0] else to_blocks(flat[a * whole.shape[1]:], whole.shape[1])


class DeepMomentum(MemoryOptimizer):
    """Deep Momentum Gradient Descent (Nested Learning Eq. 23 / 50)::

        m ← α·m + P g                          (objective="dot";  "l2": m ← α·m − β⟨m, k̂⟩k̂ + P g)
        keys="blocks":  W₁ ← α·W₁ − η·∇_{W₁} ℓ(W₁; Φ̂(K), V),  Φ̂(K) = σ(K W₂ᵀ)/r  (K, V: normalised key/value blocks)
                        u = m + s_v·Φ̂(K) W₁ᵀ
        keys="momenta": k_i = (v_i, (1 − α)m_i, e_1i…e_Ji), e_j ← γ_j e_j + (1 − γ_j)v  (momenta at time scales γ)
                        u_i = m_i + W₁·σ(W₂ k_i);  then W₁ ← αW₁ + (1 − α)W₁⁰ + η·mean_i(v_i σ(W₂k_i))
                        (and W₂, with eta2 > 0, by a normalised step of the same objective)
        W ← W − lr_t·σ_out(u) − lr_t·λ·W (decoupled),   lr_t = lr·s_t   (lr_adapt="dog": lr·s_t·r̄_t/√G_{t−1})
        s_t = w_t/(1 + lr_decay·(t − 1))·h_t,  h_t = max(1 − (t − 1)/N, 1/N)^lr_power (N = lr_horizon > 0, else 1)

    ``lr`` is the param group's, so a script's own scheduler (warm-up + cosine, ``OneCycleLR``) composes with the
    learned schedule ``s_t`` as a product.  ``momentum`` is α; ``eta`` the read-out's inner learning rate;
    ``hidden`` its width (0: no deep branch, then this is ``Momentum``, or ``DeltaMomentum`` with
    ``objective="l2"``); ``keys`` the key layout; ``key_dim`` the coordinates per key block and ``key_source`` the
    blocks' source (raw or preconditioned gradient); ``timescales`` the momenta's decays and ``eta2`` W₂'s online
    step (momenta layout).  ``memory_init=(W1, W2)`` sets θ₀ (what meta-training learns; see ``from_pretrained``),
    else W₁ = 0 and W₂ ~ init_scale·N(0, 1) drawn from ``seed``.  ``lr_decay``, ``lr_horizon`` (N, the run's
    length; 0: no h_t; ``total_steps`` is the same), ``lr_power`` and ``lr_warmup`` (w_t = min(1, t/(lr_warmup·N)))
    set the learned schedule; past N it keeps its last value and the optimizer warns once.  ``lr_adapt="dog"``
    scales each tensor's step by its distance from its start over the root sum of its squared update norms
    (layer-wise DoG; ``dog_reps`` sets the first step, r_ε = dog_reps·(1 + ‖W₀‖), at least bf16/fp16's machine
    epsilon in place of dog_reps so that first steps do not round away), making ``lr`` a multiplier of
    order 1 (one below ``DOG_MIN_LR`` = 0.05, an AdamW step size, warns at construction, or at the first step when
    a scheduler's base lr is); the momenta kernels take it, other configurations run the rule tensor by tensor.

    Weight decay: ``weight_decay`` is **decoupled** (AdamW's) with ``preconditioner="adam"`` and **coupled** (L2,
    ``g + wd·W``) with the identity preconditioner, unless ``decoupled_weight_decay`` says otherwise.  Decoupled with
    Adam's P, its rate is λ = wd/(1 − α): the sum-form momentum makes u about 1/(1 − α) Adam steps, so lr_t/(1 − α)
    is the AdamW lr of the same steps and λ gives AdamW's decay at that lr (``transforms.decoupled_rate``).  Further
    options: ``nonlinearity``, ``foreach``, ``nonfinite``.  The full equations are in ``deepopt.rules.deep``;
    ``DeepMomentum.pretrained`` loads the shipped learned optimizer.

    Under FSDP2 (sharded DTensor parameters) the momentum and preconditioner run on the shards; the deep
    read-out of the blocks layout needs whole key blocks, which cross shard boundaries whenever a shard's length
    is not a multiple of ``key_dim``, so the key (and value) tensor is gathered (one all-gather per tensor and
    step, the volume of FSDP2's own parameter all-gather), its RMS norms, features and the W₁ step computed whole
    on every rank (W₁, W₂ stay identical, unsharded), and each rank keeps its shard of the read-out: equal to the
    unsharded run (``deepopt.rules.sharding``).
    The momenta layout's memory writes average over all of a tensor's coordinates: it gathers the value and
    momenta the same way.
    """

    rule = deep_momentum

    def __init__(self, params: Any, lr: float = 1e-3, momentum: float = 0.9, eta: float = 0.1,
                 hidden: int = 16, key_dim: int = 16, objective: str = "dot", total_steps: int | None = None,
                 **options: Any) -> None:
        if total_steps is not None:
            check_int("total_steps", total_steps)
            if options.get("lr_horizon", total_steps) != total_steps:
                raise ValueError(f"total_steps ({total_steps}) and lr_horizon ({options['lr_horizon']}) both set "
                                 "the schedule's run length; pass one")
            options["lr_horizon"] = total_steps
        super().__init__(params, lr=lr, momentum=momentum, eta=eta, hidden=hidden, key_dim=key_dim,
                         objective=objective, **options)
        self._blocks: dict[tuple, Any] = {}  # work buffers (not state: rebuilt on demand)
        self._steps_called = 0  # step() calls, for the past-the-horizon warning only (never read by the math)
        self._warned_horizon = False
        self._warned_dog_lr = False
        self._check_dog_lr(scheduled_only=False)

    def _check_dog_lr(self, scheduled_only: bool) -> None:
        """Warn once when a ``lr_adapt="dog"`` group's lr is an AdamW-sized step size (below ``DOG_MIN_LR``): with
        DoG the lr multiplies r̄/√G, so 3e-3 makes every step ~300× smaller than the shipped 0.93 and the model
        barely moves.  Checked at construction (the groups' lr) and at the first step (the base lr of a scheduler
        made in between: ``OneCycleLR``'s ``max_lr``, other torch schedulers' ``initial_lr``; ``scheduled_only``).
        A warm-up's current lr is not checked: it starts near 0 by design."""
        for group in self.param_groups:
            if group["lr_adapt"] != "dog":
                continue
            name = next((k for k in ("max_lr", "initial_lr") if k in group), None if scheduled_only else "lr")
            if name is not None and float(group[name]) < DOG_MIN_LR:
                self._warned_dog_lr = True
                warnings.warn(f"DeepMomentum(lr_adapt='dog'): a param group's {name} is {float(group[name]):.3g}, "
                              f"below {DOG_MIN_LR}; with DoG the lr is a multiplier of order 1 (the shipped "
                              "optimizer's is 0.93), not an AdamW step size, so this run will barely move. Keep "
                              "the shipped lr (or about 1) and let a scheduler scale it from there.", stacklevel=3)
                return

    @torch.compiler.disable
    def _note_step(self) -> None:
        """Warn once when the optimizer is stepped past a group's ``lr_horizon``.

        The schedule's math reads the step count from the state's device tensors; this warning reads a host-side
        count of ``step()`` calls instead (reading the device count would synchronise every step).  The count
        decides nothing but the warning: restored by ``load_state_dict`` (from the loaded state, on the host once)
        and by ``deepcopy``/pickle; after other restores (a direct assignment to ``state``) the warning may come
        late or early, the steps never differ.  ``torch.compiler.disable`` keeps it out of compiled graphs, so
        ``torch.compile`` does not guard on it."""
        self._steps_called += 1
        if self._steps_called == 1 and not self._warned_dog_lr:
            self._check_dog_lr(scheduled_only=True)
        if self._warned_horizon:
            return
        horizons = [g["lr_horizon"] for g in self.param_groups if g["lr_horizon"]]
        if horizons and self._steps_called > min(horizons):
            self._warned_horizon = True
            warnings.warn(f"DeepMomentum: step {self._steps_called} passes lr_horizon = {min(horizons)} (the run "
                          "length its learned schedule anneals over); it keeps training at the schedule's last "
                          "step size. Pass total_steps=<run length> to anneal over the whole run.", stacklevel=3)

    def step(self, closure: Any = None) -> Any:
        loss = super().step(closure)
        self._note_step()
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        # read on the host once, at load time, from the saved counters (the loaded ones may sit on a meta device)
        steps = [st["step"] for st in state_dict["state"].values()
                 if isinstance(st, dict) and isinstance(st.get("step"), Tensor) and st["step"].device.type != "meta"]
        self._steps_called = int(max(float(s) for s in steps)) if steps else 0
        self._warned_horizon = False

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles leave the work buffers behind and keep the host-side step count (``_note_step``;
        torch's ``Optimizer.__getstate__`` keeps only defaults, state and groups)."""
        return {**super().__getstate__(), "_blocks": {}, "_steps_called": self._steps_called,
                "_warned_horizon": self._warned_horizon, "_warned_dog_lr": self._warned_dog_lr}

    def _work(self, params: list[Tensor], key_dim: int, role: str) -> _Blocks:
        key = (role, key_dim, *map(id, params))
        if key not in self._blocks:
            if len(self._blocks) > 4 * (len(self.param_groups) + 1):
                self._blocks.clear()
            self._blocks[key] = _Blocks.like(params, key_dim)
        return self._blocks[key]

    def _fast_step(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> bool:
        """The rule over all tensors at once, in a number of kernels that does not grow with the number of
        tensors: the per-coordinate memory with ``_foreach`` ops, the deep read-out on block views of flat
        work buffers with ``_foreach_mm`` in the transposed layout (``Φᵀ = σ(W₂ Kᵀ/s)``, ``h × n``), so no
        per-tensor view is made after the first step::

            Φᵀ = σ((W₂/s_k) Kᵀ),  r = ‖Φ‖/√n,  C = ΦᵀV/(s_v r n)
            dot: W₁ᵀ ← α W₁ᵀ + η C;   l2: W₁ᵀ ← α W₁ᵀ − η(Φᵀ(Φ W₁ᵀ/r − V/s_v)/(r n))
            u = m + (W₁ s_v/r Φᵀ)ᵀ

        On the CPU, where a multi-tensor op is a loop anyway and every full-size temporary costs a pass over
        memory, the default options run a compiled kernel (``deep_cpu``) or an in-place loop over cache-sized
        chunks instead (``_cpu_loop_step``).
        On CUDA they run four Triton launches for the whole list (``deep_kernels``, ``_triton_applies``).
        """
        hidden = group["hidden"]
        if (any(isinstance(group[k], Tensor) for k in ("momentum", "eta", "beta", "weight_decay", "lr_decay",
                                                        "lr_power", "lr_warmup", "beta2", "eps", "relative_eps", "eta2",
                                                        "timescales"))
                or (hidden and group["activation"] not in _FOREACH_ACTIVATIONS)
                or len({(p.dtype, p.device) for p in params}) > 1):
            return False
        states = [self.state[p] for p in params]
        bufs = [st["momentum_buffer"] for st in states]
        lr = self._step_lr(group, states, params[0])
        kernel = _momenta_kernel(group, params, states)
        if kernel is not None:  # one C call (CPU) or two Triton launches (CUDA) for the whole list
            self._momenta_kernel_step(kernel, group, params, grads, states, lr)
            return True
        if group["lr_adapt"] != "none":  # DoG's step sizes: the momenta kernels, else the rule, tensor by tensor
            return False
        grads = _foreach_weight_decay(group, params, grads, lr)
        if lr is not group["lr"] or group["keys"] == "momenta":
            pass  # the blocks layout's kernels take no schedule
        elif _triton_applies(group, params):  # four launches for the whole list
            torch._foreach_add_([st["step"] for st in states], 1)
            mem = self._memory(params, states)
            deep_kernels.deep_momentum_step_(params, grads, bufs, mem.w1, mem.w2, group["lr"], group["momentum"],
                                             group["eta"], group["activation"])
            return True
        elif _cpu_loop_applies(group, params):
            torch._foreach_add_([st["step"] for st in states], 1)
            self._cpu_loop_step(group, states, params, grads)
            return True
        values = foreach_precondition(group, states, grads)
        if group["preconditioner"] != "adam":
            torch._foreach_add_([st["step"] for st in states], 1)
        if group["keys"] == "momenta":
            direction = self._momenta_direction(group, params, states, values)
        else:
            keys = values if group["key_source"] == "preconditioned" else grads
            if group["objective"] == "l2":  # −β⟨m, k⟩/‖k‖² per tensor, read before the α scaling
                coef = _inner_products(bufs, keys) / _squared_norms(keys) * -group["beta"]
            torch._foreach_mul_(bufs, group["momentum"])
            if group["objective"] == "l2":
                torch._foreach_addcmul_(bufs, keys, list(coef.unbind()))
            torch._foreach_add_(bufs, values)
            direction = self._deep_read(group, params, states, keys, values) if hidden else bufs
        direction = foreach_output_nonlinearity(group, direction)
        if isinstance(lr, Tensor) and lr.dim():  # one scheduled lr per tensor
            torch._foreach_sub_(params, torch._foreach_mul(direction, list(lr.unbind())))
        else:
            self._foreach_descend(params, direction, lr)
        return True

    @staticmethod
    def _step_lr(group: dict[str, Any], states: list[dict[str, Tensor]], like: Tensor) -> float | Tensor:
        """The group's lr, or with a schedule ``lr·s_t`` per tensor (``deep.lr_factor`` at the step about to be
        taken) as a ``(T,)`` tensor, fp32 for low-precision parameters."""
        if not has_schedule(group):
            return group["lr"]
        factor = lr_factor(torch.stack([st["step"] for st in states]) + 1, group, like)
        return (group["lr"] * factor).to(like.dtype)

    def _momenta_kernel_step(self, kernel: Any, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                             states: list[dict[str, Tensor]], lr: float | Tensor) -> None:
        """The momenta layout's whole step (``_momenta_options``; equations: ``deep_cpu.momenta_step_``) by
        ``kernel``, in place on the parameters and their state, which keeps the rule path's layout: ``lr_t``
        (``_step_lr``) and Adam's ``1 − β₂ᵗ`` per tensor as ``(T,)`` device tensors from the step counters, which
        are then advanced as ``foreach_precondition`` advances them (nothing is read on the host).  W₁ and W₂ are
        handed to the kernel in fp32 (copies for low-precision parameters, W₁'s written back)."""
        count, device = len(params), params[0].device
        steps = [st["step"] for st in states]
        floors = foreach_relative_eps(group, states, grads)  # ε + κρ_t per tensor, before the steps move
        eps = group["eps"] if floors is None else floors
        bias_correction2 = 1 - group["beta2"] ** step_float(torch.stack(steps) + 1, params[0])
        torch._foreach_add_(steps, 1)
        if isinstance(lr, Tensor):
            lr = lr.to(device, torch.float32).expand(count) if lr.dim() == 0 else lr.to(device, torch.float32)
        else:
            lr = torch.full((count,), lr, dtype=torch.float32, device=device)
        dog = group["lr_adapt"] == "dog"
        if dog:  # lr_t·r̄/√G per tensor, read from the state before the pass (deep.dog_step_size)
            carried = {k: torch.stack([st[k] for st in states]) for k in _DOG_STATE}
            lr = lr * dog_step_size(carried).to(device, torch.float32)
        w1s, w2s = ([st[k] for st in states] for k in ("W1", "W2"))
        w1_run, w2_run = w1s, w2s
        if w1s[0].dtype != torch.float32:
            w1_run, w2_run = (list(torch.stack(ws).to(torch.float32).unbind()) for ws in (w1s, w2s))
        sums = kernel(params, [g.contiguous() for g in grads], [st["momentum_buffer"] for st in states],
                      [st["exp_avg_sq"] for st in states], [st["timescale_buffers"] for st in states], w1_run, w2_run,
                      self._anchor(group, params[0])[0], lr, bias_correction2, self._timescales(group, device),
                      group["momentum"], group["beta2"], eps, group["eta"], decoupled_rate(group),
                      activation=group["activation"], origins=[st["dog_origin"] for st in states] if dog else None)
        if w1_run is not w1s:
            torch._foreach_copy_(w1s, w1_run)
        if dog:  # r̄ ← max(r̄, ‖W − W₀‖), G ← G + ‖u‖², from the pass's per-tensor sums
            sums = sums.to(carried["dog_sum_sq"].device)
            for k, new in zip(_DOG_STATE, dog_carry(carried["dog_distance"], carried["dog_sum_sq"], sums[:, 0],
                                                     sums[:, 1])):
                torch._foreach_copy_([st[k] for st in states], list(new.unbind()))

    def _timescales(self, group: dict[str, Any], device: torch.device) -> Tensor:
        """γ = ``timescales`` as an fp32 ``(J,)`` tensor on ``device`` (cached: no copy per step)."""
        key = ("timescales", tuple(group["timescales"]), device)
        if key not in self._blocks:
            self._blocks[key] = torch.tensor(group["timescales"], dtype=torch.float32, device=device)
        return self._blocks[key]

    def _momenta_direction(self, group: dict[str, Any], params: list[Tensor], states: list[dict[str, Tensor]],
                           values: list[Tensor]) -> list[Tensor]:
        """The momenta layout (``deep`` module docstring) over all tensors: the momenta with ``_foreach`` ops, the
        per-coordinate MLP on ``_CHUNK``-coordinate chunks of zero-padded work buffers, batched over chunks with
        each chunk's tensor's W₁, W₂ (``bmm``), and the per-tensor sums of the writes by ``index_add_`` (kernel
        counts grow with the total size, in slices of ``_MAX_CHUNKS`` chunks, not with the number of tensors)::

            K = (v, (1 − α)m, e_1…e_J) per coordinate,  Φ = σ(K W₂ᵀ),  u = m + Φ W₁ᵀ
            C = Σ vΦ/n,  W₁ ← αW₁ + (1 − α)W₁⁰ + ηC  [W₂ ← αW₂ + (1 − α)W₂⁰ + η₂ G/(1 + ‖W₁‖²)]

        Returns ``u`` as views (shaped like the parameters) of a work buffer."""
        alpha, hidden = group["momentum"], group["hidden"]
        bufs = [st["momentum_buffer"] for st in states]
        torch._foreach_mul_(bufs, alpha)
        torch._foreach_add_(bufs, values)
        emas = [st["timescale_buffers"] for st in states]
        for j, gamma in enumerate(group["timescales"]):
            ej = [e[j] for e in emas]
            torch._foreach_mul_(ej, gamma)
            torch._foreach_add_(ej, values, alpha=1 - gamma)
        if hidden == 0:
            return bufs
        n_keys = n_features(group)
        work = [self._work(params, _CHUNK, f"key{f}") for f in range(n_keys)]
        torch._foreach_copy_(work[0].as_param, values)
        torch._foreach_copy_(work[1].as_param, bufs)
        torch._foreach_mul_(work[1].as_param, 1 - alpha)
        for j in range(n_keys - 2):
            torch._foreach_copy_(work[2 + j].as_param, [e[j] for e in emas])
        out = self._work(params, _CHUNK, "direction")
        owner = self._chunk_owner(params)
        mem = self._memory(params, states)
        w1_0, w2_0 = self._anchor(group, params[0])
        counts = torch.tensor([max(p.numel(), 1) for p in params], dtype=mem.w1.dtype,
                              device=mem.w1.device).view(-1, 1, 1)
        corr = torch.zeros_like(mem.w1)  # Σ vΦ per tensor, (T, 1, H)
        grad_w2 = torch.zeros_like(mem.w2) if group["eta2"] != 0 else None
        act, act_grad = ACTIVATIONS[group["activation"]]
        keys_all = [w.buffer.view(-1, _CHUNK) for w in work]
        out_rows = out.buffer.view(-1, _CHUNK)
        for a in range(0, owner.numel(), _MAX_CHUNKS):
            b = min(a + _MAX_CHUNKS, owner.numel())
            tid = owner[a:b]
            keys = torch.stack([k[a:b] for k in keys_all], dim=-1)  # (c, CH, F)
            w1c = mem.w1[tid]  # (c, 1, H)
            pre = torch.bmm(keys, mem.w2[tid].mT)  # (c, CH, H)
            phi = act(pre)
            torch.bmm(phi, w1c.mT, out=out_rows[a:b].unsqueeze(-1))  # D = Φ W₁ᵀ
            value = keys[..., :1].mT  # (c, 1, CH)
            corr.index_add_(0, tid, torch.bmm(value, phi))
            if grad_w2 is not None:
                g2 = act_grad(pre, phi) * w1c * value.mT  # (c, CH, H)
                grad_w2.index_add_(0, tid, torch.bmm(g2.mT, keys))
        if grad_w2 is not None:
            scale = group["eta2"] / (counts * (1 + (mem.w1 * mem.w1).sum((1, 2), keepdim=True)))
            mem.w2.mul_(alpha).add_(w2_0, alpha=1 - alpha).addcmul_(grad_w2, scale)
        mem.w1.mul_(alpha).add_(w1_0, alpha=1 - alpha).addcmul_(corr, group["eta"] / counts)
        torch._foreach_add_(out.as_param, bufs)
        return out.as_param

    def _chunk_owner(self, params: list[Tensor]) -> Tensor:
        """For each ``_CHUNK``-coordinate chunk of the padded work buffers, the index of its tensor."""
        key = ("owner", *map(id, params))
        if key not in self._blocks:
            chunks = [math.ceil(p.numel() / _CHUNK) for p in params]
            self._blocks[key] = torch.repeat_interleave(torch.arange(len(params), device=params[0].device),
                                                        torch.tensor(chunks, device=params[0].device))
        return self._blocks[key]

    def _anchor(self, group: dict[str, Any], like: Tensor) -> tuple[Tensor, Tensor]:
        """θ₀ = (W₁⁰, W₂⁰) that the momenta layout retains towards, in ``like``'s dtype and device (cached)."""
        init = group["memory_init"]
        key = ("anchor", like.dtype, like.device, group["seed"], group["init_scale"], group["hidden"],
               n_features(group), *(() if init is None else map(id, init)))
        if key not in self._blocks:
            self._blocks[key] = initial_memory(group, like.dtype, like.device)
        return self._blocks[key]

    def _deep_read(self, group: dict[str, Any], params: list[Tensor], states: list[dict[str, Tensor]],
                   keys: list[Tensor], values: list[Tensor]) -> list[Tensor]:
        """Updates every W₁ and returns ``u = m + s_v·Φ̂W₁ᵀ`` as views (shaped like the parameters) of a
        work buffer.  With ``N_x = ‖x‖`` per tensor, ``s = N/√n`` and ``r = N_Φ/√n``, so the scale factors
        are ``√n/N_k`` (keys), ``1/(N_v N_Φ)`` (C) and ``N_v/N_Φ`` (read); a zero norm's reciprocal is taken
        as 0, which is exact: the keys, values or features it scales are then zero.  W₁ and W₂ are updated and
        read as ``(T, ·, ·)`` stacks that the states hold views of (``_Memory``)."""
        kd, alpha, eta = group["key_dim"], group["momentum"], group["eta"]
        key_blocks = self._work(params, kd, "keys")
        torch._foreach_copy_(key_blocks.as_param, keys)
        value_blocks = key_blocks
        if values is not keys:
            value_blocks = self._work(params, kd, "values")
            torch._foreach_copy_(value_blocks.as_param, values)
        mem = self._memory(params, states)

        def inverse_norms(tensors: list[Tensor], role: str) -> Tensor:  # 1/‖t‖ per tensor, 0 for a zero tensor
            torch.stack(torch._foreach_norm(tensors), out=mem.norm_outs[role])
            return torch.reciprocal(mem.norms[role]).nan_to_num_(posinf=0.0)

        inv_k = inverse_norms(key_blocks.rows, "keys")
        values_role = "keys" if value_blocks is key_blocks else "values"
        inv_v = inv_k if value_blocks is key_blocks else inverse_norms(value_blocks.rows, "values")
        w2 = mem.w2 * (inv_k * key_blocks.sqrt_counts)
        phi_t = _foreach_mm(list(w2.unbind()), key_blocks.cols)  # Φᵀ = σ(W₂Kᵀ/s_k), (h, n) each
        _FOREACH_ACTIVATIONS[group["activation"]](phi_t)
        inv_phi = inverse_norms(phi_t, "features")
        corr_t = torch.stack(_foreach_mm(phi_t, value_blocks.rows))  # (VᵀΦ)ᵀ, (T, h, kd)
        if group["objective"] == "l2":  # Φᵀ(ΦW₁ᵀ), via ΦW₁ᵀ in a work buffer, read before W₁ moves
            read_t = _foreach_mm(list(mem.w1.unbind()), phi_t)  # (kd, n) each
            read = self._work(params, kd, "read")
            torch._foreach_copy_(read.cols, read_t)
            gram_t = torch.stack(_foreach_mm(phi_t, read.rows))  # (T, h, kd)
        # W₁ᵀ ← α W₁ᵀ + η (V̂ᵀΦ̂/n)ᵀ  [− η (Φ̂ᵀΦ̂ W₁ᵀ/n)ᵀ for l2]
        mem.w1_t.mul_(alpha).addcmul_(corr_t, inv_v * inv_phi, value=eta)
        if group["objective"] == "l2":
            mem.w1_t.addcmul_(gram_t, inv_phi * inv_phi, value=-eta)
        w1 = mem.w1 * (mem.norms[values_role] * inv_phi)  # W₁ N_v/N_Φ
        out_t = _foreach_mm(list(w1.unbind()), phi_t)  # (kd, n) each
        out = self._work(params, kd, "direction")
        torch._foreach_copy_(out.cols, out_t)
        torch._foreach_add_(out.as_param, [st["momentum_buffer"] for st in states])
        return out.as_param

    def _memory(self, params: list[Tensor], states: list[dict[str, Tensor]]) -> _Memory:
        """The stacked W₁, W₂ of ``params``, whose states hold views of them; built again (from the states)
        whenever a state holds another tensor (after a load, the rule path, or a new parameter list)."""
        key = ("memory", *map(id, params))
        mem = self._blocks.get(key)
        if mem is None or any(st["W1"] is not w1 or st["W2"] is not w2
                              for st, w1, w2 in zip(states, mem.w1_views, mem.w2_views)):
            mem = _Memory.stack(states)
            self._blocks[key] = mem
        return mem

    def _cpu_loop_step(self, group: dict[str, Any], states: list[dict[str, Tensor]], params: list[Tensor],
                       grads: list[Tensor]) -> None:
        """The rule (dot objective, identity preconditioner) tensor by tensor, in place, in chunks of
        ``_CPU_CHUNK`` coordinates whose blocks stay in cache, in three passes over each tensor::

            1. m ← α m + g,  N_k² = Σ‖g_c‖²                     (per chunk c)
            2. Φ_c = σ(G_c W₂ᵀ/s_k),  N_Φ² = Σ‖Φ_c‖²,  C = Σ G_cᵀΦ_c    (Φ kept in a work buffer)
               W₁ ← α W₁ + η C/(s_k r n)
            3. W ← W − lr·(m + Φ_c (W₁ s_k/r)ᵀ)

        with ``s_k = N_k/√n``, ``r = N_Φ/√n`` (``deep.safe_rms``) and the last block zero-padded
        (``deep.to_blocks``).  Scalars stay 0-dim tensors: nothing is read on the host.  fp32 lists whose block
        shape the compiled kernel takes run it instead (``deep_cpu``: the same three passes, each block in
        registers, all tensors in one call), when a C compiler built it."""
        kd, hidden, alpha, eta, lr = (group[k] for k in ("key_dim", "hidden", "momentum", "eta", "lr"))
        rows = [math.ceil(p.numel() / kd) for p in params]
        bufs, w1s, w2s = ([st[k] for st in states] for k in ("momentum_buffer", "W1", "W2"))
        grads = [g.contiguous() for g in grads]
        if (params[0].dtype == torch.float32 and deep_cpu.available(kd, hidden, group["activation"])
                and all(t.dtype == torch.float32 and t.is_contiguous() for t in (*bufs, *w1s, *w2s))):
            phi = self._cpu_work(params[0], max(rows) * hidden, 0)[0]
            deep_cpu.deep_momentum_step_(params, grads, bufs, w1s, w2s, lr, alpha, eta, group["activation"], phi)
            return
        pre, activation = _CPU_ACTIVATIONS[group["activation"]]
        span = max(1, _CPU_CHUNK // kd)  # rows per chunk
        phi_all, out_all = self._cpu_work(params[0], max(rows) * hidden, span * kd)
        out_all = out_all.view(span, kd)
        for st, p, g, nb in zip(states, params, grads, rows):
            n = p.numel()
            m, pf, gf = st["momentum_buffer"].view(-1), p.view(-1), g.reshape(-1)
            full = n // kd  # rows without padding
            mb, pb, gb = (x[: full * kd].view(full, kd) for x in (m, pf, gf))
            cuts = [(a, min(a + span, nb)) for a in range(0, nb, span)]
            sq = []
            for a, b in cuts:
                gc, mc = gf[a * kd: b * kd], m[a * kd: b * kd]
                torch.add(gc, mc, alpha=alpha, out=mc)
                sq.append(torch.dot(gc, gc))
            s_k = safe_rms(torch.stack(sq).sum(), nb)
            w2t = (st["W2"] * (pre / s_k)).mT  # (kd, h)
            phi = phi_all[: nb * hidden].view(nb, hidden)
            corr = torch.zeros_like(st["W1"])  # GᵀΦ, (kd, h)
            sq = []
            for a, b in cuts:
                keys, block = _block_rows(gf, gb, a, b), phi[a:b]
                torch.mm(keys, w2t, out=block)
                activation(block)
                flat = block.view(-1)
                sq.append(torch.dot(flat, flat))
                corr.addmm_(keys.mT, block)
            r = safe_rms(torch.stack(sq).sum(), nb)
            st["W1"] = w1 = torch.add(corr * (eta / (s_k * r * nb)), st["W1"], alpha=alpha)
            w1t = (w1 * (s_k / r)).mT  # (h, kd)
            for a, b in cuts:
                u = torch.addmm(_block_rows(m, mb, a, b), phi[a:b], w1t, out=out_all[: b - a])
                pc = pb[a:b] if b <= full else pf[a * kd:]
                u = u if b <= full else u.view(-1)[: n - a * kd]
                if isinstance(lr, Tensor):
                    pc.addcmul_(u, lr, value=-1)
                else:
                    pc.add_(u, alpha=-lr)

    def _cpu_work(self, like: Tensor, phi_numel: int, chunk_numel: int) -> tuple[Tensor, Tensor]:
        """The CPU loop's work buffers, grown on demand: the features Φ of one tensor and one chunk's ``u``."""
        key = ("cpu", like.dtype)
        work = self._blocks.get(key)
        if work is None or work[0].numel() < phi_numel or work[1].numel() < chunk_numel:
            old = work or (like.new_empty(0),) * 2
            work = tuple(like.new_empty(max(need, t.numel())) for need, t in zip((phi_numel, chunk_numel), old))
            self._blocks[key] = work
        return work

    @classmethod
    def pretrained(cls, params: Any, total_steps: int | None = None, **overrides: Any) -> DeepMomentum:
        """The package's default learned optimizer (``deepopt.pretrained.DEFAULT``); see ``from_pretrained``."""
        from deepopt.pretrained import DEFAULT

        return cls.from_pretrained(DEFAULT, params, total_steps=total_steps, **overrides)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, params: Any, total_steps: int | None = None,
                        **overrides: Any) -> DeepMomentum:
        """A ``DeepMomentum`` from a shipped learned optimizer's name (``deepopt.pretrained.names()``) or a folder
        written by ``deepopt.checkpoint.save_pretrained`` (``deepopt meta-train``'s ``optimizer/``).

        The saved hyperparameters and memory state θ₀ (``W1``, ``W2``) are used; ``overrides`` replace any
        hyperparameter (e.g. ``lr``, ``weight_decay``).  ``total_steps``: the run's length, over which the learned
        schedule anneals (its ``lr_horizon``).  Without it (and without an ``lr_horizon`` override) the schedule's
        horizon part is off (h_t = w_t = 1): the optimizer trains for any number of steps at its learned lr (with its
        1/t decay, if it learned one) — pass ``total_steps`` for the schedule it was meta-trained with.
        """
        from deepopt.pretrained import resolve

        path = resolve(name_or_path)
        name, hparams, tensors = load_pretrained(path)
        if name != cls.__name__:
            raise ValueError(f"{path} holds a {name}, not a {cls.__name__}")
        if set(tensors) != {"W1", "W2"}:
            raise ValueError(f"{path}: memory tensors must be W1 and W2, found {sorted(tensors)}")
        hparams.pop("memory_init", None)
        hparams.pop("lr_horizon", None)  # the meta-training run's horizon, not this run's
        if total_steps is None and "lr_horizon" not in overrides:
            hparams["lr_horizon"] = 0
        kwargs = {**hparams, "memory_init": (tensors["W1"], tensors["W2"]), **overrides}
        return cls(params, total_steps=total_steps, **kwargs)
