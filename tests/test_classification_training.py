"""Classification end to end on Moons: run-folder contents, IMA more robust than clean training
under attack, exact resume, and the margin store driven by sample indices."""
import csv
import json
import os

import numpy as np
import pytest
import torch

from nnunet_ima.classification.cli import main
from nnunet_ima.classification.datasets import load_moons
from nnunet_ima.classification.models import moons_mlp
from nnunet_ima.classification.settings import TrainConfig
from nnunet_ima.classification.training import Trainer
from nnunet_ima.config import AttackConfig, IMAConfig

# 2000 training points, 10 epochs: about 10 s on a CPU for ce and IMA together. IMA's robust
# accuracy at L2 0.3 beat ce's by 10 to 20 points for training seeds 0, 1, 2 and 3.
SMALL = ["--dataset", "moons", "--max-train", "2000", "--epochs", "10", "--batch-size", "64",
         "--lr", "3e-3", "--no-progress", "--device", "cpu"]
IMA_FAST = ["--eps-max", "0.3", "--pgd-steps", "10", "--binary-steps", "6"]


@pytest.fixture(scope="module")
def moons_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("moons")
    runs = {}
    for method, extra in (("ce", []), ("ima", IMA_FAST)):
        out = str(root / method)
        assert main(["train", *SMALL, "--method", method, "-o", out, *extra]) == 0
        runs[method] = out
    return runs


def _history(folder):
    with open(os.path.join(folder, "history.csv")) as f:
        return list(csv.DictReader(f))


def test_run_folder_contents(moons_runs):
    ima = moons_runs["ima"]
    for name in ("config.json", "model_final.pt", "checkpoint_latest.pt", "history.csv",
                 "margins.json", "margins_hist.png", "curves.png"):
        assert os.path.isfile(os.path.join(ima, name)), name
    assert not [n for n in os.listdir(ima) if n.endswith(".tmp") or ".tmp." in n]
    rows = _history(ima)
    assert [int(r["epoch"]) for r in rows] == list(range(1, 11))
    for key in ("loss", "train_acc", "val_acc", "mean_margin", "fraction_crossed"):
        assert key in rows[0]
    assert float(rows[-1]["val_acc"]) > 0.95
    config = json.load(open(os.path.join(ima, "config.json")))
    assert config["method"] == "ima" and config["eps_max"] == 0.3 and config["model"] == "mlp"
    assert not os.path.exists(os.path.join(moons_runs["ce"], "margins.json"))
    assert "mean_margin" not in _history(moons_runs["ce"])[0]


def test_margins_are_keyed_by_training_sample_index(moons_runs):
    state = json.load(open(os.path.join(moons_runs["ima"], "margins.json")))
    keys = sorted(k for k, _ in state["margins"])
    assert keys == list(range(2000))  # the --max-train 2000 samples, each updated
    values = np.array([v for _, v in state["margins"]])
    delta = 0.3 / 10  # eps_max / epochs
    assert state["delta"] == pytest.approx(delta) and state["epoch"] == 10
    assert values.min() >= 0 and values.max() <= 0.3 + 1e-12
    # Expansion by delta per epoch from delta: samples never crossed reach eps_max after 9 epochs.
    assert np.isclose(values, 0.3).mean() > 0.5
    ckpt = torch.load(os.path.join(moons_runs["ima"], "checkpoint_latest.pt"), weights_only=False)
    assert ckpt["margins"]["margins"] == state["margins"]
    assert set(ckpt["rng"]) >= {"torch", "numpy", "python"} and "optimizer" in ckpt


def test_ima_is_more_robust_than_clean_training(moons_runs, capsys):
    assert main(["eval", moons_runs["ce"], moons_runs["ima"], "--noise", "0", "0.3",
                 "--steps", "20", "--max-samples", "1000", "--device", "cpu", "--no-progress"]) == 0
    table = capsys.readouterr().out
    assert "| ce | 1000 |" in table and "| ima | 1000 |" in table
    ce = json.load(open(os.path.join(moons_runs["ce"], "eval_l2.json")))
    ima = json.load(open(os.path.join(moons_runs["ima"], "eval_l2.json")))
    assert ce["n"] == ima["n"] == 1000 and ima["attacks"] == ["ce", "margin"]
    assert ce["noise"]["0"] > 0.95 and ima["noise"]["0"] > 0.95
    assert ima["noise"]["0.3"] > ce["noise"]["0.3"] + 0.05
    assert ima["auc"] == pytest.approx((ima["noise"]["0"] + ima["noise"]["0.3"]) / 2)


def test_resume_gives_the_same_model(tmp_path, monkeypatch):
    args = ["train", *SMALL, "--epochs", "3", "--max-train", "600", "--method", "ima",
            "--eps-max", "0.3", "--pgd-steps", "5", "--binary-steps", "4"]
    assert main([*args, "-o", str(tmp_path / "straight")]) == 0

    # Interrupt the same run during its third epoch, then start it again on the same folder.
    original = Trainer.train_epoch

    def interrupted_epoch(self):
        if self.epoch == 2:
            raise KeyboardInterrupt("killed")
        return original(self)
    monkeypatch.setattr(Trainer, "train_epoch", interrupted_epoch)
    # Ctrl-C ends the command with exit code 130 (and a line saying that a rerun resumes).
    assert main([*args, "-o", str(tmp_path / "resumed")]) == 130
    assert not (tmp_path / "resumed" / "model_final.pt").exists()
    assert len(_history(tmp_path / "resumed")) == 2
    monkeypatch.setattr(Trainer, "train_epoch", original)
    torch.manual_seed(12345)  # the global RNG state of the new process is restored from the checkpoint
    assert main([*args, "-o", str(tmp_path / "resumed"), "--resume"]) == 0

    a = torch.load(tmp_path / "straight" / "model_final.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "resumed" / "model_final.pt", weights_only=False)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    untimed = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert untimed(_history(tmp_path / "resumed")) == untimed(_history(tmp_path / "straight"))
    assert json.load(open(tmp_path / "resumed" / "margins.json")) == \
        json.load(open(tmp_path / "straight" / "margins.json"))


def test_trainer_step_records_clean_wrong_and_crossed_samples():
    """One IMA step by hand: the records say which samples were wrong, crossed or not."""
    data = load_moons(0, sizes=(64, 8, 8))
    config = TrainConfig(dataset="moons", model="mlp", method="ima", epochs=1, batch_size=64,
                         attack=AttackConfig(steps=10),
                         ima=IMAConfig(eps_max=0.3, delta=0.3, binary_steps=6)).validate()
    torch.manual_seed(0)
    trainer = Trainer(config, data, moons_mlp(), "unused", torch.device("cpu"), progress=False)
    x, y = data.x_train, data.y_train
    with torch.no_grad():
        correct = trainer.model(x).argmax(1) == y
    trainer.train_step(x, y, list(range(64)), torch.Generator().manual_seed(0))
    records = trainer.margins.pending_records()
    assert sorted(records) == list(range(64))
    for i in range(64):
        ((crossed, distance, clean_ok),) = records[i]
        assert clean_ok == bool(correct[i])
        if crossed:  # a boundary point inside the budget eps = delta = 0.3
            assert 0 <= distance <= 0.3 + 1e-6
        else:
            assert distance == 0.0
    assert any(not r[0][2] for r in records.values())  # the untrained MLP gets some wrong
    assert any(r[0][0] for r in records.values())      # and some correct ones cross within 0.3
