#!/usr/bin/env bash
# Issue-14 §6 figures on a lent GPU in one short run (docs/performance.md "Training on the GPU"):
#   1. the 128^3 AMP training step of the full model and the baseline (s/step, peak memory), one profiled step each
#      (GPU busy share, kernel launches, host-device syncs; top operators to OUTDIR/profile_*.txt), and the full
#      model with fused AdamW and with instance norm through the group-norm kernel;
#   2. one real bundle training run (train.json's defaults) on 20 full-size synthetic cases: cache fill, epoch wall
#      time, loader wait, GPU utilisation, peak memory;
#   3. the training loader at full size: the loader thread (workers 0) against 4 worker processes, alone
#      (samples/s, first epoch and steady state) and feeding a 0.12 s stand-in step (share of time waiting);
#   4. with COMPILE=1, the full model under torch.compile (its compile time printed as the warm-up).
# Usage: bash benchmarks/gpu_perf.sh OUTDIR     (the package importable: pip install -e . or PYTHONPATH)
set -u
out=${1:-gpu_perf}
data=${DATA:-data/epoch_bench}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  python3 -c "import torch, monai; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'monai', monai.__version__)"
  echo "cpus $(nproc)"; } 2>&1 | tee "$out/machine.txt"
step() { echo "== $1"; shift; "$@"; echo "== exit $?"; }
step "training step 128^3, AMP, full vs baseline" timeout 150 python3 benchmarks/train_step.py --device cuda --amp \
  --sizes 128 --steps 10 --masks all --skip-flops --profile "$out" --json "$out/step_amp.json" 2>&1 | tee "$out/step.log"
step "full model, fused AdamW" timeout 70 python3 benchmarks/train_step.py --device cuda --amp --sizes 128 --steps 10 \
  --variants full --masks all --skip-flops --fused-adamw 2>&1 | tee -a "$out/step.log"
step "full model, instance norm through the group-norm kernel" timeout 70 python3 benchmarks/train_step.py \
  --device cuda --amp --sizes 128 --steps 10 --variants full --masks all --skip-flops --norm group 2>&1 \
  | tee -a "$out/step.log"
step "bundle training, 20 full-size cases, 2 epochs" timeout 150 python3 benchmarks/train_epoch.py --data "$data" \
  --cases 20 --epochs 2 --gen-workers 16 --json "$out/epoch.json" 2>&1 | grep -v "Epoch \[\|Iter:\|Loading dataset" \
  | tee "$out/epoch.log"
step "training loader alone: the loader thread (workers 0) and 4 worker processes" timeout 120 python3 \
  benchmarks/dataloader.py --data "$data" --cases 20 --workers 0 4 --epochs 3 --cache-rates 1.0 2>&1 \
  | grep -v "Loading dataset" | tee "$out/loader.log"
step "training loader feeding a 0.12 s step: thread and 4 processes" timeout 120 python3 \
  benchmarks/dataloader.py --data "$data" --cases 20 --workers 0 4 --epochs 3 --cache-rates 1.0 --step-s 0.12 2>&1 \
  | grep -v "Loading dataset" | tee -a "$out/loader.log"
if [ "${COMPILE:-0}" = 1 ]; then
  step "full model, torch.compile" timeout 240 python3 benchmarks/train_step.py --device cuda --amp --sizes 128 \
    --steps 10 --variants full --masks all --skip-flops --compile 2>&1 | tee -a "$out/step.log"
fi
