#!/usr/bin/env bash
# The ablation of `nnunet-ima ablation` on a real brain: Colin27 with the AAL atlas coarsened to
# six structures (benchmarks/colin27_benchmark.py builds it from `apt-get install mricron-data`;
# 14 slabs of 4 axial slices at 2 mm: 7 train, 3 validation, 4 test). Three seeds. Clean trains
# from scratch (60 epochs x 25 iterations, learning rate 0.02: the schedule under which it
# learns on a CPU); the adversarial models fine-tune each seed's clean model for 10 epochs
# (Adv at eps 10 and at eps_max 20, IMA with the authors' recipe at eps_max 20; PGD-3 in
# training), as ROG and PIR-AT cut the cost of adversarial training. Every model is attacked
# with 30-step PGD and APGD at L2 noise 0 / 10 / 20 on 12 test slices. Nothing is chosen on this
# dataset (one IMA reading), so only the test slabs are evaluated; add `--cases val test` to
# evaluate the 12 validation slices too (what `nnunet-ima ablation-summary` chooses on).
# Usage: bash benchmarks/ablation_colin27.sh [WORKDIR] [extra nnunet-ima ablation options]
# Rerunning resumes: trained models and finished evaluations are reused.
set -euo pipefail
work=$(realpath -m "${1:-runs/colin27}")
shift || true
python "$(dirname "$0")/colin27_benchmark.py" --workdir "$work" --stop-after preprocess
export nnUNet_raw="$work/nnUNet_raw" nnUNet_preprocessed="$work/nnUNet_preprocessed"
export nnUNet_results="$work/nnUNet_results" nnUNet_def_n_proc=1
export nnUNet_extTrainer=$(nnunet-ima trainer-dir)
nnunet-ima ablation -d 992 --workdir "$work/ablation" --seeds 0 1 2 \
  --variants clean ft_adv ft_ima --epochs 60 --iterations 25 --initial-lr 0.02 \
  --adv-eps 10 20 --eps-max 20 --pgd-steps 3 --finetune-epochs 10 \
  --noise 0 10 20 --eval-steps 30 --max-slices 12 --cases test "$@"
