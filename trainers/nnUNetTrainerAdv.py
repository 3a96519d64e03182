"""Vanilla adversarial training for nnU-Net, and the adversarial training step IMA shares.

One training step (``train_step``):

1. clean forward in train mode; backward of ``clean_weight * nnU-Net loss`` (this frees the
   clean activations before the attack and lets the attack reuse the clean output);
2. ``adversarial_batch(...)`` builds the adversarial inputs with the core's adversarial step
   (:mod:`nnunet_ima.adversarial_step`: PGD at a fixed eps here, BPGD at per-slice margins in
   ``nnUNetTrainerIMA``) with the network in eval mode, parameters frozen, fp32;
3. adversarial forward; backward of ``adversarial_weight * nnU-Net loss``;
4. nnU-Net's gradient clipping (12) and optimiser / grad-scaler step; ``after_step`` (IMA records
   the margins' evidence).

At the end of an epoch ``update_margins`` runs (IMA's Algorithm 2), then the statistics row of
``ima_stats.csv`` is written.

Under DDP (``-num_gpus N``) the attack uses the network inside the DDP wrapper, the adversarial
term uses nnU-Net's loss without its cross-rank batch Dice, and the gradients of both backward
passes are averaged across ranks once per step (``nnunet_ima.nnunet.ddp`` explains why).

For vanilla adversarial training the weights are 1/2 and 1/2: ``L = (loss(x) + loss(x_eps)) / 2``.
The attack maximises nnU-Net's Dice + CE per sample (``nnunet_ima.nnunet.loss``).

This file is imported by nnU-Net's trainer lookup as a top-level module: absolute imports only.
"""
import os
from contextlib import nullcontext
from time import perf_counter
from typing import Any, List, Tuple

import torch
from nnunetv2.utilities.helpers import dummy_context
from torch import autocast

from nnunet_ima.adversarial_step import AdversarialBatch, PGDStep
from nnunet_ima.attacks import detach
from nnunet_ima.distributed import gather_objects
from nnunet_ima.losses import DiceThresholdCorrect
from nnunet_ima.nnunet.ddp import average_gradients, unwrap_ddp
from nnunet_ima.nnunet.loss import PerSampleDiceCE
from nnunet_ima.trainers.nnUNetTrainerClean import nnUNetTrainerClean
from nnunet_ima.nnunet.training_stats import (STATS_FILENAME, EpochAccumulator, format_for_log,
                                       write_epoch_row)


# The adversarial term counts as too weak below this weight for this many epochs in a row.
LOW_ADVERSARIAL_WEIGHT = 0.05
LOW_WEIGHT_EPOCHS = 5


class _BatchMean:
    """``(output, target) -> scalar``: the batch mean of a per-sample loss ``(B,)``."""

    def __init__(self, per_sample):
        self.per_sample = per_sample

    def __call__(self, output: Any, target: Any) -> torch.Tensor:
        if isinstance(output, (list, tuple)):
            output = [o.float() for o in output]
        else:
            output = output.float()
        return self.per_sample(output, target).mean()


class nnUNetTrainerAdv(nnUNetTrainerClean):
    """nnU-Net trained on ``(loss(x) + loss(x_eps)) / 2`` with ``x_eps`` from 20-step L2 PGD.

    ``adv_eps`` (default 15, z-score units), the PGD settings and the schedule come from
    ``NNUNET_IMA_CONFIG`` or a named variant such as ``nnUNetTrainerAdv_eps5``.
    """

    clean_weight: float = 0.5

    def initialize(self):
        super().initialize()
        if self.label_manager.has_regions:
            raise RuntimeError(f"{type(self).__name__} needs label-based training; region-based "
                               f"datasets (dataset.json 'regions_class_order') are not supported")
        s = self.ima_settings
        self.attack_loss = PerSampleDiceCE(
            ignore_label=self.label_manager.ignore_label,
            full_resolution_only=s.attack_outputs == "full_resolution")
        self.is_correct = DiceThresholdCorrect(s.dice_threshold, s.dice_reduce, s.dice_absent_class,
                                               ignore_label=self.label_manager.ignore_label)
        if s.adversarial_dice == "per_sample":
            # Dice + CE of each adversarial slice on its own, averaged (the IMA authors' code):
            # no slice's Dice is pooled with another's, and no cross-rank collective is needed.
            self.adversarial_loss = _BatchMean(PerSampleDiceCE(
                ignore_label=self.label_manager.ignore_label))
        else:
            self.adversarial_loss = self._build_rank_local_loss() if self.is_ddp else self.loss
        self._low_weight_epochs = 0

    def _build_rank_local_loss(self):
        """nnU-Net's loss as ``_build_loss`` makes it on one GPU: no cross-rank collective."""
        self.is_ddp = False
        try:
            return self._build_loss()
        finally:
            self.is_ddp = True

    @property
    def attack_network(self) -> torch.nn.Module:
        """The network the attacks differentiate: without the DDP wrapper (same parameters)."""
        return unwrap_ddp(self.network)

    # ------------------------------------------------------------------ hooks
    def adversarial_batch(self, data: torch.Tensor, target: Any, clean_output: Any,
                          batch: dict) -> AdversarialBatch:
        """The adversarial term of the step on ``data (B, C, H, W)``: PGD at ``adv_eps`` on every
        slice, weight ``1 - clean_weight``."""
        s = self.ima_settings
        step = PGDStep(s.adv_eps, s.attack, weight=1.0 - self.clean_weight, loss=self.attack_loss)
        return step(self.attack_network, data, target)

    def after_step(self, batch: dict, adversarial: AdversarialBatch,
                   adversarial_dice: torch.Tensor) -> None:
        """Called after the optimiser step (IMA records the margins' evidence here)."""

    def update_margins(self) -> None:
        """The end-of-epoch update of the budgets, before the statistics row (IMA's Algorithm 2;
        vanilla adversarial training keeps its fixed ``adv_eps``)."""

    def epoch_statistics(self) -> dict:
        """The row of ``ima_stats.csv`` for the epoch that just ended."""
        return {"epoch": self.current_epoch, "adv_eps": self.ima_settings.adv_eps,
                **self._epoch_stats.summary()}

    # ------------------------------------------------------------ training
    def _autocast(self):
        return autocast(self.device.type, enabled=True) if self.device.type == "cuda" \
            else dummy_context()

    def _backward(self, loss: torch.Tensor) -> None:
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
        else:
            loss.backward()

    def _optimizer_step(self) -> None:
        if self.grad_scaler is not None:
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.optimizer.step()

    def _batch_on_device(self, batch: dict) -> Tuple[torch.Tensor, Any]:
        """The batch's ``data (B, C, H, W)`` and target (a tensor, or a list of them under deep
        supervision) on the trainer's device."""
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = [t.to(self.device, non_blocking=True) for t in target] \
            if isinstance(target, list) else target.to(self.device, non_blocking=True)
        return data, target

    def train_step(self, batch: dict) -> dict:
        start = perf_counter()
        data, target = self._batch_on_device(batch)

        self.optimizer.zero_grad(set_to_none=True)
        # Under DDP the gradients are averaged once, after both backward passes.
        with self.network.no_sync() if self.is_ddp else nullcontext():
            with self._autocast():
                output = self.network(data)
                clean_loss = self.loss(output, target)
            self._backward(self.clean_weight * clean_loss)
        clean_output = detach(output)
        del output

        attack_start = perf_counter()
        clean_dice = self.is_correct.dice(clean_output, target)
        adversarial = self.adversarial_batch(data, target, clean_output, batch)
        attack_seconds = perf_counter() - attack_start

        total = self.clean_weight * clean_loss.detach()
        adversarial_dice = torch.zeros(0)
        if adversarial.x.shape[0] > 0:
            with self._autocast():
                adv_output = self.attack_network(adversarial.x)
                adv_loss = self.adversarial_loss(adv_output, adversarial.target)
            self._backward(adversarial.weight * adv_loss)
            total = total + adversarial.weight * adv_loss.detach()
            adversarial_dice = self.is_correct.dice(detach(adv_output), adversarial.target)
            del adv_output
        if self.is_ddp:
            average_gradients(self.network.parameters())
        self._optimizer_step()
        self.after_step(batch, adversarial, adversarial_dice)

        threshold = self.ima_settings.dice_threshold
        evidence = adversarial.evidence
        if evidence is None:  # a fixed-budget attack: every slice, crossed where Dice fell
            attacked, crossed = data.shape[0], int((adversarial_dice < threshold).sum())
        else:
            attacked, crossed = evidence.attacked, evidence.crossed_correct
        self._epoch_stats.add(
            clean_dice=clean_dice.cpu().numpy(), clean_correct=int((clean_dice >= threshold).sum()),
            adv_dice=adversarial_dice.cpu().numpy(), attacked=attacked, crossed=crossed,
            attack_seconds=attack_seconds, step_seconds=perf_counter() - start,
            adv_weight=adversarial.weight if adversarial_dice.numel() > 0 else 0.0)
        return {"loss": total.cpu().numpy()}

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self._epoch_stats = EpochAccumulator()

    def on_train_epoch_end(self, train_outputs: List[dict]):
        super().on_train_epoch_end(train_outputs)
        self._epoch_stats = EpochAccumulator.merged(gather_objects(self._epoch_stats))
        self.update_margins()
        row = self.epoch_statistics()
        self.print_to_log_file("adversarial training: " + format_for_log(row))
        self._warn_if_adversarial_term_is_weak(row)
        if self.local_rank == 0:
            write_epoch_row(os.path.join(self.output_folder, STATS_FILENAME), row)
            self.after_epoch_written(row)

    def after_epoch_written(self, row: dict) -> None:
        """Rank 0, after the statistics row was written (IMA draws the margin histogram)."""

    def _warn_if_adversarial_term_is_weak(self, row: dict) -> None:
        """Say in the log when the adversarial term has been too weak to matter for a while."""
        weight = row.get("adv_weight", float("nan"))
        self._low_weight_epochs = self._low_weight_epochs + 1 \
            if weight < LOW_ADVERSARIAL_WEIGHT else 0
        if self._low_weight_epochs != LOW_WEIGHT_EPOCHS:
            return
        s = self.ima_settings
        self.print_to_log_file(
            f"WARNING: the adversarial term's weight has stayed below {LOW_ADVERSARIAL_WEIGHT} "
            f"for {LOW_WEIGHT_EPOCHS} epochs (now {weight:.3g}; clean term "
            f"{self.clean_weight:.3g}): this trains almost like clean nnU-Net. Likely cause: "
            f"with adversarial_term={s.adversarial_term!r} only the slices that cross their "
            f"margin are trained on (fraction attacked {row.get('fraction_attacked', 0):.3g}, "
            f"crossed {row.get('fraction_crossed', 0):.3g}). Set \"recipe\": \"authors\" or "
            f"\"adversarial_term\": \"all\" in the NNUNET_IMA_CONFIG file (a new run).")
