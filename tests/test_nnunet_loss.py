"""The per-sample nnU-Net loss against nnU-Net's own DC_and_CE_loss."""
import numpy as np
import pytest
import torch
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

from nnunet_ima.nnunet.loss import PerSampleDiceCE, deep_supervision_weights, dice_ce_per_sample


# nnU-Net accumulates its Dice sums in float32, hence tolerances of 1e-6 against our float64.
def _nnunet_loss(batch_dice, ignore_label=None):
    return DC_and_CE_loss({"batch_dice": batch_dice, "smooth": 1e-5, "do_bg": False, "ddp": False},
                          {}, weight_ce=1, weight_dice=1, ignore_label=ignore_label,
                          dice_class=MemoryEfficientSoftDiceLoss)


def _batch(b=4, c=3, size=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, c, size, size, generator=g, dtype=torch.float64)
    target = torch.randint(0, c, (b, 1, size, size), generator=g)
    return logits, target


def test_batch_mean_equals_nnunet_loss_without_batch_dice():
    logits, target = _batch()
    ours = dice_ce_per_sample(logits, target)
    assert ours.shape == (4,)
    assert ours.mean().item() == pytest.approx(_nnunet_loss(False)(logits, target).item(), abs=1e-6)


def test_each_sample_equals_nnunet_loss_on_that_sample_alone():
    logits, target = _batch()
    ours = dice_ce_per_sample(logits, target)
    for b in range(4):
        ref = _nnunet_loss(True)(logits[b:b + 1], target[b:b + 1]).item()
        assert ours[b].item() == pytest.approx(ref, abs=1e-6)


def test_ignore_label_on_one_sample_matches_nnunet():
    logits, target = _batch(b=1, c=3)
    target[:, :, :4] = 3  # ignore label = 3 (one past the classes)
    ours = dice_ce_per_sample(logits, target, ignore_label=3)
    assert ours.item() == pytest.approx(_nnunet_loss(True, ignore_label=3)(logits, target).item(),
                                        abs=1e-6)


def test_deep_supervision_weights_and_wrapper_agree():
    assert np.allclose(deep_supervision_weights(4), np.array([1, .5, .25, 0]) / 1.75)
    outputs = [_batch(size=s, seed=s)[0] for s in (16, 8, 4, 2)]
    targets = [_batch(size=s, seed=s)[1] for s in (16, 8, 4, 2)]
    ours = PerSampleDiceCE()(outputs, targets)
    ref = DeepSupervisionWrapper(_nnunet_loss(False), deep_supervision_weights(4))(outputs, targets)
    assert ours.mean().item() == pytest.approx(ref.item(), abs=1e-6)
    full = PerSampleDiceCE(full_resolution_only=True)(outputs, targets)
    assert torch.allclose(full, dice_ce_per_sample(outputs[0], targets[0]))


def test_samples_do_not_interact():
    """The gradient of sample b's loss does not reach sample b' (what per-sample PGD needs)."""
    logits, target = _batch()
    logits.requires_grad_(True)
    dice_ce_per_sample(logits, target)[1].backward()
    assert logits.grad[1].abs().sum() > 0
    assert logits.grad[[0, 2, 3]].abs().sum() == 0
