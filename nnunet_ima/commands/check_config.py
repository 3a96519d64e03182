"""``nnunet-ima check-config FILE [-tr TRAINER]``: validate a ``NNUNET_IMA_CONFIG`` settings file
before a training is launched, and print the settings the training would use (JSON).

A bad file is the same one-paragraph error that ``nnUNetv2_train`` would stop with (the same
rules: a key the trainer does not read, another value of a setting the trainer's name fixes, a
key given twice, ...), but without starting nnU-Net.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
from typing import List

from nnunet_ima.errors import UserInputError
from nnunet_ima.nnunet.settings import CONFIG_ENV, read_config_file, settings_for_trainer


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", nargs="?", metavar="FILE",
                        help=f"the JSON settings file (default: the file named by ${CONFIG_ENV})")
    parser.add_argument("-tr", "--trainer", default="nnUNetTrainerIMA",
                        help="apply this trainer's own defaults and rules, as nnUNetv2_train "
                             "-tr TRAINER would (e.g. nnUNetTrainerIMA_eps15: the keys IMA "
                             "reads, eps_max 15 or unset)")


def _trainer_names() -> List[str]:
    """The trainers of this package (``trainers/`` and ``trainers/variants/``), by file name."""
    from nnunet_ima.nnunet.paths import trainer_dir
    root = trainer_dir()
    names = []
    for folder in (root, os.path.join(root, "variants")):
        names += [f[:-3] for f in os.listdir(folder) if f.endswith(".py") and not f.startswith("_")]
    return sorted(names)


def trainer_class(name: str) -> type:
    """The nnunet-ima trainer class ``name`` (each lives in a module of its own name, as
    nnU-Net's trainer lookup expects)."""
    names = _trainer_names()
    if name not in names:
        raise UserInputError(f"-tr {name}: not a trainer of nnunet-ima, so it does not read "
                             f"{CONFIG_ENV}; choose one of {', '.join(names)}")
    for package in ("nnunet_ima.trainers", "nnunet_ima.trainers.variants"):
        try:
            module = importlib.import_module(f"{package}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{package}.{name}":
                raise
            continue
        return getattr(module, name)
    raise UserInputError(f"-tr {name}: its module could not be imported")  # listed, not found


def run(args: argparse.Namespace) -> int:
    path = args.file
    fix = f"Give check-config a JSON settings file, e.g. one holding {{\"eps_max\": 15}}."
    if not path:
        path = os.environ.get(CONFIG_ENV, "").strip()
        fix = (f"Set {CONFIG_ENV} to a JSON settings file such as {{\"eps_max\": 15}}, or give "
               f"FILE.")
    if not path:
        raise UserInputError(f"no settings file: give FILE, or set {CONFIG_ENV}")
    values = read_config_file(path, fix=fix)
    trainer = trainer_class(args.trainer)
    # What nnUNetv2_train -tr TRAINER does with the file in a new run (resolve_settings).
    settings = settings_for_trainer(trainer.class_defaults(), values, trainer, source=path)
    if settings.finetune_from:
        # What the trainer would refuse at its start: a missing or foreign checkpoint.
        from nnunet_ima.nnunet.finetune import read_checkpoint
        read_checkpoint(settings.finetune_from)
    print(json.dumps(settings.to_dict(), indent=2, sort_keys=True))
    return 0
