"""``deepopt evaluate``: an optimizer on a held-out suite against tuned AdamW and Muon.

The suite (no task, nor its data set + architecture combination, is in any meta-training family; see
``deepopt.meta_train.tasks``)::

    digits_cnn   the digits CNN (two 3×3 convolutions, 8 and 16 channels, relu; ``deepopt.data.digits_cnn``) on
                 scikit-learn's digits, batch 64, 500 steps        (meta-training: CNNs on synthetic images only)
    char_lm      a byte-level Transformer++ LM, 4 layers, d 128, context 128, batch 8, 1,000 steps, on English
                 prose shipped with Python (``deepopt.hope.data`` domain ``prose``)
                                                    (meta-training: ≤ 2-layer, ≤ 64-wide GPTs on stdlib source code)
    hope_lm      the HOPE LM at its smoke size, context 64, batch 8, 200 steps, on the same prose   (never)
    tabular_mlp  a 64-unit ELU MLP on the breast-cancer data set, batch 64, 300 steps
                                                    (meta-training: digits cuts, iris, synthetic teacher problems)

The validation suite (``VALIDATION_TASKS``; ``deepopt select`` chooses among meta-trained optimizers on it, so that
the held-out suite plays no part in the choice): one task of each kind the held-out suite has but HOPE, on other data
and architectures, in no family either::

    images_cnn   a CNN of three 3×3 convolutions (8, 16, 16 channels, the first two padded, GELU) on a fixed
                 10-class problem of synthetic 8×8 images (``synthetic_images``), batch 32, 400 steps
                                                    (meta-training: two unpadded convolutions, relu/tanh)
    code_lm      the byte-level Transformer++ LM at its tiny size (2 layers, d 64), context 64, batch 8, 400 steps,
                 on the standard library's source code (the ``code`` domain's validation split)
                                                    (meta-training: another GPT on code's training split)
    wine_mlp     a 32-32 SiLU MLP on the wine data set, batch 32, 300 steps
                 (``meta_train.tasks.HELD_OUT_SPECS``: meta-training's own held-out check, never trained on)

Methods, each with weight decay 0.1 on matrices (``p.dim() >= 2``) and none elsewhere, as AdamW scripts group them:
    adamw    ``torch.optim.AdamW`` with linear warm-up (5% of the steps) and cosine decay to 0, over ``--lrs``
             (betas (0.9, 0.95) on the LMs, torch's defaults elsewhere)
    adamw_constant  (opt-in) the same AdamW at a constant lr: a check that a result against ``adamw`` does not
             rest on its schedule (short runs can favour a constant lr; ``deepopt compare``); reported beside it,
             the targets stay against ``adamw``
    muon     ``deepopt.Momentum(nesterov, Newton–Schulz, μ = 0.95)`` = Muon on the hidden matrices (convolutions
             flattened; embeddings and the output head excluded), AdamW on the rest, the same schedule; each
             matrix's lr scaled by 0.2·√max(rows, cols) (Moonlight's AdamW-RMS match, ``torch.optim.Muon``'s
             ``adjust_lr_fn="match_rms_adamw"``) so one lr sweep serves both parts
    learned  the optimizer under test (``--optimizer``): a shipped learned optimizer's name or folder
             (``DeepMomentum.from_pretrained``, ``total_steps`` = the task's steps, its own learned schedule, no
             script schedule), or a deepopt class with options (``momentum:preconditioner=adam``, run like AdamW);
             untuned (its own lr: the shipped one, or the median of ``--lrs``) and over the same sweep, as
             multiples of that lr (``--lrs`` divided by their median); ``--untuned-only``: untuned only

Metrics: the final validation loss of each run (3 seeds: mean and a 95% t-interval), the tuned lr of each method
(lowest mean final loss; a sweep of 3+ lrs whose best is at its edge is extended by a grid step, up to twice, so no
method is judged at the edge of its sweep), and the speed-up of the untuned learned optimizer: steps that tuned
AdamW (the tuned lr, cosine over T and over 2T steps) needs to reach the learned optimizer's final loss at step T,
over T — censored at 2 (a lower bound) when neither AdamW run reaches it; IQM over tasks × seeds, with a 95%
stratified-bootstrap interval (each task's seeds redrawn; ``iqm_interval``): with 3 seeds one seed's speed-up
can carry the IQM across a target, and the interval says how far.
``--ablations`` adds untuned runs of the shipped optimizer with each learned part switched off (deep branch
``hidden=0``, online W₁ ``eta=0``, W₂ online, learned schedule off).

Outputs in ``--out``: ``runs.jsonl`` (each run as it finishes; ``--resume`` skips them), ``results.csv``,
``summary.json``, ``evaluate.png`` and ``table.md`` (the README table).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import random
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deepopt.runs import JsonLines, UsageError, add_out_option, check_at_least, prepare_out, wrote
from deepopt.schedules import warmup_cosine

WEIGHT_DECAY = 0.1
LRS = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
SMOKE_LRS = (3e-3, 3e-2)
LONG = 2  # tuned AdamW also runs LONG·T steps, for speed-ups above 1
MAX_EXTENSIONS = 2  # grid steps a sweep is extended by when its best lr is at an edge
MIN_SWEEP = 3  # lrs a sweep needs to have an inside (and be extended at an edge): fewer is not a tuned baseline
SWEPT = ("adamw", "adamw_constant", "muon", "learned")
BASELINES = ("adamw", "adamw_constant", "muon")
CURVE_POINTS = 20  # validation losses per run (plus step 0)
T_95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
TASKS = ("digits_cnn", "char_lm", "hope_lm", "tabular_mlp")
VALIDATION_TASKS = ("images_cnn", "code_lm", "wine_mlp")
ABLATIONS: dict[str, dict[str, Any]] = {
    "no_deep": {"hidden": 0},            # the deep branch off: Momentum with Adam's P and the learned schedule
    "w1_fixed": {"eta": 0.0},            # no online write: the static learned read-out θ₀
    "w2_online": {"eta2": 0.1},          # W₂ learns online too
    "no_schedule": {"lr_horizon": 0},    # the learned schedule off (its lr, no warm-up or annealing)
}
OUTPUTS = ("runs.jsonl", "results.csv", "summary.json", "evaluate.png", "table.md")


# ----------------------------------------------------------------------------------------------- tasks
@dataclass
class Problem:
    """A training problem: a model, its minibatch stream and losses."""

    model: Any
    batch: Callable[[int], tuple[Any, Any]]
    loss: Callable[[Any, tuple[Any, Any]], Any]  # (model, batch) -> scalar tensor
    val_loss: Callable[[Any], float]
    adam_betas: tuple[float, float] = (0.9, 0.999)


def _classification(model: Any, data: tuple, batch_size: int, seed: int, device: str) -> Problem:
    import torch
    import torch.nn.functional as F

    x, y, x_val, y_val = (t.to(device) for t in data)

    def batch(step: int) -> tuple[Any, Any]:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        idx = torch.randint(x.shape[0], (batch_size,), generator=gen).to(device)
        return x[idx], y[idx]

    def val_loss(m: Any) -> float:
        with torch.no_grad():
            return float(F.cross_entropy(m(x_val), y_val))

    return Problem(model.to(device), batch, lambda m, b: F.cross_entropy(m(b[0]), b[1]), val_loss)


def _language(model: Any, corpus: Any, batch_size: int, context: int, seed: int, device: str) -> Problem:
    import torch

    from deepopt.hope.data import train_batch, val_batches

    val = [(x.to(device), y.to(device)) for x, y in val_batches(corpus.val, 16, context, 8)]

    def batch(step: int) -> tuple[Any, Any]:
        x, y = train_batch(corpus.train, batch_size, context, seed, step)
        return x.to(device), y.to(device)

    def val_loss(m: Any) -> float:
        with torch.no_grad():
            return statistics.fmean(float(m(x, y)[1]) for x, y in val)

    return Problem(model.to(device), batch, lambda m, b: m(b[0], b[1])[1], val_loss, adam_betas=(0.9, 0.95))


IMAGES_SEED = 9  # the synthetic image problem of images_cnn: 10 classes, noise σ 1.11


def _images_cnn(seed: int, device: str) -> Problem:
    import random

    import torch
    from torch import nn

    from deepopt.meta_train.tasks import synthetic_images

    data = synthetic_images(random.Random(IMAGES_SEED), torch.float32)
    torch.manual_seed(10_000 + seed)
    model = nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 8, 3, padding=1), nn.GELU(),
                          nn.Conv2d(8, 16, 3, padding=1), nn.GELU(), nn.Conv2d(16, 16, 3), nn.GELU(), nn.Flatten(),
                          nn.Linear(16 * 6 * 6, int(data[1].max()) + 1))
    return _classification(model, data, 32, seed, device)


def _mlp(task: str, spec: str, seed: int, device: str) -> Problem:
    """An MLP of ``meta_train.tasks.HELD_OUT_SPECS[spec]`` on its data set."""
    from deepopt.data import load_classification
    from deepopt.meta_train.tasks import HELD_OUT_SPECS, mlp_task

    dataset, widths, activation, batch_size = HELD_OUT_SPECS[spec]
    model = mlp_task(task, dataset, widths, activation, batch_size, 10_000 + seed).model
    return _classification(model, load_classification(dataset), batch_size, seed, device)


def build_problem(task: str, seed: int, smoke: bool, device: str = "cpu") -> Problem:
    """The held-out or validation suite's ``task`` with weights and batches drawn from ``seed`` (``smoke``: tiny
    sizes)."""
    import torch

    from deepopt.data import digits_cnn, load_classification

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(10_000 + seed)
        if task == "digits_cnn":
            return _classification(digits_cnn(10_000 + seed), load_classification("digits"), 64, seed, device)
        if task == "tabular_mlp":
            return _mlp(task, "breast_cancer_mlp", seed, device)
        if task == "wine_mlp":
            return _mlp(task, "wine_mlp", seed, device)
        if task == "images_cnn":
            return _images_cnn(seed, device)
        from deepopt.hope.data import load_corpus
        from deepopt.hope.model import LanguageModel
        from deepopt.hope.train import model_config

        if task == "code_lm":
            corpus = load_corpus("code", max_bytes=200_000 if smoke else 1_000_000)
            cfg = model_config("transformer", "smoke" if smoke else "tiny")
            return _language(LanguageModel(cfg), corpus, 4 if smoke else 8, 32 if smoke else 64, seed, device)
        corpus = load_corpus("prose", max_bytes=200_000 if smoke else 2_000_000)
        if task == "char_lm":
            cfg = model_config("transformer", "smoke" if smoke else "small")
            return _language(LanguageModel(cfg), corpus, 4 if smoke else 8, 32 if smoke else 128, seed, device)
        if task == "hope_lm":
            return _language(LanguageModel(model_config("hope", "smoke")), corpus, 4 if smoke else 8,
                             32 if smoke else 64, seed, device)
    raise ValueError(f"unknown task {task!r}; accepted: {TASKS + VALIDATION_TASKS}")


STEPS = {"digits_cnn": 500, "char_lm": 1000, "hope_lm": 200, "tabular_mlp": 300,
         "images_cnn": 400, "code_lm": 400, "wine_mlp": 300}


def task_steps(task: str, smoke: bool) -> int:
    return STEPS[task] if not smoke else 12


# ----------------------------------------------------------------------------------------------- optimizers
@dataclass(frozen=True)
class OptimizerSpec:
    """``--optimizer``: a shipped learned optimizer or folder (``pretrained``) or a deepopt class, with options."""

    text: str
    pretrained: str | None  # the folder, when a learned optimizer
    cls_name: str | None
    options: dict[str, Any]

    @property
    def base_lr(self) -> float | None:
        """The untuned lr: the learned optimizer's own (``None`` for a class: the sweep's median)."""
        if self.pretrained is None:
            return self.options.get("lr")
        from deepopt.checkpoint import load_pretrained

        return float(self.options.get("lr", load_pretrained(self.pretrained)[1]["lr"]))


def parse_optimizer(text: str, flag: str = "--optimizer", check: bool = True) -> OptimizerSpec:
    """``NAME_OR_FOLDER[:key=value,...]``; values are JSON (``hidden=0``, ``preconditioner=adam``). Errors name
    ``flag``.  ``check``: also build it once (``check_options``), as the commands do before any run; a run unit
    re-reads a spec its command already checked and passes False."""
    import deepopt
    from deepopt.pretrained import names, resolve

    name, _, rest = text.partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"{flag} {text!r}: options must be key=value, got {item!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    try:
        folder = resolve(name)
    except FileNotFoundError:
        folder = None
    if folder is not None and (folder / "config.json").is_file():
        spec = OptimizerSpec(text, str(folder), None, options)
    elif name in deepopt.OPTIMIZERS:
        spec = OptimizerSpec(text, None, name, options)
    else:
        raise UsageError(f"{flag} {name!r} is not a shipped learned optimizer {names()}, a folder "
                         f"holding one, or an optimizer {sorted(deepopt.OPTIMIZERS)}")
    if check:
        check_options(spec, flag)
    return spec


def check_options(spec: OptimizerSpec, flag: str) -> str:
    """Build the optimizer of ``spec`` once on a stand-in model, so that a bad option (an unknown name, a value of
    the wrong type or out of range) is a one-line error naming ``flag`` before any run starts; returns
    ``resolved_options``' text of what it built."""
    try:
        return resolved_options(spec)
    except (TypeError, ValueError) as err:
        raise UsageError(f"{flag} {spec.text!r}: {err}") from None


def resolved_options(spec: OptimizerSpec) -> str:
    """The optimizer ``spec`` builds (its class and every option's value, defaults and a shipped optimizer's
    config included), as text: two specs that build the same optimizer, however spelled, give the same text."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt, _ = make_method("learned", spec, torch.nn.Linear(2, 2), 1.0, 10, (0.9, 0.999))
    options = {k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in opt.defaults.items()}
    options["lr"] = spec.base_lr  # the untuned lr the runs take (the stand-in's is a placeholder)
    return f"{type(opt).__name__} {spec.pretrained} {sorted(options.items(), key=lambda kv: kv[0])!r}"


def _groups(model: Any) -> list[dict[str, Any]]:
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": WEIGHT_DECAY},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


class _Combined:
    """Several optimizers stepped as one (Muon on the hidden matrices, AdamW on the rest)."""

    def __init__(self, *optimizers: Any) -> None:
        self.optimizers = [o for o in optimizers if o is not None]

    def zero_grad(self) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=True)

    def step(self) -> None:
        for o in self.optimizers:
            o.step()


def _muon_params(model: Any) -> tuple[list[Any], list[Any]]:
    """(hidden matrices, the rest): ≥ 2-D parameters except embeddings and the output head (the last ≥ 2-D
    parameter that is not an embedding, for models without a tied head)."""
    import torch

    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    matrices = [p for p in model.parameters() if p.dim() >= 2 and id(p) not in embeddings]
    if not embeddings and matrices:
        matrices = matrices[:-1]  # the classifier head
    chosen = {id(p) for p in matrices}
    return matrices, [p for p in model.parameters() if id(p) not in chosen]


def make_method(method: str, spec: OptimizerSpec | None, model: Any, lr: float, steps: int,
                betas: tuple[float, float]) -> tuple[Any, list[Any]]:
    """``(optimizer, schedulers)`` of ``method`` (one of ``BASELINES``, "learned", or "ablation:<name>")."""
    import torch

    import deepopt

    if method in ("adamw", "adamw_constant"):
        opt = torch.optim.AdamW(_groups(model), lr=lr, betas=betas)
        return opt, [warmup_cosine(opt, steps)] if method == "adamw" else []
    if method == "muon":
        matrices, rest = _muon_params(model)
        groups = [{"params": [p], "lr": lr * 0.2 * max(p.shape[0], p[0].numel()) ** 0.5
                   / max(1.0, p.shape[0] / p[0].numel()) ** 0.5} for p in matrices]
        muon = deepopt.Momentum(groups, lr=lr, momentum=0.95, nesterov=True, nonlinearity="newton_schulz",
                                weight_decay=WEIGHT_DECAY, decoupled_weight_decay=True) if groups else None
        adam = torch.optim.AdamW([{"params": [p for p in rest if p.dim() >= 2], "weight_decay": WEIGHT_DECAY},
                                  {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}],
                                 lr=lr, betas=betas)
        opt = _Combined(muon, adam)
        return opt, [warmup_cosine(o, steps) for o in opt.optimizers]
    assert spec is not None
    options = dict(spec.options)
    if method.startswith("ablation:"):
        options.update(ABLATIONS[method.split(":", 1)[1]])
    if spec.pretrained is not None:
        options.pop("lr", None)
        if options.get("hidden") == 0:
            options["memory_init"] = None
        horizon = {} if "lr_horizon" in options else {"total_steps": steps}
        return deepopt.DeepMomentum.from_pretrained(spec.pretrained, _groups(model), lr=lr, **horizon,
                                                    **options), []
    options.pop("lr", None)
    opt = deepopt.OPTIMIZERS[spec.cls_name](_groups(model), lr=lr, **options)
    return opt, [warmup_cosine(opt, steps)]


# ----------------------------------------------------------------------------------------------- one run
def run_unit(unit: dict[str, Any]) -> dict[str, Any]:
    """Train one (task, method, lr, seed, steps) unit; returns its final validation loss and curve."""
    import torch

    torch.set_num_threads(unit.get("threads", 1))
    smoke, steps = unit["smoke"], unit["steps"]
    problem = build_problem(unit["task"], unit["seed"], smoke, unit["device"])
    spec = parse_optimizer(unit["optimizer"], check=False) if unit["optimizer"] else None
    opt, schedulers = make_method(unit["method"], spec, problem.model, unit["lr"], steps, problem.adam_betas)
    every = max(1, steps // CURVE_POINTS)
    curve = [(0, problem.val_loss(problem.model))]
    started = time.perf_counter()
    for t in range(steps):
        problem.model.train()
        opt.zero_grad()
        loss = problem.loss(problem.model, problem.batch(t))
        loss.backward()
        opt.step()
        for s in schedulers:
            s.step()
        if (t + 1) % every == 0 or t + 1 == steps:
            problem.model.eval()
            value = problem.val_loss(problem.model)
            curve.append((t + 1, value if math.isfinite(value) else math.inf))
            if not math.isfinite(value):
                curve += [(s, math.inf) for s in range(t + 1 + every, steps + 1, every)]
                break
    return {"final": curve[-1][1], "curve": curve, "seconds": time.perf_counter() - started}


# ----------------------------------------------------------------------------------------------- the study
def plan(tasks: Sequence[str], seeds: Sequence[int], lrs: Sequence[float], spec: OptimizerSpec, smoke: bool,
         ablations: bool, device: str, methods: Sequence[str] = ("adamw", "muon", "learned"),
         sweep_learned: bool = True) -> list[dict[str, Any]]:
    """Every run of the study (tuned AdamW at LONG·T is added once the sweep has chosen its lr); the learned
    optimizer over the sweep's multiples of its lr and untuned, or untuned only (``sweep_learned=False``)."""
    base = spec.base_lr or statistics.median(lrs)
    multipliers = [lr / statistics.median(lrs) for lr in lrs]
    units = []
    for task in tasks:
        steps = task_steps(task, smoke)
        for seed in seeds:
            common = dict(task=task, seed=seed, steps=steps, smoke=smoke, device=device, optimizer=spec.text)
            units += [dict(common, method=m, lr=lr, scale=1.0) for m in BASELINES if m in methods
                      for lr in lrs]
            if "learned" not in methods:
                continue
            if sweep_learned:
                units += [dict(common, method="learned", lr=base * k, scale=k) for k in multipliers]
            if 1.0 not in multipliers or not sweep_learned:
                units.append(dict(common, method="learned", lr=base, scale=1.0))
            if ablations and spec.pretrained is not None:
                units += [dict(common, method=f"ablation:{a}", lr=base, scale=1.0) for a in ABLATIONS]
    return units


def _tuned(rows: list[dict[str, Any]]) -> float:
    """The lr whose runs reach the lowest mean final loss (a diverged run counts as +∞)."""
    by_lr: dict[float, list[float]] = {}
    for r in rows:
        by_lr.setdefault(r["lr"], []).append(r["final"] if math.isfinite(r["final"]) else math.inf)
    return min(by_lr, key=lambda lr: statistics.fmean(by_lr[lr]))


def extend_sweeps(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each (task, method) swept over lrs whose tuned lr is the sweep's smallest or largest: the runs one grid
    step beyond it (the grid's ratio), for every seed — so no baseline is judged at the edge of its sweep."""
    extra = []
    for task, method in sorted({(r["task"], r["method"]) for r in results if r["method"] in SWEPT}):
        rows = [r for r in results if r["task"] == task and r["method"] == method]
        rows = [r for r in rows if r["steps"] == min(x["steps"] for x in rows)]
        lrs = sorted({r["lr"] for r in rows})
        if len(lrs) < MIN_SWEEP:  # a two-point (smoke) sweep is all edges
            continue
        best = _tuned(rows)
        if best not in (lrs[0], lrs[-1]):
            continue
        ratio = lrs[1] / lrs[0] if best == lrs[0] else lrs[-1] / lrs[-2]
        lr = best / ratio if best == lrs[0] else best * ratio
        for r in rows:
            if r["lr"] == best:
                extra.append(dict(r, lr=lr, scale=r["scale"] * lr / best))
    return extra


def _key(unit: dict[str, Any]) -> str:
    """A run's identity; the baselines' does not include ``--optimizer`` (they are shared by every study)."""
    keys = ("task", "seed", "steps", "smoke", "method", "lr", "device")
    return json.dumps({k: unit[k] for k in keys + (("optimizer",) if unit["method"] not in BASELINES else ())},
                      sort_keys=True)


def execute(units: list[dict[str, Any]], store: JsonLines, jobs: int, log: Callable[[str], None]) -> None:
    """Run the units not yet in ``store`` (``jobs`` processes), appending each result as it finishes."""
    todo = [u for u in units if _key(u) not in store.done]
    if not todo:
        return
    done, started = 0, time.perf_counter()

    def record(unit: dict[str, Any], result: dict[str, Any]) -> None:
        nonlocal done
        store.add(_key(unit), {**unit, **result})
        done += 1
        log(f"[{done}/{len(todo)}] {unit['task']} {unit['method']} lr {unit['lr']:.3g} seed {unit['seed']} "
            f"steps {unit['steps']}: val loss {result['final']:.4f} ({result['seconds']:.0f} s; "
            f"{time.perf_counter() - started:.0f} s elapsed)")

    if jobs == 1:
        for unit in todo:
            record(unit, run_unit(unit))
        return
    import multiprocessing

    spawn = any(str(u["device"]).startswith("cuda") for u in todo)  # CUDA does not survive a fork
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn") if spawn else None) \
            as pool:
        for unit, result in zip(todo, pool.map(run_unit, todo)):
            record(unit, result)


def execute_tuned(units: list[dict[str, Any]], store: JsonLines, jobs: int,
                  log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Run ``units`` (those not yet in ``store``) and the runs that ``extend_sweeps`` adds, up to
    ``MAX_EXTENSIONS`` grid steps; returns every result."""
    execute(units, store, jobs, log)
    results = [store.done[_key(u)] for u in units]
    for _ in range(MAX_EXTENSIONS):  # a sweep whose best lr is at its edge goes one grid step further
        extra = [{k: v for k, v in u.items() if k not in ("final", "curve", "seconds")}
                 for u in extend_sweeps(results)]
        if not extra:
            break
        execute(extra, store, jobs, log)
        results += [store.done[_key(u)] for u in extra]
    return results


def _stats(values: list[float]) -> dict[str, float]:
    mean = statistics.fmean(values)
    half = T_95.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values)) \
        if len(values) > 1 else 0.0
    return {"mean": mean, "ci95": half, "n": len(values)}


def _first_reach(curve: Sequence[Sequence[float]], target: float) -> float | None:
    return next((float(s) for s, v in curve if v <= target), None)


def iqm(values: Sequence[float]) -> float:
    """Interquartile mean: the mean of the middle 50% (with fractional weights at the quartiles)."""
    xs, n = sorted(values), len(values)
    if n == 0:
        return math.nan
    lo, hi = n / 4, 3 * n / 4
    total = sum(x * max(0.0, min(i + 1, hi) - max(i, lo)) for i, x in enumerate(xs))
    return total / (hi - lo)


def iqm_interval(groups: Sequence[Sequence[float]], reps: int = 2000, seed: int = 0) -> tuple[float, float]:
    """A 95% stratified-bootstrap interval of the IQM over ``groups`` (one task's per-seed values each): every
    replicate redraws each task's seeds with replacement and takes the IQM of them all (the interval rliable
    recommends for few-run results, Agarwal et al. 2021); percentiles 2.5 and 97.5 of ``reps`` replicates, a fixed
    ``seed`` so that a summary is reproducible."""
    rng = random.Random(seed)
    draws = sorted(iqm([x for g in groups for x in rng.choices(g, k=len(g))]) for _ in range(reps))
    return draws[round(0.025 * (reps - 1))], draws[round(0.975 * (reps - 1))]


def mean_log_ratio(ratios: Sequence[float]) -> float:
    """``mean log(ratio)`` of losses to tuned AdamW's (``deepopt select``'s score; +∞ if any ratio is not finite)."""
    return statistics.fmean(math.log(r) if math.isfinite(r) and r > 0 else math.inf for r in ratios)


def summarise(results: list[dict[str, Any]], tasks: Sequence[str], seeds: Sequence[int]) -> dict[str, Any]:
    """Tuned lrs, final-loss statistics, speed-ups, IQM and the targets, from the runs."""
    summary: dict[str, Any] = {"tasks": {}, "seeds": list(seeds)}
    speedups: list[float] = []
    for task in tasks:
        rows = [r for r in results if r["task"] == task]
        steps = max(r["steps"] for r in rows if r["method"] == "learned")
        normal = [r for r in rows if r["steps"] == steps]
        entry: dict[str, Any] = {"steps": steps, "methods": {}}
        for method in sorted({r["method"] for r in normal}):
            by_lr: dict[float, list[float]] = {}
            for r in normal:
                if r["method"] == method:
                    by_lr.setdefault(r["lr"], []).append(r["final"])
            if method == "learned" and len(by_lr) == 1:  # --untuned-only: no sweep, no tuned entry
                continue
            best = _tuned([r for r in normal if r["method"] == method])
            entry["methods"][method] = {"tuned_lr": best, **_stats(by_lr[best]),
                                        "by_lr": {str(lr): statistics.fmean(v) for lr, v in by_lr.items()}}
        untuned = [r for r in normal if r["method"] == "learned" and r["scale"] == 1.0]
        entry["methods"]["learned_untuned"] = {"lr": untuned[0]["lr"], **_stats([r["final"] for r in untuned])}
        adam_lr = entry["methods"]["adamw"]["tuned_lr"]
        per_seed = []
        for r in untuned:
            reaches = [_first_reach(a["curve"], r["final"]) for a in rows
                       if a["method"] == "adamw" and a["lr"] == adam_lr and a["seed"] == r["seed"]]
            reached = [s for s in reaches if s is not None]
            value = min(reached) / steps if reached else float(LONG)
            per_seed.append({"seed": r["seed"], "speedup": value, "censored": not reached})
            speedups.append(value)
        entry["speedup"] = per_seed
        adam = entry["methods"]["adamw"]["mean"]
        entry["untuned_at_most_tuned_adamw"] = entry["methods"]["learned_untuned"]["mean"] <= adam
        if "adamw_constant" in entry["methods"]:  # the better of AdamW's two schedules
            best_adam = min(adam, entry["methods"]["adamw_constant"]["mean"])
            entry["untuned_at_most_either_adamw"] = entry["methods"]["learned_untuned"]["mean"] <= best_adam
        summary["tasks"][task] = entry
    won = sum(t["untuned_at_most_tuned_adamw"] for t in summary["tasks"].values())
    summary["speedup_iqm"] = iqm(speedups)
    summary["speedup_iqm_ci95"] = list(iqm_interval([[u["speedup"] for u in t["speedup"]]
                                                     for t in summary["tasks"].values()]))
    summary["mean_log_ratio"] = mean_log_ratio([t["methods"]["learned_untuned"]["mean"] / t["methods"]["adamw"]["mean"]
                                                for t in summary["tasks"].values()])
    # the targets compare with a tuned AdamW: no verdict where some task's AdamW saw fewer than MIN_SWEEP lrs
    summary["adamw_sweep_lrs"] = min(len(t["methods"]["adamw"]["by_lr"]) for t in summary["tasks"].values())
    tuned = summary["adamw_sweep_lrs"] >= MIN_SWEEP
    summary["targets"] = {
        "untuned_final_loss_at_most_tuned_adamw": {"tasks": won, "of": len(tasks), "met": won >= 3 if tuned else None},
        "speedup_iqm_at_least_1.2": {"value": summary["speedup_iqm"],
                                     "met": summary["speedup_iqm"] >= 1.2 if tuned else None},
    }
    if all("untuned_at_most_either_adamw" in t for t in summary["tasks"].values()):
        summary["untuned_at_most_either_adamw"] = sum(t["untuned_at_most_either_adamw"]
                                                      for t in summary["tasks"].values())
    return summary


def table(summary: dict[str, Any], command: str) -> str:
    """The README table: final validation loss (mean ± 95% CI; one seed: no interval, "n = 1") per task and
    method, speed-ups."""
    methods = ["adamw", *(["adamw_constant"] if "untuned_at_most_either_adamw" in summary else []), "muon",
               "learned", "learned_untuned"]
    extra = sorted({m for t in summary["tasks"].values() for m in t["methods"] if m.startswith("ablation:")})
    names = {"adamw": "AdamW + warm-up/cosine (tuned lr)", "adamw_constant": "AdamW, constant lr (tuned lr)",
             "muon": "Muon + AdamW (tuned lr)",
             "learned": "learned (tuned lr)", "learned_untuned": "learned, untuned"}
    head = "| task | " + " | ".join(names.get(m, m.replace("ablation:", "untuned, ")) for m in methods + extra)
    lines = [f"`{command}`", "", head + " | speed-up (untuned vs tuned AdamW) |",
             "|---" * (len(methods) + len(extra) + 2) + "|"]
    for task, t in summary["tasks"].items():
        cells = []
        for m in methods + extra:
            s = t["methods"].get(m)
            cells.append("n/a" if s is None else f"{s['mean']:.4f} ± {s['ci95']:.4f}" if s["n"] > 1
                         else f"{s['mean']:.4f} (n = 1)")
        ups = ", ".join(f"{u['speedup']:.2f}{'+' if u['censored'] else ''}" for u in t["speedup"])
        lines.append(f"| {task} ({t['steps']} steps) | " + " | ".join(cells) + f" | {ups} |")
    tg = summary["targets"]
    verdict = {True: "met", False: "not met",
               None: f"no verdict: AdamW saw {summary['adamw_sweep_lrs']} lr(s), a tuned baseline {MIN_SWEEP}+"}
    lo, hi = summary["speedup_iqm_ci95"]
    lines += ["", f"Speed-up IQM over tasks × seeds: {summary['speedup_iqm']:.2f} (95% interval {lo:.2f}–{hi:.2f}, "
              f"each task's seeds redrawn; target ≥ 1.2: "
              f"{verdict[tg['speedup_iqm_at_least_1.2']['met']]}); untuned final loss ≤ tuned AdamW on "
              f"{tg['untuned_final_loss_at_most_tuned_adamw']['tasks']} of {len(summary['tasks'])} tasks (target ≥ 3: "
              f"{verdict[tg['untuned_final_loss_at_most_tuned_adamw']['met']]}); mean log ratio of the untuned loss "
              f"to tuned AdamW's {summary['mean_log_ratio']:+.3f} (`deepopt select`'s score). "
              "x+ = censored: tuned AdamW does not reach the loss within 2T."]
    if "untuned_at_most_either_adamw" in summary:
        lines[-1] += (f" Against the better of AdamW's two schedules: {summary['untuned_at_most_either_adamw']} of "
                      f"{len(summary['tasks'])} tasks.")
    return "\n".join(lines) + "\n"


def plot(path: Path, summary: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(summary["tasks"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.6 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        methods = summary["tasks"][task]["methods"]
        names = list(methods)
        means = [methods[m]["mean"] for m in names]
        ci = [methods[m]["ci95"] for m in names]
        lower = [min(c, m) for c, m in zip(ci, means)]  # a loss CI drawn no lower than 0
        ax.bar(range(len(names)), means, yerr=[lower, ci], color=[f"C{i}" for i in range(len(names))])
        ax.set_xticks(range(len(names)), [n.replace("ablation:", "") for n in names], rotation=60, fontsize=7)
        finite = [m for m in means if math.isfinite(m)]
        if finite:
            ax.set_ylim(0.9 * min(finite), 1.05 * max(finite))
        ax.set(title=f"{task} ({summary['tasks'][task]['steps']} steps)", ylabel="final validation loss")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


# ----------------------------------------------------------------------------------------------- CLI
def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``evaluate`` subcommand."""
    p = subparsers.add_parser("evaluate", help="an optimizer (default: the shipped learned one) on a held-out suite "
                              "against tuned AdamW and Muon", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_out_option(p, "evaluate", OUTPUTS)
    p.add_argument("--optimizer", default=None, metavar="SPEC",
                   help="a shipped learned optimizer's name, a folder from `deepopt meta-train`, or a deepopt "
                        "optimizer, with options: NAME[:key=value,...] (default: the shipped default)")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated tasks from {TASKS}")
    p.add_argument("--seeds", type=int, default=None, help="the number of seeds, run as 0 … N−1 (default 3; smoke 1)")
    p.add_argument("--methods", default="adamw,muon,learned",
                   help="the methods to run, from adamw (required), adamw_constant (opt-in), muon, learned (a study "
                        "without 'learned' runs the baselines only and writes no summary)")
    p.add_argument("--untuned-only", action="store_true",
                   help="run the learned optimizer at its own lr only, not over the sweep (no 'learned, tuned lr')")
    p.add_argument("--ablations", action="store_true", help="add untuned runs of the learned optimizer with each "
                   f"learned part off: {', '.join(ABLATIONS)}")
    add_run_options(p)
    p.set_defaults(func=run)


def add_run_options(p: argparse.ArgumentParser) -> None:
    """The options ``evaluate`` and ``select`` share: resume, the sweep, smoke size, processes, threads, device."""
    p.add_argument("--resume", action="store_true", help="continue the study in --out (runs done are kept)")
    p.add_argument("--lrs", default=None, help="the lr sweep (default 3e-4,1e-3,3e-3,1e-2,3e-2; smoke 3e-3,3e-2)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: an end-to-end check in seconds (CI)")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel processes")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")


def parse_lrs(text: str | None, smoke: bool) -> list[float]:
    """``--lrs``: comma-separated numbers > 0 (default ``LRS``; ``SMOKE_LRS`` with ``--smoke``)."""
    try:
        lrs = [float(v) for v in text.split(",")] if text else list(SMOKE_LRS if smoke else LRS)
    except ValueError:
        raise UsageError(f"--lrs must be comma-separated numbers, got {text!r}") from None
    if not lrs or not all(v > 0 and math.isfinite(v) for v in lrs):
        raise UsageError(f"--lrs must be numbers > 0, got {text!r}")
    return lrs


def run(args: argparse.Namespace) -> int:
    from deepopt.pretrained import DEFAULT
    from deepopt.runs import check_device

    check_device(args.device)
    check_at_least(args, 1, "seeds", "jobs", "threads")
    tasks = [t for t in args.tasks.split(",") if t]
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown or not tasks:
        raise UsageError(f"--tasks: unknown task(s) {unknown or tasks}; accepted: {list(TASKS)}")
    lrs = parse_lrs(args.lrs, args.smoke)
    methods = [m for m in args.methods.split(",") if m]
    if not methods or set(methods) - {*BASELINES, "learned"} or "adamw" not in methods:
        raise UsageError(f"--methods must list adamw and any of adamw_constant, muon, learned; got {args.methods!r}")
    spec = parse_optimizer(args.optimizer or DEFAULT)
    if args.ablations and spec.pretrained is None:
        raise UsageError("--ablations switches off the learned parts of a learned optimizer; --optimizer names a "
                         "class")
    seeds = list(range(args.seeds or (1 if args.smoke else 3)))
    out = prepare_out(args)
    store = JsonLines(out / "runs.jsonl", resume=args.resume)
    log = lambda line: print(line, flush=True)  # noqa: E731
    started = time.perf_counter()
    units = plan(tasks, seeds, lrs, spec, args.smoke, args.ablations, args.device, methods,
                 sweep_learned=not args.untuned_only)
    for u in units:
        u["threads"] = args.threads
    results = execute_tuned(units, store, args.jobs, log)
    long_units = []
    for task in tasks:  # tuned AdamW over LONG·T steps, for speed-ups above 1
        rows = [r for r in results if r["task"] == task and r["method"] == "adamw"]
        best = _tuned(rows)
        long_units += [dict(r, steps=LONG * r["steps"]) for r in rows if r["lr"] == best]
    long_units = [{k: v for k, v in u.items() if k not in ("final", "curve", "seconds")} for u in long_units]
    execute(long_units, store, args.jobs, log)
    results += [store.done[_key(u)] for u in long_units]
    if "learned" not in methods:
        print(f"baselines done ({len(results)} runs); rerun with the learned optimizer and --resume for the summary")
        wrote(out)
        return 0
    summary = summarise(results, tasks, seeds)
    command = "deepopt evaluate" + (f" --optimizer {args.optimizer}" if args.optimizer else "") + \
        (" --smoke" if args.smoke else "") + (" --ablations" if args.ablations else "") + \
        (" --untuned-only" if args.untuned_only else "")
    summary.update(optimizer=spec.text, lrs=lrs, command=command, seconds=time.perf_counter() - started)
    from deepopt.checkpoint import atomic_save_json, atomic_write

    atomic_save_json(summary, out / "summary.json")
    fields = ["task", "method", "lr", "scale", "seed", "steps", "final", "seconds"]

    def write_csv(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(results)

    atomic_write(out / "results.csv", write_csv)
    text = table(summary, command)
    atomic_write(out / "table.md", lambda tmp: Path(tmp).write_text(text))
    plot(out / "evaluate.png", summary)
    print(text)
    wrote(out)
    return 0
