"""A small synthetic nnU-Net raw dataset for the demo and the tests.

Each case is a 3D MR-like volume ``(D, H, W)`` holding a blurred ellipsoid "organ" (label 1)
with a smaller, brighter ellipsoid "lesion" inside it (label 2), on a noisy background with a
smooth intensity bias. Positions, sizes, contrasts and noise vary per case, and the objects do
not reach the first and last slices, so some 2D slices have an empty ground truth.

The files follow nnU-Net's raw layout exactly: ``DatasetXXX_Name/imagesTr/<case>_0000.nii.gz``,
``labelsTr/<case>.nii.gz``, ``dataset.json`` (and ``imagesTs`` / ``labelsTs`` on request).
"""
from __future__ import annotations

import json
import os
from typing import Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

LABELS = {"background": 0, "organ": 1, "lesion": 2}


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
        overwrite: replace an existing folder of the same name; otherwise it is an error.

    Returns:
        The dataset folder.
    """
    if not 1 <= dataset_id <= 999:
        raise ValueError(f"dataset_id must be in [1, 999], got {dataset_id}")
    if num_training < 2:
        raise ValueError("num_training must be >= 2 (nnU-Net needs a train and a validation case)")
    folder = os.path.join(raw_root, f"Dataset{dataset_id:03d}_{name}")
    if os.path.exists(os.path.join(folder, "dataset.json")) and not overwrite:
        raise FileExistsError(f"{folder} already exists; pass overwrite=True or choose another id")
    rng = np.random.default_rng(seed)
    for sub in ("imagesTr", "labelsTr") + (("imagesTs", "labelsTs") if num_test else ()):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    for split, count, offset in (("Tr", num_training, 0), ("Ts", num_test, num_training)):
        for i in range(count):
            case = f"{name.lower()}_{offset + i:03d}"
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
    with open(os.path.join(folder, "dataset.json"), "w") as f:
        json.dump(dataset_json, f, indent=2)
    return folder


def main(argv: Optional[Sequence[str]] = None) -> None:  # pragma: no cover - thin wrapper
    import argparse
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("raw_root")
    parser.add_argument("--id", type=int, default=990)
    parser.add_argument("--cases", type=int, default=8)
    args = parser.parse_args(argv)
    print(write_synthetic_dataset(args.raw_root, args.id, num_training=args.cases))
