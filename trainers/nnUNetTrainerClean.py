"""Plain nnU-Net training with nnunet-ima's settings: the clean baseline of the robustness tables.

Its training step is nnU-Net's own; what it adds, and what ``nnUNetTrainerAdv`` and
``nnUNetTrainerIMA`` inherit, is the settings machinery (class defaults + the JSON file named by
``NNUNET_IMA_CONFIG``, written to ``ima_config.json``), the short schedules the paper uses
(50 epochs x 50 iterations by default), a checkpoint every epoch, and atomic checkpoint writes.

This file is imported by nnU-Net's trainer lookup as a top-level module: absolute imports only.
"""
import os
import random
import sys
from typing import Any, Dict

import numpy as np
import torch
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_ima.errors import UserInputError
from nnunet_ima.io import replace_atomically
from nnunet_ima.nnunet.ddp import cpu_ddp_wrapping
from nnunet_ima.nnunet.settings import resolve_settings, write_settings


def compile_requested() -> bool:
    """Whether ``nnUNet_compile`` explicitly asks for torch.compile (nnU-Net's spellings of true)."""
    return os.environ.get("nnUNet_compile", "").lower() in ("true", "1", "t")


class nnUNetTrainerClean(nnUNetTrainer):
    """nnU-Net's trainer with the schedule taken from nnunet-ima's settings.

    Subclasses and named variants set ``ima_defaults`` (a dict of :class:`TrainerSettings`
    fields); a subclass's dict adds to those of its bases (:meth:`class_defaults`).
    """

    ima_defaults: Dict[str, Any] = {}
    supports_3d: bool = True

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        continuing = bool(plans.get("continue_training", False))
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.is_ddp and device.type == "cpu":
            # nnU-Net moves every DDP rank to its CUDA device; under gloo on CPU, stay on CPU.
            self.device = device
        if not self.supports_3d and len(self.configuration_manager.patch_size) != 2:
            self._refuse_start(RuntimeError(
                f"{type(self).__name__} trains nnU-Net's 2D configuration only (its margins are "
                f"kept per 2D slice), but configuration {configuration!r} has the 3D patch size "
                f"{self.configuration_manager.patch_size}. Use: nnUNetv2_train DATASET 2d FOLD "
                f"-tr {type(self).__name__}"))
        try:
            self.ima_settings = resolve_settings(self.class_defaults(), self.output_folder,
                                                 continuing)
        except UserInputError as e:
            self._refuse_start(e, check_config=True)
        s = self.ima_settings
        self.num_epochs = s.num_epochs
        self.num_iterations_per_epoch = s.num_iterations_per_epoch
        self.num_val_iterations_per_epoch = s.num_val_iterations_per_epoch
        self.save_every = s.save_every
        self.initial_lr = s.initial_lr
        if s.seed is not None:
            # Before initialize() builds the network and get_dataloaders() starts sampling.
            # Under DDP each rank gets seed + rank, so that ranks sample different batches
            # (DDP broadcasts rank 0's initial weights, so the network is the same anyway).
            seed = s.seed + self.local_rank
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)

    def _refuse_start(self, error: Exception, check_config: bool = False) -> None:
        """Stop before any training work: one readable paragraph on stderr (nnU-Net's traceback
        that follows buries the message on its last line), and no log file of a run that never
        started (nnU-Net's constructor has already written its citation banner into one)."""
        if os.path.isfile(self.log_file):
            os.remove(self.log_file)
            if os.path.isdir(self.output_folder) and not os.listdir(self.output_folder):
                os.rmdir(self.output_folder)
        hint = (f"\nCheck a settings file before launching: nnunet-ima check-config FILE -tr "
                f"{type(self).__name__}") if check_config else ""
        print(f"\nnnunet-ima: {type(self).__name__} cannot start.\n{error}{hint}\n"
              f"(nothing was trained or written; nnU-Net's traceback follows)\n",
              file=sys.stderr, flush=True)
        raise error

    @classmethod
    def class_defaults(cls) -> Dict[str, Any]:
        """The ``ima_defaults`` of the class and its bases, the most derived winning per key."""
        merged: Dict[str, Any] = {}
        for klass in reversed(cls.__mro__):
            merged.update(vars(klass).get("ima_defaults", {}))
        return merged

    def initialize(self):
        with cpu_ddp_wrapping(self.device):
            super().initialize()
        if self.device.type == "cuda" and not compile_requested():
            self.print_to_log_file("torch.compile is off for nnunet-ima trainers; set "
                                   "nnUNet_compile=t to turn it on")

    def configure_optimizers(self):
        optimizer, scheduler = super().configure_optimizers()
        if self.ima_settings.lr_schedule == "constant":
            # nnU-Net's poly schedule with exponent 0: the learning rate stays initial_lr, and
            # nnU-Net's own call scheduler.step(epoch) keeps working.
            scheduler = PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs, exponent=0.0)
        return optimizer, scheduler

    def _do_i_compile(self) -> bool:
        # nnU-Net compiles by default on CUDA. The attacks run the network in eval mode, without
        # parameter gradients, on batches whose size changes from step to step: each of these is
        # a new graph for torch.compile (recompilations until its cache limit). So it is off
        # unless asked for, in the clean trainer too, so that the three compare like for like.
        return compile_requested() and super()._do_i_compile()

    def on_train_start(self):
        super().on_train_start()
        if self.local_rank == 0:
            path = write_settings(self.ima_settings, self.output_folder)
            self.print_to_log_file(f"nnunet-ima settings ({path}): {self.ima_settings.to_dict()}")

    def save_checkpoint(self, filename: str) -> None:
        # nnU-Net writes the checkpoint in place; a kill during the write would leave a truncated
        # file for --c. Writing to a temporary name and renaming keeps the previous one intact.
        if self.local_rank != 0 or self.disable_checkpointing:
            return super().save_checkpoint(filename)
        replace_atomically(filename, super().save_checkpoint)
