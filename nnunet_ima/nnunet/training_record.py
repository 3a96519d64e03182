"""The training record of a fold folder: the cases its model trained and validated on.

nnU-Net picks a fold's cases from ``splits_final.json`` when a training starts and keeps no copy
of them: once the split is rewritten (``nnunet-ima split --overwrite``, an edit by hand), the
file no longer says what the model trained on. The trainers of this package therefore write
``training_cases.json`` into the fold folder (beside ``checkpoint_final.pth``) when a training
starts; ``nnunet-ima-eval`` decides from it which cases are held out, and ``nnunet-ima split``
names the models a new split would concern::

    {"fold": 0, "train": [...], "val": [...],
     "splits_file": "/.../nnUNet_preprocessed/Dataset002_Heart/splits_final.json",
     "splits_sha256": "<sha256 of that file's bytes>", "written_by": "nnUNetTrainerIMA"}

Fold ``all`` uses no split file: its ``splits_file`` and ``splits_sha256`` are ``null``.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence, Union

from nnunet_ima.errors import UserInputError
from nnunet_ima.io import file_sha256, read_json, write_json

RECORD_FILENAME = "training_cases.json"
REQUIRED_KEYS = ("fold", "train", "val", "splits_file", "splits_sha256")

Fold = Union[int, str]


def record_path(fold_folder: str) -> str:
    """``FOLD_FOLDER/training_cases.json``."""
    return os.path.join(fold_folder, RECORD_FILENAME)


def write_training_record(fold_folder: str, fold: Fold, train: Sequence[str],
                          val: Sequence[str], splits_file: Optional[str],
                          written_by: Optional[str] = None) -> str:
    """Write the record of a training that starts now (atomically); returns its path.

    ``splits_file``: the ``splits_final.json`` the cases came from (``None`` for fold ``all``),
    hashed now. ``written_by``: the trainer class; by default the trainer part of the model
    folder's name (``Trainer__Plans__configuration``).
    """
    if written_by is None:
        written_by = os.path.basename(os.path.dirname(os.path.abspath(fold_folder))).split("__")[0]
    record = {"fold": fold if fold == "all" else int(fold),
              # nnU-Net's split holds numpy strings; plain str serialise and compare everywhere.
              "train": [str(c) for c in train], "val": [str(c) for c in val],
              "splits_file": os.path.abspath(splits_file) if splits_file else None,
              "splits_sha256": file_sha256(splits_file) if splits_file else None,
              "written_by": written_by}
    path = record_path(fold_folder)
    write_json(path, record, sort_keys=False)
    return path


def _is_case_list(value) -> bool:
    return isinstance(value, list) and all(isinstance(c, str) for c in value)


def read_training_record(fold_folder: str) -> Optional[dict]:
    """The record of ``fold_folder``; ``None`` when it has none (a model trained by a plain
    nnU-Net trainer, or before records existed).

    Raises:
        UserInputError: a record that cannot be read, is not JSON or lacks an entry.
    """
    path = record_path(fold_folder)
    if not os.path.exists(path):
        return None
    remedy = ("this package's trainers write it when a training starts; restore it, or delete "
              "it to fall back to splits_final.json (which says what the model trained on only "
              "while the split is unchanged)")
    record = read_json(path, remedy)
    problems = []
    if not isinstance(record, dict):
        problems.append(f"it holds a {type(record).__name__}, not an object")
    else:
        missing = [k for k in REQUIRED_KEYS if k not in record]
        if missing:
            problems.append(f"it lacks {missing}")
        problems += [f"{k!r} is not a list of case identifiers" for k in ("train", "val")
                     if k in record and not _is_case_list(record[k])]
        fold = record.get("fold", 0)
        if not (fold == "all" or (isinstance(fold, int) and not isinstance(fold, bool)
                                  and fold >= 0)):
            problems.append(f"'fold' is {fold!r}, not a number >= 0 or 'all'")
    if problems:
        raise UserInputError(f"{path} is not a training record: {'; '.join(problems)}; {remedy}")
    return record
