"""The chunk math of the self-modifying Titans memory and its whole-sequence scan as a torch custom op.

One chunk of C tokens (per batch b and head h; math in ``deepopt.hope.model``'s module doc), at the chunk's start
state ``W₁ (5, d, hid)``, ``W₂ (5, hid, d)`` of the memories ``M_k, M_v, M_η, M_α, M_mem``, with the inputs
``u_□`` (4, C, d) of the four that read (one per memory; a model with one shared input passes it four times):

    P_□ = σ(u_□ W₂ᵀ), R_□ = P_□ W₁ᵀ          (memories k, v, η, α read at their inputs)
    k = (u_k + R_k)/‖·‖,  v = u_v + R_v,  η = (η_max/C)·sigmoid((u_η + R_η)·w_η + b_η),
    log α = logsigmoid((u_α + R_α)·w_α + b_α)
    V_□ = M_□(v)/‖·‖,  z = k W₂ᵀ,  h = σ(z),  e = k + h W₁ᵀ − V,  g = σ'(z) ⊙ e W₁
    e₁ = e/(1 + ‖h‖²),  u₂ = g/(1 + ‖W₁‖²) (+ z with Delta GD)
    L = cumsum log α,  D_ts = e^{L_t − L_s} η_s (s ≤ t),  A = e^L
    z_q = A ⊙ q W₂ᵀ + κ (D ⊙ q kᵀ) u₂,  y = q + A ⊙ σ(z_q) W₁ᵀ + κ (D ⊙ σ(z_q) hᵀ) e₁      (memory M_mem)
    W₁ ← A_C W₁ + κ Σ_s D_Cs e₁_s h_sᵀ,   W₂ ← A_C W₂ + κ Σ_s D_Cs u₂_s k_sᵀ                 (κ = −lr of SGD)

``chunk_factors`` and ``chunk_mix`` compute it (``SelfModifyingTitans._parallel_chunk`` calls them too);
``chunk_vjp`` is its hand-derived reverse mode.  ``titans_scan`` (op ``deepopt::titans_scan``) runs every chunk of
a sequence in one op and returns the chunk-start states; its backward (op ``deepopt::titans_scan_backward``) walks
the chunks in reverse, recomputing each from its start state.  On CUDA (float32/bfloat16, SiLU, power-of-two sizes
>= 16) each op is one Triton launch (``_forward_kernel``, ``_backward_kernel``: one program per batch·head looping
over the chunks); elsewhere the torch loops ``_scan_reference``/``_scan_backward_reference`` run inside the ops,
``chunk_step``/``chunk_vjp`` eagerly or, for a model under ``compile_model``, as ``torch.compile``'d functions
(``deepopt.hope.compiled``: the ops' ``chunk_fns`` argument names them).  A layer calls ``scan``: in eager
training off the Triton path it runs the same torch loop under ``deepopt.hope.kept.KeptChunks``, which keeps each
chunk's intermediates for the backward pass instead of recomputing them (``HopeConfig.recompute_chunks``).  Design
and launch counts: ``docs/notes/titans-kernels.md``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from deepopt.hope.compiled import check_key, compiled
from deepopt.hope.fallback import kernel_or_reference
from deepopt.hope.kept import KeptChunks, keeps
from deepopt.rules.deep import ACTIVATIONS

try:  # Triton is optional: without it every device runs the torch reference
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None

N_MEMORIES = 5  # M_k, M_v, M_η, M_α, M_mem (deepopt.hope.model.TITANS_MEMORIES)
N_MEM = tl.constexpr(N_MEMORIES) if triton is not None else N_MEMORIES
use_triton = True  # False: CUDA tensors run the torch reference too (e.g. to compare, or if a kernel misbehaves)
# C·d·hid above which a chunk runs the torch reference (118 aten ops per chunk forward, 428 backward, per layer): one
# program per (batch, head) holds some twenty (C|d|hid)-wide tiles of the chunk.  Up to 64·64·64 (HOPE 125m, 340m) the
# kernels fit an H100/H200 block's 227 KiB of shared memory: at 125m the forward needs 152-176 KiB, the backward
# 224 KiB with its value tiles recomputed and exact products (``MAX_HELD_VALUES_WORK``, ``_precision``; 240-304 KiB
# without), spilling 60 KB a thread; base's backward spills 8-21 KB (benchmarks/triton_aot.py, 2026-12-07; docs/gpu.md)
MAX_CHUNK_WORK = 64 * 64 * 64

# σ''(z) given z and h = σ(z): the reverse mode of g = σ'(z) ⊙ eW₁ needs it
SECOND_DERIVATIVES = {
    "tanh": lambda z, h: -2 * h * (1 - h * h),
    "relu": lambda z, h: torch.zeros_like(z),
    "gelu": lambda z, h: torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi) * (2 - z * z),
    "silu": lambda z, h: _silu_derivatives(z)[1],
    "softsign": lambda z, h: -2 * torch.sign(z) * (1 - h.abs()) ** 3,   # σ' = (1 + |z|)⁻² = (1 − |h|)²
    "identity": lambda z, h: torch.zeros_like(z),
}


def _silu_derivatives(z: Tensor) -> tuple[Tensor, Tensor]:
    """SiLU's ``σ'(z) = s + z·s(1 − s)`` and ``σ''(z) = s(1 − s)·(2 + z(1 − 2s))`` from one ``s = sigmoid(z)``."""
    s = torch.sigmoid(z)
    st = s - s * s
    return torch.addcmul(s, z, st), (z - 2 * z * s + 2).mul_(st)


def derivatives(activation: str, z: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
    """``(σ'(z), σ''(z))`` given ``h = σ(z)`` (SiLU's from one sigmoid)."""
    if activation == "silu":
        return _silu_derivatives(z)
    return ACTIVATIONS[activation][1](z, h), SECOND_DERIVATIVES[activation](z, h)


def times_derivative(activation: str, x: Tensor, z: Tensor, h: Tensor) -> Tensor:
    """``x ⊙ σ'(z)`` given ``h = σ(z)``; for SiLU one fused pass (aten's ``silu_backward``) where autograd will not
    differentiate it (it has no derivative formula)."""
    if activation == "silu" and not (torch.is_grad_enabled() and (x.requires_grad or z.requires_grad)):
        return torch.ops.aten.silu_backward(x, z)
    return x * ACTIVATIONS[activation][1](z, h)


def memory_factors(w1: Tensor, w2: Tensor, keys: Tensor, values: Tensor, activation: str):
    """Per-token factors of ∇ℓ for ``ℓ = ½‖k + W₁σ(W₂k) − v‖²``: returns ``(e, z, h, g₂, W₁h)`` (module doc)."""
    z = keys @ w2.mT
    h = ACTIVATIONS[activation][0](z)
    read = h @ w1.mT
    err = keys + read - values
    return err, z, h, times_derivative(activation, err @ w1, z, h), read


def normalized_steps(err: Tensor, h: Tensor, g2: Tensor, w1: Tensor) -> tuple[Tensor, Tensor]:
    """Normalised-LMS factors ``e/(1 + ‖h‖²)`` (W₁ step) and ``g₂/(1 + ‖W₁‖²_F)`` (W₂ step).

    Each divides the gradient by a bound on its own curvature, so a step of size η < 2 cannot diverge
    whatever the scale the outer loop gives ``h`` or ``W₁`` (keys are unit-norm or scaled by the step).
    """
    n1 = (w1 * w1).sum((-2, -1), keepdim=True)
    return err / (1 + (h * h).sum(-1, keepdim=True)), g2 / (1 + n1)


def chunk_factors(w1: Tensor, w2: Tensor, u: Tensor, w_eta: Tensor, b_eta: Tensor, w_alpha: Tensor, b_alpha: Tensor,
                  *, eta_scale: float, activation: str, learns: bool = True,
                  reads: tuple[Tensor, Tensor] | None = None) -> dict[str, Tensor]:
    """Everything a chunk needs from its start state ``w1 (B, H, n, d, hid)``, ``w2`` and the inputs
    ``u (B, H, 4, C, d)`` of ``M_k, M_v, M_η, M_α``:
    the reads ``k, v, η, log α`` and, per memory, ``V, z, h, e, g = σ'(z) ⊙ eW₁``, ``read = hW₁ᵀ``, ``n_h = 1 + ‖h‖²``
    and ``n₁ = 1 + ‖W₁‖²`` (module doc).

    ``reads`` = the (static) states that read ``k, v, η, α`` when the memories are not self-modifying (then the
    value is ``v/‖v‖`` and ``w1, w2`` hold ``M_mem`` only); ``None``: the first four memories of ``w1, w2``.
    ``learns=False`` sets η = 0, log α = 0 (``eta_raw`` keeps the η read).  The dict holds the intermediates
    that ``chunk_vjp`` reuses.
    """
    act = ACTIVATIONS[activation][0]
    r1, r2 = (w1[:, :, :4], w2[:, :, :4]) if reads is None else reads
    Z = u @ r2.mT  # (B, H, 4, C, hid)
    P = act(Z)
    R = P @ r1.mT  # (B, H, 4, C, d): M_□(u_□) − u_□
    X = u + R  # M_□(u_□)
    kv0 = X[:, :, 0]
    k, v = F.normalize(kv0, dim=-1), X[:, :, 1]
    eta_logit = (X[:, :, 2] * w_eta[:, None]).sum(-1) + b_eta[:, None]  # (B, H, C)
    alpha_logit = (X[:, :, 3] * w_alpha[:, None]).sum(-1) + b_alpha[:, None]
    eta_raw = eta_scale * torch.sigmoid(eta_logit)
    eta, log_alpha = eta_raw, F.logsigmoid(alpha_logit)
    if not learns:
        eta, log_alpha = torch.zeros_like(eta), torch.zeros_like(log_alpha)
    f = {"Z": Z, "P": P, "X": X, "kv0": kv0, "k": k, "v": v, "eta_logit": eta_logit, "eta_raw": eta_raw,
         "eta": eta, "log_alpha": log_alpha}
    if reads is None:
        f["Zv"] = v[:, :, None] @ w2.mT  # (B, H, 5, C, hid)
        f["Pv"] = act(f["Zv"])
        f["Vraw"] = v[:, :, None] + f["Pv"] @ w1.mT
    else:
        f["Vraw"] = v[:, :, None]
    f["V"] = F.normalize(f["Vraw"], dim=-1)
    f["e"], f["z"], f["h"], f["g"], f["read"] = memory_factors(w1, w2, k[:, :, None], f["V"], activation)
    f["nh"] = 1 + (f["h"] * f["h"]).sum(-1, keepdim=True)  # (B, H, n, C, 1)
    f["n1"] = 1 + (w1 * w1).sum((-2, -1), keepdim=True)  # (B, H, n, 1, 1)
    return f


def gated_delta_solve(keys: Tensor, E: Tensor, b: Tensor, nu: Tensor) -> tuple[Tensor, Tensor]:
    """The UT transform of the gated delta rule ``S_t = α_t S_{t−1} + u_t κ_tᵀ``, ``u_t = b_t(ν_t − α_t S_{t−1} κ_t)``
    over a chunk: ``U = N (b ⊙ ν)`` with ``N = (I + diag(b) M)⁻¹``, ``M_ts = E_ts κ_t·κ_s`` for s < t
    (``E_ts = γ_t/γ_s``; ν carries the start state's ``−diag(γ) K S₀ᵀ``), by forward substitution against the
    right-hand sides (N is never formed).  ``keys (…, C, n)``, ``E (…, C, C)``, ``b (…, C)``, ``nu (…, C, m)``;
    returns ``(U, G)``, ``G = K Kᵀ`` (M is ``strict_gram(E, G)``)."""
    G = keys @ keys.mT
    X = b[..., :, None] * strict_gram(E, G)  # strictly lower: solve_triangular's unit diagonal stands for I
    return torch.linalg.solve_triangular(X, b[..., None] * nu, upper=False, unitriangular=True), G


def strict_gram(E: Tensor, G: Tensor) -> Tensor:
    """``M_ts = E_ts G_ts`` for s < t, else 0 (E is 0 above its diagonal; a broadcast ``masked_fill`` took ~30×
    as long as this product)."""
    return E.tril(-1) * G


def transposed_solve(b: Tensor, M: Tensor, r: Tensor) -> Tensor:
    """``Nᵀ r`` for ``gated_delta_solve``'s ``N = (I + diag(b) M)⁻¹``: the reverse mode's solve, as
    ``(rᵀ N)ᵀ`` (a solve from the right with the same unit lower triangle)."""
    X = b[..., :, None] * M
    return torch.linalg.solve_triangular(X, r.mT, upper=False, left=False, unitriangular=True).mT


def _per_memory(x: Tensor) -> Tensor:
    """(B, H, n, C, m) → (B, H, C, n·m): the memories' right-hand sides side by side, for one solve with W₂'s
    triangle (its key k is shared by the memories)."""
    return x.transpose(2, 3).flatten(3)


def _memories(x: Tensor, n: int) -> Tensor:
    """``_per_memory``'s inverse."""
    return x.unflatten(3, (n, -1)).transpose(2, 3)


def _solve_vjp(dw: Tensor, U: Tensor, M: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """The part of ``U = N (b ⊙ ν)``'s reverse mode that goes through ``N = (I + diag(b)M)⁻¹`` (M strictly lower),
    given ``dw = Nᵀ ∂U``: ``∂(diag(b)M) = −dw Uᵀ`` (strictly lower), so ``(∂b, ∂M)`` — no C×C×C product."""
    dX = -(dw @ U.mT).tril(-1)
    return (dX * M).sum(-1), b[..., :, None] * dX


def chunk_mix(w1: Tensor, w2: Tensor, f: dict[str, Tensor], q: Tensor, kappa: float, activation: str, *,
              sequential: bool, delta_gd: bool, drift: tuple[Tensor, Tensor] | None = None) -> dict[str, Tensor]:
    """The chunk's steps, output and state change from ``chunk_factors``' ``f`` at the start state ``w1, w2``.

    Per memory, W₁ follows the gated delta rule with key ``h``, value ``V − k`` and step ``b₁ = lr·η/n_h`` and W₂
    the one with key ``k``, value ``−g/n₁`` and step ``b₂ = lr·η`` (Delta GD's ``W₂kkᵀ``; without it W₂'s steps
    just add up).  ``sequential``: the state-linear part of each step (``W₁h``, ``W₂k``) is read at the token's own
    state, through ``gated_delta_solve`` (per-token η); otherwise every step is taken at the chunk's start state
    (the η ≤ η_max/C form).  Returns ``y`` (the output memory read at every token's state, linear-attention
    form, plus ``q @ drift`` terms of a drifting rule), ``g1, g2`` (the state change over the chunk divided by κ,
    what the inner rule is fed), the step vectors ``U1, U2`` and the decays ``A = e^L`` (B, H, C),
    ``E_ts = e^{L_t − L_s}`` (s ≤ t, else 0)."""
    act = ACTIVATIONS[activation][0]
    L = f["log_alpha"].cumsum(-1)  # (B, H, C)
    C = L.shape[-1]
    causal = torch.ones(C, C, dtype=torch.bool, device=L.device).tril()
    E = (L[..., :, None] - L[..., None, :]).masked_fill(~causal, -math.inf).exp()
    A = L.exp()
    k, h = f["k"], f["h"]
    omega = A[:, :, None, :, None] if sequential else 1.0  # the start state's weight in a token's own state
    nu1 = f["V"] - k[:, :, None] - omega * f["read"]
    nu2 = -f["g"] / f["n1"] - (omega * f["z"] if delta_gd else 0)
    b2 = -kappa * f["eta"]  # (B, H, C)
    b1 = b2[:, :, None] / f["nh"][..., 0]  # (B, H, n, C)
    o = {"A": A, "E": E, "b1": b1, "b2": b2, "nu1": nu1, "nu2": nu2}
    if sequential:
        U1, o["G1"] = gated_delta_solve(h, E[:, :, None], b1, nu1)
    else:
        U1 = b1[..., None] * nu1
    if sequential and delta_gd:
        U2, o["G2"] = gated_delta_solve(k, E, b2, _per_memory(nu2))
        U2 = _memories(U2, nu2.shape[2])
    else:
        U2 = b2[:, :, None, :, None] * nu2
    zq = A[..., None] * (q @ w2[:, :, -1].mT) + (E * (q @ k.mT)) @ U2[:, :, -1]
    if drift is not None:
        zq = zq + q @ drift[1].mT
    hq = act(zq)
    y = q + A[..., None] * (hq @ w1[:, :, -1].mT) + (E * (hq @ h[:, :, -1].mT)) @ U1[:, :, -1]
    if drift is not None:
        y = y + hq @ drift[0].mT
    last = E[..., -1, :, None].unsqueeze(2)  # (B, H, 1, C, 1): E_Cs
    o.update(y=y, zq=zq, hq=hq, U1=U1, U2=U2, g1=((last * U1).mT @ h) / kappa,
             g2=(_per_memory(last * U2).mT @ k).unflatten(2, (U2.shape[2], -1)) / kappa)  # U2: stored per memory
    return o


def chunk_step(w1: Tensor, w2: Tensor, u: Tensor, q: Tensor, params: tuple[Tensor, ...], *, eta_scale: float,
               activation: str, delta_gd: bool, learns: bool, kappa: float,
               sequential: bool) -> tuple[Tensor, Tensor, Tensor]:
    """One chunk of the SGD inner rule: ``(y, A_C W₁ + κ G₁, A_C W₂ + κ G₂)``; ``params = (w_η, b_η, w_α, b_α)``."""
    return chunk_forward(w1, w2, u, q, params, eta_scale=eta_scale, activation=activation, delta_gd=delta_gd,
                         learns=learns, kappa=kappa, sequential=sequential)[0]


def chunk_forward(w1: Tensor, w2: Tensor, u: Tensor, q: Tensor, params: tuple[Tensor, ...], *, eta_scale: float,
                  activation: str, delta_gd: bool, learns: bool, kappa: float, sequential: bool):
    """``chunk_step``'s outputs and the intermediates ``(f, o)`` of ``chunk_factors``/``chunk_mix`` it computed
    them from (what ``chunk_vjp`` takes as ``saved`` instead of recomputing them)."""
    f = chunk_factors(w1, w2, u, *params, eta_scale=eta_scale, activation=activation, learns=learns)
    o = chunk_mix(w1, w2, f, q, kappa, activation, sequential=sequential, delta_gd=delta_gd)
    a = o["A"][..., -1, None, None, None]
    return (o["y"], a * w1 + kappa * o["g1"], a * w2 + kappa * o["g2"]), (f, o)


# chunk_factors' activations and their pre-activations: what a kept chunk leaves out (one activation each to redo)
ACTIVATED = {"P": "Z", "Pv": "Zv", "h": "z"}


def chunk_vjp(w1: Tensor, w2: Tensor, u: Tensor, q: Tensor, params: tuple[Tensor, ...], dy: Tensor, dw1n: Tensor,
              dw2n: Tensor, *, eta_scale: float, activation: str, delta_gd: bool, learns: bool, kappa: float,
              sequential: bool, saved: tuple[dict[str, Tensor], dict[str, Tensor]] | None = None):
    """Reverse mode of ``chunk_step`` by hand: cotangents ``dy, dw1n, dw2n`` of its outputs →
    ``(dw1, dw2, du, dq, (dw_η, db_η, dw_α, db_α))`` (the last per batch: (B, H, d), (B, H)).  The steps undo
    ``chunk_factors``/``chunk_mix`` line by line, last first; ``saved``: their ``(f, o)`` from ``chunk_forward``
    at the same inputs (read, not changed; ``f`` may leave out the activations ``ACTIVATED`` names, recomputed from
    their pre-activations), else recomputed here."""
    act = ACTIVATIONS[activation][0]
    w_eta, _, w_alpha, _ = params
    if saved is None:
        saved = chunk_forward(w1, w2, u, q, params, eta_scale=eta_scale, activation=activation, delta_gd=delta_gd,
                              learns=learns, kappa=kappa, sequential=sequential)[1]
    f, o = saved
    f = {**f, **{a: act(f[z]) for a, z in ACTIVATED.items() if a not in f}}
    w1, w2 = w1.contiguous(), w2.contiguous()  # views of the scan's states: one copy, not one per product
    k, K, h = f["k"], f["k"][:, :, None], f["h"]
    A, E, U1, U2 = o["A"], o["E"], o["U1"], o["U2"]
    # commit: W' = A_C W + Δ,  Δ₁ = Σ_s E_Cs U1_s h_sᵀ,  Δ₂ = Σ_s E_Cs U2_s k_sᵀ
    a = A[..., -1, None, None, None]
    dw1, dw2 = a * dw1n, a * dw2n
    dA = torch.zeros_like(A)
    dA[..., -1] = (dw1n * w1).sum((2, 3, 4)) + (dw2n * w2).sum((2, 3, 4))
    last = E[..., -1, :, None].unsqueeze(2)  # (B, H, 1, C, 1)
    t1, t2 = U1 @ dw1n, U2 @ dw2n  # (B, H, 5, C, hid), (B, H, 5, C, d)
    dU1, dh, dU2 = last * (h @ dw1n.mT), last * t1, last * _memories(k @ dw2n.flatten(2, 3).mT, dw2n.shape[2])
    dk = (last * t2).sum(2)
    dE = torch.zeros_like(E)
    dE[..., -1, :] = (t1 * h).sum((2, 4)) + (t2 * K).sum((2, 4))
    # output: y = q + A ⊙ σ(z_q) W₁ᵀ + (E ⊙ σ(z_q) hᵀ) U1,  z_q = A ⊙ q W₂ᵀ + (E ⊙ q kᵀ) U2   (memory M_mem)
    w1m, w2m, zq, hq, Ac = w1[:, :, -1], w2[:, :, -1], o["zq"], o["hq"], A[..., None]
    dq = dy.clone()
    dA = dA + (dy * (hq @ w1m.mT)).sum(-1)
    dhq = Ac * (dy @ w1m)
    dw1[:, :, -1] += (Ac * dy).mT @ hq
    P2, Y2 = hq @ h[:, :, -1].mT, dy @ U1[:, :, -1].mT  # (B, H, C, C)
    dE = dE + Y2 * P2
    dhq = dhq + (Y2 * E) @ h[:, :, -1]
    dh[:, :, -1] += (Y2 * E).mT @ hq
    dU1[:, :, -1] += (E * P2).mT @ dy
    dzq = times_derivative(activation, dhq, zq, hq)
    dA = dA + (dzq * (q @ w2m.mT)).sum(-1)
    dq = dq + Ac * (dzq @ w2m)
    dw2[:, :, -1] += (Ac * dzq).mT @ q
    Sq, Y1 = q @ k.mT, dzq @ U2[:, :, -1].mT
    dE = dE + Y1 * Sq
    dq = dq + (Y1 * E) @ k
    dk = dk + (Y1 * E).mT @ q
    dU2[:, :, -1] += (E * Sq).mT @ dzq
    # steps: U = N (b ⊙ ν), N = (I + diag(b) M)⁻¹ (sequential) or I, M_ts = E_ts κ_t·κ_s (s < t)
    b1, b2, nu1, nu2 = o["b1"], o["b2"], o["nu1"], o["nu2"]
    M1 = strict_gram(E[:, :, None], o["G1"]) if sequential else None
    dr1 = transposed_solve(b1, M1, dU1) if sequential else dU1
    dnu1, db1 = b1[..., None] * dr1, (dr1 * nu1).sum(-1)
    if sequential:
        db, dM = _solve_vjp(dr1, U1, M1, b1)
        db1 = db1 + db
        dE = dE + (dM * o["G1"]).sum(2)
        dME = dM * E[:, :, None]
        dh = dh + (dME + dME.mT) @ h
    if sequential and delta_gd:  # W₂'s triangle (key k) is the memories', their columns side by side
        M2 = strict_gram(E, o["G2"])
        dr2_side = transposed_solve(b2, M2, _per_memory(dU2))
        dr2 = _memories(dr2_side, dU2.shape[2]).contiguous()  # the products below take it as it is stored
    else:
        dr2 = dU2
    dnu2, db2 = b2[:, :, None, :, None] * dr2, (dr2 * nu2).sum((2, 4))
    if sequential and delta_gd:
        db, dM = _solve_vjp(dr2_side, _per_memory(U2), M2, b2)
        db2 = db2 + db
        dE = dE + dM * o["G2"]
        dME = dM * E
        dk = dk + (dME + dME.mT) @ k
    # b₁ = lr·η/n_h, b₂ = lr·η (lr = −κ), n_h = 1 + ‖h‖²
    nh = f["nh"][..., 0]
    deta = -kappa * (db2 + (db1 / nh).sum(2))
    dh = dh - 2 * h * (db1 * b1 / nh)[..., None]
    # ν₁ = V − k − ω·hW₁ᵀ,  ν₂ = −g/n₁ − ω·z (Delta GD),  ω = A (sequential) or 1
    omega = A[:, :, None, :, None] if sequential else 1.0
    dV = dnu1
    dk = dk - dnu1.sum(2)
    dread = -omega * dnu1
    dh = dh + dread @ w1
    dw1 = dw1 + dread.mT @ h
    n1 = f["n1"]
    dg = -dnu2 / n1
    dw1 = dw1 + 2 * w1 * (dnu2 * f["g"]).sum((-2, -1), keepdim=True) / n1 ** 2
    dz = -omega * dnu2 if delta_gd else torch.zeros_like(dnu2)
    if sequential:
        dA = dA - (dnu1 * f["read"]).sum((2, 4)) - ((dnu2 * f["z"]).sum((2, 4)) if delta_gd else 0)
    # memory factors: z = k W₂ᵀ, h = σ(z), e = k + h W₁ᵀ − V, g = σ'(z) ⊙ e W₁
    z, e = f["z"], f["e"]
    s1, s2 = derivatives(activation, z, h)
    ew = e @ w1
    dew = dg * s1
    de = dew @ w1.mT
    dw1 = dw1 + e.mT @ dew
    dz = dz + dg * ew * s2
    dk = dk + de.sum(2)
    dh = dh + de @ w1
    dw1 = dw1 + de.mT @ h
    dV = dV - de
    dz = dz + dh * s1
    dk = dk + (dz @ w2).sum(2)
    dw2 = dw2 + dz.mT @ K
    # values: V = Vraw/‖Vraw‖, Vraw = v + σ(v W₂ᵀ) W₁ᵀ
    V = f["V"]
    dVraw = (dV - V * (dV * V).sum(-1, keepdim=True)) / f["Vraw"].norm(dim=-1, keepdim=True).clamp_min(1e-12)
    dv = dVraw.sum(2)
    dw1 = dw1 + dVraw.mT @ f["Pv"]
    dZv = times_derivative(activation, dVraw @ w1, f["Zv"], f["Pv"])
    dw2 = dw2 + dZv.mT @ f["v"][:, :, None]
    dv = dv + (dZv @ w2).sum(2)
    # decays: E_ts = e^{L_t − L_s} (s ≤ t), A_t = e^{L_t}, L = cumsum log α
    EE = dE * E
    dL = EE.sum(-1) - EE.sum(-2) + dA * A
    dlog_alpha = dL.flip(-1).cumsum(-1).flip(-1)
    # η = s·sigmoid(logit_η), log α = logsigmoid(logit_α), logits = M_□(u_□)·w_□ + b_□
    X = f["X"]
    if learns:
        d_eta_logit = deta * f["eta_raw"] * (1 - torch.sigmoid(f["eta_logit"]))
        d_alpha_logit = dlog_alpha * (1 - f["log_alpha"].exp())
    else:
        d_eta_logit = d_alpha_logit = torch.zeros_like(deta)
    dR = torch.stack([torch.zeros_like(dv), dv, d_eta_logit[..., None] * w_eta[:, None],
                      d_alpha_logit[..., None] * w_alpha[:, None]], dim=2)
    dparams = ((d_eta_logit[..., None] * X[:, :, 2]).sum(2), d_eta_logit.sum(2),
               (d_alpha_logit[..., None] * X[:, :, 3]).sum(2), d_alpha_logit.sum(2))
    # k = kv₀/‖kv₀‖, kv₀ = u_k + R_k, v = u_v + R_v
    dkv0 = (dk - k * (dk * k).sum(-1, keepdim=True)) / f["kv0"].norm(dim=-1, keepdim=True).clamp_min(1e-12)
    dR[:, :, 0] = dkv0
    # reads: R_□ = σ(u_□ W₂ᵀ) W₁ᵀ for the first four memories
    dw1[:, :, :4] += dR.mT @ f["P"]
    dZ = times_derivative(activation, dR @ w1[:, :, :4], f["Z"], f["P"])
    dw2[:, :, :4] += dZ.mT @ u
    du = dR + dZ @ w2[:, :, :4]
    return dw1, dw2, du, dq, dparams


def _chunks(x: Tensor, chunk_size: int) -> tuple[Tensor, ...]:
    return x.split(chunk_size, dim=-2)


def _scan_reference(u: Tensor, q: Tensor, w1: Tensor, w2: Tensor, params: tuple[Tensor, ...], chunk_size: int,
                    consts: dict, chunk_fns: int = 0, kept: list | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The torch loop of ``titans_scan``: y and the states at every chunk boundary (B, H, n + 1, 5, ...);
    ``chunk_fns``: which ``chunk_step`` runs (0: the eager one, else ``deepopt.hope.compiled``'s); ``kept``: a
    list that receives each chunk's ``(f, o)`` (``chunk_forward``, eager; what ``chunk_vjp`` reads)."""
    step = compiled(chunk_fns, chunk_step)
    B = q.shape[0]
    s1 = [w1[None].expand(B, *w1.shape).contiguous()]
    s2 = [w2[None].expand(B, *w2.shape).contiguous()]
    ys = []
    for uc, qc in zip(_chunks(u, chunk_size), _chunks(q, chunk_size)):
        if kept is None:
            y, a, b = step(s1[-1], s2[-1], uc, qc, params, **consts)
        else:
            (y, a, b), (f, o) = chunk_forward(s1[-1], s2[-1], uc, qc, params, **consts)
            kept.append(({key: t for key, t in f.items() if key not in ACTIVATED},  # what chunk_vjp needs
                         {key: t for key, t in o.items() if key not in ("y", "g1", "g2")}))
        ys.append(y)
        s1.append(a)
        s2.append(b)
    return torch.cat(ys, dim=2), torch.stack(s1, dim=2), torch.stack(s2, dim=2)


def _scan_backward_reference(dy: Tensor, ds1: Tensor | None, ds2: Tensor | None, u: Tensor, q: Tensor, s1: Tensor,
                             s2: Tensor, params: tuple[Tensor, ...], chunk_size: int, consts: dict, chunk_fns: int = 0,
                             kept: list | None = None):
    """Reverse walk over the chunks: each chunk recomputed from its saved start state (or its ``kept`` ``(f, o)``
    read back) and ``chunk_vjp``'d (the ``chunk_fns`` one, as ``_scan_reference``)."""
    vjp = compiled(chunk_fns, chunk_vjp)
    n = s1.shape[2] - 1
    # contiguous from the first chunk on, as every later cotangent is (a compiled chunk_vjp keeps one graph)
    dw1 = ds1[:, :, n].contiguous() if ds1 is not None else torch.zeros_like(s1[:, :, n])
    dw2 = ds2[:, :, n].contiguous() if ds2 is not None else torch.zeros_like(s2[:, :, n])
    du, dq, dps = [], [], [torch.zeros(()) for _ in params]
    for c, (uc, qc, dyc) in reversed(list(enumerate(zip(*(_chunks(x, chunk_size) for x in (u, q, dy)))))):
        saved = {} if kept is None else {"saved": kept[c]}
        dw1, dw2, duc, dqc, dpc = vjp(s1[:, :, c], s2[:, :, c], uc, qc, params, dyc, dw1, dw2, **consts, **saved)
        if ds1 is not None:
            dw1 = dw1 + ds1[:, :, c]
        if ds2 is not None:
            dw2 = dw2 + ds2[:, :, c]
        du.append(duc)
        dq.append(dqc)
        dps = [a + b for a, b in zip(dps, dpc)]
    return (torch.cat(du[::-1], dim=-2), torch.cat(dq[::-1], dim=2), dw1.sum(0), dw2.sum(0),
            *(p.sum(0).to(x.dtype) for p, x in zip(dps, params)))


@torch.library.custom_op("deepopt::titans_scan", mutates_args=())
def titans_scan(u: Tensor, q: Tensor, w1: Tensor, w2: Tensor, w_eta: Tensor, b_eta: Tensor, w_alpha: Tensor,
                b_alpha: Tensor, chunk_size: int, eta_max: float, activation: str, delta_gd: bool, learns: bool,
                kappa: float, sequential: bool, chunk_fns: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Self-modifying Titans (SGD inner rule) over a whole sequence: the inputs ``u (B, H, 4, T, d)`` of
    ``M_k, M_v, M_η, M_α`` and the queries ``q (B, H, T, d)``, initial states
    ``w1 (H, 5, d, hid)``, ``w2 (H, 5, hid, d)``; returns ``y (B, H, T, d)`` and the states at the chunk
    boundaries ``(B, H, n + 1, 5, d, hid)``, ``(B, H, n + 1, 5, hid, d)`` (index c: the start of chunk c; the
    last: the final state), n = ⌈T/C⌉ chunks, the last one possibly partial.  ``sequential``: per-token steps
    η_t ≤ η_max with the state-linear terms read at each token's own state (``chunk_mix``); otherwise
    η_t ≤ η_max/C, every step at the chunk's start state.  Triton where ``_triton_applies``, the torch chunk loop
    elsewhere (``chunk_fns``: eager, 0, or a ``deepopt.hope.compiled.compile_options`` key)."""
    _check_inputs(u, q)
    params = (w_eta, b_eta, w_alpha, b_alpha)
    consts = _consts(chunk_size, eta_max, activation, delta_gd, learns, kappa, sequential)
    check_key(chunk_fns)
    def reference():
        return _scan_reference(u, q, w1, w2, params, chunk_size, consts, chunk_fns)
    if _triton_applies(u, q, w1, w2, chunk_size, activation):
        return kernel_or_reference(_kernel_key("titans_scan", u, w1, chunk_size, consts),
                                   lambda: _triton_forward(u, q, w1, w2, params, chunk_size, consts), reference)
    return reference()


def _check_inputs(u: Tensor, q: Tensor) -> None:
    if u.dim() != 5 or u.shape[2] != 4 or (*u.shape[:2], *u.shape[3:]) != q.shape:
        raise ValueError(f"u must have shape (B, H, 4, T, d) for q of shape (B, H, T, d) = {tuple(q.shape)}, "
                         f"got {tuple(u.shape)}")


def _consts(chunk_size: int, eta_max: float, activation: str, delta_gd: bool, learns: bool, kappa: float,
            sequential: bool) -> dict:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return {"eta_scale": eta_max if sequential else eta_max / chunk_size, "activation": activation,
            "delta_gd": delta_gd, "learns": learns, "kappa": kappa, "sequential": sequential}


@titans_scan.register_fake
def _(u, q, w1, w2, w_eta, b_eta, w_alpha, b_alpha, chunk_size, eta_max, activation, delta_gd, learns, kappa,
      sequential, chunk_fns=0):
    B, n = q.shape[0], -(-q.shape[2] // chunk_size)
    return (q.new_empty(q.shape), w1.new_empty(B, w1.shape[0], n + 1, *w1.shape[1:]),
            w2.new_empty(B, w2.shape[0], n + 1, *w2.shape[1:]))


@torch.library.custom_op("deepopt::titans_scan_backward", mutates_args=())
def titans_scan_backward(dy: Tensor, ds1: Tensor | None, ds2: Tensor | None, u: Tensor, q: Tensor, s1: Tensor,
                         s2: Tensor, w_eta: Tensor, b_eta: Tensor, w_alpha: Tensor, b_alpha: Tensor, chunk_size: int,
                         eta_max: float, activation: str, delta_gd: bool, learns: bool, kappa: float,
                         sequential: bool, chunk_fns: int = 0
                         ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of ``titans_scan`` with respect to ``u, q, w1, w2, w_η, b_η, w_α, b_α`` from those of its outputs
    (``ds1, ds2``: of the boundary states, ``None`` = zero), one reverse pass over the chunks."""
    params = (w_eta, b_eta, w_alpha, b_alpha)
    consts = _consts(chunk_size, eta_max, activation, delta_gd, learns, kappa, sequential)
    check_key(chunk_fns)
    def reference():
        return _scan_backward_reference(dy, ds1, ds2, u, q, s1, s2, params, chunk_size, consts, chunk_fns)
    if _triton_applies(u, q, s1, s2, chunk_size, activation):
        return kernel_or_reference(_kernel_key("titans_scan_backward", u, s1, chunk_size, consts),
                                   lambda: _triton_backward(dy, ds1, ds2, u, q, s1, s2, params, chunk_size, consts),
                                   reference)
    return reference()


@titans_scan_backward.register_fake
def _(dy, ds1, ds2, u, q, s1, s2, w_eta, b_eta, w_alpha, b_alpha, *_):
    return (u.new_empty(u.shape), q.new_empty(q.shape), s1.new_empty(s1.shape[1], *s1.shape[3:]),
            s2.new_empty(s2.shape[1], *s2.shape[3:]),
            *(p.new_empty(p.shape) for p in (w_eta, b_eta, w_alpha, b_alpha)))


_SCALARS = ("chunk_size", "eta_max", "activation", "delta_gd", "learns", "kappa", "sequential", "chunk_fns")


def _setup_context(ctx, inputs, output) -> None:
    u, q, _, _, w_eta, b_eta, w_alpha, b_alpha, *scalars = inputs
    ctx.save_for_backward(u, q, output[1], output[2], w_eta, b_eta, w_alpha, b_alpha)
    ctx.scalars = scalars
    ctx.set_materialize_grads(False)  # unused boundary states (all but the last, mostly) get no zero cotangents


def _backward(ctx, dy, ds1, ds2):
    u, q, s1, s2, *params = ctx.saved_tensors
    dy = torch.zeros_like(q) if dy is None else dy
    du, dq, dw1, dw2, *dparams = titans_scan_backward(dy, ds1, ds2, u, q, s1, s2, *params, *ctx.scalars)
    return du, dq, dw1, dw2, *dparams, *(None for _ in _SCALARS)


titans_scan.register_autograd(_backward, setup_context=_setup_context)


def _kept_reverse(dy, ds1, ds2, tensors, s1, s2, static, kept):
    """``KeptChunks``' backward loop for ``scan``: the op's reverse walk over the kept chunks."""
    u, q, _, _, *params = tensors
    dy = torch.zeros_like(q) if dy is None else dy
    return _scan_backward_reference(dy, ds1, ds2, u, q, s1, s2, tuple(params), *static, kept=kept)


def _kept_loop(u, q, w1, w2, w_eta, b_eta, w_alpha, b_alpha, chunk_size, consts, kept):
    return _scan_reference(u, q, w1, w2, (w_eta, b_eta, w_alpha, b_alpha), chunk_size, consts, kept=kept)


def scan(u: Tensor, q: Tensor, w1: Tensor, w2: Tensor, w_eta: Tensor, b_eta: Tensor, w_alpha: Tensor,
         b_alpha: Tensor, chunk_size: int, eta_max: float, activation: str, delta_gd: bool, learns: bool,
         kappa: float, sequential: bool, chunk_fns: int = 0, keep: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """``titans_scan`` as a layer runs it.  ``keep``: where the op would run its torch chunk loop eagerly for a
    backward pass (``kept.keeps``, no Triton, eager chunk functions), the loop runs under ``kept.KeptChunks``
    instead: the same outputs and gradients, each chunk's ``chunk_forward`` intermediates kept for the backward
    pass rather than recomputed there (``HopeConfig.recompute_chunks``)."""
    tensors = (u, q, w1, w2, w_eta, b_eta, w_alpha, b_alpha)
    if keep and chunk_fns == 0 and keeps(*tensors) and not _triton_applies(u, q, w1, w2, chunk_size, activation):
        _check_inputs(u, q)
        consts = _consts(chunk_size, eta_max, activation, delta_gd, learns, kappa, sequential)
        return KeptChunks.apply(_kept_loop, _kept_reverse, len(tensors), *tensors, chunk_size, consts)
    return titans_scan(*tensors, chunk_size, eta_max, activation, delta_gd, learns, kappa, sequential, chunk_fns)


def _pow2(n: int) -> bool:
    return n >= 16 and n & (n - 1) == 0


def _triton_applies(u: Tensor, q: Tensor, w1: Tensor, w2: Tensor, chunk_size: int, activation: str) -> bool:
    """The Triton kernels take CUDA tensors of one dtype (float32 or bfloat16), SiLU, and chunk size, head size and
    memory width that are powers of two >= 16 (``tl.dot``'s tiles) with ``C·d·hid <= MAX_CHUNK_WORK``; anything else
    runs the torch reference."""
    sizes = (chunk_size, u.shape[-1], w1.shape[-1])
    return (triton is not None and use_triton and u.is_cuda and activation == "silu"
            and len({t.dtype for t in (u, q, w1, w2)}) == 1 and u.dtype in (torch.float32, torch.bfloat16)
            and all(_pow2(n) for n in sizes) and math.prod(sizes) <= MAX_CHUNK_WORK)


def _kernel_key(op: str, u: Tensor, w1: Tensor, chunk_size: int, consts: dict) -> tuple:
    """What decides a scan kernel's compiled program on a device (``fallback.kernel_or_reference``'s key)."""
    return (f"deepopt::{op}", u.device, u.dtype, w1.dtype, chunk_size, u.shape[-1], w1.shape[-1], consts["delta_gd"],
            consts["learns"], consts["sequential"], _precision(u, w1, chunk_size, op == "titans_scan_backward"))


# C·d·hid above which the backward kernel takes exact fp32 products for float32 inputs even where torch allows TF32:
# with TF32 (mma.sync) operands the base preset's backward (64·64·32) needs 256 KiB of shared memory a block, over the
# 227 of an H100/H200 (so Triton would refuse it and the op fall back to its torch reference), with exact (FMA)
# products 192 KiB (sm_90, benchmarks/triton_aot.py, 2026-12-07).  The forward fits with TF32 (136 KiB, and spills
# 3.0 KB a thread against 8.3 KB with exact products); bfloat16 inputs keep TF32 products (224 KiB; exact ones 192 KiB
# but twice the spills, 22.6 against 10.8 KB).
MAX_TF32_CHUNK_WORK = 64 * 32 * 32
# C·d·hid above which the backward kernel recomputes each memory's value tiles (Zv = vW₂ᵀ, σ(Zv)) where it needs them
# instead of holding them from the factors: a tile less shared memory (HOPE 125m/340m, 64·64·64, exact products:
# 240 → 224 KiB, within an H100 block's 227), at the price of more spills, which is why chunks up to base hold them
# (base fp32 21.2 → 24.3 KB of spill stores a thread; sm_90, benchmarks/triton_aot.py, 2026-12-06)
MAX_HELD_VALUES_WORK = 64 * 64 * 32


def _precision(u: Tensor, w1: Tensor, chunk_size: int, backward: bool) -> str:
    """A Titans kernel's ``tl.dot`` input precision: torch's choice (``dot_precision``), but exact fp32 products in
    the backward kernel where its TF32 build does not fit an H100's block: float32 chunks above
    ``MAX_TF32_CHUNK_WORK`` and every chunk above ``MAX_HELD_VALUES_WORK`` (bfloat16 at 125m: 288 KiB with TF32
    products, 224 exact).  (The backward then differentiates the chunk math at states the forward computed with TF32
    products: the gradients differ from exact ones by TF32's rounding, as with TF32 throughout.)"""
    prec = dot_precision(u, w1)
    work = chunk_size * u.shape[-1] * w1.shape[-1]
    if backward and prec == "tf32" and (work > MAX_HELD_VALUES_WORK
                                        or u.dtype == torch.float32 and work > MAX_TF32_CHUNK_WORK):
        return "ieee"
    return prec


def _num_warps(*sizes: int) -> int:
    """Warps per program: 8 (a chunk keeps some twenty (C|d|hid)-sized fp32 tiles live; more threads, fewer
    registers each).  Compiled for sm_90 at the tiny preset (16-wide tiles, fp32) the backward spills 16/16 B with
    8 warps against 516/560 B with 4 and 740/980 B with 16 (benchmarks/triton_aot.py; docs/notes/titans-kernels.md)."""
    return 8


def dot_precision(*tensors: Tensor) -> str:
    """``tl.dot``'s input precision: TF32 tensor cores when any input is bfloat16 or when torch allows TF32 for
    float32 matmuls (``torch.set_float32_matmul_precision("high")``), exact fp32 products otherwise (torch's
    default, ``"highest"``).  Shared by the Titans and CMS kernels."""
    if any(t.dtype != torch.float32 for t in tensors) or torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


# Registers a thread of the Titans kernels may use (launch option ``maxnreg``, PTX ``.maxnreg``).  Left to itself ptxas
# gives their fp32 builds 128 at the small preset and 32 from base up and spills the rest (sm_90, benchmarks/
# triton_aot.py, 2026-12-06): base backward 131.7/194.8 KB of spill stores/loads a thread, with 255: 21.2/25.7 KB;
# forward 45.5/75.4 → 8.3/10.3 KB; small forward 5.6/7.5 → 3.2/3.8 KB.  (The CMS kernels keep ptxas's choice: with
# 255 their fp32 builds on sm_90 start spilling, 20 B forward and 60 B backward, where they spilled none.)
MAX_REGISTERS = 255


def _launch_consts(chunk_size: int, d: int, hid: int, consts: dict, prec: str) -> dict:
    """The keyword arguments both kernels take: sizes, switches, the products' precision (``_precision``),
    ``num_warps`` and ``maxnreg``."""
    return {"C": chunk_size, "D": d, "HID": hid,
            "DELTA_GD": consts["delta_gd"], "LEARNS": consts["learns"], "SEQ": consts["sequential"],
            "PREC": prec, "num_warps": _num_warps(chunk_size, d, hid), "maxnreg": MAX_REGISTERS}


def _scratch(u: Tensor, programs: int, chunk_size: int, consts: dict) -> Tensor:
    """The triangular solves' scratch: 2·C·C fp32 per program (a 1-element stand-in without sequential steps)."""
    return u.new_empty(programs * 2 * chunk_size ** 2 if consts["sequential"] else 1, dtype=torch.float32)


def _triton_forward(u: Tensor, q: Tensor, w1: Tensor, w2: Tensor, params: tuple[Tensor, ...], chunk_size: int,
                    consts: dict) -> tuple[Tensor, Tensor, Tensor]:
    """``titans_scan`` in one Triton launch (plus the copies of θ₀ into the boundary-state buffers)."""
    B, H, T, d = q.shape
    hid, n = w1.shape[-1], -(-T // chunk_size)
    s1 = w1.new_empty(B, H, n + 1, N_MEMORIES, d, hid)
    s2 = w2.new_empty(B, H, n + 1, N_MEMORIES, hid, d)
    s1[:, :, 0] = w1
    s2[:, :, 0] = w2
    y = q.new_empty(q.shape)
    scr = _scratch(u, B * H, chunk_size, consts)
    _forward_kernel[(B * H,)](u.contiguous(), q.contiguous(), s1, s2, y, *(p.contiguous() for p in params), scr, T,
                              n, consts["eta_scale"], -consts["kappa"], H=H,
                              **_launch_consts(chunk_size, d, hid, consts, _precision(u, w1, chunk_size, False)))
    return y, s1, s2


def _triton_backward(dy: Tensor, ds1: Tensor | None, ds2: Tensor | None, u: Tensor, q: Tensor, s1: Tensor,
                     s2: Tensor, params: tuple[Tensor, ...], chunk_size: int, consts: dict):
    """``titans_scan_backward`` in one Triton launch (plus the cotangent buffers' set-up and the sums over the
    batch of the per-(batch, head) parameter gradients)."""
    B, H, T, d = q.shape
    n, hid = s1.shape[2] - 1, s1.shape[-1]
    a1 = ds1[:, :, n].float().contiguous() if ds1 is not None else s1.new_zeros(B, H, N_MEMORIES, d, hid,
                                                                                dtype=torch.float32)
    a2 = ds2[:, :, n].float().contiguous() if ds2 is not None else s2.new_zeros(B, H, N_MEMORIES, hid, d,
                                                                                dtype=torch.float32)
    du, dq = u.new_empty(u.shape), q.new_empty(q.shape)
    dp = u.new_empty(B, H, 2 * d + 2, dtype=torch.float32)
    has_ds = ds1 is not None and ds2 is not None
    if not has_ds and (ds1 is not None or ds2 is not None):
        ds1, ds2 = (x if x is not None else torch.zeros_like(s) for x, s in ((ds1, s1), (ds2, s2)))
        has_ds = True
    _backward_kernel[(B * H,)](u.contiguous(), q.contiguous(), s1, s2, dy.contiguous(),
                               ds1.contiguous() if has_ds else s1, ds2.contiguous() if has_ds else s2, a1, a2, du, dq,
                               dp, *(p.contiguous() for p in params), _scratch(u, B * H, chunk_size, consts), T,
                               n, consts["eta_scale"], -consts["kappa"], H=H, HAS_DS=has_ds,
                               RECOMPUTE_VALUES=chunk_size * d * hid > MAX_HELD_VALUES_WORK,
                               **_launch_consts(chunk_size, d, hid, consts, _precision(u, s1, chunk_size, True)))
    dp = dp.sum(0).split([d, 1, d, 1], dim=-1)  # dw_η, db_η, dw_α, db_α per head (copies: outputs may not alias)
    return (du, dq, a1.sum(0).to(s1.dtype), a2.sum(0).to(s2.dtype),
            *(g.reshape(p.shape).to(p.dtype, copy=True) for g, p in zip(dp, params)))


if triton is not None:

    @triton.jit
    def _silu(z):
        return z * tl.sigmoid(z)

    @triton.jit
    def _silu_grad(z):
        s = tl.sigmoid(z)
        return s * (1 + z * (1 - s))

    @triton.jit
    def _silu_grad2(z):
        s = tl.sigmoid(z)
        return s * (1 - s) * (2 + z * (1 - 2 * s))

    @triton.jit
    def _dot(a, b, PREC: tl.constexpr):
        return tl.dot(a, b, input_precision=PREC)

    @triton.jit
    def _normalize(x):
        return x / tl.maximum(tl.sqrt(tl.sum(x * x, 1)), 1e-12)[:, None]

    @triton.jit
    def _state(s1, s2, m, D: tl.constexpr, HID: tl.constexpr):
        """Memory m of the states at ``s1, s2``: ``W₁ (D, HID)`` and ``W₂ᵀ (D, HID)``, fp32."""
        rd, rh = tl.arange(0, D), tl.arange(0, HID)
        w1 = tl.load(s1 + m * D * HID + rd[:, None] * HID + rh[None, :]).to(tl.float32)
        w2t = tl.load(s2 + m * HID * D + rh[None, :] * D + rd[:, None]).to(tl.float32)
        return w1, w2t

    @triton.jit
    def _read(u, w1, w2t, PREC: tl.constexpr):
        """``M(u) − u = σ(u W₂ᵀ) W₁ᵀ`` (C, D)."""
        return _dot(_silu(_dot(u, w2t, PREC)), tl.trans(w1), PREC)

    @triton.jit
    def _input(u_ptr, uo, m, T, valid, D: tl.constexpr):
        """Memory m's input ``u_m`` (C, D) of the chunk whose memory-0 offsets are ``uo`` (u: (B, H, 4, T, D))."""
        return tl.load(u_ptr + uo + m * T * D, mask=valid[:, None], other=0.0).to(tl.float32)

    @triton.jit
    def _gates(we_ptr, be_ptr, wa_ptr, ba_ptr, h, rd, D: tl.constexpr):
        """Head h's η and α read-outs ``w_η, b_η, w_α, b_α`` in fp32 (each program loads them once)."""
        w_eta, w_alpha = tl.load(we_ptr + h * D + rd).to(tl.float32), tl.load(wa_ptr + h * D + rd).to(tl.float32)
        return w_eta, tl.load(be_ptr + h).to(tl.float32), w_alpha, tl.load(ba_ptr + h).to(tl.float32)

    @triton.jit
    def _chunk_reads(u_ptr, uo, T, s1, s2, w_eta, b_eta, w_alpha, b_alpha, valid, eta_scale, D: tl.constexpr,
                     HID: tl.constexpr, LEARNS: tl.constexpr, PREC: tl.constexpr):
        """``chunk_factors``' first part: k, v, η, log α (zero past the sequence's end) and ``M_η(u_η)``,
        ``M_α(u_α)``."""
        w1, w2t = _state(s1, s2, 0, D, HID)
        u = _input(u_ptr, uo, 0, T, valid, D)
        k = _normalize(u + _read(u, w1, w2t, PREC))
        w1, w2t = _state(s1, s2, 1, D, HID)
        u = _input(u_ptr, uo, 1, T, valid, D)
        v = u + _read(u, w1, w2t, PREC)
        w1, w2t = _state(s1, s2, 2, D, HID)
        u = _input(u_ptr, uo, 2, T, valid, D)
        xe = u + _read(u, w1, w2t, PREC)
        w1, w2t = _state(s1, s2, 3, D, HID)
        u = _input(u_ptr, uo, 3, T, valid, D)
        xa = u + _read(u, w1, w2t, PREC)
        eta_logit = tl.sum(xe * w_eta[None, :], 1) + b_eta
        alpha_logit = tl.sum(xa * w_alpha[None, :], 1) + b_alpha
        eta = eta_scale * tl.sigmoid(eta_logit)
        log_alpha = tl.minimum(alpha_logit, 0.0) - tl.log(1 + tl.exp(-tl.abs(alpha_logit)))
        if LEARNS:
            eta, log_alpha = tl.where(valid, eta, 0.0), tl.where(valid, log_alpha, 0.0)
        else:
            eta, log_alpha = eta * 0.0, log_alpha * 0.0
        return k, v, eta, log_alpha, xe, xa

    @triton.jit
    def _decays(log_alpha, C: tl.constexpr):
        """``A = e^L``, ``E_ts = e^{L_t − L_s}`` (s ≤ t, else 0), E's last row and ``A_C``."""
        rc = tl.arange(0, C)
        L = tl.cumsum(log_alpha, 0)
        E = tl.where(rc[:, None] >= rc[None, :], tl.exp(L[:, None] - L[None, :]), 0.0)
        A = tl.exp(L)
        last = tl.sum(tl.where(rc[:, None] == C - 1, E, 0.0), 0)
        return A, E, last, tl.sum(tl.where(rc == C - 1, A, 0.0), 0)

    @triton.jit
    def _unit_lower_inverse(X, BLK: tl.constexpr, PREC: tl.constexpr):
        """``(I + X)⁻¹`` of a strictly lower (BLK, BLK) tile by blockwise doubling: with ``N`` the inverse's block
        diagonal at blocks of 2^l, ``N ← N − N X_l N`` (X_l: X's entries between the two halves of each 2^{l+1}
        block) is that at blocks of 2^{l+1}; every product is of true inverses (no growing powers, unlike a
        Neumann series)."""
        rb = tl.arange(0, BLK)
        N = (rb[:, None] == rb[None, :]).to(tl.float32)
        for lvl in tl.static_range(BLK.bit_length() - 1):
            cross = ((rb[:, None] >> (lvl + 1)) == (rb[None, :] >> (lvl + 1))) & \
                ((rb[:, None] >> lvl) != (rb[None, :] >> lvl))
            N = N - _dot(_dot(N, tl.where(cross, X, 0.0), PREC), N, PREC)
        return N

    @triton.jit
    def _kernel_solve(kk, E, b, scr, C: tl.constexpr, PREC: tl.constexpr):
        """``gated_delta_solve``'s triangle, inverted: ``(N, M)``, ``N = (I + X)⁻¹``, ``X = diag(b)M``, by blocked
        forward substitution over 16-row blocks (``N_b = N_bb(I_b − X_{b,<b} N_{<b})``, ``N_bb`` by
        ``_unit_lower_inverse``), the blocks exchanged through the program's scratch ``scr`` (2·C·C fp32): about
        C³/2 + 2·16·C² multiply-adds instead of the 2·log₂C·C³ of doubling on the whole tile."""
        BLK: tl.constexpr = 16
        rc, rb = tl.arange(0, C), tl.arange(0, BLK)
        M = tl.where(rc[:, None] > rc[None, :], E * _dot(kk, tl.trans(kk), PREC), 0.0)
        xs, ns = scr, scr + C * C
        tl.store(xs + rc[:, None] * C + rc[None, :], b[:, None] * M)
        tl.debug_barrier()
        for blk in tl.static_range(C // BLK):
            rows = blk * BLK + rb
            Xbb = tl.load(xs + rows[:, None] * C + rows[None, :])
            R = (rows[:, None] == rc[None, :]).to(tl.float32)
            if blk > 0:  # minus X_{b,<b} N_{<b}: the rows of N stored so far
                Xrow = tl.load(xs + rows[:, None] * C + rc[None, :], mask=rc[None, :] < blk * BLK, other=0.0)
                Nprev = tl.load(ns + rc[:, None] * C + rc[None, :], mask=rc[:, None] < blk * BLK, other=0.0)
                R = R - _dot(Xrow, Nprev, PREC)
            tl.store(ns + rows[:, None] * C + rc[None, :], _dot(_unit_lower_inverse(Xbb, BLK, PREC), R, PREC))
            tl.debug_barrier()
        N = tl.load(ns + rc[:, None] * C + rc[None, :])
        tl.debug_barrier()  # every thread has read the scratch before the next solve overwrites it
        return N, M

    @triton.jit
    def _kernel_solve_dx(dr, U, C: tl.constexpr, PREC: tl.constexpr):
        """``∂(diag(b)M) = −dr Uᵀ`` (strictly lower) given ``dr = Nᵀ ∂U`` (``_solve_vjp``)."""
        rc = tl.arange(0, C)
        return tl.where(rc[:, None] > rc[None, :], -_dot(dr, tl.trans(U), PREC), 0.0)

    @triton.jit
    def _memory_factors(k, v, w1, w2t, PREC: tl.constexpr):
        """``chunk_factors``' second part for one memory: V, z, h, e, g, read = hW₁ᵀ (and the value's Zv, Pv, Vraw)."""
        Zv = _dot(v, w2t, PREC)
        Pv = _silu(Zv)
        Vraw = v + _dot(Pv, tl.trans(w1), PREC)
        V = _normalize(Vraw)
        z = _dot(k, w2t, PREC)
        h = _silu(z)
        read = _dot(h, tl.trans(w1), PREC)
        e = k + read - V
        g = _silu_grad(z) * _dot(e, w1, PREC)
        return V, z, h, e, g, read, Zv, Pv, Vraw

    @triton.jit
    def _steps(k, V, z, h, g, read, w1, E, b2, N2, om, scr, C: tl.constexpr, SEQ: tl.constexpr,
               DELTA_GD: tl.constexpr, PREC: tl.constexpr):
        """``chunk_mix``'s steps for one memory: ``b₁, ν₁, ν₂, n_h, n₁`` and ``U1, U2`` (and N1, M1 with SEQ)."""
        nh = 1 + tl.sum(h * h, 1)
        n1 = 1 + tl.sum(tl.sum(w1 * w1, 1), 0)
        b1 = b2 / nh
        nu1 = V - k - om[:, None] * read
        nu2 = -g / n1
        if DELTA_GD:
            nu2 = nu2 - om[:, None] * z
        if SEQ:
            N1, M1 = _kernel_solve(h, E, b1, scr, C, PREC)
            U1 = _dot(N1, b1[:, None] * nu1, PREC)
        else:
            N1 = E
            M1 = E
            U1 = b1[:, None] * nu1
        if SEQ and DELTA_GD:
            U2 = _dot(N2, b2[:, None] * nu2, PREC)
        else:
            U2 = b2[:, None] * nu2
        return nh, n1, b1, nu1, nu2, N1, M1, U1, U2

    @triton.jit
    def _output(q, k, A, E, w1, w2t, h, U1, U2, PREC: tl.constexpr):
        """The output memory read at every token's state (linear-attention form): ``z_q, σ(z_q), y``."""
        zq = A[:, None] * _dot(q, w2t, PREC) + _dot(E * _dot(q, tl.trans(k), PREC), U2, PREC)
        hq = _silu(zq)
        y = q + A[:, None] * _dot(hq, tl.trans(w1), PREC) + _dot(E * _dot(hq, tl.trans(h), PREC), U1, PREC)
        return zq, hq, y

    @triton.jit
    def _chunk_start(u_ptr, uo, T, s1, s2, w_eta, b_eta, w_alpha, b_alpha, valid, eta_scale, lr, scr, D: tl.constexpr,
                     HID: tl.constexpr, C: tl.constexpr, LEARNS: tl.constexpr, SEQ: tl.constexpr,
                     DELTA_GD: tl.constexpr, PREC: tl.constexpr):
        """Everything of a chunk shared by its memories: reads, decays, ``b₂ = lr·η``, ω and W₂'s N (SEQ, Delta GD)."""
        k, v, eta, log_alpha, xe, xa = _chunk_reads(u_ptr, uo, T, s1, s2, w_eta, b_eta, w_alpha, b_alpha, valid,
                                                    eta_scale, D, HID, LEARNS, PREC)
        A, E, last, a_c = _decays(log_alpha, C)
        b2 = lr * eta
        if SEQ:
            om = A
        else:
            om = A * 0.0 + 1.0
        if SEQ and DELTA_GD:
            N2, M2 = _kernel_solve(k, E, b2, scr, C, PREC)
        else:
            N2 = E
            M2 = E
        return k, v, eta, log_alpha, xe, xa, A, E, last, a_c, b2, om, N2, M2

    @triton.jit
    def _forward_kernel(u_ptr, q_ptr, s1_ptr, s2_ptr, y_ptr, we_ptr, be_ptr, wa_ptr, ba_ptr, scr_ptr, T, n_chunks,
                        eta_scale, lr, H: tl.constexpr, C: tl.constexpr, D: tl.constexpr, HID: tl.constexpr,
                        DELTA_GD: tl.constexpr, LEARNS: tl.constexpr, SEQ: tl.constexpr, PREC: tl.constexpr):
        """One program per (batch, head): the chunks in order, states read from and written to the boundary
        buffers (chunk c reads entry c and writes entry c + 1); the memories in a loop (not unrolled).  ``scr``:
        2·C·C fp32 per program for the triangular solves (SEQ)."""
        bh = tl.program_id(0)
        scr = scr_ptr + bh.to(tl.int64) * (2 * C * C)
        h = bh % H
        rc, rd, rh = tl.arange(0, C), tl.arange(0, D), tl.arange(0, HID)
        w_eta, b_eta, w_alpha, b_alpha = _gates(we_ptr, be_ptr, wa_ptr, ba_ptr, h, rd, D)
        size = N_MEM * D * HID
        for c in range(n_chunks):
            t = c * C + rc
            valid = t < T
            io = (bh.to(tl.int64) * T + t)[:, None] * D + rd[None, :]
            uo = (bh.to(tl.int64) * 4 * T + t)[:, None] * D + rd[None, :]
            start = (bh.to(tl.int64) * (n_chunks + 1) + c) * size
            s1, s2 = s1_ptr + start, s2_ptr + start
            # (distinct names for unused outputs: Triton types a name once per scope, and shapes differ)
            k, v, eta_f, la_f, xe_f, xa_f, A, E, last, a_c, b2, om, N2, M2_f = _chunk_start(
                u_ptr, uo, T, s1, s2, w_eta, b_eta, w_alpha, b_alpha, valid, eta_scale, lr, scr, D, HID, C, LEARNS, SEQ,
                DELTA_GD, PREC)
            for m in range(N_MEM):
                w1, w2t = _state(s1, s2, m, D, HID)
                V, z, hm, e_f, g, read, zv_f, pv_f, vraw_f = _memory_factors(k, v, w1, w2t, PREC)
                nh_f, n1_f, b1_f, nu1_f, nu2_f, N1_f, M1_f, U1, U2 = _steps(k, V, z, hm, g, read, w1, E, b2, N2, om,
                                                                            scr, C, SEQ, DELTA_GD, PREC)
                if m == N_MEM - 1:
                    q = tl.load(q_ptr + io, mask=valid[:, None], other=0.0).to(tl.float32)
                    zq_f, hq_f, y = _output(q, k, A, E, w1, w2t, hm, U1, U2, PREC)
                    tl.store(y_ptr + io, y.to(y_ptr.dtype.element_ty), mask=valid[:, None])
                d1 = _dot(tl.trans(U1 * last[:, None]), hm, PREC)  # (D, HID)
                d2t = _dot(tl.trans(k), U2 * last[:, None], PREC)  # Δ₂ᵀ (D, HID)
                o1 = s1 + size + m * D * HID + rd[:, None] * HID + rh[None, :]
                o2 = s2 + size + m * HID * D + rh[None, :] * D + rd[:, None]
                tl.store(o1, (a_c * w1 + d1).to(s1_ptr.dtype.element_ty))
                tl.store(o2, (a_c * w2t + d2t).to(s2_ptr.dtype.element_ty))
            tl.debug_barrier()  # the next chunk reads the states this one wrote

    @triton.jit
    def _backward_kernel(u_ptr, q_ptr, s1_ptr, s2_ptr, dy_ptr, ds1_ptr, ds2_ptr, a1_ptr, a2_ptr, du_ptr, dq_ptr,
                         dp_ptr, we_ptr, be_ptr, wa_ptr, ba_ptr, scr_ptr, T, n_chunks, eta_scale, lr,
                         H: tl.constexpr, C: tl.constexpr, D: tl.constexpr, HID: tl.constexpr,
                         DELTA_GD: tl.constexpr, LEARNS: tl.constexpr, SEQ: tl.constexpr, HAS_DS: tl.constexpr,
                         PREC: tl.constexpr, RECOMPUTE_VALUES: tl.constexpr):
        """One program per (batch, head): the chunks in reverse, each recomputed from its saved start state and
        differentiated as ``chunk_vjp`` does.  ``a1, a2`` (fp32, (5, D, HID) and (5, HID, D) per program) hold the
        cotangent of the state at the current chunk boundary: read as the next state's, overwritten with the start
        state's.  Pass 1 recomputes the reads, decays and W₂'s N, pass 2 runs each memory's commit, output (M_mem),
        steps, factor and value terms, pass 3 W₂'s N, the decays, η, α, k and the reads.  ``RECOMPUTE_VALUES``: the
        value block recomputes ``Zv = vW₂ᵀ`` and ``σ(Zv)`` instead of holding them from the factors (a tile less
        shared memory, more spills: above ``MAX_HELD_VALUES_WORK``)."""
        bh = tl.program_id(0)
        h = bh % H
        rc, rd, rh = tl.arange(0, C), tl.arange(0, D), tl.arange(0, HID)
        size = N_MEM * D * HID
        scr = scr_ptr + bh.to(tl.int64) * (2 * C * C)
        a1, a2 = a1_ptr + bh.to(tl.int64) * size, a2_ptr + bh.to(tl.int64) * size
        off1 = rd[:, None] * HID + rh[None, :]  # (D, HID) in a (D, HID) matrix
        off2 = rh[None, :] * D + rd[:, None]  # (D, HID) view of the transpose of a (HID, D) matrix
        # dw_η, db_η, dw_α, db_α summed over the chunks in the program's slot of dp (not held in registers)
        dp = dp_ptr + bh * (2 * D + 2)
        zero = tl.zeros([D], dtype=tl.float32)
        tl.store(dp + rd, zero)
        tl.store(dp + D, tl.sum(zero, 0))
        tl.store(dp + D + 1 + rd, zero)
        tl.store(dp + 2 * D + 1, tl.sum(zero, 0))
        for i in range(n_chunks):
            c = n_chunks - 1 - i
            t = c * C + rc
            valid = t < T
            io = (bh.to(tl.int64) * T + t)[:, None] * D + rd[None, :]
            uo = (bh.to(tl.int64) * 4 * T + t)[:, None] * D + rd[None, :]
            w_eta, b_eta, w_alpha, b_alpha = _gates(we_ptr, be_ptr, wa_ptr, ba_ptr, h, rd, D)  # per chunk, not held
            start = (bh.to(tl.int64) * (n_chunks + 1) + c) * size
            s1, s2 = s1_ptr + start, s2_ptr + start
            k, v, eta_f, la_f, xe_f, xa_f, A, E, last, a_c, b2, om, N2, M2_f = _chunk_start(
                u_ptr, uo, T, s1, s2, w_eta, b_eta, w_alpha, b_alpha, valid, eta_scale, lr, scr, D, HID, C, LEARNS, SEQ,
                DELTA_GD, PREC)
            dk, dv = tl.zeros([C, D], dtype=tl.float32), tl.zeros([C, D], dtype=tl.float32)
            dE, dX2 = tl.zeros([C, C], dtype=tl.float32), tl.zeros([C, C], dtype=tl.float32)
            dA, dlast, db2 = tl.zeros([C], dtype=tl.float32), tl.zeros([C], dtype=tl.float32), \
                tl.zeros([C], dtype=tl.float32)
            da_c = tl.sum(dA, 0)
            for m in range(N_MEM):
                w1, w2t = _state(s1, s2, m, D, HID)
                V, z, hm, e, g, read, Zv, Pv, Vraw = _memory_factors(k, v, w1, w2t, PREC)
                v_norm = tl.maximum(tl.sqrt(tl.sum(Vraw * Vraw, 1)), 1e-12)
                nh, n1, b1, nu1, nu2, N1, M1, U1, U2 = _steps(k, V, z, hm, g, read, w1, E, b2, N2, om, scr, C, SEQ,
                                                              DELTA_GD, PREC)
                # commit: W' = A_C W + Δ,  Δ₁ = Σ_s E_Cs U1_s h_sᵀ,  Δ₂ = Σ_s E_Cs U2_s k_sᵀ
                dn1, dn2t = tl.load(a1 + m * D * HID + off1), tl.load(a2 + m * HID * D + off2)
                da_c += tl.sum(tl.sum(dn1 * w1, 1), 0) + tl.sum(tl.sum(dn2t * w2t, 1), 0)
                dw1, dw2t = a_c * dn1, a_c * dn2t
                t1 = _dot(U1, dn1, PREC)  # (C, HID)
                dU1 = last[:, None] * _dot(hm, tl.trans(dn1), PREC)
                dh = last[:, None] * t1
                t2 = _dot(U2, tl.trans(dn2t), PREC)  # (C, D)
                dU2 = last[:, None] * _dot(k, dn2t, PREC)
                dk += last[:, None] * t2
                dlast += tl.sum(t1 * hm, 1) + tl.sum(t2 * k, 1)
                if m == N_MEM - 1:  # the output y (chunk_vjp's "output" block)
                    q = tl.load(q_ptr + io, mask=valid[:, None], other=0.0).to(tl.float32)
                    dy = tl.load(dy_ptr + io, mask=valid[:, None], other=0.0).to(tl.float32)
                    dq = dy
                    # W₁, W₂ᵀ reloaded and h recomputed per block (here and below): held from the factors to the
                    # values, they and their dot-operand copies spilled (docs/notes/titans-kernels.md)
                    w1o, w2to = _state(s1, s2, m, D, HID)
                    hmo = _silu(_dot(k, w2to, PREC))
                    zq, hq, y_b = _output(q, k, A, E, w1o, w2to, hmo, U1, U2, PREC)
                    dA += tl.sum(dy * _dot(hq, tl.trans(w1o), PREC), 1)
                    dhq = A[:, None] * _dot(dy, w1o, PREC)
                    dw1 += _dot(tl.trans(A[:, None] * dy), hq, PREC)
                    P2, Y2 = _dot(hq, tl.trans(hmo), PREC), _dot(dy, tl.trans(U1), PREC)
                    dE += Y2 * P2
                    dhq += _dot(Y2 * E, hmo, PREC)
                    dh += _dot(tl.trans(Y2 * E), hq, PREC)
                    dU1 += _dot(tl.trans(E * P2), dy, PREC)
                    dzq = dhq * _silu_grad(zq)
                    dA += tl.sum(dzq * _dot(q, w2to, PREC), 1)
                    dq += A[:, None] * _dot(dzq, tl.trans(w2to), PREC)
                    dw2t += _dot(tl.trans(q), A[:, None] * dzq, PREC)
                    Sq, Y1 = _dot(q, tl.trans(k), PREC), _dot(dzq, tl.trans(U2), PREC)
                    dE += Y1 * Sq
                    dq += _dot(Y1 * E, k, PREC)
                    tl.store(dq_ptr + io, dq.to(dq_ptr.dtype.element_ty), mask=valid[:, None])
                    dk += _dot(tl.trans(Y1 * E), q, PREC)
                    dU2 += _dot(tl.trans(E * Sq), dzq, PREC)
                # steps: U = N (b ⊙ ν), N = (I + diag(b)M)⁻¹ (SEQ) or I
                if SEQ:
                    N1 = tl.load(scr + C * C + rc[:, None] * C + rc[None, :])  # N1 as _kernel_solve left it
                    dr1 = _dot(tl.trans(N1), dU1, PREC)
                    dX1 = _kernel_solve_dx(dr1, U1, C, PREC)
                    db1 = tl.sum(dr1 * nu1, 1) + tl.sum(dX1 * M1, 1)
                    dM1 = b1[:, None] * dX1
                    dE += dM1 * _dot(hm, tl.trans(hm), PREC)
                    dME = dM1 * E
                    dh += _dot(dME + tl.trans(dME), hm, PREC)
                else:
                    dr1 = dU1
                    db1 = tl.sum(dr1 * nu1, 1)
                dnu1 = b1[:, None] * dr1
                if SEQ and DELTA_GD:
                    dr2 = _dot(tl.trans(N2), dU2, PREC)
                    dX2 += _kernel_solve_dx(dr2, U2, C, PREC)
                else:
                    dr2 = dU2
                dnu2 = b2[:, None] * dr2
                db2 += tl.sum(dr2 * nu2, 1)
                # b₁ = b₂/n_h,  n_h = 1 + ‖h‖²
                db2 += db1 / nh
                dh -= 2 * hm * (db1 * b1 / nh)[:, None]
                # ν₁ = V − k − ω·hW₁ᵀ,  ν₂ = −g/n₁ − ω·z (Delta GD)
                w1r, w2tr = _state(s1, s2, m, D, HID)
                hmr = _silu(_dot(k, w2tr, PREC))
                dV = dnu1
                dk -= dnu1
                dread = -om[:, None] * dnu1
                dh += _dot(dread, w1r, PREC)
                dw1 += _dot(tl.trans(dread), hmr, PREC)
                dg = -dnu2 / n1
                dw1 += 2 * w1r * (tl.sum(tl.sum(dnu2 * g, 1), 0) / (n1 * n1))
                dz = tl.zeros([C, HID], dtype=tl.float32)
                if DELTA_GD:
                    dz -= om[:, None] * dnu2
                if SEQ:
                    dA -= tl.sum(dnu1 * read, 1)
                    if DELTA_GD:
                        dA -= tl.sum(dnu2 * z, 1)
                # factors: z = k W₂ᵀ, h = σ(z), e = k + h W₁ᵀ − V, g = σ'(z) ⊙ e W₁
                w1r, w2tr = _state(s1, s2, m, D, HID)
                s1g = _silu_grad(z)
                dew = dg * s1g
                de = _dot(dew, tl.trans(w1r), PREC)
                dw1 += _dot(tl.trans(e), dew, PREC)
                dz += dg * _dot(e, w1, PREC) * _silu_grad2(z)  # (w1: the compiler reuses g's product eW₁)
                dk += de
                dh += _dot(de, w1r, PREC)
                dw1 += _dot(tl.trans(de), hmr, PREC)
                dV -= de
                dz += dh * s1g
                dk += _dot(dz, tl.trans(w2tr), PREC)
                dw2t += _dot(tl.trans(k), dz, PREC)
                # values: V = Vraw/‖Vraw‖, Vraw = v + σ(v W₂ᵀ) W₁ᵀ
                w1r, w2tr = _state(s1, s2, m, D, HID)
                if RECOMPUTE_VALUES:  # the same dot of the same operands: the tiles the factors made, bit for bit
                    Zv = _dot(v, w2tr, PREC)
                    Pv = _silu(Zv)
                dVraw = (dV - V * tl.sum(dV * V, 1)[:, None]) / v_norm[:, None]
                dv += dVraw
                dw1 += _dot(tl.trans(dVraw), Pv, PREC)
                dZv = _dot(dVraw, w1r, PREC) * _silu_grad(Zv)
                dw2t += _dot(tl.trans(v), dZv, PREC)
                dv += _dot(dZv, tl.trans(w2tr), PREC)
                if HAS_DS:  # the cotangent of this boundary state as an output of the op
                    dw1 += tl.load(ds1_ptr + start + m * D * HID + off1).to(tl.float32)
                    dw2t += tl.load(ds2_ptr + start + m * HID * D + off2).to(tl.float32)
                tl.debug_barrier()  # every thread has read this memory's slot (dn1, dn2t) before it is overwritten
                tl.store(a1 + m * D * HID + off1, dw1)
                tl.store(a2 + m * HID * D + off2, dw2t)
            # k, η, log α, M_η(u_η), M_α(u_α) reloaded and recomputed here rather than held through pass 2
            w_eta, b_eta, w_alpha, b_alpha = _gates(we_ptr, be_ptr, wa_ptr, ba_ptr, h, rd, D)
            k_r, v_r, eta, log_alpha, xe, xa = _chunk_reads(u_ptr, uo, T, s1, s2, w_eta, b_eta, w_alpha, b_alpha, valid,
                                                             eta_scale, D, HID, LEARNS, PREC)
            # W₂'s N (shared by the memories: key k; M₂ as _kernel_solve forms it)
            if SEQ and DELTA_GD:
                G2 = _dot(k_r, tl.trans(k_r), PREC)
                db2 += tl.sum(dX2 * tl.where(rc[:, None] > rc[None, :], E * G2, 0.0), 1)
                dM2 = b2[:, None] * dX2
                dE += dM2 * G2
                dME = dM2 * E
                dk += _dot(dME + tl.trans(dME), k_r, PREC)
            # decays: E_ts = e^{L_t − L_s}, A_t = e^{L_t}, L = cumsum log α;  b₂ = lr·η
            dE += tl.where(rc[:, None] == C - 1, dlast[None, :], 0.0)
            dA += tl.where(rc == C - 1, da_c, 0.0)
            deta = lr * db2
            EE = dE * E
            dL = tl.sum(EE, 1) - tl.sum(EE, 0) + dA * A
            dlog_alpha = tl.sum(dL, 0) - tl.cumsum(dL, 0) + dL  # Σ_{t ≥ r} dL_t
            if LEARNS:
                d_eta_logit = tl.where(valid, deta * eta * (1 - eta / tl.maximum(eta_scale, 1e-30)), 0.0)
                d_alpha_logit = tl.where(valid, dlog_alpha * (1 - tl.exp(log_alpha)), 0.0)
            else:
                d_eta_logit, d_alpha_logit = tl.zeros([C], dtype=tl.float32), tl.zeros([C], dtype=tl.float32)
            tl.debug_barrier()  # the previous chunk's (or the zeros') stores to dp before its loads
            dwe = tl.load(dp + rd) + tl.sum(d_eta_logit[:, None] * xe, 0)
            dbe = tl.load(dp + D) + tl.sum(d_eta_logit, 0)
            dwa = tl.load(dp + D + 1 + rd) + tl.sum(d_alpha_logit[:, None] * xa, 0)
            dba = tl.load(dp + 2 * D + 1) + tl.sum(d_alpha_logit, 0)
            tl.debug_barrier()  # every thread's loads before the stores
            tl.store(dp + rd, dwe)
            tl.store(dp + D, dbe)
            tl.store(dp + D + 1 + rd, dwa)
            tl.store(dp + 2 * D + 1, dba)
            # k = kv₀/‖kv₀‖ (‖kv₀‖ recomputed from k's reads), v = M_v(u_v), logits = M_□(u_□)·w_□ + b_□
            w1, w2t = _state(s1, s2, 0, D, HID)
            u = _input(u_ptr, uo, 0, T, valid, D)
            kv0 = u + _read(u, w1, w2t, PREC)
            dkv0 = (dk - k_r * tl.sum(dk * k_r, 1)[:, None]) / tl.maximum(tl.sqrt(tl.sum(kv0 * kv0, 1)),
                                                                          1e-12)[:, None]
            de_w = d_eta_logit[:, None] * w_eta[None, :]
            da_w = d_alpha_logit[:, None] * w_alpha[None, :]
            tl.debug_barrier()  # pass 2's stores to a1, a2 before pass 3 adds to them
            # reads: R_□ = σ(u_□ W₂ᵀ) W₁ᵀ for the first four memories; ∂u_□ = ∂R_□ + ∂Z_□ W₂
            for m in range(N_MEM - 1):
                w1, w2t = _state(s1, s2, m, D, HID)
                u = _input(u_ptr, uo, m, T, valid, D)
                dR = tl.where(m == 0, dkv0, tl.where(m == 1, dv, tl.where(m == 2, de_w, da_w)))
                Z = _dot(u, w2t, PREC)
                dZ = _dot(dR, w1, PREC) * _silu_grad(Z)
                p1, p2 = a1 + m * D * HID + off1, a2 + m * HID * D + off2
                acc1 = tl.load(p1) + _dot(tl.trans(dR), _silu(Z), PREC)
                acc2 = tl.load(p2) + _dot(tl.trans(u), dZ, PREC)
                tl.debug_barrier()  # loads of the slot before its stores, whatever threads hold which elements
                tl.store(p1, acc1)
                tl.store(p2, acc2)
                du = dR + _dot(dZ, tl.trans(w2t), PREC)
                tl.store(du_ptr + uo + m * T * D, du.to(du_ptr.dtype.element_ty), mask=valid[:, None])
            tl.debug_barrier()  # the previous chunk reads a1, a2
