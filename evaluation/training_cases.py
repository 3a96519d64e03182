"""The cases a trained fold saw in training, so that they are never reported as held-out results.

nnU-Net 2.8.1 chooses a fold's training cases in ``nnUNetTrainer.do_split``:

- fold ``all``: every case of the preprocessed data folder (validation on the same cases);
- fold ``k`` listed in ``splits_final.json``: ``splits[k]["train"]``;
- fold ``k`` beyond the file: a random 80:20 split of all cases, seeded with ``12345 + k``;
- no ``splits_final.json``: nnU-Net first writes its 5-fold split (seed 12345) and uses it.

This module reproduces that choice from the preprocessed dataset. It reads the split as it is
now: a split rewritten after training (``nnunet-ima split --overwrite``) is not what the model
saw.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Sequence, Union

import numpy as np

from nnunet_ima.evaluation.samples import data_folder

Fold = Union[int, str]
NNUNET_SPLIT_SEED = 12345  # nnUNetTrainer.do_split's seed
NNUNET_FOLDS = 5
FOLD_ALL = "all"


def parse_fold(text: str) -> Fold:
    """``"0"`` -> ``0``, ``"all"`` -> ``"all"`` (nnU-Net's ``-f`` values)."""
    if text == FOLD_ALL:
        return FOLD_ALL
    try:
        fold = int(text)
    except ValueError:
        raise ValueError(f"a fold is a number >= 0 or 'all', got {text!r}") from None
    if fold < 0:
        raise ValueError(f"a fold is a number >= 0 or 'all', got {text!r}")
    return fold


def nnunet_training_cases(splits: Union[List[Dict[str, List[str]]], None],
                          identifiers: Sequence[str], fold: Fold) -> List[str]:
    """The training cases of ``fold`` as ``nnUNetTrainer.do_split`` (nnunetv2 2.8.1) picks them.

    ``splits``: the content of ``splits_final.json`` (``None``: no such file); ``identifiers``:
    every case of the preprocessed data folder. Sorted.
    """
    if fold == FOLD_ALL:
        return sorted(identifiers)
    keys = sorted(identifiers)
    if splits is None:
        from nnunetv2.utilities.crossval_split import generate_crossval_split
        splits = generate_crossval_split(keys, seed=NNUNET_SPLIT_SEED, n_splits=NNUNET_FOLDS)
    if fold < len(splits):
        return sorted(str(c) for c in splits[fold]["train"])
    rnd = np.random.RandomState(seed=NNUNET_SPLIT_SEED + fold)
    chosen = rnd.choice(len(keys), int(len(keys) * 0.8), replace=False)
    return sorted(keys[i] for i in chosen)


def preprocessed_identifiers(preprocessed_dataset: str, data_identifier: str) -> List[str]:
    """The cases of ``$nnUNet_preprocessed/Dataset/<data_identifier>``: what nnU-Net trains on."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    folder = data_folder(preprocessed_dataset, data_identifier,
                         "cannot tell which cases the model trained on (run "
                         "nnUNetv2_plan_and_preprocess for this configuration)")
    return list(infer_dataset_class(folder).get_identifiers(folder))


def training_cases(preprocessed_dataset: str, data_identifier: str, fold: Fold) -> List[str]:
    """The training cases of ``fold`` of a model trained on ``preprocessed_dataset``."""
    path = os.path.join(preprocessed_dataset, "splits_final.json")
    splits = None
    if os.path.isfile(path):
        with open(path) as f:
            splits = json.load(f)
    return nnunet_training_cases(splits, preprocessed_identifiers(preprocessed_dataset,
                                                                  data_identifier), fold)


def trained_on(scored: Dict[str, Sequence[str]], train: Dict[str, Sequence[str]]
               ) -> Dict[str, List[str]]:
    """Per model, the cases it is to be scored on that it trained on (models without any are
    left out), in scoring order."""
    overlap = {}
    for model, cases in scored.items():
        seen = set(train[model])
        hit = [c for c in cases if c in seen]
        if hit:
            overlap[model] = hit
    return overlap


def refusal_message(overlap: Dict[str, List[str]], folds: Dict[str, Fold]) -> str:
    """The error for scoring training cases: which model trained on which cases, and the way out."""
    lines = [f"  {model} (fold {folds[model]}): {', '.join(cases)}"
             for model, cases in overlap.items()]
    fold_all = any(folds[m] == FOLD_ALL for m in overlap)
    hint = (" nnU-Net's fold 'all' trains on every preprocessed case, the test cases of "
            "`nnunet-ima split` included, so it has no held-out preprocessed case; score it on raw "
            "images that are not in the preprocessed dataset (--images/--labels)."
            if fold_all else "")
    return ("these models trained on cases they would be scored on, which would report training "
            "accuracy as robustness on held-out data:\n" + "\n".join(lines) + "\n" + hint.lstrip()
            + ("\n" if hint else "")
            + "Score held-out cases (--cases test after `nnunet-ima split`, which keeps the test "
              "cases out of every fold), or pass --allow-train-cases to score them anyway (the "
              "tables then say so).")


def footnote(train_cases_scored: Dict[str, List[str]]) -> str:
    """The tables' note when ``--allow-train-cases`` scored training cases; ``""`` when none."""
    if not train_cases_scored:
        return ""
    parts = [f"{model} on {', '.join(cases)}" for model, cases in train_cases_scored.items()]
    return ("Note: training cases were scored (--allow-train-cases): " + "; ".join(parts)
            + ". These numbers are not held-out results.")
