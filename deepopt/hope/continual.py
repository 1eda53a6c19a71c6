"""Class-incremental continual learning on shipped text (``deepopt hope class-incremental``).

Classify which standard-library package a snippet of source comes from.  The packages (classes) arrive in
tasks of ``--classes-per-task`` packages, one task after the other; a model sees only the current task's
classes while it trains on it.  A snippet is ``context − 1`` bytes of a package's source followed by one
label position whose target is the class token (ids 256 + class, after the byte vocabulary); accuracy is the
argmax over every class token.  Each package's source is cut in two: windows from its first 80% train, from
its last 20% test.  After every task all tasks are tested: ``acc[i][j]`` is the accuracy on task j's classes
after training on task i; task j's retention is ``acc[last][j] / acc[j][j]``.

Models: ``hope``, ``hope-frozen-cms`` (HOPE with the CMS in-context updates off, in training and test),
``hope-carry`` (HOPE whose CMS levels keep their in-context change from sequence to sequence,
``HopeConfig.memory_carry="cms"``: the levels go on learning over the stream at their periods, which is what the
paper's claim about CMS and forgetting is about; the other HOPE models reset every memory per sequence) and
``transformer`` (parameter-matched Transformer++).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from deepopt.checkpoint import atomic_save_json
from deepopt.runs import wrote

from . import data
from .model import LanguageModel, set_in_context_learning
from .train import DTYPES, Dist, Trainer, make_optimizer, model_config, plot_curves, resolve_device, write_csv

PACKAGES = ("asyncio", "email", "tkinter", "xml", "multiprocessing", "unittest", "importlib", "http")
MODELS = ("hope", "hope-frozen-cms", "hope-carry", "transformer")


def package_streams(packages: tuple[str, ...]) -> dict[str, tuple[Tensor, Tensor]]:
    """Each package's source bytes (its ``*.py`` files in sorted order) cut 80/20 into train and test streams."""
    out = {}
    docs = list(data._code_docs())
    for name in packages:
        raw = b"\n\n".join(text for path, text in docs if path.split("/")[0] == name and "/" in path)
        if len(raw) < 10_000:
            raise ValueError(f"package {name!r} has too little source ({len(raw)} bytes) to be a class")
        stream = data.BYTES.encode_bytes(raw)
        cut = int(0.8 * stream.numel())
        out[name] = (stream[:cut], stream[cut:])
    return out


def snippet_batch(streams: list[Tensor], classes: list[int], batch_size: int, context: int, gen: torch.Generator
                  ) -> tuple[Tensor, Tensor]:
    """``batch_size`` snippets of the given classes (cycled): ``x`` = ``context − 1`` bytes + the label position,
    ``y`` = −100 except the class token (``256 + class``) at the last position."""
    xs, ys = [], []
    for i in range(batch_size):
        c = classes[i % len(classes)]
        s = streams[c]
        start = int(torch.randint(0, s.numel() - context, (1,), generator=gen))
        x = s[start:start + context].clone()
        y = torch.full((context,), -100, dtype=torch.int64)
        y[-1] = data.VOCAB_SIZE + c
        xs.append(x)
        ys.append(y)
    return torch.stack(xs), torch.stack(ys)


@torch.no_grad()
def class_accuracy(model: LanguageModel, test: tuple[Tensor, Tensor], n_classes: int) -> Tensor:
    """Per-example correctness (argmax over the class tokens at the last position)."""
    model.eval()
    x, y = test
    logits, _ = model(x.to(model.embed.weight.device))
    pred = logits[:, -1, data.VOCAB_SIZE:data.VOCAB_SIZE + n_classes].argmax(-1).cpu() + data.VOCAB_SIZE
    return pred == y[:, -1]


def register(sub: argparse._SubParsersAction, add_common: Callable[[argparse.ArgumentParser], None],
             resolve: Callable[[argparse.Namespace], argparse.Namespace]) -> None:
    """Add ``deepopt hope class-incremental`` (``add_common``/``resolve``: the hope CLI's device/output options)."""
    p = sub.add_parser("class-incremental", help="class-incremental continual learning: which stdlib package?",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS, help="models (default all four)")
    p.add_argument("--packages", nargs="+", help="classes, in task order (default " + " ".join(PACKAGES)
                   + "; smoke the first 4)")
    p.add_argument("--classes-per-task", type=int, default=2, help="classes per task (default 2)")
    p.add_argument("--size", default=None, help="model size preset (default tiny; smoke with --smoke)")
    p.add_argument("--context", type=int, help="snippet length in bytes, label included (default 128; smoke 32)")
    p.add_argument("--steps", type=int, help="optimizer steps per task (default 200; smoke 4)")
    p.add_argument("--batch-size", type=int, help="snippets per step (default 16; smoke 4)")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate, constant (default 3e-3)")
    p.add_argument("--test-samples", type=int, help="test snippets per class (default 64; smoke 4)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds (default 0)")
    add_common(p)
    p.set_defaults(func=lambda args: cmd_class_incremental(resolve(_defaults(args))),
                   run_outputs=("report.json", "results.csv", "accuracy.png"))


def _defaults(args: argparse.Namespace) -> argparse.Namespace:
    for name, full, small in (("packages", list(PACKAGES), list(PACKAGES[:4])), ("size", "tiny", "smoke"),
                              ("context", 128, 32), ("steps", 200, 4), ("batch_size", 16, 4),
                              ("test_samples", 64, 4)):
        if getattr(args, name) is None:
            setattr(args, name, small if args.smoke else full)
    for name in ("classes_per_task", "context", "steps", "batch_size", "test_samples"):
        if getattr(args, name) < (2 if name == "context" else 1):
            raise ValueError(f"--{name.replace('_', '-')} must be >= {2 if name == 'context' else 1}, "
                             f"got {getattr(args, name)}")
    if len(args.packages) % args.classes_per_task or len(set(args.packages)) != len(args.packages):
        raise ValueError(f"--packages must be distinct and a multiple of --classes-per-task "
                         f"({args.classes_per_task}) in number, got {len(args.packages)}")
    if not args.lr > 0:
        raise ValueError(f"--lr must be > 0, got {args.lr}")
    model_config("hope", args.size)  # a bad size fails here, before any compute
    return args


def cmd_class_incremental(args: argparse.Namespace) -> int:
    device = resolve_device(args.device, Dist())
    streams = package_streams(tuple(args.packages))
    n_classes, k = len(args.packages), args.classes_per_task
    tasks = [list(range(i, i + k)) for i in range(0, n_classes, k)]
    gen = torch.Generator().manual_seed(12345)
    tests = [snippet_batch([streams[p][1] for p in args.packages], [c] * args.test_samples, args.test_samples,
                           args.context, gen) for c in range(n_classes)]
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for variant in args.models:
        for seed in args.seeds:
            cfg = model_config("transformer" if variant == "transformer" else "hope", args.size,
                               vocab_size=data.VOCAB_SIZE + n_classes,
                               memory_carry="cms" if variant == "hope-carry" else None)
            torch.manual_seed(seed)
            model = LanguageModel(cfg).to(device=device, dtype=DTYPES[args.dtype])
            set_in_context_learning(model, cms=variant != "hope-frozen-cms")
            total = args.steps * len(tasks)
            trainer = Trainer(model, make_optimizer("adamw", model, args.lr, 0.0), lr=args.lr, steps=total,
                              schedule="constant")
            train_gen = torch.Generator().manual_seed(seed)
            for i, task in enumerate(tasks):
                for _ in range(args.steps):
                    trainer.step(*snippet_batch([streams[p][0] for p in args.packages], task, args.batch_size,
                                                args.context, train_gen))
                for j, other in enumerate(tasks):
                    hits = torch.cat([class_accuracy(model, tests[c], n_classes) for c in other])
                    rows.append({"model": variant, "seed": seed, "after_task": i, "task": j,
                                 "classes": " ".join(args.packages[c] for c in other),
                                 "accuracy": float(hits.float().mean())})
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "results.csv", rows)
    last = len(tasks) - 1
    summary: dict[str, dict[str, Any]] = {}
    for variant in args.models:
        acc = [[sum(r["accuracy"] for r in rows if r["model"] == variant and r["after_task"] == i and r["task"] == j)
                / len(args.seeds) for j in range(len(tasks))] for i in range(len(tasks))]
        summary[variant] = {
            "accuracy_matrix": acc,
            "retention": [acc[last][j] / acc[j][j] if acc[j][j] > 0 else None for j in range(len(tasks))],
            "final_mean_accuracy": sum(acc[last]) / len(tasks),
            "just_learned_mean_accuracy": sum(acc[j][j] for j in range(len(tasks))) / len(tasks),
        }
    plot_curves(out / "accuracy.png", "class-incremental: accuracy on task 0 as tasks arrive",
                {v: [(i, summary[v]["accuracy_matrix"][i][0]) for i in range(len(tasks))] for v in args.models},
                xlabel="tasks trained", ylabel="accuracy on the first task")
    atomic_save_json({"command": "class-incremental", "packages": args.packages, "tasks": tasks,
                      "chance": 1 / n_classes, "steps_per_task": args.steps, "context": args.context,
                      "size": args.size, "seeds": args.seeds, "summary": summary,
                      "wall_s": time.perf_counter() - t0}, out / "report.json")
    print({v: {"retention": [None if r is None else round(r, 3) for r in s["retention"]],
               "final_mean_accuracy": round(s["final_mean_accuracy"], 3)} for v, s in summary.items()})
    wrote(out)
    return 0
