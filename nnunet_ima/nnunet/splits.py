"""The split files of a preprocessed dataset, read with errors that name the file and the fix.

``$nnUNet_preprocessed/DatasetXXX_Name/`` holds nnU-Net's ``splits_final.json`` (a list of folds
``{"train": [...], "val": [...]}``) and, after ``nnunet-ima split``, ``test_cases.json``
(``{"test": [...], "seed": S, "num_folds": K}``): the held-out cases that no fold may train or
validate on. A file that is not JSON, or JSON of another shape, is a :class:`UserInputError`
here, never a ``KeyError`` or ``TypeError`` deep inside nnU-Net or the evaluator.

:func:`fold_split_problem` is the rule the trainers of this package apply before nnU-Net's
``do_split`` picks a fold's cases (see ``nnUNetTrainerClean.do_split``).
"""
from __future__ import annotations

import os
import re
from typing import Dict, List, Optional, Union

from nnunet_ima.errors import UserInputError
from nnunet_ima.io import read_json

SPLITS_FILENAME = "splits_final.json"
TEST_CASES_FILENAME = "test_cases.json"
# Set by `save_folds(..., allow_test_in_val=True)`: validating on the test cases is deliberate
# (no model selection on them: the final checkpoint is evaluated).
TEST_IN_VAL_KEY = "allow_test_in_val"
FOLD_ALL = "all"

Fold = Union[int, str]
SPLITS_SHAPE = 'a list of folds [{"train": [...], "val": [...]}, ...] as nnU-Net writes it'
TEST_CASES_SHAPE = '{"test": ["case", ...], ...} as `nnunet-ima split` writes it'


# nnU-Net's dataset folders are named DatasetXXX_Name (maybe_convert_to_dataset_name).
_DATASET_FOLDER = re.compile(r"Dataset\d{3,}_.+")


def split_remedy(path: str) -> str:
    """How to repair a split file of the dataset folder that holds ``path``: the command names
    that dataset where the folder is an nnU-Net dataset folder (``DatasetXXX_Name``), else the
    placeholder ``DATASET`` (a copy elsewhere is not a name ``nnunet-ima split -d`` accepts)."""
    folder = os.path.basename(os.path.dirname(os.path.abspath(path)))
    dataset = folder if _DATASET_FOLDER.fullmatch(folder) else "DATASET"
    return (f"rewrite it with `nnunet-ima split -d {dataset} --test N --overwrite` or fix it "
            f"by hand")


def _case_list(value, path: str, where: str, shape: str) -> List[str]:
    if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
        found = ("a list with entries that are not text" if isinstance(value, list)
                 else f"a {type(value).__name__}")
        raise UserInputError(f"{path}: {where} must be a list of case identifiers (the file "
                             f"should hold {shape}), found {found}; {split_remedy(path)}")
    return list(value)


def read_splits(path: str) -> List[Dict[str, List[str]]]:
    """The folds of a ``splits_final.json``, each ``{"train": [...], "val": [...]}``.

    Raises:
        UserInputError: the file cannot be read, is not JSON, or holds anything else.
    """
    splits = read_json(path, split_remedy(path))
    if not isinstance(splits, list):
        raise UserInputError(f"{path} should hold {SPLITS_SHAPE}, found a "
                             f"{type(splits).__name__}; {split_remedy(path)}")
    if not splits:
        raise UserInputError(f"{path} holds no folds (it should hold {SPLITS_SHAPE}); "
                             f"{split_remedy(path)}")
    folds = []
    for k, fold in enumerate(splits):
        if not isinstance(fold, dict) or not {"train", "val"} <= set(fold):
            raise UserInputError(f"{path}: fold {k} should be an object with 'train' and 'val' "
                                 f"(the file should hold {SPLITS_SHAPE}); {split_remedy(path)}")
        folds.append({key: _case_list(fold[key], path, f"fold {k}'s {key!r}", SPLITS_SHAPE)
                      for key in ("train", "val")})
    return folds


def read_test_cases(path: str) -> dict:
    """The content of a ``test_cases.json``; its ``"test"`` entry checked to be a case list.

    Raises:
        UserInputError: the file cannot be read, is not JSON, or holds anything else.
    """
    content = read_json(path, split_remedy(path))
    if not isinstance(content, dict) or "test" not in content:
        found = ("an object without 'test'" if isinstance(content, dict)
                 else f"a {type(content).__name__}")
        raise UserInputError(f"{path} should hold {TEST_CASES_SHAPE}, found {found}; "
                             f"{split_remedy(path)}")
    _case_list(content["test"], path, "'test'", TEST_CASES_SHAPE)
    return content


def split_command(dataset: str, test_record: Optional[dict]) -> str:
    """The ``nnunet-ima split`` call that rewrites a dataset's split, with the test count, seed
    and number of folds of ``test_record`` where it has them."""
    command = f"nnunet-ima split -d {dataset}"
    record = test_record or {}
    command += f" --test {len(record['test'])}" if "test" in record else " --test N"
    for key, option in (("seed", "--seed"), ("num_folds", "--folds")):
        if isinstance(record.get(key), int):
            command += f" {option} {record[key]}"
    return command


def fold_split_problem(preprocessed_dataset: str, fold: Fold,
                       allow_fold_all: bool = False) -> Optional[str]:
    """Why nnU-Net's ``do_split`` must not pick ``fold``'s cases from this dataset folder's
    split files; ``None`` when it may.

    - fold ``all`` trains on every case: refused when ``test_cases.json`` holds test cases,
      unless ``allow_fold_all``;
    - a fold that ``splits_final.json`` lacks: nnU-Net would draw a random 80:20 split of all
      cases (test cases included);
    - no ``splits_final.json`` beside a ``test_cases.json``: nnU-Net would write its own 5-fold
      split of all cases;
    - a fold that trains, or validates, on a test case (validating is allowed when
      ``test_cases.json`` says so: ``"allow_test_in_val": true``).

    Raises:
        UserInputError: a split file that cannot be read.
    """
    dataset = os.path.basename(os.path.abspath(preprocessed_dataset))
    splits_file = os.path.join(preprocessed_dataset, SPLITS_FILENAME)
    test_file = os.path.join(preprocessed_dataset, TEST_CASES_FILENAME)
    record = read_test_cases(test_file) if os.path.isfile(test_file) else None
    test = set(record["test"]) if record else set()
    if fold == FOLD_ALL:
        if not test or allow_fold_all:
            return None
        folds = record.get("num_folds")
        train_folds = f"the folds 0-{folds - 1}" if isinstance(folds, int) else "the folds"
        return (f"fold 'all' trains on every preprocessed case, the {len(test)} held-out test "
                f"cases of {test_file} included, so this model could never be scored on "
                f"held-out cases of this dataset. Train {train_folds} of {splits_file} for "
                f"held-out results. To train on every case on purpose (a final model, scored "
                f"with nnunet-ima-eval --images on images outside this dataset), set "
                f"NNUNET_IMA_ALLOW_FOLD_ALL=1: its training record then lists every case, and "
                f"nnunet-ima-eval refuses to score it on them.")
    if not os.path.isfile(splits_file):
        if not test:
            return None  # nnU-Net writes its own 5-fold split of all cases, as always
        return (f"{test_file} holds {len(test)} held-out test cases but {splits_file} does not "
                f"exist: nnU-Net would write its own 5-fold split of all cases, the test cases "
                f"included. Write the folds without them: {split_command(dataset, record)} "
                f"--overwrite")
    splits = read_splits(splits_file)
    if fold >= len(splits):
        also = f", the test cases of {test_file} included" if test else ""
        # More folds fit where the split's cases give each one a validation case.
        cases = len(set(splits[0]["train"]) | set(splits[0]["val"]))
        more = (f", or write {fold + 1} folds: nnunet-ima split -d {dataset} --test "
                f"{len(test) if record else 'N'} --folds {fold + 1} --overwrite"
                if fold + 1 <= cases else "")
        return (f"fold {fold} is not in {splits_file}, which has {len(splits)} fold"
                f"{'s' * (len(splits) != 1)} (0-{len(splits) - 1}): nnU-Net would train it on "
                f"a random 80:20 split of all cases{also}. Train one of the folds 0-"
                f"{len(splits) - 1}{more}")
    leaked = {"trains": sorted(test & set(splits[fold]["train"])),
              "validates": sorted(test & set(splits[fold]["val"]))}
    if record and record.get(TEST_IN_VAL_KEY) is True:
        leaked["validates"] = []
    if not leaked["trains"] and not leaked["validates"]:
        return None
    what = "; ".join(f"{verb} on {cases}" for verb, cases in leaked.items() if cases)
    fix = (f"Rewrite the split so that no fold holds a test case: "
           f"{split_command(dataset, record)} --overwrite")
    if not leaked["trains"]:
        fix += (f" (or, where validating on the test cases is deliberate because no checkpoint "
                f"is selected on them, add \"{TEST_IN_VAL_KEY}\": true to {test_file})")
    return (f"fold {fold} of {splits_file} {what} (held-out test cases of {test_file}): a model "
            f"trained or selected on them cannot be scored on them. {fix}")
