#!/usr/bin/env bash
# The 3-D recipe study (studies/recipe_3d/README.md): does foreground-balanced patch sampling make early 3-D training
# learn faster and vary less, for the baseline and the full model? Data, budget, arms, seeds and the decision rule
# were fixed before any run. Resumable: run it again and it continues; each finished run leaves
# studies/recipe_3d/<arm>/runs/<setting>/seed<k>/record.json (with its validation curve).
#   bash benchmarks/recipe_3d.sh                   # both arms, 3 seeds, one run at a time
#   JOBS=2 bash benchmarks/recipe_3d.sh            # two runs at a time
# Needs the MNI template: pip install -c .venv/torch-constraint.txt nilearn (or TEMPLATE_DIR=...).
# Frozen code: every run trains with commit 48a96d4 from a worktree (FROZEN, made here when missing), so that later
# commits to this checkout cannot reach later runs.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
COMMIT=48a96d4e8686754713d456b69dfce18d9751df07
FROZEN=${FROZEN:-$ROOT/../frozen_48a96d4}
test -d "$FROZEN" || git worktree add --detach "$FROZEN" "$COMMIT"
test "$(git -C "$FROZEN" rev-parse HEAD)" = "$COMMIT"
DMAF=(env PYTHONPATH="$FROZEN" "${VENV:-$ROOT/.venv}/bin/python" -P -m dmaf_components.cli)
DATA=${DATA:-$ROOT/data/anatomy_brats}
OUT=${OUT_DIR:-$ROOT/studies/recipe_3d}
template=()
[ -n "${TEMPLATE_DIR:-}" ] && template=(--template_dir "$TEMPLATE_DIR")
"${DMAF[@]}" synthetic brats "$DATA" --cases 40 --profile anatomy --spacing 2 --seed 2026 --workers "${GEN_WORKERS:-2}" \
  "${template[@]}"
test -f "$DATA/datalist.json" || "${DMAF[@]}" datalist brats "$DATA" --split 24,8,8 --seed 0 --exact
common=(--settings full --seeds "${SEEDS:-3}" --jobs "${JOBS:-1}" --roi_size "[48,48,48]" --batch_size 1
        --max_epochs 20 --val_interval 2 --learning_rate 0.001 --num_workers 2 --cache_rate 1.0)
"${DMAF[@]}" ablation brats "$DATA" --out "$OUT/uniform" "${common[@]}" --patch_sampling uniform
"${DMAF[@]}" ablation brats "$DATA" --out "$OUT/foreground" "${common[@]}" --patch_sampling foreground \
  --foreground_ratio 0.5
