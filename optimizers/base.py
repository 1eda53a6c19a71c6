"""``MemoryOptimizer``: the ``torch.optim.Optimizer`` adapter around a pure deepopt rule.

Each subclass names its rule; ``step`` runs the rule under ``torch.no_grad()`` for every parameter
with a gradient (the for-loop path), or a subclass's multi-tensor/fused fast path that tests keep in
parity with it.  Everything torch.optim users rely on works: param groups, closures, LR schedulers,
``state_dict``/``load_state_dict`` (tensors and plain data only, so ``weights_only=True`` loads it),
step hooks, ``deepcopy``, AMP and bf16 parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim import Optimizer

from deepopt.rules import RULES, Rule
from deepopt.rules.base import check_choice

NONFINITE_POLICIES = ("raise", "skip")
_GROUP_OPTIONS = ("foreach", "nonfinite")
_GROUP_BOOKKEEPING = ("params", "param_names")
_ALL_HPARAMS = frozenset(k for rule in RULES.values() for k in rule.defaults) | frozenset(_GROUP_OPTIONS)


class NonFiniteGradientError(ValueError):
    """A gradient holds NaN or Inf and the group's policy is ``nonfinite="raise"``."""


class MemoryOptimizer(Optimizer):
    """A ``torch.optim.Optimizer`` that applies ``rule`` to each parameter tensor.

    Options every subclass takes:
        foreach: ``None``/``True`` use the subclass's multi-tensor or fused path when it has one for the
            group's options, ``False`` always runs the pure rule per tensor.  Under ``torch.compile``
            the pure rule runs (it is plain tensor algebra, so it traces without graph breaks).
        nonfinite: what a group does when one of its gradients holds NaN/Inf: ``"raise"`` (default,
            ``NonFiniteGradientError`` before any state or parameter changes) or ``"skip"`` (that
            group's step is skipped, its state untouched).
    """

    rule: ClassVar[Rule]
    # Whether ``_fast_step`` handles sharded DTensor parameters (FSDP2); if not, they take the rule path.
    _fast_path_takes_dtensors: ClassVar[bool] = False

    def __init__(self, params: Iterable[Any], *, foreach: bool | None = None, nonfinite: str = "raise",
                 **hparams: Any) -> None:
        defaults = self.rule.hparams(**hparams)
        defaults.update(foreach=foreach, nonfinite=nonfinite)
        _validate_options(defaults)
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ param groups and validation
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        try:
            self._validate_group(self.param_groups[-1])
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise

    def _validate_group(self, group: dict[str, Any]) -> None:
        """Check the group's hyperparameters.  Other keys are allowed (as in torch.optim: a scheduler's
        ``initial_lr``, a user's ``name``) unless they are another deepopt rule's hyperparameters."""
        foreign = sorted((set(group) & _ALL_HPARAMS) - set(self.defaults))
        if foreign:
            raise TypeError(f"{type(self).__name__} has no hyperparameter(s) {foreign}; "
                            f"accepted: {sorted(self.defaults)}")
        self.rule.validate(group)
        _validate_options(group)

    # ------------------------------------------------------------------ step
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one step; ``closure`` (re-evaluating the loss with grad enabled) is optional."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            work = []
            for group in self.param_groups:
                params = [p for p in group["params"] if p.grad is not None]
                grads = [p.grad for p in params]
                for g in grads:
                    if g.is_sparse:
                        raise TypeError(f"{type(self).__name__} does not support sparse gradients "
                                        "(grad layout torch.sparse_coo); use dense gradients")
                if params and not _all_finite(grads):
                    if group["nonfinite"] == "raise":
                        raise NonFiniteGradientError(
                            f"{type(self).__name__}: a gradient holds NaN or Inf; no state was changed. "
                            "Pass nonfinite='skip' to skip such steps instead."
                        )
                    continue
                work.append((group, params, grads))
            for group, params, grads in work:
                if params:
                    for p in params:
                        if not self.state[p]:
                            self.state[p].update(self.rule.init(p, group))
                    self._update_group(group, params, grads)
        return loss

    def _update_group(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        # Checked in this frame: torch.compile may trace it on its own after a graph break in ``step``.
        if (group["foreach"] is False or torch.compiler.is_compiling()
                or (not self._fast_path_takes_dtensors and any(map(is_dtensor, params)))
                or not self._fast_step(group, params, grads)):
            self._rule_step(group, params, grads)

    def _rule_step(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        """The reference path: the pure rule, one tensor at a time."""
        for p, g in zip(params, grads):
            state = self.state[p]
            delta, new_state = self.rule.update(g, state, p, group)
            p.add_(delta)
            state.update(new_state)

    def _fast_step(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> bool:
        """Multi-tensor/fused path; return ``False`` where the group's options have none."""
        return False

    @staticmethod
    def _foreach_weight_decay(group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
        """Fast-path weight decay: decoupled shrinks ``W`` in place, coupled returns new ``g + wd·W``."""
        lr, wd = group["lr"], group["weight_decay"]
        if wd == 0:
            return grads
        if group["decoupled_weight_decay"]:
            torch._foreach_mul_(params, 1 - lr * wd)
            return grads
        return torch._foreach_add(grads, params, alpha=wd)

    # ------------------------------------------------------------------ state dicts
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["optimizer"] = type(self).__name__
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load after checking class, hyperparameters and state shapes; on error nothing changes."""
        self._check_state_dict(state_dict)
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "optimizer"})

    def _check_state_dict(self, sd: dict[str, Any]) -> None:
        name = type(self).__name__
        if not isinstance(sd, dict) or not {"state", "param_groups"} <= set(sd):
            raise TypeError(f"{name}.load_state_dict expects a dict with 'state' and 'param_groups'")
        if sd.get("optimizer", name) != name:
            raise ValueError(f"state dict was saved by {sd['optimizer']}, not {name}")
        saved_groups = sd["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state dict has {len(saved_groups)} param groups, {name} has "
                             f"{len(self.param_groups)}")
        index: dict[int, tuple[Tensor, dict[str, Any]]] = {}
        for ours, saved in zip(self.param_groups, saved_groups):
            if len(ours["params"]) != len(saved["params"]):
                raise ValueError("a param group's size differs from the one in the state dict "
                                 f"({len(saved['params'])} saved, {len(ours['params'])} here)")
            missing = sorted(set(self.defaults) - set(saved))
            foreign = sorted((set(saved) & _ALL_HPARAMS) - set(self.defaults))
            if missing or foreign:
                raise ValueError(f"state dict is not from a {name}: hyperparameters missing {missing}, "
                                 f"foreign {foreign}")
            try:
                self._validate_group({k: v for k, v in saved.items() if k not in _GROUP_BOOKKEEPING})
            except TypeError as err:
                raise ValueError(f"state dict holds invalid hyperparameters: {err}") from err
            for pid, p in zip(saved["params"], ours["params"]):
                index[pid] = (p, saved)
        for pid, st in sd["state"].items():
            if pid not in index:
                raise ValueError(f"state dict has state for unknown parameter index {pid}")
            p, group = index[pid]
            want = self.rule.state_shapes(p, group)
            if set(st) != set(want):
                raise ValueError(f"state of parameter {pid} has keys {sorted(st)}, {name} expects {sorted(want)}")
            for key, shape in want.items():
                got = st[key].shape if isinstance(st[key], Tensor) else None
                if got != shape:
                    raise ValueError(f"state[{pid}][{key!r}] has shape {None if got is None else tuple(got)},"
                                     f" expected {tuple(shape)}")


if torch.distributed.is_available():
    from torch.distributed.tensor import DTensor

    def is_dtensor(t: Tensor) -> bool:
        return isinstance(t, DTensor)
else:
    def is_dtensor(t: Tensor) -> bool:
        return False


def _validate_options(group: dict[str, Any]) -> None:
    if group["foreach"] is not None and not isinstance(group["foreach"], bool):
        raise TypeError(f"foreach must be None, True or False, got {group['foreach']!r}")
    check_choice("nonfinite", group["nonfinite"], NONFINITE_POLICIES)


def _all_finite(tensors: list[Tensor]) -> bool:
    """Screen with one sum per tensor (NaN/Inf anywhere makes the sum non-finite; one sync per device),
    and only where a sum is non-finite (NaN/Inf, or finite values summing past the dtype's range) look
    element-wise."""
    by_device: dict[torch.device, list[Tensor]] = {}
    for t in tensors:
        by_device.setdefault(t.device, []).append(t.sum().float())
    if all(bool(torch.stack(sums).isfinite().all()) for sums in by_device.values()):
        return True
    return all(bool(t.isfinite().all()) for t in tensors)
