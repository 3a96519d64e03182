"""Resuming in an output folder: a rerun with the configuration of ``OUT/config.json`` takes the
finished (model, noise) parts from ``OUT/parts``; another configuration is refused (or, with
``--overwrite``, replaces the old results) so that results of other settings are never mixed.

A single attack and an ensemble resume alike: a part per (model, noise level, member), the
single attack's one member unnamed (:data:`.ensemble.SINGLE`). A part is taken only if its own
record (:mod:`.provenance`) equals the one this run would
write; any other part (another model's, other settings', other slices', a part without a record)
is recomputed, and the run says so.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from nnunet_ima.errors import UserInputError
from nnunet_ima.io import write_text

from nnunet_ima.evaluation.ensemble import SINGLE
from nnunet_ima.evaluation.models import LoadedModel
from nnunet_ima.evaluation.provenance import (PartRecords, compared_config, differences,
                                              record_mismatch)
from nnunet_ima.evaluation.report import (CONFIG_FILENAME, load_part, load_part_meta,
                                          load_part_record, noise_key, part_path)
from nnunet_ima.evaluation.robustness import NoiseResult
from nnunet_ima.evaluation.samples import SliceSample

OUTPUT_FILES = ("summary.json", "per_slice.csv", "tvdi.md", "adi.md", "curves.png", "examples.png",
                "size_breakdown.csv", "size_breakdown.md", "minimal_noise.csv", "minimal_noise.md")


def can_resume(out: str, config: dict, overwrite: bool) -> bool:
    """Whether ``out`` holds results of this very configuration (to resume). Other settings are
    an error unless ``overwrite``. Reads only: nothing is written before every check passed."""
    path = os.path.join(out, CONFIG_FILENAME)
    if not os.path.isfile(path):
        return False
    try:
        with open(path) as f:
            old = json.load(f)
        if isinstance(old, dict):
            old.setdefault("attack", "pgd")  # folders written before --attack existed ran PGD
    except (OSError, ValueError) as e:
        if overwrite:
            return False
        raise UserInputError(f"cannot read {path} ({e}); pass --overwrite or choose another -o") \
            from None
    # A footnote alone (how the training cases were known) does not change a number.
    old = compared_config(old) if isinstance(old, dict) else old
    if old == compared_config(config):
        return True
    if not overwrite:
        raise UserInputError(f"{out} holds results made with other settings (differences in: "
                             f"{', '.join(differences(old, compared_config(config)))}); choose "
                             f"another -o or pass --overwrite")
    return False


@dataclass(frozen=True)
class StalePart:
    """A part in ``OUT/parts`` that is not this run's: ``label`` names it (model, noise level,
    member), ``reason`` says how it differs."""

    path: str
    label: str
    reason: str


def reusable_part(path: str, expected: dict, keys: Sequence[Tuple[str, int]]
                  ) -> Tuple[Optional[NoiseResult], Optional[str]]:
    """``(result, None)`` when the part at ``path`` carries the record ``expected`` and the
    slices ``keys``; else ``(None, why not)``."""
    reason = record_mismatch(load_part_record(path), expected)
    if reason:
        return None, reason
    try:
        result = load_part(path)
    except UserInputError:
        return None, "it cannot be read"
    if list(zip(result.cases, result.slices)) != list(keys):
        return None, "it was computed on other test slices"
    return result, None


def part_label(model: str, noise: float, member: Optional[str] = None) -> str:
    return f"{model} at noise {noise_key(noise)}" + (f" ({member})" if member else "")


def member_record(records: PartRecords, model: str, noise: float,
                  members: Sequence[Optional[str]], member: Optional[str]) -> dict:
    """The record of a member's part: a member attacks only the slices the members before it
    left unbroken, so they are part of what produced it (none for a single attack)."""
    return records.record(model, noise, member, members[:list(members).index(member)])


FinishedPart = Tuple[NoiseResult, int, float]
"""A part of an interrupted run: its result, the slices its member attacked, its seconds."""

FinishedParts = Dict[str, Dict[float, Dict[Optional[str], FinishedPart]]]
"""What :func:`finished_parts` found: ``{model name: {noise: {member: part}}}``."""


def finished_parts(out: str, models: Sequence[LoadedModel],
                   samples: Dict[str, List[SliceSample]], noise: Sequence[float],
                   records: PartRecords, members: Sequence[Optional[str]] = SINGLE
                   ) -> Tuple[FinishedParts, List[StalePart]]:
    """The parts in ``out/parts`` of a resumable folder that are this run's, ``{model name:
    {noise: {member: (result, attacked, seconds)}}}``, and the ones that are not (to
    recompute). ``records``: the run's :class:`.provenance.PartRecords`; ``members``: the
    ensemble's (:data:`.ensemble.SINGLE` for a single attack, whose parts carry no member)."""
    finished: FinishedParts = {}
    stale: List[StalePart] = []
    for m in models:
        keys = [s.key for s in samples[m.name]]
        finished[m.name] = {}
        for n in noise:
            for member in members:
                path = part_path(out, m.name, n, member)
                if not os.path.isfile(path):
                    continue
                result, reason = reusable_part(
                    path, member_record(records, m.name, n, members, member), keys)
                if result is None:
                    stale.append(StalePart(path, part_label(m.name, n, member), reason))
                    continue
                meta = load_part_meta(path)
                finished[m.name].setdefault(n, {})[member] = (
                    result, int(meta.get("attacked", 0)), float(meta.get("seconds", 0.0)))
    return finished, stale


def report_stale(stale: Sequence[StalePart]) -> None:
    """Say which parts of the output folder are recomputed, and why (they were made by
    something other than this run's settings, model and slices)."""
    if not stale:
        return
    count = len(stale)
    listed = "; ".join(f"{p.label}: {p.reason}" for p in stale)
    print(f"recomputing {count} part{'s' * (count != 1)} whose settings differ from this run's "
          f"(in {os.path.dirname(stale[0].path)}): {listed}", flush=True)


def prepare_output(out: str, config: dict, resume: bool, stale: Sequence[StalePart] = ()
                   ) -> None:
    """Create ``out`` and write ``config``; unless resuming, first delete the results of other
    settings (or of a folder without a configuration): they must not survive. Resuming, the
    ``stale`` parts are deleted (they are recomputed)."""
    for part in stale:
        if os.path.isfile(part.path):
            os.remove(part.path)
    if not resume:
        shutil.rmtree(os.path.join(out, "parts"), ignore_errors=True)
        for name in OUTPUT_FILES:
            if os.path.isfile(os.path.join(out, name)):
                os.remove(os.path.join(out, name))
    os.makedirs(out, exist_ok=True)
    write_text(os.path.join(out, CONFIG_FILENAME), json.dumps(config, indent=2))


def report_reused(out: str, finished: FinishedParts,
                  total: int) -> None:
    """One line naming the parts (:func:`finished_parts`) a resumed run took from ``out/parts``
    rather than recomputing them (a resume is otherwise silent, and looks like a too-fast run).
    ``total``: the parts of a single attack's run; an ensemble's are not counted ahead (a
    member's part at noise 0 is shared)."""
    def level(noise: float, members) -> str:
        named = [m for m in members if m is not None]
        return noise_key(noise) + (f" ({', '.join(named)})" if named else "")
    listed = {name: [level(n, members) for n, members in sorted(levels.items())]
              for name, levels in finished.items() if levels}
    count = sum(len(members) for levels in finished.values() for members in levels.values())
    if not count:
        return
    single = all(m is None for levels in finished.values() for members in levels.values()
                 for m in members)
    counted = f"{count} of {total} (model, noise)" if single else f"{count} (model, noise, attack)"
    print(f"resuming: reused {counted} results from {os.path.join(out, 'parts')}: "
          + "; ".join(f"{name} at noise {' '.join(levels)}" for name, levels in listed.items()),
          flush=True)
