"""Classification end to end on Moons: IMA beats clean training under attack, resume, CLI."""
import json
import os

import numpy as np
import pytest
import torch

from nnunet_ima.classification.cli import main, suggest_eps
from nnunet_ima.classification.datasets import load_moons
from nnunet_ima.classification.robust_eval import robust_accuracy

# 2000 training points, 10 epochs: seconds on a CPU, and enough for IMA to separate from ce.
SMALL = ["--dataset", "moons", "--max-train", "2000", "--epochs", "10", "--batch-size", "64",
         "--lr", "3e-3", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def moons_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("moons")
    runs = {}
    for method, extra in (("ce", []), ("ima", ["--eps-max", "0.3", "--pgd-steps", "10",
                                               "--binary-steps", "6"])):
        out = str(root / method)
        assert main(["train", *SMALL, "--method", method, "-o", out, *extra]) == 0
        runs[method] = out
    return runs


def test_run_folder_contents(moons_runs):
    ima = moons_runs["ima"]
    for name in ("config.json", "model_final.pt", "checkpoint_latest.pt", "history.csv",
                 "margins.json", "margins_hist.png", "curves.png"):
        assert os.path.isfile(os.path.join(ima, name)), name
    header, *rows = open(os.path.join(ima, "history.csv")).read().splitlines()
    assert header.startswith("epoch,loss,train_acc,val_acc,mean_margin") and len(rows) == 10
    assert not os.path.exists(os.path.join(moons_runs["ce"], "margins.json"))


def test_ima_is_more_robust_than_clean_training(moons_runs, capsys):
    assert main(["eval", moons_runs["ce"], moons_runs["ima"], "--noise", "0", "0.3",
                 "--steps", "20", "--max-samples", "1000", "--device", "cpu"]) == 0
    table = capsys.readouterr().out
    assert "| ce |" in table and "| ima |" in table
    ce = json.load(open(os.path.join(moons_runs["ce"], "eval_l2.json")))
    ima = json.load(open(os.path.join(moons_runs["ima"], "eval_l2.json")))
    assert ce["noise"]["0"] > 0.95 and ima["noise"]["0"] > 0.95
    assert ima["noise"]["0.3"] > ce["noise"]["0.3"] + 0.05


def test_worst_case_is_never_above_either_attack():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    data = load_moons(0, sizes=(10, 10, 300))
    result = robust_accuracy(model, data.x_test, data.y_test, [0.0, 0.1, 0.3], "l2", steps=10,
                             clamp=None, batch_size=64)
    for noise in (0.0, 0.1, 0.3):
        assert result["worst"][noise] <= min(result["ce"][noise], result["margin"][noise])
    assert result["worst"][0.3] <= result["worst"][0.1] <= result["worst"][0.0]


def test_resume_gives_the_same_model(tmp_path, monkeypatch):
    from nnunet_ima.classification.training import Trainer
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
    with pytest.raises(KeyboardInterrupt):
        main([*args, "-o", str(tmp_path / "resumed")])
    assert not (tmp_path / "resumed" / "model_final.pt").exists()
    monkeypatch.setattr(Trainer, "train_epoch", original)
    assert main([*args, "-o", str(tmp_path / "resumed")]) == 0

    a = torch.load(tmp_path / "straight" / "model_final.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "resumed" / "model_final.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    history = (tmp_path / "resumed" / "history.csv").read_text().splitlines()
    assert len(history) == 4 and history == (tmp_path / "straight" / "history.csv").read_text().splitlines()


def test_margins_command_and_rule(moons_runs, capsys):
    assert main(["margins", moons_runs["ima"]]) == 0
    out = capsys.readouterr().out
    assert "suggested eps for vanilla adversarial training" in out
    values = np.array([0.05, 0.1, 0.1, 0.2, 0.3, 0.3])
    assert suggest_eps(values, 0.3, 0.5) == pytest.approx(0.1)  # margins at eps_max are excluded


@pytest.mark.parametrize("argv, message", [
    (["train", "--dataset", "moons", "--method", "adv", "--eps", "0", "-o", "X"], "--eps must be > 0"),
    (["train", "--dataset", "moons", "--method", "ima", "--eps-max", "-1", "-o", "X"], "eps_max"),
    (["train", "--dataset", "svhn", "-o", "X"], "needs --data-root"),
    (["train", "--dataset", "cifar10", "--data-root", "/nonexistent", "-o", "X"], "is not a folder"),
    (["eval", "/nonexistent/run"], "model_final.pt does not exist"),
    (["margins", "/nonexistent/run"], "margins.json does not exist"),
])
def test_bad_input_is_a_clear_error(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "X").exists()


def test_unknown_dataset_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--dataset", "mnist", "-o", "X"])
    assert e.value.code == 2
