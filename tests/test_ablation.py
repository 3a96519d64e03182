"""The ablation experiment: its variants, its resume key, its table and its picture."""
import csv
import json
import os

import pytest

from conftest import _bin
from nnunet_ima.nnunet.ablation import (AblationOptions, build_variants, check_options, collect_results,
                                 dominated_by, eval_folder, markdown_table, model_folder,
                                 write_report)
from nnunet_ima.errors import UserInputError
from nnunet_ima.nnunet.settings import RECIPES, settings_from_dict


def _options(tmp_path, **kw):
    return AblationOptions(dataset="Dataset990_SyntheticOrgan", workdir=str(tmp_path / "abl"),
                           **kw)


def test_variants_share_schedule_and_seed_and_differ_in_one_factor(tmp_path):
    options = _options(tmp_path, variants=["clean", "clean_half_lr", "adv", "ima_printed",
                                           "ima_authors", "authors-slices", "printed+term"],
                       adv_eps=[2.0, 6.0], initial_lr=0.02)
    variants = {v.name: v for v in build_variants(options)}
    assert list(variants) == ["clean", "clean_half_lr", "adv2", "adv6", "ima_printed",
                              "ima_authors", "authors-slices", "printed+term"]
    settings = {name: settings_from_dict(v.settings) for name, v in variants.items()}
    assert all(s.seed == 0 and s.num_epochs == options.epochs for s in settings.values())
    assert settings["clean_half_lr"].initial_lr == pytest.approx(0.01)
    assert (settings["adv2"].adv_eps, settings["adv6"].adv_eps) == (2.0, 6.0)

    def differences(a, b):
        return {k for k in RECIPES["printed"] if a.to_dict()[k] != b.to_dict()[k]}
    assert differences(settings["authors-slices"], settings["ima_authors"]) == \
        {"attack_slices", "dice_reduce", "dice_absent_class"}
    assert differences(settings["printed+term"], settings["ima_printed"]) == {"adversarial_term"}


def test_adv_at_the_constant_learning_rate_differs_from_adv_only_there(tmp_path):
    options = _options(tmp_path, variants=["adv", "adv_constant_lr"], adv_eps=[8.0])
    variants = {v.name: v for v in build_variants(options)}
    assert list(variants) == ["adv8", "adv8_constant_lr"]
    assert variants["adv8_constant_lr"].kind == "adv"
    plain, constant = (settings_from_dict(variants[n].settings).to_dict()
                       for n in ("adv8", "adv8_constant_lr"))
    assert {k for k in plain if plain[k] != constant[k]} == {"lr_schedule"}
    assert (plain["lr_schedule"], constant["lr_schedule"]) == ("poly", "constant")


@pytest.mark.parametrize("variants, message", [
    (["adv", "bogus"], "unknown variant 'bogus'"),
    (["authors-colour"], "unknown variant 'authors-colour'"),
    (["clean", "clean"], "variants repeat a model"),
])
def test_bad_variants_are_refused(tmp_path, variants, message):
    with pytest.raises(UserInputError, match=message):
        build_variants(_options(tmp_path, variants=variants))


def test_a_workdir_made_with_other_options_is_refused(tmp_path):
    check_options(_options(tmp_path))
    check_options(_options(tmp_path, jobs=2, variants=["clean"]))  # neither changes results
    with pytest.raises(UserInputError, match=r"differing: \['epochs'\]"):
        check_options(_options(tmp_path, epochs=3))
    with pytest.raises(UserInputError, match="must be > 0"):
        check_options(_options(tmp_path, adv_eps=[0.0]))


def _fake_results(options, variants, numbers):
    """Write the files the report reads: each model's summary.json per attack, ima_stats.csv."""
    for v in variants:
        clean, robust, weight = numbers[v.name]
        for attack in options.attacks:
            # APGD is 1 point stronger than PGD at every noise level > 0.
            drop = 1.0 if attack == "apgd" else 0.0
            levels = {f"{n:g}": {"tvdi": (clean if n == 0 else robust - drop) / 100,
                                 "adi": (clean - 1 if n == 0 else robust - 1 - drop) / 100}
                      for n in options.noise}
            out = eval_folder(options, v, attack, "test")
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, "summary.json"), "w") as f:
                json.dump({"models": {v.trainer: {"noise": levels}}}, f)
        fold = os.path.join(model_folder(options, v, "Dataset990_SyntheticOrgan"), "fold_0")
        os.makedirs(fold, exist_ok=True)
        if v.kind != "clean":
            with open(os.path.join(fold, "ima_stats.csv"), "w", newline="") as f:
                w = csv.DictWriter(f, ["epoch", "adv_weight", "margin_mean"])
                w.writeheader()
                w.writerow({"epoch": 0, "adv_weight": weight / 2, "margin_mean": 1.0})
                w.writerow({"epoch": 1, "adv_weight": weight * 1.5, "margin_mean": 3.0})


def test_report_by_hand(tmp_path):
    options = _options(tmp_path, variants=["clean", "adv", "ima_authors"], adv_eps=[4.0, 8.0],
                       noise=[0.0, 4.0, 8.0])
    variants = build_variants(options)
    # name -> (clean TVDI, TVDI at every noise > 0 under PGD, mean adversarial weight)
    numbers = {"clean": (90.0, 10.0, 0.0), "adv4": (88.0, 40.0, 0.5), "adv8": (80.0, 60.0, 0.5),
               "ima_authors": (85.0, 50.0, 0.5)}
    _fake_results(options, variants, numbers)
    rows = {r.name: r for r in collect_results(options, variants, "Dataset990_SyntheticOrgan",
                                               "test")}
    ima = rows["ima_authors"]
    # Worst case over PGD and APGD (APGD, 1 point lower); AUC over noise 0, 4, 8 by trapezoids:
    # (4 * (85 + 49) / 2 + 4 * (49 + 49) / 2) / 8 = 58.
    assert ima.worst_tvdi == {0.0: 85.0, 4.0: 49.0, 8.0: 49.0}
    assert ima.auc_tvdi == pytest.approx(58.0)
    assert ima.adv_weight == pytest.approx(0.5) and ima.margin_mean == 3.0
    assert dominated_by(ima, [rows["adv4"], rows["adv8"]]) == []
    assert dominated_by(rows["clean"], [rows["adv4"]]) == []
    worse = rows["clean"]
    worse.clean_tvdi = 70.0
    assert dominated_by(worse, [rows["adv4"], rows["adv8"]]) == ["adv4", "adv8"]

    text = write_report(options, variants, "Dataset990_SyntheticOrgan")
    table = text.splitlines()
    assert "| ima_authors | 85.00 | 84.00 | 49.00 | 49.00 | 58.00 |" in "\n".join(table)
    assert table[-1].endswith("| none |")
    assert os.path.isfile(os.path.join(options.workdir, "ablation.png"))
    with open(os.path.join(options.workdir, "ablation.json")) as f:
        saved = json.load(f)
    assert saved["cases"]["test"][3]["settings"]["recipe"] == "authors"
    assert markdown_table(list(rows.values()), options, "test").count("\n| ") == 1 + 4  # header


@pytest.mark.slow
def test_ablation_runs_end_to_end_and_resumes(nnunet_workspace, tmp_path):
    """Two real trainings side by side, both attacks, one table; a rerun trains nothing."""
    ws = nnunet_workspace
    workdir = str(tmp_path / "ablation")
    command = [_bin("nnunet-ima"), "ablation", "-d", str(ws.dataset_id), "--workdir", workdir,
               "--variants", "clean", "ima_authors", "--epochs", "1", "--iterations", "2",
               "--val-iterations", "1", "--pgd-steps", "2", "--binary-steps", "2",
               "--eps-max", "8", "--noise", "0", "4", "--eval-steps", "2", "--max-slices", "2",
               "--jobs", "2"]
    first = ws.run(command, timeout=1200)
    assert "| ima_authors |" in first.stdout and "| clean |" in first.stdout
    for name in ("ablation.md", "ablation.json", "ablation.png", "ablation_options.json"):
        assert os.path.isfile(os.path.join(workdir, name))
    with open(os.path.join(workdir, "results", "ima_authors", ws.dataset_name,
                           "nnUNetTrainerIMA__nnUNetPlans__2d", "fold_0", "ima_config.json")) as f:
        assert json.load(f)["recipe"] == "authors"
    again = ws.run(command, timeout=600)
    assert "nnUNetv2_train" not in again.stdout and "already trained" in again.stdout
    refused = ws.run(command[:-2] + ["--epochs", "2"], check=False)
    assert refused.returncode == 2 and "differing: ['epochs']" in refused.stderr


def test_trainings_are_built_as_the_experiment_builds_them(tmp_path, monkeypatch):
    """One builder of nnUNetv2_train commands: the ablation's and the experiment's trainings get
    the same data-augmentation workers; each ablation model its own results folder and
    settings file."""
    from nnunet_ima.nnunet import ablation
    from nnunet_ima.nnunet.experiment import Experiment
    from nnunet_ima.nnunet.pipeline import data_augmentation_workers
    options = _options(tmp_path, variants=["clean", "ima_authors"], jobs=2, device="cuda")
    variants = build_variants(options)
    ran = []
    monkeypatch.setattr(ablation, "run_side_by_side", lambda commands, *a: ran.extend(commands))
    ablation.train_all(options, variants, "Dataset990_SyntheticOrgan", {})
    (experiments,) = Experiment(str(tmp_path / "work")).training_commands(
        990, "Dataset990_SyntheticOrgan", {"nnUNetTrainerClean": {}}, "cuda", jobs=2)
    assert [c.args[1:] for c in ran] == [
        ["Dataset990_SyntheticOrgan", "2d", "0", "-tr", v.trainer, "-device", "cuda"]
        for v in variants]
    for command, variant in zip(ran, variants):
        assert command.env["nnUNet_n_proc_DA"] == experiments.env["nnUNet_n_proc_DA"] == \
            data_augmentation_workers("cuda", 2)
        assert command.env["nnUNet_results"] == ablation.results_root(options, variant)
        with open(command.env["NNUNET_IMA_CONFIG"]) as f:
            assert json.load(f) == variant.settings


def test_evaluations_are_library_calls_that_leave_the_environment_alone(tmp_path, monkeypatch):
    from nnunet_ima.evaluation import run
    from nnunet_ima.evaluation.ensemble import DEFAULT_ENSEMBLE
    from nnunet_ima.evaluation.options import EvalOptions
    from nnunet_ima.nnunet.ablation import evaluate_all
    options = _options(tmp_path, variants=["clean"], attacks=["apgd", "ensemble"],
                       cases=["test", "val"], max_slices=None)
    variants = build_variants(options)
    calls, environment = [], dict(os.environ)

    def evaluate(evaluation):
        calls.append(evaluation)
        os.makedirs(evaluation.output)
        with open(os.path.join(evaluation.output, "summary.json"), "w") as f:
            f.write("{}")
        return {}
    monkeypatch.setattr(run, "evaluate", evaluate)
    evaluate_all(options, variants, "Dataset990_SyntheticOrgan")
    assert dict(os.environ) == environment
    single = EvalOptions(output="x", dataset="990")
    assert [(c.cases, c.attack.attack, c.ensemble, c.masking_checks) for c in calls] == [
        (("test",), "apgd", single.ensemble, single.masking_checks),
        (("test",), "pgd", tuple(DEFAULT_ENSEMBLE), True),
        (("val",), "apgd", single.ensemble, single.masking_checks),
        (("val",), "pgd", tuple(DEFAULT_ENSEMBLE), True)]
    folder = model_folder(options, variants[0], "Dataset990_SyntheticOrgan")
    assert all(c.model_folders == (folder,) and c.folds == (0,) and c.max_slices is None
               and c.noise == tuple(options.noise) and c.attack.steps == options.eval_steps
               and c.device == "cpu" and not c.progress for c in calls)
    assert calls[0].output == eval_folder(options, variants[0], "apgd", "test")
    evaluate_all(options, variants, "Dataset990_SyntheticOrgan")  # every one is done
    assert len(calls) == 4


def test_the_command_line_options_are_the_declared_ones(monkeypatch):
    import dataclasses
    from nnunet_ima.cli import build_parser
    argv = ["ablation", "-d", "990", "--workdir", "w"]
    args = build_parser("ablation").parse_args(argv)
    assert AblationOptions(**{f.name: getattr(args, f.name)
                              for f in dataclasses.fields(AblationOptions)}) == \
        AblationOptions(dataset="990", workdir="w")
    field = next(f for f in dataclasses.fields(AblationOptions) if f.name == "eval_steps")
    monkeypatch.setattr(field, "default", 7)
    assert build_parser("ablation").parse_args(argv).eval_steps == 7
