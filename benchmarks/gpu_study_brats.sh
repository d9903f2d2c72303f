#!/usr/bin/env bash
# Study 2 of docs/accuracy.md on one lent GPU: the 6 runs at once (benchmarks/ablation_brats.sh, JOBS=6), stopped
# after STUDY_S seconds if unfinished; the records, logs and summary packed into OUTDIR/brats_study.tgz. On a machine
# kept warm between calls, calling it again continues the study (the runs' checkpoints stay on that machine).
#   bash benchmarks/gpu_study_brats.sh OUTDIR        (the package importable: pip install -e . or PYTHONPATH)
set -u
out=${1:-gpu_study}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  python3 -c "import torch, monai; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'monai', monai.__version__)"
  echo "cpus $(nproc)"; } 2>&1 | tee "$out/machine.txt"
JOBS=6 GEN_WORKERS=16 DMAF="python3 -m dmaf_components.cli" timeout "${STUDY_S:-540}" \
  bash benchmarks/ablation_brats.sh 2>&1 | grep -v "epoch [0-9]*/" | tee "$out/study.log"
tar czf "$out/brats_study.tgz" --exclude=models --exclude='events.out*' studies/brats_baseline_full \
  data/study_brats/datalist.json
ls -la "$out"
