"""Which pixels of a label map are scored: the one convention of the losses, attacks and counts.

nnU-Net writes two special values into a label map:

* ``-1`` (:data:`OUTSIDE_NONZERO`): its cropping marks the background outside the image's
  nonzero region (e.g. the air around an MR volume) with ``-1``, and its training pipeline maps
  it back to background (``RemoveLabelTansform(-1, 0)``). Here too it is **background**: scored,
  as class 0.
* the dataset's ignore label (``dataset.json``'s ``"ignore"``, the highest label): pixels with
  no annotation. They are **not scored**: they count in no loss term, no pixel count and no
  TP / FP / FN, as in nnU-Net's ``DC_and_CE_loss`` (CE ``ignore_index``, Dice loss mask).

Shapes: label maps are ``(B, ...)`` integer tensors without a channel axis (``(B, H, W)`` for 2D
slices); :func:`label_map` drops nnU-Net's channel axis.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

OUTSIDE_NONZERO = -1
"""nnU-Net's label outside the nonzero region; background."""


def label_map(target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``(B, 1, ...)`` or ``(B, ...)`` labels -> ``(B, ...)`` long, matching ``logits``
    ``(B, K, ...)`` without its class axis."""
    if target.dim() == logits.dim():
        target = target[:, 0]
    return target.long()


def scored_labels(labels: torch.Tensor, ignore_label: Optional[int]
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The labels to score against and the pixels that are scored.

    Args:
        labels: ``(B, ...)`` integer label map (no channel axis).
        ignore_label: the dataset's ignore label, or ``None``.

    Returns:
        ``labels`` ``(B, ...)`` with :data:`OUTSIDE_NONZERO` and ignore-label pixels set to
        background (0, a valid class index for every loss), and ``scored`` ``(B, ...)`` bool,
        False exactly on the ignore-label pixels.
    """
    if ignore_label == OUTSIDE_NONZERO:
        raise ValueError(f"ignore_label {OUTSIDE_NONZERO} is nnU-Net's background outside the "
                         f"nonzero region; pass the dataset's ignore label (dataset.json's "
                         f"'ignore') or None")
    scored = torch.ones_like(labels, dtype=torch.bool) if ignore_label is None \
        else labels != ignore_label
    background = labels == OUTSIDE_NONZERO
    if ignore_label is not None:
        background |= ~scored
    return torch.where(background, torch.zeros_like(labels), labels), scored


def scored_mean(pixel_values: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """``(B, ...)`` -> ``(B,)``: the mean over each sample's scored pixels (0 with none)."""
    axes = tuple(range(1, pixel_values.dim()))
    return ((pixel_values * scored).sum(axes)
            / scored.sum(axes).clamp_min(1).to(pixel_values.dtype))


def scored_label_maps(pred: torch.Tensor, labels: torch.Tensor, ignore_label: Optional[int]
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Predicted and true label maps ``(B, ...)`` for counting TP / FP / FN of the foreground
    classes: unscored pixels become background in both, so they count nowhere; ``-1`` is
    background in the truth (see the module docstring)."""
    labels, scored = scored_labels(labels, ignore_label)
    if ignore_label is not None:
        pred = torch.where(scored, pred, torch.zeros_like(pred))
    return pred, labels
