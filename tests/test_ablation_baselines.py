"""The ablation's baselines and controls: TRADES, N-FGSM, Adv at eps_max, the min slice Dice and
the fine-tunings of the clean model; the tolerant resume key; the cost and saturation columns."""
import csv
import dataclasses
import json
import math
import os

import pytest
import torch

from conftest import _bin
from test_ablation import _fake_results, _options
from nnunet_ima.errors import UserInputError
from nnunet_ima.nnunet import ablation
from nnunet_ima.nnunet.ablation import (build_variants, check_options, collect_results,
                                        collect_statistics, draw_front, final_checkpoint,
                                        markdown_table, model_folder, write_report)
from nnunet_ima.nnunet.settings import settings_from_dict

DATASET = "Dataset990_SyntheticOrgan"


def _by_name(options, dataset=None):
    return {v.name: v for v in build_variants(options, dataset)}


def _resolved(variant):
    return settings_from_dict(variant.settings).to_dict()


def _differences(a, b):
    a, b = _resolved(a), _resolved(b)
    return {k for k in a if a[k] != b[k]}


def test_existing_variants_keep_their_settings(tmp_path):
    """The models a workdir already holds resume only if their settings are what they were."""
    options = _options(tmp_path, variants=["clean", "clean_half_lr", "adv", "adv_constant_lr",
                                           "ima_authors", "authors-lr"], adv_eps=[4.0])
    variants = _by_name(options)
    schedule = {"num_epochs": 10, "num_iterations_per_epoch": 10,
                "num_val_iterations_per_epoch": 2, "seed": 0, "initial_lr": 0.01}
    ima = dict(schedule, pgd_steps=5, eps_max=16.0, binary_steps=5)
    assert {n: (v.trainer, v.kind, v.settings) for n, v in variants.items()} == {
        "clean": ("nnUNetTrainerClean", "clean", schedule),
        "clean_half_lr": ("nnUNetTrainerClean", "clean", dict(schedule, initial_lr=0.005)),
        "adv4": ("nnUNetTrainerAdv", "adv", dict(schedule, pgd_steps=5, adv_eps=4.0)),
        "adv4_constant_lr": ("nnUNetTrainerAdv", "adv", dict(schedule, pgd_steps=5, adv_eps=4.0,
                                                             lr_schedule="constant")),
        "ima_authors": ("nnUNetTrainerIMA", "ima", dict(ima, recipe="authors")),
        "authors-lr": ("nnUNetTrainerIMA", "ima", dict(ima, recipe="authors",
                                                       lr_schedule="poly"))}


def test_baselines_and_controls_differ_from_their_twin_in_one_thing(tmp_path):
    options = _options(tmp_path, variants=["adv", "trades", "nfgsm", "adv_max",
                                           "adv_max_constant_lr", "ima_authors",
                                           "ima_authors_min"], adv_eps=[4.0, 8.0], eps_max=12.0)
    variants = _by_name(options)
    assert list(variants) == ["adv4", "adv8", "trades4", "trades8", "nfgsm4", "nfgsm8",
                              "adv_max", "adv_max_constant_lr", "ima_authors", "ima_authors_min"]
    assert {n: (v.trainer, v.kind) for n, v in variants.items() if not n.startswith("adv")} == {
        "trades4": ("nnUNetTrainerTRADES", "baseline"),
        "trades8": ("nnUNetTrainerTRADES", "baseline"),
        "nfgsm4": ("nnUNetTrainerNFGSM", "baseline"), "nfgsm8": ("nnUNetTrainerNFGSM", "baseline"),
        "ima_authors": ("nnUNetTrainerIMA", "ima"), "ima_authors_min": ("nnUNetTrainerIMA", "ima")}
    assert {variants[n].kind for n in ("adv_max", "adv_max_constant_lr")} == {"adv"}
    # the baselines: Adv's settings, their own attack
    for eps in ("4", "8"):
        assert variants[f"trades{eps}"].settings == variants[f"adv{eps}"].settings
        assert variants[f"nfgsm{eps}"].settings == variants[f"adv{eps}"].settings
    assert variants["adv_max"].settings == dict(variants["adv8"].settings, adv_eps=12.0)
    assert _differences(variants["adv_max_constant_lr"], variants["adv_max"]) == {"lr_schedule"}
    assert _resolved(variants["adv_max_constant_lr"])["lr_schedule"] == "constant"
    assert _differences(variants["ima_authors_min"], variants["ima_authors"]) == {
        "dice_reduce", "dice_absent_class"}
    assert [_resolved(variants[n])[k] for n in ("ima_authors", "ima_authors_min")
            for k in ("dice_reduce", "dice_absent_class")] == ["max", "zero", "min", "one"]


def test_adv_at_eps_max_twice_is_refused(tmp_path):
    with pytest.raises(UserInputError, match=r"variant adv_max trains Adv at --eps-max 8, which "
                                             r"variant adv trains already as adv8.*Drop adv_max "
                                             r"from --variants, or 8 from --adv-eps"):
        build_variants(_options(tmp_path, variants=["adv", "adv_max"], adv_eps=[4.0, 8.0],
                                eps_max=8.0))
    with pytest.raises(UserInputError, match="adv_max_constant_lr.*as adv8_constant_lr"):
        build_variants(_options(tmp_path, variants=["adv_constant_lr", "adv_max_constant_lr"],
                                adv_eps=[8.0], eps_max=8.0))
    # without the twin there is no second model
    assert [v.name for v in build_variants(_options(
        tmp_path, variants=["adv_max", "trades"], adv_eps=[8.0], eps_max=8.0))] == \
        ["adv_max", "trades8"]


def test_unknown_variants_are_told_the_new_names(tmp_path):
    with pytest.raises(UserInputError, match="unknown variant 'tradez'.*trades, nfgsm, adv_max, "
                                             "adv_max_constant_lr, ima_authors_min, ft_adv"):
        build_variants(_options(tmp_path, variants=["tradez"]))


def test_fine_tunings_need_the_clean_model(tmp_path):
    with pytest.raises(UserInputError, match="ft_adv, ft_ima fine-tune the clean model of their "
                                             "seed.*add clean to --variants"):
        build_variants(_options(tmp_path, variants=["adv", "ft_ima", "ft_adv"]))


def test_fine_tunings_start_from_the_clean_model_of_their_seed(tmp_path):
    options = dataclasses.replace(
        _options(tmp_path, variants=["clean", "ft_adv", "ft_ima", "ft_trades", "ft_nfgsm"],
                 adv_eps=[4.0], seeds=[0, 1], finetune_epochs=3, finetune_lr=0.002),
        workdir=os.path.join("relative", "abl"))
    variants = build_variants(options, DATASET)
    assert [(v.name, v.seed) for v in variants] == [
        (n, s) for s in (0, 1) for n in ("clean", "ft_adv4", "ft_ima", "ft_trades4",
                                         "ft_nfgsm4")]
    assert [v.trainer for v in variants[:5]] == ["nnUNetTrainerClean", "nnUNetTrainerAdv",
                                                 "nnUNetTrainerIMA", "nnUNetTrainerTRADES",
                                                 "nnUNetTrainerNFGSM"]
    # ft_ima is an IMA reading (a candidate, never a dominator); the others are fine-tunings
    assert {v.name: v.kind for v in variants if v.name != "clean"} == {
        v.name: "ima" if v.name == "ft_ima" else "finetune"
        for v in variants if v.name != "clean"}
    assert all(v.finetunes == (v.name != "clean") for v in variants)
    for v in variants[1:5] + variants[6:]:
        clean = next(c for c in variants if c.name == "clean" and c.seed == v.seed)
        start = v.settings["finetune_from"]
        assert os.path.isabs(start) and start == os.path.abspath(
            final_checkpoint(model_folder(options, clean, DATASET), 0))
        assert start.endswith(os.path.join("relative", "abl", *(["seed1"] if v.seed else []),
                                           "results", "clean", DATASET,
                                           "nnUNetTrainerClean__nnUNetPlans__2d", "fold_0",
                                           "checkpoint_final.pth"))
        resolved = _resolved(v)
        assert (resolved["num_epochs"], resolved["initial_lr"], resolved["lr_warmup_epochs"],
                resolved["seed"]) == (3, 0.002, 1, v.seed)
    ft_adv, ft_ima = variants[1], variants[2]
    assert ft_adv.settings["adv_eps"] == 4.0 and _resolved(ft_adv)["lr_schedule"] == "poly"
    assert _resolved(ft_ima)["recipe"] == "authors" and _resolved(ft_ima)["eps_max"] == 16.0
    # the same settings in every run: what the trainers' --c compares
    assert build_variants(options, DATASET) == variants
    # without --finetune-lr the fine-tunings take --initial-lr
    default = build_variants(_options(tmp_path, variants=["clean", "ft_adv"], adv_eps=[4.0],
                                      initial_lr=0.03), DATASET)
    assert _resolved(default[1])["initial_lr"] == 0.03 and _resolved(default[1])["num_epochs"] == 5


def _record_trainings(done):
    """A stand-in for run_side_by_side: records each call's commands and leaves the final
    checkpoint of every model of ``done`` (trainer names) it is asked to train."""
    calls = []

    def run(commands, *args):
        calls.append(list(commands))
        for command in commands:
            trainer = command.args[command.args.index("-tr") + 1]
            if trainer in done:
                fold = os.path.join(command.env["nnUNet_results"], DATASET,
                                    f"{trainer}__nnUNetPlans__2d", "fold_0")
                os.makedirs(fold, exist_ok=True)
                open(os.path.join(fold, "checkpoint_final.pth"), "w").close()
    return calls, run


def test_fine_tunings_train_after_every_other_model(tmp_path, monkeypatch):
    options = _options(tmp_path, variants=["ft_adv", "clean", "trades"], adv_eps=[4.0],
                       seeds=[0, 2], jobs=2)
    variants = build_variants(options, DATASET)
    calls, run = _record_trainings({"nnUNetTrainerClean", "nnUNetTrainerTRADES",
                                    "nnUNetTrainerAdv"})
    monkeypatch.setattr(ablation, "run_side_by_side", run)
    ablation.train_all(options, variants, DATASET, {})
    assert [[c.log_name for c in call] for call in calls] == [
        ["train_clean", "train_trades4", "train_clean_seed2", "train_trades4_seed2"],
        ["train_ft_adv4", "train_ft_adv4_seed2"]]
    for command, seed_folder in zip(calls[1], ("", "seed2")):
        with open(command.env["NNUNET_IMA_CONFIG"]) as f:
            start = json.load(f)["finetune_from"]
        assert start == os.path.join(options.workdir, seed_folder, "results", "clean", DATASET,
                                     "nnUNetTrainerClean__nnUNetPlans__2d", "fold_0",
                                     "checkpoint_final.pth")
        assert os.path.isfile(start)
    # everything trained: nothing runs again
    calls.clear()
    ablation.train_all(options, variants, DATASET, {})
    assert calls == [[], []]


def test_fine_tunings_wait_for_their_clean_model(tmp_path, monkeypatch):
    options = _options(tmp_path, variants=["clean", "ft_adv"], adv_eps=[4.0])
    variants = build_variants(options, DATASET)
    calls, run = _record_trainings(set())  # the clean training left no checkpoint
    monkeypatch.setattr(ablation, "run_side_by_side", run)
    with pytest.raises(UserInputError, match="fine-tunings start from .*checkpoint_final.pth, "
                                             "which the clean trainings did not leave"):
        ablation.train_all(options, variants, DATASET, {})
    assert [[c.log_name for c in call] for call in calls] == [["train_clean"]]


def test_a_workdir_recorded_before_the_fine_tuning_options_still_resumes(tmp_path):
    """The record of an earlier version lacks finetune_epochs and finetune_lr: at their defaults
    they are no difference, another value of them is."""
    options = _options(tmp_path, initial_lr=0.02, eval_steps=50)
    old = options.resume_key()
    for name in ("finetune_epochs", "finetune_lr"):
        old.pop(name)
    os.makedirs(options.workdir)
    with open(os.path.join(options.workdir, "ablation_options.json"), "w") as f:
        json.dump(json.loads(json.dumps(old)), f)
    check_options(options)
    check_options(dataclasses.replace(options, variants=("clean", "ft_adv")))
    with pytest.raises(UserInputError, match=r"differing: \['finetune_epochs'\]"):
        check_options(dataclasses.replace(options, finetune_epochs=7))
    with pytest.raises(UserInputError, match=r"differing: \['finetune_lr'\]"):
        check_options(dataclasses.replace(options, finetune_lr=0.001))
    with pytest.raises(UserInputError, match=r"differing: \['eval_steps'\]"):
        check_options(dataclasses.replace(options, eval_steps=100))
    with open(os.path.join(options.workdir, "ablation_options.json")) as f:
        assert json.load(f) == json.loads(json.dumps(old))  # the record is left as it was


def test_a_recorded_fine_tuning_option_is_compared_as_any_other(tmp_path):
    check_options(_options(tmp_path, finetune_epochs=3, finetune_lr=0.001))
    check_options(_options(tmp_path, finetune_epochs=3, finetune_lr=0.001))
    with pytest.raises(UserInputError, match=r"differing: \['finetune_epochs', 'finetune_lr'\]"):
        check_options(_options(tmp_path))  # the defaults differ from what was recorded


def _save_checkpoint(path, starts, ends):
    """A stand-in for nnU-Net's checkpoint: only the logger's epoch times."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"network_weights": {}, "logging": {"epoch_start_timestamps": starts,
                                                   "epoch_end_timestamps": ends}}, path)


def test_seconds_per_epoch_from_the_checkpoint(tmp_path):
    path = str(tmp_path / "fold_0" / "checkpoint_final.pth")
    assert math.isnan(ablation.seconds_per_epoch(path))
    # epochs of 4, 6 and 8 s
    _save_checkpoint(path, [100.0, 110.0, 125.0], [104.0, 116.0, 133.0])
    assert ablation.seconds_per_epoch(path) == pytest.approx(6.0)
    _save_checkpoint(path, [], [])
    assert math.isnan(ablation.seconds_per_epoch(path))


def _write_stats(options, variant, columns):
    """ima_stats.csv of ``variant`` with two epochs of ``columns`` (name -> two values)."""
    fold = os.path.join(model_folder(options, variant, DATASET), "fold_0")
    with open(os.path.join(fold, "ima_stats.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, ["epoch", *columns])
        w.writeheader()
        for epoch in (0, 1):
            w.writerow({"epoch": epoch, **{k: v[epoch] for k, v in columns.items()}})


def _cells(table, name):
    (line,) = [line for line in table.splitlines() if line.startswith(f"| {name} |")]
    return [c.strip() for c in line.strip("|").split("|")]


def test_baselines_are_compared_with_vanilla_adv_only(tmp_path):
    """TRADES and N-FGSM get their rows, intervals and paired differences, but the reference and
    the 'dominated by' column are vanilla Adv's: nfgsm4 has the best AUC and is no reference,
    trades4 is dominated by nfgsm4 too but only the Adv models are named."""
    options = _options(tmp_path, variants=["clean", "adv", "trades", "nfgsm", "ima_authors",
                                           "ima_authors_min"], adv_eps=[4.0, 8.0],
                       noise=[0.0, 4.0, 8.0], seeds=[0, 1], bootstrap=50)
    variants = build_variants(options, DATASET)
    numbers = {"clean": (90.0, 10.0, 0.0), "adv4": (88.0, 40.0, 0.5), "adv8": (80.0, 60.0, 0.5),
               "trades4": (70.0, 45.0, 6.0), "trades8": (60.0, 50.0, 6.0),
               "nfgsm4": (95.0, 70.0, 0.5), "nfgsm8": (85.0, 62.0, 0.5),
               "ima_authors": (85.0, 50.0, 0.5), "ima_authors_min": (84.0, 51.0, 0.5)}
    _fake_results(options, variants, numbers)
    for v in variants:
        # seed 0's epochs last 2 and 4 s, seed 1's 4 and 6 s (+ 10 s for TRADES): mean 4 (14)
        extra = 10.0 if v.trainer == "nnUNetTrainerTRADES" else 0.0
        step = 2.0 if v.seed == 0 else 4.0
        _save_checkpoint(final_checkpoint(model_folder(options, v, DATASET), 0),
                         [0.0, 100.0], [step + extra, 100.0 + step + 2 + extra])
        if v.name == "ima_authors":
            _write_stats(options, v, {"adv_weight": [0.5, 0.5], "margin_mean": [1.0, 3.0],
                                      "margin_saturated": [0.1, 0.25 + 0.5 * v.seed]})
        elif v.name == "trades4":  # a column no Adv-family trainer writes is not shown
            _write_stats(options, v, {"adv_weight": [6.0, 6.0], "margin_saturated": [1, 1]})
    rows = collect_results(options, variants, DATASET, "test")
    table = markdown_table(rows, options, "test")
    header = _cells(table, "model")
    assert header[-4:] == ["mean margin", "saturated %", "s/epoch", "dominated by (Adv)"]
    assert "comparable only between models trained one at a time" in table
    cells = {r.name: dict(zip(header, _cells(table, r.name))) for r in rows}
    # AUC over noise 0, 4, 8 with APGD 1 below: (clean + 3 (robust - 1)) / 4
    assert cells["nfgsm4"]["TVDI AUC"] == "75.50" and cells["adv8"]["TVDI AUC"] == "64.25"
    assert cells["trades4"]["dominated by (Adv)"] == "adv4, adv8"
    assert cells["nfgsm4"]["dominated by (Adv)"] == "none"
    assert cells["adv4"]["dominated by (Adv)"] == ""
    assert [cells[n]["s/epoch"] for n in ("clean", "adv4", "trades4", "nfgsm8")] == \
        ["4.0", "4.0", "14.0", "4.0"]
    # ima_authors: the last epoch's 25 % and 75 % over the seeds; the others have no column
    assert cells["ima_authors"]["saturated %"] == "50.0"
    assert cells["ima_authors"]["mean margin"] == "3.00"
    assert {cells[n]["saturated %"] for n in cells if n != "ima_authors"} == {"-"}

    statistics = collect_statistics(options, variants, "test")
    assert statistics.reference == "adv8"
    d = statistics.rows["nfgsm4"]
    # every slice of every model lies as far from its number: the paired differences are exact
    assert (d.clean_difference.mean, d.auc_difference.mean) == pytest.approx((15.0, 11.25))
    assert d.auc_difference.low == pytest.approx(11.25)

    text = write_report(options, variants, DATASET)
    assert "| nfgsm4 | 95.00 [" in text and "| +15.00 [+15.00, +15.00]" in text
    with open(os.path.join(options.workdir, "ablation.json")) as f:
        saved = {r["name"]: r for r in json.load(f)["cases"]["test"]}
    assert saved["trades4"]["seconds_per_epoch"] == pytest.approx(14.0)
    assert saved["trades4"]["kind"] == "baseline" and saved["trades4"]["reference"] == "adv8"
    assert saved["ima_authors"]["margin_saturated"] == pytest.approx(0.5)
    assert saved["trades8"]["adv_eps"] == 8.0


def test_the_picture_shows_each_kind_apart_from_the_adv_front(tmp_path, monkeypatch):
    options = _options(tmp_path, variants=["clean", "adv", "trades", "ima_authors"],
                       adv_eps=[4.0, 8.0], noise=[0.0, 4.0])
    variants = build_variants(options, DATASET)
    _fake_results(options, variants, {
        "clean": (90.0, 10.0, 0.0), "adv4": (88.0, 40.0, 0.5), "adv8": (80.0, 60.0, 0.5),
        "trades4": (70.0, 45.0, 6.0), "trades8": (60.0, 50.0, 6.0),
        "ima_authors": (85.0, 50.0, 0.5)})
    rows = collect_results(options, variants, DATASET, "test")
    # a fine-tuning's row, as the report makes it for ft_* models
    rows.append(dataclasses.replace(rows[1], name="ft_adv4", kind="finetune", clean_tvdi=89.0))
    figures = []
    from nnunet_ima import plotting
    monkeypatch.setattr(plotting, "save_figure", lambda fig, path: figures.append(fig))
    draw_front(rows, str(tmp_path / "front.png"), "title")
    (ax,) = figures[0].axes
    (front,) = ax.lines
    assert list(front.get_xdata()) == [88.0, 80.0]  # adv4, adv8 only
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["Adv (budgets joined)", "IMA variants", "clean", "TRADES / N-FGSM",
                      "fine-tuned from clean"]
    colours = {tuple(c.get_offsets()[0]): c.get_facecolor()[0][:3] for c in ax.collections
               if len(c.get_offsets())}
    from matplotlib.colors import to_rgb
    assert colours[(70.0, rows[3].auc_tvdi)] == pytest.approx(to_rgb("tab:green"))
    assert colours[(89.0, rows[1].auc_tvdi)] == pytest.approx(to_rgb("tab:purple"))


def test_the_command_line_takes_the_fine_tuning_options():
    from nnunet_ima.cli import build_parser
    parser = build_parser("ablation")
    args = parser.parse_args(["ablation", "-d", "990", "--workdir", "w", "--variants", "clean",
                              "ft_adv", "--finetune-epochs", "3", "--finetune-lr", "0.001"])
    assert (args.finetune_epochs, args.finetune_lr) == (3, 0.001)
    defaults = parser.parse_args(["ablation", "-d", "990", "--workdir", "w"])
    assert (defaults.finetune_epochs, defaults.finetune_lr) == (5, None)
    shown = " ".join(parser.commands["ablation"].format_help().split())
    assert "baselines and controls: trades, nfgsm" in shown and "ft_ima" in shown
    with pytest.raises(UserInputError, match="--finetune-lr must be > 0"):
        ablation.check_values(ablation.AblationOptions(dataset="990", workdir="w",
                                                       finetune_lr=0.0))
    with pytest.raises(UserInputError, match="--finetune-epochs must be a whole number >= 1"):
        ablation.check_values(ablation.AblationOptions(dataset="990", workdir="w",
                                                       finetune_epochs=0))


@pytest.mark.slow
def test_baselines_and_a_fine_tuning_end_to_end(nnunet_workspace, tmp_path):
    """clean, TRADES, N-FGSM and Adv fine-tuning the clean model: real trainings, the
    fine-tuning after the clean one and from its checkpoint, one table with every row."""
    ws = nnunet_workspace
    workdir = str(tmp_path / "ablation")
    ws.run([_bin("nnunet-ima"), "ablation", "-d", str(ws.dataset_id), "--workdir", workdir,
            "--variants", "clean", "trades", "nfgsm", "ft_adv", "--adv-eps", "4", "--epochs", "1",
            "--iterations", "2", "--val-iterations", "1", "--pgd-steps", "2",
            "--finetune-epochs", "2", "--noise", "0", "4", "--eval-steps", "2",
            "--attacks", "pgd", "--max-slices", "2", "--bootstrap", "20"], timeout=1800)
    with open(os.path.join(workdir, "ablation.md")) as f:
        text = f.read()
    for name in ("clean", "trades4", "nfgsm4", "ft_adv4"):
        assert f"| {name} |" in text
    # no vanilla Adv from scratch: the differences are paired against the fine-tuned Adv
    assert "| s/epoch |" in text and "Differences are paired against ft_adv4" in text
    assert "| ft_adv4 | " in text and "| reference | reference |" in text
    results = os.path.join(workdir, "results")
    clean = os.path.join(results, "clean", ws.dataset_name,
                         "nnUNetTrainerClean__nnUNetPlans__2d", "fold_0", "checkpoint_final.pth")
    tuned = os.path.join(results, "ft_adv4", ws.dataset_name,
                         "nnUNetTrainerAdv__nnUNetPlans__2d", "fold_0")
    with open(os.path.join(tuned, "ima_config.json")) as f:
        config = json.load(f)
    assert config["finetune_from"] == clean and config["num_epochs"] == 2
    assert os.path.getmtime(os.path.join(tuned, "checkpoint_final.pth")) > os.path.getmtime(clean)
    with open(os.path.join(workdir, "ablation.json")) as f:
        rows = {r["name"]: r for r in json.load(f)["cases"]["test"]}
    assert rows["ft_adv4"]["kind"] == "finetune" and rows["trades4"]["kind"] == "baseline"
    assert all(r["seconds_per_epoch"] > 0 for r in rows.values())


# ------------------------------------------------------------------------- --baseline-eps
BUDGETED = ["clean", "adv", "trades", "nfgsm", "ft_adv", "ft_trades", "ft_nfgsm", "ft_ima"]


def test_baseline_budgets_choose_which_baselines_are_built(tmp_path):
    """--baseline-eps 8: one model of each baseline and Adv-family fine-tuning, named and set up
    as the model of that budget the default builds; ft_ima and the Adv models are unchanged."""
    every = _by_name(_options(tmp_path, variants=BUDGETED), DATASET)   # --adv-eps 4 8 16
    assert [n for n in every if n.startswith(("trades", "ft_trades"))] == [
        "trades4", "trades8", "trades16", "ft_trades4", "ft_trades8", "ft_trades16"]
    one = _by_name(_options(tmp_path, variants=BUDGETED, baseline_eps=[8.0]), DATASET)
    assert list(one) == ["clean", "adv4", "adv8", "adv16", "trades8", "nfgsm8", "ft_adv8",
                         "ft_trades8", "ft_nfgsm8", "ft_ima"]
    assert all(one[n] == every[n] for n in one)   # same trainer, settings, kind and folder
    # a budget that is no Adv budget: the baselines at it, beside Adv at its own budgets
    other = _by_name(_options(tmp_path, variants=["adv", "trades", "nfgsm"], adv_eps=[4.0],
                              baseline_eps=[6.0, 2.0]))
    assert list(other) == ["adv4", "trades6", "trades2", "nfgsm6", "nfgsm2"]
    assert other["nfgsm2"].settings["adv_eps"] == 2.0
    assert _differences(other["trades6"], other["adv4"]) == {"adv_eps"}


def test_a_workdir_recorded_without_baseline_eps_resumes_with_any(tmp_path):
    """The record the previous version writes (its resume key) has no baseline_eps, and the
    key still has none: the budgets choose models as --variants does, so a workdir of every
    budget takes --baseline-eps 8 and a workdir of one budget takes the default later."""
    options = _options(tmp_path, variants=BUDGETED, eval_steps=50)
    check_options(options)
    with open(os.path.join(options.workdir, "ablation_options.json")) as f:
        recorded = json.load(f)
    assert "baseline_eps" not in recorded and recorded["adv_eps"] == [4.0, 8.0, 16.0]
    assert recorded == json.loads(json.dumps(options.resume_key()))
    check_options(dataclasses.replace(options, baseline_eps=(8.0,)))
    check_options(dataclasses.replace(options, baseline_eps=(2.0, 8.0)))
    with pytest.raises(UserInputError, match=r"differing: \['adv_eps'\]"):
        check_options(dataclasses.replace(options, baseline_eps=(8.0,), adv_eps=(8.0,)))
    with open(os.path.join(options.workdir, "ablation_options.json")) as f:
        assert json.load(f) == recorded  # the record is left as it was


def test_bad_baseline_budgets_are_refused():
    def options(**kw):
        return ablation.AblationOptions(dataset="990", workdir="w", **kw)
    with pytest.raises(UserInputError, match="--baseline-eps must be > 0 and finite, got 0"):
        ablation.check_values(options(baseline_eps=(8.0, 0.0)))
    with pytest.raises(UserInputError, match="--baseline-eps names 8 more than once"):
        ablation.check_values(options(baseline_eps=(8.0, 8.0)))


def test_the_command_line_takes_baseline_budgets():
    from nnunet_ima.cli import build_parser
    parser = build_parser("ablation")
    args = parser.parse_args(["ablation", "-d", "990", "--workdir", "w", "--variants", "adv",
                              "trades", "--baseline-eps", "8"])
    assert args.baseline_eps == [8.0]
    assert parser.parse_args(["ablation", "-d", "990", "--workdir", "w"]).baseline_eps == []
    shown = " ".join(parser.commands["ablation"].format_help().split())
    assert "--baseline-eps BASELINE_EPS [BASELINE_EPS ...]" in shown
    assert "trades, nfgsm (one per --baseline-eps)" in shown


def test_fine_tuned_adv_is_the_reference_where_no_adv_trained_from_scratch(tmp_path):
    from nnunet_ima.nnunet.ablation import by_name, reference_candidates
    tunings = build_variants(_options(tmp_path, variants=["clean", "ft_adv", "ft_ima", "ft_nfgsm"],
                                      adv_eps=[4.0, 8.0]), DATASET)
    assert reference_candidates(by_name(tunings)) == ["ft_adv4", "ft_adv8"]
    # with vanilla Adv from scratch, only it is a reference
    mixed = build_variants(_options(tmp_path, variants=["clean", "adv", "ft_adv"],
                                    adv_eps=[4.0]), DATASET)
    assert reference_candidates(by_name(mixed)) == ["adv4"]
    assert reference_candidates(by_name(build_variants(
        _options(tmp_path, variants=["clean", "ft_ima"]), DATASET))) == []


def test_adv_fine_tuning_at_eps_max_is_ft_imas_control(tmp_path):
    """ft_adv_max fine-tunes Adv at --eps-max from the same clean model, with the same schedule
    as ft_ima: it differs from the ft_adv of that budget in nothing, and is refused beside it."""
    options = _options(tmp_path, variants=["clean", "ft_adv", "ft_adv_max", "ft_ima"],
                       adv_eps=[4.0], eps_max=12.0)
    variants = _by_name(options, DATASET)
    assert list(variants) == ["clean", "ft_adv4", "ft_adv_max", "ft_ima"]
    control = variants["ft_adv_max"]
    assert (control.trainer, control.kind, control.finetunes) == ("nnUNetTrainerAdv", "finetune",
                                                                  True)
    assert _differences(control, variants["ft_adv4"]) == {"adv_eps"}
    assert _resolved(control)["adv_eps"] == 12.0 == _resolved(variants["ft_ima"])["eps_max"]
    assert control.settings["finetune_from"] == variants["ft_ima"].settings["finetune_from"]
    # a fine-tuned Adv: a reference candidate where no Adv is trained from scratch
    assert "ft_adv_max" in ablation.reference_candidates(ablation.by_name(list(variants.values())))
    with pytest.raises(UserInputError, match=r"ft_adv_max fine-tunes Adv at --eps-max 12, which "
                                             r"variant ft_adv trains already as ft_adv12"):
        build_variants(_options(tmp_path, variants=["clean", "ft_adv", "ft_adv_max"],
                                adv_eps=[4.0], baseline_eps=[4.0, 12.0], eps_max=12.0))


def test_a_variant_spelled_with_a_budget_builds_that_model_alone(tmp_path):
    """``ft_trades10`` is the model ``ft_trades`` builds at budget 10, whatever the budget
    options say, so one run can fine-tune Adv at two budgets and TRADES at one."""
    options = _options(tmp_path, variants=["clean", "ft_adv", "ft_trades10", "nfgsm4", "adv8"],
                       adv_eps=[10.0, 20.0])
    variants = _by_name(options, DATASET)
    assert list(variants) == ["clean", "ft_adv10", "ft_adv20", "ft_trades10", "nfgsm4", "adv8"]
    # the same model, settings and folder as the default expansion builds
    full = _by_name(_options(tmp_path, variants=["clean", "ft_trades", "nfgsm", "adv"],
                             adv_eps=[4.0, 8.0, 10.0]), DATASET)
    for name in ("ft_trades10", "nfgsm4", "adv8"):
        assert variants[name] == full[name]
    assert ablation.family_and_budgets("ft_adv2.5", options) == ("ft_adv", (2.5,))
    assert ablation.family_and_budgets("adv", options) == ("adv", (10.0, 20.0))
    assert ablation.family_and_budgets("ima_authors", options) == ("ima_authors", None)
    # the checks see through the spelling
    with pytest.raises(UserInputError, match="ft_trades10 fine-tune the clean model"):
        build_variants(_options(tmp_path, variants=["ft_trades10"]))
    with pytest.raises(UserInputError, match="repeat a model"):
        build_variants(_options(tmp_path, variants=["clean", "ft_trades", "ft_trades10"],
                                adv_eps=[10.0]))
    with pytest.raises(UserInputError, match="ft_adv_max fine-tunes Adv at --eps-max 12"):
        build_variants(_options(tmp_path, variants=["clean", "ft_adv12", "ft_adv_max"],
                                eps_max=12.0))
    with pytest.raises(UserInputError, match="unknown variant 'ft_tradesX'"):
        build_variants(_options(tmp_path, variants=["clean", "ft_tradesX"]))
