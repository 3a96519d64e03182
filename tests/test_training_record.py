"""The training record (what a fold trained on) and the split rules of this package's trainers.

Fast tests call the record, the split rules, the trainer's own methods (on a trainer built
without nnU-Net's constructor) and the evaluator's choice directly. The slow ones run the real
``nnUNetv2_train`` on the session's workspace and show that each mistake ends in one message,
exit code 2 and no traceback, with nothing left behind.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
from types import SimpleNamespace

import pytest
import torch

from conftest import _bin
from nnunet_ima.errors import UserInputError
from nnunet_ima.io import file_sha256
from nnunet_ima.nnunet.splits import fold_split_problem, read_splits, read_test_cases
from nnunet_ima.nnunet.training_record import (RECORD_FILENAME, read_training_record,
                                               write_training_record)
from nnunet_ima.trainers.nnUNetTrainerClean import nnUNetTrainerClean

DATASET = "Dataset990_Toy"
TEST = ["c6", "c7"]
FOLDS = [{"train": ["c2", "c3", "c4", "c5"], "val": ["c0", "c1"]},
         {"train": ["c0", "c1", "c4", "c5"], "val": ["c2", "c3"]},
         {"train": ["c0", "c1", "c2", "c3"], "val": ["c4", "c5"]}]


def _write(path, content):
    path.write_text(content if isinstance(content, str) else json.dumps(content))


def _dataset(tmp_path, splits=FOLDS, test=TEST, test_extra=None):
    """A preprocessed dataset folder as far as the split rules read it."""
    folder = tmp_path / "pre" / DATASET
    folder.mkdir(parents=True, exist_ok=True)
    if splits is not None:
        _write(folder / "splits_final.json", splits)
    if test is not None:
        _write(folder / "test_cases.json", test if isinstance(test, str) else
               dict({"test": test, "seed": 0, "num_folds": 3}, **(test_extra or {})))
    return folder


# ------------------------------------------------------------------ the record
def test_the_record_holds_the_cases_and_the_split_files_digest(tmp_path):
    folder = _dataset(tmp_path)
    fold = tmp_path / "res" / DATASET / "nnUNetTrainerIMA__nnUNetPlans__2d" / "fold_1"
    path = write_training_record(str(fold), 1, FOLDS[1]["train"], FOLDS[1]["val"],
                                 str(folder / "splits_final.json"))
    assert path == str(fold / RECORD_FILENAME)
    record = read_training_record(str(fold))
    assert record == {"fold": 1, "train": FOLDS[1]["train"], "val": FOLDS[1]["val"],
                      "splits_file": str(folder / "splits_final.json"),
                      "splits_sha256": file_sha256(str(folder / "splits_final.json")),
                      "written_by": "nnUNetTrainerIMA"}
    assert read_training_record(str(tmp_path / "elsewhere")) is None  # plain nnU-Net: no record
    write_training_record(str(fold), "all", ["a"], ["a"], None)
    assert read_training_record(str(fold))["splits_sha256"] is None


@pytest.mark.parametrize("content, message", [
    ('{"fold": 0, "train": [', "cannot read"),
    ("[1, 2]", "holds a list, not an object"),
    ({"fold": 0, "train": [], "val": []}, "lacks ['splits_file', 'splits_sha256']"),
    ({"fold": 0, "train": "c1", "val": [], "splits_file": None, "splits_sha256": None},
     "'train' is not a list of case identifiers"),
    ({"fold": -1, "train": [], "val": [], "splits_file": None, "splits_sha256": None},
     "'fold' is -1"),
])
def test_an_unreadable_record_is_one_error_naming_the_file(tmp_path, content, message):
    _write(tmp_path / RECORD_FILENAME, content)
    with pytest.raises(UserInputError) as e:
        read_training_record(str(tmp_path))
    assert str(tmp_path / RECORD_FILENAME) in str(e.value) and message in str(e.value)


# ------------------------------------------------------------------ the split rules
def test_a_fold_of_the_split_without_test_cases_may_train(tmp_path):
    folder = _dataset(tmp_path)
    assert all(fold_split_problem(str(folder), k) is None for k in range(3))
    # Plain nnU-Net without held-out cases: its own 5-fold split, and fold all, as always.
    plain = _dataset(tmp_path / "plain", splits=None, test=None)
    assert fold_split_problem(str(plain), 0) is None
    assert fold_split_problem(str(plain), "all") is None


def test_a_fold_the_split_does_not_have_is_refused(tmp_path):
    folder = _dataset(tmp_path)
    problem = fold_split_problem(str(folder), 3)
    assert problem.startswith(f"fold 3 is not in {folder / 'splits_final.json'}, which has 3 "
                              f"folds (0-2): nnU-Net would train it on a random 80:20 split of "
                              f"all cases, the test cases of {folder / 'test_cases.json'} "
                              f"included. Train one of the folds 0-2, or write 4 folds: "
                              f"nnunet-ima split -d {DATASET} --test 2 --folds 4 --overwrite")
    # Six non-test cases give at most six folds: no --folds 10 advice that split would refuse.
    assert "--folds" not in fold_split_problem(str(folder), 9)
    # Without test cases it is refused too: nnU-Net's 80:20 split is no fold of this split.
    assert "is not in" in fold_split_problem(str(_dataset(tmp_path / "n", test=None)), 3)


def test_fold_all_beside_test_cases_is_refused_unless_asked_for(tmp_path):
    folder = _dataset(tmp_path)
    problem = fold_split_problem(str(folder), "all")
    assert problem.startswith("fold 'all' trains on every preprocessed case, the 2 held-out "
                              "test cases of")
    assert "Train the folds 0-2 of" in problem and "NNUNET_IMA_ALLOW_FOLD_ALL=1" in problem
    assert fold_split_problem(str(folder), "all", allow_fold_all=True) is None
    # An empty test set holds nothing out: fold all is nnU-Net's, as always.
    assert fold_split_problem(str(_dataset(tmp_path / "e", test=[])), "all") is None


def test_test_cases_without_a_split_file_are_refused(tmp_path):
    folder = _dataset(tmp_path, splits=None)
    problem = fold_split_problem(str(folder), 0)
    assert problem.startswith(f"{folder / 'test_cases.json'} holds 2 held-out test cases but "
                              f"{folder / 'splits_final.json'} does not exist")
    assert problem.endswith(f"nnunet-ima split -d {DATASET} --test 2 --seed 0 --folds 3 "
                            f"--overwrite")


def test_a_fold_that_trains_or_validates_on_a_test_case_is_refused(tmp_path):
    leaky = [dict(FOLDS[0], train=FOLDS[0]["train"] + ["c7"]), dict(FOLDS[1], val=["c2", "c6"])]
    folder = _dataset(tmp_path, splits=leaky)
    problem = fold_split_problem(str(folder), 0)
    assert problem.startswith(f"fold 0 of {folder / 'splits_final.json'} trains on ['c7'] "
                              f"(held-out test cases of {folder / 'test_cases.json'})")
    assert "allow_test_in_val" not in problem
    problem = fold_split_problem(str(folder), 1)
    assert "validates on ['c6']" in problem and '"allow_test_in_val": true' in problem
    # Validating on the test cases, written deliberately (save_split(allow_test_in_val=True)).
    folder = _dataset(tmp_path / "d", splits=leaky, test_extra={"allow_test_in_val": True})
    assert fold_split_problem(str(folder), 1) is None
    assert "trains on ['c7']" in fold_split_problem(str(folder), 0)


@pytest.mark.parametrize("name, content, message", [
    ("splits_final.json", '[{"train": ["c1"]', "cannot read"),
    ("splits_final.json", {"train": [], "val": []}, "should hold a list of folds"),
    ("splits_final.json", [["c1"], ["c2"]], "fold 0 should be an object with 'train' and 'val'"),
    ("splits_final.json", [{"train": "c1", "val": []}], "fold 0's 'train' must be a list"),
    ("splits_final.json", [], "holds no folds"),
    ("test_cases.json", "", "cannot read"),
    ("test_cases.json", ["c6"], "should hold {\"test\""),
    ("test_cases.json", {"test": [6]}, "'test' must be a list of case identifiers"),
])
def test_unreadable_split_files_are_one_error_naming_the_file(tmp_path, name, content, message):
    folder = _dataset(tmp_path)
    _write(folder / name, content)
    with pytest.raises(UserInputError) as e:
        fold_split_problem(str(folder), 0)
    assert str(folder / name) in str(e.value) and message in str(e.value)
    assert f"nnunet-ima split -d {DATASET} --test N --overwrite" in str(e.value)
    reader = read_splits if name == "splits_final.json" else read_test_cases
    with pytest.raises(UserInputError):
        reader(str(folder / name))


def test_the_split_remedy_names_the_dataset_only_for_a_dataset_folder(tmp_path):
    from nnunet_ima.nnunet.splits import split_remedy
    assert f"nnunet-ima split -d {DATASET} --test N --overwrite" in split_remedy(
        str(tmp_path / DATASET / "splits_final.json"))
    # A copy outside nnUNet_preprocessed: its folder name is not a dataset `split -d` knows.
    assert "nnunet-ima split -d DATASET --test N --overwrite" in split_remedy(
        str(tmp_path / "copy" / "splits_final.json"))


# ------------------------------------------------------------------ the trainer's do_split
def _fake_trainer(tmp_path, folder, fold=0, cls=nnUNetTrainerClean):
    """A trainer with just the attributes its split, record and refusal code read (nnU-Net's
    constructor, which needs a real preprocessed dataset, is not run)."""
    t = cls.__new__(cls)
    model = tmp_path / "res" / DATASET / f"{cls.__name__}__nnUNetPlans__2d"
    t.fold, t.local_rank, t.device = fold, 0, torch.device("cpu")
    t.preprocessed_dataset_folder_base = str(folder)
    t.output_folder = str(model / f"fold_{fold}")
    os.makedirs(t.output_folder, exist_ok=True)
    t.log_file = os.path.join(t.output_folder, "training_log.txt")
    t._created_folders, t._loaded_checkpoint, t._split, t._splits_file = [], None, None, None
    t.plans_manager = SimpleNamespace(dataset_name=DATASET, plans_name="nnUNetPlans")
    t.configuration_name = "2d"
    t.print_to_log_file = lambda *args, **kwargs: None
    return t


def _refusal(capsys, call) -> str:
    """``call()`` must stop with exit code 2; returns stderr, which must be one message."""
    with pytest.raises(SystemExit) as e:
        call()
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("cannot ") >= 1
    return err


@pytest.mark.parametrize("fold, expected", [(3, "fold 3 is not in"),
                                            ("all", "fold 'all' trains on every")])
def test_the_trainer_refuses_before_nnunet_draws_its_own_split(tmp_path, capsys, monkeypatch,
                                                               fold, expected):
    t = _fake_trainer(tmp_path, _dataset(tmp_path), fold)
    called = []
    monkeypatch.setattr("nnunetv2.training.nnUNetTrainer.nnUNetTrainer.nnUNetTrainer.do_split",
                        lambda self: called.append(1))
    err = _refusal(capsys, t.do_split)
    assert err.startswith("\nnnunet-ima: nnUNetTrainerClean cannot start.\n" + expected)
    assert err.rstrip().endswith("(nothing was trained or written)")
    assert not called  # nnU-Net's do_split never ran (it would have drawn the 80:20 split)


def test_the_trainer_takes_nnunets_choice_and_records_it(tmp_path, monkeypatch):
    folder = _dataset(tmp_path)
    t = _fake_trainer(tmp_path, folder, 2)
    monkeypatch.setattr("nnunetv2.training.nnUNetTrainer.nnUNetTrainer.nnUNetTrainer.do_split",
                        lambda self: (FOLDS[self.fold]["train"], FOLDS[self.fold]["val"]))
    assert t.do_split() == (FOLDS[2]["train"], FOLDS[2]["val"])
    assert t._splits_file == str(folder / "splits_final.json")
    # The choice is made once per run: a split rewritten meanwhile does not change it.
    _write(folder / "splits_final.json", FOLDS[::-1])
    assert t.do_split() == (FOLDS[2]["train"], FOLDS[2]["val"])


def test_a_resumed_or_validating_trainer_uses_its_record_not_todays_split(tmp_path, capsys):
    folder = _dataset(tmp_path)
    t = _fake_trainer(tmp_path, folder, 0)
    write_training_record(t.output_folder, 0, FOLDS[0]["train"], FOLDS[0]["val"],
                          str(folder / "splits_final.json"))
    # The split was rewritten since: fold 0 now validates on a case the model trained on, and
    # the old fold 3 is gone.
    _write(folder / "splits_final.json", [FOLDS[1]])
    t._loaded_checkpoint = os.path.join(t.output_folder, "checkpoint_final.pth")  # --c / --val
    assert t.do_split() == (FOLDS[0]["train"], FOLDS[0]["val"])
    # A damaged record stops it, naming the file.
    t = _fake_trainer(tmp_path, folder, 0)
    t._loaded_checkpoint = "checkpoint_final.pth"
    _write(tmp_path / t.output_folder / RECORD_FILENAME, "{")
    err = _refusal(capsys, t.do_split)
    assert "nnUNetTrainerClean cannot continue" in err and RECORD_FILENAME in err


def test_a_finished_fold_is_not_trained_again_without_asking(tmp_path, capsys, monkeypatch):
    t = _fake_trainer(tmp_path, _dataset(tmp_path), 0)
    t._refuse_finished_fold()  # nothing there yet
    final = os.path.join(t.output_folder, "checkpoint_final.pth")
    _write(tmp_path / final, "weights")
    err = _refusal(capsys, t._refuse_finished_fold)
    assert f"{t.output_folder} holds a finished training (checkpoint_final.pth)" in err
    assert (f"nnUNetv2_train {DATASET} 2d 0 -tr nnUNetTrainerClean -device cpu --val" in err
            and f"rm -r {t.output_folder}" in err and "NNUNET_IMA_OVERWRITE=1" in err)
    assert open(final).read() == "weights"
    monkeypatch.setenv("NNUNET_IMA_OVERWRITE", "1")
    t._refuse_finished_fold()


# ------------------------------------------------------------------ the constructor's checks
ARCHITECTURE = {"network_class_name": "unused", "arch_kwargs": {}, "_kw_requires_import": []}
PLANS = {"plans_name": "nnUNetPlans", "dataset_name": DATASET,
         "configurations": {"2d": {"patch_size": [8, 8], "architecture": ARCHITECTURE},
                            "3d_fullres": {"patch_size": [8, 8, 8],
                                           "architecture": ARCHITECTURE}}}


def _construct(trainer=nnUNetTrainerClean, configuration="2d"):
    return trainer(dict(PLANS, continue_training=False), configuration, 0, {},
                   torch.device("cpu"))


@pytest.mark.parametrize("setting, message", [
    (None, "the environment variable nnUNet_results is not set"),
    ("file", "is a file, not a folder"),
    ("readonly", "no permission to write in this folder"),
])
def test_nnunet_results_is_checked_before_nnunet_creates_anything(tmp_path, capsys, monkeypatch,
                                                                   setting, message):
    calls = []
    monkeypatch.setattr("nnunetv2.training.nnUNetTrainer.nnUNetTrainer.nnUNetTrainer.__init__",
                        lambda self, *args, **kwargs: calls.append(args))
    results = tmp_path / "results"
    if setting is None:
        monkeypatch.delenv("nnUNet_results", raising=False)
    else:
        monkeypatch.setenv("nnUNet_results", str(results))
        if setting == "file":
            results.write_text("")
        else:
            results.mkdir()
            # Root may write anywhere: the check asks os.access, as for any other folder.
            real_access = os.access
            monkeypatch.setattr(os, "access", lambda p, mode: False if os.path.abspath(p) == str(
                results) else real_access(p, mode))
    err = _refusal(capsys, _construct)
    assert message in err and "export nnUNet_results=" in err
    assert not calls  # nnU-Net's constructor (which makes the folders) never ran
    assert sorted(os.listdir(tmp_path)) == (["results"] if setting else [])


def test_a_configuration_the_trainer_cannot_train_leaves_no_folder(tmp_path, capsys, monkeypatch):
    from nnunet_ima.trainers.nnUNetTrainerIMA import nnUNetTrainerIMA
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    err = _refusal(capsys, lambda: _construct(nnUNetTrainerIMA, "3d_fullres"))
    assert "nnUNetTrainerIMA trains nnU-Net's 2D configuration only" in err
    err = _refusal(capsys, lambda: _construct(nnUNetTrainerClean, "3d_lowres"))
    assert "configuration '3d_lowres' is not in the plans 'nnUNetPlans' (it has 2d, 3d_fullres)" \
        in err
    assert not (tmp_path / "results").exists()


# ------------------------------------------------------------------ the evaluator's choice
def _model_fold(tmp_path, fold=0):
    return tmp_path / "res" / DATASET / "nnUNetTrainerIMA__nnUNetPlans__2d" / f"fold_{fold}"


def test_the_evaluator_trusts_the_record_and_says_when_the_split_changed(tmp_path):
    from nnunet_ima.evaluation.training_cases import training_cases
    folder = _dataset(tmp_path)
    fold = _model_fold(tmp_path)
    write_training_record(str(fold), 0, FOLDS[0]["train"], FOLDS[0]["val"],
                          str(folder / "splits_final.json"))
    # No preprocessed data is read where the record decides (the identifiers are not needed).
    found = training_cases(str(folder), "nnUNetPlans_2d", 0, str(fold))
    assert found.cases == sorted(FOLDS[0]["train"]) and found.note == ""
    _write(folder / "splits_final.json", FOLDS[::-1])  # rewritten after training
    found = training_cases(str(folder), "nnUNetPlans_2d", 0, str(fold))
    assert found.cases == sorted(FOLDS[0]["train"])
    assert found.note == (f"{folder / 'splits_final.json'} changed after this model started "
                          f"training; the cases it trained on come from its training record "
                          f"{fold / RECORD_FILENAME}")


def test_without_a_record_the_evaluator_falls_back_to_the_split_and_says_so(tmp_path,
                                                                          monkeypatch):
    from nnunet_ima.evaluation import training_cases as tc
    monkeypatch.setattr(tc, "preprocessed_identifiers", lambda *a: [f"c{i}" for i in range(8)])
    folder = _dataset(tmp_path)
    fold = _model_fold(tmp_path)
    found = tc.training_cases(str(folder), "nnUNetPlans_2d", 0, str(fold))
    assert found.cases == sorted(FOLDS[0]["train"])
    assert found.note.startswith(f"no training record ({RECORD_FILENAME}) in {fold}, as for a "
                                 f"model of a plain nnU-Net trainer")
    assert tc.training_cases(str(folder), "nnUNetPlans_2d", "all",
                             str(_model_fold(tmp_path, "all"))).note == ""
    # A record of another fold (a copied folder): what either says counts.
    write_training_record(str(fold), 1, FOLDS[1]["train"], FOLDS[1]["val"], None)
    found = tc.training_cases(str(folder), "nnUNetPlans_2d", 0, str(fold))
    assert found.cases == sorted(set(FOLDS[0]["train"]) | set(FOLDS[1]["train"]))
    assert "is of fold 1, not 0" in found.note
    # An unreadable split file is an error naming it, not a traceback.
    shutil.rmtree(fold)
    _write(folder / "splits_final.json", '{"a": 1}')
    with pytest.raises(UserInputError, match="splits_final.json should hold a list of folds"):
        tc.training_cases(str(folder), "nnUNetPlans_2d", 0, str(fold))


def test_the_tables_footnote_and_the_refusal_carry_the_notes():
    from nnunet_ima.evaluation.training_cases import footnote, refusal_message
    config = {"models": {"A": {"training_cases_note": "no training record (x)"}, "B": {}}}
    assert footnote({}, config) == "Note: A: no training record (x)."
    both = footnote({"B": ["c1"]}, config)
    assert both.splitlines()[0] == "Note: A: no training record (x)."
    assert both.splitlines()[-1].startswith("Note: training cases were scored")
    message = refusal_message({"A": ["c1"]}, {"A": 0}, {"A": "split changed"})
    assert "  A (fold 0): c1\n    (split changed)\n" in message


# ------------------------------------------------------------------ real nnUNetv2_train
def _train_cli(ws, fold, *extra, env=None, trainer="nnUNetTrainerClean", configuration="2d"):
    return ws.run([_bin("nnUNetv2_train"), str(ws.dataset_id), configuration, str(fold), "-tr",
                   trainer, "-device", "cpu", *extra], extra_env=env, check=False)


def _one_message(result, first_line: str) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    message = result.stderr[result.stderr.index("nnunet-ima: "):]
    assert message.splitlines()[1].startswith(first_line), message
    return message


@pytest.mark.slow
def test_nnunetv2_train_refuses_a_fold_the_split_lacks(nnunet_workspace):
    ws = nnunet_workspace
    result = _train_cli(ws, 9)
    _one_message(result, "fold 9 is not in ")
    assert not os.path.exists(os.path.join(ws.model_folder("nnUNetTrainerClean"), "fold_9"))


@pytest.mark.slow
def test_the_trained_fold_has_its_record_and_is_not_trained_again(nnunet_workspace,
                                                                 trained_clean_model):
    ws = nnunet_workspace
    fold = os.path.join(trained_clean_model, "fold_0")
    splits = os.path.join(ws.preprocessed, ws.dataset_name, "splits_final.json")
    record = read_training_record(fold)
    with open(splits) as f:
        expected = json.load(f)[0]
    assert (record["train"], record["val"]) == (expected["train"], expected["val"])
    assert record["splits_file"] == splits and record["splits_sha256"] == file_sha256(splits)
    before = {name: os.path.getmtime(os.path.join(fold, name)) for name in os.listdir(fold)}
    message = _one_message(_train_cli(ws, 0), f"{fold} holds a finished training")
    assert "--val" in message and "NNUNET_IMA_OVERWRITE=1" in message
    assert {name: os.path.getmtime(os.path.join(fold, name)) for name in os.listdir(fold)} == before


@pytest.mark.slow
def test_nnunetv2_train_with_nnunet_results_a_file_or_3d_stops_cleanly(nnunet_workspace,
                                                                      tmp_path):
    ws = nnunet_workspace
    not_a_folder = tmp_path / "results_file"
    not_a_folder.write_text("")
    _one_message(_train_cli(ws, 0, env={"nnUNet_results": str(not_a_folder)}),
                 f"nnUNet_results {not_a_folder} is a file, not a folder")
    results = tmp_path / "results"
    results.mkdir()
    _one_message(_train_cli(ws, 0, env={"nnUNet_results": str(results)},
                            trainer="nnUNetTrainerIMA", configuration="3d_fullres"),
                 "nnUNetTrainerIMA trains nnU-Net's 2D configuration only")
    assert os.listdir(results) == []  # no Dataset/Trainer__3d_fullres/fold_0 left behind


def _ddp_rank(rank, port, preprocessed, fold):
    import torch.distributed as dist
    from batchgenerators.utilities.file_and_folder_operations import load_json
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    plans = load_json(os.path.join(preprocessed, "nnUNetPlans.json"))
    plans["continue_training"] = False
    trainer = nnUNetTrainerClean(plans, "2d", fold, load_json(os.path.join(preprocessed,
                                                                           "dataset.json")),
                                 torch.device("cpu"))
    trainer.run_training()


@pytest.mark.slow
def test_a_refusal_ends_every_ddp_rank(nnunet_workspace, monkeypatch):
    """Under torch's spawn (nnUNetv2_train -num_gpus 2) each rank exits with code 2 and the run
    ends, instead of one rank waiting for the others forever."""
    import torch.multiprocessing as mp
    from torch.multiprocessing import ProcessExitedException
    ws = nnunet_workspace
    monkeypatch.setenv("NNUNET_IMA_CONFIG", ws.write_config("ddp_refusal.json",
                                                            {"num_epochs": 1}))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ProcessExitedException) as e:
        mp.spawn(_ddp_rank, nprocs=2, join=True,
                 args=(port, os.path.join(ws.preprocessed, ws.dataset_name), 7))
    assert e.value.exit_code == 2
    assert not os.path.exists(os.path.join(ws.model_folder("nnUNetTrainerClean"), "fold_7"))
