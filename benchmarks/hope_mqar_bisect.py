"""Which part of HOPE's Titans branch stops MQAR binding: the branch swapped for reference memories.

Every variant is the same ``LanguageModel`` (size tiny's skeleton at width 64: embedding, two blocks each with the
CMS chain after the memory branch, tied head), trained the same way as ``deepopt hope mqar``'s CPU recipe (MQAR
64×4, vocabulary 512, batch 32, AdamW with weight decay 0.1 on matrices, 10% warm-up then cosine to 10%, gradient
clip 1, seed 0); only each block's Titans branch ``f`` in ``x + f(norm(x))`` differs:

* ``hope``: the real ``SelfModifyingTitans`` (the control).
* ``delta``: DeltaNet (Yang et al. 2024) per head: q, k, v from separate projections, each through a width-4 causal
  conv, q and k ℓ2-normalised, ``β_t = sigmoid(w·x_t + b)``, ``S ← S + β_t (v_t − S k_t) k_tᵀ``, ``y_t = S q_t``.
* ``delta-shared-u``: DeltaNet whose k and v are HOPE's: ``k = M_k(u)/‖·‖``, ``v = M_v(u)`` with
  ``M(u) = u + W₁σ(W₂u)`` static (outer parameters, HOPE's θ₀ init) of one conv'd projection u.
* ``delta-shared-u-nores``: the same without the residual ``u +`` in M_k and M_v.
* ``delta-separate-u``: HOPE's M_k, M_v (with residual) each reading its own conv'd projection.
* ``mlp-memory``: DeltaNet's q, k, v with HOPE's memory form ``y = q + W₁σ(W₂q)``: W₂ static, W₁ learns in
  context by the normalised delta step ``W₁ ← W₁ − β_t (M(k_t) − v_t) h_tᵀ/(1 + ‖h_t‖²)``, ``h_t = σ(W₂k_t)``.
* ``linear-feature-memory``: the same with σ = identity and no residual (a delta rule on the static features W₂k).

Token-by-token Python loops (64 tokens), no chunking: a diagnostic, not a model the package offers.

Two θ₀ options probe the failing parts: ``--kv-w1-std`` (the static M_k, M_v maps' W₁ std, HOPE's 0.5) and
``--orthogonal-w2`` (the memory's static W₂ made orthogonal instead of a Gaussian draw).

Usage: python benchmarks/hope_mqar_bisect.py VARIANT [VARIANT ...] [--steps 800] [--lr 3e-3] [--seed 0]
       [--kv-w1-std 0.5] [--orthogonal-w2]
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepopt.hope.model import CausalConv, LanguageModel
from deepopt.hope.mqar import mqar_batch, mqar_eval
from deepopt.hope.recall import train_steps
from deepopt.hope.train import Trainer, make_optimizer, model_config
from deepopt.rules.deep import apply_memory

# variant: (how k and v are made from the conv'd projections, memory form)
VARIANTS = {
    "delta": ("separate", "delta"),
    "delta-shared-u": ("shared", "delta"),
    "delta-shared-u-nores": ("shared-nores", "delta"),
    "delta-separate-u": ("separate-mlp", "delta"),
    "mlp-memory": ("separate", "mlp"),
    "linear-feature-memory": ("separate", "linear"),
}
WIDTH, HEADS, HIDDEN, VOCAB, SETTING, BATCH = 64, 4, 16, 512, (64, 4), 32
EVAL_SETTINGS = ((64, 4), (64, 8), (128, 4))  # (length, pairs): the training setting, more pairs, twice as long


class ReferenceMemory(nn.Module):
    """One variant's memory branch (module doc), per head of ``d/HEADS`` channels."""

    def __init__(self, d: int, variant: str, kv_w1_std: float = 0.5, orthogonal_w2: bool = False) -> None:
        super().__init__()
        self.inputs, self.memory = VARIANTS[variant]
        self.H, self.dh = HEADS, d // HEADS
        n_in = (2 if self.inputs.startswith("shared") else 3) * d  # u and q, or q, k (u_k) and v (u_v)
        self.proj = nn.Linear(d, n_in, bias=False)
        self.conv = CausalConv(n_in, 4, 0.1)
        self.beta = nn.Linear(d, HEADS)
        nn.init.zeros_(self.beta.weight)
        self.out = nn.Linear(d, d, bias=False)
        if self.inputs != "separate":  # static residual-MLP maps M_k, M_v (HOPE's θ₀: W₁ std 0.5, W₂ gain 4)
            self.W1 = nn.Parameter(kv_w1_std * torch.randn(HEADS, 2, self.dh, HIDDEN))
            self.W2 = nn.Parameter(4.0 * torch.randn(HEADS, 2, HIDDEN, self.dh) / math.sqrt(self.dh))
        if self.memory != "delta":  # the memory's θ₀ (HOPE's M_mem: W₁ std 0.02, W₂ gain 4)
            self.M1 = nn.Parameter(0.02 * torch.randn(HEADS, self.dh, HIDDEN))
            w2 = 4.0 * torch.randn(HEADS, HIDDEN, self.dh) / math.sqrt(self.dh)
            if orthogonal_w2:  # the same draw made orthogonal, every singular value 2 (‖W₂k‖ = 2 for unit k)
                w2 = 2.0 * torch.linalg.qr(w2)[0]
            self.M2 = nn.Parameter(w2)

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, T, _ = x.shape
        z = self.conv(self.proj(x))
        parts = z.view(B, T, -1, self.H, self.dh).permute(2, 0, 3, 1, 4)  # (n, B, H, T, dh)
        if self.inputs == "separate":
            q, k, v = parts
        elif self.inputs == "separate-mlp":
            q, uk, uv = parts
            k, v = (apply_memory(self.W1[None, :, i], self.W2[None, :, i], u, "silu") for i, u in ((0, uk), (1, uv)))
        else:
            u, q = parts
            k, v = (apply_memory(self.W1[None, :, i], self.W2[None, :, i], u, "silu") for i in (0, 1))
            if self.inputs == "shared-nores":
                k, v = k - u, v - u
        return F.normalize(q, dim=-1), F.normalize(k, dim=-1), v

    def forward(self, x: Tensor, reference: bool = False) -> Tensor:
        B, T, d = x.shape
        q, k, v = self._qkv(x)
        beta = torch.sigmoid(self.beta(x)).transpose(1, 2)[..., None]  # (B, H, T, 1)
        if self.memory == "delta":
            S = x.new_zeros(B, self.H, self.dh, self.dh)
            ys = []
            for t in range(T):
                kt = k[:, :, t]
                S = S + (beta[:, :, t] * (v[:, :, t] - (S @ kt[..., None])[..., 0]))[..., None] * kt[..., None, :]
                ys.append((S @ q[:, :, t, :, None])[..., 0])
        else:
            act, res = (F.silu, 1.0) if self.memory == "mlp" else ((lambda z: z), 0.0)
            hk, hq = (act(torch.einsum("hij,bhtj->bhti", self.M2, a)) for a in (k, q))
            W1 = self.M1[None].expand(B, -1, -1, -1)
            ys = []
            for t in range(T):
                h = hk[:, :, t]
                err = (W1 @ h[..., None])[..., 0] + res * k[:, :, t] - v[:, :, t]
                W1 = W1 - (beta[:, :, t] / (1 + (h * h).sum(-1, keepdim=True)) * err)[..., None] * h[..., None, :]
                ys.append((W1 @ hq[:, :, t, :, None])[..., 0] + res * q[:, :, t])
        return self.out(torch.stack(ys, 2).transpose(1, 2).reshape(B, T, d))


def build(variant: str, seed: int, **init: Any) -> LanguageModel:
    """The model of ``variant`` (``hope`` or a ``VARIANTS`` name) at seed ``seed``; ``init``: ``ReferenceMemory``'s
    θ₀ options (``kv_w1_std``, ``orthogonal_w2``)."""
    if variant != "hope" and variant not in VARIANTS:
        raise ValueError(f"variant must be hope or one of {sorted(VARIANTS)}, got {variant!r}")
    cfg = model_config("hope", "tiny", d_model=WIDTH, n_layers=2, n_heads=HEADS, cms_hidden=WIDTH, vocab_size=VOCAB)
    torch.manual_seed(seed)
    model = LanguageModel(cfg)
    if variant != "hope":
        for blk in model.blocks:
            blk.titans.f = ReferenceMemory(WIDTH, variant, **init)
    return model


def run(variant: str, steps: int, lr: float, seed: int, eval_samples: int = 256, **init: Any) -> dict:
    """Train ``variant`` (θ₀ options ``init``, as ``build``'s) on MQAR 64×4 and evaluate it on held-out 64×4, 64×8
    and 128×4 sequences."""
    model = build(variant, seed, **init)
    trainer = Trainer(model, make_optimizer("torch_adamw", model, lr, 0.1), lr=lr, steps=steps,
                      warmup=max(1, steps // 10))
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    loss = train_steps(trainer, lambda s: mqar_batch(BATCH, *SETTING, VOCAB, gen), False, variant)
    result = {"variant": variant, "final_train_loss": loss["final_train_loss"], "diverged": loss["diverged"],
              "seconds": time.perf_counter() - t0}
    for length, pairs in EVAL_SETTINGS:
        r = mqar_eval(model, length, pairs, eval_samples, BATCH, seed, VOCAB)
        result[f"{length}x{pairs}"] = {"accuracy": r["accuracy"], "bound_share": r["bound_share"]}
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variants", nargs="+", choices=["hope", *VARIANTS])
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--kv-w1-std", type=float, default=0.5,
                   help="std of the static M_k, M_v maps' W₁ at θ₀ (HOPE's default 0.5; 0.02: near the identity)")
    p.add_argument("--orthogonal-w2", action="store_true",
                   help="the memory's static W₂ at θ₀ orthogonal (singular values 2) instead of Gaussian (gain 4)")
    args = p.parse_args()
    if args.steps < 1 or not args.lr > 0:
        p.error(f"--steps must be >= 1 and --lr > 0, got {args.steps} and {args.lr}")
    torch.set_num_threads(args.threads)
    print("variant | final train loss | 64x4 acc (bound) | 64x8 acc (bound) | 128x4 acc (bound) | s")
    for variant in args.variants:
        r = run(variant, args.steps, args.lr, args.seed, kv_w1_std=args.kv_w1_std, orthogonal_w2=args.orthogonal_w2)
        cells = " | ".join(f"{r[c]['accuracy']:.3f} ({r[c]['bound_share']:.3f})"
                           for c in (f"{length}x{pairs}" for length, pairs in EVAL_SETTINGS))
        print(f"{variant} | {r['final_train_loss']:.3f} | {cells} | {r['seconds']:.0f}", flush=True)


if __name__ == "__main__":
    main()
