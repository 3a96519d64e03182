"""nnunet-ima-eval's ensemble, masking checks and predictor path on a really trained model."""
import csv
import json
import os

import numpy as np
import pytest
import torch

from nnunet_ima.evaluation import run
from nnunet_ima.evaluation.cli import main

MEMBERS = ("pgd", "segpgd", "apgd-js")


def _args(ws, out, *extra):
    return ["-d", str(ws.dataset_id), "-c", "2d", "-f", "0", "-tr", "nnUNetTrainerClean",
            "--device", "cpu", "--no-progress", "-o", str(out), *extra]


def _without_seconds(summary):
    summary = json.loads(json.dumps(summary))
    summary["ensemble"].pop("seconds")
    summary.pop("peak_memory")  # a measurement too
    return summary


def test_ensemble_worst_case_is_never_above_a_member_and_resumes(nnunet_workspace,
                                                                 trained_clean_model, tmp_path,
                                                                 monkeypatch, capsys):
    ws = nnunet_workspace
    common = ("--attack", "ensemble", "--ensemble", *MEMBERS, "--noise", "0", "3", "8",
              "--max-slices", "5", "--steps", "4", "--masking-checks", "off")
    assert main(_args(ws, tmp_path / "full", *common)) == 0
    summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    model = "nnUNetTrainerClean"
    headline = summary["models"][model]["noise"]
    members = summary["ensemble"]["per_attack"][model]
    assert list(members) == list(MEMBERS)
    for noise in ("0", "3", "8"):
        for member, entry in members.items():
            assert headline[noise]["tvdi"] <= entry["noise"][noise]["tvdi"] + 1e-12, (noise, member)
            assert headline[noise]["adi"] <= entry["noise"][noise]["adi"] + 1e-12, (noise, member)
    assert headline["8"]["tvdi"] < headline["0"]["tvdi"]
    attacked = summary["ensemble"]["attacked"][model]
    assert attacked["3"]["pgd"] == 5 and attacked["0"] == {m: 0 for m in MEMBERS}
    assert all(attacked[n][m] <= 5 for n in ("3", "8") for m in MEMBERS)
    table = (tmp_path / "full" / "tvdi.md").read_text()
    assert "per-slice worst case of pgd, segpgd, apgd-js" in table
    assert all(f"| {model} | {m} |" in table for m in MEMBERS) and "| worst case |" in table
    # One part per (noise, member) with a clean pass shared at noise 0: 1 + 2 x 3.
    assert len(os.listdir(tmp_path / "full" / "parts")) == 7

    # Killed while saving the fourth member result: the rerun recomputes only what is missing.
    original = run.save_part
    calls = []

    def crash_on_fourth(*a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return original(*a, **k)
    monkeypatch.setattr(run, "save_part", crash_on_fourth)
    assert main(_args(ws, tmp_path / "resumed", *common)) == 130
    monkeypatch.setattr(run, "save_part", original)
    capsys.readouterr()
    assert main(_args(ws, tmp_path / "resumed", *common)) == 0
    assert "resuming: reused 3 (model, noise, attack) results" in capsys.readouterr().out
    resumed = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    assert _without_seconds(resumed) == _without_seconds(summary)
    # Another member list is another configuration: refused, not mixed.
    assert main(_args(ws, tmp_path / "resumed", "--attack", "ensemble", "--ensemble", "pgd",
                      "--noise", "0", "3", "8", "--max-slices", "5", "--steps", "4",
                      "--masking-checks", "off")) == 2


def test_masking_checks_stay_silent_on_a_trained_model(nnunet_workspace, trained_clean_model,
                                                       tmp_path):
    ws = nnunet_workspace
    assert main(_args(ws, tmp_path / "out", "--noise", "0", "3", "6", "--max-slices", "4",
                      "--steps", "10", "--masking-checks", "on", "--masking-slices", "3",
                      "--masking-queries", "100")) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    checks = summary["masking_checks"]["nnUNetTrainerClean"]
    assert checks["warnings"] == [], checks
    assert checks["unbounded"]["tvdi"] < 0.05 and checks["black_box"]["slices"] == 3
    assert "Gradient-masking checks that fired" not in (tmp_path / "out" / "tvdi.md").read_text()


def test_predictor_inference_scores_what_nnunet_predicts(nnunet_workspace, trained_clean_model,
                                                         tmp_path):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    ws = nnunet_workspace
    out = tmp_path / "predictor"
    assert main(_args(ws, out, "--inference", "predictor", "--noise", "0", "3", "--steps", "3",
                      "--max-slices", "4")) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["inference"] == {"path": "predictor", "tile_step_size": 0.5, "mirroring": True}
    assert "through nnU-Net's predictor (tile step 0.5, mirroring)" in (out / "tvdi.md").read_text()
    with open(out / "per_slice.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["noise"] == "0"]
    # Independently: nnU-Net's predictor on the whole preprocessed case, Dice of each slice.
    predictor = nnUNetPredictor(device=torch.device("cpu"), perform_everything_on_device=False,
                                allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(trained_clean_model, (0,), "checkpoint_final.pth")
    folder = os.path.join(ws.preprocessed, ws.dataset_name, "nnUNetPlans_2d")
    for row in rows:
        data, seg, _, _ = infer_dataset_class(folder)(folder).load_case(row["case"])
        logits = predictor.predict_logits_from_preprocessed_data(torch.from_numpy(np.asarray(data)))
        pred = logits.argmax(0)[int(row["slice"])].numpy()
        label = np.asarray(seg)[0, int(row["slice"])]
        for c, name in ((1, "organ"), (2, "lesion")):
            p, g = pred == c, label == c
            denominator = p.sum() + g.sum()
            expected = 1.0 if denominator == 0 else 2 * (p & g).sum() / denominator
            assert float(row[f"dice_{name}"]) == pytest.approx(expected, abs=1e-6)

