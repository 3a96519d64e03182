"""Run folders of ``nnunet-ima-classify``: train one, load one.

A run folder holds ``config.json`` (a :class:`TrainConfig`), checkpoints and the final model
(:data:`FINAL`); ``eval`` writes ``eval_<norm>.json`` beside them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from nnunet_ima.classification.datasets import DatasetSplits, load_dataset
from nnunet_ima.classification.models import build_model
from nnunet_ima.classification.settings import TrainConfig
from nnunet_ima.classification.training import CHECKPOINT_FORMAT, FINAL, Trainer, seed_everything
from nnunet_ima.errors import UserInputError

# Below this many parameters a network's matrix products are too small for intra-op threads to
# pay off; on a busy CPU the threads' synchronisation made the moons MLP 30x slower.
SMALL_MODEL_PARAMETERS = 200_000


@dataclass(frozen=True)
class ExecutionOptions:
    """How a command runs, not what it computes.

    ``num_threads``: torch's CPU threads (``None``: torch's default, 1 for networks under
    :data:`SMALL_MODEL_PARAMETERS` parameters); ``progress``: progress bars.
    """

    device: torch.device = torch.device("cpu")
    num_threads: Optional[int] = None
    progress: bool = True

    def __post_init__(self):
        if self.num_threads is not None and self.num_threads < 1:
            raise UserInputError(f"--num-threads must be >= 1, got {self.num_threads}")

    def set_threads(self, model: torch.nn.Module) -> None:
        """Set torch's CPU threads for ``model`` (see the class docstring)."""
        if self.num_threads is not None:
            torch.set_num_threads(self.num_threads)
        elif sum(p.numel() for p in model.parameters()) < SMALL_MODEL_PARAMETERS:
            torch.set_num_threads(1)


def split_path(folder: str, dataset: str) -> Optional[str]:
    """Where a run keeps its COVID-19 CT patient split (the other datasets have fixed splits)."""
    return os.path.join(folder, "covid_split.json") if dataset == "covid-ct" else None


def load_run_data(folder: str, config: TrainConfig) -> DatasetSplits:
    """The dataset splits that ``config``'s run in ``folder`` trains and is evaluated on."""
    return load_dataset(config.dataset, config.data_root, config.data_seed,
                        split_path(folder, config.dataset), config.moons_noise)


def train_run(config: TrainConfig, folder: str, execution: ExecutionOptions,
              save_every: int = 0, resume: Optional[bool] = None) -> dict:
    """Train ``config`` into ``folder``; returns the last epoch's history row.

    ``save_every``: also keep ``checkpoint_epoch_N.pt`` every N epochs (0: never). ``resume``
    (see :meth:`Trainer.run`): ``None`` continues a checkpoint in ``folder`` when there is one,
    ``True`` requires one, ``False`` refuses to overwrite one.
    """
    if save_every < 0:
        raise UserInputError(f"--save-every must be >= 0, got {save_every}")
    data = load_run_data(folder, config)
    seed_everything(config.seed)
    model = build_model(config.model, data.num_classes, data.input_shape)
    execution.set_threads(model)
    trainer = Trainer(config, data, model, folder, execution.device, save_every,
                      progress=execution.progress)
    return trainer.run(resume=resume)[-1]


def load_run(folder: str, device: torch.device) -> Tuple[TrainConfig, dict]:
    """The config and the final weights of a run folder (checked, nothing built yet)."""
    path = os.path.join(folder, FINAL)
    if not os.path.isfile(path):
        raise UserInputError(f"{path} does not exist: train the run first (`nnunet-ima-classify "
                             f"train ... -o {folder}`)")
    try:
        state = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:  # a truncated or foreign file: say which one
        raise UserInputError(f"{path} cannot be loaded ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UserInputError(f"{path} is not a model of nnunet-ima-classify")
    return TrainConfig.from_dict(state["config"]), state["model"]
