#!/usr/bin/env bash
# GPU figures and checks for docs/performance.md, in one run on a GPU machine:
#   1. training step at 128^3 with AMP: DMAF-Net vs the attention-free baseline, all modalities vs IDT masks
#      (s/step, peak GPU memory, % of the fp16 matmul peak); then the full model with channels-last convolutions
#      and in fp32 without AMP, for comparison;
#   2. the CUDA tests (mixed precision, CPU/GPU agreement, AMP + GradScaler + DTM) and the bundle tests (one-epoch
#      training with AMP on the GPU, resume, evaluation, inference, MONAI checks);
#   3. full-study inference (240 x 240 x 155) with the bundle's inference.json.
# Usage: bash benchmarks/gpu_checks.sh OUTDIR       (the package importable: pip install -e . or PYTHONPATH)
# DEVICE and SIZE override the device (cuda) and patch size (128), e.g. DEVICE=cpu SIZE=32 for a dry run.
set -u
out=${1:-gpu_results}
dev=${DEVICE:-cuda}
size=${SIZE:-128}
mkdir -p "$out"
amp=(); [ "$dev" = cuda ] && amp=(--amp)
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  python3 -c "import torch, monai; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'monai', monai.__version__)"
} 2>&1 | tee "$out/machine.txt"
step() { echo "== $1"; shift; "$@"; echo "== exit $?"; }
step "training step, AMP, all configurations" timeout 200 python3 benchmarks/train_step.py --device "$dev" "${amp[@]}" \
  --sizes "$size" --steps 5 --json "$out/train_amp.json" 2>&1 | tee "$out/train_amp.log"
step "CUDA tests" timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/tests_cuda.log"
step "bundle tests on this device" timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_bundle.py \
  -k "not torchrun" 2>&1 | tee "$out/tests_bundle.log"
step "full model, channels-last on" timeout 90 python3 benchmarks/train_step.py --device "$dev" "${amp[@]}" \
  --sizes "$size" --steps 5 --variants full --masks all --channels-last on 2>&1 | tee "$out/train_amp_cl.log"
step "full model, fp32" timeout 90 python3 benchmarks/train_step.py --device "$dev" --sizes "$size" --steps 5 \
  --variants full --masks all 2>&1 | tee "$out/train_fp32.log"
step "full-study inference" timeout 150 python3 benchmarks/inference.py 2>&1 | tee "$out/inference.log"
