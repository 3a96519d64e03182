"""The umbrella ``nnunet-ima``: check-config, make-synthetic's refusals, output folders checked
before any work, Ctrl-C, and the shared helpers behind them (no nnU-Net run needed)."""
import argparse
import json
import os

import pytest
import torch

from nnunet_ima import cli
from nnunet_ima.cli import main
from nnunet_ima.errors import INTERRUPTED_MESSAGE, UserInputError, run_command
from nnunet_ima.help_format import has_default, shown_default
from nnunet_ima.io import check_output_folder, write_text


def _listing(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, dirs, files in os.walk(root)
                  for f in dirs + files)


# ------------------------------------------------------------------------------ check-config
def test_check_config_prints_the_resolved_settings(tmp_path, capsys):
    path = tmp_path / "ima.json"
    path.write_text(json.dumps({"eps_max": 15, "recipe": "authors"}))
    assert main(["check-config", str(path)]) == 0
    settings = json.loads(capsys.readouterr().out)
    assert settings["eps_max"] == 15 and settings["recipe"] == "authors"
    assert settings["lr_schedule"] == "constant"  # set by the recipe
    assert settings["pgd_steps"] == 20  # the paper's default


def test_check_config_applies_a_trainers_class_defaults(tmp_path, capsys, monkeypatch):
    path = tmp_path / "ima.json"
    path.write_text(json.dumps({"num_epochs": 3}))
    assert main(["check-config", str(path), "-tr", "nnUNetTrainerAdv_eps40"]) == 0
    settings = json.loads(capsys.readouterr().out)
    assert (settings["adv_eps"], settings["num_epochs"]) == (40.0, 3)
    monkeypatch.setenv("NNUNET_IMA_CONFIG", str(path))  # FILE defaults to the variable
    assert main(["check-config"]) == 0
    default = json.loads(capsys.readouterr().out)  # -tr nnUNetTrainerIMA by default
    assert default["adv_eps"] == 15.0 and default["recipe"] == "authors"


@pytest.mark.parametrize("content, message", [
    ('{"eps_max": -1}', "eps_max must be a finite number > 0, got -1"),
    ('{"epsmax": 1}', "unknown trainer option(s) ['epsmax']"),
    ("{bad", "is not valid JSON"),
    ("[1]", "must hold a JSON object of trainer options, got list"),
    ('{"recipe": []}', "recipe must be one of ('printed', 'authors'), got []"),
    ('{"recipe": "paper"}', "recipe must be one of ('printed', 'authors'), got 'paper'"),
    (b"\xff\xfe", "cannot read"),
    (None, "does not exist"),
    ("folder", "is a folder"),
])
def test_check_config_refuses_a_bad_file_with_one_message(tmp_path, capsys, content, message):
    path = tmp_path / "ima.json"
    if content == "folder":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    assert main(["check-config", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nnunet-ima check-config: error: ")
    assert message in lines[0]


def test_check_config_checks_the_fine_tuning_checkpoint(tmp_path, capsys):
    """A finetune_from that the trainer would refuse at its start is refused here too; a real
    nnU-Net checkpoint passes."""
    path = tmp_path / "ft.json"
    missing = tmp_path / "absent" / "checkpoint_final.pth"
    path.write_text(json.dumps({"finetune_from": str(missing)}))
    assert main(["check-config", str(path), "-tr", "nnUNetTrainerAdv"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and f"finetune_from: {missing} does not exist" in captured.err
    foreign = tmp_path / "weights.pth"
    torch.save({"state_dict": {}}, foreign)
    path.write_text(json.dumps({"finetune_from": str(foreign)}))
    assert main(["check-config", str(path), "-tr", "nnUNetTrainerAdv"]) == 2
    assert "is not an nnU-Net checkpoint" in capsys.readouterr().err
    real = tmp_path / "checkpoint_final.pth"
    torch.save({"network_weights": {"w": torch.zeros(1)}}, real)
    path.write_text(json.dumps({"finetune_from": str(real)}))
    assert main(["check-config", str(path), "-tr", "nnUNetTrainerAdv"]) == 0
    assert json.loads(capsys.readouterr().out)["finetune_from"] == str(real)


def test_check_config_refuses_an_unknown_trainer_and_a_missing_file(tmp_path, capsys, monkeypatch):
    path = tmp_path / "ima.json"
    path.write_text("{}")
    assert main(["check-config", str(path), "-tr", "nnUNetTrainer"]) == 2
    err = capsys.readouterr().err
    assert "not a trainer of nnunet-ima" in err and "nnUNetTrainerIMA_eps15" in err
    monkeypatch.delenv("NNUNET_IMA_CONFIG", raising=False)
    assert main(["check-config"]) == 2
    assert "give FILE, or set NNUNET_IMA_CONFIG" in capsys.readouterr().err


# ---------------------------------------------------------------------------- make-synthetic
SMALL = ["--cases", "2", "--shape", "4", "8", "8"]


def test_make_synthetic_refuses_a_taken_id_under_any_name_unless_overwrite(tmp_path, capsys):
    raw = tmp_path / "raw"
    assert main(["make-synthetic", "--raw", str(raw), "-d", "7", *SMALL]) == 0
    before = _listing(raw)
    for name in ("SyntheticOrgan", "Other"):
        assert main(["make-synthetic", "--raw", str(raw), "-d", "7", "--name", name, *SMALL]) == 2
        err = capsys.readouterr().err
        assert "dataset id 7 is taken by" in err and "Dataset007_SyntheticOrgan" in err
        assert "pass --overwrite" in err and "overwrite=True" not in err
    assert _listing(raw) == before
    # --overwrite replaces the other name: nnU-Net's -d 7 must find one dataset only.
    assert main(["make-synthetic", "--raw", str(raw), "-d", "7", "--name", "Other", *SMALL,
                 "--overwrite"]) == 0
    assert "replacing" in capsys.readouterr().err
    assert os.listdir(raw) == ["Dataset007_Other"]


def test_make_synthetic_rewrites_a_folder_left_by_an_interrupted_run(tmp_path):
    raw = tmp_path / "raw"
    (raw / "Dataset007_SyntheticOrgan" / "imagesTr").mkdir(parents=True)  # no dataset.json yet
    assert main(["make-synthetic", "--raw", str(raw), "-d", "7", *SMALL]) == 0
    assert (raw / "Dataset007_SyntheticOrgan" / "dataset.json").is_file()


@pytest.mark.parametrize("extra, message", [
    (["--shape", "0", "48", "48"], "--shape must be three sizes D H W of at least 4 8 8"),
    (["--shape", "16", "-1", "48"], "got 16 -1 48"),
    (["--name", "a/b"], "--name 'a/b' cannot be part of an nnU-Net dataset folder name"),
    (["--name", "a b"], "use letters, digits, '_' and '-' only"),
    (["--name", ""], "--name '' cannot be part"),
    (["-d", "0"], "-d/--dataset-id must be in [1, 999], got 0"),
    (["-d", "1000"], "must be in [1, 999]"),
    (["--cases", "1"], "--cases must be >= 2"),
    (["--test-cases", "-1"], "--test-cases must be >= 0"),
    (["--seed", "-3"], "--seed must be >= 0"),
])
def test_make_synthetic_refuses_bad_options_before_writing(tmp_path, capsys, extra, message):
    raw = tmp_path / "raw"
    raw.mkdir()
    assert main(["make-synthetic", "--raw", str(raw), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert os.listdir(raw) == []


def test_make_synthetic_refuses_a_raw_folder_that_is_a_file(tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "file"))
    assert main(["make-synthetic"]) == 2
    err = capsys.readouterr().err
    assert f"nnUNet_raw {tmp_path / 'file'} is a file, not a folder" in err
    assert main(["make-synthetic", "--raw", str(tmp_path / "file" / "raw")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert _listing(tmp_path) == ["file"]


# ----------------------------------------------------------------------- output folders, demo
@pytest.mark.parametrize("command", ["demo", "ablation"])
def test_workdir_that_is_a_file_is_refused_before_any_work(tmp_path, capsys, command):
    (tmp_path / "file").write_text("")
    argv = [command, "--workdir", str(tmp_path / "file")] + (["-d", "990"] if command == "ablation" else [])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"nnunet-ima {command}: error: --workdir" in err and "is a file, not a folder" in err
    assert _listing(tmp_path) == ["file"]


def test_check_output_folder(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    check_output_folder(str(tmp_path / "new" / "deeper"), "-o")  # creatable: fine
    check_output_folder(str(tmp_path), "-o")
    assert _listing(tmp_path) == ["file"]  # nothing created
    for path, message in ((tmp_path / "file", "-o {} is a file, not a folder"),
                          (tmp_path / "file" / "sub", "cannot be created: {} is a file")):
        with pytest.raises(UserInputError) as e:
            check_output_folder(str(path), "-o")
        shown = path if "is a file, not" in message else tmp_path / "file"
        assert message.format(shown) in str(e.value)
    # An unwritable folder (simulated: the tests may run as root, who can write anywhere).
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path) else
                        real_access(p, mode))
    with pytest.raises(UserInputError, match="no permission to write"):
        check_output_folder(str(tmp_path), "-o")
    with pytest.raises(UserInputError, match=f"no permission to write in {tmp_path}"):
        check_output_folder(str(tmp_path / "new"), "-o")


def test_a_failed_atomic_write_leaves_no_temporary_file(tmp_path):
    from nnunet_ima.io import save_torch, write_json
    (tmp_path / "table.md").mkdir()  # a folder where the file should go
    for write in (write_text, write_json):
        with pytest.raises(OSError):
            write(str(tmp_path / "table.md"), "x")
    with pytest.raises(OSError):
        save_torch({"a": 1}, str(tmp_path / "table.md"))
    assert _listing(tmp_path) == ["table.md"]


# ----------------------------------------------------------------------- Ctrl-C and errors
def test_ctrl_c_is_one_line_and_exit_code_130(capsys, monkeypatch):
    from nnunet_ima.commands import trainer_dir

    def interrupted(args):
        print("working")
        raise KeyboardInterrupt
    monkeypatch.setattr(trainer_dir, "run", interrupted)
    assert main(["trainer-dir"]) == 130
    captured = capsys.readouterr()
    assert captured.err == INTERRUPTED_MESSAGE + "\n"
    assert INTERRUPTED_MESSAGE == "interrupted; rerun the same command to resume"


def test_run_command_exit_codes(capsys):
    def bad():
        raise UserInputError("no such thing")
    assert run_command("prog sub", bad) == 2
    assert capsys.readouterr().err == "prog sub: error: no such thing\n"
    assert run_command("prog", lambda: None) == 0
    assert run_command("prog", lambda: 3) == 3
    with pytest.raises(RuntimeError):  # a bug stays a traceback
        run_command("prog", lambda: (_ for _ in ()).throw(RuntimeError("bug")))


# ------------------------------------------------------------------------------- help texts
def _parsers():
    from nnunet_ima.classification.cli import build_parser as classify_parser
    from nnunet_ima.evaluation.cli import build_parser as eval_parser
    todo = [cli.build_parser(), eval_parser(), classify_parser()]
    while todo:
        parser = todo.pop()
        yield parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                todo += list(action.choices.values())


def test_every_option_has_help_that_shows_its_default():
    missing = []
    for parser in _parsers():
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction,
                                   argparse._SubParsersAction)) or action.help == argparse.SUPPRESS:
                continue
            text = formatter._expand_help(action) if action.help else ""
            if not text or (has_default(action) and "default" not in text.lower()):
                missing.append(f"{parser.prog} {'/'.join(action.option_strings) or action.dest}")
            elif has_default(action) and "%(default)" in formatter._get_help_string(action):
                assert shown_default(action.default) in text
    assert not missing, missing


def test_defaults_are_shown_as_typed():
    parser = argparse.ArgumentParser()
    assert shown_default([0.0, 5.0, 15.0]) == "0 5 15" and shown_default(1e-3) == "0.001"
    assert shown_default(("ce", "margin")) == "ce margin" and shown_default(8) == "8"
    flag = parser.add_argument("--flag", action="store_true")
    assert not has_default(flag) and not has_default(parser.add_argument("--x"))
