#!/usr/bin/env bash
# Study 3 of docs/accuracy.md: the paper's weak spots (issue 13 §3) as variants of the full model on study 1's data,
# split and budget, 3 seeds, each paired with a reference run of the full model on the same code. Fixed before any
# variant was run. Resumable: run it again and it continues.
#   reference   the full model, paired with study 1's full runs (same seeds): what the code change since study 1's
#               frozen commit does (expected: nothing beyond float rounding)
#   alpha1      alpha1 constant at 0.6 (Eq. 8 without learning it)          --learn_alpha1 False
#   lsep_mean   L_sep weighted by M * w (mean 1) instead of Eq. 16's w     --dtm_reweight_norm mean
#   no_eq18     DTM reweighting without Eq. 18's gradient scaling          --dtm_scaling none
#   tokens16    S_d = 16^2 tokens per modality instead of 8^2              --token_grid [16,16]
# DMAF names the command line (default .venv/bin/dmaf).
set -euo pipefail
cd "$(dirname "$0")/.."
DMAF=${DMAF:-.venv/bin/dmaf}
DATA=data/study_myops
OUT=${OUT_DIR:-studies/myops_variants}
SEEDS=${SEEDS:-3}
$DMAF synthetic myops "$DATA" --cases 60 --shape 128,128,6 --profile study --seed 2026
test -f "$DATA/datalist.json" || $DMAF datalist myops "$DATA" --split 36,6,18 --seed 0 --exact
common=(--settings full --seeds "$SEEDS" --roi_size "[96,96]" --crop_size "[112,112,-1]" --batch_size 8
        --max_epochs 80 --val_interval 10 --learning_rate 0.001 --num_workers 0 --cache_rate 1.0)
$DMAF ablation myops "$DATA" --out "$OUT/reference" --reference studies/myops_table3 "${common[@]}"
$DMAF ablation myops "$DATA" --out "$OUT/alpha1" --reference "$OUT/reference" "${common[@]}" --learn_alpha1 False
$DMAF ablation myops "$DATA" --out "$OUT/lsep_mean" --reference "$OUT/reference" "${common[@]}" \
  --dtm_reweight_norm mean
$DMAF ablation myops "$DATA" --out "$OUT/no_eq18" --reference "$OUT/reference" "${common[@]}" --dtm_scaling none
$DMAF ablation myops "$DATA" --out "$OUT/tokens16" --reference "$OUT/reference" "${common[@]}" --token_grid "[16,16]"
