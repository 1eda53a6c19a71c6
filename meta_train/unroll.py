"""The torch.func unroll engine: K inner steps of a pure deepopt rule, differentiable end to end.

One inner step on task parameters θ with rule state s and hyperparameters h(r) (r: raw meta-params)::

    ℓ_t, g_t = value_and_grad_θ  L(θ_t; batch_t)                 (torch.func, graph kept)
    Δ, s_{t+1} = rule.update(g_t, s_t, θ_t, h(r));   θ_{t+1} = θ_t + Δ

The outer loss of an unroll of K steps from step t₀ is the mean inner loss
``F(r) = (1/K) Σ_t ℓ_t`` (``outer="train"``), its log version ``(1/K) Σ_t log ℓ_t`` (``"log_train"``,
weighs late, low-loss progress as much as early progress) or the mean loss on held-out batches after
each step, ``(1/K) Σ_t L(θ_{t+1}; heldout_t)`` (``outer="heldout"``).  Truncated BPTT carries (θ, s) between
unrolls, detached.  ``Backprop(checkpoint_every=S)`` differentiates with segment checkpointing: the
forward pass keeps only the state at every S-th step, the backward pass recomputes one segment at
a time and chains vector–Jacobian products, so memory is O(K/S + S) states instead of O(K).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.func import grad_and_value, vmap
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from .params import MetaParams
from .tasks import Batch, Task, TaskStack

OUTER_LOSSES = ("train", "log_train", "heldout")
Params = dict[str, Tensor]
RuleState = dict[str, dict[str, Tensor]]


@dataclass
class InnerState:
    """Where a task's inner optimisation stands: weights, rule state (``None`` = fresh) and step index.

    ``particles``: what a persistent estimator (``es.PES``) carries between truncations besides the central
    trajectory — its perturbed trajectories' weights and states, stacked, and their accumulated perturbations."""

    params: Params
    state: RuleState | None = None
    step: int = 0
    particles: dict[str, Any] | None = None

    @classmethod
    def fresh(cls, task: Task | TaskStack) -> InnerState:
        return cls(task.init_params())

    def detached(self) -> InnerState:
        params, state, particles = tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t,
                                            (self.params, self.state, self.particles))
        return InnerState(params, state, self.step, particles)

    @classmethod
    def stack(cls, inners: list[InnerState]) -> InnerState:
        """The inner state of a ``TaskStack`` from its tasks' states (all at the same step)."""
        if len({i.step for i in inners}) != 1 or len({i.state is None for i in inners}) != 1:
            raise ValueError("stacked inner states must share their step and all be fresh or all started")
        def stacked(trees: list[Any]) -> Any:
            return tree_map(lambda *ts: torch.stack(ts), *trees)

        state = None if inners[0].state is None else stacked([i.state for i in inners])
        return cls(stacked([i.params for i in inners]), state, inners[0].step)

    def unstack(self) -> list[InnerState]:
        """The per-task inner states of a stacked one."""
        n = next(iter(self.params.values())).shape[0]
        return [InnerState(*tree_map(lambda t, i=i: t[i], (self.params, self.state)), self.step) for i in range(n)]


class FlatParams:
    """Named tensors as one flat vector and back (``split`` returns views, so gradients flow to the vector).

    ``state_shapes``: the rule's state shapes for a 2-element vector; entries shaped ``(2,)`` are
    per-coordinate and are concatenated too, the others (e.g. Adam's 0-dim step count, equal for tensors
    that were stepped together) are shared."""

    def __init__(self, like: Params, state_shapes: dict[str, torch.Size]) -> None:
        self.names = list(like)
        self.shapes = [like[k].shape for k in self.names]
        self.sizes = [like[k].numel() for k in self.names]
        self.per_coordinate = {key for key, shape in state_shapes.items() if shape == (2,)}

    def join(self, tensors: Params) -> Tensor:
        return torch.cat([tensors[k].reshape(-1) for k in self.names])

    def split(self, flat: Tensor) -> Params:
        return {k: v.view(s) for k, v, s in zip(self.names, flat.split(self.sizes), self.shapes)}

    def join_state(self, state: RuleState) -> dict[str, Tensor]:
        first = state[self.names[0]]
        return {key: self.join({k: state[k][key] for k in self.names}) if key in self.per_coordinate else first[key]
                for key in first}

    def split_state(self, flat_state: dict[str, Tensor]) -> RuleState:
        parts = {key: self.split(flat_state[key]) for key in self.per_coordinate}
        return {k: {key: parts[key][k] if key in parts else v for key, v in flat_state.items()} for k in self.names}


@dataclass
class Unroll:
    """``steps`` inner steps of ``meta``'s rule on ``task``; ``outer`` picks the outer loss; ``overrides`` replace
    hyperparameters of the rule for this task (e.g. the schedule's ``lr_horizon``: the task's own run length)."""

    meta: MetaParams
    task: Task | TaskStack
    steps: int
    outer: str = "train"
    overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.outer not in OUTER_LOSSES:
            raise ValueError(f"outer must be one of {OUTER_LOSSES}, got {self.outer!r}")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {self.steps!r}")

    def hparams(self, raw: dict[str, Tensor]) -> dict[str, Any]:
        """The rule's hyperparameters from the raw meta-parameters, with this unroll's ``overrides``."""
        return {**self.meta.hparams(raw), **self.overrides}

    def segment(
        self, hp: dict[str, Any], params: Params, state: RuleState | None, start: int, n: int
    ) -> tuple[Tensor, Params, RuleState]:
        """Run ``n`` inner steps from step ``start``; returns (sum of outer-loss terms, params, state).

        A ``TaskStack`` runs its tasks' segments under ``vmap`` (weights and state stacked on dim 0) and
        sums the mean of their terms."""
        if not isinstance(self.task, TaskStack):
            return self._task_segment(self.task, hp, params, state, start, n)
        stack, task = self.task, self.task.tasks[0]
        train = stack.batches(False, start, n)
        heldout = stack.batches(True, start, n) if self.outer == "heldout" else train

        def one(p: Params, s: RuleState | None, tr: Batch, he: Batch, buffers: dict[str, Tensor]):
            return self._task_segment(task, hp, p, s, start, n, lambda t: (tr[0][t - start], tr[1][t - start]),
                                      lambda t: (he[0][t - start], he[1][t - start]), buffers)

        in_dims = (0, None if state is None else 0, 0, 0, 0)
        total, params, state = vmap(one, in_dims=in_dims)(params, state, train, heldout, stack.buffers())
        return total.mean(), params, state

    def _task_segment(
        self, task: Task, hp: dict[str, Any], params: Params, state: RuleState | None, start: int, n: int,
        train: Callable[[int], Batch] | None = None, heldout: Callable[[int], Batch] | None = None,
        buffers: dict[str, Tensor] | None = None,
    ) -> tuple[Tensor, Params, RuleState]:
        """``segment`` on one task; an element-wise rule (``rule.elementwise(hp)``) steps all tensors as one
        flat vector: one rule call per step instead of one per tensor, the same arithmetic."""
        rule = self.meta.rule
        train, heldout = train or task.train_batch, heldout or task.heldout_batch
        if state is None:
            state = {k: rule.init(p, hp) for k, p in params.items()}
        if len(params) == 1 or not rule.elementwise(hp):
            return self._steps(hp, params, state, start, n, functools.partial(task.loss, buffers=buffers), train,
                               heldout)
        flat = FlatParams(params, rule.state_shapes(torch.zeros(2), hp))
        total, p, s = self._steps(hp, {"flat": flat.join(params)}, {"flat": flat.join_state(state)}, start, n,
                                  lambda q, batch: task.loss(flat.split(q["flat"]), batch, buffers), train, heldout)
        return total, flat.split(p["flat"]), flat.split_state(s["flat"])

    def _steps(self, hp: dict[str, Any], params: Params, state: RuleState, start: int, n: int,
               loss: Callable[[Params, Batch], Tensor], train: Callable[[int], Batch],
               heldout: Callable[[int], Batch]) -> tuple[Tensor, Params, RuleState]:
        rule = self.meta.rule
        total = torch.zeros((), dtype=next(iter(params.values())).dtype)
        loss_and_grad = grad_and_value(loss)
        for t in range(start, start + n):
            grads, value = loss_and_grad(params, train(t))
            new_params, new_state = {}, {}
            for k, p in params.items():
                delta, new_state[k] = rule.update(grads[k], state[k], p, hp)
                new_params[k] = p + delta
            params, state = new_params, new_state
            total = total + self.outer_term(value, functools.partial(loss, params), t, heldout)
        return total, params, state

    def outer_term(self, train_loss: Tensor, loss_after: Callable[[Batch], Tensor], t: int,
                   heldout: Callable[[int], Batch] | None = None) -> Tensor:
        """Step t's term of F: ``ℓ_t`` ("train"), ``log ℓ_t`` ("log_train") or, for "heldout", the loss of
        the updated weights (``loss_after``) on held-out batch t (``heldout``, default the task's)."""
        if self.outer == "heldout":
            return loss_after((heldout or self.task.heldout_batch)(t))
        return train_loss.log() if self.outer == "log_train" else train_loss

    def loss(self, raw: dict[str, Tensor], inner: InnerState) -> tuple[Tensor, InnerState]:
        """``F(r)`` and the inner state after the unroll (graph kept)."""
        total, params, state = self.segment(self.hparams(raw), inner.params, inner.state, inner.step, self.steps)
        return total / self.steps, InnerState(params, state, inner.step + self.steps)


@dataclass
class MetaGrad:
    """An estimate of ∇_r F: the outer loss, one gradient per raw tensor, and the carried inner state."""

    loss: Tensor
    grads: dict[str, Tensor]
    inner: InnerState = field(repr=False)


@dataclass
class Backprop:
    """Exact ∇_r F by reverse mode through the unroll; ``checkpoint_every=S > 0`` checkpoints segments."""

    checkpoint_every: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.checkpoint_every, int) or self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be an int >= 0, got {self.checkpoint_every!r}")

    def __call__(self, unroll: Unroll, inner: InnerState, key: int = 0) -> MetaGrad:
        raw = dict(unroll.meta.raw)
        if not self.checkpoint_every or self.checkpoint_every >= unroll.steps:
            loss, out = unroll.loss(raw, inner)
            grads = torch.autograd.grad(loss, list(raw.values()), allow_unused=True, materialize_grads=True)
            return MetaGrad(loss.detach(), dict(zip(raw, grads)), out.detached())
        return self._checkpointed(unroll, raw, inner)

    def _checkpointed(self, unroll: Unroll, raw: dict[str, Tensor], inner: InnerState) -> MetaGrad:
        seg, k = self.checkpoint_every, unroll.steps
        starts = list(range(inner.step, inner.step + k, seg))
        lengths = [min(seg, inner.step + k - s) for s in starts]
        boundaries, total = [], 0.0
        carry: tuple[Params, RuleState | None] = (inner.params, inner.state)
        with torch.no_grad():
            hp = unroll.hparams(raw)
            for s, n in zip(starts, lengths):
                boundaries.append(carry)
                part, *carry = unroll.segment(hp, *carry, s, n)
                total = total + part
        final = InnerState(*carry, inner.step + k)
        grads = {name: torch.zeros_like(r) for name, r in raw.items()}
        adjoint: list[Tensor | None] | None = None
        for (p_in, s_in), s, n in reversed(list(zip(boundaries, starts, lengths))):
            leaves, spec = tree_flatten((p_in, s_in))
            leaves = [
                t.detach().requires_grad_(t.is_floating_point()) if isinstance(t, Tensor) else t
                for t in leaves
            ]
            raw_leaf = {name: r.detach().requires_grad_() for name, r in raw.items()}
            part, p_out, s_out = unroll.segment(
                unroll.hparams(raw_leaf), *tree_unflatten(leaves, spec), s, n
            )
            outs, outs_adj = [part], [torch.full_like(part, 1.0 / k)]
            if adjoint is not None:
                for o, a in zip(tree_flatten((p_out, s_out))[0], adjoint):
                    if a is not None and _is_var(o):
                        outs.append(o)
                        outs_adj.append(a)
            wrt = list(raw_leaf.values()) + [t for t in leaves if _is_var(t)]
            got = torch.autograd.grad(outs, wrt, outs_adj, allow_unused=True)
            for name, g in zip(raw_leaf, got):
                if g is not None:
                    grads[name] += g
            it = iter(got[len(raw_leaf) :])
            adjoint = [next(it) if _is_var(t) else None for t in leaves]
        return MetaGrad(torch.as_tensor(total / k).detach(), grads, final.detached())


def _is_var(t: Any) -> bool:
    return isinstance(t, Tensor) and t.requires_grad
