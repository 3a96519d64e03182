"""Dice, TVDI, ADI and the robustness AUC against hand-computed values and nnU-Net's counting."""
import numpy as np
import pytest
import torch
from nnunetv2.evaluation.evaluate_predictions import compute_tp_fp_fn_tn
from nnunetv2.training.loss.dice import get_tp_fp_fn_tn

from nnunet_ima.metrics import (adi, confusion_counts, per_class_dice, robustness_auc, slice_dice,
                                tvdi)


def maps(*rows):
    return torch.tensor(rows)


def test_perfect_disjoint_and_empty_cases():
    gt = torch.zeros(4, 4, 4, dtype=torch.long)
    pred = torch.zeros_like(gt)
    gt[0, :2, :2] = 1; pred[0, :2, :2] = 1          # perfect
    gt[1, :2, :2] = 1; pred[1, 2:, 2:] = 1          # disjoint
    gt[2, :2, :2] = 1                                # empty prediction
    # slice 3: empty ground truth and empty prediction
    d = per_class_dice(pred, gt, num_classes=3)
    assert d.tolist() == [[1, 1], [0, 1], [0, 1], [1, 1]]  # class 2 absent everywhere -> 1
    assert slice_dice(pred, gt, 3).tolist() == [1, 0, 0, 1]


def test_empty_ground_truth_with_false_positives():
    gt = torch.zeros(1, 4, 4, dtype=torch.long)
    pred = gt.clone()
    pred[0, 0, 0] = 2
    assert per_class_dice(pred, gt, 3).tolist() == [[1.0, 0.0]]
    assert slice_dice(pred, gt, 3).item() == 0.0


def test_multiclass_hand_computed():
    gt = torch.tensor([[[1, 1, 2, 2],
                        [1, 1, 2, 0],
                        [0, 0, 0, 0]]])
    pred = torch.tensor([[[1, 1, 1, 2],
                          [1, 0, 2, 2],
                          [0, 0, 0, 0]]])
    tp, fp, fn = confusion_counts(pred, gt, 3)
    assert tp.tolist() == [[3, 2]] and fp.tolist() == [[1, 1]] and fn.tolist() == [[1, 1]]
    assert per_class_dice(pred, gt, 3)[0].tolist() == pytest.approx([6 / 8, 4 / 6])
    assert slice_dice(pred, gt, 3).item() == pytest.approx((6 / 8 + 4 / 6) / 2)
    assert slice_dice(pred, gt, 3, reduce="max").item() == pytest.approx(6 / 8)
    assert slice_dice(pred, gt, 3, reduce="min").item() == pytest.approx(4 / 6)
    # (B, 1, H, W) label maps give the same counts
    tp1, _, _ = confusion_counts(pred[:, None], gt[:, None], 3)
    assert torch.equal(tp, tp1)


def test_tvdi_and_adi_hand_computed():
    # slice A: class 1 TP 8 FP 0 FN 0; class 2 TP 1 FP 1 FN 2
    # slice B: class 1 TP 0 FP 2 FN 2; class 2 absent in both
    tp = torch.tensor([[8, 1], [0, 0]])
    fp = torch.tensor([[0, 1], [2, 0]])
    fn = torch.tensor([[0, 2], [2, 0]])
    value, per_class = tvdi(tp, fp, fn)
    c1 = 2 * 8 / (2 * 8 + 2 + 2)
    c2 = 2 * 1 / (2 * 1 + 1 + 2)
    assert per_class.tolist() == pytest.approx([c1, c2])
    assert value == pytest.approx((c1 + c2) / 2)
    from nnunet_ima.metrics import slice_dice_from_counts
    per_slice = slice_dice_from_counts(tp, fp, fn)
    assert per_slice.tolist() == pytest.approx([(1 + 2 / 5) / 2, 0.0])
    assert adi(per_slice) == pytest.approx((1 + 2 / 5) / 4)


def test_min_reduction_lets_no_present_class_hide():
    """"min": the worst class present; absent classes are left out ("one") or score 0 ("zero")."""
    from nnunet_ima.losses import DiceThresholdCorrect
    from nnunet_ima.metrics import slice_dice_from_counts
    # slice A: class 1 perfect (TP 9), class 2 missed (TP 0, FN 1), class 3 absent;
    # slice B: class 1 perfect, classes 2 and 3 absent; slice C: nothing anywhere.
    tp = torch.tensor([[9, 0, 0], [4, 0, 0], [0, 0, 0]])
    fp = torch.tensor([[0, 0, 0], [0, 0, 0], [0, 0, 0]])
    fn = torch.tensor([[0, 1, 0], [0, 0, 0], [0, 0, 0]])
    assert slice_dice_from_counts(tp, fp, fn, "min").tolist() == [0.0, 1.0, 1.0]
    assert slice_dice_from_counts(tp, fp, fn, "max").tolist() == [1.0, 1.0, 1.0]
    assert slice_dice_from_counts(tp, fp, fn, "mean").tolist() == [0.5, 1.0, 1.0]
    assert slice_dice_from_counts(tp, fp, fn, "min", absent="zero").tolist() == [0.0, 0.0, 0.0]
    # the correctness rule: slice A is correct under "max" but not under "min"
    gt = torch.tensor([[[1, 1, 2, 0]]])
    pred = torch.tensor([[[1, 1, 0, 0]]])
    logits = torch.nn.functional.one_hot(pred, 3).permute(0, 3, 1, 2).float()
    assert DiceThresholdCorrect(0.6, "max")(logits, gt[:, None]).tolist() == [True]
    assert DiceThresholdCorrect(0.6, "min")(logits, gt[:, None]).tolist() == [False]


def test_counts_agree_with_nnunet_evaluation_on_random_maps():
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 4, size=(5, 17, 23))
    pred = rng.integers(0, 4, size=(5, 17, 23))
    tp, fp, fn = confusion_counts(torch.from_numpy(pred), torch.from_numpy(gt), 4)
    for b in range(5):
        for c in range(1, 4):
            e_tp, e_fp, e_fn, _ = compute_tp_fp_fn_tn(gt[b] == c, pred[b] == c)
            assert (tp[b, c - 1], fp[b, c - 1], fn[b, c - 1]) == (e_tp, e_fp, e_fn)


def test_counts_equal_nnunet_dice_loss_helper_on_3d_maps():
    """The core counts without nnunetv2; they must match the helper nnU-Net's Dice loss uses."""
    g = torch.Generator().manual_seed(1)
    gt = torch.randint(0, 4, (3, 5, 6, 7), generator=g)
    pred = torch.randint(0, 4, (3, 5, 6, 7), generator=g)
    onehot = torch.nn.functional.one_hot(pred, 4).movedim(-1, 1).float()
    e_tp, e_fp, e_fn, _ = get_tp_fp_fn_tn(onehot, gt.unsqueeze(1), axes=(2, 3, 4))
    tp, fp, fn = confusion_counts(pred, gt, num_classes=4)
    for ours, theirs in ((tp, e_tp), (fp, e_fp), (fn, e_fn)):
        assert ours.dtype == torch.int64
        assert torch.equal(ours, theirs[:, 1:].long())


def test_robustness_auc():
    assert robustness_auc([0, 1, 2], [0.8, 0.8, 0.8]) == pytest.approx(0.8)
    assert robustness_auc([0, 5, 15, 25], [1.0, 0.8, 0.4, 0.2]) == pytest.approx(
        (5 * 0.9 + 10 * 0.6 + 10 * 0.3) / 25)
    assert robustness_auc([2, 0, 1], [0.0, 1.0, 0.5]) == pytest.approx(0.5)  # order-free


@pytest.mark.parametrize("call, match", [
    (lambda: confusion_counts(torch.zeros(2, 3, 3), torch.zeros(2, 4, 4), 3), "same shape"),
    (lambda: confusion_counts(torch.full((1, 2, 2), 5), torch.zeros(1, 2, 2), 3), "labels outside"),
    (lambda: confusion_counts(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2), 1), "num_classes must be >= 2"),
    (lambda: robustness_auc([0, 1], [1.0]), "matching"),
    (lambda: robustness_auc([-1, 1], [1.0, 1.0]), "noise levels must be >= 0"),
    (lambda: slice_dice(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2), 3, reduce="median"), "reduce must be"),
])
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()
