"""``nnunet-ima split``: held-out test cases and nnU-Net's cross-validation folds without them.

Writes into ``$nnUNet_preprocessed/DatasetXXX_Name/``:

- ``test_cases.json``: a seeded draw of ``--test`` cases, the ones ``nnunet-ima-eval`` attacks;
- ``splits_final.json``: ``--folds`` folds of nnU-Net's own cross-validation split
  (``generate_crossval_split``: scikit-learn's shuffled ``KFold`` seeded with ``--seed``) over the
  remaining cases, so that ``nnUNetv2_train DATASET 2d K`` never sees a test case for any
  ``K < --folds``. The default is nnU-Net's 5, or one fold per remaining case when fewer remain
  (every fold needs a validation case).

Every fold has to be written: for a fold missing from ``splits_final.json``, nnU-Net draws its own
80:20 split over all cases, test cases included. Fold ``all`` ignores the split altogether: nnU-Net
trains it on every preprocessed case, so it has no held-out cases (``nnunet-ima-eval`` refuses to
score its training cases). The paper's Heart protocol (16 train / 1 validation / 3 test) is close
to ``nnunet-ima split -d 2 --test 3`` (fold 0: 13 train / 4 validation).
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from nnunet_ima.errors import UserInputError
from nnunet_ima.io import write_text
from nnunet_ima.nnunet.paths import preprocessed_dataset_folder

SPLITS_FILENAME = "splits_final.json"
TEST_CASES_FILENAME = "test_cases.json"
DEFAULT_FOLDS = 5    # nnU-Net's own cross-validation
DEFAULT_SEED = 12345  # nnU-Net's own split seed

FOLD_ALL_NOTE = ("note: `nnUNetv2_train ... all` ignores splits_final.json and trains on every "
                 "preprocessed case, these test cases included; nnunet-ima-eval refuses to score a "
                 "fold-all model on them. Train folds 0-{last} for held-out results.")


def case_identifiers(preprocessed_folder: str) -> List[str]:
    """Case identifiers of a preprocessed dataset (from ``gt_segmentations`` and dataset.json)."""
    with open(os.path.join(preprocessed_folder, "dataset.json")) as f:
        file_ending = json.load(f)["file_ending"]
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


def _write_json(path: str, obj) -> None:
    write_text(path, json.dumps(obj, indent=2))


def write_split(dataset: str, num_test: int, seed: int, num_folds: Optional[int] = None,
                overwrite: bool = False) -> dict:
    """Compute the split (:func:`make_split`) and write ``splits_final.json`` and
    ``test_cases.json``; returns the split."""
    folder = preprocessed_dataset_folder(dataset)
    split = make_split(case_identifiers(folder), num_test, num_folds, seed)
    save_folds(folder, split["folds"], split["test"], seed, overwrite)
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


def save_folds(folder: str, folds: Sequence[Dict[str, List[str]]], test: Sequence[str], seed,
               overwrite: bool = False, allow_test_in_val: bool = False) -> None:
    """Write ``folds`` as ``splits_final.json`` and ``test`` (with ``seed`` and the number of
    folds) as ``test_cases.json`` into the preprocessed ``folder``.

    A fold that trains on a test case is refused; so is one that validates on a test case
    unless ``allow_test_in_val`` (nnU-Net picks ``checkpoint_best`` on the validation cases). An
    existing, different split is refused unless ``overwrite``: models trained on it would be
    evaluated on the wrong cases. Nothing is written unless every check passed.
    """
    _check_folds(folds, test, allow_test_in_val)
    splits = [{"train": list(f["train"]), "val": list(f["val"])} for f in folds]
    test_record = {"test": list(test), "seed": seed, "num_folds": len(splits)}
    splits_path = os.path.join(folder, SPLITS_FILENAME)
    test_path = os.path.join(folder, TEST_CASES_FILENAME)
    for path, new in ((splits_path, splits), (test_path, test_record)):
        if os.path.isfile(path) and not overwrite:
            with open(path) as f:
                if json.load(f) != new:
                    raise UserInputError(f"{path} exists with a different split; models trained "
                                         f"on it would be evaluated on the wrong cases. Pass "
                                         f"--overwrite to replace it.")
    _write_json(test_path, test_record)
    _write_json(splits_path, splits)


def save_split(folder: str, split: Dict[str, List[str]], seed, overwrite: bool = False,
               allow_test_in_val: bool = False) -> None:
    """Write a custom one-fold split (``train`` / ``val`` / ``test`` case lists) as fold 0 of
    ``splits_final.json`` plus ``test_cases.json``; see :func:`save_folds`.

    Only fold 0 exists then: nnU-Net trains any other fold on its own 80:20 split of all cases
    (``nnunet-ima-eval`` knows and refuses to score those folds on their training cases).
    """
    save_folds(folder, [{"train": split["train"], "val": split["val"]}], split["test"], seed,
               overwrite, allow_test_in_val)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-d", "--dataset", required=True, help="dataset id or name")
    parser.add_argument("--test", type=int, required=True, help="number of held-out test cases")
    parser.add_argument("--folds", type=int,
                        help=f"cross-validation folds over the other cases (default "
                             f"{DEFAULT_FOLDS} as nnU-Net, or one per case when fewer remain)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED,
                        help=f"seed of the test draw and of the folds (default {DEFAULT_SEED}, "
                             f"nnU-Net's)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing, different split")


def run(args: argparse.Namespace) -> int:
    split = write_split(args.dataset, args.test, args.seed, args.folds, args.overwrite)
    print(f"test  {len(split['test'])}: {' '.join(split['test'])}")
    for k, fold in enumerate(split["folds"]):
        print(f"fold {k}: train {len(fold['train'])}, val {len(fold['val'])}: "
              f"{' '.join(fold['val'])}")
    if split["test"]:
        print(FOLD_ALL_NOTE.format(last=len(split["folds"]) - 1))
    return 0
