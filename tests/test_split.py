"""``nnunet-ima split``: test cases stay out of every fold nnU-Net can train, and a split is not
rewritten under trained models unless asked twice (no nnU-Net run needed, except the slow test
that trains, rewrites the split and evaluates)."""
import json
import os

import numpy as np
import pytest

from nnunet_ima.cli import main
from nnunet_ima.nnunet.split_plan import case_identifiers, make_split, save_split
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


# ------------------------------------------------------------------ trained models and --force
def _trained_fold(results, trainer, fold, record=None, checkpoint=True):
    """A fold folder under ``results`` as far as `split` reads it: a checkpoint and/or a
    training record."""
    from nnunet_ima.nnunet.training_record import write_training_record
    folder = results / DATASET / f"{trainer}__nnUNetPlans__2d" / f"fold_{fold}"
    folder.mkdir(parents=True)
    if checkpoint:
        (folder / "checkpoint_final.pth").write_bytes(b"")
    if record is not None:
        write_training_record(str(folder), fold, record["train"], record["val"], None)
    return str(folder)


def test_overwrite_names_the_trained_models_whose_folds_change_and_needs_force(
        preprocessed, tmp_path, monkeypatch, capsys):
    results = tmp_path / "results"
    monkeypatch.setenv("nnUNet_results", str(results))
    assert main(["split", "-d", DATASET, "--test", "2", "--seed", "0"]) == 0
    old = _read(preprocessed, "splits_final.json")
    new = make_split(_cases(10), 2, None, 1)["folds"]
    plain = _trained_fold(results, "nnUNetTrainer", 0)  # no record: the old split's fold 0
    recorded = _trained_fold(results, "nnUNetTrainerIMA", 1, record=old[1], checkpoint=False)
    # Models the new split leaves alone: a record that equals the new fold, and fold all.
    _trained_fold(results, "nnUNetTrainerAdv", 2, record=new[2])
    _trained_fold(results, "nnUNetTrainerClean", "all")
    (results / DATASET / "nnUNetTrainerClean__nnUNetPlans__2d" / "fold_3").mkdir()  # untrained
    capsys.readouterr()
    assert main(["split", "-d", DATASET, "--test", "2", "--seed", "1", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"nnunet-ima split: error: rewriting {preprocessed / 'splits_final.json'}"
                          f" would change the cases of trained folds:\n  {recorded}\n  {plain}\n"
                          f"A model without a training record")
    assert "--overwrite --force" in err and "nnUNetTrainerAdv" not in err and "fold_all" not in err
    assert _read(preprocessed, "splits_final.json") == old  # nothing written
    assert main(["split", "-d", DATASET, "--test", "2", "--seed", "1", "--force"]) == 2
    assert "--force only goes with --overwrite" in capsys.readouterr().err
    assert main(["split", "-d", DATASET, "--test", "2", "--seed", "1", "--overwrite",
                 "--force"]) == 0
    assert f"warning: {plain} was trained on a fold that this split changes" in \
        capsys.readouterr().err
    assert _read(preprocessed, "splits_final.json") == new
    # The same split again changes nothing: no refusal.
    assert main(["split", "-d", DATASET, "--test", "2", "--seed", "1", "--overwrite"]) == 0


@pytest.mark.parametrize("name, content", [("splits_final.json", '[{"train": '),
                                           ("test_cases.json", "not json")])
def test_unreadable_existing_split_files_get_one_message(preprocessed, capsys, monkeypatch, name,
                                                         content):
    monkeypatch.delenv("nnUNet_results", raising=False)
    (preprocessed / name).write_text(content)
    assert main(["split", "-d", DATASET, "--test", "2", "--seed", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"nnunet-ima split: error: cannot read {preprocessed / name} (")
    assert err.rstrip().endswith("pass --overwrite to replace it") and "Traceback" not in err
    assert (preprocessed / name).read_text() == content
    assert main(["split", "-d", DATASET, "--test", "2", "--seed", "0", "--overwrite"]) == 0
    assert "no trained model of the old split could be looked for" in capsys.readouterr().err
    assert _read(preprocessed, "test_cases.json")["test"] == make_split(_cases(10), 2, None,
                                                                        0)["test"]


def test_an_unreadable_dataset_json_gets_one_message(preprocessed, capsys):
    (preprocessed / "dataset.json").write_text("{")
    assert main(["split", "-d", DATASET, "--test", "2"]) == 2
    assert capsys.readouterr().err.startswith(
        f"nnunet-ima split: error: cannot read {preprocessed / 'dataset.json'} (")


def test_validating_on_test_cases_on_purpose_is_written_down(tmp_path):
    from nnunet_ima.nnunet.splits import fold_split_problem
    save_split(str(tmp_path), {"train": ["a", "b"], "val": ["c"], "test": ["c"]}, seed=3,
               allow_test_in_val=True)
    assert _read(tmp_path, "test_cases.json") == {"test": ["c"], "seed": 3, "num_folds": 1,
                                                  "allow_test_in_val": True}
    assert fold_split_problem(str(tmp_path), 0) is None  # the trainers accept it


# ------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_after_a_rewritten_split_the_evaluator_refuses_what_the_model_trained_on(
        nnunet_workspace, trained_clean_model, tmp_path, capsys):
    """Train fold 0, rewrite the split with another seed (--overwrite --force), evaluate: the
    new 'test' cases the model trained on are refused by name, from its training record."""
    from conftest import _bin
    from nnunet_ima.evaluation.cli import main as evaluate
    ws = nnunet_workspace
    folder = os.path.join(ws.preprocessed, ws.dataset_name)
    fold = os.path.join(trained_clean_model, "fold_0")
    with open(os.path.join(fold, "training_cases.json")) as f:
        trained = json.load(f)["train"]
    saved = {n: open(os.path.join(folder, n)).read()
             for n in ("splits_final.json", "test_cases.json")}
    split = [_bin("nnunet-ima"), "split", "-d", str(ws.dataset_id), "--test", "2", "--folds", "6"]
    # A seed whose test cases hold a case fold 0 trained on (seed 1 on this dataset).
    seed = next(s for s in range(1, 50)
                if set(make_split(case_identifiers(folder), 2, 6, s)["test"]) & set(trained))
    try:
        refused = ws.run(split + ["--seed", str(seed), "--overwrite"], check=False)
        assert refused.returncode == 2 and "Traceback" not in refused.stderr
        # Other tests of the session may have trained other models on this dataset: the
        # listing names every trained fold the new split changes, this one among them.
        listing = refused.stderr.split("would change the cases of trained folds:\n", 1)[1]
        listing = listing.split("\nA model without a training record", 1)[0].splitlines()
        assert f"  {fold}" in listing
        ws.run(split + ["--seed", str(seed), "--overwrite", "--force"])
        with open(os.path.join(folder, "test_cases.json")) as f:
            new_test = json.load(f)["test"]
        leaked = [c for c in new_test if c in trained]
        assert leaked
        out = tmp_path / "o"
        argv = ["-d", str(ws.dataset_id), "-c", "2d", "-f", "0", "-tr", "nnUNetTrainerClean",
                "--device", "cpu", "--no-progress", "-o", str(out), "--noise", "0",
                "--max-slices", "2", "--cases", "test"]
        capsys.readouterr()
        assert evaluate(argv) == 2
        err = capsys.readouterr().err
        assert f"nnUNetTrainerClean (fold 0): {', '.join(leaked)}\n" in err
        assert "splits_final.json changed after this model started training" in err
        assert not out.exists()
        # Scored anyway: the tables say where the training cases came from.
        assert evaluate(argv + ["--allow-train-cases"]) == 0
        table = (out / "tvdi.md").read_text()
        assert ("Note: nnUNetTrainerClean: " + os.path.join(folder, "splits_final.json")
                + " changed after this model started training") in table
    finally:
        # The session's other tests expect the original split, byte for byte.
        ws.run(split + ["--seed", "0", "--overwrite", "--force"])
        for name, text in saved.items():
            assert open(os.path.join(folder, name)).read() == text
