"""The ablation's "dominated by (within intervals)": every row against every clean, Adv,
baseline and fine-tuned model, on the same seeds and bootstrap draws, in the intervals table and
in ablation.json; never an IMA reading as the one that dominates."""
import json
import os

import pytest

from test_ablation import _fake_results, _options
from test_ablation_baselines import _cells
from nnunet_ima.nnunet.ablation import (build_variants, collect_results, collect_statistics,
                                        markdown_table, write_report)

DATASET = "Dataset990_SyntheticOrgan"
# name -> (clean TVDI, TVDI under PGD at noise 4, adversarial weight). APGD is 1 point lower,
# so TVDI AUC over noise 0 and 4 = (clean + robust - 1) / 2.
NUMBERS = {"clean": (90.0, 10.0, 0.0),          # AUC 49.5
           "adv4": (88.0, 40.0, 0.5),           # AUC 63.5
           "trades4": (90.0, 30.0, 0.5),        # AUC 59.5: clean's clean TVDI, a better AUC
           "ima_authors": (85.0, 37.0, 0.5),    # AUC 60.5: adv4 is 3 points better on both
           "ima_printed": (86.0, 40.0, 0.5),    # AUC 62.5: adv4 is 2 and 1 better, in the noise
           "authors-lr": (95.0, 70.0, 0.5)}     # AUC 82: better than all, but an IMA reading


def _workdir(tmp_path):
    options = _options(tmp_path, variants=["clean", "adv", "trades", "ima_printed",
                                           "ima_authors", "authors-lr"], adv_eps=[4.0],
                       noise=[0.0, 4.0], bootstrap=200)
    variants = build_variants(options, DATASET)
    # Every slice of a model lies 5 or 3 points from its number (1 x), ima_printed's twice as
    # far: its paired differences from the others vary by draw, the others' are exact.
    _fake_results(options, variants, NUMBERS, spread={"ima_printed": 2})
    return options, variants


def test_dominated_by_within_the_intervals_by_hand(tmp_path):
    options, variants = _workdir(tmp_path)
    statistics = collect_statistics(options, variants, "test")
    rows = statistics.rows
    assert {n: r.auc_tvdi.mean for n, r in rows.items()} == pytest.approx(
        {"clean": 49.5, "adv4": 63.5, "trades4": 59.5, "ima_authors": 60.5, "ima_printed": 62.5,
         "authors-lr": 82.0})
    # adv4 - ima_printed: +2 and +1 overall, 2 - m and 1 - m in a draw whose slices' offsets
    # average m (-5 ... 5): both intervals hold 0, so adv4 does not dominate it.
    printed = rows["ima_printed"]
    assert printed.clean_difference.low < 0 < printed.clean_difference.high
    assert printed.auc_difference.low < 0 < printed.auc_difference.high
    assert {n: r.dominated_by for n, r in rows.items()} == {
        "clean": ["trades4"],      # the same clean TVDI, AUC +10 in every draw
        "adv4": [],                # trades4 is better on clean TVDI only, authors-lr is IMA
        "trades4": [],             # adv4 is better on the AUC only
        "ima_authors": ["adv4"],   # +3 and +3 in every draw; trades4 is worse on the AUC
        "ima_printed": [],         # adv4 better on both means, on neither significantly
        "authors-lr": []}


def test_the_tables_and_the_report_show_it(tmp_path):
    options, variants = _workdir(tmp_path)
    text = write_report(options, variants, DATASET)
    means, intervals = text.split("\n\nIntervals")
    header = _cells(intervals, "model")
    assert header[-1] == "dominated by (within intervals)"
    cells = {n: dict(zip(header, _cells(intervals, n))) for n in NUMBERS}
    assert {n: c[header[-1]] for n, c in cells.items()} == {
        "clean": "trades4", "adv4": "none", "trades4": "none", "ima_authors": "adv4",
        "ima_printed": "none", "authors-lr": "none"}
    assert "IMA readings are never named here" in intervals
    # the means table keeps its own column: vanilla Adv only, on the means alone
    table = markdown_table(collect_results(options, variants, DATASET, "test"), options, "test")
    top = _cells(table, "model")
    adv_column = {n: dict(zip(top, _cells(table, n)))["dominated by (Adv)"] for n in NUMBERS}
    assert adv_column == {"clean": "none", "adv4": "", "trades4": "none",
                          "ima_authors": "adv4", "ima_printed": "adv4", "authors-lr": "none"}
    with open(os.path.join(options.workdir, "ablation.json")) as f:
        saved = json.load(f)
    rows = {r["name"]: r for r in saved["cases"]["test"]}
    assert rows["clean"]["statistics"]["dominated_by"] == ["trades4"]
    assert rows["ima_printed"]["statistics"]["dominated_by"] == []
    assert saved["dataset_name"] == DATASET
