"""benchmarks/correctness_rules.py: the fraction of slices each correctness rule calls correct,
on hand-made counts."""
import math

import numpy as np
import pytest
from benchmark_scripts import load_benchmark_script


@pytest.fixture(scope="module")
def rules():
    return load_benchmark_script("correctness_rules")


def test_fractions_per_rule_hand_computed(rules):
    # slice 0: class 1 perfect, class 2 missed -> max 1, mean 0.5, min 0
    # slice 1: class 1 perfect, class 2 absent -> max 1, mean 1 (present only), min 1
    # slice 2: class 1 Dice 2*2/(4+1+1) = 2/3, class 2 perfect -> max 1, mean 5/6, min 2/3
    # slice 3: nothing anywhere -> max 0 (absent scores 0), mean 1, min 1
    tp = np.array([[5, 0], [5, 0], [2, 3], [0, 0]])
    fp = np.array([[0, 0], [0, 0], [1, 0], [0, 0]])
    fn = np.array([[0, 4], [0, 0], [1, 0], [0, 0]])
    assert rules.RULES == (("max", "zero"), ("mean", "one"), ("min", "one"))
    assert rules.rule_fractions(tp, fp, fn, 0.6) == pytest.approx([3 / 4, 3 / 4, 3 / 4])
    assert rules.rule_fractions(tp, fp, fn, 0.7) == pytest.approx([3 / 4, 3 / 4, 1 / 2])
    per_class = rules.present_class_dice(tp, fp, fn)
    assert per_class == pytest.approx([(1 + 1 + 2 / 3) / 3, (0 + 1) / 2])
    empty = rules.present_class_dice(np.zeros((2, 1)), np.zeros((2, 1)), np.zeros((2, 1)))
    assert math.isnan(empty[0])


def test_a_folder_without_an_evaluation_is_refused(rules, tmp_path, capsys):
    assert rules.main([str(tmp_path)]) == 2
    assert "summary.json" in capsys.readouterr().err
