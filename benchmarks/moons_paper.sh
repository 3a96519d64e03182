#!/usr/bin/env bash
# The paper's Moons setting: 20000 / 2000 / 2000 points, the MLP, 30 epochs, batch 128, Adam;
# ce, vanilla adversarial training at eps 0.3 and IMA with eps_max 0.3 (all L2), evaluated with
# 100-step PGD (cross-entropy and margin loss, worst case) under Linf and L2 noise 0 ... 0.3.
# Usage: bash benchmarks/moons_paper.sh [OUT]   (about 15 minutes on 2 CPU cores)
set -euo pipefail
out=${1:-runs/moons_paper}
mkdir -p "$out"
nnunet-ima-classify train --dataset moons --method ce -o "$out/ce" --device cpu --no-progress
nnunet-ima-classify train --dataset moons --method adv --eps 0.3 -o "$out/adv0.3" --device cpu --no-progress
nnunet-ima-classify train --dataset moons --method ima --eps-max 0.3 -o "$out/ima" --device cpu --no-progress
for norm in linf l2; do
  nnunet-ima-classify eval "$out/ce" "$out/adv0.3" "$out/ima" --norm "$norm" \
    --noise 0 0.05 0.1 0.15 0.2 0.25 0.3 --device cpu -o "$out/table_$norm.md"
done
nnunet-ima-classify margins "$out/ima"
