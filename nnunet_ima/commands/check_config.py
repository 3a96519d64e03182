"""``nnunet-ima check-config FILE [-tr TRAINER]``: validate a ``NNUNET_IMA_CONFIG`` settings file
before a training is launched, and print the settings the training would use (JSON).

A bad file is the same one-paragraph error that ``nnUNetv2_train`` would stop with, but
without starting nnU-Net (and without its traceback and empty log file).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
from typing import Any, Dict, List

from nnunet_ima.errors import UserInputError
from nnunet_ima.nnunet.settings import CONFIG_ENV, read_config_file, settings_from_dict


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", nargs="?", metavar="FILE",
                        help=f"the JSON settings file (default: the file named by ${CONFIG_ENV})")
    parser.add_argument("-tr", "--trainer", default="nnUNetTrainerIMA",
                        help="apply this trainer's own defaults first, as nnUNetv2_train -tr "
                             "TRAINER would (e.g. nnUNetTrainerIMA_eps15)")


def _trainer_names() -> List[str]:
    """The trainers of this package (``trainers/`` and ``trainers/variants/``), by file name."""
    from nnunet_ima.nnunet.paths import trainer_dir
    root = trainer_dir()
    names = []
    for folder in (root, os.path.join(root, "variants")):
        names += [f[:-3] for f in os.listdir(folder) if f.endswith(".py") and not f.startswith("_")]
    return sorted(names)


def trainer_defaults(name: str) -> Dict[str, Any]:
    """The class defaults of the nnunet-ima trainer ``name`` (each lives in a module of its own
    name, as nnU-Net's trainer lookup expects)."""
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
        return getattr(module, name).class_defaults()
    raise UserInputError(f"-tr {name}: its module could not be imported")  # listed, not found


def _read(path: str) -> Dict[str, Any]:
    if not os.path.exists(path):
        raise UserInputError(f"{path} does not exist; give the JSON settings file, e.g. one "
                             f"holding {{\"eps_max\": 15}}")
    if os.path.isdir(path):
        raise UserInputError(f"{path} is a folder; give the JSON settings file")
    try:
        return read_config_file(path)
    except (OSError, UnicodeDecodeError) as e:  # unreadable, or not text at all
        raise UserInputError(f"cannot read {path} ({e})") from None


def run(args: argparse.Namespace) -> int:
    path = args.file or os.environ.get(CONFIG_ENV, "").strip()
    if not path:
        raise UserInputError(f"no settings file: give FILE, or set {CONFIG_ENV}")
    values = _read(path)
    base = None
    if args.trainer:
        base = settings_from_dict(trainer_defaults(args.trainer),
                                  source=f"{args.trainer}'s class defaults")
    settings = settings_from_dict(values, base=base, source=path)
    print(json.dumps(settings.to_dict(), indent=2, sort_keys=True))
    return 0
