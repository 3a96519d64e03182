"""``nnunet-ima split``: test cases stay out of every fold nnU-Net can train (no nnU-Net run needed)."""
import json

import numpy as np
import pytest

from nnunet_ima.cli import main
from nnunet_ima.commands.split import make_split, save_split
from nnunet_ima.errors import UserInputError

DATASET = "Dataset990_Toy"


def _cases(n):
    return [f"toy_{i:03d}" for i in range(n)]


@pytest.fixture
def preprocessed(tmp_path, monkeypatch):
    """A preprocessed dataset as far as the split reads it: dataset.json and gt_segmentations."""
    folder = tmp_path / DATASET
    (folder / "gt_segmentations").mkdir(parents=True)
    (folder / "dataset.json").write_text(json.dumps({"file_ending": ".nii.gz"}))
    for case in _cases(10):
        (folder / "gt_segmentations" / f"{case}.nii.gz").write_bytes(b"")
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path))
    return folder


def _read(folder, name):
    return json.loads((folder / name).read_text())


@pytest.mark.parametrize("n, num_test, num_folds", [(10, 2, 5), (10, 2, None), (8, 2, 6),
                                                     (20, 3, 5), (6, 2, None), (4, 2, None),
                                                     (7, 0, 3)])
def test_every_fold_keeps_the_test_cases_out(n, num_test, num_folds):
    split = make_split(_cases(n), num_test, num_folds, seed=0)
    test = set(split["test"])
    rest = set(_cases(n)) - test
    assert len(test) == num_test
    assert len(split["folds"]) == (num_folds or min(5, n - num_test))
    for fold in split["folds"]:
        train, val = set(fold["train"]), set(fold["val"])
        assert train and val
        assert not train & test and not val & test
        assert not train & val and train | val == rest
    # The validation folds partition the non-test cases, as in a cross-validation.
    vals = [c for fold in split["folds"] for c in fold["val"]]
    assert sorted(vals) == sorted(rest)


def test_folds_are_nnunets_own_split_of_the_remaining_cases():
    from nnunetv2.utilities.crossval_split import generate_crossval_split
    split = make_split(_cases(10), 2, 5, seed=7)
    rest = sorted(set(_cases(10)) - set(split["test"]))
    expected = generate_crossval_split(rest, seed=7, n_splits=5)
    assert split["folds"] == [{"train": list(map(str, f["train"])), "val": list(map(str, f["val"]))}
                              for f in expected]
    # The test cases are the seeded draw of earlier versions: the permutation's first cases.
    order = np.random.default_rng(7).permutation(10)
    assert split["test"] == sorted(_cases(10)[i] for i in order[:2])


def test_too_few_cases_for_the_folds_is_refused_with_the_fix():
    with pytest.raises(UserInputError, match="leave 3 of 5 cases for 5 folds.*--folds 3"):
        make_split(_cases(5), 2, 5, seed=0)
    with pytest.raises(UserInputError, match="leave 1 of 3 cases"):
        make_split(_cases(3), 2, None, seed=0)
    with pytest.raises(UserInputError, match="--folds must be >= 2"):
        make_split(_cases(10), 2, 1, seed=0)


def test_cli_writes_all_folds_the_demo_call_validates_and_warns_about_fold_all(preprocessed,
                                                                               capsys):
    # The demo's call: 10 cases, 2 test cases.
    assert main(["split", "-d", DATASET, "--test", "2", "--seed", "0"]) == 0
    out = capsys.readouterr().out
    assert "fold 4:" in out and "trains on every preprocessed case" in out
    splits = _read(preprocessed, "splits_final.json")
    record = _read(preprocessed, "test_cases.json")
    assert len(splits) == 5 and len(splits[0]["val"]) >= 1
    assert record == {"test": make_split(_cases(10), 2, None, 0)["test"], "seed": 0,
                      "num_folds": 5}
    for fold in splits:
        assert not set(record["test"]) & (set(fold["train"]) | set(fold["val"]))
    # The same call again is fine; another split is refused unless --overwrite.
    assert main(["split", "-d", DATASET, "--test", "2", "--seed", "0"]) == 0
    assert main(["split", "-d", DATASET, "--test", "2", "--seed", "1"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert _read(preprocessed, "splits_final.json") == splits
    assert main(["split", "-d", DATASET, "--test", "3", "--seed", "1", "--overwrite"]) == 0
    assert len(_read(preprocessed, "test_cases.json")["test"]) == 3


def test_the_removed_val_option_is_an_error(preprocessed, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["split", "-d", DATASET, "--test", "2", "--val", "1"])
    assert exit_info.value.code == 2
    assert "--val" in capsys.readouterr().err
    assert not (preprocessed / "splits_final.json").exists()


def test_a_custom_split_never_trains_on_test_cases(tmp_path):
    split = {"train": ["a", "b"], "val": ["c"], "test": ["d"]}
    save_split(str(tmp_path), split, seed=3)
    assert _read(tmp_path, "splits_final.json") == [{"train": ["a", "b"], "val": ["c"]}]
    assert _read(tmp_path, "test_cases.json") == {"test": ["d"], "seed": 3, "num_folds": 1}
    with pytest.raises(UserInputError, match=r"fold 0 would train or validate on the test cases \['b'\]"):
        save_split(str(tmp_path / "x"), dict(split, test=["b"]), seed=3)
    # Validating on the test cases needs saying so (the pyradiomics halves do: no model selection).
    with pytest.raises(UserInputError, match=r"\['c'\]"):
        save_split(str(tmp_path), dict(split, test=["c"]), seed=3, overwrite=True)
    save_split(str(tmp_path), dict(split, test=["c"]), seed=3, overwrite=True,
               allow_test_in_val=True)
    assert _read(tmp_path, "test_cases.json")["test"] == ["c"]
    with pytest.raises(UserInputError, match="exists with a different split"):
        save_split(str(tmp_path), split, seed=3)
