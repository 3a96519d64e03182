"""The cases a trained fold saw in training, so that they are never reported as held-out results.

A model of this package's trainers has a training record in its fold folder
(:mod:`nnunet_ima.nnunet.training_record`): the cases it trained on, written when its training
started. That record decides, also after the split was rewritten (the tables then say that the
split changed). For a model without one (a plain nnU-Net trainer), the cases are worked out from
the preprocessed dataset as nnU-Net chose them, and the tables say so.

nnU-Net 2.8.1 chooses a fold's training cases in ``nnUNetTrainer.do_split``:

- fold ``all``: every case of the preprocessed data folder (validation on the same cases);
- fold ``k`` listed in ``splits_final.json``: ``splits[k]["train"]``;
- fold ``k`` beyond the file: a random 80:20 split of all cases, seeded with ``12345 + k``;
- no ``splits_final.json``: nnU-Net first writes its 5-fold split (seed 12345) and uses it.

The fallback reproduces that choice from the split as it is now: a split rewritten after
training (``nnunet-ima split --overwrite``) is not what the model saw, which only a record shows.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Union

import numpy as np

from nnunet_ima.io import file_sha256
from nnunet_ima.nnunet.splits import SPLITS_FILENAME, read_splits
from nnunet_ima.nnunet.training_record import (RECORD_FILENAME, read_training_record,
                                               record_path)

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


@dataclass(frozen=True)
class TrainingCases:
    """The cases a fold trained on, and ``note``: how they were known, for the tables'
    footnote, when not from a training record that matches today's split (``""`` then)."""

    cases: List[str]
    note: str = ""


def _split_cases(preprocessed_dataset: str, data_identifier: str, fold: Fold) -> List[str]:
    """The training cases of ``fold`` as nnU-Net chooses them from today's split."""
    path = os.path.join(preprocessed_dataset, SPLITS_FILENAME)
    splits = read_splits(path) if os.path.isfile(path) else None
    return nnunet_training_cases(splits, preprocessed_identifiers(preprocessed_dataset,
                                                                  data_identifier), fold)


def _record_note(record: dict, fold_folder: str, splits_file: str) -> str:
    """The note for a record whose split file changed (or is gone) since training; ``""``
    when it is unchanged or the fold used none (fold all)."""
    if not record["splits_file"]:
        return ""
    if os.path.isfile(splits_file) and file_sha256(splits_file) == record["splits_sha256"]:
        return ""
    changed = "changed" if os.path.isfile(splits_file) else "was removed"
    return (f"{splits_file} {changed} after this model started training; the cases it trained "
            f"on come from its training record {record_path(fold_folder)}")


def training_cases(preprocessed_dataset: str, data_identifier: str, fold: Fold,
                   fold_folder: Optional[str] = None) -> TrainingCases:
    """The training cases of ``fold`` of a model trained on ``preprocessed_dataset``.

    ``fold_folder`` (``MODEL/fold_K``): its training record decides where it has one. Without
    one, nnU-Net's choice from today's split (:func:`nnunet_training_cases`), with a note.

    Raises:
        UserInputError: an unreadable record or ``splits_final.json``, or no preprocessed data.
    """
    splits_file = os.path.join(preprocessed_dataset, SPLITS_FILENAME)
    record = read_training_record(fold_folder) if fold_folder else None
    if record is None:
        cases = _split_cases(preprocessed_dataset, data_identifier, fold)
        if fold == FOLD_ALL or not fold_folder:
            return TrainingCases(cases)  # fold all trains on every case, whatever the split
        return TrainingCases(cases, f"no training record ({RECORD_FILENAME}) in {fold_folder}, "
                                    f"as for a model of a plain nnU-Net trainer: the cases it "
                                    f"trained on (and its validation cases, for --cases val) "
                                    f"were taken from today's {splits_file}, which cannot show "
                                    f"a split rewritten after training")
    if record["fold"] != fold:
        # A copied or renamed fold folder: count what either says was trained on.
        cases = sorted(set(record["train"]) | set(_split_cases(preprocessed_dataset,
                                                               data_identifier, fold)))
        return TrainingCases(cases, f"the training record {record_path(fold_folder)} is of fold "
                                    f"{record['fold']}, not {fold} (a copied or renamed fold "
                                    f"folder?): the cases of both count as training cases")
    return TrainingCases(sorted(record["train"]), _record_note(record, fold_folder, splits_file))


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


def refusal_message(overlap: Dict[str, List[str]], folds: Dict[str, Fold],
                    notes: Optional[Dict[str, str]] = None) -> str:
    """The error for scoring training cases: which model trained on which cases (and, from
    ``notes``, how that is known where the split changed or there is no record), and the way
    out."""
    lines = []
    for model, cases in overlap.items():
        lines.append(f"  {model} (fold {folds[model]}): {', '.join(cases)}")
        if (notes or {}).get(model):
            lines.append(f"    ({notes[model]})")
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


def footnote(train_cases_scored: Dict[str, List[str]], config: Optional[dict] = None) -> str:
    """The tables' notes: how the training cases of each model were known where not from a
    matching training record (``config``'s ``training_cases_note``), and the training cases
    scored under ``--allow-train-cases``; ``""`` when there is nothing to say."""
    notes = [f"Note: {name}: {entry['training_cases_note']}."
             for name, entry in ((config or {}).get("models") or {}).items()
             if isinstance(entry, dict) and entry.get("training_cases_note")]
    if train_cases_scored:
        parts = [f"{model} on {', '.join(cases)}" for model, cases in train_cases_scored.items()]
        notes.append("Note: training cases were scored (--allow-train-cases): " + "; ".join(parts)
                     + ". These numbers are not held-out results.")
    return "\n\n".join(notes)
