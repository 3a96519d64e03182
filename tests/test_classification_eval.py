"""The two-attack robustness evaluation against exact answers and its worst-case semantics."""
import numpy as np
import pytest
import torch
from torch import nn

from nnunet_ima.classification.datasets import load_moons
from nnunet_ima.classification.margins_report import margin_report, suggest_eps, text_histogram
from nnunet_ima.classification.robust_eval import robust_accuracy


pytestmark = pytest.mark.usefixtures("one_thread")


class Linear2(nn.Module):
    """Logits ``(0, w.x + b)``: the decision boundary is the line ``w.x + b = 0``."""

    def __init__(self, w, b):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w))
        self.b = nn.Parameter(torch.tensor(b))

    def forward(self, x):
        z = x @ self.w + self.b
        return torch.stack([torch.zeros_like(z), z], dim=1)


@pytest.mark.parametrize("norm, dual", [("l2", 2), ("linf", 1)])
def test_robust_accuracy_of_a_linear_model_is_the_exact_distance_rule(norm, dual):
    """For a linear classifier the distance to the boundary is ``|w.x + b| / ||w||_dual``: a
    correct sample is robust at ``eps`` exactly when that distance exceeds ``eps``."""
    model = Linear2([1.0, -2.0], 0.3)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(400, 2, generator=gen)
    # Labels: the true side for most points, the wrong side for 10 % (clean-misclassified).
    z = x @ model.w.detach() + model.b.detach()
    y = (z > 0).long()
    y[:40] = 1 - y[:40]
    distance = z.abs() / model.w.detach().norm(p=dual)
    levels = [0.0, 0.1, 0.3, 0.6]
    result = robust_accuracy(model, x, y, levels, norm, steps=100, clamp=None, batch_size=128)
    correct = torch.arange(400) >= 40
    for eps in levels:
        expected = float((correct & (distance > eps)).float().mean())
        # Samples within a step of the boundary may be missed; none of these points is that close.
        near = float((correct & ((distance - eps).abs() < 0.02)).float().mean())
        assert abs(result["worst"][eps] - expected) <= near + 1e-9, (eps, result["worst"][eps], expected)
    assert result["worst"][0.0] == pytest.approx(0.9)


def test_worst_case_is_never_above_either_attack():
    """Same samples, same seed: each attack alone, then both; the worst case is their union."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 2))
    data = load_moons(0, sizes=(1000, 10, 400))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(100):  # a briefly trained, non-linear model: the two losses disagree somewhere
        opt.zero_grad()
        nn.functional.cross_entropy(model(data.x_train), data.y_train).backward()
        opt.step()
    levels = [0.0, 0.1, 0.2, 0.3]
    kwargs = dict(norm="linf", steps=20, clamp=None, batch_size=128, seed=3)
    both = robust_accuracy(model, data.x_test, data.y_test, levels, attacks=("ce", "margin"), **kwargs)
    ce = robust_accuracy(model, data.x_test, data.y_test, levels, attacks=("ce",), **kwargs)
    margin = robust_accuracy(model, data.x_test, data.y_test, levels, attacks=("margin",), **kwargs)
    assert both["worst"][0.0] > 0.8
    for eps in levels:
        # Each attack draws the same random starts alone or beside the other one.
        assert both["ce"][eps] == ce["worst"][eps] and both["margin"][eps] == margin["worst"][eps]
        assert both["worst"][eps] <= min(ce["worst"][eps], margin["worst"][eps])
        assert both["worst"][eps] >= ce["worst"][eps] + margin["worst"][eps] - both["worst"][0.0]
    # The two attacks fool different samples: their union is strictly stronger than either.
    assert both["worst"][0.3] < min(ce["worst"][0.3], margin["worst"][0.3]) < both["worst"][0.0]


def test_suggested_eps_rule():
    margins = np.array([0.001, 0.002, 0.05, 0.1, 0.1, 0.2, 0.3, 0.3, 0.3])
    # Capped 0.3s and margins below delta = 0.03 are excluded: median of (0.05, 0.1, 0.1, 0.2).
    assert suggest_eps(margins, 0.3, 0.5, floor=0.03) == pytest.approx(0.1)
    # numpy's linear quantile: 10 % of 4 values lies 0.3 of the way from 0.05 to 0.1.
    assert suggest_eps(margins, 0.3, 0.1, floor=0.03) == pytest.approx(0.065)
    assert suggest_eps(margins, 0.3, 0.1) == pytest.approx(0.0015)  # no floor: the near-zero pile wins
    assert suggest_eps(np.full(4, 0.3), 0.3) == 0.3  # nothing crossed: the cap itself
    with pytest.raises(ValueError):
        suggest_eps(margins, 0.3, 1.0)
    lines = text_histogram(np.array([0.01, 0.05, 0.12, 0.15, 0.25, 0.3, 0.3]), 0.3, bins=3)
    assert [int(line.split()[-1]) for line in lines] == [2, 2, 3]  # eps_max is in the last bin
    report = margin_report(margins, 0.3, delta=0.03)
    assert "3 (33.3 %) at eps_max" in report and "2 (22.2 %) below delta" in report
    assert "suggested eps for vanilla adversarial training: 0.065" in report
