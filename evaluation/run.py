"""One evaluation, from its options to the files in its output folder: :func:`evaluate`.

The output folder is locked for the whole run (:mod:`.lock`: one evaluation at a time per
``-o``). Every input is checked (models, cases, slices, gradients, an output folder of other
settings) before anything is written; then each (model, noise level) is attacked and saved as a
part, with the record of what produced it (:mod:`.provenance`), as soon as it is done, so that
an interrupted run resumes from the parts that are its own (:mod:`.resume`).
"""
from __future__ import annotations

import os
import sys
from collections import Counter
from functools import partial
from typing import Dict, List, Sequence

import torch
from tqdm import tqdm

from nnunet_ima.io import check_output_folder

from nnunet_ima.evaluation.ensemble import member_settings
from nnunet_ima.evaluation.ensemble_run import attack_with_ensemble, finished_members
from nnunet_ima.evaluation.lock import output_lock
from nnunet_ima.evaluation.masking import run_masking_checks
from nnunet_ima.evaluation.models import LoadedModel, load_models
from nnunet_ima.evaluation.options import EvalOptions
from nnunet_ima.evaluation.plots import plot_curves, plot_examples
from nnunet_ima.evaluation.predictor_path import load_predictor_model
from nnunet_ima.evaluation.preflight import preflight_models
from nnunet_ima.evaluation.provenance import (PartRecords, clear_checkpoint_hashes, produced_by,
                                              slices_digest)
from nnunet_ima.evaluation.report import part_path, per_slice_rows, save_part, summarise, write_outputs
from nnunet_ima.evaluation.resume import (can_resume, finished_parts, prepare_output,
                                          report_reused, report_stale)
from nnunet_ima.evaluation.robustness import NoiseResult, full_precision, iter_levels
from nnunet_ima.evaluation.run_config import run_config
from nnunet_ima.evaluation.samples import SliceSample
from nnunet_ima.evaluation.selection import (cases_to_score, check_training_cases, model_folders,
                                             samples_by_model)

Results = Dict[str, Dict[float, NoiseResult]]  # {model name: {noise level: result}}


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
    results: Results = {m.name: {} for m in models}
    members: dict = {}
    stale = []
    if resume and options.ensemble:
        members, stale = finished_members(options.output, models, samples, noise,
                                          options.ensemble, records)
    elif resume:
        results, stale = finished_parts(options.output, models, samples, noise, records)
    # Only now, with every input checked, does anything get written.
    prepare_output(options.output, config, resume, stale)
    for m in models:
        n_cases = len(config["models"][m.name]["cases"])
        print(f"{m.name}: {len(samples[m.name])} slices of {n_cases} case{'s' * (n_cases != 1)} "
              f"({' '.join(config['models'][m.name]['case_source'])})", flush=True)
    report_stale(stale)
    if options.ensemble:
        ensemble = attack_with_ensemble(models, samples, noise, options, device, members,
                                        records)
        results = ensemble.worst
        summary = {"config": config, "models": ensemble.summaries(models),
                   "ensemble": ensemble.summary(models)}
    else:
        report_reused(options.output, results, len(models) * len(noise))
        _attack_missing(models, samples, noise, results, options, device, records)
        summary = {"config": config,
                   "models": {m.name: summarise(results[m.name], m.class_names) for m in models}}
    if options.masking_checks:
        summary["masking_checks"] = _masking_checks(models, samples, results, options, device)
    rows = [r for m in models for r in per_slice_rows(m.name, results[m.name], m.class_names)]
    write_outputs(options.output, summary, rows, noise)
    plot_curves(summary, noise, os.path.join(options.output, "curves.png"))
    plot_examples(results, noise, os.path.join(options.output, "examples.png"))
    return summary


def _attack_missing(models: Sequence[LoadedModel], samples: Dict[str, List[SliceSample]],
                    noise: Sequence[float], results: Results, options: EvalOptions,
                    device: torch.device, records: PartRecords) -> None:
    """Attack every (model, noise level) missing from ``results``, adding it there and saving
    it as a part with its record as soon as it is done; then say how often levels shared a
    batch."""
    todo = [(m, [n for n in noise if n not in results[m.name]]) for m in models]
    todo = [(m, pending) for m, pending in todo if pending]
    total = sum(len(samples[m.name]) * len(pending) for m, pending in todo)
    packing = {m.name: Counter() for m in models}
    with tqdm(total=total, desc="attacking slices", unit="slice",
              disable=not options.progress or total == 0) as bar:
        for m, pending in todo:
            bar.set_postfix_str(m.name)
            # A part per level as soon as the level is done (levels finish in order).
            for n, result in iter_levels(m, samples[m.name], pending, options.attack, device, bar,
                                         packing[m.name]):
                save_part(part_path(options.output, m.name, n), result,
                          record=records.record(m.name, n))
                results[m.name][n] = result
    _report_packing(packing)


def _masking_checks(models: Sequence[LoadedModel], samples: Dict[str, List[SliceSample]],
                    results: Results, options: EvalOptions, device: torch.device) -> dict:
    """The gradient-masking checks of every model; prints what fired on stderr."""
    attack = (member_settings(options.attack, options.ensemble[0]) if options.ensemble
              else options.attack)
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


def _report_packing(packing: Dict[str, Counter]) -> None:
    for name, count in packing.items():
        if count["packed"] or count["declined"]:
            batches = "batch" if count["packed"] == 1 else "batches"
            print(f"{name}: {count['packed']} attack {batches} held several noise levels"
                  + (f", {count['declined']} packs ran one level per batch (the kernels round "
                     f"differently at the larger batch size)" if count["declined"] else ""),
                  flush=True)
