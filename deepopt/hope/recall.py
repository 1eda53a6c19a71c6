"""Equal tuning and the plateau diagnostic of the recall evaluations (``deepopt hope mqar``, ``deepopt hope niah``).

**Equal tuning.**  Every model gets the same budget: each model trains at every learning rate of the sweep
(``LR_SWEEP`` by default) at the first seed, for the same number of steps; the learning rate with the best
*validation* accuracy (held-out sequences drawn apart from the test sequences; ties go to the lower final
training loss, a diverged run ranks last) then trains every other seed.  The tables report the test
accuracy of that learning rate over all seeds, and every run of the sweep beside it.

**Plateau diagnostic.**  A model that copies *some* value of its context without binding it to the asked key
answers right 1/n of the time among n candidate values (Transformer++ without a short conv sits at 0.24 on
MQAR 64×4).  ``value_share`` = the share of answers that equal some in-context value (right or not) and
``bound_share = accuracy / value_share`` = of those, the share that is the right one: ≈ 1/n for a copy
without binding, 1 for recall.  ``copy_plateau`` flags ``value_share ≥ 0.5`` with ``bound_share < 2/n``.
"""

from __future__ import annotations

import math
import multiprocessing
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from multiprocessing.connection import wait
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from deepopt.runs import JsonLines, UsageError, progress_bar

LR_SWEEP = (1e-3, 3e-3, 1e-2, 3e-2)
# the recall evaluations' default models: HOPE, the recall baseline (Transformer++ with its short conv) and the
# plain Transformer++ beside it
RECALL_MODELS = ("hope", "transformer-conv", "transformer")
TUNING_RULE = ("every model: the same steps; each lr of the sweep at the first seed; the lr with the best validation "
               "accuracy (held-out sequences apart from the test ones; ties: lower final train loss; diverged runs "
               "last) at every other seed; tables: test accuracy at that lr, mean and sample std over the seeds")
RUNS_FILE = "runs.jsonl"  # every finished training run of a sweep, one line each (``--resume`` reads it back)
# options that do not change what a recall run computes (may differ when ``--resume`` continues a run; runs are
# keyed by model, lr and seed, so ``--models`` may name other models: those already trained are read back)
NOT_IDENTITY = ("models", "lr", "resume", "jobs", "overwrite", "out", "progress", "threads", "func", "command",
                "hope_command", "compile", "run_command", "run_outputs", "run_shares", "context_default", "run_checked",
                "run_marked", "run_default_out")


def plateau(accuracy: float, value_share: float, n_values: int) -> dict[str, Any]:
    """The plateau diagnostic of one evaluation (module doc): ``value_share``, ``bound_share`` and
    ``copy_plateau`` for answers chosen among ``n_values`` in-context values."""
    bound = accuracy / value_share if value_share > 0 else 0.0
    return {"value_share": value_share, "bound_share": bound,
            "copy_plateau": bool(n_values > 1 and value_share >= 0.5 and bound < 2 / n_values)}


def add_tuning_args(p, *, lr_default_help: str) -> None:
    """``--lrs`` and ``--resume`` of a recall command (``--seeds`` and ``--lr`` are the command's own)."""
    p.add_argument("--lrs", type=float, nargs="+", metavar="LR",
                   help="learning-rate sweep: every model trains at each at the first seed, the best by validation "
                        "accuracy trains the other seeds (default " + " ".join(f"{lr:g}" for lr in LR_SWEEP)
                        + f"; smoke: one lr); {lr_default_help}")
    p.add_argument("--resume", action="store_true",
                   help=f"continue a killed run in --out: the training runs in its {RUNS_FILE} are read back, "
                        "the others trained")
    p.add_argument("--jobs", type=int, default=1,
                   help="training runs at once, each in its own process (CPU only; default 1): the sweep's runs of "
                        "every model, then a model's other seeds as soon as its sweep is done; each process takes "
                        "--threads threads (default: torch's count / JOBS). The same runs and numbers as --jobs 1")


def check_jobs(args, device, world: int = 1) -> None:
    """``--jobs``: ≥ 1; above 1 only on the CPU, in one process (not under torchrun), where processes can be
    forked.  ``ValueError`` naming the option; progress bars are turned off for parallel runs."""
    if args.jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
    if args.jobs == 1:
        return
    if str(device).split(":")[0] != "cpu" or world > 1:
        raise ValueError(f"--jobs {args.jobs}: parallel runs are CPU processes; on {device} (or under torchrun) "
                         "use --jobs 1")
    if "fork" not in multiprocessing.get_all_start_methods():
        raise ValueError(f"--jobs {args.jobs} needs processes started by fork (Linux, macOS); use --jobs 1")
    args.progress = False  # one bar per process would interleave


def resolve_lrs(args, lr_given: float | None) -> list[float]:
    """The sweep of a recall command: ``--lrs``, or the one ``--lr`` given, or ``LR_SWEEP`` (``[3e-3]`` with
    ``--smoke``).  ``ValueError`` naming the option on a bad value."""
    if args.lrs is not None and lr_given is not None:
        raise ValueError("give --lr (one learning rate) or --lrs (a sweep), not both")
    lrs = args.lrs or ([lr_given] if lr_given is not None else [3e-3] if args.smoke else list(LR_SWEEP))
    for lr in lrs:
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"--lrs must be finite numbers > 0, got {lr}")
    if len(set(lrs)) != len(lrs):
        raise ValueError(f"--lrs must not repeat a learning rate, got {lrs}")
    if len(set(args.seeds)) != len(args.seeds):
        raise ValueError(f"--seeds must not repeat a seed, got {args.seeds}")
    return list(lrs)


def run_identity(args) -> dict[str, Any]:
    """The options that decide a recall run's numbers (what ``--resume`` must find unchanged)."""
    out = {}
    for k, v in sorted(vars(args).items()):
        if k in NOT_IDENTITY or callable(v):
            continue
        out[k] = [list(x) if isinstance(x, tuple) else x for x in v] if isinstance(v, (list, tuple)) else v
    return out


def open_log(out, args) -> JsonLines:
    """The run's ``runs.jsonl`` (read back with ``--resume``), its first entry the run's identity; a
    ``UsageError`` when ``--resume`` finds other options than the killed run's (an option the killed run did not
    have counts as unset)."""
    log = JsonLines(out / RUNS_FILE, resume=args.resume)
    identity = run_identity(args)
    was = {k: v for k, v in log.done.get("identity", identity).items() if k not in NOT_IDENTITY}
    diff = sorted(k for k in set(was) | set(identity) if was.get(k) != identity.get(k))  # absent = None (unset)
    if diff:
        raise UsageError(f"--resume: options differ from the run in --out {out}: {diff}")
    if "identity" not in log.done:
        log.add("identity", identity)
    return log


def rank_key(run: dict[str, Any]) -> tuple[float, float]:
    """Sort key of a sweep's runs, best first: higher validation accuracy, then lower final training loss."""
    if run["diverged"]:
        return (math.inf, math.inf)
    return (-run["val_accuracy"], run["final_train_loss"])


def tuned_runs(models: Sequence[str], lrs: Sequence[float], seeds: Sequence[int],
               train: Callable[[str, float, int], dict[str, Any]], log: JsonLines | None,
               prefix: str = "", jobs: int = 1, threads: int | None = None
               ) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Equal tuning (module doc): ``train(model, lr, seed)`` → a run (``val_accuracy``, ``final_train_loss``,
    ``diverged`` and the command's own results) for every lr at ``seeds[0]``, then for ``seeds[1:]`` at each
    model's best lr.  Finished runs are appended to ``log`` and taken from it when already there (``--resume``;
    ``None``: kept in memory, as on the other ranks of a torchrun).  ``jobs > 1``: up to ``jobs`` runs at once,
    each ``train`` call in a forked process with ``threads`` torch threads (default: this process's count /
    ``jobs``), every sweep run queued first and a model's other seeds as soon as its sweep is done; a run depends
    only on its model, lr and seed, so the runs are those of ``jobs = 1``.  A failed run stops the others; the
    finished ones stay in ``log``.
    Returns every run (``model``, ``lr``, ``seed``, ``best_lr`` added) and the best lr per model."""
    done = log.done if log is not None else {}

    def key(model: str, lr: float, seed: int) -> str:
        return f"{prefix}{model}|lr={lr:g}|seed={seed}"

    def finished(model: str, lr: float, seed: int, run: dict[str, Any]) -> None:
        run = {"model": model, "lr": lr, "seed": seed, **run}
        k = key(model, lr, seed)
        if log is not None:
            log.add(k, run)
        done[k] = run
        loss = "diverged" if run["diverged"] else f"final train loss {run['final_train_loss']:.3f}"
        print(f"{k}: val_accuracy {run['val_accuracy']:.3f}, {loss}, {run['wall_s']:.0f} s", file=sys.stderr,
              flush=True)

    def timed(model: str, lr: float, seed: int) -> dict[str, Any]:
        t0, c0 = time.perf_counter(), time.process_time()
        return {**train(model, lr, seed), "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}

    def best_of(model: str) -> float:
        return min((done[key(model, lr, seeds[0])] for lr in lrs), key=rank_key)["lr"]

    if jobs > 1:
        _run_in_processes(jobs, threads or max(1, torch.get_num_threads() // jobs), models, lrs, seeds, timed,
                          finished, lambda *task: key(*task) in done, best_of)
    runs, best = [], {}
    for model in models:
        for lr in lrs:
            if key(model, lr, seeds[0]) not in done:
                finished(model, lr, seeds[0], timed(model, lr, seeds[0]))
        best[model] = best_of(model)
        for seed in seeds[1:]:
            if key(model, best[model], seed) not in done:
                finished(model, best[model], seed, timed(model, best[model], seed))
        runs += [dict(done[key(model, lr, seeds[0])]) for lr in lrs]
        runs += [dict(done[key(model, best[model], seed)]) for seed in seeds[1:]]
    for run in runs:
        run["best_lr"], run["sweep"] = run["lr"] == best[run["model"]], run["seed"] == seeds[0]
    return runs, best


def _train_in_child(timed: Callable[..., dict[str, Any]], task: tuple, threads: int, conn) -> None:
    """A forked process's one run: its result (or the error's traceback) sent back on ``conn``."""
    torch.set_num_threads(threads)
    try:
        conn.send(("run", timed(*task)))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def _run_in_processes(jobs: int, threads: int, models: Sequence[str], lrs: Sequence[float], seeds: Sequence[int],
                      timed: Callable[..., dict[str, Any]], finished: Callable[..., None],
                      is_done: Callable[..., bool], best_of: Callable[[str], float]) -> None:
    """``tuned_runs``' schedule on ``jobs`` forked processes: each sweep run not done yet, then each model's
    other seeds at its best lr once its sweep is done; ``finished`` records each result in this process, in the
    order they end.  Raises ``RuntimeError`` with the child's traceback when a run fails (the others are
    stopped)."""
    fork = multiprocessing.get_context("fork")
    queue = [(m, lr, seeds[0]) for m in models for lr in lrs if not is_done(m, lr, seeds[0])]
    pending_sweeps = {m: sum(task[0] == m for task in queue) for m in models}

    def queue_seeds(model: str) -> None:
        lr = best_of(model)
        queue.extend((model, lr, s) for s in seeds[1:] if not is_done(model, lr, s))

    for m in models:
        if pending_sweeps[m] == 0:
            queue_seeds(m)
    running: dict[Any, tuple[tuple, Any]] = {}  # connection -> (task, process)
    try:
        while queue or running:
            while queue and len(running) < jobs:
                task = queue.pop(0)
                receive, send = fork.Pipe(duplex=False)
                proc = fork.Process(target=_train_in_child, args=(timed, task, threads, send), daemon=True)
                proc.start()
                send.close()
                running[receive] = (task, proc)
            for conn in wait(list(running)):
                task, proc = running.pop(conn)
                try:
                    kind, payload = conn.recv()
                except EOFError:
                    kind, payload = "error", f"the process ended (exit code {proc.exitcode}) without a result"
                conn.close()
                proc.join()
                if kind == "error":
                    raise RuntimeError(f"training run {task} failed in its process:\n{payload}")
                finished(*task, payload)
                if task[2] == seeds[0]:  # a sweep run
                    pending_sweeps[task[0]] -= 1
                    if pending_sweeps[task[0]] == 0:
                        queue_seeds(task[0])
    finally:
        for conn, (_, proc) in running.items():
            proc.kill()
            proc.join()
            conn.close()


def train_steps(trainer, batch: Callable[[int], tuple], progress: bool, desc: str) -> dict[str, Any]:
    """Train ``trainer`` from its step count to ``trainer.steps`` on ``batch(step)``: ``final_train_loss`` (mean
    of the last 10% of steps), ``loss_curve`` (about 20 ``[step, mean loss]`` points) and ``diverged`` (a
    non-finite loss stops the run; its last finite loss is the final one)."""
    losses: list[float] = []
    bar = progress_bar(total=trainer.steps, initial=trainer.step_count, desc=desc, enabled=progress, unit="step")
    for s in range(trainer.step_count, trainer.steps):
        loss = trainer.step(*batch(s))
        bar.update(1)
        if not math.isfinite(loss):
            bar.close()
            return {"final_train_loss": losses[-1] if losses else None, "diverged": True,
                    "loss_curve": _curve(losses)}
        losses.append(loss)
        bar.set_postfix(loss=loss)
    bar.close()
    tail = losses[-max(1, len(losses) // 10):]
    return {"final_train_loss": sum(tail) / len(tail), "diverged": False, "loss_curve": _curve(losses)}


def _curve(losses: Sequence[float], points: int = 20) -> list[list[float]]:
    every = max(1, len(losses) // points)
    return [[i + every, sum(losses[i:i + every]) / len(losses[i:i + every])] for i in range(0, len(losses), every)]


def best_lr_table(runs: Sequence[dict[str, Any]], model_of: Callable[[dict], str], cell_of: Callable[[dict], str],
                  cells: Sequence[str], keys: Sequence[str] = ("value_share", "bound_share")
                  ) -> dict[str, dict[str, dict[str, Any]]]:
    """``{model: {cell: stats}}`` over the seeds at each model's best lr: mean and std of ``accuracy``, means of
    ``keys`` (element-wise for lists), the share of seeds flagged ``copy_plateau``, the lr, the seeds that ran and
    those that diverged; ``cell_of`` names an evaluation's cell (a column of the table)."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for model in dict.fromkeys(model_of(r) for r in runs):
        chosen = [r for r in runs if model_of(r) == model and r["best_lr"]]
        table[model] = {}
        for cell in cells:
            evals = [e for r in chosen for e in r["eval"] if cell_of(e) == cell]
            if not evals:
                continue
            acc, std = seed_mean([e["accuracy"] for e in evals])
            table[model][cell] = {
                "accuracy": acc, "accuracy_std": std, "lr": chosen[0]["lr"], "seeds": len(chosen),
                "diverged_seeds": sum(r["diverged"] for r in chosen),
                **{k: _mean([e[k] for e in evals]) for k in keys},
                "copy_plateau": seed_mean([float(e["copy_plateau"]) for e in evals])[0]}
    return table


def _mean(values: Sequence[Any]) -> Any:
    """The mean of numbers, or the element-wise mean of equally long lists of numbers."""
    if isinstance(values[0], list):
        return [seed_mean(column)[0] for column in zip(*values)]
    return seed_mean(values)[0]


def sweep_table(runs: Sequence[dict[str, Any]], model_of: Callable[[dict], str]) -> dict[str, dict[str, Any]]:
    """``{model: {lr: {val_accuracy, final_train_loss, diverged}}}`` of the sweep's runs (the first seed)."""
    out: dict[str, dict[str, Any]] = {}
    for r in runs:
        if r["sweep"]:
            out.setdefault(model_of(r), {})[f"{r['lr']:g}"] = {
                k: r[k] for k in ("val_accuracy", "final_train_loss", "diverged")}
    return out


def format_table(table: dict[str, dict[str, dict[str, Any]]], cells: Sequence[str], title: str) -> str:
    """The best-lr table as text: ``accuracy ± std`` per cell, ``(copy)`` where most seeds sit on the copy
    plateau, the lr and seeds per model."""
    lines = [title, "model | lr | seeds | " + " | ".join(cells)]
    for model, row in table.items():
        first = next(iter(row.values()), {})
        vals = [f"{row[c]['accuracy']:.3f} ± {row[c]['accuracy_std']:.3f}"
                + (" (copy)" if row[c]["copy_plateau"] >= 0.5 else "") if c in row else "-" for c in cells]
        lines.append(f"{model} | {first.get('lr', float('nan')):g} | {first.get('seeds', 0)} | " + " | ".join(vals))
    return "\n".join(lines)


def seed_mean(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    return mean, (math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0)


def stored_gradient_shares(model, batches: Iterable[tuple[Tensor, Tensor, Tensor]]) -> tuple[list[float], float]:
    """Where the answers' gradient goes, per depth: ``(shares, fraction)`` over ``batches`` of ``(x, y, stored)``
    (``stored``: bool (B, T), the positions holding what the answers need: MQAR's key-value pairs, the needle).
    ``shares[ℓ] = Σ_{t∈stored} ‖g_t^ℓ‖ / Σ_t ‖g_t^ℓ‖`` with ``g^ℓ = ∂ℓ/∂h^ℓ`` the gradient of the answers' summed
    NLL ``ℓ`` with respect to the residual stream entering block ℓ (ℓ = 0: the token embeddings); ``fraction =
    |stored| / T`` (an even spread).  A model whose blocks from ℓ on read the stored tokens puts far more than
    ``fraction`` at depth ℓ; one whose memory carries nothing from them to the answers puts about 0."""
    model.eval()
    device = model.embed.weight.device
    grabbed: list[Tensor] = []

    def grab(module, inputs, out):
        if out.requires_grad:  # not HOPE's gradient-free pass for the CMS error signals
            grabbed.append(out)

    depths = [model.embed, *list(getattr(model, "blocks", []))[:-1]]  # the inputs of the blocks
    handles = [m.register_forward_hook(grab) for m in depths]
    on, total, stored_tokens, tokens = [0.0] * len(depths), [0.0] * len(depths), 0, 0
    try:
        for x, y, stored in batches:
            grabbed.clear()
            with torch.enable_grad():
                logits, _ = model(x.to(device))
                loss = F.cross_entropy(logits.flatten(0, 1).float(), y.to(device).flatten(), reduction="sum")
                grads = torch.autograd.grad(loss, grabbed[-len(depths):])
            for i, g in enumerate(grads):
                norm = g.norm(dim=-1).cpu().double()
                on[i], total[i] = on[i] + float(norm[stored].sum()), total[i] + float(norm.sum())
            stored_tokens, tokens = stored_tokens + int(stored.sum()), tokens + stored.numel()
    finally:
        for h in handles:
            h.remove()
    return [a / b if b > 0 else 0.0 for a, b in zip(on, total)], stored_tokens / tokens
