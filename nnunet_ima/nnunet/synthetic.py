"""A small synthetic nnU-Net raw dataset for the demo and the tests.

Each case is a 3D MR-like volume ``(D, H, W)`` holding a blurred ellipsoid "organ" (label 1)
with a smaller, brighter ellipsoid "lesion" inside it (label 2), on a noisy background with a
smooth intensity bias. Positions, sizes, contrasts and noise vary per case, and the objects do
not reach the first and last slices, so some 2D slices have an empty ground truth.

The files follow nnU-Net's raw layout exactly: ``DatasetXXX_Name/imagesTr/<case>_0000.nii.gz``,
``labelsTr/<case>.nii.gz``, ``dataset.json`` (and ``imagesTs`` / ``labelsTs`` on request).

A dataset is written into a hidden folder beside its final place and renamed when complete, so
that an error, a full disk or Ctrl-C never leaves a half-written ``DatasetXXX_Name`` that
nnU-Net would find; the memory and disk it needs are checked before anything is written.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from nnunet_ima.io import write_text
from nnunet_ima.resources import check_disk, check_memory

LABELS = {"background": 0, "organ": 1, "lesion": 2}
# Smallest (D, H, W) for which every case holds an organ and a lesion and keeps its first and
# last slices empty (smaller volumes give empty or all-organ labels).
MIN_SHAPE = (4, 8, 8)
# Peak memory of generating and writing one case, per voxel: make_case's float64 grids and
# temporaries measured 59 bytes per voxel (tracemalloc, 32 x 64 x 64 and up), plus SimpleITK's
# copy of the image and the two arrays held while it writes.
GENERATE_BYTES_PER_VOXEL = 72
# Disk per voxel of a case, at most: the uncompressed float32 image and uint8 label (the gzipped
# noisy image measured 3.4 bytes per voxel, the label almost nothing).
FILE_BYTES_PER_VOXEL = 5
# The longest file name most file systems take (ext4, XFS, APFS, NTFS).
NAME_MAX = 255
# The name becomes the folder Dataset{id}_{name} and, lower-cased, the prefix of every case
# file: letters, digits, '_' and '-' are safe for nnU-Net's parsing and for shells.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*\Z")
# How check_request names each argument; the command line passes its own option names.
API_WORDS = {"dataset_id": "dataset_id", "name": "name", "num_training": "num_training",
             "num_test": "num_test", "shape": "shape", "seed": "seed",
             "overwrite": "overwrite=True", "raw_root": "raw_root"}


class DatasetExistsError(FileExistsError):
    """The raw folder already holds a dataset with the asked id (``folders``: its folders)."""

    def __init__(self, message: str, folders: List[str]):
        super().__init__(message)
        self.folders = folders


def _ellipsoid(shape: Tuple[int, int, int], center: np.ndarray, radii: np.ndarray) -> np.ndarray:
    grids = np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij")
    distance = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, center, radii))
    return distance <= 1.0


def make_case(rng: np.random.Generator, shape: Tuple[int, int, int] = (16, 48, 48)
              ) -> Tuple[np.ndarray, np.ndarray]:
    """One synthetic case: ``image (D, H, W) float32`` and ``label (D, H, W) uint8``."""
    shape = tuple(int(s) for s in shape)
    size = np.asarray(shape, dtype=np.float64)
    organ_radii = size * rng.uniform([0.25, 0.2, 0.2], [0.35, 0.3, 0.3])
    organ_center = size / 2 + rng.uniform(-0.08, 0.08, 3) * size
    organ_center[0] = size[0] / 2  # keep the first and last slices free of foreground
    organ_radii[0] = min(organ_radii[0], size[0] / 2 - 1.5)
    organ = _ellipsoid(shape, organ_center, organ_radii)
    lesion_radii = organ_radii * rng.uniform(0.3, 0.45, 3)
    lesion_center = organ_center + rng.uniform(-0.3, 0.3, 3) * (organ_radii - lesion_radii)
    lesion = _ellipsoid(shape, lesion_center, lesion_radii) & organ

    label = np.zeros(shape, dtype=np.uint8)
    label[organ] = 1
    label[lesion] = 2

    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    bias = 1.0 + 0.15 * sum(rng.uniform(-1, 1) * g for g in grids)
    image = rng.uniform(80, 120) * np.ones(shape)
    image[organ] = rng.uniform(220, 260)
    image[lesion] = rng.uniform(380, 440)
    image = image * bias + rng.normal(0, rng.uniform(15, 25), shape)
    return image.astype(np.float32), label


def _write(array: np.ndarray, path: str, spacing: Sequence[float]) -> None:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(tuple(float(s) for s in spacing[::-1]))  # SimpleITK spacing is (x, y, z)
    sitk.WriteImage(img, path, useCompression=True)


def existing_datasets(raw_root: str, dataset_id: int) -> List[str]:
    """The folders ``Dataset{id:03d}_*`` in ``raw_root``: nnU-Net resolves ``-d ID`` by this
    prefix and fails when two names share an id."""
    if not os.path.isdir(raw_root):
        return []
    prefix = f"Dataset{dataset_id:03d}_"
    return sorted(os.path.join(raw_root, f) for f in os.listdir(raw_root)
                  if f.startswith(prefix) and os.path.isdir(os.path.join(raw_root, f)))


def check_request(raw_root: str, dataset_id: int, name: str, num_training: int, num_test: int,
                  shape: Sequence[int], seed: int, overwrite: bool,
                  words: Optional[Dict[str, str]] = None) -> List[str]:
    """Every check of :func:`write_synthetic_dataset`, made before anything is written.

    Args:
        words: how to name each argument in the messages (default :data:`API_WORDS`; the
            command line passes its option names, e.g. ``--overwrite``).

    Returns:
        The existing folders of ``dataset_id`` that ``overwrite`` replaces (a folder of the
        same name without ``dataset.json``, left by an interrupted write, is simply rewritten).

    Raises:
        ValueError: an invalid id, name, count, shape or seed; more memory (one case) or disk
            (every case) than the machine has (:class:`~nnunet_ima.errors.UserInputError`).
        DatasetExistsError: ``dataset_id`` is taken and ``overwrite`` is false.
    """
    w = {**API_WORDS, **(words or {})}
    if not 1 <= dataset_id <= 999:
        raise ValueError(f"{w['dataset_id']} must be in [1, 999], got {dataset_id}")
    if not NAME_PATTERN.match(name or ""):
        raise ValueError(f"{w['name']} {name!r} cannot be part of an nnU-Net dataset folder "
                         f"name: use letters, digits, '_' and '-' only, e.g. SyntheticOrgan")
    if num_training < 2:
        raise ValueError(f"{w['num_training']} must be >= 2 (nnU-Net needs a training and a "
                         f"validation case), got {num_training}")
    if num_test < 0:
        raise ValueError(f"{w['num_test']} must be >= 0, got {num_test}")
    if len(shape) != 3 or any(int(s) < m for s, m in zip(shape, MIN_SHAPE)):
        raise ValueError(f"{w['shape']} must be three sizes D H W of at least "
                         f"{' '.join(map(str, MIN_SHAPE))} (smaller volumes hold no organ and "
                         f"lesion), got {' '.join(str(s) for s in shape)}")
    if seed < 0:
        raise ValueError(f"{w['seed']} must be >= 0, got {seed}")
    total = num_training + num_test
    longest = max(f"Dataset{dataset_id:03d}_{name}", _case_name(name, total - 1) + "_0000.nii.gz",
                  key=len)
    if len(longest) > NAME_MAX:
        raise ValueError(f"{w['name']} is too long: it makes the name {longest[:40]}... of "
                         f"{len(longest)} characters, over the {NAME_MAX} a file system takes; "
                         f"choose a shorter name")
    d, h, wd = (int(s) for s in shape)
    voxels = d * h * wd
    shown = f"{w['shape']} {d} {h} {wd}"
    check_memory(voxels * GENERATE_BYTES_PER_VOXEL, f"generating one case of {shown}",
                 f"choose a smaller {w['shape']}")
    check_disk(raw_root, voxels * FILE_BYTES_PER_VOXEL * total,
               f"{total} cases of {shown}",
               f"choose fewer cases or a smaller {w['shape']}, or another {w['raw_root']}")
    own = os.path.join(raw_root, f"Dataset{dataset_id:03d}_{name}")
    taken = [f for f in existing_datasets(raw_root, dataset_id)
             if f != own or os.path.exists(os.path.join(f, "dataset.json"))]
    if taken and not overwrite:
        raise DatasetExistsError(
            f"dataset id {dataset_id} is taken by {', '.join(taken)} (nnU-Net finds a dataset "
            f"by its id, so two names cannot share one); choose another id or pass "
            f"{w['overwrite']} to replace it", taken)
    return taken


def write_synthetic_dataset(raw_root: str, dataset_id: int = 990, name: str = "SyntheticOrgan",
                            num_training: int = 8, num_test: int = 0,
                            shape: Tuple[int, int, int] = (16, 48, 48),
                            spacing: Tuple[float, float, float] = (3.0, 1.0, 1.0),
                            seed: int = 0, overwrite: bool = False) -> str:
    """Write ``Dataset{id:03d}_{name}`` into ``raw_root`` (usually ``$nnUNet_raw``).

    Args:
        raw_root: the nnU-Net raw folder.
        num_training: cases in ``imagesTr`` / ``labelsTr``.
        num_test: cases in ``imagesTs`` / ``labelsTs``.
        shape: ``(D, H, W)`` voxels per case; spacing in mm, ``(z, y, x)``.
        overwrite: replace the existing dataset(s) of ``dataset_id`` (under any name) once the
            new one is complete; otherwise an existing one is an error.

    Returns:
        The dataset folder.

    Raises:
        ValueError, DatasetExistsError: see :func:`check_request`; nothing is written then.
        OSError, MemoryError: writing failed (a full disk, say); the partial dataset is removed,
            and the raw folder too when this call created it.
    """
    taken = check_request(raw_root, dataset_id, name, num_training, num_test, shape, seed,
                          overwrite)
    folder = os.path.join(raw_root, f"Dataset{dataset_id:03d}_{name}")
    # Hidden, and not named Dataset{id}_*: nnU-Net never finds a partial dataset by its id.
    partial = os.path.join(raw_root, f".{os.path.basename(folder)}.partial-{os.getpid()}")
    created = _missing_folders(raw_root)
    try:
        _write_cases(partial, name, num_training, num_test, shape, spacing, seed)
        # Only a complete dataset replaces the old one (a smaller rewrite must not keep the old
        # folder's extra cases; a folder left by an interrupted earlier write goes too).
        for old in taken + ([folder] if os.path.lexists(folder) else []):
            if os.path.lexists(old):
                shutil.rmtree(old)
        os.rename(partial, folder)
    except BaseException:  # an error, a full disk, Ctrl-C: nothing half-written stays
        shutil.rmtree(partial, ignore_errors=True)
        for made in created:  # the raw folder and its parents, when this call made them
            try:
                os.rmdir(made)
            except OSError:
                break
        raise
    return folder


def _case_name(name: str, index: int) -> str:
    """The identifier of case ``index``: the lower-cased dataset name and a 3-digit number."""
    return f"{name.lower()}_{index:03d}"


def _missing_folders(path: str) -> List[str]:
    """``path`` and its parents that do not exist yet, deepest first."""
    missing = []
    path = os.path.abspath(path)
    while not os.path.exists(path):
        missing.append(path)
        path = os.path.dirname(path)
    return missing


def _write_cases(folder: str, name: str, num_training: int, num_test: int,
                 shape: Tuple[int, int, int], spacing: Tuple[float, float, float],
                 seed: int) -> None:
    """Write every case and ``dataset.json`` into ``folder``."""
    rng = np.random.default_rng(seed)
    for sub in ("imagesTr", "labelsTr") + (("imagesTs", "labelsTs") if num_test else ()):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    for split, count, offset in (("Tr", num_training, 0), ("Ts", num_test, num_training)):
        for i in range(count):
            case = _case_name(name, offset + i)
            image, label = make_case(rng, shape)
            _write(image, os.path.join(folder, f"images{split}", f"{case}_0000.nii.gz"), spacing)
            _write(label, os.path.join(folder, f"labels{split}", f"{case}.nii.gz"), spacing)
    dataset_json = {
        "channel_names": {"0": "MRI"},
        "labels": LABELS,
        "numTraining": num_training,
        "file_ending": ".nii.gz",
        "name": name,
        "description": "Synthetic MR-like volumes with an organ and a lesion (nnunet-ima)",
        "licence": "CC0",
    }
    # Last: a folder with dataset.json is complete (check_request relies on it).
    write_text(os.path.join(folder, "dataset.json"), json.dumps(dataset_json, indent=2))

