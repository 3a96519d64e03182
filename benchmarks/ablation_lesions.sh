#!/usr/bin/env bash
# The ablation of `nnunet-ima ablation` on real lesions: the five CT / MR volumes of the
# pyradiomics-bhklab 3.1.4 source archive, built and split by pyradiomics_benchmark.py (64-voxel
# crops, "halves" split: the first part of every volume trains, the second part is the test set).
# Clean, Adv at eps 5 / 10 / 20 and IMA (authors recipe) at eps_max 20; 8 epochs x 25
# iterations, seed 0, PGD-3 in training; 100-step PGD and APGD at L2 noise 0 / 5 / 10 / 20 on 8
# test lesion slices. With this split the validation cases are the test cases, so nothing is
# chosen on this data: it only reports. About an hour on 2 CPU cores.
# Usage: bash benchmarks/ablation_lesions.sh [WORKDIR] [extra nnunet-ima ablation options]
set -euo pipefail
work=$(realpath -m "${1:-runs/pyradiomics}")
shift || true
python "$(dirname "$0")/pyradiomics_benchmark.py" --workdir "$work" --stop-after preprocess
export nnUNet_raw="$work/nnUNet_raw" nnUNet_preprocessed="$work/nnUNet_preprocessed"
export nnUNet_results="$work/nnUNet_results" nnUNet_def_n_proc=1
export nnUNet_extTrainer=$(nnunet-ima trainer-dir)
nnunet-ima ablation -d 991 --workdir "$work/ablation" \
  --variants clean ima_authors adv --adv-eps 5 10 20 --eps-max 20 \
  --epochs 8 --iterations 25 --pgd-steps 3 --noise 0 5 10 20 --cases test --max-slices 8 "$@"
