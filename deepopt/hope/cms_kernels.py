"""A CMS level's whole chunk recurrence as one torch custom op, ``deepopt::cms_scan``, and its backward.

For one sequence, chunk c of ``P = period`` tokens (keys ``k``, constant error signals ``δ``) is read at the state
``(W₁, W₂)_c`` and, when full, moves it by Eq. 71 with the level's ``sgd`` rule (``cms_factors``)::

    y_t = W₁σ(W₂k_t)                                   for every token t of the chunk
    W₁ ← W₁ − lr·Σ_t a_t δ_t h_tᵀ,                     a_t = 1/(1 + ‖h_t‖²),  h_t = σ(z_t),  z_t = W₂k_t
    W₂ ← W₂ − lr·c·Σ_t (σ'(z_t) ⊙ W₁ᵀδ_t) k_tᵀ,       c = 1/((1 + ‖W₁‖²)·d),  lr = softplus(ρ)/P

A trailing partial chunk is read and makes no step.  The op returns the reads ``y`` (B, T, d) and the states
before every chunk and after the last full one, ``W₁``: (B, N+1, d, hid), ``W₂``: (B, N+1, hid, d) with
``N = T // P``: these are all that the backward pass keeps (``deepopt::cms_scan_backward``), which walks the
chunks in reverse and recomputes each from its start state (``chunk_vjp``: the hand-derived chain rule).
Gradients reach ``k``, the initial state and ``lr``; none flows into ``δ`` (constants of the pass).

On the CPU (and wherever the Triton kernels do not apply) both ops run the pure-torch reference below; on CUDA,
float32/bfloat16 inputs (``triton_applies``) run the Triton kernels of the second half of this module.  Up to
``MAX_CHUNK_WORK`` (period·d·hid) one persistent program per sequence walks all its chunks, forward
(``_scan_fwd_kernel``) or in reverse (``_scan_bwd_kernel``), with the states in global memory and every chunk
product a tiled ``tl.dot`` (fp32 accumulation); above it (HOPE's base, 125m and 340m presets) the host walks the
chunks and each phase of a chunk is one launch with a program per tile (``_tiled_*_kernel``).  Both call the same
tile-level functions (``_hidden_tile`` … ``_g2_tile``); design and launch counts: ``docs/notes/cms-kernels.md``.
"""

from __future__ import annotations

import torch
from torch import Tensor

# derivatives, times_derivative: σ' and σ'' for the W₂ step's σ'(z) factor and its backward; dot_precision: tl.dot's
# inputs
from deepopt.hope.kept import KeptChunks, keeps
from deepopt.hope.titans_kernels import derivatives, dot_precision, normalized_steps, times_derivative
from deepopt.rules.deep import ACTIVATIONS


def _check(k: Tensor, err: Tensor, w1: Tensor, w2: Tensor, lr: Tensor, period: int, activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
    if isinstance(period, bool) or not isinstance(period, int) or period < 1:
        raise ValueError(f"period must be an int >= 1, got {period!r}")
    if k.dim() != 3 or err.shape != k.shape:
        raise ValueError(f"k and err must both be (B, T, d), got {tuple(k.shape)} and {tuple(err.shape)}")
    d = k.shape[-1]
    if w1.dim() != 2 or w1.shape[0] != d or w2.shape != w1.shape[::-1] or lr.dim() != 0:
        raise ValueError(f"need w1 (d, hid), w2 (hid, d) with d = {d} and a 0-d lr, got {tuple(w1.shape)}, "
                         f"{tuple(w2.shape)}, {tuple(lr.shape)}")
    if k.dtype != err.dtype or not w1.dtype == w2.dtype == lr.dtype:
        raise TypeError(f"k, err ({k.dtype}, {err.dtype}) and w1, w2, lr ({w1.dtype}, {w2.dtype}, {lr.dtype}) "
                        f"must share a dtype pairwise")


def cms_factors(w1: Tensor, w2: Tensor, k: Tensor, err: Tensor | None, activation: str) -> dict[str, Tensor]:
    """A CMS chunk at state ``(W₁, W₂)``: ``z = kW₂ᵀ``, ``h = σ(z)``, ``read = hW₁ᵀ`` and, given the error signals
    ``err`` (δ), ``q = δW₁`` and Eq. 71's gradient sums in normalised-LMS form (``normalized_steps``, the W₂
    factor also over ``‖k‖² = d``): ``g1 = Σ_t (δ_t/(1 + ‖h_t‖²)) h_tᵀ``,
    ``g2 = Σ_t ((σ'(z_t) ⊙ q_t)/((1 + ‖W₁‖²)·d)) k_tᵀ``."""
    z = k @ w2.mT
    h = ACTIVATIONS[activation][0](z)
    f = {"z": z, "h": h, "read": h @ w1.mT}
    if err is not None:
        q = err @ w1
        e1, g2 = normalized_steps(err, h, times_derivative(activation, q, z, h), w1)
        g2 = g2 / k.shape[-1]  # ‖k‖² = d after RMSNorm
        f.update(q=q, g1=e1.mT @ h, g2=g2.mT @ k)
    return f


# -- the pure-torch reference -------------------------------------------------------------------------------
def scan_reference(k: Tensor, err: Tensor, w1: Tensor, w2: Tensor, lr: Tensor, period: int,
                   activation: str, kept: list | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The recurrence chunk by chunk in the states' dtype (module doc): ``(y, W₁ states, W₂ states)``;
    ``kept``: a list that receives each chunk's ``cms_factors`` (what ``chunk_vjp`` takes as ``saved``)."""
    B, dtype = k.shape[0], w1.dtype
    k, err = k.to(dtype), err.to(dtype)
    s1, s2 = [w1.expand(B, -1, -1)], [w2.expand(B, -1, -1)]
    reads = []
    for kc, ec in zip(k.split(period, dim=1), err.split(period, dim=1)):
        full = kc.shape[1] == period
        f = cms_factors(s1[-1], s2[-1], kc, ec if full else None, activation)
        reads.append(f["read"])
        if kept is not None:
            kept.append(({key: t for key, t in f.items() if key != "read"},))  # the read is an output
        if full:
            s1.append(s1[-1] - lr * f["g1"])
            s2.append(s2[-1] - lr * f["g2"])
    return torch.cat(reads, dim=1), torch.stack(s1, dim=1), torch.stack(s2, dim=1)


def chunk_vjp(w1: Tensor, w2: Tensor, k: Tensor, err: Tensor | None, lr: Tensor, gy: Tensor, g1: Tensor,
              g2: Tensor, activation: str, saved: dict[str, Tensor] | None = None
              ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backward of one chunk (batched over B) by hand: given ``gy = ∂L/∂y`` of its reads and ``g1, g2`` of the
    state after it, ``(∂L/∂k, ∂L/∂W₁, ∂L/∂W₂, ∂L/∂lr)`` at its start state; ``err=None``: a read-only chunk.

    With ``p = σ'(z)``, ``q = δW₁``, ``R = δG₁``, ``Q = kG₂ᵀ`` (row t: token t)::

        ∂h = gy W₁ − lr·a⊙R + 2h⊙(lr·a²·Σ_j h⊙R)          ∂(p⊙q) = −lr·c·Q
        ∂z = ∂h⊙p − lr·c·Q⊙q⊙σ''(z)                        ∂k = ∂z W₂ − lr·c·(p⊙q) G₂
        ∂W₁ = G₁ + gyᵀh − lr·c·δᵀ(Q⊙p) + 2W₁·lr·c²d·Σ Q⊙p⊙q    ∂W₂ = G₂ + ∂zᵀk
        ∂lr = −Σ_t a_t Σ_j h⊙R − c·Σ Q⊙p⊙q

    ``saved``: the chunk's ``cms_factors`` from the forward pass (read), else recomputed here.
    """
    f = cms_factors(w1, w2, k, err, activation) if saved is None else saved
    z, h = f["z"], f["h"]
    p, p2 = derivatives(activation, z, h)
    dh = gy @ w1
    gw1 = g1 + gy.mT @ h
    if err is None:
        dz = dh * p
        return dz @ w2, gw1, g2 + dz.mT @ k, torch.zeros_like(lr)
    d = k.shape[-1]
    a = 1 / (1 + (h * h).sum(-1, keepdim=True))  # (B, P, 1)
    c = 1 / ((1 + (w1 * w1).sum((-2, -1), keepdim=True)) * d)  # (B, 1, 1)
    pq = p * f["q"]
    R, Q = err @ g1, k @ g2.mT  # (B, P, hid) each
    hR = (h * R).sum(-1, keepdim=True)
    Qpq = (Q * pq).sum((-2, -1), keepdim=True)  # ⟨G₂, Σ_t (p⊙q)_t k_tᵀ⟩ per sequence
    dh = dh - lr * a * R + 2 * h * (lr * a * a * hR)
    dpq = -lr * c * Q
    dz = dh * p + dpq * f["q"] * p2
    gk = dz @ w2 - (lr * c * pq) @ g2
    gw1 = gw1 + err.mT @ (dpq * p) + 2 * w1 * (lr * c * c * d * Qpq)
    glr = -(a * hR).sum() - (c * Qpq).sum()
    return gk, gw1, g2 + dz.mT @ k, glr


def scan_backward_reference(gy: Tensor, gs1: Tensor | None, gs2: Tensor | None, k: Tensor, err: Tensor,
                            s1: Tensor, s2: Tensor, lr: Tensor, period: int,
                            activation: str, kept: list | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Reverse walk over the chunks, each recomputed from its saved start state (or its ``kept`` factors read
    back): ``(∂k, ∂W₁, ∂W₂, ∂lr)``."""
    dtype, T = s1.dtype, k.shape[1]
    kk, ee, gy = k.to(dtype), err.to(dtype), gy.to(dtype)
    N = T // period
    g1 = torch.zeros_like(s1[:, 0]) if gs1 is None else gs1[:, N].clone()
    g2 = torch.zeros_like(s2[:, 0]) if gs2 is None else gs2[:, N].clone()
    glr = torch.zeros_like(lr)
    gk = []
    for c in reversed(range(-(-T // period))):
        rows = slice(c * period, (c + 1) * period)
        full = c < N
        gkc, g1, g2, glr_c = chunk_vjp(s1[:, c], s2[:, c], kk[:, rows], ee[:, rows] if full else None, lr,
                                       gy[:, rows], g1, g2, activation, None if kept is None else kept[c][0])
        if full and gs1 is not None:
            g1 = g1 + gs1[:, c]
        if full and gs2 is not None:
            g2 = g2 + gs2[:, c]
        glr = glr + glr_c
        gk.append(gkc)
    return torch.cat(gk[::-1], dim=1).to(k.dtype), g1.sum(0), g2.sum(0), glr


# -- the custom ops ------------------------------------------------------------------------------------------
@torch.library.custom_op("deepopt::cms_scan", mutates_args=())
def _cms_scan(k: Tensor, err: Tensor, w1: Tensor, w2: Tensor, lr: Tensor, period: int,
              activation: str) -> tuple[Tensor, Tensor, Tensor]:
    if triton_applies(k, w1):
        return scan_triton(k, err, w1, w2, lr, period, activation)
    y, s1, s2 = scan_reference(k, err, w1, w2, lr, period, activation)
    return y.to(k.dtype), s1, s2


@_cms_scan.register_fake
def _(k, err, w1, w2, lr, period, activation):
    (B, T, d), hid, n = k.shape, w1.shape[1], k.shape[1] // period + 1
    return k.new_empty(B, T, d), w1.new_empty(B, n, d, hid), w1.new_empty(B, n, hid, d)


@torch.library.custom_op("deepopt::cms_scan_backward", mutates_args=())
def _cms_scan_backward(gy: Tensor, gs1: Tensor | None, gs2: Tensor | None, k: Tensor, err: Tensor, s1: Tensor,
                       s2: Tensor, lr: Tensor, period: int, activation: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if triton_applies(k, s1):
        return scan_backward_triton(gy, gs1, gs2, k, err, s1, s2, lr, period, activation)
    return scan_backward_reference(gy, gs1, gs2, k, err, s1, s2, lr, period, activation)


@_cms_scan_backward.register_fake
def _(gy, gs1, gs2, k, err, s1, s2, lr, period, activation):
    return torch.empty_like(k), s1.new_empty(s1.shape[2:]), s2.new_empty(s2.shape[2:]), torch.empty_like(lr)


def _setup_context(ctx, inputs, output) -> None:
    k, err, _, _, lr, period, activation = inputs
    _, s1, s2 = output
    ctx.save_for_backward(k, err, s1, s2, lr)
    ctx.period, ctx.activation = period, activation
    ctx.set_materialize_grads(False)  # unused state outputs (all of them in training) get no zero cotangents


def _backward(ctx, gy, gs1, gs2):
    k, err, s1, s2, lr = ctx.saved_tensors
    gy = torch.zeros_like(k) if gy is None else gy
    gk, g1, g2, glr = _cms_scan_backward(gy, gs1, gs2, k, err, s1, s2, lr, ctx.period, ctx.activation)
    return gk, None, g1, g2, glr, None, None


_cms_scan.register_autograd(_backward, setup_context=_setup_context)


def cms_scan(k: Tensor, err: Tensor, w1: Tensor, w2: Tensor, lr: Tensor, period: int,
             activation: str = "silu", keep: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """A CMS level's reads and states over a whole sequence (module doc), one ``deepopt::cms_scan`` op.

    ``k, err``: (B, T, d) keys and error signals (one dtype); ``w1`` (d, hid), ``w2`` (hid, d): the initial
    state; ``lr``: 0-d, ``softplus(ρ)/period``.  Returns ``y`` (B, T, d) in k's dtype and the states
    (B, T//period + 1, ·, ·) in w1's: index 0 is the initial state, the last one the final state.  ``keep``: off
    the Triton kernels, where a backward pass can follow (``kept.keeps``), the reference loop runs under
    ``kept.KeptChunks`` instead of the op: each chunk's factors kept for the backward pass, not recomputed.
    """
    _check(k, err, w1, w2, lr, period, activation)
    if keep and keeps(k, w1, w2, lr) and not triton_applies(k, w1):
        return KeptChunks.apply(_kept_loop, _kept_reverse, 5, k, err.detach(), w1, w2, lr, period, activation)
    return torch.ops.deepopt.cms_scan(k, err.detach(), w1, w2, lr, period, activation)


def _kept_loop(k, err, w1, w2, lr, period, activation, kept):
    y, s1, s2 = scan_reference(k, err, w1, w2, lr, period, activation, kept=kept)
    return y.to(k.dtype), s1, s2


def _kept_reverse(gy, gs1, gs2, tensors, s1, s2, static, kept):
    """``KeptChunks``' backward loop for ``cms_scan``: the op's reverse walk over the kept chunks (δ gets none)."""
    k, err, _, _, lr = tensors
    gy = torch.zeros_like(k) if gy is None else gy
    gk, g1, g2, glr = scan_backward_reference(gy, gs1, gs2, k, err, s1, s2, lr, *static, kept=kept)
    return gk, None, g1, g2, glr


# -- Triton kernels (CUDA; the tests run them on the CPU under TRITON_INTERPRET=1) ----------------------------
try:
    import triton
    import triton.language as tl
except ImportError:  # the reference serves everywhere
    triton = None

use_triton = True  # False: CUDA tensors run the torch reference too (e.g. to compare, or if a kernel misbehaves)
KERNEL_DTYPES = (torch.float32, torch.bfloat16)
# period·d·hid up to which one program per sequence walks all its chunks (one launch each way); above it (HOPE's
# base, 125m and 340m presets) each chunk is split over a program per tile, a launch per phase of the chunk
MAX_CHUNK_WORK = 1 << 22
ACT_CODES = {name: i for i, name in enumerate(ACTIVATIONS)}
BT, BD, BH, BLOCK = 16, 32, 32, 1024  # tile rows (tokens), d and hid tile widths, flat block for state copies
# token rows of the tiled kernels' tiles by tl.dot precision: 64 on tensor cores (TF32/bf16: the rows a Hopper wgmma
# takes; sm_90 and sm_80 builds spill nothing), 16 with exact fp32 products (FMA dots: 64 rows spill 0.3 KB a thread
# in the grads kernel) (benchmarks/triton_aot.py, HOPE base/125m CMS levels, 2026-12-07)
TILED_ROWS = {"tf32": 64, "ieee": BT}
# the persistent forward's register cap (launch option ``maxnreg``) by tl.dot precision.  With tensor-core products
# ptxas settles at 128 registers in some builds and spills (Triton 3.6, the device image's: 20 B a thread on sm_90
# with TF32, 76 B on sm_80 with bf16); 224 lets every TF32/bf16 build of HOPE tiny and small keep its registers on
# sm_90 and sm_80 with Triton 3.6 and 3.7.1.  Exact products keep ptxas's choice (a cap makes their sm_90 builds
# spill 8-16 B where they spill none) (benchmarks/triton_aot.py, 2026-12-07)
FORWARD_MAX_REGISTERS = {"tf32": 224, "ieee": None}


def triton_applies(k: Tensor, w: Tensor) -> bool:
    """Whether the kernels take these inputs: Triton importable and ``use_triton``, CUDA, float32/bfloat16 keys
    and states (``w``: the initial or saved states).  Any sizes: chunks above ``MAX_CHUNK_WORK`` take the tiled
    kernels."""
    return triton is not None and use_triton and k.is_cuda and k.dtype in KERNEL_DTYPES and w.dtype in KERNEL_DTYPES


if triton is not None:

    @triton.jit
    def _act(z, ACT: tl.constexpr):
        """``(σ(z), σ'(z), σ''(z))`` for the activation ``ACT_CODES[name]`` (order of ``ACTIVATIONS``)."""
        if ACT == 0:  # tanh
            h = 2 * tl.sigmoid(2 * z) - 1
            p = 1 - h * h
            p2 = -2 * h * p
        elif ACT == 1:  # relu
            h = tl.maximum(z, 0.0)
            p = (z > 0).to(tl.float32)
            p2 = z * 0
        elif ACT == 2:  # gelu (erf form)
            cdf = 0.5 * (1 + tl.erf(z * 0.7071067811865476))
            pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
            h = z * cdf
            p = cdf + z * pdf
            p2 = (2 - z * z) * pdf
        elif ACT == 3:  # silu
            s = tl.sigmoid(z)
            h = z * s
            p = s * (1 + z * (1 - s))
            p2 = s * (1 - s) * (2 + z * (1 - 2 * s))
        else:  # identity
            h = z
            p = z * 0 + 1
            p2 = z * 0
        return h, p, p2

    @triton.jit
    def _mm(a, b, acc, PREC: tl.constexpr):
        return tl.dot(a, b, acc, input_precision=PREC)

    @triton.jit
    def _tile(ptr, r0, c0, R, C, sr, sc, BR: tl.constexpr, BC: tl.constexpr):
        """fp32 tile ``[r0:r0+BR, c0:c0+BC]`` of an R×C matrix with strides (sr, sc); zeros outside."""
        r, c = r0 + tl.arange(0, BR), c0 + tl.arange(0, BC)
        mask = (r[:, None] < R) & (c[None, :] < C)
        return tl.load(ptr + r[:, None] * sr + c[None, :] * sc, mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def _put(ptr, x, r0, c0, R, C, sr, sc, BR: tl.constexpr, BC: tl.constexpr):
        r, c = r0 + tl.arange(0, BR), c0 + tl.arange(0, BC)
        mask = (r[:, None] < R) & (c[None, :] < C)
        tl.store(ptr + r[:, None] * sr + c[None, :] * sc, x.to(ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _vec(ptr, r0, R, BR: tl.constexpr):
        r = r0 + tl.arange(0, BR)
        return tl.load(ptr + r, mask=r < R, other=0.0)

    @triton.jit
    def _put_col(ptr, x, r0, R, stride, BR: tl.constexpr):
        """``x`` into elements r0.. (< R) of a column with this stride."""
        r = r0 + tl.arange(0, BR)
        tl.store(ptr + r * stride, x, mask=r < R)

    @triton.jit
    def _put_vec(ptr, x, r0, R, BR: tl.constexpr):
        _put_col(ptr, x, r0, R, 1, BR)

    @triton.jit
    def _sq_norm(w, S, BLOCK: tl.constexpr):
        acc = tl.zeros((BLOCK,), tl.float32)
        for o in range(0, S, BLOCK):
            offs = o + tl.arange(0, BLOCK)
            x = tl.load(w + offs, mask=offs < S, other=0.0).to(tl.float32)
            acc += x * x
        return tl.sum(acc)

    @triton.jit
    def _col_sq_norm(w1c, j0, D, HID, BD: tl.constexpr, BH: tl.constexpr):
        """Σ of W₁[:, j0:j0+BH]² (a column block of the state)."""
        acc = tl.zeros((BD, BH), tl.float32)
        for i0 in range(0, D, BD):
            w = _tile(w1c, i0, j0, D, HID, HID, 1, BD, BH)
            acc += w * w
        return tl.sum(tl.sum(acc, axis=1), axis=0)

    @triton.jit
    def _row_sums(parts, t0, rows, NJ, BT: tl.constexpr, NJB: tl.constexpr):
        """Rows t0.. of a (rows, NJ) table of per-tile partial sums, summed over its NJ columns."""
        return tl.sum(_tile(parts, t0, 0, rows, NJ, NJ, 1, BT, NJB), axis=1)

    # -- a chunk's phases, one tile each: the persistent kernels loop over the tiles, the tiled kernels (below)
    #    give each tile a program
    @triton.jit
    def _hidden_tile(kb, eb, w1c, w2c, hs, gs, t0, j0, rows, D, HID, STEP: tl.constexpr, ACT: tl.constexpr,
                     PREC: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr):
        """Tokens t0.. × hidden units j0..: h = σ(kW₂ᵀ) into hs and, with STEP, σ'(z)⊙δW₁ into gs; returns the
        rows' Σ h² over these units."""
        z = tl.zeros((BT, BH), tl.float32)
        q = tl.zeros((BT, BH), tl.float32)
        for i0 in range(0, D, BD):
            z = _mm(_tile(kb, t0, i0, rows, D, D, 1, BT, BD), _tile(w2c, i0, j0, D, HID, 1, D, BD, BH), z, PREC)
            if STEP:
                q = _mm(_tile(eb, t0, i0, rows, D, D, 1, BT, BD), _tile(w1c, i0, j0, D, HID, HID, 1, BD, BH), q,
                        PREC)
        h, p, _ = _act(z, ACT)
        _put(hs, h, t0, j0, rows, HID, HID, 1, BT, BH)
        if STEP:
            _put(gs, p * q, t0, j0, rows, HID, HID, 1, BT, BH)
        return tl.sum(h * h, axis=1)

    @triton.jit
    def _read_tile(hs, w1c, yb, t0, i0, rows, D, HID, PREC: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
                   BH: tl.constexpr):
        """Tokens t0.. × features i0.. of the reads y = hW₁ᵀ."""
        y = tl.zeros((BT, BD), tl.float32)
        for j0 in range(0, HID, BH):
            y = _mm(_tile(hs, t0, j0, rows, HID, HID, 1, BT, BH), _tile(w1c, j0, i0, HID, D, 1, HID, BH, BD), y,
                    PREC)
        _put(yb, y, t0, i0, rows, D, D, 1, BT, BD)

    @triton.jit
    def _w1_step_tile(eb, hs, as_, w1c, w1n, i0, j0, lr, rows, D, HID, PREC: tl.constexpr, BT: tl.constexpr,
                      BD: tl.constexpr, BH: tl.constexpr):
        """W₁ ← W₁ − lr·Σ_t (a_t δ_t) h_tᵀ on the block [i0.., j0..]."""
        acc = tl.zeros((BD, BH), tl.float32)
        for t0 in range(0, rows, BT):
            ea = _tile(eb, i0, t0, D, rows, 1, D, BD, BT) * _vec(as_, t0, rows, BT)[None, :]
            acc = _mm(ea, _tile(hs, t0, j0, rows, HID, HID, 1, BT, BH), acc, PREC)
        w = _tile(w1c, i0, j0, D, HID, HID, 1, BD, BH)
        _put(w1n, w - lr * acc, i0, j0, D, HID, HID, 1, BD, BH)

    @triton.jit
    def _w2_step_tile(gs, kb, w2c, w2n, j0, i0, lrc, rows, D, HID, PREC: tl.constexpr, BT: tl.constexpr,
                      BD: tl.constexpr, BH: tl.constexpr):
        """W₂ ← W₂ − lr·c·Σ_t g_t k_tᵀ on the block [j0.., i0..] (``lrc`` = lr·c)."""
        acc = tl.zeros((BH, BD), tl.float32)
        for t0 in range(0, rows, BT):
            acc = _mm(_tile(gs, j0, t0, HID, rows, 1, HID, BH, BT), _tile(kb, t0, i0, rows, D, D, 1, BT, BD), acc,
                      PREC)
        w = _tile(w2c, j0, i0, HID, D, D, 1, BH, BD)
        _put(w2n, w - lrc * acc, j0, i0, HID, D, D, 1, BH, BD)

    @triton.jit
    def _products_tile(kb, eb, gyb, w1c, w2c, g1b, g2b, zs, gws, qs, rs, q2s, t0, j0, rows, D, HID,
                       STEP: tl.constexpr, ACT: tl.constexpr, PREC: tl.constexpr, BT: tl.constexpr,
                       BD: tl.constexpr, BH: tl.constexpr):
        """Backward pass A on tokens t0.. × hidden units j0..: z, gyW₁ and, with STEP, q = δW₁, R = δG₁, Q = kG₂ᵀ
        into the scratch; returns the rows' (Σ h², Σ h⊙R) over these units."""
        z = tl.zeros((BT, BH), tl.float32)
        gw = tl.zeros((BT, BH), tl.float32)
        q = tl.zeros((BT, BH), tl.float32)
        r = tl.zeros((BT, BH), tl.float32)
        qq = tl.zeros((BT, BH), tl.float32)
        for i0 in range(0, D, BD):
            kt = _tile(kb, t0, i0, rows, D, D, 1, BT, BD)
            w1t = _tile(w1c, i0, j0, D, HID, HID, 1, BD, BH)
            z = _mm(kt, _tile(w2c, i0, j0, D, HID, 1, D, BD, BH), z, PREC)
            gw = _mm(_tile(gyb, t0, i0, rows, D, D, 1, BT, BD), w1t, gw, PREC)
            if STEP:
                et = _tile(eb, t0, i0, rows, D, D, 1, BT, BD)
                q = _mm(et, w1t, q, PREC)
                r = _mm(et, _tile(g1b, i0, j0, D, HID, HID, 1, BD, BH), r, PREC)
                qq = _mm(kt, _tile(g2b, i0, j0, D, HID, 1, D, BD, BH), qq, PREC)
        _put(zs, z, t0, j0, rows, HID, HID, 1, BT, BH)
        _put(gws, gw, t0, j0, rows, HID, HID, 1, BT, BH)
        h, _, _ = _act(z, ACT)
        if STEP:
            _put(qs, q, t0, j0, rows, HID, HID, 1, BT, BH)
            _put(rs, r, t0, j0, rows, HID, HID, 1, BT, BH)
            _put(q2s, qq, t0, j0, rows, HID, HID, 1, BT, BH)
        return tl.sum(h * h, axis=1), tl.sum(h * r, axis=1)

    @triton.jit
    def _pointwise_tile(zs, gws, qs, q2s, rs, a, ds, t0, j0, lr, cc, rows, HID, STEP: tl.constexpr,
                        ACT: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr):
        """Backward pass B on tokens t0.. × hidden units j0.. (``a``, ``ds`` = lr·a²·Σ h⊙R: the rows'): ∂z into rs
        and, with STEP, ∂(δW₁) into gws and lr·c·p⊙q into qs; returns the rows' Σ Q⊙p⊙q over these units."""
        h, p, p2 = _act(_tile(zs, t0, j0, rows, HID, HID, 1, BT, BH), ACT)
        dh = _tile(gws, t0, j0, rows, HID, HID, 1, BT, BH)
        qpq = tl.zeros((BT,), tl.float32)
        if STEP:
            q = _tile(qs, t0, j0, rows, HID, HID, 1, BT, BH)
            qq = _tile(q2s, t0, j0, rows, HID, HID, 1, BT, BH)
            dh = dh - lr * a[:, None] * _tile(rs, t0, j0, rows, HID, HID, 1, BT, BH) + 2 * h * ds[:, None]
            pq = p * q
            dpq = -(lr * cc) * qq
            qpq = tl.sum(qq * pq, axis=1)
            _put(rs, dh * p + dpq * q * p2, t0, j0, rows, HID, HID, 1, BT, BH)
            _put(gws, dpq * p, t0, j0, rows, HID, HID, 1, BT, BH)
            _put(qs, (lr * cc) * pq, t0, j0, rows, HID, HID, 1, BT, BH)
        else:
            _put(rs, dh * p, t0, j0, rows, HID, HID, 1, BT, BH)
        return qpq

    @triton.jit
    def _dk_tile(rs, qs, w2c, g2b, gkb, t0, i0, rows, D, HID, STEP: tl.constexpr, PREC: tl.constexpr,
                 BT: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr):
        """Backward pass C on tokens t0.. × features i0..: ∂k = ∂z W₂ − (lr·c·p⊙q) G₂."""
        acc = tl.zeros((BT, BD), tl.float32)
        for j0 in range(0, HID, BH):
            acc = _mm(_tile(rs, t0, j0, rows, HID, HID, 1, BT, BH), _tile(w2c, j0, i0, HID, D, D, 1, BH, BD), acc,
                      PREC)
            if STEP:
                acc = _mm(-_tile(qs, t0, j0, rows, HID, HID, 1, BT, BH), _tile(g2b, j0, i0, HID, D, D, 1, BH, BD),
                          acc, PREC)
        _put(gkb, acc, t0, i0, rows, D, D, 1, BT, BD)

    @triton.jit
    def _g1_tile(gyb, eb, zs, gws, w1c, g1b, gs1c, dn1, i0, j0, rows, D, HID, STEP: tl.constexpr,
                 HAS_GS1: tl.constexpr, ACT: tl.constexpr, PREC: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
                 BH: tl.constexpr):
        """Backward pass D on the block [i0.., j0..]: G₁ ← G₁ + gyᵀh + δᵀ∂(δW₁) + 2W₁∂‖W₁‖² (+ ∂ of this state's
        output)."""
        acc = _tile(g1b, i0, j0, D, HID, HID, 1, BD, BH)
        for t0 in range(0, rows, BT):
            h, _, _ = _act(_tile(zs, t0, j0, rows, HID, HID, 1, BT, BH), ACT)
            acc = _mm(_tile(gyb, i0, t0, D, rows, 1, D, BD, BT), h, acc, PREC)
            if STEP:
                acc = _mm(_tile(eb, i0, t0, D, rows, 1, D, BD, BT), _tile(gws, t0, j0, rows, HID, HID, 1, BT, BH),
                          acc, PREC)
        if STEP:
            acc += 2 * dn1 * _tile(w1c, i0, j0, D, HID, HID, 1, BD, BH)
            if HAS_GS1:
                acc += _tile(gs1c, i0, j0, D, HID, HID, 1, BD, BH)
        _put(g1b, acc, i0, j0, D, HID, HID, 1, BD, BH)

    @triton.jit
    def _g2_tile(rs, kb, g2b, gs2c, j0, i0, rows, D, HID, STEP: tl.constexpr, HAS_GS2: tl.constexpr,
                 PREC: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr):
        """Backward pass E on the block [j0.., i0..]: G₂ ← G₂ + ∂zᵀk (+ ∂ of this state's output)."""
        acc = _tile(g2b, j0, i0, HID, D, D, 1, BH, BD)
        for t0 in range(0, rows, BT):
            acc = _mm(_tile(rs, j0, t0, HID, rows, 1, HID, BH, BT), _tile(kb, t0, i0, rows, D, D, 1, BT, BD), acc,
                      PREC)
        if STEP and HAS_GS2:
            acc += _tile(gs2c, j0, i0, HID, D, D, 1, BH, BD)
        _put(g2b, acc, j0, i0, HID, D, D, 1, BH, BD)

    # -- the persistent kernels: one program per sequence walks every chunk and every tile
    @triton.jit
    def _fwd_chunk(kb, eb, yb, w1c, w2c, w1n, w2n, hs, gs, as_, lr, rows, D, HID, STEP: tl.constexpr,
                   ACT: tl.constexpr, PREC: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr,
                   BLOCK: tl.constexpr):
        """One chunk at state (w1c, w2c): reads into yb and, with STEP, the next state into (w1n, w2n).
        Scratch: hs = h (P, hid), gs = σ'(z)⊙δW₁ (P, hid), as_ = 1/(1 + ‖h_t‖²) (P)."""
        for t0 in range(0, rows, BT):
            sq = tl.zeros((BT,), tl.float32)
            for j0 in range(0, HID, BH):
                sq += _hidden_tile(kb, eb, w1c, w2c, hs, gs, t0, j0, rows, D, HID, STEP, ACT, PREC, BT, BD, BH)
            if STEP:
                _put_vec(as_, 1 / (1 + sq), t0, rows, BT)
        tl.debug_barrier()
        for t0 in range(0, rows, BT):
            for i0 in range(0, D, BD):
                _read_tile(hs, w1c, yb, t0, i0, rows, D, HID, PREC, BT, BD, BH)
        if STEP:
            cc = 1 / ((1 + _sq_norm(w1c, D * HID, BLOCK)) * D)
            for i0 in range(0, D, BD):
                for j0 in range(0, HID, BH):
                    _w1_step_tile(eb, hs, as_, w1c, w1n, i0, j0, lr, rows, D, HID, PREC, BT, BD, BH)
            for j0 in range(0, HID, BH):
                for i0 in range(0, D, BD):
                    _w2_step_tile(gs, kb, w2c, w2n, j0, i0, lr * cc, rows, D, HID, PREC, BT, BD, BH)
        tl.debug_barrier()

    @triton.jit
    def _scan_fwd_kernel(k_ptr, e_ptr, w1_ptr, w2_ptr, lr_ptr, y_ptr, s1_ptr, s2_ptr, h_ptr, g_ptr, a_ptr,
                         T, D, HID, P, N, R, ACT: tl.constexpr, PREC: tl.constexpr, BT: tl.constexpr,
                         BD: tl.constexpr, BH: tl.constexpr, BLOCK: tl.constexpr):
        """One program per sequence: copy θ₀ into state 0, then every chunk in order (module doc)."""
        b = tl.program_id(0).to(tl.int64)
        lr = tl.load(lr_ptr).to(tl.float32)
        S = D * HID
        s1b, s2b = s1_ptr + b * (N + 1) * S, s2_ptr + b * (N + 1) * S
        for o in range(0, S, BLOCK):
            offs = o + tl.arange(0, BLOCK)
            tl.store(s1b + offs, tl.load(w1_ptr + offs, mask=offs < S), mask=offs < S)
            tl.store(s2b + offs, tl.load(w2_ptr + offs, mask=offs < S), mask=offs < S)
        tl.debug_barrier()
        kb, eb, yb = k_ptr + b * T * D, e_ptr + b * T * D, y_ptr + b * T * D
        hs, gs, as_ = h_ptr + b * R * HID, g_ptr + b * R * HID, a_ptr + b * R
        for c in range(0, N):
            _fwd_chunk(kb + c * P * D, eb + c * P * D, yb + c * P * D, s1b + c * S, s2b + c * S,
                       s1b + (c + 1) * S, s2b + (c + 1) * S, hs, gs, as_, lr, P, D, HID, True, ACT, PREC, BT, BD,
                       BH, BLOCK)
        for c in range(N, (T + P - 1) // P):  # the trailing partial chunk: read only
            _fwd_chunk(kb + c * P * D, eb + c * P * D, yb + c * P * D, s1b + c * S, s2b + c * S, s1b, s2b, hs,
                       gs, as_, lr, T - c * P, D, HID, False, ACT, PREC, BT, BD, BH, BLOCK)

    @triton.jit
    def _bwd_chunk(kb, eb, gyb, gkb, w1c, w2c, g1b, g2b, gs1c, gs2c, zs, qs, rs, q2s, gws, as_, dss, lr, rows, D,
                   HID, STEP: tl.constexpr, HAS_GS1: tl.constexpr, HAS_GS2: tl.constexpr, ACT: tl.constexpr,
                   PREC: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr, BLOCK: tl.constexpr):
        """``chunk_vjp`` for one chunk at state (w1c, w2c): G₁, G₂ (g1b, g2b) of the state after it become those
        of its start state, ∂k lands in gkb; returns its ∂lr.  Scratch (P, hid): z, q, R = δG₁, Q = kG₂ᵀ and
        gyW₁ (zs, qs, rs, q2s, gws; passes B–E reuse qs, rs, gws for lr·c·p⊙q, ∂z and ∂(δW₁)), and (P) a, ∂s."""
        glr = tl.zeros((BT,), tl.float32)
        cc = 0.0
        if STEP:
            cc = 1 / ((1 + _sq_norm(w1c, D * HID, BLOCK)) * D)
        for t0 in range(0, rows, BT):  # pass A: the products over d and the row sums over hid
            sq = tl.zeros((BT,), tl.float32)
            hr = tl.zeros((BT,), tl.float32)
            for j0 in range(0, HID, BH):
                sq_j, hr_j = _products_tile(kb, eb, gyb, w1c, w2c, g1b, g2b, zs, gws, qs, rs, q2s, t0, j0, rows, D,
                                            HID, STEP, ACT, PREC, BT, BD, BH)
                sq += sq_j
                hr += hr_j
            if STEP:
                a = 1 / (1 + sq)
                _put_vec(as_, a, t0, rows, BT)
                _put_vec(dss, lr * a * a * hr, t0, rows, BT)
                glr -= a * hr
        tl.debug_barrier()
        qpq = tl.zeros((BT,), tl.float32)
        for t0 in range(0, rows, BT):  # pass B: elementwise, ∂z and ∂(δW₁)
            for j0 in range(0, HID, BH):
                a = tl.zeros((BT,), tl.float32)
                ds = tl.zeros((BT,), tl.float32)
                if STEP:
                    a = _vec(as_, t0, rows, BT)
                    ds = _vec(dss, t0, rows, BT)
                qpq += _pointwise_tile(zs, gws, qs, q2s, rs, a, ds, t0, j0, lr, cc, rows, HID, STEP, ACT, BT, BH)
        glr -= cc * qpq
        dn1 = lr * cc * cc * D * tl.sum(qpq)
        tl.debug_barrier()
        for t0 in range(0, rows, BT):  # pass C: ∂k
            for i0 in range(0, D, BD):
                _dk_tile(rs, qs, w2c, g2b, gkb, t0, i0, rows, D, HID, STEP, PREC, BT, BD, BH)
        tl.debug_barrier()
        for i0 in range(0, D, BD):  # pass D: G₁
            for j0 in range(0, HID, BH):
                _g1_tile(gyb, eb, zs, gws, w1c, g1b, gs1c, dn1, i0, j0, rows, D, HID, STEP, HAS_GS1, ACT, PREC, BT,
                         BD, BH)
        for j0 in range(0, HID, BH):  # pass E: G₂
            for i0 in range(0, D, BD):
                _g2_tile(rs, kb, g2b, gs2c, j0, i0, rows, D, HID, STEP, HAS_GS2, PREC, BT, BD, BH)
        tl.debug_barrier()
        return tl.sum(glr)

    @triton.jit
    def _scan_bwd_kernel(gy_ptr, gs1_ptr, gs2_ptr, k_ptr, e_ptr, s1_ptr, s2_ptr, lr_ptr, gk_ptr, g1_ptr, g2_ptr,
                         glr_ptr, z_ptr, q_ptr, r_ptr, q2_ptr, gw_ptr, a_ptr, ds_ptr, T, D, HID, P, N, R,
                         HAS_GS1: tl.constexpr, HAS_GS2: tl.constexpr, ACT: tl.constexpr, PREC: tl.constexpr,
                         BT: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr, BLOCK: tl.constexpr):
        """One program per sequence: G of the final state, then every chunk in reverse from its saved state."""
        b = tl.program_id(0).to(tl.int64)
        lr = tl.load(lr_ptr).to(tl.float32)
        S = D * HID
        s1b, s2b = s1_ptr + b * (N + 1) * S, s2_ptr + b * (N + 1) * S
        gs1b, gs2b = gs1_ptr + b * (N + 1) * S, gs2_ptr + b * (N + 1) * S
        g1b, g2b = g1_ptr + b * S, g2_ptr + b * S
        for o in range(0, S, BLOCK):
            offs = o + tl.arange(0, BLOCK)
            g1 = tl.zeros((BLOCK,), tl.float32)
            g2 = tl.zeros((BLOCK,), tl.float32)
            if HAS_GS1:
                g1 = tl.load(gs1b + N * S + offs, mask=offs < S, other=0.0).to(tl.float32)
            if HAS_GS2:
                g2 = tl.load(gs2b + N * S + offs, mask=offs < S, other=0.0).to(tl.float32)
            tl.store(g1b + offs, g1, mask=offs < S)
            tl.store(g2b + offs, g2, mask=offs < S)
        tl.debug_barrier()
        kb, eb, gyb, gkb = k_ptr + b * T * D, e_ptr + b * T * D, gy_ptr + b * T * D, gk_ptr + b * T * D
        zs, qs, rs, q2s, gws = (z_ptr + b * R * HID, q_ptr + b * R * HID, r_ptr + b * R * HID, q2_ptr + b * R * HID,
                                gw_ptr + b * R * HID)
        as_, dss = a_ptr + b * R, ds_ptr + b * R
        glr = tl.sum(tl.zeros((BT,), tl.float32), axis=0)  # a float32 scalar: loop-carried types must not change
        for c in range(N, (T + P - 1) // P):  # the trailing partial chunk: read only, at the final state
            glr += _bwd_chunk(kb + c * P * D, eb + c * P * D, gyb + c * P * D, gkb + c * P * D, s1b + c * S,
                              s2b + c * S, g1b, g2b, gs1b, gs2b, zs, qs, rs, q2s, gws, as_, dss, lr, T - c * P, D,
                              HID, False, HAS_GS1, HAS_GS2, ACT, PREC, BT, BD, BH, BLOCK)
        for i in range(0, N):
            c = N - 1 - i
            glr += _bwd_chunk(kb + c * P * D, eb + c * P * D, gyb + c * P * D, gkb + c * P * D, s1b + c * S,
                              s2b + c * S, g1b, g2b, gs1b + c * S, gs2b + c * S, zs, qs, rs, q2s, gws, as_, dss,
                              lr, P, D, HID, True, HAS_GS1, HAS_GS2, ACT, PREC, BT, BD, BH, BLOCK)
        tl.store(glr_ptr + b, glr)

    # -- the tiled kernels (chunks too large for one program: ``MAX_CHUNK_WORK``): one launch per phase of a
    #    chunk, a program per tile of the phase (grid B × tiles); the host walks the chunks.  Row sums over the
    #    hidden units and ‖W₁‖² are written per tile and summed by the next phase (no atomics: deterministic).
    #    ``c`` (the chunk) is not specialised on, so every chunk runs the same compiled kernel.  ``R`` = min(P, T):
    #    the scratch's rows per sequence (an argument, not computed in the kernel: a computed stride costs the
    #    compiler the alignment of every scratch access).
    @triton.jit(do_not_specialize=["c"])
    def _tiled_hidden_kernel(k_ptr, e_ptr, s1_ptr, s2_ptr, h_ptr, g_ptr, sqp_ptr, w1sq_ptr, c, T, D, HID, P, N, R,
                             rows, STEP: tl.constexpr, ACT: tl.constexpr, PREC: tl.constexpr, BT: tl.constexpr,
                             BD: tl.constexpr, BH: tl.constexpr):
        """Forward phase 1, program (b, token tile, hidden tile): h and σ'(z)⊙δW₁ (``_hidden_tile``), the rows'
        partial Σ h² into sqp (B, R, NJ) and, in the first token tile, W₁'s column block's Σ w² into w1sq (B, NJ)."""
        b = tl.program_id(0).to(tl.int64)
        t0, jt = tl.program_id(1) * BT, tl.program_id(2)
        S, NJ = D * HID, tl.cdiv(HID, BH)
        w1c = s1_ptr + (b * (N + 1) + c) * S
        sq = _hidden_tile(k_ptr + (b * T + c * P) * D, e_ptr + (b * T + c * P) * D, w1c,
                          s2_ptr + (b * (N + 1) + c) * S, h_ptr + b * R * HID, g_ptr + b * R * HID, t0, jt * BH,
                          rows, D, HID, STEP, ACT, PREC, BT, BD, BH)
        if STEP:
            _put_col(sqp_ptr + b * R * NJ + jt, sq, t0, rows, NJ, BT)
            if tl.program_id(1) == 0:
                tl.store(w1sq_ptr + b * NJ + jt, _col_sq_norm(w1c, jt * BH, D, HID, BD, BH))

    @triton.jit(do_not_specialize=["c"])
    def _tiled_read_kernel(h_ptr, s1_ptr, y_ptr, sqp_ptr, a_ptr, c, T, D, HID, P, N, R, rows, STEP: tl.constexpr,
                           PREC: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr,
                           NJB: tl.constexpr):
        """Forward phase 2, program (b, token tile, feature tile): the reads (``_read_tile``); the first feature
        tile also turns the rows' partial sums into a = 1/(1 + ‖h_t‖²)."""
        b = tl.program_id(0).to(tl.int64)
        t0 = tl.program_id(1) * BT
        NJ = tl.cdiv(HID, BH)
        _read_tile(h_ptr + b * R * HID, s1_ptr + (b * (N + 1) + c) * D * HID, y_ptr + (b * T + c * P) * D, t0,
                   tl.program_id(2) * BD, rows, D, HID, PREC, BT, BD, BH)
        if STEP:
            if tl.program_id(2) == 0:
                sq = _row_sums(sqp_ptr + b * R * NJ, t0, rows, NJ, BT, NJB)
                _put_vec(a_ptr + b * R, 1 / (1 + sq), t0, rows, BT)

    @triton.jit(do_not_specialize=["c"])
    def _tiled_step_kernel(k_ptr, e_ptr, s1_ptr, s2_ptr, h_ptr, g_ptr, a_ptr, w1sq_ptr, lr_ptr, c, T, D, HID, P, N,
                           PREC: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr,
                           NJB: tl.constexpr):
        """Forward phase 3, program (b, state block, W₁ or W₂): the block of state c + 1 (a full chunk: the
        scratch has P rows)."""
        b = tl.program_id(0).to(tl.int64)
        S, NJ = D * HID, tl.cdiv(HID, BH)
        i0, j0 = (tl.program_id(1) // NJ) * BD, (tl.program_id(1) % NJ) * BH
        s = b * (N + 1) + c
        kb, eb = k_ptr + (b * T + c * P) * D, e_ptr + (b * T + c * P) * D
        lr = tl.load(lr_ptr).to(tl.float32)
        if tl.program_id(2) == 0:
            _w1_step_tile(eb, h_ptr + b * P * HID, a_ptr + b * P, s1_ptr + s * S, s1_ptr + (s + 1) * S, i0, j0, lr, P,
                          D, HID, PREC, BT, BD, BH)
        else:
            _w2_step_tile(g_ptr + b * P * HID, kb, s2_ptr + s * S, s2_ptr + (s + 1) * S, j0, i0,
                          lr * _tiled_cc(w1sq_ptr, b, NJ, D, NJB), P, D, HID, PREC, BT, BD, BH)

    @triton.jit(do_not_specialize=["c"])
    def _tiled_products_kernel(k_ptr, e_ptr, gy_ptr, s1_ptr, s2_ptr, g1_ptr, g2_ptr, z_ptr, gw_ptr, q_ptr, r_ptr,
                               q2_ptr, sqp_ptr, hrp_ptr, w1sq_ptr, c, T, D, HID, P, N, R, rows, STEP: tl.constexpr,
                               ACT: tl.constexpr, PREC: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
                               BH: tl.constexpr):
        """Backward pass A, program (b, token tile, hidden tile) (``_products_tile``): the rows' partial Σ h² and
        Σ h⊙R into sqp, hrp (B, R, NJ); the first token tile, W₁'s column block's Σ w² into w1sq (B, NJ)."""
        b = tl.program_id(0).to(tl.int64)
        t0, jt = tl.program_id(1) * BT, tl.program_id(2)
        S, NJ = D * HID, tl.cdiv(HID, BH)
        PH = R * HID
        w1c = s1_ptr + (b * (N + 1) + c) * S
        x = (b * T + c * P) * D
        sq, hr = _products_tile(k_ptr + x, e_ptr + x, gy_ptr + x, w1c, s2_ptr + (b * (N + 1) + c) * S,
                                g1_ptr + b * S, g2_ptr + b * S, z_ptr + b * PH, gw_ptr + b * PH, q_ptr + b * PH,
                                r_ptr + b * PH, q2_ptr + b * PH, t0, jt * BH, rows, D, HID, STEP, ACT, PREC, BT, BD,
                                BH)
        if STEP:
            _put_col(sqp_ptr + b * R * NJ + jt, sq, t0, rows, NJ, BT)
            _put_col(hrp_ptr + b * R * NJ + jt, hr, t0, rows, NJ, BT)
            if tl.program_id(1) == 0:
                tl.store(w1sq_ptr + b * NJ + jt, _col_sq_norm(w1c, jt * BH, D, HID, BD, BH))

    @triton.jit
    def _tiled_a(sqp_ptr, hrp_ptr, b, t0, rows, R, NJ, lr, BT: tl.constexpr, NJB: tl.constexpr):
        """The rows' a = 1/(1 + ‖h_t‖²), Σ h⊙R and lr·a²·Σ h⊙R from pass A's per-tile partial sums (tables of R
        rows per sequence)."""
        a = 1 / (1 + _row_sums(sqp_ptr + b * R * NJ, t0, rows, NJ, BT, NJB))
        hr = _row_sums(hrp_ptr + b * R * NJ, t0, rows, NJ, BT, NJB)
        return a, hr, lr * a * a * hr

    @triton.jit
    def _tiled_cc(w1sq_ptr, b, NJ, D, NJB: tl.constexpr):
        """c = 1/((1 + ‖W₁‖²)·d) from the per-column-block sums."""
        return 1 / ((1 + tl.sum(_vec(w1sq_ptr + b * NJ, 0, NJ, NJB))) * D)

    @triton.jit
    def _tiled_pointwise_kernel(z_ptr, gw_ptr, q_ptr, q2_ptr, r_ptr, sqp_ptr, hrp_ptr, w1sq_ptr, qpqp_ptr, lr_ptr,
                                D, HID, R, rows, STEP: tl.constexpr, ACT: tl.constexpr, BT: tl.constexpr,
                                BH: tl.constexpr, NJB: tl.constexpr):
        """Backward pass B, program (b, token tile, hidden tile) (``_pointwise_tile``): the rows' partial
        Σ Q⊙p⊙q into qpqp (B, R, NJ)."""
        b = tl.program_id(0).to(tl.int64)
        t0, jt = tl.program_id(1) * BT, tl.program_id(2)
        NJ = tl.cdiv(HID, BH)
        PH = R * HID
        lr = tl.load(lr_ptr).to(tl.float32)
        a = tl.zeros((BT,), tl.float32)
        ds = tl.zeros((BT,), tl.float32)
        cc = 0.0
        if STEP:
            a, _, ds = _tiled_a(sqp_ptr, hrp_ptr, b, t0, rows, R, NJ, lr, BT, NJB)
            cc = _tiled_cc(w1sq_ptr, b, NJ, D, NJB)
        qpq = _pointwise_tile(z_ptr + b * PH, gw_ptr + b * PH, q_ptr + b * PH, q2_ptr + b * PH, r_ptr + b * PH, a,
                              ds, t0, jt * BH, lr, cc, rows, HID, STEP, ACT, BT, BH)
        if STEP:
            _put_col(qpqp_ptr + b * R * NJ + jt, qpq, t0, rows, NJ, BT)

    @triton.jit(do_not_specialize=["c"])
    def _tiled_dk_kernel(r_ptr, q_ptr, s2_ptr, g2_ptr, gk_ptr, sqp_ptr, hrp_ptr, w1sq_ptr, qpqp_ptr, lr_ptr,
                         glr_ptr, dn1_ptr, c, T, D, HID, P, N, NC, R, rows, STEP: tl.constexpr, PREC: tl.constexpr,
                         BT: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr, NJB: tl.constexpr):
        """Backward pass C, program (b, token tile, feature tile): ∂k (``_dk_tile``); program (b, 0, 0) also sums
        the chunk's ∂lr = −Σ_t a_t Σ h⊙R − c·Σ Q⊙p⊙q into glr (B, NC) and lr·c²·d·Σ Q⊙p⊙q into dn1 (B)."""
        b = tl.program_id(0).to(tl.int64)
        S = D * HID
        PH = R * HID
        _dk_tile(r_ptr + b * PH, q_ptr + b * PH, s2_ptr + (b * (N + 1) + c) * S, g2_ptr + b * S,
                 gk_ptr + (b * T + c * P) * D, tl.program_id(1) * BT, tl.program_id(2) * BD, rows, D, HID, STEP,
                 PREC, BT, BD, BH)
        if STEP:
            if (tl.program_id(1) == 0) & (tl.program_id(2) == 0):
                NJ = tl.cdiv(HID, BH)
                lr = tl.load(lr_ptr).to(tl.float32)
                ahr = tl.zeros((BT,), tl.float32)
                qpq = tl.zeros((BT,), tl.float32)
                for t0 in range(0, rows, BT):
                    a, hr, _ = _tiled_a(sqp_ptr, hrp_ptr, b, t0, rows, R, NJ, lr, BT, NJB)
                    ahr += a * hr
                    qpq += _row_sums(qpqp_ptr + b * R * NJ, t0, rows, NJ, BT, NJB)
                cc = _tiled_cc(w1sq_ptr, b, NJ, D, NJB)
                tl.store(glr_ptr + b * NC + c, -tl.sum(ahr) - cc * tl.sum(qpq))
                tl.store(dn1_ptr + b, lr * cc * cc * D * tl.sum(qpq))

    @triton.jit(do_not_specialize=["c"])
    def _tiled_grads_kernel(k_ptr, e_ptr, gy_ptr, s1_ptr, z_ptr, gw_ptr, r_ptr, g1_ptr, g2_ptr, gs1_ptr, gs2_ptr,
                            dn1_ptr, c, T, D, HID, P, N, R, rows, STEP: tl.constexpr, HAS_GS1: tl.constexpr,
                            HAS_GS2: tl.constexpr, ACT: tl.constexpr, PREC: tl.constexpr, BT: tl.constexpr,
                            BD: tl.constexpr, BH: tl.constexpr):
        """Backward passes D and E, program (b, state block, G₁ or G₂) (``_g1_tile``, ``_g2_tile``)."""
        b = tl.program_id(0).to(tl.int64)
        S, NJ = D * HID, tl.cdiv(HID, BH)
        PH = R * HID
        i0, j0 = (tl.program_id(1) // NJ) * BD, (tl.program_id(1) % NJ) * BH
        s = b * (N + 1) + c
        x = (b * T + c * P) * D
        if tl.program_id(2) == 0:
            dn1 = 0.0
            if STEP:
                dn1 = tl.load(dn1_ptr + b)
            _g1_tile(gy_ptr + x, e_ptr + x, z_ptr + b * PH, gw_ptr + b * PH, s1_ptr + s * S, g1_ptr + b * S,
                     gs1_ptr + s * S, dn1, i0, j0, rows, D, HID, STEP, HAS_GS1, ACT, PREC, BT, BD, BH)
        else:
            _g2_tile(r_ptr + b * PH, k_ptr + x, g2_ptr + b * S, gs2_ptr + s * S, j0, i0, rows, D, HID, STEP,
                     HAS_GS2, PREC, BT, BD, BH)


def _tiles(n: int, block: int) -> int:
    return -(-n // block)


def scan_triton(k: Tensor, err: Tensor, w1: Tensor, w2: Tensor, lr: Tensor, period: int,
                activation: str) -> tuple[Tensor, Tensor, Tensor]:
    """``deepopt::cms_scan`` on the kernels: one launch (``_scan_fwd_kernel``, a program per sequence) or, for a
    chunk above ``MAX_CHUNK_WORK``, three launches per chunk, a program per tile (``_tiled_*_kernel``)."""
    (B, T, d), hid, N = k.shape, w1.shape[1], k.shape[1] // period
    k, err, w1, w2 = k.contiguous(), err.contiguous(), w1.contiguous(), w2.contiguous()
    y = torch.empty_like(k)
    s1, s2 = w1.new_empty(B, N + 1, d, hid), w2.new_empty(B, N + 1, hid, d)
    rows = min(period, T)  # the scratch's rows per sequence (T >= 1)
    h, g = (k.new_empty(B, rows, hid, dtype=torch.float32) for _ in range(2))
    a = k.new_empty(B, rows, dtype=torch.float32)
    consts = {"PREC": dot_precision(k, w1), "BT": BT, "BD": BD, "BH": BH}
    if period * d * hid <= MAX_CHUNK_WORK:
        _scan_fwd_kernel[(B,)](k, err, w1, w2, lr, y, s1, s2, h, g, a, T, d, hid, period, N, rows,
                               ACT=ACT_CODES[activation], BLOCK=BLOCK, maxnreg=FORWARD_MAX_REGISTERS[consts["PREC"]],
                               **consts)
        return y, s1, s2
    nj, ni = _tiles(hid, BH), _tiles(d, BD)
    njb = triton.next_power_of_2(nj)
    sqp, w1sq = k.new_empty(B, rows, nj, dtype=torch.float32), k.new_empty(B, nj, dtype=torch.float32)
    s1[:, 0], s2[:, 0] = w1, w2
    consts["BT"] = bt = TILED_ROWS[consts["PREC"]]
    for c in range(_tiles(T, period)):
        n, step = min(period, T - c * period), c < N
        _tiled_hidden_kernel[(B, _tiles(n, bt), nj)](k, err, s1, s2, h, g, sqp, w1sq, c, T, d, hid, period, N,
                                                      rows, n, STEP=step, ACT=ACT_CODES[activation], **consts)
        _tiled_read_kernel[(B, _tiles(n, bt), ni)](h, s1, y, sqp, a, c, T, d, hid, period, N, rows, n, STEP=step,
                                                    NJB=njb, **consts)
        if step:
            _tiled_step_kernel[(B, ni * nj, 2)](k, err, s1, s2, h, g, a, w1sq, lr, c, T, d, hid, period, N, NJB=njb,
                                                **consts)
    return y, s1, s2


def scan_backward_triton(gy: Tensor, gs1: Tensor | None, gs2: Tensor | None, k: Tensor, err: Tensor, s1: Tensor,
                         s2: Tensor, lr: Tensor, period: int, activation: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``deepopt::cms_scan_backward`` on the kernels: one launch (``_scan_bwd_kernel``) or, above
    ``MAX_CHUNK_WORK``, four per chunk (``_tiled_*_kernel``); then the sums over the batch."""
    (B, T, d), hid, N = k.shape, s1.shape[-1], k.shape[1] // period
    gy, k, err, s1, s2 = gy.to(k.dtype).contiguous(), k.contiguous(), err.contiguous(), s1.contiguous(), s2.contiguous()
    gk = torch.empty_like(k)
    rows = min(period, T)
    z, q, r, q2, gw = (k.new_empty(B, rows, hid, dtype=torch.float32) for _ in range(5))
    gs1c = s1 if gs1 is None else gs1.to(s1.dtype).contiguous()  # an unused pointer when absent
    gs2c = s2 if gs2 is None else gs2.to(s2.dtype).contiguous()
    consts = {"HAS_GS1": gs1 is not None, "HAS_GS2": gs2 is not None, "ACT": ACT_CODES[activation],
              "PREC": dot_precision(k, s1), "BT": BT, "BD": BD, "BH": BH}
    if period * d * hid <= MAX_CHUNK_WORK:
        g1, g2 = (k.new_empty(B, d, hid, dtype=torch.float32), k.new_empty(B, hid, d, dtype=torch.float32))
        glr = k.new_empty(B, dtype=torch.float32)
        a, ds = (k.new_empty(B, rows, dtype=torch.float32) for _ in range(2))
        _scan_bwd_kernel[(B,)](gy, gs1c, gs2c, k, err, s1, s2, lr, gk, g1, g2, glr, z, q, r, q2, gw, a, ds, T, d,
                               hid, period, N, rows, BLOCK=BLOCK, **consts)
    else:
        g1, g2 = (torch.zeros(B, d, hid, dtype=torch.float32, device=k.device),
                  torch.zeros(B, hid, d, dtype=torch.float32, device=k.device))
        if gs1 is not None:
            g1.copy_(gs1c[:, N])
        if gs2 is not None:
            g2.copy_(gs2c[:, N])
        glr = torch.zeros(B, max(N, 1), dtype=torch.float32, device=k.device)  # per chunk
        nj, ni = _tiles(hid, BH), _tiles(d, BD)
        sqp, hrp, qpqp = (k.new_empty(B, rows, nj, dtype=torch.float32) for _ in range(3))
        w1sq, dn1 = k.new_empty(B, nj, dtype=torch.float32), k.new_empty(B, dtype=torch.float32)
        njb = triton.next_power_of_2(nj)
        consts["BT"] = bt = TILED_ROWS[consts["PREC"]]
        for c in reversed(range(_tiles(T, period))):
            n, step = min(period, T - c * period), c < N
            grid = (B, _tiles(n, bt), nj)
            _tiled_products_kernel[grid](k, err, gy, s1, s2, g1, g2, z, gw, q, r, q2, sqp, hrp, w1sq, c, T, d, hid,
                                         period, N, rows, n, STEP=step, ACT=consts["ACT"], PREC=consts["PREC"], BT=bt,
                                         BD=BD, BH=BH)
            _tiled_pointwise_kernel[grid](z, gw, q, q2, r, sqp, hrp, w1sq, qpqp, lr, d, hid, rows, n,
                                          STEP=step, ACT=consts["ACT"], BT=bt, BH=BH, NJB=njb)
            _tiled_dk_kernel[(B, _tiles(n, bt), ni)](r, q, s2, g2, gk, sqp, hrp, w1sq, qpqp, lr, glr, dn1, c, T, d,
                                                     hid, period, N, max(N, 1), rows, n, STEP=step, PREC=consts["PREC"],
                                                     BT=bt, BD=BD, BH=BH, NJB=njb)
            _tiled_grads_kernel[(B, ni * nj, 2)](k, err, gy, s1, z, gw, r, g1, g2, gs1c, gs2c, dn1, c, T, d, hid,
                                                 period, N, rows, n, STEP=step, **consts)
    return gk, g1.sum(0).to(s1.dtype), g2.sum(0).to(s2.dtype), glr.sum().to(lr.dtype)
