#!/usr/bin/env bash
# Audit a 3d_fullres model trained by plain nnU-Net, and check the audit's noise-0 row against
# nnUNetv2_predict + nnUNetv2_evaluate_folder on the same test volumes. A tiny synthetic dataset
# (8 training + 2 test volumes of 16 x 32 x 32 voxels; nnU-Net keeps their voxel grid: no
# resampling, no crop), one epoch of nnunetv2's own nnUNetTrainer_1epoch (250 iterations,
# nnUNet_extTrainer unset: no trainer of this package), then nnunet-ima-eval through nnU-Net's
# deployed predictor (sliding window, Gaussian, mirroring) with 20-step PGD at per-volume L2
# noise 0 / 5 / 10 / 20. About 10 minutes on 2 CPU cores.
# Usage: bash benchmarks/audit_3d.sh [WORKDIR] [extra nnunet-ima-eval options]
set -euo pipefail
work=$(realpath -m "${1:-runs/audit_3d}")
shift || true
export nnUNet_raw="$work/nnUNet_raw" nnUNet_preprocessed="$work/nnUNet_preprocessed"
export nnUNet_results="$work/nnUNet_results" nnUNet_def_n_proc=1
unset nnUNet_extTrainer
mkdir -p "$nnUNet_raw" "$nnUNet_preprocessed" "$nnUNet_results"
dataset="$nnUNet_raw/Dataset997_Audit3d"
trainer=nnUNetTrainer_1epoch
[ -d "$dataset" ] || nnunet-ima make-synthetic -d 997 --name Audit3d --cases 8 --test-cases 2 \
  --shape 16 32 32 --raw "$nnUNet_raw"
[ -d "$nnUNet_preprocessed/Dataset997_Audit3d/nnUNetPlans_3d_fullres" ] || \
  nnUNetv2_plan_and_preprocess -d 997 -c 3d_fullres -npfp 1 -np 1 --verify_dataset_integrity
fold="$nnUNet_results/Dataset997_Audit3d/${trainer}__nnUNetPlans__3d_fullres/fold_0"
[ -f "$fold/checkpoint_final.pth" ] || \
  nnUNet_n_proc_DA=0 nnUNetv2_train 997 3d_fullres 0 -tr $trainer -device cpu
nnunet-ima-eval -d 997 -c 3d_fullres -tr $trainer -f 0 --images "$dataset/imagesTs" \
  --labels "$dataset/labelsTs" --inference predictor --noise 0 5 10 20 --steps 20 \
  --device cpu -o "$work/audit" "$@"
# nnU-Net's own prediction and evaluation of the same volumes
nnUNetv2_predict -i "$dataset/imagesTs" -o "$work/nnunet_predict" -d 997 -c 3d_fullres \
  -tr $trainer -f 0 -chk checkpoint_final.pth -device cpu
nnUNetv2_evaluate_folder "$dataset/labelsTs" "$work/nnunet_predict" \
  -djfile "$work/nnunet_predict/dataset.json" -pfile "$work/nnunet_predict/plans.json"
python - "$work" <<'PY'
"""The audit's noise-0 per-case Dice against nnUNetv2_evaluate_folder's, class by class."""
import json
import math
import sys

work = sys.argv[1]
audit = json.load(open(f"{work}/audit/summary.json"))
nnunet = json.load(open(f"{work}/nnunet_predict/summary.json"))
names = json.load(open(f"{work}/nnunet_predict/dataset.json"))["labels"]
label_of = {name: str(value) for name, value in names.items() if name != "background"}
entry = next(iter(audit["models"].values()))["noise"]["0"]["nnunet_per_case"]
theirs = {c["prediction_file"].split("/")[-1].split(".")[0]: c["metrics"]
          for c in nnunet["metric_per_case"]}
worst = 0.0
for case in entry["metric_per_case"]:
    for name, ours in case["metrics"].items():
        other = theirs[case["case"]][label_of[name]]["Dice"]
        mine = ours["Dice"]
        same = (mine is None and math.isnan(other)) or mine == other
        worst = max(worst, 0.0 if same else abs(mine - other))
        print(f"{case['case']} {name}: audit {mine} nnUNetv2_evaluate_folder {other}")
print(f"largest per-case Dice difference at noise 0: {worst}")
sys.exit(0 if worst == 0.0 else 1)
PY
