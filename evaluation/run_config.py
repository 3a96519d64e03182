"""The configuration of an evaluation run (``OUT/config.json``): everything its results depend
on, so that a rerun in the same folder resumes only when it would compute the same numbers."""
from __future__ import annotations

import os
from typing import Dict, List, Sequence

from nnunet_ima.evaluation.models import LoadedModel
from nnunet_ima.evaluation.objects import DEFAULT_SIZE_BINS
from nnunet_ima.evaluation.options import EvalOptions
from nnunet_ima.evaluation.samples import SliceSample
from nnunet_ima.evaluation.selection import case_source, training_cases_note


def model_config(model: LoadedModel, options: EvalOptions, samples: List[SliceSample],
                 train_cases_scored: List[str]) -> dict:
    """A model's part of :func:`run_config`. ``train_cases_scored`` (training cases scored under
    ``allow_train_cases``) appears only when there are any, and ``training_cases_note`` (how the
    training cases were known, where not from a training record that matches today's split)
    only when there is one, so folders written before they existed still resume."""
    entry = {"folder": model.folder, "checkpoint_sha256": model.checkpoint_sha256,
             "case_source": case_source(model, options),
             "cases": list(dict.fromkeys(s.case for s in samples)),
             "n_slices": len(samples)}
    scored = set(entry["cases"])
    hit = [c for c in train_cases_scored if c in scored]  # all-background cases drop out
    if hit:
        entry["train_cases_scored"] = hit
    note = training_cases_note(model, options)
    if note:
        entry["training_cases_note"] = note
    return entry


def run_config(options: EvalOptions, models: Sequence[LoadedModel],
               samples: Dict[str, List[SliceSample]],
               train_cases_scored: Dict[str, List[str]]) -> dict:
    """Everything a result depends on; a rerun in the same folder must match it to resume.

    Besides the options this holds, per model, the checkpoint's digest and the test cases
    actually used, so that retrained weights or a new split are not mixed with old parts. The
    batch size is part of it because each batch draws its own random start. An option that
    does not apply to the attack (``alpha`` for apgd, ``attack_loss`` for segpgd) is ``None``.
    One fold is recorded as itself (``0``, as before ``-f`` took several), several as a list.
    An ensemble records its members (each brings its own loss), the predictor path its tile
    step and mirroring.
    """
    settings = options.attack
    config = {"models": {m.name: model_config(m, options, samples[m.name],
                                            train_cases_scored.get(m.name, []))
                       for m in models},
            "fold": options.folds[0] if len(options.folds) == 1 else list(options.folds),
            "checkpoint": options.checkpoint,
            "images": options.images and os.path.abspath(options.images),
            "labels": options.labels and os.path.abspath(options.labels),
            "include_empty": options.include_empty, "max_slices": options.max_slices,
            "noise": options.noise_levels, "attack": settings.attack, "norm": settings.norm,
            "steps": settings.steps,
            "alpha": None if settings.attack == "apgd" else settings.alpha,
            "random_start": settings.random_start,
            "attack_loss": None if settings.attack == "segpgd" else settings.loss,
            "seed": settings.seed,
            "batch_size": settings.batch_size}
    # Only when not the default, so that folders written before the size breakdown resume;
    # other edges change the parts' object counts, so their records differ.
    if tuple(options.size_bins) != DEFAULT_SIZE_BINS:
        config["size_bins"] = list(options.size_bins)
    # Only when used, so that folders written before ensembles, restarts, presets and the
    # predictor path resume.
    if settings.restarts != 1:
        config["restarts"] = settings.restarts
    if options.preset is not None:
        config["preset"] = options.preset
    if options.ensemble:
        config.update(attack="ensemble", ensemble=list(options.ensemble), alpha=settings.alpha,
                      attack_loss=None)
    if options.inference != "network":
        config["inference"] = {"path": options.inference,
                               "tile_step_size": options.tile_step_size,
                               "mirroring": not options.disable_tta}
        # Only when set: the batching of tiles may change the attack's last bits; checkpointing
        # does not change a number but is recorded with it (folders written before resume).
        if options.tiles_per_pass is not None:
            config["inference"]["tiles_per_pass"] = options.tiles_per_pass
        if options.gradient_checkpointing:
            config["inference"]["gradient_checkpointing"] = True
    return config
