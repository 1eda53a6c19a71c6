"""``deepopt select``: choose one of several meta-trained optimizers (meta-training seeds, recipes) on a validation
suite, so that the held-out suite of ``deepopt evaluate`` plays no part in the choice.

Meta-training's seed-to-seed spread is large (docs/meta-training.md): three seeds of one recipe reach 0 to 3 of the
held-out tasks. Picking the seed that does best there makes the held-out suite part of the selection, and its
result no longer a held-out one. The validation suite (``deepopt.evaluate.VALIDATION_TASKS``: a CNN on synthetic
images, a Transformer++ LM on the standard library's code, an MLP on wine) has one task of each kind the held-out
suite has but HOPE, on data and architectures in neither the held-out suite nor any meta-training family.

Each candidate runs untuned (its own lr and learned schedule, ``total_steps`` = the task's steps), as ``deepopt
evaluate`` runs it; AdamW + warm-up/cosine is tuned over ``--lrs`` (extended at an edge, as there), once for all
candidates. The score of a candidate c, lower is better::

    score(c) = mean over tasks of  log( L_c / L_AdamW )

L_c: its final validation loss, mean over seeds; L_AdamW: tuned AdamW's. A diverged run scores +∞. The chosen
candidate has the lowest score (the first listed on a tie).

Outputs in ``--out``: ``runs.jsonl`` (every run as it finishes; ``--resume`` skips them), ``selection.json`` (per
candidate: per-task losses and ratios, tasks at or below tuned AdamW, score; the choice) and ``table.md``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path
from typing import Any

from deepopt.evaluate import (
    VALIDATION_TASKS,
    _key,
    _tuned,
    add_run_options,
    check_options,
    execute,
    execute_tuned,
    mean_log_ratio,
    parse_lrs,
    parse_optimizer,
    plan,
)
from deepopt.runs import JsonLines, UsageError, add_out_option, check_at_least, prepare_out, wrote

OUTPUTS = ("runs.jsonl", "selection.json", "table.md")


def score(results: list[dict[str, Any]], candidate: str, tasks: list[str]) -> dict[str, Any]:
    """``candidate``'s untuned losses against tuned AdamW per task, the tasks it is at or below it, and its score."""
    per_task = {}
    for task in tasks:
        adamw = [r for r in results if r["task"] == task and r["method"] == "adamw"]
        best = _tuned(adamw)
        adam = statistics.fmean(r["final"] for r in adamw if r["lr"] == best)
        finals = [r["final"] for r in results
                  if r["task"] == task and r["method"] == "learned" and r["optimizer"] == candidate]
        loss = statistics.fmean(finals) if all(map(math.isfinite, finals)) else math.inf
        ratio = loss / adam
        per_task[task] = {"loss": loss, "adamw": adam, "adamw_lr": best, "ratio": ratio}
    return {"optimizer": candidate, "tasks": per_task, "score": mean_log_ratio([t["ratio"] for t in per_task.values()]),
            "at_most_adamw": sum(t["ratio"] <= 1.0 for t in per_task.values())}


def table(selection: dict[str, Any], command: str) -> str:
    """The ratios of every candidate's loss to tuned AdamW's per task, its score; the chosen one in bold."""
    tasks = selection["tasks"]
    lines = [f"`{command}`", "", "| candidate | " + " | ".join(f"{t} (loss / tuned AdamW)" for t in tasks)
             + " | at or below AdamW | score (mean log ratio) |", "|---" * (len(tasks) + 3) + "|"]
    for c in selection["candidates"]:
        name = f"**{c['optimizer']}** (chosen)" if c["optimizer"] == selection["chosen"] else c["optimizer"]
        cells = [f"{c['tasks'][t]['loss']:.4f} / {c['tasks'][t]['adamw']:.4f} = {c['tasks'][t]['ratio']:.2f}"
                 for t in tasks]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {c['at_most_adamw']} of {len(tasks)} | "
                     f"{c['score']:+.3f} |")
    return "\n".join(lines) + "\n"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``select`` subcommand."""
    p = subparsers.add_parser("select", help="choose among meta-trained optimizers on a validation suite held out "
                              "from both meta-training and `deepopt evaluate`", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_out_option(p, "select", OUTPUTS)
    p.add_argument("candidates", nargs="+", metavar="CANDIDATE",
                   help="learned optimizers (folders from `deepopt meta-train`, shipped names) or deepopt optimizers "
                        "with options, as `deepopt evaluate --optimizer` takes them")
    p.add_argument("--seeds", type=int, default=None, help="the number of seeds, run as 0 … N−1 (default 3; smoke 1)")
    add_run_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from deepopt.checkpoint import atomic_save_json, atomic_write
    from deepopt.runs import check_device

    check_device(args.device)
    check_at_least(args, 1, "seeds", "jobs", "threads")
    lrs = parse_lrs(args.lrs, args.smoke)
    if len(set(args.candidates)) != len(args.candidates):
        raise UsageError(f"CANDIDATE: each at most once, got {args.candidates}")
    specs = [parse_optimizer(c, flag="CANDIDATE", check=False) for c in args.candidates]
    built: dict[str, str] = {}
    for spec in specs:  # one optimizer under two spellings (``dmgd-dog`` and ``dmgd-dog:seed=0``) is one candidate
        same = built.setdefault(check_options(spec, "CANDIDATE"), spec.text)
        if same != spec.text:
            raise UsageError(f"CANDIDATE {spec.text!r} builds the same optimizer as {same!r}: give each once")
    seeds = list(range(args.seeds or (1 if args.smoke else 3)))
    tasks = list(VALIDATION_TASKS)
    out = prepare_out(args)
    store = JsonLines(out / "runs.jsonl", resume=args.resume)
    started = time.perf_counter()
    units = plan(tasks, seeds, lrs, specs[0], args.smoke, False, args.device, methods=("adamw",))
    for spec in specs:
        units += plan(tasks, seeds, lrs, spec, args.smoke, False, args.device, methods=("learned",),
                      sweep_learned=False)
    for u in units:
        u["threads"] = args.threads
    log = lambda line: print(line, flush=True)  # noqa: E731
    results = execute_tuned([u for u in units if u["method"] == "adamw"], store, args.jobs, log)
    learned = [u for u in units if u["method"] == "learned"]  # untuned: one lr, nothing to extend
    execute(learned, store, args.jobs, log)
    results += [store.done[_key(u)] for u in learned]
    candidates = [score(results, spec.text, tasks) for spec in specs]
    chosen = min(candidates, key=lambda c: c["score"])["optimizer"]
    command = "deepopt select " + " ".join(args.candidates) + (" --smoke" if args.smoke else "")
    selection = {"tasks": tasks, "seeds": seeds, "lrs": lrs, "candidates": candidates, "chosen": chosen,
                 "command": command, "seconds": time.perf_counter() - started}
    atomic_save_json(selection, out / "selection.json")
    text = table(selection, command)
    atomic_write(out / "table.md", lambda tmp: Path(tmp).write_text(text))
    print(text + f"chosen: {chosen}")
    wrote(out)
    return 0
