"""Intervals of the ablation: the bootstrap over cases and slices, the interval over seeds and the
paired difference, against hand-computed values and a direct numpy re-computation."""
import math

import numpy as np
import pytest

from nnunet_ima.metrics import tvdi
from nnunet_ima.statistics import (Estimate, case_slice_draws, dominates, estimate,
                                   paired_difference, percentile_interval, seed_interval,
                                   t_quantile_975, tvdi_draws)


def _counts(rng, n, k=2):
    """``(n, k)`` tp, fp, fn, every class present in every slice (no empty Dice)."""
    return [rng.integers(1, 50, size=(n, k)) for _ in range(3)]


def test_identical_cases_give_a_zero_width_interval():
    """Three identical one-slice cases: every draw pools the same counts."""
    tp, fp, fn = (np.array([[30, 5]]).repeat(3, 0), np.array([[4, 2]]).repeat(3, 0),
                  np.array([[6, 1]]).repeat(3, 0))
    cases = ["a", "b", "c"]
    values = tvdi_draws(tp, fp, fn, case_slice_draws(cases, 200, np.random.default_rng(0)))
    low, high = percentile_interval(values)
    assert low == high == pytest.approx(tvdi(tp, fp, fn)[0])
    # Identical cases of two different slices each: what is left is the slices within a case.
    rng = np.random.default_rng(1)
    two = [np.tile(c[:2], (3, 1)) for c in _counts(rng, 2)]
    low, high = percentile_interval(tvdi_draws(*two, case_slice_draws(
        ["a", "a", "b", "b", "c", "c"], 200, np.random.default_rng(0))))
    assert high > low


def test_a_fixed_generator_gives_the_interval_of_a_direct_recomputation():
    rng = np.random.default_rng(7)
    cases = ["p1"] * 3 + ["p2"] * 5 + ["p3"] * 2 + ["p4"] * 4
    tp, fp, fn = _counts(rng, len(cases))
    ours = percentile_interval(tvdi_draws(tp, fp, fn, case_slice_draws(
        cases, 300, np.random.default_rng(42))))

    # The same draws by indices: cases with replacement, then slices within each drawn case.
    generator = np.random.default_rng(42)
    rows = {c: np.flatnonzero(np.array(cases) == c) for c in dict.fromkeys(cases)}
    names = list(rows)
    values = []
    for _ in range(300):
        drawn = np.concatenate([rows[names[c]][generator.integers(0, len(rows[names[c]]),
                                                                  len(rows[names[c]]))]
                                for c in generator.integers(0, len(names), len(names))])
        t, p, n = tp[drawn].sum(0), fp[drawn].sum(0), fn[drawn].sum(0)
        values.append(np.mean(2 * t / (2 * t + p + n)))
    assert ours == pytest.approx(tuple(np.percentile(values, [2.5, 97.5])), abs=1e-12)


def test_cases_are_drawn_as_units():
    """Per draw, a case puts a multiple of its slice count into the draw (0 where it is not
    drawn), the cases drawn add up to the number of cases, and a case's slices are found even
    when they are not adjacent."""
    cases = ["a", "b", "a", "c", "b", "a"]                # a: 3 slices, b: 2, c: 1
    weights = case_slice_draws(cases, 500, np.random.default_rng(3))
    assert weights.shape == (500, 6) and weights.dtype == np.int64
    drawn = np.zeros(500)
    for case, size in (("a", 3), ("b", 2), ("c", 1)):
        total = weights[:, [i for i, c in enumerate(cases) if c == case]].sum(1)
        assert np.all(total % size == 0)
        drawn += total // size
    assert np.all(drawn == 3)
    assert weights.sum(1).min() >= 3 and np.any(weights[:, 0] == 0)   # a case can be left out
    # One case: the case level never varies, only its slices do.
    single = case_slice_draws(["x"] * 4, 100, np.random.default_rng(0))
    assert np.all(single.sum(1) == 4) and len({tuple(w) for w in single}) > 1


def test_a_constant_shift_gives_an_interval_equal_to_the_shift():
    rng = np.random.default_rng(0)
    values = np.array([70.0, 74.0, 71.0])
    draws = values[:, None] + rng.normal(0, 5, size=(3, 400))     # wide on their own
    shifted = paired_difference(values + 2.5, draws + 2.5, values, draws)
    assert shifted.mean == pytest.approx(2.5)
    assert (shifted.low, shifted.high) == pytest.approx((2.5, 2.5))
    assert (shifted.seed_low, shifted.seed_high) == pytest.approx((2.5, 2.5))
    assert shifted.excludes_zero
    alone = estimate(values, draws)
    assert alone.high - alone.low > 5


def test_the_interval_over_seeds_by_hand():
    # mean 2, sd 1, t(0.975, 2) = 4.303: 2 -+ 4.303 / sqrt(3)
    low, high = seed_interval([1.0, 2.0, 3.0])
    assert (low, high) == pytest.approx((2 - 4.303 / math.sqrt(3), 2 + 4.303 / math.sqrt(3)))
    assert all(math.isnan(v) for v in seed_interval([5.0]))
    assert t_quantile_975(1) == 12.706 and t_quantile_975(30) == 2.042
    assert t_quantile_975(40) == pytest.approx(2.021, abs=1e-3)
    assert t_quantile_975(120) == pytest.approx(1.980, abs=1e-3)


def test_the_estimate_of_seeds_and_draws():
    values = np.array([60.0, 64.0])
    draws = np.array([[58.0, 60.0, 62.0, 61.0], [62.0, 64.0, 66.0, 63.0]])
    e = estimate(values, draws)
    # the bootstrap interval is that of the per-draw mean over the seeds: 60, 62, 64, 62
    assert e.mean == 62.0
    assert (e.low, e.high) == pytest.approx(tuple(np.percentile([60, 62, 64, 62], [2.5, 97.5])))
    assert (e.seed_low, e.seed_high) == pytest.approx(
        (62 - 12.706 * np.std(values, ddof=1) / math.sqrt(2),
         62 + 12.706 * np.std(values, ddof=1) / math.sqrt(2)))
    # one seed: only the bootstrap interval decides whether 0 is excluded
    assert Estimate(1.0, 0.5, 1.5, math.nan, math.nan).excludes_zero
    assert not Estimate(1.0, 0.5, 1.5, -0.2, 2.2).excludes_zero
    assert Estimate(-1.0, -1.5, -0.5, -2.0, -0.1).excludes_zero


def test_every_draw_is_scored_by_the_metric_itself():
    """Each draw's TVDI is metrics.tvdi of the slices repeated as the draw says, to the bit;
    every slice once is the metric of the set, and a class absent from a draw scores 1."""
    rng = np.random.default_rng(5)
    tp, fp, fn = _counts(rng, 6, k=3)
    tp[:3, 2] = fp[:3, 2] = fn[:3, 2] = 0
    weights = np.vstack([np.ones((1, 6), dtype=np.int64), rng.integers(0, 3, size=(20, 6)),
                         [[1, 2, 1, 0, 0, 0]]])
    expected = [tvdi(np.repeat(tp, w, 0), np.repeat(fp, w, 0), np.repeat(fn, w, 0))[0]
                for w in weights]
    assert tvdi_draws(tp, fp, fn, weights).tolist() == expected
    assert expected[0] == tvdi(tp, fp, fn)[0] and expected[-1] == pytest.approx(
        np.mean([*(2 * t / (2 * t + p + n) for t, p, n in zip(
            *(np.repeat(c, [1, 2, 1, 0, 0, 0], 0).sum(0)[:2] for c in (tp, fp, fn)))), 1.0]))


def test_bad_input_is_refused():
    rng = np.random.default_rng(0)
    tp, fp, fn = _counts(rng, 4)
    with pytest.raises(ValueError, match=r"\(R, N\) with N = 4"):
        tvdi_draws(tp, fp, fn, np.ones((2, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="of one shape"):
        tvdi_draws(tp, fp[:3], fn, np.ones((2, 4), dtype=np.int64))
    with pytest.raises(ValueError, match="same seeds and draws"):
        paired_difference([1.0, 2.0], np.zeros((2, 5)), [1.0], np.zeros((1, 5)))
    with pytest.raises(ValueError, match="at least one slice"):
        case_slice_draws([], 10, rng)
    with pytest.raises(ValueError, match="draws must be >= 1"):
        case_slice_draws(["a"], 0, rng)


def test_above_zero_is_the_positive_side_of_excludes_zero():
    assert Estimate(1.0, 0.5, 1.5, math.nan, math.nan).above_zero
    assert not Estimate(1.0, -0.1, 1.5, math.nan, math.nan).above_zero
    assert not Estimate(1.0, 0.5, 1.5, -0.2, 2.2).above_zero        # the seeds' interval
    assert Estimate(1.0, 0.5, 1.5, 0.1, 2.2).above_zero
    below = Estimate(-1.0, -1.5, -0.5, math.nan, math.nan)
    assert below.excludes_zero and not below.above_zero


# One seed, five draws; scores (clean TVDI, TVDI AUC). V's draws vary, so each model alone has a
# wide interval: only the paired differences decide.
V_VALUES = np.array([[80.0, 60.0]])                                          # (S, A)
V_DRAWS = np.array([[[78.0, 79.0, 80.0, 81.0, 82.0], [58.0, 59.0, 60.0, 61.0, 62.0]]])


def test_a_clear_shift_on_both_scores_dominates():
    b_values, b_draws = V_VALUES + 3.0, V_DRAWS + 3.0     # +3 in every draw: interval [3, 3]
    assert dominates(b_values, b_draws, V_VALUES, V_DRAWS)
    assert not dominates(V_VALUES, V_DRAWS, b_values, b_draws)
    # an equal mean on one score and a clear shift on the other dominates too
    tie = np.array([0.0, 3.0])
    assert dominates(V_VALUES + tie, V_DRAWS + tie[:, None], V_VALUES, V_DRAWS)


def test_better_on_one_score_but_not_significantly_does_not_dominate():
    # clean TVDI +1 overall, but the draws' differences are -1, 0, 1, 2, 3: the percentile
    # interval [-1 + 0.1 * 1, 2 + 0.9 * 1] = [-0.9, 2.9] holds 0; the AUC is the same.
    b_values = V_VALUES + np.array([1.0, 0.0])
    b_draws = V_DRAWS.copy()
    b_draws[0, 0] += [-1.0, 0.0, 1.0, 2.0, 3.0]
    d = paired_difference(b_values[:, 0], b_draws[:, 0], V_VALUES[:, 0], V_DRAWS[:, 0])
    assert (d.mean, d.low, d.high) == pytest.approx((1.0, -0.9, 2.9))
    assert not dominates(b_values, b_draws, V_VALUES, V_DRAWS)
    # with the draws' differences 0.5 ... 1.5 it is significant: then it dominates
    b_draws = V_DRAWS.copy()
    b_draws[0, 0] += [0.5, 0.75, 1.0, 1.25, 1.5]
    assert dominates(b_values, b_draws, V_VALUES, V_DRAWS)


def test_better_on_one_score_and_worse_on_the_other_does_not_dominate():
    shift = np.array([5.0, -1.0])                         # both differences significant
    b_values, b_draws = V_VALUES + shift, V_DRAWS + shift[:, None]
    assert not dominates(b_values, b_draws, V_VALUES, V_DRAWS)
    assert not dominates(V_VALUES, V_DRAWS, b_values, b_draws)


def test_with_seeds_the_interval_over_seeds_must_lie_above_zero_too():
    """Three seeds, every draw of a seed shifted by that seed's difference: the bootstrap
    interval has no width, the t interval is mean -+ 4.303 * sd / sqrt(3)."""
    v_values = np.array([[80.0, 60.0], [81.0, 61.0], [79.0, 59.0]])
    v_draws = v_values[:, :, None] + np.linspace(-2, 2, 7)                 # (3, 2, 7)
    for per_seed, expected in (([1.0, 2.0, 3.0], False),   # 2 -+ 2.484: [-0.48, 4.48]
                               ([2.0, 3.0, 4.0], True)):   # 3 -+ 2.484: [0.52, 5.48]
        shift = np.zeros((3, 2))
        shift[:, 1] = per_seed                             # the AUC only; clean TVDI equal
        b_values, b_draws = v_values + shift, v_draws + shift[:, :, None]
        d = paired_difference(b_values[:, 1], b_draws[:, 1], v_values[:, 1], v_draws[:, 1])
        mean = np.mean(per_seed)
        assert (d.low, d.high) == pytest.approx((mean, mean))
        assert (d.seed_low, d.seed_high) == pytest.approx(
            (mean - 4.303 / math.sqrt(3), mean + 4.303 / math.sqrt(3)))
        assert dominates(b_values, b_draws, v_values, v_draws) is expected


def test_domination_refuses_unpaired_scores():
    with pytest.raises(ValueError, match=r"\(S, A\) values and \(S, A, R\) draws"):
        dominates(V_VALUES[0], V_DRAWS[0], V_VALUES[0], V_DRAWS[0])
    with pytest.raises(ValueError, match="same seeds, scores and draws"):
        dominates(V_VALUES, V_DRAWS, V_VALUES, V_DRAWS[:, :, :4])
