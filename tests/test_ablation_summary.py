"""``nnunet-ima ablation-summary``: hand-made ablation.json files of several datasets side by
side, the count of datasets where each model is undominated, the default by the evidence, its
tie rule, and its refusals."""
import dataclasses
import json

import pytest

from nnunet_ima.cli import main
from nnunet_ima.errors import UserInputError
from nnunet_ima.nnunet.ablation import AblationOptions
from nnunet_ima.nnunet.ablation_summary import (SummaryOptions, choose_default, read_ablations,
                                                rerun_command, run_summary)


def _row(name, kind, clean, auc, dominated_by=()):
    """A row of ablation.json as write_report writes it (the fields the summary reads)."""
    row = {"name": name, "kind": kind, "clean_tvdi": clean, "auc_tvdi": auc,
           "statistics": {"clean_tvdi": {"mean": clean}, "auc_tvdi": {"mean": auc},
                          "per_seed": {}}, "reference": None}
    if dominated_by is not None:
        row["statistics"]["dominated_by"] = list(dominated_by)
    return row


def _workdir(tmp_path, folder, dataset, cases, seeds=(0, 1, 2), dataset_name=True):
    """A workdir whose ablation.json holds ``cases``: case set -> rows."""
    workdir = tmp_path / folder
    workdir.mkdir()
    options = dataclasses.asdict(AblationOptions(
        dataset=str(int(dataset.split("_")[0].replace("Dataset", ""))) if dataset_name
        else dataset,
        workdir=str(workdir), cases=tuple(cases), seeds=tuple(seeds)))
    record = {"options": json.loads(json.dumps(options)), "cases": cases}
    if dataset_name:
        record["dataset_name"] = dataset
    (workdir / "ablation.json").write_text(json.dumps(record))
    return str(workdir)


def _three_datasets(tmp_path):
    """ima_authors is undominated on A and C, ima_printed on B only (val cases); on the test
    cases it is the other way round."""
    a = _workdir(tmp_path, "a", "Dataset001_A", {
        "val": [_row("clean", "clean", 90.0, 50.0, ["adv8"]),
                _row("adv8", "adv", 80.0, 62.0),
                _row("trades8", "baseline", 78.0, 63.0),
                _row("ima_authors", "ima", 85.0, 60.5),
                _row("ima_printed", "ima", 84.0, 58.0, ["adv8"])],
        "test": [_row("adv8", "adv", 81.0, 61.0),
                 _row("ima_authors", "ima", 80.0, 55.0, ["adv8"]),
                 _row("ima_printed", "ima", 82.0, 61.5)]})
    b = _workdir(tmp_path, "b", "Dataset002_B", {
        "val": [_row("adv8", "adv", 70.0, 52.0),
                _row("trades8", "baseline", 71.0, 53.0),
                _row("ima_authors", "ima", 69.0, 50.0, ["adv8", "trades8"]),
                _row("ima_printed", "ima", 72.0, 51.0)]}, seeds=(0,))
    c = _workdir(tmp_path, "c", "Dataset003_C", {
        "val": [_row("adv8", "adv", 60.0, 40.0),
                _row("ima_authors", "ima", 61.0, 41.0),
                _row("ima_printed", "ima", 58.0, 39.0, ["adv8"])]})
    return a, b, c


def _cells(table, name):
    (line,) = [line for line in table.splitlines() if line.startswith(f"| {name} |")]
    return [c.strip() for c in line.strip("|").split("|")]


def test_the_table_the_counts_and_the_default_by_hand(tmp_path):
    a, b, c = _three_datasets(tmp_path)
    text = run_summary(SummaryOptions(workdirs=[a, b, c]))
    val, test = text.split("The same models on the test cases")
    header = _cells(val, "model")
    assert header == ["model", "kind", "Dataset001_A (3 seeds)", "Dataset002_B (1 seed)",
                      "Dataset003_C (3 seeds)", "undominated on"]
    assert _cells(val, "ima_authors") == [
        "ima_authors", "ima", "85.00 / 60.50, undominated",
        "69.00 / 50.00, dominated by adv8, trades8", "61.00 / 41.00, undominated", "2 of 3"]
    assert _cells(val, "ima_printed")[-1] == "1 of 3"
    assert _cells(val, "trades8") == ["trades8", "baseline", "78.00 / 63.00, undominated",
                                      "71.00 / 53.00, undominated", "-", "2 of 2"]
    assert _cells(val, "clean")[-1] == "0 of 1"
    assert "default by the evidence: ima_authors (undominated on 2 of 3 datasets, val cases)" \
        in val
    # B and C hold fewer non-IMA models: fewer can dominate there
    assert ("missing: Dataset002_B (1 seed): clean; Dataset003_C (3 seeds): clean, trades8."
            in val)
    # the test cases, for the same models, where present: reported, not chosen on
    assert "reported only: the choice above is made on the val cases" in test
    assert _cells(test, "ima_printed")[1:] == ["ima", "82.00 / 61.50, undominated", "1 of 1"]
    assert _cells(test, "trades8")[1:] == ["baseline", "-", "-"]
    assert "default by the evidence" not in test
    # chosen on the test cases, it is ima_printed, and the text says what that costs
    on_test = run_summary(SummaryOptions(workdirs=[a], cases="test"))
    assert "default by the evidence: ima_printed (undominated on 1 of 1 datasets, test cases)" \
        in on_test and "no longer held-out evidence" in on_test


def test_candidates_restrict_the_choice(tmp_path):
    a, b, c = _three_datasets(tmp_path)
    ablations = read_ablations([a, b, c], "val")
    assert choose_default(ablations, "val", ["ima_printed"])[0] == "ima_printed"
    with pytest.raises(UserInputError, match="--candidates adv8: a model of kind adv, not an "
                                             "IMA reading; choose from ima_authors, ima_printed"):
        choose_default(ablations, "val", ["adv8"])
    with pytest.raises(UserInputError, match="--candidates ima_bogus: no report holds"):
        choose_default(ablations, "val", ["ima_bogus"])


def test_no_ima_reading_undominated_names_what_is(tmp_path):
    a = _workdir(tmp_path, "a", "Dataset001_A", {"val": [
        _row("adv8", "adv", 80.0, 62.0), _row("nfgsm8", "baseline", 79.0, 64.0),
        _row("ima_authors", "ima", 75.0, 60.0, ["adv8"])]})
    b = _workdir(tmp_path, "b", "Dataset002_B", {"val": [
        _row("adv8", "adv", 80.0, 62.0), _row("nfgsm8", "baseline", 78.0, 60.0, ["adv8"]),
        _row("ima_authors", "ima", 75.0, 60.0, ["nfgsm8", "adv8"])]})
    name, line = choose_default(read_ablations([a, b], "val"), "val")
    assert name is None
    assert line == ("no IMA reading is undominated on any dataset (val cases): undominated are "
                    "adv8 on 2 of 2, nfgsm8 on 1 of 2")


def test_ties_go_to_the_better_mean_rank_of_tvdi_auc_then_of_clean_tvdi(tmp_path):
    """p and q are undominated on one dataset each. Their TVDI AUC ranks: p 1 and 2, q 2 and 1
    (mean 1.5 each); clean TVDI ranks: p 2 and 2, q 1 and 1: q."""
    def two(p_auc_on_b):
        root = tmp_path / f"tie{p_auc_on_b:g}"
        root.mkdir()
        return [
            _workdir(root, "a", "Dataset001_A", {"val": [
                _row("adv", "adv", 50.0, 50.0), _row("p", "ima", 80.0, 60.0),
                _row("q", "ima", 82.0, 58.0, ["adv"])]}),
            _workdir(root, "b", "Dataset002_B", {"val": [
                _row("adv", "adv", 50.0, 50.0), _row("p", "ima", 80.0, p_auc_on_b, ["adv"]),
                _row("q", "ima", 81.0, 59.0)]})]
    name, line = choose_default(read_ablations(two(55.0), "val"), "val")
    assert name == "q"
    assert line == ("default by the evidence: q (undominated on 1 of 2 datasets, val cases; "
                    "tied with p, broken by the mean rank over the datasets holding them all of "
                    "TVDI AUC (p 1.5, q 1.5), then of clean TVDI (p 2, q 1), then by name)")
    # p's AUC above q's on B too: AUC ranks p 1, q 2
    assert choose_default(read_ablations(two(65.0), "val"), "val")[0] == "p"


def test_a_tie_without_a_dataset_holding_both_goes_by_name(tmp_path):
    a = _workdir(tmp_path, "a", "Dataset001_A", {"val": [_row("zeta", "ima", 80.0, 60.0)]})
    b = _workdir(tmp_path, "b", "Dataset002_B", {"val": [_row("alpha", "ima", 70.0, 50.0)]})
    name, line = choose_default(read_ablations([a, b], "val"), "val")
    assert name == "alpha" and "broken by name: no dataset holds them all" in line


def test_a_report_written_by_the_ablation_is_read(tmp_path):
    """The ablation.json that write_report writes, read back: its means and dominating models."""
    from test_ablation_dominance import _workdir as ablation_workdir
    from nnunet_ima.nnunet.ablation import write_report
    options, variants = ablation_workdir(tmp_path)
    write_report(options, variants, "Dataset990_SyntheticOrgan")
    text = run_summary(SummaryOptions(workdirs=[options.workdir], cases="test"))
    assert "| Dataset990_SyntheticOrgan (1 seed) |" in text
    assert _cells(text, "clean")[2] == "90.00 / 49.50, dominated by trades4"
    assert _cells(text, "ima_authors")[2] == "85.00 / 60.50, dominated by adv4"
    # ima_printed and authors-lr are undominated; the first of the tie on AUC rank is authors-lr
    assert "default by the evidence: authors-lr (undominated on 1 of 1 datasets, test cases; " \
           "tied with ima_printed" in text


# ------------------------------------------------------------------------------- refusals
def test_a_workdir_without_a_report_is_named_with_the_command_that_makes_it(tmp_path):
    (tmp_path / "w").mkdir()
    w = str(tmp_path / "w")
    with pytest.raises(UserInputError, match=rf"{w} holds no ablation.json: `nnunet-ima "
                                             rf"ablation -d DATASET --workdir {w} \.\.\.` "
                                             rf"writes it"):
        read_ablations([w], "val")
    (tmp_path / "w" / "ablation_options.json").write_text("{}")
    with pytest.raises(UserInputError, match="has not reported yet: run the same command"):
        read_ablations([w], "val")
    with pytest.raises(UserInputError, match="is not a folder"):
        read_ablations([str(tmp_path / "nowhere")], "val")
    (tmp_path / "w" / "ablation.json").write_text("[1, 2]")
    with pytest.raises(UserInputError, match="not a report of nnunet-ima ablation"):
        read_ablations([w], "val")


def test_a_report_from_before_the_dominance_field_asks_for_the_report_again(tmp_path):
    w = _workdir(tmp_path, "old", "Dataset001_A", {"val": [
        _row("adv8", "adv", 80.0, 62.0, dominated_by=None)]})
    with pytest.raises(UserInputError) as e:
        read_ablations([w], "val")
    message = str(e.value)
    assert "written before the report named the models that dominate" in message
    assert "trains and evaluates nothing that is done and only rewrites the report" in message
    # the command of that ablation: its options that differ from the defaults
    assert message.endswith(f"nnunet-ima ablation --dataset 1 --workdir {w} --seeds 0 1 2 "
                            f"--cases val")


def test_a_report_without_the_chosen_case_set_names_the_evaluation_to_run(tmp_path):
    w = _workdir(tmp_path, "t", "Dataset001_A", {"test": [_row("adv8", "adv", 80.0, 62.0)]})
    with pytest.raises(UserInputError, match=r"no report of its val cases \(it has test\): "
                                             r"evaluate them with the same ablation and "
                                             r"--cases test val, which trains nothing again: "
                                             r"nnunet-ima ablation --dataset 1 --workdir \S+ "
                                             r"--seeds 0 1 2 --cases test val$"):
        read_ablations([w], "val")


def test_two_workdirs_of_one_dataset_are_refused(tmp_path):
    a = _workdir(tmp_path, "a", "Dataset001_A", {"val": [_row("p", "ima", 80.0, 60.0)]})
    b = _workdir(tmp_path, "b", "1", {"val": [_row("p", "ima", 80.0, 60.0)]},
                 dataset_name=False)  # a report that names the dataset by the id given
    with pytest.raises(UserInputError, match="are both ablations of 1: the summary counts "
                                             "datasets"):
        read_ablations([a, b], "val")


def test_rerun_command_spells_the_recorded_options():
    options = json.loads(json.dumps(dataclasses.asdict(AblationOptions(
        dataset="990", workdir="elsewhere", variants=("clean", "printed+term"),
        adv_eps=(4.0, 8.0), finetune_lr=0.002))))
    assert rerun_command(options, "my work") == (
        "nnunet-ima ablation --dataset 990 --workdir 'my work' --variants clean printed+term "
        "--adv-eps 4 8 --finetune-lr 0.002")


# ---------------------------------------------------------------------------- command line
def test_the_command_prints_and_writes_the_summary(tmp_path, capsys):
    a, b, c = _three_datasets(tmp_path)
    out = tmp_path / "summary.md"
    assert main(["ablation-summary", a, b, c, "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert out.read_text() in printed and "default by the evidence: ima_authors" in printed
    assert main(["ablation-summary", a, b, "--candidates", "ima_printed"]) == 0
    assert "default by the evidence: ima_printed (undominated on 1 of 2" in \
        capsys.readouterr().out
    assert main(["ablation-summary", a, "--candidates", "ima_printed"]) == 0
    assert "no candidate is undominated on any dataset (val cases): undominated are adv8 on " \
           "1 of 1, trades8 on 1 of 1, ima_authors on 1 of 1" in capsys.readouterr().out
    assert main(["ablation-summary", str(tmp_path / "missing")]) == 2
    assert "nnunet-ima ablation-summary: error: " in capsys.readouterr().err
    assert main(["ablation-summary", a, "--output", str(tmp_path)]) == 2
    assert "is a folder; give a file name" in capsys.readouterr().err


def test_the_help_says_where_to_choose():
    from nnunet_ima.cli import build_parser
    parser = build_parser("ablation-summary")
    args = parser.parse_args(["ablation-summary", "w1", "w2"])
    assert (args.workdirs, args.cases, args.candidates, args.output) == (["w1", "w2"], "val",
                                                                         [], None)
    shown = " ".join(parser.commands["ablation-summary"].format_help().split())
    assert "WORKDIR [WORKDIR ...]" in shown and "{val,test}" in shown
    assert "never on test" in shown and "ties go to the best mean rank of TVDI AUC" in shown
    with pytest.raises(SystemExit):
        parser.parse_args(["ablation-summary", "w", "--cases", "train"])


def test_reports_without_an_ima_reading_are_tabulated_with_nothing_to_choose(tmp_path):
    a = _workdir(tmp_path, "a", "Dataset001_A", {"val": [_row("adv8", "adv", 80.0, 62.0)]})
    text = run_summary(SummaryOptions(workdirs=[a]))
    assert "| adv8 | adv | 80.00 / 62.00, undominated | 1 of 1 |" in text
    assert "no IMA reading (a model of kind ima) in the reports' val cases: nothing to choose " \
           "from" in text
