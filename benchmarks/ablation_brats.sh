#!/usr/bin/env bash
# Study 2 of docs/accuracy.md: baseline vs full DMAF-Net in 3-D on the synthetic BraTS "study" set, 3 seeds. Data,
# split and budget (20 epochs of 36 cases, 64^3 patches, learning rate 1e-3) were fixed before any setting was run,
# the budget from the GPU's measured speed alone (docs/accuracy.md). Resumable: run it again and it continues.
#   JOBS=6 bash benchmarks/ablation_brats.sh          # on a GPU: the 6 runs at once
#   bash benchmarks/ablation_brats.sh                 # one run at a time (on this CPU: hours)
#   SETTINGS=dmaf,full JOBS=2 bash benchmarks/ablation_brats.sh   # study 5: DMAF fusion alone added (same folder,
#                                                                  # baseline and full reused; docs/accuracy.md)
# DMAF names the command line (default: dmaf; e.g. "python3 -m dmaf_components.cli" without an installed entry
# point); GEN_WORKERS the processes writing the synthetic set.
set -euo pipefail
cd "$(dirname "$0")/.."
DMAF=${DMAF:-dmaf}
DATA=${DATA:-data/study_brats}
$DMAF synthetic brats "$DATA" --cases 60 --shape 96,96,64 --profile study --seed 2026 --workers "${GEN_WORKERS:-1}"
test -f "$DATA/datalist.json" || $DMAF datalist brats "$DATA" --split 36,6,18 --seed 0 --exact
exec $DMAF ablation brats "$DATA" --out "${OUT_DIR:-studies/brats_baseline_full}" --settings "${SETTINGS:-full}" \
  --seeds "${SEEDS:-3}" --jobs "${JOBS:-1}" --roi_size "[64,64,64]" --batch_size 1 --max_epochs 20 \
  --val_interval 10 --learning_rate 0.001 --num_workers 2 --cache_rate 1.0
