"""HOPE (self-modifying Titans + Continuum Memory System) and a Transformer++ baseline, nanoGPT-style.

Every memory has the form ``M(x) = x + W₁σ(W₂x)`` (W₁: d×h, W₂: h×d) and is trained in context on
``ℓ(M; k, v) = ½‖M(k) − v‖²``.  For one token the gradient factors into rank-1 pieces::

    z = W₂k,  h = σ(z),  e = M(k) − v,  g₂ = σ'(z) ⊙ W₁ᵀe
    ∇_{W₁}ℓ = e hᵀ            ∇_{W₂}ℓ = g₂ kᵀ            (Delta GD adds W₂kkᵀ = z kᵀ to the latter)

**Self-modifying Titans** (Nested Learning Eq. 76–93), per head, inputs ``u_{□,t}`` = short causal conv (width 4)
of projections of ``x_t``, one per reading memory □ ∈ {k, v, η, α} (``HopeConfig.titans_inputs="per_memory"``, as
Titans gives k and v their own projections; ``"shared"``: one ``u_t`` for all four), query ``q_t`` =
ℓ2-normalised conv projection.  Five memories ``M_k, M_v, M_η, M_α, M_mem`` produce ``k_t = M_k(u_{k,t})/‖·‖``,
``v_t = M_v(u_{v,t})`` (Eq. 76–81), ``η_t = η_cap·sigmoid(w_η·M_η(u_{η,t}) + b_η)``,
``α_t = sigmoid(w_α·M_α(u_{α,t}) + b_α)`` (Eq. 82–83), and each memory □ is trained on its self-generated value
``v̂_□ = M_□(v_t)/‖·‖`` (Eq. 84; ℓ2-normalised like q and k: unnormalised, the self-referential target grows with
the memory and the inner regression runs away).  With per-memory inputs θ₀ starts every memory near the identity
(W₁ small): at initialisation k, v, η, α are a gated DeltaNet's projections, and the memories' own maps grow in
training.  With one shared input, near-identity memories give ``k ≈ v ≈ u/‖u‖``, ``e ≈ 0`` and nothing is
written, so that form needs M_k and M_v far from the identity — and those random maps stop HOPE from binding keys
to values on MQAR (docs/notes/hope-recall.md).  Each memory's step
(Eq. 85–93, ``M ← M(α_t I − η_t k kᵀ) − η_t ∇ℓ``, Delta GD's ``kkᵀ`` term on W₂), in normalised-LMS form (k is
unit-norm but h and W₁ are not; without it the in-context regression diverges once the outer loop grows them)::

    W₁ ← α_t W₁ − b₁ (α_t W₁ h + k − v̂) hᵀ,                 b₁ = lr·η_t/(1 + ‖h‖²)
    W₂ ← α_t W₂ − b₂ (α_t W₂ k + g₂/(1 + ‖W₁‖²)) kᵀ,         b₂ = lr·η_t    (without Delta GD: no W₂k term)

Both are gated delta rules ``S ← α S(I − b κκᵀ) + b ν κᵀ`` (key κ = h resp. k, b‖κ‖² ≤ lr·η_t), each token's map
a contraction for lr·η_t ≤ 2.  Chunk-parallel training (paper Sec. 8.2): in a chunk starting at state ``W_c``
the reads of ``k, v, η, α``, the values v̂ and everything nonlinear in the state (h = σ(W₂k), σ', g₂) are taken at
``W_c``.  ``eta_form="per_token"`` (default): η_cap = η_max and the state-linear terms ``α_t W h``, ``α_t W k``
are read at the token's own state inside the chunk — the gated delta rule's UT transform
(``titans_kernels.gated_delta_solve``): ``U = (I + diag(b)M)⁻¹ diag(b)(ν − diag(A) K W_cᵀ)``,
``M_ts = (A_t/A_s) κ_t·κ_s`` (s < t) — so a write's strength does not depend on C and no sum of a chunk's steps
needs a bound.  ``eta_form="chunk_capped"`` (the former form): every term at ``W_c`` and η_cap = η_max/C, which
keeps ``I − Σ_t η_t k_t k_tᵀ`` a contraction however a chunk's keys align and ties a write's strength to 1/C.
With ``A_t = Π α`` the state after token t is ``W_t = A_t W_c + rule.update(G_t, state_c, W_c)``, ``κG_t`` the
chunk's summed steps so far: the inner optimizer is a deepopt rule (``sgd``: GD, ``momentum``: momentum across
chunks), which must be affine in its gradient so that the output ``y_t = M_{mem,t}(q_t)`` has the linear-attention
form computed in ``titans_kernels.chunk_mix``.  At the end of the chunk the rule's update is committed.
``reference=True`` runs the same recurrence token by token with explicit states (the test oracle).  With
``self_modifying=False`` only ``M_mem`` learns in context: the other four are static maps (their initial states)
and ``v̂ = v/‖v‖``.

**CMS** (Eq. 70–71): a chain of levels ``y = h + W₁σ(W₂ norm(h))``.  Level ℓ reads one state for a whole
chunk of ``C^{(ℓ)}`` tokens and, at the chunk's end, takes the step of Eq. 71,
``θ ← θ − η^{(ℓ)}·(1/C)·Σ_t f(θ; x_t)`` with ``f`` the error component of gradient descent on the model's
own objective: ``f = ∇_θ ⟨y_t(θ), δ_t⟩``, ``δ_t`` the gradient of token t's next-token loss (its target,
token t+1, is in the context) with respect to the level's output, i.e.
``∇_{W₁} = δ hᵀ``, ``∇_{W₂} = (σ'(z) ⊙ W₁ᵀδ) kᵀ``, each divided by a bound on its curvature as in Titans
(``δ/(1 + ‖h‖²)``, ``(σ'(z) ⊙ W₁ᵀδ)/((1 + ‖W₁‖²)·d)``; the dot-product objective has no curvature of its
own, and raw steps blew training up), applied through a deepopt rule.  ``η^{(ℓ)} = softplus(ρ_ℓ)``
is an outer parameter.  Departures (argued in docs/notes/hope-memory.md): the δ_t of a sequence come from one
first pass in which no CMS level learns, and are constants of the second pass (no second-order outer gradient),
the way chunk-parallel Titans takes a chunk's gradients at its start state; ``cms_error="per_level"`` (default)
gives every level of every block its own ``δ_t = ∂ℓ_t/∂y_t`` through the position-wise layers above it, with the
Titans branches above held constant (through their memories the gradient would carry later tokens' losses);
``"shared"`` (the former form) takes one δ at the final residual stream for all (``LanguageModel.cms_errors``).
A period of ``None`` (∞) never updates: the level is a plain residual MLP (a Transformer FFN).  Initial memory
states are outer parameters in both parts.  Every memory starts each sequence at its initial state, unless
``memory_carry="cms"``: then the CMS levels keep their in-context change across sequences (``CMSLevel._carry``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepopt.hope.cms_kernels import cms_factors, cms_scan
from deepopt.hope.compiled import compile_options
from deepopt.hope.titans_kernels import chunk_factors, chunk_mix, memory_factors, normalized_steps, scan
from deepopt.rules import Rule, get_rule
from deepopt.rules.deep import ACTIVATIONS, apply_memory

MODELS = ("hope", "transformer")
TITANS_MEMORIES = ("k", "v", "eta", "alpha", "mem")
ETA_FORMS = ("per_token", "chunk_capped")  # HopeConfig.eta_form
CMS_ERRORS = ("per_level", "shared")  # HopeConfig.cms_error
MEMORY_CARRY = ("none", "cms")  # HopeConfig.memory_carry
TITANS_INPUTS = ("per_memory", "shared")  # HopeConfig.titans_inputs
W2_INITS = ("gaussian", "orthogonal")  # HopeConfig.titans_w2_init
# what a saved config without these fields meant (written before they existed): ``HopeConfig.from_dict``
LEGACY = {"eta_form": "chunk_capped", "cms_error": "shared", "memory_carry": "none", "titans_inputs": "shared",
          "titans_w2_init": "gaussian"}


@dataclass(frozen=True)
class HopeConfig:
    """Architecture of a HOPE or Transformer++ language model (``model`` picks which)."""

    model: str = "hope"
    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    # self-modifying Titans
    mem_hidden: int = 16
    chunk_size: int = 16
    conv_width: int = 4
    conv_tap_std: float = 0.1  # initial taps of the causal conv on earlier tokens ~ N(0, std²) (current token: 1)
    # Titans step sizes η_t = M_η(u_t) (Eq. 82): "per_token": η_t = η_max·sigmoid(·) ≤ η_max for every token, the
    # state-linear part of each step (W₁h, W₂k: the delta rule's) read at the token's own state inside the chunk,
    # so each token's map is a contraction whatever the chunk size; "chunk_capped": η_t ≤ η_max/C with every step
    # of a chunk at its start state (the former form, kept for the ablation): a write's strength scales with 1/C
    eta_form: str = "per_token"
    eta_max: float = 2.0  # per_token: bound on each η_t; chunk_capped: bound on a chunk's summed step
    # initial b_η: η_t starts near η_cap·sigmoid(b_η) (η_cap = η_max, or η_max/C): per_token η ≈ 0.54 at init.
    # Chosen on MQAR and the LM ablation recipe together (docs/notes/hope-recall.md): with per-memory inputs HOPE
    # binds 0.19 / 0.43 / 0.86 / 0.89 of MQAR's queries at b_η −4 / −2 / −1 / 0 and the recipe's perplexity is
    # 5.33 / 5.30 / 5.41 / 5.55 (one seed each); the former −4 (η ≈ 0.036) kept writes too weak to bind
    eta_bias: float = -1.0
    alpha_bias: float = 6.0
    self_modifying: bool = True
    delta_gd: bool = True
    inner_rule: str = "sgd"
    inner_hparams: dict[str, Any] = field(default_factory=dict)
    activation: str = "silu"
    # what M_k, M_v, M_η, M_α read: "per_memory": each its own input u_□ (its own projection of x_t through the short
    # conv, as Titans gives k and v their own projections), so that maps near the identity still give k ≠ v;
    # "shared": one u_t for all four (Eq. 76–83 as printed; then only θ₀ far from the identity makes k ≠ v: the
    # variant "hope-shared-inputs" is that former form with its former θ₀)
    titans_inputs: str = "per_memory"
    # initial states θ₀ of the five Titans memories (outer parameters; their init is ours, not the paper's math):
    # W₁ ~ N(0, std²), W₂ (titans_w2_init) of gain ``gain``; one number for all five memories or one per memory in
    # TITANS_MEMORIES order (k, v, η, α, mem).  Chosen on MQAR (tuned on recall, checked on the LM ablation recipe;
    # docs/notes/hope-recall.md): every memory near the identity, M_mem's W₂ orthogonal with singular values 2
    titans_w1_std: float | tuple[float, ...] = 0.02
    titans_w2_gain: float | tuple[float, ...] = (4.0, 4.0, 4.0, 4.0, 2.0)
    # W₂'s draw: "gaussian" (entries N(0, gain²/d_head)) or "orthogonal" (a random semi-orthogonal matrix times
    # gain: every singular value = gain, the Frobenius norm of the Gaussian draw's expectation when hid = d_head).
    # A Gaussian W₂ is badly conditioned (singular values from ≈ 0 to ≈ 2·gain), so σ(W₂k) of two keys can nearly
    # coincide: on MQAR HOPE binds 0.74 of the queries with it and 0.89 with an orthogonal one (same seed and lr)
    titans_w2_init: str = "orthogonal"
    # continuum memory system: one level per period (None = ∞, never updated)
    cms_periods: tuple[int | None, ...] = (16, 64, None)
    cms_hidden: int = 64
    cms_lr: float = 1.0  # initial η^{(ℓ)} of every level's in-context step (Eq. 71)
    cms_rule: str = "sgd"
    # the error signals δ_t a CMS level learns from (Eq. 71): "per_level": its own, ∂ℓ_t/∂y_t at the level's output
    # (per block and level; through the position-wise layers above it); "shared": one δ at the final residual
    # stream for every level of every block (the former form, kept for the ablation)
    cms_error: str = "per_level"
    # what outlives a sequence besides the outer parameters: "none" (every sequence starts every memory at θ₀) or
    # "cms" (each learning CMS level keeps its in-context change: a training pass ends by storing the batch mean of
    # its final state minus θ₀ in a buffer the next sequences start from, θ₀ + carry, so the levels go on learning
    # over the stream at their periods: Eq. 71 read over the data stream.  Titans' state, a memory of the
    # current context, still resets; the carry is per process under DDP)
    memory_carry: str = "none"
    # Transformer++ (ffn_hidden 0 = chosen to match the HOPE model's parameter count)
    ffn_hidden: int = 0
    rope_base: float = 10000.0
    # Transformer++ only: width of a depthwise causal conv on q, k and v after their projection (0 = none).  The
    # recall baseline (Zoology's attention has one; HOPE has its own, conv_width) is variant "transformer-conv"
    short_conv: int = 0
    # training memory: recompute each chunk in the backward pass instead of keeping its intermediates (same
    # numbers, less memory, more time), in the Python chunk loop (memories the scan ops do not take: a drifting
    # inner rule, self_modifying=False, a non-sgd CMS rule) and in the scans' torch loops (eager, off the Triton
    # path: titans_kernels.scan, cms_kernels.cms_scan's keep; deepopt.hope.kept).  The Triton kernels always recompute.
    recompute_chunks: bool = False
    # run the memories they take as the whole-sequence ops deepopt::titans_scan / deepopt::cms_scan (Triton on
    # CUDA; on the CPU the torch chunk loop inside one op, chunks recomputed in the backward pass); False: the
    # Python chunk loop everywhere (same numbers; on the CPU faster, keeping every chunk's activations)
    scan_ops: bool = True

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "mem_hidden", "chunk_size", "conv_width",
                     "cms_hidden"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.model == "transformer" and (self.d_model // self.n_heads) % 2:
            raise ValueError("transformer head size d_model/n_heads must be even for RoPE")
        if self.eta_form not in ETA_FORMS:
            raise ValueError(f"eta_form must be one of {ETA_FORMS}, got {self.eta_form!r}")
        if isinstance(self.eta_bias, bool) or not isinstance(self.eta_bias, (int, float)) or \
                not math.isfinite(self.eta_bias):
            raise ValueError(f"eta_bias must be a finite number, got {self.eta_bias!r}")
        if not 0 <= self.eta_max <= 2:
            raise ValueError(f"eta_max must be in [0, 2] (keeps the memories' steps contractions), got {self.eta_max}")
        if self.cms_error not in CMS_ERRORS:
            raise ValueError(f"cms_error must be one of {CMS_ERRORS}, got {self.cms_error!r}")
        if self.titans_inputs not in TITANS_INPUTS:
            raise ValueError(f"titans_inputs must be one of {TITANS_INPUTS}, got {self.titans_inputs!r}")
        if self.titans_w2_init not in W2_INITS:
            raise ValueError(f"titans_w2_init must be one of {W2_INITS}, got {self.titans_w2_init!r}")
        if self.memory_carry not in MEMORY_CARRY:
            raise ValueError(f"memory_carry must be one of {MEMORY_CARRY}, got {self.memory_carry!r}")
        if isinstance(self.conv_tap_std, bool) or not isinstance(self.conv_tap_std, (int, float)) or not (
                math.isfinite(self.conv_tap_std) and self.conv_tap_std >= 0):
            raise ValueError(f"conv_tap_std must be a finite number >= 0, got {self.conv_tap_std!r}")
        for name in ("titans_w1_std", "titans_w2_gain"):
            object.__setattr__(self, name, _per_memory(name, getattr(self, name)))
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {self.activation!r}")
        for p in self.cms_periods:
            if p is not None and (isinstance(p, bool) or not isinstance(p, int) or p < 1):
                raise ValueError(f"cms_periods entries must be ints >= 1 or None (∞), got {p!r}")
        if not self.cms_lr > 0:
            raise ValueError(f"cms_lr must be > 0 (softplus parameterisation), got {self.cms_lr}")
        if self.ffn_hidden < 0:
            raise ValueError(f"ffn_hidden must be >= 0, got {self.ffn_hidden}")
        if isinstance(self.short_conv, bool) or not isinstance(self.short_conv, int) or self.short_conv < 0:
            raise ValueError(f"short_conv must be an int >= 0 (0 = no conv), got {self.short_conv!r}")
        if self.short_conv and self.model != "transformer":
            raise ValueError(f"short_conv is Transformer++'s (HOPE's own conv is conv_width), got model={self.model!r}")
        affine_rule(self.inner_rule, self.inner_hparams)
        affine_rule(self.cms_rule, {})

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["cms_periods"] = list(self.cms_periods)
        for name in ("titans_w1_std", "titans_w2_gain"):
            d[name] = list(d[name])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HopeConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown HopeConfig field(s) {unknown}; accepted: {sorted(known)}")
        if known - set(LEGACY) <= set(d):  # a whole saved config: one without a field predates it, so its form
            d = {**LEGACY, **d}
        if "cms_periods" in d:
            d["cms_periods"] = tuple(d["cms_periods"])
        return cls(**d)


def _per_memory(name: str, value: Any) -> tuple[float, ...]:
    """``value`` (one number, or one per Titans memory in ``TITANS_MEMORIES`` order) as a tuple of five floats
    >= 0; ``ValueError`` naming ``name`` otherwise."""
    n = len(TITANS_MEMORIES)
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,) * n
    if len(values) != n or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                                   and v >= 0 for v in values):
        raise ValueError(f"{name} must be a finite number >= 0 or {n} of them (one per memory {TITANS_MEMORIES}), "
                         f"got {value!r}")
    return tuple(float(v) for v in values)


def _single_cms(cfg: HopeConfig) -> dict[str, Any]:
    """One level at the middle finite period holding all the levels' width (the same parameter count)."""
    finite = [p for p in cfg.cms_periods if p is not None]
    if not finite:
        raise ValueError(f"hope-single-cms needs a finite CMS period, got cms_periods={cfg.cms_periods}")
    return {"cms_periods": (finite[len(finite) // 2],), "cms_hidden": cfg.cms_hidden * len(cfg.cms_periods)}


# Ablations by configuration: name -> the overrides they make to a HOPE config (``apply_variant``).
VARIANTS: dict[str, Any] = {
    "hope": lambda cfg: {},
    "hope-no-cms": lambda cfg: {"cms_periods": ()},
    "hope-no-selfmod": lambda cfg: {"self_modifying": False},
    "hope-single-cms": _single_cms,
    # the former Titans inputs: one u for M_k, M_v, M_η, M_α, with its θ₀ (M_k, M_v far from the identity)
    "hope-shared-inputs": lambda cfg: {"titans_inputs": "shared", "titans_w1_std": (0.5, 0.5, 0.02, 0.02, 0.02),
                                       "titans_w2_gain": 4.0, "titans_w2_init": "gaussian"},
    "transformer": lambda cfg: {"model": "transformer"},
    # the recall baseline: a short causal conv on q/k/v as wide as HOPE's (parameter-matched through the FFN)
    "transformer-conv": lambda cfg: {"model": "transformer", "short_conv": cfg.conv_width},
}


def apply_variant(cfg: HopeConfig, variant: str) -> HopeConfig:
    """The ablation ``variant`` (a ``VARIANTS`` name) of the HOPE config ``cfg``."""
    if variant not in VARIANTS:
        raise ValueError(f"model must be one of {sorted(VARIANTS)}, got {variant!r}")
    return replace(cfg, **VARIANTS[variant](cfg))


def affine_rule(name: str, hparams: dict[str, Any]) -> tuple[Rule, dict[str, Any], float]:
    """The inner rule (lr = 1), its hparams and κ with ``rule.update(G) = rule.update(0) + κ·G``.

    Only rules affine in the gradient give the chunk-parallel form; ``ValueError`` otherwise.
    """
    rule = get_rule(name)
    hp = rule.hparams(**{"lr": 1.0, **hparams})
    zero = torch.zeros(2, 2, dtype=torch.float64, device="cpu")
    probe = torch.tensor([[1.0, -2.0], [0.5, 3.0]], dtype=torch.float64, device="cpu")
    state = rule.init(zero, hp)
    base, one, two = (rule.update(zero + g * probe, state, zero, hp)[0] for g in (0.0, 1.0, 2.0))
    kappa = float((one - base)[0, 0])
    if kappa == 0 or not (torch.allclose(one - base, kappa * probe) and torch.allclose(two - base, 2 * kappa * probe)):
        raise ValueError(f"inner rule {name!r} with {hparams} is not affine in the gradient; use 'sgd' or "
                         f"'momentum' with preconditioner='identity' and nonlinearity=None")
    return rule, hp, kappa


class CausalConv(nn.Module):
    """Depthwise causal convolution over time: ``y_t = Σ_{j<w} c_j ⊙ x_{t−j}`` (shifted sums: w is tiny)."""

    def __init__(self, channels: int, width: int, tap_std: float = 0.1) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(width, channels))  # weight[j] multiplies x_{t−j}
        with torch.no_grad():
            self.weight[0] = 1.0
            self.weight[1:].normal_(0, tap_std)

    def forward(self, x: Tensor) -> Tensor:  # (B, T, C)
        return _ShiftedSums.apply(x, self.weight)


class _ShiftedSums(torch.autograd.Function):
    """``y_t = Σ_j c_j ⊙ x_{t−j}`` (x: (B, T, C), c: (w, C)) accumulated in place into one output, and its reverse
    mode by hand: ``∂x_t = Σ_j c_j ⊙ ∂y_{t+j}``, ``∂c_j = Σ_{b,t} ∂y_{t+j} ⊙ x_t``; differentiable again (plain
    ops).  Autograd through a zero-padded copy and its shifted slices allocated and filled a padded gradient per tap."""

    @staticmethod
    def forward(ctx, x: Tensor, c: Tensor) -> Tensor:
        ctx.save_for_backward(x, c)
        y = x * c[0]
        for j in range(1, min(c.shape[0], x.shape[1])):
            y[:, j:].addcmul_(x[:, :-j], c[j])
        return y

    @staticmethod
    def backward(ctx, gy: Tensor) -> tuple[Tensor, Tensor]:
        x, c = ctx.saved_tensors
        gx = gy * c[0]
        gc = [(gy * x).sum((0, 1))]
        for j in range(1, c.shape[0]):
            if j < x.shape[1]:
                gx[:, :-j] += gy[:, j:] * c[j]
                gc.append((gy[:, j:] * x[:, :-j]).sum((0, 1)))
            else:  # a tap beyond the sequence reads only the zero padding
                gc.append(torch.zeros_like(c[j]))
        return gx, torch.stack(gc).to(c.dtype)


class SelfModifyingTitans(nn.Module):
    """The self-modifying Titans memory layer (chunk-parallel, or token-sequential with ``reference``)."""

    def __init__(self, cfg: HopeConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, H = cfg.d_model, cfg.n_heads
        self.dh, hid = d // H, cfg.mem_hidden
        self.n_inputs = 4 if cfg.titans_inputs == "per_memory" else 1  # u_k, u_v, u_η, u_α, or one u
        self.in_proj = nn.Linear(d, (self.n_inputs + 1) * d, bias=False)  # memory input(s) u and query q
        self.conv = CausalConv((self.n_inputs + 1) * d, cfg.conv_width, cfg.conv_tap_std)
        self.out_proj = nn.Linear(d, d, bias=False)
        self.chunk_fns = 0  # the scan op's chunk math: eager, or compile_model's key (deepopt.hope.compiled)
        n = len(TITANS_MEMORIES)
        # initial memory states θ₀ (outer parameters): W₁ ~ N(0, std²), W₂ (titans_w2_init) per memory
        std, gain = (torch.tensor(v)[:, None, None] for v in (cfg.titans_w1_std, cfg.titans_w2_gain))
        self.W1 = nn.Parameter(std * torch.randn(H, n, self.dh, hid))
        w2 = torch.randn(H, n, hid, self.dh)
        self.W2 = nn.Parameter(gain * (semi_orthogonal(w2) if cfg.titans_w2_init == "orthogonal"
                                       else w2 / math.sqrt(self.dh)))
        self.w_eta = nn.Parameter(torch.zeros(H, self.dh))
        self.b_eta = nn.Parameter(torch.full((H,), cfg.eta_bias))
        self.w_alpha = nn.Parameter(torch.zeros(H, self.dh))
        self.b_alpha = nn.Parameter(torch.full((H,), cfg.alpha_bias))
        self.rule, self.hp, self.kappa = affine_rule(cfg.inner_rule, cfg.inner_hparams)
        # does the rule move W without a gradient (momentum carried across chunks, weight decay)?
        probe = torch.ones(2, 2, device="cpu")
        self.drifts = bool(self.rule.init(probe, self.hp)) or bool(
            self.rule.update(torch.zeros_like(probe), {}, probe, self.hp)[0].any())
        self.learns_in_context = True  # False: η = 0, α = 1, every memory stays at θ₀ (the ablation)
        self.sequential = cfg.eta_form == "per_token"  # steps read at each token's own state (chunk_mix)
        self.eta_log: list[Tensor] | None = None  # a list collects every chunk's η (B, H, C) when set

    @property
    def eta_cap(self) -> float:
        """The bound on each token's η_t: η_max per token, or η_max/C with the chunk-capped form."""
        return self.cfg.eta_max if self.sequential else self.cfg.eta_max / self.cfg.chunk_size

    # -- pieces shared by both paths ------------------------------------------------------------------
    def _initial_state(self, batch: int) -> tuple[Tensor, Tensor]:
        sl = slice(None) if self.cfg.self_modifying else slice(-1, None)
        # materialised (not stride-0 expanded views): every chunk then sees states of one layout, so a compiled
        # chunk function is not recompiled after the first chunk
        return (self.W1[None, :, sl].expand(batch, -1, -1, -1, -1).contiguous(),
                self.W2[None, :, sl].expand(batch, -1, -1, -1, -1).contiguous())

    def _factors(self, w1: Tensor, w2: Tensor, u: Tensor) -> dict[str, Tensor]:
        """Everything a chunk needs from its start state ``(w1, w2)`` and inputs ``u`` (B, H, C, dh):
        ``titans_kernels.chunk_factors`` (static reads of ``k, v, η, α`` without self-modification)."""
        reads = None if self.cfg.self_modifying else (self.W1[None, :, :4], self.W2[None, :, :4])
        f = chunk_factors(w1, w2, u, self.w_eta, self.b_eta, self.w_alpha, self.b_alpha, eta_scale=self.eta_cap,
                          activation=self.cfg.activation, learns=self.learns_in_context, reads=reads)
        if self.eta_log is not None:
            self.eta_log.append(f["eta_raw"].detach())
        return f

    def _commit(self, w: tuple[Tensor, Tensor], st: tuple[dict, dict], grads: tuple[Tensor, Tensor],
                decay: Tensor) -> tuple[tuple[Tensor, Tensor], tuple[dict, dict]]:
        """``W ← A·W_c + rule.update(G, state_c, W_c)`` for both weights (``decay`` = A, shape (B, H))."""
        new_w, new_st = [], []
        for wi, si, gi in zip(w, st, grads):
            delta, s = self.rule.update(gi, si, wi, self.hp)
            new_w.append(decay[:, :, None, None, None] * wi + delta)
            new_st.append(s)
        return tuple(new_w), tuple(new_st)

    def _project(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The inputs ``u (B, H, 4, T, dh)`` of ``M_k, M_v, M_η, M_α`` (one input broadcast to the four with
        ``titans_inputs="shared"``) and the unit queries ``q (B, H, T, dh)``."""
        B, T, _ = x.shape
        H, r = self.cfg.n_heads, self.n_inputs
        uq = self.conv(self.in_proj(x)).view(B, T, r + 1, H, self.dh).permute(0, 3, 2, 1, 4)
        return uq[:, :, :r].expand(B, H, 4, T, self.dh), F.normalize(uq[:, :, r], dim=-1)

    def scans(self) -> bool:
        """Does this layer run as one ``deepopt::titans_scan`` op (self-modifying, an inner rule that does not
        drift, i.e. SGD, and no η log)?  Otherwise the Python loop over ``_parallel_chunk``."""
        return self.cfg.scan_ops and self.cfg.self_modifying and not self.drifts and self.eta_log is None

    def _scan(self, u: Tensor, q: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """The whole chunk recurrence in one op: outputs (B, H, T, dh) and the final states."""
        y, s1, s2 = scan(u.contiguous(), q.contiguous(), self.W1, self.W2, self.w_eta, self.b_eta, self.w_alpha,
                         self.b_alpha, self.cfg.chunk_size, self.cfg.eta_max, self.cfg.activation, self.cfg.delta_gd,
                         self.learns_in_context, self.kappa, self.sequential, self.chunk_fns,
                         keep=not self.cfg.recompute_chunks)
        return y, (s1[:, :, -1], s2[:, :, -1])

    def forward(self, x: Tensor, reference: bool = False, return_state: bool = False):
        B, T, _ = x.shape
        u, q = self._project(x)
        if not reference and self.scans():  # chunks kept for the backward pass or recomputed: recompute_chunks
            y, w = self._scan(u, q)
        else:
            w = self._initial_state(B)
            st = tuple(self.rule.init(wi, self.hp) for wi in w)
            run = self._sequential_chunk if reference else self._parallel_chunk
            ys = []
            for uc, qc in zip(u.split(self.cfg.chunk_size, dim=3), q.split(self.cfg.chunk_size, dim=2)):
                y, w, st = recomputed(run, self.cfg.recompute_chunks, w, st, uc, qc)
                ys.append(y)
            y = torch.cat(ys, dim=2)
        out = self.out_proj(y.transpose(1, 2).reshape(B, T, -1))
        return (out, w) if return_state else out

    def _parallel_chunk(self, w, st, u, q):
        f = self._factors(*w, u)
        w1m, w2m = w[0][:, :, -1], w[1][:, :, -1]
        drift = None
        if self.drifts:  # the rule's gradient-free move δ(0): W_t = A_t W_c + δ(0) + κ G_t
            zero_st = tuple({n: s[:, :, -1] for n, s in si.items()} for si in st)
            drift = tuple(self.rule.update(torch.zeros_like(wi), si, wi, self.hp)[0]
                          for wi, si in zip((w1m, w2m), zero_st))
        o = chunk_mix(*w, f, q, self.kappa, self.cfg.activation, sequential=self.sequential,
                      delta_gd=self.cfg.delta_gd, drift=drift)
        w, st = self._commit(w, st, (o["g1"], o["g2"]), o["A"][..., -1])
        return o["y"], w, st

    def _sequential_chunk(self, w, st, u, q):
        """Token by token with explicit states: each step's state-linear term (``W₁h``, ``W₂k``) is read at the
        token's own (decayed) state with ``sequential``, at the chunk's start state otherwise; everything else
        (reads, h, σ', g) at the chunk's start state."""
        act, lr = self.cfg.activation, -self.kappa
        f = self._factors(*w, u)  # every read/gradient factor of the chunk is at its start state
        B, H, C, _ = q.shape
        k, h, V = f["k"], f["h"], f["V"]
        d1 = torch.zeros_like(w[0].expand(B, H, -1, -1, -1))  # Δ: the state change beyond A_t·W_c
        d2 = torch.zeros_like(w[1].expand(B, H, -1, -1, -1))
        A = torch.ones(B, H, dtype=u.dtype, device=u.device)
        ys = []
        for t in range(C):
            alpha = f["log_alpha"][..., t].exp()
            a = alpha[:, :, None, None, None]
            A = alpha * A
            s1, s2 = (A[:, :, None, None, None] * wi + a * di for wi, di in zip(w, (d1, d2))) if self.sequential \
                else w
            kt, ht = k[:, :, None, t], h[:, :, :, t]  # (B, H, 1, d), (B, H, n, hid)
            eta = lr * f["eta"][..., t, None, None]
            u1 = eta / f["nh"][:, :, :, t] * (V[:, :, :, t] - kt - (s1 @ ht[..., None])[..., 0])
            u2 = -eta * f["g"][:, :, :, t] / f["n1"][..., 0]
            if self.cfg.delta_gd:
                u2 = u2 - eta * (s2 @ kt[..., None])[..., 0]
            d1 = a * d1 + u1[..., None] * ht[..., None, :]
            d2 = a * d2 + u2[..., None] * kt[..., None, :]
            (w1t, w2t), _ = self._commit(w, st, (d1 / self.kappa, d2 / self.kappa), A)  # the state after token t
            ys.append(apply_memory(w1t[:, :, -1], w2t[:, :, -1], q[:, :, t:t + 1], act))
        w, st = self._commit(w, st, (d1 / self.kappa, d2 / self.kappa), A)
        return torch.cat(ys, dim=2), w, st


def semi_orthogonal(x: Tensor) -> Tensor:
    """The matrices (last two dims) of ``x`` made semi-orthogonal by QR (a Haar-random draw for Gaussian ``x``):
    every singular value 1."""
    tall = x.shape[-2] >= x.shape[-1]
    q, r = torch.linalg.qr(x if tall else x.mT)
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[..., None, :]
    return q if tall else q.mT


def planted_write_readback(layer: SelfModifyingTitans, keys: Tensor, targets: Tensor, gap: int = 0,
                           eta: float | None = None) -> Tensor:
    """How much of one in-context write of the output memory ``M_mem`` (at its initial state θ₀) is read back.

    Each head h writes ``keys[h, i] → targets[h, i]`` (unit keys, shape (H, N, d_head)) with one step of the
    memory's rule at step size ``eta`` (default: the cap ``layer.eta_cap``, η_max per token or η_max/C):
    ``W₁ ← W₁ − η e hᵀ/(1 + ‖h‖²)``, ``W₂ ← W₂ − η (g₂/(1 + ‖W₁‖²) (+ z)) kᵀ`` with ``e = M(k) − v̂`` (module
    doc; one token's step is the same in both step forms); then ``gap`` tokens pass with no write and the state
    decays by ``α^gap``, ``α = sigmoid(b_α)`` (each token's α at init, where ``w_α = 0``).  Returns (H, N): the share of
    the error the write removed at its key, ``ρ = ⟨M_gap(k) − M'_gap(k), e⟩/‖e‖²`` (M': with the write), 1 = the
    target read back exactly.  A diagnostic of the initial state, not used in training.
    """
    expected = (layer.cfg.n_heads, layer.dh)
    if keys.dim() != 3 or keys.shape != targets.shape or (keys.shape[0], keys.shape[-1]) != expected:
        raise ValueError(f"keys and targets must both have shape (n_heads={layer.cfg.n_heads}, N, "
                         f"d_head={layer.dh}), got {tuple(keys.shape)} and {tuple(targets.shape)}")
    if gap < 0:
        raise ValueError(f"gap must be >= 0 tokens, got {gap}")
    eta = layer.eta_cap if eta is None else eta
    if not 0 <= eta <= 2:
        raise ValueError(f"eta must be in [0, 2], got {eta}")
    act = layer.cfg.activation
    with torch.no_grad():
        w1, w2 = layer.W1[:, -1, None], layer.W2[:, -1, None]  # (H, 1, d, hid), (H, 1, hid, d)
        err, z, h, g2, _ = memory_factors(w1, w2, keys[:, :, None], targets[:, :, None], act)
        e1, u2 = normalized_steps(err, h, g2, w1)
        if layer.cfg.delta_gd:
            u2 = u2 + z
        decay = torch.sigmoid(layer.b_alpha)[:, None, None, None] ** gap
        w1n, w2n = w1 - eta * e1.mT @ h, w2 - eta * u2.mT @ keys[:, :, None]  # (H, N, d, hid), (H, N, hid, d)
        before = apply_memory(decay * w1, decay * w2, keys[:, :, None], act)
        after = apply_memory(decay * w1n, decay * w2n, keys[:, :, None], act)
        e = err[:, :, 0]
        return ((before - after)[:, :, 0] * e).sum(-1) / (e * e).sum(-1)


def recomputed(fn, recompute: bool, *args: Any):
    """``fn(*args)``; with ``recompute`` while building a graph, its intermediate tensors are not kept for the
    backward pass but recomputed there (``torch.utils.checkpoint``): a chunk's activations live only while its
    backward runs."""
    if recompute and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


class CMSLevel(nn.Module):
    """One CMS level ``y = h + W₁σ(W₂ norm(h))`` (Eq. 70), updated in context every ``period`` tokens by
    Eq. 71 on the error signals ``δ`` of its output (module doc)."""

    def __init__(self, cfg: HopeConfig, period: int | None) -> None:
        super().__init__()
        d = cfg.d_model
        self.period, self.activation = period, cfg.activation
        self.norm = nn.RMSNorm(d)
        self.W1 = nn.Parameter(torch.randn(d, cfg.cms_hidden) * 0.02)
        self.W2 = nn.Parameter(torch.randn(cfg.cms_hidden, d) / math.sqrt(d))
        # η^{(ℓ)} = softplus(ρ): only in-context updates use it, so a period-∞ level has none
        rho = math.log(math.expm1(cfg.cms_lr)) if cfg.cms_lr < 20 else cfg.cms_lr
        self.eta_rho = None if period is None else nn.Parameter(torch.tensor(rho))
        self.rule, self.hp, _ = affine_rule(cfg.cms_rule, {})
        self.learns_in_context = True  # False: the level stays at θ₀ (the ablation)
        self.recompute = cfg.recompute_chunks
        self.scans = cfg.scan_ops and cfg.cms_rule == "sgd"  # the whole recurrence as one op (cms_kernels)
        self.carries = cfg.memory_carry == "cms" and period is not None
        if self.carries:  # the in-context change carried from sequence to sequence (HopeConfig.memory_carry)
            self.register_buffer("carry_w1", torch.zeros(d, cfg.cms_hidden))
            self.register_buffer("carry_w2", torch.zeros(cfg.cms_hidden, d))

    @property
    def learns(self) -> bool:
        return self.period is not None and self.learns_in_context

    def initial_state(self) -> tuple[Tensor, Tensor]:
        """The state every sequence starts from: θ₀, plus the carried change with ``memory_carry="cms"``."""
        if self.carries:
            return self.W1 + self.carry_w1, self.W2 + self.carry_w2
        return self.W1, self.W2

    def _carry(self, w1: Tensor, w2: Tensor) -> None:
        """After a training pass of a carrying level: carry ← batch mean of the final state − θ₀."""
        if self.carries and self.training:
            with torch.no_grad():
                self.carry_w1.copy_(w1.detach().mean(0) - self.W1)
                self.carry_w2.copy_(w2.detach().mean(0) - self.W2)

    def _chunk(self, w1: Tensor, w2: Tensor, st: tuple, k: Tensor, err: Tensor | None):
        """The chunk's read ``W₁σ(W₂k)`` at the current state and, given the chunk's error signals ``err``
        (δ_t, same shape as the read), the state after Eq. 71's step on ``(1/C)Σ_t ∇_θ⟨M_θ(k_t), δ_t⟩``
        (``cms_factors``) through the level's rule."""
        f = cms_factors(w1, w2, k, err, self.activation)
        if err is None:
            return f["read"], w1, w2, st
        scale = F.softplus(self.eta_rho) / k.shape[-2]
        (d1, s1), (d2, s2) = (self.rule.update(scale * g, s, p, self.hp)
                              for g, s, p in zip((f["g1"], f["g2"]), st, (w1, w2)))
        return f["read"], w1 + d1, w2 + d2, (s1, s2)

    def _scan(self, x: Tensor, error: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """A learning ``sgd`` level over the whole sequence: ``(y, W₁ states, W₂ states)`` from one
        ``deepopt::cms_scan`` op (Triton on CUDA; it recomputes chunks in its backward pass) or, in eager CPU
        training, its loop keeping each chunk for the backward pass (``cms_scan``'s ``keep``)."""

        k = self.norm(x)
        lr = F.softplus(self.eta_rho) / self.period
        read, s1, s2 = cms_scan(k, error.to(k.dtype), *self.initial_state(), lr, self.period, self.activation,
                                keep=not self.recompute)
        return x + read, s1, s2

    def forward(self, x: Tensor, error: Tensor | None = None, reference: bool = False, return_state: bool = False):
        """``error``: the error signals δ (B, T, d) of this level's output; ``None`` (or a level that does not
        learn) reads θ₀ throughout."""
        T = x.shape[1]
        learns = self.learns and error is not None
        if learns and self.scans and not reference:
            y, s1, s2 = self._scan(x, error)
            self._carry(s1[:, -1], s2[:, -1])
            return (y, (s1[:, -1], s2[:, -1], T // self.period)) if return_state else y
        k = self.norm(x)
        # per-sequence copies of θ₀ (plain tensors, batched like the states the updates make): every chunk sees
        # one tensor type and rank, so a compiled ``_chunk`` is not recompiled after the first chunk
        w1, w2 = (w.expand(x.shape[0], -1, -1).contiguous() for w in self.initial_state())
        st = (self.rule.init(w1, self.hp), self.rule.init(w2, self.hp))
        period = self.period if learns else T
        ys, n_updates = [], 0
        if reference:  # token by token: read at the current state, apply the update every `period` tokens
            for t in range(T):
                ys.append(self._chunk(w1, w2, st, k[:, t:t + 1], None)[0])
                if learns and (t + 1) % period == 0:
                    s = slice(t + 1 - period, t + 1)
                    _, w1, w2, st = self._chunk(w1, w2, st, k[:, s], error[:, s])
                    n_updates += 1
        else:
            chunks = k.split(period, dim=1)
            errors = error.split(period, dim=1) if learns else (None,) * len(chunks)
            for kc, ec in zip(chunks, errors):
                update = learns and kc.shape[1] == period
                y, w1, w2, st = recomputed(self._chunk, self.recompute, w1, w2, st, kc, ec if update else None)
                ys.append(y)
                n_updates += update
        if learns:
            self._carry(w1, w2)
        y = x + torch.cat(ys, dim=1)
        return (y, (w1, w2, n_updates)) if return_state else y


class RMSNormLinear(nn.Module):
    """Pre-norm residual wrapper: ``x + f(norm(x))``."""

    def __init__(self, d: int, f: nn.Module) -> None:
        super().__init__()
        self.norm, self.f = nn.RMSNorm(d), f

    def forward(self, x: Tensor, **kw) -> Tensor:
        return x + self.f(self.norm(x), **kw)


class HopeBlock(nn.Module):
    """Self-modifying Titans (pre-norm residual) followed by the CMS chain."""

    def __init__(self, cfg: HopeConfig) -> None:
        super().__init__()
        self.titans = RMSNormLinear(cfg.d_model, SelfModifyingTitans(cfg))
        self.cms = nn.ModuleList(CMSLevel(cfg, p) for p in cfg.cms_periods)

    def forward(self, x: Tensor, error: Tensor | list[Tensor | None] | None = None, reference: bool = False,
                titans_branch: Tensor | None = None) -> Tensor:
        """``error``: the error signals δ (B, T, d) the CMS levels learn from: one tensor for every level, one per
        level (``LanguageModel.cms_errors``), or ``None`` (they do not learn).  ``titans_branch``: the Titans
        branch ``f(norm(x))`` already computed for this ``x`` (``LanguageModel.forward`` shares block 0's with
        the error pass)."""
        x = self.titans(x, reference=reference) if titans_branch is None else x + titans_branch
        errors = error if isinstance(error, (list, tuple)) else [error] * len(self.cms)
        for level, err in zip(self.cms, errors, strict=True):
            x = level(x, err, reference=reference)
        return x


def rope(x: Tensor, base: float) -> Tensor:
    """Rotary position embedding on (B, H, T, dh), rotating pairs (i, i + dh/2)."""
    T, dh = x.shape[-2], x.shape[-1]
    inv = base ** (-torch.arange(0, dh // 2, dtype=x.dtype, device=x.device) * 2 / dh)
    ang = torch.arange(T, dtype=x.dtype, device=x.device)[:, None] * inv
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x[..., : dh // 2], x[..., dh // 2:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Attention(nn.Module):
    """Causal multi-head softmax attention with RoPE on q and k.  With ``cfg.short_conv = w > 0`` the projections
    pass through a depthwise causal conv first, ``[q;k;v]_t = Σ_{j<w} c_j ⊙ (W_qkv x)_{t−j}`` (``CausalConv``:
    identity at init plus small taps), as in Zoology's attention baseline: a key then carries its neighbours (a
    value next to its key), which single-layer attention needs to bind MQAR's pairs."""

    def __init__(self, cfg: HopeConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.conv = CausalConv(3 * cfg.d_model, cfg.short_conv) if cfg.short_conv else None
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        B, T, d = x.shape
        qkv = self.qkv(x) if self.conv is None else self.conv(self.qkv(x))
        q, k, v = qkv.view(B, T, 3, self.cfg.n_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = rope(q, self.cfg.rope_base), rope(k, self.cfg.rope_base)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(B, T, d))


class SwiGLU(nn.Module):
    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.up = nn.Linear(d, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.up(x).chunk(2, dim=-1)
        return self.down(F.silu(a) * b)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: HopeConfig) -> None:
        super().__init__()
        self.attn = RMSNormLinear(cfg.d_model, Attention(cfg))
        self.ffn = RMSNormLinear(cfg.d_model, SwiGLU(cfg.d_model, cfg.ffn_hidden))

    def forward(self, x: Tensor, error: None = None, reference: bool = False) -> Tensor:
        return self.ffn(self.attn(x))


class LanguageModel(nn.Module):
    """Token embedding → blocks → RMSNorm → tied output head; ``forward`` returns ``(logits, loss)``."""

    def __init__(self, cfg: HopeConfig) -> None:
        super().__init__()
        if cfg.model == "transformer" and cfg.ffn_hidden == 0:
            cfg = matched_transformer(cfg)
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        nn.init.normal_(self.embed.weight, std=0.02)
        block = HopeBlock if cfg.model == "hope" else TransformerBlock
        self.blocks = nn.ModuleList(block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model)

    def forward(self, idx: Tensor, targets: Tensor | None = None, reference: bool = False):
        x = self.embed(idx)
        errors = first = None
        if self.cms_learns and idx.shape[1] > 1:
            # block 0's Titans branch reads the embeddings in both passes: computed once, here, with its graph
            titans = self.blocks[0].titans
            first = titans.f(titans.norm(x), reference=reference)
            errors = self.cms_errors(idx, reference, first_branch=first.detach())
        for i, blk in enumerate(self.blocks):
            kw = {"titans_branch": first} if i == 0 and first is not None else {}
            x = blk(x, None if errors is None else errors[i], reference, **kw)
        logits = self.norm(x) @ self.embed.weight.mT
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss

    @property
    def cms_learns(self) -> bool:
        """Whether any CMS level learns in context (a finite period, and not switched off)."""
        return any(isinstance(m, CMSLevel) and m.learns for m in self.modules())

    def cms_errors(self, idx: Tensor, reference: bool = False,
                   first_branch: Tensor | None = None) -> list[list[Tensor | None]]:
        """Eq. 71's error signals, one (B, T, d) tensor per block and CMS level (``None`` for a level that does
        not learn): the gradient of token t's next-token loss ``ℓ_t`` (target ``idx[:, t+1]``, in the context; δ
        of the last token is 0), from a pass in which no CMS level learns.  Constants of the pass that uses them
        (no graph).

        ``cfg.cms_error == "per_level"``: ``δ_t = ∂ℓ_t/∂y_t`` at the level's own output y, through the layers above
        it that act on position t alone: the residual stream, the later CMS levels (at θ₀ in this pass), the final
        norm and the head; the Titans branches above it are held constant (their Jacobian at t also carries later
        tokens' losses through their memories: not causal).  With those branches constant the gradient of the
        summed loss at position t is exactly ``∂ℓ_t/∂y_t``.  ``"shared"``: ``δ_t = ∂ℓ_t/∂x_t`` at the final
        residual stream, the same tensor for every level (the per-level δ of a last level; for the others, its
        residual path).  ``first_branch``: block 0's Titans branch on these embeddings when the caller has it
        (it is the same in this pass and the next)."""
        shared = self.cfg.cms_error == "shared"
        with torch.no_grad():
            x = self.embed(idx)
        learners: list[Tensor] = []
        layout: list[list[int | None]] = []  # per block and level: the index in ``learners``, None = no δ
        with torch.enable_grad():  # functional pieces: no module hooks (FlopCounterMode's) on this graph
            if not shared:
                x = x.detach().requires_grad_()
            for i, blk in enumerate(self.blocks):
                if i == 0 and first_branch is not None:
                    branch = first_branch
                else:
                    with torch.no_grad():
                        branch = blk.titans.f(blk.titans.norm(x), reference=reference)
                x = x + branch
                layout.append([])
                for level in blk.cms:
                    with torch.set_grad_enabled(not shared):
                        x = level(x, None, reference=reference)
                    layout[-1].append(len(learners) if level.learns and not shared else None)
                    if level.learns and not shared:
                        learners.append(x)
            if shared:
                x = x.detach().requires_grad_()
                learners.append(x)
            norm = self.norm
            h = F.rms_norm(x[:, :-1], norm.normalized_shape, norm.weight.detach(), norm.eps)
            logits = h @ self.embed.weight.detach().mT
            loss = F.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten(), reduction="sum")
            grads = torch.autograd.grad(loss, learners)
        if shared:
            return [[grads[0]] * len(blk.cms) for blk in self.blocks]
        return [[None if i is None else grads[i] for i in row] for row in layout]


def set_in_context_learning(model: nn.Module, *, cms: bool | None = None, titans: bool | None = None) -> None:
    """Switch the in-context updates of every CMS level and/or Titans memory on or off (the ablations of
    ``deepopt hope eval --no-cms-updates/--no-titans-updates``); ``None`` leaves that part as it is."""
    for m in model.modules():
        if isinstance(m, CMSLevel) and cms is not None:
            m.learns_in_context = cms
        elif isinstance(m, SelfModifyingTitans) and titans is not None:
            m.learns_in_context = titans


def compile_model(model: LanguageModel, **options: Any) -> LanguageModel:
    """``torch.compile`` (``options`` passed on) the repeated pieces of ``model`` in place: HOPE's per-chunk
    functions (the Python loop over chunks stays eager, so one compiled graph serves every chunk of a
    length), the Titans scan op (``deepopt::titans_scan``, a custom op with a fake kernel: no graph break) with
    the chunk math inside it where it runs the torch chunk loop (CPU: ``deepopt.hope.compiled``) and
    Transformer++'s blocks.  Same numbers up to rounding; returns ``model``."""
    for m in model.modules():
        if isinstance(m, SelfModifyingTitans):  # the scan op (one graph per sequence) or the per-chunk function
            m._scan = torch.compile(m._scan, **options)
            m._parallel_chunk = torch.compile(m._parallel_chunk, **options)
            m.chunk_fns = compile_options(**options)
        elif isinstance(m, CMSLevel):
            m._chunk = torch.compile(m._chunk, **options)
            m._scan = torch.compile(m._scan, **options)
        elif isinstance(m, TransformerBlock):
            m.compile(**options)
    return model


def n_params(cfg: HopeConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in LanguageModel(cfg).parameters())


def matched_transformer(cfg: HopeConfig) -> HopeConfig:
    """The Transformer++ with the same width/depth/heads whose SwiGLU width matches HOPE's parameter count (a
    ``short_conv``'s taps come out of the SwiGLU)."""
    target = n_params(replace(cfg, model="hope", short_conv=0))
    base = n_params(replace(cfg, model="transformer", ffn_hidden=1))
    per_unit = 3 * cfg.d_model * cfg.n_layers
    return replace(cfg, model="transformer", ffn_hidden=max(1, 1 + round((target - base) / per_unit)))
