"""Multi-query associative recall (MQAR), the synthetic recall task of the Zoology protocol
(Arora et al., 2023, "Zoology: Measuring and improving recall in efficient language models").

A sequence opens with ``n`` key-value pairs ``k₁ v₁ … kₙ vₙ`` (distinct keys from the lower half of the
vocabulary, values from the upper half), then every key is asked once, in random order, at a position
drawn with a power law that favours short gaps (p(slot i) ∝ (i+1)^(a−1), a = 0.01); the target after a
queried key is its value, every other position is unscored random noise (as in Zoology, the token after a
query is noise too, not the value).  Accuracy is the fraction of queries whose value is the model's greedy
prediction.  Models train on a mixture of (length, pairs) settings and are evaluated on held-out sequences
of each setting and of longer ones.

``deepopt hope mqar`` (``register``) trains HOPE and Transformer++ at equal parameter counts for each
width and writes ``report.json``, ``results.csv`` and ``accuracy_<model>.png`` (accuracy vs pairs).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from deepopt.checkpoint import atomic_save_json
from deepopt.runs import finish, prepare_out

from .model import VARIANTS, LanguageModel, compile_model, n_params
from .recall import (
    RECALL_MODELS,
    RUNS_FILE,
    TUNING_RULE,
    add_tuning_args,
    best_lr_table,
    check_jobs,
    format_table,
    open_log,
    plateau,
    resolve_lrs,
    stored_gradient_shares,
    sweep_table,
    train_steps,
    tuned_runs,
)
from .train import (
    DTYPES,
    Dist,
    Trainer,
    add_titans_init_args,
    make_optimizer,
    model_config,
    plot_curves,
    resolve_device,
    save_model,
    titans_init_overrides,
    write_csv,
)

VOCAB_SIZE = 8192
POWER_A = 0.01
# (sequence length, key-value pairs); Zoology trains on a mixture and tests on longer sequences too
TRAIN_SETTINGS = ((64, 4), (128, 8), (256, 16), (256, 32), (256, 64))
EVAL_SETTINGS = ((64, 4), (64, 8), (64, 16), (128, 32), (256, 64), (512, 64))
SMOKE_SETTINGS = ((64, 4),)


def check_setting(seq_len: int, n_pairs: int, vocab_size: int) -> None:
    """``ValueError`` unless ``n_pairs`` pairs and their ``n_pairs`` queries fit ``seq_len`` tokens and the
    vocabulary holds ``n_pairs`` distinct keys."""
    if n_pairs < 1 or seq_len < 4 * n_pairs:
        raise ValueError(f"MQAR setting {seq_len}x{n_pairs}: needs pairs >= 1 and length >= 4 x pairs "
                         f"(the pairs and one query per key)")
    if vocab_size // 2 - 1 < n_pairs:
        raise ValueError(f"vocab_size {vocab_size} holds fewer than {n_pairs} keys (keys are 1..vocab/2-1)")


def mqar_batch(batch_size: int, seq_len: int, n_pairs: int, vocab_size: int = VOCAB_SIZE,
               generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """``(x, y)`` of shape (batch_size, seq_len): ``y`` is the value after each queried key, −100 elsewhere."""
    check_setting(seq_len, n_pairs, vocab_size)
    gen = generator or torch.Generator().manual_seed(0)
    half = vocab_size // 2
    n_slots = (seq_len + 1 - 2 * n_pairs) // 2  # two-token (query key, value) slots after the pairs
    slot_weights = torch.arange(1, n_slots + 1, dtype=torch.float64) ** (POWER_A - 1)
    raw = torch.randint(1, vocab_size, (batch_size, seq_len + 1), generator=gen)
    target = torch.full_like(raw, -100)
    for b in range(batch_size):
        keys = 1 + torch.randperm(half - 1, generator=gen)[:n_pairs]
        values = torch.randint(half, vocab_size, (n_pairs,), generator=gen)
        raw[b, 0:2 * n_pairs:2], raw[b, 1:2 * n_pairs:2] = keys, values
        slots = torch.multinomial(slot_weights, n_pairs, replacement=False, generator=gen)
        pos = 2 * n_pairs + 2 * slots
        order = torch.randperm(n_pairs, generator=gen)
        raw[b, pos], target[b, pos + 1] = keys[order], values[order]  # the input after a query stays noise
    return raw[:, :-1], target[:, 1:]


VAL_SPLIT, TEST_SPLIT = 1, 0  # held-out draws: learning rates are chosen on VAL_SPLIT, tables report TEST_SPLIT


def held_out_batches(seq_len: int, n_pairs: int, samples: int, batch_size: int, seed: int,
                     vocab_size: int = VOCAB_SIZE, split: int = TEST_SPLIT) -> Iterator[tuple[Tensor, Tensor]]:
    """The held-out sequences the evaluations read, ``samples`` of them in batches of at most ``batch_size``;
    ``split`` picks an independent draw (``VAL_SPLIT``: the one learning rates are chosen on)."""
    gen = torch.Generator().manual_seed(10_007 * seed + 31 * seq_len + n_pairs + 1 + 7_777_777 * split)
    for done in range(0, samples, batch_size):
        yield mqar_batch(min(batch_size, samples - done), seq_len, n_pairs, vocab_size, gen)


@torch.no_grad()
def mqar_eval(model: LanguageModel, seq_len: int, n_pairs: int, samples: int, batch_size: int, seed: int,
              vocab_size: int = VOCAB_SIZE, split: int = TEST_SPLIT) -> dict[str, Any]:
    """Greedy answers to the queries of ``samples`` held-out sequences: ``accuracy`` (the asked key's value) and
    the plateau diagnostic (``recall.plateau``: the share of answers that are one of the sequence's
    ``n_pairs`` values)."""
    model.eval()
    device = model.embed.weight.device
    right, in_context, total = 0, 0, 0
    for x, y in held_out_batches(seq_len, n_pairs, samples, batch_size, seed, vocab_size, split):
        logits, _ = model(x.to(device))
        mask = y != -100
        answer = logits.argmax(-1).cpu()
        values = x[:, 1:2 * n_pairs:2]  # (B, n_pairs): the sequence's values
        right += int((answer[mask] == y[mask]).sum())
        in_context += int(((answer[:, :, None] == values[:, None, :]).any(-1) & mask).sum())
        total += int(mask.sum())
    return {"accuracy": right / total, **plateau(right / total, in_context / total, n_pairs)}


def pair_gradient_shares(model: LanguageModel, seq_len: int, n_pairs: int, samples: int, batch_size: int, seed: int,
                         vocab_size: int = VOCAB_SIZE) -> tuple[list[float], float]:
    """``recall.stored_gradient_shares`` with the key-value pairs as the stored tokens, on the test sequences:
    how much of the answers' gradient entering each block falls on the pairs (and the pairs' token share)."""
    return stored_gradient_shares(model, (
        (x, y, torch.arange(seq_len)[None].expand_as(x) < 2 * n_pairs)
        for x, y in held_out_batches(seq_len, n_pairs, samples, batch_size, seed, vocab_size)))


def mqar_accuracy(model: LanguageModel, seq_len: int, n_pairs: int, samples: int, batch_size: int, seed: int,
                  vocab_size: int = VOCAB_SIZE) -> float:
    """Fraction of queries answered with the right value (greedy) on ``samples`` held-out test sequences."""
    return mqar_eval(model, seq_len, n_pairs, samples, batch_size, seed, vocab_size)["accuracy"]


def _setting(text: str) -> tuple[int, int]:
    length, sep, pairs = text.lower().partition("x")
    try:
        return int(length), int(pairs)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LENGTHxPAIRS such as 64x4, got {text!r}") from None


def register(sub: argparse._SubParsersAction, add_common: Callable[[argparse.ArgumentParser], None],
             resolve: Callable[[argparse.Namespace], argparse.Namespace]) -> None:
    """Add ``deepopt hope mqar`` to the ``hope`` subparsers (``add_common``/``resolve``: the hope CLI's
    device/output options and their checks)."""
    p = sub.add_parser("mqar", help="multi-query associative recall (Zoology protocol): HOPE vs Transformer++",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(RECALL_MODELS), choices=sorted(VARIANTS),
                   help="models to compare (default " + " ".join(RECALL_MODELS) + ": Transformer++ with its short "
                        "conv, the recall baseline, and without)")
    p.add_argument("--widths", type=int, nargs="+", help="model widths d_model (default 64 128 256; smoke 32)")
    p.add_argument("--layers", type=int, default=2, help="blocks per model (default 2)")
    p.add_argument("--train-settings", type=_setting, nargs="+", metavar="LxP",
                   help="training mixture, LENGTHxPAIRS (default " + " ".join(f"{a}x{b}" for a, b in TRAIN_SETTINGS)
                   + "; smoke 64x4)")
    p.add_argument("--eval-settings", type=_setting, nargs="+", metavar="LxP",
                   help="evaluated settings (default " + " ".join(f"{a}x{b}" for a, b in EVAL_SETTINGS)
                   + "; smoke 64x4 128x4); longer than the training lengths = recall beyond them")
    p.add_argument("--vocab-size", type=int, default=VOCAB_SIZE, dest="mqar_vocab",
                   help=f"vocabulary (default {VOCAB_SIZE})")
    p.add_argument("--steps", type=int, help="optimizer steps per model, the same for every model (default 2000; "
                                             "smoke 6)")
    p.add_argument("--batch-size", type=int, help="sequences per step (default 64; smoke 4)")
    p.add_argument("--lr", type=float, help="one peak AdamW learning rate instead of the sweep (--lrs)")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds; the first one runs the lr sweep (default 0 1 2; "
                                                        "smoke 0)")
    p.add_argument("--eval-samples", type=int, help="held-out sequences per setting, for the test and for choosing "
                                                    "the lr (default 256; smoke 8)")
    p.add_argument("--chunk-size", type=int, help="HOPE's Titans chunk length C (default: size tiny's)")
    p.add_argument("--heads", type=int, help="heads of every model, dividing each width into heads of an even size "
                                             "(default: heads of 16 channels, at least 2)")
    p.add_argument("--mem-hidden", type=int, help="hidden width of HOPE's Titans memories (default: size tiny's, 16); "
                                                  "the Transformer++ FFNs are re-matched to HOPE's parameters")
    p.add_argument("--save-models", action="store_true",
                   help="keep every trained model under --out/models/<model>-d<width>-lr<lr>-s<seed>/ (for "
                        "diagnostics: `deepopt.hope.train.load_model`)")
    add_tuning_args(p, lr_default_help="--lr X = --lrs X")
    add_titans_init_args(p)
    add_common(p)
    p.set_defaults(func=lambda args: cmd_mqar(resolve(_mqar_defaults(args))),
                   run_outputs=("report.json", "results.csv", RUNS_FILE, "accuracy_*.png"))


def _mqar_defaults(args: argparse.Namespace) -> argparse.Namespace:
    smoke = args.smoke
    for name, full, small in (("widths", [64, 128, 256], [32]), ("train_settings", list(TRAIN_SETTINGS),
                              list(SMOKE_SETTINGS)), ("eval_settings", list(EVAL_SETTINGS), [(64, 4), (128, 4)]),
                              ("steps", 2000, 6), ("batch_size", 64, 4), ("eval_samples", 256, 8),
                              ("seeds", [0, 1, 2], [0])):
        if getattr(args, name) is None:
            setattr(args, name, small if smoke else full)
    for name in ("steps", "batch_size", "eval_samples", "layers", "chunk_size", "heads", "mem_hidden"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for w in args.widths:
        if w < 8 or w % 8:
            raise ValueError(f"--widths must be multiples of 8, >= 8, got {w}")
        if args.heads is not None and (w % args.heads or (w // args.heads) % 2):
            raise ValueError(f"--heads must divide every width into heads of an even size (RoPE), got {args.heads} "
                             f"for width {w}")
    args.lrs = resolve_lrs(args, args.lr)
    args.lr = None
    for length, pairs in (*args.train_settings, *args.eval_settings):
        check_setting(length, pairs, args.mqar_vocab)
    return args


def default_heads(width: int) -> int:
    """Heads of 16 channels (at least 2): the head count of every model at ``width`` unless ``--heads`` sets it."""
    return max(2, width // 16)


def mqar_config(variant: str, width: int, layers: int, vocab_size: int, heads: int | None = None,
                **overrides: Any):
    """The model of ``variant`` at ``width``: size ``tiny``'s structure, ``heads`` heads (default
    ``default_heads``); ``overrides`` (``None`` = unset, e.g. ``mem_hidden``) as ``model_config``'s."""
    return model_config(variant, "tiny", d_model=width, n_layers=layers, n_heads=heads or default_heads(width),
                        cms_hidden=width, vocab_size=vocab_size, **overrides)


def cmd_mqar(args: argparse.Namespace) -> int:
    device = resolve_device(args.device, Dist())
    check_jobs(args, device)
    out = prepare_out(args)
    log = open_log(out, args)
    t0, c0 = time.perf_counter(), time.process_time()
    train_length = max(length for length, _ in args.train_settings)
    runs: list[dict[str, Any]] = []
    best: dict[str, float] = {}
    for width in args.widths:
        def train(variant: str, lr: float, seed: int, width: int = width) -> dict[str, Any]:
            cfg = mqar_config(variant, width, args.layers, args.mqar_vocab, args.heads,
                              chunk_size=getattr(args, "chunk_size", None), mem_hidden=args.mem_hidden,
                              **titans_init_overrides(args))
            torch.manual_seed(seed)
            model = LanguageModel(cfg).to(device=device, dtype=DTYPES[args.dtype])
            if args.compile:
                compile_model(model)
            trainer = Trainer(model, make_optimizer("adamw", model, lr, 0.1), lr=lr, steps=args.steps,
                              warmup=max(1, args.steps // 10))
            gen = torch.Generator().manual_seed(seed)
            settings = args.train_settings
            loss = train_steps(trainer, lambda s: mqar_batch(args.batch_size, *settings[s % len(settings)],
                                                             args.mqar_vocab, gen),
                               args.progress, f"mqar {variant} d{width} lr{lr:g} s{seed}")
            run = {"width": width, "n_params": n_params(model.cfg), "config": model.cfg.to_dict(), **loss}
            if run["diverged"]:
                return {**run, "val_accuracy": 0.0, "eval": []}

            def evaluate(length: int, pairs: int, split: int) -> dict[str, Any]:
                return mqar_eval(model, length, pairs, args.eval_samples, args.batch_size, seed, args.mqar_vocab,
                                 split)

            def shares(length: int, pairs: int) -> dict[str, Any]:
                by_layer, fraction = pair_gradient_shares(model, length, pairs, args.eval_samples, args.batch_size,
                                                          seed, args.mqar_vocab)
                return {"pair_gradient_share": by_layer[0], "pair_gradient_share_by_layer": by_layer,
                        "pair_token_fraction": fraction}

            val = [evaluate(length, pairs, VAL_SPLIT)["accuracy"] for length, pairs in settings]
            if args.save_models:
                save_model(model, out / "models" / f"{variant}-d{width}-lr{lr:g}-s{seed}")
            return {**run, "val_accuracy": sum(val) / len(val),
                    "eval": [{"seq_len": length, "n_pairs": pairs, "length_ratio": length / train_length,
                              **evaluate(length, pairs, TEST_SPLIT), **shares(length, pairs)}
                             for length, pairs in args.eval_settings]}

        width_runs, width_best = tuned_runs(args.models, args.lrs, args.seeds, train, log, prefix=f"d{width}|",
                                             jobs=args.jobs, threads=args.threads)
        runs += width_runs
        best.update({f"{m} d{width}": lr for m, lr in width_best.items()})
    rows = [{"model": r["model"], "width": r["width"], "lr": r["lr"], "seed": r["seed"], "best_lr": r["best_lr"],
             **e, "val_accuracy": r["val_accuracy"], "n_params": r["n_params"], "steps": args.steps,
             "final_train_loss": r["final_train_loss"]} for r in runs for e in r["eval"]]
    write_csv(out / "results.csv", rows)
    cells = [f"{length}x{pairs}" for length, pairs in args.eval_settings]
    table = best_lr_table(runs, lambda r: f"{r['model']} d{r['width']}",
                          lambda e: f"{e['seq_len']}x{e['n_pairs']}", cells,
                          ("value_share", "bound_share", "pair_gradient_share", "pair_gradient_share_by_layer",
                           "pair_token_fraction"))
    for variant in args.models:
        curves = {}
        for width in args.widths:
            for length in sorted({s[0] for s in args.eval_settings}):
                pts = sorted((p, table[f"{variant} d{width}"][f"{length}x{p}"]["accuracy"])
                             for q, p in args.eval_settings if q == length
                             if f"{length}x{p}" in table[f"{variant} d{width}"])
                curves[f"d{width} L{length}"] = pts
        plot_curves(out / f"accuracy_{variant}.png", f"MQAR: {variant} (best lr, mean over seeds)", curves,
                    xlabel="key-value pairs", ylabel="accuracy")
    atomic_save_json({"command": "mqar", "protocol": "Zoology MQAR", "vocab_size": args.mqar_vocab,
                      "train_settings": [list(s) for s in args.train_settings],
                      "eval_settings": [list(s) for s in args.eval_settings], "steps": args.steps,
                      "batch_size": args.batch_size, "lrs": args.lrs, "seeds": args.seeds, "tuning": TUNING_RULE,
                      "best_lr": best, "n_params": {f"{r['model']} d{r['width']}": r["n_params"] for r in runs},
                      "model_configs": {f"{r['model']} d{r['width']}": r["config"] for r in runs},
                      "accuracy": {k: {c: v["accuracy"] for c, v in t.items()} for k, t in table.items()},
                      "table": table, "sweep": sweep_table(runs, lambda r: f"{r['model']} d{r['width']}"),
                      "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}, out / "report.json")
    print(format_table(table, cells, "MQAR query accuracy (best lr, mean ± std over seeds)"))
    finish(out, files=[*((f"accuracy_{v}.png", f"{v}: accuracy against key-value pairs") for v in args.models),
                        ("report.json", "accuracy per model, width and setting at each model's best lr"),
                        ("results.csv", "every run's evaluations"), (RUNS_FILE, "every training run (--resume)")])
    return 0
