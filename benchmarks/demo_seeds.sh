#!/bin/bash
# The README demo's training, once per seed, each model evaluated over the 15 modality combinations: how much the
# demo's accuracy depends on the seed (docs/accuracy.md, "The README demo"). The data, the epochs and the overrides
# are the demo's own (dmaf_components/demo.py: DEMO_DATA, DEMO_EPOCHS, DEMO_OVERRIDES).
#
#   bash benchmarks/demo_seeds.sh OUT_DIR SEED [SEED ...]
#   CODE=/path/to/other/worktree bash benchmarks/demo_seeds.sh OUT_DIR 0 1 2   # another version's code (a clean
#                                                    worktree of a commit) trains and evaluates, with its own configs
#
# The demo's data is generated in DATA (default data/demo_brats) when missing. A finished seed (its
# evaluation.json exists) is skipped; one line per seed is appended to OUT_DIR/results.txt, with its time.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
out=$(mkdir -p "$1" && cd "$1" && pwd); shift
code=${CODE:-$here}
data=${DATA:-$here/data/demo_brats}
py=${PYTHON:-$here/.venv/bin/python}
env_code=()
if [ "$code" != "$here" ]; then
  # import the other tree's package instead of this checkout's editable install
  site=$(mktemp -d)
  printf 'import sys\nsys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable___")]\n' > "$site/sitecustomize.py"
  env_code=(env "PYTHONPATH=$site:$code")
fi
"${env_code[@]}" "$py" -c "import sys; from dmaf_components.demo import prepare_demo_data; prepare_demo_data(sys.argv[1])" "$data"
mapfile -t overrides < <("${env_code[@]}" "$py" -c "from dmaf_components.demo import DEMO_EPOCHS as e, DEMO_OVERRIDES as o
print('\n'.join(o + ['--max_epochs', str(e), '--val_interval', str(max(1, e // 5))]))")
overrides+=(${EXTRA:-})  # EXTRA: more overrides, e.g. EXTRA="--patch_sampling uniform"
header="# $(date -u +%FT%TZ) $(git -C "$code" describe --always --dirty), $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores
# overrides: ${overrides[*]}"
for seed in "$@"; do
  run="$out/seed$seed"
  [ -f "$run/eval/evaluation.json" ] && continue
  [ -n "$header" ] && echo "$header" >> "$out/results.txt" && header=""
  mkdir -p "$run"
  start=$(date +%s)
  (cd "$code/bundle" && "${env_code[@]}" "$py" -m monai.bundle run training --config_file configs/train.json \
     --dataset_dir "$data" --bundle_root "$run" --seed "$seed" --overwrite True "${overrides[@]}" \
     > "$run/train.log" 2>&1)  # a seed without its evaluation is trained again from scratch
  trained=$(date +%s)
  (cd "$code/bundle" && "${env_code[@]}" "$py" -m monai.bundle run --config_file "['configs/train.json','configs/evaluate.json']" \
     --dataset_dir "$data" --bundle_root "$run" "${overrides[@]}" > "$run/eval.log" 2>&1)
  "$py" - "$run/eval/evaluation.json" "$seed" "$code" "$((trained - start))" "$(($(date +%s) - trained))" \
    >> "$out/results.txt" <<'PY'
import json, sys
rows = [r for r in json.load(open(sys.argv[1]))["tables"]["raw"] if r["combination"] != "Avg."]
avg = {k: sum(r[k] for r in rows) / len(rows) for k in ("dice_WT", "dice_TC", "dice_ET")}
full = next(r for r in rows if r["combination"].count("+") == 3)
print(f"seed {sys.argv[2]} ({sys.argv[3]}): average over the 15 combinations " + " / ".join(
    f"{k[5:]} {v:.1f}" for k, v in avg.items()) + f", mean {sum(avg.values()) / 3:.1f}; all four modalities WT "
    f"{full['dice_WT']:.1f}; training {sys.argv[4]} s, evaluation {sys.argv[5]} s")
PY
  tail -1 "$out/results.txt"
done
# every seed's table in OUT_DIR, and their mean, per combination (rewritten each time)
"$py" - "$out" "$@" > "$out/tables.txt" <<'PY'
import json, os, sys
out, seeds = sys.argv[1], sys.argv[2:]
keys = ("dice_WT", "dice_TC", "dice_ET")
tables = {s: [r for r in json.load(open(os.path.join(out, f"seed{s}", "eval", "evaluation.json")))["tables"]["raw"]
              if r["combination"] != "Avg."] for s in seeds}
print("Dice WT / TC / ET / their mean per modality combination, each seed, then the mean over seeds")
print(f"{'combination':20s} " + " | ".join(f"seed {s:>2}" + " " * 16 for s in seeds) + " | mean over seeds")
first = tables[seeds[0]]
for i, row in enumerate(first):
    cells = []
    for s in seeds + ["mean"]:
        vals = [sum(tables[t][i][k] for t in seeds) / len(seeds) for k in keys] if s == "mean" else \
            [tables[s][i][k] for k in keys]
        cells.append(" / ".join(f"{v:4.1f}" for v in vals) + f" / {sum(vals) / 3:4.1f}")
    print(f"{row['combination']:20s} " + " | ".join(cells))
PY
