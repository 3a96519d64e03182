"""nnU-Net's training data: a 2D data loader that says which slice of each case it sampled, and
augmentation whose result depends on the seed only.

IMA keeps one margin per training sample, and in nnU-Net's 2D configuration a sample is one
slice of one case. nnU-Net's ``nnUNetDataLoader`` treats a 2D slice as a 3D patch of depth 1:
the slice index is ``bbox_lbs[0]`` chosen in ``get_bbox`` (random, or centred on a foreground
voxel when oversampling), and it is dropped before the batch is returned. This subclass keeps it.

nnU-Net's Gaussian blur times FFT against direct convolution the first time it meets an image
size and kernel size, and keeps whichever was faster. The two round differently, so a seeded
training's weights depended on the machine's load at that moment; :func:`without_timed_choices`
makes it always convolve directly.

The class lives in the core package (not in ``trainers/``) because nnU-Net's augmentation
workers unpickle the loader: the workers must be able to import it by its module path.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, List, Tuple

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


# Attributes through which batchgeneratorsv2's containers hold their transforms: ComposeTransforms,
# RandomTransform and OneOfTransform.
_CHILD_ATTRIBUTES = ("transforms", "transform", "list_of_transforms")


def without_timed_choices(transforms: Any) -> Any:
    """Turn off the timing in every ``GaussianBlurTransform`` of ``transforms`` (a transform or a
    tree of batchgeneratorsv2 containers, e.g. nnU-Net's ``get_training_transforms``); returns
    ``transforms``.

    With ``benchmark=True`` (nnU-Net's training pipeline) the blur times 9 direct and 9 FFT
    convolutions on the first image of each size and kernel size and keeps the faster method for
    the rest of the training. The two methods differ in the last bits of the blurred image (up to
    3e-7 on a slice of values in [0, 1]), and which one wins is close to a coin toss on a loaded machine: a
    flip of one choice changed a seeded training's weights by up to 1e-4 after 6 iterations and
    by up to 0.02 after the demo's 100. Direct convolution always: for nnU-Net's small kernels
    (sigma 0.5 to 1, 3 to 7 taps) it is also the faster method (a 48 x 48 slice on a CPU: about
    90 us, FFT about 600 us).
    """
    from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
    for transform in transforms_in(transforms):
        if isinstance(transform, GaussianBlurTransform):
            transform.benchmark = False
    return transforms


def transforms_in(transforms: Any) -> Iterator[Any]:
    """``transforms`` and every transform inside it (batchgeneratorsv2's containers nest)."""
    pending = [transforms]
    while pending:
        transform = pending.pop()
        yield transform
        for name in _CHILD_ATTRIBUTES:
            child = getattr(transform, name, None)
            if isinstance(child, (list, tuple)):
                pending.extend(child)
            elif child is not None:
                pending.append(child)


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

