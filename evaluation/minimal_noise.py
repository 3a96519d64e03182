"""Each sample's minimal adversarial noise: the smallest noise found that brings its Dice below a
threshold (``--minimal-noise``, ``--dice-threshold``, 0.5 by default).

This is IMA's margin measured at test time. Two witnesses are combined per sample (a slice, or
a whole case in 3D):

* the minimal-perturbation attack (:func:`.attacks.minimal_perturbation`), run on every scored
  sample with the slice Dice of the tables (:func:`.robustness.slice_dice_score`) as its
  criterion, starting its search at the smallest noise level > 0 of the run, its radius
  capped at :data:`MAX_EPS_FACTOR` times the largest. Its adversarial input is scored again the way
  the tables score it (:func:`.predictor_path.segmentation`), and its noise is measured on it;
  a sample whose witness does not score below the threshold there is not counted as found;
* the grid of the run's own attacks: the smallest evaluated noise level whose worst-case slice
  Dice (the headline per sample, under an ensemble the per-slice worst case) is below the
  threshold.

The recorded minimal noise is the smaller of the two (ties: the grid's). Each is a perturbation
actually found, so the value is an **upper bound** on the true minimal noise of that sample: a
stronger attack can only lower it. ``source`` says which witness gave it: ``clean`` (the clean
input already scores below the threshold: 0), ``grid`` or ``attack``. A sample neither witness
broke is **censored** at the largest budget searched (:attr:`MinimalNoise.censored_at`): no
perturbation up to that budget was found to break it (``source`` ``none``; "> X" in the
tables), and the statistics count it as ``+inf``. The budget searched is per sample: the largest noise level, or the size of the
attack's last iterate where that is larger (its radius grows by a factor per step, so with few
steps it may stop short of its cap).

Noise is in the attack's norm (L2 or Linf over the whole sample), in z-score units, as the
noise levels are. The attack's result is saved as its own part (``parts/<model>__minimal_noise
.npz``) with the record of what produced it (:mod:`.provenance`), so a resumed run reuses it and
a changed threshold, step count or search range recomputes it; the grid is combined anew on
every run from the run's own parts.
"""
from __future__ import annotations

import io
import json
import math
import os
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

from nnunet_ima.metrics import slice_dice_from_counts
from nnunet_ima.norms import per_sample_norm

from nnunet_ima.evaluation.models import LoadedModel
from nnunet_ima.evaluation.predictor_path import segmentation
from nnunet_ima.evaluation.provenance import PartRecords, record_mismatch
from nnunet_ima.evaluation.report import (VOLUME, atomic_write_bytes, load_part_record,
                                          noise_key, safe_model_name)
from nnunet_ima.evaluation.robustness import (NoiseResult, _batches, attack_loss, batch_tensors,
                                              scored_counts, slice_dice_score)
from nnunet_ima.evaluation.samples import WHOLE_CASE, SliceSample

MINIMAL_LOSS = "bal_mask_ce"
"""The loss the minimal-perturbation attack follows: SEA's class-balanced masked CE. The
criterion is the slice Dice, a mean over the classes present, so a small structure's Dice
counts as much as the background's: the balance weights give each class about the same pull,
and the mask stops the attack spending budget on pixels it has already flipped (plain CE keeps
pushing them), so its steps go to the pixels that still hold the Dice above the threshold."""

MAX_EPS_FACTOR = 4.0
"""The attack searches up to this many times the run's largest noise level."""

SOURCES = ("clean", "grid", "attack", "none")
"""Where a sample's minimal noise comes from (``none``: censored)."""

QUANTILES = {"q25": 0.25, "median": 0.5, "q75": 0.75}


@dataclass(frozen=True)
class MinimalSettings:
    """What the minimal-noise search runs with (everything its part depends on besides the
    model, the attack settings and the samples).

    Attributes:
        threshold: a sample is broken when its slice Dice is below this, in (0, 1).
        norm: ``l2`` or ``linf`` (the run's attack norm).
        steps: the minimal-perturbation attack's iterations.
        loss: its loss, a name of :func:`.robustness.attack_loss`.
        init_eps: its first budget, the run's smallest noise level > 0.
        max_eps: the cap of its radius (:data:`MAX_EPS_FACTOR` x the largest level).
    """

    threshold: float
    norm: str
    steps: int
    loss: str
    init_eps: float
    max_eps: float

    def to_dict(self) -> dict:
        return {k: (float(v) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def minimal_settings(threshold: float, norm: str, steps: int, noise_levels: Sequence[float],
                     loss: str = MINIMAL_LOSS) -> MinimalSettings:
    """The search of a run with these noise levels (at least one > 0)."""
    attacked = sorted(float(n) for n in noise_levels if n > 0)
    if not attacked:
        raise ValueError("the minimal-noise search starts at the smallest noise level > 0; "
                         "give one")
    return MinimalSettings(float(threshold), norm, int(steps), loss, attacked[0],
                           MAX_EPS_FACTOR * attacked[-1])


# ---------------------------------------------------------------------------- combining

def grid_minimal(dice_by_noise: Dict[float, np.ndarray], threshold: float) -> np.ndarray:
    """``(N,)`` per sample the smallest noise level whose ``(N,)`` slice Dice is below
    ``threshold``; ``inf`` where none is."""
    levels = sorted(dice_by_noise)
    if not levels:
        raise ValueError("no noise level to read the grid from")
    found = np.full(len(dice_by_noise[levels[0]]), np.inf)
    for noise in reversed(levels):   # the smallest level that breaks a sample is written last
        found[np.asarray(dice_by_noise[noise]) < threshold] = noise
    return found


@dataclass
class MinimalNoise:
    """One model's minimal noise per sample.

    Attributes:
        cases, slices: the samples, in the run's order (``slices`` of whole cases are
            :data:`.samples.WHOLE_CASE`).
        attack: ``(N,)`` the minimal-perturbation attack's noise (``inf``: not found).
        grid: ``(N,)`` :func:`grid_minimal`.
        value: ``(N,)`` the recorded minimal noise; where censored, the budget searched
            (the largest noise level, or the attack's reach where larger).
        source: ``(N,)`` one of :data:`SOURCES` per sample.
        censored: ``(N,)`` bool, neither witness broke the sample.
        settings: the search's :class:`MinimalSettings`.
    """

    cases: List[str]
    slices: List[int]
    attack: np.ndarray
    grid: np.ndarray
    value: np.ndarray
    source: np.ndarray
    censored: np.ndarray
    settings: MinimalSettings

    @property
    def censored_at(self) -> Optional[float]:
        """The smallest budget searched among the censored samples (``None``: none is): every
        censored sample withstood the search up to at least this noise ("> X")."""
        return float(self.value[self.censored].min()) if self.censored.any() else None

    @property
    def as_inf(self) -> np.ndarray:
        """``(N,)`` the values with the censored ones as ``+inf`` (what the statistics use)."""
        return np.where(self.censored, np.inf, self.value)


def combine(attack: np.ndarray, grid: np.ndarray, censored_at
            ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per sample the smaller of the attack's noise and the grid's level (each ``inf`` where it
    found none): ``(value, source, censored)``, each ``(N,)``; ``censored_at``: the budget
    searched, a number or ``(N,)``. ``source`` is ``clean`` for 0,
    ``grid`` where the grid's level is no larger than the attack's (a tie goes to the grid, a
    level of the tables), ``attack`` where the attack's is smaller, ``none`` where both are
    ``inf`` (censored: ``value`` is ``censored_at``)."""
    attack, grid = np.asarray(attack, dtype=np.float64), np.asarray(grid, dtype=np.float64)
    if attack.shape != grid.shape:
        raise ValueError(f"attack and grid differ in shape: {attack.shape} vs {grid.shape}")
    value = np.minimum(attack, grid)
    censored = np.isinf(value)
    source = np.where(grid <= attack, "grid", "attack").astype(object)
    source[value == 0] = "clean"
    source[censored] = "none"
    return np.where(censored, censored_at, value), source.astype(str), censored


def combined(cases: Sequence[str], slices: Sequence[int], attack: np.ndarray,
             reach: np.ndarray, grid_results: Dict[float, NoiseResult],
             settings: MinimalSettings) -> MinimalNoise:
    """:class:`MinimalNoise` from the attack's noise, its ``(N,)`` ``reach`` (the size of its
    last iterate) and the run's headline results per level (their slice Dice is the grid's
    evidence); a censored sample is censored at the larger of the largest level and its
    reach."""
    for noise, result in grid_results.items():
        if list(zip(result.cases, result.slices)) != list(zip(cases, slices)):
            raise ValueError(f"the result at noise {noise_key(noise)} is of other samples")
    grid = grid_minimal({n: r.slice_dice for n, r in grid_results.items()}, settings.threshold)
    budget = np.maximum(max(grid_results), np.asarray(reach, dtype=np.float64))
    value, source, censored = combine(attack, grid, budget)
    return MinimalNoise(list(cases), [int(s) for s in slices], np.asarray(attack, float), grid,
                        value, source, censored, settings)


# ---------------------------------------------------------------------------- statistics

def quantile(values: np.ndarray, q: float) -> float:
    """The ``q`` quantile of ``values`` (``+inf`` for censored ones) by linear interpolation
    between order statistics (numpy's default); ``inf`` where it depends on a censored value
    (it is then only known to exceed the censoring budget), ``nan`` for no values."""
    v = np.sort(np.asarray(values, dtype=np.float64))
    if not len(v):
        return math.nan
    position = q * (len(v) - 1)
    lo, hi = int(math.floor(position)), int(math.ceil(position))
    weight = position - lo
    if lo == hi or weight == 0:
        return float(v[lo])
    if np.isinf(v[hi]):
        return math.inf
    return float(v[lo] + (v[hi] - v[lo]) * weight)


def fraction_above(values: np.ndarray, noise: float) -> float:
    """The fraction of samples whose minimal noise exceeds ``noise`` (censored ones: ``inf``,
    always above)."""
    values = np.asarray(values, dtype=np.float64)
    return float(np.mean(values > noise)) if len(values) else math.nan


def survival_curve(minimal: MinimalNoise) -> Tuple[np.ndarray, np.ndarray]:
    """The fraction of samples with minimal noise ``> e`` against ``e``, from 0 to the largest
    budget searched: ``(e, fraction)`` as the corners of a right-continuous step function (for
    ``plt.step(e, fraction, where="post")``)."""
    values = minimal.as_inf
    steps = np.unique(values[np.isfinite(values)])
    e = np.unique(np.concatenate([[0.0], steps, [float(minimal.value.max(initial=0.0))]]))
    return e, np.array([fraction_above(values, x) for x in e])


def summarise(minimal: MinimalNoise, noise_levels: Sequence[float]) -> dict:
    """``summary.json["minimal_noise"][model]``: the search's settings, ``n``, the quartiles and
    median (``null`` with ``<q>_censored: true`` where the quantile is only known to exceed
    ``censored_at``, the smallest budget searched among the censored samples, ``null`` when
    none is), ``fraction_above`` each evaluated noise level, and how many samples each witness
    gave (``sources``)."""
    values = minimal.as_inf
    entry = {**minimal.settings.to_dict(), "censored_at": minimal.censored_at,
             "n": len(values), "n_censored": int(minimal.censored.sum())}
    for key, q in QUANTILES.items():
        value = quantile(values, q)
        entry[key] = None if not math.isfinite(value) else value
        entry[f"{key}_censored"] = bool(math.isinf(value))
    entry["fraction_above"] = {noise_key(n): fraction_above(values, n)
                               for n in sorted(set(float(n) for n in noise_levels))}
    entry["sources"] = {s: int(np.sum(minimal.source == s)) for s in SOURCES}
    return entry


def rows(model: str, minimal: MinimalNoise) -> List[dict]:
    """The rows of ``minimal_noise.csv``: one per sample; a censored one holds the censoring
    budget in ``minimal_noise`` and ``censored`` 1 (its minimal noise exceeds it)."""
    return [{"model": model, "case": case, "slice": VOLUME if int(s) == WHOLE_CASE else int(s),
             "minimal_noise": f"{value:.6g}", "source": source, "censored": int(censored)}
            for case, s, value, source, censored in zip(minimal.cases, minimal.slices,
                                                         minimal.value, minimal.source,
                                                         minimal.censored)]


def _cell(entry: dict, key: str) -> str:
    return f"> {entry['censored_at']:.4g}" if entry[f"{key}_censored"] else f"{entry[key]:.4g}"


def markdown_table(summary: Dict[str, dict], noise_levels: Sequence[float]) -> str:
    """``minimal_noise.md``: per model the median and quartiles of the minimal noise and the
    fraction of samples above each noise level, with a caption saying what was measured."""
    first = next(iter(summary.values()))
    levels = sorted(set(float(n) for n in noise_levels))
    header = ("| model | n | q25 | median | q75 | "
              + " | ".join(f"> {noise_key(n)}" for n in levels) + " | censored |")
    norm = {"l2": "L2", "linf": "Linf"}.get(first["norm"], first["norm"])
    lines = [f"Minimal noise ({norm}, z-score units) that brings a sample's Dice below "
             f"{first['threshold']:g}: per sample the smaller of a minimal-perturbation attack's "
             f"({first['steps']} steps, loss {first['loss']}, radius capped at "
             f"{first['max_eps']:g}) and the smallest evaluated level at which the attacks "
             f"broke it. Each is a perturbation found, so the values are upper bounds on the "
             f"true minimal noise; \"> X\": not broken up to X (censored). The columns "
             f"\"> e\" give the fraction (%) of samples whose minimal noise exceeds e.",
             "", header, "|" + "---|" * (header.count("|") - 1)]
    for name, entry in summary.items():
        above = [f"{100 * entry['fraction_above'][noise_key(n)]:.1f}" for n in levels]
        lines.append(f"| {name} | {entry['n']} | {_cell(entry, 'q25')} | "
                     f"{_cell(entry, 'median')} | {_cell(entry, 'q75')} | " + " | ".join(above)
                     + f" | {entry['n_censored']} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- the attack

def attack_minimal(model: LoadedModel, samples: List[SliceSample], settings: MinimalSettings,
                   batch_size: int, device: torch.device, progress: Optional[tqdm] = None
                   ) -> Tuple[np.ndarray, np.ndarray]:
    """``(noise, reach)``, each ``(N,)``: per sample the noise of the minimal-perturbation
    attack's witness (``inf`` where it found none that scores below the threshold as the tables
    score it) and the size of the input it returned (where it found none: its last iterate,
    how far its search got). In the batches of the run's attacks (volumes one at a time)."""
    from nnunet_ima.evaluation import attacks  # looked up when called: the attack's module
    score = slice_dice_score(model.num_classes, model.ignore_label)
    loss = attack_loss(settings.loss, model.ignore_label)
    noise, reach = np.full(len(samples), np.inf), np.zeros(len(samples))
    for idx in _batches(samples, batch_size):
        x, y = batch_tensors(samples, idx, device)
        run = attacks.minimal_perturbation(
            model.network, x, y, norm=settings.norm, steps=settings.steps, score=score,
            threshold=settings.threshold, loss=loss, init_eps=settings.init_eps,
            max_eps=settings.max_eps)
        with torch.no_grad():
            x_adv = run.x_adv.detach()
            counts = scored_counts(segmentation(model, x_adv), y[:, 0], model.num_classes,
                                   model.ignore_label)
            dice = slice_dice_from_counts(*counts).cpu().numpy()
            size = per_sample_norm(x_adv - x, settings.norm).cpu().numpy()
        # The witness counts only as the tables would score it (the predictor path segments
        # in its own precision), and its size is measured on it, not taken from the attack.
        witnessed = run.found.cpu().numpy().astype(bool) & (dice < settings.threshold)
        noise[idx] = np.where(witnessed, size, np.inf)
        reach[idx] = size
        if progress is not None:
            progress.update(len(idx))
    return noise, reach


def part_path(out: str, model: str) -> str:
    """The part of one model's minimal-noise attack."""
    return os.path.join(out, "parts", f"{safe_model_name(model)}__minimal_noise.npz")


def part_record(records: PartRecords, model: str, settings: MinimalSettings) -> dict:
    """The record of a model's minimal-noise part: the model, its checkpoint, the attack
    settings and the samples (as every part's), with the search's settings instead of a noise
    level and member."""
    record = records.record(model, 0.0)
    record["compared"].update(noise=None, member="minimal_noise",
                              minimal_noise=json.loads(json.dumps(settings.to_dict())))
    return record


def save_part(path: str, cases: Sequence[str], slices: Sequence[int], noise: np.ndarray,
              reach: np.ndarray, record: dict) -> None:
    """Write the attack's ``(N,)`` ``noise`` and ``reach`` (:func:`attack_minimal`) with the
    samples and ``record``, atomically."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, cases=np.array(list(cases)), slices=np.array(list(slices)),
                        noise=np.asarray(noise, dtype=np.float64),
                        reach=np.asarray(reach, dtype=np.float64),
                        record_json=np.array(json.dumps(record)))
    atomic_write_bytes(path, buffer.getvalue())


def load_part(path: str, record: dict, keys: Sequence[Tuple[str, int]]
              ) -> Tuple[Optional[Tuple[np.ndarray, np.ndarray]], Optional[str]]:
    """``((noise, reach), None)`` when the part at ``path`` carries ``record`` and the samples
    ``keys``; else ``(None, why not)``."""
    if not os.path.isfile(path):
        return None, "it is missing"
    reason = record_mismatch(load_part_record(path), record)
    if reason:
        return None, reason
    try:
        with np.load(path) as z:
            saved = list(zip([str(c) for c in z["cases"]], [int(s) for s in z["slices"]]))
            noise = np.asarray(z["noise"], dtype=np.float64)
            reach = np.asarray(z["reach"], dtype=np.float64)
    except Exception:  # written atomically: only a damaged or foreign file gets here
        return None, "it cannot be read"
    if saved != [(str(c), int(s)) for c, s in keys] or noise.shape != (len(keys),):
        return None, "it was computed on other samples"
    return (noise, reach), None


def minimal_noise(model: LoadedModel, samples: List[SliceSample],
                  grid_results: Dict[float, NoiseResult], settings: MinimalSettings,
                  records: PartRecords, out: str, batch_size: int, device: torch.device,
                  progress: bool = False) -> Tuple[MinimalNoise, bool]:
    """One model's :class:`MinimalNoise` and whether its attack part was reused: the attack's
    part in ``out`` is taken when its record is this run's, else the attack runs (with a
    progress bar when ``progress``) and its part is saved."""
    path = part_path(out, model.name)
    record = part_record(records, model.name, settings)
    keys = [s.key for s in samples]
    saved, reason = load_part(path, record, keys)
    reused = saved is not None
    if reused:
        noise, reach = saved
    else:
        if reason != "it is missing":
            print(f"recomputing the minimal noise of {model.name} ({reason})", flush=True)
        unit = "volume" if any(s.is_volume for s in samples) else "slice"
        with tqdm(total=len(samples), desc=f"minimal noise ({model.name})", unit=unit,
                  disable=not progress or not samples) as bar:
            noise, reach = attack_minimal(model, samples, settings, batch_size, device, bar)
        save_part(path, [k[0] for k in keys], [k[1] for k in keys], noise, reach, record)
    return combined([k[0] for k in keys], [k[1] for k in keys], noise, reach, grid_results,
                    settings), reused
