"""The ensemble's worst case: hand-made member results, and a tiny network attacked for real."""
import numpy as np
import pytest
import torch

from nnunet_ima.evaluation.ensemble import (DEFAULT_ENSEMBLE, check_members, iter_ensemble,
                                            lowest_dice_choice, lowest_tvdi_choice, select)
from nnunet_ima.evaluation.robustness import AttackSettings, NoiseResult
from nnunet_ima.metrics import tvdi

from core_models import tiny_segmentation_problem


def _result(counts):
    """One class: ``counts`` a list of (tp, fp, fn) per slice."""
    tp, fp, fn = (np.array([[c[i]] for c in counts], dtype=np.int64) for i in range(3))
    n = len(counts)
    return NoiseResult([f"c{i}" for i in range(n)], list(range(n)), tp, fp, fn, {})


def _tvdi(r):
    return tvdi(torch.as_tensor(r.tp), torch.as_tensor(r.fp), torch.as_tensor(r.fn))[0]


def test_lowest_dice_choice_and_ties():
    a = _result([(5, 0, 5), (10, 0, 0), (0, 2, 0)])   # slice Dice 2/3, 1, 0
    b = _result([(9, 0, 1), (0, 0, 10), (0, 7, 0)])   # 18/19, 0, 0 (more errors than a)
    assert lowest_dice_choice([a, b]).tolist() == [0, 1, 1]
    worst = select([a, b], lowest_dice_choice([a, b]))
    assert worst.tp[:, 0].tolist() == [5, 0, 0] and worst.fp[:, 0].tolist() == [0, 0, 7]


def test_tvdi_choice_beats_lowest_dice_when_false_positives_pool():
    # Slice 0: a leaves Dice 0.1 with few errors, b Dice 0.2 with many false positives.
    # Pooled with a large well-segmented slice 1, b's false positives lower TVDI more.
    a = _result([(10, 0, 180), (1000, 100, 100)])
    b = _result([(100, 800, 0), (1000, 100, 100)])
    by_dice = select([a, b], lowest_dice_choice([a, b]))
    by_tvdi = select([a, b], lowest_tvdi_choice([a, b]))
    assert lowest_dice_choice([a, b])[0] == 0
    assert _tvdi(by_dice) == pytest.approx(2 * 1010 / (2 * 1010 + 380))
    assert _tvdi(by_tvdi) == pytest.approx(2 * 1100 / (2 * 1100 + 1000))
    assert _tvdi(by_tvdi) < _tvdi(by_dice)


def test_tvdi_choice_is_never_above_any_member_on_random_counts():
    rng = np.random.default_rng(0)
    for _ in range(50):
        members = [_result([tuple(rng.integers(0, 50, 3)) for _ in range(6)]) for _ in range(3)]
        best = select(members, lowest_tvdi_choice(members))
        assert _tvdi(best) <= min(_tvdi(m) for m in members) + 1e-12
        assert _tvdi(best) <= _tvdi(select(members, lowest_dice_choice(members))) + 1e-12
        # ADI: the lowest-Dice choice is the minimum of every member's mean slice Dice
        adi_worst = select(members, lowest_dice_choice(members)).slice_dice.mean()
        assert adi_worst <= min(m.slice_dice.mean() for m in members) + 1e-12


def test_check_members():
    check_members(DEFAULT_ENSEMBLE)
    with pytest.raises(ValueError, match="unknown ensemble member"):
        check_members(["pgd", "fgsm"])
    with pytest.raises(ValueError, match="distinct"):
        check_members(["pgd", "pgd"])


def test_ensemble_on_a_real_network_worst_case_and_skipping():
    model, samples = tiny_segmentation_problem()
    base = AttackSettings(steps=10, batch_size=4, seed=0)
    calls = []
    levels = dict(iter_ensemble(model, samples, [0.0, 1.0, 8.0], base, DEFAULT_ENSEMBLE,
                                torch.device("cpu"),
                                on_member_done=lambda n, m, r, a, s: calls.append((n, m, a))))
    clean = levels[0.0]
    assert _tvdi(clean.worst) > 0.9
    for noise in (1.0, 8.0):
        level = levels[noise]
        for name, result in level.members.items():
            assert _tvdi(level.worst_tvdi) <= _tvdi(result) + 1e-12, (noise, name)
            assert level.worst.slice_dice.mean() <= result.slice_dice.mean() + 1e-12
        # The first member attacks every slice; later ones only those still above Dice 0.
        assert level.attacked["pgd"] == 6
        for before, after in zip(DEFAULT_ENSEMBLE, DEFAULT_ENSEMBLE[1:]):
            assert level.attacked[after] <= 6
    # At the large budget PGD alone breaks slices, so the later members attack fewer.
    assert sum(levels[8.0].attacked.values()) < 6 * len(DEFAULT_ENSEMBLE)
    assert (0.0, "pgd", 0) in calls and len(calls) == 1 + 2 * len(DEFAULT_ENSEMBLE)


def test_ensemble_resumes_from_finished_members():
    model, samples = tiny_segmentation_problem()
    base = AttackSettings(steps=5, batch_size=6, seed=0)
    saved = {}
    first = dict(iter_ensemble(model, samples, [2.0], base, ("pgd", "apgd-js"),
                               torch.device("cpu"),
                               on_member_done=lambda n, m, r, a, s: saved.__setitem__((n, m), (r, a, s))))
    ran = []
    again = dict(iter_ensemble(model, samples, [2.0], base, ("pgd", "apgd-js"), torch.device("cpu"),
                               finished=saved, on_member_done=lambda *args: ran.append(args)))
    assert ran == []
    assert np.array_equal(again[2.0].worst.tp, first[2.0].worst.tp)
    assert np.array_equal(again[2.0].worst_tvdi.fp, first[2.0].worst_tvdi.fp)
