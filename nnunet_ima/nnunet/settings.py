"""Settings of the nnU-Net trainers, from class defaults, a JSON file and the saved run.

A user sets any hyperparameter without writing code::

    export NNUNET_IMA_CONFIG=/path/to/ima.json      # {"eps_max": 15, "pgd_steps": 10}
    nnUNetv2_train Dataset002_Heart 2d 0 -tr nnUNetTrainerIMA

Precedence: the trainer class's defaults (a named variant such as ``nnUNetTrainerIMA_eps15``
overrides some of them), then the JSON file. A ``recipe`` key (in either) first sets every
setting of that recipe (:data:`RECIPES`); explicit keys beside it override the recipe. The resolved settings are written to
``ima_config.json`` in the training output folder; ``nnUNetv2_train ... --c`` without the
environment variable reuses that file, and with a different file is an error (a run must not
change its hyperparameters half way).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from typing import Any, Dict, Optional

from nnunet_ima.config import AttackConfig, IMAConfig
from nnunet_ima.declared import (Choice, Count, FlatKeys, OpenUnitInterval, Positive,
                                 declaration, setting, validate_declared)
from nnunet_ima.errors import UserInputError
from nnunet_ima.io import write_json
from nnunet_ima.metrics import ABSENT_CLASS_RULES, SLICE_REDUCTIONS

CONFIG_ENV = "NNUNET_IMA_CONFIG"
CONFIG_FILENAME = "ima_config.json"
ATTACK_OUTPUTS = ("deep_supervision", "full_resolution")
ATTACK_SLICES = ("correct", "all")
ADVERSARIAL_TERMS = ("crossed", "all")
ADVERSARIAL_DICE = ("batch", "per_sample")
LR_SCHEDULES = ("poly", "constant")
START_POINTS = ("ball", "inner_sphere")

# The two readings of IMA for segmentation (METHOD.md sections 3 and 3b). Each sets every key
# in which they differ, so that a recipe named in a file fully replaces the other one.
RECIPES: Dict[str, Dict[str, Any]] = {
    # Algorithm 1 as printed in the paper.
    "printed": {
        "attack_slices": "correct",           # BPGD on the clean-correct slices only
        "adversarial_term": "crossed",        # crossed slices only, weight beta * crossed / B
        "adversarial_dice": "batch",          # nnU-Net's batch Dice in the adversarial term
        "dice_reduce": "mean",                # slice Dice: mean over the classes present
        "dice_absent_class": "one",           # empty vs empty scores 1
        "repeat_draws": "cross_shrinks",      # a slice drawn twice: any crossing shrinks
        "lr_schedule": "poly",                # nnU-Net's poly schedule
        "margin_growth_epochs": None,         # delta = eps_max / num_epochs
        "start_point": "ball",                # random start uniform in the ball
        "boundary": "last_correct",           # BPGD returns the correct end of the bracket
    },
    # The IMA authors' nnU-Net segmentation code, which made the published Heart / Hippocampus /
    # Prostate tables.
    "authors": {
        "attack_slices": "all",
        "adversarial_term": "all",            # every attacked slice, weight beta, batch mean
        "adversarial_dice": "per_sample",
        "dice_reduce": "max",
        "dice_absent_class": "zero",
        "repeat_draws": "miss_expands",
        "lr_schedule": "constant",
        "margin_growth_epochs": 10,           # delta = eps_max / 10
        "start_point": "inner_sphere",        # on the sphere of radius max(E - delta, delta)
        "boundary": "midpoint",
    },
}
# The dataclass default, which nnUNetTrainerClean and nnUNetTrainerAdv use: of the recipe keys,
# only lr_schedule acts there (nnU-Net's poly). nnUNetTrainerIMA sets "authors" in its class
# defaults (chosen by the ablation in the README).
DEFAULT_RECIPE = "printed"
_DEFAULT = RECIPES[DEFAULT_RECIPE]

# The flat keys of ima_config.json that are fields of the attack and IMA parts. The names are
# those of the files written before the parts existed (pgd_steps, margin_growth_epochs).
FLAT_KEYS = FlatKeys(
    parts={"attack": AttackConfig, "ima": IMAConfig},
    keys={"norm": ("attack", "norm"), "pgd_steps": ("attack", "steps"),
          "pgd_alpha": ("attack", "alpha"), "random_start": ("attack", "random_start"),
          "eps_max": ("ima", "eps_max"), "delta": ("ima", "delta"), "beta": ("ima", "beta"),
          "binary_steps": ("ima", "binary_steps"), "margin_update": ("ima", "margin_update"),
          "on_clean_wrong": ("ima", "on_clean_wrong"), "clip_min": ("ima", "clip_min"),
          "boundary": ("ima", "boundary"), "margin_growth_epochs": ("ima", "growth_epochs"),
          "repeat_draws": ("ima", "repeat_draws")})
"""The attack's ``loss`` is no key: the trainers set it (nnU-Net's per-slice Dice + CE)."""


@dataclass(frozen=True)
class TrainerSettings:
    """Every knob of ``nnUNetTrainerClean`` / ``Adv`` / ``IMA``; defaults are the paper's protocol.

    Schedule: ``num_epochs`` x ``num_iterations_per_epoch`` training iterations,
    ``num_val_iterations_per_epoch`` validation iterations, a checkpoint every ``save_every``
    epochs (1: ``--c`` after a crash loses at most one epoch).

    ``attack`` (both trainers): PGD's norm, steps of ``alpha * eps / steps`` and random start
    (:class:`nnunet_ima.config.AttackConfig`); ``attack_outputs`` chooses the objective:
    nnU-Net's Dice + CE on all deep-supervision outputs with nnU-Net's weights, or on the
    full-resolution output only.

    ``ima``: eps_max, delta, beta, binary steps, the margin update, clean-wrong and clip rules,
    the boundary point, the margin growth and the repeat-draw rule
    (:class:`nnunet_ima.config.IMAConfig`); ``dice_threshold`` and ``dice_reduce`` (a slice is
    correct when its Dice, the mean or max over foreground classes, is >= the threshold).

    Adv: ``adv_eps``, the fixed budget of vanilla adversarial training.

    Where the paper's printed Algorithm 1 and the authors' segmentation code differ
    (``recipe`` names one of :data:`RECIPES`): ``attack_slices`` (BPGD on the clean-correct
    slices or on all), ``adversarial_term`` (the crossed slices' boundary points with weight
    ``beta * crossed / B``, or every attacked slice's point with weight ``beta``),
    ``adversarial_dice`` (nnU-Net's batch Dice or a per-sample Dice in the adversarial loss),
    ``dice_absent_class`` (a class absent from prediction and ground truth scores 1 and is left
    out, or scores 0), ``lr_schedule``, ``start_point`` (random start in the ball, or on the
    sphere of radius ``max(E - delta, delta)``), and of the IMA part ``repeat_draws``,
    ``growth_epochs`` and ``boundary``.

    As JSON (:meth:`to_dict`, :func:`settings_from_dict`) the settings are one flat object whose
    keys are the fields of this class and the :data:`FLAT_KEYS` of its parts.
    """

    num_epochs: int = setting(50, help="training epochs", rule=Count(1))
    num_iterations_per_epoch: int = setting(50, help="training iterations per epoch",
                                            rule=Count(1))
    num_val_iterations_per_epoch: int = setting(50, help="validation iterations per epoch",
                                                rule=Count(0))
    save_every: int = setting(1, help="a checkpoint every this many epochs", rule=Count(1))
    initial_lr: float = setting(1e-2, help="nnU-Net's initial learning rate", rule=Positive())
    seed: Optional[int] = setting(None, help="seed of the RNGs (default: unseeded)",
                                  rule=Count(0), optional=True)
    attack: AttackConfig = AttackConfig()
    attack_outputs: str = setting("deep_supervision", help="the outputs the attack's loss reads",
                                  rule=Choice(ATTACK_OUTPUTS))
    ima: IMAConfig = IMAConfig(eps_max=25.0)
    dice_threshold: float = setting(0.6, help="a slice is correct when its Dice is >= this",
                                    rule=OpenUnitInterval())
    dice_reduce: str = setting(_DEFAULT["dice_reduce"], help="slice Dice over the classes",
                               rule=Choice(SLICE_REDUCTIONS))
    adv_eps: float = setting(15.0, help="the fixed budget of nnUNetTrainerAdv", rule=Positive())
    recipe: str = setting(DEFAULT_RECIPE, help="the reading of IMA", rule=Choice(tuple(RECIPES)))
    attack_slices: str = setting(_DEFAULT["attack_slices"], help="the slices BPGD attacks",
                                 rule=Choice(ATTACK_SLICES))
    adversarial_term: str = setting(_DEFAULT["adversarial_term"],
                                    help="the slices of the adversarial term",
                                    rule=Choice(ADVERSARIAL_TERMS))
    adversarial_dice: str = setting(_DEFAULT["adversarial_dice"],
                                    help="the Dice of the adversarial term",
                                    rule=Choice(ADVERSARIAL_DICE))
    dice_absent_class: str = setting(_DEFAULT["dice_absent_class"],
                                     help="the score of a class absent from both",
                                     rule=Choice(ABSENT_CLASS_RULES))
    lr_schedule: str = setting(_DEFAULT["lr_schedule"], help="the learning-rate schedule",
                               rule=Choice(LR_SCHEDULES))
    start_point: str = setting(_DEFAULT["start_point"], help="the random start of BPGD",
                               rule=Choice(START_POINTS))

    def __post_init__(self):
        FLAT_KEYS.check_parts(self)
        validate_declared(self)

    def to_dict(self) -> Dict[str, Any]:
        """The flat JSON object of ``ima_config.json``."""
        return FLAT_KEYS.flatten(self)


def _apply(base: TrainerSettings, values: Dict[str, Any]) -> TrainerSettings:
    """``base`` with flat ``values`` applied; an out-of-range value is an
    :class:`InvalidSetting` named by its flat key."""
    own, parts = FLAT_KEYS.split(values)
    for part, updates in parts.items():
        if updates:
            own[part] = FLAT_KEYS.build_part(part, updates, base=getattr(base, part))
    return replace(base, **own)


def settings_from_dict(values: Dict[str, Any], base: Optional[TrainerSettings] = None,
                       source: str = "settings") -> TrainerSettings:
    """``base`` (default: the paper's protocol) with the flat ``values`` applied.

    A ``recipe`` in ``values`` sets that recipe's settings first; the other keys of ``values``
    override them.

    Raises:
        UserInputError: unknown keys, an unknown recipe or out-of-range values, naming ``source``.
    """
    known = FLAT_KEYS.known(TrainerSettings)
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise UserInputError(f"{source}: unknown trainer option(s) {unknown}. "
                             f"Known options: {sorted(known)}")
    try:
        if "recipe" in values:  # checked before it names the recipe's settings
            declaration(TrainerSettings, "recipe").check("recipe", values["recipe"])
            values = {**RECIPES[values["recipe"]], **values}
        return _apply(base or TrainerSettings(), values)
    except (TypeError, ValueError) as e:
        raise UserInputError(f"{source}: {e}") from None


def read_config_file(path: str) -> Dict[str, Any]:
    """The JSON object in ``path``; a clear error for a missing file or invalid JSON."""
    if not os.path.isfile(path):
        raise UserInputError(f"{CONFIG_ENV} points to {path!r}, which does not exist. "
                             f"Set it to a JSON file such as {{\"eps_max\": 15}} or unset it.")
    try:
        with open(path) as f:
            values = json.load(f)
    except json.JSONDecodeError as e:
        raise UserInputError(f"{path} is not valid JSON ({e}); fix the file named by "
                             f"{CONFIG_ENV}.") from None
    if not isinstance(values, dict):
        raise UserInputError(f"{path} must hold a JSON object of trainer options, "
                             f"got {type(values).__name__}")
    return values


def resolve_settings(class_defaults: Dict[str, Any], output_folder: Optional[str],
                     continuing: bool, environ: Optional[Dict[str, str]] = None) -> TrainerSettings:
    """The settings of one training run.

    Args:
        class_defaults: the trainer class's overrides of the paper's defaults.
        output_folder: the fold's output folder (holds ``ima_config.json`` of an earlier run).
        continuing: ``nnUNetv2_train ... --c``.
        environ: the environment (default ``os.environ``).
    """
    environ = os.environ if environ is None else environ
    base = settings_from_dict(class_defaults, source="trainer class defaults")
    saved_path = os.path.join(output_folder, CONFIG_FILENAME) if output_folder else None
    saved = None
    if continuing and saved_path and os.path.isfile(saved_path):
        values = read_config_file(saved_path)
        # Runs saved before recipes existed followed Algorithm 1 as printed.
        values.setdefault("recipe", "printed")
        saved = settings_from_dict(values, source=saved_path)
    path = environ.get(CONFIG_ENV, "").strip()
    if not path:
        return saved if saved is not None else base
    settings = settings_from_dict(read_config_file(path), base=base, source=path)
    if saved is not None and saved != settings:
        changed = sorted(k for k, v in settings.to_dict().items() if saved.to_dict()[k] != v)
        raise UserInputError(
            f"continuing a run whose saved settings ({saved_path}) differ from {path} in "
            f"{changed}. Unset {CONFIG_ENV} to continue with the saved settings, or start a new "
            f"run without --c.")
    return settings


def write_settings(settings: TrainerSettings, output_folder: str) -> str:
    """Write ``ima_config.json`` atomically; returns its path."""
    path = os.path.join(output_folder, CONFIG_FILENAME)
    write_json(path, settings.to_dict())
    return path
