"""The worst case over an ensemble of attacks: every slice is attacked by each member in turn,
and the worst outcome per slice becomes the headline. For a 3D configuration every "slice"
below is a whole case (:data:`.samples.WHOLE_CASE`): the choices are made per case.

A member is an attack with its loss (:data:`MEMBERS`). At each noise level the members run in
order; a member after the first attacks only the slices that are not fully broken yet (slice
Dice above 0 under the worst case so far): a broken slice cannot get worse, so the ensemble
costs less than the sum of its parts. A member's own column holds its counts on the slices it
attacked and the worst case so far on the slices it skipped (AutoAttack's convention), so it is
"the ensemble up to this member" on skipped slices.

A single attack is an ensemble of one member, named ``None`` (:data:`SINGLE`): the attack
settings as given, its parts and records without a member name. The evaluator has one loop
(:func:`iter_ensemble`) for both.

Two worst cases, one per metric, because TVDI pools TP / FP / FN over slices:

* ADI and per-slice values: per slice, the member with the lowest slice Dice (ties: the one
  with more FP + FN). That minimises ADI exactly.
* TVDI: the per-slice choice of member that minimises the pooled TVDI. Lowest slice Dice does
  not: a member may leave a slice's Dice a little higher while adding many false positives,
  which pooled over the slices costs more. It starts from the better of the lowest-Dice choice
  and every member alone, and then changes one slice's member at a time while TVDI falls, so it
  is never above any member's TVDI (nor above the lowest-Dice choice's).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from time import perf_counter
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

from nnunet_ima.metrics import dice_from_counts

from nnunet_ima.evaluation.models import LoadedModel
from nnunet_ima.evaluation.objects import DEFAULT_SIZE_BINS
from nnunet_ima.evaluation.robustness import AttackSettings, NoiseResult, iter_levels
from nnunet_ima.evaluation.samples import SliceSample

@dataclass(frozen=True)
class MemberSpec:
    """An ensemble member: an attack of :mod:`.attacks` with its loss, and where a suite fixes
    them (rse's PAdam runs 200 steps whatever the others run), its own ``steps`` and
    ``random_start``; ``None`` takes the run's (the base :class:`AttackSettings`)."""

    attack: str
    loss: str
    steps: Optional[int] = None
    random_start: Optional[bool] = None


MEMBERS: Dict[str, MemberSpec] = {
    "pgd": MemberSpec("pgd", "dc_ce"),
    "pgd-ce": MemberSpec("pgd", "ce"),
    "segpgd": MemberSpec("segpgd", "ce"),
    "cospgd": MemberSpec("pgd", "cospgd"),
    "apgd": MemberSpec("apgd", "dc_ce"),
    "apgd-mask-ce": MemberSpec("apgd_sea", "mask_ce"),
    "apgd-bal-mask-ce": MemberSpec("apgd_sea", "bal_mask_ce"),
    "apgd-js": MemberSpec("apgd_sea", "js"),
    "padam-ce": MemberSpec("padam", "ce"),
    "padam-cos": MemberSpec("padam", "cos"),
    # Its loss drives the search; its criterion is the slice Dice (run_attack's ``score``).
    "minimal": MemberSpec("minimal", "ce"),
    # rse (Halmosi et al. 2024): PAdam 200 steps, APGD at the plain radius, random starts.
    "rse-padam-ce": MemberSpec("padam", "ce", steps=200, random_start=True),
    "rse-padam-cos": MemberSpec("padam", "cos", steps=200, random_start=True),
    "rse-apgd-mask-ce": MemberSpec("apgd_lowest", "mask_ce", random_start=True),
    "rse-apgd-segpgd": MemberSpec("apgd_segpgd", "ce", random_start=True),
    "rse-apgd-js": MemberSpec("apgd_lowest", "js", random_start=True),
    "rse-apgd-mask-norm-logit": MemberSpec("apgd_lowest", "mask_norm_logit", random_start=True),
}
"""Ensemble member -> :class:`MemberSpec`. ``segpgd`` and ``apgd_segpgd`` have their own loss
(SegPGD's weighted CE); ``apgd-*`` run at SEA's shrinking radius (``apgd_sea``), ``rse-apgd-*``
at the plain radius keeping each slice's lowest-Dice iterate (``apgd_lowest``, ``apgd_segpgd``),
as rse keeps its lowest-accuracy one."""

DEFAULT_ENSEMBLE = ("pgd", "segpgd", "apgd-mask-ce", "apgd-bal-mask-ce", "apgd-js")
"""PGD on Dice + CE, SegPGD, and APGD with SEA's three losses at SEA's shrinking radius."""


@dataclass(frozen=True)
class Preset:
    """A named protocol, like AutoAttack's ``version=``: the ensemble members, the base steps,
    random start and restarts it runs (``--preset``); ``note`` goes into the tables' caption."""

    members: Tuple[str, ...]
    steps: int
    random_start: bool = True
    restarts: int = 1
    note: str = ""


SEA_NOTE = ("SEA's protocol (Croce et al. 2024: APGD, its three losses, radius 2 / 1.5 / 1 x "
            "noise, 300 iterations, 1 restart)")
RSE_NOTE = ("rse's protocol (Halmosi et al. 2024: PAdam on CE and cos 200 steps, APGD with four "
            "losses 300 iterations); minimal, clamped to the ball, stands in for its DAG / "
            "PDPGD / ALMA-prox")

PRESETS: Dict[str, Preset] = {
    "quick": Preset(DEFAULT_ENSEMBLE, 20, note="the default members at 20 steps, for the CPU"),
    "standard": Preset(("pgd", "segpgd", "cospgd", "apgd", "apgd-mask-ce", "apgd-bal-mask-ce",
                        "apgd-js", "padam-ce", "padam-cos", "minimal"), 100),
    "sea": Preset(("apgd-mask-ce", "apgd-bal-mask-ce", "apgd-js"), 300, note=SEA_NOTE),
    "rse": Preset(("rse-padam-ce", "rse-padam-cos", "rse-apgd-mask-ce", "rse-apgd-segpgd",
                   "rse-apgd-js", "rse-apgd-mask-norm-logit", "minimal"), 300, note=RSE_NOTE),
}
"""``--preset`` -> :class:`Preset`. A preset resolves to ordinary members and settings
(:meth:`.options.EvalOptions`), so its parts, resume and shards are those of any ensemble."""


def preset_note(preset: str, norm: str) -> str:
    """What ``preset`` reproduces, for the caption; in L2 a protocol its paper ran in Linf
    (SEA's, rse's) says that it is carried over."""
    note = PRESETS[preset].note
    if preset in ("sea", "rse") and norm == "l2":
        note += f"; L2: {'SEA' if preset == 'sea' else 'rse'}'s protocol carried over"
    return note


SINGLE: Tuple[Optional[str]] = (None,)
"""The members of a single attack: one, ``None``, the attack settings themselves."""


def check_members(members: Sequence[Optional[str]]) -> None:
    """``ValueError`` naming the unknown or repeated members."""
    if tuple(members) == SINGLE:
        return
    unknown = [m for m in members if m not in MEMBERS]
    if unknown:
        raise ValueError(f"unknown ensemble member(s) {unknown}; choose from {list(MEMBERS)}")
    if len(set(members)) != len(members) or not members:
        raise ValueError(f"ensemble members must be distinct and at least one, got {list(members)}")


def member_settings(base: AttackSettings, member: Optional[str]) -> AttackSettings:
    """``base`` (norm, steps, alpha, random start, restarts, batch size, seed) with
    ``member``'s attack and loss, and its own steps and random start where it fixes them;
    ``base`` itself for the member ``None`` of a single attack."""
    if member is None:
        return base
    spec = MEMBERS[member]
    overrides = {name: value for name in ("steps", "random_start")
                 if (value := getattr(spec, name)) is not None}
    return replace(base, attack=spec.attack, loss=spec.loss, **overrides)


# ------------------------------------------------------------------------- worst-case choice

def select(results: Sequence[NoiseResult], choice: np.ndarray) -> NoiseResult:
    """The result whose slice ``i`` comes from ``results[choice[i]]`` (counts, object counts
    and example). Object counts only where every result has them (a part written before them
    has none)."""
    rows = np.arange(len(choice))
    tp, fp, fn = (np.stack([getattr(r, name) for r in results])[choice, rows]
                  for name in ("tp", "fp", "fn"))
    objects = (np.stack([r.objects for r in results])[choice, rows]     # (N, K, B, 5)
               if all(r.objects is not None for r in results) else None)
    first = results[0]
    # The example slice shows the member that did worst on it.
    example = results[int(choice[example_row(first)])].example if len(choice) else first.example
    return NoiseResult(list(first.cases), list(first.slices), tp, fp, fn, example, objects)


def example_row(result: NoiseResult) -> int:
    """The row of the example slice: the most foreground, first on ties (the evaluator's
    :func:`~.robustness.example_index`; a slice's TP + FN over the classes is its foreground)."""
    return int(np.argmax((result.tp + result.fn).sum(axis=1))) if len(result.cases) else 0


def lowest_dice_choice(results: Sequence[NoiseResult]) -> np.ndarray:
    """``(N,)`` per slice the member with the lowest slice Dice; ties go to more FP + FN, then
    to the earlier member."""
    dice = np.stack([r.slice_dice for r in results])                       # (M, N)
    errors = np.stack([(r.fp + r.fn).sum(axis=1) for r in results])        # (M, N)
    # lexsort sorts by the last key first: lowest Dice, then most errors, then member order.
    order = np.lexsort((np.arange(len(results))[:, None].repeat(dice.shape[1], 1), -errors,
                        dice), axis=0)
    return order[0]


def _mean_tvdi(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> float:
    """Mean over classes of the pooled Dice of ``(K,)`` summed counts (1 where all are 0)."""
    return float(dice_from_counts(torch.as_tensor(tp), torch.as_tensor(fp),
                                  torch.as_tensor(fn)).mean())


def lowest_tvdi_choice(results: Sequence[NoiseResult], max_passes: int = 20) -> np.ndarray:
    """``(N,)`` a per-slice choice of member whose pooled TVDI is no higher than any member's
    alone nor than :func:`lowest_dice_choice`'s (see the module docstring)."""
    m, n = len(results), len(results[0].cases)
    counts = [np.stack([getattr(r, name) for r in results]).astype(np.int64)
              for name in ("tp", "fp", "fn")]                               # 3 x (M, N, K)
    rows = np.arange(n)

    def totals(choice):
        return [c[choice, rows].sum(axis=0) for c in counts]

    starts = [lowest_dice_choice(results)] + [np.full(n, k) for k in range(m)]
    choice = min(starts, key=lambda c: _mean_tvdi(*totals(c))).copy()
    tp, fp, fn = totals(choice)
    best = _mean_tvdi(tp, fp, fn)
    for _ in range(max_passes):
        improved = False
        for i in range(n):
            current = choice[i]
            for k in range(m):
                if k == current:
                    continue
                trial = [t - c[current, i] + c[k, i] for t, c in zip((tp, fp, fn), counts)]
                value = _mean_tvdi(*trial)
                if value < best - 1e-12:
                    best, current = value, k
                    tp, fp, fn = trial
                    improved = True
            choice[i] = current
        if not improved:
            break
    return choice


@dataclass
class EnsembleLevel:
    """The ensemble at one noise level.

    Attributes:
        members: each member's result (see the module docstring for skipped slices).
        attacked: per member, how many slices it attacked.
        seconds: per member, the wall time of its attacks.
        worst: the per-slice worst case by slice Dice (ADI, per-slice values, examples).
        worst_tvdi: the per-slice choice that minimises TVDI.
    """

    members: Dict[str, NoiseResult]
    attacked: Dict[str, int]
    seconds: Dict[str, float]
    worst: NoiseResult
    worst_tvdi: NoiseResult


def combine(members: Dict[str, NoiseResult], attacked: Dict[str, int],
            seconds: Dict[str, float]) -> EnsembleLevel:
    """The :class:`EnsembleLevel` of finished member results (in ensemble order)."""
    results = list(members.values())
    if len(results) == 1:  # one member is its own worst case, by either metric
        return EnsembleLevel(dict(members), dict(attacked), dict(seconds), results[0], results[0])
    return EnsembleLevel(dict(members), dict(attacked), dict(seconds),
                         select(results, lowest_dice_choice(results)),
                         select(results, lowest_tvdi_choice(results)))


def _subset(result: NoiseResult, idx: Sequence[int], part: NoiseResult) -> NoiseResult:
    """``result`` with the rows ``idx`` replaced by ``part``'s rows (in order); object counts
    only where both have them."""
    tp, fp, fn = result.tp.copy(), result.fp.copy(), result.fn.copy()
    tp[list(idx)], fp[list(idx)], fn[list(idx)] = part.tp, part.fp, part.fn
    objects = None
    if result.objects is not None and part.objects is not None:
        objects = result.objects.copy()
        objects[list(idx)] = part.objects
    # The example slice has the most foreground of all, so of any subset holding it too.
    example = part.example if example_row(result) in idx else result.example
    return NoiseResult(list(result.cases), list(result.slices), tp, fp, fn, example, objects)


MemberDone = Callable[[float, Optional[str], NoiseResult, int, float], None]
"""``(noise, member, result, slices attacked, seconds)``: called as each member finishes."""


Finished = Dict[Tuple[float, Optional[str]], Tuple[NoiseResult, int, float]]
"""Member results of an interrupted run: ``(noise, member) -> (result, slices attacked,
seconds)``."""


def iter_ensemble(model: LoadedModel, samples: List[SliceSample], noise_levels: Sequence[float],
                  base: AttackSettings, members: Sequence[Optional[str]], device: torch.device,
                  finished: Optional[Finished] = None,
                  on_member_done: Optional[MemberDone] = None,
                  progress: Optional[tqdm] = None,
                  size_bins: Sequence[int] = DEFAULT_SIZE_BINS
                  ) -> Iterator[Tuple[float, EnsembleLevel]]:
    """Run the ensemble on ``samples`` at each noise level (ascending); yields
    ``(noise, EnsembleLevel)``. ``members``: names of :data:`MEMBERS`, or :data:`SINGLE` for
    ``base`` alone. ``size_bins``: the object-size bins of the results' object counts
    (:mod:`.objects`).

    ``finished``: member results of an interrupted run, ``(noise, member) -> (result, attacked,
    seconds)``, reused instead of recomputed. Noise 0 is the clean prediction, shared by all
    members (attacked 0, seconds of one clean pass).
    """
    check_members(members)
    finished = finished or {}
    for noise in sorted(set(float(n) for n in noise_levels)):
        done: Dict[str, NoiseResult] = {}
        attacked: Dict[str, int] = {}
        seconds: Dict[str, float] = {}
        if noise == 0:
            key = (0.0, members[0])
            if key in finished:
                clean, _, took = finished[key]
            else:
                began = perf_counter()
                clean = next(iter_levels(model, samples, [0.0], base, device, progress,
                                         size_bins=size_bins))[1]
                took = perf_counter() - began
                if on_member_done is not None:
                    on_member_done(0.0, members[0], clean, 0, took)
            for member in members:
                done[member], attacked[member], seconds[member] = clean, 0, 0.0
            seconds[members[0]] = took
            yield noise, combine(done, attacked, seconds)
            continue
        worst: Optional[NoiseResult] = None
        for member in members:
            if (noise, member) in finished:
                result, attacked[member], seconds[member] = finished[(noise, member)]
            else:
                idx = (list(range(len(samples))) if worst is None
                       else [int(i) for i in np.flatnonzero(worst.slice_dice > 0)])
                began = perf_counter()
                if worst is None:
                    result = next(iter_levels(model, samples, [noise],
                                              member_settings(base, member), device, progress,
                                              size_bins=size_bins))[1]
                elif idx:
                    part = next(iter_levels(model, [samples[i] for i in idx], [noise],
                                            member_settings(base, member), device, progress,
                                            size_bins=size_bins))[1]
                    result = _subset(worst, idx, part)
                else:
                    result = worst
                attacked[member], seconds[member] = len(idx), perf_counter() - began
                if on_member_done is not None:
                    on_member_done(noise, member, result, attacked[member], seconds[member])
            done[member] = result
            worst = select(list(done.values()), lowest_dice_choice(list(done.values())))
        yield noise, combine(done, attacked, seconds)
