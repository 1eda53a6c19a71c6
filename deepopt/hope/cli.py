"""``deepopt hope train|eval|continual|niah``: HOPE and Transformer++ on text that ships with Python.

Every subcommand writes ``report.json`` (and CSV/PNG files) under ``--out DIR`` (default
``runs/<timestamp>-hope-<command>``) and has a ``--smoke`` size for CI.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from deepopt.checkpoint import atomic_save_json, atomic_torch_save, torch_load
from deepopt.runs import UsageError, add_out_option, check_device, default_out, finish, prepare_out, progress_bar

from . import continual, data, mqar, niah, recall
from .ablation import in_context_ablations
from .model import VARIANTS, LanguageModel, compile_model, n_params, set_in_context_learning
from .train import (
    AMP,
    CHECKPOINT,
    CONFIG_FILE,
    DTYPES,
    MODEL_FILE,
    OPTIMIZERS,
    SCHEDULES,
    SIZES,
    Dist,
    Metrics,
    Trainer,
    add_titans_init_args,
    fit,
    init_distributed,
    load_model,
    make_optimizer,
    model_config,
    plot_curves,
    resolve_device,
    save_model,
    titans_init_overrides,
    write_csv,
)

# Defaults of the options shared by train/continual/niah; ``--smoke`` swaps in the second column.
DEFAULTS: dict[str, tuple[Any, Any]] = {
    "size": ("tiny", "smoke"),
    "steps": (2000, 6),
    "context": (256, 32),
    "batch_size": (16, 4),
    "lr": (3e-3, 3e-3),
    "warmup": (100, 2),
    "val_every": (200, 3),
    "val_batches": (16, 2),
    "max_bytes": (4_000_000, 200_000),
}
EVAL_REPORT, EVAL_RESULTS = "eval_report.json", "eval_results.csv"  # beside a training run's own report.json
# Arguments that must match for ``--resume`` to continue a run.
_NOT_RUN_IDENTITY = ("resume", "out", "progress", "func", "command", "hope_command", "device", "threads",
                     "compile", "cuda_graph", "run_checked", "run_marked", "run_default_out")


def _option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _periods(text: str) -> tuple[int | None, ...]:
    try:
        periods = tuple(None if p.strip().lower() in ("inf", "none") else int(p) for p in text.split(","))
    except ValueError:
        periods = (0,)
    if any(p is not None and p < 1 for p in periods):
        raise argparse.ArgumentTypeError(f"expected comma-separated ints >= 1 or inf, such as 16,64,inf; got {text!r}")
    return periods


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", choices=sorted(SIZES), help="model size preset (default tiny; smoke with --smoke)")
    p.add_argument("--chunk-size", type=int, help="Titans chunk length C (default: the size's)")
    p.add_argument("--inner-rule", choices=("sgd", "momentum"), help="the memories' inner deepopt rule (sgd)")
    p.add_argument("--cms-periods", type=_periods, metavar="P,P,...",
                   help="CMS update periods in tokens, inf = never (default: the size's, e.g. 16,64,inf; the paper "
                        "uses 512 and up)")
    p.add_argument("--recompute-chunks", action="store_true",
                   help="recompute the memories' chunks in the backward pass instead of keeping them (same "
                        "numbers, less memory, slower): the Python chunk loop (a momentum inner rule, --model "
                        "hope-no-selfmod, a non-sgd CMS rule) and, off the Triton kernels (the CPU), the Titans "
                        "and CMS scans; the Triton kernels always recompute")
    add_titans_init_args(p)


def _add_run_args(p: argparse.ArgumentParser, *, lr_schedule: str = "cosine", bpe_on: str = "--domain/--data") -> None:
    _add_model_args(p)
    p.add_argument("--tokenizer", default="bytes", choices=data.TOKENIZERS,
                   help=f"bytes (default) or a byte-level BPE trained on the training split of {bpe_on} "
                        f'(cached; needs pip install "deepopt[bpe]")')
    lo, hi = data.BPE_VOCAB_RANGE
    p.add_argument("--vocab-size", type=int,
                   help=f"BPE vocabulary size, {lo}..{hi} (default {data.DEFAULT_BPE_VOCAB}; --tokenizer bpe only)")
    p.add_argument("--optimizer", default="adamw", choices=OPTIMIZERS,
                   help="outer optimizer: any deepopt optimizer or torch_adamw (default adamw)")
    p.add_argument("--optimizer-option", action="append", default=[], metavar="KEY=VALUE", type=_option,
                   help="a keyword for the optimizer, VALUE read as JSON else as a string, e.g. "
                        "preconditioner=adam (repeatable)")
    p.add_argument("--lr", type=float, help="peak outer learning rate (default 3e-3)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="weight decay on matrices (default 0.1)")
    p.add_argument("--schedule", default=lr_schedule, choices=SCHEDULES,
                   help=f"lr schedule after warm-up (default {lr_schedule})")
    p.add_argument("--warmup", type=int, help="linear warm-up steps (default 100)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="global gradient-norm clip, 0 = off (default 1)")
    p.add_argument("--amp", default="none", choices=tuple(AMP), help="autocast the forward pass to bf16 (default none)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="capture each training step (forward, backward, clip, optimizer) in one CUDA graph and replay "
                        "it: one host launch per step (CUDA, one process; the optimizer is built capturable)")
    p.add_argument("--context", type=int, help="training context length in tokens (default 256)")
    p.add_argument("--batch-size", type=int, help="global batch size in sequences (default 16)")
    p.add_argument("--steps", type=int, help="optimizer steps (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the batches (default 0)")
    p.add_argument("--val-batches", type=int, help="validation batches per evaluation (default 16)")
    p.add_argument("--max-bytes", type=int, help="training bytes read per domain (default 4e6)")
    _add_device_args(p)


def _add_device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="parameter dtype (default float32)")
    add_out_option(p, p.prog.split(" ", 1)[1], ("report.json", "results.csv"))  # "hope <command>"; see set_defaults
    p.add_argument("--smoke", action="store_true", help="tiny sizes and few steps (CI)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; 1 is fastest on a busy machine)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile HOPE's per-chunk functions / Transformer++'s blocks (slow first step)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")


def register(subparsers: argparse._SubParsersAction) -> None:
    hope = subparsers.add_parser("hope", help="train and evaluate HOPE and Transformer++ language models",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = hope.add_subparsers(dest="hope_command", metavar="COMMAND", required=True)

    p = sub.add_parser("train", help="train one model; metrics.csv, loss.png, report.json, checkpoints")
    p.add_argument("--model", default="hope", choices=sorted(VARIANTS), help="model or ablation (default hope)")
    p.add_argument("--domain", default="code", choices=data.DOMAINS, help="training text (default code)")
    p.add_argument("--data", nargs="+", metavar="PATH", help="train on these text files instead of --domain")
    p.add_argument("--val-every", type=int, help="validate every N steps (default 200)")
    p.add_argument("--ckpt-every", type=int, default=0, help="checkpoint every N steps (default: at the end)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    _add_run_args(p)
    p.set_defaults(func=cmd_train, run_outputs=(CHECKPOINT, MODEL_FILE, CONFIG_FILE, data.TOKENIZER_FILE,
                                                "report.json", "metrics.csv", "loss.png"))

    p = sub.add_parser("eval", help="validation perplexity of a trained model on each domain")
    p.add_argument("--checkpoint", type=Path, required=True,
                   help="a `deepopt hope train` output folder (or its model.safetensors or checkpoint.pt: a run "
                        "that did not finish is evaluated at its last checkpoint)")
    p.add_argument("--domains", nargs="+", default=list(data.DOMAINS), choices=data.DOMAINS,
                   help="domains to evaluate (default both)")
    p.add_argument("--data", nargs="+", metavar="PATH", help="evaluate on these text files instead")
    p.add_argument("--context", type=int, help="context length (default 256)")
    p.add_argument("--batch-size", type=int, help="sequences per batch (default 16)")
    p.add_argument("--val-batches", type=int, help="batches (default 16)")
    p.add_argument("--max-bytes", type=int, help="bytes read per domain (default 4e6)")
    p.add_argument("--no-cms-updates", action="store_true", help="HOPE's CMS levels do not learn in context")
    p.add_argument("--no-titans-updates", action="store_true", help="HOPE's Titans memories do not learn in context")
    p.add_argument("--ablations", action="store_true",
                   help="also report perplexity with CMS / Titans in-context updates off, as ratios (and η at cap)")
    _add_device_args(p)
    p.set_defaults(func=cmd_eval, run_outputs=(EVAL_REPORT, EVAL_RESULTS), run_shares=("hope train",))

    p = sub.add_parser("continual", help="train on domain A then B; forgetting on A, HOPE vs Transformer++")
    p.add_argument("--models", nargs="+", default=["hope", "transformer"], choices=sorted(VARIANTS),
                   help="models to compare (default hope transformer)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds (default 0)")
    p.add_argument("--domain-a", default="code", choices=data.DOMAINS, help="first domain (default code)")
    p.add_argument("--domain-b", default="prose", choices=data.DOMAINS, help="second domain (default prose)")
    _add_run_args(p, lr_schedule="constant", bpe_on="--domain-a")
    p.set_defaults(func=cmd_continual, run_outputs=("report.json", "results.csv", "metrics.csv", "loss.png"))

    p = sub.add_parser("niah", help="needle / passkey retrieval at and beyond the training context, lr-swept")
    p.add_argument("--models", nargs="+", default=list(recall.RECALL_MODELS), choices=sorted(VARIANTS),
                   help="models to compare (default " + " ".join(recall.RECALL_MODELS) + ": Transformer++ with its "
                        "short conv, the recall baseline, and without)")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds; the first one runs the lr sweep (default 0 1 2; "
                                                        "smoke 0)")
    p.add_argument("--eval-contexts", type=int, nargs="+",
                   help="context lengths to test (default 1x, 2x and 4x --context; smoke 1x, 2x)")
    p.add_argument("--save-models", action="store_true",
                   help="keep every trained model under --out/models/<model>-lr<lr>-s<seed>/ (for diagnostics: "
                        "`deepopt.hope.train.load_model`)")
    recall.add_tuning_args(p, lr_default_help="--lr X = --lrs X")
    p.add_argument("--eval-samples", type=int, help="passkeys per context length (default 64; smoke 4)")
    p.add_argument("--task", default="passkey", choices=("passkey", *niah.TASKS),
                   help="passkey (default) or an S-NIAH-style task (deepopt.hope.niah); these also report accuracy "
                        "with the needle removed, which must fall to chance")
    p.add_argument("--heads", type=int, help="heads of every model, dividing d_model (even for Transformer++'s RoPE) "
                                             "(default: --size's)")
    p.add_argument("--mem-hidden", type=int, help="hidden width of HOPE's Titans memories (default: --size's); the "
                                                  "Transformer++ FFNs are re-matched to HOPE's parameters")
    _add_run_args(p, bpe_on="prose (the filler)")
    p.set_defaults(func=cmd_niah, context_default=(256, 112),
                   run_outputs=("report.json", "results.csv", "accuracy.png", "loss.png", recall.RUNS_FILE))

    mqar.register(sub, _add_device_args, _resolve)
    continual.register(sub, _add_device_args, _resolve)


# ---------------------------------------------------------------------------------------------- helpers
def _resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill unset options from ``DEFAULTS`` (smoke column with ``--smoke``) and validate them."""
    col = 1 if args.smoke else 0
    if getattr(args, "context_default", None) and args.context is None:
        args.context = args.context_default[col]
    for name, values in DEFAULTS.items():
        if getattr(args, name, "absent") is None:
            setattr(args, name, values[col])
    for name in ("steps", "context", "batch_size", "val_batches", "max_bytes", "chunk_size", "ckpt_every",
                 "val_every", "eval_samples"):
        v = getattr(args, name, None)
        lowest = 0 if name == "ckpt_every" else 1
        if v is not None and v < lowest:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {lowest}, got {v}")
    if getattr(args, "warmup", None) is not None and args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    if getattr(args, "lr", None) is not None and not args.lr > 0:
        raise ValueError(f"--lr must be > 0, got {args.lr}")
    if getattr(args, "tokenizer", "bytes") == "bpe":
        lo, hi = data.BPE_VOCAB_RANGE
        if args.vocab_size is None:
            args.vocab_size = data.DEFAULT_BPE_VOCAB
        if not lo <= args.vocab_size <= hi:
            raise ValueError(f"--vocab-size must be in [{lo}, {hi}], got {args.vocab_size}")
        try:
            data.require_tokenizers()
        except ImportError as err:
            raise ValueError(f"--tokenizer bpe: {err}") from err
    elif getattr(args, "vocab_size", None) is not None:
        raise ValueError("--vocab-size applies to --tokenizer bpe only")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    check_device(args.device)
    if getattr(args, "checkpoint", None) is not None:
        args.checkpoint = _run_folder(args.checkpoint)
    if getattr(args, "resume", False) and CHECKPOINT in args.run_outputs and not (
            args.out is not None and (args.out / CHECKPOINT).is_file()):  # a training run (the recall runs: runs.jsonl)
        raise UsageError(f"--resume: --out {args.out} holds no run to continue (no {CHECKPOINT}); check the "
                         "folder, or run without --resume")
    return args


def start(args: argparse.Namespace) -> Path:
    """Start the run in ``--out`` (``deepopt.runs.prepare_out``: create it, replace a previous run with
    ``--overwrite``) once every argument and input is valid; under torchrun only rank 0 touches it."""
    if int(os.environ.get("RANK", "0")) == 0:
        return prepare_out(args)
    if args.out is None:
        args.out = default_out(args.run_command)
    return args.out


def _run_folder(path: Path) -> Path:
    """``--checkpoint``: a training run's folder, given as the folder or one of its model files."""
    if path.is_file() and path.name in (MODEL_FILE, CONFIG_FILE, CHECKPOINT):
        return path.parent
    if path.is_file():
        raise UsageError(f"--checkpoint {path} is a file; expected a `deepopt hope train` output folder (or its "
                         f"{MODEL_FILE} or {CHECKPOINT})")
    if not path.is_dir():
        raise UsageError(f"--checkpoint {path} does not exist; expected a `deepopt hope train` output folder")
    return path


def _build(args: argparse.Namespace, variant: str, seed: int, device: torch.device, vocab_size: int
           ) -> LanguageModel:
    cfg = model_config(variant, args.size, chunk_size=args.chunk_size, inner_rule=args.inner_rule,
                       cms_periods=args.cms_periods, vocab_size=vocab_size,
                       recompute_chunks=args.recompute_chunks or None, n_heads=getattr(args, "heads", None),
                       mem_hidden=getattr(args, "mem_hidden", None), **titans_init_overrides(args))
    torch.manual_seed(seed)
    model = LanguageModel(cfg).to(device=device, dtype=DTYPES[args.dtype])
    return compile_model(model) if args.compile else model


def _check_model_sizes(args: argparse.Namespace, vocab_size: int) -> None:
    """``--heads`` / ``--mem-hidden``: each model's config is built once before anything runs, so a value its
    width does not allow is a one-line error naming the option."""
    given = {f"--{k.replace('_', '-')}": getattr(args, k) for k in ("heads", "mem_hidden")
             if getattr(args, k) is not None}
    for flag, value in given.items():
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    for variant in args.models if given else ():
        try:
            model_config(variant, args.size, vocab_size=vocab_size, n_heads=args.heads, mem_hidden=args.mem_hidden)
        except ValueError as err:
            named = " ".join(f"{flag} {value}" for flag, value in given.items())
            raise ValueError(f"{named} at --size {args.size} ({variant}): {err}") from None


def _trainer(args: argparse.Namespace, model: LanguageModel, steps: int, d) -> Trainer:
    graph = getattr(args, "cuda_graph", False)
    options = {**dict(args.optimizer_option), **({"capturable": True} if graph else {})}
    opt = make_optimizer(args.optimizer, model, args.lr, args.weight_decay, options)
    return Trainer(model, opt, lr=args.lr, steps=steps, warmup=args.warmup, schedule=args.schedule,
                   grad_clip=args.grad_clip, dist=d, amp=args.amp, cuda_graph=graph)


def _run_identity(args: argparse.Namespace) -> dict[str, Any]:
    skip = _NOT_RUN_IDENTITY + (("tokenizer", "vocab_size") if args.tokenizer == "bytes" else ())  # as before BPE
    skip += ("amp",) if args.amp == "none" else ()  # as before --amp
    skip += tuple(k for k in ("heads", "mem_hidden") if getattr(args, k, None) is None)  # as before niah had them
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in skip}


def _ppl(nll: float) -> float:
    return math.exp(nll) if nll < 700 else math.inf


def _per_byte(nll: float, corpus: data.Corpus, batch_size: int, context: int, n_batches: int) -> dict[str, float]:
    """``nll`` (nats per token on ``corpus``'s validation batches) per byte of the text those tokens spell
    (nothing for a token file's ids: their text is unknown)."""
    if corpus.tokenizer.kind == "ids":
        return {}
    tokens, n_bytes = 0, 0
    for _, y in data.val_batches(corpus.val, batch_size, context, n_batches):
        tokens, n_bytes = tokens + y.numel(), n_bytes + corpus.tokenizer.n_bytes(y)
    per_byte = nll * tokens / n_bytes
    return {"bytes_per_token": n_bytes / tokens, "bits_per_byte": per_byte / math.log(2),
            "ppl_per_byte": _ppl(per_byte)}


def _corpus(args: argparse.Namespace, domain: str, paths: list[str] | None = None,
            tokenizer: data.Tokenizer | None = None) -> data.Corpus:
    """``domain``'s corpus, tokenized by ``tokenizer`` or else as ``--tokenizer``/``--vocab-size`` say."""
    return data.load_corpus(domain, paths, args.max_bytes, tokenizer=tokenizer or args.tokenizer,
                            vocab_size=args.vocab_size or data.DEFAULT_BPE_VOCAB)


# --------------------------------------------------------------------------------------------- commands
def cmd_train(args: argparse.Namespace) -> int:
    args = _resolve(args)
    d = init_distributed(args.device)
    device = resolve_device(args.device, d)
    out: Path = args.out
    ckpt = out / CHECKPOINT
    resumed = args.resume and (out / data.TOKENIZER_FILE).is_file()
    corpus = _corpus(args, args.domain, args.data, data.load_tokenizer(out) if resumed else None)
    model = _build(args, args.model, args.seed, device, corpus.vocab_size)
    trainer = _trainer(args, model, args.steps, d)
    metrics, identity = Metrics(), _run_identity(args)
    if args.resume:
        state = torch_load(ckpt, map_location=device)
        if not isinstance(state, dict) or not {"args", "metrics"} <= set(state):
            raise ValueError(f"--resume: {ckpt} is not a `deepopt hope train` checkpoint")
        if state["args"] != identity:
            diff = sorted(k for k in set(identity) | set(state["args"]) if identity.get(k) != state["args"].get(k))
            raise ValueError(f"--resume: options differ from the checkpointed run: {diff}")
        trainer.load_state_dict(state)
        metrics = Metrics(state["metrics"])

    start(args)
    if d.main:
        data.save_tokenizer(corpus.tokenizer, out)  # before any checkpoint: `hope eval` reads it

    def checkpoint() -> None:
        if d.main:
            atomic_torch_save({**trainer.state_dict(), "metrics": metrics.rows, "args": identity,
                               "model_config": model.cfg.to_dict()}, ckpt)  # `hope eval` reads a killed run

    t0 = time.perf_counter()
    fit(trainer, corpus.train, batch_size=args.batch_size, context=args.context, seed=args.seed,
        steps=args.steps, val_stream=corpus.val, val_every=args.val_every, val_batches=args.val_batches,
        metrics=metrics, on_checkpoint=checkpoint, ckpt_every=args.ckpt_every or args.steps,
        progress=args.progress, desc=f"hope train {args.model}")
    if d.main:
        save_model(model, out)
        write_csv(out / "metrics.csv", metrics.rows)
        metrics.plot(out / "loss.png", f"{args.model} ({args.size}) on {corpus.name}")
        last_val = next((r for r in reversed(metrics.rows) if r["val_loss"] != ""), {})
        per_byte = {} if not last_val else {f"val_{k}": v for k, v in _per_byte(
            last_val["val_loss"], corpus, args.batch_size, args.context, args.val_batches).items()}
        atomic_save_json({
            "command": "train", "model": args.model, "config": model.cfg.to_dict(), "n_params": n_params(model.cfg),
            "optimizer": args.optimizer, "steps": args.steps, "domain": corpus.name,
            "tokenizer": corpus.tokenizer.kind, "vocab_size": corpus.vocab_size,
            "tokens_seen": args.steps * args.batch_size * args.context, "world_size": d.world,
            "device": str(device), "final_train_loss": metrics.rows[-1]["train_loss"],
            "val_loss": last_val.get("val_loss"), "val_ppl": last_val.get("val_ppl"), **per_byte,
            "wall_s_this_process": time.perf_counter() - t0, "args": identity,
        }, out / "report.json")
        finish(out, files=[("report.json", "final train/validation loss and perplexity"),
                            ("loss.png", "train and validation loss"), ("metrics.csv", "every step"),
                            (MODEL_FILE, f"the model: `deepopt hope eval --checkpoint {out}`")])
    _leave(d)
    return 0


def _leave(d: Dist) -> None:
    """Leave the torchrun process group (if any) once the command's work is done."""
    if d.world > 1:
        torch.distributed.destroy_process_group()


def cmd_eval(args: argparse.Namespace) -> int:
    args = _resolve(args)
    device = resolve_device(args.device, Dist())
    model = load_model(args.checkpoint, device)
    tokenizer = _load_tokenizer(args.checkpoint)
    if model.cfg.vocab_size != tokenizer.vocab_size:
        raise ValueError(f"--checkpoint {args.checkpoint}: the model's vocab_size is {model.cfg.vocab_size} but its "
                         f"tokenizer ({data.TOKENIZER_FILE}, or bytes when there is none) has {tokenizer.vocab_size}")
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.0), lr=0.0, steps=0)
    set_in_context_learning(model, cms=not args.no_cms_updates, titans=not args.no_titans_updates)
    domains = ["files"] if args.data else args.domains
    corpora = {dom: data.load_corpus(dom if dom != "files" else "code", args.data, args.max_bytes, tokenizer=tokenizer)
               for dom in domains}
    start(args)
    results = {}
    for dom, corpus in progress_bar(corpora.items(), total=len(corpora), desc="hope eval", enabled=args.progress,
                                    unit="domain"):
        nll = trainer.evaluate(data.val_batches(corpus.val, args.batch_size, args.context, args.val_batches))
        results[dom] = {"val_loss": nll, "val_ppl": _ppl(nll),
                        **_per_byte(nll, corpus, args.batch_size, args.context, args.val_batches)}
        if args.ablations:
            batches = list(data.val_batches(corpus.val, args.batch_size, args.context, args.val_batches))
            results[dom].update({k: v for k, v in in_context_ablations(model, batches).items() if k != "val_loss"})
            set_in_context_learning(model, cms=not args.no_cms_updates, titans=not args.no_titans_updates)
    write_csv(args.out / EVAL_RESULTS, [{"domain": k, **v} for k, v in results.items()])
    atomic_save_json({"command": "eval", "checkpoint": str(args.checkpoint), "context": args.context,
                      "tokenizer": tokenizer.kind, "vocab_size": tokenizer.vocab_size,
                      "tokens_per_domain": args.val_batches * args.batch_size * args.context,
                      "results": results}, args.out / EVAL_REPORT)
    print(json.dumps(results, indent=2))
    finish(args.out, files=[(EVAL_REPORT, "validation loss, perplexity and bits per byte per domain")])
    return 0


def _load_tokenizer(folder: Path) -> data.Tokenizer:
    try:
        return data.load_tokenizer(folder)
    except Exception as err:  # the tokenizers library raises plain Exceptions on a bad file
        raise ValueError(f"{folder / data.TOKENIZER_FILE} is not a readable tokenizer (truncated or corrupt?): "
                         f"{err}") from err


def cmd_continual(args: argparse.Namespace) -> int:
    args = _resolve(args)
    if args.domain_a == args.domain_b:
        raise ValueError(f"--domain-a and --domain-b must differ, both are {args.domain_a!r}")
    d = init_distributed(args.device)  # under torchrun each model trains with DDP on the same global batches
    device = resolve_device(args.device, d)
    first = _corpus(args, args.domain_a)  # a BPE is trained on domain A and kept for B
    corpora = {args.domain_a: first, args.domain_b: _corpus(args, args.domain_b, tokenizer=first.tokenizer)}
    rows, curves, steps = [], {}, args.steps
    start(args)

    def nll_on(trainer: Trainer, dom: str) -> float:
        return trainer.evaluate(data.val_batches(corpora[dom].val, args.batch_size, args.context, args.val_batches))

    def bits_per_byte(dom: str, nll: float) -> float:
        return _per_byte(nll, corpora[dom], args.batch_size, args.context, args.val_batches)["bits_per_byte"]

    for variant in args.models:
        for seed in args.seeds:
            model = _build(args, variant, seed, device, first.vocab_size)
            trainer = _trainer(args, model, 2 * steps, d)
            metrics = Metrics()
            for phase, dom in enumerate((args.domain_a, args.domain_b)):
                fit(trainer, corpora[dom].train, batch_size=args.batch_size, context=args.context,
                    seed=seed + 1000 * phase, steps=(phase + 1) * steps, metrics=metrics, progress=args.progress,
                    desc=f"{variant} seed {seed} on {dom}")
                if phase == 0:
                    nll_a_a, nll_b_a = nll_on(trainer, args.domain_a), nll_on(trainer, args.domain_b)
            nll_a_b, nll_b_b = nll_on(trainer, args.domain_a), nll_on(trainer, args.domain_b)
            a_before, a_after = _ppl(nll_a_a), _ppl(nll_a_b)
            rows.append({"model": variant, "seed": seed, "n_params": n_params(model.cfg),
                         "ppl_a_after_a": a_before, "ppl_b_after_a": _ppl(nll_b_a),
                         "ppl_a_after_b": a_after, "ppl_b_after_b": _ppl(nll_b_b),
                         "forgetting_a": a_after - a_before, "forgetting_a_ratio": a_after / a_before,
                         "bpb_a_after_a": bits_per_byte(args.domain_a, nll_a_a),
                         "bpb_b_after_a": bits_per_byte(args.domain_b, nll_b_a),
                         "bpb_a_after_b": bits_per_byte(args.domain_a, nll_a_b),
                         "bpb_b_after_b": bits_per_byte(args.domain_b, nll_b_b)})
            curves[f"{variant} s{seed}"] = [(r["step"], r["train_loss"]) for r in metrics.rows]
    if d.main:
        write_csv(args.out / "results.csv", rows)
        write_csv(args.out / "metrics.csv", [{"run": k, "step": s, "train_loss": v} for k, pts in curves.items()
                                             for s, v in pts])
        plot_curves(args.out / "loss.png", f"{args.domain_a} then {args.domain_b} (switch at step {steps})", curves)
        summary = _summary(rows, ("forgetting_a", "forgetting_a_ratio", "ppl_a_after_a", "ppl_b_after_b"))
        atomic_save_json({"command": "continual", "domain_a": args.domain_a, "domain_b": args.domain_b,
                          "tokenizer": first.tokenizer.kind, "vocab_size": first.vocab_size,
                          "steps_per_domain": steps, "world_size": d.world, "summary": summary,
                          "runs": rows, "args": _run_identity(args)}, args.out / "report.json")
        finish(args.out, files=[("report.json", "forgetting on domain A per model (summary) and every run"),
                                 ("loss.png", "train loss, domain A then B")])
    _leave(d)
    return 0


def cmd_niah(args: argparse.Namespace) -> int:
    args.seeds = args.seeds or ([0] if args.smoke else [0, 1, 2])
    args.lrs = lrs = recall.resolve_lrs(args, args.lr)
    args = _resolve(args)
    contexts = args.eval_contexts or [args.context * m for m in ((1, 2) if args.smoke else (1, 2, 4))]
    samples = args.eval_samples or (4 if args.smoke else 64)
    d = init_distributed(args.device)
    device = resolve_device(args.device, d)
    filler = _corpus(args, "prose")
    if args.resume and d.world > 1:
        raise ValueError("--resume continues a run of one process; run it without torchrun")
    recall.check_jobs(args, device, d.world)
    _check_model_sizes(args, filler.vocab_size)
    _check_niah_context(args, filler, "--context", args.context, filler.train)
    for ctx in contexts:  # before any training: a context the task cannot fill fails here, not after it
        _check_niah_context(args, filler, "--eval-contexts", ctx, filler.val)
    start(args)
    log = recall.open_log(args.out, args) if d.main else None
    t0, c0 = time.perf_counter(), time.process_time()
    needle_task = args.task != "passkey"

    def evaluate(model: LanguageModel, ctx: int, seed: int, split: int, full: bool = True) -> dict[str, Any]:
        """Accuracy at context ``ctx`` (and, with ``full``, the needle diagnostics and the recall.plateau share)."""
        if not needle_task:
            digit, exact = passkey_accuracy(model, filler.val, ctx, samples, args.batch_size, seed, filler.tokenizer,
                                            split)
            return {"digit_accuracy": digit, "exact_accuracy": exact, **recall.plateau(digit, digit, 1)}
        r = niah.niah_eval(model, args.task, filler.val, ctx, samples, args.batch_size, seed, filler.tokenizer,
                           split=split)
        if full:
            r["digit_accuracy_needle_removed"] = niah.niah_eval(
                model, args.task, filler.val, ctx, samples, args.batch_size, seed, filler.tokenizer, needle=False,
                split=split)["digit_accuracy"]
            by_layer, r["needle_token_fraction"] = niah.needle_gradient_shares(
                model, args.task, filler.val, ctx, samples, args.batch_size, seed, filler.tokenizer)
            r["needle_gradient_share"], r["needle_gradient_share_by_layer"] = by_layer[0], by_layer
        return r

    def train(variant: str, lr: float, seed: int) -> dict[str, Any]:
        model = _build(args, variant, seed, device, filler.vocab_size)
        trainer = _trainer(argparse.Namespace(**{**vars(args), "lr": lr}), model, args.steps, d)
        batch = (_passkey_batches(filler.train, args.batch_size, args.context, seed, filler.tokenizer)
                 if not needle_task else
                 lambda step: niah.niah_batch(args.task, filler.train, args.batch_size, args.context, seed, step,
                                              filler.tokenizer))
        run = {"n_params": n_params(model.cfg), **recall.train_steps(trainer, batch, args.progress,
                                                               f"niah {variant} lr{lr:g} s{seed}")}
        if run["diverged"]:
            return {**run, "val_accuracy": 0.0, "eval": []}
        val = evaluate(model, args.context, seed, niah.VAL_SPLIT, full=False)["digit_accuracy"]
        if args.save_models and d.main:
            save_model(model, args.out / "models" / f"{variant}-lr{lr:g}-s{seed}")
        return {**run, "val_accuracy": val, "eval": [
            {"context": ctx, "context_ratio": ctx / args.context, "accuracy": r["digit_accuracy"], **r}
            for ctx in contexts for r in (evaluate(model, ctx, seed, niah.TEST_SPLIT),)]}

    runs, best = recall.tuned_runs(args.models, lrs, args.seeds, train, log, jobs=args.jobs, threads=args.threads)
    if d.main:
        rows = [{"model": r["model"], "lr": r["lr"], "seed": r["seed"], "best_lr": r["best_lr"], "task": args.task,
                 "train_context": args.context, "samples": samples, "steps": args.steps,
                 **{k: v for k, v in e.items() if k != "accuracy"}, "val_accuracy": r["val_accuracy"],
                 "final_train_loss": r["final_train_loss"]} for r in runs for e in r["eval"]]
        write_csv(args.out / "results.csv", rows)
        plot_curves(args.out / "loss.png", f"{args.task} training (answer-token loss), best lr",
                    {f"{r['model']} s{r['seed']}": r["loss_curve"] for r in runs if r["best_lr"]})
        keys = ("exact_accuracy", "value_share", "bound_share")
        keys += ("digit_accuracy_needle_removed", "needle_gradient_share", "needle_gradient_share_by_layer",
                 "needle_token_fraction") if needle_task else ()
        cells = [str(c) for c in contexts]
        table = recall.best_lr_table(runs, lambda r: r["model"], lambda e: str(e["context"]), cells, keys)
        bpe = filler.tokenizer.kind == "bpe"  # scores the tokens of " <key>": no per-token chance level
        chance = None if bpe else 0.1 if args.task == "passkey" else niah.chance(args.task)
        atomic_save_json({"command": "niah", "task": args.task, "train_context": args.context, "contexts": contexts,
                          "chance_digit_accuracy": chance, "tokenizer": filler.tokenizer.kind,
                          "vocab_size": filler.vocab_size, "world_size": d.world, "steps": args.steps, "lrs": lrs,
                          "seeds": args.seeds, "tuning": recall.TUNING_RULE, "best_lr": best, "table": table,
                          "sweep": recall.sweep_table(runs, lambda r: r["model"]), "runs": rows,
                          "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
                          "args": _run_identity(args)}, args.out / "report.json")
        _plot_niah(args.out / "accuracy.png", args, [r for r in rows if r["best_lr"]], contexts, chance)
        print(recall.format_table(table, cells, f"{args.task}: value-token accuracy by context (best lr, mean ± std "
                                                "over seeds)"))
        finish(args.out, files=[("accuracy.png", "answer accuracy against context length, per model (best lr)"),
                                 ("report.json", "accuracy per model and context at each model's best lr, the sweep"),
                                 ("loss.png", "training loss on the answer tokens (best lr)"),
                                 ("results.csv", "every run's evaluations"),
                                 (recall.RUNS_FILE, "every training run (--resume)")])
    _leave(d)
    return 0


def _check_niah_context(args: argparse.Namespace, corpus: data.Corpus, flag: str, length: int, stream: torch.Tensor
                        ) -> None:
    """``UsageError`` naming ``flag`` unless ``--task`` can build a sequence of ``length`` tokens from ``stream``."""
    try:
        if length < 1:
            raise ValueError(f"must be >= 1, got {length}")
        if args.task == "passkey":
            data.passkey_batch(stream, 1, length, 0, 0, corpus.tokenizer)
        else:
            niah.niah_batch(args.task, stream, 1, length, 0, 0, corpus.tokenizer)
    except (ValueError, RuntimeError) as err:
        reason = str(err) if isinstance(err, ValueError) else f"the {corpus.name} text is too short for it"
        raise UsageError(f"{flag} {length}: {reason}") from None


def _plot_niah(path: Path, args: argparse.Namespace, rows: list[dict[str, Any]], contexts: list[int],
               chance: float | None) -> None:
    """Answer-token and exact-match accuracy (mean over seeds) against the evaluated context length, one line per
    model, with the training context and the chance level marked."""
    curves = {}
    for model in args.models:
        for key, label in (("digit_accuracy", "answer tokens"), ("exact_accuracy", "exact")):
            points = [(c, [r[key] for r in rows if r["model"] == model and r["context"] == c])
                      for c in sorted(contexts)]
            curves[f"{model}, {label}"] = [(c, sum(v) / len(v)) for c, v in points if v]
    plot_curves(path, f"{args.task}: accuracy against context length", curves, xlabel="context length (tokens)",
                ylabel="accuracy", hlines=[] if chance is None else [("chance (per token)", chance)],
                vlines=[("training context", args.context)])


def _passkey_batches(filler: torch.Tensor, batch_size: int, context: int, seed: int, tokenizer: data.Tokenizer):
    return lambda step: data.passkey_batch(filler, batch_size, context, seed, step, tokenizer)


@torch.no_grad()
def passkey_accuracy(model: LanguageModel, filler: torch.Tensor, context: int, samples: int, batch_size: int,
                     seed: int, tokenizer: data.Tokenizer = data.BYTES, split: int = niah.TEST_SPLIT
                     ) -> tuple[float, float]:
    """(answer-token accuracy, exact-match accuracy) of greedy answers on held-out passkeys (teacher forced).

    The answer tokens are the key's digits with bytes, the tokens of ``" <key>"`` with BPE.  ``split`` picks an
    independent held-out draw (``niah.VAL_SPLIT``: the one learning rates are chosen on).
    """
    model.eval()
    device = model.embed.weight.device
    right, scored, exact, n = 0, 0, 0, 0
    for i in range((samples + batch_size - 1) // batch_size):
        x, y = data.passkey_batch(filler, min(batch_size, samples - n), context, seed + 7919 * (1 + split), i,
                                  tokenizer)
        logits, _ = model(x.to(device))
        answer = y != -100
        hit = (logits.argmax(-1).cpu() == y) & answer
        right, scored = right + int(hit.sum()), scored + int(answer.sum())
        exact, n = exact + int((hit | ~answer).all(-1).sum()), n + x.shape[0]
    return right / scored, exact / n


def _summary(rows: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """Mean and sample std over seeds of ``keys``, per model."""
    out: dict[str, dict[str, float]] = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        rs = [r for r in rows if r["model"] == model]
        for k in keys:
            t = torch.tensor([float(r[k]) for r in rs], dtype=torch.float64)
            out.setdefault(model, {})[k] = float(t.mean())
            out[model][k + "_std"] = float(t.std()) if len(rs) > 1 else 0.0
    return out
