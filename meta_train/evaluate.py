"""Evaluation on held-out tasks: the learned optimizer as a drop-in ``torch.optim.Optimizer`` against
Adam with a tuned learning rate and plain Momentum.

Curves are the loss on the whole training split after each step (step 0 = initial weights).  The
speed-up metric (learned_optimization's) for a run of N steps::

    speedup = min_{lr ∈ sweep} steps_Adam(lr)(reach L_learned(N)) / N

i.e. > 1 when tuned Adam needs more steps than the learned optimizer to reach its loss.  Adam runs
``budget·N`` steps; when no Adam run reaches the target the speed-up is reported as ``budget`` with
``censored: true`` (a lower bound).  A learned optimizer may carry a schedule (DeepMomentum's learned
``lr_decay``), so ``adam_decays`` adds a second reference: Adam with ``lr_t = lr/(1 + c(t − 1))`` tuned over
``adam_lrs × adam_decays`` for N steps, compared by final loss.
"""

from __future__ import annotations

import copy
import math
import os
import statistics
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch.optim import Optimizer

import deepopt
from deepopt.checkpoint import load_pretrained
from deepopt.rules.deep import decayed_lr

from .tasks import Task, held_out_task

OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], Optimizer]


def load_learned(
    path: str | os.PathLike, params: Iterable[torch.nn.Parameter], **overrides: Any
) -> Optimizer:
    """The optimizer saved at ``path`` by meta-training (``DeepMomentum.from_pretrained`` for DMGD), as it was
    meta-trained: a DMGD schedule keeps the saved ``lr_horizon`` unless ``total_steps``/``lr_horizon`` is given."""
    name, hparams, _ = load_pretrained(path)
    classes = {cls.__name__: cls for cls in deepopt.OPTIMIZERS.values()}
    if name not in classes:
        raise ValueError(f"{path} holds an unknown optimizer {name!r}; accepted: {sorted(classes)}")
    cls = classes[name]
    if hasattr(cls, "from_pretrained"):
        if "total_steps" not in overrides and "lr_horizon" not in overrides:
            overrides["lr_horizon"] = hparams.get("lr_horizon", 0)
        return cls.from_pretrained(path, params, **overrides)
    if "beta1" in hparams:
        hparams["betas"] = (hparams.pop("beta1"), hparams.pop("beta2"))
    return cls(params, **{**hparams, **overrides})


def adam_with_decay(params: Iterable[torch.nn.Parameter], lr: float, decay: float) -> Optimizer:
    """``deepopt.Adam`` whose step t takes ``lr/(1 + decay·(t − 1))`` (a ``LambdaLR`` stepped after each step)."""
    opt = deepopt.Adam(params, lr=lr)
    # LambdaLR's t counts the steps taken, so the next one is step t + 1: DeepMomentum's own lr_decay formula
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: decayed_lr(1.0, decay, t + 1))
    opt.register_step_post_hook(lambda *_: schedule.step())
    return opt


def loss_curve(task: Task, make_optimizer: OptimizerFactory, steps: int) -> list[float]:
    """Full-training-split loss after each of ``steps`` minibatch steps (``inf`` from a divergence on)."""
    model = copy.deepcopy(task.model)
    opt = make_optimizer(model.parameters())
    x_all, y_all = task.full_batch

    def full_loss() -> float:
        with torch.no_grad():
            return float(task.criterion(model(x_all), y_all))

    curve = [full_loss()]
    for t in range(steps):
        x, y = task.train_batch(t)
        opt.zero_grad()
        task.criterion(model(x), y).backward()
        opt.step()
        curve.append(full_loss())
        if not math.isfinite(curve[-1]):
            return curve + [math.inf] * (steps - t - 1)
    return curve


def steps_to_reach(curve: Sequence[float], target: float) -> int | None:
    """The first step whose loss is ≤ ``target``, or ``None``."""
    return next((t for t, loss in enumerate(curve) if loss <= target), None)


def speedup(
    learned: Sequence[float], adam_curves: Iterable[Sequence[float]], steps: int, budget: int
) -> tuple[float, bool]:
    """``(speed-up, censored)`` of a learned curve against a set of Adam curves (see module docstring)."""
    reached = [s for c in adam_curves if (s := steps_to_reach(c, learned[steps])) is not None]
    if not reached:
        return float(budget), True
    return min(reached) / steps, False


def evaluate(
    learned_path: str | os.PathLike,
    tasks: Sequence[str],
    seeds: Sequence[int],
    steps: int,
    adam_lrs: Sequence[float],
    momentum_lrs: Sequence[float],
    budget: int = 4,
    dtype: torch.dtype = torch.float32,
    progress: Callable[[], None] | None = None,
    adam_decays: Sequence[float] = (),
    device: str | torch.device = "cpu",
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run the comparison; returns the ``report.json`` payload and ``curves.csv`` rows.

    Momentum uses μ = 0.9 with the best lr of ``momentum_lrs`` (lowest loss at step ``steps``).
    ``progress`` is called after each task/seed; the tasks run on ``device``.
    """
    report: dict[str, Any] = {
        "steps": steps,
        "budget": budget,
        "adam_lrs": list(adam_lrs),
        "momentum_lrs": list(momentum_lrs),
        "adam_decays": list(adam_decays),
        "seeds": list(seeds),
        "tasks": {},
    }
    rows: list[dict[str, Any]] = []
    for name in tasks:
        per_seed = {}
        for seed in seeds:
            task = held_out_task(name, seed, dtype, device)
            learned = loss_curve(task, lambda p: load_learned(learned_path, p), steps)
            adam = {
                lr: loss_curve(task, lambda p, lr=lr: deepopt.Adam(p, lr=lr), budget * steps)
                for lr in adam_lrs
            }
            mom = {
                lr: loss_curve(task, lambda p, lr=lr: deepopt.Momentum(p, lr=lr, momentum=0.9), steps)
                for lr in momentum_lrs
            }
            decayed_curves = {
                (lr, c): loss_curve(task, lambda p, lr=lr, c=c: adam_with_decay(p, lr, c), steps)
                for lr in adam_lrs
                for c in adam_decays
            }
            decayed = {k: curve[steps] for k, curve in decayed_curves.items()}
            best_adam = min(adam_lrs, key=lambda lr: adam[lr][steps])
            best_mom = min(momentum_lrs, key=lambda lr: mom[lr][steps])
            value, censored = speedup(learned, adam.values(), steps, budget)
            per_seed[str(seed)] = {
                "learned": learned[steps],
                "adam_tuned": adam[best_adam][steps],
                "adam_best_lr": best_adam,
                "momentum": mom[best_mom][steps],
                "momentum_best_lr": best_mom,
                "adam_by_lr": {str(lr): c[steps] for lr, c in adam.items()},
                "speedup": value,
                "speedup_censored": censored,
            }
            if decayed:
                best = min(decayed, key=decayed.get)
                per_seed[str(seed)].update(
                    adam_decay_tuned=decayed[best],
                    adam_decay_best=list(best),
                    learned_beats_adam_decay=learned[steps] < decayed[best],
                )
            curves = [
                ("learned", "", learned),
                ("adam", best_adam, adam[best_adam][: steps + 1]),
                ("momentum", best_mom, mom[best_mom]),
            ]
            if decayed:  # the reference of the main job's target, at its tuned (lr, decay)
                curves.append(("adam_decay", best[0], decayed_curves[best]))
            for label, lr, curve in curves:
                rows += [
                    {
                        "kind": "eval",
                        "task": name,
                        "optimizer": label,
                        "lr": lr,
                        "seed": seed,
                        "step": t,
                        "loss": v,
                    }
                    for t, v in enumerate(curve)
                ]
            if progress is not None:
                progress()
        values = [s["speedup"] for s in per_seed.values()]
        report["tasks"][name] = {
            "seeds": per_seed,
            "speedup_mean": statistics.fmean(values),
            "speedup_std": statistics.pstdev(values) if len(values) > 1 else 0.0,
            "learned_beats_adam": sum(s["learned"] < s["adam_tuned"] for s in per_seed.values()),
        }
        if adam_decays:
            report["tasks"][name]["learned_beats_adam_decay"] = sum(
                s["learned_beats_adam_decay"] for s in per_seed.values()
            )
    return report, rows
