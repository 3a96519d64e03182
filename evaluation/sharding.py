"""One evaluation over several processes and machines: ``--shard i/n``, torchrun, and the merge.

Units. The work of an evaluation is cut into units: one attack batch of one (model, noise
level, ensemble member) part, exactly the batch one process attacks (:func:`.robustness._batches`;
the batch's index seeds its random start), the clean pass at noise 0 included. A unit's counts
do not depend on which process computes it, so the parts assembled from the units are the parts
one process writes, and the merge writes the same tables from them (on the same kind of device
with the same library versions).

Phases. A single attack is one phase. Under ``--attack ensemble`` a member after the first
attacks only the samples that the members before it left unbroken (:mod:`.ensemble`), in batches
of those samples: its units are known only once every unit of the members before it is done.
Member ``k`` is phase ``k``; a shard computes its share of a phase, then waits for the others
(under torchrun at a barrier; with ``--shard`` by polling the folder for ``--shard-wait``
seconds, after which it stops and a rerun of the same command continues where it stopped).

Assignment. Each phase's units are dealt to the shards by cost, longest first to the least
loaded shard (ties: the earlier unit, the lower shard), so that a few models and noise levels
with many samples (3D: one volume per batch) spread evenly. Every shard computes the same
assignment from the same inputs, without talking to the others. A unit's cost is its voxels
times its passes (1 for the clean pass, ``3 x steps`` for an attack: a forward and a backward
per step), an estimate.

Layout, one folder per shard, so that shards write concurrently into one output folder on a
shared file system, each holding the lock of its own folder (:mod:`.lock`)::

    OUT/shards/<i>-of-<n>/config.json       the run's configuration (what OUT/config.json holds)
    OUT/shards/<i>-of-<n>/options.json      its options, which ``nnunet-ima-eval merge`` reads
    OUT/shards/<i>-of-<n>/units/<part>__batch<b>.npz   one unit: counts, example, record
    OUT/shards/<i>-of-<n>/done.json         written once all the shard's units are done
    OUT/shards/<i>-of-<n>/nnunet-ima-eval.lock         while the shard runs

A unit file carries the record of its part (:mod:`.provenance`) and the samples it covers; a
rerun of a shard keeps the units that are its own and recomputes the others. The merge holds
the lock of ``OUT``, checks that every shard ran with the same configuration and that every unit
is there and is this configuration's, then writes ``OUT/parts`` and the tables.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from time import perf_counter
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

from nnunet_ima.errors import UserInputError
from nnunet_ima.io import write_text

from nnunet_ima.evaluation.ensemble import _subset, lowest_dice_choice, member_settings, select
from nnunet_ima.evaluation.memory import measure_peak
from nnunet_ima.evaluation.models import LoadedModel
from nnunet_ima.evaluation.objects import DEFAULT_SIZE_BINS, empty_counts
from nnunet_ima.evaluation.provenance import PartRecords, compared_config, differences, \
    record_mismatch
from nnunet_ima.evaluation.report import (CONFIG_FILENAME, load_part, load_part_meta,
                                          load_part_record, part_path, save_part)
from nnunet_ima.evaluation.resume import FinishedParts, member_record, part_label
# The batching of one process, whose batch index seeds each batch's random start.
from nnunet_ima.evaluation.robustness import AttackSettings, NoiseResult, _batches, iter_levels
from nnunet_ima.evaluation.samples import SliceSample

SHARDS_FOLDER = "shards"
OPTIONS_FILENAME = "options.json"
DONE_FILENAME = "done.json"
UNITS_FOLDER = "units"

BARRIER_TIMEOUT = timedelta(days=7)
"""How long a torchrun rank waits at a barrier for the others: as long as one phase (member) of
the slowest rank may take. A rank that fails makes torchrun stop the others sooner."""


# ------------------------------------------------------------------------------------ shards

@dataclass(frozen=True, order=True)
class Shard:
    """Shard ``index`` of ``count`` (``--shard index/count``)."""

    index: int
    count: int

    def __post_init__(self):
        if not 0 <= self.index < self.count:
            raise ValueError(f"a shard is I/N with 0 <= I < N, e.g. 0/4; got "
                             f"{self.index}/{self.count}")

    @property
    def name(self) -> str:
        """Its folder's name, ``<index>-of-<count>``."""
        return f"{self.index}-of-{self.count}"

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str) -> Shard:
    """``"1/4"`` -> ``Shard(1, 4)``; ``ValueError`` for anything else."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not match:
        raise ValueError(f"a shard is I/N with 0 <= I < N, e.g. 0/4; got {text!r}")
    return Shard(int(match.group(1)), int(match.group(2)))


def shard_folder(out: str, shard: Shard) -> str:
    return os.path.join(out, SHARDS_FOLDER, shard.name)


def shard_folders(out: str) -> List[Shard]:
    """The shards that have a folder in ``out/shards``, sorted."""
    try:
        names = os.listdir(os.path.join(out, SHARDS_FOLDER))
    except OSError:
        return []
    found = []
    for name in names:
        match = re.fullmatch(r"(\d+)-of-(\d+)", name)
        if match and int(match.group(1)) < int(match.group(2)):
            found.append(Shard(int(match.group(1)), int(match.group(2))))
    return sorted(found)


# ------------------------------------------------------------------------------------- units

@dataclass(frozen=True)
class Unit:
    """One attack batch of one (model, noise level, member) part.

    Attributes:
        position: the member's place in the ensemble (its phase); 0 for a single attack and for
            the clean pass.
        batch: the batch's index among the batches of the member's samples at this level.
        rows: the batch's samples, as positions in the member's samples (every sample for the
            first member and the clean pass; for a later member, the ones left unbroken).
        cost: voxels x passes (see the module docstring).
    """

    model: str
    noise: float
    member: Optional[str]
    position: int
    batch: int
    rows: Tuple[int, ...]
    cost: int

    @property
    def key(self) -> Tuple[str, float, Optional[str], int]:
        return self.model, self.noise, self.member, self.batch

    @property
    def label(self) -> str:
        return f"{part_label(self.model, self.noise, self.member)}, batch {self.batch}"


def unit_cost(samples: Sequence[SliceSample], noise: float, steps: int) -> int:
    """Voxels x passes of one batch: 1 pass for the clean prediction, ``3 x steps`` for an
    attack (a forward and a backward, about two forwards, per step)."""
    voxels = sum(int(np.prod(s.image.shape[1:])) for s in samples)
    return voxels * (1 if noise == 0 else 3 * steps)


def assign(units: Sequence[Unit], count: int) -> List[int]:
    """The shard of each unit: longest first to the least loaded shard (ties: the earlier
    unit, the lower shard index). Deterministic, so every shard computes the same answer."""
    loads = [0] * count
    owners = [0] * len(units)
    for i in sorted(range(len(units)), key=lambda i: (-units[i].cost, i)):
        shard = min(range(count), key=lambda s: (loads[s], s))
        owners[i] = shard
        loads[shard] += units[i].cost
    return owners


def unit_path(folder: str, unit: Unit) -> str:
    """``folder/units/<part file name>__batch<b>.npz``, ``folder`` a shard's."""
    part = os.path.basename(part_path(folder, unit.model, unit.noise, unit.member))
    return os.path.join(folder, UNITS_FOLDER, f"{part[:-len('.npz')]}__batch{unit.batch}.npz")


def _rows_digest(rows: Sequence[int]) -> str:
    return hashlib.sha256(json.dumps([int(r) for r in rows]).encode()).hexdigest()


class MissingUnits(Exception):
    """Units of ``phase`` that are not (validly) on disk: ``(unit, owner shard, reason)``."""

    def __init__(self, phase: int, missing: List[Tuple[Unit, int, str]]):
        super().__init__(f"{len(missing)} units of phase {phase} missing")
        self.phase = phase
        self.missing = missing

    def owners(self) -> List[int]:
        return sorted({owner for _, owner, _ in self.missing})


class UnitPlan:
    """The units of one evaluation split into ``count`` shards writing under ``out/shards``:
    which units each phase has, which shard computes each, and the parts they assemble into.

    Args:
        models, samples: the evaluation's models and each one's samples (by model name).
        noise_levels: its noise levels; ``base``: its attack settings; ``members``: its
            ensemble's members (:data:`.ensemble.SINGLE` for a single attack).
        records: the run's :class:`.provenance.PartRecords`; a unit carries its part's record.
        size_bins: the object-size bins of the results' object counts (:mod:`.objects`).
    """

    def __init__(self, out: str, count: int, models: Sequence[LoadedModel],
                 samples: Dict[str, List[SliceSample]], noise_levels: Sequence[float],
                 base: AttackSettings, members: Sequence[Optional[str]], records: PartRecords,
                 size_bins: Sequence[int] = DEFAULT_SIZE_BINS):
        self.out, self.count = out, count
        self.size_bins = tuple(size_bins)
        self.models = {m.name: m for m in models}
        self.samples = samples
        self.noise = sorted(set(float(n) for n in noise_levels))
        self.base, self.members, self.records = base, tuple(members), records
        self._units: Dict[int, List[Unit]] = {}
        self._owners: Dict[int, List[int]] = {}
        self._rows: Dict[Tuple[str, float, int], List[int]] = {}  # the member's samples
        self._results: Dict[Tuple[str, float, int], Tuple[NoiseResult, int, float]] = {}

    @property
    def phases(self) -> int:
        return len(self.members)

    def settings(self, noise: float, position: int) -> AttackSettings:
        """The attack of a member; the clean pass runs with the base settings, as one process
        runs it (:func:`.ensemble.iter_ensemble`)."""
        return self.base if noise == 0 else member_settings(self.base, self.members[position])

    def levels(self, position: int) -> List[float]:
        """The noise levels with units in phase ``position`` (noise 0 is one clean pass, in the
        first)."""
        return self.noise if position == 0 else [n for n in self.noise if n > 0]

    # ---------------------------------------------------------------------- phases and units

    def units(self, phase: int) -> List[Unit]:
        """The units of ``phase``, in a fixed order (model, noise, batch).

        Raises:
            MissingUnits: a unit of an earlier phase is not done yet, so this phase's samples
                are not known.
        """
        if phase not in self._units:
            for earlier in range(phase):
                self.assemble(earlier)
            units = []
            for name in self.models:
                for noise in self.levels(phase):
                    units += self._units_of(name, noise, phase)
            self._units[phase] = units
            self._owners[phase] = assign(units, self.count)
        return self._units[phase]

    def owners(self, phase: int) -> List[int]:
        """The shard of each of :meth:`units` ``(phase)``."""
        self.units(phase)
        return self._owners[phase]

    def share(self, phase: int, index: int) -> List[Unit]:
        """The units of ``phase`` that shard ``index`` computes."""
        return [u for u, owner in zip(self.units(phase), self.owners(phase)) if owner == index]

    def _member_rows(self, name: str, noise: float, position: int) -> List[int]:
        """The samples (positions in the model's samples) the member attacks at ``noise``: all
        for the first, those still above Dice 0 under the members before it for the others."""
        key = (name, noise, position)
        if key not in self._rows:
            if position == 0:
                self._rows[key] = list(range(len(self.samples[name])))
            else:
                worst = self._worst(name, noise, position)
                self._rows[key] = [int(i) for i in np.flatnonzero(worst.slice_dice > 0)]
        return self._rows[key]

    def _units_of(self, name: str, noise: float, position: int) -> List[Unit]:
        chosen = [self.samples[name][i] for i in self._member_rows(name, noise, position)]
        if not chosen:
            return []
        settings = self.settings(noise, position)
        return [Unit(name, noise, self.members[position], position, b, tuple(batch),
                     unit_cost([chosen[i] for i in batch], noise, settings.steps))
                for b, batch in enumerate(_batches(chosen, settings.batch_size))]

    def _worst(self, name: str, noise: float, position: int) -> NoiseResult:
        """The per-sample worst case of the members before ``position`` (as the ensemble keeps
        it between members)."""
        done = [self._results[(name, noise, p)][0] for p in range(position)]
        return select(done, lowest_dice_choice(done))

    # -------------------------------------------------------------------- one unit on disk

    def record(self, unit: Unit) -> dict:
        return member_record(self.records, unit.model, unit.noise, self.members, unit.member)

    def _unit_meta(self, unit: Unit) -> dict:
        rows = self._member_rows(unit.model, unit.noise, unit.position)
        return {"model": unit.model, "noise": unit.noise, "member": unit.member,
                "batch": unit.batch, "rows": list(unit.rows),
                "member_samples_sha256": _rows_digest(rows)}

    def _chosen(self, unit: Unit) -> List[SliceSample]:
        samples = self.samples[unit.model]
        return [samples[i] for i in self._member_rows(unit.model, unit.noise, unit.position)]

    def load(self, unit: Unit, owner: int) -> Tuple[Optional[Tuple[NoiseResult, float]], str]:
        """``((result over the unit's rows, seconds), "")`` when shard ``owner``'s folder holds
        the unit as this plan would compute it; else ``(None, why not)``."""
        path = unit_path(shard_folder(self.out, Shard(owner, self.count)), unit)
        if not os.path.isfile(path):
            return None, "missing"
        reason = record_mismatch(load_part_record(path), self.record(unit))
        if reason:
            return None, f"made with other settings: {reason}"
        try:
            result, meta = load_part(path), load_part_meta(path)
        except UserInputError:
            return None, "it cannot be read"
        if meta.get("unit") != self._unit_meta(unit):
            return None, "made on other samples (the members before it broke other samples)"
        chosen = self._chosen(unit)
        if list(zip(result.cases, result.slices)) != [(chosen[r].case, chosen[r].index)
                                                        for r in unit.rows]:
            return None, "made on other test samples"
        return (result, float(meta.get("seconds", 0.0))), ""

    def compute(self, unit: Unit, folder: str, device: torch.device,
                progress: Optional[tqdm] = None) -> None:
        """Attack the unit's batch and save it in ``folder/units`` with its record."""
        began = perf_counter()
        result = next(iter_levels(self.models[unit.model], self._chosen(unit), [unit.noise],
                                  self.settings(unit.noise, unit.position), device, progress,
                                  only_batches={unit.batch}, size_bins=self.size_bins))[1]
        rows = list(unit.rows)
        own = NoiseResult([result.cases[r] for r in rows], [result.slices[r] for r in rows],
                          result.tp[rows], result.fp[rows], result.fn[rows], result.example,
                          result.objects[rows])
        save_part(unit_path(folder, unit), own,
                  {"unit": self._unit_meta(unit), "seconds": perf_counter() - began},
                  record=self.record(unit))

    # ------------------------------------------------------------------------ the parts

    def assemble(self, phase: int) -> None:
        """Read every unit of ``phase`` and assemble its member results, one per (model,
        noise level), as one process computes them.

        Raises:
            MissingUnits: some units are not on disk (or not this plan's).
        """
        if all((name, noise, phase) in self._results for name in self.models
               for noise in self.levels(phase)):
            return
        units, owners = self.units(phase), self.owners(phase)
        loaded: Dict[tuple, Tuple[NoiseResult, float]] = {}
        missing = []
        for unit, owner in zip(units, owners):
            found, reason = self.load(unit, owner)
            if found is None:
                missing.append((unit, owner, reason))
            else:
                loaded[unit.key] = found
        if missing:
            raise MissingUnits(phase, missing)
        for name, model in self.models.items():
            for noise in self.levels(phase):
                rows = self._member_rows(name, noise, phase)
                mine = [u for u in units if u.model == name and u.noise == noise]
                chosen = [self.samples[name][i] for i in rows]
                k = model.num_classes - 1
                tp, fp, fn = (np.zeros((len(chosen), k), dtype=np.int64) for _ in range(3))
                # Object counts only if every unit has them (units of an older version do not).
                objects = (empty_counts(len(chosen), model.num_classes, self.size_bins)
                           if all(loaded[u.key][0].objects is not None for u in mine) else None)
                example: Dict[str, np.ndarray] = {}
                seconds = 0.0
                for unit in mine:
                    result, took = loaded[unit.key]
                    for store, counts in zip((tp, fp, fn), (result.tp, result.fp, result.fn)):
                        store[list(unit.rows)] = counts
                    if objects is not None:
                        objects[list(unit.rows)] = result.objects
                    example = result.example or example  # only the example's batch has one
                    seconds += took
                part = NoiseResult([s.case for s in chosen], [s.index for s in chosen],
                                   tp, fp, fn, example, objects)
                if phase == 0:
                    result = part
                else:
                    worst = self._worst(name, noise, phase)
                    result = _subset(worst, rows, part) if rows else worst
                attacked = 0 if noise == 0 else len(rows)
                self._results[(name, noise, phase)] = (result, attacked, seconds)

    def finished_parts(self) -> FinishedParts:
        """Every part of the evaluation, ``{model: {noise: {member: (result, attacked,
        seconds)}}}`` (:data:`.resume.FinishedParts`: what a resumed run reuses; noise 0 is the
        first member's).

        Raises:
            MissingUnits: the first phase with units missing.
        """
        for phase in range(self.phases):
            self.assemble(phase)
        parts: FinishedParts = {}
        for name in self.models:
            parts[name] = {}
            for noise in self.noise:
                for position in range(self.phases if noise > 0 else 1):
                    parts[name].setdefault(noise, {})[self.members[position]] = \
                        self._results[(name, noise, position)]
        return parts


# ------------------------------------------------------------------------------- one shard

@dataclass
class ShardReport:
    """What :func:`run_shard` did: units of its share computed and reused, and, where it
    stopped before its last phase, the units of other shards it needs (``waiting``)."""

    shard: Shard
    computed: int = 0
    reused: int = 0
    waiting: Optional[MissingUnits] = None
    peaks: Dict[str, dict] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.waiting is None


def run_shard(plan: UnitPlan, shard: Shard, device: torch.device,
              sync: Callable[[int], None], progress: bool = False,
              must_see_others: bool = False) -> ShardReport:
    """Compute the units of ``shard`` phase by phase, skipping those already in its folder,
    and call ``sync(phase)`` after each phase but the last (a barrier, or a wait for the other
    shards' units). Where the next phase's samples cannot be known yet (other shards' units of
    this phase missing), stop and say so in the report, or with ``must_see_others`` (after a
    barrier every shard is done) refuse.

    Raises:
        UserInputError: ``must_see_others`` and the other shards' units are not visible (the
            output folder is not shared between the machines).
    """
    folder = shard_folder(plan.out, shard)
    report = ShardReport(shard)
    for phase in range(plan.phases):
        try:
            mine = plan.share(phase, shard.index)
        except MissingUnits as e:
            if must_see_others:
                raise UserInputError(
                    f"shard {shard} cannot see the results of shard(s) "
                    f"{', '.join(str(Shard(o, shard.count)) for o in e.owners())} in "
                    f"{os.path.join(plan.out, SHARDS_FOLDER)} after they finished: with several "
                    f"machines, -o must be a folder on a file system they share") from None
            report.waiting = e
            return report
        todo = []
        for unit in mine:
            found, _ = plan.load(unit, shard.index)
            if found is None:
                todo.append(unit)
            else:
                report.reused += 1
        total = sum(len(u.rows) for u in todo)
        member = plan.members[phase]
        desc = f"shard {shard}" + (f" {member}" if member else "")
        with tqdm(total=total, desc=desc, unit="sample", disable=not progress or not total) as bar:
            for name in plan.models:
                theirs = [u for u in todo if u.model == name]
                if not theirs:
                    continue
                measured: Dict[str, dict] = {}
                with measure_peak(device, measured, name):
                    for unit in theirs:
                        plan.compute(unit, folder, device, bar)
                        report.computed += 1
                if measured[name]["bytes"] >= report.peaks.get(name, {}).get("bytes", -1):
                    report.peaks[name] = measured[name]
        if phase + 1 < plan.phases:
            sync(phase)
    return report


def wait_for_phase(plan: UnitPlan, seconds: float, poll: float = 10.0) -> Callable[[int], None]:
    """``sync`` for :func:`run_shard`: after a phase, poll the output folder until every unit
    of the phase is there (so that the next phase can be planned, or the parts assembled) or
    ``seconds`` have passed."""
    def sync(phase: int) -> None:
        deadline = time.monotonic() + seconds
        while True:
            try:
                plan.assemble(phase)
                return
            except MissingUnits:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                time.sleep(min(poll, left))
    return sync


def write_done(plan: UnitPlan, report: ShardReport) -> None:
    """Mark the shard's folder done, with the peak memory of its attacks per model."""
    total = sum(len(plan.share(p, report.shard.index)) for p in range(plan.phases))
    write_text(os.path.join(shard_folder(plan.out, report.shard), DONE_FILENAME),
               json.dumps({"shard": str(report.shard), "units": total,
                           "peak_memory": report.peaks}, indent=2))


def describe_missing(out: str, count: int, missing: MissingUnits, members: Sequence) -> str:
    """Which shards lack which units, in words: not run (no folder), not finished, or holding
    units of other settings."""
    phrases = []
    for owner in missing.owners():
        shard = Shard(owner, count)
        theirs = [(u, reason) for u, o, reason in missing.missing if o == owner]
        folder = shard_folder(out, shard)
        if not os.path.isdir(folder):
            phrases.append(f"shard {shard} has not run (no {folder})")
            continue
        absent = [u for u, reason in theirs if reason == "missing"]
        other = [(u, reason) for u, reason in theirs if reason != "missing"]
        if absent:
            phrases.append(f"shard {shard} has not finished ({len(absent)} of its units are "
                           f"missing, e.g. {absent[0].label})")
        if other:
            phrases.append(f"shard {shard} holds {len(other)} units that are not this "
                           f"evaluation's (e.g. {other[0][0].label}: {other[0][1]})")
    text = "; ".join(phrases)
    if missing.phase > 0:  # a later member's units, planned once the members before it are done
        text += f" (units of the ensemble member {members[missing.phase]})"
    return text


# --------------------------------------------------------------------------- the shards' files

@dataclass
class ShardFiles:
    """What a shard's folder says about its run."""

    shard: Shard
    config: Optional[dict]
    options: Optional[dict]
    done: Optional[dict]


def _read_json(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def read_shard(out: str, shard: Shard) -> ShardFiles:
    folder = shard_folder(out, shard)
    return ShardFiles(shard, _read_json(os.path.join(folder, CONFIG_FILENAME)),
                      _read_json(os.path.join(folder, OPTIONS_FILENAME)),
                      _read_json(os.path.join(folder, DONE_FILENAME)))


def shards_to_merge(out: str) -> List[ShardFiles]:
    """The shards of ``out``, checked for a merge: one shard count, run with one configuration
    (shards without a configuration are left for the unit check, which names them).

    Raises:
        UserInputError: no shards, shards of several counts, or of different configurations.
    """
    found = shard_folders(out)
    if not found:
        raise UserInputError(f"{out} holds no shards ({os.path.join(out, SHARDS_FOLDER, 'I-of-N')}"
                             f"): run the evaluation with --shard I/N -o {out} first")
    counts = sorted({s.count for s in found})
    if len(counts) > 1:
        raise UserInputError(
            f"{os.path.join(out, SHARDS_FOLDER)} holds shards of {' and '.join(map(str, counts))} "
            f"processes (runs with different --shard counts): delete the folders of the count "
            f"you do not want (e.g. rm -r {os.path.join(out, SHARDS_FOLDER)}/*-of-{counts[0]}) "
            f"and merge again")
    files = [read_shard(out, s) for s in found]
    configured = [f for f in files if f.config is not None and f.options is not None]
    if not configured:
        raise UserInputError(f"no shard in {os.path.join(out, SHARDS_FOLDER)} has written its "
                             f"configuration yet: wait for the shards to start, then merge")
    first = configured[0]
    for other in configured[1:]:
        changed = differences(compared_config(first.config), compared_config(other.config))
        if changed:
            raise UserInputError(
                f"shard {other.shard} ran with other settings than shard {first.shard} "
                f"(differences in: {', '.join(changed)}); every shard must run the same "
                f"evaluation: rerun shard {other.shard} with the options of the others (add "
                f"--overwrite to replace its results)")
    return configured


def merged_peaks(shards: Sequence[ShardFiles]) -> Dict[str, dict]:
    """Per model, the largest peak memory any shard measured (``"shards"``: how many
    reported one)."""
    peaks: Dict[str, dict] = {}
    counted: Dict[str, int] = {}
    for files in shards:
        for name, entry in ((files.done or {}).get("peak_memory") or {}).items():
            counted[name] = counted.get(name, 0) + 1
            if entry.get("bytes", -1) > peaks.get(name, {}).get("bytes", -1):
                peaks[name] = dict(entry)
    for name in peaks:
        peaks[name]["shards"] = counted[name]
    return peaks


def other_counts(out: str, count: int) -> List[Shard]:
    """Shard folders of ``out`` made with another shard count than ``count``."""
    return [s for s in shard_folders(out) if s.count != count]


# -------------------------------------------------------------------------------- torchrun

@dataclass(frozen=True)
class Launch:
    """This process's place among the processes torchrun started."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def shard(self) -> Shard:
        return Shard(self.rank, self.world_size)


def torchrun_launch(environ=None) -> Optional[Launch]:
    """The rank of this process when torchrun (``torch.distributed.run``) started it among
    several (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` set); ``None`` otherwise (one process is
    an ordinary evaluation)."""
    environ = os.environ if environ is None else environ
    try:
        rank, world, local = (int(environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    except (KeyError, ValueError):
        return None
    return Launch(rank, world, local) if world > 1 else None


def rank_device(device: str, local_rank: int) -> str:
    """``cuda`` -> ``cuda:<local_rank>`` (one GPU per rank of a machine); any other device,
    an explicit ``cuda:N`` included, as given."""
    parsed = torch.device(device)
    return f"cuda:{local_rank}" if parsed.type == "cuda" and parsed.index is None else device


@contextmanager
def process_group(device: str) -> Iterator[Callable[[], None]]:
    """torch.distributed's process group of the torchrun ranks (NCCL on CUDA, gloo on a CPU),
    used only for barriers; yields the barrier. Destroyed on exit."""
    import torch.distributed as dist
    parsed = torch.device(device)
    cuda = parsed.type == "cuda"
    if cuda:
        torch.cuda.set_device(parsed)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=BARRIER_TIMEOUT)

    def barrier() -> None:
        if cuda:
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()
    try:
        yield barrier
    finally:
        dist.destroy_process_group()
