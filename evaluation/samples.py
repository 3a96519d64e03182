"""Test slices: 2D slices of held-out cases, as the network sees them (nnU-Net-preprocessed).

Cases come from ``test_cases.json`` (``nnunet-ima split``), the validation fold of
``splits_final.json``, an explicit list, or raw ``imagesTs`` / ``labelsTs`` folders that are
preprocessed here with the model's plans (nnU-Net's own preprocessor: transpose, crop, resample,
normalise).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from nnunet_ima.errors import UserInputError


# nnU-Net's cropping writes -1 into the label outside the image's nonzero region (e.g. the air
# around an MR volume); its training pipeline maps it to background (RemoveLabelTansform(-1, 0)).
OUTSIDE_NONZERO = -1


@dataclass
class SliceSample:
    """One test slice: ``image`` ``(C, H, W)`` float32 z-scored, ``label`` ``(H, W)`` int16.

    ``label`` holds the classes ``0 .. K-1`` (and nnU-Net's ignore label, if the dataset has one).
    """

    case: str
    index: int
    image: np.ndarray
    label: np.ndarray

    @property
    def key(self) -> Tuple[str, int]:
        return self.case, self.index


def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


def resolve_case_source(preprocessed_dataset: str, source: Optional[Sequence[str]]) -> List[str]:
    """``--cases`` with its default filled in: ``["test"]`` when ``test_cases.json`` exists,
    else ``["val"]`` (the fold's validation cases, nnU-Net's own held-out data)."""
    if source:
        return list(source)
    if os.path.isfile(os.path.join(preprocessed_dataset, "test_cases.json")):
        return ["test"]
    return ["val"]


def _test_cases(preprocessed_dataset: str) -> List[str]:
    path = os.path.join(preprocessed_dataset, "test_cases.json")
    if not os.path.isfile(path):
        raise UserInputError(f"{path} does not exist: run `nnunet-ima split -d DATASET --test N` "
                             f"or pass --cases val / --cases CASE [CASE ...] / --images/--labels")
    return list(_read_json(path)["test"])


def _validation_cases(preprocessed_dataset: str, fold) -> List[str]:
    if fold == "all":
        raise UserInputError("fold all has no validation cases: nnU-Net trains and validates it "
                             "on every preprocessed case. Use --cases test / CASE ... or "
                             "--images/--labels")
    path = os.path.join(preprocessed_dataset, "splits_final.json")
    if not os.path.isfile(path):
        raise UserInputError(f"{path} does not exist: train the model first or use --cases test")
    splits = _read_json(path)
    if not 0 <= fold < len(splits):
        raise UserInputError(f"{path} has {len(splits)} folds, fold {fold} asked (nnU-Net trained "
                             f"it on its own random 80:20 split of all cases); name the cases "
                             f"with --cases CASE ...")
    return list(splits[fold]["val"])


_CASE_SETS = {"test": lambda folder, fold: _test_cases(folder),
              "val": _validation_cases}


def _empty_set_message(preprocessed_dataset: str, token: str, fold) -> str:
    """Why ``--cases TOKEN`` (test or val) selected nothing, and the set to use instead: the
    other one where it has cases (an empty test set after ``split --test 0`` -> --cases val)."""
    where = (f"{os.path.join(preprocessed_dataset, 'test_cases.json')} lists no test cases"
             if token == "test" else f"fold {fold} of "
             f"{os.path.join(preprocessed_dataset, 'splits_final.json')} has no validation cases")
    other = "val" if token == "test" else "test"
    try:
        has_other = bool(_CASE_SETS[other](preprocessed_dataset, fold))
    except UserInputError:  # that set is missing too
        has_other = False
    if has_other:
        return f"{where}; use --cases {other}"
    return f"{where}; name the cases with --cases CASE [CASE ...] or use --images/--labels"


def cases_from_source(preprocessed_dataset: str, source: Optional[Sequence[str]], fold
                      ) -> List[str]:
    """Case identifiers named by ``--cases``, in order: ``test`` stands for the cases of
    ``test_cases.json``, ``val`` for the fold's validation cases, anything else is a case
    identifier (``--cases test val`` takes both sets). ``None``: see :func:`resolve_case_source`."""
    cases: List[str] = []
    for token in resolve_case_source(preprocessed_dataset, source):
        if token in _CASE_SETS:
            selected = _CASE_SETS[token](preprocessed_dataset, fold)
            if not selected:
                raise UserInputError(_empty_set_message(preprocessed_dataset, token, fold))
            cases += selected
        else:
            cases.append(token)
    repeated = sorted({c for c in cases if cases.count(c) > 1})
    if repeated:
        raise UserInputError(f"--cases names {repeated} more than once (a test case must not also "
                             f"be a validation case or be listed twice)")
    return cases


def _slices_of(case: str, data: np.ndarray, seg: np.ndarray, include_empty: bool,
               ignore_label: Optional[int] = None) -> List[SliceSample]:
    """The 2D slices of one preprocessed case: ``data`` ``(C, D, H, W)``, ``seg`` ``(1, D, H, W)``.

    nnU-Net's 2D configuration slices axis 1 (``D``). ``-1`` (outside the nonzero region) becomes
    background, as in nnU-Net's training. Without ``include_empty`` only slices with a foreground
    class (not the ignore label) in the ground truth are kept.
    """
    samples = []
    for z in range(data.shape[1]):
        label = np.asarray(seg[0, z]).astype(np.int16)
        label[label == OUTSIDE_NONZERO] = 0
        foreground = label > 0
        if ignore_label is not None:
            foreground &= label != ignore_label
        if not include_empty and not foreground.any():
            continue
        samples.append(SliceSample(case, z, np.ascontiguousarray(data[:, z], dtype=np.float32),
                                   np.ascontiguousarray(label)))
    return samples


def data_folder(preprocessed_dataset: str, data_identifier: str, remedy: str) -> str:
    """``$nnUNet_preprocessed/Dataset/<data_identifier>``, the preprocessed cases of one
    configuration; missing, a :class:`UserInputError` ends with ``remedy``."""
    folder = os.path.join(preprocessed_dataset, data_identifier)
    if not os.path.isdir(folder):
        raise UserInputError(f"{folder} does not exist: {remedy}")
    return folder


def load_preprocessed_slices(preprocessed_dataset: str, data_identifier: str, cases: Sequence[str],
                             include_empty: bool, ignore_label: Optional[int] = None
                             ) -> List[SliceSample]:
    """Slices of ``cases`` from ``$nnUNet_preprocessed/Dataset/<data_identifier>``."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    folder = data_folder(preprocessed_dataset, data_identifier,
                         "run nnUNetv2_plan_and_preprocess for this configuration, or give "
                         "--images/--labels")
    dataset_class = infer_dataset_class(folder)
    available = set(dataset_class.get_identifiers(folder))
    missing = [c for c in cases if c not in available]
    if missing:
        raise UserInputError(f"cases {missing} are not in {folder}")
    dataset = dataset_class(folder, list(cases))
    samples: List[SliceSample] = []
    for case in cases:
        data, seg, _, _ = dataset.load_case(case)
        samples += _slices_of(case, np.asarray(data), np.asarray(seg), include_empty, ignore_label)
    return samples


def _raw_cases(images: str, labels: str, file_ending: str, num_channels: int
               ) -> Dict[str, Tuple[List[str], str]]:
    if not os.path.isdir(images):
        raise UserInputError(f"--images {images} is not a folder")
    if not os.path.isdir(labels):
        raise UserInputError(f"--labels {labels} is not a folder")
    suffix = "_0000" + file_ending
    cases = sorted(f[:-len(suffix)] for f in os.listdir(images) if f.endswith(suffix))
    if not cases:
        raise UserInputError(f"no images named CASE_0000{file_ending} in {images}")
    found = {}
    for case in cases:
        channels = [os.path.join(images, f"{case}_{c:04d}{file_ending}") for c in range(num_channels)]
        absent = [p for p in channels if not os.path.isfile(p)]
        if absent:
            raise UserInputError(f"case {case}: channel files {absent} are missing")
        label = os.path.join(labels, case + file_ending)
        if not os.path.isfile(label):
            raise UserInputError(f"case {case} in {images} has no label {label}: every test image "
                                 f"needs its ground truth in --labels")
        found[case] = (channels, label)
    return found


def select_raw_cases(images: str, labels: str, dataset_json: dict,
                     cases: Optional[Sequence[str]] = None) -> Dict[str, Tuple[List[str], str]]:
    """The raw test cases to score, ``{case: (channel files, label file)}``: ``cases`` (in that
    order) or, without them, every case of ``images`` (sorted). Each needs all its channels and
    its label."""
    num_channels = len(dataset_json.get("channel_names", dataset_json.get("modality", {"0": 0})))
    raw = _raw_cases(images, labels, dataset_json["file_ending"], num_channels)
    if cases:
        unknown = [c for c in cases if c not in raw]
        if unknown:
            raise UserInputError(f"cases {unknown} are not in {images}")
        raw = {c: raw[c] for c in cases}
    return raw


def load_raw_slices(images: str, labels: str, plans: dict, configuration: str, dataset_json: dict,
                    include_empty: bool, cases: Optional[Sequence[str]] = None,
                    ignore_label: Optional[int] = None) -> List[SliceSample]:
    """Preprocess raw test images + labels with the model's plans and return their slices.

    The configuration's own preprocessor (``DefaultPreprocessor`` unless the plans name another)
    runs nnU-Net's ``run_case``: transpose, crop to nonzero, resample (the label with the
    segmentation resampling) and normalise, exactly as for the training data.
    """
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans_manager = PlansManager(plans)
    config = plans_manager.get_configuration(configuration)
    raw = select_raw_cases(images, labels, dataset_json, cases)
    preprocessor = config.preprocessor_class(verbose=False)
    samples: List[SliceSample] = []
    for case, (channels, label) in raw.items():
        data, seg, _ = preprocessor.run_case(channels, label, plans_manager, config, dataset_json)
        samples += _slices_of(case, data, seg, include_empty, ignore_label)
    return samples


def limit_slices(samples: List[SliceSample], max_slices: Optional[int], seed: int
                 ) -> List[SliceSample]:
    """At most ``max_slices`` slices, drawn evenly at random (seeded), in their original order."""
    if max_slices is None or len(samples) <= max_slices:
        return samples
    keep = np.sort(np.random.default_rng(seed).choice(len(samples), max_slices, replace=False))
    return [samples[i] for i in keep]
