"""Triton kernels for ``DeepMomentum``'s default step on CUDA: the whole parameter list in four launches.

The reference is the pure rule (``deepopt.rules.deep``) with the dot objective, identity preconditioner, no
output nonlinearity and ``lr_decay = 0``.  Per tensor, with ``G`` the gradient's ``n`` key blocks (the last
zero-padded) and ``N_g``, ``N_Φ`` Frobenius norms::

    N_g² = ‖g‖²                                       s_k = N_g/√n        (launch 1, by atomics)
    Φ = σ(G W₂ᵀ/s_k),  C = GᵀΦ,  N_Φ² = ‖Φ‖²          r = N_Φ/√n          (launch 2, C and N_Φ² by atomics)
    W₁ ← α·W₁ + η·C/(s_k r n)                                             (launch 3, one program per tensor)
    m ← α·m + g;  W ← W − lr·(m + (s_k/r)·Φ W₁ᵀ)      (Φ recomputed from G) (launch 4)

(``s = 1`` / ``r = 1`` for a zero gradient, ``deep.safe_rms``.)  Memory traffic: g is read three times, m and W
read and written once: 7 passes over a tensor's size, a fused AdamW step's 7 (p, g, m, v read; p, m, v written).
Φ is recomputed in launch 4 rather than stored (reading g again costs less than writing and reading ``n·hidden``
features).  As in ``delta_kernels``, a table of device pointers and a table of (tensor, start) work items let
one launch cover every tensor; a work item is ``TILES`` tiles of ``BLOCK`` coordinates (``BLOCK/key_dim`` key
rows each), so C and the norms take one atomic add per work item; the hidden units are taken ``HB`` at a time
(the features of one tile and chunk, ``(BLOCK/key_dim) × HB``, stay in registers whatever ``hidden`` is).
W₁ and W₂ are the ``(T, key_dim, hidden)`` and ``(T, hidden, key_dim)`` stacks that ``DeepMomentum`` keeps
(``_Memory``); arithmetic is fp32, with the ``tl.dot`` products on TF32 tensor cores when torch allows TF32
matmuls (``torch.backends.cuda.matmul.allow_tf32``, as torch's own fp32 matmuls: TF32's 10-bit mantissa puts
relative errors of about 1e-3 on Φ and the read-out) and exact fp32 FMAs otherwise.  ``lr``, ``momentum`` and
``eta`` may be Python floats or 0-dim device tensors, which the kernels load: nothing is read on the host.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import delta_kernels
from .deep_cpu import MOMENTA_ACTIVATIONS  # the features both momenta kernels take, and their ACT / MACT codes
from .delta_kernels import BLOCK, _device_scalar, _pointers, _work

triton = delta_kernels.triton
if triton is not None:
    import triton.language as tl

    from .delta_kernels import _pointer, _scalar

ACTIVATIONS = {"tanh": 0, "relu": 1, "identity": 2}
_DTYPES = (torch.float32, torch.bfloat16)
TILES = 4  # tiles of BLOCK coordinates per work item
HIDDEN_CHUNK = 32  # hidden units per chunk (HB)
MAX_HIDDEN = 256


def available(params: list[Tensor], key_dim: int = 16, hidden: int = 16) -> bool:
    """Whether the kernels can take this list: Triton importable, one fp32/bf16 dtype and device, dense
    non-empty tensors, and ``key_dim``, ``hidden`` powers of two with ``16 ≤ key_dim ≤ BLOCK/16``,
    ``16 ≤ hidden ≤ MAX_HIDDEN`` (the sizes ``tl.dot`` takes)."""
    def fits(k: int, high: int) -> bool:
        return 16 <= k <= high and k & (k - 1) == 0
    return (delta_kernels.available(params) and params[0].dtype in _DTYPES and all(p.numel() > 0 for p in params)
            and fits(key_dim, BLOCK // 16) and fits(hidden, MAX_HIDDEN))


def dot_precision() -> str:
    """``tl.dot``'s input precision: "tf32" where torch allows TF32 matmuls, else exact "ieee" fp32."""
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


if triton is not None:

    @triton.jit
    def _safe_rms(sq, n):
        """``deep.safe_rms``: ``sqrt(sq/n)``, 1 where ``sq = 0``."""
        return tl.sqrt(tl.where(sq > 0, sq, 1.0) / n)

    @triton.jit
    def _item(work, block_tensor, block_start, numels, KD: tl.constexpr, BLOCK: tl.constexpr):
        """(tensor, first coordinate, coordinates, key rows n, tiles of this work item that hold coordinates)."""
        t = tl.load(block_tensor + work)
        numel = tl.load(numels + t)
        start = tl.load(block_start + work)
        return t, start, numel, (numel + KD - 1) // KD, (numel - start + BLOCK - 1) // BLOCK

    @triton.jit
    def _tile(start, i, numel, KD: tl.constexpr, ROWS: tl.constexpr):
        """Element offsets ``(ROWS, KD)`` of tile i of a work item, and their mask."""
        offs = start + i * ROWS * KD + tl.arange(0, ROWS)[:, None] * KD + tl.arange(0, KD)[None, :]
        return offs, offs < numel

    @triton.jit
    def _features(g, w2, t, c, scale, KD: tl.constexpr, H: tl.constexpr, HB: tl.constexpr, ACT: tl.constexpr,
                  PREC: tl.constexpr):
        """Hidden units ``c·HB … (c+1)·HB`` of ``Φ = σ(G W₂ᵀ·scale)`` for a ``(ROWS, KD)`` tile G: ``(ROWS, HB)``;
        tanh as ``2σ(2z) − 1``."""
        w2t = tl.load(w2 + t * H * KD + (c * HB + tl.arange(0, HB))[None, :] * KD + tl.arange(0, KD)[:, None])
        z = tl.dot(g, w2t.to(tl.float32) * scale, input_precision=PREC)
        if ACT == 0:
            z = 2.0 * tl.sigmoid(2.0 * z) - 1.0
        elif ACT == 1:
            z = tl.maximum(z, 0.0)
        return z

    @triton.jit
    def _norm_kernel(g_table, numels, block_tensor, block_start, g_squares, DTYPE: tl.constexpr,
                     SPAN: tl.constexpr):
        t = tl.load(block_tensor + tl.program_id(0))
        offs = tl.load(block_start + tl.program_id(0)) + tl.arange(0, SPAN)
        g = tl.load(_pointer(g_table, t, DTYPE) + offs, mask=offs < tl.load(numels + t), other=0.0).to(tl.float32)
        tl.atomic_add(g_squares + t, tl.sum(g * g))

    @triton.jit
    def _correlation_kernel(g_table, w2, numels, block_tensor, block_start, g_squares, phi_squares, corr,
                            DTYPE: tl.constexpr, KD: tl.constexpr, H: tl.constexpr, HB: tl.constexpr,
                            ROWS: tl.constexpr, TILES: tl.constexpr, ACT: tl.constexpr, PREC: tl.constexpr):
        t, start, numel, n, tiles = _item(tl.program_id(0), block_tensor, block_start, numels, KD, ROWS * KD)
        g_ptr = _pointer(g_table, t, DTYPE)
        inv_s = 1.0 / _safe_rms(tl.load(g_squares + t), n)
        sq = tl.zeros((), tl.float32)
        for c in range(H // HB):  # a loop, not unrolled: registers do not grow with hidden
            acc = tl.zeros((KD, HB), tl.float32)
            for i in range(tl.minimum(tiles, TILES)):
                offs, mask = _tile(start, i, numel, KD, ROWS)
                g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                phi = _features(g, w2, t, c, inv_s, KD, H, HB, ACT, PREC)
                sq += tl.sum(phi * phi)
                acc = tl.dot(tl.trans(g), phi, acc, input_precision=PREC)
            tl.atomic_add(corr + t * KD * H + tl.arange(0, KD)[:, None] * H + c * HB + tl.arange(0, HB)[None, :], acc)
        tl.atomic_add(phi_squares + t, sq)

    @triton.jit
    def _memory_kernel(w1, numels, g_squares, phi_squares, corr, alpha, eta, ALPHA_T: tl.constexpr,
                       ETA_T: tl.constexpr, KD: tl.constexpr, H: tl.constexpr):
        t = tl.program_id(0)
        n = (tl.load(numels + t) + KD - 1) // KD
        scale = _safe_rms(tl.load(g_squares + t), n) * _safe_rms(tl.load(phi_squares + t), n) * n
        offs = t * KD * H + tl.arange(0, KD)[:, None] * H + tl.arange(0, H)[None, :]
        w = _scalar(alpha, ALPHA_T) * tl.load(w1 + offs).to(tl.float32) \
            + _scalar(eta, ETA_T) * tl.load(corr + offs) / scale
        tl.store(w1 + offs, w.to(w1.dtype.element_ty))

    @triton.jit
    def _update_kernel(p_table, m_table, g_table, w1, w2, numels, block_tensor, block_start, g_squares,
                       phi_squares, lr, alpha, LR_T: tl.constexpr, ALPHA_T: tl.constexpr, DTYPE: tl.constexpr,
                       KD: tl.constexpr, H: tl.constexpr, HB: tl.constexpr, ROWS: tl.constexpr, TILES: tl.constexpr,
                       ACT: tl.constexpr, PREC: tl.constexpr):
        t, start, numel, n, tiles = _item(tl.program_id(0), block_tensor, block_start, numels, KD, ROWS * KD)
        g_ptr, m_ptr, p_ptr = _pointer(g_table, t, DTYPE), _pointer(m_table, t, DTYPE), _pointer(p_table, t, DTYPE)
        s_k = _safe_rms(tl.load(g_squares + t), n)
        read_scale = s_k / _safe_rms(tl.load(phi_squares + t), n)
        lr_value, alpha_value = _scalar(lr, LR_T), _scalar(alpha, ALPHA_T)
        for i in range(tl.minimum(tiles, TILES)):
            offs, mask = _tile(start, i, numel, KD, ROWS)
            g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            read = tl.zeros((ROWS, KD), tl.float32)
            for c in range(H // HB):
                phi = _features(g, w2, t, c, 1.0 / s_k, KD, H, HB, ACT, PREC)
                w1t = tl.load(w1 + t * KD * H + tl.arange(0, KD)[None, :] * H + c * HB + tl.arange(0, HB)[:, None])
                read = tl.dot(phi, w1t.to(tl.float32) * read_scale, read, input_precision=PREC)
            m = alpha_value * tl.load(m_ptr + offs, mask=mask).to(tl.float32) + g
            tl.store(m_ptr + offs, m.to(DTYPE), mask=mask)
            p = tl.load(p_ptr + offs, mask=mask).to(tl.float32) - lr_value * (m + read)
            tl.store(p_ptr + offs, p.to(DTYPE), mask=mask)

    @triton.jit
    def _momenta_kernel(p_table, g_table, m_table, v_table, e_table, w1_table, w2_table, o_table, numels,
                        block_tensor, block_start, lr, bias_correction2, gammas, corr, dog_sums, alpha, beta2, eps,
                        weight_decay, DTYPE: tl.constexpr, H: tl.constexpr, J: tl.constexpr, BLOCK: tl.constexpr,
                        TILES: tl.constexpr, ACT: tl.constexpr, DOG: tl.constexpr):
        """The momenta layout's per-coordinate step over ``TILES`` tiles of ``BLOCK`` coordinates (equations:
        ``momenta_step_``; ``ACT``: ``MOMENTA_ACTIVATIONS``); ``C[t, h] += Σ_i p_i Φ_ih`` by one atomic add per
        hidden unit and work item, and with ``DOG`` ``(‖u‖², ‖W_new − W₀‖²)[t]`` (W₀ from ``o_table``) by two."""
        work = tl.program_id(0)
        t = tl.load(block_tensor + work)
        numel = tl.load(numels + t)
        start = tl.load(block_start + work)
        p_ptr, g_ptr, m_ptr = _pointer(p_table, t, DTYPE), _pointer(g_table, t, DTYPE), _pointer(m_table, t, DTYPE)
        v_ptr, e_ptr = _pointer(v_table, t, DTYPE), _pointer(e_table, t, DTYPE)
        o_ptr = _pointer(o_table, t, DTYPE)  # W₀ (DOG; else o_table is p_table, and the pointer goes unused)
        w1, w2 = _pointer(w1_table, t, tl.float32), _pointer(w2_table, t, tl.float32)
        lr_t, inv_bc2 = tl.load(lr + t).to(tl.float32), 1.0 / tl.load(bias_correction2 + t).to(tl.float32)
        eps_t = tl.load(eps + t).to(tl.float32)
        acc = tl.zeros((H,), tl.float32)
        update_sq, moved_sq = 0.0, 0.0  # scalars, reduced per tile: (BLOCK,) accumulators spill on sm_80
        hs = tl.arange(0, H)
        for i in range(tl.minimum((numel - start + BLOCK - 1) // BLOCK, TILES)):
            offs = start + i * BLOCK + tl.arange(0, BLOCK)
            mask = offs < numel
            g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            v = beta2 * tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32) + (1 - beta2) * g * g
            tl.store(v_ptr + offs, v.to(DTYPE), mask=mask)
            pv = g / (tl.sqrt(v * inv_bc2) + eps_t)
            m = alpha * tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32) + pv
            tl.store(m_ptr + offs, m.to(DTYPE), mask=mask)
            # z[i, h] = W₂[h, 0]·p + W₂[h, 1]·(1 − α)m + Σ_j W₂[h, 2 + j]·e_j
            z = pv[:, None] * tl.load(w2 + hs * (2 + J))[None, :] \
                + ((1 - alpha) * m)[:, None] * tl.load(w2 + hs * (2 + J) + 1)[None, :]
            for j in tl.static_range(J):
                gamma = tl.load(gammas + j)
                e = gamma * tl.load(e_ptr + j * numel + offs, mask=mask, other=0.0).to(tl.float32) + (1 - gamma) * pv
                tl.store(e_ptr + j * numel + offs, e.to(DTYPE), mask=mask)
                z += e[:, None] * tl.load(w2 + hs * (2 + J) + 2 + j)[None, :]
            if ACT == 1:
                phi = z / (1.0 + tl.abs(z))  # softsign, (BLOCK, H)
            else:
                phi = 2.0 * tl.sigmoid(2.0 * z) - 1.0  # tanh
            read = tl.sum(phi * tl.load(w1 + hs)[None, :], axis=1)
            acc += tl.sum(pv[:, None] * phi, axis=0)
            w = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            u = m + read
            new = (w - lr_t * (u + weight_decay * w)).to(DTYPE)
            tl.store(p_ptr + offs, new, mask=mask)
            if DOG:  # masked lanes: u = 0 (g = 0 there) and W_new = W₀ = 0
                moved = new.to(tl.float32) - tl.load(o_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                update_sq += tl.sum(u * u, axis=0)
                moved_sq += tl.sum(moved * moved, axis=0)
        tl.atomic_add(corr + t * H + hs, acc)
        if DOG:
            tl.atomic_add(dog_sums + 2 * t, update_sq)
            tl.atomic_add(dog_sums + 2 * t + 1, moved_sq)

    @triton.jit
    def _momenta_memory_kernel(w1_table, w1_0, numels, corr, alpha, eta, H: tl.constexpr):
        """``W₁ ← αW₁ + (1 − α)W₁⁰ + η·C/n``, one program per tensor."""
        t = tl.program_id(0)
        hs = tl.arange(0, H)
        w1 = _pointer(w1_table, t, tl.float32) + hs
        c = tl.load(corr + t * H + hs) / tl.maximum(tl.load(numels + t), 1).to(tl.float32)
        tl.store(w1, alpha * tl.load(w1) + (1 - alpha) * tl.load(w1_0 + hs).to(tl.float32) + eta * c)

    _TRITON_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16}


def deep_momentum_step_(params: list[Tensor], grads: list[Tensor], bufs: list[Tensor], w1: Tensor, w2: Tensor,
                        lr: float | Tensor, momentum: float | Tensor, eta: float | Tensor,
                        activation: str = "tanh") -> None:
    """The deep rule's default step over the lists, in place on ``params``, ``bufs`` (m) and ``w1``
    (``(T, key_dim, hidden)``; ``w2`` is ``(T, hidden, key_dim)``): see the module docstring."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
    count, kd, hidden = len(params), w1.shape[1], w1.shape[2]
    if w1.shape != (count, kd, hidden) or w2.shape != (count, hidden, kd):
        raise ValueError(f"w1, w2 must be ({count}, key_dim, hidden) and ({count}, hidden, key_dim), "
                         f"got {tuple(w1.shape)} and {tuple(w2.shape)}")
    if not (available(params, kd, hidden) and w1.is_contiguous() and w2.is_contiguous()):
        raise ValueError("deep_momentum_step_ takes dense fp32/bf16 tensors on one device, key_dim and hidden "
                         "powers of two ≥ 16 (see deep_kernels.available)")
    device = params[0].device
    grads = [g.contiguous() for g in grads]
    numels, block_tensor, block_start = _work(tuple(p.numel() for p in params), device, BLOCK * TILES)
    g_squares = torch.zeros(count, dtype=torch.float32, device=device)
    phi_squares = torch.zeros_like(g_squares)
    corr = torch.zeros(count, kd, hidden, dtype=torch.float32, device=device)
    p_table, m_table, g_table = _pointers(params), _pointers(bufs), _pointers(grads)
    (lr, lr_t), (alpha, alpha_t), (eta, eta_t) = (_device_scalar(x, k, device) for k, x in
                                                   (("lr", lr), ("momentum", momentum), ("eta", eta)))
    dtype, act, rows, hb = _TRITON_DTYPES[params[0].dtype], ACTIVATIONS[activation], BLOCK // kd, \
        min(hidden, HIDDEN_CHUNK)
    prec = dot_precision()
    grid = (block_tensor.numel(),)
    _norm_kernel[grid](g_table, numels, block_tensor, block_start, g_squares, DTYPE=dtype, SPAN=BLOCK * TILES)
    _correlation_kernel[grid](g_table, w2, numels, block_tensor, block_start, g_squares, phi_squares, corr,
                              DTYPE=dtype, KD=kd, H=hidden, HB=hb, ROWS=rows, TILES=TILES, ACT=act, PREC=prec)
    _memory_kernel[(count,)](w1, numels, g_squares, phi_squares, corr, alpha, eta, ALPHA_T=alpha_t,
                             ETA_T=eta_t, KD=kd, H=hidden)
    _update_kernel[grid](p_table, m_table, g_table, w1, w2, numels, block_tensor, block_start, g_squares,
                         phi_squares, lr, alpha, LR_T=lr_t, ALPHA_T=alpha_t, DTYPE=dtype, KD=kd, H=hidden, HB=hb,
                         ROWS=rows, TILES=TILES, ACT=act, PREC=prec)


# coordinates per tile (its (BLOCK, H) features stay in registers: 154 on sm_90, no spill) and tiles per work item
MOMENTA_BLOCK, MOMENTA_TILES = 512, 8
MOMENTA_MAX_HIDDEN = 64


def momenta_available(params: list[Tensor], hidden: int) -> bool:
    """Whether ``momenta_step_`` can take this list: Triton importable, one fp32/bf16 dtype and device, dense
    non-empty tensors, and ``hidden`` a power of two up to ``MOMENTA_MAX_HIDDEN`` (the device is the caller's
    to check: the kernels run on CUDA, or on CPU tensors under ``TRITON_INTERPRET=1``)."""
    return (delta_kernels.available(params) and params[0].dtype in _DTYPES and all(p.numel() > 0 for p in params)
            and 1 <= hidden <= MOMENTA_MAX_HIDDEN and hidden & (hidden - 1) == 0)


def momenta_step_(params: list[Tensor], grads: list[Tensor], bufs: list[Tensor], exp_avg_sqs: list[Tensor],
                  timescale_bufs: list[Tensor], w1: list[Tensor], w2: list[Tensor], w1_0: Tensor, lr: Tensor,
                  bias_correction2: Tensor, timescales: Tensor, alpha: float, beta2: float, eps: float | Tensor,
                  eta: float, weight_decay: float, activation: str = "tanh",
                  origins: list[Tensor] | None = None) -> Tensor | None:
    """The momenta layout's step (the shipped learned optimizer; equations: ``deep_cpu.momenta_step_``) over
    dense fp32/bf16 tensors on one device in two launches: the per-coordinate pass (W₁ read, ``C`` reduced by
    atomics) and W₁'s write.  ``w1``/``w2`` are fp32 ``(1, H)``/``(H, 2 + J)`` tensors, ``lr`` and
    ``bias_correction2`` ``(T,)`` tensors on the device, ``eps`` a number or such a tensor; nothing is read on the
    host.  Memory traffic: g, W, m, v and the J time-scale buffers read, all but g written: ``5 + 2J`` passes (9
    with J = 2; fused AdamW's 7); with ``origins`` (``lr_adapt="dog"``: W₀ read, one pass more) it also returns
    the per-tensor ``(‖u‖², ‖W_new − W₀‖²)`` as a ``(T, 2)`` fp32 device tensor (else None)."""
    hidden, count, n_scales = w1[0].shape[-1], len(params), timescales.numel()
    if activation not in MOMENTA_ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(MOMENTA_ACTIVATIONS)}, got {activation!r}")
    if not momenta_available(params, hidden):
        raise ValueError(f"momenta_step_ takes dense non-empty fp32/bf16 tensors on one device and hidden a power of "
                         f"two up to {MOMENTA_MAX_HIDDEN} (got hidden {hidden}; see deep_kernels.momenta_available)")
    device = params[0].device
    grads = [g.contiguous() for g in grads]
    numels, block_tensor, block_start = _work(tuple(p.numel() for p in params), device, MOMENTA_BLOCK * MOMENTA_TILES)
    corr = torch.zeros(count, hidden, dtype=torch.float32, device=device)
    dog = None if origins is None else torch.zeros(count, 2, dtype=torch.float32, device=device)
    tables = [_pointers(x) for x in (params, grads, bufs, exp_avg_sqs, timescale_bufs, w1, w2)]
    eps = eps.to(device=device, dtype=torch.float32).expand(count).contiguous() if isinstance(eps, Tensor) else \
        torch.full((count,), float(eps), dtype=torch.float32, device=device)
    lr, bias_correction2, gammas = (x.to(device=device, dtype=torch.float32) for x in (lr, bias_correction2,
                                                                                      timescales))
    _momenta_kernel[(block_tensor.numel(),)](*tables, tables[0] if origins is None else _pointers(origins), numels,
                                             block_tensor, block_start, lr, bias_correction2, gammas, corr,
                                             corr if dog is None else dog, float(alpha), float(beta2), eps,
                                             float(weight_decay), DTYPE=_TRITON_DTYPES[params[0].dtype], H=hidden,
                                             J=n_scales, BLOCK=MOMENTA_BLOCK, TILES=MOMENTA_TILES,
                                             ACT=MOMENTA_ACTIVATIONS[activation], DOG=origins is not None)
    _momenta_memory_kernel[(count,)](tables[5], w1_0.to(device=device, dtype=torch.float32).reshape(-1), numels,
                                     corr, float(alpha), float(eta), H=hidden)
    return dog
