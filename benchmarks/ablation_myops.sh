#!/usr/bin/env bash
# The Table-3 ablation study on the synthetic MyoPS "study" set (docs/accuracy.md): data, split and budget fixed
# before any setting was run. Resumable: run it again and it continues; finished runs leave
# studies/myops_table3/runs/<setting>/seed<k>/record.json, and the summary is studies/myops_table3/table3.md.
#   bash benchmarks/ablation_myops.sh            # 8 settings x 3 seeds
#   SEEDS=5 bash benchmarks/ablation_myops.sh    # more seeds later (seeds 0..4; finished runs are kept)
set -euo pipefail
cd "$(dirname "$0")/.."
DMAF="${VENV:-.venv}/bin/dmaf"
DATA=data/study_myops
"$DMAF" synthetic myops "$DATA" --cases 60 --shape 128,128,6 --profile study --seed 2026
test -f "$DATA/datalist.json" || "$DMAF" datalist myops "$DATA" --split 36,6,18 --seed 0 --exact
exec "$DMAF" ablation myops "$DATA" --out studies/myops_table3 --settings table3 --seeds "${SEEDS:-3}" \
  --roi_size "[96,96]" --crop_size "[112,112,-1]" --batch_size 8 --max_epochs 80 --val_interval 10 \
  --learning_rate 0.001 --num_workers 0 --cache_rate 1.0
