"""The slice-tracking loader returns the index of the slice it actually sampled."""
import os

import numpy as np
import pytest
import torch
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_ima.nnunet.data import SLICE_KEY, SliceTrackingDataLoader, sample_keys


def _loader(ws, oversample: float, batch_size: int = 8) -> SliceTrackingDataLoader:
    base = os.path.join(ws.preprocessed, ws.dataset_name)
    plans = PlansManager(load_json(os.path.join(base, "nnUNetPlans.json")))
    config = plans.get_configuration("2d")
    folder = os.path.join(base, config.data_identifier)
    dataset = infer_dataset_class(folder)(folder)
    # The whole slice as patch and no transforms: the returned image must be the slice itself.
    return SliceTrackingDataLoader(dataset, batch_size, config.patch_size, config.patch_size,
                                   plans.get_label_manager(load_json(os.path.join(base, "dataset.json"))),
                                   oversample_foreground_percent=oversample), dataset


def _shift(image: np.ndarray, patch: np.ndarray) -> np.ndarray:
    """``image`` (C, H, W) cut like ``patch``: a foreground-centred patch is the slice shifted in
    plane, padded with zeros (data) / -1 (labels); the rows and columns of padding say how."""
    out = np.zeros_like(image)
    offsets = []
    for axis in (1, 2):
        other = 2 if axis == 1 else 1
        padded = np.all(patch == 0, axis=(0, other))
        lead = int(np.argmin(padded)) if padded.any() and padded[0] else 0
        trail = int(np.argmin(padded[::-1])) if padded.any() and padded[-1] else 0
        offsets.append(-lead if lead else trail)
    dy, dx = offsets
    h, w = image.shape[1:]
    src = image[:, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)]
    out[:, max(-dy, 0):max(-dy, 0) + src.shape[1], max(-dx, 0):max(-dx, 0) + src.shape[2]] = src
    return out


def _check_batch(batch, dataset):
    assert batch[SLICE_KEY].shape == (len(batch["keys"]),)
    for j, (case, s) in enumerate(sample_keys(batch)):
        data, seg, _, _ = dataset.load_case(case)
        volume = np.asarray(data)
        assert 0 <= s < volume.shape[1]
        patch = batch["data"][j].numpy()
        np.testing.assert_array_equal(patch, _shift(volume[:, s], patch))
        # ...and it is not a neighbouring slice (the index is not off by one).
        for other in (s - 1, s + 1):
            if 0 <= other < volume.shape[1]:
                assert not np.array_equal(patch, _shift(volume[:, other], patch))


@pytest.mark.parametrize("oversample", [0.0, 1.0])  # random slices / foreground-centred slices
def test_slice_index_is_the_sampled_slice(nnunet_workspace, oversample):
    loader, dataset = _loader(nnunet_workspace, oversample)
    np.random.seed(0)
    for _ in range(3):
        _check_batch(next(loader), dataset)


def test_slice_index_survives_worker_processes(nnunet_workspace):
    loader, dataset = _loader(nnunet_workspace, 0.33)
    augmenter = NonDetMultiThreadedAugmenter(loader, None, num_processes=2, num_cached=2,
                                             seeds=[1, 2], pin_memory=False)
    try:
        for _ in range(3):
            _check_batch(next(augmenter), dataset)
    finally:
        augmenter._finish()


def test_3d_patches_are_refused(nnunet_workspace):
    loader, dataset = _loader(nnunet_workspace, 0.0)
    with pytest.raises(ValueError, match="2D configuration"):
        SliceTrackingDataLoader(dataset, 2, (8, 48, 48), (8, 48, 48),
                                _label_manager(nnunet_workspace))


def _label_manager(ws):
    base = os.path.join(ws.preprocessed, ws.dataset_name)
    plans = PlansManager(load_json(os.path.join(base, "nnUNetPlans.json")))
    return plans.get_label_manager(load_json(os.path.join(base, "dataset.json")))


def test_batches_without_slices_are_an_error():
    with pytest.raises(RuntimeError, match="not SliceTrackingDataLoader"):
        sample_keys({"data": torch.zeros(1), "keys": ["a"]})
