"""One evaluation, from its options to the files in its output folder: :func:`evaluate`.

The output folder is locked for the whole run (:mod:`.lock`: one evaluation at a time per
``-o``). Every input is checked (models, cases, slices, gradients, an output folder of other
settings) before anything is written; then each (model, noise level) is attacked and saved as a
part, with the record of what produced it (:mod:`.provenance`), as soon as it is done, so that
an interrupted run resumes from the parts that are its own (:mod:`.resume`).

A single attack is an ensemble of one member (:data:`.ensemble.SINGLE`): both run through
:func:`.ensemble.iter_ensemble`, save a part per (model, noise level, member) and resume alike.
"""
from __future__ import annotations

import os
import sys
from functools import partial
from typing import Dict, List, Optional, Sequence

import torch
from tqdm import tqdm

from nnunet_ima.io import check_output_folder

from nnunet_ima.evaluation.ensemble import EnsembleLevel, iter_ensemble, member_settings
from nnunet_ima.evaluation.lock import output_lock
from nnunet_ima.evaluation.memory import measure_peak
from nnunet_ima.evaluation.masking import run_masking_checks
from nnunet_ima.evaluation.models import LoadedModel, load_models
from nnunet_ima.evaluation.options import EvalOptions
from nnunet_ima.evaluation.plots import plot_curves, plot_examples
from nnunet_ima.evaluation.predictor_path import load_predictor_model
from nnunet_ima.evaluation.preflight import preflight_models
from nnunet_ima.evaluation.provenance import (PartRecords, clear_checkpoint_hashes, produced_by,
                                              slices_digest)
from nnunet_ima.evaluation.report import (noise_key, part_path, per_slice_rows, save_part,
                                          summarise, summarise_ensemble, write_outputs)
from nnunet_ima.evaluation.resume import (FinishedParts, can_resume, finished_parts, member_record,
                                          prepare_output, report_reused, report_stale)
from nnunet_ima.evaluation.robustness import NoiseResult, full_precision
from nnunet_ima.evaluation.run_config import run_config
from nnunet_ima.evaluation.samples import SliceSample
from nnunet_ima.evaluation.selection import (cases_to_score, check_training_cases, model_folders,
                                             samples_by_model)

Results = Dict[str, Dict[float, NoiseResult]]  # {model name: {noise level: result}}
Levels = Dict[str, Dict[float, EnsembleLevel]]  # {model name: {noise level: the members' level}}


def evaluate(options: EvalOptions) -> dict:
    """Run the evaluation ``options`` describe, in full precision (no TF32); returns the summary,
    also written with the tables and figures to ``options.output``.

    Raises:
        UserInputError: a bad input (a missing model, case or checkpoint, a training case not
            allowed, an output folder of other settings or in use by another evaluation, ...);
            nothing is written then.
    """
    check_output_folder(options.output, "-o/--output")  # before loading models and data
    clear_checkpoint_hashes()  # every run hashes the checkpoints as they are now
    with output_lock(options.output), full_precision():
        return _evaluate(options)


def _part_records(options: EvalOptions, config: dict, models: Sequence[LoadedModel],
                  samples: Dict[str, List[SliceSample]]) -> PartRecords:
    """The records of this run's parts; models that share their slices share one digest."""
    digests: Dict[int, str] = {}
    for m in models:
        if id(samples[m.name]) not in digests:
            digests[id(samples[m.name])] = slices_digest(samples[m.name])
    checkpoints = {m.name: m.checkpoint or {"path": m.checkpoint_path,
                                            "sha256": m.checkpoint_sha256} for m in models}
    return PartRecords(config, {m.name: digests[id(samples[m.name])] for m in models},
                       checkpoints, produced_by(options.device))


def _evaluate(options: EvalOptions) -> dict:
    noise = options.noise_levels
    device = torch.device(options.device)
    loader = None
    if options.inference == "predictor":
        loader = partial(load_predictor_model, use_mirroring=not options.disable_tta,
                         tile_step_size=options.tile_step_size)
    models = load_models(model_folders(options), options.folds, options.checkpoint, device,
                         loader)
    cases = {m.name: cases_to_score(m, options) for m in models}
    train_cases_scored = check_training_cases(models, cases, options)
    samples = samples_by_model(models, cases, options)
    preflight_models(models, samples, options.attack, device)
    config = run_config(options, models, samples, train_cases_scored)
    records = _part_records(options, config, models, samples)
    resume = can_resume(options.output, config, options.overwrite)
    finished: FinishedParts = {m.name: {} for m in models}
    stale = []
    if resume:
        finished, stale = finished_parts(options.output, models, samples, noise, records,
                                         options.members)
    # Only now, with every input checked, does anything get written.
    prepare_output(options.output, config, resume, stale)
    for m in models:
        n_cases = len(config["models"][m.name]["cases"])
        print(f"{m.name}: {len(samples[m.name])} slices of {n_cases} case{'s' * (n_cases != 1)} "
              f"({' '.join(config['models'][m.name]['case_source'])})", flush=True)
    report_stale(stale)
    report_reused(options.output, finished, len(models) * len(noise))
    peaks: Dict[str, dict] = {}  # the attacks' peak memory per model (evaluation.memory)
    levels = _attack(models, samples, noise, options, device, finished, records, peaks)
    results: Results = {name: {n: level.worst for n, level in by_noise.items()}
                        for name, by_noise in levels.items()}
    if options.ensemble:
        summary = {"config": config, "models": _ensemble_entries(levels, models),
                   "ensemble": _ensemble_summary(levels, models, options.ensemble)}
    else:
        summary = {"config": config,
                   "models": {m.name: summarise(results[m.name], m.class_names) for m in models}}
    summary["peak_memory"] = peaks
    if options.masking_checks:
        summary["masking_checks"] = _masking_checks(models, samples, results, options, device)
    rows = [r for m in models for r in per_slice_rows(m.name, results[m.name], m.class_names)]
    write_outputs(options.output, summary, rows, noise)
    plot_curves(summary, noise, os.path.join(options.output, "curves.png"))
    plot_examples(results, noise, os.path.join(options.output, "examples.png"))
    return summary


def _attack(models: Sequence[LoadedModel], samples: Dict[str, List[SliceSample]],
            noise: Sequence[float], options: EvalOptions, device: torch.device,
            finished: FinishedParts, records: PartRecords, peaks: Dict[str, dict]) -> Levels:
    """Run the members of ``options`` (one for a single attack) on every model at every noise
    level, reusing the parts ``finished`` (of :func:`.resume.finished_parts`); each new member
    result is saved as a part with its record as soon as it is done. ``peaks`` receives the
    peak memory of each model's attacks (:func:`.memory.measure_peak`)."""
    members = options.members
    attacked_levels = [n for n in noise if n > 0]
    total = sum(len(samples[m.name]) * ((0.0 in noise) + len(attacked_levels) * len(members))
                for m in models)
    levels: Levels = {}
    desc = "attacking slices" + (" (ensemble)" if options.ensemble else "")
    with tqdm(total=total, desc=desc, unit="slice",
              disable=not options.progress or total == 0) as bar:
        for m in models:
            n_slices = len(samples[m.name])
            bar.set_postfix_str(m.name)
            done = {(n, member): part for n, by_member in finished.get(m.name, {}).items()
                    for member, part in by_member.items()}
            # Noise 0 is one clean pass, saved as the first member's part.
            bar.update(n_slices * sum(1 for n, member in done if n > 0 or member == members[0]))

            def save(n: float, member: Optional[str], result: NoiseResult, attacked: int,
                     seconds: float, model: LoadedModel = m, count: int = n_slices) -> None:
                # A single attack's part holds its counts and record only, as it always has.
                meta = None if member is None else {"attacked": attacked, "seconds": seconds}
                save_part(part_path(options.output, model.name, n, member), result, meta,
                          record=member_record(records, model.name, n, members, member))
                if n > 0:
                    bar.update(count - attacked)   # the skipped slices: already at Dice 0

            with measure_peak(device, peaks, m.name):
                levels[m.name] = dict(iter_ensemble(m, samples[m.name], noise, options.attack,
                                                    members, device, done, save, bar))
    return levels


def _ensemble_entries(levels: Levels, models: Sequence[LoadedModel]) -> dict:
    """``summary["models"]`` under an ensemble: the headline entry of every model."""
    return {m.name: summarise_ensemble(
                {n: level.worst for n, level in levels[m.name].items()},
                {n: level.worst_tvdi for n, level in levels[m.name].items()},
                m.class_names)
            for m in models}


def _ensemble_summary(levels: Levels, models: Sequence[LoadedModel],
                      members: Sequence[str]) -> dict:
    """``summary["ensemble"]``: the members, each one's own entry, slices and seconds."""
    per_attack, attacked, seconds = {}, {}, {}
    for m in models:
        by_noise = levels[m.name]
        per_attack[m.name] = {
            member: summarise({n: level.members[member] for n, level in by_noise.items()},
                              m.class_names)
            for member in members}
        attacked[m.name] = {noise_key(n): level.attacked for n, level in by_noise.items()}
        seconds[m.name] = {noise_key(n): level.seconds for n, level in by_noise.items()}
    return {"members": list(members), "per_attack": per_attack, "attacked": attacked,
            "seconds": seconds}


def _masking_checks(models: Sequence[LoadedModel], samples: Dict[str, List[SliceSample]],
                    results: Results, options: EvalOptions, device: torch.device) -> dict:
    """The gradient-masking checks of every model; prints what fired on stderr."""
    attack = member_settings(options.attack, options.members[0])
    checks = {}
    for m in models:
        report = run_masking_checks(m, samples[m.name], results[m.name], attack, options.masking,
                                    device)
        checks[m.name] = report.to_dict()
        for warning in report.warnings:
            print(f"nnunet-ima-eval: warning: {warning}", file=sys.stderr, flush=True)
        if not report.warnings:
            print(f"{m.name}: gradient-masking checks passed (black box, monotonicity, "
                  f"unbounded)", flush=True)
    return checks
