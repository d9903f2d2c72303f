#!/usr/bin/env bash
# Rebuild every committed study's summary (table3.md/.csv/.png, combinations.csv, effects.csv) from its records with
# the current summary code (docs/accuracy.md, "How the intervals are computed"). Trains nothing; it regenerates the
# synthetic study sets when missing (their datalists must hash as the records say, else the summary refuses).
#   bash benchmarks/rebuild_summaries.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DMAF=${DMAF:-.venv/bin/dmaf}
MYOPS=data/study_myops
BRATS=data/study_brats
$DMAF synthetic myops "$MYOPS" --cases 60 --shape 128,128,6 --profile study --seed 2026
test -f "$MYOPS/datalist.json" || $DMAF datalist myops "$MYOPS" --split 36,6,18 --seed 0 --exact
$DMAF synthetic brats "$BRATS" --cases 60 --shape 96,96,64 --profile study --seed 2026 --workers 2
test -f "$BRATS/datalist.json" || $DMAF datalist brats "$BRATS" --split 36,6,18 --seed 0 --exact
only=(--summarize_only True)
$DMAF ablation myops "$MYOPS" --out studies/myops_table3 --settings table3 --seeds 5 "${only[@]}"
$DMAF ablation myops "$MYOPS" --out studies/myops_long --settings distill --seeds 3 "${only[@]}"
$DMAF ablation myops "$MYOPS" --out studies/myops_v2_probe --settings baseline --seeds 1 "${only[@]}"
V=studies/myops_variants
$DMAF ablation myops "$MYOPS" --out $V/reference --reference studies/myops_table3 --settings full --seeds 3 "${only[@]}"
for variant in alpha1 lsep_mean no_eq18 tokens16; do
  $DMAF ablation myops "$MYOPS" --out $V/$variant --reference $V/reference --settings full --seeds 3 "${only[@]}"
done
$DMAF ablation brats "$BRATS" --out studies/brats_baseline_full --settings dmaf,full --seeds 3 "${only[@]}"
