"""deepopt optimizers inside ``higher``: differentiable unrolls in MAML-style user code.

Importing this module (``import deepopt.meta_train`` does) registers one ``higher`` differentiable optimizer
for every deepopt optimizer class, so::

    opt = deepopt.DeepMomentum(model.parameters(), lr=0.05)
    with higher.innerloop_ctx(model, opt, override={"lr": [lr_tensor]}) as (fmodel, diffopt):
        for x, y in batches:
            diffopt.step(loss_fn(fmodel(x), y))      # θ ← θ + Δ with the graph kept

Each step applies the same pure rule as the optimizer (and as the torch.func engine); tensors given
through ``override`` (lr, α, η, ``memory_init=(W1, W2)``, …) receive meta-gradients.  DMGD's state
starts at ``memory_init`` with its graph kept (``rule.init`` copies it differentiably).
"""

from __future__ import annotations

import copy
from typing import Any

import higher
import torch
from higher.optim import DifferentiableOptimizer
from torch import Tensor

import deepopt
from deepopt import optimizers
from deepopt.rules import Rule

from .unroll import Unroll


class DifferentiableMemoryOptimizer(DifferentiableOptimizer):
    """``higher`` twin of a ``optimizers.MemoryOptimizer``: the optimizer's rule, applied functionally."""

    def __init__(self, other: optimizers.MemoryOptimizer, *args: Any, **kwargs: Any) -> None:
        self.rule: Rule = type(other).rule
        super().__init__(other, *args, **kwargs)

    def _update(self, grouped_grads: list[list[Any]], **kwargs: Any) -> None:
        for group_idx, (group, grads) in enumerate(zip(self.param_groups, grouped_grads)):
            for p_idx, (p, g) in enumerate(zip(group["params"], grads)):
                if g is None:
                    continue
                state = self.state[group_idx][p_idx]
                if not state:
                    state.update(self.rule.init(p, group))
                delta, new_state = self.rule.update(g, state, p, group)
                state.update(new_state)
                group["params"][p_idx] = p + delta


REGISTERED = tuple(deepopt.OPTIMIZERS.values())
for _cls in REGISTERED:
    higher.register_optim(_cls, DifferentiableMemoryOptimizer)


def higher_unroll_loss(unroll: Unroll, raw: dict[str, Tensor] | None = None) -> Tensor:
    """The outer loss ``F(r)`` of ``unroll`` from the task's initial weights (step 0), computed through
    ``higher.innerloop_ctx`` with the deepopt optimizer class of the rule; the graph reaches ``raw``."""
    meta, task = unroll.meta, unroll.task
    hp = meta.hparams(raw)
    model = copy.deepcopy(task.model)
    opt = deepopt.OPTIMIZERS[meta.rule.name](model.parameters(), **meta.static)
    override = {k: [hp[k]] for k in meta.learned_keys()}
    total = torch.zeros((), dtype=next(model.parameters()).dtype)
    with higher.innerloop_ctx(model, opt, override=override) as (fmodel, diffopt):
        for t in range(unroll.steps):
            x, y = task.train_batch(t)
            loss = task.criterion(fmodel(x), y)
            diffopt.step(loss)
            total = total + unroll.outer_term(
                loss, lambda batch: task.criterion(fmodel(batch[0]), batch[1]), t
            )
    return total / unroll.steps
