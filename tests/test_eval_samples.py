"""Test-slice selection, part files and output safety of nnunet-ima-eval (no nnU-Net run needed)."""
import json
import os

import numpy as np
import pytest
import torch

from nnunet_ima.errors import UserInputError
from nnunet_ima.evaluation.models import stride_divisor
from nnunet_ima.evaluation.report import atomic_write_bytes, load_part, part_path, save_part
from nnunet_ima.evaluation.robustness import NoiseResult, _batches, _generator
from nnunet_ima.evaluation.samples import (SliceSample, _slices_of, cases_from_source,
                                           limit_slices, resolve_case_source)


def _case(seg_slices):
    seg = np.asarray(seg_slices, dtype=np.int16)[None]            # (1, D, H, W)
    data = np.arange(seg.size, dtype=np.float32).reshape(seg.shape)  # (C=1, D, H, W)
    return data, seg


def test_slices_map_outside_nonzero_to_background_and_skip_empty_ones():
    # Slice 0: only -1 (outside the nonzero region) and background: empty.
    # Slice 1: organ next to -1 pixels. Slice 2: only the ignore label (3): empty.
    data, seg = _case([[[-1, 0], [0, -1]], [[-1, 1], [2, 0]], [[3, 0], [0, 0]]])
    samples = _slices_of("c", data, seg, include_empty=False, ignore_label=3)
    assert [s.index for s in samples] == [1]
    np.testing.assert_array_equal(samples[0].label, [[0, 1], [2, 0]])
    np.testing.assert_array_equal(samples[0].image, data[:, 1])
    everything = _slices_of("c", data, seg, include_empty=True, ignore_label=3)
    assert [s.index for s in everything] == [0, 1, 2]
    assert everything[0].label.min() == 0 and everything[2].label[0, 0] == 3


def test_default_cases_are_the_test_split_else_the_validation_fold(tmp_path):
    splits = [{"train": ["a", "b"], "val": ["c"]}, {"train": ["a", "c"], "val": ["b"]}]
    (tmp_path / "splits_final.json").write_text(json.dumps(splits))
    assert resolve_case_source(str(tmp_path), None) == ["val"]
    assert cases_from_source(str(tmp_path), None, 1) == ["b"]
    (tmp_path / "test_cases.json").write_text(json.dumps({"test": ["t1", "t2"], "seed": 0}))
    assert resolve_case_source(str(tmp_path), None) == ["test"]
    assert cases_from_source(str(tmp_path), None, 0) == ["t1", "t2"]
    assert cases_from_source(str(tmp_path), ["val"], 0) == ["c"]
    assert cases_from_source(str(tmp_path), ["x", "y"], 0) == ["x", "y"]
    assert cases_from_source(str(tmp_path), ["test", "val"], 1) == ["t1", "t2", "b"]
    with pytest.raises(UserInputError, match="2 folds, fold 5"):
        cases_from_source(str(tmp_path), ["val"], 5)
    with pytest.raises(UserInputError, match=r"\['x'\] more than once"):
        cases_from_source(str(tmp_path), ["x", "y", "x"], 0)
    with pytest.raises(UserInputError, match=r"\['b'\] more than once"):
        cases_from_source(str(tmp_path), ["val", "b"], 1)


def test_an_empty_case_set_suggests_the_set_that_has_cases(tmp_path):
    splits = [{"train": ["a", "b"], "val": ["c"]}, {"train": ["a", "b", "c"], "val": []}]
    (tmp_path / "splits_final.json").write_text(json.dumps(splits))
    (tmp_path / "test_cases.json").write_text(json.dumps({"test": [], "seed": 0}))
    with pytest.raises(UserInputError, match="lists no test cases; use --cases val$"):
        cases_from_source(str(tmp_path), None, 0)  # the default set is test
    with pytest.raises(UserInputError, match="lists no test cases; name the cases with --cases"):
        cases_from_source(str(tmp_path), ["test"], 1)  # fold 1 has no validation cases either
    (tmp_path / "test_cases.json").write_text(json.dumps({"test": ["t"], "seed": 0}))
    with pytest.raises(UserInputError, match="fold 1 of .* has no validation cases; use --cases test$"):
        cases_from_source(str(tmp_path), ["val"], 1)
    with pytest.raises(UserInputError, match="fold all has no validation cases.*--cases test"):
        cases_from_source(str(tmp_path), ["val"], "all")


def test_val_cases_come_from_the_training_record_where_the_model_has_one(tmp_path):
    from nnunet_ima.nnunet.training_record import write_training_record
    # Today's split (rewritten after training): fold 0 validates on c.
    (tmp_path / "splits_final.json").write_text(json.dumps(
        [{"train": ["a", "b"], "val": ["c"]}, {"train": ["a", "c"], "val": ["b"]}]))
    fold_folder = tmp_path / "Trainer__nnUNetPlans__2d" / "fold_0"
    fold_folder.mkdir(parents=True)
    # No record (a plain nnU-Net trainer): today's split.
    assert cases_from_source(str(tmp_path), ["val"], 0, str(fold_folder)) == ["c"]
    # The record says fold 0 trained on c and validated on a and b: those are its val cases.
    write_training_record(str(fold_folder), 0, ["c"], ["b", "a"], None)
    assert cases_from_source(str(tmp_path), ["val"], 0, str(fold_folder)) == ["b", "a"]
    assert cases_from_source(str(tmp_path), None, 0, str(fold_folder)) == ["b", "a"]
    # Also where today's split no longer has the fold, or no longer exists.
    fold_1 = tmp_path / "Trainer__nnUNetPlans__2d" / "fold_1"
    write_training_record(str(fold_1), 1, ["a", "b"], ["c"], None)
    (tmp_path / "splits_final.json").write_text(json.dumps([{"train": ["a"], "val": ["b"]}]))
    assert cases_from_source(str(tmp_path), ["val"], 1, str(fold_1)) == ["c"]
    (tmp_path / "splits_final.json").unlink()
    assert cases_from_source(str(tmp_path), ["val"], 0, str(fold_folder)) == ["b", "a"]
    # A record of another fold (a copied folder) does not name fold 1's validation cases.
    (tmp_path / "splits_final.json").write_text(json.dumps(
        [{"train": ["a", "b"], "val": ["c"]}, {"train": ["a", "c"], "val": ["b"]}]))
    assert cases_from_source(str(tmp_path), ["val"], 1, str(fold_folder)) == ["b"]
    # A record without validation cases says so, and names the record.
    write_training_record(str(fold_folder), 0, ["a", "b", "c"], [], None)
    with pytest.raises(UserInputError, match=f"the training record {fold_folder}/"
                                             f"training_cases.json lists no validation cases"):
        cases_from_source(str(tmp_path), ["val"], 0, str(fold_folder))
    # A damaged record is one error naming it, not today's split read in silence.
    (fold_folder / "training_cases.json").write_text("{")
    with pytest.raises(UserInputError, match=f"cannot read {fold_folder}/training_cases.json"):
        cases_from_source(str(tmp_path), ["val"], 0, str(fold_folder))


def test_max_slices_is_a_seeded_subset_in_order():
    samples = [SliceSample("c", i, np.zeros((1, 2, 2), np.float32), np.zeros((2, 2), np.int16))
               for i in range(20)]
    picked = [s.index for s in limit_slices(samples, 5, seed=1)]
    assert picked == sorted(picked) and len(set(picked)) == 5
    assert picked == [s.index for s in limit_slices(samples, 5, seed=1)]
    assert picked != [s.index for s in limit_slices(samples, 5, seed=2)]
    assert limit_slices(samples, 50, seed=1) == samples


def test_batches_never_mix_shapes():
    shapes = [(1, 8, 8), (1, 8, 16), (1, 8, 8), (1, 8, 8), (1, 8, 16)]
    samples = [SliceSample("c", i, np.zeros(s, np.float32), np.zeros(s[1:], np.int16))
               for i, s in enumerate(shapes)]
    batches = _batches(samples, 2)
    assert sorted(i for b in batches for i in b) == list(range(5))
    for b in batches:
        assert len(b) <= 2 and len({shapes[i] for i in b}) == 1


def test_random_start_generator_is_a_cpu_generator_fixed_by_its_key():
    a, b = _generator(0, 5.0, 1), _generator(0, 5.0, 1)
    assert a.device.type == "cpu"
    assert torch.equal(torch.randn(4, generator=a), torch.randn(4, generator=b))
    assert not torch.equal(torch.randn(4, generator=_generator(0, 5.0, 2)),
                           torch.randn(4, generator=_generator(0, 15.0, 2)))


def test_stride_divisor_multiplies_the_stage_strides():
    assert stride_divisor([[1, 1], [2, 2], [2, 2], [2, 1]]) == (8, 4)
    assert stride_divisor([1, 2, 2, 2]) == (8, 8)


def _result(keys):
    n = len(keys)
    counts = np.arange(2 * n, dtype=np.int64).reshape(n, 2)
    return NoiseResult([k[0] for k in keys], [k[1] for k in keys], counts, counts + 1, counts + 2,
                       {"label": np.ones((3, 3), np.int16)})


def test_parts_round_trip_and_refuse_other_slices(tmp_path):
    keys = [("a", 3), ("a", 4), ("b", 0)]
    path = part_path(str(tmp_path), "nnUNetTrainer IMA/x", 0.25)
    assert os.path.basename(path) == "nnUNetTrainer_IMA_x__noise0.25.npz"
    save_part(path, _result(keys))
    loaded = load_part(path, keys)
    np.testing.assert_array_equal(loaded.fp, _result(keys).fp)
    assert loaded.example["label"].shape == (3, 3)
    with pytest.raises(UserInputError, match="other test slices"):
        load_part(path, keys[:2] + [("b", 1)])
    with open(path, "wb") as f:
        f.write(b"not a part")
    with pytest.raises(UserInputError, match="delete it"):
        load_part(path, keys)


def test_atomic_write_leaves_the_old_file_when_interrupted(tmp_path, monkeypatch):
    from nnunet_ima.evaluation import report
    path = tmp_path / "summary.json"
    path.write_text("old")

    def killed(src, dst):
        raise KeyboardInterrupt
    monkeypatch.setattr(report.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_bytes(str(path), b"new")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["summary.json"]  # no temporary file left behind
    monkeypatch.undo()
    atomic_write_bytes(str(path), b"new")
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["summary.json"]


class _FakeDataset:
    """What nnUNetTrainer.do_split needs of a dataset class."""

    def __init__(self, identifiers):
        self.ids = list(identifiers)

    def get_identifiers(self, folder):
        return list(self.ids)

    def __call__(self, folder, identifiers=None, folder_with_segs_from_previous_stage=None):
        dataset = type("D", (), {})()
        dataset.identifiers = list(self.ids)
        return dataset


def _nnunet_do_split(folder, identifiers, fold):
    """nnU-Net 2.8.1's own choice of training cases, run on a stand-in trainer."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    trainer = type("T", (), {})()
    trainer.dataset_class = _FakeDataset(identifiers)
    trainer.fold = fold
    trainer.preprocessed_dataset_folder = str(folder)
    trainer.preprocessed_dataset_folder_base = str(folder)
    trainer.folder_with_segs_from_previous_stage = None
    trainer.print_to_log_file = lambda *a, **k: None
    train, _ = nnUNetTrainer.do_split(trainer)
    return sorted(str(c) for c in train)


@pytest.mark.parametrize("fold", ["all", 0, 1, 4, 5, 7])
@pytest.mark.parametrize("with_splits", [True, False])
def test_training_cases_are_those_nnunet_trains_on(tmp_path, fold, with_splits):
    """Fold all: every case; a fold in splits_final.json: its train list; a fold beyond it:
    nnU-Net's seeded 80:20 split; no splits_final.json: nnU-Net's 5-fold split."""
    from nnunet_ima.evaluation.training_cases import nnunet_training_cases
    identifiers = [f"case_{i:02d}" for i in range(11)]
    splits = None
    if with_splits:
        splits = [{"train": identifiers[2:], "val": identifiers[:2]},
                  {"train": identifiers[:2] + identifiers[4:], "val": identifiers[2:4]}]
        (tmp_path / "splits_final.json").write_text(json.dumps(splits))
    ours = nnunet_training_cases(splits, identifiers[::-1], fold)  # any order of identifiers
    assert ours == _nnunet_do_split(tmp_path, identifiers, fold)
    if fold == "all":
        assert ours == identifiers


def test_overlap_and_its_refusal_message_name_models_and_cases():
    from nnunet_ima.evaluation.training_cases import footnote, refusal_message, trained_on
    overlap = trained_on({"A_fold0": ["t1", "t2"], "A_foldall": ["t1", "t2"]},
                         {"A_fold0": ["x", "y"], "A_foldall": ["t2", "t1", "x"]})
    assert overlap == {"A_foldall": ["t1", "t2"]}
    message = refusal_message(overlap, {"A_fold0": 0, "A_foldall": "all"})
    assert "A_foldall (fold all): t1, t2" in message and "--allow-train-cases" in message
    assert "fold 'all' trains on every preprocessed case" in message
    assert "fold 'all'" not in refusal_message({"B": ["t1"]}, {"B": 1})
    assert footnote({}) == ""
    assert "A_foldall on t1, t2" in footnote(overlap)


def test_fold_all_and_folds_beyond_the_split_have_no_validation_cases_to_offer(tmp_path):
    (tmp_path / "splits_final.json").write_text(json.dumps([{"train": ["a"], "val": ["b"]}]))
    with pytest.raises(UserInputError, match="fold all has no validation cases"):
        cases_from_source(str(tmp_path), ["val"], "all")
    with pytest.raises(UserInputError, match="1 folds, fold 3 asked.*80:20"):
        cases_from_source(str(tmp_path), ["val"], 3)


def test_markdown_tables_say_when_training_cases_were_scored():
    from nnunet_ima.evaluation.report import markdown_table
    entry = {"noise": {"0": {"tvdi": 0.5, "adi": 0.5}}}
    config = {"steps": 1, "models": {"m": {"cases": ["t1", "c"], "train_cases_scored": ["c"]},
                                     "n": {"cases": ["t1"]}}}
    table = markdown_table({"config": config, "models": {"m": entry, "n": entry}}, "tvdi", [0.0])
    assert table.splitlines()[-1] == ("Note: training cases were scored (--allow-train-cases): "
                                      "m on c. These numbers are not held-out results.")
    del config["models"]["m"]["train_cases_scored"]
    assert "Note" not in markdown_table({"config": config, "models": {"m": entry}}, "tvdi", [0.0])
