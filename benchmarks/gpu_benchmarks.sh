#!/usr/bin/env bash
# The GPU benchmarks of docs/benchmarks.md, in one run on a CUDA machine:
#   1. benchmarks/train_step.py at the paper's MSD Heart 2D size (batch 40 x 320 x 256): plain,
#      PGD-20 and IMA steps side by side, then one IMA epoch of 50 steps timed back to back
#      (about 1.5 minutes on one H200);
#   2. benchmarks/pyradiomics_benchmark.py: Clean / Adv / IMA nnU-Net on the real lesion
#      volumes, EPOCHS x ITERATIONS each (default 100 x 50), the three trained side by side on
#      the one GPU, then nnunet-ima-eval's 100-step PGD at L2 noise 0 / 5 / 10 / 20. On one H200,
#      15 x 40 on 128 x 128 crops took 5.3 minutes (IMA 16.8 s per epoch of 40 iterations), so
#      expect the better part of an hour for the default schedule.
#
#   bash benchmarks/gpu_benchmarks.sh [RESULTS_DIR] [PYRADIOMICS_WORKDIR]
#
# RESULTS_DIR (default gpu_results) receives the printed outputs and the robustness tables.
set -euo pipefail
results=$(realpath -m "${1:-gpu_results}")
workdir=$(realpath -m "${2:-runs/pyradiomics_gpu}")
cd "$(dirname "$0")/.."
mkdir -p "$results"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$results/gpu.txt"
python benchmarks/train_step.py --plan heart --device cuda --warmup-steps 100 --epoch-iterations 50 \
    | tee "$results/train_step_heart.txt"
python benchmarks/pyradiomics_benchmark.py --workdir "$workdir" --device cuda --jobs 3 \
    --epochs "${EPOCHS:-100}" --iterations "${ITERATIONS:-50}" | tee "$results/pyradiomics.txt"
cp "$workdir"/robustness/{tvdi.md,adi.md,summary.json,curves.png} "$results/"
