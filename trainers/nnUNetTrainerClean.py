"""Plain nnU-Net training with nnunet-ima's settings: the clean baseline of the robustness tables.

Its training step is nnU-Net's own; what it adds, and what ``nnUNetTrainerAdv`` and
``nnUNetTrainerIMA`` inherit, is the settings machinery (class defaults + the JSON file named by
``NNUNET_IMA_CONFIG``, written to ``ima_config.json``), the short schedules the paper uses
(50 epochs x 50 iterations by default), a checkpoint every epoch, and atomic checkpoint writes.

It also guards against nnU-Net's footguns, so that a user's mistake stops the run with one
message and exit code 2 before anything is trained or overwritten:

- ``nnUNet_results`` unset, a file or not writable; a configuration the trainer cannot train;
- a fold that ``splits_final.json`` lacks (nnU-Net would draw a random 80:20 split of all cases),
  a fold that trains or validates on a test case of ``test_cases.json``, fold ``all`` beside
  held-out test cases (:func:`nnunet_ima.nnunet.splits.fold_split_problem`);
- a new training over a finished fold (``checkpoint_final.pth``), which nnU-Net would overwrite;
- a damaged checkpoint to resume from (:mod:`nnunet_ima.nnunet.resume_state`);
- a ``finetune_from`` checkpoint that is missing or does not fit the network, or that
  ``-pretrained_weights`` would partly overwrite.

Fine-tuning (settings ``finetune_from`` and ``lr_warmup_epochs``): a new run loads every weight
of the named checkpoint at the end of ``initialize()``, after nnU-Net's DDP and torch.compile
wrapping (:mod:`nnunet_ima.nnunet.finetune`), with a fresh optimiser; a run that loads a
checkpoint of its own (``--c``, ``--val``) does not, since that checkpoint replaces the weights
anyway. ``lr_warmup_epochs`` puts a linear warmup in front of ``lr_schedule``
(:mod:`nnunet_ima.nnunet.lr_schedule`).

A training that starts writes the fold's cases into the fold folder
(:mod:`nnunet_ima.nnunet.training_record`), so that the evaluator knows what it trained on even
after the split is rewritten; a resumed one (``--c``) or a validation (``--val``) takes its cases
from that record.

This file is imported by nnU-Net's trainer lookup as a top-level module: absolute imports only.
"""
import os
import random
import sys
from datetime import timedelta
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_ima.errors import EXIT_BAD_INPUT, UserInputError
from nnunet_ima.io import check_output_folder, replace_atomically
from nnunet_ima.nnunet.data import without_timed_choices
from nnunet_ima.nnunet.ddp import cpu_ddp_wrapping
from nnunet_ima.nnunet.finetune import first_changed_weight, load_finetune_weights
from nnunet_ima.nnunet.lr_schedule import WarmupLRScheduler
from nnunet_ima.nnunet.resume_state import checkpoint_epoch, recovery_advice
from nnunet_ima.nnunet.settings import resolve_settings, write_settings
from nnunet_ima.nnunet.splits import SPLITS_FILENAME, fold_split_problem
from nnunet_ima.nnunet.training_record import (RECORD_FILENAME, read_training_record,
                                               write_training_record)

TRUE_SPELLINGS = ("true", "1", "t")  # nnU-Net's spellings of true in its environment variables
OVERWRITE_VARIABLE = "NNUNET_IMA_OVERWRITE"  # train a finished fold again from scratch
ALLOW_FOLD_ALL_VARIABLE = "NNUNET_IMA_ALLOW_FOLD_ALL"  # fold all beside held-out test cases


def _flag(variable: str) -> bool:
    return os.environ.get(variable, "").strip().lower() in TRUE_SPELLINGS


def compile_requested() -> bool:
    """Whether ``nnUNet_compile`` explicitly asks for torch.compile (nnU-Net's spellings of true)."""
    return _flag("nnUNet_compile")


def _rank() -> int:
    """This process's DDP rank (0 outside DDP); usable before nnU-Net's constructor sets it."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


REFUSAL_BARRIER_SECONDS = 120
"""How long a refusing DDP rank waits for the others before rank 0 cleans up without them."""


def _wait_for_every_rank() -> None:
    """Under DDP, return once every rank got here (at most :data:`REFUSAL_BARRIER_SECONDS` on
    gloo); outside DDP at once. A refusal waits here before rank 0 removes the folders nnU-Net's
    constructor made: a slower rank still inside that constructor would make them again after
    the cleanup, and torch's spawn stops it as soon as rank 0 exits. Every rank runs the same
    checks, so all of them arrive; a rank that does not only delays the refusal."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=timedelta(seconds=REFUSAL_BARRIER_SECONDS))
        else:
            dist.barrier()
    except RuntimeError:
        pass  # a rank that never came: refuse anyway, the message matters more


def results_folder_problem() -> Optional[str]:
    """Why nnU-Net cannot write its results under ``nnUNet_results``; ``None`` when it can."""
    value = os.environ.get("nnUNet_results", "")
    fix = "export nnUNet_results=/path/to/nnUNet_results (a folder this user can write to)"
    if not value.strip():
        return (f"the environment variable nnUNet_results is not set: nnU-Net writes the trained "
                f"model there. Set it as nnU-Net's documentation/setting_up_paths.md says: {fix}")
    try:
        check_output_folder(value, "nnUNet_results")
    except UserInputError as e:
        return f"{e}. Fix the variable: {fix}"
    return None


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
        self._created_folders: List[str] = []
        self._loaded_checkpoint: Optional[str] = None  # set by load_checkpoint (--c, --val)
        self._split: Optional[Tuple[List[str], List[str]]] = None
        self._splits_file: Optional[str] = None
        self._restoring = False  # inside load_checkpoint: its weights replace finetune_from's
        # The weights finetune_from loaded, until on_train_start checked nothing replaced them.
        self._finetune_weights: Optional[Dict[str, torch.Tensor]] = None
        # Checked before nnU-Net's constructor, which creates the output folders (and fails with
        # a traceback where it cannot).
        problem = results_folder_problem() or self._configuration_problem(plans, configuration)
        if problem:
            self._refuse_start(problem)
        self._created_folders = self._folders_to_create(plans, configuration, fold)
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.is_ddp and device.type == "cpu":
            # nnU-Net moves every DDP rank to its CUDA device; under gloo on CPU, stay on CPU.
            self.device = device
        try:
            self.ima_settings = resolve_settings(self.class_defaults(), self.output_folder,
                                                 continuing, trainer=type(self))
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

    # ------------------------------------------------------------ refusing
    def _configuration_problem(self, plans: dict, configuration: str) -> Optional[str]:
        """Why this trainer cannot train ``configuration`` of ``plans``; ``None`` when it can."""
        available = sorted(plans.get("configurations", {}))
        if configuration not in available:
            return (f"configuration {configuration!r} is not in the plans "
                    f"{plans.get('plans_name', '')!r} (it has {', '.join(available)}). Use one of "
                    f"them, or plan it with nnUNetv2_plan_and_preprocess -c {configuration}")
        patch_size = PlansManager(plans).get_configuration(configuration).patch_size
        if not self.supports_3d and len(patch_size) != 2:
            return (f"{type(self).__name__} trains nnU-Net's 2D configuration only (its margins "
                    f"are kept per 2D slice), but configuration {configuration!r} has the 3D "
                    f"patch size {patch_size}. Use: nnUNetv2_train DATASET 2d FOLD "
                    f"-tr {type(self).__name__}")
        return None

    def _folders_to_create(self, plans: dict, configuration: str, fold) -> List[str]:
        """The folders nnU-Net's constructor is about to create (it makes the fold folder and
        its parents), outermost first: a run that is refused removes them again."""
        results = os.path.abspath(os.environ["nnUNet_results"])
        model = f"{type(self).__name__}__{plans['plans_name']}__{configuration}"
        candidates = [results, os.path.join(results, plans["dataset_name"]),
                      os.path.join(results, plans["dataset_name"], model),
                      os.path.join(results, plans["dataset_name"], model, f"fold_{fold}")]
        return [c for c in candidates if not os.path.exists(c)]

    def _refuse_start(self, error, check_config: bool = False, verb: str = "start") -> None:
        """Stop before any training work: one readable paragraph on stderr and exit code 2,
        without a traceback (the message is the user's to act on). What this run created is
        removed: the log file nnU-Net's constructor began with its citation banner, and the
        folders it made for a run that never started.

        Every DDP rank stops the same way (they run the same checks); they wait for each other
        (:func:`_wait_for_every_rank`), then rank 0 speaks and cleans up, and torch's spawn
        reports the exit code of the ranks.
        """
        _wait_for_every_rank()
        if _rank() == 0:
            log_file = getattr(self, "log_file", None)
            if log_file and os.path.isfile(log_file):
                os.remove(log_file)
            for folder in reversed(self._created_folders):
                if os.path.isdir(folder) and not os.listdir(folder):
                    os.rmdir(folder)
            hint = (f"\nCheck a settings file before launching: nnunet-ima check-config FILE -tr "
                    f"{type(self).__name__}") if check_config else ""
            print(f"\nnnunet-ima: {type(self).__name__} cannot {verb}.\n{error}{hint}\n"
                  f"(nothing was trained or written)\n", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_BAD_INPUT)

    def train_command(self) -> str:
        """The ``nnUNetv2_train`` call of this fold (without ``--c``), for messages."""
        plans = self.plans_manager.plans_name
        command = (f"nnUNetv2_train {self.plans_manager.dataset_name} {self.configuration_name} "
                   f"{self.fold} -tr {type(self).__name__}")
        if plans != "nnUNetPlans":
            command += f" -p {plans}"
        if self.device.type != "cuda":
            command += f" -device {self.device.type}"
        return command

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
        self._maybe_finetune()

    def _maybe_finetune(self) -> None:
        """Load every weight of ``finetune_from`` into the wrapped network (every DDP rank loads
        the same file, so the ranks agree without a broadcast). Not when ``load_checkpoint``
        initialises the trainer (``--c``, ``--val``): the run's own checkpoint then holds the
        fine-tuned weights, and the source may be gone."""
        path = self.ima_settings.finetune_from
        if path is None or self._restoring:
            return
        try:
            self._finetune_weights = load_finetune_weights(
                self.network, path, self.dataset_json.get("labels"))
        except UserInputError as e:
            self._refuse_start(e)
        self.print_to_log_file(f"fine-tuning: every weight ({len(self._finetune_weights)} "
                               f"tensors, segmentation heads included) from {path}; the "
                               f"optimizer starts fresh")

    def _refuse_replaced_finetune_weights(self) -> None:
        """``nnUNetv2_train -pretrained_weights`` loads its file after ``initialize()``, over the
        weights of ``finetune_from`` but for the segmentation heads: a mix of two models that
        neither option asked for. Refused when a weight changed between the two."""
        weights, self._finetune_weights = self._finetune_weights, None  # checked once; freed
        if weights is None:
            return
        changed = first_changed_weight(self.network, weights)
        if changed is not None:
            self._refuse_start(
                f"finetune_from ({self.ima_settings.finetune_from}) and nnUNetv2_train "
                f"-pretrained_weights were both given: -pretrained_weights replaced the weights "
                f"finetune_from loaded ({changed!r} first). Give one of them: finetune_from "
                f"loads every weight, -pretrained_weights all but the segmentation heads "
                f"(for another label set).")

    @staticmethod
    def get_training_transforms(*args, **kwargs):
        # nnU-Net's Gaussian blur keeps FFT or direct convolution, whichever was faster on the
        # first batches; the two round differently, so the machine's load changed the weights of
        # a seeded training. Direct convolution always: the same seed gives the same model.
        return without_timed_choices(nnUNetTrainer.get_training_transforms(*args, **kwargs))

    def configure_optimizers(self):
        optimizer, scheduler = super().configure_optimizers()
        constant = self.ima_settings.lr_schedule == "constant"
        warmup = self.ima_settings.lr_warmup_epochs
        if warmup > 0:
            scheduler = WarmupLRScheduler(optimizer, self.initial_lr, self.num_epochs, warmup,
                                          **({"exponent": 0.0} if constant else {}))
        elif constant:
            # nnU-Net's poly schedule with exponent 0: the learning rate stays initial_lr, and
            # nnU-Net's own call scheduler.step(epoch) keeps working.
            scheduler = PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs, exponent=0.0)
        # Without warmup, poly is nnU-Net's own scheduler: the rates stay bit-identical.
        return optimizer, scheduler

    def _do_i_compile(self) -> bool:
        # nnU-Net compiles by default on CUDA. The attacks run the network in eval mode, without
        # parameter gradients, on batches whose size changes from step to step: each of these is
        # a new graph for torch.compile (recompilations until its cache limit). So it is off
        # unless asked for, in the clean trainer too, so that the three compare like for like.
        return compile_requested() and super()._do_i_compile()

    def on_train_start(self):
        fresh = self._loaded_checkpoint is None
        if fresh:
            self._refuse_finished_fold()
        if not self.was_initialized:  # nnU-Net's on_train_start would; the check needs it first
            self.initialize()
        self._refuse_replaced_finetune_weights()
        super().on_train_start()  # picks the fold's cases (do_split), or refuses
        if self.local_rank == 0:
            path = write_settings(self.ima_settings, self.output_folder)
            self.print_to_log_file(f"nnunet-ima settings ({path}): {self.ima_settings.to_dict()}")
            if fresh:
                train, val = self._split
                path = write_training_record(self.output_folder, self.fold, train, val,
                                             self._splits_file, type(self).__name__)
                self.print_to_log_file(f"training record: {path}")

    def _refuse_finished_fold(self) -> None:
        """nnU-Net trains a finished fold again from scratch when ``--c`` is left out, replacing
        the model (and ima_config.json, and the training record) without a word."""
        final = os.path.join(self.output_folder, "checkpoint_final.pth")
        if os.path.isfile(final) and not _flag(OVERWRITE_VARIABLE):
            self._refuse_start(
                f"{self.output_folder} holds a finished training ({os.path.basename(final)}); "
                f"training again would overwrite its model, ima_config.json and "
                f"{RECORD_FILENAME}. To rerun only its validation: {self.train_command()} --val. "
                f"To train it again from scratch: delete the fold folder (rm -r "
                f"{self.output_folder}) or set {OVERWRITE_VARIABLE}=1.")

    # ------------------------------------------------------------ the split
    def do_split(self):
        """nnU-Net's ``do_split``, refusing the splits that would train on held-out cases.

        A fresh training takes nnU-Net's choice after :func:`fold_split_problem` found nothing
        wrong with it. A resumed one (``--c``) or a validation (``--val``) takes the cases of the
        fold's training record, whatever the split files say now: those are the cases the model
        trained on. The choice is made once per run (the final validation uses it again).
        """
        if self._split is None:
            self._split = self._choose_split()
        train, val = self._split
        return list(train), list(val)

    def _choose_split(self) -> Tuple[List[str], List[str]]:
        base = self.preprocessed_dataset_folder_base
        splits_file = os.path.join(base, SPLITS_FILENAME)
        record = None
        if self._loaded_checkpoint is not None:
            try:
                record = read_training_record(self.output_folder)
            except UserInputError as e:
                self._refuse_start(e, verb="continue")
        if record is not None:
            self.print_to_log_file(f"cases of fold {self.fold} from its training record "
                                   f"{os.path.join(self.output_folder, RECORD_FILENAME)}: "
                                   f"{len(record['train'])} training, {len(record['val'])} "
                                   f"validation")
            self._splits_file = record["splits_file"]
            return list(record["train"]), list(record["val"])
        try:
            problem = fold_split_problem(base, self.fold, allow_fold_all=_flag(
                ALLOW_FOLD_ALL_VARIABLE))
        except UserInputError as e:
            problem = str(e)
        if problem:
            self._refuse_start(problem)
        train, val = super().do_split()
        self._splits_file = None if self.fold == "all" else splits_file
        return [str(c) for c in train], [str(c) for c in val]

    # ------------------------------------------------------------ resuming
    def resume_state_problem(self, checkpoint_path: str) -> Optional[str]:
        """Why training cannot continue from ``checkpoint_path`` (with the files that belong to
        it, :meth:`checkpoint_companions`); ``None`` when it can."""
        try:
            checkpoint_epoch(checkpoint_path)
        except UserInputError as e:
            return str(e)
        return None

    def checkpoint_companions(self, checkpoint_path: str) -> Sequence[str]:
        """The files saved beside a checkpoint that a resumed run needs too (none here)."""
        return ()

    def refuse_resume(self, checkpoint_path: str, problem: str) -> None:
        """Stop on resume state that cannot be used, saying which checkpoint still can and how."""
        self._refuse_start(recovery_advice(checkpoint_path, problem, self.train_command(),
                                           self.resume_state_problem,
                                           self.checkpoint_companions), verb="continue")

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        # nnU-Net's own load ends in torch's zip error on a truncated file: check it first.
        if isinstance(filename_or_checkpoint, str):
            problem = self.resume_state_problem(filename_or_checkpoint)
            if problem:
                self.refuse_resume(filename_or_checkpoint, problem)
        self._restoring = True  # nnU-Net's load initialises the trainer first where needed
        try:
            super().load_checkpoint(filename_or_checkpoint)
        finally:
            self._restoring = False
        self._finetune_weights = None  # the checkpoint's weights replaced them, as asked
        if isinstance(filename_or_checkpoint, str):
            self._loaded_checkpoint = filename_or_checkpoint

    def save_checkpoint(self, filename: str) -> None:
        # nnU-Net writes the checkpoint in place; a kill during the write would leave a truncated
        # file for --c. Writing to a temporary name and renaming keeps the previous one intact.
        if self.local_rank != 0 or self.disable_checkpointing:
            return super().save_checkpoint(filename)
        replace_atomically(filename, super().save_checkpoint)
