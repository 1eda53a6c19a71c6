"""The shape every associative-memory rule shares, and the checks on its hyperparameters.

A rule is a pair of pure functions in the spirit of optax::

    state = rule.init(param, hp)                       # fresh tensors, never aliases ``param``
    delta, new_state = rule.update(grad, state, param, hp)
    param_next = param + delta                         # ``delta`` already carries ``-lr``

``update`` performs no in-place operation on its inputs, so ``torch.func.grad``/``vmap`` can
differentiate through it, and every hyperparameter may be a 0-dim tensor (meta-training makes
them learnable).  ``hp`` is any mapping holding the rule's keys, e.g. a ``torch.optim`` param group.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

State = dict[str, Tensor]
Hparams = Mapping[str, Any]
_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, Tensor)):
        raise TypeError(f"{name} must be a real number or a 0-dim tensor, got {type(value).__name__}")
    if isinstance(value, Tensor):
        if value.is_complex() or not (value.is_floating_point() or value.dtype in _INT_DTYPES):
            raise TypeError(f"{name} must be a real number or a real 1-element tensor, got dtype {value.dtype}")
        if value.numel() != 1:  # torch.optim's wording and exception type
            raise ValueError(f"Tensor {name} must be 1-element, got shape {tuple(value.shape)}")
        return float(value.detach())
    return float(value)


def check_range(
    name: str, value: Any, low: float, high: float = math.inf, *, low_open: bool = False, high_open: bool = False
) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``low <=/< value <=/< high`` (NaN is always rejected)."""
    x = _as_float(name, value)
    lo_ok = x > low if low_open else x >= low
    hi_ok = x < high if high_open else x <= high
    if math.isnan(x) or not (lo_ok and hi_ok):
        lo = "(" if low_open else "["
        hi = ")" if high_open or high == math.inf else "]"
        raise ValueError(f"{name} must be in {lo}{low}, {high}{hi}, got {x}")


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_int(name: str, value: Any, low: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value}")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def check_betas(name: str, betas: Any) -> None:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"{name} must be a pair (beta1, beta2), got {betas!r}")
    for i, b in enumerate(betas):
        check_range(f"{name}[{i}]", b, 0.0, 1.0, high_open=True)


@dataclass(frozen=True)
class Rule:
    """An associative-memory update rule: ``init``/``update`` plus its hyperparameters."""

    name: str
    defaults: Mapping[str, Any]
    init: Callable[[Tensor, Hparams], State]
    update: Callable[[Tensor, State, Tensor, Hparams], tuple[Tensor, State]]
    validate: Callable[[Hparams], None]
    doc: str = field(default="", compare=False)
    # True when, under ``hp``, each coordinate's update depends on that coordinate alone (so the rule
    # may run on several tensors concatenated into one; its scalar state entries are shared)
    elementwise: Callable[[Hparams], bool] = field(default=lambda hp: False, compare=False)
    # True when, under ``hp``, the rule may run on the real view (``torch.view_as_real``) of a complex
    # parameter, as torch.optim does for complex parameters; False where it reads 2-D structure (rows as
    # keys, Newton–Schulz), which a complex matrix's real view does not have
    complex_ok: Callable[[Hparams], bool] = field(default=lambda hp: True, compare=False)

    def hparams(self, **overrides: Any) -> dict[str, Any]:
        """The defaults updated by ``overrides``, validated; unknown names raise ``TypeError``."""
        unknown = sorted(set(overrides) - set(self.defaults))
        if unknown:
            raise TypeError(
                f"{self.name}: unknown hyperparameter(s) {unknown}; accepted: {sorted(self.defaults)}"
            )
        hp = {**self.defaults, **overrides}
        self.validate(hp)
        return hp

    def state_shapes(self, param: Tensor, hp: Hparams) -> dict[str, torch.Size]:
        """Shapes of the state ``init`` makes for ``param`` (used to check loaded state dicts)."""
        with torch.no_grad():
            return {k: v.shape for k, v in self.init(param.detach(), hp).items()}
