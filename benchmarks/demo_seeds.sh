#!/bin/bash
# The README demo's training, once per seed, each model evaluated over the 15 modality combinations by this checkout's
# evaluation: how much the demo's accuracy depends on the seed (docs/performance.md, "The README demo").
#
#   bash benchmarks/demo_seeds.sh OUT_DIR SEED [SEED ...]
#   CODE=/path/to/other/worktree bash benchmarks/demo_seeds.sh OUT_DIR 0 1 2   # train with another version's code
#
# Needs `make demo` (or `dmaf synthetic brats`) to have written data/synthetic_brats and its datalist. A finished
# seed (its evaluation.json exists) is skipped; one line per seed is appended to OUT_DIR/results.txt.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
out=$(mkdir -p "$1" && cd "$1" && pwd); shift
code=${CODE:-$here}
data=${DATA:-$here/data/synthetic_brats}
py=${PYTHON:-$here/.venv/bin/python}
overrides=(--roi_size "[48,48,48]" --num_workers 2 --sw_overlap 0.25 --learning_rate 0.001 --max_epochs 12
           --val_interval 4 ${EXTRA:-})  # EXTRA: more overrides, e.g. EXTRA="--patch_sampling foreground"
env_code=()
if [ "$code" != "$here" ]; then
  # import the other tree's package instead of this checkout's editable install
  site=$(mktemp -d)
  printf 'import sys\nsys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable___")]\n' > "$site/sitecustomize.py"
  env_code=(env "PYTHONPATH=$site:$code")
fi
for seed in "$@"; do
  run="$out/seed$seed"
  [ -f "$run/eval/evaluation.json" ] && continue
  mkdir -p "$run"
  (cd "$code/bundle" && "${env_code[@]}" "$py" -m monai.bundle run training --config_file configs/train.json \
     --dataset_dir "$data" --bundle_root "$run" --seed "$seed" --overwrite True "${overrides[@]}" \
     > "$run/train.log" 2>&1)  # a seed without its evaluation is trained again from scratch
  (cd "$here/bundle" && "$py" -m monai.bundle run --config_file "['configs/train.json','configs/evaluate.json']" \
     --dataset_dir "$data" --bundle_root "$run" "${overrides[@]}" > "$run/eval.log" 2>&1)
  "$py" - "$run/eval/evaluation.json" "$seed" "$code" >> "$out/results.txt" <<'PY'
import json, sys
rows = [r for r in json.load(open(sys.argv[1]))["tables"]["raw"] if r["combination"] != "Avg."]
avg = {k: sum(r[k] for r in rows) / len(rows) for k in ("dice_WT", "dice_TC", "dice_ET")}
print(f"seed {sys.argv[2]} ({sys.argv[3]}): " + " / ".join(f"{k[5:]} {v:.1f}" for k, v in avg.items()))
PY
  tail -1 "$out/results.txt"
done
