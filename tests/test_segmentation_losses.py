"""SEA's losses of the ensemble's APGD members, against hand-computed values."""
import math

import pytest
import torch

from nnunet_ima.evaluation.segmentation_losses import (JS_MAXIMUM, balanced_masked_ce,
                                                       class_balance_weights, js_divergence,
                                                       masked_ce, sea_loss)


def _logits(*pixels):
    """``(1, K, 1, N)`` logits from N per-pixel logit vectors."""
    return torch.tensor(pixels, dtype=torch.float64).T.reshape(1, len(pixels[0]), 1, len(pixels))


def test_masked_ce_counts_correct_pixels_and_divides_by_all_scored():
    logits = _logits((2.0, 0.0), (2.0, 0.0), (0.0, 3.0))
    target = torch.tensor([[[0, 1, 1]]])           # pixel 0 right, 1 wrong, 2 right
    ce0 = math.log(1 + math.exp(-2.0))
    ce2 = math.log(1 + math.exp(-3.0))
    assert masked_ce(logits, target).item() == pytest.approx((ce0 + ce2) / 3)
    # pixel 2 ignored: it leaves the sum and the count
    assert masked_ce(logits, target, ignore_label=1).item() == pytest.approx(ce0 / 1)


def test_masked_ce_gives_wrong_pixels_no_gradient():
    logits = _logits((2.0, 0.0), (2.0, 0.0)).requires_grad_(True)
    masked_ce(logits, torch.tensor([[[0, 1]]])).sum().backward()
    assert logits.grad[0, :, 0, 1].abs().max() == 0
    assert logits.grad[0, :, 0, 0].abs().max() > 0


def test_class_balance_weights():
    labels = torch.tensor([[[0, 0, 0, 1]]])
    scored = torch.ones_like(labels, dtype=torch.bool)
    w = class_balance_weights(labels, scored, num_classes=3)
    assert w.tolist() == [[[0.25, 0.25, 0.25, 0.75]]]


def test_balanced_masked_ce_weights_the_small_class():
    logits = _logits((2.0, 0.0), (2.0, 0.0), (2.0, 0.0), (0.0, 1.0))
    target = torch.tensor([[[0, 0, 0, 1]]])
    ce_bg = math.log(1 + math.exp(-2.0))
    ce_fg = math.log(1 + math.exp(-1.0))
    expected = (3 * 0.25 * ce_bg + 0.75 * ce_fg) / 4
    assert balanced_masked_ce(logits, target).item() == pytest.approx(expected)


def test_js_divergence_hand_computed_and_bounded():
    # p = (1/2, 1/2) against q = (1, 0): m = (3/4, 1/4)
    logits = _logits((0.0, 0.0))
    kl_p = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    kl_q = math.log(1 / 0.75)
    assert js_divergence(logits, torch.tensor([[[0]]])).item() == pytest.approx((kl_p + kl_q) / 2)
    confident_right = _logits((60.0, -60.0))
    confident_wrong = _logits((-60.0, 60.0))
    assert js_divergence(confident_right, torch.tensor([[[0]]])).item() == pytest.approx(0, abs=1e-12)
    assert js_divergence(confident_wrong, torch.tensor([[[0]]])).item() == pytest.approx(JS_MAXIMUM)


def test_losses_are_per_slice():
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 5, 6)
    target = torch.randint(0, 4, (3, 1, 5, 6))
    for name in ("mask_ce", "bal_mask_ce", "js"):
        loss = sea_loss(name, ignore_label=None)
        batch = loss(logits, target)
        alone = torch.cat([loss(logits[i:i + 1], target[i:i + 1]) for i in range(3)])
        assert batch.shape == (3,)
        assert torch.allclose(batch, alone)
    with pytest.raises(ValueError, match="loss must be one of"):
        sea_loss("dice", None)


# ----------------------------------------------------------------------------- the label mask
# nnunet_ima.label_mask: nnU-Net's -1 (outside the nonzero region) is background, the ignore
# label counts nowhere.

def test_minus_one_is_background_and_the_ignore_label_is_unscored_in_every_loss():
    # Pixels: background right (2 vs 0), -1 outside the crop (right as background: 2 vs 0),
    # the ignore label 2 (would be wrong and expensive if scored), foreground right (0 vs 1).
    logits = _logits((2.0, 0.0), (2.0, 0.0), (0.0, 9.0), (0.0, 1.0))
    target = torch.tensor([[[0, -1, 2, 1]]])
    ce_bg = math.log(1 + math.exp(-2.0))
    ce_fg = math.log(1 + math.exp(-1.0))
    # 3 scored pixels, classes (0, 0, 1): balance weights 1 - 2/3 and 1 - 1/3.
    assert masked_ce(logits, target, ignore_label=2).item() == \
        pytest.approx((2 * ce_bg + ce_fg) / 3)
    assert balanced_masked_ce(logits, target, ignore_label=2).item() == pytest.approx(
        (2 * ce_bg / 3 + 2 * ce_fg / 3) / 3)
    as_background = torch.tensor([[[0, 0, 2, 1]]])
    for name in ("mask_ce", "bal_mask_ce", "js"):
        loss = sea_loss(name, ignore_label=2)
        assert torch.equal(loss(logits, target), loss(logits, as_background)), name


def test_js_divergence_skips_the_ignore_label():
    # The (0, 0) pixel of label 0 as in the hand computation above; the ignore label's pixel
    # (confidently wrong, JS = log 2 if scored) leaves the sum and the count.
    logits = _logits((0.0, 0.0), (-60.0, 60.0))
    kl_p = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    kl_q = math.log(1 / 0.75)
    assert js_divergence(logits, torch.tensor([[[0, 3]]]), ignore_label=3).item() == \
        pytest.approx((kl_p + kl_q) / 2)
    assert js_divergence(logits, torch.tensor([[[0, 0]]])).item() == \
        pytest.approx(((kl_p + kl_q) / 2 + JS_MAXIMUM) / 2)


def test_a_slice_without_scored_pixels_scores_zero_and_pulls_nothing():
    logits = _logits((1.0, 0.0), (0.0, 1.0)).requires_grad_(True)
    target = torch.tensor([[[2, 2]]])
    for name in ("mask_ce", "bal_mask_ce", "js"):
        value = sea_loss(name, ignore_label=2)(logits, target)
        assert value.tolist() == [0.0], name
        (grad,) = torch.autograd.grad(value.sum(), logits)
        assert grad.abs().max() == 0, name
