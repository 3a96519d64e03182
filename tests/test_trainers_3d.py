"""Vanilla adversarial training in nnU-Net's 3D configuration, end to end; IMA refuses it.

``nnUNetTrainerAdv`` attacks whatever patch nnU-Net's data loader gives it, so ``3d_fullres``
trains with one L2 budget per patch (a whole volume of the tiny fixture), and the 3D evaluator
audits the model it gives; IMA keeps its margins per 2D slice and says so when asked to train 3D.
"""
import csv
import json
import os

import pytest
import torch

from conftest import _bin, train


def test_adv_trains_3d_fullres_end_to_end(nnunet_workspace_3d):
    ws = nnunet_workspace_3d
    train(ws, "nnUNetTrainerAdv",
          {"num_epochs": 2, "num_iterations_per_epoch": 2, "num_val_iterations_per_epoch": 1,
           "adv_eps": 5.0, "pgd_steps": 2, "seed": 0}, configuration="3d_fullres")
    fold = os.path.join(ws.model_folder("nnUNetTrainerAdv", "3d_fullres"), "fold_0")
    checkpoint = torch.load(os.path.join(fold, "checkpoint_final.pth"), map_location="cpu",
                            weights_only=False)
    assert checkpoint["trainer_name"] == "nnUNetTrainerAdv"
    convs = [w for k, w in checkpoint["network_weights"].items()
             if k.endswith("conv.weight") and w.ndim == 5]
    assert convs, "a 3D network has 5-D convolution kernels"
    # nnU-Net's own validation ran on the held-out cases with the 3D predictor
    assert os.path.isfile(os.path.join(fold, "validation", "summary.json"))
    with open(os.path.join(fold, "ima_stats.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    for row in rows:
        # every patch of every step was attacked at the configured budget
        assert float(row["fraction_attacked"]) == 1.0 and float(row["adv_eps"]) == 5.0
        assert 0.0 <= float(row["adv_dice"]) <= 1.0
    # the 3D evaluator audits it: one sample per held-out case, per-case Dice as nnU-Net's
    out = os.path.join(ws.root, "adv_3d_audit")
    ws.run([_bin("nnunet-ima-eval"), "-d", str(ws.dataset_id), "-c", "3d_fullres", "-tr",
            "nnUNetTrainerAdv", "-f", "0", "--cases", "val", "--noise", "0", "5", "--steps", "2",
            "--device", "cpu", "--no-progress", "-o", out])
    with open(os.path.join(out, "summary.json")) as f:
        levels = json.load(f)["models"]["nnUNetTrainerAdv"]["noise"]
    with open(os.path.join(ws.preprocessed, ws.dataset_name, "splits_final.json")) as f:
        validation = json.load(f)[0]["val"]
    for level in ("0", "5"):
        per_case = levels[level]["nnunet_per_case"]["metric_per_case"]
        assert [c["case"] for c in per_case] == validation
        assert levels[level]["n_cases"] == len(validation)
    assert levels["5"]["tvdi"] <= levels["0"]["tvdi"] + 1e-9


def test_ima_refuses_3d_configurations_and_names_the_2d_command(nnunet_workspace_3d):
    ws = nnunet_workspace_3d
    result = train(ws, "nnUNetTrainerIMA",
                   {"num_epochs": 1, "num_iterations_per_epoch": 1,
                    "num_val_iterations_per_epoch": 1}, check=False, configuration="3d_fullres")
    assert result.returncode != 0
    assert "trains nnU-Net's 2D configuration only" in result.stderr
    assert f"nnUNetv2_train DATASET 2d FOLD -tr nnUNetTrainerIMA" in result.stderr
    assert not os.path.exists(ws.model_folder("nnUNetTrainerIMA", "3d_fullres"))


@pytest.mark.parametrize("trainer", ["nnUNetTrainerTRADES", "nnUNetTrainerNFGSM"])
def test_the_baselines_train_3d_fullres_end_to_end(nnunet_workspace_3d, trainer):
    ws = nnunet_workspace_3d
    train(ws, trainer, {"num_epochs": 1, "num_iterations_per_epoch": 1,
                        "num_val_iterations_per_epoch": 1, "adv_eps": 5.0, "pgd_steps": 1,
                        "seed": 0}, configuration="3d_fullres")
    fold = os.path.join(ws.model_folder(trainer, "3d_fullres"), "fold_0")
    assert os.path.isfile(os.path.join(fold, "checkpoint_final.pth"))
    assert os.path.isfile(os.path.join(fold, "validation", "summary.json"))
