#!/usr/bin/env bash
# The evaluator's worst case and its inference paths on trained models: for the model folders
# given, nnunet-ima-eval with
#   1. PGD alone (Dice + CE) on the network,
#   2. --attack ensemble (PGD, SegPGD, APGD with SEA's three losses) on the network, with the
#      gradient-masking checks,
#   3. PGD through nnU-Net's predictor (--inference predictor: sliding window, Gaussian
#      weights, mirroring), beside 1,
# each in OUT/{pgd,ensemble,pgd_predictor}; then prints the three TVDI tables. Every run
# resumes. The nnUNet_* variables must point at the models' dataset (the demo's or the
# real-lesion benchmark's folders).
# Usage: bash benchmarks/ensemble_eval.sh OUT NOISE_LEVELS STEPS SLICES MODEL_FOLDER...
#   e.g. bash benchmarks/ensemble_eval.sh runs/ensemble_demo "0 4 8 16" 20 8 \
#          nnunet_ima_demo/nnUNet_results/Dataset990_SyntheticOrgan/nnUNetTrainer*__nnUNetPlans__2d
set -euo pipefail
out=$1; noise=$2; steps=$3; slices=$4
mkdir -p "$out"
shift 4
export nnUNet_extTrainer=${nnUNet_extTrainer:-$(nnunet-ima trainer-dir)}
common=(-m "$@" --noise $noise --steps "$steps" --max-slices "$slices" --cases test
        --device cpu --no-progress)
nnunet-ima-eval "${common[@]}" -o "$out/pgd" > "$out.pgd.log" 2>&1 || { cat "$out.pgd.log"; exit 1; }
nnunet-ima-eval "${common[@]}" --attack ensemble -o "$out/ensemble" > "$out.ensemble.log" 2>&1 \
  || { cat "$out.ensemble.log"; exit 1; }
nnunet-ima-eval "${common[@]}" --inference predictor -o "$out/pgd_predictor" \
  > "$out.predictor.log" 2>&1 || { cat "$out.predictor.log"; exit 1; }
for run in pgd ensemble pgd_predictor; do
  echo "== $run"; cat "$out/$run/tvdi.md"
done
grep -h "warning" "$out.ensemble.log" || echo "no gradient-masking check fired"
