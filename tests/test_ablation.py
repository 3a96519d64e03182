"""The ablation experiment: its variants, its resume key, its table and its picture."""
import csv
import math
import json
import os

import numpy as np
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


# Two cases of two slices each; a slice's counts move its Dice by these points, which add up to
# 0, so the pooled TVDI of all four is the model's number and the draws still vary.
SLICES = (("c1", 0, 5), ("c1", 1, -5), ("c2", 0, 3), ("c2", 1, -3))


def _save_counts(folder, model, noise, percent, spread=1):
    """The evaluator's part of one (model, noise level): one class, slice ``i`` with TP
    ``percent + spread * d_i`` and FP = FN = ``100 - TP``, so the pooled TVDI is ``percent``."""
    from nnunet_ima.evaluation.report import part_path, save_part
    from nnunet_ima.evaluation.robustness import NoiseResult
    tp = np.array([[round(percent) + spread * d] for _, _, d in SLICES])
    save_part(part_path(folder, model, noise), NoiseResult(
        [c for c, _, _ in SLICES], [i for _, i, _ in SLICES], tp, 100 - tp, 100 - tp, {}))


def _fake_results(options, variants, numbers, spread=None):
    """Write the files the report reads: each model's summary.json and per-slice counts per
    attack, ima_stats.csv. ``numbers``: name -> (clean TVDI, robust TVDI, adversarial weight),
    or seed -> name -> those; ``spread``: name -> how far its slices lie from its number."""
    for v in variants:
        clean, robust, weight = numbers.get(v.seed, numbers)[v.name]
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
            for n in options.noise:
                _save_counts(out, v.trainer, n, 100 * levels[f"{n:g}"]["tvdi"],
                             (spread or {}).get(v.name, 1))
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
    table = text.split("\n\n")[1].splitlines()  # the table of the means; its intervals follow
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


@pytest.mark.slow
def test_ablation_with_two_seeds_end_to_end(nnunet_workspace, tmp_path):
    """--seeds 0 1: every variant trains twice, seed 1 beside seed 0, and the report gives the
    intervals over the test slices and the seeds."""
    ws = nnunet_workspace
    workdir = str(tmp_path / "ablation")
    ws.run([_bin("nnunet-ima"), "ablation", "-d", str(ws.dataset_id), "--workdir", workdir,
            "--variants", "clean", "adv", "--adv-eps", "4", "--seeds", "0", "1", "--epochs", "1",
            "--iterations", "2", "--val-iterations", "1", "--pgd-steps", "2", "--noise", "0",
            "4", "--eval-steps", "2", "--attacks", "pgd", "--max-slices", "4", "--jobs", "2",
            "--bootstrap", "200"], timeout=1800)
    for seed, root in ((0, workdir), (1, os.path.join(workdir, "seed1"))):
        for variant, trainer in (("clean", "nnUNetTrainerClean"), ("adv4", "nnUNetTrainerAdv")):
            fold = os.path.join(root, "results", variant, ws.dataset_name,
                                f"{trainer}__nnUNetPlans__2d", "fold_0")
            assert os.path.isfile(os.path.join(fold, "checkpoint_final.pth"))
            with open(os.path.join(fold, "ima_config.json")) as f:
                assert json.load(f)["seed"] == seed
            assert os.path.isfile(os.path.join(root, "eval", "test", "pgd", variant,
                                               "summary.json"))
    with open(os.path.join(workdir, "ablation.md")) as f:
        text = f.read()
    assert "the mean over 2 seeds (0 1)" in text and "| clean TVDI - adv4 |" in text
    assert text.count(" seeds [") >= 4 and "| adv4 |" in text
    with open(os.path.join(workdir, "ablation.json")) as f:
        clean = json.load(f)["cases"]["test"][0]
    assert clean["name"] == "clean" and set(clean["statistics"]["per_seed"]) == {"0", "1"}
    per_seed = [v["clean_tvdi"] for v in clean["statistics"]["per_seed"].values()]
    assert clean["clean_tvdi"] == pytest.approx(sum(per_seed) / 2)
    assert isinstance(clean["statistics"]["dominated_by"], list)
    # the report as the summary across datasets reads it
    summary = ws.run([_bin("nnunet-ima"), "ablation-summary", workdir, "--cases", "test"])
    assert f"| {ws.dataset_name} (2 seeds) |" in summary.stdout
    assert "| adv4 | adv | " in summary.stdout and "nothing to choose from" in summary.stdout


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


def test_seeds_train_every_variant_once_per_seed_beside_the_first(tmp_path, monkeypatch):
    """The models of --seed, their settings files and evaluations are where a one-seed run puts
    them; another seed's in seed<s>/; every model is evaluated with --seed."""
    from nnunet_ima.nnunet import ablation
    options = _options(tmp_path, variants=["clean", "adv"], adv_eps=[4.0], seed=3, seeds=[3, 1])
    one = _options(tmp_path, variants=["clean", "adv"], adv_eps=[4.0], seed=3)
    variants = build_variants(options)
    assert [(v.name, v.seed) for v in variants] == [("clean", 3), ("adv4", 3), ("clean", 1),
                                                    ("adv4", 1)]
    assert all(settings_from_dict(v.settings).seed == v.seed for v in variants)
    assert variants[:2] == build_variants(one)
    dataset = "Dataset990_SyntheticOrgan"
    assert model_folder(options, variants[0], dataset) == model_folder(one, variants[0], dataset)
    assert ablation.results_root(options, variants[2]) == \
        os.path.join(options.workdir, "seed1", "results", "clean")
    assert eval_folder(options, variants[3], "pgd", "test") == \
        os.path.join(options.workdir, "seed1", "eval", "test", "pgd", "adv4")
    evaluations = [ablation.evaluation_options(options, v, "pgd", "test", dataset)
                   for v in variants]
    assert {e.attack.seed for e in evaluations} == {3}
    assert len({e.output for e in evaluations}) == 4

    ran = []
    monkeypatch.setattr(ablation, "run_side_by_side", lambda commands, *a: ran.extend(commands))
    ablation.train_all(options, variants, dataset, {})
    assert [c.log_name for c in ran] == ["train_clean", "train_adv4", "train_clean_seed1",
                                         "train_adv4_seed1"]
    assert ran[2].env["NNUNET_IMA_CONFIG"] == \
        os.path.join(options.workdir, "seed1", "configs", "clean.json")
    assert [c.env["nnUNet_results"] for c in ran] == [ablation.results_root(options, v)
                                                       for v in variants]


def test_a_workdir_of_one_seed_takes_more_seeds_and_keeps_its_key(tmp_path):
    key = _options(tmp_path).resume_key()
    assert key["seed"] == 0 and "seeds" not in key and "bootstrap" not in key
    assert _options(tmp_path, seeds=[2, 0, 1], bootstrap=50).resume_key() == key
    assert _options(tmp_path).training_seeds == (0,)
    assert _options(tmp_path, seed=4).training_seeds == (4,)
    check_options(_options(tmp_path))
    check_options(_options(tmp_path, seeds=[0, 1, 2], bootstrap=50))
    with pytest.raises(UserInputError, match=r"differing: \['seed'\]"):
        check_options(_options(tmp_path, seed=1, seeds=[0, 1]))
    with pytest.raises(UserInputError, match="--seeds names 1 more than once"):
        check_options(_options(tmp_path, seeds=[0, 1, 1]))
    with pytest.raises(UserInputError, match="--seeds must be a whole number >= 0, got -1"):
        check_options(_options(tmp_path, seeds=[0, -1]))
    with pytest.raises(UserInputError, match="--bootstrap must be a whole number >= 1"):
        check_options(_options(tmp_path, bootstrap=0))
    # the trainers refuse 0 validation iterations (nnU-Net's epoch end needs their outputs)
    with pytest.raises(UserInputError, match="--val-iterations must be a whole number >= 1"):
        check_options(_options(tmp_path, val_iterations=0))


def test_report_of_two_seeds_by_hand(tmp_path):
    """Means over the seeds in the first table; in the second, intervals and differences paired
    against adv8 (the best TVDI AUC). Every slice of a model differs from its number by the
    same points in every model, so a paired difference is the same in every draw: its
    bootstrap interval has no width, though each model's own interval does."""
    options = _options(tmp_path, variants=["clean", "adv", "ima_authors"], adv_eps=[4.0, 8.0],
                       noise=[0.0, 4.0, 8.0], seeds=[0, 1], bootstrap=300)
    variants = build_variants(options)
    numbers = {0: {"clean": (90.0, 10.0, 0.0), "adv4": (88.0, 40.0, 0.5),
                   "adv8": (80.0, 60.0, 0.5), "ima_authors": (85.0, 50.0, 0.5)},
               1: {"clean": (90.0, 10.0, 0.0), "adv4": (86.0, 42.0, 0.5),
                   "adv8": (80.0, 58.0, 0.5), "ima_authors": (87.0, 50.0, 0.5)}}
    _fake_results(options, variants, numbers)
    text = write_report(options, variants, "Dataset990_SyntheticOrgan")
    means, intervals = text.split("\n\nIntervals")
    # AUC over noise 0, 4, 8 with APGD's (robust - 1): (clean + 3 (robust - 1)) / 4; ima_authors
    # (85 + 147) / 4 = 58 and (87 + 147) / 4 = 58.5; adv8 64.25 and 62.75.
    assert "| ima_authors | 86.00 | 85.00 | 49.00 | 49.00 | 58.25 |" in means
    assert "| adv8 | 80.00 | 79.00 | 58.00 | 58.00 | 63.50 |" in means
    statistics = ablation_statistics(options, variants)
    assert statistics.reference == "adv8" and statistics.seeds == (0, 1)
    assert (statistics.cases, statistics.slices, statistics.draws) == (2, 4, 300)
    ima = statistics.rows["ima_authors"]
    assert ima.per_seed == {0: {"clean_tvdi": pytest.approx(85.0), "auc_tvdi": pytest.approx(58.0)},
                            1: {"clean_tvdi": pytest.approx(87.0), "auc_tvdi": pytest.approx(58.5)}}
    assert ima.clean_tvdi.mean == pytest.approx(86.0)
    assert ima.clean_tvdi.low < 84 and ima.clean_tvdi.high > 88   # slices 3 to 5 points apart
    # t interval over the seeds: 86 -+ 12.706 * sd(85, 87) / sqrt(2) = 86 -+ 12.706
    assert (ima.clean_tvdi.seed_low, ima.clean_tvdi.seed_high) == pytest.approx(
        (86 - 12.706, 86 + 12.706))
    d = ima.clean_difference
    assert (d.mean, d.low, d.high) == pytest.approx((6.0, 6.0, 6.0)) and not d.excludes_zero
    # clean: +10 on both seeds; its AUC difference -35 and -33.5: -34.25 -+ 12.706 * 1.0607 / 1.414
    clean = statistics.rows["clean"]
    assert (clean.clean_difference.seed_low, clean.clean_difference.seed_high) == \
        pytest.approx((10.0, 10.0))
    assert clean.auc_difference.seed_high == pytest.approx(-34.25 + 12.706 * 0.75, abs=1e-3)
    assert statistics.rows["adv8"].clean_difference is None
    assert "| clean | 90.00 [" in intervals and \
        "| +10.00 [+10.00, +10.00] seeds [+10.00, +10.00] * |" in intervals
    assert "| +6.00 [+6.00, +6.00] seeds [-6.71, +18.71] |" in intervals
    assert "| adv8 |" in intervals and "| reference | reference |" in intervals
    with open(os.path.join(options.workdir, "ablation.json")) as f:
        saved = json.load(f)["cases"]["test"]
    assert saved[0]["name"] == "clean" and saved[0]["reference"] == "adv8"
    assert saved[3]["statistics"]["clean_difference"]["mean"] == pytest.approx(6.0)
    assert os.path.isfile(os.path.join(options.workdir, "ablation.png"))


def ablation_statistics(options, variants):
    from nnunet_ima.nnunet.ablation import collect_statistics
    return collect_statistics(options, variants, "test")


def test_one_seed_gives_bootstrap_intervals_only(tmp_path):
    options = _options(tmp_path, variants=["clean", "adv"], adv_eps=[4.0], noise=[0.0, 4.0],
                       bootstrap=200)
    variants = build_variants(options)
    _fake_results(options, variants, {"clean": (90.0, 10.0, 0.0), "adv4": (88.0, 40.0, 0.5)},
                  spread={"clean": 2})
    statistics = ablation_statistics(options, variants)
    clean = statistics.rows["clean"]
    assert math.isnan(clean.clean_tvdi.seed_low) and math.isnan(clean.auc_tvdi.seed_high)
    # clean's slices lie twice as far from its number as adv4's: the difference varies by draw,
    # over 0 for clean TVDI (+2 and a slice 3 or 5 points away), not for the AUC (-14)
    d, auc = clean.clean_difference, clean.auc_difference
    assert d.low < 0 < 2.0 < d.high and not d.excludes_zero
    assert auc.low < -14.0 < auc.high < 0 and auc.excludes_zero
    text = write_report(options, variants, "Dataset990_SyntheticOrgan")
    assert "seeds [" not in text and "1 seed (0)" in text
    rows = [line for line in text.splitlines() if line.startswith("| clean | 90.00 [")]
    assert len(rows) == 1 and "| +2.00 [" in rows[0] and rows[0].count(" *") == 1
    # adv4 is better on the AUC but not at least as good on clean TVDI: it dominates nothing
    assert rows[0].endswith("] * | none |")


def test_slice_counts_of_an_ensemble_are_its_lowest_tvdi_choice(tmp_path):
    """Per slice the member that scores worse; noise 0 is the first member's clean pass."""
    from nnunet_ima.evaluation.report import part_path, save_part
    from nnunet_ima.evaluation.robustness import NoiseResult
    from nnunet_ima.nnunet.ablation import slice_counts

    def part(noise, member, tp):
        tp = np.array([[t] for t in tp])
        save_part(part_path(str(tmp_path), "m", noise, member),
                  NoiseResult(["c1", "c2"], [0, 0], tp, 100 - tp, 100 - tp, {}))
    with open(tmp_path / "summary.json", "w") as f:
        json.dump({"models": {"m": {"noise": {"0": {}, "4": {}}}},
                   "ensemble": {"members": ["pgd", "apgd"]}}, f)
    part(0.0, "pgd", [95, 90])
    part(4.0, "pgd", [90, 10])
    with pytest.raises(UserInputError, match=r"m__noise4__apgd\.npz is missing.*delete"):
        slice_counts(str(tmp_path))
    part(4.0, "apgd", [20, 80])
    counts = slice_counts(str(tmp_path))
    assert counts[0.0].tp[:, 0].tolist() == [95, 90]
    assert counts[4.0].tp[:, 0].tolist() == [20, 10]


def test_evaluations_on_other_slices_are_refused(tmp_path):
    options = _options(tmp_path, variants=["clean", "adv"], adv_eps=[4.0], noise=[0.0, 4.0],
                       attacks=["pgd"], bootstrap=10)
    variants = build_variants(options)
    _fake_results(options, variants, {"clean": (90.0, 10.0, 0.0), "adv4": (88.0, 40.0, 0.5)})
    from nnunet_ima.evaluation.report import part_path, save_part
    from nnunet_ima.evaluation.robustness import NoiseResult
    out = eval_folder(options, variants[1], "pgd", "test")
    tp = np.array([[50], [50]])
    save_part(part_path(out, variants[1].trainer, 4.0),
              NoiseResult(["c1", "c3"], [0, 0], tp, tp, tp, {}))
    with pytest.raises(UserInputError, match="evaluated on other slices"):
        ablation_statistics(options, variants)


def test_the_command_line_takes_seeds_and_explains_the_intervals():
    from nnunet_ima.cli import build_parser
    parser = build_parser("ablation")
    args = parser.parse_args(["ablation", "-d", "990", "--workdir", "w", "--seeds", "0", "1",
                              "2", "--bootstrap", "500"])
    assert (tuple(args.seeds), args.bootstrap) == ((0, 1, 2), 500)
    shown = " ".join(parser.commands["ablation"].format_help().split())
    assert "--seeds SEEDS [SEEDS ...]" in shown and "95 % bootstrap interval" in shown
    assert "paired difference against the Adv model with the best TVDI AUC" in shown
