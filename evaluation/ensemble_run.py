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
from nnunet_ima.evaluation.report import (load_part, load_part_meta, member_part_path, noise_key,
                                          save_part, summarise, summarise_ensemble)
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


def _finished_members(out: str, model: LoadedModel, samples: List[SliceSample],
                      noise: Sequence[float], members: Sequence[str]
                      ) -> Dict[Tuple[float, str], Tuple[NoiseResult, int, float]]:
    keys = [s.key for s in samples]
    finished = {}
    for n in noise:
        for member in members:
            path = member_part_path(out, model.name, n, member)
            if os.path.isfile(path):
                meta = load_part_meta(path)
                finished[(n, member)] = (load_part(path, keys), int(meta.get("attacked", 0)),
                                         float(meta.get("seconds", 0.0)))
    return finished


def attack_with_ensemble(models: Sequence[LoadedModel], samples: Dict[str, List[SliceSample]],
                         noise: Sequence[float], options: EvalOptions, device: torch.device,
                         resume: bool) -> EnsembleRun:
    """Run the ensemble of ``options`` on every model; with ``resume``, reuse the member parts
    of ``options.output``."""
    members = tuple(options.ensemble)
    attacked_levels = [n for n in noise if n > 0]
    finished = {m.name: _finished_members(options.output, m, samples[m.name], noise, members)
                if resume else {} for m in models}
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
                          {"attacked": attacked, "seconds": seconds})
                if n > 0:
                    bar.update(count - attacked)   # the skipped slices: already at Dice 0

            levels[m.name] = dict(iter_ensemble(m, samples[m.name], noise, options.attack,
                                                members, device, finished[m.name], save, bar))
    return EnsembleRun(members, levels)
