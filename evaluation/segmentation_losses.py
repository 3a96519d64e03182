"""The per-slice losses of the ensemble's members: SEA's (Croce, Singh and Hein, ECCV 2024), rse's
(Halmosi, Mohos and Jelasity, ECCV 2024) and CosPGD's (Agnihotri, Jung and Keuper, ICML 2024).

Each maps ``logits (B, K, H, W)`` and ``target (B, 1, H, W)`` (or ``(B, H, W)``) integer labels
to ``(B,)``, the mean over the slice's scored pixels (ignore-label pixels count in neither the
sum nor the number of pixels; nnU-Net's ``-1`` is background, see :mod:`nnunet_ima.label_mask`).
Volumes, ``(B, K, D, H, W)``, work alike: each mean is over the volume's scored voxels.
Which pixels are "correct" is read off the logits (argmax) and is not differentiated.

* ``mask_ce``: the cross-entropy of the pixels still classified correctly. Once a pixel is
  wrong it stops pulling on the gradient, so the attack spends its budget on the pixels it has
  not flipped yet (plain CE keeps pushing wrong pixels ever deeper).
* ``bal_mask_ce``: ``mask_ce`` with each pixel weighted by ``1 - n_c / n``, ``n_c`` the slice's
  scored pixels of its ground-truth class ``c`` and ``n`` all its scored pixels: small
  structures (a lesion, say) weigh about 1 and the dominant background little, so the attack
  does not spend its budget on background pixels that carry no Dice.
* ``js``: the Jensen-Shannon divergence between the softmax and the one-hot label, summed over
  classes. It is bounded (by ``log 2``), so a pixel already far on the wrong side adds no more
  than a pixel just across.

:data:`EXTRA_LOSSES`, the other suites' losses:

* ``cos`` (rse's cosine loss): ``1 - cos(z, onehot(y))``, the cosine taken over the class axis
  between the raw logits ``z`` and the one-hot label. Unlike CE it is bounded (in ``[0, 2]``) and
  does not grow without end on a pixel already pushed far across.
* ``cospgd`` (CosPGD's pixel weighting on CE): ``cos(softmax(z), onehot(y)) * CE``, the cosine
  detached (a weight, not differentiated). Pixels whose softmax still points at their label weigh
  about 1, pixels already flipped little, a soft version of ``mask_ce``.
* ``mask_norm_logit`` (rse's "mask-norm-corrlog"): ``-z_y / ||z||_2`` (the label's logit after
  dividing the logits by their L2 norm over classes) on the correctly classified pixels, 0 on the
  others: scale-free, so a network cannot hide behind large logits.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

from nnunet_ima.label_mask import label_map, scored_labels, scored_mean

SegmentationLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def masked_ce(logits: torch.Tensor, target: torch.Tensor,
              ignore_label: Optional[int] = None) -> torch.Tensor:
    """``(B,)`` mean CE over the scored pixels, counting only the correctly classified ones."""
    return _masked_ce(logits, target, ignore_label, balanced=False)


def _masked_ce(logits: torch.Tensor, target: torch.Tensor, ignore_label: Optional[int],
               balanced: bool) -> torch.Tensor:
    labels, scored = scored_labels(label_map(target, logits), ignore_label)
    pixel_ce = F.cross_entropy(logits, labels, reduction="none")
    with torch.no_grad():
        weight = ((logits.argmax(dim=1) == labels) & scored).to(pixel_ce.dtype)
        if balanced:
            weight = weight * class_balance_weights(labels, scored, logits.shape[1]).to(weight)
    return scored_mean(pixel_ce * weight, scored)


def class_balance_weights(labels: torch.Tensor, scored: torch.Tensor,
                          num_classes: int) -> torch.Tensor:
    """``(B, *spatial)`` weights ``1 - n_c / n`` of each pixel (``c`` its label; see the
    module), counted over the whole sample (slice or volume)."""
    onehot = F.one_hot(labels, num_classes) * scored.unsqueeze(-1)            # (B, *spatial, K)
    axes = tuple(range(1, labels.dim()))
    per_class = onehot.sum(axes).to(torch.float64)                              # (B, K)
    fraction = per_class / scored.sum(axes).clamp_min(1).unsqueeze(-1)          # (B, K)
    pixel_fraction = torch.gather(fraction, 1, labels.reshape(labels.shape[0], -1))
    return (1 - pixel_fraction).reshape(labels.shape)


def balanced_masked_ce(logits: torch.Tensor, target: torch.Tensor,
                       ignore_label: Optional[int] = None) -> torch.Tensor:
    """``(B,)`` :func:`masked_ce` with the class-balance weights of :func:`class_balance_weights`."""
    return _masked_ce(logits, target, ignore_label, balanced=True)


def js_divergence(logits: torch.Tensor, target: torch.Tensor,
                  ignore_label: Optional[int] = None) -> torch.Tensor:
    """``(B,)`` mean over scored pixels of ``JS(softmax(logits), onehot(target))``, summed over
    classes: ``(KL(p || m) + KL(q || m)) / 2`` with ``m = (p + q) / 2``, in ``[0, log 2]``."""
    labels, scored = scored_labels(label_map(target, logits), ignore_label)
    p = logits.softmax(dim=1)                                                     # (B, K, H, W)
    q = F.one_hot(labels, logits.shape[1]).movedim(-1, 1).to(p.dtype)
    m = (p + q) / 2
    # p log(p / m) and q log(q / m) with 0 log 0 = 0; m > 0 wherever p > 0 or q > 0.
    log_m = m.clamp_min(torch.finfo(p.dtype).tiny).log()
    kl_p = torch.where(p > 0, p * (p.clamp_min(torch.finfo(p.dtype).tiny).log() - log_m),
                       torch.zeros_like(p))
    kl_q = torch.where(q > 0, q * (-log_m), torch.zeros_like(q))   # q is 0 or 1: q log q = 0
    pixel_js = (kl_p + kl_q).sum(dim=1) / 2
    return scored_mean(pixel_js, scored)


JS_MAXIMUM = math.log(2)

SEA_LOSSES: Dict[str, Callable[..., torch.Tensor]] = {
    "mask_ce": masked_ce, "bal_mask_ce": balanced_masked_ce, "js": js_divergence}
"""The three APGD losses of the default ensemble, by the name used in tables and summaries."""


def cosine_loss(logits: torch.Tensor, target: torch.Tensor,
                ignore_label: Optional[int] = None) -> torch.Tensor:
    """``(B,)`` mean over scored pixels of ``1 - cos(logits, onehot(target))`` over the class axis
    (rse's "cos" loss)."""
    labels, scored = scored_labels(label_map(target, logits), ignore_label)
    onehot = F.one_hot(labels, logits.shape[1]).movedim(-1, 1).to(logits.dtype)  # (B, K, H, W)
    pixel = 1 - F.cosine_similarity(logits, onehot, dim=1)
    return scored_mean(pixel, scored)


def cospgd_loss(logits: torch.Tensor, target: torch.Tensor,
                ignore_label: Optional[int] = None) -> torch.Tensor:
    """``(B,)`` mean over scored pixels of CosPGD's weighted CE: ``cos(softmax(logits),
    onehot(target))`` (over the class axis, detached) times the pixel's CE, as the ``cospgd``
    package's ``Attack.cospgd_scale`` weights a pixel loss."""
    labels, scored = scored_labels(label_map(target, logits), ignore_label)
    pixel_ce = F.cross_entropy(logits, labels, reduction="none")
    with torch.no_grad():
        onehot = F.one_hot(labels, logits.shape[1]).movedim(-1, 1).to(logits.dtype)
        weight = F.cosine_similarity(logits.softmax(dim=1), onehot, dim=1)
    return scored_mean(pixel_ce * weight, scored)


def masked_norm_logit(logits: torch.Tensor, target: torch.Tensor,
                      ignore_label: Optional[int] = None) -> torch.Tensor:
    """``(B,)`` mean over scored pixels of ``-z_y / ||z||_2`` (norm over the class axis) on the
    correctly classified pixels, 0 on the wrongly classified ones (rse's "mask-norm-corrlog")."""
    labels, scored = scored_labels(label_map(target, logits), ignore_label)
    length = logits.norm(p=2, dim=1).clamp_min(torch.finfo(logits.dtype).tiny)  # (B, H, W)
    label_logit = torch.gather(logits, 1, labels.unsqueeze(1)).squeeze(1)      # (B, H, W)
    with torch.no_grad():
        correct = (logits.argmax(dim=1) == labels).to(logits.dtype)
    return scored_mean(-label_logit / length * correct, scored)


EXTRA_LOSSES: Dict[str, Callable[..., torch.Tensor]] = {
    "cos": cosine_loss, "cospgd": cospgd_loss, "mask_norm_logit": masked_norm_logit}
"""rse's and CosPGD's losses (see the module docstring), by the name used in tables."""


def sea_loss(name: str, ignore_label: Optional[int]) -> SegmentationLoss:
    """``(logits, target) -> (B,)`` loss ``name`` of :data:`SEA_LOSSES` with ``ignore_label``."""
    if name not in SEA_LOSSES:
        raise ValueError(f"loss must be one of {tuple(SEA_LOSSES)}, got {name!r}")
    function = SEA_LOSSES[name]
    return lambda logits, target: function(logits, target, ignore_label)


def segmentation_loss(name: str, ignore_label: Optional[int]) -> SegmentationLoss:
    """``(logits, target) -> (B,)`` loss ``name`` of :data:`SEA_LOSSES` or :data:`EXTRA_LOSSES`
    with ``ignore_label``."""
    losses = {**SEA_LOSSES, **EXTRA_LOSSES}
    if name not in losses:
        raise ValueError(f"loss must be one of {tuple(losses)}, got {name!r}")
    function = losses[name]
    return lambda logits, target: function(logits, target, ignore_label)
