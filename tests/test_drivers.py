"""The drivers (``nnunet-ima`` itself, ``demo``, ``ablation``, ``make-synthetic``) check every
input, the memory and disk included, before any work: a bad one is one message and exit code 2,
nothing is planned, trained or written. No nnU-Net run here: the steps that would start work are
replaced by functions that fail the test if they are called.
"""
import json
import math
import os
import subprocess
import sys

import pytest

from nnunet_ima import resources
from nnunet_ima.cli import SUBCOMMANDS, main
from nnunet_ima.commands import demo
from nnunet_ima.nnunet import ablation, footprint, synthetic
from nnunet_ima.nnunet.paths import trainer_dir

DATASET = "Dataset990_SyntheticOrgan"


def _listing(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, dirs, files in os.walk(root)
                  for f in dirs + files)


def _refused(capsys, prog, *fragments):
    """The command wrote one error line, starting with ``PROG: error:``, holding each fragment."""
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def _never(name):
    def called(*args, **kwargs):
        raise AssertionError(f"{name} was called")
    return called


# ----------------------------------------------------------------------------- nnunet-ima
def test_an_unknown_option_is_named_and_the_commands_listed(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--bogus"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "nnunet-ima: error: unknown option --bogus" in err
    assert "COMMAND required" not in err and "required: COMMAND" not in err
    assert all(f"\n  {name} " in err for name in SUBCOMMANDS)


def test_no_command_shows_the_list_of_commands(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err
    assert "choose a COMMAND" in err and all(f"\n  {name} " in err for name in SUBCOMMANDS)


def test_an_unknown_option_of_a_command_shows_that_commands_usage(capsys):
    with pytest.raises(SystemExit) as e:
        main(["demo", "--max-slicez", "3", "--bogus"])  # a typo of --max-slices
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "usage: nnunet-ima demo" in err
    assert "nnunet-ima demo: error: unknown options --max-slicez --bogus" in err
    assert "commands:" not in err  # the command was right


def test_only_the_chosen_command_is_imported():
    """trainer-dir answers without importing torch (demo and ablation import it)."""
    code = ("import sys; from nnunet_ima.cli import main; main(['trainer-dir']); "
            "print('torch' in sys.modules, 'nnunet_ima.nnunet.ablation' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.splitlines() == [trainer_dir(), "False False"]


# ---------------------------------------------------------------------------------- demo
@pytest.fixture
def no_demo_work(monkeypatch):
    """The demo's first step (its Experiment, which creates the nnU-Net folders) fails the
    test."""
    monkeypatch.setattr(demo, "Experiment", _never("the demo's Experiment"))


class _Started(Exception):
    """Raised by a stand-in for the demo's first step: every check passed."""


def _start_stops(monkeypatch):
    def started(*args, **kwargs):
        raise _Started
    monkeypatch.setattr(demo, "Experiment", started)


@pytest.mark.parametrize("extra, message", [
    (["--max-slices", "0"], "--max-slices must be >= 1, got 0"),
    (["--max-slices", "-3"], "--max-slices must be >= 1, got -3"),
    (["--epochs", "0"], "--epochs must be >= 1, got 0"),
    (["--iterations", "-1"], "--iterations must be >= 1, got -1"),
    (["--cases", "3"], "--cases must be >= 4 (2 test cases, and a training and a validation"),
    (["--eval-steps", "0"], "--eval-steps must be >= 1, got 0"),
    (["--noise", "0", "nan"], "--noise levels must be finite and >= 0, got 0 nan"),
    (["--noise", "inf"], "--noise levels must be finite and >= 0, got inf"),
    (["--noise", "0", "-4"], "--noise levels must be finite and >= 0, got 0 -4"),
    (["--noise", "0", "4", "4"], "--noise names a level more than once: 0 4 4"),
])
def test_demo_refuses_impossible_values_before_any_step(tmp_path, capsys, no_demo_work, extra,
                                                        message):
    workdir = tmp_path / "demo"
    assert main(["demo", "--workdir", str(workdir), *extra]) == 2
    _refused(capsys, "nnunet-ima demo", message)
    assert not workdir.exists()


def test_demo_fresh_never_deletes_a_folder_it_did_not_write(tmp_path, capsys, no_demo_work):
    (tmp_path / "thesis.tex").write_text("years of work")
    assert main(["demo", "--workdir", str(tmp_path), "--fresh"]) == 2
    _refused(capsys, "nnunet-ima demo", f"--fresh deletes --workdir {tmp_path}",
             "thesis.tex", "which the demo did not write")
    assert (tmp_path / "thesis.tex").read_text() == "years of work"


def test_demo_refuses_a_workdir_made_with_other_options(tmp_path, capsys, monkeypatch):
    workdir = tmp_path / "demo"
    _start_stops(monkeypatch)
    with pytest.raises(_Started):
        main(["demo", "--workdir", str(workdir), "--epochs", "2"])
    recorded = json.loads((workdir / demo.OPTIONS_FILENAME).read_text())
    assert recorded["epochs"] == 2 and recorded["noise"] == [0.0, 4.0, 8.0, 16.0]
    with pytest.raises(_Started):  # the same options resume
        main(["demo", "--workdir", str(workdir), "--epochs", "2", "--verbose"])
    before = _listing(workdir)
    monkeypatch.setattr(demo, "Experiment", _never("the demo's Experiment"))
    assert main(["demo", "--workdir", str(workdir), "--epochs", "3", "--max-slices", "5"]) == 2
    _refused(capsys, "nnunet-ima demo", "holds a demo made with other options",
             "differing: --epochs, --max-slices", "pass --fresh")
    assert _listing(workdir) == before
    # --fresh starts over: the demo's own folder is deleted, the new options recorded.
    (workdir / "logs").mkdir()
    _start_stops(monkeypatch)
    with pytest.raises(_Started):
        main(["demo", "--workdir", str(workdir), "--epochs", "3", "--fresh"])
    assert _listing(workdir) == [demo.OPTIONS_FILENAME]
    assert json.loads((workdir / demo.OPTIONS_FILENAME).read_text())["epochs"] == 3


def test_demo_refuses_too_little_disk_or_memory_with_the_numbers(tmp_path, capsys, monkeypatch,
                                                                 no_demo_work):
    workdir = tmp_path / "demo"
    monkeypatch.setattr(resources, "free_disk", lambda path: 50 * 1024 ** 2)
    assert main(["demo", "--workdir", str(workdir)]) == 2
    line = _refused(capsys, "nnunet-ima demo", "the demo (10 cases, 3 models to train) needs "
                    "about", "of disk", "but 50.0 MB is free")
    # Three models of three 16.5 MB checkpoints each, and more: well over 100 MB.
    assert float(line.split("needs about ")[1].split(" MB")[0]) > 150
    monkeypatch.undo()
    monkeypatch.setattr(demo, "Experiment", _never("the demo's Experiment"))
    monkeypatch.setattr(resources, "available_memory", lambda: 300 * 1024 ** 2)
    assert main(["demo", "--workdir", str(workdir)]) == 2
    _refused(capsys, "nnunet-ima demo", "one nnUNetv2_train of the demo needs about 1.5 GB of "
             "memory, but 300.0 MB is available")
    assert not workdir.exists()


def test_demo_trainings_find_the_trainers_without_the_users_export(tmp_path, monkeypatch):
    """The demo's Experiment sets nnUNet_extTrainer for every command it runs."""
    from nnunet_ima.nnunet.experiment import Experiment
    monkeypatch.delenv("nnUNet_extTrainer", raising=False)
    assert Experiment(str(tmp_path)).env["nnUNet_extTrainer"] == trainer_dir()


def test_an_experiment_evaluates_its_own_models_and_leaves_the_environment(tmp_path,
                                                                          monkeypatch, capsys):
    """The library call with the workdir's nnU-Net folders in the options, its tables shown."""
    from nnunet_ima.errors import UserInputError
    from nnunet_ima.evaluation import run
    from nnunet_ima.evaluation.options import EvalOptions
    from nnunet_ima.nnunet.experiment import Experiment
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "users_own"))
    environment = dict(os.environ)
    experiment = Experiment(str(tmp_path / "work"))
    seen = []

    def evaluate(options):
        seen.append(options)
        os.makedirs(options.output)
        for metric in ("tvdi", "adi"):
            with open(os.path.join(options.output, f"{metric}.md"), "w") as f:
                f.write(f"| {metric} table |\n")
        return {"models": {}}
    monkeypatch.setattr(run, "evaluate", evaluate)
    folders = experiment.model_folders("Dataset990_SyntheticOrgan")
    out = str(tmp_path / "robustness")
    assert experiment.evaluate(EvalOptions(output=out, model_folders=folders,
                                           device="cpu")) == {"models": {}}
    (options,) = seen
    assert options.model_folders == folders and options.output == out
    assert options.nnunet_preprocessed == experiment.folders["nnUNet_preprocessed"]
    assert [os.path.basename(f) for f in folders] == \
        [f"{t}__nnUNetPlans__2d" for t in ("nnUNetTrainerClean", "nnUNetTrainerAdv",
                                            "nnUNetTrainerIMA")]
    assert dict(os.environ) == environment
    printed = capsys.readouterr().out
    assert "| tvdi table |" in printed and "| adi table |" in printed
    with pytest.raises(UserInputError, match="by its full name"):
        experiment.evaluate(EvalOptions(output=out, dataset="990", device="cpu"))
    assert len(seen) == 1


# ------------------------------------------------------------------------------- ablation
@pytest.fixture
def no_training(monkeypatch):
    """Training and evaluating fail the test."""
    monkeypatch.setattr(ablation, "train_all", _never("train_all"))
    monkeypatch.setattr(ablation, "evaluate_all", _never("evaluate_all"))
    monkeypatch.setattr(ablation, "run_side_by_side", _never("run_side_by_side"))


@pytest.fixture
def preprocessed(tmp_path, monkeypatch):
    """A preprocessed dataset folder as the ablation checks it (plans, 2d data, split: 4 folds,
    2 test cases); the network's size is the demo's."""
    root = tmp_path / "nnUNet_preprocessed"
    folder = root / DATASET
    (folder / "nnUNetPlans_2d").mkdir(parents=True)
    (folder / "nnUNetPlans.json").write_text("{}")
    cases = [f"case_{i}" for i in range(6)]
    folds = [{"train": [c for c in cases[2:] if c != v], "val": [v]} for v in cases[2:]]
    (folder / "splits_final.json").write_text(json.dumps(folds))
    (folder / "test_cases.json").write_text(json.dumps({"test": cases[:2], "seed": 0,
                                                        "num_folds": 4}))
    for variable in ("nnUNet_raw", "nnUNet_results", "nnUNet_extTrainer", "NNUNET_IMA_CONFIG"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("nnUNet_preprocessed", str(root))
    monkeypatch.setattr(footprint, "network_parameters", lambda *a, **k: demo.DEMO_PARAMETERS)
    return folder


def _ablation(tmp_path, *extra):
    return ["ablation", "-d", "990", "--workdir", str(tmp_path / "abl"), *extra]


ABLATION_VALUES = [
    (["--cases", "bogus"], "--cases: unknown 'bogus'; choose from test, val"),
    (["--cases", "test", "test"], "--cases names test more than once"),
    (["--attacks", "fgsm"], "--attacks: unknown 'fgsm'; choose from pgd, segpgd, apgd"),
    (["--variants", "clean", "bogus"], "unknown variant 'bogus'"),
    (["--noise", "0", "nan"], "--noise levels must be finite and >= 0, got 0 nan"),
    (["--noise", "4", "8"], "--noise must hold 0 (the table's clean column)"),
    (["--noise", "0"], "--noise must hold 0 (the table's clean column) and a level > 0"),
    (["--noise", "0", "-4"], "--noise levels must be finite and >= 0, got 0 -4"),
    (["--noise", "0", "4", "4"], "--noise names 4 more than once"),
    (["--adv-eps", "4", "0"], "--adv-eps must be > 0 and finite, got 0"),
    (["--adv-eps", "nan"], "--adv-eps must be > 0 and finite, got nan"),
    (["--eps-max", "inf"], "--eps-max must be > 0 and finite, got inf"),
    (["--initial-lr", "-0.01"], "--initial-lr must be > 0 and finite, got -0.01"),
    (["--epochs", "0"], "--epochs must be a whole number >= 1, got 0"),
    (["--iterations", "-2"], "--iterations must be a whole number >= 1, got -2"),
    (["--val-iterations", "0"], "--val-iterations must be a whole number >= 1, got 0"),
    (["--pgd-steps", "0"], "--pgd-steps must be a whole number >= 1, got 0"),
    (["--binary-steps", "0"], "--binary-steps must be a whole number >= 1, got 0"),
    (["--eval-steps", "0"], "--eval-steps must be a whole number >= 1, got 0"),
    (["--jobs", "0"], "--jobs must be a whole number >= 1, got 0"),
    (["--seed", "-1"], "--seed must be a whole number >= 0, got -1"),
    (["-f", "-1"], "--fold must be a whole number >= 0, got -1"),
    (["--max-slices", "0"], "--max-slices must be >= 1, got 0"),
    (["--device", "cuda:1"], "nnUNetv2_train takes cpu, cuda, mps; choose the GPU with "
                             "CUDA_VISIBLE_DEVICES=1 and --device cuda"),
    (["--device", "tpu"], "--device 'tpu': nnUNetv2_train takes cpu, cuda, mps"),
]


@pytest.mark.parametrize("extra, message", ABLATION_VALUES)
def test_ablation_refuses_every_bad_option_before_training(tmp_path, capsys, no_training,
                                                           preprocessed, extra, message):
    assert main(_ablation(tmp_path, *extra)) == 2
    _refused(capsys, "nnunet-ima ablation", message)
    assert not (tmp_path / "abl").exists()


def test_ablation_refuses_cuda_on_a_machine_without_one(tmp_path, capsys, no_training,
                                                        preprocessed):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    assert main(_ablation(tmp_path, "--device", "cuda")) == 2
    _refused(capsys, "nnunet-ima ablation", "no CUDA device is available; use --device cpu")


@pytest.mark.parametrize("change, message", [
    ("unset", "the environment variable nnUNet_preprocessed is not set"),
    ("other id", "no dataset with id 991"),
    ("no plans", "has no 2d plans and data"),
    ("no splits", "splits_final.json does not exist: split the dataset first"),
    ("fold 7", "--fold 7: fold 7 is not in"),
    ("bad splits", "splits_final.json should hold a list of folds"),
    ("no test cases", "--cases test:"),
    ("other options", "holds an ablation made with other options (differing: ['epochs'])"),
    ("bad record", "cannot read"),
])
def test_ablation_refuses_a_dataset_or_workdir_it_cannot_use_before_training(
        tmp_path, capsys, monkeypatch, no_training, preprocessed, change, message):
    argv = _ablation(tmp_path)
    workdir = tmp_path / "abl"
    if change == "unset":
        monkeypatch.delenv("nnUNet_preprocessed")
    elif change == "other id":
        argv[2] = "991"
    elif change == "no plans":
        (preprocessed / "nnUNetPlans.json").unlink()
    elif change == "no splits":
        (preprocessed / "splits_final.json").unlink()
    elif change == "fold 7":
        argv += ["-f", "7"]
    elif change == "bad splits":
        (preprocessed / "splits_final.json").write_text('{"train": []}')
    elif change == "no test cases":
        (preprocessed / "test_cases.json").unlink()
    elif change == "other options":
        workdir.mkdir()
        ablation.record_options(ablation.AblationOptions(dataset="990", workdir=str(workdir),
                                                         epochs=3))
    elif change == "bad record":
        workdir.mkdir()
        (workdir / ablation.OPTIONS_FILENAME).write_text("{truncated")
    before = _listing(tmp_path)
    assert main(argv) == 2
    _refused(capsys, "nnunet-ima ablation", message)
    assert _listing(tmp_path) == before


def test_ablation_refuses_too_little_disk_or_memory_with_the_numbers(tmp_path, capsys,
                                                                     monkeypatch, no_training,
                                                                     preprocessed):
    monkeypatch.setattr(resources, "free_disk", lambda path: 100 * 1024 ** 2)
    assert main(_ablation(tmp_path)) == 2
    line = _refused(capsys, "nnunet-ima ablation", "training 12 models (1.9 M parameters each) "
                    "and 24 evaluations needs about", "but 100.0 MB is free")
    expected = 12 * footprint.model_disk_bytes(demo.DEMO_PARAMETERS) + 24 * 10 * 1024 ** 2
    assert f"needs about {resources.human_bytes(expected)} of disk" in line
    monkeypatch.setattr(resources, "free_disk", lambda path: 10 * 1024 ** 4)
    monkeypatch.setattr(resources, "available_memory", lambda: 4 * 1024 ** 3)
    assert main(_ablation(tmp_path, "--jobs", "4")) == 2
    _refused(capsys, "nnunet-ima ablation", "--jobs 4: 4 trainings side by side needs about "
             "6.0 GB of memory, but 4.0 GB is available; pass a smaller --jobs")
    assert not (tmp_path / "abl").exists()


def test_ablation_trainings_find_the_trainers_without_the_users_export(tmp_path, monkeypatch,
                                                                       preprocessed):
    """Every nnUNetv2_train the ablation starts has nnUNet_extTrainer set, and no
    NNUNET_IMA_CONFIG but its own."""
    started = []
    monkeypatch.setenv("NNUNET_IMA_CONFIG", str(tmp_path / "someone_elses.json"))
    monkeypatch.setattr(ablation, "run_side_by_side",
                        lambda commands, logs, env, jobs: started.append((commands, env)))
    text = ablation.run_ablation(ablation.AblationOptions(
        dataset="990", workdir=str(tmp_path / "abl"), variants=["clean", "ima_authors"]),
        stop_after="train")
    assert text == ""
    ((commands, env),) = started
    assert env["nnUNet_extTrainer"] == trainer_dir()
    assert [c.args[5] for c in commands] == ["nnUNetTrainerClean", "nnUNetTrainerIMA"]
    for command in commands:
        config = dict(env, **command.env)["NNUNET_IMA_CONFIG"]
        assert config.startswith(str(tmp_path / "abl" / "configs"))


# -------------------------------------------------------------------------- make-synthetic
SMALL = ["--cases", "2", "--shape", "4", "8", "8"]


def test_make_synthetic_refuses_a_shape_that_cannot_fit_in_memory(tmp_path, capsys):
    raw = tmp_path / "raw"
    assert main(["make-synthetic", "--raw", str(raw), "--shape", "100000", "100000",
                 "100000"]) == 2
    line = _refused(capsys, "nnunet-ima make-synthetic", "generating one case of --shape 100000 "
                    "100000 100000 needs about", "of memory, but", "choose a smaller --shape")
    needed = 1e15 * synthetic.GENERATE_BYTES_PER_VOXEL
    assert resources.human_bytes(needed) in line  # 63.9 PB
    assert not raw.exists()


def test_make_synthetic_refuses_too_little_disk(tmp_path, capsys, monkeypatch):
    raw = tmp_path / "raw"
    raw.mkdir()
    monkeypatch.setattr(resources, "free_disk", lambda path: 1024 ** 2)
    assert main(["make-synthetic", "--raw", str(raw), "--cases", "100", "--test-cases", "20"]) == 2
    _refused(capsys, "nnunet-ima make-synthetic", "120 cases of --shape 16 48 48 needs about "
             "21.1 MB of disk", "but 1.0 MB is free", "or another --raw")
    assert _listing(raw) == []


def test_make_synthetic_refuses_a_name_too_long_for_a_file(tmp_path, capsys):
    assert main(["make-synthetic", "--raw", str(tmp_path), "--name", "a" * 250]) == 2
    _refused(capsys, "nnunet-ima make-synthetic", "--name is too long", "over the 255")
    assert _listing(tmp_path) == []


def test_make_synthetic_without_a_raw_folder_names_the_variable(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("nnUNet_raw", raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(["make-synthetic"]) == 2
    _refused(capsys, "nnunet-ima make-synthetic", "set nnUNet_raw", "or pass --raw")
    assert _listing(tmp_path) == []


def _fail_on_write(monkeypatch, error, after=2):
    """``synthetic._write`` raises ``error`` on its call number ``after + 1``."""
    real = synthetic._write
    calls = []

    def write(*args):
        calls.append(args)
        if len(calls) > after:
            raise error
        real(*args)
    monkeypatch.setattr(synthetic, "_write", write)


@pytest.mark.parametrize("error, code, message", [
    (OSError(28, "No space left on device"), 2, "failed ([Errno 28] No space left on device); "
                                                "nothing was written"),
    (MemoryError(), 2, "failed (out of memory); nothing was written"),
    (KeyboardInterrupt(), 130, None),
])
def test_a_failed_write_leaves_no_dataset_folder(tmp_path, capsys, monkeypatch, error, code,
                                                 message):
    raw = tmp_path / "new" / "raw"  # made by the command, and removed with the partial dataset
    _fail_on_write(monkeypatch, error)
    assert main(["make-synthetic", "--raw", str(raw), *SMALL]) == code
    if message:
        _refused(capsys, "nnunet-ima make-synthetic", "writing Dataset990_SyntheticOrgan into",
                 message)
    assert _listing(tmp_path) == []


def test_overwrite_keeps_the_old_dataset_until_the_new_one_is_complete(tmp_path, capsys,
                                                                      monkeypatch):
    raw = tmp_path / "raw"
    assert main(["make-synthetic", "--raw", str(raw), "-d", "7", *SMALL]) == 0
    before = {p: (raw / p).read_bytes() for p in _listing(raw) if (raw / p).is_file()}
    capsys.readouterr()
    _fail_on_write(monkeypatch, OSError(28, "No space left on device"), after=1)
    assert main(["make-synthetic", "--raw", str(raw), "-d", "7", "--name", "Other", *SMALL,
                 "--seed", "1", "--overwrite"]) == 2
    assert {p: (raw / p).read_bytes() for p in _listing(raw) if (raw / p).is_file()} == before
    monkeypatch.undo()  # now it works: the old dataset is replaced, no partial folder is left
    assert main(["make-synthetic", "--raw", str(raw), "-d", "7", "--name", "Other", *SMALL,
                 "--overwrite"]) == 0
    assert os.listdir(raw) == ["Dataset007_Other"]


# -------------------------------------------------------------------------------- helpers
def test_human_bytes():
    assert resources.human_bytes(512) == "512 bytes"
    assert resources.human_bytes(1536) == "1.5 KB"
    assert resources.human_bytes(1.5 * 1024 ** 3) == "1.5 GB"
    assert resources.human_bytes(7.2e16) == "63.9 PB"
    assert resources.human_bytes(math.ldexp(1, 70)) == "1.02e+03 EB"


def test_checkpoint_estimate_matches_a_measured_checkpoint():
    """The demo's network: a checkpoint of 15,502,679 bytes was measured; the estimate errs on
    the safe side by at most its overhead."""
    estimate = footprint.checkpoint_bytes(demo.DEMO_PARAMETERS)
    assert 15_502_679 <= estimate <= 15_502_679 + footprint.CHECKPOINT_OVERHEAD_BYTES


@pytest.mark.slow
def test_the_demo_network_has_the_counted_parameters(nnunet_workspace):
    """The constant the demo's disk estimate uses is the network nnU-Net plans for its data."""
    folder = os.path.join(nnunet_workspace.preprocessed, nnunet_workspace.dataset_name)
    assert footprint.network_parameters(folder) == demo.DEMO_PARAMETERS
