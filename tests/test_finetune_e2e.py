"""Adversarial fine-tuning from a trained Clean model in nnU-Net's real pipeline
(``nnUNetv2_train``), for every trainer family and a named variant.

Each fine-tuning run trains one iteration at a learning rate of 1e-7, so its final weights stay
within ``TOLERANCE`` of the weights it started from: a weight within it of the source model came
from the source, one far from it from nnU-Net's random initialisation (another seed than the
source's). ``-pretrained_weights`` must give the source's weights but for the segmentation heads;
``finetune_from`` every weight.

The runs are ``nnUNetv2_train``'s own entry point (its argument parsing, trainer lookup and
``maybe_load_checkpoint``, which loads ``-pretrained_weights`` or the checkpoint of ``--c``)
without the final validation, which these checks do not read and which would take most of
each run's time.
"""
import json
import os
import shutil
import sys

import pytest
import torch


pytestmark = pytest.mark.slow

# One iteration (and one validation iteration), a learning rate that moves no weight by TOLERANCE
# (SGD with nesterov momentum 0.99 and gradients clipped to norm 12: at most ~3e-6 per weight).
ONE_STEP = {"num_epochs": 1, "num_iterations_per_epoch": 1, "num_val_iterations_per_epoch": 1,
            "initial_lr": 1e-7, "seed": 1}
TOLERANCE = 1e-4
# Each trainer with the keys it reads, at its cheapest attack.
TRAINERS = {
    "nnUNetTrainerClean": {},
    "nnUNetTrainerAdv": {"pgd_steps": 1, "adv_eps": 5.0},
    "nnUNetTrainerIMA": {"pgd_steps": 1, "binary_steps": 1, "eps_max": 10.0},
    "nnUNetTrainerTRADES": {"pgd_steps": 1, "adv_eps": 5.0},
    "nnUNetTrainerNFGSM_eps8": {},  # a named variant: its name sets adv_eps 8
}


# nnUNetv2_train with nnU-Net's final validation left out (see the module docstring).
NNUNET_TRAIN_WITHOUT_VALIDATION = (
    "import sys\n"
    "from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer\n"
    "nnUNetTrainer.perform_actual_validation = lambda self, *args, **kwargs: None\n"
    "from nnunetv2.run.run_training import run_training_entry\n"
    "sys.argv = ['nnUNetv2_train'] + sys.argv[1:]\n"
    "run_training_entry()\n")


def _train(ws, results, trainer, config, *args, check=True):
    """``nnUNetv2_train 990 2d 0 -tr TRAINER -device cpu ARGS`` into the folder ``results``,
    with ``config`` as NNUNET_IMA_CONFIG (``None``: the variable unset)."""
    env = {"nnUNet_results": results}
    if config is not None:
        env["NNUNET_IMA_CONFIG"] = path = os.path.join(results, f"{trainer}.json")
        with open(path, "w") as f:
            json.dump(config, f)
    return ws.run([sys.executable, "-c", NNUNET_TRAIN_WITHOUT_VALIDATION, str(ws.dataset_id),
                   "2d", "0", "-tr", trainer, "-device", "cpu", *args], extra_env=env,
                  check=check)


def _final(ws, results, trainer):
    fold = os.path.join(results, ws.dataset_name, f"{trainer}__nnUNetPlans__2d", "fold_0")
    return torch.load(os.path.join(fold, "checkpoint_final.pth"), map_location="cpu",
                      weights_only=False)


def _distance(a, b):
    return float((a.float() - b.float()).abs().max())


def _is_head(key):
    return ".seg_layers." in key


@pytest.fixture(scope="module")
def source(trained_clean_model):
    """The Clean model's final checkpoint and its weights."""
    path = os.path.join(trained_clean_model, "fold_0", "checkpoint_final.pth")
    return path, torch.load(path, map_location="cpu", weights_only=False)["network_weights"]


@pytest.mark.parametrize("trainer", list(TRAINERS))
def test_pretrained_weights_start_every_trainer_from_the_model_but_its_heads(
        nnunet_workspace, tmp_path, source, trainer):
    ws, results = nnunet_workspace, str(tmp_path)
    path, weights = source
    _train(ws, results, trainer, dict(ONE_STEP, **TRAINERS[trainer]), "-pretrained_weights",
           path)
    final = _final(ws, results, trainer)
    assert final["trainer_name"] == trainer and final["current_epoch"] == 1
    new = final["network_weights"]
    assert new.keys() == weights.keys()
    heads = [k for k in new if _is_head(k) and k.endswith(".weight")]
    assert heads  # nnU-Net's heads are named so in this network
    for key in new:
        if key in heads:  # left out by nnU-Net's load_pretrained_weights: a new random draw
            assert _distance(new[key], weights[key]) > 100 * TOLERANCE, key
        elif not _is_head(key):  # (the heads' biases start at 0 and some never train)
            assert _distance(new[key], weights[key]) < TOLERANCE, key


def test_finetune_from_starts_from_every_weight_and_is_not_loaded_again_by_c(
        nnunet_workspace, tmp_path, source):
    """The documented example (IMA with one warmup epoch), from a copy of the source that is
    deleted before ``--c``: a continued run takes its weights from its own checkpoint."""
    ws, results = nnunet_workspace, str(tmp_path / "results")
    os.makedirs(results)
    path, weights = source
    copy = str(tmp_path / "source" / "checkpoint_final.pth")
    os.makedirs(os.path.dirname(copy))
    shutil.copy(path, copy)
    trainer = "nnUNetTrainerIMA"
    config = dict(ONE_STEP, **TRAINERS[trainer], finetune_from=copy, lr_warmup_epochs=1)

    # Both ways of starting from a model at once, from two models: refused before any training.
    other = str(tmp_path / "other.pth")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    checkpoint["network_weights"] = {k: v + 1 for k, v in weights.items()}
    torch.save(checkpoint, other)
    refused = _train(ws, results, trainer, config, "-pretrained_weights", other, check=False)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "-pretrained_weights replaced the weights finetune_from loaded" in refused.stderr

    _train(ws, results, trainer, config)
    final = _final(ws, results, trainer)
    for key in weights:  # the heads too
        assert _distance(final["network_weights"][key], weights[key]) < TOLERANCE, key
    # One warmup epoch: epoch 0 at half the initial rate.
    assert final["logging"]["lrs"] == pytest.approx([0.5e-7], rel=1e-12)

    os.remove(copy)
    _train(ws, results, trainer, None, "--c")  # the saved settings; the source is gone
    again = _final(ws, results, trainer)
    assert all(torch.equal(again["network_weights"][k], final["network_weights"][k])
               for k in weights)
