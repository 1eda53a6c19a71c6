"""``deepopt compare``: deepopt's optimizers against torch's AdamW, Muon and SGD with momentum, each given
the same tuning budget on the same tasks.

Protocol: every optimizer trains each task at 5 learning rates log-spaced around its own recommended lr
(``RECOMMENDED_LR``; the same span, ×10^±1 by default, for all), seed 0; the lr with the lowest final
validation loss is kept and run at seeds 0, 1, 2.  Reported: the final validation loss, mean and 95%
t-interval over the seeds.  A run whose loss turns non-finite is recorded as diverged (its loss: ∞).
The schedule is part of the sweep (``--schedule``): by default every optimizer runs each lr both with linear warm-up
over 5% of the steps then cosine decay to 0 (``cosine``: what AdamW scripts run and the literature tunes AdamW
with) and at a constant lr (``constant``), and the best (lr, schedule) is kept; the same budget for all.
Muon and M3 step the 2-D hidden matrices (not the embedding/input layer, not the output head); AdamW
steps the rest at the same multiple of its own recommended lr.  ``shipped`` (opt-in) is the package's learned
optimizer (``DeepMomentum.pretrained``), centred on its learned lr, under its own learned schedule over the run's
steps in place of ``--schedule`` (``learned``; ``deepopt evaluate`` is its fuller held-out comparison).

Tasks: ``digits_mlp`` (64-128-128-10 ReLU MLP), ``digits_cnn`` (two 3×3 convolutions and a linear head)
on scikit-learn's digits (minibatches of 64, validation = 20% of the training split); ``char_lm``, a
Transformer++ (RMSNorm, RoPE, SwiGLU; ``deepopt.hope``) predicting the next byte of the Python standard
library's source, and ``hope_lm``, the HOPE model (self-modifying Titans + CMS) on the same bytes; both
validated on held-out files.  ``--device cuda`` trains the LMs at a nanoGPT (shakespeare-char) size.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import deepopt

from . import pretrained
from .checkpoint import atomic_save_json, atomic_write, naming
from .runs import add_out_option, check_at_least, check_device, finish, prepare_out, progress_bar
from .schedules import warmup_cosine

TASKS = ("digits_mlp", "digits_cnn", "char_lm", "hope_lm")
# name -> recommended lr (the centre of its sweep); for the split optimizers, the lr of the matrix group
RECOMMENDED_LR: dict[str, float] = {
    "torch_adamw": 3e-3,
    "torch_muon": 0.02,
    "torch_sgd_momentum": 0.05,
    "momentum": 0.05,
    "deep_momentum": 0.03,  # the README's ("DeepMomentum, precisely")
    "deep_momentum_adam": 1e-3,  # m sums P g (no 1 − β₁ factor): ~10× Adam's step at the same lr
    "m3": 0.02,
    "adam": 3e-3,
    "delta_momentum": 0.05,
    # M3's second-moment ablation (issue 20): dividing by √V turns lr·O into ≈ lr·O/|g|, a different lr scale
    "m3_v": 1e-3,  # the default (EMA, Nesterov) with the second moment
    "m3_sum": 0.02,  # Algorithm 1's sums, no Nesterov, without the second moment
    "m3_paper": 1e-3,  # Algorithm 1 as printed: M3(paper=True)
    # the package's learned optimizer (DeepMomentum.pretrained), centred on the lr it learned, its schedule over the
    # run's steps; `--lrs 1`: untuned
    "shipped": pretrained.hparams()["lr"],
}
# M3's variants: name -> options
M3_VARIANTS = {"m3": {}, "m3_v": {"second_moment": True}, "m3_sum": {"accumulate": "sum", "nesterov": False},
               "m3_paper": {"paper": True}}
OPTIMIZERS = tuple(RECOMMENDED_LR)
DEFAULT_OPTIMIZERS = tuple(o for o in OPTIMIZERS if o not in ("adam", "delta_momentum", "m3_v", "m3_sum",
                                                               "m3_paper", "shipped"))  # the others: opt-in
SPLIT = ("torch_muon", *M3_VARIANTS)  # matrices with their own rule, AdamW for the rest
# Targets of issue 11: (optimizer, must be <= reference, on tasks)
TARGETS = (("deep_momentum", "momentum", TASKS), ("deep_momentum_adam", "torch_adamw", ("char_lm", "hope_lm")),
           ("m3", "torch_muon", ("char_lm", "hope_lm")))

# Sizes: steps, batch, and the LMs' shape (cpu default, cuda, smoke)
SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "default": {"digits_mlp": {"steps": 300, "batch": 64}, "digits_cnn": {"steps": 300, "batch": 64},
                "char_lm": {"steps": 200, "batch": 16, "context": 64, "d_model": 64, "n_layers": 2, "n_heads": 4,
                            "max_bytes": 400_000},
                "hope_lm": {"steps": 100, "batch": 8, "context": 32, "size": "smoke", "max_bytes": 400_000}},
    "cuda": {"digits_mlp": {"steps": 1000, "batch": 64}, "digits_cnn": {"steps": 1000, "batch": 64},
             "char_lm": {"steps": 2000, "batch": 64, "context": 256, "d_model": 384, "n_layers": 6, "n_heads": 6,
                         "max_bytes": 4_000_000},
             "hope_lm": {"steps": 1000, "batch": 16, "context": 128, "size": "small", "max_bytes": 4_000_000}},
    "smoke": {"digits_mlp": {"steps": 8, "batch": 32}, "digits_cnn": {"steps": 8, "batch": 32},
              "char_lm": {"steps": 4, "batch": 4, "context": 16, "d_model": 16, "n_layers": 1, "n_heads": 2,
                          "max_bytes": 20_000},
              "hope_lm": {"steps": 3, "batch": 2, "context": 16, "size": "smoke", "max_bytes": 20_000}},
}
VAL_BATCHES = 8
MAX_EXTENSIONS = 2  # grid steps a sweep whose best lr is at its edge is extended by (a sweep of 3+ lrs)
SCHEDULES = ("cosine", "constant")  # --schedule: warm-up + cosine to 0, or a constant lr
LEARNED = "learned"  # the shipped learned optimizer's own schedule, the only one it runs


@dataclass(frozen=True)
class RunSpec:
    task: str
    optimizer: str
    lr: float
    seed: int
    phase: str  # "sweep" or "seeds"
    size: str
    device: str = "cpu"
    schedule: str = "cosine"  # one of SCHEDULES, or LEARNED for ``shipped`` (and only for it)


# ------------------------------------------------------------------------------------------ tasks
class Problem:
    """A task instance: ``model(seed)``, ``batch(step, seed)`` and ``val_loss(model)``."""

    def __init__(self, task: str, size: str, device: str) -> None:
        self.task, self.cfg, self.device = task, SIZES[size][task], torch.device(device)
        if task.startswith("digits"):
            from .data import load_classification

            x, y, _, _ = load_classification("digits", seed=0)
            n = round(0.8 * len(x))
            if task == "digits_cnn":
                x = x.reshape(-1, 1, 8, 8)
            self.x, self.y = x[:n].to(self.device), y[:n].to(self.device)
            self.x_val, self.y_val = x[n:].to(self.device), y[n:].to(self.device)
        else:
            from .hope.data import load_corpus

            corpus = load_corpus("code", max_bytes=self.cfg["max_bytes"])
            self.train_stream, self.val_stream = corpus.train, corpus.val

    def model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        c = self.cfg
        if self.task == "digits_mlp":
            m: nn.Module = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                                         nn.Linear(128, 10))
        elif self.task == "digits_cnn":
            m = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                              nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
        elif self.task == "char_lm":
            from .hope import HopeConfig, LanguageModel

            m = LanguageModel(HopeConfig(model="transformer", vocab_size=256, d_model=c["d_model"],
                                         n_layers=c["n_layers"], n_heads=c["n_heads"], ffn_hidden=4 * c["d_model"]))
        else:
            from .hope import LanguageModel, model_config

            m = LanguageModel(model_config("hope", c["size"]))
        return m.to(self.device)

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        if self.task.startswith("digits"):
            return nn.functional.cross_entropy(model(x), y)
        return model(x, y)[1]

    def batch(self, step: int, seed: int) -> tuple[Tensor, Tensor]:
        c = self.cfg
        if self.task.startswith("digits"):
            gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
            idx = torch.randint(0, len(self.x), (c["batch"],), generator=gen).to(self.device)
            return self.x[idx], self.y[idx]
        from .hope.data import train_batch

        x, y = train_batch(self.train_stream, c["batch"], c["context"], seed, step)
        return x.to(self.device), y.to(self.device)

    @torch.no_grad()
    def val_loss(self, model: nn.Module) -> float:
        if self.task.startswith("digits"):
            return float(self.loss(model, self.x_val, self.y_val))
        from .hope.data import val_batches

        c = self.cfg
        losses = [self.loss(model, x.to(self.device), y.to(self.device))
                  for x, y in val_batches(self.val_stream, c["batch"], c["context"], VAL_BATCHES)]
        return float(torch.stack(losses).mean())


@cache
def get_problem(task: str, size: str, device: str) -> Problem:
    return Problem(task, size, device)


# ------------------------------------------------------------------------------------------ optimizers
def hidden_matrices(model: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
    """``(matrices, rest)``: the 2-D weights between the first and the last layer (Muon's domain), and the
    other parameters (embeddings, the input layer and output head, biases, norms, convolutions)."""
    weights = [(n, p) for n, p in model.named_parameters() if p.dim() >= 2]
    edge = {weights[0][0], weights[-1][0]} | {n for n, _ in weights if "embed" in n}
    matrices = [p for n, p in weights if p.dim() == 2 and n not in edge]
    ids = {id(p) for p in matrices}
    return matrices, [p for p in model.parameters() if id(p) not in ids]


def make_optimizer(name: str, model: nn.Module, lr: float, steps: int | None = None) -> list[torch.optim.Optimizer]:
    """The optimizer(s) ``name`` stepping ``model`` at ``lr`` (the matrix group's, for Muon and M3, whose
    AdamW group runs at the same multiple of AdamW's recommended lr); ``steps``: the run's length, over which the
    shipped learned optimizer's own schedule anneals (the others' schedule is ``train_run``'s)."""
    params = list(model.parameters())
    if name == "torch_adamw":
        return [torch.optim.AdamW(params, lr=lr, weight_decay=0.0)]
    if name == "torch_sgd_momentum":
        return [torch.optim.SGD(params, lr=lr, momentum=0.9)]
    if name in SPLIT:
        matrices, rest = hidden_matrices(model)
        scale = lr / RECOMMENDED_LR[name]
        rest_opt = torch.optim.AdamW(rest, lr=scale * RECOMMENDED_LR["torch_adamw"], weight_decay=0.0)
        if not matrices:
            return [rest_opt]
        main = (torch.optim.Muon(matrices, lr=lr, weight_decay=0.0) if name == "torch_muon"  # bf16 NS, as M3's
                else deepopt.M3(matrices, lr=lr, ns_dtype="bfloat16", **M3_VARIANTS[name]))
        return [main, rest_opt]
    if name == "momentum":
        return [deepopt.Momentum(params, lr=lr, momentum=0.9)]
    if name == "deep_momentum":
        return [deepopt.DeepMomentum(params, lr=lr)]
    if name == "deep_momentum_adam":
        return [deepopt.DeepMomentum(params, lr=lr, preconditioner="adam")]
    if name == "adam":
        return [deepopt.Adam(params, lr=lr)]
    if name == "delta_momentum":
        return [deepopt.DeltaMomentum(params, lr=lr)]
    if name == "shipped":
        return [deepopt.DeepMomentum.pretrained(params, total_steps=steps, lr=lr)]
    raise ValueError(f"unknown optimizer {name!r}; accepted: {list(OPTIMIZERS)}")


# ------------------------------------------------------------------------------------------ runs
def train_run(spec: RunSpec, threads: int | None = None) -> dict[str, Any]:
    """Train one run (its optimizers under ``spec.schedule``); its record (the spec, final validation loss,
    divergence, seconds)."""
    if (spec.optimizer == "shipped") != (spec.schedule == LEARNED) or spec.schedule not in (*SCHEDULES, LEARNED):
        raise ValueError(f"schedule {spec.schedule!r} for {spec.optimizer}: the shipped optimizer runs its own "
                         f"({LEARNED!r}), the others one of {SCHEDULES}")
    if threads is not None:
        torch.set_num_threads(threads)
    problem = get_problem(spec.task, spec.size, spec.device)
    model = problem.model(spec.seed)
    steps = problem.cfg["steps"]
    opts = make_optimizer(spec.optimizer, model, spec.lr, steps)
    schedulers = [warmup_cosine(opt, steps) for opt in opts] if spec.schedule == "cosine" else []
    t0 = time.perf_counter()
    diverged = False
    for step in range(steps):
        x, y = problem.batch(step, spec.seed)
        loss = problem.loss(model, x, y)
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in opts:
            opt.step()
        for scheduler in schedulers:
            scheduler.step()
        if (step + 1) % 25 == 0 or step + 1 == steps:
            if not math.isfinite(float(loss.detach())):
                diverged = True
                break
    val = math.inf if diverged else problem.val_loss(model)
    if not math.isfinite(val):
        diverged, val = True, math.inf
    return {**asdict(spec), "val_loss": val, "diverged": diverged, "seconds": time.perf_counter() - t0}


def sweep_lrs(center: float, n: int, span: float) -> list[float]:
    """``n`` learning rates log-spaced over ``center × 10^[−span, +span]``."""
    if n == 1:
        return [center]
    return [float(center * 10 ** e) for e in np.linspace(-span, span, n)]


CSV_FIELDS = ("task", "optimizer", "phase", "lr", "seed", "val_loss", "diverged", "seconds", "size", "device",
              "schedule")


def _run_all(specs: Sequence[RunSpec], done: dict[RunSpec, dict[str, Any]], workers: int, threads: int | None,
             csv_path: Path, desc: str, progress: bool) -> list[dict[str, Any]]:
    """The records of ``specs``: those in ``done`` (a resumed run's), the others trained (in ``workers``
    processes if > 1) and appended to ``csv_path`` as each ends."""
    todo = [s for s in specs if s not in done]
    with naming(csv_path):
        f = open(csv_path, "a", newline="")
    with f:
        writer = csv.DictWriter(f, CSV_FIELDS, extrasaction="ignore")
        pool = None
        if workers > 1 and len(todo) > 1:
            pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
            results: Iterator[dict[str, Any]] = pool.map(train_run, todo, [threads] * len(todo))
        else:
            results = (train_run(s, threads) for s in todo)
        bar = progress_bar(total=len(specs), initial=len(specs) - len(todo), desc=desc, enabled=progress, unit="run")
        try:
            for spec, record in zip(todo, results):
                with naming(csv_path):
                    writer.writerow(record)
                    f.flush()
                    os.fsync(f.fileno())
                done[spec] = record
                bar.update(1)
        finally:
            bar.close()
            if pool is not None:
                pool.shutdown(cancel_futures=True)
    return [done[s] for s in specs]


def read_results(csv_path: Path) -> dict[RunSpec, dict[str, Any]]:
    """The records of a (possibly killed) run's ``results.csv``, by spec; a torn last line is dropped, any
    other unreadable line is a ``ValueError`` naming the file and the line."""
    with naming(csv_path):
        raw = csv_path.read_bytes()
    try:
        text = raw.decode()
    except UnicodeDecodeError:  # a kill can tear a multi-byte character only at the very end
        text = raw[:raw.rfind(b"\n") + 1].decode(errors="replace")
    lines = text.splitlines(keepends=True)
    if lines and list(csv.reader(lines[:1])) != [list(CSV_FIELDS)]:
        raise ValueError(f"--resume: {csv_path} is not a `deepopt compare` results file (its header is not "
                         f"{','.join(CSV_FIELDS)}); start over with --overwrite")
    done = {}
    for number, row in enumerate(csv.DictReader(lines), 2):
        try:
            spec = RunSpec(row["task"], row["optimizer"], float(row["lr"]), int(row["seed"]), row["phase"],
                           row["size"], row["device"], row["schedule"])
            done[spec] = {**asdict(spec), "val_loss": float(row["val_loss"]),
                          "diverged": row["diverged"] == "True", "seconds": float(row["seconds"])}
        except (KeyError, TypeError, ValueError):
            if number == len(lines) and not lines[-1].endswith("\n"):  # torn by a kill: that run is done again
                continue
            raise ValueError(f"--resume: {csv_path} line {number} is not a run of this study (the file is "
                             "corrupt); remove that line to run it again, or start over with --overwrite") from None
    return done


def run(tasks: Sequence[str], optimizers: Sequence[str], out: Path, size: str = "default", lrs: int = 5,
        span: float = 1.0, seeds: int = 3, workers: int = 1, threads: int | None = None, device: str = "cpu",
        progress: bool = False, resume: bool = False, on_start: Callable[[], Any] | None = None,
        schedules: Sequence[str] = SCHEDULES) -> dict[str, Any]:
    """The whole study: a sweep of lrs × ``schedules`` at seed 0, then ``seeds`` seeds at each best (lr, schedule);
    writes ``results.csv`` (``resume``: keeps the runs it holds and trains the others) and returns the summary.
    ``on_start`` is called once the tasks' data are built and a resumed run's results read, before anything is
    written."""
    csv_path = out / "results.csv"
    done = read_results(csv_path) if resume and csv_path.is_file() else {}
    for t in tasks:  # build every problem (data, caches) once, before any worker starts
        get_problem(t, size, device)
    if on_start is not None:
        on_start()
    text = io.StringIO()
    writer = csv.DictWriter(text, CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(done.values())
    atomic_write(csv_path, lambda tmp: Path(tmp).write_text(text.getvalue()))
    sweep = [RunSpec(t, o, lr, 0, "sweep", size, device, schedule) for t in tasks for o in optimizers
             for schedule in ((LEARNED,) if o == "shipped" else schedules)
             for lr in sweep_lrs(RECOMMENDED_LR[o], lrs, span)]
    swept = _run_all(sweep, done, workers, threads, csv_path, "lr sweep", progress)
    for _ in range(MAX_EXTENSIONS):  # no optimizer is judged at the edge of its sweep
        beyond = edge_extensions(swept, _best(swept, tasks, optimizers))
        if not beyond:
            break
        swept += _run_all(beyond, done, workers, threads, csv_path, "lr sweep, extended at an edge", progress)
    best = _best(swept, tasks, optimizers)
    extra = [RunSpec(t, o, best[(t, o)]["lr"], s, "seeds", size, device, best[(t, o)]["schedule"])
             for t in tasks for o in optimizers for s in range(1, seeds)]
    seeded = _run_all(extra, done, workers, threads, csv_path, "seeds", progress)
    return summarize(swept, seeded, best, tasks, optimizers)


def _best(swept: list[dict[str, Any]], tasks: Sequence[str], optimizers: Sequence[str]) -> dict[tuple[str, str], dict]:
    """Per (task, optimizer): the sweep run with the lowest final validation loss."""
    return {(t, o): min((r for r in swept if r["task"] == t and r["optimizer"] == o),
                        key=lambda r: (r["val_loss"], r["lr"], r["schedule"])) for t in tasks for o in optimizers}


def edge_extensions(swept: list[dict[str, Any]], best: dict[tuple[str, str], dict]) -> list[RunSpec]:
    """For each best run whose lr is the smallest or largest of its schedule's sweep (of 3+ lrs): the run one grid
    step (the sweep's ratio) beyond it, at seed 0, under the same schedule."""
    beyond = []
    for r in best.values():
        lrs = sorted({x["lr"] for x in swept if (x["task"], x["optimizer"], x["schedule"]) == (r["task"],
                      r["optimizer"], r["schedule"])})
        if len(lrs) < 3 or r["lr"] not in (lrs[0], lrs[-1]):
            continue
        lr = lrs[0] ** 2 / lrs[1] if r["lr"] == lrs[0] else lrs[-1] ** 2 / lrs[-2]
        beyond.append(RunSpec(r["task"], r["optimizer"], float(lr), 0, "sweep", r["size"], r["device"], r["schedule"]))
    return beyond


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """Mean and half-width of the 95% t-interval (NaN for one value; ∞ if a run diverged)."""
    from .robustness import mean_ci as interval

    mean, low, high = interval(values)
    return mean, (high - low) / 2 if math.isfinite(mean) else math.nan


def summarize(swept: list[dict], seeded: list[dict], best: dict, tasks: Sequence[str],
              optimizers: Sequence[str]) -> dict[str, Any]:
    results: dict[str, dict[str, Any]] = {t: {} for t in tasks}
    for t in tasks:
        for o in optimizers:
            runs = [best[(t, o)], *(r for r in seeded if r["task"] == t and r["optimizer"] == o)]
            losses = [r["val_loss"] for r in runs]
            mean, half = mean_ci(losses)
            results[t][o] = {"best_lr": best[(t, o)]["lr"], "schedule": best[(t, o)]["schedule"],
                             "val_losses": losses, "mean": mean, "ci95": half,
                             "diverged": sum(r["diverged"] for r in runs),
                             "sweep": {f"{r['lr']:.4g} {r['schedule']}": r["val_loss"] for r in swept
                                       if r["task"] == t and r["optimizer"] == o}}
    targets = []
    for opt, ref, on in TARGETS:
        for t in on:
            if t in results and opt in results[t] and ref in results[t]:
                a, b = results[t][opt], results[t][ref]
                gap = abs(a["mean"] - b["mean"])
                targets.append({"optimizer": opt, "reference": ref, "task": t, "mean": a["mean"],
                                "reference_mean": b["mean"], "met": bool(a["mean"] <= b["mean"]),
                                # the 95% intervals overlap: the order may be noise
                                "within_noise": bool(gap <= a["ci95"] + b["ci95"])})
    return {"results": results, "targets": targets}


# ------------------------------------------------------------------------------------------ reports
def format_table(summary: dict[str, Any]) -> str:
    results = summary["results"]
    tasks = list(results)
    optimizers = list(next(iter(results.values())))
    lines = ["| optimizer | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
    for o in optimizers:
        cells = []
        for t in tasks:
            r = results[t][o]
            ci = f" ± {r['ci95']:.3f}" if math.isfinite(r["ci95"]) else ""
            cells.append(f"{r['mean']:.3f}{ci} (lr {r['best_lr']:.2g}, {r['schedule']})")
        lines.append(f"| {o} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("| target | task | optimizer | reference | met | 95% CIs overlap |")
    lines.append("|---|---|---:|---:|---|---|")
    for tg in summary["targets"]:
        lines.append(f"| {tg['optimizer']} ≤ {tg['reference']} | {tg['task']} | {tg['mean']:.3f} | "
                     f"{tg['reference_mean']:.3f} | {'yes' if tg['met'] else 'no'} | "
                     f"{'yes' if tg['within_noise'] else 'no'} |")
    return "\n".join(lines)


def log_interval(values: Sequence[float]) -> tuple[float, float, float]:
    """Geometric mean and 95% t-interval of positive ``values``, from their logs: ``exp(m ± t·s/√n)`` with m, s
    the mean and sd of ``log values``.  It never reaches 0 or below, unlike ``mean ± t·sd/√n`` of a loss over 2 or
    3 seeds; NaN bounds for one value."""
    from .robustness import mean_ci as interval

    mean, low, high = interval(np.log(np.asarray(values, dtype=float)))
    return math.exp(mean), math.exp(low), math.exp(high)


def plot(summary: dict[str, Any], path: Path) -> None:
    """Per task, each optimizer's final validation loss: every seed (small dots just above), their geometric mean
    and its 95% interval from the log losses, asymmetric and never below 0; a log axis where the task's values
    span more than a decade."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    results = summary["results"]
    tasks = list(results)
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.6), squeeze=False)
    for ax, t in zip(axes[0], tasks):
        names = list(results[t])
        shown: list[float] = []
        for y, o in enumerate(names):
            losses = results[t][o]["val_losses"]
            color = "tab:gray" if o.startswith("torch_") else "tab:blue"
            if not all(math.isfinite(v) and v > 0 for v in losses):
                ax.annotate("diverged", (0.02, y), xycoords=("axes fraction", "data"), va="center", color="tab:red")
                continue
            centre, low, high = log_interval(losses)
            if math.isfinite(low):
                ax.errorbar(centre, y, xerr=[[centre - low], [high - centre]], fmt="o", capsize=3, color=color)
                shown += [low, high]
            else:
                ax.plot(centre, y, "o", color=color)
            ax.plot(losses, [y + 0.2] * len(losses), ".", color=color, ms=4, alpha=0.7)
            shown += losses
        if shown and max(shown) / min(shown) > 10:
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_yticks(range(len(names)), names)
        ax.set_ylim(-0.5, len(names) - 0.4)
        ax.set_title(t)
        ax.set_xlabel("final val. loss: seeds ·, geometric mean, 95% CI", fontsize=8)
        ax.grid(axis="x", alpha=0.3, which="both")
    fig.tight_layout()

    def save(tmp: str) -> None:
        fig.savefig(tmp, format="png", dpi=110)

    atomic_write(path, save)
    plt.close(fig)


OUTPUTS = ("results.csv", "summary.json", "compare.png", "table.md")


def main(args: argparse.Namespace) -> int:
    check_at_least(args, 1, "lrs", "seeds", "workers", "threads")
    if not args.span > 0:
        raise ValueError(f"--span must be > 0 (decades each side of the recommended lr), got {args.span}")
    check_device(args.device)
    size = "smoke" if args.smoke else ("cuda" if args.device.startswith("cuda") else "default")
    lrs, seeds = (2, 2) if args.smoke and args.lrs is None else (args.lrs or 5, args.seeds or 3)
    schedules = tuple(dict.fromkeys(args.schedule or (("cosine",) if args.smoke else SCHEDULES)))
    out = args.out
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    summary = run(args.tasks, args.optimizers, out, size, lrs, args.span, seeds, args.workers, args.threads,
                  args.device, progress=True, resume=args.resume, on_start=lambda: prepare_out(args),
                  schedules=schedules)
    config = {"tasks": list(args.tasks), "optimizers": list(args.optimizers), "size": size, "sizes": SIZES[size],
              "lrs": lrs, "span": args.span, "seeds": seeds, "schedules": list(schedules),
              "recommended_lr": RECOMMENDED_LR,
              "device": args.device, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "seconds": time.perf_counter() - t0}
    atomic_save_json(_json_safe({"config": config, **summary}), out / "summary.json")
    table = format_table(summary)
    atomic_write(out / "table.md", lambda tmp: Path(tmp).write_text(table + "\n"))
    plot(summary, out / "compare.png")
    print(table)
    finish(out, targets=[(f"{t['optimizer']} <= {t['reference']} on {t['task']}: {t['mean']:.4g} vs "
                          f"{t['reference_mean']:.4g}" + (" (within the 95% CIs)" if t["within_noise"] else ""),
                          t["met"]) for t in summary["targets"]],
           files=[("compare.png", "final validation loss per optimizer and task (95% CI)"),
                  ("table.md", "the same as a table, with the targets"),
                  ("summary.json", "every sweep and seed")])
    return 0


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("compare", help="tuned optimizer comparison on four tasks (val loss, 95%% CI)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS, help="tasks (default: all)")
    p.add_argument("--optimizers", nargs="+", default=list(DEFAULT_OPTIMIZERS), choices=OPTIMIZERS,
                   help="optimizers (default: all but adam, delta_momentum and the M3 variants m3_v, m3_sum, "
                        f"m3_paper; choices {', '.join(OPTIMIZERS)})")
    p.add_argument("--lrs", type=int, default=None, help="learning rates per sweep, >= 1 (default 5; --smoke 2)")
    p.add_argument("--span", type=float, default=1.0,
                   help="decades each side of the recommended lr the sweep covers (default 1)")
    p.add_argument("--seeds", type=int, default=None, help="seeds at the best lr, >= 1 (default 3; --smoke 2)")
    p.add_argument("--workers", type=int, default=1, help="parallel processes (default 1)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per process (default: torch's)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (cuda: nanoGPT-sized LMs)")
    p.add_argument("--schedule", nargs="+", choices=SCHEDULES, default=None,
                   help="the lr schedules swept with the lrs: cosine (5%% linear warm-up, then cosine to 0) and/or "
                        "constant (default both; --smoke cosine); shipped runs its learned one")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, 2 lrs, 2 seeds: a check in seconds")
    p.add_argument("--resume", action="store_true",
                   help="continue the study in --out: keep the runs its results.csv holds, train the others")
    add_out_option(p, "compare", OUTPUTS)
    p.set_defaults(func=main)
