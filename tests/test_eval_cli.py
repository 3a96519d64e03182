"""nnunet-ima-eval on a really trained nnU-Net model: correctness, attack strength, resume, errors."""
import csv
import json
import os
import shutil

import numpy as np
import pytest
import torch

from nnunet_ima.evaluation import cli, run
from nnunet_ima.evaluation.cli import main


def _args(ws, out, *extra):
    return ["-d", str(ws.dataset_id), "-c", "2d", "-f", "0", "-tr", "nnUNetTrainerClean",
            "--device", "cpu", "--no-progress", "-o", str(out), *extra]


def _test_case(ws):
    """A held-out case of the session's split (the model never trained on it)."""
    with open(os.path.join(ws.preprocessed, ws.dataset_name, "test_cases.json")) as f:
        return json.load(f)["test"][0]


def _raw_test_folders(ws, tmp_path, image=True, label=True):
    """Empty ``imagesTs`` / ``labelsTs`` folders under ``tmp_path`` and the held-out case's raw
    image and label copied into them (where asked); returns ``(images, labels, case)``."""
    images, labels = tmp_path / "imagesTs", tmp_path / "labelsTs"
    images.mkdir()
    labels.mkdir()
    raw = os.path.join(ws.raw, ws.dataset_name)
    case = _test_case(ws)
    if image:
        shutil.copy(os.path.join(raw, "imagesTr", f"{case}_0000.nii.gz"), images)
    if label:
        shutil.copy(os.path.join(raw, "labelsTr", f"{case}.nii.gz"), labels)
    return images, labels, case


def _fold_split(ws, fold=0):
    with open(os.path.join(ws.preprocessed, ws.dataset_name, "splits_final.json")) as f:
        return json.load(f)[fold]


def _per_slice(out):
    with open(os.path.join(out, "per_slice.csv"), newline="") as f:
        return list(csv.DictReader(f))


def _nnunet_network(model_folder):
    """Fold 0's final network in eval mode, loaded by nnU-Net's own predictor (not the
    evaluator's loader)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    predictor = nnUNetPredictor(device=torch.device("cpu"), perform_everything_on_device=False)
    predictor.initialize_from_trained_model_folder(model_folder, (0,), "checkpoint_final.pth")
    net = predictor.network
    net.load_state_dict(predictor.list_of_parameters[0])
    return net.eval()


def _independent_dice(ws, model_folder, case, index):
    """Per-class Dice of the network's argmax, with nnU-Net's own predictor loading the model."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    net = _nnunet_network(model_folder)
    folder = os.path.join(ws.preprocessed, ws.dataset_name, "nnUNetPlans_2d")
    data, seg, _, _ = infer_dataset_class(folder)(folder).load_case(case)
    with torch.no_grad():
        pred = net(torch.from_numpy(np.asarray(data)[:, index][None]).float()).argmax(1)[0].numpy()
    label = np.asarray(seg)[0, index]
    dice = []
    for c in (1, 2):
        p, g = pred == c, label == c
        denominator = p.sum() + g.sum()
        dice.append(1.0 if denominator == 0 else 2 * (p & g).sum() / denominator)
    return dice


def test_clean_dice_matches_an_independent_computation(nnunet_workspace, trained_clean_model, tmp_path):
    ws = nnunet_workspace
    out = tmp_path / "clean"
    assert main(_args(ws, out, "--noise", "0", "--max-slices", "6")) == 0
    rows = _per_slice(out)
    assert len(rows) == 6
    for row in rows[:3]:
        expected = _independent_dice(ws, trained_clean_model, row["case"], int(row["slice"]))
        assert float(row["dice_organ"]) == pytest.approx(expected[0], abs=1e-6)
        assert float(row["dice_lesion"]) == pytest.approx(expected[1], abs=1e-6)
    for name in ("summary.json", "tvdi.md", "adi.md", "curves.png", "examples.png"):
        assert os.path.isfile(out / name)


def test_attack_lowers_dice_and_more_steps_never_help(nnunet_workspace, trained_clean_model, tmp_path):
    ws = nnunet_workspace
    # Same random start and step size (0.3125 * noise); the strong attack runs 16 steps instead
    # of 4, i.e. it continues the weak one.
    common = ("--noise", "0", "8", "--max-slices", "8", "--seed", "3")
    assert main(_args(ws, tmp_path / "weak", *common, "--steps", "4", "--alpha", "1.25")) == 0
    assert main(_args(ws, tmp_path / "strong", *common, "--steps", "16", "--alpha", "5")) == 0
    weak = json.loads((tmp_path / "weak" / "summary.json").read_text())["models"]["nnUNetTrainerClean"]
    strong = json.loads((tmp_path / "strong" / "summary.json").read_text())["models"]["nnUNetTrainerClean"]
    for metric in ("tvdi", "adi"):
        assert weak["noise"]["8"][metric] < weak["noise"]["0"][metric]
        assert strong["noise"]["8"][metric] <= weak["noise"]["8"][metric] + 0.01
    weak_rows = {(r["case"], r["slice"]): float(r["slice_dice"]) for r in _per_slice(tmp_path / "weak")
                 if r["noise"] == "8"}
    strong_rows = {(r["case"], r["slice"]): float(r["slice_dice"]) for r in _per_slice(tmp_path / "strong")
                   if r["noise"] == "8"}
    # The same slices, so the comparison above is on the same samples. A single slice may end
    # higher: PGD maximises Dice + CE, not Dice, and returns its last iterate, not its best.
    assert weak_rows.keys() == strong_rows.keys()


def test_interrupted_run_resumes_to_the_same_summary(nnunet_workspace, trained_clean_model, tmp_path,
                                                     monkeypatch, capsys):
    ws = nnunet_workspace
    common = ("--noise", "0", "3", "6", "--max-slices", "5", "--steps", "4")
    assert main(_args(ws, tmp_path / "full", *common)) == 0

    # Killed while writing the third part (noise 6).
    original = run.save_part
    calls = []

    def crash_after_two(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return original(*a, **k)
    monkeypatch.setattr(run, "save_part", crash_after_two)
    assert main(_args(ws, tmp_path / "resumed", *common)) == 130  # Ctrl-C: no traceback
    assert capsys.readouterr().err.endswith("interrupted; rerun the same command to resume\n")
    assert len(os.listdir(tmp_path / "resumed" / "parts")) == 2
    assert not (tmp_path / "resumed" / "summary.json").exists()
    assert not [f for f in os.listdir(tmp_path / "resumed" / "parts") if f.endswith(".tmp")]
    monkeypatch.setattr(run, "save_part", original)
    assert main(_args(ws, tmp_path / "resumed", *common)) == 0
    # The rerun says what it took from the interrupted one.
    assert (f"resuming: reused 2 of 3 (model, noise) results from "
            f"{tmp_path / 'resumed' / 'parts'}: nnUNetTrainerClean at noise 0 3") in capsys.readouterr().out

    full = json.loads((tmp_path / "full" / "summary.json").read_text())
    resumed = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    assert full.pop("peak_memory") and resumed.pop("peak_memory")  # measurements, not results
    assert full == resumed
    assert (tmp_path / "full" / "per_slice.csv").read_text() == \
        (tmp_path / "resumed" / "per_slice.csv").read_text()
    # Other settings in the same folder are refused rather than mixed, and nothing is touched.
    before = {f: os.path.getmtime(tmp_path / "resumed" / f) for f in ("summary.json", "config.json")}
    assert main(_args(ws, tmp_path / "resumed", "--noise", "0", "9")) == 2
    assert main(_args(ws, tmp_path / "resumed", *common, "--batch-size", "2")) == 2
    assert before == {f: os.path.getmtime(tmp_path / "resumed" / f) for f in before}


def test_changed_weights_are_not_mixed_with_old_results(nnunet_workspace, trained_clean_model, tmp_path,
                                                       capsys):
    model = tmp_path / "models" / "nnUNetTrainerClean__nnUNetPlans__2d"
    shutil.copytree(trained_clean_model, model)
    argv = ["-m", str(model), "--noise", "0", "--max-slices", "2", "--no-progress", "-o", str(tmp_path / "o")]
    assert main(argv) == 0
    checkpoint = model / "fold_0" / "checkpoint_final.pth"
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    key = next(iter(state["network_weights"]))
    state["network_weights"][key] = state["network_weights"][key] + 0.01
    torch.save(state, checkpoint)
    assert main(argv) == 2
    assert "checkpoint_sha256" in capsys.readouterr().err.replace(" ", "")
    assert main(argv + ["--overwrite"]) == 0
    assert json.loads((tmp_path / "o" / "config.json").read_text())["models"]["nnUNetTrainerClean"][
        "checkpoint_sha256"] != ""
    # A damaged checkpoint, and weights of another architecture, stop with their cause.
    checkpoint.write_bytes(b"truncated")
    assert main(argv[:-1] + [str(tmp_path / "o2")]) == 2
    assert "cannot read checkpoint" in capsys.readouterr().err
    del state["network_weights"][key]
    torch.save(state, checkpoint)
    assert main(argv[:-1] + [str(tmp_path / "o2")]) == 2
    assert "do not fit the network" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()


def test_bad_inputs_fail_clearly_and_write_nothing(nnunet_workspace, trained_clean_model, tmp_path,
                                                  capsys):
    ws = nnunet_workspace
    cases = [
        (_args(ws, tmp_path / "o1", "--noise", "0", "-3"), "noise levels must be finite and >= 0"),
        (["-d", "987", "-tr", "nnUNetTrainerClean", "-o", str(tmp_path / "o2")], "no dataset with id 987"),
        (_args(ws, tmp_path / "o3", "-tr", "nnUNetTrainerMissing"), "does not exist"),
        # A finished run has no checkpoint_latest.pth (nnU-Net deletes it): point at final.
        (_args(ws, tmp_path / "o4", "--checkpoint", "latest"),
         "checkpoint_latest.pth does not exist (nnU-Net deletes checkpoint_latest.pth when a "
         "training finishes); fold 0 has checkpoint_final.pth"),
        (["-m", str(tmp_path / "nowhere__nnUNetPlans__2d"), "-o", str(tmp_path / "o5")], "does not exist"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        assert message in capsys.readouterr().err
    # A test image without its label.
    images, labels, _ = _raw_test_folders(ws, tmp_path, label=False)
    assert main(_args(ws, tmp_path / "o6", "--images", str(images), "--labels", str(labels))) == 2
    assert "has no label" in capsys.readouterr().err
    for i in range(1, 7):
        assert not (tmp_path / f"o{i}").exists()


def test_raw_test_folders_are_preprocessed_with_the_models_plans(nnunet_workspace, trained_clean_model,
                                                                 tmp_path):
    """imagesTs/labelsTs give the same clean Dice as the preprocessed copy of the same case."""
    ws = nnunet_workspace
    images, labels, case = _raw_test_folders(ws, tmp_path)
    assert main(_args(ws, tmp_path / "raw", "--noise", "0", "--images", str(images),
                      "--labels", str(labels))) == 0
    assert main(_args(ws, tmp_path / "pre", "--noise", "0", "--cases", case)) == 0
    raw_rows = _per_slice(tmp_path / "raw")
    pre_rows = _per_slice(tmp_path / "pre")
    assert [(r["slice"], r["dice_organ"]) for r in raw_rows] == \
        [(r["slice"], r["dice_organ"]) for r in pre_rows]


def test_labels_outside_the_nonzero_region_count_as_background(nnunet_workspace, trained_clean_model,
                                                               tmp_path):
    """nnU-Net's cropping marks zero-valued image regions (air around an MR scan) with label -1.
    The evaluator scores them as background, as nnU-Net's training does; the Dice must equal
    the network's argmax Dice on nnU-Net's own preprocessing of the same files."""
    import SimpleITK as sitk
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    ws = nnunet_workspace
    images, labels, case = _raw_test_folders(ws, tmp_path, image=False)
    raw = os.path.join(ws.raw, ws.dataset_name)
    source = sitk.ReadImage(os.path.join(raw, "imagesTr", f"{case}_0000.nii.gz"))
    array = sitk.GetArrayFromImage(source)
    array[:, :14, :14] = 0  # an image corner without signal, away from the organ
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(source)
    sitk.WriteImage(image, str(images / f"{case}_0000.nii.gz"))
    out = tmp_path / "out"
    assert main(_args(ws, out, "--noise", "0", "--images", str(images), "--labels", str(labels))) == 0

    plans = json.load(open(os.path.join(trained_clean_model, "plans.json")))
    dataset_json = json.load(open(os.path.join(trained_clean_model, "dataset.json")))
    manager = PlansManager(plans)
    data, seg, _ = DefaultPreprocessor(verbose=False).run_case(
        [str(images / f"{case}_0000.nii.gz")], str(labels / f"{case}.nii.gz"),
        manager, manager.get_configuration("2d"), dataset_json)
    assert (seg == -1).any()  # the case really exercises the outside-nonzero label
    net = _nnunet_network(trained_clean_model)
    rows = _per_slice(out)
    assert len(rows) == int(((seg[0] > 0).sum(axis=(1, 2)) > 0).sum())
    for row in rows:
        z = int(row["slice"])
        with torch.no_grad():
            pred = net(torch.from_numpy(data[None, :, z]).float()).argmax(1)[0].numpy()
        label = np.where(seg[0, z] == -1, 0, seg[0, z])
        for c, name in ((1, "organ"), (2, "lesion")):
            p, g = pred == c, label == c
            expected = 1.0 if p.sum() + g.sum() == 0 else 2 * (p & g).sum() / (p.sum() + g.sum())
            assert float(row[f"dice_{name}"]) == pytest.approx(expected, abs=1e-6)


def test_nnunet_spellings_of_device_checkpoint_and_folds_parse():
    """nnU-Net's -device, -chk FILE and -f with several folds; before, argparse read -device cpu
    as -d evice and -chk as -c hk."""
    args = cli.build_parser().parse_args(["-d", "2", "-device", "cpu", "-chk", "checkpoint_best.pth",
                                          "-f", "0", "1", "all", "-o", "out"])
    assert (args.dataset, args.device, args.checkpoint, args.fold) == ("2", "cpu", "best",
                                                                       [0, 1, "all"])
    assert args.configuration == "2d"
    for spelling, name in (("checkpoint_final.pth", "final"), ("latest", "latest")):
        assert cli.build_parser().parse_args(["-chk", spelling, "-o", "o"]).checkpoint == name
    assert cli.build_parser().parse_args(["--device", "cpu", "-o", "o"]).fold == [0]


@pytest.mark.parametrize("argv, message", [(["-chk", "checkpoint_99.pth"], "checkpoint_best.pth"),
                                           (["-f", "two"], "'all'"), (["-f", "-1"], "'all'")])
def test_bad_checkpoint_and_fold_spellings_are_argparse_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.build_parser().parse_args(argv + ["-o", "o"])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("nnunet-ima-eval ")


def test_training_cases_are_refused_by_name_unless_allowed(nnunet_workspace, trained_clean_model,
                                                          tmp_path, capsys):
    ws = nnunet_workspace
    trained = _fold_split(ws)["train"][:2]
    argv = _args(ws, tmp_path / "o", "--noise", "0", "--max-slices", "4",
                 "--cases", _test_case(ws), *trained)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"nnUNetTrainerClean (fold 0): {', '.join(trained)}" in err
    assert "--allow-train-cases" in err and _test_case(ws) not in err.split("fold 0):")[1]
    assert not (tmp_path / "o").exists()
    # nnU-Net's spellings run the same evaluation.
    nnunet_argv = [a for a in argv if a not in ("--device", "cpu")] + ["-device", "cpu", "-chk",
                                                                        "checkpoint_final.pth"]
    assert main(nnunet_argv + ["--allow-train-cases"]) == 0
    assert "scored on" in capsys.readouterr().err
    config = json.loads((tmp_path / "o" / "config.json").read_text())
    scored = config["models"]["nnUNetTrainerClean"]["train_cases_scored"]
    assert scored and set(scored) <= set(trained)
    for table in ("tvdi.md", "adi.md"):
        last = (tmp_path / "o" / table).read_text().splitlines()[-1]
        assert last.startswith("Note: training cases were scored (--allow-train-cases): "
                               "nnUNetTrainerClean on ")
    # Validation and test cases are not training cases: no note.
    assert main(_args(ws, tmp_path / "held_out", "--noise", "0", "--max-slices", "2",
                      "--cases", "test", "val")) == 0
    assert "Note" not in (tmp_path / "held_out" / "tvdi.md").read_text()


def test_several_folds_are_one_model_each_and_fold_all_trained_on_the_test_cases(
        nnunet_workspace, trained_clean_model, tmp_path, capsys):
    model = tmp_path / "models" / "nnUNetTrainerClean__nnUNetPlans__2d"
    shutil.copytree(trained_clean_model, model)
    # The same weights stand in for a fold-all training: nnU-Net would have trained it on
    # every preprocessed case, the test cases included.
    shutil.copytree(model / "fold_0", model / "fold_all")
    argv = ["-m", str(model), "-f", "0", "all", "--noise", "0", "--max-slices", "2",
            "--no-progress", "-device", "cpu", "-o", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "nnUNetTrainerClean_foldall (fold all): " in err and "fold 'all'" in err
    assert "_fold0 (fold 0)" not in err
    assert main(argv + ["--allow-train-cases"]) == 0
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert list(summary["models"]) == ["nnUNetTrainerClean_fold0", "nnUNetTrainerClean_foldall"]
    assert summary["config"]["fold"] == [0, "all"]
    scored = {name: m.get("train_cases_scored") for name, m in summary["config"]["models"].items()}
    assert scored["nnUNetTrainerClean_fold0"] is None and scored["nnUNetTrainerClean_foldall"]
    # Same weights, same slices: the same numbers.
    a, b = summary["models"].values()
    assert a["noise"] == b["noise"]


def _fake_model(tmp_path, checkpoints=("checkpoint_final.pth",)):
    """A model folder as far as the checkpoint lookup reads it (the files are empty)."""
    folder = tmp_path / "nnUNetTrainerClean__nnUNetPlans__2d"
    (folder / "fold_0").mkdir(parents=True)
    for name in ("plans.json", "dataset.json"):
        (folder / name).write_text("{}")
    for name in checkpoints:
        (folder / "fold_0" / name).write_bytes(b"")
    return folder


@pytest.mark.parametrize("checkpoints, asked, expected, not_expected", [
    (["checkpoint_final.pth", "checkpoint_best.pth"], "latest",
     "fold 0 has checkpoint_final.pth, checkpoint_best.pth: use --checkpoint final or "
     "--checkpoint best", "--checkpoint latest"),
    (["checkpoint_latest.pth", "checkpoint_best.pth"], "final",
     "(the training has not finished); fold 0 has checkpoint_best.pth, checkpoint_latest.pth: "
     "use --checkpoint best or --checkpoint latest", "--checkpoint final"),
    ([], "final", "nor does any other checkpoint of fold 0", "use --checkpoint"),
])
def test_a_missing_checkpoint_points_at_the_ones_that_exist(tmp_path, capsys, checkpoints, asked,
                                                            expected, not_expected):
    folder = _fake_model(tmp_path, checkpoints)
    argv = ["-m", str(folder), "--checkpoint", asked, "--device", "cpu", "-o", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err and not_expected not in err
    assert main(argv[:2] + ["-f", "3"] + argv[2:]) == 2
    assert "fold_3 does not exist: fold 3 has not been trained" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("output, message", [
    ("file", "-o/--output {tmp}/file is a file, not a folder"),
    ("file/sub", "-o/--output {tmp}/file/sub cannot be created: {tmp}/file is a file"),
])
def test_an_output_that_is_a_file_is_refused_before_loading_anything(tmp_path, capsys, output,
                                                                     message):
    (tmp_path / "file").write_text("")
    # The model folder does not exist either: the output is checked first.
    assert main(["-m", str(tmp_path / "nowhere"), "--device", "cpu",
                 "-o", str(tmp_path / output)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message.format(tmp=tmp_path) in err
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_ctrl_c_prints_one_line_and_exits_130(tmp_path, capsys, monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "evaluate", interrupted)
    assert main(["-m", "x", "--device", "cpu", "-o", str(tmp_path / "o")]) == 130
    assert capsys.readouterr().err == "interrupted; rerun the same command to resume\n"


@pytest.mark.parametrize("changes, argv, message", [
    ({"noise": (0, -3)}, ["--noise", "0", "-3"], "noise levels must be finite and >= 0"),
    ({"max_slices": 0}, ["--max-slices", "0"], "--max-slices must be >= 1, got 0"),
    ({"tile_step_size": 1.5}, ["--tile-step-size", "1.5"],
     "--tile-step-size must lie in (0, 1], got 1.5"),
    ({"ensemble": ("pgd", "pgd")}, ["--attack", "ensemble", "--ensemble", "pgd", "pgd"],
     "--ensemble names a member more than once"),
    ({"images": "imagesTs"}, ["--images", "imagesTs"], "--images and --labels go together"),
    ({"folds": (0, 0)}, ["-f", "0", "0"], "-f names fold 0 more than once"),
    ({"model_folders": ("m",)}, ["-m", "m"], "by -m FOLDER, not both"),
])
def test_eval_options_refuse_what_the_command_line_refuses(tmp_path, capsys, changes, argv,
                                                           message):
    """A program building EvalOptions gets the command line's error, before any work."""
    from nnunet_ima.errors import UserInputError
    from nnunet_ima.evaluation.options import EvalOptions
    base = dict(output=str(tmp_path / "o"), dataset="2", device="cpu")
    with pytest.raises(UserInputError) as refused:
        EvalOptions(**dict(base, **changes))
    assert message in str(refused.value)
    assert main(["-d", "2", "--device", "cpu", "-o", str(tmp_path / "o"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_declared_settings_are_checked_and_named_by_their_option(tmp_path, capsys):
    from nnunet_ima.declared import InvalidSetting
    from nnunet_ima.evaluation.robustness import AttackSettings
    with pytest.raises(InvalidSetting, match="steps must be an integer >= 1, got 0"):
        AttackSettings(steps=0)
    for argv, message in ((["--steps", "0"], "--steps must be an integer >= 1, got 0"),
                          (["--alpha", "0"], "--alpha must be a finite number > 0"),
                          (["--masking-queries", "0"], "--masking-queries must be an integer")):
        assert main(["-d", "2", "--device", "cpu", "-o", str(tmp_path / "o"), *argv]) == 2
        assert message in capsys.readouterr().err


def test_the_command_lines_defaults_are_the_declared_ones():
    from nnunet_ima.evaluation.options import EvalOptions
    args = cli.build_parser().parse_args(["-d", "2", "--device", "cpu", "-o", "o"])
    assert cli.options_from_args(args) == EvalOptions(output="o", dataset="2", device="cpu")
