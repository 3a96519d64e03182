"""Dice under attack per object: the size and structure breakdown (rse's size bias).

Halmosi et al. (ECCV 2024) find that small objects fall first under attack. A sample's Dice
pools its voxels, so a lost small lesion barely moves it; this module scores every ground-truth
object (a connected component of one class, full connectivity: 8 neighbours in 2D, 26 in 3D)
on its own and pools the objects by size.

For a foreground class ``c`` and a ground-truth object ``O`` of class ``c``:

* ``|O|``: its voxels;
* ``|P_c ∩ O|``: its voxels predicted as ``c``;
* ``|P_O|``: the voxels of the predicted components of class ``c`` that overlap ``O`` (0 if
  none), each component counted once;
* object Dice ``2 |P_c ∩ O| / (|O| + |P_O|)``; the object is *detected* when it is >= 0.5
  (:data:`DETECTED_DICE`).

Why the overlapping predicted components, not all of ``P_c``: an object's score should say how
well *that* object was segmented. With all of ``P_c`` a false positive anywhere else in the
sample (or another, correctly found object) would lower every small object's score, and a small
object's Dice would mostly measure the rest of the image. With only ``P_c ∩ O`` in the
denominator, a blob that swallows the object (predicting ``c`` far beyond its border) would
score perfectly. The overlapping components are what the object "got": a blob swallowing it
costs it (the blob's voxels are in ``|P_O|``), a false positive elsewhere does not.

Per sample the objects are aggregated into fixed-shape counts, one row per (class, size bin):
``(K, B, 5)`` integers with the fields of :data:`FIELDS`, so that a result holds ``(N, K, B,
5)`` and is selected, subset, saved and merged exactly like its ``(N, K)`` TP / FP / FN. Size
bins are given by ascending edges in voxels: edges ``(64, 256, 1024, 4096)`` make the 5 bins
``<64``, ``64-255``, ``256-1023``, ``1024-4095``, ``>=4096`` (:func:`bin_names`). Voxels of the
ignore label are unscored: they are background in both maps (as for TP / FP / FN,
:func:`nnunet_ima.label_mask.scored_label_maps`), so they belong to no object.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from scipy import ndimage

from nnunet_ima.label_mask import scored_label_maps

DEFAULT_SIZE_BINS: Tuple[int, ...] = (64, 256, 1024, 4096)
"""Edges of the object-size bins, in voxels (5 bins)."""

FIELDS = ("objects", "voxels", "intersect", "predicted_near", "detected")
"""The last axis of the counts: objects in the bin, their voxels ``sum |O|``, their voxels
predicted as their class ``sum |P_c ∩ O|``, the voxels of the predicted components touching
them ``sum |P_O|``, and how many have object Dice >= :data:`DETECTED_DICE`."""
OBJECTS, VOXELS, INTERSECT, PREDICTED_NEAR, DETECTED = range(len(FIELDS))

DETECTED_DICE = 0.5
"""Object Dice at or above which an object counts as detected."""


def check_size_bins(edges: Sequence[int]) -> Tuple[int, ...]:
    """``edges`` as a tuple of ints; ``ValueError`` unless they are positive integers in
    strictly ascending order (at least one)."""
    values = tuple(edges)
    bad = [e for e in values if isinstance(e, bool) or not isinstance(e, (int, np.integer))
           or e < 1]
    if not values or bad:
        raise ValueError(f"size bins are object sizes in voxels, positive integers, e.g. 64 256 "
                         f"1024 4096; got {list(values)}")
    if any(b <= a for a, b in zip(values, values[1:])):
        raise ValueError(f"size bins must be strictly ascending, got {list(values)}")
    return tuple(int(e) for e in values)


def bin_names(edges: Sequence[int]) -> List[str]:
    """The ``len(edges) + 1`` bins' names: ``(64, 256)`` -> ``["<64", "64-255", ">=256"]``."""
    edges = list(edges)
    return ([f"<{edges[0]}"] + [f"{a}-{b - 1}" for a, b in zip(edges, edges[1:])]
            + [f">={edges[-1]}"])


def size_bin(sizes: np.ndarray, edges: Sequence[int]) -> np.ndarray:
    """The bin of each object size ``(M,)``: 0 below ``edges[0]``, ``i`` in ``[edges[i-1],
    edges[i])``, ``len(edges)`` from ``edges[-1]`` up."""
    return np.searchsorted(np.asarray(edges), sizes, side="right")


def _components(mask: np.ndarray) -> Tuple[np.ndarray, int]:
    """Connected components of a boolean map (any rank), full connectivity."""
    structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim)
    return ndimage.label(mask, structure=structure)


def class_objects(pred: np.ndarray, label: np.ndarray, c: int
                  ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per ground-truth object of class ``c``: ``|O|``, ``|P_c ∩ O|`` and ``|P_O|``, each
    ``(M,)`` int64 for the ``M`` objects, of label maps ``pred`` and ``label`` (same shape,
    ``(H, W)`` or ``(D, H, W)``, already scored: ignore voxels background in both)."""
    truth = label == c
    objects, m = _components(truth)
    if m == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    predicted = pred == c
    sizes = np.bincount(objects.ravel(), minlength=m + 1)[1:]
    inter = np.bincount(objects[predicted], minlength=m + 1)[1:]
    near = np.zeros(m + 1, dtype=np.int64)
    if inter.any():
        blobs, n_blobs = _components(predicted)
        blob_sizes = np.bincount(blobs.ravel(), minlength=n_blobs + 1)
        both = truth & predicted
        # Each (object, component) pair once: a component adds its voxels to every object it
        # touches, once per object however many voxels they share.
        pairs = np.unique(objects[both].astype(np.int64) * (n_blobs + 1) + blobs[both])
        obj, blob = np.divmod(pairs, n_blobs + 1)
        np.add.at(near, obj, blob_sizes[blob])
    return sizes.astype(np.int64), inter.astype(np.int64), near[1:]


def object_counts(pred: np.ndarray, label: np.ndarray, num_classes: int,
                  edges: Sequence[int] = DEFAULT_SIZE_BINS) -> np.ndarray:
    """The ``(K, B, 5)`` counts (:data:`FIELDS`) of one sample's scored label maps ``pred`` and
    ``label`` (same shape, 2D or 3D; ``K = num_classes - 1`` foreground classes, ``B =
    len(edges) + 1`` size bins). A class without objects has zero rows; predicted components
    that touch no object count nowhere (they are the sample's false positives, which TP / FP /
    FN already see)."""
    counts = np.zeros((num_classes - 1, len(edges) + 1, len(FIELDS)), dtype=np.int64)
    for c in range(1, num_classes):
        sizes, inter, near = class_objects(pred, label, c)
        if not len(sizes):
            continue
        # Dice >= threshold without the division; exact at 0.5 (a power of two times ints).
        detected = (2 * inter >= DETECTED_DICE * (sizes + near)).astype(np.int64)
        bins = size_bin(sizes, edges)
        for field, values in ((OBJECTS, np.ones_like(sizes)), (VOXELS, sizes),
                              (INTERSECT, inter), (PREDICTED_NEAR, near), (DETECTED, detected)):
            np.add.at(counts[c - 1, :, field], bins, values)
    return counts


def batch_object_counts(pred: torch.Tensor, labels: torch.Tensor, num_classes: int,
                        edges: Sequence[int] = DEFAULT_SIZE_BINS,
                        ignore_label: Optional[int] = None) -> np.ndarray:
    """``(B_samples, K, B, 5)`` counts of predicted labels ``pred`` ``(B_samples, *spatial)``
    against ``labels`` ``(B_samples, *spatial)``, ignore-label voxels unscored (background in
    both, as for TP / FP / FN). One CPU labelling per class and sample."""
    pred, labels = scored_label_maps(pred, labels, ignore_label)
    pred, labels = pred.cpu().numpy(), labels.cpu().numpy()
    return np.stack([object_counts(p, t, num_classes, edges) for p, t in zip(pred, labels)]) \
        if len(pred) else np.zeros((0, num_classes - 1, len(edges) + 1, len(FIELDS)), np.int64)


def empty_counts(n: int, num_classes: int, edges: Sequence[int] = DEFAULT_SIZE_BINS
                 ) -> np.ndarray:
    """``(n, K, B, 5)`` zeros: the counts of samples not computed (yet)."""
    return np.zeros((n, num_classes - 1, len(edges) + 1, len(FIELDS)), dtype=np.int64)


def breakdown(objects: np.ndarray, class_names: Sequence[str], edges: Sequence[int]) -> dict:
    """Per class and size bin, pooled over the samples of ``objects`` ``(N, K, B, 5)``:
    ``{class: {bin: {objects, voxels, object_dice, detected_fraction}}}``.

    ``object_dice`` pools the objects' counts, ``2 sum |P_c ∩ O| / (sum |O| + sum |P_O|)``
    (as TVDI pools voxels: a big object weighs more within its bin);
    ``detected_fraction`` is the share of objects with object Dice >= 0.5. Both are ``None``
    for a bin without objects."""
    objects = np.asarray(objects)
    if objects.ndim != 4 or objects.shape[1:] != (len(class_names), len(edges) + 1, len(FIELDS)):
        raise ValueError(f"object counts of shape {objects.shape} do not fit {len(class_names)} "
                         f"classes and {len(edges) + 1} size bins")
    total = objects.sum(axis=0)                                            # (K, B, 5)
    names = bin_names(edges)
    out = {}
    for k, name in enumerate(class_names):
        out[name] = {}
        for b, bin_name in enumerate(names):
            n, voxels, inter, near, detected = (int(v) for v in total[k, b])
            out[name][bin_name] = {
                "objects": n, "voxels": voxels,
                "object_dice": 2 * inter / (voxels + near) if n else None,
                "detected_fraction": detected / n if n else None}
    return out
