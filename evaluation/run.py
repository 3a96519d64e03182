"""One evaluation, from its options to the files in its output folder: :func:`evaluate`.

The output folder is locked for the whole run (:mod:`.lock`: one evaluation at a time per
``-o``). Every input is checked (models, cases, slices, gradients, an output folder of other
settings) before anything is written; then each (model, noise level) is attacked and saved as a
part, with the record of what produced it (:mod:`.provenance`), as soon as it is done, so that
an interrupted run resumes from the parts that are its own (:mod:`.resume`).

A single attack is an ensemble of one member (:data:`.ensemble.SINGLE`): both run through
:func:`.ensemble.iter_ensemble`, save a part per (model, noise level, member) and resume alike.

With ``--minimal-noise`` each sample's minimal adversarial noise follows the attacks
(:mod:`.minimal_noise`), its attack saved as a part of its own per model.

Several processes share one evaluation (:mod:`.sharding`): :func:`evaluate_shard` computes one
shard's units (``--shard i/n``) under the lock of its own folder ``OUT/shards/<i>-of-<n>``,
:func:`merge` assembles them into the parts one process writes and writes the same tables, and
:func:`evaluate_distributed` does both under torchrun (every rank a shard, rank 0 merging).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from contextlib import nullcontext
from dataclasses import dataclass, replace
from functools import partial
from typing import Dict, List, Optional, Sequence

import torch
from tqdm import tqdm

from nnunet_ima.devices import default_device
from nnunet_ima.errors import UserInputError
from nnunet_ima.io import check_output_folder, write_text

from nnunet_ima.evaluation.ensemble import EnsembleLevel, iter_ensemble, member_settings
from nnunet_ima.evaluation.lock import output_lock
from nnunet_ima.evaluation.memory import measure_peak
from nnunet_ima.evaluation.minimal_noise import markdown_table as minimal_markdown
from nnunet_ima.evaluation.minimal_noise import minimal_noise, minimal_settings
from nnunet_ima.evaluation.minimal_noise import rows as minimal_rows
from nnunet_ima.evaluation.minimal_noise import summarise as summarise_minimal
from nnunet_ima.evaluation.minimal_noise import survival_curve
from nnunet_ima.evaluation.masking import run_masking_checks
from nnunet_ima.evaluation.models import LoadedModel, load_models
from nnunet_ima.evaluation.options import EvalOptions, options_from_dict, options_to_dict
from nnunet_ima.evaluation.plots import plot_curves, plot_examples
from nnunet_ima.evaluation.predictor_path import load_predictor_model
from nnunet_ima.evaluation.preflight import preflight_models
from nnunet_ima.evaluation.provenance import (PartRecords, clear_checkpoint_hashes,
                                              compared_config, differences, produced_by,
                                              slices_digest)
from nnunet_ima.evaluation.report import (CONFIG_FILENAME, noise_key, part_path, per_slice_rows,
                                          save_part, summarise, summarise_ensemble,
                                          write_minimal_noise, write_outputs)
from nnunet_ima.evaluation.resume import (FinishedParts, can_resume, finished_parts, member_record,
                                          prepare_output, report_reused, report_stale)
from nnunet_ima.evaluation.robustness import NoiseResult, full_precision
from nnunet_ima.evaluation.run_config import run_config
from nnunet_ima.evaluation.samples import SliceSample
from nnunet_ima.evaluation.selection import (cases_to_score, check_training_cases, model_folders,
                                             samples_by_model)
from nnunet_ima.evaluation.sharding import (DONE_FILENAME, OPTIONS_FILENAME, UNITS_FOLDER, Launch,
                                            MissingUnits, Shard, ShardReport, UnitPlan,
                                            describe_missing, merged_peaks, other_counts,
                                            process_group, rank_device, read_shard, run_shard,
                                            shard_folder, shards_to_merge, wait_for_phase,
                                            write_done)

VISIBLE_WITHIN_SECONDS = 120.0
"""How long a torchrun rank waits, after a barrier, for the other ranks' units to show in a
shared output folder before it says that the folder is not shared."""

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


@dataclass
class Prepared:
    """An evaluation's inputs, loaded and checked, before anything is written: its models, each
    one's samples, its configuration (:func:`.run_config.run_config`) and its parts' records."""

    options: EvalOptions
    device: torch.device
    models: List[LoadedModel]
    samples: Dict[str, List[SliceSample]]
    config: dict
    records: PartRecords


def _prepare(options: EvalOptions, preflight: bool = True) -> Prepared:
    """Load and check every input (models, cases, samples and, with ``preflight``, gradients)."""
    device = torch.device(options.device)
    loader = None
    if options.inference == "predictor":
        loader = partial(load_predictor_model, use_mirroring=not options.disable_tta,
                         tile_step_size=options.tile_step_size,
                         tiles_per_pass=options.tiles_per_pass,
                         checkpoint_tiles=options.gradient_checkpointing)
    models = load_models(model_folders(options), options.folds, options.checkpoint, device,
                         loader)
    cases = {m.name: cases_to_score(m, options) for m in models}
    train_cases_scored = check_training_cases(models, cases, options)
    samples = samples_by_model(models, cases, options)
    if preflight:
        preflight_models(models, samples, options.attack, device)
    config = run_config(options, models, samples, train_cases_scored)
    return Prepared(options, device, models, samples, config,
                    _part_records(options, config, models, samples))


def _print_samples(prepared: Prepared) -> None:
    for m in prepared.models:
        n_cases = len(prepared.config["models"][m.name]["cases"])
        n = len(prepared.samples[m.name])
        unit = "volume" if m.spatial_dims == 3 else "slice"
        print(f"{m.name}: {n} {unit}{'s' * (n != 1)} of {n_cases} "
              f"case{'s' * (n_cases != 1)} "
              f"({' '.join(prepared.config['models'][m.name]['case_source'])})", flush=True)


def _evaluate(options: EvalOptions) -> dict:
    noise = options.noise_levels
    prepared = _prepare(options)
    models, samples, config = prepared.models, prepared.samples, prepared.config
    resume = can_resume(options.output, config, options.overwrite)
    finished: FinishedParts = {m.name: {} for m in models}
    stale = []
    if resume:
        finished, stale = finished_parts(options.output, models, samples, noise,
                                         prepared.records, options.members)
    # Only now, with every input checked, does anything get written.
    prepare_output(options.output, config, resume, stale)
    _print_samples(prepared)
    report_stale(stale)
    report_reused(options.output, finished, len(models) * len(noise))
    return _finish(prepared, finished)


def _finish(prepared: Prepared, finished: FinishedParts,
            peaks: Optional[Dict[str, dict]] = None) -> dict:
    """Attack what ``finished`` lacks, then write the summary, tables and figures; ``peaks``
    (a merge's, measured by the shards) replaces the peak memory measured here."""
    options, device = prepared.options, prepared.device
    models, samples, config = prepared.models, prepared.samples, prepared.config
    noise = options.noise_levels
    measured: Dict[str, dict] = {}  # the attacks' peak memory per model (evaluation.memory)
    levels = _attack(models, samples, noise, options, device, finished, prepared.records,
                     measured)
    results: Results = {name: {n: level.worst for n, level in by_noise.items()}
                        for name, by_noise in levels.items()}
    if options.ensemble:
        summary = {"config": config,
                   "models": _ensemble_entries(levels, models, options.size_bins),
                   "ensemble": _ensemble_summary(levels, models, options.ensemble)}
    else:
        summary = {"config": config,
                   "models": {m.name: summarise(results[m.name], m.class_names, options.size_bins)
                              for m in models}}
    summary["peak_memory"] = measured if peaks is None else peaks
    minimal = _minimal_noise(prepared, results) if options.minimal_noise else None
    if minimal is not None:
        summary["minimal_noise"] = {name: entry for name, (entry, _, _) in minimal.items()}
    if options.masking_checks:
        summary["masking_checks"] = _masking_checks(models, samples, results, options, device)
    rows = [r for m in models for r in per_slice_rows(m.name, results[m.name], m.class_names)]
    write_outputs(options.output, summary, rows, noise)
    if minimal is None:
        write_minimal_noise(options.output, None, None)
    else:
        write_minimal_noise(options.output, [r for _, rs, _ in minimal.values() for r in rs],
                            minimal_markdown(summary["minimal_noise"], noise))
    plot_curves(summary, noise, os.path.join(options.output, "curves.png"),
                None if minimal is None else {name: c for name, (_, _, c) in minimal.items()})
    plot_examples(results, noise, os.path.join(options.output, "examples.png"))
    return summary


# ---------------------------------------------------------------------------- several processes

def evaluate_shard(options: EvalOptions, shard: Shard, wait: float = 0.0) -> ShardReport:
    """Compute the units of ``shard`` (:mod:`.sharding`) into ``OUT/shards/<i>-of-<n>``,
    holding that folder's lock; writes no table. Under an ensemble, a phase (member) whose
    samples depend on other shards' units waits for them up to ``wait`` seconds, then the
    shard stops (the report says what it waits for; rerunning it continues).

    Raises:
        UserInputError: a bad input, as :func:`evaluate`; ``OUT`` or the shard's folder holds
            results of other settings, or ``OUT/shards`` shards of another count (unless
            ``options.overwrite``).
    """
    check_output_folder(options.output, "-o/--output")
    clear_checkpoint_hashes()
    with output_lock(shard_folder(options.output, shard)), full_precision():
        prepared = _prepare(options)
        plan = _start_shard(prepared, shard)
        report = run_shard(plan, shard, prepared.device, wait_for_phase(plan, wait),
                           options.progress)
        if report.done:
            write_done(plan, report)
    return report


def _start_shard(prepared: Prepared, shard: Shard, quiet: bool = False) -> UnitPlan:
    """Check that the shard's results may go into its folder, write its configuration and
    options there, and return its plan; ``quiet``: without naming the samples (torchrun ranks
    but the first, which names them)."""
    options, config = prepared.options, prepared.config
    out, folder = options.output, shard_folder(options.output, shard)
    can_resume(out, config, options.overwrite)  # refuses OUT of other settings; reads only
    others = other_counts(out, shard.count)
    if others and not options.overwrite:
        raise UserInputError(
            f"{os.path.join(out, 'shards')} holds shards of another count "
            f"({', '.join(sorted({str(s.count) for s in others}))} processes), which a merge of "
            f"{shard.count} cannot use: delete them, use the same count, or pass --overwrite")
    own = read_shard(out, shard).config
    changed = None if own is None else differences(compared_config(own), compared_config(config))
    same = own is not None and not changed
    if own is not None and not same and not options.overwrite:
        raise UserInputError(f"{folder} holds results made with other settings (differences "
                             f"in: {', '.join(changed)}); choose another -o or pass --overwrite")
    # Only now, with every input checked, does anything get written.
    for other in others:
        shutil.rmtree(shard_folder(out, other), ignore_errors=True)  # other shards may too
    if not same:
        shutil.rmtree(os.path.join(folder, UNITS_FOLDER), ignore_errors=True)
    if os.path.isfile(os.path.join(folder, DONE_FILENAME)):
        os.remove(os.path.join(folder, DONE_FILENAME))
    write_text(os.path.join(folder, CONFIG_FILENAME), json.dumps(config, indent=2))
    write_text(os.path.join(folder, OPTIONS_FILENAME),
               json.dumps(options_to_dict(options), indent=2))
    if not quiet:
        _print_samples(prepared)
    return UnitPlan(out, shard.count, prepared.models, prepared.samples, options.noise_levels,
                    options.attack, options.members, prepared.records, options.size_bins)


def merge(out: str, device: Optional[str] = None, progress: bool = True,
          overwrite: bool = False) -> dict:
    """Merge the shards in ``out/shards`` (``nnunet-ima-eval merge OUT``): check that they ran
    one configuration and that every unit is there, then write ``out/parts``, the summary,
    tables and figures one process would write; returns the summary. Models and data are
    loaded again (with the options the shards stored), on ``device`` (default: the shards'
    where it exists here, else cuda when available, else cpu), for the configuration check and
    the gradient-masking checks, which run here.

    Raises:
        UserInputError: no shards, shards of several counts or configurations, missing units
            (the message names the shards), or models and data that changed since the shards
            ran; nothing is written then.
    """
    if not os.path.isdir(out):
        raise UserInputError(f"{out} is not a folder; give the -o of the shards")
    shards = shards_to_merge(out)
    stored = shards[0].options
    changes = {"output": out, "progress": progress,
               "device": device or _usable_device(stored.get("device"))}
    if overwrite:
        changes["overwrite"] = True
    options = options_from_dict(stored, **changes)
    clear_checkpoint_hashes()
    with output_lock(out), full_precision():
        prepared = _prepare(options, preflight=False)  # the shards ran the preflight
        changed = differences(compared_config(shards[0].config),
                              compared_config(prepared.config))
        if changed:
            raise UserInputError(f"the models or data differ from those the shards ran on "
                                 f"(differences in: {', '.join(changed)}); rerun the shards")
        _print_samples(prepared)
        return _merge_prepared(prepared, shards[0].shard.count)


def _usable_device(stored: Optional[str]) -> str:
    """The shards' device where this machine has it, else the default device."""
    if stored and (torch.device(stored).type != "cuda" or torch.cuda.is_available()):
        index = torch.device(stored).index
        if index is None or index < torch.cuda.device_count():
            return stored
    return default_device()


def _merge_prepared(prepared: Prepared, count: int) -> dict:
    """Assemble the parts from the units of ``count`` shards (all checked before anything is
    written), write them to ``OUT/parts`` as one process would, and finish as a resumed run
    that finds every part done."""
    options = prepared.options
    out = options.output
    plan = UnitPlan(out, count, prepared.models, prepared.samples, options.noise_levels,
                    options.attack, options.members, prepared.records, options.size_bins)
    try:
        finished = plan.finished_parts()
    except MissingUnits as e:
        raise UserInputError(f"cannot merge {out}: {describe_missing(out, count, e, plan.members)}"
                             f"; run the missing shards with the same options (a rerun resumes "
                             f"where it stopped) and merge again") from None
    resume = can_resume(out, prepared.config, options.overwrite)
    prepare_output(out, prepared.config, resume)
    members = options.members
    for name, by_noise in finished.items():
        for n, by_member in by_noise.items():
            for member, (result, attacked, seconds) in by_member.items():
                meta = None if member is None else {"attacked": attacked, "seconds": seconds}
                save_part(part_path(out, name, n, member), result, meta,
                          record=member_record(prepared.records, name, n, members, member))
    print(f"merged {count} shards from {os.path.join(out, 'shards')}", flush=True)
    shards = [read_shard(out, Shard(i, count)) for i in range(count)]
    return _finish(prepared, finished, peaks=merged_peaks(shards))


def evaluate_distributed(options: EvalOptions, launch: Launch) -> Optional[dict]:
    """One torchrun rank: shard ``RANK/WORLD_SIZE`` of the evaluation on ``cuda:LOCAL_RANK``
    (when ``options.device`` is ``cuda``), a barrier (torch.distributed, NCCL on CUDA, gloo on
    a CPU) after each ensemble member and at the end, then rank 0 merges and returns the
    summary (the other ranks ``None``). Rank 0 holds the lock of ``OUT`` throughout, every rank
    the lock of its shard's folder; only rank 0 shows progress."""
    options = replace(options, device=rank_device(options.device, launch.local_rank),
                      progress=options.progress and launch.rank == 0)
    shard = launch.shard
    check_output_folder(options.output, "-o/--output")
    clear_checkpoint_hashes()
    with process_group(options.device) as barrier, full_precision():
        with _lock_if(launch.rank == 0, options.output):
            with output_lock(shard_folder(options.output, shard)):
                prepared = _prepare(options)
                plan = _start_shard(prepared, shard, quiet=launch.rank != 0)
                # After the barrier, a shared file system may take a moment to show the
                # other ranks' files (NFS caches a lookup that failed).
                visible = wait_for_phase(plan, VISIBLE_WITHIN_SECONDS, poll=2.0)

                def sync(phase: int) -> None:
                    barrier()
                    visible(phase)
                report = run_shard(plan, shard, prepared.device, sync, options.progress,
                                   must_see_others=True)
                write_done(plan, report)
            print(shard_summary(report, options.output, merged_by_rank_0=True), flush=True)
            barrier()
            if launch.rank != 0:
                return None
            visible(plan.phases - 1)
            return _merge_prepared(prepared, shard.count)


def _lock_if(hold: bool, folder: str):
    """:func:`.lock.output_lock` of ``folder`` where ``hold``, else nothing."""
    return output_lock(folder) if hold else nullcontext()


def shard_summary(report: ShardReport, out: str, merged_by_rank_0: bool = False) -> str:
    """What a shard did, in one paragraph: units computed and reused, and what comes next
    (``merged_by_rank_0``: a torchrun rank's, whose merge follows by itself)."""
    shard = report.shard
    did = (f"shard {shard}: {report.computed} units computed, {report.reused} reused, in "
           f"{shard_folder(out, shard)}")
    if merged_by_rank_0:
        return did
    if report.done:
        return (f"{did}; its share is done. Once all {shard.count} shards are done: "
                f"nnunet-ima-eval merge {out}")
    waiting = report.waiting
    others = ", ".join(str(Shard(o, shard.count)) for o in waiting.owners())
    return (f"{did}; it stopped before its last phase: the next member's samples depend on "
            f"{len(waiting.missing)} units of shard(s) {others} not done yet. Run this command "
            f"again once they are (it continues where it stopped), or pass --shard-wait SECONDS "
            f"to wait for them")


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
    unit = "volume" if any(m.spatial_dims == 3 for m in models) else "slice"
    desc = f"attacking {unit}s" + (" (ensemble)" if options.ensemble else "")
    with tqdm(total=total, desc=desc, unit=unit,
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
                                                    members, device, done, save, bar,
                                                    size_bins=options.size_bins))
    return levels


def _ensemble_entries(levels: Levels, models: Sequence[LoadedModel],
                      size_bins: Optional[Sequence[int]] = None) -> dict:
    """``summary["models"]`` under an ensemble: the headline entry of every model (with the
    size breakdown of ``size_bins``)."""
    return {m.name: summarise_ensemble(
                {n: level.worst for n, level in levels[m.name].items()},
                {n: level.worst_tvdi for n, level in levels[m.name].items()},
                m.class_names, size_bins)
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


def _minimal_noise(prepared: Prepared, results: Results) -> Dict[str, tuple]:
    """Per model ``(summary entry, csv rows, survival curve)`` of its minimal noise
    (:mod:`.minimal_noise`): the attack's part reused where it is this run's, else computed
    and saved; combined with the grid of ``results`` (the headline per level). A merge (of
    shards or torchrun ranks) computes it here too, with the models it loaded."""
    options = prepared.options
    noise = options.noise_levels
    settings = minimal_settings(options.dice_threshold, options.attack.norm,
                                options.minimal_steps, noise)
    outcome: Dict[str, tuple] = {}
    reused = []
    for m in prepared.models:
        found, was_reused = minimal_noise(m, prepared.samples[m.name], results[m.name],
                                          settings, prepared.records, options.output,
                                          options.attack.batch_size, prepared.device,
                                          options.progress)
        if was_reused:
            reused.append(m.name)
        outcome[m.name] = (summarise_minimal(found, noise), minimal_rows(m.name, found),
                           survival_curve(found))
    if reused:
        print(f"resuming: reused the minimal noise of {', '.join(reused)} from "
              f"{os.path.join(options.output, 'parts')}", flush=True)
    return outcome


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
