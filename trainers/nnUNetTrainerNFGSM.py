"""N-FGSM adversarial training for nnU-Net (de Jorge et al., NeurIPS 2022, "Make some noise").

The adversarial term of a training step is the core's
:class:`nnunet_ima.adversarial_step.NFGSMStep`: noise uniform in the ball of radius
``noise_factor * adv_eps`` (``k = 2``), then one steepest-ascent step of size ``adv_eps``
(``alpha = eps``) on nnU-Net's per-slice Dice + CE from the noisy point, not projected back to
the ``adv_eps`` ball. One forward and one backward pass per attack, against PGD-K's ``K``.

The training loss is Adv's, ``(loss(x) + loss(x_adv)) / 2``, not the paper's ``loss(x_adv)``:
Adv and IMA both keep a clean term, so with the same loss N-FGSM differs from
``nnUNetTrainerAdv`` in its attack alone (one noisy step against 20-step PGD, at the same
``adv_eps``), and a comparison of the two measures the attack, not the weighting.

Settings are those of ``nnUNetTrainerAdv`` (``adv_eps``, ``norm``, ``attack_outputs``, the Dice
threshold of the statistics, ``adversarial_dice``); the PGD keys ``pgd_steps``, ``pgd_alpha`` and
``random_start`` do not act here. The statistics go to ``ima_stats.csv`` as Adv's do.

This file is imported by nnU-Net's trainer lookup as a top-level module: absolute imports only.
"""
from typing import Any

import torch

from nnunet_ima.adversarial_step import AdversarialBatch, NFGSMStep
from nnunet_ima.trainers.nnUNetTrainerAdv import nnUNetTrainerAdv


class nnUNetTrainerNFGSM(nnUNetTrainerAdv):
    """nnU-Net trained on ``(loss(x) + loss(x_adv)) / 2`` with ``x_adv`` from N-FGSM at
    ``adv_eps`` (default 15, z-score units): noise of radius ``2 * adv_eps``, one step of
    ``adv_eps``, no projection."""

    # k of the paper: the noise radius in units of eps (its default, used for all its results).
    noise_factor: float = 2.0

    def adversarial_batch(self, data: torch.Tensor, target: Any, clean_output: Any,
                          batch: dict) -> AdversarialBatch:
        """N-FGSM's point of every slice of ``data (B, C, H, W)``, weight ``1 - clean_weight``."""
        s = self.ima_settings
        step = NFGSMStep(s.adv_eps, s.attack.norm, weight=1.0 - self.clean_weight,
                         noise_factor=self.noise_factor, loss=self.attack_loss)
        return step(self.attack_network, data, target)
