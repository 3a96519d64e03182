"""The evaluator's APGD against torchattacks' APGD, an independent implementation (Croce and
Hein's own code, ported), on a small classifier: every iterate of the two runs, step rule,
momentum, projection and restarts included, must agree (skipped without torchattacks:
`pip install --no-deps torchattacks==3.5.1`, as .ci/run does).

The two follow the paper in slightly different words. torchattacks places its checkpoints with
``int(0.22 * steps)`` and a shrinking interval, the paper (and ``apgd_checkpoints``) with
``ceil(p_j * steps)``; for 100 steps both give 22, 41, 57, 70, 80, 87, 93, 99, so the runs use
100 steps. Both start from the start point that torchattacks draws (its first forward input).
"""
import pytest
import torch
import torch.nn.functional as F

from nnunet_ima.evaluation.attacks import apgd, apgd_checkpoints
from core_models import Recorder

torchattacks = pytest.importorskip(
    "torchattacks", reason="the APGD oracle is torchattacks' APGD: "
                           "pip install --no-deps torchattacks==3.5.1")

STEPS = 100




class Sine(torch.nn.Module):
    def forward(self, x):
        # A wavy loss with maxima inside the ball: slices need different numbers of halvings.
        return torch.sin(20 * x)


def ce(logits, y):
    return F.cross_entropy(logits, y, reduction="none")


@pytest.fixture
def problem():
    """A float64 3-class classifier on ``(16, 1, 4, 4)`` images in [0.3, 0.7] (no ball below
    reaches the [0, 1] clamp torchattacks applies) and its own predictions as labels."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 32), Sine(),
                              torch.nn.Linear(32, 3)).double()
    x = (0.3 + 0.4 * torch.rand(16, 1, 4, 4)).double()
    with torch.no_grad():
        y = net(x).argmax(dim=1)
    return Recorder(net), x, y


def _oracle_iterates(model: Recorder, x, y, norm: str, eps: float) -> torch.Tensor:
    """``(STEPS + 1, B, 1, 4, 4)``: the start and the iterates of torchattacks' APGD."""
    model.seen = []
    oracle = torchattacks.APGD(model, norm={"l2": "L2", "linf": "Linf"}[norm], eps=eps,
                               steps=STEPS, loss="ce", rho=0.75)
    torch.manual_seed(1)
    oracle.attack_single_run(x, y)
    return torch.stack(model.seen)


def _our_iterates(model: Recorder, x, y, norm: str, eps: float, start, **kwargs):
    model.seen = []
    run = apgd(model, x, y, torch.full((len(x),), eps, dtype=x.dtype), start, norm=norm,
               steps=STEPS, loss=ce, **kwargs)
    return torch.stack(model.seen), run


def test_the_checkpoints_are_torchattacks_at_100_steps():
    # torchattacks: first interval int(0.22 * 100) = 22, shrinking by int(0.03 * 100) = 3 down
    # to int(0.06 * 100) = 6.
    intervals, k = [], 22
    while sum(intervals) + k <= STEPS:
        intervals.append(k)
        k = max(k - 3, 6)
    assert apgd_checkpoints(STEPS) == [sum(intervals[:i + 1]) for i in range(len(intervals))]


@pytest.mark.parametrize("norm, eps, atol", [("linf", 0.1, 1e-6), ("linf", 0.2, 1e-6),
                                             ("l2", 0.2, 1e-4)])
def test_apgd_iterates_equal_torchattacks(problem, norm, eps, atol):
    """Linf iterates agree to rounding; L2 to 1e-4 (torchattacks adds 1e-12 to each norm it
    divides by, which a hundred steps amplify to about 2e-6 here)."""
    model, x, y = problem
    theirs = _oracle_iterates(model, x, y, norm, eps)
    ours, run = _our_iterates(model, x, y, norm, eps, theirs[0] - x)
    assert ours.shape == theirs.shape                 # the start and 100 iterates each
    assert (ours - theirs).abs().max() <= atol
    halvings = torch.log2(2 * eps / run.step_size).round()
    assert len(set(halvings.tolist())) >= 2, "the problem must make slices halve differently"


def test_the_comparison_sees_a_different_step_rule(problem):
    """The agreement above is not that of any APGD: another ``rho`` (condition 1) or momentum
    leaves torchattacks' iterates."""
    model, x, y = problem
    theirs = _oracle_iterates(model, x, y, "linf", 0.1)
    for other in ({"rho": 0.5}, {"rho": 0.9}, {"momentum": 0.5}):
        ours, _ = _our_iterates(model, x, y, "linf", 0.1, theirs[0] - x, **other)
        assert (ours - theirs).abs().max() > 1e-2, other
