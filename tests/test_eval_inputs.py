"""nnunet-ima-eval's bad inputs that used to end in a traceback: one message that names the file
and the fix, exit code 2, nothing written."""
import json
import os
import pickle
import shutil

import numpy as np
import pytest

from nnunet_ima.errors import UserInputError
from nnunet_ima.evaluation.cli import main
from nnunet_ima.evaluation.predictor_path import package_trainers_findable
from nnunet_ima.evaluation.samples import (cases_from_source, load_preprocessed_slices,
                                           read_raw_case)
from nnunet_ima.nnunet.paths import trainer_dir

BAD_TEST_CASES = [
    ('{"test": ["case_000", ', "cannot read {path} (Expecting value"),
    ('["case_000", "case_001"]', "{path} should hold {{\"test\": [\"case\", ...], ...}} as "
                                 "`nnunet-ima split` writes it, found a list"),
    ('{"cases": ["case_000"]}', "{path} should hold {{\"test\": [\"case\", ...], ...}} as "
                                "`nnunet-ima split` writes it, found an object without 'test'"),
    ('{"test": "case_000"}', "{path}: 'test' must be a list of case identifiers"),
    ('{"test": [0, 1]}', "{path}: 'test' must be a list of case identifiers"),
]


@pytest.mark.parametrize("content, message", BAD_TEST_CASES)
def test_an_unreadable_test_cases_json_names_the_file_and_the_fix(tmp_path, content, message):
    path = tmp_path / "test_cases.json"
    path.write_text(content)
    with pytest.raises(UserInputError) as error:
        cases_from_source(str(tmp_path), ["test"], 0)
    assert str(error.value).startswith(message.format(path=path))
    assert "nnunet-ima split -d DATASET --test N --overwrite" in str(error.value)


@pytest.mark.parametrize("content, message", [
    ("[{", "cannot read {path}"),
    ('{"0": {"train": [], "val": []}}', "{path} should hold a list of folds"),
    ('[["case_000"]]', "{path}: fold 0 should be an object with 'train' and 'val'"),
    ('[{"train": ["a"], "val": "b"}]', "{path}: fold 0's 'val' must be a list"),
])
def test_an_unreadable_splits_file_names_the_file_for_val_cases(tmp_path, content, message):
    path = tmp_path / "splits_final.json"
    path.write_text(content)
    with pytest.raises(UserInputError) as error:
        cases_from_source(str(tmp_path), ["val"], 0)
    assert str(error.value).startswith(message.format(path=path))


def test_a_valid_test_cases_json_still_reads(tmp_path):
    (tmp_path / "test_cases.json").write_text('{"test": ["b", "a"], "seed": 0, "num_folds": 5}')
    assert cases_from_source(str(tmp_path), None, 0) == ["b", "a"]


# ---------------------------------------------------------------------------- raw test images

def _write_image(path, array):
    import SimpleITK as sitk
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))


@pytest.fixture
def raw_case(tmp_path):
    """A readable raw case: ``(reader, image file, label file)``."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    image, label = tmp_path / "c_0000.nii.gz", tmp_path / "c.nii.gz"
    _write_image(image, np.random.default_rng(0).normal(size=(4, 8, 8)).astype(np.float32))
    _write_image(label, (np.arange(256).reshape(4, 8, 8) % 3).astype(np.uint8))
    return SimpleITKIO(), image, label


def test_a_readable_raw_case_is_read(raw_case):
    reader, image, label = raw_case
    data, seg, properties = read_raw_case(reader, "c", [str(image)], str(label))
    assert data.shape == (1, 4, 8, 8) and seg.shape == (1, 4, 8, 8) and "spacing" in properties


def test_an_image_file_that_is_not_an_image_is_named(raw_case):
    reader, image, label = raw_case
    image.write_text("not an image")
    with pytest.raises(UserInputError) as error:
        read_raw_case(reader, "c", [str(image)], str(label))
    assert str(error.value).startswith(f"cannot read {image} (case c) as an image (")
    assert "replace it with a complete image or remove the case from --images" in str(error.value)
    assert "\n" not in str(error.value)


def test_a_truncated_image_or_label_is_named(raw_case):
    reader, image, label = raw_case
    data = image.read_bytes()
    image.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserInputError, match=f"cannot read {image} \\(case c\\) as an image"):
        read_raw_case(reader, "c", [str(image)], str(label))
    image.write_bytes(data)
    seg = label.read_bytes()
    label.write_bytes(seg[:40])
    with pytest.raises(UserInputError, match=f"cannot read {label} \\(the label of case c\\)"):
        read_raw_case(reader, "c", [str(image)], str(label))


def test_an_uncompressed_nifti_cut_short_is_named(raw_case, tmp_path):
    """SimpleITK reads the missing voxels as zeros; the header says how many bytes there are."""
    reader, _, label = raw_case
    image = tmp_path / "u_0000.nii"
    _write_image(image, np.ones((4, 8, 8), np.float32))
    image.write_bytes(image.read_bytes()[:-100])
    assert reader.read_images([str(image)])[0].shape == (1, 4, 8, 8)  # no error from ITK
    with pytest.raises(UserInputError, match=f"cannot read {image} \\(case c\\) as an image "
                                             f"\\(truncated: 1276 bytes of the 1376 its header"):
        read_raw_case(reader, "c", [str(image)], str(label))


def test_a_second_channel_that_does_not_read_is_the_one_named(raw_case, tmp_path):
    reader, image, label = raw_case
    second = tmp_path / "c_0001.nii.gz"
    second.write_bytes(b"\x1f\x8b broken gzip")
    with pytest.raises(UserInputError, match=f"cannot read {second} \\(case c\\)"):
        read_raw_case(reader, "c", [str(image), str(second)], str(label))


def test_an_image_and_label_of_different_shapes_are_refused(raw_case):
    reader, image, label = raw_case
    _write_image(label, np.zeros((4, 8, 6), np.uint8))
    with pytest.raises(UserInputError) as error:
        read_raw_case(reader, "c", [str(image)], str(label))
    assert str(error.value) == (f"case c: the image {image} has shape [4, 8, 8] but its label "
                                f"{label} has shape [4, 8, 6]; the label must cover the image "
                                f"voxel for voxel (give the matching label in --labels)")


def test_nan_in_a_raw_image_is_named(raw_case, tmp_path):
    # ITK's NIfTI reader turns NaN into 0; its MetaImage reader (.mha) keeps it.
    reader, _, label = raw_case
    image = tmp_path / "c_0000.mha"
    array = np.ones((4, 8, 8), np.float32)
    array[1, 2, 3] = np.nan
    _write_image(image, array)
    with pytest.raises(UserInputError, match=f"{image} \\(case c\\) holds NaN or infinite"):
        read_raw_case(reader, "c", [str(image)], str(label))


def test_nan_in_a_preprocessed_case_is_named(tmp_path):
    folder = tmp_path / "nnUNetPlans_2d"
    folder.mkdir()
    data = np.ones((1, 2, 4, 4), np.float32)
    data[0, 1, 0, 0] = np.nan
    np.savez_compressed(folder / "case_000.npz", data=data, seg=np.ones((1, 2, 4, 4), np.int8))
    with open(folder / "case_000.pkl", "wb") as f:
        pickle.dump({"spacing": [1, 1, 1]}, f)
    with pytest.raises(UserInputError) as error:
        load_preprocessed_slices(str(tmp_path), "nnUNetPlans_2d", ["case_000"], False)
    assert str(error.value).startswith(f"case case_000 in {folder} holds NaN or infinite values")
    assert "rerun nnUNetv2_plan_and_preprocess" in str(error.value)


# ------------------------------------------------------------------------- nnU-Net's variables

@pytest.mark.parametrize("value, message", [
    (None, "the environment variable nnUNet_results is not set. Set it as nnU-Net expects"),
    ("file", "nnUNet_results={path} is not a folder; create it or fix the variable"),
])
def test_nnunet_results_unset_or_a_file_is_one_message(tmp_path, monkeypatch, capsys, value,
                                                       message):
    path = tmp_path / "results.txt"
    path.write_text("")
    if value is None:
        monkeypatch.delenv("nnUNet_results", raising=False)
    else:
        monkeypatch.setenv("nnUNet_results", str(path))
    out = tmp_path / "out"
    assert main(["-d", "Dataset990_SyntheticOrgan", "-tr", "nnUNetTrainerIMA", "--device", "cpu",
                 "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nnunet-ima-eval: error: " + message.format(path=path))
    assert "Traceback" not in err and not out.exists()


def test_the_package_trainers_are_findable_without_nnunet_ext_trainer(monkeypatch):
    monkeypatch.delenv("nnUNet_extTrainer", raising=False)
    with package_trainers_findable():
        assert os.environ["nnUNet_extTrainer"] == trainer_dir()
        assert os.path.isfile(os.path.join(trainer_dir(), "nnUNetTrainerIMA.py"))
    assert "nnUNet_extTrainer" not in os.environ
    monkeypatch.setenv("nnUNet_extTrainer", "/users/own/trainers")
    with package_trainers_findable():
        assert os.environ["nnUNet_extTrainer"] == "/users/own/trainers"


# ---------------------------------------------------------- end to end on a trained model

def _args(ws, out, *extra):
    return ["-d", str(ws.dataset_id), "-c", "2d", "-f", "0", "-tr", "nnUNetTrainerClean",
            "--device", "cpu", "--no-progress", "--noise", "0", "--max-slices", "2",
            "-o", str(out), *extra]


def _first_error_line(err):
    lines = [line for line in err.splitlines() if line.startswith("nnunet-ima-eval: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.slow
def test_bad_inputs_exit_2_with_one_message_and_write_nothing(nnunet_workspace,
                                                              trained_clean_model, tmp_path,
                                                              monkeypatch, capsys, one_thread):
    import SimpleITK as sitk
    ws = nnunet_workspace
    # A private copy of the preprocessed dataset: the session's test_cases.json stays intact.
    preprocessed = tmp_path / "nnUNet_preprocessed"
    shutil.copytree(os.path.join(ws.preprocessed, ws.dataset_name),
                    preprocessed / ws.dataset_name)
    monkeypatch.setenv("nnUNet_preprocessed", str(preprocessed))
    test_cases = preprocessed / ws.dataset_name / "test_cases.json"
    good = test_cases.read_text()
    case = json.loads(good)["test"][0]
    for i, (content, message) in enumerate(BAD_TEST_CASES):
        test_cases.write_text(content)
        assert main(_args(ws, tmp_path / f"tc{i}")) == 2
        assert message.format(path=test_cases) in _first_error_line(capsys.readouterr().err)
        assert not (tmp_path / f"tc{i}").exists()
    test_cases.write_text(good)

    raw = os.path.join(ws.raw, ws.dataset_name)
    source_image = os.path.join(raw, "imagesTr", f"{case}_0000.nii.gz")
    source_label = os.path.join(raw, "labelsTr", f"{case}.nii.gz")

    def raw_folders(name):
        images, labels = tmp_path / name / "imagesTs", tmp_path / name / "labelsTs"
        images.mkdir(parents=True)
        labels.mkdir()
        shutil.copy(source_image, images)
        shutil.copy(source_label, labels)
        return images, labels, images / f"{case}_0000.nii.gz", labels / f"{case}.nii.gz"

    def refused(images, labels, expected, name):
        out = tmp_path / f"out_{name}"
        assert main(_args(ws, out, "--images", str(images), "--labels", str(labels))) == 2
        assert expected in _first_error_line(capsys.readouterr().err)
        assert not out.exists()

    images, labels, image, label = raw_folders("text")
    image.write_text("not an image")
    refused(images, labels, f"cannot read {image} (case {case}) as an image", "text")
    images, labels, image, label = raw_folders("truncated")
    image.write_bytes(image.read_bytes()[:200])
    refused(images, labels, f"cannot read {image} (case {case}) as an image", "truncated")
    images, labels, image, label = raw_folders("shape")
    cropped = sitk.ReadImage(str(label))[:, :40, :]
    sitk.WriteImage(cropped, str(label))
    refused(images, labels, f"case {case}: the image {image} has shape", "shape")
    images, labels, image, label = raw_folders("cut")
    image.write_bytes(image.read_bytes()[:-300])  # cut within the voxels: ITK reads zeros
    refused(images, labels, f"cannot read {image} (case {case}) as an image (truncated", "cut")

    # NaN in a preprocessed case (ITK's NIfTI reader turns NaN into 0, so it comes from
    # elsewhere: another reader, or a preprocessed file written by other code).
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    folder = preprocessed / ws.dataset_name / "nnUNetPlans_2d"
    data, seg, _, properties = nnUNetDatasetBlosc2(str(folder), [case]).load_case(case)
    data, seg = np.array(data), np.array(seg)
    data[0, 3, 10, 10] = np.nan
    for stale in folder.glob(f"{case}*.b2nd"):  # blosc2 does not write over an existing array
        stale.unlink()
    nnUNetDatasetBlosc2.save_case(data, seg, properties, str(folder / case))
    out = tmp_path / "out_nan"
    assert main(_args(ws, out, "--cases", case)) == 2
    assert _first_error_line(capsys.readouterr().err) == (
        f"nnunet-ima-eval: error: case {case} in {folder} holds NaN or infinite values (NaN in "
        f"its raw image?): fix the raw image and rerun nnUNetv2_plan_and_preprocess, or leave "
        f"the case out (--cases CASE ...)")
    assert not out.exists()


@pytest.mark.slow
def test_the_predictor_path_finds_this_packages_trainer_without_the_variable(
        nnunet_workspace, trained_clean_model, tmp_path, monkeypatch, one_thread):
    monkeypatch.delenv("nnUNet_extTrainer", raising=False)
    out = tmp_path / "out"
    assert main(_args(nnunet_workspace, out, "--inference", "predictor")) == 0
    assert json.loads((out / "config.json").read_text())["inference"]["path"] == "predictor"
    assert "nnUNet_extTrainer" not in os.environ
