"""IMA (Increasing-Margin Adversarial training) inside nnU-Net's 2D pipeline.

Each 2D training slice ``(case identifier, slice index)`` has an estimated margin ``E`` in a
:class:`nnunet_ima.margins.MarginStore`. A training step (Algorithm 1 of the paper, the core's
:class:`nnunet_ima.adversarial_step.IMAStep` with the recipe's choices):

1. the clean output (already computed for the clean loss) splits the batch into slices whose
   hard Dice is >= ``dice_threshold`` ("correct") and the others;
2. BPGD (Algorithm 3) runs with budgets ``E`` on the correct slices (``attack_slices="correct"``,
   the printed recipe) or on all (``"all"``, the authors' recipe): PGD on nnU-Net's per-slice
   Dice + CE until the Dice falls below the threshold, then ``binary_steps`` halvings locate the
   boundary;
3. printed recipe: ``L = (1 - beta) * loss(X) + beta * M / B * loss(X_boundary)`` over the ``M``
   crossed slices; authors' recipe (``adversarial_term="all"``):
   ``L = (1 - beta) * loss(X) + beta * loss(X_adv)`` with every attacked slice's point (its
   boundary point, or its last PGD iterate when it did not cross), nnU-Net's loss (deep
   supervision included; ``adversarial_dice`` chooses batch or per-sample Dice);
4. every slice's outcome is recorded (``after_step``); at the end of the epoch
   (``update_margins``, before the statistics row) the margins shrink (crossed or clean-wrong)
   or expand by ``delta`` (Algorithm 2), clipped to ``[0, eps_max]``.

The margins are saved beside every checkpoint (``checkpoint_*.margins.json``) and restored by
``nnUNetv2_train ... --c``. Under DDP (``-num_gpus N``) the ranks' records are merged at the end
of every epoch, so all ranks hold the same margins; per-epoch statistics go to the log and ``ima_stats.csv``, the margin
histogram to ``margins_hist.png``.

This file is imported by nnU-Net's trainer lookup as a top-level module: absolute imports only.
"""
import os
from typing import Any, Optional, Sequence

import torch

from nnunet_ima.adversarial_step import AdversarialBatch, IMARecipe, IMAStep
from nnunet_ima.distributed import merge_margin_records
from nnunet_ima.errors import UserInputError
from nnunet_ima.nnunet.margin_checkpoint import (load_margins, margins_path, remove_margins,
                                                 save_margins)
from nnunet_ima.nnunet.resume_state import checkpoint_epoch
from nnunet_ima.nnunet.data import sample_keys, slice_tracking_loaders
from nnunet_ima.trainers.nnUNetTrainerAdv import nnUNetTrainerAdv
from nnunet_ima.nnunet.training_stats import HISTOGRAM_FILENAME, plot_margin_histogram


class nnUNetTrainerIMA(nnUNetTrainerAdv):
    """IMA with the paper's settings (2D, 50 x 50 iterations, eps_max 25, L2, 20 PGD steps of
    alpha 4, 10 binary steps, beta 0.5, Dice threshold 0.6, average-shrink margins) and the
    ``authors`` recipe, the reading of IMA that the published segmentation tables were made
    with: every slice attacked, every attacked slice's point in the adversarial term with weight
    beta. It was chosen by the ablation in docs/benchmarks.md ("Which IMA"): with the printed
    reading the adversarial term had a weight of about 0.01 and IMA trained like clean nnU-Net at
    half the learning rate. ``nnUNetTrainerIMA_printed`` (or ``"recipe": "printed"``) gives
    Algorithm 1 as printed."""

    supports_3d = False
    ima_defaults = {"recipe": "authors"}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.ima = self.ima_settings.ima
        self.clean_weight = 1.0 - self.ima.beta
        self.margins = self.ima.make_margin_store(self.num_epochs)

    def get_dataloaders(self):
        with slice_tracking_loaders():
            return super().get_dataloaders()

    # ------------------------------------------------------------------ hooks
    def adversarial_batch(self, data: torch.Tensor, target: Any, clean_output: Any,
                          batch: dict) -> AdversarialBatch:
        """BPGD at the slices' margins; the adversarial term as ``adversarial_term`` says.

        ``attack_slices="correct"`` attacks the clean-correct slices, ``"all"`` every slice (a
        clean-wrong slice then crosses at its start point). ``adversarial_term="crossed"``
        trains on the boundary points of the ``M`` crossed slices with weight
        ``beta * M / B``; ``"all"`` on the point of every attacked slice (its boundary point,
        or its last PGD iterate when it did not cross) with weight ``beta``.
        """
        s = self.ima_settings
        step = IMAStep(self.ima, s.attack, self.is_correct, loss=self.attack_loss,
                       recipe=IMARecipe(s.attack_slices, s.adversarial_term, s.start_point))
        return step(self.attack_network, data, target, clean_output, sample_keys(batch),
                    self.margins)

    def after_step(self, batch: dict, adversarial: AdversarialBatch,
                   adversarial_dice: torch.Tensor) -> None:
        adversarial.evidence.record(self.margins)

    def update_margins(self) -> None:
        """Algorithm 2 on this epoch's records; ``margin_update`` says what it did."""
        # Under DDP every rank recorded different slices: all take the union, in rank order,
        # so all hold bit-identical margins afterwards (rank 0 writes them).
        merge_margin_records(self.margins)
        self.margin_update = self.margins.end_epoch()

    def epoch_statistics(self) -> dict:
        update = self.margin_update  # of this epoch: update_margins ran before
        row = {"epoch": self.current_epoch, **self._epoch_stats.summary()}
        row.update({
            "margin_mean": update.margin_mean, "margin_q25": update.margin_q25,
            "margin_median": update.margin_median, "margin_q75": update.margin_q75,
            "margin_min": update.margin_min, "margin_max": update.margin_max,
            "eps_max": self.ima.eps_max, "margin_saturated": update.fraction_saturated,
            "fraction_expanded": update.fraction_expanded,
            "fraction_shrunk": update.fraction_shrunk, "fraction_reset": update.fraction_reset,
            "slices_updated": update.keys_updated, "slices_total": update.keys_total})
        return row

    def after_epoch_written(self, row: dict) -> None:
        plot_margin_histogram(self.margins.values(),
                              os.path.join(self.output_folder, HISTOGRAM_FILENAME),
                              self.ima.eps_max, self.current_epoch, initial=self.margins.initial)

    # ---------------------------------------------------------- checkpoints
    def save_checkpoint(self, filename: str) -> None:
        if self.local_rank == 0 and not self.disable_checkpointing:
            # Written first: see nnunet_ima.nnunet.margin_checkpoint for why this order is crash-safe.
            save_margins(filename, self.margins, self.current_epoch + 1)
        super().save_checkpoint(filename)

    def resume_state_problem(self, checkpoint_path: str) -> Optional[str]:
        # A checkpoint without its margins cannot be continued: IMA would restart every margin.
        problem = super().resume_state_problem(checkpoint_path)
        if problem is None:
            try:
                load_margins(checkpoint_path, checkpoint_epoch(checkpoint_path))
            except UserInputError as e:
                problem = str(e)
        return problem

    def checkpoint_companions(self, checkpoint_path: str) -> Sequence[str]:
        return (margins_path(checkpoint_path),)

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        super().load_checkpoint(filename_or_checkpoint)  # checked: resume_state_problem
        if isinstance(filename_or_checkpoint, str):
            self.margins = load_margins(filename_or_checkpoint, self.current_epoch)
            self.print_to_log_file(f"restored {len(self.margins)} slice margins from the "
                                   f"checkpoint of epoch {self.current_epoch}")

    def on_train_end(self):
        super().on_train_end()
        latest = os.path.join(self.output_folder, "checkpoint_latest.pth")
        if self.local_rank == 0 and not os.path.isfile(latest):
            remove_margins(latest)
