"""The meta-training loop: truncated unrolls over a task family, Adam on the raw meta-parameters.

Each meta-step, every one of ``tasks_per_step`` slots runs one truncation of ``unroll`` inner steps on its
task, carrying (θ, s) from its previous truncation (TBPTT); a slot draws a new task from the family once it
has done its horizon of inner steps (``horizon``, or one of ``horizons`` drawn with the task: long runs in
truncations).  A rule with a training-progress schedule (DeepMomentum's ``lr_horizon`` > 0) is unrolled with
``lr_horizon`` = the task's own horizon, as a user passes the run's length.  Estimators: exact backprop through
each truncation (``backprop``), antithetic ES (``es``) or persistent ES (``pes``: unbiased for the whole horizon,
its particles carried with the slot).  The estimates are averaged, clipped to norm ``clip`` and applied by
``deepopt.Adam`` (``nonfinite="skip"``); with ``late_weight = p > 0`` a truncation that ends at inner step t
weighs ``(t/horizon)^p`` in that average (the outer loss leans towards the end of the horizon, where the
held-out evaluation compares final losses; p = 0: all alike); a slot whose loss or meta-gradient is not finite
is dropped and restarted on a new task.  Slots whose tasks share a structure (``Task.signature``: always in
the quadratic family, by chance among digits MLPs) and an inner step run as one ``TaskStack`` under ``vmap``
(``vectorize``), the same estimate up to rounding.  Everything random derives from ``seed`` (task draws,
batches, ES perturbations), so a run resumed from its last checkpoint continues exactly as an uninterrupted
one.
"""

from __future__ import annotations

import dataclasses
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import deepopt
from deepopt.checkpoint import atomic_torch_save, save_pretrained, torch_load
from deepopt.runs import check_device, progress_bar

from .es import PES, AntitheticES
from .params import LEARNABLE, MetaParams
from .tasks import FAMILIES, Task, TaskStack, sample_task
from .unroll import OUTER_LOSSES, Backprop, InnerState, Unroll

ESTIMATORS = ("backprop", "es", "pes")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
STATE_FILE = "trainer_state.pt"
OPTIMIZER_DIR = "optimizer"
# Fields a resumed run may change (they do not alter the trajectory).
_RESUMABLE_CHANGES = ("meta_steps", "save_every")


@dataclass
class MetaTrainConfig:
    """Everything that defines a meta-training run (saved with its checkpoints)."""

    rule: str = "deep_momentum"
    family: str = "digits"
    meta_steps: int = 400
    unroll: int = 20
    horizon: int = 200
    horizons: list[int] | None = None
    tasks_per_step: int = 2
    meta_lr: float = 0.03
    clip: float = 1.0
    outer: str = "log_train"
    late_weight: float = 0.0
    estimator: str = "backprop"
    checkpoint_every: int = 0
    es_pairs: int = 32
    es_sigma: float = 0.01
    seed: int = 0
    dtype: str = "float32"
    save_every: int = 25
    vectorize: bool = True
    device: str = "cpu"
    learn: list[str] | None = None
    hparams: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        choices = {
            "rule": tuple(LEARNABLE),
            "family": tuple(FAMILIES),
            "outer": OUTER_LOSSES,
            "estimator": ESTIMATORS,
            "dtype": tuple(DTYPES),
        }
        for name, accepted in choices.items():
            if getattr(self, name) not in accepted:
                raise ValueError(f"{name} must be one of {accepted}, got {getattr(self, name)!r}")
        for name in ("meta_steps", "unroll", "horizon", "tasks_per_step", "es_pairs", "save_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        for h in self.horizons or [self.horizon]:
            if isinstance(h, bool) or not isinstance(h, int) or h < 1 or h % self.unroll:
                raise ValueError(f"horizon(s) must be ints that are multiples of unroll ({self.unroll}), got {h!r}")
        check_device(self.device, "device")
        if not isinstance(self.vectorize, bool):
            raise TypeError(f"vectorize must be a bool, got {type(self.vectorize).__name__}")
        for name in ("meta_lr", "clip", "es_sigma"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not self.late_weight >= 0:
            raise ValueError(f"late_weight must be >= 0, got {self.late_weight!r}")


@dataclass
class _Slot:
    seed: int
    task: Task
    inner: InnerState
    horizon: int


class MetaTrainer:
    """Meta-trains ``config.rule`` on ``config.family``; with ``out_dir`` it checkpoints there and resumes
    from ``out_dir/trainer_state.pt`` when that exists (``ValueError`` if it is from another config)."""

    def __init__(self, config: MetaTrainConfig, out_dir: str | os.PathLike | None = None) -> None:
        self.config = config
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.dtype = DTYPES[config.dtype]
        self.meta = MetaParams(config.rule, config.learn, self.dtype, **config.hparams).to(config.device)
        self.opt = deepopt.Adam(self.meta.parameters(), lr=config.meta_lr, nonfinite="skip")
        self.estimator: Callable[..., Any] = {
            "backprop": lambda: Backprop(config.checkpoint_every),
            "es": lambda: AntitheticES(config.es_sigma, config.es_pairs),
            "pes": lambda: PES(config.es_sigma, config.es_pairs),
        }[config.estimator]()
        self.step = 0
        self.cpu_seconds = 0.0  # process CPU time spent in meta-steps, summed over resumed runs
        self.slots: list[_Slot | None] = [None] * config.tasks_per_step
        self.history: list[dict[str, float | None]] = []
        if self.out_dir is not None and (self.out_dir / STATE_FILE).is_file():
            self.load(self.out_dir / STATE_FILE)

    # ------------------------------------------------------------------ one meta-step
    def _task_seed(self, slot: int) -> int:
        return (self.config.seed * 1_000_003 + self.step) * 64 + slot

    def _slot(self, i: int) -> _Slot:
        slot = self.slots[i]
        if slot is None or slot.inner.step >= slot.horizon:
            seed = self._task_seed(i)
            task = sample_task(self.config.family, seed, self.dtype, self.config.device)
            slot = self.slots[i] = _Slot(seed, task, InnerState.fresh(task), self._horizon_of(seed))
        return slot

    def _horizon_of(self, seed: int) -> int:
        """The task's horizon: ``horizon``, or one of ``horizons`` drawn from the task's seed."""
        return random.Random(seed ^ 0x5EED).choice(self.config.horizons) if self.config.horizons else \
            self.config.horizon

    def _unroll(self, task: Task | TaskStack, horizon: int) -> Unroll:
        overrides = {"lr_horizon": horizon} if self.meta.static.get("lr_horizon") else {}
        return Unroll(self.meta, task, self.config.unroll, self.config.outer, overrides)

    def _groups(self) -> list[list[int]]:
        """Slot indices grouped so that each group runs as one ``TaskStack`` under ``vmap`` (same task
        signature and inner step; with ``vectorize=False`` every slot is its own group)."""
        groups: dict[Any, list[int]] = {}
        for i in range(self.config.tasks_per_step):
            slot = self._slot(i)
            stacks = self.config.vectorize and self.config.estimator != "pes"  # PES vmaps over its particles
            key = (slot.task.signature(), slot.inner.step, slot.horizon) if stacks else i
            groups.setdefault(key, []).append(i)
        return list(groups.values())

    def _estimate(self, idx: list[int]) -> tuple[Any, list[InnerState]] | None:
        """The group's meta-gradient estimate and its slots' new inner states; ``None`` if not finite."""
        slots = [self.slots[i] for i in idx]
        if len(idx) == 1:
            task, inner = slots[0].task, slots[0].inner
        else:
            task, inner = TaskStack(tuple(s.task for s in slots)), InnerState.stack([s.inner for s in slots])
        unroll = self._unroll(task, slots[0].horizon)
        est = self.estimator(unroll, inner, key=self._task_seed(idx[0]) + 1)
        if not (est.loss.isfinite() and all(g.isfinite().all() for g in est.grads.values())):
            return None
        return est, [est.inner] if len(idx) == 1 else est.inner.unstack()

    def meta_step(self) -> dict[str, float]:
        """One meta-gradient over ``tasks_per_step`` truncations and one (clipped) Adam step."""
        cfg = self.config
        params = dict(self.meta.raw)
        total = {k: torch.zeros_like(p) for k, p in params.items()}
        losses, dropped = [], 0
        pending = self._groups()
        while pending:
            idx = pending.pop(0)
            got = self._estimate(idx)
            if got is None and len(idx) > 1:  # find the slot(s) at fault one by one
                pending[:0] = [[i] for i in idx]
                continue
            if got is None:
                self.slots[idx[0]], dropped = None, dropped + 1
                continue
            est, inners = got
            for i, inner in zip(idx, inners):
                self.slots[i].inner = inner
            losses += [float(est.loss)] * len(idx)
            # a group's slots are at one inner step of one horizon
            weight = (inners[0].step / self.slots[idx[0]].horizon) ** cfg.late_weight
            for k, g in est.grads.items():
                total[k] += g * (weight * len(idx) / cfg.tasks_per_step)
        for k, p in params.items():
            p.grad = total[k]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.clip))
        if losses:
            self.opt.step()
        self.opt.zero_grad()
        self.step += 1
        record = {
            "meta_step": self.step,
            "outer_loss": sum(losses) / len(losses) if losses else None,
            "grad_norm": grad_norm,
            "dropped": dropped,
        }
        with torch.no_grad():
            record.update({k: float(v) for k, v in self.meta.values().items() if v.numel() == 1})
        self.history.append(record)
        return record

    # ------------------------------------------------------------------ loop, checkpoints
    def run(self, progress: bool = True, callback: Callable[[MetaTrainer], None] | None = None) -> None:
        """Meta-train up to ``config.meta_steps``, checkpointing every ``save_every`` steps and at the end."""
        bar = progress_bar(total=self.config.meta_steps, initial=self.step, desc="meta-train", enabled=progress,
                           unit="meta-step")
        while self.step < self.config.meta_steps:
            started = time.process_time()
            record = self.meta_step()
            self.cpu_seconds += time.process_time() - started
            bar.set_postfix(loss=record["outer_loss"])
            bar.update(1)
            if self.out_dir is not None and (
                self.step % self.config.save_every == 0 or self.step == self.config.meta_steps
            ):
                self.save()
            if callback is not None:
                callback(self)
        bar.close()

    def state_dict(self) -> dict[str, Any]:
        slots = [
            None
            if s is None
            else {"seed": s.seed, "params": s.inner.params, "state": s.inner.state, "step": s.inner.step,
                  "horizon": s.horizon, "particles": s.inner.particles}
            for s in self.slots
        ]
        return {
            "config": dataclasses.asdict(self.config),
            "step": self.step,
            "meta": self.meta.state_dict(),
            "opt": self.opt.state_dict(),
            "slots": slots,
            "history": self.history,
            "cpu_seconds": self.cpu_seconds,
        }

    def save(self) -> None:
        """Write ``trainer_state.pt`` and the learned optimizer (``optimizer/``) atomically."""
        if self.out_dir is None:
            raise ValueError("this MetaTrainer has no out_dir to save to")
        atomic_torch_save(self.state_dict(), self.out_dir / STATE_FILE)
        save_pretrained(self.out_dir / OPTIMIZER_DIR, *self.meta.export())

    def load(self, path: str | os.PathLike) -> None:
        """Resume from a ``trainer_state.pt``; the run's config must match (``meta_steps`` may differ)."""
        sd = torch_load(path)
        ours = dataclasses.asdict(self.config)
        theirs = {**dataclasses.asdict(MetaTrainConfig()), **sd["config"]}  # fields added since: their default
        diff = sorted(k for k in ours if k not in _RESUMABLE_CHANGES and _plain(theirs[k]) != _plain(ours[k]))
        if diff:
            raise ValueError(f"{path} is from a different run: config fields {diff} differ")
        self.meta.load_state_dict(sd["meta"])
        self.opt.load_state_dict(sd["opt"])
        self.step, self.history = sd["step"], list(sd["history"])
        self.cpu_seconds = float(sd.get("cpu_seconds", 0.0))
        self.slots = [
            None
            if s is None
            else _Slot(
                s["seed"],
                sample_task(self.config.family, s["seed"], self.dtype, self.config.device),
                InnerState(s["params"], s["state"], s["step"], s.get("particles")),
                s.get("horizon", self.config.horizon),
            )
            for s in sd["slots"]
        ]


def _plain(value: Any) -> Any:
    """Tuples and lists compare equal after a save/load round trip."""
    return list(value) if isinstance(value, tuple) else value
