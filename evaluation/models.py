"""Trained nnU-Net models, loaded from plans + checkpoint without their trainer class.

Evaluation must not depend on ``nnUNet_extTrainer``: the network is rebuilt from the
architecture recorded in ``plans.json`` and the weights of ``fold_X/checkpoint_*.pth``, in eval
mode, fp32, deep supervision off.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nnunet_ima.errors import UserInputError
from nnunet_ima.io import read_json

from nnunet_ima.evaluation.provenance import check_unchanged, checkpoint_identity

CHECKPOINTS = {"final": "checkpoint_final.pth", "best": "checkpoint_best.pth",
               "latest": "checkpoint_latest.pth"}


def checkpoint_choice(text: str) -> str:
    """``best`` or nnU-Net's ``-chk`` spelling ``checkpoint_best.pth`` -> ``best`` (likewise
    final, latest); anything else is a ``ValueError`` that lists both spellings."""
    by_file = {file: name for name, file in CHECKPOINTS.items()}
    if text in CHECKPOINTS:
        return text
    if text in by_file:
        return by_file[text]
    raise ValueError(f"a checkpoint is one of {', '.join(CHECKPOINTS)} or its file name "
                     f"({', '.join(by_file)}), got {text!r}")


class PaddedNetwork(nn.Module):
    """Runs ``network`` on inputs zero-padded to a multiple of its total stride, then crops.

    ``(B, C, *spatial) -> (B, K, *spatial)``, 2D (``(H, W)``) or 3D (``(D, H, W)``), one
    divisor per spatial axis: each axis is padded at its end to the next multiple of its
    divisor. The attack perturbs the input itself, never the padding, so the noise budget is
    spent on image voxels only; the logits are cropped back to the input's spatial size.
    """

    def __init__(self, network: nn.Module, divisor: Sequence[int]):
        super().__init__()
        self.network = network
        self.divisor = tuple(int(d) for d in divisor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = len(self.divisor)
        if x.ndim != dims + 2:
            raise ValueError(f"expected (B, C) and {dims} spatial axes for a network of stride "
                             f"divisor {self.divisor}, got shape {tuple(x.shape)}")
        size = x.shape[2:]
        pads = [(-s) % d for s, d in zip(size, self.divisor)]
        if any(pads):
            # F.pad lists (before, after) pairs from the last axis backwards.
            x = F.pad(x, [p for pad in reversed(pads) for p in (0, pad)])
        out = self.network(x)
        if isinstance(out, (list, tuple)):
            out = out[0]
        return out[(Ellipsis, *(slice(0, s) for s in size))]


@dataclass
class LoadedModel:
    """A trained nnU-Net model ready to be attacked.

    Attributes:
        name: the trainer name (or the folder name), used in tables.
        folder: the model folder (``.../Trainer__Plans__configuration``).
        network: :class:`PaddedNetwork`, eval mode, fp32, on ``device``.
        num_classes: output channels (background included).
        configuration: e.g. ``"2d"``; ``data_identifier`` its preprocessed folder name.
        dataset_name: e.g. ``"Dataset990_SyntheticOrgan"``.
        ignore_label: nnU-Net's ignore label, if any.
        plans, dataset_json: the model folder's ``plans.json`` and ``dataset.json``.
        checkpoint_path, checkpoint_sha256: the weights file and its digest (a resumed
            evaluation refuses parts computed with other weights).
        checkpoint: the file's :func:`.provenance.checkpoint_identity` (path, size, mtime,
            sha256) as it was loaded; every part records it.
        fold: the nnU-Net fold of the weights, a number or ``"all"``.
        spatial_dims: 2 for a 2D configuration (samples are slices ``(C, H, W)``), 3 for a 3D
            one (samples are whole preprocessed volumes ``(C, D, H, W)``): the length of the
            configuration's patch size. ``network`` maps ``(B, C, *spatial)`` to
            ``(B, K, *spatial)``.
    """

    name: str
    folder: str
    network: PaddedNetwork
    num_classes: int
    configuration: str
    data_identifier: str
    dataset_name: str
    ignore_label: object
    plans: dict
    dataset_json: dict
    checkpoint_path: str = ""
    checkpoint_sha256: str = ""
    fold: object = 0
    checkpoint: dict = field(default_factory=dict)
    spatial_dims: int = 2

    @property
    def class_names(self) -> List[str]:
        """The names of the foreground classes 1 .. K-1 in ``dataset.json`` (``classK`` where it
        names none): the columns of the per-class Dice."""
        labels = self.dataset_json.get("labels", {})
        by_value = {int(v): k for k, v in labels.items() if isinstance(v, int)}
        return [by_value.get(c, f"class{c}") for c in range(1, self.num_classes)]


def _load_weights(network: nn.Module, path: str) -> dict:
    """Load ``network_weights`` of the nnU-Net checkpoint ``path`` into ``network``; returns the
    checkpoint. Weights saved from a DDP (``module.``) or compiled (``_orig_mod.``) network load too."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file: torch raises many types
        raise UserInputError(f"cannot read checkpoint {path} ({type(e).__name__}: {e}); is the "
                             f"file complete? (a run killed while saving leaves a broken file)") from None
    if not isinstance(state, dict) or "network_weights" not in state:
        raise UserInputError(f"{path} is not an nnU-Net checkpoint (no 'network_weights')")
    weights = {}
    for k, v in state["network_weights"].items():
        for prefix in ("module.", "_orig_mod."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        weights[k] = v
    try:
        network.load_state_dict(weights)
    except RuntimeError as e:
        raise UserInputError(f"the weights in {path} do not fit the network described by the "
                             f"model folder's plans.json (was the model trained with other plans, "
                             f"or does its trainer change the architecture?):\n{e}") from None
    return state


def configuration_of(folder: str) -> str:
    """``Trainer__Plans__2d`` -> ``2d``."""
    parts = os.path.basename(os.path.normpath(folder)).split("__")
    if len(parts) != 3:
        raise UserInputError(f"{folder} is not an nnU-Net model folder (expected a name like "
                             f"nnUNetTrainer__nnUNetPlans__2d)")
    return parts[2]


def stride_divisor(strides, spatial_dims: Optional[int] = None) -> Tuple[int, ...]:
    """The total downsampling of an encoder, one entry per spatial axis:
    ``[[1, 1], [2, 2], [2, 1]]`` -> ``(4, 2)``, ``[[1, 1, 1], [1, 2, 2], [2, 2, 2]]`` ->
    ``(2, 4, 4)``.

    A stage's stride is a list (one entry per axis) or one int for every axis (both spellings
    occur in plans). ``spatial_dims``: the number of axes, needed where every stage is one int;
    by default the length of the listed strides, or 2 where none is listed.

    Raises:
        UserInputError: stages of different lengths, or not of ``spatial_dims`` entries.
    """
    listed = {len(s) for s in strides if not np.isscalar(s)}
    if spatial_dims is None:
        spatial_dims = listed.pop() if len(listed) == 1 else (2 if not listed else 0)
    if spatial_dims not in (2, 3) or listed - {spatial_dims}:
        raise UserInputError(f"the architecture's strides {list(strides)} do not give one entry "
                             f"per spatial axis of a 2D or 3D network"
                             f"{'' if not spatial_dims else f' ({spatial_dims} axes)'}; "
                             f"is plans.json intact?")
    stages = np.array([[s] * spatial_dims if np.isscalar(s) else list(s) for s in strides],
                      dtype=np.int64).reshape(-1, spatial_dims)
    return tuple(int(v) for v in stages.prod(axis=0))


# Why a checkpoint is missing although the fold folder has others.
_MISSING_BECAUSE = {"final": "the training has not finished",
                    "latest": "nnU-Net deletes checkpoint_latest.pth when a training finishes",
                    "best": "nnU-Net writes it when an epoch improves the validation Dice"}


def missing_checkpoint_message(folder: str, fold, checkpoint: str) -> str:
    """The error for a missing ``--checkpoint``: it names the checkpoints the fold does have, so
    that a finished run asked for ``latest`` is pointed at ``--checkpoint final``."""
    fold_folder = os.path.join(folder, f"fold_{fold}")
    path = os.path.join(fold_folder, CHECKPOINTS[checkpoint])
    if not os.path.isdir(fold_folder):
        return (f"{fold_folder} does not exist: fold {fold} has not been trained "
                f"(nnUNetv2_train DATASET CONFIGURATION {fold} -tr TRAINER) or check -f")
    present = [name for name, file in CHECKPOINTS.items()
               if os.path.isfile(os.path.join(fold_folder, file))]
    if not present:
        return (f"checkpoint {path} does not exist, nor does any other checkpoint of fold {fold}: "
                f"its training has not finished a first epoch")
    return (f"checkpoint {path} does not exist ({_MISSING_BECAUSE[checkpoint]}); fold {fold} "
            f"has {', '.join(CHECKPOINTS[n] for n in present)}: use "
            f"{' or '.join(f'--checkpoint {n}' for n in present)}")


def check_model_folder(folder: str) -> None:
    """A :class:`UserInputError` unless ``folder`` is a trained nnU-Net model folder (it holds
    ``plans.json`` and ``dataset.json``)."""
    if not os.path.isdir(folder):
        raise UserInputError(f"model folder {folder} does not exist: train the model first "
                             f"(nnUNetv2_train) or check -d/-tr/-p/-c")
    for required in ("plans.json", "dataset.json"):
        if not os.path.isfile(os.path.join(folder, required)):
            raise UserInputError(f"{os.path.join(folder, required)} is missing: not a trained "
                                 f"nnU-Net model folder")


def fold_number(fold):
    """nnU-Net's spelling of a fold: an int, or ``"all"``."""
    if fold == "all":
        return "all"
    try:
        return int(fold)
    except (TypeError, ValueError):
        raise UserInputError(f"a fold is a number or 'all', got {fold!r}") from None


def check_configuration(folder: str, configuration: str, configuration_manager) -> int:
    """The number of spatial axes of ``configuration`` (2 or 3, its patch size's length); a
    :class:`UserInputError` for one the evaluator cannot attack: another patch length, or a
    cascade stage (``3d_cascade_fullres``), whose input includes the previous stage's
    segmentation, which a preprocessed case does not hold."""
    patch_size = list(configuration_manager.patch_size)
    if len(patch_size) not in (2, 3):
        raise UserInputError(f"{folder}: configuration {configuration} has patch size "
                             f"{patch_size}; nnunet-ima-eval attacks 2D and 3D configurations")
    if configuration_manager.previous_stage_name is not None:
        raise UserInputError(f"{folder} is a cascade stage ({configuration}, after "
                             f"{configuration_manager.previous_stage_name}): its input includes "
                             f"the previous stage's segmentation; audit 3d_lowres and 3d_fullres "
                             f"models (-c 3d_lowres, -c 3d_fullres) instead")
    return len(patch_size)


def checked_model_folder(folder: str, fold, checkpoint: str) -> Tuple[str, str, dict]:
    """Everything about a model that can be checked before its weights are read: the folder,
    the checkpoint file of ``fold`` (``checkpoint``: ``final``, ``best``, ``latest`` or the file
    name), a 2D or 3D configuration in ``plans.json`` (:func:`check_configuration`). Both
    inference paths load through it.

    Returns:
        ``(checkpoint path, configuration, plans)``.

    Raises:
        UserInputError: naming what is missing or wrong and the fix.
    """
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    try:
        checkpoint = checkpoint_choice(checkpoint)
    except ValueError as e:
        raise UserInputError(str(e)) from None
    check_model_folder(folder)
    path = os.path.join(folder, f"fold_{fold}", CHECKPOINTS[checkpoint])
    if not os.path.isfile(path):
        raise UserInputError(missing_checkpoint_message(folder, fold, checkpoint))
    configuration = configuration_of(folder)
    plans = read_json(os.path.join(folder, "plans.json"), "is the model folder complete?")
    if configuration not in plans.get("configurations", {}):
        raise UserInputError(f"configuration {configuration!r} is not in {folder}/plans.json")
    check_configuration(folder, configuration,
                        PlansManager(plans).get_configuration(configuration))
    return path, configuration, plans


def load_model(folder: str, fold, checkpoint: str, device: torch.device,
               name: str = None) -> LoadedModel:
    """Load ``folder/fold_{fold}/checkpoint_{checkpoint}.pth`` with the architecture of its plans;
    ``fold`` is a number or ``"all"``. A 2D or 3D configuration: ``network`` maps
    ``(B, C, *spatial)`` to ``(B, K, *spatial)`` on the whole input (no tiles), padded to the
    stride divisor of each axis."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    path, configuration, plans = checked_model_folder(folder, fold, checkpoint)
    dataset_json = read_json(os.path.join(folder, "dataset.json"),
                             "is the model folder complete?")
    plans_manager = PlansManager(plans)
    config = plans_manager.get_configuration(configuration)
    label_manager = plans_manager.get_label_manager(dataset_json)
    if label_manager.has_regions:
        raise UserInputError(f"{folder} was trained on regions; only label-based models are supported")
    num_inputs = determine_num_input_channels(plans_manager, config, dataset_json)
    num_classes = label_manager.num_segmentation_heads
    network = get_network_from_plans(config.network_arch_class_name, config.network_arch_init_kwargs,
                                     config.network_arch_init_kwargs_req_import, num_inputs,
                                     num_classes, allow_init=False, deep_supervision=False)
    identity = checkpoint_identity(path)
    state = _load_weights(network, path)
    check_unchanged(identity, "the evaluator")
    if "strides" not in config.network_arch_init_kwargs:
        raise UserInputError(f"{folder}/plans.json: the architecture has no 'strides'; cannot "
                             f"tell which input sizes the network accepts")
    spatial_dims = len(config.patch_size)
    divisor = stride_divisor(config.network_arch_init_kwargs["strides"], spatial_dims)
    padded = PaddedNetwork(network, divisor).to(device=device, dtype=torch.float32).eval()
    return LoadedModel(name=name or state.get("trainer_name") or os.path.basename(folder),
                       folder=folder, network=padded, num_classes=num_classes,
                       configuration=configuration, data_identifier=config.data_identifier,
                       dataset_name=plans["dataset_name"], ignore_label=label_manager.ignore_label,
                       plans=plans, dataset_json=dataset_json, checkpoint_path=path,
                       checkpoint_sha256=identity["sha256"], fold=fold, checkpoint=identity,
                       spatial_dims=spatial_dims)


def load_models(folders: Sequence[str], folds: Sequence, checkpoint: str,
                device: torch.device, loader: Optional[Callable[..., LoadedModel]] = None
                ) -> List[LoadedModel]:
    """One model per (folder, fold), named by its trainer (``Trainer_foldK`` with several folds),
    or by its folder where trainers repeat (same trainer, other plans or datasets).

    ``loader``: ``(folder, fold, checkpoint, device, name=...) -> LoadedModel``, default
    :func:`load_model` (the predictor path passes its own)."""
    loader = loader or load_model
    suffix = (lambda fold: f"_fold{fold}") if len(folds) > 1 else (lambda fold: "")
    models = [loader(f, fold, checkpoint, device,
                     name=os.path.basename(os.path.normpath(f)).split("__")[0] + suffix(fold))
              for f in folders for fold in folds]
    if len({m.name for m in models}) != len(models):
        for m in models:
            m.name = os.path.basename(os.path.normpath(m.folder)) + suffix(m.fold)
    return models
