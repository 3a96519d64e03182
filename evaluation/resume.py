"""Resuming in an output folder: a rerun with the configuration of ``OUT/config.json`` takes the
finished (model, noise) parts from ``OUT/parts``; another configuration is refused (or, with
``--overwrite``, replaces the old results) so that results of other settings are never mixed.

A part is taken only if its own record (:mod:`.provenance`) equals the one this run would
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

from nnunet_ima.evaluation.models import LoadedModel
from nnunet_ima.evaluation.provenance import (PartRecords, compared_config, differences,
                                              record_mismatch)
from nnunet_ima.evaluation.report import (CONFIG_FILENAME, load_part, load_part_record,
                                          noise_key, part_path)
from nnunet_ima.evaluation.robustness import NoiseResult
from nnunet_ima.evaluation.samples import SliceSample

OUTPUT_FILES = ("summary.json", "per_slice.csv", "tvdi.md", "adi.md", "curves.png", "examples.png")


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


def finished_parts(out: str, models: Sequence[LoadedModel],
                   samples: Dict[str, List[SliceSample]], noise: Sequence[float],
                   records: PartRecords
                   ) -> Tuple[Dict[str, Dict[float, NoiseResult]], List[StalePart]]:
    """The results in ``out/parts`` of a resumable folder, ``{model name: {noise: result}}``,
    and the parts there that are not this run's (to recompute). ``records``: the run's
    :class:`.provenance.PartRecords`."""
    results: Dict[str, Dict[float, NoiseResult]] = {m.name: {} for m in models}
    stale: List[StalePart] = []
    for m in models:
        keys = [s.key for s in samples[m.name]]
        for n in noise:
            path = part_path(out, m.name, n)
            if not os.path.isfile(path):
                continue
            result, reason = reusable_part(path, records.record(m.name, n), keys)
            if result is None:
                stale.append(StalePart(path, part_label(m.name, n), reason))
            else:
                results[m.name][n] = result
    return results, stale


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


def report_reused(out: str, results: Dict[str, Dict[float, NoiseResult]], total: int) -> None:
    """One line naming the (model, noise) results a resumed run took from ``out/parts`` rather
    than recomputing them (a resume is otherwise silent, and looks like a too-fast run)."""
    reused = {name: sorted(levels) for name, levels in results.items() if levels}
    count = sum(len(levels) for levels in reused.values())
    if count:
        listed = "; ".join(f"{name} at noise {' '.join(noise_key(n) for n in levels)}"
                           for name, levels in reused.items())
        print(f"resuming: reused {count} of {total} (model, noise) results from "
              f"{os.path.join(out, 'parts')}: {listed}", flush=True)
