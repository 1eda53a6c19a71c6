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
import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from deepopt.checkpoint import atomic_save_json
from deepopt.runs import finish, prepare_out, progress_bar

from .model import VARIANTS, LanguageModel, compile_model, n_params
from .train import (
    DTYPES,
    Dist,
    Trainer,
    add_titans_init_args,
    make_optimizer,
    model_config,
    plot_curves,
    resolve_device,
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


@torch.no_grad()
def mqar_accuracy(model: LanguageModel, seq_len: int, n_pairs: int, samples: int, batch_size: int, seed: int,
                  vocab_size: int = VOCAB_SIZE) -> float:
    """Fraction of queries answered with the right value (greedy) on ``samples`` held-out sequences."""
    model.eval()
    device = model.embed.weight.device
    gen = torch.Generator().manual_seed(10_007 * seed + 31 * seq_len + n_pairs + 1)
    right, total, done = 0, 0, 0
    while done < samples:
        x, y = mqar_batch(min(batch_size, samples - done), seq_len, n_pairs, vocab_size, gen)
        logits, _ = model(x.to(device))
        mask = y != -100
        right += int((logits.argmax(-1).cpu()[mask] == y[mask]).sum())
        total, done = total + int(mask.sum()), done + x.shape[0]
    return right / total


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
    p.add_argument("--models", nargs="+", default=["hope", "transformer"], choices=sorted(VARIANTS),
                   help="models to compare (default hope transformer)")
    p.add_argument("--widths", type=int, nargs="+", help="model widths d_model (default 64 128 256; smoke 32)")
    p.add_argument("--layers", type=int, default=2, help="blocks per model (default 2)")
    p.add_argument("--train-settings", type=_setting, nargs="+", metavar="LxP",
                   help="training mixture, LENGTHxPAIRS (default " + " ".join(f"{a}x{b}" for a, b in TRAIN_SETTINGS)
                   + "; smoke 64x4)")
    p.add_argument("--eval-settings", type=_setting, nargs="+", metavar="LxP",
                   help="evaluated settings (default " + " ".join(f"{a}x{b}" for a, b in EVAL_SETTINGS)
                   + "; smoke 64x4)")
    p.add_argument("--vocab-size", type=int, default=VOCAB_SIZE, dest="mqar_vocab",
                   help=f"vocabulary (default {VOCAB_SIZE})")
    p.add_argument("--steps", type=int, help="optimizer steps per model (default 2000; smoke 6)")
    p.add_argument("--batch-size", type=int, help="sequences per step (default 64; smoke 4)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate (default 3e-3)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds (default 0)")
    p.add_argument("--eval-samples", type=int, help="held-out sequences per setting (default 256; smoke 8)")
    p.add_argument("--chunk-size", type=int, help="HOPE's Titans chunk length C (default: size tiny's)")
    add_titans_init_args(p)
    add_common(p)
    p.set_defaults(func=lambda args: cmd_mqar(resolve(_mqar_defaults(args))),
                   run_outputs=("report.json", "results.csv", "accuracy_*.png"))


def _mqar_defaults(args: argparse.Namespace) -> argparse.Namespace:
    smoke = args.smoke
    for name, full, small in (("widths", [64, 128, 256], [32]), ("train_settings", list(TRAIN_SETTINGS),
                              list(SMOKE_SETTINGS)), ("eval_settings", list(EVAL_SETTINGS), list(SMOKE_SETTINGS)),
                              ("steps", 2000, 6), ("batch_size", 64, 4), ("eval_samples", 256, 8)):
        if getattr(args, name) is None:
            setattr(args, name, small if smoke else full)
    for name in ("steps", "batch_size", "eval_samples", "layers", "chunk_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for w in args.widths:
        if w < 8 or w % 8:
            raise ValueError(f"--widths must be multiples of 8, >= 8, got {w}")
    if not args.lr > 0:
        raise ValueError(f"--lr must be > 0, got {args.lr}")
    for length, pairs in (*args.train_settings, *args.eval_settings):
        check_setting(length, pairs, args.mqar_vocab)
    return args


def mqar_config(variant: str, width: int, layers: int, vocab_size: int, **overrides: Any):
    """The model of ``variant`` at ``width``: size ``tiny``'s structure, heads of 16 channels (≥ 2);
    ``overrides`` (``None`` = unset) as ``model_config``'s."""
    return model_config(variant, "tiny", d_model=width, n_layers=layers, n_heads=max(2, width // 16),
                        cms_hidden=width, vocab_size=vocab_size, **overrides)


def cmd_mqar(args: argparse.Namespace) -> int:
    device = resolve_device(args.device, Dist())
    out = prepare_out(args)
    rows: list[dict[str, Any]] = []
    configs: dict[str, dict[str, Any]] = {}
    t0 = time.perf_counter()
    for width in args.widths:
        for variant in args.models:
            for seed in args.seeds:
                cfg = mqar_config(variant, width, args.layers, args.mqar_vocab,
                                  chunk_size=getattr(args, "chunk_size", None), **titans_init_overrides(args))
                torch.manual_seed(seed)
                model = LanguageModel(cfg).to(device=device, dtype=DTYPES[args.dtype])
                configs[f"{variant} d{width}"] = model.cfg.to_dict()
                if args.compile:
                    compile_model(model)
                opt = make_optimizer("adamw", model, args.lr, 0.1)
                trainer = Trainer(model, opt, lr=args.lr, steps=args.steps, warmup=max(1, args.steps // 10))
                gen = torch.Generator().manual_seed(seed)
                losses = []
                bar = progress_bar(total=args.steps, desc=f"mqar {variant} d{width} s{seed}", enabled=args.progress,
                                   unit="step")
                for s in range(args.steps):
                    length, pairs = args.train_settings[s % len(args.train_settings)]
                    loss = trainer.step(*mqar_batch(args.batch_size, length, pairs, args.mqar_vocab, gen))
                    if not math.isfinite(loss):
                        raise FloatingPointError(f"mqar {variant} d{width}: loss became {loss} at step {s}; lower --lr")
                    losses.append(loss)
                    bar.set_postfix(loss=loss)
                    bar.update(1)
                bar.close()
                tail = losses[-max(1, len(losses) // 10):]
                for length, pairs in args.eval_settings:
                    acc = mqar_accuracy(model, length, pairs, args.eval_samples, args.batch_size, seed,
                                        args.mqar_vocab)
                    rows.append({"model": variant, "width": width, "seed": seed, "seq_len": length,
                                 "n_pairs": pairs, "accuracy": acc, "n_params": n_params(model.cfg),
                                 "steps": args.steps, "final_train_loss": sum(tail) / len(tail)})
    write_csv(out / "results.csv", rows)
    summary: dict[str, dict[str, float]] = {}
    for r in rows:
        key = f"{r['model']} d{r['width']}"
        cell = f"{r['seq_len']}x{r['n_pairs']}"
        same = [q["accuracy"] for q in rows if q["model"] == r["model"] and q["width"] == r["width"]
                and q["seq_len"] == r["seq_len"] and q["n_pairs"] == r["n_pairs"]]
        summary.setdefault(key, {})[cell] = sum(same) / len(same)
    for variant in args.models:
        curves = {}
        for width in args.widths:
            for length in sorted({s[0] for s in args.eval_settings}):
                pts = sorted((p, summary[f"{variant} d{width}"][f"{length}x{p}"])
                             for q, p in args.eval_settings if q == length)
                curves[f"d{width} L{length}"] = pts
        plot_curves(out / f"accuracy_{variant}.png", f"MQAR: {variant}", curves, xlabel="key-value pairs",
                    ylabel="accuracy")
    atomic_save_json({"command": "mqar", "protocol": "Zoology MQAR", "vocab_size": args.mqar_vocab,
                      "train_settings": [list(s) for s in args.train_settings],
                      "eval_settings": [list(s) for s in args.eval_settings], "steps": args.steps,
                      "batch_size": args.batch_size, "lr": args.lr, "seeds": args.seeds,
                      "n_params": {f"{r['model']} d{r['width']}": r["n_params"] for r in rows},
                      "model_configs": configs,
                      "accuracy": summary, "wall_s": time.perf_counter() - t0}, out / "report.json")
    print({k: {c: round(a, 3) for c, a in v.items()} for k, v in summary.items()})
    finish(out, files=[*((f"accuracy_{v}.png", f"{v}: accuracy against key-value pairs") for v in args.models),
                        ("report.json", "accuracy per model, width and setting")])
    return 0
