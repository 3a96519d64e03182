"""``nnunet-ima-classify`` through ``main([...])``: options reach the run, bad input is a clear
error with a non-zero exit code and nothing written, the margins command."""
import io
import json

import pytest
import torch

from nnunet_ima.classification import cli
from nnunet_ima.classification.cli import main
from nnunet_ima.classification.training import Trainer

TINY = ["--dataset", "moons", "--max-train", "300", "--epochs", "2", "--batch-size", "100",
        "--no-progress", "--device", "cpu"]


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def test_main_leaves_the_thread_count_as_it_found_it():
    before = torch.get_num_threads()
    assert main(["train", *TINY, "--method", "ce", "--num-threads", str(before + 1), "-o", "ce"]) == 0
    assert torch.get_num_threads() == before


def test_options_reach_the_config_and_paper_defaults_fill_the_rest(tmp_path):
    assert main(["train", *TINY, "--method", "adv", "--eps", "0.2", "--norm", "linf",
                 "--pgd-steps", "3", "--seed", "5", "-o", "adv"]) == 0
    config = json.load(open(tmp_path / "adv" / "config.json"))
    assert (config["method"], config["eps"], config["norm"], config["pgd_steps"], config["seed"]) == \
        ("adv", 0.2, "linf", 3, 5)
    assert config["eps_max"] is None and config["lr"] == 1e-3 and config["pgd_alpha"] == 4.0
    assert main(["train", "--dataset", "moons", "--max-train", "200", "--epochs", "1",
                 "--pgd-steps", "2", "--binary-steps", "2", "--no-progress", "--device", "cpu",
                 "-o", "ima", "--save-every", "1"]) == 0
    config = json.load(open(tmp_path / "ima" / "config.json"))
    # The paper's Moons settings: eps_max 0.3, batch 128; IMA is the default method.
    assert (config["method"], config["eps_max"], config["batch_size"], config["margin_update"],
            config["on_clean_wrong"], config["clip_min"]) == ("ima", 0.3, 128, "average", "shrink", "zero")
    assert (tmp_path / "ima" / "checkpoint_epoch_1.pt").is_file()


def test_finished_run_is_resumed_not_retrained_and_other_settings_are_refused(tmp_path, capsys):
    assert main(["train", *TINY, "--method", "ce", "-o", "run"]) == 0
    before = (tmp_path / "run" / "model_final.pt").read_bytes()
    assert main(["train", *TINY, "--method", "ce", "-o", "run"]) == 0
    assert "resuming" in capsys.readouterr().out
    a = torch.load(tmp_path / "run" / "model_final.pt", weights_only=False)["model"]
    b = torch.load(io.BytesIO(before), weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert main(["train", *TINY, "--method", "ce", "--lr", "0.01", "-o", "run"]) == 2
    assert "other settings (lr: 0.001 != 0.01" in capsys.readouterr().err
    assert main(["train", *TINY, "--method", "ce", "-o", "run", "--no-resume"]) == 2
    assert "already holds a run" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["train", *TINY, "--method", "adv", "--eps", "0", "-o", "X"], "--eps must be a number > 0"),
    (["train", *TINY, "--method", "adv", "--eps", "-0.1", "-o", "X"], "--eps must be a number > 0"),
    (["train", *TINY, "--method", "adv", "-o", "X"], "--method adv needs --eps"),
    (["train", *TINY, "--method", "ima", "--eps-max", "-1", "-o", "X"], "eps_max must be"),
    (["train", *TINY, "--method", "ima", "--delta", "0.5", "-o", "X"], "delta (0.5) must not exceed"),
    (["train", *TINY, "--method", "ima", "--beta", "1.5", "-o", "X"], "beta must be in [0, 1]"),
    (["train", *TINY, "--epochs", "0", "-o", "X"], "--epochs must be an integer >= 1"),
    (["train", *TINY, "--lr", "0", "-o", "X"], "--lr must be a number > 0"),
    (["train", *TINY, "--moons-noise", "-1", "-o", "X"], "--moons-noise must be >= 0"),
    (["train", *TINY, "--resume", "-o", "X"], "nothing to resume"),
    (["train", "--dataset", "svhn", "-o", "X"], "needs --data-root"),
    (["train", "--dataset", "cifar10", "--data-root", "/nonexistent", "-o", "X"], "is not a folder"),
    (["train", "--dataset", "covid-ct", "--data-root", ".", "-o", "X"], "expected --data-root with the folders COVID/ and non-COVID/"),
    (["train", "--dataset", "fashion-mnist", "--data-root", ".", "-o", "X"], "train-images-idx3-ubyte"),
    (["train", *TINY, "--device", "cuda:7" if torch.cuda.is_available() else "cuda", "-o", "X"], "cuda"),
    (["eval", "/nonexistent/run"], "model_final.pt does not exist"),
    (["eval", ".", "--noise", "-1"], "--noise levels must be >= 0"),
    (["margins", "/nonexistent/run"], "margins.json does not exist"),
])
def test_bad_input_is_a_clear_error(argv, message, capsys, tmp_path):
    if "cuda" in message and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "nnunet-ima-classify" in err and message in err
    assert not (tmp_path / "X").exists()


def test_fashion_mnist_without_data_root_names_the_package(monkeypatch, capsys):
    monkeypatch.setattr(cli, "FASHION_MNIST_DEFAULT_ROOT", "/nonexistent/fashion-mnist")
    assert main(["train", "--dataset", "fashion-mnist", "-o", "X"]) == 2
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["train", "--dataset", "mnist", "-o", "X"],            # unknown dataset
    ["train", "--dataset", "moons", "--method", "pgd-at", "-o", "X"],
    ["train", "--dataset", "moons", "--eps", "abc", "-o", "X"],
    ["eval", "run", "--norm", "l1"],
])
def test_the_parser_rejects_unknown_choices(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "invalid" in capsys.readouterr().err


def test_eval_checks_every_folder_before_attacking(tmp_path, capsys):
    assert main(["train", *TINY, "--method", "ce", "-o", "ce"]) == 0
    assert main(["eval", "ce", "missing", "--noise", "0", "0.1", "--steps", "2", "--no-progress"]) == 2
    assert "missing/model_final.pt does not exist" in capsys.readouterr().err
    assert not (tmp_path / "ce" / "eval_l2.json").exists()
    eval_args = ["eval", "ce", "--norm", "linf", "--noise", "0", "0.1", "--steps", "2",
                 "--max-samples", "50", "--no-progress"]
    # -o is a folder, as everywhere else; its old meaning (the table's file) is refused, and
    # so is a file where the folder should be, both before any attack.
    assert main([*eval_args, "-o", "table.md"]) == 2
    assert "-o of eval is now a folder, and the table is written into it as table_<norm>.md" in \
        capsys.readouterr().err
    (tmp_path / "afile").write_text("")
    assert main([*eval_args, "-o", "afile"]) == 2
    assert "-o/--output afile is a file, not a folder" in capsys.readouterr().err
    assert not (tmp_path / "ce" / "eval_linf.json").exists()
    assert main([*eval_args, "-o", "tables"]) == 0
    report = json.load(open(tmp_path / "ce" / "eval_linf.json"))
    assert set(report) >= {"noise", "auc", "attacks", "n"} and report["n"] == 50
    assert list(report["noise"]) == ["0", "0.1"]
    table = (tmp_path / "tables" / "table_linf.md").read_text()
    assert "| ce | 50 |" in table and "LINF 0.1" in table
    assert sorted(p.name for p in tmp_path.rglob("*.tmp")) == []


def test_train_refuses_an_output_that_is_a_file_before_any_work(tmp_path, capsys):
    (tmp_path / "X").write_text("")
    assert main(["train", *TINY, "--method", "ce", "-o", "X"]) == 2
    assert "-o/--output X is a file, not a folder" in capsys.readouterr().err
    assert main(["train", *TINY, "--method", "ce", "-o", "X/run"]) == 2
    assert "cannot be created" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["X"]


def test_ctrl_c_in_training_is_one_line_and_exit_code_130(monkeypatch, capsys):
    def interrupted(self, resume=None):
        raise KeyboardInterrupt
    monkeypatch.setattr(Trainer, "run", interrupted)
    before = torch.get_num_threads()
    assert main(["train", *TINY, "--method", "ce", "-o", "run"]) == 130
    assert capsys.readouterr().err == "interrupted; rerun the same command to resume\n"
    assert torch.get_num_threads() == before


def test_margins_command(tmp_path, capsys):
    assert main(["train", *TINY, "--method", "ima", "--pgd-steps", "3", "--binary-steps", "3",
                 "-o", "ima"]) == 0
    capsys.readouterr()
    assert main(["margins", "ima", "--quantile", "0.25"]) == 0
    out = capsys.readouterr().out
    assert "300 training samples, eps_max 0.3" in out and "histogram:" in out
    assert "suggested eps for vanilla adversarial training" in out and "25 % quantile" in out
    assert main(["margins", "ima", "--quantile", "1"]) == 2
    assert main(["train", *TINY, "--method", "ce", "-o", "ce"]) == 0
    assert main(["margins", "ce"]) == 2
    assert "written by IMA runs" in capsys.readouterr().err
