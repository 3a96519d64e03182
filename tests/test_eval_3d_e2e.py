"""Auditing a ``3d_fullres`` model of plain nnU-Net end to end, and its noise-0 scores against
``nnUNetv2_predict`` + ``nnUNetv2_evaluate_folder``, voxel for voxel.

The model is trained by a trainer class that ships with nnunetv2 (``nnUNetTrainer_1epoch``)
through nnU-Net's own training entry (``get_trainer_from_args`` and ``run_training``, what
``nnUNetv2_train`` calls), cut to two iterations so that the test fits CI; ``nnUNet_extTrainer``
is unset everywhere, so no trainer of this package is involved and the model folder has no
training record. The workspace (``nnunet_workspace_3d``) keeps nnU-Net's voxel grid: 1 mm
isotropic at the target spacing and no crop, so the preprocessed cases the evaluator scores are
the raw images voxel for voxel, and nnU-Net's raw-space evaluation counts the same voxels.

Both sides run without test-time mirroring (``--disable_tta``, ``--disable-tta``): with it the
comparison holds as well (checked when this test was written, at four times the CPU time), and
the 3D mirrored passes are compared with nnU-Net's bit for bit in ``test_predictor_path_3d``.
"""
import dataclasses
import json
import math
import os
import shutil
import sys

import pytest

from conftest import _bin

TRAINER = "nnUNetTrainer_1epoch"  # nnunetv2.training.nnUNetTrainer.variants.training_length
NOISE = "6"

TRAIN_SCRIPT = """
import sys
import torch
from nnunetv2.run.run_training import get_trainer_from_args

if __name__ == "__main__":
    trainer = get_trainer_from_args(sys.argv[1], "3d_fullres", 0, sys.argv[2], "nnUNetPlans",
                                    device=torch.device("cpu"))
    trainer.num_iterations_per_epoch = 2
    trainer.num_val_iterations_per_epoch = 1
    trainer.run_training()
"""


def _run(ws, args):
    """``args`` in the workspace's environment without ``nnUNet_extTrainer``: plain nnU-Net."""
    plain = {k: v for k, v in ws.env.items() if k != "nnUNet_extTrainer"}
    return dataclasses.replace(ws, env=plain).run(args)


@pytest.fixture(scope="module")
def plain_3d_model(nnunet_workspace_3d, tmp_path_factory):
    ws = nnunet_workspace_3d
    script = tmp_path_factory.mktemp("train") / "train_plain.py"
    script.write_text(TRAIN_SCRIPT)
    _run(ws, [sys.executable, str(script), str(ws.dataset_id), TRAINER])
    folder = ws.model_folder(TRAINER, "3d_fullres")
    assert os.path.isfile(os.path.join(folder, "fold_0", "checkpoint_final.pth"))
    assert not os.path.exists(os.path.join(folder, "fold_0", "training_cases.json"))
    return ws


def _val_cases(ws):
    with open(os.path.join(ws.preprocessed, ws.dataset_name, "splits_final.json")) as f:
        return json.load(f)[0]["val"]


def _nnunet_summary(ws, cases, root):
    """``nnUNetv2_predict`` (fold 0, final checkpoint, step 0.5, no mirroring) on the raw images
    of ``cases``, then ``nnUNetv2_evaluate_folder`` against their raw labels: its
    summary.json."""
    raw = os.path.join(ws.raw, ws.dataset_name)
    images, labels, predictions = (os.path.join(root, n) for n in ("images", "labels", "pred"))
    for folder in (images, labels):
        os.makedirs(folder)
    for case in cases:
        shutil.copy(os.path.join(raw, "imagesTr", f"{case}_0000.nii.gz"), images)
        shutil.copy(os.path.join(raw, "labelsTr", f"{case}.nii.gz"), labels)
    _run(ws, [_bin("nnUNetv2_predict"), "-i", images, "-o", predictions, "-d",
              str(ws.dataset_id), "-c", "3d_fullres", "-tr", TRAINER, "-f", "0", "-chk",
              "checkpoint_final.pth", "-step_size", "0.5", "--disable_tta", "-device", "cpu",
              "-npp", "1", "-nps", "1"])
    _run(ws, [_bin("nnUNetv2_evaluate_folder"), labels, predictions, "-djfile",
              os.path.join(predictions, "dataset.json"), "-pfile",
              os.path.join(predictions, "plans.json"), "-np", "1"])
    with open(os.path.join(predictions, "summary.json")) as f:
        return json.load(f)


def _evaluate(ws, out, *extra):
    return _run(ws, [_bin("nnunet-ima-eval"), "-d", str(ws.dataset_id), "-c", "3d_fullres",
                     "-tr", TRAINER, "-f", "0", "--noise", "0", NOISE, "--steps", "2",
                     "--device", "cpu", "--no-progress", "-o", str(out), *extra])


def _same(ours, nnunet):
    """A Dice of ours (``None`` for nnU-Net's NaN) against nnU-Net's."""
    if ours is None:
        return isinstance(nnunet, float) and math.isnan(nnunet)
    return ours == nnunet


def test_a_plain_3d_model_scores_as_nnunet_predicts_and_evaluates(plain_3d_model, tmp_path):
    ws = plain_3d_model
    cases = _val_cases(ws)
    reference = _nnunet_summary(ws, cases, str(tmp_path / "nnunet"))
    out = tmp_path / "predictor"
    _evaluate(ws, out, "--cases", "val", "--inference", "predictor", "--tile-step-size", "0.5",
              "--disable-tta")
    for name in ("summary.json", "per_slice.csv", "tvdi.md", "adi.md", "curves.png",
                 "examples.png"):
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "summary.json").read_text())
    entry = summary["models"][TRAINER]
    clean = entry["noise"]["0"]
    assert clean["n_cases"] == len(cases) == clean["n_slices"]
    ours = clean["nnunet_per_case"]
    # Case by case and class by class, the counts and Dice of nnU-Net's own pipeline.
    by_case = {os.path.basename(c["prediction_file"])[:-len(".nii.gz")]: c["metrics"]
               for c in reference["metric_per_case"]}
    assert [c["case"] for c in ours["metric_per_case"]] == cases and set(by_case) == set(cases)
    labels = {"organ": "1", "lesion": "2"}
    for case_entry in ours["metric_per_case"]:
        theirs = by_case[case_entry["case"]]
        for name, label in labels.items():
            mine = case_entry["metrics"][name]
            assert (mine["TP"], mine["FP"], mine["FN"]) == \
                (theirs[label]["TP"], theirs[label]["FP"], theirs[label]["FN"]), (case_entry, name)
            assert _same(mine["Dice"], theirs[label]["Dice"]), (case_entry, name)
    for name, label in labels.items():
        assert _same(ours["mean"][name]["Dice"], reference["mean"][label]["Dice"]), name
    assert _same(ours["foreground_mean"]["Dice"], reference["foreground_mean"]["Dice"])
    # The attacked level is scored per case too; the budget is the volume's.
    assert entry["noise"][NOISE]["n_cases"] == len(cases)
    assert "nnunet_per_case" in entry["noise"][NOISE]
    assert summary["peak_memory"][TRAINER]["bytes"] > 0
    rows = (out / "per_slice.csv").read_text().splitlines()
    assert rows[0].split(",")[:4] == ["model", "noise", "case", "slice"]
    assert "nnunet_dice_organ" in rows[0] and len(rows) == 1 + 2 * len(cases)
    assert all(r.split(",")[3] == "volume" for r in rows[1:])
    # No training record (a plain trainer): the held-out check used splits_final.json, and the
    # tables say so.
    table = (out / "tvdi.md").read_text()
    assert "Each sample is a whole case" in table
    assert "no training record" in table and "splits_final.json" in table


def test_the_default_network_path_audits_raw_test_volumes_and_resumes(plain_3d_model, tmp_path):
    ws = plain_3d_model
    out = tmp_path / "network"
    raw = os.path.join(ws.raw, ws.dataset_name)
    images = ("--images", os.path.join(raw, "imagesTs"), "--labels", os.path.join(raw, "labelsTs"))
    _evaluate(ws, out, *images)
    summary = json.loads((out / "summary.json").read_text())
    levels = summary["models"][TRAINER]["noise"]
    tests = sorted(f[:-len(".nii.gz")] for f in os.listdir(os.path.join(raw, "labelsTs")))
    assert set(levels) == {"0", NOISE} and levels["0"]["n_cases"] == len(tests) == 2
    assert [c["case"] for c in levels["0"]["nnunet_per_case"]["metric_per_case"]] == tests
    assert levels[NOISE]["tvdi"] <= levels["0"]["tvdi"] + 0.01
    for name in ("curves.png", "examples.png", "per_slice.csv"):
        assert (out / name).stat().st_size > 0, name
    # The same command again resumes from the parts (one per model and noise level).
    again = _evaluate(ws, out, *images)
    assert "resuming: reused 2 of 2" in again.stdout
    resumed = json.loads((out / "summary.json").read_text())
    summary.pop("peak_memory"), resumed.pop("peak_memory")
    assert resumed == summary
