"""The training attack's and IMA's options of ``nnunet-ima-classify train`` and ``compare``,
generated from the declarations of :class:`nnunet_ima.config.AttackConfig` and
:class:`nnunet_ima.config.IMAConfig` (type, default, choices, help), one per flat key of
``config.json`` (:data:`nnunet_ima.classification.settings.FLAT_KEYS`): ``pgd_steps`` is
``--pgd-steps``, ``growth_epochs`` is ``--growth-epochs``.
"""
from __future__ import annotations

import argparse
from typing import Any, Dict

from nnunet_ima.classification.settings import FLAT_KEYS, PAPER_SETTINGS
from nnunet_ima.declared import InvalidSetting, flag_name, option_arguments

# Who reads an option, as its help says first.
_HELP_PREFIX = {"attack": "training: ", "ima": "ima: "}
_KEY_HELP_PREFIX = {"binary_steps": "ima, mma: "}   # MMA's margin search bisects too
# Options whose default depends on the dataset (config_from_args fills them in).
_PAPER_DEFAULTS = {
    "eps_max": "the paper's for the dataset: " + ", ".join(
        f"{name} {setting.eps_max:g}" for name, setting in PAPER_SETTINGS.items())}


def add_attack_and_ima_options(p: argparse.ArgumentParser) -> None:
    """``--norm --pgd-steps --pgd-alpha`` and IMA's ``--eps-max --delta --beta ...``."""
    for key, (part, name) in FLAT_KEYS.keys.items():
        kwargs = option_arguments(FLAT_KEYS.parts[part], name,
                                  help_prefix=_KEY_HELP_PREFIX.get(key, _HELP_PREFIX[part]))
        if key in _PAPER_DEFAULTS:
            kwargs.update(default=None, help=f"{kwargs['help']} (default: {_PAPER_DEFAULTS[key]})")
        p.add_argument(flag_name(key), dest=key, **kwargs)


def attack_and_ima_values(args: argparse.Namespace) -> Dict[str, Any]:
    """The options of :func:`add_attack_and_ima_options` as flat ``config.json`` keys."""
    return {key: getattr(args, key) for key in FLAT_KEYS.keys}


def in_option_names(error: InvalidSetting) -> str:
    """``error`` of a config made from the options, in the options' names.

    IMA's errors keep their setting names after the option (``--eps-max: eps_max must be a
    finite number > 0``), as the paper and ``config.json`` call them.
    """
    if error.name in FLAT_KEYS.part_keys("ima"):
        return f"{flag_name(error.name)}: {error}"
    return error.spelled(flag_name)
