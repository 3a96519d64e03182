"""``nnunet-ima split``: a train / validation / held-out test split of a preprocessed dataset.

Writes nnU-Net's ``splits_final.json`` (fold 0 = the train / validation split, so that
``nnUNetv2_train DATASET 2d 0`` uses it) and ``test_cases.json`` (the held-out cases that
``nnunet-ima-eval`` attacks) into ``$nnUNet_preprocessed/DatasetXXX_Name/``. The paper's Heart
protocol (16 train / 1 validation / 3 test) is ``nnunet-ima split -d 2 --test 3 --val 1``.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Dict, List

import numpy as np

from nnunet_ima.errors import UserInputError
from nnunet_ima.nnunet_paths import preprocessed_dataset_folder

SPLITS_FILENAME = "splits_final.json"
TEST_CASES_FILENAME = "test_cases.json"


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


def make_split(cases: List[str], num_test: int, num_val: int, seed: int) -> Dict[str, List[str]]:
    """A seeded random split of ``cases`` into ``train``, ``val`` and ``test`` (each sorted)."""
    if num_test < 0 or num_val < 1:
        raise UserInputError(f"--test must be >= 0 and --val >= 1, got {num_test} and {num_val}")
    if num_test + num_val >= len(cases):
        raise UserInputError(f"{num_test} test + {num_val} validation cases leave no training case "
                             f"out of {len(cases)}")
    order = np.random.default_rng(seed).permutation(len(cases))
    shuffled = [cases[i] for i in order]
    return {"test": sorted(shuffled[:num_test]),
            "val": sorted(shuffled[num_test:num_test + num_val]),
            "train": sorted(shuffled[num_test + num_val:])}


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def write_split(dataset: str, num_test: int, num_val: int, seed: int,
                overwrite: bool = False) -> Dict[str, List[str]]:
    """Compute the split and write ``splits_final.json`` and ``test_cases.json``."""
    folder = preprocessed_dataset_folder(dataset)
    split = make_split(case_identifiers(folder), num_test, num_val, seed)
    save_split(folder, split, seed, overwrite)
    return split


def save_split(folder: str, split: Dict[str, List[str]], seed, overwrite: bool = False) -> None:
    """Write ``split`` (``train`` / ``val`` / ``test`` case lists) into the preprocessed
    ``folder``: fold 0 of ``splits_final.json`` and ``test_cases.json``. An existing, different
    split is refused unless ``overwrite``; ``seed`` is recorded with the test cases."""
    splits = [{"train": split["train"], "val": split["val"]}]
    test = {"test": split["test"], "seed": seed, "num_val": len(split["val"])}
    splits_path = os.path.join(folder, SPLITS_FILENAME)
    test_path = os.path.join(folder, TEST_CASES_FILENAME)
    for path, new in ((splits_path, splits), (test_path, test)):
        if os.path.isfile(path) and not overwrite:
            with open(path) as f:
                if json.load(f) != new:
                    raise UserInputError(f"{path} exists with a different split; models trained "
                                         f"on it would be evaluated on the wrong cases. Pass "
                                         f"--overwrite to replace it.")
    _write_json(test_path, test)
    _write_json(splits_path, splits)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-d", "--dataset", required=True, help="dataset id or name")
    parser.add_argument("--test", type=int, required=True, help="number of held-out test cases")
    parser.add_argument("--val", type=int, default=1, help="number of validation cases (default 1)")
    parser.add_argument("--seed", type=int, default=12345, help="random seed (default 12345)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing, different split")


def run(args: argparse.Namespace) -> int:
    split = write_split(args.dataset, args.test, args.val, args.seed, args.overwrite)
    print(f"train {len(split['train'])}: {' '.join(split['train'])}")
    print(f"val   {len(split['val'])}: {' '.join(split['val'])}")
    print(f"test  {len(split['test'])}: {' '.join(split['test'])}")
    return 0
