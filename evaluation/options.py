"""What one evaluation scores and how: :class:`EvalOptions`.

``nnunet-ima-eval`` builds it once from its command line; :func:`.run.evaluate` and the steps
it calls read it (and nothing else), so a program can run the same evaluation without argparse.
Options with a default are declared once, in their field (:func:`nnunet_ima.declared.setting`):
the command line builds its options from them. An instance checks itself on construction and
refuses bad input with the message the command line gives (a :class:`UserInputError`).
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, List, Optional, Tuple

from nnunet_ima.declared import (Choice, Count, Flag, InvalidSetting, OpenUnitInterval, Several,
                                 Text, UnitInterval, flag_name, setting, validate_declared)
from nnunet_ima.devices import default_device, resolve_device
from nnunet_ima.errors import UserInputError

from nnunet_ima.evaluation.ensemble import MEMBERS, PRESETS, SINGLE
from nnunet_ima.evaluation.masking import MaskingSettings
from nnunet_ima.evaluation.models import CHECKPOINTS, checkpoint_choice
from nnunet_ima.evaluation.objects import DEFAULT_SIZE_BINS, check_size_bins
from nnunet_ima.evaluation.robustness import AttackSettings
from nnunet_ima.evaluation.training_cases import Fold, parse_fold

INFERENCE_PATHS = ("network", "predictor")

DEFAULT_NOISE = (0.0, 5.0, 15.0, 25.0)  # the paper's Heart levels (METHOD section 6)

# The command-line spelling of the fields whose option is not ``flag_name(field)``.
OPTION_NAMES = {"folds": "-f", "model_folders": "-m", "loss": "--attack-loss",
                "slices": "--masking-slices", "queries": "--masking-queries",
                "random_start": "--no-random-start", "progress": "--no-progress"}


def option_name(name: str) -> str:
    """The command-line option of field ``name`` (of :class:`EvalOptions` or its parts)."""
    return OPTION_NAMES.get(name, flag_name(name))


@dataclass(frozen=True)
class FoldNumber:
    """nnU-Net's fold: a number >= 0 or ``"all"`` (:func:`.training_cases.parse_fold`)."""

    value_type: type = str

    def check(self, name: str, value: Any) -> None:
        try:
            if parse_fold(str(value)) != value:
                raise ValueError(f"a fold is a number >= 0 or 'all', got {value!r}")
        except ValueError as e:
            raise InvalidSetting(name, f"holds a bad fold: {e}") from None


@dataclass(frozen=True)
class NoiseLevels:
    """A tuple of finite numbers >= 0, at least one (a command line takes them as
    ``nargs="+"``)."""

    value_type: type = float

    def check(self, name: str, value: Any) -> None:
        bad = [n for n in value if isinstance(n, bool) or not isinstance(n, (int, float))
               or not (math.isfinite(n) and n >= 0)]
        if bad or not value:
            raise InvalidSetting(name, f"levels must be finite and >= 0, got {bad or []}")


@dataclass(frozen=True)
class SizeBins:
    """Object-size bin edges in voxels: positive integers, strictly ascending, at least one
    (:func:`.objects.check_size_bins`)."""

    value_type: type = int

    def check(self, name: str, value: Any) -> None:
        try:
            check_size_bins(value)
        except ValueError as e:
            raise InvalidSetting(name, f"holds bad edges: {e}") from None


@dataclass(frozen=True)
class EvalOptions:
    """One evaluation: the models, the test slices, the attack and the output folder.

    Attributes:
        output: the output folder (created if missing; a rerun with the same options resumes
            in it).
        dataset, trainers, plans, configuration: the models by nnU-Net names, one per trainer,
            under ``nnUNet_results``; unused when ``model_folders`` is given.
        model_folders: model folders (``.../Trainer__Plans__2d``) instead of nnU-Net names.
        folds: nnU-Net folds (numbers or ``"all"``); with several, each fold is one model.
        checkpoint: ``final``, ``best`` or ``latest`` (or nnU-Net's file name,
            ``checkpoint_best.pth``, kept as ``best``).
        cases: ``test``, ``val`` and/or case identifiers; empty: ``test`` when
            ``test_cases.json`` exists, else ``val`` (with ``images``: every case there).
        allow_train_cases: score cases that a model's fold trained on (refused otherwise).
        images, labels: raw test folders (``imagesTs``, ``labelsTs``) instead of the
            preprocessed dataset; preprocessed with each model's plans.
        include_empty: also score slices without foreground in the ground truth.
        max_slices: score at most this many slices per model, drawn with ``attack.seed``.
        noise: noise levels (0 = clean), in z-score units; any order, repeats ignored.
        attack: the attack and its options; its seed also draws the ``max_slices`` slices.
        ensemble: members of :data:`.ensemble.MEMBERS` to run in turn, the headline being their
            per-slice worst case (``attack`` then gives only the shared norm, steps, alpha,
            random start, batch size and seed); empty: ``attack`` alone, an ensemble of that
            one member (:attr:`members`).
        preset: a protocol of :data:`.ensemble.PRESETS` (``quick``, ``standard``, ``sea``,
            ``rse``), like AutoAttack's ``version=``: it fixes the ensemble members and the
            attack's steps, random start and restarts, and the instance holds them resolved
            (``ensemble`` and ``attack`` as the preset sets them), so a preset run is an
            ordinary ensemble run with the preset's name recorded. Given with other members or
            non-default steps / random start / restarts it is refused.
        masking_checks: run the gradient-masking checks of :mod:`.masking` after the attacks,
            with ``masking`` (slices, queries).
        minimal_noise: after the attacks, each sample's minimal noise that brings its Dice
            below ``dice_threshold`` (:mod:`.minimal_noise`), the minimal-perturbation attack
            running ``minimal_noise_steps`` iterations (``None``: ``attack.steps``); needs a
            noise level > 0.
        size_bins: edges (voxels, ascending) of the object-size bins of the size breakdown
            (:mod:`.objects`).
        inference: ``network`` (the 2D network on whole slices, padded to its stride) or
            ``predictor`` (nnU-Net's sliding-window predictor, :mod:`.predictor_path`, with
            ``tile_step_size`` and mirroring unless ``disable_tta``; ``tiles_per_pass`` and
            ``gradient_checkpointing`` bound the attack's memory).
        device: torch device name (``cpu``, ``cuda``, ``cuda:1``, ...).
        nnunet_results, nnunet_preprocessed: nnU-Net's folders of trained models and of
            preprocessed data; ``None``: those the environment variables ``nnUNet_results`` and
            ``nnUNet_preprocessed`` name (as nnU-Net reads them). A program that keeps its own
            folders passes them here instead of setting the environment.
        overwrite: discard results in ``output`` made with other options instead of refusing.
        progress: show a progress bar.

    Raises:
        UserInputError: on construction, a bad value or combination (the message names the
            command-line option).
    """

    output: str
    dataset: Optional[str] = setting(None, rule=Text(), optional=True,
                                     help="dataset id or name, e.g. 2 or Dataset002_Heart")
    trainers: Tuple[str, ...] = setting(("nnUNetTrainer",), rule=Several(Text()),
                                        help="trainer names; one model per trainer")
    plans: str = setting("nnUNetPlans", rule=Text(), help="plans identifier")
    configuration: str = setting("2d", rule=Text(), help="nnU-Net configuration")
    model_folders: Tuple[str, ...] = ()
    folds: Tuple[Fold, ...] = setting(
        (0,), rule=Several(FoldNumber()),
        help="folds (numbers and/or 'all'); with several, each fold is one model, named "
             "TRAINER_foldK")
    checkpoint: str = setting("final", rule=Choice(tuple(CHECKPOINTS)),
                              help="final, best or latest, or nnU-Net's file name "
                                   "(checkpoint_best.pth, ...)")
    cases: Tuple[str, ...] = ()
    allow_train_cases: bool = False
    images: Optional[str] = None
    labels: Optional[str] = None
    include_empty: bool = False
    max_slices: Optional[int] = None
    noise: Tuple[float, ...] = setting(DEFAULT_NOISE, rule=NoiseLevels(),
                                       help="noise levels (0 = clean), in z-score units")
    attack: AttackSettings = AttackSettings()
    ensemble: Tuple[str, ...] = setting(
        (), rule=Several(Choice(tuple(MEMBERS)), minimum=0),
        help=f"members of --attack ensemble, in order ({', '.join(MEMBERS)}); apgd-* use SEA's "
             f"losses and shrinking radius, rse-* are rse's (PAdam at 200 steps whatever "
             f"--steps says, APGD at the plain radius, a random start)")
    preset: Optional[str] = setting(
        None, rule=Choice(tuple(PRESETS)), optional=True,
        help="a protocol, like AutoAttack's version=: quick (the default members, 20 steps); "
             "standard (pgd, segpgd, cospgd, apgd, SEA's three apgd members, PAdam on CE and "
             "cos, minimal; 100 steps); sea (SEA's: its three APGD losses at its shrinking "
             "radius, 300 steps; published in Linf, carried over to L2); rse (rse's: PAdam on "
             "CE and cos at 200 steps, APGD with four losses at 300 steps, and minimal clamped "
             "to the ball, the closest stand-in for its DAG / PDPGD / ALMA-prox). Each with a "
             "random start and 1 restart; it sets --attack ensemble, --ensemble, --steps, "
             "--restarts, so those are not given with it")
    masking_checks: bool = setting(False, rule=Flag(),
                                   help="run the gradient-masking checks after the attacks")
    minimal_noise: bool = setting(
        False, rule=Flag(),
        help="after the attacks, each sample's minimal noise that brings its Dice below "
             "--dice-threshold: the smaller of a minimal-perturbation attack's and the smallest "
             "noise level at which the attacks broke it (an upper bound on the true minimum); "
             "written to minimal_noise.csv, summary.json and curves.png. With --shard, "
             "`nnunet-ima-eval merge` computes it (it loads the models), under torchrun rank 0")
    dice_threshold: float = setting(
        0.5, rule=OpenUnitInterval(),
        help="--minimal-noise: a sample counts as broken when its Dice is below this")
    minimal_noise_steps: Optional[int] = setting(
        None, rule=Count(1), optional=True,
        help="--minimal-noise: iterations of the minimal-perturbation attack; default: --steps")
    masking: MaskingSettings = MaskingSettings()
    size_bins: Tuple[int, ...] = setting(
        DEFAULT_SIZE_BINS, rule=SizeBins(),
        help="edges of the object-size bins, in voxels, ascending, of the size breakdown "
             "(summary.json's size_breakdown, size_breakdown.csv): Dice under attack per class "
             "and ground-truth object (connected component) size; 64 256 1024 4096 make the bins "
             "<64, 64-255, 256-1023, 1024-4095, >=4096")
    inference: str = setting(
        "network", rule=Choice(INFERENCE_PATHS),
        help="network: the 2D network on whole slices (padded to its stride); predictor: what "
             "nnUNetv2_predict computes, nnU-Net's sliding-window tiles with Gaussian weights "
             "and mirroring, differentiated end to end (nnU-Net finds this package's trainers "
             "in nnUNet_extTrainer; unset, the evaluator sets it)")
    tile_step_size: float = setting(0.5, rule=UnitInterval(),
                                    help="predictor: nnUNetv2_predict's -step_size")
    disable_tta: bool = False
    tiles_per_pass: Optional[int] = setting(
        None, rule=Count(1), optional=True,
        help="predictor: at most this many tiles (each with its mirrored copies) per network call "
             "of the attack; default: all tiles of a batch at once. With "
             "--gradient-checkpointing, 1 keeps one tile's activations alive at a time")
    gradient_checkpointing: bool = setting(
        False, rule=Flag(),
        help="predictor: recompute each tile's activations in the backward pass instead of "
             "keeping them (activation checkpointing; the same gradients at about 1.5x the "
             "time), for 3D volumes whose tiles' activations do not fit in memory")
    device: str = field(default_factory=default_device)
    nnunet_results: Optional[str] = None
    nnunet_preprocessed: Optional[str] = None
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self):
        for name in ("trainers", "model_folders", "folds", "cases", "noise", "ensemble",
                     "size_bins"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.preset is not None:
            self._resolve_preset()
        if isinstance(self.dataset, int) and not isinstance(self.dataset, bool):
            object.__setattr__(self, "dataset", str(self.dataset))  # an id, as -d takes it
        try:
            object.__setattr__(self, "checkpoint", checkpoint_choice(self.checkpoint))
        except ValueError as e:
            raise UserInputError(f"{option_name('checkpoint')}: {e}") from None
        self._check()

    def _resolve_preset(self) -> None:
        """Set ``ensemble`` and ``attack`` to what ``preset`` fixes; refuse other members or
        other non-default steps, random start or restarts (the command line also refuses them
        given at their defaults, :func:`.cli.options_from_args`)."""
        if self.preset not in PRESETS or not isinstance(self.attack, AttackSettings):
            return  # _check names the bad value
        preset, attack, default = PRESETS[self.preset], self.attack, AttackSettings()
        instead = ("or drop --preset and choose members and settings with --attack ensemble "
                   "--ensemble")
        if self.ensemble and self.ensemble != preset.members:
            raise UserInputError(
                f"--preset {self.preset} runs the members {' '.join(preset.members)}: drop "
                f"--ensemble {' '.join(self.ensemble)}, {instead}")
        for name, value in (("steps", preset.steps), ("restarts", preset.restarts)):
            given = getattr(attack, name)
            if given not in (value, getattr(default, name)):
                raise UserInputError(
                    f"--preset {self.preset} runs {value} {name[:-1] if value == 1 else name}, "
                    f"not {option_name(name)} "
                    f"{given}: drop {option_name(name)}, {instead}")
        if attack.random_start != preset.random_start:
            raise UserInputError(
                f"--preset {self.preset} starts every attack at a random point of the ball: "
                f"drop {option_name('random_start')}, {instead}")
        object.__setattr__(self, "attack", dataclasses.replace(
            attack, steps=preset.steps, random_start=preset.random_start,
            restarts=preset.restarts))
        object.__setattr__(self, "ensemble", preset.members)

    def _check(self) -> None:
        if self.max_slices is not None and self.max_slices < 1:
            raise UserInputError(f"--max-slices must be >= 1, got {self.max_slices}")
        if len(set(self.ensemble)) != len(self.ensemble):
            raise UserInputError(f"--ensemble names a member more than once: "
                                 f"{list(self.ensemble)}")
        if not 0 < self.tile_step_size <= 1:
            raise UserInputError(f"--tile-step-size must lie in (0, 1], got "
                                 f"{self.tile_step_size}")
        try:
            validate_declared(self)
        except InvalidSetting as e:
            raise UserInputError(e.spelled(option_name)) from None
        if bool(self.images) != bool(self.labels):
            raise UserInputError("--images and --labels go together (labels are needed for "
                                 "Dice)")
        if self.minimal_noise and not any(n > 0 for n in self.noise):
            raise UserInputError("--minimal-noise starts its search at the smallest noise level "
                                 "> 0: add one to --noise")
        resolve_device(self.device)
        if not self.model_folders and not self.dataset:
            raise UserInputError("name the models: -d DATASET -tr TRAINER ... or -m FOLDER ...")
        if self.model_folders and self.dataset:
            raise UserInputError("name the models either by -d/-tr/-p/-c or by -m FOLDER, not "
                                 "both")
        repeated = sorted({str(f) for f in self.folds if self.folds.count(f) > 1})
        if repeated:
            raise UserInputError(f"-f names fold {', '.join(repeated)} more than once")
        if self.images and self.cases and set(self.cases) & {"test", "val"}:
            raise UserInputError("--cases test/val select preprocessed cases; with --images give "
                                 "case identifiers of the images folder, or no --cases for all "
                                 "of them")
        for name, cls in (("attack", AttackSettings), ("masking", MaskingSettings)):
            if not isinstance(getattr(self, name), cls):
                raise TypeError(f"EvalOptions.{name} must be a {cls.__name__}, got "
                                f"{getattr(self, name)!r}")

    @property
    def members(self) -> Tuple[Optional[str], ...]:
        """The attacks run in turn: the ensemble's members, or :data:`.ensemble.SINGLE` (the
        ``attack`` alone)."""
        return self.ensemble or SINGLE

    @property
    def minimal_steps(self) -> int:
        """The minimal-perturbation attack's iterations: ``minimal_noise_steps``, else the
        attack's steps."""
        return self.minimal_noise_steps or self.attack.steps

    @property
    def noise_levels(self) -> List[float]:
        """The distinct noise levels, ascending: the order of the attacks and of the tables."""
        return sorted(set(float(n) for n in self.noise))


def options_to_dict(options: EvalOptions) -> dict:
    """``options`` as JSON-ready values (:func:`options_from_dict` reads them back), its paths
    made absolute: a shard stores them so that ``nnunet-ima-eval merge`` (run from any folder)
    loads the same models and data (:mod:`.sharding`)."""
    values = json_ready(dataclasses.asdict(options))
    for name in ("output", "images", "labels", "nnunet_results", "nnunet_preprocessed"):
        if values[name]:
            values[name] = os.path.abspath(values[name])
    values["model_folders"] = [os.path.abspath(f) for f in values["model_folders"]]
    return values


def json_ready(value: Any) -> Any:
    """Tuples as lists, recursively (what JSON would make of them)."""
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


def options_from_dict(values: dict, **changes: Any) -> EvalOptions:
    """The :class:`EvalOptions` of :func:`options_to_dict`'s ``values``, with ``changes`` (e.g.
    another ``device``) applied.

    Raises:
        UserInputError: ``values`` names options this version does not know (written by a newer
            one) or holds a bad value.
    """
    known = {f.name for f in dataclasses.fields(EvalOptions)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserInputError(f"unknown evaluation options {unknown} (written by another version "
                             f"of nnunet-ima?)")
    values = dict(values, **changes)
    try:
        values["attack"] = AttackSettings(**values.get("attack", {}))
        values["masking"] = MaskingSettings(**values.get("masking", {}))
    except (TypeError, InvalidSetting) as e:
        raise UserInputError(f"bad stored attack or masking settings: {e}") from None
    return EvalOptions(**values)
