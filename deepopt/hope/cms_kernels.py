"""A CMS level's whole chunk recurrence as one torch custom op, ``deepopt::cms_scan``, and its backward.

For one sequence, chunk c of ``P = period`` tokens (keys ``k``, constant error signals ``δ``) is read at the state
``(W₁, W₂)_c`` and, when full, moves it by Eq. 71 with the level's ``sgd`` rule (``model.cms_factors``)::

    y_t = W₁σ(W₂k_t)                                   for every token t of the chunk
    W₁ ← W₁ − lr·Σ_t a_t δ_t h_tᵀ,                     a_t = 1/(1 + ‖h_t‖²),  h_t = σ(z_t),  z_t = W₂k_t
    W₂ ← W₂ − lr·c·Σ_t (σ'(z_t) ⊙ W₁ᵀδ_t) k_tᵀ,       c = 1/((1 + ‖W₁‖²)·d),  lr = softplus(ρ)/P

A trailing partial chunk is read and makes no step.  The op returns the reads ``y`` (B, T, d) and the states
before every chunk and after the last full one, ``W₁``: (B, N+1, d, hid), ``W₂``: (B, N+1, hid, d) with
``N = T // P``: these are all that the backward pass keeps (``deepopt::cms_scan_backward``), which walks the
chunks in reverse and recomputes each from its start state (``chunk_vjp``: the hand-derived chain rule).
Gradients reach ``k``, the initial state and ``lr``; none flows into ``δ`` (constants of the pass).

Both ops run the pure-torch reference below.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from deepopt.hope.model import cms_factors
from deepopt.rules.deep import ACTIVATIONS

# σ''(z) given z and h = σ(z), for every activation of ACTIVATIONS (the backward of the W₂ step's σ'(z) factor)
SECOND_DERIVATIVES = {
    "tanh": lambda z, h: -2 * h * (1 - h * h),
    "relu": lambda z, h: torch.zeros_like(z),
    "gelu": lambda z, h: (2 - z * z) * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi),
    "silu": lambda z, h: torch.sigmoid(z) * (1 - torch.sigmoid(z)) * (2 + z * (1 - 2 * torch.sigmoid(z))),
    "identity": lambda z, h: torch.zeros_like(z),
}


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


# -- the pure-torch reference -------------------------------------------------------------------------------
def scan_reference(k: Tensor, err: Tensor, w1: Tensor, w2: Tensor, lr: Tensor, period: int,
                   activation: str) -> tuple[Tensor, Tensor, Tensor]:
    """The recurrence chunk by chunk in the states' dtype (module doc): ``(y, W₁ states, W₂ states)``."""
    B, dtype = k.shape[0], w1.dtype
    k, err = k.to(dtype), err.to(dtype)
    s1, s2 = [w1.expand(B, -1, -1)], [w2.expand(B, -1, -1)]
    reads = []
    for kc, ec in zip(k.split(period, dim=1), err.split(period, dim=1)):
        full = kc.shape[1] == period
        f = cms_factors(s1[-1], s2[-1], kc, ec if full else None, activation)
        reads.append(f["read"])
        if full:
            s1.append(s1[-1] - lr * f["g1"])
            s2.append(s2[-1] - lr * f["g2"])
    return torch.cat(reads, dim=1), torch.stack(s1, dim=1), torch.stack(s2, dim=1)


def chunk_vjp(w1: Tensor, w2: Tensor, k: Tensor, err: Tensor | None, lr: Tensor, gy: Tensor, g1: Tensor,
              g2: Tensor, activation: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backward of one chunk (batched over B) by hand: given ``gy = ∂L/∂y`` of its reads and ``g1, g2`` of the
    state after it, ``(∂L/∂k, ∂L/∂W₁, ∂L/∂W₂, ∂L/∂lr)`` at its start state; ``err=None``: a read-only chunk.

    With ``p = σ'(z)``, ``q = δW₁``, ``R = δG₁``, ``Q = kG₂ᵀ`` (row t: token t)::

        ∂h = gy W₁ − lr·a⊙R + 2h⊙(lr·a²·Σ_j h⊙R)          ∂(p⊙q) = −lr·c·Q
        ∂z = ∂h⊙p − lr·c·Q⊙q⊙σ''(z)                        ∂k = ∂z W₂ − lr·c·(p⊙q) G₂
        ∂W₁ = G₁ + gyᵀh − lr·c·δᵀ(Q⊙p) + 2W₁·lr·c²d·Σ Q⊙p⊙q    ∂W₂ = G₂ + ∂zᵀk
        ∂lr = −Σ_t a_t Σ_j h⊙R − c·Σ Q⊙p⊙q
    """
    f = cms_factors(w1, w2, k, err, activation)
    z, h = f["z"], f["h"]
    p = ACTIVATIONS[activation][1](z, h)
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
    dz = dh * p + dpq * f["q"] * SECOND_DERIVATIVES[activation](z, h)
    gk = dz @ w2 - (lr * c * pq) @ g2
    gw1 = gw1 + err.mT @ (dpq * p) + 2 * w1 * (lr * c * c * d * Qpq)
    glr = -(a * hR).sum() - (c * Qpq).sum()
    return gk, gw1, g2 + dz.mT @ k, glr


def scan_backward_reference(gy: Tensor, gs1: Tensor | None, gs2: Tensor | None, k: Tensor, err: Tensor,
                            s1: Tensor, s2: Tensor, lr: Tensor, period: int,
                            activation: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Reverse walk over the chunks, each recomputed from its saved start state: ``(∂k, ∂W₁, ∂W₂, ∂lr)``."""
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
                                       gy[:, rows], g1, g2, activation)
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
    y, s1, s2 = scan_reference(k, err, w1, w2, lr, period, activation)
    return y.to(k.dtype), s1, s2


@_cms_scan.register_fake
def _(k, err, w1, w2, lr, period, activation):
    (B, T, d), hid, n = k.shape, w1.shape[1], k.shape[1] // period + 1
    return k.new_empty(B, T, d), w1.new_empty(B, n, d, hid), w1.new_empty(B, n, hid, d)


@torch.library.custom_op("deepopt::cms_scan_backward", mutates_args=())
def _cms_scan_backward(gy: Tensor, gs1: Tensor | None, gs2: Tensor | None, k: Tensor, err: Tensor, s1: Tensor,
                       s2: Tensor, lr: Tensor, period: int, activation: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return scan_backward_reference(gy, gs1, gs2, k, err, s1, s2, lr, period, activation)


@_cms_scan_backward.register_fake
def _(gy, gs1, gs2, k, err, s1, s2, lr, period, activation):
    return torch.empty_like(k), s1.new_empty(s1.shape[2:]), s2.new_empty(s2.shape[2:]), torch.empty_like(lr)


def _setup_context(ctx, inputs, output) -> None:
    k, err, _, _, lr, period, activation = inputs
    _, s1, s2 = output
    ctx.save_for_backward(k, err, s1, s2, lr)
    ctx.period, ctx.activation = period, activation


def _backward(ctx, gy, gs1, gs2):
    k, err, s1, s2, lr = ctx.saved_tensors
    gy = torch.zeros_like(k) if gy is None else gy
    gk, g1, g2, glr = _cms_scan_backward(gy, gs1, gs2, k, err, s1, s2, lr, ctx.period, ctx.activation)
    return gk, None, g1, g2, glr, None, None


_cms_scan.register_autograd(_backward, setup_context=_setup_context)


def cms_scan(k: Tensor, err: Tensor, w1: Tensor, w2: Tensor, lr: Tensor, period: int,
             activation: str = "silu") -> tuple[Tensor, Tensor, Tensor]:
    """A CMS level's reads and states over a whole sequence (module doc), one ``deepopt::cms_scan`` op.

    ``k, err``: (B, T, d) keys and error signals (one dtype); ``w1`` (d, hid), ``w2`` (hid, d): the initial
    state; ``lr``: 0-d, ``softplus(ρ)/period``.  Returns ``y`` (B, T, d) in k's dtype and the states
    (B, T//period + 1, ·, ·) in w1's: index 0 is the initial state, the last one the final state.
    """
    _check(k, err, w1, w2, lr, period, activation)
    return torch.ops.deepopt.cms_scan(k, err.detach(), w1, w2, lr, period, activation)
