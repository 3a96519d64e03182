"""Clean vs vanilla adversarial vs IMA nnU-Net on Colin27 with the AAL atlas (not run in CI).

Sources (Debian / Ubuntu package ``mricron-data``, installed with ``apt-get install
mricron-data``; ``--templates DIR`` reads the same three files elsewhere):

- ``/usr/share/mricron/templates/ch2better.nii.gz``: Colin27, one subject's T1-weighted MR
  averaged over 27 scans, brain-extracted, 0.5 mm voxels, MNI space;
- ``aal.nii.gz``: the AAL atlas (116 regions, 1 mm, the same space) and ``aal.nii.txt``: its
  region names, one ``index name code`` line each.

The atlas is coarsened to six foreground classes of mixed size. A region belongs to the class
whose pattern (``fnmatch``, case-sensitive) matches its AAL name; a name matched by no class or
by two is refused, so that another version of the atlas cannot be mislabelled silently:

=====  ====================  ==========================================================  ======
label  class                 AAL names                                                   ml (*)
=====  ====================  ==========================================================  ======
1      frontal               Precentral_*, Frontal_*, Rolandic_Oper_*, Supp_Motor_Area_*,     537
                             Olfactory_*, Rectus_*, Paracentral_Lobule_*, Insula_*,
                             Cingulum_Ant_*, Cingulum_Mid_*
2      temporal              Temporal_*, Heschl_*, Fusiform_*, ParaHippocampal_*            268
3      parietal_occipital    Postcentral_*, Parietal_*, SupraMarginal_*, Angular_*,         408
                             Precuneus_*, Cingulum_Post_*, Calcarine_*, Cuneus_*,
                             Lingual_*, Occipital_*
4      cerebellum            Cerebelum_*, Vermis_*                                          195
5      deep_grey             Caudate_*, Putamen_*, Pallidum_*, Thalamus_*                    54
6      hippocampus_amygdala  Hippocampus_*, Amygdala_*                                       19
=====  ====================  ==========================================================  ======

(*) volume in the 1 mm atlas (the builder prints the voxels of every class in every case).
The atlas labels grey matter only: white matter and CSF are background, so the three cortical
classes are thin ribbons around a background core, and the two small deep classes are the hard
ones.

Grid: the output grid covers the T1's field of view at ``--spacing`` mm (default 2 mm,
isotropic: 75 x 92 voxels in-plane, 79 axial slices), with the T1's direction. The T1 is
smoothed before it is resampled (Gaussian, sigma ``(new - old) / 2`` mm per axis, as
scikit-image's anti-aliasing) and interpolated linearly; the coarse labels are put onto that grid
nearest-neighbour, unless the atlas already lies on it. An atlas that does not cover the T1's
space (less than 90 % of its labelled volume lands on the grid) is refused.

Cases: slabs of ``--slab`` consecutive axial slices (default 4, 8 mm) from the lowest labelled
slice upwards, with ``--gap`` slices (default 1, 2 mm) dropped between neighbouring slabs, so
that no test slice lies next to a training slice (the nearest are 4 mm apart); an incomplete top
slab is dropped. Slab ``i`` (``slab00`` the lowest) goes to the set ``SETS[i % 4]`` = train,
test, train, val: every held-out slab lies between two training slabs. The slabs are thin
because the small classes are short: at 2 mm the deep grey nuclei span 19 slices and the
hippocampus and amygdala 21, so thicker slabs would leave one of them out of the test set
(slabs of 8 slices, 2 apart, do). At the defaults: 14 slabs, 7 train, 3 validation, 4 test; each
set holds voxels of all six classes. The split is this fixed pattern, written as fold 0 of
``splits_final.json`` and ``test_cases.json``; the validation slabs are not test slabs, and the
evaluation reads the test slabs only.

What a single-subject dataset can show: whether a training learns the anatomy of one brain from
some of its axial levels well enough to segment the levels in between, and, for the three
trainings on the same slices, how their clean accuracy and their robustness to noise compare per
class, large and small. What it cannot show: generalisation to another subject, scanner or
contrast (there is one brain, one averaged scan), nor an error independent of the training
data: slabs of one subject are correlated (neighbouring levels share structures, shapes and
intensities), so the clean Dice is optimistic. Confidence intervals over its test slices count correlated
slices of one brain as if they were independent.

    python benchmarks/colin27_benchmark.py --workdir runs/colin27       # everything
    python benchmarks/colin27_benchmark.py --workdir runs/colin27 --stop-after preprocess

A finished step is skipped when the script runs again (the evaluation resumes from its parts);
a workdir built with another spacing, slab or gap is refused.
"""
from __future__ import annotations

import argparse
import fnmatch
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from nnunet_ima.nnunet import experiment as experiments
from nnunet_ima.nnunet.experiment import BenchmarkError, Experiment

TEMPLATES = "/usr/share/mricron/templates"
APT_PACKAGE = "mricron-data"
IMAGE_FILE = "ch2better.nii.gz"
ATLAS_FILE = "aal.nii.gz"
NAMES_FILE = "aal.nii.txt"
DATASET_ID = 992
DATASET_NAME = "Colin27AAL"
CLASSES: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ("frontal", ("Precentral_*", "Frontal_*", "Rolandic_Oper_*", "Supp_Motor_Area_*",
                 "Olfactory_*", "Rectus_*", "Paracentral_Lobule_*", "Insula_*",
                 "Cingulum_Ant_*", "Cingulum_Mid_*")),
    ("temporal", ("Temporal_*", "Heschl_*", "Fusiform_*", "ParaHippocampal_*")),
    ("parietal_occipital", ("Postcentral_*", "Parietal_*", "SupraMarginal_*", "Angular_*",
                            "Precuneus_*", "Cingulum_Post_*", "Calcarine_*", "Cuneus_*",
                            "Lingual_*", "Occipital_*")),
    ("cerebellum", ("Cerebelum_*", "Vermis_*")),
    ("deep_grey", ("Caudate_*", "Putamen_*", "Pallidum_*", "Thalamus_*")),
    ("hippocampus_amygdala", ("Hippocampus_*", "Amygdala_*")),
)
SETS = ("train", "test", "train", "val")  # slab i goes to SETS[i % 4]
MIN_OVERLAP = 0.9  # share of the atlas's labelled volume that must land on the output grid


def template_paths(folder: str = TEMPLATES) -> Tuple[str, str, str]:
    """``(T1, atlas, region names)`` in ``folder``.

    Raises:
        BenchmarkError: a file is missing; the message names the package that installs them.
    """
    paths = tuple(os.path.join(folder, f) for f in (IMAGE_FILE, ATLAS_FILE, NAMES_FILE))
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise BenchmarkError(f"{', '.join(missing)} not found: install the Colin27 template and "
                             f"the AAL atlas with `apt-get install {APT_PACKAGE}`, or pass "
                             f"--templates with a folder that holds {IMAGE_FILE}, {ATLAS_FILE} "
                             f"and {NAMES_FILE}")
    return paths  # type: ignore[return-value]


def read_region_names(path: str) -> Dict[int, str]:
    """``{atlas value: region name}`` of an ``index name [code]`` names file (MRIcron's)."""
    names = {}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) < 2 or not fields[0].isdigit():
                raise BenchmarkError(f"{path}:{number}: expected 'index name [code]', got "
                                     f"{line.strip()!r}")
            names[int(fields[0])] = fields[1]
    if not names:
        raise BenchmarkError(f"{path} names no region")
    return names


def coarse_class(name: str) -> int:
    """The coarse label (1-based position in :data:`CLASSES`) of the AAL region ``name``.

    Raises:
        BenchmarkError: no class or more than one matches the name.
    """
    matches = [label for label, (_, patterns) in enumerate(CLASSES, 1)
               if any(fnmatch.fnmatchcase(name, p) for p in patterns)]
    if len(matches) != 1:
        which = "no class" if not matches else " and ".join(CLASSES[m - 1][0] for m in matches)
        raise BenchmarkError(f"AAL region {name!r} is matched by {which}: the coarse classes "
                             f"expect the 116 regions of {APT_PACKAGE}'s aal.nii.txt")
    return matches[0]


def coarse_labels(atlas: sitk.Image, names: Dict[int, str]) -> sitk.Image:
    """The atlas with every region replaced by its coarse class (uint8, same grid).

    Raises:
        BenchmarkError: the atlas holds a value the names file does not name.
    """
    values = sitk.GetArrayFromImage(atlas).astype(np.int64)  # (z, y, x)
    unnamed = sorted(set(np.unique(values).tolist()) - {0} - set(names))
    if unnamed:
        raise BenchmarkError(f"the atlas holds values {unnamed[:10]} that its names file does "
                             f"not name")
    lookup = np.zeros(max(max(names), int(values.max())) + 1, np.uint8)
    for value, name in names.items():
        lookup[value] = coarse_class(name)
    coarse = sitk.GetImageFromArray(lookup[values])
    coarse.CopyInformation(atlas)
    return coarse


def output_grid(image: sitk.Image, spacing: float) -> sitk.Image:
    """An empty image on the grid the dataset is written on: ``image``'s field of view (the box
    its voxels cover) at ``spacing`` mm per axis, with its direction."""
    old_spacing = np.array(image.GetSpacing())
    extent = old_spacing * np.array(image.GetSize())
    size = [max(1, int(np.floor(e / spacing + 1e-6))) for e in extent]
    direction = np.array(image.GetDirection()).reshape(3, 3)
    # The first voxel's corner stays where the image's first corner is.
    corner = np.array(image.GetOrigin()) - direction @ (old_spacing / 2)
    reference = sitk.Image(size, sitk.sitkUInt8)
    reference.SetSpacing([spacing] * 3)
    reference.SetDirection(image.GetDirection())
    reference.SetOrigin(tuple(corner + direction @ (np.full(3, spacing) / 2)))
    return reference


def image_on_grid(image: sitk.Image, reference: sitk.Image) -> sitk.Image:
    """``image`` (float32) on ``reference``'s grid: unchanged where the grids agree; else
    smoothed along every axis that gets coarser (sigma ``(new - old) / 2`` mm) and resampled
    linearly."""
    image = sitk.Cast(image, sitk.sitkFloat32)
    if experiments.same_grid(image, reference):
        return image
    sigma = np.maximum(0.0, (np.array(reference.GetSpacing()) - image.GetSpacing()) / 2)
    if sigma.any():
        image = sitk.DiscreteGaussian(image, [float(s) ** 2 for s in sigma])
    return sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear, 0.0,
                         sitk.sitkFloat32)


def labels_on_grid(coarse: sitk.Image, reference: sitk.Image) -> sitk.Image:
    """The coarse labels on ``reference``'s grid (nearest neighbour, unless already on it).

    Raises:
        BenchmarkError: less than :data:`MIN_OVERLAP` of the labelled volume lands on the grid
            (the atlas and the image are not in the same space).
    """
    on_grid = (coarse if experiments.same_grid(coarse, reference)
               else experiments.resample_nearest(coarse, reference))
    on_grid.CopyInformation(reference)

    def labelled_ml(image):
        return (np.count_nonzero(sitk.GetArrayViewFromImage(image))
                * float(np.prod(image.GetSpacing())) / 1000)

    before, after = labelled_ml(coarse), labelled_ml(on_grid)
    if after < MIN_OVERLAP * before:
        raise BenchmarkError(f"only {after:.0f} of the atlas's {before:.0f} labelled ml lie in "
                             f"the T1's field of view: the atlas is not in the T1's space")
    return on_grid


def slab_starts(labelled: Sequence[bool], slab: int, gap: int) -> List[int]:
    """First slice of every slab: ``slab`` slices each, ``gap`` slices between two, from the
    first labelled slice up to the last one (an incomplete slab at the top is dropped).
    ``labelled``: per slice (along the image's third axis), whether it holds a label."""
    if slab < 1 or gap < 0:
        raise BenchmarkError(f"--slab must be >= 1 and --gap >= 0, got {slab} and {gap}")
    index = np.flatnonzero(np.asarray(labelled, bool))
    if index.size == 0:
        raise BenchmarkError("the atlas labels no slice of the T1's field of view")
    return list(range(int(index[0]), int(index[-1]) + 2 - slab, slab + gap))


def slab_case(i: int) -> str:
    return f"slab{i:02d}"


def slab_split(cases: Sequence[str]) -> Dict[str, List[str]]:
    """The fixed split: ``slabNN`` goes to :data:`SETS` ``[NN % 4]``."""
    split: Dict[str, List[str]] = {"train": [], "val": [], "test": []}
    for case in sorted(cases):
        split[SETS[int(case[len("slab"):]) % len(SETS)]].append(case)
    return split


def dataset_options(spacing: float, slab: int, gap: int) -> dict:
    return {"spacing": spacing, "slab": slab, "gap": gap}


def build_raw_dataset(templates: str, raw_root: str, dataset_id: int = DATASET_ID,
                      spacing: float = 2.0, slab: int = 4, gap: int = 1) -> str:
    """Write ``Dataset{id}_Colin27AAL`` in nnU-Net's raw layout; returns its folder.

    ``dataset.json`` records the options under ``"nnunet_ima_benchmark"`` and every slab's set,
    slices (on the output grid, ``[first, last + 1)``) and voxels per class under
    ``"slabs"``.
    """
    image_path, atlas_path, names_path = template_paths(templates)
    names = read_region_names(names_path)
    image = sitk.ReadImage(image_path)
    reference = output_grid(image, spacing)
    labels = labels_on_grid(coarse_labels(sitk.ReadImage(atlas_path), names), reference)
    image = image_on_grid(image, reference)
    array = sitk.GetArrayViewFromImage(labels)  # (z, y, x)
    starts = slab_starts(array.reshape(array.shape[0], -1).any(1), slab, gap)
    folder = os.path.join(raw_root, f"Dataset{dataset_id:03d}_{DATASET_NAME}")
    class_names = ["background"] + [name for name, _ in CLASSES]
    slabs = {}
    for i, start in enumerate(starts):
        case = slab_case(i)
        label = labels[:, :, start:start + slab]
        experiments.write_raw_case(folder, case, image[:, :, start:start + slab], label)
        counts = np.bincount(sitk.GetArrayViewFromImage(label).ravel(), minlength=len(CLASSES) + 1)
        slabs[case] = {"set": SETS[i % len(SETS)], "slices": [start, start + slab],
                       "voxels": dict(zip(class_names, counts.tolist()))}
        print(f"  {case} ({slabs[case]['set']}): slices {start}-{start + slab - 1}, voxels per "
              f"class {counts.tolist()}", flush=True)
    experiments.write_dataset_json(folder, {
        "channel_names": {"0": "T1"},  # nnU-Net's z-score normalisation
        "labels": {name: value for value, name in enumerate(class_names)},
        "numTraining": len(starts),
        "file_ending": ".nii.gz",
        "name": DATASET_NAME,
        "description": f"Colin27 T1 ({IMAGE_FILE}) with the AAL atlas coarsened to "
                       f"{len(CLASSES)} classes, at {spacing} mm, as slabs of {slab} axial "
                       f"slices {gap} slices apart (package {APT_PACKAGE})",
        "reference": "Holmes et al. 1998 (Colin27); Tzourio-Mazoyer et al. 2002 (AAL)",
        experiments.BENCHMARK_KEY: dataset_options(spacing, slab, gap),
        "slabs": slabs,
    })
    return folder


def print_class_table(raw_folder: str) -> None:
    """Voxels per class in each set of the split (from ``dataset.json``'s ``"slabs"``)."""
    import json
    with open(os.path.join(raw_folder, "dataset.json")) as f:
        slabs = json.load(f)["slabs"]
    names = list(next(iter(slabs.values()))["voxels"])
    print(f"\n{'set':<6}{'cases':>6}  " + "  ".join(names), flush=True)
    for part in ("train", "val", "test"):
        cases = [c for c in slabs.values() if c["set"] == part]
        total = [sum(c["voxels"][n] for c in cases) for n in names]
        print(f"{part:<6}{len(cases):>6}  " + "  ".join(f"{v:>{len(n)}}" for v, n in
                                                        zip(total, names)), flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--workdir", default="colin27_benchmark")
    p.add_argument("--templates", default=TEMPLATES,
                   help=f"folder of {IMAGE_FILE}, {ATLAS_FILE} and {NAMES_FILE} "
                        f"(apt-get install {APT_PACKAGE})")
    p.add_argument("--spacing", type=float, default=2.0, help="voxel size of the dataset, mm")
    p.add_argument("--slab", type=int, default=4, help="axial slices per case")
    p.add_argument("--gap", type=int, default=1, help="slices dropped between two slabs")
    experiments.add_benchmark_arguments(
        p, experiments.BENCHMARK_STAGES, DATASET_ID, adv_eps=10.0, eps_max=20.0,
        noise=[0, 5, 10, 20], eval_cases_help="nnunet-ima-eval --cases (default: the test slabs)",
        # 12 epochs of 25 iterations left Clean at a validation Dice of 0 on five of the six
        # classes; 60 reach 0.53 (docs/benchmarks.md).
        epochs=60)
    return p


def prepare_dataset(experiment: Experiment, raw_folder: str, args: argparse.Namespace) -> bool:
    """The raw dataset in ``raw_folder``, built unless it is there, checked against the
    options."""
    if not os.path.isfile(os.path.join(raw_folder, "dataset.json")):
        print(f"building {raw_folder} from {args.templates}", flush=True)
        build_raw_dataset(args.templates, experiment.folders["nnUNet_raw"], args.dataset_id,
                          args.spacing, args.slab, args.gap)
    experiments.check_recorded_options(raw_folder,
                                       dataset_options(args.spacing, args.slab, args.gap))
    print_class_table(raw_folder)
    return True


def main(argv: Optional[List[str]] = None) -> int:
    args = experiments.parse_benchmark_arguments(build_parser(), argv)
    return experiments.run_benchmark(
        "colin27_benchmark", args, DATASET_NAME,
        lambda experiment, raw_folder: prepare_dataset(experiment, raw_folder, args),
        lambda experiment, preprocessed: experiments.save_case_split(
            preprocessed, slab_split, args.seed, "slabs"),
        ["test"])


if __name__ == "__main__":
    sys.exit(main())
