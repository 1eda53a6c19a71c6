#!/usr/bin/env bash
# The GPU proof run (issue 22) on one H100/H200, in sections ordered by value, within a time budget:
#
#   benchmarks/gpu_check.sh OUTDIR [--budget SECONDS] [--cpu-smoke]
#
#   1. CUDA tests: every test that needs CUDA, plus the ones that broke on the device image's torch 2.11 / Triton 3.6
#      (meta-device steps, op budgets, loaded counters); one JSON line per finished test (tests.jsonl), per-test
#      timeout, so a section cut by the budget still reports what it found.
#   2. deepopt bench --device cuda --param-sets gpt2-124M: every class against torch fused AdamW and torch Muon,
#      then DeepMomentum again with TF32 matmuls allowed (its tensor-core path).
#   3. benchmarks/hope_throughput.py --device cuda --size base: contexts 2048, 8192 eager, 2048 with the scans' torch
#      reference (--scan-reference: what the kernels gain), 2048 with only the CMS levels on it (--scan-reference cms:
#      what the tiled CMS kernels gain), 512 eager, then --cuda-graph and --compile, HOPE against Transformer++
#      (SDPA), one run per (mode, context), most valuable first.
#   4. deepopt compare --device cuda --tasks char_lm (nanoGPT-sized), one lr and one seed per optimizer.
#   Then report.md / report.json in OUTDIR (benchmarks/gpu_report.py) and a compact table, printed last.
#
# Default budget 480 s (8 minutes).  Sections get shares of it (35/25/25/15 %, what one leaves unused goes to the
# next) and are stopped with SIGTERM (then SIGKILL) when their time is up; the report is always written.  While
# the tests run, the Triton kernels HOPE's base preset launches are compiled in the background into Triton's
# cache (benchmarks/triton_aot.py: the same keys as the JIT), so section 3 does not wait on them.
# Works on the device image as it is: no `higher` (the CLI starts without it), no nbmake (pytest -o addopts=""),
# the repository's optimizers/ and meta_train/ linked under deepopt/ when the package is not installed.
# --cpu-smoke: the same sections at smoke sizes on the CPU (checks this script where no GPU is).
set -uo pipefail

usage() { echo "usage: $0 OUTDIR [--budget SECONDS] [--cpu-smoke]" >&2; exit 2; }
[ $# -ge 1 ] || usage
OUT=$1; shift
BUDGET=480; SMOKE=0
while [ $# -gt 0 ]; do
  case $1 in
    --budget) [ $# -ge 2 ] || usage; BUDGET=$2; shift 2 ;;
    --cpu-smoke) SMOKE=1; shift ;;
    *) usage ;;
  esac
done
case $BUDGET in ''|*[!0-9]*) echo "$0: --budget must be a whole number of seconds >= 60, got '$BUDGET'" >&2; exit 2 ;; esac
[ "$BUDGET" -ge 60 ] || { echo "$0: --budget must be >= 60 seconds, got $BUDGET" >&2; exit 2; }

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 2
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
PY=
for candidate in ${PYTHON:-} python3 python; do  # the first interpreter with torch ($PYTHON if set)
  if command -v "$candidate" > /dev/null && "$candidate" -c "import torch" 2> /dev/null; then PY=$candidate; break; fi
done
[ -n "$PY" ] || { echo "$0: no python with torch found (set PYTHON=...)" >&2; exit 2; }
START=$(date +%s)
RESERVE=15  # seconds kept for the report
now() { date +%s; }
left() { echo $(( BUDGET - ($(now) - START) - RESERVE )); }
log() { echo "[gpu_check $(( $(now) - START ))s] $*"; }
printf 'section\tstatus\tseconds\tlimit\n' > "$OUT/sections.tsv"

# run NAME LIMIT CMD...: CMD with a time limit, output to OUT/NAME.log (and a tail to the terminal)
run() {
  local name=$1 limit=$2; shift 2
  if [ "$limit" -lt 5 ]; then
    log "$name: skipped (no time left)"; printf '%s\tskipped\t0\t%s\n' "$name" "$limit" >> "$OUT/sections.tsv"; return 0
  fi
  log "$name: up to ${limit}s: $*"
  local t0 rc status
  t0=$(now)
  timeout --signal=TERM --kill-after=5 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  case $rc in 0) status=ok ;; 124|137) status=timeout ;; *) status="exit $rc" ;; esac
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$(( $(now) - t0 ))" "$limit" >> "$OUT/sections.tsv"
  log "$name: $status after $(( $(now) - t0 ))s"
  tail -n 4 "$OUT/$name.log" | sed 's/^/    /'
  return 0
}
# limit_for SHARE: LIMIT = the time until SHARE more percent of the budget is spent (what earlier sections left
# unused included), never past the budget (a variable, not an echo: $(...) would run it in a subshell)
SPENT_SHARES=0
limit_for() {
  SPENT_SHARES=$(( SPENT_SHARES + $1 ))
  local until_share=$(( BUDGET * SPENT_SHARES / 100 - ($(now) - START) )) rest
  rest=$(left)
  LIMIT=$(( until_share < rest ? until_share : rest ))
}

# --------------------------------------------------------------------------------------------- environment
if ! "$PY" -c "import deepopt.optimizers, deepopt.meta_train" 2>/dev/null; then
  # the wheel's layout from the repository's (deepopt.optimizers = optimizers/, deepopt.meta_train = meta_train/)
  ln -sfn ../optimizers deepopt/optimizers && ln -sfn ../meta_train deepopt/meta_train
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
  log "linked optimizers/ and meta_train/ under deepopt/ (PYTHONPATH=$ROOT)"
fi
export PYTHONPATH="$ROOT/benchmarks${PYTHONPATH:+:$PYTHONPATH}"  # tests_jsonl (the incremental test log)
"$PY" - "$OUT/env.json" "$SMOKE" <<'EOF' || { echo "$0: python/torch/deepopt not importable with $PY" >&2; exit 2; }
import json, platform, subprocess, sys
import torch
import deepopt
env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
       "deepopt": deepopt.__version__, "cpu_smoke": sys.argv[2] == "1"}
try:
    import triton
    env["triton"] = triton.__version__
except ImportError:
    env["triton"] = None
for mod in ("higher", "xdist", "pytest_timeout", "nbmake"):
    try:
        __import__(mod)
        env[mod] = True
    except ImportError:
        env[mod] = False
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    env.update(device=p.name, sms=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1),
               capability=f"{p.major}.{p.minor}")
    try:
        env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                       capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
elif sys.argv[2] != "1":
    sys.exit("no CUDA device (use --cpu-smoke to check this script on a CPU)")
json.dump(env, open(sys.argv[1], "w"), indent=1)
print(" ".join(f"{k}={v}" for k, v in env.items()))
EOF
ENV_JSON=$(cat "$OUT/env.json")
has() { echo "$ENV_JSON" | grep -q "\"$1\": true"; }
DEVICE=cuda; [ "$SMOKE" = 1 ] && DEVICE=cpu
log "budget ${BUDGET}s, device $DEVICE, output $OUT"

# Triton cache warm-up for section 3, in the background while the tests run (GPU-free: ahead-of-time compiles)
WARM_PID=
if [ "$SMOKE" = 0 ] && echo "$ENV_JSON" | grep -q '"triton": "'; then
  # section 3's HOPE runs fp32 with TF32 products allowed (hope_throughput sets matmul precision "high"): that scenario
  timeout --kill-after=5 $(( BUDGET * 60 / 100 )) "$PY" benchmarks/triton_aot.py --only hope --match "base ctx2048 float32 tf32" \
    --targets 90 --jobs 4 --json "$OUT/triton-warm.json" > "$OUT/triton-warm.log" 2>&1 &
  WARM_PID=$!
fi

# ------------------------------------------------------------------------------------------- 1. CUDA tests
TEST_FILES="tests/test_gpu_ready.py tests/test_cuda_graph.py tests/test_deep_kernels.py tests/test_delta_kernels.py tests/test_momenta_kernels.py
tests/test_titans_kernels.py tests/test_cms_kernels.py"
TEST_K="(cuda or meta or loaded or budget or foreach_mm or fp32_step or capturable or pointer_table) and not interpreter"
PYTEST=(-m pytest -o addopts= -p no:cacheprovider -q -rfE --tb=short -p tests_jsonl)
has xdist && PYTEST+=(-n "$([ "$SMOKE" = 1 ] && echo 2 || echo 8)")
has pytest_timeout && PYTEST+=(--timeout "$([ "$SMOKE" = 1 ] && echo 120 || echo 90)")
[ "$SMOKE" = 1 ] && TEST_K="(meta or budget or foreach_mm or fp32_step or capturable or pointer_table) and not interpreter"
# shellcheck disable=SC2086
limit_for 35
run cuda-tests "$LIMIT" env TESTS_JSONL="$OUT/tests.jsonl" \
  "$PY" "${PYTEST[@]}" $TEST_FILES -k "$TEST_K" --junitxml "$OUT/cuda-tests.xml"

# ------------------------------------------------------------------------------------------------ 2. bench
BENCH=(-m deepopt.cli bench --device "$DEVICE" --param-sets gpt2-124M --repeats 10 --warmup 3)
[ "$SMOKE" = 1 ] && BENCH=(-m deepopt.cli bench --device cpu --param-sets 100k-10 --repeats 2 --warmup 1)
BENCH_ALL=("SGD" "Momentum" "Adam" "AdamW" "DeltaMomentum" "DeepMomentum h=16" "torch Muon" "M3")
SHIPPED=$("$PY" -c "import deepopt.bench as b; print('DeepMomentum shipped' if 'DeepMomentum shipped' in b.OPTIMIZERS else '')" 2>/dev/null)
[ -n "$SHIPPED" ] && BENCH_ALL+=("$SHIPPED")
limit_for 25
run bench $(( LIMIT * 3 / 4 )) "$PY" "${BENCH[@]}" --optimizers "${BENCH_ALL[@]}" --out "$OUT/bench"
TF32=("DeepMomentum h=16"); [ -n "$SHIPPED" ] && TF32+=("$SHIPPED")
run bench-shipped $(( LIMIT / 8 > 5 ? LIMIT / 8 : 5 )) "$PY" benchmarks/momenta_step.py --device "$DEVICE" \
  --param-sets "$([ "$SMOKE" = 1 ] && echo 100k-10 || echo gpt2-124M)" --repeats 10
limit_for 0
run bench-tf32 "$LIMIT" "$PY" "${BENCH[@]}" --tf32 --optimizers "${TF32[@]}" --out "$OUT/bench-tf32"

# ----------------------------------------------------------------------------------------- 3. HOPE throughput
if [ -n "$WARM_PID" ]; then  # the warm-up may go on into this section; it is cut when the section starts
  kill -0 "$WARM_PID" 2>/dev/null && log "triton warm-up still running; stopping it"
  kill "$WARM_PID" 2>/dev/null; wait "$WARM_PID" 2>/dev/null
fi
limit_for 25
HOPE_END=$(( $(now) + LIMIT ))
HOPE=(benchmarks/hope_throughput.py --device "$DEVICE" --size base --tokens 16384 --steps 5 --warmup 2)
[ "$SMOKE" = 1 ] && HOPE=(benchmarks/hope_throughput.py --device cpu --size smoke --tokens 128 --steps 1 --warmup 1)
SPECS="eager:2048 eager:8192 reference:2048 cms-reference:2048 eager:512 cuda-graph:2048 compile:2048 cuda-graph:8192
compile:8192"
[ "$SMOKE" = 1 ] && SPECS="eager:64 compile:64"
for spec in $SPECS; do
  mode=${spec%%:*}; ctx=${spec##*:}
  flag=(); [ "$mode" = cuda-graph ] && flag=(--cuda-graph); [ "$mode" = compile ] && flag=(--compile)
  [ "$mode" = reference ] && flag=(--scan-reference)  # the scans' torch reference: what the kernels gain
  [ "$mode" = cms-reference ] && flag=(--scan-reference cms)  # the CMS levels' alone: what their kernels gain
  rest=$(( HOPE_END - $(now) ))
  # one run may take most of what is left, never all of it while later runs wait (the first pays the JIT)
  run "hope-$mode-$ctx" "$(( rest * 3 / 4 > 30 ? rest * 3 / 4 : rest ))" \
    "$PY" "${HOPE[@]}" --contexts "$ctx" "${flag[@]}" --out "$OUT/hope/$mode-$ctx"
done

# ---------------------------------------------------------------------------------------------- 4. compare
COMPARE=(-m deepopt.cli compare --device "$DEVICE" --tasks char_lm --lrs 1 --seeds 1 --schedule cosine --workers 1)
[ "$SMOKE" = 1 ] && COMPARE=(-m deepopt.cli compare --device cpu --smoke --tasks char_lm --lrs 1 --seeds 1)
OPTS=(torch_adamw torch_muon m3 deep_momentum deep_momentum_adam)
SHIPPED_CMP=$("$PY" -c "import deepopt.compare as c; print('shipped' if 'shipped' in c.OPTIMIZERS else '')" 2>/dev/null)
[ -n "$SHIPPED_CMP" ] && OPTS+=("$SHIPPED_CMP")
limit_for 15
run compare "$LIMIT" "$PY" "${COMPARE[@]}" --optimizers "${OPTS[@]}" --out "$OUT/compare"

# ----------------------------------------------------------------------------------------------- report
log "report"
timeout --kill-after=5 60 "$PY" benchmarks/gpu_report.py "$OUT" --budget "$BUDGET" --seconds "$(( $(now) - START ))"
