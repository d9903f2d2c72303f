#!/usr/bin/env bash
# Study 4 of docs/accuracy.md: does distillation stop costing at a longer budget? Baseline vs distillation on study
# 1's data and split, 4x study 1's budget (320 epochs = 1600 iterations of batch 8, the same learning rate and
# polynomial decay over the longer run), seeds 0-2. Fixed before any of its runs. Resumable: run it again and it
# continues. DMAF names the command line (default .venv/bin/dmaf).
set -euo pipefail
cd "$(dirname "$0")/.."
DMAF=${DMAF:-.venv/bin/dmaf}
DATA=data/study_myops
$DMAF synthetic myops "$DATA" --cases 60 --shape 128,128,6 --profile study --seed 2026
test -f "$DATA/datalist.json" || $DMAF datalist myops "$DATA" --split 36,6,18 --seed 0 --exact
exec $DMAF ablation myops "$DATA" --out "${OUT_DIR:-studies/myops_long}" --settings distill --seeds "${SEEDS:-3}" --jobs "${JOBS:-1}" \
  --roi_size "[96,96]" --crop_size "[112,112,-1]" --batch_size 8 --max_epochs 320 --val_interval 40 \
  --learning_rate 0.001 --num_workers 0 --cache_rate 1.0
