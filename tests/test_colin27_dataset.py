"""The raw-dataset builder of benchmarks/colin27_benchmark.py, on small NIfTI volumes written in the
layout of ``mricron-data``'s templates (T1, atlas on its own grid, names file); nnU-Net checks
the result. One test reads the installed templates themselves."""
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk
from benchmark_scripts import load_benchmark_script

TEMPLATES = "/usr/share/mricron/templates"
LAS = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)  # the templates' direction
# Hand-made regions: (AAL value, AAL name, coarse label), one each of four coarse classes.
REGIONS = ((3, "Frontal_Sup_L", 1), (37, "Hippocampus_L", 6), (71, "Caudate_L", 5),
           (91, "Cerebelum_Crus1_L", 4))


@pytest.fixture(scope="module")
def bench_module():
    return load_benchmark_script("colin27_benchmark")


def _image(array, spacing, origin):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(LAS)
    return image


def _write_templates(folder, atlas_spacing=2.0):
    """A 1 mm T1 of (z, y, x) = (40, 24, 20) voxels and an atlas on another grid (``atlas_spacing``
    mm, same physical box) with four cubes: one per region of :data:`REGIONS`, each filling
    8 mm along z (slices 4k..4k+7 of the T1 for k = 1, 3, 5, 7) and 8 x 8 mm in-plane."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    t1 = rng.integers(0, 130, (40, 24, 20)).astype(np.uint8)
    origin = (10.0, 12.0, -20.0)
    sitk.WriteImage(_image(t1, (1.0, 1.0, 1.0), origin), os.path.join(folder, "ch2better.nii.gz"))
    factor = int(atlas_spacing)
    atlas = np.zeros((40 // factor, 24 // factor, 20 // factor), np.uint8)
    for k, (value, _, _) in enumerate(REGIONS):
        z0 = (4 + 8 * k) // factor
        atlas[z0:z0 + 8 // factor, 8 // factor:16 // factor, 4 // factor:12 // factor] = value
    # The atlas's first voxel centre sits where its corner meets the T1's box corner.
    shift = (atlas_spacing - 1.0) / 2
    atlas_origin = (origin[0] - shift, origin[1] - shift, origin[2] + shift)
    sitk.WriteImage(_image(atlas, (atlas_spacing,) * 3, atlas_origin),
                    os.path.join(folder, "aal.nii.gz"))
    with open(os.path.join(folder, "aal.nii.txt"), "w") as f:
        f.writelines(f"{value} {name} {2000 + value}\n" for value, name, _ in REGIONS)
    return t1


def test_every_aal_region_of_the_names_file_has_one_coarse_class(bench_module):
    assert bench_module.coarse_class("Frontal_Sup_Orb_R") == 1
    assert bench_module.coarse_class("Temporal_Pole_Mid_L") == 2
    assert bench_module.coarse_class("ParaHippocampal_L") == 2      # not parietal (Parietal_*)
    assert bench_module.coarse_class("Parietal_Inf_R") == 3
    assert bench_module.coarse_class("Vermis_1_2") == 4
    assert bench_module.coarse_class("Pallidum_R") == 5
    assert bench_module.coarse_class("Amygdala_L") == 6
    with pytest.raises(bench_module.BenchmarkError, match="matched by no class"):
        bench_module.coarse_class("Brainstem")


def test_slabs_start_at_the_first_labelled_slice_with_gaps_and_a_fixed_split(bench_module):
    labelled = [False] * 3 + [True] * 20 + [False] * 4       # slices 3..22
    # slab 4, gap 1: 3-6, 8-11, 13-16, 18-21; 23-26 would pass the last labelled slice.
    assert bench_module.slab_starts(labelled, 4, 1) == [3, 8, 13, 18]
    assert bench_module.slab_starts(labelled, 8, 2) == [3, 13]
    assert bench_module.slab_starts(labelled, 5, 0) == [3, 8, 13, 18]
    with pytest.raises(bench_module.BenchmarkError, match="labels no slice"):
        bench_module.slab_starts([False] * 5, 4, 1)
    with pytest.raises(bench_module.BenchmarkError, match="--slab must be >= 1"):
        bench_module.slab_starts(labelled, 0, 1)
    cases = [f"slab{i:02d}" for i in range(10)]
    assert bench_module.slab_split(cases) == {
        "train": ["slab00", "slab02", "slab04", "slab06", "slab08"],
        "val": ["slab03", "slab07"], "test": ["slab01", "slab05", "slab09"]}


def test_missing_templates_name_the_apt_package(bench_module, tmp_path):
    with pytest.raises(bench_module.BenchmarkError, match="apt-get install mricron-data"):
        bench_module.template_paths(str(tmp_path))
    result = bench_module.main(["--workdir", str(tmp_path / "w"), "--templates",
                                str(tmp_path / "none"), "--stop-after", "dataset"])
    assert result == 1


def test_raw_dataset_on_the_t1_grid_keeps_voxels_and_maps_the_regions(bench_module, tmp_path):
    t1 = _write_templates(str(tmp_path / "templates"), atlas_spacing=2.0)
    folder = bench_module.build_raw_dataset(str(tmp_path / "templates"), str(tmp_path / "raw"),
                                            992, spacing=1.0, slab=6, gap=2)
    dataset = json.loads(open(os.path.join(folder, "dataset.json")).read())
    # Labelled slices 4..35: slabs 4-9, 12-17, 20-25, 28-33 (34-39 would pass slice 35).
    assert sorted(dataset["slabs"]) == ["slab00", "slab01", "slab02", "slab03"]
    assert [dataset["slabs"][c]["slices"] for c in sorted(dataset["slabs"])] == [
        [4, 10], [12, 18], [20, 26], [28, 34]]
    assert [dataset["slabs"][c]["set"] for c in sorted(dataset["slabs"])] == [
        "train", "test", "train", "val"]
    assert dataset["labels"]["hippocampus_amygdala"] == 6 and dataset["numTraining"] == 4
    assert dataset["nnunet_ima_benchmark"] == {"spacing": 1.0, "slab": 6, "gap": 2}

    reference = sitk.ReadImage(os.path.join(str(tmp_path / "templates"), "ch2better.nii.gz"))
    for case, (start, stop) in (("slab00", (4, 10)), ("slab02", (20, 26))):
        image = sitk.ReadImage(os.path.join(folder, "imagesTr", f"{case}_0000.nii.gz"))
        label = sitk.ReadImage(os.path.join(folder, "labelsTr", f"{case}.nii.gz"))
        # On the T1's own grid the T1 is copied: same voxels at the same physical points.
        assert image.GetSize() == (20, 24, 6) and np.allclose(image.GetDirection(), LAS)
        assert np.allclose(image.GetOrigin(),
                           reference.TransformIndexToPhysicalPoint((0, 0, start)))
        assert np.array_equal(sitk.GetArrayFromImage(image), t1[start:stop].astype(np.float32))
        # The hand-made cube of region k fills T1 slices 4 + 8k .. 11 + 8k, y 8..15, x 4..11.
        expected = np.zeros((40, 24, 20), np.uint8)
        for k, (_, _, coarse) in enumerate(REGIONS):
            expected[4 + 8 * k:12 + 8 * k, 8:16, 4:12] = coarse
        assert np.array_equal(sitk.GetArrayFromImage(label), expected[start:stop])
    # Slices 4-9 of the Frontal_Sup_L cube, 12-17 of the Hippocampus_L cube.
    voxels = {c: dataset["slabs"][c]["voxels"] for c in ("slab00", "slab01")}
    assert voxels["slab00"]["frontal"] == 6 * 64 and voxels["slab00"]["hippocampus_amygdala"] == 0
    assert voxels["slab01"]["hippocampus_amygdala"] == 6 * 64 and voxels["slab01"]["frontal"] == 0
    assert voxels["slab00"]["background"] == 6 * 20 * 24 - 6 * 64

    from nnunet_ima.nnunet.experiment import check_recorded_options
    check_recorded_options(folder, bench_module.dataset_options(1.0, 6, 2))
    with pytest.raises(bench_module.BenchmarkError, match="use another --workdir"):
        check_recorded_options(folder, bench_module.dataset_options(2.0, 6, 2))


def test_raw_dataset_downsampled_keeps_the_field_of_view_and_the_regions(bench_module, tmp_path):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    _write_templates(str(tmp_path / "templates"), atlas_spacing=1.0)  # atlas on the T1's grid
    folder = bench_module.build_raw_dataset(str(tmp_path / "templates"), str(tmp_path / "raw"),
                                            992, spacing=2.0, slab=2, gap=1)
    image = sitk.ReadImage(os.path.join(folder, "imagesTr", "slab00_0000.nii.gz"))
    # 20 x 24 x 40 mm at 2 mm; the box corner stays where the T1's is (0.5 mm before its first
    # voxel centre, 1 mm before the new one's).
    assert image.GetSize() == (10, 12, 2) and np.allclose(image.GetSpacing(), 2.0)
    assert np.allclose(image.GetOrigin(), (10.0 - 0.5, 12.0 - 0.5, -20.0 + 0.5 + 2 * 2))
    # Labelled 2 mm slices 2..17: slabs 2-3, 5-6, 8-9, 11-12, 14-15.
    dataset = json.loads(open(os.path.join(folder, "dataset.json")).read())
    assert [dataset["slabs"][c]["slices"][0] for c in sorted(dataset["slabs"])] == [2, 5, 8, 11, 14]
    for case in sorted(dataset["slabs"]):
        label = sitk.ReadImage(os.path.join(folder, "labelsTr", f"{case}.nii.gz"))
        array = sitk.GetArrayFromImage(label)
        start = dataset["slabs"][case]["slices"][0]
        for z in range(2):
            # The 2 mm slice 2 + start .. covers T1 slices 2 (start + z) and 2 (start + z) + 1,
            # both inside one cube: one class, on the 4 x 4 voxels of the 8 x 8 mm square.
            k = (2 * (start + z) - 4) // 8
            assert set(np.unique(array[z])) == {0, REGIONS[k][2]}
            assert np.count_nonzero(array[z]) == 16 and np.all(array[z, 4:8, 2:6] > 0)
    verify_dataset_integrity(folder, num_processes=1)  # nnU-Net's own check (geometry, labels)


def test_atlas_outside_the_t1_is_refused(bench_module, tmp_path):
    folder = str(tmp_path / "templates")
    _write_templates(folder)
    atlas = sitk.ReadImage(os.path.join(folder, "aal.nii.gz"))
    atlas.SetOrigin((500.0, 500.0, 500.0))
    sitk.WriteImage(atlas, os.path.join(folder, "aal.nii.gz"))
    with pytest.raises(bench_module.BenchmarkError, match="not in the T1's space"):
        bench_module.build_raw_dataset(folder, str(tmp_path / "raw"), 992, spacing=1.0)


def test_unnamed_atlas_value_is_refused(bench_module, tmp_path):
    folder = str(tmp_path / "templates")
    _write_templates(folder)
    with open(os.path.join(folder, "aal.nii.txt"), "w") as f:
        f.write("3 Frontal_Sup_L 2101\n")
    with pytest.raises(bench_module.BenchmarkError, match=r"values \[37, 71, 91\]"):
        bench_module.build_raw_dataset(folder, str(tmp_path / "raw"), 992, spacing=1.0)


@pytest.mark.skipif(not os.path.isdir(TEMPLATES), reason="needs the Colin27 template and the "
                    "AAL atlas: apt-get install mricron-data")
def test_the_installed_templates_give_six_classes_on_one_grid(bench_module):
    image_path, atlas_path, names_path = bench_module.template_paths(TEMPLATES)
    names = bench_module.read_region_names(names_path)
    assert len(names) == 116
    # Every region has its class; every class has regions.
    assert {bench_module.coarse_class(n) for n in names.values()} == set(range(1, 7))
    image = sitk.ReadImage(image_path)
    reference = bench_module.output_grid(image, 2.0)
    assert reference.GetSize() == (75, 92, 79)
    coarse = bench_module.coarse_labels(sitk.ReadImage(atlas_path), names)
    labels = sitk.GetArrayFromImage(bench_module.labels_on_grid(coarse, reference))
    voxels = np.bincount(labels.ravel(), minlength=7)
    # Mixed sizes: the cortex classes hold ten or twenty times the small deep classes' voxels.
    assert voxels[1] > 8 * voxels[5] > 0 and voxels[3] > 15 * voxels[6] > 0
    layout = bench_module.slab_starts(labels.reshape(labels.shape[0], -1).any(1), 4, 1)
    assert len(layout) == 14
