"""The trainers in nnU-Net's real pipeline: nnUNetv2_train, --c after kill -9, nnUNetv2_predict."""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch

from conftest import _bin, train
from nnunet_ima.nnunet.margin_checkpoint import margins_path
from nnunet_ima.margins import MarginStore

TINY_IMA = {"num_epochs": 2, "num_iterations_per_epoch": 3, "num_val_iterations_per_epoch": 1,
            "pgd_steps": 3, "binary_steps": 3, "eps_max": 10.0, "seed": 0}
# Long enough for the network to segment some slices correctly, so that BPGD runs on them.
SHORT_IMA = dict(TINY_IMA, num_epochs=5, num_iterations_per_epoch=8, eps_max=20.0)
TINY_ADV = {"num_epochs": 2, "num_iterations_per_epoch": 3, "num_val_iterations_per_epoch": 1,
            "pgd_steps": 3, "adv_eps": 5.0, "seed": 0}


def _stats_rows(fold: str):
    with open(os.path.join(fold, "ima_stats.csv"), newline="") as f:
        return list(csv.DictReader(f))


def _predict(ws, trainer: str, tmp_path) -> list:
    """Run nnUNetv2_predict on the two held-out cases; returns the written file names."""
    with open(os.path.join(ws.preprocessed, ws.dataset_name, "test_cases.json")) as f:
        cases = json.load(f)["test"]
    inp, out = tmp_path / f"in_{trainer}", tmp_path / f"out_{trainer}"
    inp.mkdir()
    for case in cases:
        shutil.copy(os.path.join(ws.raw, ws.dataset_name, "imagesTr", f"{case}_0000.nii.gz"), inp)
    ws.run([_bin("nnUNetv2_predict"), "-i", str(inp), "-o", str(out), "-d", str(ws.dataset_id),
            "-c", "2d", "-f", "0", "-tr", trainer, "-chk", "checkpoint_final.pth",
            "-npp", "0", "-nps", "0", "-device", "cpu", "--disable_tta"])
    return sorted(f for f in os.listdir(out) if f.endswith(".nii.gz")), cases


def test_ima_trains_saves_margins_and_predicts(nnunet_workspace, tmp_path):
    ws = nnunet_workspace
    train(ws, "nnUNetTrainerIMA", SHORT_IMA)
    fold = os.path.join(ws.model_folder("nnUNetTrainerIMA"), "fold_0")

    with open(os.path.join(fold, "ima_config.json")) as f:
        saved = json.load(f)
    assert saved["eps_max"] == 20.0 and saved["pgd_steps"] == 3 and saved["dice_threshold"] == 0.6

    with open(margins_path(os.path.join(fold, "checkpoint_final.pth"))) as f:
        state = json.load(f)["states"][-1]
    assert state["current_epoch"] == 5
    store = MarginStore.from_state_dict(state["margins"])
    # 5 epochs x 8 iterations x batch 6 = 240 samples of the 5 x 16 training slices.
    assert 20 <= len(store) <= 80
    cases = {case for case, _ in store.keys()}
    slices = {s for _, s in store.keys()}
    assert cases <= {f"syntheticorgan_{i:03d}" for i in range(8)}
    assert slices <= set(range(16))
    # nnUNetTrainerIMA defaults to the authors recipe: delta = eps_max / 10, not / num_epochs.
    assert store.initial == pytest.approx(20.0 / 10)
    values = store.values()
    assert (values > store.initial).any(), "no slice survived its budget: nothing expanded"
    assert (values < store.initial).any(), "no slice crossed or was wrong: nothing shrank"
    assert values.max() <= 20.0

    rows = _stats_rows(fold)
    assert [int(r["epoch"]) for r in rows] == list(range(5))
    assert float(rows[-1]["fraction_clean_correct"]) > 0.1
    assert any(float(r["fraction_crossed"]) > 0 for r in rows)  # BPGD reached the boundary
    assert float(rows[-1]["margin_mean"]) == pytest.approx(float(store.values().mean()), rel=1e-4)
    assert os.path.isfile(os.path.join(fold, "margins_hist.png"))
    assert not os.path.exists(os.path.join(fold, "checkpoint_latest.pth"))

    written, cases = _predict(ws, "nnUNetTrainerIMA", tmp_path)
    assert written == sorted(f"{c}.nii.gz" for c in cases)


def test_adv_trains_and_predicts(nnunet_workspace, tmp_path):
    ws = nnunet_workspace
    train(ws, "nnUNetTrainerAdv", TINY_ADV)
    fold = os.path.join(ws.model_folder("nnUNetTrainerAdv"), "fold_0")
    rows = _stats_rows(fold)
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    assert all(float(r["adv_eps"]) == 5.0 for r in rows)
    # Every sample is attacked: an adversarial Dice is measured in every epoch.
    assert all(0.0 <= float(r["adv_dice"]) <= 1.0 for r in rows)
    with open(os.path.join(fold, "ima_config.json")) as f:
        assert json.load(f)["adv_eps"] == 5.0
    written, cases = _predict(ws, "nnUNetTrainerAdv", tmp_path)
    assert written == sorted(f"{c}.nii.gz" for c in cases)


def _checkpoint_epoch(path: str) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=False)["current_epoch"])


def test_ima_continues_after_kill_with_the_saved_margins(nnunet_workspace):
    """kill -9 during training, then --c: the margins are those saved with the checkpoint."""
    ws = nnunet_workspace
    trainer = "nnUNetTrainerIMA_eps15"
    config = dict(TINY_IMA, num_epochs=6, eps_max=15.0)
    config_path = ws.write_config("kill.json", config)
    fold = os.path.join(ws.model_folder(trainer), "fold_0")
    latest = os.path.join(fold, "checkpoint_latest.pth")
    env = dict(ws.env, NNUNET_IMA_CONFIG=config_path)
    command = [_bin("nnUNetv2_train"), str(ws.dataset_id), "2d", "0", "-tr", trainer,
               "-device", "cpu"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, cwd=ws.root, start_new_session=True)
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            if os.path.isfile(latest) and _safe_epoch(latest) >= 2:
                break
            assert process.poll() is None, "training ended before it could be killed"
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        process.wait()

    epoch = _checkpoint_epoch(latest)
    assert 2 <= epoch < 6
    with open(margins_path(latest)) as f:
        saved = [s for s in json.load(f)["states"] if s["current_epoch"] == epoch]
    assert len(saved) == 1

    # Continue in-process exactly as nnUNetv2_train --c does, and compare the restored margins.
    from nnunetv2.run.run_training import get_trainer_from_args, maybe_load_checkpoint
    os.environ["NNUNET_IMA_CONFIG"] = config_path
    try:
        trainer_obj = get_trainer_from_args(str(ws.dataset_id), "2d", 0, trainer,
                                            continue_training=True, device=torch.device("cpu"))
        maybe_load_checkpoint(trainer_obj, True, False, None)
    finally:
        del os.environ["NNUNET_IMA_CONFIG"]
    assert trainer_obj.current_epoch == epoch
    assert trainer_obj.margins.state_dict() == saved[0]["margins"]
    assert trainer_obj.ima.eps_max == 15.0

    # And the real command finishes the run; without NNUNET_IMA_CONFIG it reuses ima_config.json.
    ws.run(command + ["--c"])
    rows = _stats_rows(fold)
    assert [int(r["epoch"]) for r in rows] == list(range(6))
    assert os.path.isfile(os.path.join(fold, "checkpoint_final.pth"))
    assert not os.path.exists(margins_path(latest))


def _safe_epoch(path: str) -> int:
    try:
        return _checkpoint_epoch(path)
    except Exception:  # being written / renamed right now
        return -1


@pytest.mark.parametrize("config, message", [
    ({"eps_max": 10.0, "learning_rate": 1}, "unknown trainer option(s) ['learning_rate']"),
    ({"eps_max": 0}, "eps_max must be a finite number > 0"),
    ({"dice_threshold": 1.5}, "dice_threshold must lie strictly between 0 and 1"),
])
def test_bad_settings_stop_before_training(nnunet_workspace, config, message):
    ws = nnunet_workspace
    result = train(ws, "nnUNetTrainerIMA_eps40", config, check=False)
    assert result.returncode != 0
    # The message stands in a paragraph of its own before nnU-Net's traceback.
    paragraph = result.stderr.split("Traceback")[0]
    assert "nnUNetTrainerIMA_eps40 cannot start" in paragraph and message in paragraph
    assert "nnunet-ima check-config FILE -tr nnUNetTrainerIMA_eps40" in paragraph
    fold = os.path.join(ws.model_folder("nnUNetTrainerIMA_eps40"), "fold_0")
    # Nothing is left of the start: no checkpoint, no log file with only nnU-Net's banner.
    left = os.listdir(fold) if os.path.isdir(fold) else []
    assert not [f for f in left if f.endswith(".pth") or f.startswith("training_log")], left


def test_3d_configuration_is_refused(nnunet_workspace):
    ws = nnunet_workspace
    result = ws.run([_bin("nnUNetv2_train"), str(ws.dataset_id), "3d_fullres", "0", "-tr",
                     "nnUNetTrainerIMA", "-device", "cpu"], check=False)
    assert result.returncode != 0
    assert "trains nnU-Net's 2D configuration only" in result.stderr.split("Traceback")[0]
    fold = os.path.join(ws.results, ws.dataset_name, "nnUNetTrainerIMA__nnUNetPlans__3d_fullres",
                        "fold_0")
    assert not os.path.isdir(fold) or not [f for f in os.listdir(fold)
                                           if f.startswith("training_log")]
