"""APGD (torchattacks), SPSA and the gradient-masking check of ``nnunet-ima-classify eval``,
against the exact robust accuracy of linear classifiers."""
import json
import shutil
import sys

import pytest
import torch
from torch import nn

from core_models import LinearBinary
from nnunet_ima.classification.cli import main
from nnunet_ima.classification.tables import markdown_table
from nnunet_ima.classification.robust_eval import PGD_WORST, masking_warnings, robust_accuracy
from nnunet_ima.classification.spsa import SPSASettings, spsa
from nnunet_ima.classification.strong_attacks import (TORCHATTACKS_INSTALL, StrongAttackSettings,
                                                      UnitBox, UnitBoxModel, apgd_fooled)
from nnunet_ima.norms import per_sample_norm

DUAL = {"l2": 2, "linf": 1}
FAST_SPSA = StrongAttackSettings(spsa=SPSASettings(iterations=40, samples=32))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def torchattacks():
    """APGD is torchattacks' implementation; the test extra does not bring the package (its
    pins would downgrade the environment), so the tests that run APGD skip without it."""
    return pytest.importorskip("torchattacks", reason=f"APGD needs torchattacks: "
                                                      f"{TORCHATTACKS_INSTALL}")


def linear_problem(n: int, dim: int, seed: int = 0, shape=None, centre: float = 0.0,
                   spread: float = 1.0):
    """A :class:`LinearBinary` model, ``n`` points labelled by its own side of the boundary
    (all clean-correct) and their exact distance to the boundary in L2 and Linf."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(dim, generator=g)
    model = LinearBinary(w, 0.1 * float(torch.randn(1, generator=g)))
    x = centre + spread * torch.randn(n, dim, generator=g)
    if shape is not None:
        x = x.reshape(n, *shape)
    with torch.no_grad():
        f = model.f(x)
    y = (f > 0).long()
    distance = {norm: f.abs() / w.norm(p=dual) for norm, dual in DUAL.items()}
    return model, x, y, distance


class RoundedLinear(LinearBinary):
    """A linear classifier whose input is rounded to a grid of ``step``: its input gradient is
    zero everywhere (``round`` has zero derivative), yet its decisions are those of the linear
    model up to ``step``, so errors exist that only a gradient-free attack can find."""

    def __init__(self, w, b, step: float):
        super().__init__(w, b)
        self.step = step

    def forward(self, x):
        return super().forward(torch.round(x / self.step) * self.step)


@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("inputs", ["points", "images"])
def test_apgd_and_pgd_reach_the_analytic_robust_accuracy(norm, inputs, torchattacks):
    """Points: unbounded (moons-like, through the affine box). Images: ``(B, 1, 2, 3)`` values
    in [0.3, 0.7] with budgets that never reach the [0, 1] edges, so the box adds nothing."""
    if inputs == "points":
        model, x, y, distance = linear_problem(200, 5)
        clamp, levels = None, [0.1, 0.3, 0.6]
    else:
        model, x, y, distance = linear_problem(200, 6, shape=(1, 2, 3), centre=0.5, spread=0.05)
        x = x.clamp(0.3, 0.7)
        with torch.no_grad():
            model.b.fill_(0.01 - 0.5 * float(model.w.sum()))     # the boundary through 0.5
            f = model.f(x)
        y = (f > 0).long()
        distance = {n: f.abs() / model.w.detach().norm(p=d) for n, d in DUAL.items()}
        clamp = (0.0, 1.0)
        levels = [0.02, 0.05, 0.1] if norm == "l2" else [0.005, 0.01, 0.02]
    result = robust_accuracy(model, x, y, levels, norm, steps=100, attacks=("ce", "apgd-ce"),
                             clamp=clamp, batch_size=200)
    for eps in levels:
        expected = int((distance[norm] > eps).sum())
        assert 0 < expected < 200
        for attack in ("ce", "apgd-ce"):
            assert abs(round(result[attack][eps] * 200) - expected) <= 1, (attack, eps)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_three_class_attacks_never_beat_the_exact_answer_and_together_reach_it(norm,
                                                                               torchattacks):
    """Three linear logits: a correct sample's distance to the wrong classes is
    ``min_j (z_y - z_j) / ||w_y - w_j||_dual``. No attack may fool a sample farther than eps;
    APGD-DLR fools nearly all samples closer than eps / 2."""
    g = torch.Generator().manual_seed(1)
    layer = nn.Linear(4, 3)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(3, 4, generator=g))
        layer.bias.copy_(torch.randn(3, generator=g))
    x = torch.randn(150, 4, generator=g)
    with torch.no_grad():
        z = layer(x)
    y = z.argmax(1)
    w = layer.weight.detach()
    distance = torch.full((150,), float("inf"))
    for j in range(3):
        d_j = (z.gather(1, y[:, None]).squeeze(1) - z[:, j]) / (w[y] - w[j]).norm(p=DUAL[norm], dim=1)
        distance = torch.where(y == j, distance, torch.minimum(distance, d_j))
    attacks = ("ce", "margin", "apgd-ce", "apgd-dlr", "spsa")
    result = robust_accuracy(layer, x, y, [0.3], norm, steps=50, attacks=attacks, clamp=None,
                             batch_size=150, settings=FAST_SPSA)
    expected = int((distance > 0.3).sum())
    for attack in attacks:
        assert round(result[attack][0.3] * 150) >= expected, attack
    assert abs(round(result["worst"][0.3] * 150) - expected) <= 1
    assert round(result["apgd-dlr"][0.3] * 150) <= expected + 0.02 * 150


def test_unit_box_is_exact_and_its_clip_never_binds():
    model, x, _, _ = linear_problem(64, 2)
    x = x * 3 + 1.5                                     # off-centre, wider than [0, 1]
    noise = 0.4
    box = UnitBox.for_batch(x, noise, None)
    u = box.to_unit(x)
    assert u.shape == (64, 1, 1, 2)
    # The same logits bit for bit: the change of variables is invisible to the network.
    assert torch.equal(UnitBoxModel(model, box, x.dtype)(u), model(x))
    assert torch.equal(box.from_unit(u, x.dtype), x)
    # Every point of every Linf ball (which holds the L2 ball) lies strictly inside (0, 1).
    for sign in (-1, 1):
        corner = box.to_unit(x + sign * noise)
        assert corner.min() > 0 and corner.max() < 1
    # Isotropic: distances scale by exactly 1 / scale in both norms.
    d = torch.tensor([[0.3, -0.4]], dtype=torch.float64)
    du = box.to_unit(x[:1].double() + d) - box.to_unit(x[:1].double())
    assert float(du.norm()) == pytest.approx(0.5 / box.scale, rel=1e-12)
    # Images already in [0, 1] pass untouched; another range maps onto [0, 1].
    img = torch.rand(3, 1, 4, 4)
    assert UnitBox.for_batch(img, 0.1, (0.0, 1.0)).to_unit(img) is img
    other = UnitBox.for_batch(img, 0.1, (-1.0, 3.0))
    assert torch.allclose(other.to_unit(torch.tensor([-1.0, 3.0]).view(2, 1, 1, 1).expand(2, 1, 4, 4)
                                        .contiguous()).flatten(1).mean(1).float(),
                          torch.tensor([0.0, 1.0]))


def test_apgd_leaves_the_global_random_state_alone(torchattacks):
    model, x, y, _ = linear_problem(32, 3)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    fooled = apgd_fooled(model, x, y, 0.5, norm="l2", steps=5, clamp=None, seed=7)
    assert torch.equal(torch.get_rng_state(), before)
    assert fooled.dtype == torch.bool and fooled.shape == (32,)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_spsa_never_crosses_a_margin_above_eps_and_finds_the_near_ones(norm):
    model, x, y, distance = linear_problem(120, 10, seed=2)
    eps = 0.4
    settings = SPSASettings(iterations=40, samples=32)
    result = spsa(model, x, y, eps, norm=norm, settings=settings,
                  generator=torch.Generator().manual_seed(0))
    assert (per_sample_norm(result.x_adv - x, norm) <= eps * (1 + 1e-5)).all()
    with torch.no_grad():
        wrong = model(result.x_adv).argmax(1) != y
    assert torch.equal(wrong, result.fooled)
    far, near = distance[norm] > eps, distance[norm] < eps / 2
    assert far.sum() > 20 and near.sum() > 10
    assert not result.fooled[far].any()
    assert result.fooled[near].float().mean() >= 0.9
    again = spsa(model, x, y, eps, norm=norm, settings=settings,
                 generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.x_adv, result.x_adv)       # seeded


def test_masking_warning_fires_on_a_masked_model_and_not_on_an_ordinary_one():
    model, x, y, distance = linear_problem(150, 2, seed=3)
    masked = RoundedLinear(model.w.detach(), float(model.b.detach()), step=1e-3)
    xg = x.clone().requires_grad_(True)
    masked(xg)[:, 1].sum().backward()
    assert torch.count_nonzero(xg.grad) == 0            # PGD gets no gradient at all
    attacks = ("ce", "margin", "spsa")
    levels = [0.0, 0.3]
    kwargs = dict(norm="l2", steps=20, attacks=attacks, clamp=None, batch_size=150,
                  settings=FAST_SPSA)
    y_masked = masked(x).argmax(1)
    result = robust_accuracy(masked, x, y_masked, levels, **kwargs)
    warnings = masking_warnings(result, attacks)
    assert [w["noise"] for w in warnings] == [0.3] and warnings[0]["attack"] == "spsa"
    assert warnings[0]["pgd"] == result[PGD_WORST][0.3]
    assert warnings[0]["points"] > 2 and result["worst"][0.3] == result["spsa"][0.3]
    # SPSA gets within a few samples of the exact answer despite the zero gradient.
    assert abs(result["spsa"][0.3] - float((distance["l2"] > 0.3).float().mean())) <= 0.03
    ordinary = robust_accuracy(model, x, y, levels, **kwargs)
    assert masking_warnings(ordinary, attacks) == []


def test_masking_threshold_is_more_than_two_points_against_the_strongest_attack():
    result = {"pgd": {0.1: 0.90, 0.2: 0.80}, "spsa": {0.1: 0.88, 0.2: 0.79},
              "apgd-ce": {0.1: 0.89, 0.2: 0.775}}
    warnings = masking_warnings(result, ("ce", "apgd-ce", "spsa"))
    assert [(w["noise"], w["attack"], round(w["points"], 6)) for w in warnings] == \
        [(0.2, "apgd-ce", 2.5)]                         # 0.1: exactly 2 points, not more
    assert masking_warnings(result, ("apgd-ce", "spsa")) == []     # no "pgd" without ce/margin
    assert masking_warnings({"pgd": {0.1: 0.9}}, ("ce",)) == []


def test_table_marks_flagged_cells_and_names_the_attacks():
    report = {"noise": {"0": 1.0, "0.1": 0.5}, "auc": 0.75, "n": 10,
              "warnings": [{"noise": 0.1, "message": "run r, L2 noise 0.1: PGD 60 % vs SPSA 50 %"}]}
    table = markdown_table([("r", report)], "l2", 100, ["ce", "margin", "apgd-ce", "apgd-dlr", "spsa"])
    assert table.startswith("Robust accuracy (%), worst case of: 100-PGD (ce, margin), APGD-CE, "
                            "APGD-DLR, SPSA\n")
    assert "| r | 10 | 100.00 | 50.00 [^1] | 75.00 |" in table
    assert "[^1]: run r, L2 noise 0.1: PGD 60 % vs SPSA 50 %" in table
    plain = markdown_table([("r", {**report, "warnings": []})], "l2", 20, ["margin", "spsa"])
    assert "worst case of: 20-PGD (margin), SPSA" in plain and "[^" not in plain


TINY = ["--dataset", "moons", "--max-train", "300", "--epochs", "2", "--batch-size", "100",
        "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def trained_ce(tmp_path_factory):
    """A ce run on 300 moons points, trained once; each test evaluates a copy of it."""
    folder = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        assert main(["train", *TINY, "--method", "ce", "-o", "ce"]) == 0
    return folder / "ce"


@pytest.fixture
def ce_run(trained_ce, tmp_path, monkeypatch):
    shutil.copytree(trained_ce, tmp_path / "ce")
    monkeypatch.chdir(tmp_path)
    return tmp_path


BASE = ["eval", "ce", "--noise", "0", "0.2", "--steps", "10", "--max-samples", "40",
        "--no-progress"]


def test_cli_refuses_dlr_on_two_classes_and_apgd_without_torchattacks(ce_run, monkeypatch,
                                                                      capsys):
    assert main([*BASE, "--attacks", "apgd-dlr"]) == 2
    err = capsys.readouterr().err
    assert "apgd-dlr needs at least 3 classes" in err and "ce (moons) has 2" in err
    assert not (ce_run / "ce" / "eval_l2.json").exists()
    monkeypatch.setitem(sys.modules, "torchattacks", None)          # as if not installed
    assert main([*BASE, "--attacks", "ce", "apgd-ce"]) == 2
    assert "pip install --no-deps torchattacks==3.5.1" in capsys.readouterr().err
    assert main([*BASE, "--attacks", "spsa", "--spsa-delta", "0"]) == 2
    assert "--spsa-delta must be > 0" in capsys.readouterr().err


def test_cli_runs_the_chosen_attacks(ce_run, capsys, torchattacks):
    tmp_path = ce_run
    assert main([*BASE, "--attacks", "ce", "margin", "apgd-ce", "spsa", "--spsa-iterations", "10",
                 "--spsa-samples", "8", "-o", "tables"]) == 0
    report = json.load(open(tmp_path / "ce" / "eval_l2.json"))
    caption = "10-PGD (ce, margin), APGD-CE, SPSA"
    assert report["caption"] == caption
    assert (tmp_path / "tables" / "table_l2.md").read_text().startswith(f"Robust accuracy (%), worst case of: {caption}")
    assert list(report["per_attack"]) == ["ce", "margin", "apgd-ce", "spsa"]
    assert report["attack_settings"]["apgd"]["package"] == "torchattacks 3.5.1"
    assert report["attack_settings"]["spsa"]["iterations"] == 10
    assert isinstance(report["warnings"], list)
    per = report["per_attack"]
    for level, acc in report["noise"].items():
        assert acc <= report["pgd_worst"][level] <= min(per["ce"][level], per["margin"][level])
        assert acc <= min(p[level] for p in per.values())
