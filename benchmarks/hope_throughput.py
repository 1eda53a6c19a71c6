"""Training throughput and peak memory of HOPE vs Transformer++ (same size, same tokens per step).

    python benchmarks/hope_throughput.py                       # CPU, size small, contexts 512 and 2048
    python benchmarks/hope_throughput.py --device cuda
    python benchmarks/hope_throughput.py --smoke               # seconds, for CI
    python benchmarks/hope_throughput.py --compile             # both models under torch.compile
    python benchmarks/hope_throughput.py --compile-speedup     # each model eager and compiled: compiled/eager
    python benchmarks/hope_throughput.py --device cuda --cuda-graph   # each step one CUDA graph replay
    python benchmarks/hope_throughput.py --no-scan-ops         # HOPE on the Python chunk loop (before the scan ops)
    python benchmarks/hope_throughput.py --device cuda --scan-reference   # the scan ops without their Triton kernels
    python benchmarks/hope_throughput.py --device cuda --scan-reference cms   # only the CMS levels without them
    python benchmarks/hope_throughput.py --before 790488e --contexts 512 --threads 1 --rounds 4
                                                               # HOPE now vs HOPE at a git revision, alternated

A step is forward + backward + AdamW on ``--tokens`` tokens (batch = tokens / context).  Tokens/s is the
median over ``--steps`` timed steps after ``--warmup`` untimed ones.  Peak memory: on CUDA
``torch.cuda.max_memory_allocated``; on CPU each configuration runs in its own process and reports its
peak resident set growth during training (``VmHWM`` − ``VmRSS`` before the first step, warm-up included).  Ratios are
HOPE / Transformer++ within this one run.  FLOPs per token of a forward + backward are counted by
``FlopCounterMode`` (``step_flops``), the reference for how much of a throughput gap is arithmetic.  Ops per step:
the ops one training step dispatches (forward, backward, AdamW), counted by ``deepopt.bench.OpCounter`` in an extra
step after the timing: on CUDA each is about one kernel launch (a custom op's fused kernel counts once).

``--before REV`` compares HOPE with itself at a git revision of this repository instead of with Transformer++: the
revision is extracted (``git archive``) into a temporary folder laid out as installed, and its own copy of this
script measures it in a worker process; workers of the revision and of this checkout alternate for ``--rounds``
rounds per context, and each round's ratio (revision tokens/s over this checkout's) and their median are printed,
so background load hits both alike.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from deepopt.bench import OpCounter
from deepopt.checkpoint import atomic_save_json
from deepopt.cuda_graph import GraphedStep
from deepopt.hope import cms_kernels, titans_kernels
from deepopt.hope.model import HopeConfig, LanguageModel, compile_model, n_params
from deepopt.hope.train import SIZES, model_config, write_csv

MODELS = ("hope", "transformer")
# --scan-reference's choices: the kernel modules whose use_triton it turns off
SCAN_KERNELS = {"all": (titans_kernels, cms_kernels), "titans": (titans_kernels,), "cms": (cms_kernels,)}


def _proc_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(model_name: str, size: str, context: int, tokens: int, steps: int, warmup: int,
            device: str, compile: bool = False, recompute: bool = False, cuda_graph: bool = False,
            scan_ops: bool = True) -> dict[str, float]:
    """Tokens/s and peak memory (MiB) of ``steps`` training steps of one model (``recompute``: HOPE recomputes
    its chunk states in the backward pass, ``HopeConfig.recompute_chunks``; ``cuda_graph``: each step is one
    replay of a captured graph, ``deepopt.cuda_graph.GraphedStep``; ``scan_ops=False``: HOPE's memories run the
    Python chunk loop instead of the whole-sequence ops, ``HopeConfig.scan_ops``)."""
    torch.manual_seed(0)
    if device.startswith("cuda"):  # TF32 products for both models (cuBLAS and HOPE's kernels), as `hope train` runs
        torch.set_float32_matmul_precision("high")
    cfg = model_config(model_name, size, recompute_chunks=recompute or None, scan_ops=scan_ops)
    model = LanguageModel(cfg).to(device)
    if compile:
        compile_model(model, dynamic=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, capturable=cuda_graph)
    batch = max(1, tokens // context)
    x = torch.randint(0, cfg.vocab_size, (batch, context + 1), device=device)
    def loss(inp: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        return model(inp, tgt)[1]

    def eager_step() -> None:
        opt.zero_grad(set_to_none=True)
        loss(x[:, :-1], x[:, 1:]).backward()
        opt.step()

    # one eager warm-up step, then the capture: both inside the untimed warm-up (``--warmup`` ≥ 2)
    graphed = GraphedStep(loss, opt, warmup=1) if cuda_graph else None

    def step() -> None:
        if graphed is not None:
            graphed(x[:, :-1], x[:, 1:])
        else:
            eager_step()

    cuda = device.startswith("cuda")
    base = 0 if cuda else _proc_kib("VmRSS")  # the CPU peak counts from here, warm-up included
    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else (_proc_kib("VmHWM") - base) / 1024
    with OpCounter() as counter:  # an eager step (a graph replay dispatches no ops)
        eager_step()
    return {"model": model_name, "context": context, "batch": batch, "n_params": n_params(model.cfg),
            "tok_per_s": batch * context / statistics.median(times), "peak_mib": peak, "device": device,
            "ops_per_step": sum(counter.ops.values()),
            "mflop_per_token": step_flops(model.cfg, batch, context, device) / (batch * context) / 1e6}


def step_flops(cfg: HopeConfig, batch: int, context: int, device: str) -> float:
    """FLOPs of one forward + backward of a fresh eager model, counted by ``FlopCounterMode`` (run after the
    timing and the memory reading) on HOPE's Python chunk loop (``scan_ops=False``: the counter cannot see inside
    the scan ops, whose backward also recomputes the forward), so the figure is the model's arithmetic, not a
    path's.  Attention is counted analytically instead, so that it is the same on every device: ``6·T·d`` per
    token and layer (QKᵀ and AV, 2·T·d forward on average under the causal mask, backward twice that); the
    counter's own figure for a fused attention kernel (GPU) is left out."""
    model = LanguageModel(replace(cfg, scan_ops=False)).to(device)
    x = torch.randint(0, cfg.vocab_size, (batch, context + 1), device=device)
    with FlopCounterMode(display=False) as counter:
        model(x[:, :-1], x[:, 1:])[1].backward()
    counts = counter.get_flop_counts().get("Global", {})
    total = sum(v for op, v in counts.items() if "scaled_dot_product" not in str(op))
    if cfg.model == "transformer":
        total += 6 * context * cfg.d_model * cfg.n_layers * batch * context
    return total


SCRIPT = Path(__file__).resolve()
ROOT = SCRIPT.parents[1]
INSTALLED_AS = {"optimizers": "deepopt/optimizers", "meta_train": "deepopt/meta_train"}  # pyproject's package-dir


def checkout(rev: str, into: Path) -> Path:
    """This repository at git revision ``rev``, extracted into ``into`` with ``optimizers/`` and ``meta_train/``
    moved where they install (importable with ``PYTHONPATH=into``); ``ValueError`` naming ``rev`` if git cannot
    produce it."""
    try:
        tar = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", rev], capture_output=True, check=True,
                             timeout=300).stdout
    except (OSError, subprocess.SubprocessError) as err:
        detail = getattr(err, "stderr", b"") or str(err).encode()
        raise ValueError(f"--before {rev}: git archive failed: {detail.decode(errors='replace').strip()}") from None
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        archive.extractall(into, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    for src, dst in INSTALLED_AS.items():
        if (into / src).is_dir() and not (into / dst).exists():
            (into / src).rename(into / dst)
    if not (into / "benchmarks" / "hope_throughput.py").is_file():
        raise ValueError(f"--before {rev}: the revision has no benchmarks/hope_throughput.py to measure it with")
    return into


def worker_cmd(script: Path, model: str, ctx: int, args: argparse.Namespace, compiled: bool) -> list[str]:
    """The command of one worker process (``--worker``) of ``script`` measuring ``model`` at context ``ctx``."""
    cmd = [sys.executable, str(script), "--worker", "--model", model, "--size", args.size, "--contexts", str(ctx),
           "--tokens", str(args.tokens), "--steps", str(args.steps), "--warmup", str(args.warmup), "--device",
           args.device]
    cmd += ["--threads", str(args.threads)] if args.threads else []
    cmd += ["--compile"] if compiled else []
    cmd += ["--recompute-chunks"] if args.recompute_chunks else []
    cmd += [] if args.scan_ops else ["--no-scan-ops"]
    return cmd


def run_worker(cmd: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> dict:
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd)
    if res.returncode:
        raise RuntimeError(f"worker {' '.join(cmd[1:3])} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def compare_before(args: argparse.Namespace) -> dict:
    """HOPE at ``args.before`` against this checkout, alternated ``args.rounds`` times per context (module doc)."""
    tmp = Path(tempfile.mkdtemp(prefix="deepopt-before-"))
    try:
        old = checkout(args.before, tmp)
        env = {**os.environ, "PYTHONPATH": str(old) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        result = {}
        for ctx in args.contexts:
            rounds = []
            for i in range(args.rounds):
                before = run_worker(worker_cmd(old / "benchmarks" / "hope_throughput.py", "hope", ctx, args,
                                               args.compile), env=env, cwd=old)
                now = run_worker(worker_cmd(SCRIPT, "hope", ctx, args, args.compile))
                rounds.append({"before_tok_per_s": before["tok_per_s"], "now_tok_per_s": now["tok_per_s"],
                               "before_over_now": before["tok_per_s"] / now["tok_per_s"],
                               "before_peak_mib": before["peak_mib"], "now_peak_mib": now["peak_mib"]})
                r = rounds[-1]
                print(f"ctx {ctx:>5} round {i + 1}: HOPE at {args.before} {r['before_tok_per_s']:>8.0f} tok/s, now "
                      f"{r['now_tok_per_s']:>8.0f} tok/s, before/now {r['before_over_now']:.3f}  (peak "
                      f"{r['before_peak_mib']:.0f} / {r['now_peak_mib']:.0f} MiB)", flush=True)
            median = statistics.median(r["before_over_now"] for r in rounds)
            print(f"ctx {ctx:>5}: HOPE at {args.before} / now tokens/s = {median:.3f}x (median of {len(rounds)} "
                  f"rounds; {min(r['before_over_now'] for r in rounds):.3f}-"
                  f"{max(r['before_over_now'] for r in rounds):.3f})", flush=True)
            result[str(ctx)] = {"rounds": rounds, "median_before_over_now": median}
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="small", choices=tuple(SIZES), help="model size (default small)")
    p.add_argument("--contexts", type=int, nargs="+", default=[512, 2048], help="context lengths (512 2048)")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per step (default 4096)")
    p.add_argument("--steps", type=int, default=5, help="timed steps (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--threads", type=int, help="torch CPU threads per worker (default: torch's)")
    p.add_argument("--out", type=Path, help="write results.csv and report.json here")
    p.add_argument("--smoke", action="store_true", help="size smoke, contexts 64 128, 1 step")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile both models (deepopt.hope.model.compile_model); compilation is in the warm-up")
    p.add_argument("--compile-speedup", action="store_true",
                   help="measure each model eager and under --compile in this run and print compiled/eager tokens/s "
                        "(the first step's compile time is left out, as with --compile)")
    p.add_argument("--recompute-chunks", action="store_true",
                   help="HOPE recomputes its chunk states in the backward pass instead of keeping them")
    p.add_argument("--no-scan-ops", dest="scan_ops", action="store_false",
                   help="HOPE's memories run the Python chunk loop instead of the scan ops (the path before them)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="capture each training step in one CUDA graph (deepopt.cuda_graph.GraphedStep; CUDA only)")
    p.add_argument("--scan-reference", nargs="?", const="all", choices=tuple(SCAN_KERNELS),
                   help="HOPE's scan ops (all, or only the titans or the cms ones) run their torch reference on CUDA "
                        "instead of the Triton kernels (their module's use_triton = False): against a run without "
                        "it, the kernels' gain (CUDA only)")
    p.add_argument("--before", metavar="REV",
                   help="compare HOPE with HOPE at this git revision (alternated workers) instead of Transformer++")
    p.add_argument("--rounds", type=int, default=3, help="alternations per context with --before (default 3)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", choices=MODELS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.size, args.contexts, args.tokens, args.steps, args.warmup = "smoke", [64, 128], 256, 1, 1
    if args.cuda_graph and (not args.device.startswith("cuda") or args.warmup < 2):
        p.error("--cuda-graph needs --device cuda and --warmup >= 2 (an eager step, then the capture)")
    if args.rounds < 1:
        p.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.scan_reference:
        if not args.device.startswith("cuda") or args.before is not None:
            p.error("--scan-reference needs --device cuda (the kernels run only there) and no --before")
        for module in SCAN_KERNELS[args.scan_reference]:
            module.use_triton = False
    if args.before is not None and (args.compile_speedup or args.cuda_graph):
        p.error("--before compares eager (or --compile) HOPE only; drop --compile-speedup / --cuda-graph")
    if args.before is not None:
        try:
            result = compare_before(args)
        except ValueError as err:
            p.error(str(err))
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            atomic_save_json({"before": args.before, "size": args.size, "tokens_per_step": args.tokens,
                              "device": args.device, "threads": args.threads, "compile": args.compile,
                              "contexts": result}, args.out / "before.json")
        return 0
    if args.worker:  # one configuration in this process (clean CPU peak-memory reading)
        if args.threads:
            torch.set_num_threads(args.threads)
        print(json.dumps(measure(args.model, args.size, args.contexts[0], args.tokens, args.steps, args.warmup,
                                 args.device, args.compile, args.recompute_chunks, args.cuda_graph, args.scan_ops)))
        return 0
    rows = []
    for ctx in args.contexts:
        for model in MODELS:
            for compiled in ((False, True) if args.compile_speedup else (args.compile,)):
                if args.device.startswith("cuda"):
                    rows.append(measure(model, args.size, ctx, args.tokens, args.steps, args.warmup, args.device,
                                        compiled, args.recompute_chunks, args.cuda_graph, args.scan_ops))
                else:
                    rows.append(run_worker(worker_cmd(SCRIPT, model, ctx, args, compiled)))
                r = rows[-1]
                r["compiled"] = compiled
                print(f"{r['model']:>11}{' compiled' if compiled else ''}  ctx {ctx:>5}  batch {r['batch']:>3}  "
                      f"params {r['n_params']:>9,}  {r['tok_per_s']:>9.0f} tok/s  peak {r['peak_mib']:>8.1f} MiB  "
                      f"{r['mflop_per_token']:6.2f} MFLOP/token  {r['ops_per_step']:>7,} ops/step", flush=True)
    if args.compile_speedup:
        for ctx in args.contexts:
            for model in MODELS:
                eager, comp = (next(r for r in rows if r["model"] == model and r["context"] == ctx
                                    and r["compiled"] == c) for c in (False, True))
                print(f"ctx {ctx:>5}: {model} compiled/eager tokens/s = {comp['tok_per_s'] / eager['tok_per_s']:.2f}x")
    ratios = {}
    for ctx in args.contexts:
        h, t = (next(r for r in rows if r["model"] == m and r["context"] == ctx and r["compiled"] == args.compile)
                for m in MODELS)
        ratios[ctx] = {"tok_per_s_ratio": h["tok_per_s"] / t["tok_per_s"],
                       "flop_ratio": h["mflop_per_token"] / t["mflop_per_token"],
                       "peak_mem_ratio": h["peak_mib"] / t["peak_mib"] if t["peak_mib"] > 0 else float("nan")}
        print(f"ctx {ctx:>5}: HOPE/Transformer++ tokens/s = {ratios[ctx]['tok_per_s_ratio']:.2f}x, "
              f"peak memory = {ratios[ctx]['peak_mem_ratio']:.2f}x, FLOPs per token = {ratios[ctx]['flop_ratio']:.2f}x")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        write_csv(args.out / "results.csv", rows)
        atomic_save_json({"size": args.size, "tokens_per_step": args.tokens, "device": args.device,
                          "threads": args.threads, "compile": args.compile,
                          "compile_speedup": args.compile_speedup, "recompute_chunks": args.recompute_chunks,
                          "scan_reference": args.scan_reference,
                          "cuda_graph": args.cuda_graph, "scan_ops": args.scan_ops,
                          "rows": rows, "ratios": {str(k): v for k, v in ratios.items()}},
                         args.out / "report.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
