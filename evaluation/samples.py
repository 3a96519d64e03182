"""Test samples of held-out cases, as the network sees them (nnU-Net-preprocessed): the 2D slices
of each case for a 2D configuration, the whole case for a 3D one (:data:`WHOLE_CASE`).

Cases come from ``test_cases.json`` (``nnunet-ima split``), the fold's validation cases (from
the model's training record, else ``splits_final.json``), an explicit list, or raw ``imagesTs`` /
``labelsTs`` folders that are preprocessed here with the model's plans (nnU-Net's own
preprocessor: transpose, crop, resample, normalise). The split files are read and checked by
:mod:`nnunet_ima.nnunet.splits`, as for the trainers and ``nnunet-ima split``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from nnunet_ima.errors import UserInputError
from nnunet_ima.label_mask import OUTSIDE_NONZERO, scored_labels
from nnunet_ima.nnunet.splits import (SPLITS_FILENAME, TEST_CASES_FILENAME, read_splits,
                                      read_test_cases)
from nnunet_ima.nnunet.training_record import read_training_record, record_path


WHOLE_CASE = -1
"""The ``index`` of a sample that is a whole preprocessed case (a 3D configuration's sample)."""


@dataclass
class SliceSample:
    """One test sample, the scoring unit: a 2D slice, ``image`` ``(C, H, W)`` float32 z-scored
    and ``label`` ``(H, W)`` int16, ``index`` its position on the case's axis 1; or, for a 3D
    configuration, a whole case, ``image`` ``(C, D, H, W)``, ``label`` ``(D, H, W)`` and
    ``index`` :data:`WHOLE_CASE`.

    ``label`` holds the classes ``0 .. K-1`` (and nnU-Net's ignore label, if the dataset has one).
    """

    case: str
    index: int
    image: np.ndarray
    label: np.ndarray

    @property
    def key(self) -> Tuple[str, int]:
        return self.case, self.index

    @property
    def is_volume(self) -> bool:
        """A whole 3D case rather than a 2D slice."""
        return self.index == WHOLE_CASE


def configuration_dims(plans: dict, configuration: str) -> int:
    """The spatial dimensions of ``configuration`` in ``plans``: the length of its patch size
    (2 or 3), the configuration's own or, as nnU-Net resolves ``inherits_from``, that of the
    nearest configuration it inherits from that sets one."""
    configurations = plans["configurations"]
    name, seen = configuration, set()
    while "patch_size" not in configurations[name]:
        parent = configurations[name].get("inherits_from")
        if parent is None or parent in seen or parent not in configurations:
            raise UserInputError(f"configuration {configuration!r} of the plans has no patch "
                                 f"size; is plans.json intact?")
        seen.add(name)
        name = parent
    return len(configurations[name]["patch_size"])


def resolve_case_source(preprocessed_dataset: str, source: Optional[Sequence[str]]) -> List[str]:
    """``--cases`` with its default filled in: ``["test"]`` when ``test_cases.json`` exists,
    else ``["val"]`` (the fold's validation cases, nnU-Net's own held-out data)."""
    if source:
        return list(source)
    if os.path.isfile(os.path.join(preprocessed_dataset, TEST_CASES_FILENAME)):
        return ["test"]
    return ["val"]


def _test_cases(preprocessed_dataset: str) -> List[str]:
    path = os.path.join(preprocessed_dataset, TEST_CASES_FILENAME)
    if not os.path.isfile(path):
        raise UserInputError(f"{path} does not exist: run `nnunet-ima split -d DATASET --test N` "
                             f"or pass --cases val / --cases CASE [CASE ...] / --images/--labels")
    return list(read_test_cases(path)["test"])


def _fold_record(fold_folder: Optional[str], fold) -> Optional[dict]:
    """The training record of the model's ``fold_folder`` when it is one of ``fold``; ``None``
    without a folder, without a record (a plain nnU-Net trainer) or for a record of another
    fold (a copied folder: the held-out check counts the training cases of both)."""
    record = read_training_record(fold_folder) if fold_folder else None
    return record if record is not None and record["fold"] == fold else None


def _validation_cases(preprocessed_dataset: str, fold, fold_folder: Optional[str] = None
                      ) -> List[str]:
    """The cases ``fold`` validated on: those of its training record in ``fold_folder`` where
    it has one (what it validated on, also after the split was rewritten), else those of
    today's ``splits_final.json``, as the held-out check falls back (and its note says)."""
    if fold == "all":
        raise UserInputError("fold all has no validation cases: nnU-Net trains and validates it "
                             "on every preprocessed case. Use --cases test / CASE ... or "
                             "--images/--labels")
    record = _fold_record(fold_folder, fold)
    if record is not None:
        return list(record["val"])
    path = os.path.join(preprocessed_dataset, SPLITS_FILENAME)
    if not os.path.isfile(path):
        raise UserInputError(f"{path} does not exist: train the model first or use --cases test")
    splits = read_splits(path)
    if not 0 <= fold < len(splits):
        raise UserInputError(f"{path} has {len(splits)} folds, fold {fold} asked (nnU-Net trained "
                             f"it on its own random 80:20 split of all cases); name the cases "
                             f"with --cases CASE ...")
    return splits[fold]["val"]


_CASE_SETS = {"test": lambda folder, fold, fold_folder: _test_cases(folder),
              "val": _validation_cases}


def _empty_set_message(preprocessed_dataset: str, token: str, fold,
                       fold_folder: Optional[str]) -> str:
    """Why ``--cases TOKEN`` (test or val) selected nothing, and the set to use instead: the
    other one where it has cases (an empty test set after ``split --test 0`` -> --cases val)."""
    if token == "test":
        where = f"{os.path.join(preprocessed_dataset, TEST_CASES_FILENAME)} lists no test cases"
    elif _fold_record(fold_folder, fold) is not None:
        where = f"the training record {record_path(fold_folder)} lists no validation cases"
    else:
        where = (f"fold {fold} of {os.path.join(preprocessed_dataset, SPLITS_FILENAME)} has no "
                 f"validation cases")
    other = "val" if token == "test" else "test"
    try:
        has_other = bool(_CASE_SETS[other](preprocessed_dataset, fold, fold_folder))
    except UserInputError:  # that set is missing too
        has_other = False
    if has_other:
        return f"{where}; use --cases {other}"
    return f"{where}; name the cases with --cases CASE [CASE ...] or use --images/--labels"


def cases_from_source(preprocessed_dataset: str, source: Optional[Sequence[str]], fold,
                      fold_folder: Optional[str] = None) -> List[str]:
    """Case identifiers named by ``--cases``, in order: ``test`` stands for the cases of
    ``test_cases.json``, ``val`` for the fold's validation cases (from the training record in
    the model's ``fold_folder``, ``MODEL/fold_K``, where it has one), anything else is a case
    identifier (``--cases test val`` takes both sets). ``None``: see :func:`resolve_case_source`."""
    cases: List[str] = []
    for token in resolve_case_source(preprocessed_dataset, source):
        if token in _CASE_SETS:
            selected = _CASE_SETS[token](preprocessed_dataset, fold, fold_folder)
            if not selected:
                raise UserInputError(_empty_set_message(preprocessed_dataset, token, fold,
                                                        fold_folder))
            cases += selected
        else:
            cases.append(token)
    repeated = sorted({c for c in cases if cases.count(c) > 1})
    if repeated:
        raise UserInputError(f"--cases names {repeated} more than once (a test case must not also "
                             f"be a validation case or be listed twice)")
    return cases


def _has_foreground(label: np.ndarray, ignore_label: Optional[int]) -> bool:
    """Whether ``label`` (any shape) holds a foreground class (not the ignore label)."""
    return bool((scored_labels(torch.from_numpy(label), ignore_label)[0] > 0).any())


def _background_outside(seg: np.ndarray) -> np.ndarray:
    """``seg`` as int16 with nnU-Net's ``-1`` (outside the nonzero region) as background, as in
    nnU-Net's training."""
    label = np.asarray(seg).astype(np.int16)
    label[label == OUTSIDE_NONZERO] = 0
    return label


def _volume_of(case: str, data: np.ndarray, seg: np.ndarray, include_empty: bool,
               ignore_label: Optional[int] = None) -> List[SliceSample]:
    """The one sample of a case for a 3D configuration: ``data`` ``(C, D, H, W)`` and ``seg``
    ``(1, D, H, W)`` as they are; none for a case without foreground unless ``include_empty``."""
    label = np.ascontiguousarray(_background_outside(seg[0]))
    if not include_empty and not _has_foreground(label, ignore_label):
        return []
    return [SliceSample(case, WHOLE_CASE, np.ascontiguousarray(data, dtype=np.float32), label)]


def samples_of(case: str, data: np.ndarray, seg: np.ndarray, include_empty: bool,
               ignore_label: Optional[int], spatial_dims: int) -> List[SliceSample]:
    """The samples of one preprocessed case, ``data`` ``(C, D, H, W)``, ``seg`` ``(1, D, H, W)``:
    its slices for a 2D configuration (``spatial_dims`` 2), the whole case for a 3D one."""
    if spatial_dims == 3:
        return _volume_of(case, data, seg, include_empty, ignore_label)
    if spatial_dims != 2:
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    return _slices_of(case, data, seg, include_empty, ignore_label)


def _slices_of(case: str, data: np.ndarray, seg: np.ndarray, include_empty: bool,
               ignore_label: Optional[int] = None) -> List[SliceSample]:
    """The 2D slices of one preprocessed case: ``data`` ``(C, D, H, W)``, ``seg`` ``(1, D, H, W)``.

    nnU-Net's 2D configuration slices axis 1 (``D``). ``-1`` (outside the nonzero region) becomes
    background, as in nnU-Net's training. Without ``include_empty`` only slices with a foreground
    class (not the ignore label) in the ground truth are kept.
    """
    samples = []
    for z in range(data.shape[1]):
        label = _background_outside(seg[0, z])
        if not include_empty and not _has_foreground(label, ignore_label):
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
                             include_empty: bool, ignore_label: Optional[int] = None,
                             spatial_dims: int = 2) -> List[SliceSample]:
    """Samples of ``cases`` from ``$nnUNet_preprocessed/Dataset/<data_identifier>``: slices
    (``spatial_dims`` 2) or whole cases (3), see :func:`samples_of`."""
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
        data = np.asarray(data)
        if not np.isfinite(data).all():
            raise UserInputError(f"case {case} in {folder} holds NaN or infinite values (NaN in "
                                 f"its raw image?): fix the raw image and rerun "
                                 f"nnUNetv2_plan_and_preprocess, or leave the case out "
                                 f"(--cases CASE ...)")
        samples += samples_of(case, data, np.asarray(seg), include_empty, ignore_label,
                              spatial_dims)
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


def _reason(error: Exception) -> str:
    """``Type: message`` of a reader's exception in one line. SimpleITK's run over several
    lines, the first naming its own source file and the last the problem, so the last is kept."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[-1]}" if lines else type(error).__name__


def truncation(path: str) -> Optional[str]:
    """Why the NIfTI file ``path`` is incomplete (``None``: complete, or not NIfTI). SimpleITK
    reads a NIfTI file that ends early without an error, as zeros past its end: a copy cut
    short would be scored as an image with a black part."""
    import gzip
    import zlib

    import nibabel

    if not path.endswith((".nii", ".nii.gz")):
        return None
    size = os.path.getsize(path)
    if path.endswith(".gz"):
        try:
            size = 0
            with gzip.open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    size += len(block)
        except (EOFError, OSError, zlib.error) as e:
            return f"truncated: {e}"
    try:
        image = nibabel.load(path)
        header = image.header
        # The voxels start at the proxy's offset: writers such as ITK leave vox_offset at 0.
        offset = getattr(image.dataobj, "offset", header.get_data_offset())
        expected = int(offset) + \
            int(np.prod(header.get_data_shape())) * header.get_data_dtype().itemsize
    except Exception:  # nibabel cannot parse what SimpleITK read: no size to check against
        return None
    if size < expected:
        return f"truncated: {size} bytes of the {expected} its header announces"
    return None


def _unreadable(path: str, case: str, why: str, label: bool = False) -> UserInputError:
    what = f"the label of case {case}" if label else f"case {case}"
    return UserInputError(f"cannot read {path} ({what}) as an image ({why}); replace it with a "
                          f"complete {'label ' * label}image or remove the case from --images")


def read_raw_case(reader, case: str, channels: Sequence[str], label: str
                  ) -> Tuple[np.ndarray, np.ndarray, dict]:
    """Read a raw test case with nnU-Net's image reader ``reader`` (the plans'
    ``image_reader_writer``): ``(data (C, ...), seg (1, ...), properties)``.

    Raises:
        UserInputError: a file that cannot be read as an image (not an image, truncated:
            :func:`truncation`), channels that do not fit together, a label of another shape
            than the image, or NaN / infinite values in the image; the message names the file.
    """
    try:
        data, properties = reader.read_images(list(channels))
    except Exception as e:  # readers raise many types (SimpleITK's RuntimeError, nibabel's, ...)
        for path in channels:  # which file is it? (several channels are read together)
            try:
                reader.read_images([path])
            except Exception as single:
                raise _unreadable(path, case, _reason(single)) from None
        raise UserInputError(f"the channel files of case {case} do not fit together "
                             f"({_reason(e)}): {', '.join(channels)}") from None
    try:
        seg, _ = reader.read_seg(label)
    except Exception as e:
        raise _unreadable(label, case, _reason(e), label=True) from None
    # Read without an error, a NIfTI file may still have ended early (see truncation).
    for path, is_label in [(path, False) for path in channels] + [(label, True)]:
        cut = truncation(path)
        if cut:
            raise _unreadable(path, case, cut, label=is_label)
    if data.shape[1:] != seg.shape[1:]:
        raise UserInputError(f"case {case}: the image {channels[0]} has shape "
                             f"{list(data.shape[1:])} but its label {label} has shape "
                             f"{list(seg.shape[1:])}; the label must cover the image voxel for "
                             f"voxel (give the matching label in --labels)")
    for path, channel in zip(channels, data):
        if not np.isfinite(channel).all():
            raise UserInputError(f"{path} (case {case}) holds NaN or infinite values; fix the "
                                 f"image or remove the case from --images")
    return data, seg, properties


def load_raw_slices(images: str, labels: str, plans: dict, configuration: str, dataset_json: dict,
                    include_empty: bool, cases: Optional[Sequence[str]] = None,
                    ignore_label: Optional[int] = None,
                    spatial_dims: Optional[int] = None) -> List[SliceSample]:
    """Preprocess raw test images + labels with the model's plans and return their samples:
    slices for a 2D configuration, whole cases for a 3D one (``spatial_dims``; ``None``: the
    configuration's, :func:`configuration_dims`).

    The configuration's own preprocessor (``DefaultPreprocessor`` unless the plans name another)
    runs nnU-Net's ``run_case``: read with the plans' image reader, then transpose, crop to
    nonzero, resample (the label with the segmentation resampling) and normalise, exactly as for
    the training data. The reading is done here (:func:`read_raw_case`, then the preprocessor's
    ``run_case_npy``, which ``run_case`` calls after reading), so that a bad file is named.
    """
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans_manager = PlansManager(plans)
    config = plans_manager.get_configuration(configuration)
    raw = select_raw_cases(images, labels, dataset_json, cases)
    preprocessor = config.preprocessor_class(verbose=False)
    reader = plans_manager.image_reader_writer_class()
    if spatial_dims is None:
        spatial_dims = len(config.patch_size)
    samples: List[SliceSample] = []
    for case, (channels, label) in raw.items():
        data, seg, properties = read_raw_case(reader, case, channels, label)
        data, seg, _ = preprocessor.run_case_npy(data, seg, properties, plans_manager, config,
                                                 dataset_json)
        samples += samples_of(case, data, seg, include_empty, ignore_label, spatial_dims)
    return samples


def limit_slices(samples: List[SliceSample], max_slices: Optional[int], seed: int
                 ) -> List[SliceSample]:
    """At most ``max_slices`` samples (slices, or cases in 3D), drawn evenly at random (seeded),
    in their original order."""
    if max_slices is None or len(samples) <= max_slices:
        return samples
    keep = np.sort(np.random.default_rng(seed).choice(len(samples), max_slices, replace=False))
    return [samples[i] for i in keep]
