"""What the benchmark scripts (``benchmarks/*.py``) share: nnU-Net 2D networks of two plan sizes
with random weights and the nnU-Net plans that describe them, evaluation models and test slices
made from them, wall-clock timing that waits for CUDA, and the ``name=ratio`` line each script
ends with.

nnunetv2 and the evaluator are imported when a network or a model is built, so importing this
module loads neither.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional, Tuple, TypeVar

import numpy as np
import torch

T = TypeVar("T")

# PlainConvUNet settings of nnU-Net 2D plans: the synthetic 48x48 plan of the tests, and the
# plan nnU-Net makes for MSD Heart (Dataset002) 2D: patch 320x256, batch 40, 7 stages.
PLANS = {
    "tiny": {"patch": (48, 48), "batch": 6, "features": [32, 64, 128, 256]},
    "heart": {"patch": (320, 256), "batch": 40, "features": [32, 64, 128, 256, 512, 512, 512]},
}


def architecture(features: List[int]) -> dict:
    """The ``"architecture"`` entry of an nnU-Net 2D plan: ``PlainConvUNet`` with ``features``
    channels per stage, 3x3 convolutions, stride 2 from the second stage on."""
    n = len(features)
    return {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {
                "n_stages": n, "features_per_stage": list(features),
                "conv_op": "torch.nn.modules.conv.Conv2d", "kernel_sizes": [[3, 3]] * n,
                "strides": [[1, 1]] + [[2, 2]] * (n - 1), "n_conv_per_stage": [2] * n,
                "n_conv_per_stage_decoder": [2] * (n - 1), "conv_bias": True,
                "norm_op": "torch.nn.modules.instancenorm.InstanceNorm2d",
                "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None,
                "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
                "nonlin_kwargs": {"inplace": True}},
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}


def build_network(features: List[int], num_classes: int) -> torch.nn.Module:
    """nnU-Net's 2D ``PlainConvUNet`` of :func:`architecture` (``features``), one input
    channel, deep supervision on, random weights."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    arch = architecture(features)
    return get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"],
                                  arch["_kw_requires_import"], 1, num_classes,
                                  deep_supervision=True)


def nnunet_plans(plan: str, dataset_name: str, batch_size: int,
                 labels: Dict[str, int]) -> Tuple[dict, dict]:
    """``(plans, dataset_json)`` as ``nnUNetv2_plan_and_preprocess`` writes them
    (``nnUNetPlans.json``, ``dataset.json``) for one single-channel, z-scored dataset
    ``dataset_name`` with a ``"2d"`` configuration of ``PLANS[plan]`` (its patch size and
    network) at ``batch_size``, and the segmentation ``labels``."""
    patch = list(PLANS[plan]["patch"])
    configuration = {
        "data_identifier": "nnUNetPlans_2d", "preprocessor_name": "DefaultPreprocessor",
        "batch_size": batch_size, "patch_size": patch, "median_image_size_in_voxels": patch,
        "spacing": [1.0, 1.0], "normalization_schemes": ["ZScoreNormalization"],
        "use_mask_for_norm": [False], "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0,
                                      "force_separate_z": None},
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0,
                                     "force_separate_z": None},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                               "force_separate_z": None},
        "architecture": architecture(PLANS[plan]["features"]), "batch_dice": True}
    plans = {"dataset_name": dataset_name, "plans_name": "nnUNetPlans",
             "original_median_spacing_after_transp": [1.0, 1.0, 1.0],
             "original_median_shape_after_transp": [16, *patch],
             "image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2],
             "transpose_backward": [0, 1, 2], "configurations": {"2d": configuration},
             "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
             "foreground_intensity_properties_per_channel": {"0": {
                 "max": 4.0, "mean": 0.0, "median": 0.0, "min": -4.0, "percentile_00_5": -3.0,
                 "percentile_99_5": 3.0, "std": 1.0}}}
    dataset_json = {"channel_names": {"0": "MRI"}, "labels": dict(labels),
                    "numTraining": 1, "file_ending": ".nii.gz"}
    return plans, dataset_json


def evaluation_model(plan: str, device: torch.device, num_classes: int = 3):
    """A :class:`~nnunet_ima.evaluation.models.LoadedModel` named ``plan`` around a network of
    ``PLANS[plan]`` (random weights, deep supervision off, eval mode), as ``nnunet-ima-eval``
    attacks a loaded model."""
    from nnunet_ima.evaluation.models import LoadedModel, PaddedNetwork

    features = PLANS[plan]["features"]
    network = build_network(features, num_classes)
    network.decoder.deep_supervision = False
    divisor = 2 ** (len(features) - 1)  # the total stride
    padded = PaddedNetwork(network, (divisor, divisor)).to(device).eval()
    return LoadedModel(plan, "", padded, num_classes, "2d", "", "", None, {}, {})


def random_slices(plan: str, n: int, seed: int, num_classes: int = 3) -> list:
    """``n`` :class:`~nnunet_ima.evaluation.samples.SliceSample` of case ``"c"`` at the patch
    size ``(H, W)`` of ``PLANS[plan]``: a ``(1, H, W)`` standard normal image and uniformly
    random labels ``0 .. num_classes - 1``, seeded."""
    from nnunet_ima.evaluation.samples import SliceSample

    rng = np.random.default_rng(seed)
    shape = PLANS[plan]["patch"]
    return [SliceSample("c", i, rng.normal(size=(1, *shape)).astype(np.float32),
                        rng.integers(0, num_classes, shape).astype(np.int16)) for i in range(n)]


def synchronize(device: Optional[torch.device]) -> None:
    """Wait for the kernels queued on a CUDA ``device`` (nothing to wait for elsewhere)."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], T], device: Optional[torch.device] = None) -> Tuple[T, float]:
    """``(fn(), seconds it took)``; on a CUDA ``device`` the time includes the kernels it
    queued (the device is synchronised before and after)."""
    synchronize(device)
    start = time.perf_counter()
    value = fn()
    synchronize(device)
    return value, time.perf_counter() - start


def print_ratios(ratios: Dict[str, float], **labels: str) -> None:
    """The last line of a benchmark: ``name=ratio`` pairs, three decimals, then ``name=label``
    pairs that say what was measured (``recipe=authors``), for scripts to read."""
    print(" ".join([f"{name}={value:.3f}" for name, value in ratios.items()] +
                   [f"{name}={label}" for name, label in labels.items()]))
