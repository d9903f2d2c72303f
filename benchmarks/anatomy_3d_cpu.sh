#!/usr/bin/env bash
# The real-anatomy 3-D study (studies/anatomy_3d/README.md) on this machine's CPU, the deviation its design allows
# when no GPU is lent: the same data, split, budget, settings and seeds, fp32, one run at a time, from a frozen
# worktree. Resumable: run it again and it continues; each finished run leaves
# studies/anatomy_3d/runs/<setting>/seed<k>/record.json. Runs go seed by seed (baseline, dmaf, full of seed 0, then
# seed 1, ...), so that each seed's three runs share the device and the code.
#   bash benchmarks/anatomy_3d_cpu.sh                        # seeds 0-4
#   SEEDS="[5,6]" bash benchmarks/anatomy_3d_cpu.sh          # more seeds, if the design's rule asks for them
# Needs the MNI template: TEMPLATE_DIR=lease_wheels/mni (benchmarks/lease_wheels.sh), or pip install nilearn.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
COMMIT=15a6ff788c07903e68438d056bbf8290a8a1d240
FROZEN=${FROZEN:-$ROOT/../frozen_15a6ff7}
test -d "$FROZEN" || git worktree add --detach "$FROZEN" "$COMMIT"
test "$(git -C "$FROZEN" rev-parse HEAD)" = "$COMMIT"
PY=${VENV:-$ROOT/.venv}/bin/python
DMAF=(env PYTHONPATH="$FROZEN" "$PY" -P -m dmaf_components.cli)
DATA=${DATA:-$ROOT/data/anatomy_brats}
OUT=${OUT_DIR:-$ROOT/studies/anatomy_3d}
template=()
[ -n "${TEMPLATE_DIR:-}" ] && template=(--template_dir "$TEMPLATE_DIR")
"${DMAF[@]}" synthetic brats "$DATA" --cases 40 --profile anatomy --spacing 2 --seed 2026 --workers "${GEN_WORKERS:-2}" \
  "${template[@]}"
test -f "$DATA/datalist.json" || "${DMAF[@]}" datalist brats "$DATA" --split 24,8,8 --seed 0 --exact
mkdir -p "$OUT/cpu_data"
cp "$DATA/datalist.json" "$OUT/cpu_data/datalist.json"
test -s "$OUT/cpu_data/data_sha256.txt" || "$PY" benchmarks/data_sha256.py "$DATA" > "$OUT/cpu_data/data_sha256.txt"
"${DMAF[@]}" ablation brats "$DATA" --out "$OUT" --settings baseline,dmaf,full --seeds "${SEEDS:-[0,1,2,3,4]}" \
  --jobs 1 --roi_size "[64,64,64]" --batch_size 1 --epochs 10 --val_interval 5 --learning_rate 0.001 \
  --num_workers 2 --cache_rate 1.0 --sw_batch_size 4 --patch_sampling uniform
