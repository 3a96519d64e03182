"""What an evaluation scores: the model folders, the cases of each model (never, unless allowed,
the cases its fold trained on) and their test samples: 2D slices for a 2D configuration, whole
cases for a 3D one (:func:`sample_dims`)."""
from __future__ import annotations

import json
import os
import sys
from typing import Dict, List, Optional, Sequence

from nnunet_ima.errors import UserInputError
from nnunet_ima.nnunet.paths import dataset_name, require_folder

from nnunet_ima.evaluation.models import LoadedModel
from nnunet_ima.evaluation.options import EvalOptions
from nnunet_ima.evaluation.samples import (SliceSample, cases_from_source, configuration_dims,
                                           limit_slices, load_preprocessed_slices,
                                           load_raw_slices, resolve_case_source,
                                           select_raw_cases)
from nnunet_ima.evaluation.training_cases import (TrainingCases, refusal_message, trained_on,
                                                  training_cases)


def model_folders(options: EvalOptions) -> List[str]:
    """The absolute model folders: ``options.model_folders``, or one per trainer under
    ``<nnUNet_results>/<dataset>`` (``options.nnunet_results``, else ``$nnUNet_results``).

    Raises:
        UserInputError: a folder is named twice, or ``nnUNet_results`` is needed and not set.
    """
    if options.model_folders:
        folders = [os.path.abspath(f) for f in options.model_folders]
    else:
        results = _nnunet_folder(options.nnunet_results, "nnUNet_results")
        name = dataset_name(options.dataset)
        folders = [os.path.join(results, name, f"{t}__{options.plans}__{options.configuration}")
                   for t in options.trainers]
    if len(set(folders)) != len(folders):
        raise UserInputError(f"a model is named twice: {folders}")
    return folders


def _nnunet_folder(given: Optional[str], variable: str) -> str:
    """An nnU-Net folder given in the options, else the one the environment ``variable`` names."""
    if given is None:
        return require_folder(variable)
    if not os.path.isdir(given):
        raise UserInputError(f"{variable} folder {given} does not exist")
    return given


def _preprocessed_dataset(model: LoadedModel, options: EvalOptions) -> str:
    return os.path.join(_nnunet_folder(options.nnunet_preprocessed, "nnUNet_preprocessed"),
                        model.dataset_name)


def _fold_folder(model: LoadedModel) -> str:
    """``MODEL/fold_K``, where the training record of ``model``'s fold is."""
    return os.path.join(model.folder, f"fold_{model.fold}")


def case_source(model: LoadedModel, options: EvalOptions) -> List[str]:
    """Where ``model``'s cases come from, as recorded in the run's configuration: ``["raw"]``
    for ``--images``, else ``--cases`` with its default filled in (e.g. ``["test"]``)."""
    if options.images:
        return ["raw"]
    return resolve_case_source(_preprocessed_dataset(model, options), options.cases)


def cases_to_score(model: LoadedModel, options: EvalOptions) -> List[str]:
    """The case identifiers ``model`` is to be scored on (before slices without foreground and
    ``max_slices`` thin them out); ``val`` takes its fold's validation cases from its training
    record where it has one."""
    if options.images:
        return list(select_raw_cases(options.images, options.labels, model.dataset_json,
                                     options.cases))
    return cases_from_source(_preprocessed_dataset(model, options), options.cases, model.fold,
                             _fold_folder(model))


def _fold_training_cases(model: LoadedModel, options: EvalOptions) -> TrainingCases:
    return training_cases(_preprocessed_dataset(model, options), model.data_identifier, model.fold,
                          _fold_folder(model))


def _training_cases(model: LoadedModel, options: EvalOptions) -> TrainingCases:
    """The cases ``model``'s fold trained on (its training record, or today's split). Raw images
    can be scored without the preprocessed dataset; then the check cannot be made, which is
    said rather than hidden."""
    try:
        return _fold_training_cases(model, options)
    except UserInputError as e:
        if not options.images:
            raise
        print(f"warning: {model.name}: cannot check whether the --images cases were training "
              f"cases ({e})", file=sys.stderr, flush=True)
        return TrainingCases([])


def training_cases_note(model: LoadedModel, options: EvalOptions) -> str:
    """How ``model``'s training cases were known, for the tables' footnote, where not from a
    training record that matches today's split; ``""`` otherwise (or when they could not be
    known, which :func:`check_training_cases` has said)."""
    try:
        return _fold_training_cases(model, options).note
    except UserInputError:
        return ""


def check_training_cases(models: Sequence[LoadedModel], cases: Dict[str, List[str]],
                         options: EvalOptions) -> Dict[str, List[str]]:
    """Refuse to score a model on the cases its fold trained on, unless
    ``options.allow_train_cases``; returns the training cases that will be scored, per model
    name (empty unless allowed)."""
    trained = {m.name: _training_cases(m, options) for m in models}
    overlap = trained_on(cases, {name: t.cases for name, t in trained.items()})
    if overlap and not options.allow_train_cases:
        raise UserInputError(refusal_message(overlap, {m.name: m.fold for m in models},
                                             {name: t.note for name, t in trained.items()}))
    for name, hit in overlap.items():
        print(f"warning: {name} is scored on {len(hit)} case{'s' * (len(hit) != 1)} it trained "
              f"on ({', '.join(hit)}); the tables say so", file=sys.stderr, flush=True)
    return overlap


def sample_dims(model: LoadedModel) -> int:
    """3 when ``model`` is scored on whole cases (its ``spatial_dims`` is 3, or its
    configuration's patch size in its plans has three entries), else 2 (slices)."""
    if getattr(model, "spatial_dims", 2) == 3:
        return 3
    if model.configuration in (model.plans or {}).get("configurations", {}):
        return 3 if configuration_dims(model.plans, model.configuration) == 3 else 2
    return 2  # a model built without plans: its spatial_dims decides


def check_same_dims(models: Sequence[LoadedModel]) -> None:
    """Refuse to score 2D and 3D models in one run: their samples (slices, cases) are different
    units, so their TVDI / ADI would stand in one table without being comparable."""
    dims = {m.name: sample_dims(m) for m in models}
    if len(set(dims.values())) > 1:
        two = [n for n, d in dims.items() if d == 2]
        three = [n for n, d in dims.items() if d == 3]
        raise UserInputError(f"2D models ({', '.join(two)}) are scored per slice and 3D models "
                             f"({', '.join(three)}) per case; evaluate them in two runs "
                             f"(two -o folders)")


def _load_samples(model: LoadedModel, cases: List[str], options: EvalOptions
                  ) -> List[SliceSample]:
    dims = sample_dims(model)
    if options.images:
        samples = load_raw_slices(options.images, options.labels, model.plans,
                                  model.configuration, model.dataset_json, options.include_empty,
                                  cases, model.ignore_label, dims)
    else:
        samples = load_preprocessed_slices(_preprocessed_dataset(model, options),
                                           model.data_identifier,
                                           cases, options.include_empty, model.ignore_label,
                                           dims)
    if not samples:
        what = "cases" if dims == 3 else "slices"
        raise UserInputError(f"no test {what}: the cases have no foreground (use "
                             f"--include-empty)")
    return limit_slices(samples, options.max_slices, options.attack.seed)


def samples_by_model(models: Sequence[LoadedModel], cases: Dict[str, List[str]],
                     options: EvalOptions) -> Dict[str, List[SliceSample]]:
    """The test samples of every model (slices, or whole cases for 3D models), by model name;
    models that read the same data share one copy. 2D and 3D models together are refused
    (:func:`check_same_dims`)."""
    check_same_dims(models)
    cache: Dict[str, List[SliceSample]] = {}
    samples = {}
    for m in models:
        # Same preprocessed folder (or same plans for raw images) and cases -> the same slices;
        # folds differ in their validation cases.
        key = json.dumps([m.dataset_name, m.data_identifier, cases[m.name]] if not options.images
                         else [m.plans, m.configuration, m.dataset_json, cases[m.name]],
                         sort_keys=True)
        key += f"/{sample_dims(m)}d"
        if key not in cache:
            cache[key] = _load_samples(m, cases[m.name], options)
        samples[m.name] = cache[key]
    return samples
