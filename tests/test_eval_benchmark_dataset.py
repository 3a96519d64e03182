"""The raw-dataset builder of benchmarks/pyradiomics_benchmark.py, on small NRRD pairs shaped like
the archive's (int16 image, int32 mask with a flipped axis direction); nnU-Net checks the result."""
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk
from benchmark_scripts import load_benchmark_script



@pytest.fixture(scope="module")
def bench_module():
    return load_benchmark_script("pyradiomics_benchmark")


def _write_pair(folder, case, shape, box, direction, seed):
    rng = np.random.default_rng(seed)
    image = rng.integers(-100, 300, shape).astype(np.int16)          # (z, y, x)
    mask = np.zeros(shape, np.int32)
    mask[box] = 1
    for array, kind in ((image, "image"), (mask, "label")):
        img = sitk.GetImageFromArray(array)
        img.SetSpacing((0.78, 0.78, 6.5))
        img.SetOrigin((-99.6, 99.6, -78.0))
        img.SetDirection(direction)
        sitk.WriteImage(img, os.path.join(folder, f"{case}_{kind}.nrrd"))
    return image, mask


def _pairs(folder, cases):
    """``{case: (image path, label path)}`` of pairs written by :func:`_write_pair`."""
    return {c: (str(folder / f"{c}_image.nrrd"), str(folder / f"{c}_label.nrrd")) for c in cases}


def test_crop_window_holds_the_lesion(bench_module):
    rng = np.random.default_rng(0)
    starts = {bench_module.crop_start(512, 300, 340, 128, rng) for _ in range(200)}
    assert min(starts) >= 340 + 1 - 128 and max(starts) <= 300
    assert len(starts) > 20  # not always the same (centred) window
    assert bench_module.crop_start(100, 10, 20, 128, rng) == 0          # axis smaller than the window
    assert bench_module.crop_start(512, 100, 300, 128, rng) == 200 - 64  # lesion larger: centred


def test_raw_dataset_keeps_geometry_and_binarises_and_passes_nnunet_checks(bench_module, tmp_path):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    src = tmp_path / "src"
    src.mkdir()
    flipped = (1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
    image, mask = _write_pair(str(src), "brain1", (6, 200, 160),
                              np.s_[2:4, 150:170, 20:40], flipped, 0)
    _write_pair(str(src), "lung1", (5, 60, 50), np.s_[1:3, 10:20, 30:45],
                (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0), 1)
    pairs = _pairs(src, ("brain1", "lung1"))
    folder = bench_module.build_raw_dataset(pairs, str(tmp_path / "raw"), 991, crop_size=64, seed=0,
                                            split="patients")

    dataset = json.loads(open(os.path.join(folder, "dataset.json")).read())
    assert dataset["labels"] == {"background": 0, "lesion": 1} and dataset["numTraining"] == 2
    out_image = sitk.ReadImage(os.path.join(folder, "imagesTr", "brain1_0000.nii.gz"))
    out_label = sitk.ReadImage(os.path.join(folder, "labelsTr", "brain1.nii.gz"))
    assert out_image.GetSize() == (64, 64, 6)
    assert np.allclose(out_image.GetDirection(), flipped)
    label = sitk.GetArrayFromImage(out_label)
    assert set(np.unique(label)) == {0, 1} and label.sum() == mask.sum()  # whole lesion kept
    # The crop is a window of the original: same voxels at the same physical points.
    index = out_image.TransformPhysicalPointToIndex(
        sitk.ReadImage(pairs["brain1"][0]).TransformIndexToPhysicalPoint((25, 155, 3)))
    assert sitk.GetArrayFromImage(out_image)[index[2], index[1], index[0]] == image[3, 155, 25]
    small = sitk.ReadImage(os.path.join(folder, "imagesTr", "lung1_0000.nii.gz"))
    assert small.GetSize() == (50, 60, 5)  # smaller than the window: untouched

    verify_dataset_integrity(folder, num_processes=1)  # nnU-Net's own check (geometry, labels)


def test_halves_cut_each_volume_across_its_lesion_and_keep_geometry(bench_module, tmp_path):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    src = tmp_path / "src"
    src.mkdir()
    identity = (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)
    # brain1: lesion on slices 2..5 -> cut at (2 + 5 + 1) // 2 = 4; lung1: one lesion slice (1).
    image, mask = _write_pair(str(src), "brain1", (8, 40, 40), np.s_[2:6, 10:20, 10:20], identity, 0)
    _write_pair(str(src), "lung1", (5, 30, 30), np.s_[1:2, 5:10, 5:10], identity, 1)
    pairs = _pairs(src, ("brain1", "lung1"))
    folder = bench_module.build_raw_dataset(pairs, str(tmp_path / "raw"), 991, crop_size=0, seed=0,
                                            split="halves")

    def read(case, kind="labelsTr", suffix=""):
        return sitk.ReadImage(os.path.join(folder, kind, f"{case}{suffix}.nii.gz"))

    a, b = read("brain1_a"), read("brain1_b")
    assert (a.GetSize()[2], b.GetSize()[2]) == (4, 4)
    assert sitk.GetArrayFromImage(a).sum() == mask[:4].sum() > 0       # slices 2, 3
    assert sitk.GetArrayFromImage(b).sum() == mask[4:].sum() > 0       # slices 4, 5
    # The second part's first slice is the volume's slice 4, at the same physical place.
    b_image = read("brain1_b", "imagesTr", "_0000")
    assert np.allclose(b_image.GetOrigin(), sitk.ReadImage(pairs["brain1"][0])
                       .TransformIndexToPhysicalPoint((0, 0, 4)))
    assert np.array_equal(sitk.GetArrayFromImage(b_image), image[4:].astype(np.float32))
    lung_a, lung_b = read("lung1_a"), read("lung1_b")  # single lesion slice: cut at it
    assert (lung_a.GetSize()[2], lung_b.GetSize()[2]) == (1, 4)
    assert sitk.GetArrayFromImage(lung_a).sum() == 0 and sitk.GetArrayFromImage(lung_b).sum() == 25

    dataset = json.loads(open(os.path.join(folder, "dataset.json")).read())
    assert dataset["numTraining"] == 4
    verify_dataset_integrity(folder, num_processes=1)
    cases = ["brain1_a", "brain1_b", "lung1_a", "lung1_b"]
    assert bench_module.halves_split(cases) == {"train": ["brain1_a", "lung1_a"],
                                                "val": ["brain1_b", "lung1_b"],
                                                "test": ["brain1_b", "lung1_b"]}

    bench_module.check_dataset_options(folder, 0, "halves", 0)  # the options it was built with
    with pytest.raises(bench_module.BenchmarkError, match="use another --workdir"):
        bench_module.check_dataset_options(folder, 64, "halves", 0)
    with pytest.raises(bench_module.BenchmarkError, match="use another --workdir"):
        bench_module.check_dataset_options(folder, 0, "patients", 0)


def test_runner_runs_commands_side_by_side_and_names_the_failures(tmp_path, capsys):
    """The benchmark's runner (the demo's too) runs its trainings side by side."""
    import sys
    import time

    from nnunet_ima.nnunet.experiment import CommandFailed, Experiment
    from nnunet_ima.nnunet.pipeline import Command

    runner = Experiment(str(tmp_path / "work"))
    sleep = [sys.executable, "-c", "import time; time.sleep(1.5)"]
    start = time.time()
    runner.run_together([Command(sleep, "first"), Command(sleep, "second")])
    assert time.time() - start < 2.9  # concurrently, not 2 x 1.5 s one after the other
    out = capsys.readouterr().out
    assert "first.log: done in" in out and "second.log: done in" in out
    fail = [sys.executable, "-c", "import sys; print('broken'); sys.exit(3)"]
    with pytest.raises(CommandFailed, match="exit 3") as error:
        runner.run_together([Command(fail, "bad", {"EXTRA": "1"}),
                             Command(sleep[:2] + ["pass"], "good")])
    assert "bad.log" in str(error.value) and "good" not in str(error.value)
    assert (tmp_path / "work" / "logs" / "bad.log").read_text().strip() == "broken"
