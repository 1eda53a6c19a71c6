"""DeepMomentum: momentum with a per-coordinate memory and a deep read-out (see ``deepopt.rules.deep``)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from deepopt.checkpoint import load_pretrained
from deepopt.rules import deep_momentum
from deepopt.rules import transforms as T
from deepopt.rules.deep import decayed_lr, horizon_factor, safe_rms, to_blocks

from . import deep_cpu, deep_kernels
from .base import MemoryOptimizer, is_dtensor
from .delta_momentum import _inner_products, _squared_norms
from .momentum import foreach_output_nonlinearity, foreach_precondition

# activations with an in-place multi-tensor op (the others take the rule path)
_FOREACH_ACTIVATIONS = {
    "tanh": torch._foreach_tanh_,
    "relu": lambda ts: torch._foreach_clamp_min_(ts, 0.0),
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
    return (group["hidden"] > 0 and group["objective"] == "dot" and group["preconditioner"] == "identity"
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


def _block_rows(flat: Tensor, whole: Tensor, a: int, b: int) -> Tensor:
    """Rows ``a:b`` of ``to_blocks(flat, key_dim)``: a view of ``whole`` (the whole blocks, ``(rows, key_dim)``)
    where they are whole, else a zero-padded copy of the tail."""
    return whole[a:b] if b <= whole.shape[0] else to_blocks(flat[a * whole.shape[1]:], whole.shape[1])


class DeepMomentum(MemoryOptimizer):
    """Deep Momentum Gradient Descent (Nested Learning Eq. 23 / 50)::

        m ← α·m + P g                          (objective="dot";  "l2": m ← α·m − β⟨m, k̂⟩k̂ + P g)
        W₁ ← α·W₁ − η·∇_{W₁} ℓ(W₁; Φ̂(K), V),   Φ̂(K) = σ(K W₂ᵀ)/r      (K, V: normalised key/value blocks)
        W ← W − lr_t·σ_out(m + s_v·Φ̂(K) W₁ᵀ),   lr_t = lr/(1 + lr_decay·(t − 1))·h_t
        h_t = 1, or with lr_horizon = N > 0: h_t = (1 − (t − 1)/N)₊^lr_power    (0 after step N)

    ``momentum`` is α; ``eta`` the read-out's inner learning rate; ``hidden`` its width (0: no deep
    branch, then this is ``Momentum``, or ``DeltaMomentum`` with ``objective="l2"``); ``key_dim`` the
    coordinates per key block; ``key_source`` keys on the raw ("gradient") or preconditioned gradient.
    ``memory_init=(W1, W2)`` sets θ₀ (what meta-training learns; see ``from_pretrained``), else W₁ = 0 and
    W₂ ~ init_scale·N(0, 1) drawn from ``seed``.  ``lr_decay``, ``lr_horizon`` (N, the run's length; 0: no
    h_t) and ``lr_power`` set the lr schedule.  Further options: ``weight_decay``,
    ``decoupled_weight_decay``, ``preconditioner`` ("identity" | "adam"), ``nonlinearity``, ``foreach``,
    ``nonfinite``.  The full equations are in ``deepopt.rules.deep``.
    """

    rule = deep_momentum

    def __init__(self, params: Any, lr: float = 1e-3, momentum: float = 0.9, eta: float = 0.1,
                 hidden: int = 16, key_dim: int = 16, objective: str = "dot", **options: Any) -> None:
        super().__init__(params, lr=lr, momentum=momentum, eta=eta, hidden=hidden, key_dim=key_dim,
                         objective=objective, **options)
        self._blocks: dict[tuple, Any] = {}  # work buffers (not state: rebuilt on demand)

    def __getstate__(self) -> dict[str, Any]:  # copies and pickles leave the work buffers behind
        return {**super().__getstate__(), "_blocks": {}}

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
        scheduled = group["lr_decay"] != 0 or group["lr_horizon"] != 0
        if (group["keys"] == "momenta" or any(isinstance(group[k], Tensor) for k in ("momentum", "eta", "beta", "weight_decay", "lr_decay",
                                                          "lr_power", "beta2", "eps"))
                or (hidden and group["activation"] not in _FOREACH_ACTIVATIONS)
                or (scheduled and group["decoupled_weight_decay"] and group["weight_decay"] != 0)
                or len({(p.dtype, p.device) for p in params}) > 1):
            return False
        states = [self.state[p] for p in params]
        bufs = [st["momentum_buffer"] for st in states]
        grads = self._foreach_weight_decay(group, params, grads)
        if _triton_applies(group, params):  # four launches for the whole list
            torch._foreach_add_([st["step"] for st in states], 1)
            mem = self._memory(params, states)
            deep_kernels.deep_momentum_step_(params, grads, bufs, mem.w1, mem.w2, group["lr"], group["momentum"],
                                             group["eta"], group["activation"])
            return True
        if _cpu_loop_applies(group, params):
            torch._foreach_add_([st["step"] for st in states], 1)
            self._cpu_loop_step(group, states, params, grads)
            return True
        values = foreach_precondition(group, states, grads)
        if group["preconditioner"] != "adam":
            torch._foreach_add_([st["step"] for st in states], 1)
        keys = values if group["key_source"] == "preconditioned" else grads
        if group["objective"] == "l2":  # −β⟨m, k⟩/‖k‖² per tensor, read before the α scaling
            coef = _inner_products(bufs, keys) / _squared_norms(keys) * -group["beta"]
        torch._foreach_mul_(bufs, group["momentum"])
        if group["objective"] == "l2":
            torch._foreach_addcmul_(bufs, keys, list(coef.unbind()))
        torch._foreach_add_(bufs, values)
        direction = bufs
        if hidden:
            direction = self._deep_read(group, params, states, keys, values)
        lr = group["lr"]
        if scheduled:
            steps = T.step_float(torch.stack([st["step"] for st in states]), params[0])  # fp32 for bf16 params
            lr = decayed_lr(lr, group["lr_decay"], steps) if group["lr_decay"] != 0 else lr * torch.ones_like(steps)
            if group["lr_horizon"] != 0:
                lr = lr * horizon_factor(steps, group["lr_horizon"], group["lr_power"])
            direction = torch._foreach_mul(direction, list(lr.unbind()))
            lr = 1.0
        self._foreach_descend(params, foreach_output_nonlinearity(group, direction), lr)
        return True

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
        phi_t = torch._foreach_mm(list(w2.unbind()), key_blocks.cols)  # Φᵀ = σ(W₂Kᵀ/s_k), (h, n) each
        _FOREACH_ACTIVATIONS[group["activation"]](phi_t)
        inv_phi = inverse_norms(phi_t, "features")
        corr_t = torch.stack(torch._foreach_mm(phi_t, value_blocks.rows))  # (VᵀΦ)ᵀ, (T, h, kd)
        if group["objective"] == "l2":  # Φᵀ(ΦW₁ᵀ), via ΦW₁ᵀ in a work buffer, read before W₁ moves
            read_t = torch._foreach_mm(list(mem.w1.unbind()), phi_t)  # (kd, n) each
            read = self._work(params, kd, "read")
            torch._foreach_copy_(read.cols, read_t)
            gram_t = torch.stack(torch._foreach_mm(phi_t, read.rows))  # (T, h, kd)
        # W₁ᵀ ← α W₁ᵀ + η (V̂ᵀΦ̂/n)ᵀ  [− η (Φ̂ᵀΦ̂ W₁ᵀ/n)ᵀ for l2]
        mem.w1_t.mul_(alpha).addcmul_(corr_t, inv_v * inv_phi, value=eta)
        if group["objective"] == "l2":
            mem.w1_t.addcmul_(gram_t, inv_phi * inv_phi, value=-eta)
        w1 = mem.w1 * (mem.norms[values_role] * inv_phi)  # W₁ N_v/N_Φ
        out_t = torch._foreach_mm(list(w1.unbind()), phi_t)  # (kd, n) each
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

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        if any(is_dtensor(p) for p in group.get("params", ()) if isinstance(p, Tensor)):
            raise TypeError("DeepMomentum does not take sharded DTensor parameters (FSDP2) yet: its memory "
                            "reads whole gradient tensors; use DistributedDataParallel, or another deepopt "
                            "optimizer under FSDP2")

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, params: Any, **overrides: Any) -> DeepMomentum:
        """A ``DeepMomentum`` from a folder written by ``deepopt.checkpoint.save_pretrained``.

        The saved hyperparameters and memory state θ₀ (``W1``, ``W2``) are used; ``overrides`` replace
        any hyperparameter (e.g. ``lr``).
        """
        name, hparams, tensors = load_pretrained(path)
        if name != cls.__name__:
            raise ValueError(f"{path} holds a {name}, not a {cls.__name__}")
        if set(tensors) != {"W1", "W2"}:
            raise ValueError(f"{path}: memory tensors must be W1 and W2, found {sorted(tensors)}")
        hparams.pop("memory_init", None)
        kwargs = {**hparams, "memory_init": (tensors["W1"], tensors["W2"]), **overrides}
        return cls(params, **kwargs)
