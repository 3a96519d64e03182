#!/usr/bin/env bash
# The evaluator's presets side by side on the same trained models: for each norm (L2 and Linf)
# nnunet-ima-eval with plain PGD-100 (the unit of cost), --preset quick, standard, sea and rse,
# each in OUT/<norm>/<run>, then benchmarks/presets_compare.py prints per model and noise level
# the worst-case TVDI of each preset, standard minus sea (the issue's "no weaker than SEA's own
# protocol": at most 0.5 points above), the member that did most harm in each preset, and each
# run's wall time in multiples of PGD-100's; the standard run also records each slice's minimal
# adversarial noise (--minimal-noise). Every run resumes. The nnUNet_* variables must point
# at the models' dataset (the demo's or a benchmark's folders).
# Usage: bash benchmarks/presets_compare.sh OUT "L2_NOISE" "LINF_NOISE" SLICES MODEL_FOLDER...
#   e.g. bash benchmarks/presets_compare.sh runs/presets "0 4 8 16" "0 0.05 0.1 0.2" 12 \
#          nnunet_ima_demo/nnUNet_results/Dataset990_SyntheticOrgan/nnUNetTrainer*__nnUNetPlans__2d
#   PRESETS="quick sea" limits the presets run (default: quick standard sea rse), NORMS="linf"
#   the norms (default: l2 linf).
set -euo pipefail
out=$1; l2_noise=$2; linf_noise=$3; slices=$4
shift 4
mkdir -p "$out"
export nnUNet_extTrainer=${nnUNet_extTrainer:-$(nnunet-ima trainer-dir)}
presets=${PRESETS:-quick standard sea rse}
for norm in ${NORMS:-l2 linf}; do
  noise=$l2_noise; [ "$norm" = linf ] && noise=$linf_noise
  common=(-m "$@" --noise $noise --norm "$norm" --max-slices "$slices" --cases test
          --device cpu --no-progress)
  for run in pgd $presets; do
    target=$out/$norm/$run; mkdir -p "$out/$norm"
    if [ -f "$target/summary.json" ] && [ -f "$target/wall_seconds" ]; then continue; fi
    if [ "$run" = pgd ]; then extra=(--attack pgd --steps 100); else extra=(--preset "$run"); fi
    # Each slice's minimal noise once per norm, on the strongest grid (see README).
    if [ "$run" = standard ]; then extra+=(--minimal-noise); fi
    began=$SECONDS
    nnunet-ima-eval "${common[@]}" "${extra[@]}" -o "$target" > "$target.log" 2>&1 \
      || { cat "$target.log"; exit 1; }
    echo $((SECONDS - began)) > "$target/wall_seconds"
    echo "$norm $run: $(cat "$target/wall_seconds") s"
  done
done
python3 "$(dirname "$0")/presets_compare.py" "$out"
