"""The rse and CosPGD members of the evaluator by hand: the cosine, CosPGD and masked normalised
logit losses on tiny tensors, APGD on SegPGD's loss with its lambda schedule, PAdam against an
AMSGrad update written out here, SEA's shrinking radius, and the clamped minimal member."""
import math

import pytest
import torch
import torch.nn.functional as F

from nnunet_ima.evaluation.attacks import (SEA_RADIUS_STAGES, apgd, apgd_segpgd,
                                           apgd_segpgd_lambda, apgd_shrinking_radius,
                                           minimal_perturbation, padam, padam_learning_rate,
                                           run_attack, segpgd_loss)
from nnunet_ima.evaluation.segmentation_losses import (EXTRA_LOSSES, SEA_LOSSES, cosine_loss,
                                                       cospgd_loss, masked_norm_logit,
                                                       segmentation_loss)
from nnunet_ima.norms import per_sample_norm, project, random_in_ball
from core_models import Recorder

# ----------------------------------------------------------------------------- losses by hand

# One slice, two classes, four pixels: (3, 4) label 1 (correct), (1, -1) label 0 (correct),
# (2, 5) label 0 (wrong), and the ignore label 2 (not scored). A second slice: nnU-Net's -1
# (background) on (0, 2), wrong.
LOGITS = torch.tensor([[[[3.0, 1.0, 2.0, 7.0]], [[4.0, -1.0, 5.0, 7.0]]],
                       [[[0.0, 0.0, 0.0, 0.0]], [[2.0, 2.0, 2.0, 2.0]]]], dtype=torch.float64)
TARGET = torch.tensor([[[[1, 0, 0, 2]]], [[[-1, -1, -1, -1]]]])


def test_cosine_loss_by_hand():
    cos = [4 / 5, 1 / math.sqrt(2), 2 / math.sqrt(29)]       # cos(z, onehot(y)) = z_y / ||z||
    expected0 = sum(1 - c for c in cos) / 3                   # the ignore-label pixel unscored
    expected1 = 1 - 0.0                                       # z = (0, 2), label 0: cos = 0
    loss = cosine_loss(LOGITS, TARGET, ignore_label=2)
    assert loss.tolist() == pytest.approx([expected0, expected1], rel=1e-12)
    # Without an ignore label the fourth pixel is class 2 of a two-class slice: not allowed by
    # one_hot, so check a scored fourth pixel with label 1 instead.
    target = TARGET.clone()
    target[0, 0, 0, 3] = 1
    loss = cosine_loss(LOGITS, target)
    assert loss[0].item() == pytest.approx((sum(1 - c for c in cos) + 1 - 1 / math.sqrt(2)) / 4)


def _softmax(a, b):
    return math.exp(a) / (math.exp(a) + math.exp(b)), math.exp(b) / (math.exp(a) + math.exp(b))


def test_cospgd_loss_by_hand_and_its_weight_is_not_differentiated():
    pixels = [((3.0, 4.0), 1), ((1.0, -1.0), 0), ((2.0, 5.0), 0)]
    total = 0.0
    for (a, b), label in pixels:
        p = _softmax(a, b)
        cos = p[label] / math.hypot(*p)
        total += cos * -math.log(p[label])
    p = _softmax(0.0, 2.0)
    expected1 = p[0] / math.hypot(*p) * -math.log(p[0])
    logits = LOGITS.clone().requires_grad_(True)
    loss = cospgd_loss(logits, TARGET, ignore_label=2)
    assert loss.tolist() == pytest.approx([total / 3, expected1], rel=1e-12)
    # The gradient is the cosine times CE's gradient: the cosine is a weight, not a term.
    (grad,) = torch.autograd.grad(loss.sum(), logits)
    labels = torch.tensor([[[1, 0, 0, 0]], [[0, 0, 0, 0]]])
    ce = F.cross_entropy(logits, labels, reduction="none")
    with torch.no_grad():
        onehot = F.one_hot(labels, 2).movedim(-1, 1).double()
        weight = F.cosine_similarity(logits.softmax(1), onehot, dim=1)
        weight[0, 0, 3] = 0                                  # the ignore-label pixel
        count = torch.tensor([3.0, 4.0], dtype=torch.float64).view(2, 1, 1)
    (expected,) = torch.autograd.grad((ce * weight / count).sum(), logits)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-15)


def test_masked_norm_logit_by_hand():
    # Correct pixels: -z_y / ||z||; the wrong one (2, 5) and the ignore label count 0.
    expected0 = (-4 / 5 - 1 / math.sqrt(2) + 0.0) / 3
    expected1 = 0.0                                          # (0, 2) with label 0 is wrong
    loss = masked_norm_logit(LOGITS, TARGET, ignore_label=2)
    assert loss.tolist() == pytest.approx([expected0, expected1], rel=1e-12, abs=1e-15)
    # Scale-free: the logits times 10 give the same loss.
    assert masked_norm_logit(10 * LOGITS, TARGET, 2).tolist() == pytest.approx(loss.tolist())


def test_the_new_losses_are_registered_and_reach_attack_loss():
    assert set(EXTRA_LOSSES) == {"cos", "cospgd", "mask_norm_logit"}
    assert not set(EXTRA_LOSSES) & set(SEA_LOSSES)
    for name, function in {**SEA_LOSSES, **EXTRA_LOSSES}.items():
        assert segmentation_loss(name, 2)(LOGITS, TARGET).tolist() == \
            function(LOGITS, TARGET, 2).tolist()
    with pytest.raises(ValueError, match="loss must be one of"):
        segmentation_loss("dice", None)
    from nnunet_ima.evaluation.robustness import ATTACK_LOSSES, attack_loss
    for name in EXTRA_LOSSES:
        assert name in ATTACK_LOSSES
        assert attack_loss(name, 2)(LOGITS, TARGET).tolist() == \
            EXTRA_LOSSES[name](LOGITS, TARGET, 2).tolist()


# ----------------------------------------------------------------------------- small networks



def _net_and_slices(batch=3, classes=3, seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 6, 3, padding=1), torch.nn.Tanh(),
                              torch.nn.Conv2d(6, classes, 3, padding=1)).double()
    x = torch.randn(batch, 2, 6, 6, dtype=torch.float64)
    y = torch.randint(0, classes, (batch, 1, 6, 6))
    return net, x, y


def _ce(logits, target):
    return F.cross_entropy(logits, target[:, 0], reduction="none").mean(dim=(1, 2))


# ----------------------------------------------------------------------------- APGD on SegPGD

def test_apgd_segpgd_lambda_rises_from_zero_to_one_half():
    assert apgd_segpgd_lambda(0, 10) == 0.0
    assert apgd_segpgd_lambda(4, 10) == pytest.approx(0.2)
    assert apgd_segpgd_lambda(10, 10) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        apgd_segpgd_lambda(11, 10)
    with pytest.raises(ValueError):
        apgd_segpgd_lambda(-1, 10)


def test_apgd_segpgd_scores_iterate_k_with_lambda_k():
    """Every iterate's loss is SegPGD's at lambda_k = k / (2 steps): the run's start and best
    losses are recomputed here from the inputs the network saw."""
    net, x, y = _net_and_slices()
    steps = 8
    eps = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    start = random_in_ball(x, eps, "linf", torch.Generator().manual_seed(1))
    recorder = Recorder(net)
    run = apgd_segpgd(recorder, x, y, eps, start, norm="linf", steps=steps)
    assert len(recorder.seen) == steps + 1
    with torch.no_grad():
        values = torch.stack([segpgd_loss(net(point), y, k / (2 * steps))
                              for k, point in enumerate(recorder.seen)])      # (steps + 1, B)
    torch.testing.assert_close(run.loss_start, values[0], rtol=0, atol=1e-14)
    torch.testing.assert_close(run.loss_best, values.max(dim=0).values, rtol=0, atol=1e-14)
    # The schedule matters: with lambda fixed at 0 the best losses are not these.
    with torch.no_grad():
        fixed = torch.stack([segpgd_loss(net(p), y, 0.0) for p in recorder.seen]).max(0).values
    assert not torch.allclose(fixed, run.loss_best)


def test_apgd_calls_its_loss_schedule_once_per_iterate_in_order():
    net, x, y = _net_and_slices()
    asked = []

    def schedule(k):
        asked.append(k)
        return _ce
    run = apgd(net, x, y, 0.2, None, norm="l2", steps=5, loss=_ce, loss_schedule=schedule)
    assert asked == [0, 1, 2, 3, 4, 5]
    fixed = apgd(net, x, y, 0.2, None, norm="l2", steps=5, loss=_ce)
    assert torch.equal(run.x_best, fixed.x_best)     # a constant schedule is the fixed loss


def test_apgd_segpgd_member_returns_the_lowest_score_iterate_when_scored():
    net, x, y = _net_and_slices()
    eps = torch.full((3,), 0.3, dtype=torch.float64)
    score = lambda logits, target: (logits.argmax(1) == target[:, 0]).double().mean((1, 2))  # noqa
    run = apgd_segpgd(net, x, y, eps, None, norm="linf", steps=6, score=score)
    member = run_attack("apgd_segpgd", net, x, y, eps, None, norm="linf", steps=6, alpha=1.0,
                        loss=None, score=score)
    assert torch.equal(member, run.x_lowest_score)
    unscored = run_attack("apgd_segpgd", net, x, y, eps, None, norm="linf", steps=6, alpha=1.0,
                          loss=None)
    assert torch.equal(unscored, run.x_best)


def test_apgd_lowest_keeps_each_slices_lowest_score_iterate():
    """rse's APGD: the iterates of plain APGD, returning per slice the iterate of lowest score
    (checked against every input the network saw), not the highest-loss one."""
    net, x, y = _net_and_slices()
    eps = torch.full((3,), 0.3, dtype=torch.float64)
    score = lambda logits, target: (logits.argmax(1) == target[:, 0]).double().mean((1, 2))  # noqa
    recorder = Recorder(net)
    member = run_attack("apgd_lowest", recorder, x, y, eps, None, norm="linf", steps=6,
                        alpha=1.0, loss=_ce, score=score)
    assert len(recorder.seen) == 7                     # the start and the 6 iterates
    with torch.no_grad():
        seen = torch.stack([score(net(p), y) for p in recorder.seen])        # (7, B)
        assert torch.equal(score(net(member), y), seen.min(dim=0).values)
    highest = apgd(net, x, y, eps, None, norm="linf", steps=6, loss=_ce).x_best
    with torch.no_grad():
        assert (score(net(member), y) <= score(net(highest), y)).all()
    with pytest.raises(ValueError, match="score"):
        run_attack("apgd_lowest", net, x, y, eps, None, norm="linf", steps=2, alpha=1.0, loss=_ce)


# ----------------------------------------------------------------------------- PAdam

def _amsgrad_by_hand(net, x, y, eps, start, norm, steps, loss):
    """Adam with AMSGrad, maximising, written out (Reddi et al. 2018 with Adam's bias
    corrections as torch applies them), each slice's delta projected after every step."""
    beta1, beta2, tiny = 0.9, 0.999, 1e-8
    n = x[0].numel()
    lr = eps / 4 if norm == "linf" else eps / (4 * math.sqrt(n))
    lr = lr.view(-1, 1, 1, 1)
    delta = start.clone()
    m = torch.zeros_like(x)
    v = torch.zeros_like(x)
    v_max = torch.zeros_like(x)
    for t in range(1, steps + 1):
        point = (x + delta).requires_grad_(True)
        (g,) = torch.autograd.grad(loss(net(point), y).sum(), point)
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        v_max = torch.maximum(v_max, v)
        m_hat = m / (1 - beta1 ** t)
        denominator = v_max.sqrt() / math.sqrt(1 - beta2 ** t) + tiny
        delta = delta + lr * m_hat / denominator
        if norm == "linf":
            delta = torch.maximum(torch.minimum(delta, eps.view(-1, 1, 1, 1)),
                                  -eps.view(-1, 1, 1, 1))
        else:
            length = delta.flatten(1).norm(dim=1)
            delta = delta * torch.where(length > eps, eps / length, 1.0).view(-1, 1, 1, 1)
    return x + delta


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_padam_equals_amsgrad_by_hand(norm):
    net, x, y = _net_and_slices()
    for parameter in net.parameters():
        parameter.requires_grad_(False)
    eps = (torch.tensor([0.05, 0.1, 0.2], dtype=torch.float64) if norm == "linf"
           else torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64))
    start = random_in_ball(x, eps, norm, torch.Generator().manual_seed(3))
    steps = 6
    expected = _amsgrad_by_hand(net, x, y, eps, start, norm, steps, _ce)
    got = padam(net, x, y, eps, start, norm=norm, steps=steps, loss=_ce)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    size = per_sample_norm(got - x, norm)
    assert (size <= eps * (1 + 1e-12)).all()
    if norm == "linf":       # the projection acted: coordinates sit on the box
        assert ((got - x).abs() >= eps.view(-1, 1, 1, 1) * (1 - 1e-12)).any()
    # The loss went up from the start, and a slice alone follows the same iterates.
    with torch.no_grad():
        assert (_ce(net(got), y) > _ce(net(x + start), y)).all()
    alone = padam(net, x[1:2], y[1:2], eps[1:2], start[1:2], norm=norm, steps=steps, loss=_ce)
    torch.testing.assert_close(alone, got[1:2], rtol=0, atol=1e-14)
    # run_attack reaches it.
    assert torch.equal(run_attack("padam", net, x, y, eps, start, norm=norm, steps=steps,
                                  alpha=1.0, loss=_ce), got)


def test_padam_learning_rate_is_a_quarter_of_the_budget_per_step():
    eps = torch.tensor([8 / 255, 0.4])
    assert padam_learning_rate(eps, "linf", 100).tolist() == pytest.approx([2 / 255, 0.1])
    assert padam_learning_rate(eps, "l2", 100).tolist() == pytest.approx([0.2 / 255, 0.01])


# ----------------------------------------------------------------------------- SEA's radius

class Linear(torch.nn.Module):
    """The identity: the loss below is linear in the input, so each APGD stage's iterates sit
    on its own sphere (L2) or box corner (Linf) after the first step."""

    def forward(self, x):
        return x


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_sea_radius_schedule_by_hand(norm):
    """30 / 30 / 40 % of the steps at 2 eps, 1.5 eps, eps: int(0.3 * 10) = 3 steps, 3 steps, 4
    steps; each stage evaluates its start and its steps (4, 4 and 5 inputs)."""
    assert SEA_RADIUS_STAGES == ((0.3, 2.0), (0.3, 1.5), (0.4, 1.0))
    torch.manual_seed(0)
    x = torch.randn(2, 1, 3, 3, dtype=torch.float64)
    w = torch.randn(1, 1, 3, 3, dtype=torch.float64)
    eps = torch.tensor([0.1, 0.3], dtype=torch.float64)

    def loss(out, target):
        return (out * w).flatten(1).sum(1)

    def score(out, target):
        return -loss(out, target)
    recorder = Recorder(Linear())
    start = torch.zeros_like(x)
    final = apgd_shrinking_radius(recorder, x, None, eps, start, norm=norm, steps=10, loss=loss,
                                  score=score)
    sizes = torch.stack([per_sample_norm(p - x, norm) for p in recorder.seen])   # (13, 2)
    radii = [0.0, 2, 2, 2, 1.5, 1.5, 1.5, 1.5, 1, 1, 1, 1, 1]
    expected = torch.tensor(radii, dtype=torch.float64)[:, None] * eps[None]
    torch.testing.assert_close(sizes, expected, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(per_sample_norm(final - x, norm), eps, rtol=1e-12, atol=0)
    # Steps split as int(0.3 * steps), int(0.3 * steps), the rest: 7 steps -> 2, 2, 3.
    recorder.seen.clear()
    apgd_shrinking_radius(recorder, x, None, eps, start, norm=norm, steps=7, loss=loss,
                          score=score)
    assert len(recorder.seen) == 3 + 3 + 4


# ----------------------------------------------------------------------------- minimal member

def _dice(logits, target):
    # Foreground (class >= 1) Dice of the argmax, averaged over classes present, as the tables.
    pred = logits.argmax(1)
    labels = target[:, 0]
    values = []
    for c in range(1, logits.shape[1]):
        tp = ((pred == c) & (labels == c)).sum((1, 2)).double()
        fp = ((pred == c) & (labels != c)).sum((1, 2)).double()
        fn = ((pred != c) & (labels == c)).sum((1, 2)).double()
        values.append(torch.where(tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn).clamp_min(1),
                                  torch.nan))
    return torch.stack(values).nanmean(0).nan_to_num(1.0)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_the_minimal_member_is_its_attack_clamped_to_the_ball(norm):
    net, x, y = _net_and_slices()
    eps = (torch.tensor([0.05, 0.2, 0.0], dtype=torch.float64) if norm == "linf"
           else torch.tensor([0.5, 2.0, 0.0], dtype=torch.float64))
    start = random_in_ball(x, eps, norm, torch.Generator().manual_seed(5))
    adv = run_attack("minimal", net, x, y, eps, start, norm=norm, steps=10, alpha=1.0,
                     loss=_ce, score=_dice)
    size = per_sample_norm(adv - x, norm)
    assert (size <= eps * (1 + 1e-12)).all()
    assert size[2] == 0                           # a zero budget leaves the slice alone
    first = torch.where(eps > 0, eps, torch.ones_like(eps))
    run = minimal_perturbation(net, x, y, norm=norm, steps=10, score=_dice, threshold=0.01,
                               loss=_ce, init_eps=first, start=start)
    torch.testing.assert_close(adv, x + project(run.x_adv - x, eps, norm), rtol=0, atol=0)
    with pytest.raises(ValueError, match="score"):
        run_attack("minimal", net, x, y, eps, start, norm=norm, steps=2, alpha=1.0, loss=_ce)
