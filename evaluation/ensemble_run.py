"""An evaluation under an attack ensemble: every model's slices through :func:`.ensemble.iter_ensemble`,
each (model, noise level, member) saved as a part as soon as it is done, so that an interrupted
run resumes from the members it finished."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch
from tqdm import tqdm

from nnunet_ima.evaluation.ensemble import EnsembleLevel, iter_ensemble
from nnunet_ima.evaluation.models import LoadedModel
from nnunet_ima.evaluation.options import EvalOptions
from nnunet_ima.evaluation.provenance import PartRecords
from nnunet_ima.evaluation.report import (load_part_meta, member_part_path, noise_key, save_part,
                                          summarise, summarise_ensemble)
from nnunet_ima.evaluation.resume import StalePart, part_label, reusable_part
from nnunet_ima.evaluation.robustness import NoiseResult
from nnunet_ima.evaluation.samples import SliceSample


@dataclass
class EnsembleRun:
    """Per model and noise level, the ensemble's :class:`EnsembleLevel`."""

    members: Tuple[str, ...]
    levels: Dict[str, Dict[float, EnsembleLevel]]

    @property
    def worst(self) -> Dict[str, Dict[float, NoiseResult]]:
        """The per-slice worst case, ``{model: {noise: result}}`` (per-slice rows, examples)."""
        return {name: {n: level.worst for n, level in by_noise.items()}
                for name, by_noise in self.levels.items()}

    def summaries(self, models: Sequence[LoadedModel]) -> dict:
        """``summary["models"]``: the headline entry of every model."""
        return {m.name: summarise_ensemble(
                    {n: level.worst for n, level in self.levels[m.name].items()},
                    {n: level.worst_tvdi for n, level in self.levels[m.name].items()},
                    m.class_names)
                for m in models}

    def summary(self, models: Sequence[LoadedModel]) -> dict:
        """``summary["ensemble"]``: the members, each one's own entry, slices and seconds."""
        per_attack, attacked, seconds = {}, {}, {}
        for m in models:
            levels = self.levels[m.name]
            per_attack[m.name] = {
                member: summarise({n: level.members[member] for n, level in levels.items()},
                                  m.class_names)
                for member in self.members}
            attacked[m.name] = {noise_key(n): level.attacked for n, level in levels.items()}
            seconds[m.name] = {noise_key(n): level.seconds for n, level in levels.items()}
        return {"members": list(self.members), "per_attack": per_attack, "attacked": attacked,
                "seconds": seconds}


Finished = Dict[Tuple[float, str], Tuple[NoiseResult, int, float]]
"""One model's member results of an interrupted run: ``(noise, member) -> (result, slices
attacked, seconds)``."""


def member_record(records: PartRecords, model: str, noise: float, members: Sequence[str],
                  member: str) -> dict:
    """The record of a member's part: a member attacks only the slices the members before it
    left unbroken, so they are part of what produced it."""
    return records.record(model, noise, member, members[:list(members).index(member)])


def finished_members(out: str, models: Sequence[LoadedModel],
                     samples: Dict[str, List[SliceSample]], noise: Sequence[float],
                     members: Sequence[str], records: PartRecords
                     ) -> Tuple[Dict[str, Finished], List[StalePart]]:
    """Per model, the member parts in ``out/parts`` that are this run's, and the ones that are
    not (to recompute)."""
    finished: Dict[str, Finished] = {m.name: {} for m in models}
    stale: List[StalePart] = []
    for m in models:
        keys = [s.key for s in samples[m.name]]
        for n in noise:
            for member in members:
                path = member_part_path(out, m.name, n, member)
                if not os.path.isfile(path):
                    continue
                result, reason = reusable_part(
                    path, member_record(records, m.name, n, members, member), keys)
                if result is None:
                    stale.append(StalePart(path, part_label(m.name, n, member), reason))
                    continue
                meta = load_part_meta(path)
                finished[m.name][(n, member)] = (result, int(meta.get("attacked", 0)),
                                                 float(meta.get("seconds", 0.0)))
    return finished, stale


def attack_with_ensemble(models: Sequence[LoadedModel], samples: Dict[str, List[SliceSample]],
                         noise: Sequence[float], options: EvalOptions, device: torch.device,
                         finished: Dict[str, Finished], records: PartRecords) -> EnsembleRun:
    """Run the ensemble of ``options`` on every model, reusing the member results ``finished``
    (of :func:`finished_members`); each new member result is saved as a part with its record."""
    members = tuple(options.ensemble)
    attacked_levels = [n for n in noise if n > 0]
    finished = {m.name: finished.get(m.name, {}) for m in models}
    reused = sum(len(f) for f in finished.values())
    if reused:
        print(f"resuming: reused {reused} (model, noise, attack) results from "
              f"{os.path.join(options.output, 'parts')}", flush=True)
    total = sum(len(samples[m.name]) * ((0.0 in noise) + len(attacked_levels) * len(members))
                for m in models)
    levels: Dict[str, Dict[float, EnsembleLevel]] = {}
    with tqdm(total=total, desc="attacking slices (ensemble)", unit="slice",
              disable=not options.progress or total == 0) as bar:
        for m in models:
            n_slices = len(samples[m.name])
            bar.set_postfix_str(m.name)
            done_before = [key for key in finished[m.name] if key[0] > 0 or key[1] == members[0]]
            bar.update(n_slices * len(done_before))

            def save(n: float, member: str, result: NoiseResult, attacked: int, seconds: float,
                     model: LoadedModel = m, count: int = n_slices) -> None:
                save_part(member_part_path(options.output, model.name, n, member), result,
                          {"attacked": attacked, "seconds": seconds},
                          record=member_record(records, model.name, n, members, member))
                if n > 0:
                    bar.update(count - attacked)   # the skipped slices: already at Dice 0

            levels[m.name] = dict(iter_ensemble(m, samples[m.name], noise, options.attack,
                                                members, device, finished[m.name], save, bar))
    return EnsembleRun(members, levels)
