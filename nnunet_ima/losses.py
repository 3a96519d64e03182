"""IMA's training loss (Algorithm 1) and the per-sample correctness predicates."""
from __future__ import annotations

from typing import Any, Optional

import torch

from nnunet_ima.attacks import argmax_correct  # noqa: F401  (re-exported: the classification predicate)
from nnunet_ima.label_mask import label_map, scored_label_maps
from nnunet_ima.metrics import ABSENT_CLASS_RULES, SLICE_REDUCTIONS, slice_dice


def ima_loss(clean_loss: torch.Tensor, adversarial_loss: torch.Tensor, beta: float,
             batch_size: Optional[int] = None) -> torch.Tensor:
    """``((1 - beta) * sum(clean_loss) + beta * sum(adversarial_loss)) / batch_size``.

    Args:
        clean_loss: ``(B,)`` per-sample loss on the clean batch (wrong and correct samples, i.e.
            ``L0 + L1`` of Algorithm 1).
        adversarial_loss: ``(M,)`` per-sample loss on the boundary points of the ``M <= B``
            samples that crossed (``L2``); may be empty.
        beta: weight of the adversarial term, in ``[0, 1]``.
        batch_size: the divisor; defaults to ``B``.
    """
    if not 0 <= beta <= 1:
        raise ValueError(f"beta must be in [0, 1], got {beta!r}")
    if clean_loss.dim() != 1 or adversarial_loss.dim() != 1:
        raise ValueError("clean_loss and adversarial_loss must be per-sample (B,) and (M,) tensors")
    if adversarial_loss.shape[0] > clean_loss.shape[0]:
        raise ValueError("adversarial_loss has more samples than the batch")
    batch_size = clean_loss.shape[0] if batch_size is None else batch_size
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    return ((1 - beta) * clean_loss.sum() + beta * adversarial_loss.sum()) / batch_size


def check_threshold(threshold: float, name: str = "dice_threshold") -> float:
    """Return ``threshold`` as a float, or raise ``ValueError`` unless it lies in ``(0, 1)``."""
    if not isinstance(threshold, (int, float)) or not 0 < float(threshold) < 1:
        raise ValueError(f"{name} must lie strictly between 0 and 1, got {threshold!r}")
    return float(threshold)


def full_resolution(obj: Any) -> torch.Tensor:
    """The full-resolution output (or target) of a network: the first of nnU-Net's
    deep-supervision list, or the tensor itself."""
    return obj[0] if isinstance(obj, (list, tuple)) else obj


class DiceThresholdCorrect:
    """Segmentation correctness: per-slice hard Dice of the full-resolution output >= threshold.

    Call with ``(output, target)`` where ``output`` is logits ``(B, C, H, W)`` or nnU-Net's list
    of deep-supervision logits, and ``target`` a label map ``(B, 1, H, W)`` / ``(B, H, W)`` or
    the matching list. Returns ``(B,)`` bool.

    Args:
        threshold: in ``(0, 1)``; the paper uses 0.6.
        reduce: ``"mean"`` over the foreground classes present in ground truth or prediction,
            ``"max"`` or ``"min"`` over them (``"min"``: every present class must reach the
            threshold).
        absent: ``"one"`` (classes absent from both are left out; an empty slice scores 1) or
            ``"zero"`` (every class counts, absent ones score 0; an empty slice scores 0 and is
            never correct), see :mod:`nnunet_ima.metrics`.
        ignore_label: the dataset's ignore label, whose pixels count nowhere; ``-1`` (nnU-Net's
            outside the nonzero region) is background (:mod:`nnunet_ima.label_mask`).
    """

    def __init__(self, threshold: float = 0.6, reduce: str = "mean", absent: str = "one",
                 ignore_label: Optional[int] = None):
        self.threshold = check_threshold(threshold)
        if reduce not in SLICE_REDUCTIONS:
            raise ValueError(f"reduce must be one of {SLICE_REDUCTIONS}, got {reduce!r}")
        if absent not in ABSENT_CLASS_RULES:
            raise ValueError(f"absent must be one of {ABSENT_CLASS_RULES}, got {absent!r}")
        self.reduce = reduce
        self.absent = absent
        self.ignore_label = ignore_label

    def dice(self, output: Any, target: Any) -> torch.Tensor:
        """``(B,)`` slice Dice of the full-resolution prediction."""
        logits = full_resolution(output)
        pred, labels = scored_label_maps(logits.argmax(dim=1),
                                         label_map(full_resolution(target), logits),
                                         self.ignore_label)
        return slice_dice(pred, labels, logits.shape[1], self.reduce,
                          self.absent).to(logits.device)

    def __call__(self, output: Any, target: Any) -> torch.Tensor:
        return self.dice(output, target) >= self.threshold
