"""The adversarial step of the core against hand-computed answers on a one-pixel classifier.

``SignNet`` predicts class 1 while the pixel is > 0. A sample of value ``c > 0`` and label 1 is
therefore correct, and its boundary lies at the L2 distance ``c``: BPGD at margin ``E`` crosses
when ``c < E`` and returns a point just short of the boundary (``boundary="last_correct"``).
Without random start, PGD moves the pixel straight down by ``alpha * E / steps`` per step.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nnunet_ima.adversarial_step import (AdversarialBatch, IMARecipe, IMAStep, MarginEvidence,
                                         PGDStep, PRINTED)
from nnunet_ima.attacks import argmax_correct
from nnunet_ima.config import AttackConfig, IMAConfig
from nnunet_ima.losses import ima_loss
from nnunet_ima.margins import MarginStore

ATTACK = AttackConfig(steps=10, alpha=4.0, random_start=False)  # steps of 0.4 * E
IMA = IMAConfig(eps_max=10.0, delta=1.0, beta=0.5, binary_steps=8)
BRACKET = 0.4 / 2 ** 8  # one PGD step at E = 1, halved binary_steps times
AUTHORS = IMARecipe("all", "all", "inner_sphere")


class SignNet(nn.Module):
    """Logits ``(-x, x)`` of a one-pixel input ``(B, 1)``: class 1 while ``x > 0``."""

    def forward(self, x):
        return torch.cat([-x, x], dim=1)


class ConstantNet(nn.Module):
    """Always class 1, with a zero input gradient: PGD stays at its start point."""

    def forward(self, x):
        zero = 0 * x.flatten(1).sum(1, keepdim=True)
        return torch.cat([zero, zero + 1], dim=1)


def _batch():
    # 0.3 and 0.6 cross within the margin 1, 2.0 does not, -1.0 is wrong without attack.
    x = torch.tensor([[0.3], [0.6], [2.0], [-1.0]])
    y = torch.ones(4, dtype=torch.long)
    return x, y, ["a", "b", "c", "d"]


def _run(recipe, network=None, margins=None):
    x, y, keys = _batch()
    network = network or SignNet()
    margins = margins or IMA.make_margin_store(10)  # every margin starts at delta = 1
    step = IMAStep(IMA, ATTACK, argmax_correct, recipe=recipe)
    return x, y, step(network, x, y, network(x).detach(), keys, margins)


def test_printed_recipe_trains_on_the_crossed_samples_with_weight_beta_m_over_b():
    x, y, adversarial = _run(PRINTED)
    evidence = adversarial.evidence
    assert evidence.clean_correct.tolist() == [True, True, True, False]
    assert evidence.crossed.tolist() == [True, True, False, False]
    assert evidence.attacked == 3 and evidence.crossed_correct == 2
    assert adversarial.weight == 0.5 * 2 / 4  # beta * M / B
    # The boundary points of samples 0 and 1, still correct, at most one bracket short of it.
    assert adversarial.x.shape == (2, 1) and adversarial.target.tolist() == [1, 1]
    assert bool(argmax_correct(SignNet()(adversarial.x), adversarial.target).all())
    assert bool((adversarial.x > 0).all() and (adversarial.x <= BRACKET).all())
    for c, d in zip(x[:2, 0].tolist(), evidence.distance[:2].tolist()):
        assert c - BRACKET <= d <= c
    # Sample 2 was attacked and stopped at its last iterate, on its margin; 3 was not attacked.
    assert evidence.distance[2:].tolist() == pytest.approx([1.0, 0.0], abs=1e-6)


def test_authors_recipe_trains_on_every_attacked_sample_with_weight_beta():
    x, y, adversarial = _run(IMARecipe(attack_slices="all", adversarial_term="all"))
    evidence = adversarial.evidence
    # The clean-wrong sample is attacked too and "crosses" at its start point, at distance 0;
    # only the crossings of clean-correct samples are counted.
    assert evidence.crossed.tolist() == [True, True, False, True]
    assert evidence.attacked == 4 and evidence.crossed_correct == 2
    assert evidence.distance[3].item() == 0.0
    assert adversarial.weight == 0.5  # beta
    assert adversarial.x.shape == (4, 1) and adversarial.target.tolist() == [1, 1, 1, 1]
    # The sample that did not cross is trained on at its last PGD iterate, on its margin 1.
    assert adversarial.x[2, 0].item() == pytest.approx(2.0 - 1.0, abs=1e-6)
    assert adversarial.x[3, 0].item() == -1.0


def test_no_correct_sample_gives_an_empty_term_of_weight_zero():
    x = torch.tensor([[-0.5], [-2.0]])
    y = torch.ones(2, dtype=torch.long)
    step = IMAStep(IMA, ATTACK)
    adversarial = step(SignNet(), x, y, SignNet()(x), ["a", "b"], IMA.make_margin_store(10))
    assert adversarial.x.shape == (0, 1) and adversarial.target.shape == (0,)
    assert adversarial.weight == 0.0
    assert adversarial.evidence.attacked == 0 and adversarial.evidence.crossed_correct == 0
    assert adversarial.evidence.clean_correct.tolist() == [False, False]


def test_the_evidence_is_what_the_margin_store_records():
    _, _, adversarial = _run(PRINTED)
    store = MarginStore(eps_max=10.0, delta=1.0)
    adversarial.evidence.record(store)
    records = store.pending_records()
    assert records["a"][0][:2] == (True, pytest.approx(adversarial.evidence.distance[0].item()))
    assert records["c"] == [(False, 0.0, True)]   # correct, did not cross: expands
    assert records["d"] == [(False, 0.0, False)]  # clean-wrong: shrinks
    # The step itself leaves the store alone: the records come from MarginEvidence.record.
    untouched = IMA.make_margin_store(10)
    _run(PRINTED, margins=untouched)
    assert untouched.pending_records() == {} and untouched.epoch == 0


def test_inner_sphere_start_radius_is_max_of_margin_minus_delta_and_delta():
    store = MarginStore(eps_max=10.0, delta=1.0)
    for _ in range(2):  # "a" expands twice: E = 1 + 1 + 1 = 3; "b" keeps E = delta = 1
        store.record(["a"], [False], [0.0], [True])
        store.end_epoch()
    x = torch.zeros(2, 1, 4, 4)
    y = torch.ones(2, dtype=torch.long)
    attack = AttackConfig(steps=1, random_start=True)
    step = IMAStep(IMA, attack, argmax_correct, recipe=AUTHORS)
    net = ConstantNet()  # never crosses, never moves: the term holds the start points
    torch.manual_seed(0)
    adversarial = step(net, x, y, net(x), ["a", "b"], store)
    radius = (adversarial.x - x).flatten(1).norm(dim=1)
    assert radius.tolist() == pytest.approx([3.0 - 1.0, 1.0], rel=1e-5)  # max(E - delta, delta)
    ball = IMAStep(IMA, attack, argmax_correct, recipe=IMARecipe("all", "all", "ball"))
    in_ball = (ball(net, x, y, net(x), ["a", "b"], store).x - x).flatten(1).norm(dim=1)
    assert bool((in_ball <= torch.tensor([3.0, 1.0]) + 1e-5).all())


def test_the_printed_step_with_ima_loss_is_algorithm_1():
    """Classification's IMA: ``ima_loss`` over per-sample losses equals the batch means weighted
    by ``1 - beta`` and the step's weight ``beta * M / B``."""
    x, y, adversarial = _run(PRINTED)
    clean = F.cross_entropy(SignNet()(x), y, reduction="none")
    adv = F.cross_entropy(SignNet()(adversarial.x), adversarial.target, reduction="none")
    expected = (1 - IMA.beta) * clean.mean() + adversarial.weight * adv.mean()
    assert float(ima_loss(clean, adv, IMA.beta)) == pytest.approx(float(expected), rel=1e-6)


def test_pgd_step_attacks_every_sample_at_the_fixed_budget():
    x, y, _ = _batch()
    adversarial = PGDStep(0.5, ATTACK, weight=0.5)(SignNet(), x, y)
    assert isinstance(adversarial, AdversarialBatch) and adversarial.evidence is None
    assert adversarial.weight == 0.5 and adversarial.target is y
    # 10 steps of 0.2 down, projected on the ball of radius 0.5.
    assert adversarial.x[:, 0].tolist() == pytest.approx([-0.2, 0.1, 1.5, -1.5], abs=1e-6)


def test_pgd_step_draws_its_start_from_the_generator():
    x, y, _ = _batch()
    step = PGDStep(0.5, AttackConfig(steps=2), weight=0.5)
    first = step(SignNet(), x, y, torch.Generator().manual_seed(3)).x
    again = step(SignNet(), x, y, torch.Generator().manual_seed(3)).x
    assert torch.equal(first, again)


@pytest.mark.parametrize("make, message", [
    (lambda: IMARecipe(attack_slices="wrong"), "attack_slices must be one of ('correct', 'all')"),
    (lambda: IMARecipe(adversarial_term="some"), "adversarial_term must be one of"),
    (lambda: IMARecipe(start_point="cube"), "start_point must be one of ('ball', 'inner_sphere')"),
    (lambda: PGDStep(1.0, ATTACK, weight=1.5), "weight must be in [0, 1], got 1.5"),
])
def test_bad_settings_name_the_setting_and_its_values(make, message):
    with pytest.raises(ValueError) as error:
        make()
    assert message in str(error.value)


def test_one_key_per_sample():
    x, y, _ = _batch()
    with pytest.raises(ValueError, match="3 sample keys for a batch of 4: pass one key per sample"):
        IMAStep(IMA, ATTACK)(SignNet(), x, y, SignNet()(x), ["a", "b", "c"],
                             IMA.make_margin_store(10))


def test_margin_evidence_is_a_plain_record():
    evidence = MarginEvidence(["k"], torch.tensor([True]), torch.tensor([False]),
                              torch.tensor([0.0]), attacked=1, crossed_correct=0)
    store = MarginStore(eps_max=2.0, delta=1.0)
    evidence.record(store)
    assert store.end_epoch().fraction_expanded == 1.0 and store.margin("k") == 2.0
