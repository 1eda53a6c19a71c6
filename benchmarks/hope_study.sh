#!/usr/bin/env bash
# The README's small HOPE study: 3 seeds, size tiny, context 128, batch 16, 200 steps (≈16 min on 2 cores
# in two parallel streams). Usage: bash benchmarks/hope_study.sh [OUT_DIR]   (default runs/hope-study)
set -euo pipefail
S="${1:-runs/hope-study}"
mkdir -p "$S"
C="--size tiny --context 128 --batch-size 16 --warmup 25 --threads 1 --no-progress"
train() { python -m deepopt.cli hope train --seed "$1" --steps 200 --val-every 100 $C "${@:2}"; }
for seed in 0 1 2; do
  for dom in code prose; do
    for m in hope transformer; do train $seed --model $m --domain $dom --out "$S/ppl-$m-$dom-s$seed"; done
  done
  for m in hope-no-cms hope-no-selfmod hope-single-cms; do train $seed --model $m --domain code --out "$S/ppl-$m-code-s$seed"; done
  for o in deep_momentum delta_momentum; do
    train $seed --model hope --domain code --optimizer $o --lr 0.2 --out "$S/opt-$o-s$seed"
  done
  train $seed --model hope --domain code --optimizer deep_momentum --lr 3e-3 --optimizer-option preconditioner=adam \
    --optimizer-option key_source=preconditioned --optimizer-option decoupled_weight_decay=true \
    --out "$S/opt-deep_momentum-adamkeys-s$seed"
done
python -m deepopt.cli hope continual --seeds 0 1 2 --steps 100 $C --out "$S/continual"
python -m deepopt.cli hope niah --seeds 0 1 2 --lr 3e-3 --steps 150 --context 192 --eval-contexts 192 384 768 \
  --eval-samples 32 --warmup 25 --size tiny --batch-size 16 --threads 1 --no-progress --out "$S/niah"
# In-context learning ablations (docs/notes/hope.md): perplexity with CMS / Titans updates off, η at its cap
for seed in 0 1 2; do
  python -m deepopt.cli hope eval --checkpoint "$S/ppl-hope-code-s$seed" --domains code --context 128 --ablations \
    --threads 1 --no-progress --out "$S/ablate-s$seed"
done
# MQAR (Zoology protocol, CPU-sized): width 64, equal parameters, accuracy vs key-value pairs
python -m deepopt.cli hope mqar --widths 64 --train-settings 64x4 64x8 128x16 --eval-settings 64x4 64x8 64x16 128x16 \
  256x16 --steps 600 --batch-size 32 --eval-samples 128 --lr 3e-3 --seeds 0 --threads 1 --no-progress --out "$S/mqar"
# (one lr here; the recall study with the lr sweep, seeds and the short-conv baseline: benchmarks/hope_recall.sh)
echo "reports: $S/*/report.json"
