"""Robustness under noisy gradients: a grid of optimizers × noise models × levels × seeds.

The claim under test (Nested Learning): optimizers with more expressive gradient memories
(delta-rule momentum, deep momentum) degrade less under noisy gradients than momentum and Adam.

Each optimizer's learning rate is tuned at zero noise by a small sweep on separate seeds, by final
validation loss (or re-tuned at every noise level, ``retune=True``); then every (optimizer, noise,
level, seed) run trains from the same initialisation, with the same noise draws across optimizers
(common random numbers), and records the final clean full-batch train/validation/test loss, test
accuracy and steps to a target train loss.  A run whose loss
or gradient becomes NaN/Inf, or whose loss exceeds ``DIVERGE_FACTOR`` × its initial loss, stops and is
recorded as diverged; aggregates count it at its *initial* loss (it learned nothing), so it neither
crashes the grid nor turns a mean into NaN.

Degradation of a cell is the per-seed ratio ``loss(σ)/loss(0)`` (paired by seed), summarised by its
geometric mean with a 95% t-interval over seeds.

    records = deepopt.robustness.run(optimizers=("momentum", "adam"), noises=("gaussian",), seeds=5)
    deepopt robustness --smoke --out runs/robust-smoke
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import multiprocessing
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, replace
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from deepopt import OPTIMIZERS as DEEPOPT_OPTIMIZERS
from deepopt import NonFiniteGradientError
from deepopt.checkpoint import atomic_save_json, atomic_write
from deepopt.noise import (
    NOISES,
    TASK_NOISES,
    GradientNoise,
    NoisyGradients,
    batch_size_for_level,
    corrupt_labels,
    make_noise,
)
from deepopt.runs import JsonLines, add_out_option, finish, prepare_out, progress_bar

OPTIMIZERS = ("sgd", "momentum", "adam", "delta_momentum", "deep_momentum", "m3", "torch_adam")
NOISE_MODELS = (*NOISES, *TASK_NOISES)
TASKS = ("digits", "quadratic", "hope")
METRICS = ("train_loss", "test_loss")
EVAL_KEYS = ("train_loss", "val_loss", "test_loss", "accuracy")
DEFAULT_LEVELS: dict[str, tuple[float, ...]] = {
    "gaussian": (0.0, 0.5, 1.0, 2.0, 4.0, 8.0),
    "student_t": (0.0, 0.5, 1.0, 2.0, 4.0, 8.0),
    "multiplicative": (0.0, 0.5, 1.0, 2.0, 4.0, 8.0),
    "dropout": (0.0, 0.25, 0.5, 0.75, 0.9, 0.95),
    "label": (0.0, 0.1, 0.2, 0.3, 0.4, 0.5),
    "batch": (0.0, 3.0, 10.0, 30.0, 100.0, 300.0),
}
LEVEL_LABELS = {
    "gaussian": "σ (× gradient RMS)", "student_t": "σ (× gradient RMS)", "multiplicative": "σ",
    "dropout": "drop probability", "label": "fraction of labels flipped", "batch": "level (batch = n/(1+level))",
}
DEFAULT_LRS = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0)
DIVERGE_FACTOR = 1e3
TUNE_SEED_OFFSET = 10_000
TIE_RTOL = 1e-4  # tuning: mean validation losses this close (relative) to the lowest are a tie
SMOKE = {"noises": ("gaussian", "label"), "levels": {"gaussian": (0.0, 1.0), "label": (0.0, 0.3)}, "seeds": 2,
         "steps": 40, "lrs": (0.01, 0.1), "tune_seeds": 1, "eval_every": 10}


# ---------------------------------------------------------------------------------------------- tasks
@dataclass(frozen=True)
class Task:
    """A training problem: train/validation/test splits, a model factory and its loss
    (``num_classes=None``: regression).  Learning rates are tuned on the validation split."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int | None
    target: float
    build: Callable[[], nn.Module]

    def model(self, seed: int) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.build()

    def loss(self, out: Tensor, y: Tensor) -> Tensor:
        if self.num_classes is None:
            return 0.5 * (out.squeeze(-1) - y).pow(2).mean()
        return nn.functional.cross_entropy(out.flatten(0, -2), y.flatten())  # (n, C) or (n, T, C) logits

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float | None]:
        """Clean full-batch train, validation and test loss, and test accuracy (``None`` for regression)."""
        test_out = model(self.x_test)
        accuracy = None
        if self.num_classes is not None:
            accuracy = float((test_out.argmax(-1) == self.y_test).float().mean())
        return {"train_loss": float(self.loss(model(self.x_train), self.y_train)),
                "val_loss": float(self.loss(model(self.x_val), self.y_val)),
                "test_loss": float(self.loss(test_out, self.y_test)), "accuracy": accuracy}


@cache
def get_task(name: str) -> Task:
    """``digits``: a 64-32-10 tanh MLP on scikit-learn's digits (cross-entropy; 1150/288/359 train/val/test
    images).  ``quadratic``: the noisy quadratic ``½·mean((xᵀw − y)²)``, ``x ~ N(0, diag(h))`` with ``h``
    log-spaced over two decades in 32 dimensions, ``y = xᵀw* + 0.3·ε`` (768/256/256 samples).  ``hope``: a
    tiny HOPE language model (size ``smoke``) predicting the next byte of the standard library's source,
    96 training windows of 32 bytes, 32 validation and 32 test windows from held-out files."""
    if name == "digits":
        from deepopt.data import load_classification

        x, y, x_test, y_test = load_classification("digits", seed=0)
        n_train = round(0.8 * len(x))  # load_classification's split is already a seeded permutation
        build = lambda: nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
        return Task(name, x[:n_train], y[:n_train], x[n_train:], y[n_train:], x_test, y_test, 10, 0.2, build)
    if name == "quadratic":
        d, n_train, n_held = 32, 768, 256
        gen = torch.Generator().manual_seed(0)
        h = torch.logspace(0, -2, d)
        x = torch.randn(n_train + 2 * n_held, d, generator=gen) * h.sqrt()
        y = x @ torch.randn(d, generator=gen) + 0.3 * torch.randn(len(x), generator=gen)
        build = lambda: nn.Linear(d, 1, bias=False)
        val, test = slice(n_train, n_train + n_held), slice(n_train + n_held, None)
        return Task(name, x[:n_train], y[:n_train], x[val], y[val], x[test], y[test], None, 0.1, build)
    if name == "hope":
        from deepopt.hope import LanguageModel, load_corpus, model_config
        from deepopt.hope.data import val_batches

        corpus = load_corpus("code", max_bytes=100_000)
        (x, y), (x_held, y_held) = (next(val_batches(stream, n, 32, 1)) for stream, n in
                                    ((corpus.train, 96), (corpus.val, 64)))
        build = lambda: _NextTokenLogits(LanguageModel(model_config("hope", "smoke")))
        return Task(name, x, y, x_held[:32], y_held[:32], x_held[32:], y_held[32:], 256, 3.0, build)
    raise ValueError(f"unknown task {name!r}; accepted: {list(TASKS)}")


class _NextTokenLogits(nn.Module):
    """A ``LanguageModel`` seen as a classifier of every position's next byte: ``(n, T) → (n, T, 256)``."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, tokens: Tensor) -> Tensor:
        return self.lm(tokens)[0]


# ---------------------------------------------------------------------------------------------- runs
def make_optimizer(name: str, params: Any, lr: float, seed: int = 0) -> torch.optim.Optimizer:
    """The optimizer ``name`` (one of ``OPTIMIZERS``) with its default hyperparameters and ``lr``;
    deepopt optimizers raise on a non-finite gradient (the run is then recorded as diverged)."""
    if name == "torch_adam":
        return torch.optim.Adam(params, lr=lr)
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; accepted: {list(OPTIMIZERS)}")
    extra = {"seed": seed} if name == "deep_momentum" else {}
    return DEEPOPT_OPTIMIZERS[name](params, lr=lr, nonfinite="raise", **extra)


@dataclass(frozen=True)
class RunSpec:
    """One training run of the grid (``noise="none"``: clean gradients)."""

    task: str
    optimizer: str
    noise: str
    level: float
    seed: int
    lr: float
    steps: int
    eval_every: int
    target: float
    dof: float = 3.0
    gamma: float = 0.0
    relative: bool = True

    def gradient_noise(self) -> GradientNoise | None:
        if self.noise not in NOISES or self.level == 0:
            return None
        options: dict[str, Any] = {"gamma": self.gamma, "seed": self.seed}
        if self.noise in ("gaussian", "student_t"):
            options["relative"] = self.relative
        if self.noise == "student_t":
            options["dof"] = self.dof
        return make_noise(self.noise, self.level, **options)


@contextmanager
def _single_thread() -> Iterator[None]:
    """Small models run fastest (and bit-identically across worker counts) on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _batches(n: int, size: int, gen: torch.Generator) -> Iterator[Tensor | None]:
    """Index batches of ``size`` from reshuffled epochs, or ``None`` (the full batch) when ``size == n``."""
    while True:
        if size >= n:
            yield None
            continue
        order = torch.randperm(n, generator=gen)
        for start in range(0, n - size + 1, size):
            yield order[start:start + size]


def train_run(spec: RunSpec) -> dict[str, Any]:
    """Train one model; return its record (the loss curve is ``record["curve"]``, every ``eval_every``)."""
    with _single_thread():
        task = get_task(spec.task)
        model = task.model(spec.seed)
        gen = torch.Generator().manual_seed(spec.seed)
        x, labels = task.x_train, task.y_train
        if spec.noise == "label" and spec.level > 0:
            labels = corrupt_labels(labels, spec.level, task.num_classes, gen)
        batch = batch_size_for_level(len(x), spec.level) if spec.noise == "batch" else len(x)
        opt = make_optimizer(spec.optimizer, model.parameters(), spec.lr, seed=spec.seed)
        noise = spec.gradient_noise()
        if noise is not None:
            NoisyGradients(opt, noise)
        initial = task.evaluate(model)
        curve = [initial["train_loss"]]
        reached = 0 if initial["train_loss"] <= spec.target else None
        diverged = False
        batches = _batches(len(x), batch, gen)
        for t in range(1, spec.steps + 1):
            idx = next(batches)
            loss = task.loss(model(x if idx is None else x[idx]), labels if idx is None else labels[idx])
            if not math.isfinite(loss.item()) or loss.item() > DIVERGE_FACTOR * initial["train_loss"]:
                diverged = True
                break
            opt.zero_grad()
            loss.backward()
            try:
                opt.step()
            except NonFiniteGradientError:
                diverged = True
                break
            if t % spec.eval_every == 0 or t == spec.steps:
                current = task.evaluate(model)["train_loss"]
                if not math.isfinite(current):
                    diverged = True
                    break
                curve.append(current)
                if reached is None and current <= spec.target:
                    reached = t
        final = {k: math.nan for k in initial} if diverged else task.evaluate(model)
    return {
        "task": spec.task, "optimizer": spec.optimizer, "noise": spec.noise, "level": spec.level,
        "seed": spec.seed, "lr": spec.lr, "steps": spec.steps, "batch_size": batch,
        **{f"final_{k}": v for k, v in final.items()},
        "steps_to_target": None if diverged else reached, "diverged": diverged,
        **{f"initial_{k}": v for k, v in initial.items()}, "curve": curve,
    }


RUNS_FILE = "runs.jsonl"  # every finished run, one line each (deepopt.runs.JsonLines)


def _key(spec: RunSpec) -> str:
    return json.dumps(asdict(spec), sort_keys=True)


def _execute(specs: Sequence[RunSpec], workers: int, desc: str, progress: bool,
             log: JsonLines | None = None) -> list[dict[str, Any]]:
    """Run ``specs`` (zero-noise runs shared across noise models), in ``workers`` processes if > 1; runs
    already in ``log`` are read from it, new ones are appended to it as they finish."""
    canonical = [replace(s, noise="none", level=0.0) if s.level == 0 else s for s in specs]
    unique = list(dict.fromkeys(canonical))
    by_spec = {s: log.done[_key(s)] for s in unique if log is not None and _key(s) in log.done}
    todo = [s for s in unique if s not in by_spec]
    bar = progress_bar(total=len(unique), initial=len(by_spec), desc=desc, enabled=progress, unit="run")
    with ExitStack() as stack:
        if workers > 1 and len(todo) > 1:
            pool = stack.enter_context(ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")))
            results = pool.map(train_run, todo, chunksize=4)
        else:
            results = map(train_run, todo)
        for spec, record in zip(todo, results):
            by_spec[spec] = record
            if log is not None:
                log.add(_key(spec), record)
            bar.update(1)
    bar.close()
    return [{**by_spec[c], "noise": s.noise} for s, c in zip(specs, canonical)]


# ---------------------------------------------------------------------------------------------- study
def _check_levels(noise: str, levels: Sequence[float], task: Task, dof: float, gamma: float) -> tuple:
    if noise == "label" and task.num_classes is None:
        raise ValueError(f"label noise needs a classification task; {task.name!r} is a regression "
                         f"(use one of {[n for n in NOISE_MODELS if n != 'label']})")
    for level in levels:
        if isinstance(level, bool) or not isinstance(level, (int, float)) or not level >= 0:
            raise ValueError(f"noise levels must be numbers >= 0, got {level!r} for {noise!r}")
        if noise == "label":
            corrupt_labels(task.y_train, level, task.num_classes, torch.Generator())  # range check
        elif noise == "batch":
            batch_size_for_level(len(task.x_train), level)
        else:
            make_noise(noise, level, gamma=gamma, **({"dof": dof} if noise == "student_t" else {}))
    return tuple(sorted({0.0, *map(float, levels)}))


def _best_lrs(tuning: list[dict[str, Any]], lrs: Sequence[float]) -> tuple[dict, dict]:
    """Per (optimizer, noise, level): the lr with the lowest mean final validation loss (diverged = +inf); lrs
    within a relative ``TIE_RTOL`` of the lowest count as tied and the smallest of them is taken.  (Without
    noise a convex task reaches the same optimum at every lr that converges: on the noisy quadratic seven of
    Adam's nine lrs end within 2e-6 of each other, and which of them is lowest is rounding.)"""
    losses: dict[tuple, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in tuning:
        loss = math.inf if r["diverged"] else r["final_val_loss"]
        losses[(r["optimizer"], r["noise"], r["level"])][r["lr"]].append(loss)
    best, table = {}, {}
    for cell, by_lr in losses.items():
        means = {lr: float(np.mean(v)) for lr, v in by_lr.items()}
        lowest = min(means.values())
        best[cell] = min(lr for lr, m in means.items() if m <= lowest * (1 + TIE_RTOL))
        table[cell] = {"lr": best[cell], "at_edge": best[cell] in (min(lrs), max(lrs)),
                       "mean_val_loss_by_lr": {str(lr): m for lr, m in means.items()}}
    return best, table


def run(task: str = "digits", optimizers: Sequence[str] = OPTIMIZERS,
        noises: Sequence[str] | None = None, levels: Sequence[float] | Mapping[str, Sequence[float]] | None = None,
        seeds: int = 5, steps: int = 300, lrs: Sequence[float] = DEFAULT_LRS, tune_seeds: int = 2,
        retune: bool = False, eval_every: int = 10, target: float | None = None, metric: str = "test_loss",
        dof: float = 3.0, gamma: float = 0.0, relative: bool = True, workers: int = 1,
        out: str | Path | None = None, progress: bool = True, resume: bool = False,
        on_start: Callable[[], Any] | None = None) -> list[dict[str, Any]]:
    """Run the study; return one record per (optimizer, noise, level, seed) run.

    ``noises``: default every model that applies to the task (label noise needs classes).
    ``levels``: one sequence for every noise model, a mapping noise → levels, or ``None`` for
    ``DEFAULT_LEVELS`` (level 0 is always added: it is the reference of the degradation ratio).
    ``lrs`` is the tuning sweep, run on ``tune_seeds`` seeds disjoint from the study's ``seeds``.
    With ``out`` (an existing folder), appends every run to ``out/runs.jsonl`` as it finishes (``resume``:
    runs already there are not run again) and writes ``results.csv``, ``curves.csv``, ``summary.json`` and
    the plots there at the end.  ``on_start`` is called once every argument has been checked and the task built,
    before the first run (the CLI creates ``out`` there).
    """
    the_task = get_task(task)
    if noises is None:
        noises = tuple(n for n in NOISE_MODELS if n != "label" or the_task.num_classes is not None)
    for name in optimizers:
        if name not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {name!r}; accepted: {list(OPTIMIZERS)}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {list(METRICS)}, got {metric!r}")
    for arg, value in (("seeds", seeds), ("steps", steps), ("tune_seeds", tune_seeds),
                       ("eval_every", eval_every), ("workers", workers)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{arg} must be an int >= 1, got {value!r}")
    if not lrs or any(not (isinstance(lr, (int, float)) and lr > 0) for lr in lrs):
        raise ValueError(f"lrs must be a non-empty sequence of numbers > 0, got {lrs!r}")
    if not optimizers or not noises:
        raise ValueError("optimizers and noises must be non-empty")
    for name in noises:
        if name not in NOISE_MODELS:
            raise ValueError(f"unknown noise {name!r}; accepted: {list(NOISE_MODELS)}")
    if levels is None:
        levels = DEFAULT_LEVELS
    grid = {n: _check_levels(n, levels.get(n, DEFAULT_LEVELS[n]) if isinstance(levels, Mapping) else levels,
                             the_task, dof, gamma) for n in noises}
    base = RunSpec(task, "", "none", 0.0, 0, 0.0, steps, eval_every,
                   the_task.target if target is None else float(target), dof, gamma, relative)

    if on_start is not None:
        on_start()
    log = None if out is None else JsonLines(Path(out) / RUNS_FILE, resume)
    cells = [(o, n, lv) for o in optimizers for n in noises for lv in grid[n]] if retune else \
        [(o, "none", 0.0) for o in optimizers]
    tuning = _execute([replace(base, optimizer=o, noise=n, level=lv, seed=TUNE_SEED_OFFSET + s, lr=float(lr))
                       for o, n, lv in cells for lr in lrs for s in range(tune_seeds)],
                      workers, "tuning lr", progress, log)
    best, tuned = _best_lrs(tuning, lrs)
    lr_of = (lambda o, n, lv: best[(o, n, lv)]) if retune else (lambda o, n, lv: best[(o, "none", 0.0)])
    started = time.time()
    records = _execute([replace(base, optimizer=o, noise=n, level=lv, seed=s, lr=lr_of(o, n, lv))
                        for o in optimizers for n in noises for lv in grid[n] for s in range(seeds)],
                       workers, "robustness", progress, log)
    if out is not None:
        config = {"task": task, "optimizers": list(optimizers), "levels": grid, "seeds": seeds, "steps": steps,
                  "lrs": list(lrs), "tune_seeds": tune_seeds, "retune": retune, "eval_every": eval_every,
                  "target": base.target, "metric": metric, "dof": dof, "gamma": gamma, "relative": relative,
                  "workers": workers, "study_seconds": round(time.time() - started, 1)}
        tuned_json = [{"optimizer": o, "noise": n, "level": lv, **v} for (o, n, lv), v in tuned.items()]
        write_outputs(records, out, config, tuned_json, metric)
    return records


# ---------------------------------------------------------------------------------------------- statistics
def _final(record: Mapping[str, Any], key: str) -> float:
    """A run's final ``key``; a diverged run counts at its initial value (it learned nothing)."""
    return record[f"initial_{key}"] if record["diverged"] else record[f"final_{key}"]


def mean_ci(values: Sequence[float]) -> tuple[float, float, float]:
    """Mean and 95% t-interval ``mean ± t₀.₉₇₅,ₙ₋₁·sd/√n`` (NaN bounds for n < 2)."""
    from scipy.stats import t as student_t

    x = np.asarray(values, dtype=float)
    mean = float(x.mean())
    if len(x) < 2:
        return mean, math.nan, math.nan
    half = float(student_t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return mean, mean - half, mean + half


def _geometric(log_values: Sequence[float]) -> dict[str, float]:
    mean, low, high = mean_ci(log_values)
    return {"factor": math.exp(mean), "ci_low": math.exp(low), "ci_high": math.exp(high)}


def summarize(records: Sequence[Mapping[str, Any]], metric: str = "test_loss") -> dict[str, Any]:
    """Per cell: mean and 95% CI of final train/test loss and accuracy, divergences, and for each of
    ``METRICS`` the degradation ``loss(σ)/loss(0)`` (geometric mean over seeds, paired by seed, with CI);
    ``ranking[metric][noise]``: each optimizer's degradation averaged over the nonzero levels (per seed,
    then CI over seeds; ``noise="overall"`` averages over every noise model) and the optimizer that
    degrades least.  ``metric`` is the one the plots show."""
    groups: dict[tuple, list[Mapping[str, Any]]] = defaultdict(list)
    for r in records:
        groups[(r["optimizer"], r["noise"], r["level"])].append(r)
    reference = {(m, r["optimizer"], r["noise"], r["seed"]): _final(r, m)
                 for r in records if r["level"] == 0 for m in METRICS}
    cells: list[dict[str, Any]] = []
    per_seed: dict[tuple, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for (opt, noise, level), runs in sorted(groups.items()):
        cell: dict[str, Any] = {"optimizer": opt, "noise": noise, "level": level, "lr": runs[0]["lr"],
                                "n": len(runs), "n_diverged": sum(r["diverged"] for r in runs)}
        for key in EVAL_KEYS:
            if runs[0][f"initial_{key}"] is not None:
                cell[key] = dict(zip(("mean", "ci_low", "ci_high"), mean_ci([_final(r, key) for r in runs])))
        if level > 0:
            cell["degradation"] = {}
            for m in METRICS:
                logs = [math.log(_final(r, m) / reference[(m, opt, noise, r["seed"])]) for r in runs]
                cell["degradation"][m] = _geometric(logs)
                for r, lg in zip(runs, logs):
                    for scope in (noise, "overall"):
                        per_seed[(m, scope, opt)][r["seed"]].append(lg)
        cells.append(cell)
    ranking: dict[str, dict[str, Any]] = defaultdict(dict)
    for m, scope in dict.fromkeys((m, scope) for m, scope, _ in per_seed):
        by_opt = {opt: _geometric([float(np.mean(v)) for v in seeds.values()])
                  for (m2, s2, opt), seeds in per_seed.items() if (m2, s2) == (m, scope)}
        ranking[m][scope] = {"degradation": by_opt, "least_degraded": min(by_opt, key=lambda o: by_opt[o]["factor"])}
    return {"metric": metric, "cells": _json_safe(cells), "ranking": _json_safe(dict(ranking))}


def _json_safe(obj: Any) -> Any:
    """NaN/Inf → None (JSON has neither)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------------------------- outputs
RESULT_COLUMNS = ("task", "optimizer", "noise", "level", "seed", "lr", "steps", "batch_size",
                  *(f"final_{k}" for k in EVAL_KEYS), "steps_to_target", "diverged",
                  *(f"initial_{k}" for k in EVAL_KEYS))


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(["" if v is None else v for v in row] for row in rows)
    atomic_write(path, lambda tmp: Path(tmp).write_text(buf.getvalue()))


def write_outputs(records: Sequence[Mapping[str, Any]], out: str | Path, config: Mapping[str, Any],
                  tuned: Sequence[Mapping[str, Any]], metric: str = "test_loss") -> dict[str, Any]:
    """``results.csv`` (one row per run), ``curves.csv`` (train loss every ``eval_every`` steps),
    ``summary.json`` (config, tuned lrs, statistics) and the plots, PNG and SVG; returns the summary."""
    out = Path(out)
    _write_csv(out / "results.csv", RESULT_COLUMNS, [[r[c] for c in RESULT_COLUMNS] for r in records])
    every = config["eval_every"]
    _write_csv(out / "curves.csv", ("optimizer", "noise", "level", "seed", "step", "train_loss"),
               [(r["optimizer"], r["noise"], r["level"], r["seed"], min(i * every, r["steps"]), v)
                for r in records for i, v in enumerate(r["curve"])])
    summary = {"config": dict(config), "tuned_lr": list(tuned), **summarize(records, metric)}
    atomic_save_json(summary, out / "summary.json")
    plot_all(records, summary, out, every)
    return summary


# ---------------------------------------------------------------------------------------------- CLI
def _parse_levels(text: str) -> float | tuple[str, tuple[float, ...]]:
    """``L`` (a level for every noise model) or ``NOISE=L1,L2,...`` (levels of one noise model)."""
    name, _, values = text.rpartition("=")
    try:
        levels = tuple(float(v) for v in values.split(",") if v)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected L or NOISE=L1,L2,..., got {text!r}") from err
    if not levels or any(not lv >= 0 for lv in levels) or (not name and len(levels) > 1):
        raise argparse.ArgumentTypeError(f"noise levels must be >= 0, given as L or NOISE=L1,L2,...; got {text!r}")
    return (name, levels) if name else levels[0]


def _levels_option(values: list) -> list[float] | dict[str, tuple[float, ...]]:
    """``--levels`` values: all plain numbers (one list for every noise model) or all ``NOISE=...``."""
    named = [v for v in values if isinstance(v, tuple)]
    if named and len(named) != len(values):
        raise ValueError("--levels takes either plain levels or NOISE=L1,L2,... entries, not both")
    return dict(named) if named else list(values)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "robustness", help="optimizers under noisy gradients: grid study, CSV/JSON and plots",
        description="Grid of optimizers × noise models × levels × seeds with each optimizer's lr tuned at "
                    "zero noise; writes results.csv, curves.csv, summary.json and PNG/SVG plots to --out.")
    p.add_argument("--task", choices=TASKS, default="digits", help="built-in task (default: digits MLP)")
    p.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS, metavar="NAME",
                   help=f"optimizers to compare, from {list(OPTIMIZERS)} (default: all)")
    p.add_argument("--noises", nargs="+", choices=NOISE_MODELS, metavar="NAME",
                   help=f"noise models, from {list(NOISE_MODELS)} (default: all that apply to the task)")
    p.add_argument("--levels", nargs="+", type=_parse_levels, metavar="L",
                   help="noise levels >= 0 for every noise model, or per model as NOISE=L1,L2,... (e.g. "
                        "gaussian=1,4 label=0.1,0.3); 0 is always added; default: "
                        + "; ".join(f"{k} {list(v)}" for k, v in DEFAULT_LEVELS.items()))
    p.add_argument("--seeds", type=int, help="seeds per cell (default 5)")
    p.add_argument("--steps", type=int, help="training steps per run (default 300)")
    p.add_argument("--lrs", nargs="+", type=float, metavar="LR",
                   help=f"learning-rate sweep for tuning (default {list(DEFAULT_LRS)})")
    p.add_argument("--tune-seeds", type=int, help="seeds per lr in the tuning sweep (default 2)")
    p.add_argument("--retune", action="store_true", help="re-tune the lr at every noise level")
    p.add_argument("--eval-every", type=int, help="steps between loss-curve points (default 10)")
    p.add_argument("--target", type=float, help="train loss for steps-to-target (default: 0.2 digits, "
                                                "0.1 quadratic)")
    p.add_argument("--metric", choices=METRICS, default="test_loss",
                   help="final loss the plots and the printed ranking use (default test_loss; summary.json "
                        "ranks by both)")
    p.add_argument("--dof", type=float, default=3.0, help="Student-t degrees of freedom (default 3)")
    p.add_argument("--gamma", type=float, default=0.0, help="noise decay: σ_t² = σ²/(1+t)^γ (default 0)")
    p.add_argument("--absolute", action="store_true",
                   help="additive noise std is σ, not σ × the tensor's gradient RMS")
    p.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    add_out_option(p, "robustness", (RUNS_FILE, "results.csv", "curves.csv", "summary.json",
                                     *(f"{plot}.{ext}" for plot in PLOTS for ext in PLOT_FORMATS)))
    p.add_argument("--resume", action="store_true",
                   help=f"continue the study in --out: runs already in its {RUNS_FILE} are not run again")
    p.add_argument("--smoke", action="store_true",
                   help="tiny grid for CI: 2 noise models × 2 levels × 2 seeds × 40 steps (< 1 minute)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    options = dict(SMOKE) if args.smoke else {}
    for key in ("optimizers", "noises", "levels", "seeds", "steps", "lrs", "tune_seeds", "eval_every", "target"):
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    if args.levels is not None:
        options["levels"] = _levels_option(args.levels)
        if isinstance(options["levels"], dict) and args.noises is None:  # NOISE=... names the noise models
            options["noises"] = tuple(options["levels"])
    records = run(task=args.task, metric=args.metric, dof=args.dof, gamma=args.gamma, relative=not args.absolute,
                  workers=args.workers, out=args.out, progress=not args.no_progress, resume=args.resume,
                  on_start=lambda: prepare_out(args), **options)
    ranking = summarize(records, args.metric)["ranking"][args.metric]
    print(f"degradation of {args.metric}, loss(σ)/loss(0) averaged over levels (geometric mean, 95% CI), "
          "least first:")
    for noise, entry in sorted(ranking.items(), key=lambda kv: kv[0] == "overall"):
        cells = ", ".join(f"{o} {v['factor']:.3g} [{v['ci_low'] or math.nan:.3g}, {v['ci_high'] or math.nan:.3g}]"
                          for o, v in sorted(entry["degradation"].items(), key=lambda kv: kv[1]["factor"]))
        print(f"  {noise}: {cells}")
    noises = list(dict.fromkeys(r["noise"] for r in records if r["level"] > 0))
    finish(args.out, targets=claim(ranking.get("overall", {}).get("degradation", {}), args.metric),
           files=[("loss_vs_level.png", f"final {args.metric} against noise level, per optimizer"),
                  ("degradation.png", f"{args.metric}(σ)/{args.metric}(0) per optimizer and level"),
                  *((f"curves_{n}.png", f"train loss curves under {n} noise") for n in noises),
                  ("summary.json", "tuned lrs, every cell's mean and 95% CI, the ranking")])
    return 0


EXPRESSIVE = ("delta_momentum", "deep_momentum")  # the claim: these degrade less than ...
REFERENCES = ("momentum", "adam")  # ... these


def claim(degradation: Mapping[str, Mapping[str, float]], metric: str) -> list[tuple[str, bool]]:
    """The claim under test, for each (expressive, reference) pair in the study: the expressive optimizer's
    overall degradation (geometric mean over noise models and levels) is below the reference's."""
    return [(f"{o} degrades less than {ref} ({metric}, overall): {degradation[o]['factor']:.3g}x vs "
             f"{degradation[ref]['factor']:.3g}x", degradation[o]["factor"] < degradation[ref]["factor"])
            for o in EXPRESSIVE for ref in REFERENCES if o in degradation and ref in degradation]


# ---------------------------------------------------------------------------------------------- plots
PLOTS = ("loss_vs_level", "degradation", "curves_*")  # curves_<noise> per noise model
PLOT_FORMATS = ("png", "svg")
_LINESTYLES = ("-", "--", "-.", ":")
_MARKERS = ("o", "s", "^", "x", "D", "v", "+")


def _save(fig: Any, out: Path, name: str) -> None:
    for ext in PLOT_FORMATS:
        atomic_write(out / f"{name}.{ext}", lambda tmp, ext=ext: fig.savefig(tmp, format=ext, dpi=130,
                                                                              bbox_inches="tight"))


def _level_axis(ax: Any, levels: Sequence[float]) -> None:
    """Symmetric-log x axis when the positive levels span more than a decade (0 stays on the axis)."""
    positive = [lv for lv in levels if lv > 0]
    if positive and max(positive) / min(positive) > 10:
        ax.set_xscale("symlog", linthresh=min(positive))


def _styles(optimizers: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per optimizer a colour, a line style and a hollow marker of its own, so that one optimizer's line lying
    exactly on another's (adam and torch_adam, say) still shows both."""
    import matplotlib

    return {o: {"color": matplotlib.colormaps["tab10"](i % 10), "ls": _LINESTYLES[i % len(_LINESTYLES)],
                "marker": _MARKERS[i % len(_MARKERS)], "index": i} for i, o in enumerate(optimizers)}


def _band(ax: Any, x: Sequence[float], rows: np.ndarray, label: str, style: Mapping[str, Any]) -> None:
    """Mean over rows (NaN-aware) with a 95% t band (:func:`_line`)."""
    from scipy.stats import t as student_t

    n = np.sum(np.isfinite(rows), axis=0)
    with warnings.catch_warnings():  # columns with < 2 finite values: NaN sd, no band
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(rows, axis=0)
        sd = np.nanstd(rows, axis=0, ddof=1)
    half = np.where(n > 1, student_t.ppf(0.975, np.maximum(n - 1, 1)) * sd / np.sqrt(np.maximum(n, 1)), 0.0)
    _line(ax, x, mean, mean - half, mean + half, label, style)


def _line(ax: Any, x: Sequence[float], mean: np.ndarray, low: np.ndarray, high: np.ndarray, label: str,
          style: Mapping[str, Any]) -> None:
    """A mean line in the optimizer's style with its band, log-scale safe (the band's foot at ≥ 5% of the mean).
    Markers on at most ~8 points per line, each optimizer's on points of its own when the line is long."""
    every = max(1, len(x) // 8)
    ax.plot(x, mean, label=label, color=style["color"], lw=1.4, ls=style["ls"], marker=style["marker"], mfc="none",
            ms=5, markevery=(style["index"] % every, every))
    low = np.where(np.isfinite(low), low, mean)
    high = np.where(np.isfinite(high), high, mean)
    ax.fill_between(x, np.maximum(low, mean * 0.05), high, color=style["color"], alpha=0.15, lw=0)


def _grid_figure(n: int, width: float = 4.2, height: float = 3.2) -> tuple[Any, list[Any]]:
    from matplotlib.figure import Figure

    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def plot_all(records: Sequence[Mapping[str, Any]], summary: Mapping[str, Any], out: Path, every: int) -> None:
    """``loss_vs_level``: final loss vs level per optimizer with 95% bands; ``curves_<noise>``: loss curves
    at each level; ``degradation``: heat map of loss(σ)/loss(0).  PNG and SVG each."""
    optimizers = list(dict.fromkeys(r["optimizer"] for r in records))
    noises = list(dict.fromkeys(r["noise"] for r in records))
    styles = _styles(optimizers)
    grid = {n: sorted({r["level"] for r in records if r["noise"] == n}) for n in noises}
    plot_summary(summary, out)

    for noise in noises:
        fig, axes = _grid_figure(len(grid[noise]))
        for ax, level in zip(axes, grid[noise]):
            for opt in optimizers:
                curves = [r["curve"] for r in records
                          if r["optimizer"] == opt and r["noise"] == noise and r["level"] == level]
                length = max(map(len, curves))
                rows = np.array([c + [np.nan] * (length - len(c)) for c in curves])
                steps = [min(i * every, records[0]["steps"]) for i in range(length)]
                _band(ax, steps, rows, opt, styles[opt])
            ax.set(yscale="log", title=f"{noise}, level {level:g}", xlabel="step", ylabel="train loss")
            ax.grid(alpha=0.3, which="both")
        axes[0].legend(fontsize=8)
        fig.suptitle(f"train loss curves under {noise} noise (mean, 95% CI over non-diverged seeds)")
        _save(fig, out, f"curves_{noise}")


def plot_summary(summary: Mapping[str, Any], out: Path, prefix: str = "") -> None:
    """The plots a ``summary.json`` holds all of: ``loss_vs_level`` (each cell's mean final loss and 95% CI against
    the level, per optimizer and noise model) and ``degradation``; written as ``out/<prefix><name>.png|svg``."""
    metric = summary["metric"]
    cells = summary["cells"]
    study = summary.get("config", {}).get("optimizers", [])  # the study's order (the cells are sorted by name)
    optimizers = list(dict.fromkeys([*study, *(c["optimizer"] for c in cells)]))
    noises = sorted({c["noise"] for c in cells}, key=NOISE_MODELS.index)
    styles = _styles(optimizers)
    pretty = metric.replace("_", " ")
    fig, axes = _grid_figure(len(noises))
    for ax, noise in zip(axes, noises):
        levels = sorted({c["level"] for c in cells if c["noise"] == noise})
        for opt in optimizers:
            by_level = {c["level"]: c[metric] for c in cells if c["optimizer"] == opt and c["noise"] == noise}
            stats = [by_level.get(lv, {}) for lv in levels]
            mean, low, high = (np.array([np.nan if v.get(k) is None else v[k] for v in stats], dtype=float)
                               for k in ("mean", "ci_low", "ci_high"))
            _line(ax, levels, mean, low, high, opt, styles[opt])
        _level_axis(ax, levels)
        ax.set(yscale="log", title=noise, xlabel=LEVEL_LABELS[noise], ylabel=f"final {pretty}")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"final {pretty} vs noise level (mean, 95% CI over seeds; diverged runs at initial loss)")
    _save(fig, out, f"{prefix}loss_vs_level")
    _plot_degradation(summary, optimizers, noises, out, prefix)


def _plot_degradation(summary: Mapping[str, Any], optimizers: list[str], noises: list[str], out: Path,
                      prefix: str = "") -> None:
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure

    cells = {(c["optimizer"], c["noise"], c["level"]): c for c in summary["cells"] if c["level"] > 0}
    columns = sorted({(n, lv) for _, n, lv in cells}, key=lambda k: (noises.index(k[0]), k[1]))
    ratio = np.array([[cells[(o, n, lv)]["degradation"][summary["metric"]]["factor"] if (o, n, lv) in cells else np.nan
                       for n, lv in columns] for o in optimizers])
    logs = np.log10(ratio)
    bound = max(float(np.nanmax(np.abs(logs))), 1e-3) if np.isfinite(logs).any() else 1.0
    fig = Figure(figsize=(max(6.0, 0.62 * len(columns) + 2.5), 0.5 * len(optimizers) + 2.2), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(logs, cmap="RdBu_r", norm=TwoSlopeNorm(0.0, -bound, bound), aspect="auto")
    for i, o in enumerate(optimizers):
        for j, (n, lv) in enumerate(columns):
            if np.isfinite(ratio[i, j]):
                mark = "†" if cells[(o, n, lv)]["n_diverged"] else ""
                text = f"{ratio[i, j]:.0f}" if ratio[i, j] >= 100 else f"{ratio[i, j]:.2g}"
                ax.text(j, i, text + mark, ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(columns)), [f"{n}\n{lv:g}" for n, lv in columns], fontsize=7, rotation=90)
    ax.set_yticks(range(len(optimizers)), optimizers)
    fig.colorbar(image, ax=ax, label=f"log10 {summary['metric']}(σ) / {summary['metric']}(0)")
    ax.set_title("relative degradation (geometric mean over seeds; † = some runs diverged)")
    _save(fig, out, f"{prefix}degradation")
