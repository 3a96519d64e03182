"""Settings of the nnU-Net trainers, from class defaults, a JSON file and the saved run.

A user sets any hyperparameter without writing code::

    export NNUNET_IMA_CONFIG=/path/to/ima.json      # {"eps_max": 15, "pgd_steps": 10}
    nnUNetv2_train Dataset002_Heart 2d 0 -tr nnUNetTrainerIMA

Precedence: the trainer class's defaults (a named variant such as ``nnUNetTrainerIMA_eps15``
fixes some of them), then the JSON file. A ``recipe`` key (in either) first sets every setting
of that recipe (:data:`RECIPES`); explicit keys beside it override the recipe. The resolved
settings are written to ``ima_config.json`` in the training output folder; ``nnUNetv2_train
... --c`` without the environment variable reuses that file, and with a different file is an
error (a run must not change its hyperparameters half way).

A key means one thing for the trainer that is given it (:func:`settings_from_dict` with
``trainer``): a key that trainer does not read (:data:`READ_BY`) is refused, naming the
trainers that read it; a named variant refuses another value of the settings its name fixes
(``nnUNetTrainerAdv_eps15``: ``adv_eps`` 15); and a key given twice in a file is refused
(:func:`read_config_file`).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Optional, Tuple

from nnunet_ima.adversarial_step import ADVERSARIAL_TERMS, ATTACK_SLICES, START_POINTS
from nnunet_ima.config import AttackConfig, IMAConfig
from nnunet_ima.declared import (Choice, Count, FlatKeys, InvalidSetting, OpenUnitInterval,
                                 Positive, declaration, setting, validate_declared)
from nnunet_ima.errors import UserInputError
from nnunet_ima.io import write_json
from nnunet_ima.metrics import ABSENT_CLASS_RULES, SLICE_REDUCTIONS

CONFIG_ENV = "NNUNET_IMA_CONFIG"
CONFIG_FILENAME = "ima_config.json"
ATTACK_OUTPUTS = ("deep_supervision", "full_resolution")
ADVERSARIAL_DICE = ("batch", "per_sample")
LR_SCHEDULES = ("poly", "constant")

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
# defaults (chosen by the ablation in docs/benchmarks.md).
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

# Keys that ima_config.json gained after version 0.1.0 first wrote it. A file without them is
# read with their defaults, which is what the runs that wrote it did (no fine-tuning, no
# warmup); it is still a complete record of its run (:func:`_check_for_trainer`).
KEYS_SINCE_0_1 = ("finetune_from", "lr_warmup_epochs")


@dataclass(frozen=True)
class AbsolutePath:
    """An absolute path (a string): ``ima_config.json`` records it, and a relative one would
    name another file from another working directory."""

    value_type: type = str

    def check(self, name: str, value: Any) -> None:
        if not isinstance(value, str) or not os.path.isabs(value):
            raise InvalidSetting(name, f"must be an absolute path (such as /data/nnUNet_results/"
                                       f"Dataset002_Heart/nnUNetTrainerClean__nnUNetPlans__2d/"
                                       f"fold_0/checkpoint_final.pth), got {value!r}")


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

    Fine-tuning (every trainer): ``finetune_from`` names an nnU-Net checkpoint whose every weight,
    segmentation heads included, the new run starts from (:mod:`nnunet_ima.nnunet.finetune`;
    the optimiser starts fresh), and ``lr_warmup_epochs`` ramps the learning rate up linearly
    before ``lr_schedule`` takes over (:mod:`nnunet_ima.nnunet.lr_schedule`).

    As JSON (:meth:`to_dict`, :func:`settings_from_dict`) the settings are one flat object whose
    keys are the fields of this class and the :data:`FLAT_KEYS` of its parts.
    """

    num_epochs: int = setting(50, help="training epochs", rule=Count(1))
    num_iterations_per_epoch: int = setting(50, help="training iterations per epoch",
                                            rule=Count(1))
    # At least 1: nnU-Net's on_validation_epoch_end collates the first output of the epoch
    # (IndexError after the first epoch's training with 0).
    num_val_iterations_per_epoch: int = setting(50, help="validation iterations per epoch",
                                                rule=Count(1))
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
    finetune_from: Optional[str] = setting(
        None, help="an nnU-Net checkpoint to start from, every weight (default: nnU-Net's "
                   "random initialisation)", rule=AbsolutePath(), optional=True)
    lr_warmup_epochs: int = setting(0, help="epochs of linear learning-rate warmup before "
                                            "lr_schedule", rule=Count(0))

    def __post_init__(self):
        FLAT_KEYS.check_parts(self)
        validate_declared(self)

    def to_dict(self) -> Dict[str, Any]:
        """The flat JSON object of ``ima_config.json``."""
        return FLAT_KEYS.flatten(self)


# ------------------------------------------------------------------ who reads which key
# The trainer families. Every trainer of this package is one of these classes or a named variant
# (a subclass, e.g. nnUNetTrainerAdv_eps15); a trainer belongs to the family of its nearest base
# named here. They are compared by name: nnU-Net imports the trainers a second time, as
# top-level modules, from nnUNet_extTrainer.
CLEAN, ADV, IMA = "nnUNetTrainerClean", "nnUNetTrainerAdv", "nnUNetTrainerIMA"
FAMILIES = (CLEAN, ADV, IMA)
_EVERY = FAMILIES
_ATTACKING = (ADV, IMA)

# Which families read each flat key: the one declaration the rule "a key the trainer does not read
# is refused" and its message come from (tests/test_settings_strict.py records what each
# trainer's code reads and compares). IMA does not read adv_eps: its budgets are the margins.
READ_BY: Dict[str, Tuple[str, ...]] = {
    # nnUNetTrainerClean: the schedule, the seed and the learning rate.
    "num_epochs": _EVERY, "num_iterations_per_epoch": _EVERY,
    "num_val_iterations_per_epoch": _EVERY, "save_every": _EVERY, "initial_lr": _EVERY,
    "seed": _EVERY, "lr_schedule": _EVERY, "lr_warmup_epochs": _EVERY,
    # nnUNetTrainerClean.initialize: the weights to start from.
    "finetune_from": _EVERY,
    # nnUNetTrainerAdv: the attack, and the slice Dice of its statistics (IMA: of the margins).
    "norm": _ATTACKING, "pgd_steps": _ATTACKING, "pgd_alpha": _ATTACKING,
    "random_start": _ATTACKING, "attack_outputs": _ATTACKING, "dice_threshold": _ATTACKING,
    "dice_reduce": _ATTACKING, "dice_absent_class": _ATTACKING,
    "adversarial_dice": _ATTACKING,
    "adv_eps": (ADV,),
    # nnUNetTrainerIMA: the margins and BPGD, and the recipe's choices that only IMA has.
    "eps_max": (IMA,), "delta": (IMA,), "beta": (IMA,), "binary_steps": (IMA,),
    "margin_update": (IMA,), "on_clean_wrong": (IMA,), "clip_min": (IMA,), "boundary": (IMA,),
    "margin_growth_epochs": (IMA,), "repeat_draws": (IMA,), "attack_slices": (IMA,),
    "adversarial_term": (IMA,), "start_point": (IMA,),
}
# A recipe is read by the families that read every key it sets (IMA: it is a reading of IMA);
# Clean and Adv take the keys of it that they read (lr_schedule, ...) one by one.
READ_BY["recipe"] = tuple(f for f in FAMILIES
                          if all(f in READ_BY[k] for k in RECIPES[DEFAULT_RECIPE]))
if set(READ_BY) != set(FLAT_KEYS.known(TrainerSettings)):  # a new key must say who reads it
    raise RuntimeError(f"READ_BY and TrainerSettings' keys differ: "
                       f"{sorted(set(READ_BY) ^ set(FLAT_KEYS.known(TrainerSettings)))}")


def trainer_family(trainer: type) -> str:
    """The family (:data:`FAMILIES`) of the trainer class ``trainer``."""
    for klass in trainer.__mro__:
        if klass.__name__ in FAMILIES:
            return klass.__name__
    raise TypeError(f"{trainer.__name__} is not a trainer of nnunet-ima (none of {FAMILIES})")


def fixed_by_name(trainer: type) -> Dict[str, Any]:
    """The settings that the name of a named variant fixes: the ``ima_defaults`` of the classes
    between it and its family (``nnUNetTrainerAdv_eps15``: ``{"adv_eps": 15.0}``). A family's
    own ``ima_defaults`` (``nnUNetTrainerIMA``'s recipe) are defaults, which a file may change."""
    family = trainer_family(trainer)
    fixed: Dict[str, Any] = {}
    for klass in trainer.__mro__:
        if klass.__name__ == family:
            break
        for key, value in vars(klass).get("ima_defaults", {}).items():
            fixed.setdefault(key, value)  # the most derived class first
    return fixed


def _check_for_trainer(values: Dict[str, Any], trainer: type, base: TrainerSettings,
                       source: str) -> None:
    """Refuse the keys of ``values`` that ``trainer`` does not read.

    A complete settings file (every key, as ``ima_config.json`` is written; the keys of
    :data:`KEYS_SINCE_0_1` may be missing, as in a record written before them) is the record of
    a run and may be reused whole: its keys that ``trainer`` does not read are refused only where
    they differ from ``base`` (an IMA run's ``eps_max`` given to Adv; not the default
    ``adv_eps`` that every record holds)."""
    family = trainer_family(trainer)
    unread = [k for k in values if family not in READ_BY[k]]
    if set(READ_BY) - set(KEYS_SINCE_0_1) <= set(values):
        held = base.to_dict()
        unread = [k for k in unread if values[k] != held[k]]
    if not unread:
        return
    name = trainer.__name__ if trainer.__name__ == family else \
        f"{trainer.__name__} (of the {family} family)"
    keys = ", ".join(f"{k} (read by {' and '.join(READ_BY[k])})" for k in unread)
    it, them = ("it", "its value") if len(unread) == 1 else ("them", "their values")
    raise UserInputError(
        f"{source}: {name} does not read {keys}, so {them} would be ignored. Remove {it} from "
        f"the file, or use a trainer that reads {it} (a named variant reads what its family "
        f"reads).")


def _check_fixed(given: Dict[str, Any], values: Dict[str, Any], trainer: type,
                 source: str) -> None:
    """Refuse ``values`` (``given`` with its recipe's settings) that set another value of a
    setting the name of ``trainer`` fixes."""
    for key, fixed in fixed_by_name(trainer).items():
        if key not in values or values[key] == fixed:
            continue
        how = f"sets {key} = {values[key]!r}" if key in given else \
            f"sets recipe {given['recipe']!r}, which sets {key} = {values[key]!r}"
        raise UserInputError(
            f"{source} {how}, but {trainer.__name__} fixes {key} = {fixed!r} by its name (its "
            f"results folder says so). Remove {key} from the file to train at {fixed!r}, or "
            f"train {trainer_family(trainer)}, which takes {key} from the file.")


def _apply(base: TrainerSettings, values: Dict[str, Any]) -> TrainerSettings:
    """``base`` with flat ``values`` applied; an out-of-range value is an
    :class:`InvalidSetting` named by its flat key."""
    own, parts = FLAT_KEYS.split(values)
    for part, updates in parts.items():
        if updates:
            own[part] = FLAT_KEYS.build_part(part, updates, base=getattr(base, part))
    return replace(base, **own)


def settings_from_dict(values: Dict[str, Any], base: Optional[TrainerSettings] = None,
                       source: str = "settings", trainer: Optional[type] = None
                       ) -> TrainerSettings:
    """``base`` (default: the paper's protocol) with the flat ``values`` applied.

    A ``recipe`` in ``values`` sets that recipe's settings first; the other keys of ``values``
    override them. Given the ``trainer`` class that will read the settings, ``values`` may hold
    only keys it reads (:data:`READ_BY`), and no other value of a setting its name fixes
    (:func:`fixed_by_name`).

    Raises:
        UserInputError: unknown keys, an unknown recipe or out-of-range values, a key ``trainer``
            does not read or a value its name rules out, naming ``source``.
    """
    known = FLAT_KEYS.known(TrainerSettings)
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise UserInputError(f"{source}: unknown trainer option(s) {unknown}. "
                             f"Known options: {sorted(known)}")
    base = base or TrainerSettings()
    if trainer is not None:
        _check_for_trainer(values, trainer, base, source)
    given = values
    try:
        if "recipe" in values:  # checked before it names the recipe's settings
            declaration(TrainerSettings, "recipe").check("recipe", values["recipe"])
            values = {**RECIPES[values["recipe"]], **values}
        settings = _apply(base, values)
    except (TypeError, ValueError) as e:
        raise UserInputError(f"{source}: {e}") from None
    if trainer is not None:  # after the values' own checks: those messages come first
        _check_fixed(given, values, trainer, source)
    return settings


_ENV_FIX = (f"Set {CONFIG_ENV} to a JSON file of settings such as {{\"eps_max\": 15}}, or "
            f"unset it.")


class _DuplicateKey(ValueError):
    """A key given twice in one JSON object."""

    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    """``json.loads``'s ``object_pairs_hook``: a key given twice is an error (JSON itself keeps
    the last value without a word)."""
    seen: Dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


def read_config_file(path: str, fix: str = _ENV_FIX) -> Dict[str, Any]:
    """The JSON object in the settings file ``path``.

    A missing file, a folder, an unreadable or empty file, invalid JSON, a key given twice or
    anything but a JSON object is a :class:`UserInputError` that names ``path`` and ends with
    ``fix`` (what to do; by default, about the variable :data:`CONFIG_ENV`).
    """
    if os.path.isdir(path):
        raise UserInputError(f"{path} is a folder, but a settings file (JSON) is expected. {fix}")
    if not os.path.exists(path):
        raise UserInputError(f"{path} does not exist. {fix}")
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8-sig")  # an editor's byte order mark is fine
    except OSError as e:
        raise UserInputError(f"cannot read {path} ({e.strerror or e}). {fix}") from None
    except UnicodeDecodeError:
        raise UserInputError(f"cannot read {path}: it is not UTF-8 text, so not a JSON settings "
                             f"file. {fix}") from None
    if not text.strip():
        raise UserInputError(f"{path} is empty (a settings file holds a JSON object; {{}} "
                             f"keeps the trainer's defaults). {fix}")
    try:
        values = json.loads(text, object_pairs_hook=_unique_keys)
    except _DuplicateKey as e:
        raise UserInputError(f"{path} gives the key {e.key!r} twice (JSON would keep the last "
                             f"value without a word); keep one.") from None
    except json.JSONDecodeError as e:
        raise UserInputError(f"{path} is not valid JSON ({e}); fix the file. {fix}") from None
    if not isinstance(values, dict):
        raise UserInputError(f"{path} must hold a JSON object of trainer options, "
                             f"got {type(values).__name__}. {fix}")
    return values


def _class_settings(class_defaults: Dict[str, Any], trainer: Optional[type]) -> TrainerSettings:
    """The paper's protocol with the trainer class's defaults, under the trainer's rules."""
    owner = f"{trainer.__name__}'s" if trainer is not None else "the trainer's"
    return settings_from_dict(class_defaults, source=f"{owner} class defaults", trainer=trainer)


def settings_for_trainer(class_defaults: Dict[str, Any], values: Dict[str, Any],
                         trainer: Optional[type] = None, source: str = "settings"
                         ) -> TrainerSettings:
    """The settings of a new run: the class defaults, then the file's ``values`` (from
    ``source``), under the rules of ``trainer`` (:func:`settings_from_dict`)."""
    return settings_from_dict(values, base=_class_settings(class_defaults, trainer),
                              source=source, trainer=trainer)


def resolve_settings(class_defaults: Dict[str, Any], output_folder: Optional[str],
                     continuing: bool, environ: Optional[Dict[str, str]] = None,
                     trainer: Optional[type] = None) -> TrainerSettings:
    """The settings of one training run.

    Args:
        class_defaults: the trainer class's overrides of the paper's defaults.
        output_folder: the fold's output folder (holds ``ima_config.json`` of an earlier run).
        continuing: ``nnUNetv2_train ... --c``.
        environ: the environment (default ``os.environ``).
        trainer: the trainer class: the file named by :data:`CONFIG_ENV` (and the class
            defaults) may then hold only keys it reads, and no other value of a setting its
            name fixes (:func:`settings_from_dict`). The saved settings of a run being continued
            hold every key and are read as they are.
    """
    environ = os.environ if environ is None else environ
    base = _class_settings(class_defaults, trainer)
    saved_path = os.path.join(output_folder, CONFIG_FILENAME) if output_folder else None
    saved = None
    if continuing and saved_path and os.path.isfile(saved_path):
        values = read_config_file(saved_path, fix=(
            "It holds the settings of the run being continued: restore it, or start the run "
            "anew without --c."))
        # Runs saved before recipes existed followed Algorithm 1 as printed.
        values.setdefault("recipe", "printed")
        saved = settings_from_dict(values, source=saved_path)
    path = environ.get(CONFIG_ENV, "").strip()
    if not path:
        return saved if saved is not None else base
    settings = settings_from_dict(read_config_file(path), base=base, source=path,
                                  trainer=trainer)
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
