"""Held-out test cases and nnU-Net's cross-validation folds without them, as ``nnunet-ima
split`` writes them into ``$nnUNet_preprocessed/DatasetXXX_Name/``.

- ``test_cases.json``: a seeded draw of test cases, the ones ``nnunet-ima-eval`` attacks;
- ``splits_final.json``: folds of nnU-Net's own cross-validation split
  (``generate_crossval_split``: scikit-learn's shuffled ``KFold`` seeded with the same seed) over
  the remaining cases, so that ``nnUNetv2_train DATASET 2d K`` never sees a test case for any
  fold ``K`` written. The default is nnU-Net's 5 folds, or one fold per remaining case when
  fewer remain (every fold needs a validation case).

Every fold has to be written: for a fold missing from ``splits_final.json``, nnU-Net draws its
own 80:20 split over all cases, test cases included (this package's trainers refuse such a
fold). Rewriting a split under trained models changes what their fold means: :func:`save_folds`
names the fold folders under ``$nnUNet_results/<dataset>`` whose cases would change and refuses
unless forced. The files are read back by :mod:`nnunet_ima.nnunet.splits`.
"""
from __future__ import annotations

import glob
import json
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from nnunet_ima.errors import UserInputError
from nnunet_ima.io import read_json, write_text
from nnunet_ima.nnunet.paths import preprocessed_dataset_folder
from nnunet_ima.nnunet.splits import (SPLITS_FILENAME, TEST_CASES_FILENAME, TEST_IN_VAL_KEY,
                                      read_splits)
from nnunet_ima.nnunet.training_record import RECORD_FILENAME, read_training_record

DEFAULT_FOLDS = 5    # nnU-Net's own cross-validation
DEFAULT_SEED = 12345  # nnU-Net's own split seed


def case_identifiers(preprocessed_folder: str) -> List[str]:
    """Case identifiers of a preprocessed dataset (from ``gt_segmentations`` and dataset.json)."""
    path = os.path.join(preprocessed_folder, "dataset.json")
    dataset_json = read_json(path, "run nnUNetv2_plan_and_preprocess again")
    file_ending = dataset_json.get("file_ending") if isinstance(dataset_json, dict) else None
    if not isinstance(file_ending, str):
        raise UserInputError(f"{path} has no 'file_ending'; run nnUNetv2_plan_and_preprocess "
                             f"again")
    gt = os.path.join(preprocessed_folder, "gt_segmentations")
    if not os.path.isdir(gt):
        raise UserInputError(f"{gt} is missing: run nnUNetv2_plan_and_preprocess first")
    cases = sorted(f[:-len(file_ending)] for f in os.listdir(gt) if f.endswith(file_ending))
    if not cases:
        raise UserInputError(f"no cases in {gt}")
    return cases


def draw_test_cases(cases: Sequence[str], num_test: int, seed: int
                    ) -> Tuple[List[str], List[str]]:
    """A seeded draw of ``num_test`` test cases; returns ``(test, rest)``, each sorted.

    The first ``num_test`` cases of a seeded permutation: the same test cases as the earlier
    train / validation / test split drew with the same seed.
    """
    order = np.random.default_rng(seed).permutation(len(cases))
    test = sorted(cases[i] for i in order[:num_test])
    return test, sorted(cases[i] for i in order[num_test:])


def crossval_folds(cases: Sequence[str], num_folds: int, seed: int) -> List[Dict[str, List[str]]]:
    """nnU-Net's ``num_folds``-fold cross-validation split of ``cases`` (sorted first, as nnU-Net
    does), seeded with ``seed``; one ``{"train": [...], "val": [...]}`` per fold."""
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    folds = generate_crossval_split(sorted(cases), seed=seed, n_splits=num_folds)
    # nnU-Net returns numpy strings; plain str compare and serialise the same everywhere.
    return [{"train": [str(c) for c in f["train"]], "val": [str(c) for c in f["val"]]}
            for f in folds]


def default_folds(num_cases: int, num_test: int) -> int:
    """nnU-Net's 5 folds, or one per non-test case when fewer remain (at least 2)."""
    return max(2, min(DEFAULT_FOLDS, num_cases - num_test))


def make_split(cases: Sequence[str], num_test: int, num_folds: Optional[int], seed: int) -> dict:
    """``{"test": [...], "folds": [{"train", "val"}, ...]}``: ``num_test`` seeded test cases and
    ``num_folds`` (``None``: :func:`default_folds`) cross-validation folds of the other cases,
    none of which holds a test case."""
    if num_test < 0:
        raise UserInputError(f"--test must be >= 0, got {num_test}")
    if num_folds is None:
        num_folds = default_folds(len(cases), num_test)
    if num_folds < 2:
        raise UserInputError(f"--folds must be >= 2 (a cross-validation), got {num_folds}")
    rest = len(cases) - num_test
    if rest < num_folds:
        fix = "fewer --test cases" + (f" or --folds {rest}" if rest >= 2 else "")
        raise UserInputError(f"{num_test} test cases leave {max(rest, 0)} of {len(cases)} cases "
                             f"for {num_folds} folds, but every fold needs a training and a "
                             f"validation case: pass {fix}")
    test, rest_cases = draw_test_cases(cases, num_test, seed)
    return {"test": test, "folds": crossval_folds(rest_cases, num_folds, seed)}


def write_split(dataset: str, num_test: int, seed: int, num_folds: Optional[int] = None,
                overwrite: bool = False, force: bool = False) -> dict:
    """Compute the split (:func:`make_split`) and write ``splits_final.json`` and
    ``test_cases.json``; returns the split."""
    folder = preprocessed_dataset_folder(dataset)
    split = make_split(case_identifiers(folder), num_test, num_folds, seed)
    save_folds(folder, split["folds"], split["test"], seed, overwrite, force=force)
    return split


def _check_folds(folds: Sequence[Dict[str, List[str]]], test: Sequence[str],
                 allow_test_in_val: bool) -> None:
    """Every fold trains and validates on something, and never trains on a test case."""
    for k, fold in enumerate(folds):
        if not fold["train"] or not fold["val"]:
            raise UserInputError(f"fold {k} has {len(fold['train'])} training and "
                                 f"{len(fold['val'])} validation cases; nnU-Net needs both")
        leaked = sorted(set(test) & set(fold["train"]))
        if not allow_test_in_val:
            leaked = sorted(set(leaked) | (set(test) & set(fold["val"])))
        if leaked:
            raise UserInputError(f"fold {k} would train or validate on the test cases {leaked}")


def _fold_number(fold_folder: str) -> Optional[int]:
    """``.../fold_3`` -> 3; ``None`` for fold ``all`` or another name."""
    name = os.path.basename(fold_folder)[len("fold_"):]
    return int(name) if name.isdigit() else None


def models_on_changed_folds(dataset_name: str, old_splits: Optional[list],
                            new_splits: Sequence[Dict[str, List[str]]]) -> List[str]:
    """The trained fold folders under ``$nnUNet_results/<dataset_name>/*/`` (a training record
    or a checkpoint in them) whose cases ``new_splits`` would change.

    A fold's cases are those of its training record; without one (a plain nnU-Net trainer),
    those of ``old_splits`` (``None``: unknown, counted as changed). Fold ``all`` uses no split.
    """
    results = os.environ.get("nnUNet_results", "").strip()
    if not results:
        return []
    found = []
    for fold_folder in sorted(glob.glob(os.path.join(results, dataset_name, "*", "fold_*"))):
        fold = _fold_number(fold_folder)
        if fold is None or not os.path.isdir(fold_folder):
            continue
        try:
            record = read_training_record(fold_folder)
        except UserInputError:
            record = None  # an unreadable record tells nothing: as if there were none
        trained = record is not None or any(f.endswith(".pth") for f in os.listdir(fold_folder))
        if not trained:
            continue
        if record is not None:
            used = record
        elif old_splits is not None and fold < len(old_splits):
            used = old_splits[fold]
        else:
            used = None  # nnU-Net's own 80:20 split, or a split file that cannot be read
        new = new_splits[fold] if fold < len(new_splits) else None
        if used is None or new is None or any(set(used[k]) != set(new[k])
                                              for k in ("train", "val")):
            found.append(fold_folder)
    return found


def _refuse_changing_trained_folds(folder: str, old_splits: Optional[list],
                                   new_splits: Sequence[Dict[str, List[str]]],
                                   force: bool) -> None:
    """Refuse, unless ``force``, to rewrite the split under models whose folds it changes."""
    if not os.environ.get("nnUNet_results", "").strip():
        print("warning: nnUNet_results is not set, so no trained model of the old split could be "
              "looked for", file=sys.stderr, flush=True)
        return
    models = models_on_changed_folds(os.path.basename(os.path.abspath(folder)), old_splits,
                                     new_splits)
    if not models or force:
        for model in models:
            print(f"warning: {model} was trained on a fold that this split changes",
                  file=sys.stderr, flush=True)
        return
    listing = "\n".join(f"  {m}" for m in models)
    raise UserInputError(
        f"rewriting {os.path.join(folder, SPLITS_FILENAME)} would change the cases of trained "
        f"folds:\n{listing}\nA model without a training record ({RECORD_FILENAME}; trained by a "
        f"plain nnU-Net trainer) would then be evaluated, continued (--c) and validated (--val) "
        f"on the new split, not on what it trained on. Pass --overwrite --force to rewrite it "
        f"anyway (a model with a record keeps being evaluated on what it trained on), or move "
        f"these models away first.")


def _existing(path: str, overwrite: bool):
    """The content of an existing split file (``None``: there is none). Unreadable: an error
    unless ``overwrite`` (which replaces it; its content is then unknown, ``None``)."""
    if os.path.exists(path) and not os.path.isfile(path):
        raise UserInputError(f"{path} is a folder, not a file; move it away")
    if not os.path.isfile(path):
        return None
    try:
        return read_json(path, "pass --overwrite to replace it")
    except UserInputError:
        if overwrite:
            return None
        raise


def save_folds(folder: str, folds: Sequence[Dict[str, List[str]]], test: Sequence[str], seed,
               overwrite: bool = False, allow_test_in_val: bool = False,
               force: bool = False) -> None:
    """Write ``folds`` as ``splits_final.json`` and ``test`` (with ``seed`` and the number of
    folds) as ``test_cases.json`` into the preprocessed ``folder``.

    A fold that trains on a test case is refused; so is one that validates on a test case
    unless ``allow_test_in_val`` (nnU-Net picks ``checkpoint_best`` on the validation cases;
    ``test_cases.json`` then says ``"allow_test_in_val": true``, so that the trainers accept it).
    An existing, different split is refused unless ``overwrite``: models trained on it would be
    evaluated on the wrong cases; and with ``overwrite`` too, unless ``force``, where trained
    models under ``$nnUNet_results`` have folds whose cases it changes. Nothing is written
    unless every check passed.
    """
    _check_folds(folds, test, allow_test_in_val)
    splits = [{"train": list(f["train"]), "val": list(f["val"])} for f in folds]
    test_record = {"test": list(test), "seed": seed, "num_folds": len(splits)}
    if allow_test_in_val and any(set(test) & set(f["val"]) for f in splits):
        test_record[TEST_IN_VAL_KEY] = True
    splits_path = os.path.join(folder, SPLITS_FILENAME)
    test_path = os.path.join(folder, TEST_CASES_FILENAME)
    changed = False
    for path, new in ((splits_path, splits), (test_path, test_record)):
        old = _existing(path, overwrite)
        if os.path.isfile(path) and old != new:
            changed = True
            if not overwrite:
                raise UserInputError(f"{path} exists with a different split; models trained "
                                     f"on it would be evaluated on the wrong cases. Pass "
                                     f"--overwrite to replace it.")
    if changed:
        try:
            old_splits = read_splits(splits_path) if os.path.isfile(splits_path) else None
        except UserInputError:
            old_splits = None
        _refuse_changing_trained_folds(folder, old_splits, splits, force)
    # The bytes of earlier versions (no sorted keys, no final newline, unlike io.write_json): a
    # training record keeps the sha256 of splits_final.json, and rewriting an unchanged split
    # must not make it look changed.
    for path, obj in ((test_path, test_record), (splits_path, splits)):
        write_text(path, json.dumps(obj, indent=2))


def save_split(folder: str, split: Dict[str, List[str]], seed, overwrite: bool = False,
               allow_test_in_val: bool = False) -> None:
    """Write a custom one-fold split (``train`` / ``val`` / ``test`` case lists) as fold 0 of
    ``splits_final.json`` plus ``test_cases.json``; see :func:`save_folds`.

    Only fold 0 exists then: nnU-Net trains any other fold on its own 80:20 split of all cases
    (``nnunet-ima-eval`` knows and refuses to score those folds on their training cases).
    """
    save_folds(folder, [{"train": split["train"], "val": split["val"]}], split["test"], seed,
               overwrite, allow_test_in_val)
