"""What meta-training learns: a rule's hyperparameters (and DMGD's initial memory) as raw tensors.

Each learnable hyperparameter lives in an unconstrained raw tensor and is mapped into its range::

    positive (lr, eta, eta2, lr_decay, lr_power, lr_warmup): x = exp(r)
    unit interval (μ, β, β₁, β₂; DMGD's momentum α, its Adam preconditioner's β₂ and its ``timescales``, a
    vector): x = sigmoid(r)
    memory θ₀ = (W₁, W₂):        x = r

``MetaParams.hparams(raw)`` is a pure function of the raw tensors (``torch.func``/``vmap`` friendly)
returning the full hyperparameter mapping a rule's ``update`` reads.  For DeepMomentum the memory keeps
adapting online from the learned θ₀: ``rule.init`` copies ``memory_init`` with its graph kept.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

import deepopt
from deepopt.rules import deep_momentum, get_rule
from deepopt.rules.deep import initial_memory

# rule -> learnable name -> parametrisation
LEARNABLE: dict[str, dict[str, str]] = {
    "sgd": {"lr": "log"},
    "momentum": {"lr": "log", "momentum": "logit"},
    "adam": {"lr": "log", "beta1": "logit", "beta2": "logit"},
    "delta_momentum": {"lr": "log", "momentum": "logit", "beta": "logit"},
    "deep_momentum": {"lr": "log", "momentum": "logit", "eta": "log", "lr_decay": "log", "lr_power": "log",
                      "beta2": "logit", "W1": "none", "W2": "none", "timescales": "logit", "lr_warmup": "log",
                      "eta2": "log"},
}
_TO_RAW = {"log": torch.log, "logit": torch.logit, "none": lambda t: t}
_FROM_RAW = {"log": torch.exp, "logit": torch.sigmoid, "none": lambda t: t}
# Defaults per rule: DMGD learns everything but the outer lr (it has a closed-form-ish role).
DEFAULT_LEARN: dict[str, tuple[str, ...]] = {
    "sgd": ("lr",),
    "momentum": ("lr", "momentum"),
    "adam": ("lr", "beta1", "beta2"),
    "delta_momentum": ("lr", "momentum", "beta"),
    "deep_momentum": ("W1", "W2", "momentum", "eta", "lr"),
}


class MetaParams(nn.Module):
    """The raw learnable tensors of one rule plus its fixed hyperparameters.

    Args:
        rule: a rule name from ``deepopt.rules.RULES``.
        learn: names to learn (see ``LEARNABLE[rule]``; DMGD's "W1"/"W2" are θ₀); default
            ``DEFAULT_LEARN[rule]``.
        dtype: dtype of the raw tensors.
        **hparams: the rule's hyperparameters (initial values of the learned ones, fixed values of the rest).
    """

    def __init__(
        self,
        rule: str,
        learn: Iterable[str] | None = None,
        dtype: torch.dtype = torch.float32,
        **hparams: Any,
    ) -> None:
        super().__init__()
        self.rule = get_rule(rule)
        self.learn = tuple(DEFAULT_LEARN[rule] if learn is None else learn)
        unknown = sorted(set(self.learn) - set(LEARNABLE[rule]))
        if unknown:
            raise ValueError(
                f"learn: {unknown} cannot be learned for {rule}; accepted: {sorted(LEARNABLE[rule])}"
            )
        self.static = self.rule.hparams(**hparams)
        initial = self._initial_values(dtype)
        self.raw = nn.ParameterDict(
            {k: nn.Parameter(_TO_RAW[LEARNABLE[rule][k]](initial[k].to(dtype))) for k in self.learn}
        )

    def _initial_values(self, dtype: torch.dtype) -> dict[str, Tensor]:
        hp = self.static
        values = {k: hp[k] for k in ("lr", "momentum", "eta", "beta", "lr_decay", "lr_power", "lr_warmup", "eta2",
                                     "timescales") if k in hp}
        for k in self.learn:
            if LEARNABLE[self.rule.name][k] == "log" and not float(values[k]) > 0:  # a scalar
                raise ValueError(f"{k} starts at {values[k]} but must start > 0 to be learned (x = exp(r))")
        if self.rule.name == "adam":
            values["beta1"], values["beta2"] = hp["betas"]
        elif "beta2" in hp:  # a memory rule's Adam preconditioner
            values["beta2"] = hp["beta2"]
        if self.rule is deep_momentum:
            values["W1"], values["W2"] = initial_memory(hp, torch.float64, torch.device("cpu"))
        return {k: torch.as_tensor(v, dtype=torch.float64) for k, v in values.items()}

    def values(self, raw: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """The learned hyperparameters in their own ranges, from ``raw`` (default: this module's)."""
        raw = dict(self.raw) if raw is None else raw
        return {k: _FROM_RAW[LEARNABLE[self.rule.name][k]](raw[k]) for k in self.learn}

    def hparams(self, raw: Mapping[str, Tensor] | None = None) -> dict[str, Any]:
        """The full mapping ``rule.update`` reads: fixed hyperparameters with the learned ones substituted."""
        v = self.values(raw)
        hp = {**self.static, **{k: x for k, x in v.items() if k in self.static}}
        if "betas" in self.static and ("beta1" in v or "beta2" in v):  # Adam's pair
            b1, b2 = self.static["betas"]
            hp["betas"] = (v.get("beta1", b1), v.get("beta2", b2))
        if "W1" in v or "W2" in v:
            w1, w2 = initial_memory(self.static, v.get("W1", v.get("W2")).dtype, torch.device("cpu"))
            hp["memory_init"] = (v.get("W1", w1), v.get("W2", w2))
        return hp

    def learned_keys(self) -> tuple[str, ...]:
        """Hyperparameter names (as the rule spells them) that ``hparams`` replaces with tensors."""
        rename = {"W1": "memory_init", "W2": "memory_init"}
        if "betas" in self.static:
            rename.update(beta1="betas", beta2="betas")
        return tuple(dict.fromkeys(rename.get(k, k) for k in self.learn))

    def export(self) -> tuple[str, dict[str, Any], dict[str, Tensor]]:
        """``(optimizer class name, plain hparams, tensors)`` for ``deepopt.checkpoint.save_pretrained``
        (Adam's ``betas`` become ``beta1``/``beta2``; ``meta_train.load_learned`` pairs them again)."""
        with torch.no_grad():
            hp = self.hparams()
        tensors: dict[str, Tensor] = {}
        plain: dict[str, Any] = {}
        if self.rule is deep_momentum:
            w1, w2 = hp["memory_init"] or initial_memory(hp, torch.float32, torch.device("cpu"))
            tensors = {"W1": w1.detach().clone(), "W2": w2.detach().clone()}
        for k, v in hp.items():
            if k == "memory_init":
                continue
            if k == "betas":  # save_pretrained takes plain scalars only
                plain["beta1"], plain["beta2"] = (float(b) for b in v)
            elif k == "timescales":
                plain[k] = [float(g) for g in v]
            else:
                plain[k] = float(v) if isinstance(v, Tensor) else v
        return deepopt.OPTIMIZERS[self.rule.name].__name__, plain, tensors
