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
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Dict, Optional

from nnunet_ima.attacks import BOUNDARY_POINTS
from nnunet_ima.config import AttackConfig, IMAConfig, _choice, _count, _positive
from nnunet_ima.errors import UserInputError
from nnunet_ima.io import write_json
from nnunet_ima.losses import check_threshold
from nnunet_ima.margins import REPEAT_DRAW_RULES
from nnunet_ima.metrics import ABSENT_CLASS_RULES, SLICE_REDUCTIONS
from nnunet_ima.norms import NORMS

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


@dataclass(frozen=True)
class TrainerSettings:
    """Every knob of ``nnUNetTrainerClean`` / ``Adv`` / ``IMA``; defaults are the paper's protocol.

    Schedule: ``num_epochs`` x ``num_iterations_per_epoch`` training iterations,
    ``num_val_iterations_per_epoch`` validation iterations, a checkpoint every ``save_every``
    epochs (1: ``--c`` after a crash loses at most one epoch).

    Attack (both trainers): ``norm``, ``pgd_steps`` steps of ``pgd_alpha * eps / pgd_steps``,
    ``random_start``; ``attack_outputs`` chooses the objective: nnU-Net's Dice + CE on all
    deep-supervision outputs with nnU-Net's weights, or on the full-resolution output only.

    IMA: ``eps_max``, ``delta`` (``None`` = ``eps_max / num_epochs``), ``beta``,
    ``binary_steps``, ``dice_threshold`` and ``dice_reduce`` (a slice is correct when its Dice,
    the mean or max over foreground classes, is >= the threshold), ``margin_update``,
    ``on_clean_wrong``, ``clip_min``, ``boundary`` (see :class:`nnunet_ima.config.IMAConfig`).

    Adv: ``adv_eps``, the fixed budget of vanilla adversarial training.

    Where the paper's printed Algorithm 1 and the authors' segmentation code differ
    (``recipe`` names one of :data:`RECIPES`): ``attack_slices`` (BPGD on the clean-correct
    slices or on all), ``adversarial_term`` (the crossed slices' boundary points with weight
    ``beta * crossed / B``, or every attacked slice's point with weight ``beta``),
    ``adversarial_dice`` (nnU-Net's batch Dice or a per-sample Dice in the adversarial loss),
    ``dice_absent_class`` (a class absent from prediction and ground truth scores 1 and is left
    out, or scores 0), ``repeat_draws`` (see :mod:`nnunet_ima.margins`), ``lr_schedule``,
    ``margin_growth_epochs`` (``delta = eps_max / margin_growth_epochs``; ``None``: the number of
    epochs), ``start_point`` (random start in the ball, or on the sphere of radius
    ``max(E - delta, delta)``).
    """

    num_epochs: int = 50
    num_iterations_per_epoch: int = 50
    num_val_iterations_per_epoch: int = 50
    save_every: int = 1
    initial_lr: float = 1e-2
    seed: Optional[int] = None
    norm: str = "l2"
    pgd_steps: int = 20
    pgd_alpha: float = 4.0
    random_start: bool = True
    attack_outputs: str = "deep_supervision"
    eps_max: float = 25.0
    delta: Optional[float] = None
    beta: float = 0.5
    binary_steps: int = 10
    dice_threshold: float = 0.6
    dice_reduce: str = _DEFAULT["dice_reduce"]
    margin_update: str = "average"
    on_clean_wrong: str = "shrink"
    clip_min: str = "zero"
    boundary: str = _DEFAULT["boundary"]
    adv_eps: float = 15.0
    recipe: str = DEFAULT_RECIPE
    attack_slices: str = _DEFAULT["attack_slices"]
    adversarial_term: str = _DEFAULT["adversarial_term"]
    adversarial_dice: str = _DEFAULT["adversarial_dice"]
    dice_absent_class: str = _DEFAULT["dice_absent_class"]
    repeat_draws: str = _DEFAULT["repeat_draws"]
    lr_schedule: str = _DEFAULT["lr_schedule"]
    margin_growth_epochs: Optional[int] = _DEFAULT["margin_growth_epochs"]
    start_point: str = _DEFAULT["start_point"]

    def __post_init__(self):
        for name in ("num_epochs", "num_iterations_per_epoch", "save_every", "pgd_steps"):
            _count(name, getattr(self, name), 1)
        _count("num_val_iterations_per_epoch", self.num_val_iterations_per_epoch, 0)
        _count("binary_steps", self.binary_steps, 0)
        if self.seed is not None:
            _count("seed", self.seed, 0)
        for name in ("initial_lr", "pgd_alpha", "adv_eps"):
            _positive(name, getattr(self, name))
        if not isinstance(self.random_start, bool):
            raise ValueError(f"random_start must be true or false, got {self.random_start!r}")
        for name, options in (("norm", NORMS), ("attack_outputs", ATTACK_OUTPUTS),
                              ("dice_reduce", SLICE_REDUCTIONS), ("boundary", BOUNDARY_POINTS),
                              ("recipe", RECIPES), ("attack_slices", ATTACK_SLICES),
                              ("adversarial_term", ADVERSARIAL_TERMS),
                              ("adversarial_dice", ADVERSARIAL_DICE),
                              ("dice_absent_class", ABSENT_CLASS_RULES),
                              ("repeat_draws", REPEAT_DRAW_RULES), ("lr_schedule", LR_SCHEDULES),
                              ("start_point", START_POINTS)):
            _choice(name, getattr(self, name), options)
        check_threshold(self.dice_threshold)
        self.ima_config()  # validates eps_max, delta, beta and the margin-update options

    def ima_config(self) -> IMAConfig:
        """The IMA part as the core's :class:`IMAConfig` (validated there)."""
        return IMAConfig(eps_max=self.eps_max, delta=self.delta, beta=self.beta,
                         binary_steps=self.binary_steps, margin_update=self.margin_update,
                         on_clean_wrong=self.on_clean_wrong, clip_min=self.clip_min,
                         boundary=self.boundary, growth_epochs=self.margin_growth_epochs,
                         repeat_draws=self.repeat_draws)

    def attack_config(self) -> AttackConfig:
        """The PGD part as the core's :class:`AttackConfig` (the loss is set by the trainer)."""
        return AttackConfig(norm=self.norm, steps=self.pgd_steps, alpha=self.pgd_alpha,
                            random_start=self.random_start)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def settings_from_dict(values: Dict[str, Any], base: Optional[TrainerSettings] = None,
                       source: str = "settings") -> TrainerSettings:
    """``base`` (default: the paper's protocol) with ``values`` applied.

    A ``recipe`` in ``values`` sets that recipe's settings first; the other keys of ``values``
    override them.

    Raises:
        UserInputError: unknown keys, an unknown recipe or out-of-range values, naming ``source``.
    """
    known = {f.name for f in fields(TrainerSettings)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserInputError(f"{source}: unknown trainer option(s) {unknown}. "
                             f"Known options: {sorted(known)}")
    if "recipe" in values:
        if not isinstance(values["recipe"], str) or values["recipe"] not in RECIPES:
            raise UserInputError(f"{source}: recipe must be one of {tuple(RECIPES)}, got "
                                 f"{values['recipe']!r}")
        values = {**RECIPES[values["recipe"]], **values}
    try:
        return replace(base or TrainerSettings(), **values)
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
