"""The memory and disk an nnU-Net training of the drivers needs, estimated before it starts.

A checkpoint of nnU-Net's trainer holds the network's weights and the SGD momentum of each
(float32, 8 bytes per parameter); ``checkpoint_latest``, ``checkpoint_best`` and
``checkpoint_final`` exist side by side when a training ends. The network is the one the plans
build (on PyTorch's ``meta`` device: its parameters are counted without allocating them).
"""
from __future__ import annotations

import json
import os

from nnunet_ima.errors import UserInputError

MB = 1024 ** 2
# Peak resident memory of one nnUNetv2_train of this package's trainers on a CPU: 1.2 GB
# measured (GNU time) for nnUNetTrainerIMA on the demo's 2d plans; rounded up.
TRAINING_MEMORY_BYTES = 1536 * MB
CHECKPOINTS_AT_ONCE = 3
CHECKPOINT_OVERHEAD_BYTES = MB  # the training log, grad scaler and plans inside a checkpoint
# Per model beside its checkpoints: progress.png, margin files and histograms, the debug and
# training logs, the validation segmentations of small datasets.
MODEL_EXTRA_BYTES = 10 * MB
# One nnunet-ima-eval output folder: tables, parts, per-slice CSV and pictures.
EVALUATION_BYTES = 10 * MB


def checkpoint_bytes(parameters: int) -> int:
    """Size of one nnU-Net checkpoint of a network with ``parameters`` float32 parameters (the
    demo's 1.93 M parameters: 15.5 MB measured, 16.5 MB estimated)."""
    return 8 * parameters + CHECKPOINT_OVERHEAD_BYTES


def model_disk_bytes(parameters: int) -> int:
    """Disk one trained model (one fold) takes at its peak, when the training ends."""
    return CHECKPOINTS_AT_ONCE * checkpoint_bytes(parameters) + MODEL_EXTRA_BYTES


def network_parameters(preprocessed_dataset: str, configuration: str = "2d",
                       plans: str = "nnUNetPlans") -> int:
    """The number of parameters of the network that ``nnUNetv2_train`` builds for
    ``configuration`` of ``plans`` in the preprocessed dataset folder.

    Raises:
        UserInputError: the plans or ``dataset.json`` are missing or unreadable, or they have no
            such configuration.
    """
    plans_file = os.path.join(preprocessed_dataset, f"{plans}.json")
    dataset_file = os.path.join(preprocessed_dataset, "dataset.json")
    for path in (plans_file, dataset_file):
        if not os.path.isfile(path):
            raise UserInputError(f"{path} does not exist: run nnUNetv2_plan_and_preprocess -d "
                                 f"{os.path.basename(preprocessed_dataset)} -c {configuration} "
                                 f"first")
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    try:
        manager = PlansManager(plans_file)
        with open(dataset_file) as f:
            dataset_json = json.load(f)
        config = manager.get_configuration(configuration)
        labels = manager.get_label_manager(dataset_json)
        inputs = determine_num_input_channels(manager, config, dataset_json)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        # nnU-Net raises RuntimeError for a configuration the plans do not have.
        raise UserInputError(f"cannot read configuration {configuration} of {plans_file} "
                             f"({e}); rerun nnUNetv2_plan_and_preprocess -c {configuration}"
                             ) from None
    with torch.device("meta"):  # counted, never allocated
        network = nnUNetTrainer.build_network_architecture(
            manager, config, inputs, labels.num_segmentation_heads, True)
    return sum(p.numel() for p in network.parameters())
