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
float32/bfloat16 inputs of a small enough chunk (``triton_applies``) run the Triton kernels of the second half of
this module: one persistent program per sequence walks all its chunks, forward (``_scan_fwd_kernel``) or in
reverse (``_scan_bwd_kernel``), with the states in global memory and every chunk product a tiled ``tl.dot`` (fp32
accumulation; design and launch counts: ``docs/notes/cms-kernels.md``).
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
    if triton_applies(k, w1, period):
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
    if triton_applies(k, s1, period):
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
    if keep and keeps(k, w1, w2, lr) and not triton_applies(k, w1, period):
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
# period·d·hid above which a chunk is left to the reference's batched cuBLAS GEMMs: the kernels run one program
# per sequence, which pays where launches dominate (many small chunks), not for GEMMs that fill the GPU alone
MAX_CHUNK_WORK = 1 << 22
ACT_CODES = {name: i for i, name in enumerate(ACTIVATIONS)}
BT, BD, BH, BLOCK = 16, 32, 32, 1024  # tile rows (tokens), d and hid tile widths, flat block for state copies


def triton_applies(k: Tensor, w: Tensor, period: int) -> bool:
    """Whether the kernels take these inputs: Triton importable and ``use_triton``, CUDA, float32/bfloat16 keys
    and states (``w``: the initial or saved states, hid last), and a chunk small enough (``MAX_CHUNK_WORK``)."""
    return (triton is not None and use_triton and k.is_cuda and k.dtype in KERNEL_DTYPES
            and w.dtype in KERNEL_DTYPES and period * k.shape[-1] * w.shape[-1] <= MAX_CHUNK_WORK)


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
    def _put_vec(ptr, x, r0, R, BR: tl.constexpr):
        r = r0 + tl.arange(0, BR)
        tl.store(ptr + r, x, mask=r < R)

    @triton.jit
    def _sq_norm(w, S, BLOCK: tl.constexpr):
        acc = tl.zeros((BLOCK,), tl.float32)
        for o in range(0, S, BLOCK):
            offs = o + tl.arange(0, BLOCK)
            x = tl.load(w + offs, mask=offs < S, other=0.0).to(tl.float32)
            acc += x * x
        return tl.sum(acc)

    @triton.jit
    def _fwd_chunk(kb, eb, yb, w1c, w2c, w1n, w2n, hs, gs, as_, lr, rows, D, HID, STEP: tl.constexpr,
                   ACT: tl.constexpr, PREC: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr,
                   BLOCK: tl.constexpr):
        """One chunk at state (w1c, w2c): reads into yb and, with STEP, the next state into (w1n, w2n).
        Scratch: hs = h (P, hid), gs = σ'(z)⊙δW₁ (P, hid), as_ = 1/(1 + ‖h_t‖²) (P)."""
        for t0 in range(0, rows, BT):
            sq = tl.zeros((BT,), tl.float32)
            for j0 in range(0, HID, BH):
                z = tl.zeros((BT, BH), tl.float32)
                q = tl.zeros((BT, BH), tl.float32)
                for i0 in range(0, D, BD):
                    z = _mm(_tile(kb, t0, i0, rows, D, D, 1, BT, BD), _tile(w2c, i0, j0, D, HID, 1, D, BD, BH), z,
                            PREC)
                    if STEP:
                        q = _mm(_tile(eb, t0, i0, rows, D, D, 1, BT, BD),
                                _tile(w1c, i0, j0, D, HID, HID, 1, BD, BH), q, PREC)
                h, p, _ = _act(z, ACT)
                _put(hs, h, t0, j0, rows, HID, HID, 1, BT, BH)
                if STEP:
                    _put(gs, p * q, t0, j0, rows, HID, HID, 1, BT, BH)
                    sq += tl.sum(h * h, axis=1)
            if STEP:
                _put_vec(as_, 1 / (1 + sq), t0, rows, BT)
        tl.debug_barrier()
        for t0 in range(0, rows, BT):
            for i0 in range(0, D, BD):
                y = tl.zeros((BT, BD), tl.float32)
                for j0 in range(0, HID, BH):
                    y = _mm(_tile(hs, t0, j0, rows, HID, HID, 1, BT, BH), _tile(w1c, j0, i0, HID, D, 1, HID, BH, BD),
                            y, PREC)
                _put(yb, y, t0, i0, rows, D, D, 1, BT, BD)
        if STEP:
            cc = 1 / ((1 + _sq_norm(w1c, D * HID, BLOCK)) * D)
            for i0 in range(0, D, BD):  # W₁ ← W₁ − lr·Σ_t (a_t δ_t) h_tᵀ
                for j0 in range(0, HID, BH):
                    acc = tl.zeros((BD, BH), tl.float32)
                    for t0 in range(0, rows, BT):
                        ea = _tile(eb, i0, t0, D, rows, 1, D, BD, BT) * _vec(as_, t0, rows, BT)[None, :]
                        acc = _mm(ea, _tile(hs, t0, j0, rows, HID, HID, 1, BT, BH), acc, PREC)
                    w = _tile(w1c, i0, j0, D, HID, HID, 1, BD, BH)
                    _put(w1n, w - lr * acc, i0, j0, D, HID, HID, 1, BD, BH)
            for j0 in range(0, HID, BH):  # W₂ ← W₂ − lr·c·Σ_t g_t k_tᵀ
                for i0 in range(0, D, BD):
                    acc = tl.zeros((BH, BD), tl.float32)
                    for t0 in range(0, rows, BT):
                        acc = _mm(_tile(gs, j0, t0, HID, rows, 1, HID, BH, BT),
                                  _tile(kb, t0, i0, rows, D, D, 1, BT, BD), acc, PREC)
                    w = _tile(w2c, j0, i0, HID, D, D, 1, BH, BD)
                    _put(w2n, w - (lr * cc) * acc, j0, i0, HID, D, D, 1, BH, BD)
        tl.debug_barrier()

    @triton.jit
    def _scan_fwd_kernel(k_ptr, e_ptr, w1_ptr, w2_ptr, lr_ptr, y_ptr, s1_ptr, s2_ptr, h_ptr, g_ptr, a_ptr,
                         T, D, HID, P, N, ACT: tl.constexpr, PREC: tl.constexpr, BT: tl.constexpr,
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
        hs, gs, as_ = h_ptr + b * P * HID, g_ptr + b * P * HID, a_ptr + b * P
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
                if STEP:
                    h, _, _ = _act(z, ACT)
                    _put(qs, q, t0, j0, rows, HID, HID, 1, BT, BH)
                    _put(rs, r, t0, j0, rows, HID, HID, 1, BT, BH)
                    _put(q2s, qq, t0, j0, rows, HID, HID, 1, BT, BH)
                    sq += tl.sum(h * h, axis=1)
                    hr += tl.sum(h * r, axis=1)
            if STEP:
                a = 1 / (1 + sq)
                _put_vec(as_, a, t0, rows, BT)
                _put_vec(dss, lr * a * a * hr, t0, rows, BT)
                glr -= a * hr
        tl.debug_barrier()
        qpq = tl.zeros((BT,), tl.float32)
        for t0 in range(0, rows, BT):  # pass B: elementwise, ∂z and ∂(δW₁)
            for j0 in range(0, HID, BH):
                h, p, p2 = _act(_tile(zs, t0, j0, rows, HID, HID, 1, BT, BH), ACT)
                dh = _tile(gws, t0, j0, rows, HID, HID, 1, BT, BH)
                if STEP:
                    q = _tile(qs, t0, j0, rows, HID, HID, 1, BT, BH)
                    qq = _tile(q2s, t0, j0, rows, HID, HID, 1, BT, BH)
                    a = _vec(as_, t0, rows, BT)[:, None]
                    dh = dh - lr * a * _tile(rs, t0, j0, rows, HID, HID, 1, BT, BH) \
                        + 2 * h * _vec(dss, t0, rows, BT)[:, None]
                    pq = p * q
                    dpq = -(lr * cc) * qq
                    qpq += tl.sum(qq * pq, axis=1)
                    _put(rs, dh * p + dpq * q * p2, t0, j0, rows, HID, HID, 1, BT, BH)
                    _put(gws, dpq * p, t0, j0, rows, HID, HID, 1, BT, BH)
                    _put(qs, (lr * cc) * pq, t0, j0, rows, HID, HID, 1, BT, BH)
                else:
                    _put(rs, dh * p, t0, j0, rows, HID, HID, 1, BT, BH)
        glr -= cc * qpq
        dn1 = lr * cc * cc * D * tl.sum(qpq)
        tl.debug_barrier()
        for t0 in range(0, rows, BT):  # pass C: ∂k = ∂z W₂ − (lr·c·p⊙q) G₂
            for i0 in range(0, D, BD):
                acc = tl.zeros((BT, BD), tl.float32)
                for j0 in range(0, HID, BH):
                    acc = _mm(_tile(rs, t0, j0, rows, HID, HID, 1, BT, BH),
                              _tile(w2c, j0, i0, HID, D, D, 1, BH, BD), acc, PREC)
                    if STEP:
                        acc = _mm(-_tile(qs, t0, j0, rows, HID, HID, 1, BT, BH),
                                  _tile(g2b, j0, i0, HID, D, D, 1, BH, BD), acc, PREC)
                _put(gkb, acc, t0, i0, rows, D, D, 1, BT, BD)
        tl.debug_barrier()
        for i0 in range(0, D, BD):  # pass D: G₁ ← G₁ + gyᵀh + δᵀ∂(δW₁) + 2W₁∂‖W₁‖² (+ ∂ of this state's output)
            for j0 in range(0, HID, BH):
                acc = _tile(g1b, i0, j0, D, HID, HID, 1, BD, BH)
                for t0 in range(0, rows, BT):
                    h, _, _ = _act(_tile(zs, t0, j0, rows, HID, HID, 1, BT, BH), ACT)
                    acc = _mm(_tile(gyb, i0, t0, D, rows, 1, D, BD, BT), h, acc, PREC)
                    if STEP:
                        acc = _mm(_tile(eb, i0, t0, D, rows, 1, D, BD, BT),
                                  _tile(gws, t0, j0, rows, HID, HID, 1, BT, BH), acc, PREC)
                if STEP:
                    acc += 2 * dn1 * _tile(w1c, i0, j0, D, HID, HID, 1, BD, BH)
                    if HAS_GS1:
                        acc += _tile(gs1c, i0, j0, D, HID, HID, 1, BD, BH)
                _put(g1b, acc, i0, j0, D, HID, HID, 1, BD, BH)
        for j0 in range(0, HID, BH):  # pass E: G₂ ← G₂ + ∂zᵀk (+ ∂ of this state's output)
            for i0 in range(0, D, BD):
                acc = _tile(g2b, j0, i0, HID, D, D, 1, BH, BD)
                for t0 in range(0, rows, BT):
                    acc = _mm(_tile(rs, j0, t0, HID, rows, 1, HID, BH, BT),
                              _tile(kb, t0, i0, rows, D, D, 1, BT, BD), acc, PREC)
                if STEP and HAS_GS2:
                    acc += _tile(gs2c, j0, i0, HID, D, D, 1, BH, BD)
                _put(g2b, acc, j0, i0, HID, D, D, 1, BH, BD)
        tl.debug_barrier()
        return tl.sum(glr)

    @triton.jit
    def _scan_bwd_kernel(gy_ptr, gs1_ptr, gs2_ptr, k_ptr, e_ptr, s1_ptr, s2_ptr, lr_ptr, gk_ptr, g1_ptr, g2_ptr,
                         glr_ptr, z_ptr, q_ptr, r_ptr, q2_ptr, gw_ptr, a_ptr, ds_ptr, T, D, HID, P, N,
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
        zs, qs, rs, q2s, gws = (z_ptr + b * P * HID, q_ptr + b * P * HID, r_ptr + b * P * HID, q2_ptr + b * P * HID,
                                gw_ptr + b * P * HID)
        as_, dss = a_ptr + b * P, ds_ptr + b * P
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


def scan_triton(k: Tensor, err: Tensor, w1: Tensor, w2: Tensor, lr: Tensor, period: int,
                activation: str) -> tuple[Tensor, Tensor, Tensor]:
    """``deepopt::cms_scan`` in one launch (``_scan_fwd_kernel``, one program per sequence)."""
    (B, T, d), hid, N = k.shape, w1.shape[1], k.shape[1] // period
    k, err, w1, w2 = k.contiguous(), err.contiguous(), w1.contiguous(), w2.contiguous()
    y = torch.empty_like(k)
    s1, s2 = w1.new_empty(B, N + 1, d, hid), w2.new_empty(B, N + 1, hid, d)
    rows = max(1, min(period, T))
    h, g = (k.new_empty(B, rows, hid, dtype=torch.float32) for _ in range(2))
    a = k.new_empty(B, rows, dtype=torch.float32)
    _scan_fwd_kernel[(B,)](k, err, w1, w2, lr, y, s1, s2, h, g, a, T, d, hid, period, N, ACT=ACT_CODES[activation],
                           PREC=dot_precision(k, w1), BT=BT, BD=BD, BH=BH, BLOCK=BLOCK)
    return y, s1, s2


def scan_backward_triton(gy: Tensor, gs1: Tensor | None, gs2: Tensor | None, k: Tensor, err: Tensor, s1: Tensor,
                         s2: Tensor, lr: Tensor, period: int, activation: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``deepopt::cms_scan_backward``: one launch (``_scan_bwd_kernel``) and the sums over the batch."""
    (B, T, d), hid, N = k.shape, s1.shape[-1], k.shape[1] // period
    gy, k, err = gy.to(k.dtype).contiguous(), k.contiguous(), err.contiguous()
    gk = torch.empty_like(k)
    g1, g2 = (k.new_empty(B, d, hid, dtype=torch.float32), k.new_empty(B, hid, d, dtype=torch.float32))
    glr = k.new_empty(B, dtype=torch.float32)
    rows = max(1, min(period, T))
    z, q, r, q2, gw = (k.new_empty(B, rows, hid, dtype=torch.float32) for _ in range(5))
    a, ds = (k.new_empty(B, rows, dtype=torch.float32) for _ in range(2))
    gs1c = s1 if gs1 is None else gs1.to(s1.dtype).contiguous()  # an unused pointer when absent
    gs2c = s2 if gs2 is None else gs2.to(s2.dtype).contiguous()
    _scan_bwd_kernel[(B,)](gy, gs1c, gs2c, k, err, s1.contiguous(), s2.contiguous(), lr, gk, g1, g2, glr, z, q, r,
                           q2, gw, a, ds, T, d, hid, period, N, HAS_GS1=gs1 is not None, HAS_GS2=gs2 is not None,
                           ACT=ACT_CODES[activation], PREC=dot_precision(k, s1), BT=BT, BD=BD, BH=BH, BLOCK=BLOCK)
    return gk, g1.sum(0).to(s1.dtype), g2.sum(0).to(s2.dtype), glr.sum().to(lr.dtype)
