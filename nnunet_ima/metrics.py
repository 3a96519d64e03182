"""Segmentation metrics: per-slice Dice, TVDI, ADI and the robustness AUC. No I/O.

Label maps are integer tensors ``(B, H, W)`` or ``(B, 1, H, W)`` (any number of spatial
dimensions works) with background 0 and foreground classes ``1 .. num_classes - 1``.
Per-class arrays have ``num_classes - 1`` columns: column ``k`` is class ``k + 1``.

Conventions:
* a class absent from both the ground truth and the prediction has Dice 1 (nothing to find,
  nothing found);
* the Dice of a slice is the mean (or max) over the foreground classes present in its ground
  truth or its prediction; a slice with neither has Dice 1 (``absent="one"``, the default);
  with ``absent="zero"`` (the IMA authors' segmentation code) every foreground class enters the
  mean / max and a class absent from both scores 0, so an empty slice has Dice 0;
* TVDI (Total Voxel Dice Index) sums TP / FP / FN of a class over all slices before taking the
  Dice, then averages over classes; ADI (Average Dice Index) averages the slice Dice.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np
import torch

# How a slice's per-class Dice becomes one number: the mean, the best class, or the worst class
# ("min": a slice counts as correct only when every class scored reaches the threshold, so a
# well-segmented large class cannot hide a missed small one).
SLICE_REDUCTIONS = ("mean", "max", "min")
ABSENT_CLASS_RULES = ("one", "zero")


def _as_label_map(labels: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor):
        labels = torch.as_tensor(np.asarray(labels))
    if labels.dim() >= 3 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.dim() < 2:
        raise ValueError(f"{name} must be a (B, H, W) or (B, 1, H, W) label map, "
                         f"got shape {tuple(labels.shape)}")
    if labels.is_floating_point():
        labels = labels.round()
    return labels.long()


def confusion_counts(pred: torch.Tensor, target: torch.Tensor,
                     num_classes: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample, per-foreground-class TP, FP and FN voxel counts.

    Args:
        pred, target: integer label maps ``(B, H, W)`` or ``(B, 1, H, W)`` of the same shape.
        num_classes: number of classes including background.

    Returns:
        ``tp, fp, fn``, each ``(B, num_classes - 1)`` int64.
    """
    pred = _as_label_map(pred, "pred")
    target = _as_label_map(target, "target")
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} "
                         f"and {tuple(target.shape)}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 (background + foreground), got {num_classes}")
    for name, t in (("pred", pred), ("target", target)):
        if t.numel() and (t.min() < 0 or t.max() >= num_classes):
            raise ValueError(f"{name} holds labels outside [0, {num_classes - 1}]")
    # Integer counts straight from the label maps (tests check them against nnU-Net's own
    # get_tp_fp_fn_tn): a one-hot float tensor of (B, K, H, W) is not needed.
    flat_pred = pred.reshape(pred.shape[0], -1)
    flat_target = target.reshape(target.shape[0], -1)
    classes = torch.arange(1, num_classes, device=pred.device).view(1, -1, 1)  # (1, K, 1)
    is_pred = flat_pred.unsqueeze(1) == classes                                # (B, K, N)
    is_target = flat_target.unsqueeze(1) == classes
    tp = (is_pred & is_target).sum(-1)
    fp = (is_pred & ~is_target).sum(-1)
    fn = (~is_pred & is_target).sum(-1)
    return tp, fp, fn


def dice_from_counts(tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor) -> torch.Tensor:
    """``2 TP / (2 TP + FP + FN)`` elementwise, 1 where the denominator is 0. Shape kept, float64."""
    tp, fp, fn = (torch.as_tensor(c).double() for c in (tp, fp, fn))
    denominator = 2 * tp + fp + fn
    return torch.where(denominator > 0, 2 * tp / denominator.clamp_min(1), torch.ones_like(tp))


def per_class_dice(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(B, num_classes - 1)`` hard Dice per sample and foreground class (empty vs empty = 1)."""
    return dice_from_counts(*confusion_counts(pred, target, num_classes))


def slice_dice_from_counts(tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor,
                           reduce: str = "mean", absent: str = "one") -> torch.Tensor:
    """``(B, K)`` counts -> ``(B,)`` slice Dice.

    ``absent="one"``: the mean / max / min over the classes present in ground truth or
    prediction (1 when none is). ``absent="zero"``: over all ``K`` classes, a class absent from
    both scoring 0 (with ``"min"`` a slice that lacks any class then scores 0).
    """
    if reduce not in SLICE_REDUCTIONS:
        raise ValueError(f"reduce must be one of {SLICE_REDUCTIONS}, got {reduce!r}")
    if absent not in ABSENT_CLASS_RULES:
        raise ValueError(f"absent must be one of {ABSENT_CLASS_RULES}, got {absent!r}")
    dice = dice_from_counts(tp, fp, fn)
    present = (torch.as_tensor(tp) + torch.as_tensor(fp) + torch.as_tensor(fn)) > 0
    if absent == "zero":
        scored = torch.where(present, dice, torch.zeros_like(dice))
        return {"mean": scored.mean, "max": scored.amax, "min": scored.amin}[reduce](dim=1)
    if reduce == "mean":
        total = torch.where(present, dice, torch.zeros_like(dice)).sum(dim=1)
        n = present.sum(dim=1)
        return torch.where(n > 0, total / n.clamp_min(1), torch.ones_like(total))
    if reduce == "max":
        best = torch.where(present, dice, torch.full_like(dice, -1.0)).amax(dim=1)
        return torch.where(present.any(dim=1), best, torch.ones_like(best))
    # Dice lies in [0, 1]: an absent class set to 2 never is the minimum.
    worst = torch.where(present, dice, torch.full_like(dice, 2.0)).amin(dim=1)
    return torch.where(present.any(dim=1), worst, torch.ones_like(worst))


def slice_dice(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
               reduce: str = "mean", absent: str = "one") -> torch.Tensor:
    """``(B,)`` per-slice Dice (see the module docstring). ``pred``, ``target``: label maps."""
    return slice_dice_from_counts(*confusion_counts(pred, target, num_classes), reduce=reduce,
                                  absent=absent)


def tvdi(tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor) -> Tuple[float, np.ndarray]:
    """Total Voxel Dice Index from ``(N, K)`` per-slice counts.

    Returns:
        ``(tvdi, per_class)``: the mean over the ``K`` foreground classes of the Dice of the
        summed counts, and those ``K`` per-class values.
    """
    per_class = dice_from_counts(torch.as_tensor(tp).sum(0), torch.as_tensor(fp).sum(0),
                                 torch.as_tensor(fn).sum(0)).numpy()
    return float(per_class.mean()), per_class


def adi(slice_dice_values: Sequence[float]) -> float:
    """Average Dice Index: the mean of the per-slice Dice values ``(N,)``."""
    values = np.asarray(torch.as_tensor(slice_dice_values).double())
    if values.size == 0:
        raise ValueError("adi needs at least one slice")
    return float(values.mean())


def robustness_auc(noise_levels: Sequence[float], values: Sequence[float]) -> float:
    """Area under the metric-vs-noise curve (trapezoids) divided by the largest noise.

    A model whose metric stays at ``v`` over the whole range scores ``v``.
    """
    noise = np.asarray(noise_levels, dtype=np.float64)
    vals = np.asarray(values, dtype=np.float64)
    if noise.shape != vals.shape or noise.size < 2:
        raise ValueError("robustness_auc needs matching noise_levels and values with >= 2 points")
    if np.any(noise < 0):
        raise ValueError("noise levels must be >= 0")
    order = np.argsort(noise)
    noise, vals = noise[order], vals[order]
    if noise[-1] <= 0:
        raise ValueError("the largest noise level must be > 0")
    area = float(np.sum((noise[1:] - noise[:-1]) * (vals[1:] + vals[:-1]) / 2))
    return area / float(noise[-1])
