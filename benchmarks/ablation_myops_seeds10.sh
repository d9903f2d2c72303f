#!/usr/bin/env bash
# Study 1 at 10 seeds (docs/accuracy.md, "Study 1"): baseline, DMAF alone and full on study 1's data, split and
# budget, seeds 0-9 (seeds 0-4 are study 1's own runs), run on study 1's frozen code 18b1a81 so that every seed comes
# from one commit. The number of seeds was fixed from the power analysis before any new run and is not changed by
# what the runs show. Resumable: run it again and it continues; finished runs leave
# studies/myops_table3/runs/<setting>/seed<k>/record.json.
#   bash benchmarks/ablation_myops_seeds10.sh
# FROZEN: a worktree of 18b1a81 (made here when missing); VENV: the environment with torch/monai (default .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
FROZEN=${FROZEN:-$ROOT/../frozen_18b1a81}
PY=${VENV:-$ROOT/.venv}/bin/python
test -d "$FROZEN" || git worktree add --detach "$FROZEN" 18b1a81f3acf886a6c0c0da5acc80ad7bd9d5658
test "$(git -C "$FROZEN" rev-parse HEAD)" = 18b1a81f3acf886a6c0c0da5acc80ad7bd9d5658
DMAF=(env PYTHONPATH="$FROZEN" "$PY" -P -m dmaf_components.cli)
DATA=$ROOT/data/study_myops
"${DMAF[@]}" synthetic myops "$DATA" --cases 60 --shape 128,128,6 --profile study --seed 2026
test -f "$DATA/datalist.json" || "${DMAF[@]}" datalist myops "$DATA" --split 36,6,18 --seed 0 --exact
# the datalist every study-1 record names (a different one would pair runs on other data)
echo "e5e29e75085d54ee07dfb0f387c0add5af720d666dd580ec0fc33b9b8c3327a1  $DATA/datalist.json" | sha256sum -c --quiet
exec "${DMAF[@]}" ablation myops "$DATA" --out "$ROOT/studies/myops_table3" --settings baseline,dmaf,full --seeds 10 \
  --roi_size "[96,96]" --crop_size "[112,112,-1]" --batch_size 8 --max_epochs 80 --val_interval 10 \
  --learning_rate 0.001 --num_workers 0 --cache_rate 1.0
