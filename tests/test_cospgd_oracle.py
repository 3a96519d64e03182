"""The evaluator's SegPGD and CosPGD against the ``cospgd`` package (Agnihotri, Jung and Keuper's
own step and loss-scaling functions), on the same small network, start and steps: every iterate
must agree, in Linf and in L2 (skipped without the package: `pip install --no-deps
cospgd==0.1.3`, as .ci/run does).

The loops below are the package's attack loop written with its functions: ``segpgd_scale`` /
``cospgd_scale`` on the pixel CE, then ``Attack.step_inf`` / ``Attack.step_l2``. Where the two
differ only in words they are matched here:

* the package's step is ``alpha`` in input units; ours is ``alpha * eps / steps`` (times the
  sign, or the unit-L2 gradient), so the package gets ``alpha_pkg = alpha * eps / steps``;
* the package clamps every iterate to ``[0, 1]``; the inputs stay well inside (0.3 to 0.7 with
  small budgets) so that its clamp never acts, which the test checks;
* the package's SegPGD loss sums over the batch and divides by ``H * W``; ours is each slice's
  mean, summed over the batch for the gradient: the same gradient;
* no random start (the package draws its own with the global generator).
"""
import pytest
import torch
import torch.nn.functional as F

from nnunet_ima.evaluation.attacks import run_attack
from nnunet_ima.evaluation.segmentation_losses import segmentation_loss
from core_models import Recorder

cospgd = pytest.importorskip(
    "cospgd", reason="the SegPGD / CosPGD oracle is the cospgd package: "
                     "pip install --no-deps cospgd==0.1.3")
Attack = cospgd.Attack

STEPS = 6
ALPHA = 2.5
CLASSES = 3




def _problem():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 6, 3, padding=1), torch.nn.Tanh(),
                              torch.nn.Conv2d(6, CLASSES, 3, padding=1)).double()
    x = 0.3 + 0.4 * torch.rand(2, 1, 8, 8, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (2, 8, 8))
    return net, x, y


def _budget(norm):
    # Per-slice budgets (different per slice, as the evaluator's levels may be).
    return torch.tensor([0.02, 0.05] if norm == "linf" else [0.2, 0.35], dtype=torch.float64)


def _package_loop(net, x, y, eps, norm, scale):
    """The package's attack loop; ``scale(pred, pixel_ce, iteration) -> scalar loss``."""
    view = eps.view(-1, 1, 1, 1)
    alpha = ALPHA * view / STEPS
    x_adv = x.clone()
    iterates = [x_adv.clone()]
    for iteration in range(STEPS):
        x_adv = x_adv.clone().requires_grad_(True)
        pred = net(x_adv)
        pixel_ce = F.cross_entropy(pred, y, reduction="none")
        (grad,) = torch.autograd.grad(scale(pred, pixel_ce, iteration), x_adv)
        step = Attack.step_inf if norm == "linf" else Attack.step_l2
        x_adv = step(x_adv, view, grad, x, alpha, targeted=False)
        iterates.append(x_adv.clone())
    return torch.stack(iterates)


def _our_iterates(name, net, x, y, eps, norm, loss):
    recorder = Recorder(net)
    last = run_attack(name, recorder, x, y[:, None], eps, None, norm=norm, steps=STEPS,
                      alpha=ALPHA, loss=loss)
    assert len(recorder.seen) == STEPS       # iterates 0..STEPS-1 go through the network
    return torch.stack(recorder.seen + [last])


def _assert_same_iterates(ours, theirs, x, eps, norm):
    assert ours.shape == theirs.shape == (STEPS + 1, *x.shape)
    # The package's [0, 1] clamp never acted: every iterate is strictly inside.
    assert theirs.min() > 0.05 and theirs.max() < 0.95
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)
    # The iterates move (the comparison is not between two copies of x) and fill the ball.
    size = (theirs[-1] - x).flatten(1)
    size = size.abs().amax(1) if norm == "linf" else size.norm(dim=1)
    assert (size > 0.5 * eps).all() and (size <= eps * (1 + 1e-12)).all()


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_segpgd_equals_the_packages_segpgd_iterate_by_iterate(norm):
    net, x, y = _problem()
    eps = _budget(norm)

    def scale(pred, pixel_ce, iteration):
        return Attack.segpgd_scale(pred, y, pixel_ce, iteration, STEPS)
    theirs = _package_loop(net, x, y, eps, norm, scale)
    ours = _our_iterates("segpgd", net, x, y, eps, norm, loss=None)
    _assert_same_iterates(ours, theirs, x, eps, norm)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_on_the_cospgd_loss_equals_the_packages_cospgd_iterate_by_iterate(norm):
    net, x, y = _problem()
    eps = _budget(norm)

    def scale(pred, pixel_ce, iteration):
        return Attack.cospgd_scale(pred, y, pixel_ce, num_classes=CLASSES).mean()
    theirs = _package_loop(net, x, y, eps, norm, scale)
    ours = _our_iterates("pgd", net, x, y, eps, norm, loss=segmentation_loss("cospgd", None))
    _assert_same_iterates(ours, theirs, x, eps, norm)


def test_the_cospgd_weighting_changes_the_iterates():
    """The comparison can tell the CosPGD loss from plain CE: on CE alone the iterates differ."""
    net, x, y = _problem()
    eps = _budget("linf")

    def scale(pred, pixel_ce, iteration):
        return Attack.cospgd_scale(pred, y, pixel_ce, num_classes=CLASSES).mean()
    theirs = _package_loop(net, x, y, eps, "linf", scale)

    def ce(logits, target):
        return F.cross_entropy(logits, target[:, 0], reduction="none").mean(dim=(1, 2))
    plain = _our_iterates("pgd", net, x, y, eps, "linf", loss=ce)
    assert (plain[-1] - theirs[-1]).abs().max() > 1e-3
