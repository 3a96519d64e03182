"""The N-FGSM and TRADES trainers in nnU-Net's real pipeline: nnUNetv2_train a few iterations on
the tiny synthetic dataset, then the model folder."""
import json
import os

import pytest

from conftest import train
from test_trainers_e2e import TINY_ADV, _stats_rows


@pytest.mark.parametrize("trainer, config, eps", [
    # The named variant: its name fixes adv_eps = 8; the PGD keys do not act in N-FGSM.
    ("nnUNetTrainerNFGSM_eps8", {k: v for k, v in TINY_ADV.items()
                                 if k not in ("adv_eps", "pgd_steps")}, 8.0),
    ("nnUNetTrainerTRADES", TINY_ADV, 5.0),
])
def test_baseline_trains_and_writes_its_model_folder(nnunet_workspace, trainer, config, eps):
    ws = nnunet_workspace
    train(ws, trainer, config)
    fold = os.path.join(ws.model_folder(trainer), "fold_0")
    assert os.path.isfile(os.path.join(fold, "checkpoint_final.pth"))
    with open(os.path.join(fold, "ima_config.json")) as f:
        assert json.load(f)["adv_eps"] == eps
    rows = _stats_rows(fold)
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    assert all(float(r["adv_eps"]) == eps for r in rows)
    # Every slice is attacked in every step: an adversarial Dice is measured in every epoch.
    assert all(0.0 <= float(r["adv_dice"]) <= 1.0 for r in rows)
    assert all(float(r["fraction_attacked"]) == 1.0 for r in rows)
