#!/usr/bin/env bash
# The ablation of `nnunet-ima ablation` on the demo's data: the synthetic organ + lesion dataset
# that `nnunet-ima demo` builds (10 cases of 16 x 48 x 48, 2 held out as test cases; fold 0
# trains on 6 and validates on 2), the demo's schedule (10 epochs x 10 iterations, seed 0,
# learning rate 0.02, PGD-5 in training), Adv at eps 4 / 8 / 16 and every IMA variant at
# eps_max 16. Every model is attacked with 100-step PGD and APGD at L2 noise 0 / 4 / 8 / 16 on
# the validation cases (where the default is chosen) and on the test cases (reported only).
# Usage: bash benchmarks/ablation_demo.sh [WORKDIR] [extra nnunet-ima ablation options]
# Rerunning resumes: trained models and finished evaluations are reused.
set -euo pipefail
work=$(realpath -m "${1:-runs/ablation_demo}")
shift || true
mkdir -p "$work"
export nnUNet_raw="$work/nnUNet_raw" nnUNet_preprocessed="$work/nnUNet_preprocessed"
export nnUNet_results="$work/nnUNet_results" nnUNet_def_n_proc=1
export nnUNet_extTrainer=$(nnunet-ima trainer-dir)
mkdir -p "$nnUNet_raw" "$nnUNet_preprocessed" "$nnUNet_results"
if [ ! -d "$nnUNet_raw/Dataset990_SyntheticOrgan" ]; then
  nnunet-ima make-synthetic -d 990 --cases 10
fi
if [ ! -d "$nnUNet_preprocessed/Dataset990_SyntheticOrgan/nnUNetPlans_2d" ]; then
  nnUNetv2_plan_and_preprocess -d 990 -c 2d -npfp 1 -np 1 --verify_dataset_integrity
fi
nnunet-ima split -d 990 --test 2 --seed 0
nnunet-ima ablation -d 990 --workdir "$work/ablation" --initial-lr 0.02 \
  --adv-eps 4 8 16 --eps-max 16 --noise 0 4 8 16 --cases val test "$@"
