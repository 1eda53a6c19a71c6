"""In-context learning ablations of a trained HOPE model (``deepopt hope eval --ablations``).

Validation perplexity with every memory learning in context, with the CMS levels' in-context updates
off (Eq. 71 never applied: every level reads θ₀), and with the Titans memories' off (η = 0, α = 1:
every memory reads θ₀), as ratios to the full model's; and how often Titans' step size ``η_t`` sits at
its cap (``SelfModifyingTitans.eta_cap``: η_max per token, or η_max/C in the chunk-capped form; a saturated
parameterisation cannot say "learn more from this token").
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

from .model import LanguageModel, SelfModifyingTitans, set_in_context_learning

# ablation name -> the switches of ``set_in_context_learning`` it turns off
ABLATIONS: dict[str, dict[str, bool]] = {
    "no_cms_updates": {"cms": False},
    "no_titans_updates": {"titans": False},
}


@torch.no_grad()
def mean_nll(model: LanguageModel, batches: Iterable[tuple[Tensor, Tensor]]) -> float:
    """Mean next-token negative log-likelihood (nats) of ``model`` over ``batches``."""
    model.eval()
    device = model.embed.weight.device
    total, n = 0.0, 0
    for x, y in batches:
        _, loss = model(x.to(device), y.to(device))
        total, n = total + float(loss) * y.numel(), n + y.numel()
    return total / n


def eta_saturation(model: LanguageModel, batches: Iterable[tuple[Tensor, Tensor]], threshold: float = 0.95
                   ) -> float | None:
    """The fraction of Titans step sizes ``η_t`` (every layer, head and token) at ≥ ``threshold`` times
    their cap (``eta_cap``); ``None`` for a model without Titans layers."""
    layers = [m for m in model.modules() if isinstance(m, SelfModifyingTitans)]
    if not layers:
        return None
    for m in layers:
        m.eta_log = []
    try:
        mean_nll(model, batches)
        at_cap = sum(int((e >= threshold * m.eta_cap).sum()) for m in layers for e in m.eta_log)
        total = sum(e.numel() for m in layers for e in m.eta_log)
    finally:
        for m in layers:
            m.eta_log = None
    return at_cap / total


def in_context_ablations(model: LanguageModel, batches: list[tuple[Tensor, Tensor]]) -> dict[str, float | None]:
    """``val_loss`` of the full model and, per ablation in ``ABLATIONS``, its ``val_loss_<name>`` and
    ``ppl_ratio_<name>`` (ablated / full validation perplexity: > 1 means the updates help), plus
    ``eta_at_cap`` (``eta_saturation``).  Leaves every memory learning in context."""
    full = mean_nll(model, batches)
    out: dict[str, float | None] = {"val_loss": full}
    try:
        for name, off in ABLATIONS.items():
            set_in_context_learning(model, cms=True, titans=True)
            set_in_context_learning(model, **off)
            nll = mean_nll(model, batches)
            out[f"val_loss_{name}"] = nll
            out[f"ppl_ratio_{name}"] = math.exp(nll - full)
    finally:
        set_in_context_learning(model, cms=True, titans=True)
    out["eta_at_cap"] = eta_saturation(model, batches)
    return out
