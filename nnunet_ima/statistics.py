"""Intervals for segmentation scores: a bootstrap over test cases and slices, the spread over
training seeds, and paired differences between models. Numpy only; no I/O.

A score here is TVDI (:func:`nnunet_ima.metrics.tvdi`) of per-slice, per-class counts ``(N, K)``.
Slices of one case are not independent draws (neighbouring slices look alike), so the bootstrap
resamples at two levels: each draw takes as many cases as the set has, with replacement, then,
within each drawn case, as many of its slices as it has, with replacement. A draw is stored as
``(N,)`` multiplicities, so one set of draws can score every model on the same resampled slices
(a paired comparison).

Conventions: intervals are two-sided at :data:`LEVEL`; a bootstrap interval is the percentile
interval of the draws (``numpy.percentile``, linear interpolation); the interval over seeds is
Student's t interval of the mean over the seeds (``nan`` with one seed). A difference is
significant where every interval computed lies on one side of 0 (:attr:`Estimate.excludes_zero`);
a model dominates another within the intervals (:func:`dominates`) where it is at least as good on
every score and significantly better on one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Tuple

import numpy as np

from nnunet_ima.metrics import tvdi

LEVEL = 0.95

# Student's t quantile at 0.975 for 1..30 degrees of freedom (the 95 % interval over seeds).
_T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
          2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
          2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
_Z_975 = 1.959964


def t_quantile_975(df: int) -> float:
    """Student's t quantile at 0.975 with ``df >= 1`` degrees of freedom (a table to 30, the
    Cornish-Fisher expansion beyond it, within 0.001)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T_975):
        return _T_975[df - 1]
    z = _Z_975
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def case_slice_draws(cases: Sequence[str], draws: int, rng: np.random.Generator) -> np.ndarray:
    """Bootstrap draws over cases, then over the slices of each drawn case.

    Args:
        cases: ``(N,)`` the case of every slice (a case's slices need not be adjacent).
        draws: number of draws ``R >= 1``.
        rng: the generator. Per draw it is called for the ``C`` drawn case indices
            (``rng.integers(0, C, C)``, cases numbered in order of first appearance), then, for
            each drawn case in that order, for the ``n_c`` drawn slice positions within it
            (``rng.integers(0, n_c, n_c)``).

    Returns:
        ``(R, N)`` int64: how many times each slice enters each draw. A case drawn ``m`` times
        puts ``m * n_c`` slices into the draw, all of them its own.
    """
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    if len(cases) == 0:
        raise ValueError("the bootstrap needs at least one slice")
    names = list(dict.fromkeys(cases))
    rows = [np.flatnonzero(np.asarray([c == name for c in cases])) for name in names]
    weights = np.zeros((draws, len(cases)), dtype=np.int64)
    for r in range(draws):
        for c in rng.integers(0, len(names), len(names)):
            members = rows[c]
            np.add.at(weights[r], members[rng.integers(0, len(members), len(members))], 1)
    return weights


def tvdi_draws(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``(R,)`` TVDI (fraction) of every draw: the counts ``(N, K)`` pooled with the draw's
    multiplicities ``weights`` ``(R, N)``, scored by :func:`nnunet_ima.metrics.tvdi`."""
    counts = [np.asarray(c, dtype=np.int64) for c in (tp, fp, fn)]
    if any(c.ndim != 2 or c.shape != counts[0].shape for c in counts):
        raise ValueError(f"tp, fp, fn must be (N, K) arrays of one shape, got "
                         f"{[np.shape(c) for c in (tp, fp, fn)]}")
    if weights.ndim != 2 or weights.shape[1] != counts[0].shape[0]:
        raise ValueError(f"weights must be (R, N) with N = {counts[0].shape[0]} slices, got "
                         f"{weights.shape}")
    pooled = [(weights @ c)[None] for c in counts]                            # 3 x (1, R, K)
    # tvdi sums its first axis; over one "slice" of R draws its per-class Dice is (R, K), and
    # each draw's TVDI is the mean over its classes, as tvdi takes it. One call for all draws.
    _, per_class = tvdi(*pooled)
    return np.asarray(per_class).mean(axis=1)


def percentile_interval(values: np.ndarray) -> Tuple[float, float]:
    """The central :data:`LEVEL` percentile interval of ``(R,)`` draws."""
    tail = 100 * (1 - LEVEL) / 2
    low, high = np.percentile(np.asarray(values, dtype=np.float64), [tail, 100 - tail])
    return float(low), float(high)


def seed_interval(values: Sequence[float]) -> Tuple[float, float]:
    """Student's t interval (:data:`LEVEL`) of the mean of ``(S,)`` per-seed values; ``(nan,
    nan)`` for one seed, which says nothing about the spread."""
    values = np.asarray(values, dtype=np.float64)
    if values.size < 2:
        return math.nan, math.nan
    half = t_quantile_975(values.size - 1) * values.std(ddof=1) / math.sqrt(values.size)
    return float(values.mean() - half), float(values.mean() + half)


@dataclass(frozen=True)
class Estimate:
    """A score over seeds: ``mean`` of the per-seed values; ``low`` / ``high`` the bootstrap
    interval (over test cases and slices) of that mean; ``seed_low`` / ``seed_high`` the
    interval over seeds (``nan`` with one seed)."""

    mean: float
    low: float
    high: float
    seed_low: float
    seed_high: float

    @property
    def excludes_zero(self) -> bool:
        """Whether every interval that was computed lies on one side of 0."""
        intervals = [(self.low, self.high)]
        if not math.isnan(self.seed_low):
            intervals.append((self.seed_low, self.seed_high))
        return all(low > 0 or high < 0 for low, high in intervals)

    @property
    def above_zero(self) -> bool:
        """Whether every interval that was computed lies above 0: the rule of
        :attr:`excludes_zero`, on the positive side (a difference significantly > 0)."""
        return self.low > 0 and (math.isnan(self.seed_low) or self.seed_low > 0)


def estimate(values: Sequence[float], draws: np.ndarray) -> Estimate:
    """The :class:`Estimate` of per-seed values ``(S,)`` and their bootstrap draws ``(S, R)``
    (every seed scored on the same ``R`` draws)."""
    values = np.asarray(values, dtype=np.float64)
    draws = np.asarray(draws, dtype=np.float64)
    if values.ndim != 1 or values.size == 0 or draws.ndim != 2 or draws.shape[0] != values.size:
        raise ValueError(f"need (S,) values and (S, R) draws, got {values.shape} and "
                         f"{draws.shape}")
    low, high = percentile_interval(draws.mean(axis=0))
    seed_low, seed_high = seed_interval(values)
    return Estimate(float(values.mean()), low, high, seed_low, seed_high)


def paired_difference(values: Sequence[float], draws: np.ndarray, reference_values: Sequence[float],
                      reference_draws: np.ndarray) -> Estimate:
    """The :class:`Estimate` of ``values - reference_values``, paired: seed ``s`` against seed
    ``s`` and draw ``r`` against draw ``r`` (the same resampled slices), so what the two models
    share cancels. Shapes as in :func:`estimate`, the same for both."""
    values, reference_values = np.asarray(values, float), np.asarray(reference_values, float)
    draws, reference_draws = np.asarray(draws, float), np.asarray(reference_draws, float)
    if values.shape != reference_values.shape or draws.shape != reference_draws.shape:
        raise ValueError(f"a paired difference needs the same seeds and draws on both sides, got "
                         f"{values.shape} / {draws.shape} and {reference_values.shape} / "
                         f"{reference_draws.shape}")
    return estimate(values - reference_values, draws - reference_draws)


def dominates(values: np.ndarray, draws: np.ndarray, other_values: np.ndarray,
              other_draws: np.ndarray) -> bool:
    """Whether model B (``values``, ``draws``) dominates model V (``other_*``) within the
    intervals, on ``A`` scores where higher is better: B's mean over the seeds is at least V's on
    every score, and on at least one score the paired difference B - V
    (:func:`paired_difference`: the same seeds, the same draws) is significantly above 0
    (:attr:`Estimate.above_zero`). A mean that is higher but not significantly so on every score
    is no domination: the intervals cannot tell the two models apart.

    Args:
        values, other_values: ``(S, A)`` per-seed scores of B and V.
        draws, other_draws: ``(S, A, R)`` their scores on the same ``R`` bootstrap draws.
    """
    values, other_values = np.asarray(values, float), np.asarray(other_values, float)
    draws, other_draws = np.asarray(draws, float), np.asarray(other_draws, float)
    if values.ndim != 2 or draws.ndim != 3 or draws.shape[:2] != values.shape:
        raise ValueError(f"need (S, A) values and (S, A, R) draws, got {values.shape} and "
                         f"{draws.shape}")
    if values.shape != other_values.shape or draws.shape != other_draws.shape:
        raise ValueError(f"domination compares the same seeds, scores and draws, got "
                         f"{values.shape} / {draws.shape} and {other_values.shape} / "
                         f"{other_draws.shape}")
    if np.any(values.mean(axis=0) < other_values.mean(axis=0)):
        return False
    return any(paired_difference(values[:, a], draws[:, a], other_values[:, a],
                                 other_draws[:, a]).above_zero
               for a in range(values.shape[1]))
