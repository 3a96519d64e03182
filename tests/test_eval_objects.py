"""The size and structure breakdown: object counts by hand, the bins, their path through the
ensemble's worst case, the parts on disk, and the evaluator's summary.json and tables."""
import csv
import json

import numpy as np
import pytest
import torch

from nnunet_ima.errors import UserInputError
from nnunet_ima.evaluation import run
from nnunet_ima.evaluation.cli import build_parser, main, options_from_args
from nnunet_ima.evaluation.ensemble import _subset, lowest_dice_choice, select
from nnunet_ima.evaluation.objects import (DEFAULT_SIZE_BINS, DETECTED, FIELDS, INTERSECT,
                                           OBJECTS, PREDICTED_NEAR, VOXELS, batch_object_counts,
                                           bin_names, breakdown, check_size_bins, class_objects,
                                           object_counts, size_bin)
from nnunet_ima.evaluation.options import EvalOptions
from nnunet_ima.evaluation.provenance import PartRecords
from nnunet_ima.evaluation.report import load_part, save_part, summarise
from nnunet_ima.evaluation.robustness import AttackSettings, NoiseResult

from core_models import tiny_segmentation_problem


# ------------------------------------------------------------------------- counts by hand

def _scene():
    """A 12 x 12 map: class 1 has a 16-voxel object A (rows 0-3, cols 0-3) and a 2-voxel
    object B ((8, 8), (8, 9)); class 2 has no object. The prediction finds 12 of A's voxels
    exactly, covers B with a 12-voxel blob (rows 7-9, cols 7-10), has a 1-voxel false positive
    of class 1 at (11, 0) and a class-2 false positive at (5, 5)."""
    label = np.zeros((12, 12), dtype=np.int64)
    label[0:4, 0:4] = 1
    label[8, 8:10] = 1
    pred = np.zeros_like(label)
    pred[0:4, 0:3] = 1
    pred[7:10, 7:11] = 1
    pred[11, 0] = 1
    pred[5, 5] = 2
    return pred, label


def test_each_object_gets_its_size_overlap_and_touching_components_by_hand():
    pred, label = _scene()
    sizes, inter, near = class_objects(pred, label, 1)
    # scipy numbers components in raster order: A first, then B.
    assert sizes.tolist() == [16, 2]
    assert inter.tolist() == [12, 2]
    # A's touching component is its own 12 voxels; B's is the 12-voxel blob swallowing it. The
    # 1-voxel false positive touches neither.
    assert near.tolist() == [12, 12]
    assert [len(v) for v in class_objects(pred, label, 2)] == [0, 0, 0]


def test_counts_per_class_and_bin_and_the_object_dice_by_hand():
    pred, label = _scene()
    counts = object_counts(pred, label, num_classes=3, edges=(4, 10))
    assert counts.shape == (2, 3, len(FIELDS)) and counts.dtype == np.int64
    # B (2 voxels) is in "<4", A (16) in ">=10", nothing in "4-9", class 2 empty.
    assert counts[0, 0].tolist() == [1, 2, 2, 12, 0]     # Dice 4 / 14 < 0.5: missed
    assert counts[0, 1].tolist() == [0, 0, 0, 0, 0]
    assert counts[0, 2].tolist() == [1, 16, 12, 12, 1]   # Dice 24 / 28: detected
    assert not counts[1].any()
    summary = breakdown(counts[None], ["organ", "lesion"], (4, 10))
    assert summary["organ"]["<4"] == {"objects": 1, "voxels": 2,
                                      "object_dice": pytest.approx(4 / 14),
                                      "detected_fraction": 0.0}
    assert summary["organ"][">=10"]["object_dice"] == pytest.approx(24 / 28)
    assert summary["organ"]["4-9"] == {"objects": 0, "voxels": 0, "object_dice": None,
                                       "detected_fraction": None}
    assert all(cell["object_dice"] is None for cell in summary["lesion"].values())


def test_a_false_positive_elsewhere_does_not_lower_an_object_a_swallowing_blob_does():
    label = np.zeros((10, 10), dtype=np.int64)
    label[1:3, 1:3] = 1                                   # a 4-voxel object
    exact = label.copy()
    far = exact.copy()
    far[6:10, 6:10] = 1                                   # 16 false-positive voxels far away
    blob = np.zeros_like(label)
    blob[0:5, 0:5] = 1                                    # 25 voxels swallowing it
    for pred, dice in ((exact, 1.0), (far, 1.0), (blob, 8 / 29)):
        c = object_counts(pred, label, 2, (100,))[0, 0]
        assert 2 * c[INTERSECT] / (c[VOXELS] + c[PREDICTED_NEAR]) == pytest.approx(dice)


def test_components_touching_two_objects_and_two_components_on_one_object():
    label = np.zeros((1, 9), dtype=np.int64)
    label[0, [0, 1, 3, 4, 6, 7, 8]] = 1                   # objects {0,1}, {3,4}, {6,7,8}
    pred = np.zeros_like(label)
    pred[0, 1:5] = 1                                      # one component over the first two
    pred[0, 6] = pred[0, 8] = 1                           # two components on the third
    sizes, inter, near = class_objects(pred, label, 1)
    assert sizes.tolist() == [2, 2, 3]
    assert inter.tolist() == [1, 2, 2]
    # The bridging component's 4 voxels count for both objects it touches; the third object
    # gets both of its 1-voxel components, each once.
    assert near.tolist() == [4, 4, 2]


def test_full_connectivity_in_3d_and_the_detection_threshold_is_inclusive():
    label = np.zeros((3, 4, 4), dtype=np.int64)
    label[0, 0, 0] = label[1, 1, 1] = 1                   # diagonal neighbours: one object
    label[2, 3, 3] = 1                                    # not touching (1, 1, 1): another
    pred = np.zeros_like(label)
    pred[1, 1, 1] = pred[1, 1, 2] = 1                     # one component of 2 voxels
    sizes, inter, near = class_objects(pred, label, 1)
    assert sizes.tolist() == [2, 1] and inter.tolist() == [1, 0] and near.tolist() == [2, 0]
    counts = object_counts(pred, label, 2, (2,))[0]
    # Object Dice 2 * 1 / (2 + 2) = 0.5 exactly: detected. The missed voxel: Dice 0.
    assert counts[1].tolist() == [1, 2, 1, 2, 1]
    assert counts[0].tolist() == [1, 1, 0, 0, 0]


def test_ignore_label_voxels_belong_to_no_object_and_no_component():
    label = torch.tensor([[[1, 1, 1, 1, 3, 3, 0, 3]]])    # (B=1, 1, 8), ignore label 3
    pred = torch.tensor([[[1, 1, 1, 1, 1, 1, 0, 1]]])
    scored = batch_object_counts(pred, label, 3, (100,), ignore_label=3)
    assert scored.shape == (1, 2, 2, 5)
    # Without the ignore voxels the prediction is exactly the 4-voxel object.
    assert scored[0, 0, 0].tolist() == [1, 4, 4, 4, 1]
    assert not scored[0, 1].any()                          # the ignore label is no class
    # Had they been scored, the blob's 6 voxels would count against it (and class 2 does not
    # exist there: label 3 would be a third class).
    plain = batch_object_counts(pred, torch.where(label == 3, 0, label), 2, (100,))
    assert plain[0, 0, 0].tolist() == [1, 4, 4, 6, 1]


def test_a_batch_of_slices_is_counted_per_sample():
    pred, label = _scene()
    preds = torch.from_numpy(np.stack([pred, np.zeros_like(pred)]))
    labels = torch.from_numpy(np.stack([label, label]))
    counts = batch_object_counts(preds, labels, 3, DEFAULT_SIZE_BINS)
    assert counts.shape == (2, 2, 5, 5)
    assert np.array_equal(counts[0], object_counts(pred, label, 3, DEFAULT_SIZE_BINS))
    # Nothing predicted: both objects there, none detected.
    assert counts[1, 0, 0].tolist() == [2, 18, 0, 0, 0]


# ---------------------------------------------------------------------------------- bins

def test_bins_their_names_and_edges():
    assert bin_names(DEFAULT_SIZE_BINS) == ["<64", "64-255", "256-1023", "1024-4095", ">=4096"]
    assert size_bin(np.array([1, 63, 64, 255, 256, 4095, 4096, 10 ** 6]),
                    DEFAULT_SIZE_BINS).tolist() == [0, 0, 1, 1, 2, 3, 4, 4]
    assert check_size_bins([5]) == (5,)
    for bad in ([], [0, 4], [4, 4], [8, 4], [2.5], [True]):
        with pytest.raises(ValueError):
            check_size_bins(bad)


@pytest.mark.parametrize("values, message", [(["64", "32"], "strictly ascending"),
                                             (["0", "8"], "positive integers")])
def test_bad_size_bins_are_a_user_error_naming_the_option(tmp_path, values, message):
    args = build_parser().parse_args(["-d", "2", "-o", str(tmp_path / "o"), "--device", "cpu",
                                      "--size-bins", *values])
    with pytest.raises(UserInputError, match=f"--size-bins .*{message}"):
        options_from_args(args)
    args = build_parser().parse_args(["-d", "2", "-o", str(tmp_path / "o"), "--device", "cpu",
                                      "--size-bins", "8", "32"])
    assert options_from_args(args).size_bins == (8, 32)
    assert EvalOptions(output="o", dataset="2", device="cpu").size_bins == DEFAULT_SIZE_BINS


def test_bad_size_bins_exit_2_with_the_option_named(tmp_path, capsys):
    assert main(["-d", "2", "-o", str(tmp_path / "o"), "--device", "cpu", "--size-bins",
                 "16", "16"]) == 2
    assert "--size-bins" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------- the ensemble's worst case

def _result(member, n=5, k=2, b=3, objects=True):
    """Rows whose every count names (member, row): tp = 10 m + i, objects filled with
    100 m + i, so a row's origin can be read back from any of its arrays."""
    rows = np.arange(n)[:, None]
    tp = np.repeat(10 * member + rows, k, axis=1).astype(np.int64)
    fp = np.full((n, k), member + 1, dtype=np.int64)
    fn = np.full((n, k), 2 * member, dtype=np.int64)
    obj = (np.broadcast_to((100 * member + np.arange(n))[:, None, None, None], (n, k, b, 5))
           .astype(np.int64).copy() if objects else None)
    return NoiseResult([f"c{i}" for i in range(n)], list(range(n)), tp, fp, fn, {}, obj)


def test_select_takes_each_rows_objects_from_the_member_its_counts_come_from():
    results = [_result(m) for m in range(3)]
    choice = np.array([2, 0, 1, 1, 2])
    picked = select(results, choice)
    for i, m in enumerate(choice):
        assert (picked.tp[i] == 10 * m + i).all()
        assert (picked.objects[i] == 100 * m + i).all()
    assert picked.objects.shape == (5, 2, 3, 5)
    # The lowest-Dice choice (different FP per member) moves objects with the counts too.
    worst = select(results, lowest_dice_choice(results))
    for i in range(5):
        m = (worst.tp[i, 0] - i) // 10
        assert (worst.objects[i] == 100 * m + i).all()
    # A part without objects (an old one) leaves the worst case without them.
    assert select([results[0], _result(1, objects=False)], choice % 2).objects is None


def test_subset_replaces_the_attacked_rows_objects_only():
    worst, part = _result(0), _result(1, n=2)
    merged = _subset(worst, [1, 3], part)
    assert [int(merged.objects[i, 0, 0, 0]) for i in range(5)] == [0, 100, 2, 101, 4]
    assert [int(merged.tp[i, 0]) for i in range(5)] == [0, 10, 2, 11, 4]
    assert (worst.objects[1] == 1).all()                   # the input is not changed
    assert _subset(worst, [1, 3], _result(1, n=2, objects=False)).objects is None
    assert _subset(_result(0, objects=False), [1, 3], part).objects is None


# --------------------------------------------------------------------------- parts on disk

def test_a_part_keeps_its_objects_and_an_old_part_reads_without_them(tmp_path):
    new = _result(1)
    save_part(str(tmp_path / "new.npz"), new)
    back = load_part(str(tmp_path / "new.npz"))
    assert np.array_equal(back.objects, new.objects) and back.objects.dtype == np.int64
    # A part as written before object counts existed: the same file without them.
    old = _result(1, objects=False)
    save_part(str(tmp_path / "old.npz"), old)
    with np.load(tmp_path / "old.npz") as z:
        assert "objects" not in z.files
    back_old = load_part(str(tmp_path / "old.npz"))
    assert back_old.objects is None and np.array_equal(back_old.tp, old.tp)
    # Its level has no breakdown; a level with objects has one.
    entry = summarise({0.0: back_old, 1.0: back}, ["a", "b"], (4, 16))
    assert "size_breakdown" not in entry["noise"]["0"]
    assert list(entry["noise"]["1"]["size_breakdown"]["a"]) == ["<4", "4-15", ">=16"]
    # Without bins (a member's own column) no breakdown at all.
    assert "size_breakdown" not in summarise({1.0: back}, ["a", "b"])["noise"]["1"]


# ------------------------------------------------------------- the evaluator end to end

@pytest.mark.usefixtures("one_thread")
def test_the_evaluator_writes_the_breakdown_to_summary_and_tables(tmp_path):
    model, samples = tiny_segmentation_problem()
    options = EvalOptions(output=str(tmp_path / "out"), dataset="x", noise=(0.0, 20.0),
                          attack=AttackSettings(steps=2, batch_size=3), size_bins=(40, 48),
                          device="cpu", progress=False)
    config = {"models": {model.name: {}}, "noise": [0.0, 20.0], "attack": "pgd", "norm": "l2",
              "steps": 2, "alpha": 5.0, "random_start": True, "attack_loss": "dc_ce",
              "seed": 0, "batch_size": 3, "size_bins": [40, 48]}
    records = PartRecords(config, {model.name: "samples"}, {model.name: {"path": "",
                                                                         "sha256": ""}})
    prepared = run.Prepared(options, torch.device("cpu"), [model], {model.name: samples},
                            config, records)
    (tmp_path / "out").mkdir()
    summary = run._finish(prepared, {model.name: {}})
    on_disk = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert on_disk["models"] == json.loads(json.dumps(summary["models"]))
    levels = on_disk["models"][model.name]["noise"]
    # The six rectangles are 6 x 7 = 42 voxels: one object each, all in the "40-47" bin.
    assert model.class_names == ["class1"]
    clean = levels["0"]["size_breakdown"]["class1"]
    assert list(clean) == ["<40", "40-47", ">=48"]
    assert clean["40-47"]["objects"] == 6 and clean["40-47"]["voxels"] == 6 * 42
    assert clean["<40"]["objects"] == 0 and clean["<40"]["object_dice"] is None
    assert clean["40-47"]["object_dice"] > 0.8 and clean["40-47"]["detected_fraction"] == 1.0
    attacked = levels["20"]["size_breakdown"]["class1"]["40-47"]
    assert attacked["objects"] == 6
    assert attacked["object_dice"] < clean["40-47"]["object_dice"]
    with open(tmp_path / "out" / "size_breakdown.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["model", "noise", "class", "bin", "objects", "object_dice",
                             "detected_fraction"]
    assert len(rows) == 2 * len(model.class_names) * 3
    row = next(r for r in rows if r["noise"] == "20" and r["bin"] == "40-47")
    assert float(row["object_dice"]) == pytest.approx(attacked["object_dice"], abs=1e-6)
    assert next(r for r in rows if r["bin"] == "<40")["object_dice"] == ""
    table = (tmp_path / "out" / "size_breakdown.md").read_text()
    assert "| tiny |" in table and "| 40-47 | 6 |" in table and "<40" not in table
    # The part of each level keeps the per-sample counts.
    part = load_part(str(tmp_path / "out" / "parts" / "tiny__noise20.npz"))
    assert part.objects.shape == (6, 1, 3, 5) and (part.objects[:, 0, 1, OBJECTS] == 1).all()
    assert part.objects[:, 0, 1, DETECTED].sum() == round(6 * attacked["detected_fraction"])


def test_ensemble_end_to_end_on_a_trained_model(nnunet_workspace, trained_clean_model, tmp_path):
    """nnunet-ima-eval --attack ensemble on the session's nnU-Net model: the headline and the
    tables carry the breakdown, each member's own column does not."""
    ws = nnunet_workspace
    out = tmp_path / "o"
    assert main(["-d", str(ws.dataset_id), "-c", "2d", "-f", "0", "-tr", "nnUNetTrainerClean",
                 "--device", "cpu", "--no-progress", "-o", str(out), "--attack", "ensemble",
                 "--ensemble", "pgd", "segpgd", "--noise", "0", "8", "--max-slices", "3",
                 "--steps", "2", "--masking-checks", "off", "--size-bins", "32", "256"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["size_bins"] == [32, 256]
    entry = summary["models"]["nnUNetTrainerClean"]["noise"]
    for noise in ("0", "8"):
        per_class = entry[noise]["size_breakdown"]
        assert set(per_class) == set(entry[noise]["per_class"])
        for bins in per_class.values():
            assert list(bins) == ["<32", "32-255", ">=256"]
    assert sum(b["objects"] for c in entry["0"]["size_breakdown"].values()
               for b in c.values()) > 0
    member = summary["ensemble"]["per_attack"]["nnUNetTrainerClean"]["pgd"]["noise"]["8"]
    assert "size_breakdown" not in member
    with open(out / "size_breakdown.csv") as f:
        assert {r["noise"] for r in csv.DictReader(f)} == {"0", "8"}


def test_other_size_bins_make_other_records_and_the_default_is_not_recorded():
    """Edges other than the default change every part's object counts, so their records differ
    (and such parts are recomputed); the default is not recorded, so a folder written before the
    breakdown existed still resumes."""
    from nnunet_ima.evaluation.provenance import record_mismatch
    from test_eval_provenance import _options, _records
    default = _records()
    assert "size_bins" not in default.settings
    same = _records(_options(size_bins=DEFAULT_SIZE_BINS)).record("IMA", 5.0)
    assert record_mismatch(same, default.record("IMA", 5.0)) is None
    other = _records(_options(size_bins=(10, 100)))
    assert other.settings["size_bins"] == [10, 100]
    assert "settings.size_bins" in record_mismatch(other.record("IMA", 5.0),
                                                   default.record("IMA", 5.0))
