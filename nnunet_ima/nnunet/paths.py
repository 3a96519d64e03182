"""nnU-Net's folders and dataset names, with errors that say how to fix them."""
from __future__ import annotations

import os
from typing import Union

from nnunet_ima.errors import UserInputError

NNUNET_FOLDERS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


def require_folder(variable: str) -> str:
    """The folder named by the nnU-Net environment variable ``variable``; it must exist."""
    value = os.environ.get(variable, "").strip()
    if not value:
        raise UserInputError(f"the environment variable {variable} is not set. Set it as nnU-Net "
                             f"expects, e.g. export {variable}=/data/{variable}")
    if not os.path.isdir(value):
        raise UserInputError(f"{variable}={value} is not a folder; create it or fix the variable")
    return value


def dataset_name(dataset: Union[int, str]) -> str:
    """``"2"``, ``2`` or ``"Dataset002_Heart"`` -> ``"Dataset002_Heart"``, like nnU-Net's ``-d``."""
    text = str(dataset).strip()
    if text.startswith("Dataset"):
        return text
    try:
        dataset_id = int(text)
    except ValueError:
        raise UserInputError(f"dataset {dataset!r} is neither an id (e.g. 2) nor a name "
                             f"(e.g. Dataset002_Heart)") from None
    prefix = f"Dataset{dataset_id:03d}_"
    for variable in ("nnUNet_preprocessed", "nnUNet_raw", "nnUNet_results"):
        root = os.environ.get(variable, "").strip()
        if root and os.path.isdir(root):
            matches = sorted(d for d in os.listdir(root) if d.startswith(prefix))
            if len(matches) > 1:
                raise UserInputError(f"several datasets with id {dataset_id} in {root}: {matches}; "
                                     f"give the full name")
            if matches:
                return matches[0]
    searched = ", ".join(f"{v}={os.environ.get(v, '(unset)')}" for v in NNUNET_FOLDERS)
    raise UserInputError(f"no dataset with id {dataset_id} (no folder {prefix}* in {searched}). "
                         f"Check the id, or run nnUNetv2_plan_and_preprocess first.")


def preprocessed_dataset_folder(dataset: Union[int, str]) -> str:
    """``$nnUNet_preprocessed/DatasetXXX_Name``, which must exist."""
    root = require_folder("nnUNet_preprocessed")
    folder = os.path.join(root, dataset_name(dataset))
    if not os.path.isdir(folder):
        raise UserInputError(f"{folder} does not exist: run nnUNetv2_plan_and_preprocess -d "
                             f"{dataset} first")
    return folder


def trainer_dir() -> str:
    """The installed folder of ``nnunet_ima.trainers`` (the repository's ``trainers/``): the
    value of ``nnUNet_extTrainer`` that lets nnU-Net find this package's trainers."""
    import nnunet_ima.trainers
    return os.path.dirname(os.path.abspath(nnunet_ima.trainers.__file__))
