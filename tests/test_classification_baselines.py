"""The baselines TRADES, MMA, DDN, FAT and GAIRAT: their pieces against hand-computed or
analytic answers, robustness gains over clean training on Moons and digits, reproducibility."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from core_models import LinearBinary
from nnunet_ima.classification.baselines import (BatchContext, fat, fat_tau, gairat_weights,
                                                 mma)
from nnunet_ima.classification.cli import main
from nnunet_ima.classification.ddn import ddn
from nnunet_ima.classification.settings import BASELINE_METHODS, TrainConfig

# Moons: 2000 training points, 10 epochs (about 50 s for the five methods on a CPU). Against ce
# at L2 0.3, 1000 test points, robust accuracy rose by 7.6 (trades) to 13.0 (fat) points.
MOONS = ["--dataset", "moons", "--max-train", "2000", "--epochs", "10", "--batch-size", "64",
         "--lr", "3e-3", "--no-progress", "--device", "cpu", "--pgd-steps", "10",
         "--ddn-steps", "20"]
# Digits: the real 8x8 images, 800 of them, 5 epochs at L2 eps 1.
DIGITS = ["--dataset", "digits", "--max-train", "800", "--epochs", "5", "--no-progress",
          "--device", "cpu", "--pgd-steps", "5", "--ddn-steps", "10", "--binary-steps", "4",
          "--eps", "1.0"]


def _context(model, method="fat", epoch=0, epochs=10, **config):
    c = TrainConfig.from_flat(dict(dataset="moons", model="mlp", method=method, epochs=epochs,
                                   batch_size=8, eps=config.pop("eps", 1.0), **config))
    return BatchContext(model, c, epoch, None, torch.Generator().manual_seed(0))


def _linear(dtype=torch.float64):
    torch.manual_seed(0)
    return LinearBinary(torch.tensor([3.0, -4.0], dtype=dtype), 0.5)  # ||w||_2 = 5


# ----------------------------------------------------------------------- pieces, by hand
def test_gairat_weights_by_hand():
    kappa = torch.tensor([0, 5, 10])
    raw = [(math.tanh(-1 + (5 - k) * 5 / 5) + 1) / 2 for k in (0, 5, 10)]
    expected = torch.tensor(raw) * 3 / sum(raw)
    assert torch.allclose(gairat_weights(kappa, 10, -1.0), expected.float(), atol=1e-6)
    # Samples fooled early (small kappa: close to the boundary) get the largest weights.
    w = gairat_weights(torch.arange(11), 10, -1.0)
    assert (w[1:] <= w[:-1]).all() and w.mean() == pytest.approx(1.0)


def test_fat_tau_follows_the_120_epoch_schedule():
    assert [fat_tau(e, 120) for e in (0, 49, 50, 89, 90, 119)] == [0, 0, 1, 1, 2, 2]
    assert [fat_tau(e, 12) for e in range(12)] == [0] * 5 + [1] * 4 + [2] * 3


def test_fat_friendly_iterate_lies_just_across_the_boundary():
    model = _linear()
    torch.manual_seed(1)
    x = torch.randn(64, 2, dtype=torch.float64) * 0.3
    x = x[model.f(x).abs() / 5 < 0.8]  # every margin well inside the budget 1
    y = (model.f(x) > 0).long()
    captured = {}
    original = model.forward

    def spy(inp):
        captured["last"] = inp.detach().clone()
        return original(inp)

    ctx = _context(model, eps=1.0, pgd_steps=20, pgd_alpha=4.0)
    model.forward = spy
    _, stats = fat(ctx, x, y)
    model.forward = original
    assert stats["tau"] == 0 and stats["stopped"] == len(y)
    x_train = captured["last"]  # the final forward of fat() is on the friendly data
    f_adv = model.f(x_train)
    fooled = (f_adv > 0).long() != y
    assert fooled.all()  # budget 1 >> every margin: every sample crossed and stopped
    # ... and stopped within one step (0.2 in L2) past the boundary, not at the budget.
    assert (f_adv.abs() / 5 <= 0.2 + 1e-9).all()


def test_ddn_finds_the_analytic_minimal_l2_perturbation_of_a_linear_model():
    model = _linear()
    torch.manual_seed(2)
    x = torch.randn(32, 2, dtype=torch.float64)
    y = (model.f(x) > 0).long()
    margin = model.f(x).abs() / 5
    x_adv, found = ddn(model, x, y, max_norm=4.0, steps=100, gamma=0.05)
    inside = margin < 4.0
    assert found[inside].all() and not found[~inside].any()
    distance = (x_adv - x).norm(dim=1)
    # Adversarial, and within 5 % (plus the 0.05 norm granularity) of the true minimum.
    assert ((model.f(x_adv) > 0).long() != y)[inside].all()
    assert (distance[inside] >= margin[inside] - 1e-9).all()
    assert (distance[inside] <= margin[inside] * 1.05 + 0.05).all()
    assert (distance <= 4.0 + 1e-9).all()


def test_mma_loss_is_clean_cross_entropy_when_every_sample_is_misclassified():
    model = _linear()
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    y = 1 - (model.f(x) > 0).long()   # every label wrong
    loss, stats = mma(_context(model, method="mma", eps=0.5), x, y)
    ce = F.cross_entropy(model(x), y)
    # w * CE(x) + (1 - w) * sum_wrong CE(x) / B = CE(x) when every sample is wrong.
    assert float(loss.detach()) == pytest.approx(float(ce.detach()), rel=1e-9)
    assert stats["crossed"] == 0


def test_mma_trains_at_the_boundary_of_correct_samples_within_d_max():
    model = _linear()
    x = torch.tensor([[0.06, 0.0], [1.0, 0.0], [0.0, -3.0]], dtype=torch.float64)
    y = (model.f(x) > 0).long()       # margins 0.136, 0.7, 2.5
    _, stats = mma(_context(model, method="mma", eps=1.0, pgd_steps=20, binary_steps=12), x, y)
    assert stats["crossed"] == 2       # the third sample is robust at d_max: hinge, no term
    assert stats["margin_sum"] == pytest.approx(0.136 + 0.7, abs=1e-3)


# ----------------------------------------------------------------------- training runs
@pytest.fixture(scope="module")
def moons_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("moons_baselines")
    runs = {}
    for method in ("ce", *BASELINE_METHODS):
        runs[method] = str(root / method)
        assert main(["train", *MOONS, "--method", method, "-o", runs[method]]) == 0
    return runs


def _eval(runs, args, capsys):
    assert main(["eval", *runs.values(), *args, "--no-progress", "--device", "cpu"]) == 0
    capsys.readouterr()
    return {m: json.load(open(os.path.join(folder, "eval_l2.json"))) for m, folder in runs.items()}


# GAIRAT is left out of the Moons comparison: once its weights start (epoch 5 of 10) they give
# the points PGD never fooled almost no weight, and training swings from epoch to epoch
# (docs/classification.md, "Results"). Over seeds 0-5 at these settings its clean accuracy ranged
# 0.76-0.99 and its robust accuracy at 0.3 0.50-0.87 (ce: about 0.74), and CPUs with other
# vector kernels land on other points of that range under the same seed. The digits test below
# keeps it.
MOONS_ROBUST_METHODS = tuple(m for m in BASELINE_METHODS if m != "gairat")


def test_every_baseline_is_more_robust_than_ce_on_moons(moons_runs, capsys):
    reports = _eval(moons_runs, ["--noise", "0", "0.3", "--max-samples", "1000"], capsys)
    ce = reports["ce"]["noise"]
    for method in MOONS_ROBUST_METHODS:
        acc = reports[method]["noise"]
        assert acc["0"] > 0.9, method
        assert acc["0.3"] > ce["0.3"] + 0.04, (method, acc, ce)


def test_baseline_history_columns(moons_runs):
    import csv
    rows = {m: list(csv.DictReader(open(os.path.join(f, "history.csv"))))
            for m, f in moons_runs.items()}
    assert [float(r["tau"]) for r in rows["fat"]] == [0] * 4 + [1] * 3 + [2] * 3
    assert all(0 <= float(r["mean_kappa"]) <= 10 for r in rows["gairat"])
    assert all(0 < float(r["mean_margin"]) <= 0.3 for r in rows["mma"])
    assert all(0 <= float(r["fraction_found"]) <= 1 for r in rows["ddn"])


def test_every_baseline_is_more_robust_than_ce_on_digits(tmp_path, capsys):
    runs = {}
    for method in ("ce", *BASELINE_METHODS):
        runs[method] = str(tmp_path / method)
        assert main(["train", *DIGITS, "--method", method, "-o", runs[method]]) == 0
    reports = _eval(runs, ["--noise", "0", "1", "--max-samples", "300", "--steps", "20"], capsys)
    ce = reports["ce"]["noise"]
    for method in BASELINE_METHODS:
        acc = reports[method]["noise"]
        assert acc["0"] > 0.8, method
        assert acc["1"] > ce["1"] + 0.08, (method, acc, ce)


@pytest.mark.parametrize("method", BASELINE_METHODS)
def test_baselines_are_reproducible_under_a_seed(method, tmp_path):
    args = ["train", *MOONS, "--epochs", "2", "--max-train", "256", "--method", method]
    weights = []
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        assert main([*args, "--seed", seed, "-o", str(tmp_path / name)]) == 0
        weights.append(torch.load(tmp_path / name / "model_final.pt")["model"])
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])


@pytest.mark.parametrize("extra, message", [
    (["--method", "ddn", "--norm", "linf"], "L2 method"),
    (["--method", "gairat", "--pgd-steps", "1"], "--pgd-steps >= 2"),
    (["--method", "trades", "--trades-beta", "0"], "--trades-beta"),
    (["--method", "fat", "--eps", "-1"], "--eps"),
    (["--method", "ddn", "--ddn-gamma", "1.5"], "--ddn-gamma"),
])
def test_bad_baseline_options_are_refused(extra, message, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *MOONS, *extra, "-o", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
