"""``MemoryOptimizer``: the ``torch.optim.Optimizer`` adapter around a pure deepopt rule.

Each subclass names its rule; ``step`` runs the rule under ``torch.no_grad()`` for every parameter
with a gradient (the for-loop path), or a subclass's multi-tensor/fused fast path that tests keep in
parity with it.  Everything torch.optim users rely on works: param groups, closures, LR schedulers,
``state_dict``/``load_state_dict`` (tensors and plain data only, so ``weights_only=True`` loads it),
step hooks, ``deepcopy``, AMP and bf16 parameters, complex parameters, CUDA graphs (``capturable``).
``step()`` never reads device data on the host (unless ``nonfinite="raise"`` is asked for).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim import Optimizer

from deepopt.rules import RULES, Rule
from deepopt.rules import transforms as T
from deepopt.rules.base import check_bool, check_choice
from deepopt.rules.sharding import is_dtensor
from deepopt.rules.transforms import decoupled, decoupled_rate, is_zero

NONFINITE_POLICIES = ("propagate", "skip", "raise")
_GROUP_OPTIONS = ("foreach", "nonfinite", "capturable")
_GROUP_BOOKKEEPING = ("params", "param_names")
_TORCH_KEYS = ("differentiable",)  # added to ``defaults`` by torch's ``__setstate__``; never a deepopt option
_ALL_HPARAMS = frozenset(k for rule in RULES.values() for k in rule.defaults) | frozenset(_GROUP_OPTIONS)


class NonFiniteGradientError(ValueError):
    """A gradient holds NaN or Inf and the group's policy is ``nonfinite="raise"``."""


class MemoryOptimizer(Optimizer):
    """A ``torch.optim.Optimizer`` that applies ``rule`` to each parameter tensor.

    Options every subclass takes:
        foreach: ``None``/``True`` use the subclass's multi-tensor or fused path when it has one for the
            group's options, ``False`` always runs the pure rule per tensor.  Under ``torch.compile``
            the pure rule runs (it is plain tensor algebra, so it traces without graph breaks).
        nonfinite: what a group does when one of its gradients holds NaN/Inf (real or imaginary part):
            ``"propagate"`` (default; torch.optim's behaviour: no screen, no cost, the values flow into the
            update), ``"skip"`` (the group's step is skipped, parameters and state untouched, decided on the
            device by a found-inf flag as ``GradScaler`` does: no host sync, capturable) or ``"raise"``
            (``NonFiniteGradientError`` before any state or parameter changes; reads one flag per device on
            the host, so it synchronises).
        capturable: ``True`` allows capturing ``step()`` in a CUDA graph (capture is refused otherwise, as torch
            refuses it).
            Every deepopt step keeps its state, step counters and scalars on the parameters' device and
            reads nothing on the host either way, so the flag changes no arithmetic.

    Complex parameters are stepped through their real view (``torch.view_as_real``), as torch.optim does;
    options that read 2-D structure (Newton–Schulz, ``keys="rows"``) refuse them.  A parameter listed twice
    in a group is stepped twice, one occurrence after the other, as torch.optim's for-loop does.
    """

    rule: ClassVar[Rule]
    # Whether ``_fast_step`` handles sharded DTensor parameters (FSDP2); if not, they take the rule path.
    _fast_path_takes_dtensors: ClassVar[bool] = False

    def __init__(self, params: Iterable[Any], *, foreach: bool | None = None, nonfinite: str = "propagate",
                 capturable: bool = False, **hparams: Any) -> None:
        defaults = self.rule.hparams(**hparams)
        defaults.update(foreach=foreach, nonfinite=nonfinite, capturable=capturable)
        _validate_options(defaults)
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for key in _TORCH_KEYS:  # torch adds these to ``defaults``; they are no hyperparameter of ours
            self.defaults.pop(key, None)
        for group in self.param_groups:  # groups saved before an option existed take its default
            for key in _GROUP_OPTIONS:
                group.setdefault(key, self.defaults[key])

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
        if not self.rule.complex_ok(group) and any(
            isinstance(p, Tensor) and p.is_complex() for p in group.get("params", ())
        ):
            raise TypeError(f"{type(self).__name__} with these options reads 2-D structure (Newton–Schulz or "
                            "keys='rows') and does not take complex parameters; pass torch.view_as_real(p) "
                            "or drop the option")

    # ------------------------------------------------------------------ step
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one step; ``closure`` (re-evaluating the loss with grad enabled) is optional."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            self._check_graph_capture()
            work = []
            for group in self.param_groups:
                params, grads = self._collect(group)
                if not params:
                    continue
                found_inf = None
                if group["nonfinite"] != "propagate":
                    found_inf = _found_nonfinite(grads)
                    if group["nonfinite"] == "raise":
                        if bool(found_inf):
                            raise NonFiniteGradientError(
                                f"{type(self).__name__}: a gradient holds NaN or Inf; no state was changed. "
                                "Pass nonfinite='skip' to skip such steps on the device instead."
                            )
                        found_inf = None
                work.append((group, params, grads, found_inf))
            for group, params, grads, found_inf in work:
                hp = _scalar_hparams(group)
                for p in params:  # a rule that keeps no state (plain SGD) leaves ``self.state`` empty, as torch's
                    state = self.state.get(p)
                    if not state:
                        init = self.rule.init(_real(p), hp)
                        if init:
                            self.state[p].update(init)
                    elif isinstance(state.get("step"), Tensor) and state["step"].device != p.device:
                        state["step"] = state["step"].to(p.device)  # assigned from elsewhere (ZeRO puts it on the CPU)
                for round_params, round_grads in _rounds(params, grads):
                    self._update_group(hp, round_params, round_grads, found_inf)
        return loss

    def _check_graph_capture(self) -> None:
        """torch's rule: capturing ``step()`` in a CUDA graph needs ``capturable=True`` in every group.  (torch's
        own check also warns when ``capturable=True`` steps run uncaptured, since its capturable paths are
        slower; deepopt's are the same paths, so there is nothing to warn about.)"""
        if (not torch.compiler.is_compiling() and torch.cuda.is_initialized()
                and torch.cuda.is_current_stream_capturing()
                and not all(group["capturable"] for group in self.param_groups)):
            raise RuntimeError(f"Attempting CUDA graph capture of step() for an instance of {type(self).__name__} "
                               "but param_groups' capturable is False; pass capturable=True")

    def _collect(self, group: dict[str, Any]) -> tuple[list[Tensor], list[Tensor]]:
        params = [p for p in group["params"] if p.grad is not None]
        grads = [p.grad for p in params]
        for g in grads:
            if g.is_sparse:
                raise TypeError(f"{type(self).__name__} does not support sparse gradients "
                                "(grad layout torch.sparse_coo); use dense gradients")
        return params, grads

    def _update_group(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                      found_inf: Tensor | None) -> None:
        # Checked in this frame: torch.compile may trace it on its own after a graph break in ``step``.
        if (group["foreach"] is False or torch.compiler.is_compiling()
                or (not self._fast_path_takes_dtensors and any(map(is_dtensor, params)))
                or any(p.is_complex() for p in params)
                or not (self._fast_step(group, params, grads) if found_inf is None
                        else self._fast_masked_step(group, params, grads, found_inf))):
            self._rule_step(group, params, grads, found_inf)

    def _rule_step(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                   found_inf: Tensor | None = None) -> None:
        """The reference path: the pure rule, one tensor at a time, on real views of complex tensors (their
        state is kept real); with ``found_inf`` (``nonfinite="skip"``) the step is masked by it on the device."""
        keep = None if found_inf is None else found_inf == 0
        for param, g in zip(params, grads):
            state, p = self.state.get(param, {}), _real(param)
            delta, new_state = self.rule.update(_real(g), state, p, group)
            if keep is None:
                p.add_(delta)
            else:
                p.add_(torch.where(keep, delta, torch.zeros_like(delta)))
                new_state = {k: torch.where(keep, v, state[k] if k in state else torch.zeros_like(v))
                             for k, v in new_state.items()}
            if new_state:
                self.state[param].update(new_state)

    def _fast_step(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> bool:
        """Multi-tensor/fused path over real parameters; return ``False`` where the group's options have none.

        A fast path reads no device value on the host and launches a number of kernels that does not grow
        with the number of tensors.
        """
        return False

    def _fast_masked_step(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                          found_inf: Tensor) -> bool:
        """The fast path for ``nonfinite="skip"``: the whole step masked by the 0-dim device flag
        ``found_inf``; ``False`` (the default) runs the masked rule path instead."""
        return False

    @staticmethod
    def _foreach_weight_decay(group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
        """Fast-path weight decay: decoupled shrinks ``W ← (1 − lr·λ)·W`` in place (λ = ``decoupled_rate``), coupled
        returns new ``g + wd·W``."""
        lr, wd = group["lr"], group["weight_decay"]
        if is_zero(wd):
            return grads
        if decoupled(group):
            torch._foreach_mul_(params, 1 - lr * decoupled_rate(group))
            return grads
        if isinstance(wd, Tensor):
            return torch._foreach_add(grads, torch._foreach_mul(params, wd))
        return torch._foreach_add(grads, params, alpha=wd)

    @staticmethod
    def _foreach_descend(params: list[Tensor], direction: list[Tensor], lr: float | Tensor) -> None:
        """``W ← W − lr·u`` over the lists (a tensor ``lr`` stays on the device)."""
        if isinstance(lr, Tensor):
            torch._foreach_sub_(params, torch._foreach_mul(direction, lr))
        else:
            torch._foreach_add_(params, direction, alpha=-lr)

    # ------------------------------------------------------------------ state dicts
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["optimizer"] = type(self).__name__
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load after checking class, hyperparameters and state shapes; on error nothing changes.

        As torch.optim: the load-state-dict pre-hooks run first (so a hook may adapt an older dict before it
        is checked), state entries not keyed by a parameter index (a hook's ``state["note"] = True``) are
        kept as they are, a step counter saved as a Python number is accepted, and the post-hooks run last.
        Step counters go to their parameter's device (torch.optim would leave them where they were saved,
        on the CPU, for its non-fused optimizers); state that a complex parameter keeps for its real view
        stays real (torch.optim casts it to the parameter's complex dtype)."""
        sd = state_dict.copy() if isinstance(state_dict, dict) else state_dict
        for pre_hook in list(self._optimizer_load_state_dict_pre_hooks.values()):
            hooked = pre_hook(self, sd)
            sd = sd if hooked is None else hooked
        self._check_state_dict(sd)
        with self._load_hooks_held() as post_hooks:  # torch's load, without the hooks that run here around it
            super().load_state_dict({k: v for k, v in sd.items() if k != "optimizer"})
        for p, state in self.state.items():
            if not isinstance(p, Tensor) or not isinstance(state, dict):
                continue
            for key, value in state.items():
                if key == "step" and not isinstance(value, Tensor):  # saved as a number (older torch.optim)
                    state[key] = torch.full((), float(value), dtype=T.new_step(_real(p)).dtype, device=p.device)
                elif isinstance(value, Tensor):
                    if key == "step":
                        state[key] = value.to(p.device)
                    elif value.is_complex() and p.is_complex():  # torch cast our real-view state to complex
                        state[key] = value.real.contiguous()
        for post_hook in list(post_hooks.values()):
            post_hook(self)

    @contextlib.contextmanager
    def _load_hooks_held(self):
        """No load-state-dict hooks registered while inside; yields the post-hooks held."""
        held = self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks
        self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks = {}, {}
        try:
            yield held[1]
        finally:
            self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks = held

    def _check_state_dict(self, sd: dict[str, Any]) -> None:
        name = type(self).__name__
        if (not isinstance(sd, dict) or not {"state", "param_groups"} <= set(sd)
                or not isinstance(sd["state"], dict) or not isinstance(sd["param_groups"], (list, tuple))
                or not all(isinstance(g, dict) and isinstance(g.get("params"), (list, tuple))
                           for g in sd["param_groups"])
                or not all(isinstance(st, dict) for pid, st in sd["state"].items() if _is_index(pid))):
            raise TypeError(f"{name}.load_state_dict expects a dict with 'state' (a dict of per-parameter dicts) "
                            "and 'param_groups' (a list of dicts, each with a 'params' list), as state_dict() "
                            "returns")
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
            missing = sorted(set(self.rule.defaults) - set(saved))
            foreign = sorted((set(saved) & _ALL_HPARAMS) - set(self.defaults))
            if missing or foreign:
                raise ValueError(f"state dict is not from a {name}: hyperparameters missing {missing}, "
                                 f"foreign {foreign}")
            try:
                self._validate_group({**{k: self.defaults[k] for k in _GROUP_OPTIONS},
                                      **{k: v for k, v in saved.items() if k not in _GROUP_BOOKKEEPING}})
            except TypeError as err:
                raise ValueError(f"state dict holds invalid hyperparameters: {err}") from err
            for pid, p in zip(saved["params"], ours["params"]):
                index[pid] = (p, saved)
        for pid, st in sd["state"].items():
            if not _is_index(pid):  # not a parameter's state (torch.optim keeps such entries as they are)
                continue
            if pid not in index:
                raise ValueError(f"state dict has state for unknown parameter index {pid}")
            p, group = index[pid]
            want = self.rule.state_shapes(_real(p), {**self.defaults, **group})
            if set(st) != set(want):
                raise ValueError(f"state of parameter {pid} has keys {sorted(st)}, {name} expects {sorted(want)}")
            for key, shape in want.items():
                value = st[key]
                got = (value.shape if isinstance(value, Tensor)
                       else torch.Size() if key == "step" and _is_number(value) else None)
                if got != shape:
                    raise ValueError(f"state[{pid}][{key!r}] has shape {None if got is None else tuple(got)},"
                                     f" expected {tuple(shape)}")


def _is_index(key: Any) -> bool:
    """Whether a ``state`` key of a state dict names a parameter (torch.optim numbers them 0, 1, …)."""
    return isinstance(key, int) and not isinstance(key, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _validate_options(group: dict[str, Any]) -> None:
    if group["foreach"] is not None and not isinstance(group["foreach"], bool):
        raise TypeError(f"foreach must be None, True or False, got {group['foreach']!r}")
    check_choice("nonfinite", group["nonfinite"], NONFINITE_POLICIES)
    check_bool("capturable", group["capturable"])


def by_device_and_dtype(params: list[Tensor], *lists: list[Tensor]) -> list[tuple[list[Tensor], ...]]:
    """``(params, *lists)`` split into buckets of one (device, dtype) of the parameter, as fused kernels need."""
    buckets: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], ...]] = {}
    for p, *others in zip(params, *lists):
        bucket = buckets.setdefault((p.device, p.dtype), tuple([] for _ in range(1 + len(lists))))
        for lst, t in zip(bucket, (p, *others)):
            lst.append(t)
    return list(buckets.values())


def _real(t: Tensor) -> Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def _scalar_hparams(group: dict[str, Any]) -> dict[str, Any]:
    """The group, with 1-element tensor hyperparameters of any shape viewed as 0-dim (torch accepts
    ``lr=torch.tensor([[0.1]])`` and squeezes it the same way)."""
    if not any(isinstance(v, Tensor) and v.dim() for v in group.values()):
        return group
    return {k: v.reshape(()) if isinstance(v, Tensor) and v.dim() else v for k, v in group.items()}


def _rounds(params: list[Tensor], grads: list[Tensor]):
    """The (params, grads) lists split so no parameter appears twice in one: its k-th occurrence goes to
    round k, so repeated parameters are stepped one after the other, as torch.optim's for-loop does."""
    seen: dict[Tensor, int] = {}
    rounds: list[tuple[list[Tensor], list[Tensor]]] = []
    for p, g in zip(params, grads):
        k = seen[p] = seen.get(p, -1) + 1
        if k == len(rounds):
            rounds.append(([], []))
        rounds[k][0].append(p)
        rounds[k][1].append(g)
    return rounds


def _found_nonfinite(grads: list[Tensor]) -> Tensor:
    """A 0-dim float flag on the first gradient's device: 1 if any gradient holds NaN/Inf (real or
    imaginary part), else 0.  One max-norm launch per device; nothing is read on the host."""
    by_device: dict[torch.device, list[Tensor]] = {}
    for g in grads:
        by_device.setdefault(g.device, []).append(_real(g))
    home = grads[0].device
    flags = [torch.stack(torch._foreach_norm(gs, ord=math.inf)).isfinite().all().logical_not().to(home)
             for gs in by_device.values()]
    return (torch.stack(flags).any() if len(flags) > 1 else flags[0]).float()


