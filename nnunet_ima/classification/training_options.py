"""The run options of ``nnunet-ima-classify train`` and ``compare``, generated from the
declarations (type, default, choices, help) of :class:`~nnunet_ima.classification.settings.
TrainConfig` and of its attack and IMA parts (:class:`nnunet_ima.config.AttackConfig`,
:class:`nnunet_ima.config.IMAConfig`), one per flat key of ``config.json``
(:data:`nnunet_ima.classification.settings.FLAT_KEYS`): ``trades_beta`` is ``--trades-beta``,
``pgd_steps`` is ``--pgd-steps``, ``growth_epochs`` is ``--growth-epochs``.
"""
from __future__ import annotations

import argparse
from dataclasses import fields
from typing import Any, Callable, Dict

from nnunet_ima.classification.settings import FLAT_KEYS, PAPER_SETTINGS, PaperSetting, TrainConfig
from nnunet_ima.declared import InvalidSetting, add_option, declaration, flag_name

# Who reads an option, as its help says first.
_HELP_PREFIX = {"attack": "training: ", "ima": "ima: "}
_KEY_HELP_PREFIX = {"binary_steps": "ima, mma: "}   # MMA's margin search bisects too
# TrainConfig's fields that are no option of their own: the commands name them (train's
# --dataset and --method, compare's --methods), or they are written as another key (MMA's
# bisection steps are binary_steps, --binary-steps).
_NAMED_BY_THE_COMMAND = ("dataset", "method", "mma_binary_steps")


def _papers(value: Callable[[PaperSetting], Any]) -> str:
    return "the paper's for the dataset: " + ", ".join(
        f"{name} {value(setting):g}" for name, setting in PAPER_SETTINGS.items())


# Options whose default depends on the dataset (config_from_args fills them in).
_PAPER_DEFAULTS = {
    "eps_max": _papers(lambda s: s.eps_max),
    "epochs": _papers(lambda s: s.epochs),
    "batch_size": _papers(lambda s: s.batch_size),
    "model": "the paper's model of the dataset"}


def _add(p: argparse.ArgumentParser, cls: type, name: str, key: str, *names: str,
         help_prefix: str = "") -> None:
    """Field ``name`` of ``cls`` as the option of flat key ``key`` (or ``names``)."""
    overrides: Dict[str, Any] = {}
    if key in _PAPER_DEFAULTS:
        overrides = {"default": None, "help": f"{help_prefix}{declaration(cls, name).help} "
                                              f"(default: {_PAPER_DEFAULTS[key]})"}
    add_option(p, cls, name, *(names or (flag_name(key),)), help_prefix=help_prefix, dest=key,
               **overrides)


def add_config_options(p: argparse.ArgumentParser, batch_option: str = "--batch-size") -> None:
    """An option per flat key of :class:`TrainConfig` but dataset and method, in the order of
    its fields, the attack's and IMA's where the attack part is. ``batch_option``: the name of
    the training batch size (`compare` calls it ``--train-batch-size``)."""
    for f in fields(TrainConfig):
        if f.name == "attack":
            add_attack_and_ima_options(p)
        if f.name in FLAT_KEYS.parts or f.name in _NAMED_BY_THE_COMMAND:
            continue
        _add(p, TrainConfig, f.name, f.name, *((batch_option,) if f.name == "batch_size" else ()))


def add_attack_and_ima_options(p: argparse.ArgumentParser) -> None:
    """``--norm --pgd-steps --pgd-alpha`` and IMA's ``--eps-max --delta --beta ...``."""
    for key, (part, name) in FLAT_KEYS.keys.items():
        _add(p, FLAT_KEYS.parts[part], name, key,
             help_prefix=_KEY_HELP_PREFIX.get(key, _HELP_PREFIX[part]))


def config_values(args: argparse.Namespace) -> Dict[str, Any]:
    """The options of :func:`add_config_options` as flat ``config.json`` keys."""
    own = [f.name for f in fields(TrainConfig)
           if f.name not in FLAT_KEYS.parts and f.name not in _NAMED_BY_THE_COMMAND]
    return {key: getattr(args, key) for key in own + list(FLAT_KEYS.keys)}


def in_option_names(error: InvalidSetting) -> str:
    """``error`` of a config made from the options, in the options' names.

    IMA's errors keep their setting names after the option (``--eps-max: eps_max must be a
    finite number > 0``), as the paper and ``config.json`` call them.
    """
    if error.name in FLAT_KEYS.part_keys("ima"):
        return f"{flag_name(error.name)}: {error}"
    return error.spelled(flag_name)
