"""``nnunet-ima-classify compare``: one run folder per method, one table and one plot per norm,
numbers equal to each model's own evaluation, and a rerun that trains and attacks nothing."""
import json
import os

import pytest
import torch

from nnunet_ima.classification.cli import main
from nnunet_ima.classification.runs import load_run
from nnunet_ima.classification.datasets import load_dataset
from nnunet_ima.classification.models import build_model

METHODS = ["ce", "adv", "ima", "trades"]
TRAIN = ["--dataset", "moons", "--max-train", "300", "--epochs", "2",
         "--pgd-steps", "3", "--binary-steps", "3", "--no-progress", "--device", "cpu"]
EVAL = ["--eval-norms", "l2", "linf", "--noise", "0", "0.3", "--steps", "5",
        "--max-samples", "150"]


def _compare(out, *extra):
    return main(["compare", *TRAIN, "--methods", *METHODS, *EVAL, "-o", str(out), *extra])


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    assert _compare(out) == 0
    return out


def _table_rows(path):
    """``{run: [cell, ...]}`` of a markdown table written by compare."""
    rows = {}
    for line in open(path).read().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and cells[0] not in ("run",):
            rows[cells[0]] = cells[1:]
    return rows


def test_one_folder_per_method_and_adv_at_the_datasets_eps_max(comparison):
    assert sorted(os.listdir(comparison)) == sorted(
        ["ce", "adv0.3", "ima", "trades", "table_l2.md", "table_linf.md", "curves_l2.png",
         "curves_linf.png"])
    config, _ = load_run(str(comparison / "adv0.3"), torch.device("cpu"))
    assert (config.method, config.eps, config.epochs) == ("adv", 0.3, 2)
    assert load_run(str(comparison / "trades"), torch.device("cpu"))[0].eps == 0.3


def test_tables_hold_each_models_evaluation(comparison):
    for norm in ("l2", "linf"):
        rows = _table_rows(comparison / f"table_{norm}.md")
        assert list(rows) == ["ce", "adv0.3", "ima", "trades"]  # the order of --methods
        for name, cells in rows.items():
            with open(comparison / name / f"eval_{norm}.json") as f:
                report = json.load(f)
            assert report["norm"] == norm and report["n"] == 150
            assert cells == ["150", f"{100 * report['noise']['0']:.2f}",
                             f"{100 * report['noise']['0.3']:.2f}", f"{100 * report['auc']:.2f}"]
            assert report["noise"]["0.3"] <= report["noise"]["0"]


def test_noise_zero_is_the_clean_accuracy_of_the_final_model(comparison):
    data = load_dataset("moons", None, 0, None)
    for name in ("ce", "ima"):
        config, weights = load_run(str(comparison / name), torch.device("cpu"))
        model = build_model(config.model, data.num_classes, data.input_shape)
        model.load_state_dict(weights)
        with torch.no_grad():
            correct = (model.eval()(data.x_test[:150]).argmax(1) == data.y_test[:150]).float().mean()
        with open(comparison / name / "eval_l2.json") as f:
            assert json.load(f)["noise"]["0"] == pytest.approx(correct.item())


def test_a_rerun_trains_and_attacks_nothing(comparison, capsys):
    def stamps():
        return {p: os.path.getmtime(os.path.join(d, p)) for d, _, files in os.walk(comparison)
                for p in files if p.endswith((".pt", ".json"))}
    before = stamps()
    tables = (comparison / "table_l2.md").read_text()
    assert _compare(comparison) == 0
    assert stamps() == before
    assert (comparison / "table_l2.md").read_text() == tables
    assert capsys.readouterr().out.count("is trained, kept") == len(METHODS)


def test_another_evaluation_batch_size_reevaluates_without_training(comparison, capsys):
    """Each batch draws its own seeded starts, so reports of another batch size are stale."""
    finals = {m: os.path.getmtime(comparison / m / "model_final.pt") for m in ("ce", "adv0.3")}
    assert _compare(comparison, "--batch-size", "64") == 0  # the evaluation's, as in eval
    for name in ("ce", "adv0.3", "ima", "trades"):
        with open(comparison / name / "eval_l2.json") as f:
            assert json.load(f)["batch_size"] == 64
    assert {m: os.path.getmtime(comparison / m / "model_final.pt") for m in finals} == finals
    assert capsys.readouterr().out.count("is trained, kept") == len(METHODS)


def test_other_settings_in_the_same_folder_are_refused(comparison, capsys):
    assert main(["compare", *TRAIN[:5], "3", *TRAIN[6:], "--methods", "ce", *EVAL,
                 "-o", str(comparison)]) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "epochs" in err


def test_batch_size_is_the_evaluations_and_train_batch_size_the_trainings():
    from nnunet_ima.classification.cli import build_parser
    args = build_parser().parse_args(["compare", "--dataset", "moons", "--batch-size", "64",
                                      "--train-batch-size", "32", "-o", "x"])
    assert (args.eval_batch_size, args.batch_size) == (64, 32)
    args = build_parser().parse_args(["compare", "--dataset", "moons", "-o", "x"])
    assert (args.eval_batch_size, args.batch_size) == (500, None)  # None: the paper's
    # The old name still works, without being advertised.
    args = build_parser().parse_args(["compare", "--dataset", "moons", "--eval-batch-size", "7",
                                      "-o", "x"])
    assert args.eval_batch_size == 7
    assert "--eval-batch-size" not in build_parser()._subparsers._group_actions[0].choices[
        "compare"].format_help()


@pytest.mark.parametrize("extra, message", [
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--eval-batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--train-batch-size", "0"], "--train-batch-size must be >= 1, got 0"),
    (["--noise", "-1"], "--noise levels must be >= 0"),
    (["--eps", "0"], "eps"),
])
def test_bad_options_stop_before_training(tmp_path, capsys, extra, message):
    assert _compare(tmp_path / "c", *extra) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_an_output_that_is_a_file_stops_before_training(tmp_path, capsys):
    (tmp_path / "c").write_text("")
    assert _compare(tmp_path / "c") == 2
    assert f"-o/--output {tmp_path / 'c'} is a file, not a folder" in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["c"]
