"""``deepopt meta-train``: meta-train an optimizer on a task family, then evaluate it on held-out tasks.

Writes into ``--out DIR``: ``optimizer/`` (the learned optimizer, a ``save_pretrained`` folder that
``DeepMomentum.from_pretrained`` loads), ``trainer_state.pt`` (resume point), ``eval.jsonl`` (each held-out
task's evaluation, appended as it finishes), ``report.json``, ``curves.csv`` and ``curves.png``.
``--resume`` continues the run in ``--out`` from its last checkpoint and skips the tasks already
evaluated at that meta-step; ``--overwrite`` starts it over.  ``--config FILE`` reads options from a JSON object
(``{"family": "general", "meta_steps": 600, ...}``, keys as the options' long names with ``_`` or ``-``); options
given on the command line win.  A shipped optimizer's ``recipe.json`` is such a file.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import time
from pathlib import Path
from typing import Any

from deepopt.runs import JsonLines, UsageError, add_out_option, check_at_least, finish, prepare_out, progress_bar

EVAL_FILE = "eval.jsonl"

# Sizes: the default run (a few minutes on 2 CPU cores) and --smoke (well under a minute).  Truncations of K = 50
# steps (not 20: a 20-step meta-gradient learns too fast an lr decay for step 200, the short-horizon bias) over the
# same 8000 inner steps per task slot (README "Meta-training", docs/notes/meta-training.md).  For deep_momentum the
# run also anneals the inner lr over the horizon (lr_horizon = horizon, its power learned) and learns the Adam
# preconditioner's β₂ from 0.95 (``run``).
DEFAULTS: dict[str, Any] = dict(
    meta_steps=160,
    unroll=50,
    horizon=200,
    tasks_per_step=2,
    lr=0.01,
    eval_steps=200,
    eval_seeds=3,
    eval_tasks="digits_d3_gelu,digits_w128_elu,wine_mlp,breast_cancer_mlp",
    adam_lrs="0.001,0.002,0.005,0.01,0.02,0.05",
    adam_decays="0.01,0.03,0.1",
    momentum_lrs="0.01,0.03,0.1",
    budget=4,
    save_every=25,
)
SMOKE: dict[str, Any] = dict(
    meta_steps=6,
    unroll=5,
    horizon=10,
    tasks_per_step=2,
    lr=0.01,
    eval_steps=20,
    eval_seeds=1,
    eval_tasks="digits_d3_gelu,wine_mlp",
    adam_lrs="0.003,0.03",
    adam_decays="0.1",
    momentum_lrs="0.03",
    budget=2,
    save_every=3,
)


def _floats(text: str | list) -> list[float]:
    try:
        return [float(v) for v in (text.split(",") if isinstance(text, str) else text) if v != ""]
    except (TypeError, ValueError) as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from err


def _ints(text: str | list) -> list[int]:
    try:
        return [int(v) for v in (text.split(",") if isinstance(text, str) else text) if v != ""]
    except (TypeError, ValueError) as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err


class _ConfigAction(argparse.Action):
    """``--config FILE``: set every option the JSON object names, except those already given a value that differs
    from their default (options given on the command line win, before or after ``--config``)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, path: Any,
                 option_string: str | None = None) -> None:
        from deepopt.checkpoint import load_json

        try:
            values = load_json(path)
        except (OSError, ValueError) as err:
            parser.error(f"--config {path}: {err}")
        if not isinstance(values, dict):
            parser.error(f"--config {path}: expected a JSON object of option names and values")
        actions = {a.dest: a for a in parser._actions if a.option_strings}
        for key, value in values.items():
            dest = key.lstrip("-").replace("-", "_")
            action = actions.get(dest)
            if action is None or dest in ("config", "out", "overwrite", "resume", "help"):
                parser.error(f"--config {path}: {key!r} is not a meta-train option that a config may set")
            if getattr(namespace, dest, None) != action.default:
                continue  # given on the command line
            if action.type is not None and value is not None:
                try:
                    value = action.type(value)
                except (argparse.ArgumentTypeError, TypeError, ValueError) as err:
                    parser.error(f"--config {path}: {key}: {err}")
            if action.choices is not None and value not in action.choices:
                parser.error(f"--config {path}: {key} must be one of {sorted(action.choices)}, got {value!r}")
            setattr(namespace, dest, value)
        namespace.config = Path(path)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show ``(default: …)`` except for options whose default depends on ``--smoke`` (``None`` here)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return action.help if action.default is None else super()._get_help_string(action)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``meta-train`` subcommand."""
    from deepopt.meta_train.params import LEARNABLE
    from deepopt.meta_train.tasks import FAMILIES, HELD_OUT_SPECS
    from deepopt.meta_train.trainer import DTYPES, ESTIMATORS, OPTIMIZER_DIR, STATE_FILE
    from deepopt.meta_train.unroll import OUTER_LOSSES

    p = subparsers.add_parser(
        "meta-train",
        help="meta-train an optimizer (DeepMomentum by default) and evaluate it on held-out tasks",
        description=__doc__,
        formatter_class=_HelpFormatter,
    )
    a = p.add_argument
    add_out_option(p, "meta-train", (STATE_FILE, OPTIMIZER_DIR, EVAL_FILE, "report.json", "curves.csv", "curves.png"))
    a("--resume", action="store_true", help=f"continue the run in --out from its {STATE_FILE}")
    a("--config", action=_ConfigAction, type=Path, metavar="FILE",
      help="read options from a JSON object (a shipped optimizer's recipe.json); command-line options win")
    a(
        "--smoke",
        action="store_true",
        help="tiny sizes for a < 1 minute end-to-end check (explicit options win)",
    )
    a("--rule", default="deep_momentum", choices=sorted(LEARNABLE), help="the deepopt rule to meta-train")
    a("--family", default="broad", choices=sorted(FAMILIES),
      help="task family sampled for meta-training (default broad: a third each of digits, tabular and small)")
    a("--meta-steps", type=int, help=f"meta-gradient steps (default {DEFAULTS['meta_steps']})")
    a("--unroll", type=int, help=f"inner steps per truncation K (default {DEFAULTS['unroll']})")
    a(
        "--horizon",
        type=int,
        help=f"inner steps per task before a new one is drawn, a multiple of --unroll "
        f"(default {DEFAULTS['horizon']})",
    )
    a("--horizons", type=_ints, help="comma-separated horizons, one drawn per task (long runs in truncations of "
      "--unroll steps; with a schedule, each task's lr_horizon is its own horizon); overrides --horizon")
    a("--tasks-per-step", type=int, help=f"tasks per meta-step (default {DEFAULTS['tasks_per_step']})")
    a("--meta-lr", type=float, default=0.03, help="Adam learning rate on the raw meta-parameters")
    a("--clip", type=float, default=1.0, help="meta-gradient norm clip")
    a(
        "--outer",
        default="log_train",
        choices=OUTER_LOSSES,
        help="outer loss: mean inner training loss over the unroll ('train'), mean of its log ('log_train', "
        "weighs late progress like early progress), or mean loss on held-out batches after each step",
    )
    a(
        "--late-weight",
        type=float,
        default=0.0,
        help="a truncation ending at inner step t weighs (t/horizon)^P in the meta-gradient (0: all alike; > 0 "
        "leans the outer loss towards the end of the horizon, where the evaluation compares final losses)",
    )
    a(
        "--estimator",
        default="backprop",
        choices=ESTIMATORS,
        help="meta-gradient estimator: exact backprop "
        "through the unroll (torch.func) or antithetic evolution strategies",
    )
    a(
        "--no-vectorize",
        dest="vectorize",
        action="store_false",
        help="loop over the tasks of a meta-step instead of running same-structure tasks under torch.func.vmap",
    )
    a("--es-pairs", type=int, default=32, help="antithetic pairs per ES estimate")
    a("--es-sigma", type=float, default=0.01, help="ES perturbation scale in raw-parameter space")
    a(
        "--checkpoint-every",
        type=int,
        default=0,
        help="segment length for activation checkpointing of the unroll (0: off)",
    )
    a("--lr", type=float, help=f"initial inner learning rate (default {DEFAULTS['lr']})")
    a(
        "--lr-decay",
        type=float,
        help="deep_momentum: 1/t decay rate c of the inner lr, lr_t = lr/(1 + c(t-1)); the initial value when "
        "learned (default 0.01), else fixed (default 0)",
    )
    a(
        "--lr-horizon",
        type=int,
        help="deep_momentum: N of the training-progress schedule h_t = (1 - (t-1)/N)^p on the inner lr (0: off); "
        "the saved optimizer keeps it, so it anneals over N steps of any model (default: --horizon)",
    )
    a(
        "--lr-power",
        type=float,
        help="deep_momentum: the schedule's power p, learned from this value when --lr-horizon > 0 (default 1)",
    )
    a(
        "--beta2",
        type=float,
        help="momentum/delta_momentum/deep_momentum with the adam preconditioner: its second-moment decay β₂ "
        "(the initial value when 'beta2' is in --learn: default 0.95 then, else the rule's 0.999)",
    )
    a(
        "--relative-eps",
        type=float,
        help="momentum/delta_momentum/deep_momentum with the adam preconditioner: κ of the floor κ·ρ_t under "
        "Adam's denominator, ρ_t the tensor's peak gradient RMS (docs/optimizers.md; default 0: Adam's)",
    )
    a("--hidden", type=int, default=16, help="DeepMomentum: hidden units of the MLP memory")
    a("--key-dim", type=int, default=16, help="DeepMomentum: coordinates per key block (keys=blocks)")
    a("--keys", choices=("blocks", "momenta"), default="blocks",
      help="DeepMomentum: key layout, blocks of coordinates or per-coordinate momenta at several time scales")
    a("--timescales", type=_floats, help="DeepMomentum keys=momenta: the EMA decays γ_j of the extra momenta "
      "(default 0.5,0.99)")
    a("--lr-warmup", type=float, help="deep_momentum: warm-up fraction of the schedule's horizon (default 0: off)")
    a("--eta2", type=float, help="DeepMomentum keys=momenta: W2's online step η₂ (default 0: W2 fixed online)")
    a("--activation", default="tanh", choices=("tanh", "relu", "gelu", "silu", "softsign", "identity"),
      help="DeepMomentum: the memory's activation σ")
    a("--lr-adapt", choices=("none", "dog"),
      help="deep_momentum: 'dog' scales each tensor's step by its distance travelled over its updates' norms "
      "(DoG), so the learned lr is a multiplier of order 1 (default none)")
    a(
        "--key-source",
        choices=("gradient", "preconditioned"),
        help="DeepMomentum: key the memory on the raw gradient or on the preconditioned one (default "
        "preconditioned: the memory's skip path is then Adam's step without its momentum)",
    )
    a(
        "--preconditioner",
        default=None,
        choices=("identity", "adam"),
        help="momentum/delta_momentum/deep_momentum: gradient preconditioner P (default: adam for "
        "deep_momentum, the rule's default otherwise)",
    )
    a(
        "--learn",
        default=None,
        help="comma-separated names to learn (default: the rule's hyperparameters; for deep_momentum "
        "W1,W2,momentum,eta,lr,lr_decay, then lr_power with --lr-horizon > 0 and beta2 with the adam preconditioner)",
    )
    a("--seed", type=int, default=0, help="seed of task draws, batches and ES perturbations")
    a("--dtype", default="float32", choices=sorted(DTYPES), help="dtype of tasks and meta-parameters")
    a("--device", default="cpu", help="cpu, cuda or cuda:N: where tasks, unrolls and the evaluation run")
    a("--save-every", type=int, help=f"checkpoint every N meta-steps (default {DEFAULTS['save_every']})")
    a(
        "--eval-steps",
        type=int,
        help=f"N: inner steps of the held-out evaluation (default {DEFAULTS['eval_steps']})",
    )
    a("--eval-seeds", type=int, help=f"seeds per held-out task (default {DEFAULTS['eval_seeds']})")
    a(
        "--eval-tasks",
        help=f"comma-separated held-out tasks, from {sorted(HELD_OUT_SPECS)} "
        f"(default {DEFAULTS['eval_tasks']})",
    )
    a("--adam-lrs", type=_floats, help=f"Adam learning-rate sweep (default {DEFAULTS['adam_lrs']})")
    a(
        "--adam-decays",
        type=_floats,
        help="1/t decay rates c of a second Adam reference, lr_t = lr/(1 + c(t-1)), tuned over the lr sweep × "
        f"these for N steps and compared by final loss ('' = none; default {DEFAULTS['adam_decays']})",
    )
    a(
        "--momentum-lrs",
        type=_floats,
        help=f"Momentum (μ=0.9) learning-rate sweep (default {DEFAULTS['momentum_lrs']})",
    )
    a(
        "--budget",
        type=int,
        help=f"Adam runs budget×N steps; the speed-up is capped there (default {DEFAULTS['budget']})",
    )
    a("--threads", type=int, default=1, help="torch CPU threads (small unrolls run fastest on one)")
    a("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run)


def _resolve(args: argparse.Namespace) -> dict[str, Any]:
    base = SMOKE if args.smoke else DEFAULTS
    out = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in base.items()}
    for key in ("adam_lrs", "adam_decays", "momentum_lrs"):
        if isinstance(out[key], str):
            out[key] = _floats(out[key])
    out["eval_tasks"] = [t for t in out["eval_tasks"].split(",") if t]
    check_at_least(argparse.Namespace(**out), 1, "eval_steps", "eval_seeds", "budget")
    check_at_least(args, 1, "threads")
    for key in ("adam_lrs", "momentum_lrs"):
        if not out[key] or not all(v > 0 for v in out[key]):
            raise UsageError(f"--{key.replace('_', '-')} must be one or more numbers > 0, got {out[key]}")
    if not out["eval_tasks"]:
        raise UsageError("--eval-tasks must name at least one held-out task")
    return out


def run(args: argparse.Namespace) -> int:
    """Meta-train, save, evaluate, and write the report, curves and plot under ``--out``."""
    import torch

    from deepopt.checkpoint import atomic_save_json
    from deepopt.meta_train.evaluate import evaluate
    from deepopt.meta_train.params import DEFAULT_LEARN
    from deepopt.meta_train.tasks import HELD_OUT_SPECS
    from deepopt.meta_train.trainer import DTYPES, OPTIMIZER_DIR, STATE_FILE, MetaTrainConfig, MetaTrainer

    size = _resolve(args)
    torch.set_num_threads(args.threads)
    unknown = sorted(set(size["eval_tasks"]) - set(HELD_OUT_SPECS))
    if unknown:
        raise ValueError(f"--eval-tasks: unknown task(s) {unknown}; accepted: {sorted(HELD_OUT_SPECS)}")
    hparams: dict[str, Any] = {"lr": size["lr"]}
    learn = None if args.learn is None else args.learn.split(",")
    preconditioner = args.preconditioner or ("adam" if args.rule == "deep_momentum" else None)
    if args.rule == "deep_momentum":
        # defaults (docs/notes/meta-training.md, round 2): the lr anneals over the meta-training horizon, h_t =
        # (1 − (t − 1)/N)^p with p learned, and the Adam preconditioner's β₂ is learned from 0.95
        lr_horizon = args.lr_horizon if args.lr_horizon is not None else size["horizon"]
        if learn is None:
            learn = [*DEFAULT_LEARN["deep_momentum"], "lr_decay", *(("lr_power",) if lr_horizon else ()),
                     *(("beta2",) if preconditioner == "adam" else ())]
        if args.hidden == 0 and {"W1", "W2"} & set(learn):
            raise UsageError("--hidden 0 switches DeepMomentum's MLP memory off, so it has no W1/W2 to learn: drop "
                             "them from --learn, or use --hidden >= 1")
        lr_decay = args.lr_decay if args.lr_decay is not None else (0.01 if "lr_decay" in learn else 0.0)
        hparams.update(hidden=args.hidden, key_dim=args.key_dim, lr_decay=lr_decay,
                       key_source=args.key_source or "preconditioned", lr_horizon=lr_horizon,
                       lr_power=args.lr_power if args.lr_power is not None else 1.0)
        if "beta2" in learn and args.beta2 is None:
            hparams["beta2"] = 0.95
        if args.keys == "momenta":
            hparams.update(keys="momenta", timescales=tuple(args.timescales or (0.5, 0.99)))
        if args.activation != "tanh":
            hparams["activation"] = args.activation
        for name in ("lr_warmup", "eta2", "lr_adapt"):
            if getattr(args, name) is not None:
                hparams[name] = getattr(args, name)
    elif any(v is not None for v in (args.lr_decay, args.key_source, args.lr_horizon, args.lr_power,
                                      args.timescales, args.lr_warmup, args.eta2, args.lr_adapt)) \
            or args.keys != "blocks":
        raise ValueError("--lr-decay, --key-source, --lr-horizon, --lr-power, --keys, --timescales, --lr-warmup, "
                         f"--eta2 and --lr-adapt are deep_momentum options, not ones of {args.rule}")
    if preconditioner is not None:
        hparams["preconditioner"] = preconditioner
    if args.beta2 is not None or "beta2" in (learn or ()):
        if preconditioner != "adam":
            raise UsageError(f"--beta2 and learning beta2 are the adam preconditioner's; {args.rule} runs with "
                             f"preconditioner {preconditioner or 'identity'} (add --preconditioner adam)")
        if args.beta2 is not None:
            hparams["beta2"] = args.beta2
    if args.relative_eps is not None:
        if preconditioner != "adam":
            raise UsageError(f"--relative-eps is the adam preconditioner's; {args.rule} runs with preconditioner "
                             f"{preconditioner or 'identity'} (add --preconditioner adam)")
        if not args.relative_eps >= 0:
            raise UsageError(f"--relative-eps must be >= 0, got {args.relative_eps}")
        hparams["relative_eps"] = args.relative_eps
    config = MetaTrainConfig(
        rule=args.rule,
        family=args.family,
        meta_steps=size["meta_steps"],
        unroll=size["unroll"],
        horizon=size["horizon"],
        horizons=args.horizons,
        tasks_per_step=size["tasks_per_step"],
        meta_lr=args.meta_lr,
        clip=args.clip,
        outer=args.outer,
        late_weight=args.late_weight,
        estimator=args.estimator,
        checkpoint_every=args.checkpoint_every,
        es_pairs=args.es_pairs,
        es_sigma=args.es_sigma,
        vectorize=args.vectorize,
        seed=args.seed,
        device=args.device,
        dtype=args.dtype,
        save_every=size["save_every"],
        learn=learn,
        hparams=hparams,
    )
    if args.resume and not (args.out is not None and (args.out / STATE_FILE).is_file()):
        raise UsageError(f"--resume: --out {args.out} holds no run to continue (no {STATE_FILE}); check the "
                         "folder, or run without --resume")
    MetaTrainer(config)  # every option checked (the rule's hyperparameters too) before the run starts
    out = prepare_out(args)
    trainer = MetaTrainer(config, out)
    done = JsonLines(out / EVAL_FILE, resume=args.resume)  # read (a corrupt one refused) before anything is written
    if trainer.step:
        print(f"resuming {out} from meta-step {trainer.step}")
    started = time.perf_counter()
    trainer.run(progress=not args.no_progress)
    trainer.save()
    train_s = time.perf_counter() - started

    seeds = list(range(size["eval_seeds"]))
    bar = progress_bar(total=len(size["eval_tasks"]) * len(seeds), desc="evaluate", enabled=not args.no_progress,
                       unit="task-seed")
    settings = {"meta_step": trainer.step, "seeds": seeds, "dtype": args.dtype,
                **{k: size[k] for k in ("eval_steps", "adam_lrs", "adam_decays", "momentum_lrs", "budget")}}
    for task in size["eval_tasks"]:
        key = json.dumps({"task": task, **settings}, sort_keys=True)
        if key in done.done:
            bar.update(len(seeds))
            continue
        part, part_rows = evaluate(
            out / OPTIMIZER_DIR,
            [task],
            seeds,
            size["eval_steps"],
            size["adam_lrs"],
            size["momentum_lrs"],
            size["budget"],
            DTYPES[args.dtype],
            progress=lambda: bar.update(1),
            adam_decays=size["adam_decays"],
            device=args.device,
        )
        done.add(key, {"report": part, "rows": part_rows})
    bar.close()
    parts = [done.done[json.dumps({"task": t, **settings}, sort_keys=True)] for t in size["eval_tasks"]]
    report = {**parts[0]["report"], "tasks": {t: p["report"]["tasks"][t] for t, p in zip(size["eval_tasks"], parts)}}
    rows = [row for p in parts for row in p["rows"]]
    name, learned, _ = trainer.meta.export()
    report = {
        "optimizer": name,
        "learned_hparams": learned,
        "config": trainer.state_dict()["config"],
        "meta_train_seconds": train_s,
        "meta_train_cpu_seconds": trainer.cpu_seconds,
        "final_outer_loss": trainer.history[-1]["outer_loss"],
        **report,
    }
    atomic_save_json(report, out / "report.json")
    meta_rows = [
        {
            "kind": "meta",
            "task": config.family,
            "optimizer": name,
            "lr": "",
            "seed": config.seed,
            "step": h["meta_step"],
            "loss": h["outer_loss"],
        }
        for h in trainer.history
    ]
    _write_csv(out / "curves.csv", meta_rows + rows)
    _plot(out / "curves.png", meta_rows, rows, size["eval_tasks"])
    for task, r in report["tasks"].items():
        n = len(r["seeds"])
        line = f"{task}: speed-up vs tuned Adam {r['speedup_mean']:.2f} ± {r['speedup_std']:.2f}"
        line += f"; final loss below tuned Adam's in {r['learned_beats_adam']}/{n} seeds"
        if "learned_beats_adam_decay" in r:
            line += f", below Adam with a tuned 1/t decay in {r['learned_beats_adam_decay']}/{n}"
        print(line)
    finish(out, targets=_targets(report), files=[
        ("curves.png", "outer loss; per held-out task the learned optimizer against tuned Adam, Adam with a tuned "
                       "1/t decay and tuned Momentum"),
        ("report.json", "per task and seed: final losses, tuned lrs, speed-ups; the learned hyperparameters"),
        (OPTIMIZER_DIR, f'the learned optimizer: DeepMomentum.from_pretrained("{out / OPTIMIZER_DIR}", params)')])
    return 0


def _targets(report: dict[str, Any]) -> list[tuple[str, bool]]:
    """The main job's target (README, docs/meta-training.md): a final loss below Adam with a tuned 1/t decay (tuned
    Adam when no decays were swept) in a majority of seeds on at least 3 of 4 held-out tasks."""
    tasks = report["tasks"]
    decayed = all("learned_beats_adam_decay" in r for r in tasks.values())
    key, reference = ("learned_beats_adam_decay", "Adam with a tuned 1/t decay") if decayed else \
        ("learned_beats_adam", "tuned Adam")
    won = [t for t, r in tasks.items() if r[key] > len(r["seeds"]) / 2]
    need = math.ceil(0.75 * len(tasks))
    return [(f"final loss below {reference} in a majority of seeds on >= {need} of {len(tasks)} held-out tasks: "
             f"{len(won)} ({', '.join(won) or 'none'})", len(won) >= need)]


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    from deepopt.checkpoint import atomic_write

    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=["kind", "task", "optimizer", "lr", "seed", "step", "loss"])
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text.getvalue()))


# label in curves.csv -> legend of curves.png (the tuned-decay Adam is the reference the target is judged against)
CURVE_LABELS = {"learned": "learned", "adam": "Adam (tuned lr)", "adam_decay": "Adam (tuned lr and 1/t decay)",
                "momentum": "Momentum (tuned lr)"}


def _plot(path: Path, meta_rows: list[dict[str, Any]], rows: list[dict[str, Any]], tasks: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from deepopt.checkpoint import atomic_write

    fig, axes = plt.subplots(1, 1 + len(tasks), figsize=(4 * (1 + len(tasks)), 3.4), squeeze=False)
    ax = axes[0, 0]
    meta_loss = [np.nan if r["loss"] is None else r["loss"] for r in meta_rows]
    ax.plot([r["step"] for r in meta_rows], meta_loss, lw=0.8)
    ax.set(title="meta-training", xlabel="meta-step", ylabel="outer loss")
    for ax, task in zip(axes[0, 1:], tasks):
        for (label, legend), ls in zip(CURVE_LABELS.items(), ("-", "--", "-.", ":")):
            by_seed: dict[int, list[float]] = {}
            for r in rows:
                if r["task"] == task and r["optimizer"] == label:
                    by_seed.setdefault(r["seed"], []).append(r["loss"])
            if by_seed:  # an evaluation written before adam_decay curves were kept has none
                ax.plot(np.array(list(by_seed.values())).mean(0), label=legend, ls=ls)
        ax.set(title=task, xlabel="step", ylabel="train loss (mean over seeds)", yscale="log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
