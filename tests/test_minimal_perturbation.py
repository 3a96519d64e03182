"""The minimal-noise attack against the analytic margin of a linear model.

The network's logits at every pixel are ``(-s, s)`` with ``s = <w, x> + b`` one global linear
score of the slice, and every pixel is labelled foreground (1): while ``s > 0`` the whole slice
is right (Dice 1), once ``s <= 0`` all of it is wrong (Dice 0; argmax takes the first class on a
tie). The smallest perturbation that flips it is known in closed form: ``||delta||_2 = s /
||w||_2`` (along ``-w``) and ``||delta||_inf = s / ||w||_1`` (along ``-sign(w)``), Hoelder's
equality cases. The attack's norm must be at or above that margin (never below: a smaller
adversarial perturbation does not exist) and within 1 % of it.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from nnunet_ima.evaluation.attacks import MinimalRun, minimal_perturbation
from nnunet_ima.norms import per_sample_norm

SIZE = (1, 4, 4)


class GlobalLinear(torch.nn.Module):
    """``(B, 1, 4, 4)`` -> logits ``(B, 2, 4, 4)``, ``(-s, s)`` at every pixel."""

    def __init__(self, w: torch.Tensor, b: float):
        super().__init__()
        self.w = torch.nn.Parameter(w)
        self.b = b

    def forward(self, x):
        s = (x * self.w).flatten(1).sum(1) + self.b                        # (B,)
        s = s.view(-1, 1, 1, 1).expand(-1, 1, *x.shape[2:])
        return torch.cat([-s, s], dim=1)


def _dice(logits, target):
    """Foreground Dice of the argmax per slice, ``(B,)`` (the labels are all foreground)."""
    pred = logits.argmax(1)
    labels = target[:, 0]
    tp = ((pred == 1) & (labels == 1)).sum((1, 2)).double()
    fp = ((pred == 1) & (labels != 1)).sum((1, 2)).double()
    fn = ((pred != 1) & (labels == 1)).sum((1, 2)).double()
    return 2 * tp / (2 * tp + fp + fn).clamp_min(1)


def _ce(logits, target):
    return F.cross_entropy(logits, target[:, 0], reduction="none").mean(dim=(1, 2))


def _problem(scores):
    """A linear net and slices whose scores ``s`` are ``scores``."""
    torch.manual_seed(0)
    w = torch.randn(*SIZE, dtype=torch.float64)
    net = GlobalLinear(w, 0.0)
    x = torch.randn(len(scores), *SIZE, dtype=torch.float64)
    # Shift each slice along w so that <w, x> = its score.
    shift = (torch.tensor(scores, dtype=torch.float64) - (x * w).flatten(1).sum(1)) \
        / (w * w).sum()
    x = x + shift.view(-1, 1, 1, 1) * w
    y = torch.ones(len(scores), 1, *SIZE[1:], dtype=torch.long)
    return net, x, y


def _margin(net, x, norm):
    s = (x * net.w.detach()).flatten(1).sum(1)
    dual = net.w.detach().flatten().norm(p=2 if norm == "l2" else 1)
    return s / dual


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_the_norm_found_is_the_linear_models_margin_from_above(norm):
    # Margins below, at and far above the first radius: the radius must shrink and grow (15
    # times). Far from its boundary CE saturates: its gradient (about 1e-26 at s = 30) must
    # still give a direction.
    net, x, y = _problem([0.5, 2.0, 9.0, 30.0])
    margin = _margin(net, x, norm)
    run = minimal_perturbation(net, x, y, norm=norm, steps=100, score=_dice, threshold=0.5,
                               loss=_ce, init_eps=float(margin[1]))
    assert isinstance(run, MinimalRun)
    assert run.found.all()
    assert (run.norm >= margin * (1 - 1e-9)).all()
    assert (run.norm <= margin * 1.01).all(), (run.norm / margin).tolist()
    # The returned inputs are adversarial and their norm is the one reported.
    with torch.no_grad():
        assert (_dice(net(run.x_adv), y) < 0.5).all()
    torch.testing.assert_close(per_sample_norm(run.x_adv - x, norm), run.norm)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_slices_are_independent_and_a_slice_already_below_is_at_zero(norm):
    # Slice 1 is already wrong (s < 0): Dice 0 without any noise.
    net, x, y = _problem([1.0, -0.5, 4.0])
    init = torch.tensor([0.3, 0.3, 2.0], dtype=torch.float64)
    run = minimal_perturbation(net, x, y, norm=norm, steps=60, score=_dice, threshold=0.5,
                               loss=_ce, init_eps=init)
    assert run.found.all()
    assert run.norm[1] == 0
    assert torch.equal(run.x_adv[1], x[1])
    for i in (0, 2):
        alone = minimal_perturbation(net, x[i:i + 1], y[i:i + 1], norm=norm, steps=60,
                                     score=_dice, threshold=0.5, loss=_ce, init_eps=init[i:i + 1])
        torch.testing.assert_close(alone.norm, run.norm[i:i + 1], rtol=1e-12, atol=0)
        torch.testing.assert_close(alone.x_adv, run.x_adv[i:i + 1], rtol=0, atol=1e-12)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_a_start_point_and_the_cap_on_the_radius(norm):
    net, x, y = _problem([1.0, 1.0])
    margin = _margin(net, x, norm)
    # The cap below the margin: nothing found, the norm is inf and x_adv is the last iterate.
    capped = minimal_perturbation(net, x, y, norm=norm, steps=30, score=_dice, threshold=0.5,
                                  loss=_ce, init_eps=0.1 * margin, max_eps=0.9 * margin)
    assert not capped.found.any()
    assert torch.isinf(capped.norm).all()
    assert (per_sample_norm(capped.x_adv - x, norm) <= 0.9 * margin * (1 + 1e-12)).all()
    # A start point: the clean input is checked too, and the margin is still found from above.
    start = 0.5 * margin.view(-1, 1, 1, 1) * torch.randn_like(x).sign() \
        / (math.sqrt(x[0].numel()) if norm == "l2" else 1.0)
    run = minimal_perturbation(net, x, y, norm=norm, steps=100, score=_dice, threshold=0.5,
                               loss=_ce, init_eps=margin, start=start)
    assert run.found.all()
    assert (run.norm >= margin * (1 - 1e-9)).all() and (run.norm <= margin * 1.01).all()


def test_bad_radius_is_refused():
    net, x, y = _problem([1.0])
    with pytest.raises(ValueError, match="init_eps must be > 0"):
        minimal_perturbation(net, x, y, norm="l2", steps=3, score=_dice, threshold=0.5,
                             loss=_ce, init_eps=0.0)
