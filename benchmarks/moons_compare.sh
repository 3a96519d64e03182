#!/usr/bin/env bash
# The paper's Moons comparison of all eight methods: 20000 / 2000 / 2000 points, the MLP, 30
# epochs, batch 128, Adam, every method trained at L2 eps 0.3 (IMA: eps_max 0.3), then 100-step
# PGD (cross-entropy and margin loss, worst case) under L2 and Linf noise 0 ... 0.3 on the 2000
# test points. The methods train in two processes (one per CPU core) into one folder; the last
# call trains and attacks nothing and writes the tables and curves of all eight.
# Usage: bash benchmarks/moons_compare.sh [OUT]   (about 40 minutes on 2 CPU cores)
set -euo pipefail
out=${1:-runs/moons_compare}
mkdir -p "$out"
common=(--dataset moons -o "$out" --device cpu --num-threads 1 --no-progress --eval-norms l2 linf)
nnunet-ima-classify compare "${common[@]}" --methods ce adv ima trades mma > "$out.part1.log" 2>&1 &
first=$!
nnunet-ima-classify compare "${common[@]}" --methods ddn fat gairat > "$out.part2.log" 2>&1
wait "$first"
nnunet-ima-classify compare "${common[@]}"
