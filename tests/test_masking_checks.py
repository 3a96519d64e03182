"""Gradient-masking checks: they fire on a network whose gradients are masked on purpose and
stay silent on an ordinary one."""
import numpy as np
import pytest
import torch
from torch import nn

from nnunet_ima.evaluation.masking import (MaskingSettings, monotonicity_check, random_search,
                                           run_masking_checks)
from nnunet_ima.evaluation.robustness import AttackSettings, attack_loss, evaluate_levels
from nnunet_ima.norms import per_sample_norm

from core_models import tiny_segmentation_problem

NOISE = [0.0, 2.0, 6.0]


class RoundedInput(nn.Module):
    """The network on its input rounded to steps of 0.5: the same predictions up to the
    rounding, but a zero input gradient everywhere (the classic masked defence)."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x):
        return self.network(torch.round(x * 2) / 2)


def _checks(model, samples):
    attack = AttackSettings(steps=20, batch_size=6, seed=0)
    headline = evaluate_levels(model, samples, NOISE, attack, torch.device("cpu"))
    return run_masking_checks(model, samples, headline, attack, MaskingSettings(slices=6, queries=300),
                              torch.device("cpu"))


def test_checks_stay_silent_on_an_ordinary_model():
    model, samples = tiny_segmentation_problem()
    report = _checks(model, samples)
    assert report.warnings == []
    assert not report.black_box["fired"] and not report.unbounded["fired"]
    assert report.unbounded["tvdi"] < 0.05


def test_checks_fire_on_a_masked_model():
    fitted, samples = tiny_segmentation_problem()
    masked = RoundedInput(fitted.network.network)
    model, _ = tiny_segmentation_problem(network=masked)   # refit through the rounding
    report = _checks(model, samples)
    assert report.unbounded["fired"], report.unbounded
    assert report.black_box["fired"], report.black_box
    assert len(report.warnings) >= 2
    assert any("random search" in w for w in report.warnings)


def test_monotonicity_check_by_hand():
    assert not monotonicity_check({0.0: 0.9, 5.0: 0.5, 10.0: 0.505})["fired"]  # 0.5 points
    fired = monotonicity_check({0.0: 0.9, 5.0: 0.5, 10.0: 0.6})
    assert fired["fired"] and fired["rises"] == [
        {"from": 5.0, "to": 10.0, "tvdi_from": 0.5, "tvdi_to": 0.6}]


@pytest.mark.parametrize("norm, eps", [("l2", 3.0), ("linf", 0.5)])
def test_random_search_stays_in_the_ball_and_raises_the_loss(norm, eps):
    model, samples = tiny_segmentation_problem()
    x = torch.from_numpy(np.stack([s.image for s in samples]))
    y = torch.from_numpy(np.stack([s.label for s in samples])[:, None].astype(np.int64))
    loss = attack_loss("dc_ce", None)
    adv = random_search(model.network, x, y, eps, norm, loss, 200, torch.Generator().manual_seed(0))
    assert (per_sample_norm(adv - x, norm) <= eps * (1 + 1e-5)).all()
    with torch.no_grad():
        assert (loss(model.network(adv), y) > loss(model.network(x), y)).all()


def test_checks_run_on_slices_of_several_shapes():
    from nnunet_ima.evaluation.samples import SliceSample
    model, samples = tiny_segmentation_problem()
    # Cases of other sizes, as crops of several volumes give.
    mixed = samples[:3] + [SliceSample(s.case, s.index, s.image[:, :, :12].copy(),
                                       s.label[:, :12].copy()) for s in samples[3:]]
    report = _checks(model, mixed)
    assert report.black_box["slices"] == 6 and report.unbounded["slices"] == 6
    assert report.warnings == []
