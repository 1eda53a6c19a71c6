"""A shipped learned optimizer's own lr on the tasks of its own meta-training family, trained to the end.

    python benchmarks/pretrained_lr.py [--name dmgd-general] [--tasks 15] [--multipliers 0.03 0.1 0.3 1]
    python benchmarks/pretrained_lr.py --smoke

Meta-training learns the lr with everything else, against its outer loss (the mean log training loss over
truncations of the inner runs).  This script asks the question ``deepopt evaluate`` asks of held-out tasks, on
tasks of the family the optimizer was meta-trained on: each task (``sample_task(recipe's family, seed)``, seeds
``--first-seed`` on, the horizons of its recipe in turn) is trained for its whole horizon by
``DeepMomentum.from_pretrained(NAME, params, total_steps=H, lr=m·lr₀)`` for every multiplier m (m = 1: the shipped
lr₀), as the recipe trains them (no weight decay), and its final held-out loss (8 held-out batches) is printed
beside each multiplier's ratio to the shipped lr's loss, measured in the same run.  The summary gives, per kind of
task (the task name's first word: lm, cnn, digits, ...), how often each multiplier was the best and the geometric
mean of the ratios.  A non-finite loss counts as a ratio of infinity.

Beside it, each run's value of the recipe's meta-training objective (``outer="log_train"``: the mean over the
run's steps of log ℓ_t, ℓ_t the step's minibatch training loss; a loss of exactly 0, where meta-training's value
is −∞ and the slot is dropped, is counted as log 1e-30), and the last line says on how many tasks that objective
and the final held-out loss pick the same multiplier.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from collections import defaultdict

import torch
from deepopt.meta_train.tasks import sample_task

import deepopt
from deepopt.checkpoint import load_json, load_pretrained
from deepopt.pretrained import DEFAULT, resolve

HELDOUT_BATCHES = 8
HELDOUT_OFFSET = 1_000_000  # held-out batch indices past any training step
LOG_FLOOR = 1e-30  # a minibatch loss of exactly 0 (meta-training: log 0 = -inf, the slot dropped)


def train(task, name: str, horizon: int, lr: float) -> tuple[float, float]:
    """``(final held-out loss, mean log training loss)`` of ``task``'s model trained for ``horizon`` steps by the
    shipped optimizer at ``lr``."""
    model = copy.deepcopy(task.model)
    opt = deepopt.DeepMomentum.from_pretrained(name, model.parameters(), total_steps=horizon, lr=lr)
    logs = []
    for t in range(horizon):
        x, y = task.train_batch(t)
        opt.zero_grad()
        loss = task.criterion(model(x), y)
        loss.backward()
        opt.step()
        value = float(loss.detach())
        logs.append(math.log(max(value, LOG_FLOOR)) if math.isfinite(value) else math.inf)
    with torch.no_grad():
        values = [float(task.criterion(model(x), y))
                  for x, y in (task.heldout_batch(HELDOUT_OFFSET + i) for i in range(HELDOUT_BATCHES))]
    value = statistics.fmean(values)
    return (value if math.isfinite(value) else math.inf), statistics.fmean(logs)


def summary(rows: list[dict], multipliers: list[float]) -> str:
    """Markdown: per kind of task, the count of tasks each multiplier won and the geometric mean loss ratio."""
    kinds = defaultdict(list)
    for row in rows:
        kinds[row["task"].split("_")[0]].append(row)
    head = ["kind", "tasks"] + [f"×{m:g}: best / loss ratio" for m in multipliers]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for kind, group in sorted(kinds.items()) + [("all", rows)]:
        cells = [kind, str(len(group))]
        for m in multipliers:
            wins = sum(r["best"] == m for r in group)
            ratios = [r["losses"][m] / r["losses"][1.0] for r in group]
            gmean = math.exp(statistics.fmean(math.log(x) for x in ratios)) if all(0 < x < math.inf for x in ratios) \
                else math.inf
            cells.append(f"{wins} / {gmean:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default=DEFAULT,
                        help=f"a shipped learned optimizer or its folder (default {DEFAULT})")
    parser.add_argument("--tasks", type=int, default=15, help="tasks drawn from the family (default 15)")
    parser.add_argument("--first-seed", type=int, default=50_000,
                        help="seed of the first task (default 50000; the recipe's meta-training drew from its seed 0)")
    parser.add_argument("--multipliers", type=float, nargs="+", default=[0.03, 0.1, 0.3, 1.0],
                        help="multiples of the shipped lr (1 is always run: the reference)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--smoke", action="store_true", help="2 tasks of 6 steps, multipliers 0.1 and 1")
    args = parser.parse_args(argv)
    try:
        folder = resolve(args.name)
        lr0 = load_pretrained(folder)[1]["lr"]
        recipe = load_json(folder / "recipe.json") if (folder / "recipe.json").is_file() else {}
    except (FileNotFoundError, ValueError) as err:
        print(f"pretrained_lr.py: --name: {err}", file=sys.stderr)
        return 2
    if args.tasks < 1 or any(not m > 0 for m in args.multipliers) or args.threads < 1:
        print("pretrained_lr.py: --tasks and --threads take integers >= 1, --multipliers numbers > 0", file=sys.stderr)
        return 2
    family = recipe.get("family", "general")
    horizons = recipe.get("horizons") or [recipe.get("horizon", 200)]
    multipliers = sorted(set(args.multipliers) | {1.0})
    n_tasks = args.tasks
    if args.smoke:
        multipliers, horizons, n_tasks = [0.1, 1.0], [6], 2
    torch.set_num_threads(args.threads)
    print(f"{folder.name}: lr0 = {lr0:.3g}, family {family!r}, horizons {horizons}, multipliers {multipliers}",
          flush=True)
    rows = []
    for i in range(n_tasks):
        seed = args.first_seed + i
        task, horizon = sample_task(family, seed), horizons[i % len(horizons)]
        started = time.perf_counter()
        runs = {m: train(task, str(folder), horizon, m * lr0) for m in multipliers}
        losses = {m: value[0] for m, value in runs.items()}
        objective = {m: value[1] for m, value in runs.items()}
        best = min(multipliers, key=losses.get)
        picked = min(multipliers, key=objective.get)
        rows.append({"task": task.name, "seed": seed, "horizon": horizon, "losses": losses, "best": best,
                     "objective": objective, "objective_best": picked})
        cells = "  ".join(f"×{m:g} {losses[m]:.4g} ({losses[m] / losses[1.0]:.2f}; log-train {objective[m]:.2f})"
                          for m in multipliers)
        print(f"[{i + 1}/{n_tasks}] {task.name} T={horizon}: {cells}  best ×{best:g}, objective's ×{picked:g} "
              f"({time.perf_counter() - started:.0f} s)", flush=True)
    print(summary(rows, multipliers))
    agree = sum(r["best"] == r["objective_best"] for r in rows)
    print(f"the recipe's objective (mean log training loss) and the final held-out loss pick the same multiplier "
          f"on {agree} of {len(rows)} tasks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
