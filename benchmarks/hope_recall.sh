#!/usr/bin/env bash
# HOPE's recall study (issue 19): MQAR and S-NIAH-1 at 1x, 2x and 4x the training length, HOPE against
# Transformer++ with its short causal conv (the recall baseline) and the plain Transformer++ beside it.  Every
# model gets the same budget: the lr sweep 1e-3 3e-3 1e-2 3e-2 at seed 0, the best lr (validation accuracy) at
# seeds 1 and 2, the same steps; every table reports the plateau diagnostic (share of answers that are some
# in-context value).  Tables: python benchmarks/hope_recall_tables.py OUT.
#
# Usage: bash benchmarks/hope_recall.sh [--smoke | --device cuda] [OUT]     (default OUT runs/hope-recall)
#   (default)      CPU size: MQAR, then S-NIAH-1, each with JOBS training runs at once (default 2, one thread
#                  each: `--jobs`): see docs/notes/hope-recall.md for its measured wall and CPU time on 2 cores
#   --smoke        CI size: every command and table once, seconds
#   --device cuda  GPU size: widths 64 and 128, Zoology's MQAR mixture, the four NIAH tasks, longer runs
# HOPE_FLAGS="..." adds flags for HOPE's memories (default none: HopeConfig's defaults, per-token η_t; e.g.
# HOPE_FLAGS="--eta-form chunk_capped --chunk-size 4" for the former capped write; they change nothing in
# Transformer++).  MQAR_STEPS=N / NIAH_STEPS=N change the CPU size's steps for every model (defaults 800 / 400;
# S-NIAH-1 warms up for 10% of its steps; docs/notes/hope-recall.md reports MQAR at MQAR_STEPS=3200 too); JOBS=N
# runs N training runs at once on the CPU (the same runs and numbers as one at a time).  A killed
# study rerun with the same OUT continues where it stopped (each command's finished training runs are kept in its
# runs.jsonl); a finished command is skipped.
set -euo pipefail
size=cpu device=cpu
case "${1:-}" in
  --smoke) size=smoke; shift ;;
  --device) [ "${2:-}" = cuda ] || { echo "hope_recall.sh: --device takes cuda, got '${2:-}'" >&2; exit 2; }
            size=gpu device=cuda; shift 2 ;;
  -*) echo "hope_recall.sh: unknown option $1 (accepted: --smoke, --device cuda)" >&2; exit 2 ;;
esac
S="${1:-runs/hope-recall}"
HOPE_FLAGS="${HOPE_FLAGS:-}"
MQAR_STEPS="${MQAR_STEPS:-800}" NIAH_STEPS="${NIAH_STEPS:-400}" JOBS="${JOBS:-2}"
mkdir -p "$S"
start=$SECONDS

# run NAME ARGS...: `deepopt hope ARGS --out $S/NAME`, continued with --resume after a kill, skipped when done
run() {
  local out="$S/$1"; shift
  if [ -f "$out/report.json" ]; then echo "$out: done, skipped"; return; fi
  local again=(); [ -f "$out/runs.jsonl" ] && again=(--resume)
  # shellcheck disable=SC2086
  python -m deepopt.cli hope "$@" $HOPE_FLAGS --device "$device" --no-progress --out "$out" "${again[@]}" \
    > "$out.log" 2>&1 || { echo "$out failed: see $out.log" >&2; tail -5 "$out.log" >&2; return 1; }
  echo "$out: done"
}

case $size in
  smoke)
    run mqar mqar --smoke --threads 1 --jobs "$JOBS" --lrs 3e-3 1e-2 --seeds 0 1 --vocab-size 512 \
      --eval-settings 64x4 128x4
    run s-niah-1 niah --smoke --task s-niah-1 --context 160 --threads 1 --jobs "$JOBS" --lrs 3e-3 1e-2 --seeds 0 1 \
      --steps 2 --batch-size 2 --eval-samples 2 ;;
  cpu)
    # MQAR: width 64, vocabulary 512, trained on 64x4; 64x8 = twice the pairs, 128x4 / 256x4 = 2x / 4x the length
    run mqar mqar --widths 64 --train-settings 64x4 --eval-settings 64x4 64x8 128x4 256x4 --vocab-size 512 \
      --steps "$MQAR_STEPS" --batch-size 32 --eval-samples 128 --threads 1 --jobs "$JOBS"
    # S-NIAH-1 (repeated-noise haystack, 7-digit value) trained at context 192, evaluated at 192 / 384 / 768
    run s-niah-1 niah --task s-niah-1 --context 192 --steps "$NIAH_STEPS" --batch-size 16 \
      --warmup $((NIAH_STEPS / 10)) --eval-samples 64 --threads 1 --jobs "$JOBS" ;;
  gpu)
    run mqar mqar --widths 64 128 --train-settings 64x4 128x8 256x16 256x32 --eval-settings 64x4 64x8 128x4 \
      128x8 256x16 256x32 512x32 1024x32 --vocab-size 8192 --steps 2000 --batch-size 64 --eval-samples 256
    for task in s-niah-1 s-niah-2 s-niah-3 mk-niah; do
      run "$task" niah --task "$task" --context 512 --steps 2000 --batch-size 32 --eval-samples 128
    done ;;
esac
wall=$((SECONDS - start))
times > "$S/times.txt"  # line 2: user and system CPU time of every command this script ran ("12m3.4s 0m5.6s")
python - "$S" "$wall" "$size" <<'EOF'
import json, re, sys
from pathlib import Path
out, wall, size = Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
children = (out / "times.txt").read_text().splitlines()[1]
cpu = sum(60 * float(m) + float(s) for m, s in re.findall(r"(\d+)m([\d.]+)s", children))
json.dump({"size": size, "wall_s": wall, "cpu_s": cpu}, open(out / "timing.json", "w"), indent=1)
print(f"hope_recall ({size}): wall {wall / 60:.1f} min, CPU {cpu / 60:.1f} min (this invocation) -> {out}")
EOF
python benchmarks/hope_recall_tables.py "$S"
