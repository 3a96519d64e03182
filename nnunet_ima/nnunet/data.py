"""nnU-Net's 2D data loader, extended to say which slice of each case it sampled.

IMA keeps one margin per training sample, and in nnU-Net's 2D configuration a sample is one
slice of one case. nnU-Net's ``nnUNetDataLoader`` treats a 2D slice as a 3D patch of depth 1:
the slice index is ``bbox_lbs[0]`` chosen in ``get_bbox`` (random, or centred on a foreground
voxel when oversampling), and it is dropped before the batch is returned. This subclass keeps it.

The class lives in the core package (not in ``trainers/``) because nnU-Net's augmentation
workers unpickle the loader: the workers must be able to import it by its module path.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List, Tuple

import numpy as np
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader

SLICE_KEY = "slice_ids"
"""Batch key of the ``(B,)`` int64 array of slice indices (position along nnU-Net's first axis)."""

SampleKey = Tuple[str, int]


class SliceTrackingDataLoader(nnUNetDataLoader):
    """``nnUNetDataLoader`` whose 2D batches also hold ``batch["slice_ids"]``.

    The batch is ``{"data": (B, C, H, W), "target": (B, 1, H, W) or a deep-supervision list,
    "keys": (B,) case identifiers, "slice_ids": (B,) slice indices}``; sample ``j`` is slice
    ``slice_ids[j]`` of case ``keys[j]`` whatever the augmentation did to it afterwards.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not self.patch_size_was_2d:
            raise ValueError("SliceTrackingDataLoader needs nnU-Net's 2D configuration (a 2D patch "
                             "size); a 3D patch has no single slice index")
        self._sampled_slices: List[int] = []

    def get_bbox(self, data_shape, force_fg, class_locations, overwrite_class=None, verbose=False):
        bbox_lbs, bbox_ubs = super().get_bbox(data_shape, force_fg, class_locations,
                                              overwrite_class, verbose)
        # The pseudo-3D patch has depth 1, so its lower bound on axis 0 is the slice.
        self._sampled_slices.append(int(bbox_lbs[0]))
        return bbox_lbs, bbox_ubs

    def generate_train_batch(self) -> dict:
        self._sampled_slices = []
        batch = super().generate_train_batch()
        if len(self._sampled_slices) != len(batch["keys"]):
            raise RuntimeError(f"sampled {len(self._sampled_slices)} slices for "
                               f"{len(batch['keys'])} cases: nnU-Net's nnUNetDataLoader no longer "
                               f"calls get_bbox once per sample")
        batch[SLICE_KEY] = np.asarray(self._sampled_slices, dtype=np.int64)
        return batch


def sample_keys(batch: dict) -> List[SampleKey]:
    """``[(case identifier, slice index), ...]`` of a batch from :class:`SliceTrackingDataLoader`."""
    if SLICE_KEY not in batch:
        raise RuntimeError(f"the training batch has no {SLICE_KEY!r}: the data loader is not "
                           f"SliceTrackingDataLoader (nnU-Net's get_dataloaders changed?)")
    return [(str(case), int(s)) for case, s in zip(batch["keys"], batch[SLICE_KEY])]


@contextlib.contextmanager
def slice_tracking_loaders() -> Iterator[None]:
    """Make nnU-Net's ``get_dataloaders`` build :class:`SliceTrackingDataLoader` instances.

    ``nnUNetTrainer.get_dataloaders`` constructs ``nnUNetDataLoader`` by its module-level name;
    substituting the name for the duration of the call reuses all of nnU-Net's loader set-up
    (patch sizes, oversampling, transforms, worker processes) instead of copying it.
    """
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as trainer_module
    original = trainer_module.nnUNetDataLoader
    trainer_module.nnUNetDataLoader = SliceTrackingDataLoader
    try:
        yield
    finally:
        trainer_module.nnUNetDataLoader = original

