"""The one convention of scored pixels (nnunet_ima.label_mask), and the places that use it:
nnU-Net's Dice + CE per sample, the Dice-threshold correctness and the evaluator's counts."""
import pytest
import torch

from nnunet_ima.label_mask import (OUTSIDE_NONZERO, label_map, scored_label_maps, scored_labels,
                                   scored_mean)
from nnunet_ima.losses import DiceThresholdCorrect
from nnunet_ima.nnunet.loss import dice_ce_per_sample


def test_scored_labels_maps_minus_one_to_background_and_unscores_the_ignore_label():
    labels = torch.tensor([[0, 1, OUTSIDE_NONZERO, 3, 2]])
    safe, scored = scored_labels(labels, ignore_label=3)
    assert safe.tolist() == [[0, 1, 0, 0, 2]]
    assert scored.tolist() == [[True, True, True, False, True]]
    safe, scored = scored_labels(labels, ignore_label=None)
    assert safe.tolist() == [[0, 1, 0, 3, 2]]
    assert scored.all()


def test_minus_one_cannot_be_the_ignore_label():
    with pytest.raises(ValueError, match="background outside the nonzero region"):
        scored_labels(torch.zeros(1, 2, dtype=torch.long), ignore_label=OUTSIDE_NONZERO)


def test_label_map_drops_the_channel_axis():
    logits = torch.zeros(2, 3, 4, 5)
    assert label_map(torch.zeros(2, 1, 4, 5, dtype=torch.int16), logits).shape == (2, 4, 5)
    assert label_map(torch.zeros(2, 4, 5, dtype=torch.int16), logits).dtype == torch.long


def test_scored_mean_by_hand():
    values = torch.tensor([[1.0, 2.0, 4.0], [3.0, 5.0, 7.0]])
    scored = torch.tensor([[True, False, True], [False, False, False]])
    assert scored_mean(values, scored).tolist() == [2.5, 0.0]     # (1 + 4) / 2; none: 0


def test_scored_label_maps_count_ignored_pixels_nowhere():
    pred = torch.tensor([[1, 1, 2, 2]])
    labels = torch.tensor([[1, 3, OUTSIDE_NONZERO, 2]])
    p, t = scored_label_maps(pred, labels, ignore_label=3)
    assert p.tolist() == [[1, 0, 2, 2]]          # the ignored pixel: background in both
    assert t.tolist() == [[1, 0, 0, 2]]          # -1: background truth, so pred 2 there is FP


def test_dice_ce_treats_minus_one_as_background():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 6, 6)
    target = torch.randint(0, 3, (2, 1, 6, 6))
    target[:, :, 0] = 0
    outside = target.clone()
    outside[:, :, 0] = OUTSIDE_NONZERO
    assert torch.equal(dice_ce_per_sample(logits, outside), dice_ce_per_sample(logits, target))
    assert torch.equal(dice_ce_per_sample(logits, outside, ignore_label=5),
                       dice_ce_per_sample(logits, target, ignore_label=5))


def test_dice_threshold_correctness_skips_the_ignore_label():
    # Two classes, one slice of four pixels: foreground 1 predicted at pixels 0 and 1; the truth
    # has foreground at pixel 0, the ignore label 2 at pixel 1.
    logits = torch.tensor([[[[0.0, 0.0, 1.0, 1.0]], [[1.0, 1.0, 0.0, 0.0]]]])   # (1, 2, 1, 4)
    target = torch.tensor([[[[1, 2, 0, 0]]]])
    correct = DiceThresholdCorrect(0.9, ignore_label=2)
    assert correct.dice(logits, target).tolist() == [1.0]      # pixel 1 counts nowhere
    as_background = torch.tensor([[[[1, 0, 0, 0]]]])
    assert DiceThresholdCorrect(0.9).dice(logits, as_background).tolist() == \
        pytest.approx([2 / 3])                  # 2 TP / (2 TP + FP + FN): TP 1, FP 1
