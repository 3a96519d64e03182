"""nnU-Net's Dice + cross-entropy loss, per sample: the objective of the segmentation attacks.

nnU-Net's own ``DC_and_CE_loss`` reduces over the batch (and with ``batch_dice`` couples the
samples), but PGD needs one loss per sample so that each slice climbs its own loss inside its own
budget. This module computes, for every sample ``b``:

    loss_b = CE_b + (-softDice_b)

with ``CE_b`` the mean pixel cross-entropy of sample ``b`` and ``softDice_b`` nnU-Net's
``MemoryEfficientSoftDiceLoss`` formula (softmax, smooth 1e-5, background excluded) evaluated on
sample ``b`` alone. Without an ignore label, the batch mean of ``loss_b`` equals nnU-Net's
``DC_and_CE_loss`` with ``batch_dice=False`` exactly. Deep-supervision outputs are combined with
the weights of nnU-Net's ``DeepSupervisionWrapper``.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from nnunet_ima.label_mask import label_map, scored_labels, scored_mean
from nnunet_ima.losses import full_resolution

SMOOTH = 1e-5


def deep_supervision_weights(num_outputs: int) -> np.ndarray:
    """nnU-Net's weights: ``1 / 2**i``, the lowest resolution dropped, normalised to sum 1."""
    if num_outputs < 1:
        raise ValueError(f"num_outputs must be >= 1, got {num_outputs}")
    weights = np.array([1 / (2 ** i) for i in range(num_outputs)])
    if num_outputs > 1:
        weights[-1] = 0
    return weights / weights.sum()


def dice_ce_per_sample(logits: torch.Tensor, target: torch.Tensor,
                       ignore_label: Optional[int] = None) -> torch.Tensor:
    """``(B,)`` Dice + CE loss of each sample.

    Args:
        logits: ``(B, C, H, W)`` network output.
        target: ``(B, 1, H, W)`` or ``(B, H, W)`` integer label map.
        ignore_label: pixels with this label count in neither term; nnU-Net's ``-1``
            outside the nonzero region is background (:mod:`nnunet_ima.label_mask`).
    """
    target, scored = scored_labels(label_map(target, logits), ignore_label)
    valid_f = scored.to(logits.dtype)

    ce = scored_mean(F.cross_entropy(logits, target, reduction="none"), scored)

    probs = torch.softmax(logits, dim=1)[:, 1:]
    onehot = F.one_hot(target, logits.shape[1]).movedim(-1, 1)[:, 1:].to(probs.dtype)
    mask = valid_f.unsqueeze(1)
    spatial = tuple(range(2, logits.dim()))
    intersect = (probs * onehot * mask).sum(spatial)
    sum_pred = (probs * mask).sum(spatial)
    sum_gt = (onehot * mask).sum(spatial)
    dice = (2 * intersect + SMOOTH) / (sum_gt + sum_pred + SMOOTH).clamp_min(1e-8)
    return ce - dice.mean(dim=1)


class PerSampleDiceCE:
    """``(output, target) -> (B,)`` nnU-Net loss per sample, for the attacks.

    ``output`` and ``target`` are a tensor each, or nnU-Net's deep-supervision lists (full
    resolution first). With ``full_resolution_only`` the lower-resolution outputs are ignored.
    """

    def __init__(self, ignore_label: Optional[int] = None, full_resolution_only: bool = False,
                 weights: Optional[Sequence[float]] = None):
        self.ignore_label = ignore_label
        self.full_resolution_only = full_resolution_only
        self.weights = None if weights is None else [float(w) for w in weights]

    def __call__(self, output: Any, target: Any) -> torch.Tensor:
        if not isinstance(output, (list, tuple)):
            return dice_ce_per_sample(output, full_resolution(target), self.ignore_label)
        if self.full_resolution_only:
            return dice_ce_per_sample(output[0], target[0], self.ignore_label)
        weights = self.weights if self.weights is not None \
            else deep_supervision_weights(len(output)).tolist()
        if len(weights) != len(output) or len(target) != len(output):
            raise ValueError(f"{len(output)} outputs, {len(target)} targets, {len(weights)} weights")
        total = None
        for w, out, tgt in zip(weights, output, target):
            if w == 0:
                continue
            term = w * dice_ce_per_sample(out, tgt, self.ignore_label)
            total = term if total is None else total + term
        return total
