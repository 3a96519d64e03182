"""TRADES for nnU-Net (Zhang et al., ICML 2019), with the KL per pixel.

A training step:

1. clean forward in train mode: nnU-Net's loss on the clean output (deep supervision with
   nnU-Net's weights, as ``nnUNetTrainer`` trains);
2. the core's :class:`nnunet_ima.adversarial_step.TRADESStep` (network in eval mode, parameters
   frozen, fp32): PGD at ``adv_eps`` (``pgd_steps`` steps of ``pgd_alpha * adv_eps / steps``,
   ``norm``) on the KL between the clean softmax (detached) and the adversarial softmax, per
   pixel and averaged over the slice, from ``x + 0.001 N(0, I)`` as the TRADES code starts;
3. adversarial forward; one backward of
   ``loss(f(x), y) + trades_beta * KL(softmax f(x) || softmax f(x_adv))``, the KL per pixel at
   the full-resolution output, averaged over pixels and slices. Both outputs carry their
   gradients into the KL, as in TRADES;
4. nnU-Net's gradient clipping and optimiser step, the statistics of ``ima_stats.csv``.

The KL term reads the full-resolution output only: it regularises the prediction, which the
lower deep-supervision outputs only help to train, and the attack's objective is the same KL.
Unlike ``nnUNetTrainerAdv``, the clean loss is not back-propagated before the attack: the KL term
needs the clean output's graph, so the step keeps it through the attack and back-propagates once
(it holds the clean activations during the attack; Adv frees them).

Settings are those of ``nnUNetTrainerAdv``; ``random_start`` and ``attack_outputs`` do not act
here (TRADES' own start, the KL's own output). ``trades_beta`` is 6, the paper's value.

This file is imported by nnU-Net's trainer lookup as a top-level module: absolute imports only.
"""
from contextlib import nullcontext
from time import perf_counter
from typing import Any

import torch
import torch.nn.functional as F

from nnunet_ima.adversarial_step import AdversarialBatch, TRADESStep, kl_to_reference
from nnunet_ima.attacks import detach
from nnunet_ima.losses import full_resolution
from nnunet_ima.nnunet.ddp import average_gradients
from nnunet_ima.trainers.nnUNetTrainerAdv import nnUNetTrainerAdv


class nnUNetTrainerTRADES(nnUNetTrainerAdv):
    """nnU-Net trained on ``loss(x) + trades_beta * KL(f(x) || f(x_adv))`` per pixel, ``x_adv``
    from PGD on that KL at ``adv_eps`` (default 15, z-score units)."""

    clean_weight: float = 1.0
    # TRADES' beta: the paper's value (CIFAR-10), which the classification comparison uses too.
    trades_beta: float = 6.0

    def adversarial_batch(self, data: torch.Tensor, target: Any, clean_output: Any,
                          batch: dict) -> AdversarialBatch:
        """TRADES' point of every slice of ``data (B, C, H, W)``, weight ``trades_beta``."""
        s = self.ima_settings
        step = TRADESStep(s.adv_eps, s.attack, beta=self.trades_beta)
        return step(self.attack_network, data, target, clean_output)

    def trades_loss(self, data: torch.Tensor, target: Any, batch: dict):
        """The step's loss with its graph, and what the statistics read of it.

        Returns:
            ``(loss, clean_loss, kl, clean_dice (B,), adversarial batch, detached adversarial
            output, attack seconds)``.
        """
        with self._autocast():
            output = self.network(data)
            clean_loss = self.loss(output, target)
        clean_output = detach(output)
        attack_start = perf_counter()
        clean_dice = self.is_correct.dice(clean_output, target)
        adversarial = self.adversarial_batch(data, target, clean_output, batch)
        attack_seconds = perf_counter() - attack_start
        with self._autocast():
            adv_output = self.attack_network(adversarial.x)
        kl = kl_to_reference(full_resolution(adv_output).float(),
                             F.softmax(full_resolution(output).float(), dim=1)).mean()
        return (clean_loss + adversarial.weight * kl, clean_loss, kl, clean_dice, adversarial,
                detach(adv_output), attack_seconds)

    def train_step(self, batch: dict) -> dict:
        start = perf_counter()
        data, target = self._batch_on_device(batch)
        self.optimizer.zero_grad(set_to_none=True)
        # One backward pass; under DDP the gradients are averaged once, after it.
        with self.network.no_sync() if self.is_ddp else nullcontext():
            loss, clean_loss, kl, clean_dice, adversarial, adv_output, attack_seconds = \
                self.trades_loss(data, target, batch)
            self._backward(loss)
        if self.is_ddp:
            average_gradients(self.network.parameters())
        self._optimizer_step()

        threshold = self.ima_settings.dice_threshold
        adversarial_dice = self.is_correct.dice(adv_output, adversarial.target)
        self._epoch_stats.add(
            clean_dice=clean_dice.cpu().numpy(), clean_correct=int((clean_dice >= threshold).sum()),
            adv_dice=adversarial_dice.cpu().numpy(), attacked=data.shape[0],
            crossed=int((adversarial_dice < threshold).sum()), attack_seconds=attack_seconds,
            step_seconds=perf_counter() - start, adv_weight=adversarial.weight)
        total = clean_loss.detach() + adversarial.weight * kl.detach()
        return {"loss": total.cpu().numpy()}
