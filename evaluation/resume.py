"""Resuming in an output folder: a rerun with the configuration of ``OUT/config.json`` takes the
finished (model, noise) parts from ``OUT/parts``; another configuration is refused (or, with
``--overwrite``, replaces the old results) so that results of other settings are never mixed."""
from __future__ import annotations

import json
import os
import shutil
from typing import Dict, List, Sequence

from nnunet_ima.errors import UserInputError

from nnunet_ima.evaluation.models import LoadedModel
from nnunet_ima.evaluation.report import (CONFIG_FILENAME, atomic_write_text, load_part,
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
    if old == config:
        return True
    if not overwrite:
        raise UserInputError(f"{out} holds results made with other settings (differences in: "
                             f"{', '.join(config_differences(old, config))}); choose another -o "
                             f"or pass --overwrite")
    return False


def config_differences(old, new, prefix: str = "") -> List[str]:
    """Dotted paths where two configurations differ, e.g. ``models.IMA.checkpoint_sha256``."""
    if isinstance(old, dict) and isinstance(new, dict):
        paths = []
        for key in sorted(set(old) | set(new), key=str):
            if old.get(key) != new.get(key):
                paths += config_differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return paths
    return [prefix.rstrip(".")]


def finished_parts(out: str, models: Sequence[LoadedModel],
                   samples: Dict[str, List[SliceSample]], noise: Sequence[float],
                   overwrite: bool) -> Dict[str, Dict[float, NoiseResult]]:
    """The results in ``out/parts`` of a resumable folder, ``{model name: {noise: result}}``.

    Raises:
        UserInputError: a part made on other slices, unless ``overwrite`` (then it is left out,
            to be computed again).
    """
    results: Dict[str, Dict[float, NoiseResult]] = {m.name: {} for m in models}
    for m in models:
        keys = [s.key for s in samples[m.name]]
        for n in noise:
            path = part_path(out, m.name, n)
            if not os.path.isfile(path):
                continue
            try:
                results[m.name][n] = load_part(path, keys)
            except UserInputError:
                if not overwrite:
                    raise
    return results


def prepare_output(out: str, config: dict, resume: bool) -> None:
    """Create ``out`` and write ``config``; unless resuming, first delete the results of other
    settings (or of a folder without a configuration): they must not survive."""
    if not resume:
        shutil.rmtree(os.path.join(out, "parts"), ignore_errors=True)
        for name in OUTPUT_FILES:
            if os.path.isfile(os.path.join(out, name)):
                os.remove(os.path.join(out, name))
    os.makedirs(out, exist_ok=True)
    atomic_write_text(os.path.join(out, CONFIG_FILENAME), json.dumps(config, indent=2))


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
