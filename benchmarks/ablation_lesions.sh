#!/usr/bin/env bash
# The ablation of `nnunet-ima ablation` on real lesions: the five CT / MR volumes of the
# pyradiomics-bhklab 3.1.4 source archive, built and split by pyradiomics_benchmark.py (64-voxel
# crops, "halves" split: the first part of every volume trains, the second part is the test set).
# Three seeds. Clean trains from scratch (10 epochs x 20 iterations); the adversarial models
# fine-tune each seed's clean model for 3 epochs with PGD-3: Adv at eps 4 and at eps_max 8
# (ft_adv_max, the control IMA degenerates to), N-FGSM at eps 4, and IMA with the authors'
# recipe at eps_max 8 (add ft_trades to --variants for TRADES at eps 4). Every model is attacked
# with 30-step PGD and APGD at L2 noise 0 / 2 / 4 / 8 on 12 test lesion slices. With this split the validation cases are the test
# cases, so nothing is chosen on this data: it only reports.
# Usage: bash benchmarks/ablation_lesions.sh [WORKDIR] [extra nnunet-ima ablation options]
# Rerunning resumes: trained models and finished evaluations are reused.
set -euo pipefail
work=$(realpath -m "${1:-runs/pyradiomics}")
shift || true
python "$(dirname "$0")/pyradiomics_benchmark.py" --workdir "$work" --stop-after preprocess
export nnUNet_raw="$work/nnUNet_raw" nnUNet_preprocessed="$work/nnUNet_preprocessed"
export nnUNet_results="$work/nnUNet_results" nnUNet_def_n_proc=1
export nnUNet_extTrainer=$(nnunet-ima trainer-dir)
nnunet-ima ablation -d 991 --workdir "$work/ablation" --seeds 0 1 2 \
  --variants clean ft_adv ft_adv_max ft_nfgsm ft_ima --epochs 10 --iterations 20 \
  --baseline-eps 4 --eps-max 8 --pgd-steps 3 --finetune-epochs 3 \
  --noise 0 2 4 8 --eval-steps 30 --max-slices 12 --cases test "$@"
