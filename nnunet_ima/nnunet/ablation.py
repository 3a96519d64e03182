"""The ablation experiment: which reading of IMA makes it beat vanilla adversarial training.

On one planned and split nnU-Net dataset, with one schedule and one or more seeds, it trains

* ``clean`` (plain nnU-Net) and ``clean_half_lr`` (half the learning rate: IMA's clean term has
  weight ``1 - beta``, so a weak adversarial term makes IMA train like this);
* ``adv<eps>``: vanilla adversarial training at several budgets (the front IMA must not be
  dominated by);
* ``ima_printed`` and ``ima_authors``: the two recipes of :data:`nnunet_ima.nnunet.settings.RECIPES`;
* one-factor-at-a-time variants: the authors' recipe with one of its differences put back to the
  printed reading (``authors-<factor>``), and the printed recipe with the authors' adversarial
  term (``printed+term``);
* the baselines and controls a reviewer asks for (:data:`EXTRA_VARIANTS`): TRADES and N-FGSM
  at the baseline budgets (``--baseline-eps``, default the Adv budgets), Adv at IMA's
  ``eps_max`` (with nnU-Net's and with the constant learning rate), the authors' recipe with
  the ``min`` slice Dice, and the clean model fine-tuned for a few epochs by Adv, IMA, TRADES or
  N-FGSM (trained after every other model: they start from the ``clean`` model of their seed);

each as a real ``nnUNetv2_train`` in its own ``nnUNet_results`` folder (side by side with
``jobs``), once per seed, then attacks every model with the evaluator of ``nnunet-ima-eval``
(:func:`nnunet_ima.evaluation.run.evaluate`; PGD and APGD by default) and writes, per case set,
a table of the means over the seeds, a table of their intervals and paired differences
(:mod:`nnunet_ima.statistics`, from the evaluations' per-slice counts), with the models that
dominate each one within the intervals, and one picture.
Everything is resumable: a trained model, and each (model, attack, case set) evaluation, is
reused when the command runs again with the same options. The table also gives each model's
seconds per training epoch and, for IMA, the share of margins saturated at ``eps_max``.

The models trained with ``seed`` (the evaluation seed) and their evaluations sit where a
one-seed run puts them, those of the other ``seeds`` in ``seed<s>/`` beside them, so a workdir
made with one seed takes more seeds later. Every model is evaluated with ``seed``: the same
slices and the same attack starts for all of them.
"""
from __future__ import annotations

import csv
import json
import math
import os
import re
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from nnunet_ima.declared import (Count, InvalidSetting, Positive, Rule, Several, Text, flag_name,
                                 setting, validate_declared)
from nnunet_ima.errors import UserInputError
from nnunet_ima.io import read_json, write_json, write_text
from nnunet_ima.metrics import robustness_auc
from nnunet_ima.nnunet.experiment import final_checkpoint, training_command
from nnunet_ima.nnunet.pipeline import run_side_by_side, threads_per_job
from nnunet_ima.nnunet.settings import RECIPES, settings_from_dict
from nnunet_ima.nnunet.training_stats import STATS_FILENAME
from nnunet_ima.statistics import (Estimate, case_slice_draws, dominates, estimate,
                                   paired_difference, tvdi_draws)

if TYPE_CHECKING:  # the evaluator imports torch; checking the options needs none of it
    from nnunet_ima.evaluation.options import EvalOptions
    from nnunet_ima.evaluation.robustness import NoiseResult

OPTIONS_FILENAME = "ablation_options.json"
TABLE_FILENAME = "ablation.md"
RESULTS_FILENAME = "ablation.json"
PICTURE_FILENAME = "ablation.png"

# factor of the one-factor-at-a-time variants -> the settings that make it up (METHOD.md 3b).
FACTORS: Dict[str, Sequence[str]] = {
    "term": ("adversarial_term",),                                     # item 1
    "growth": ("margin_growth_epochs",),                               # item 2
    "slices": ("attack_slices", "dice_reduce", "dice_absent_class"),   # items 3 and 6
    "draws": ("repeat_draws",),                                        # item 4
    "dice": ("adversarial_dice",),                                     # item 5
    "lr": ("lr_schedule",),                                            # item 7
    "start": ("start_point", "boundary"),                              # start and boundary point
}
DEFAULT_VARIANTS = ("clean", "clean_half_lr", "adv", "ima_printed", "ima_authors",
                    "printed+term", "authors-term", "authors-growth", "authors-slices",
                    "authors-lr")
# Baselines and controls beside the ablation proper (none of them is trained by default).
# name -> what it trains; the ``<eps>`` ones are one model per --baseline-eps (default
# --adv-eps).
EXTRA_VARIANTS: Dict[str, str] = {
    "adv_constant_lr": "Adv at the constant learning rate",
    "trades": "TRADES",
    "nfgsm": "N-FGSM",
    "adv_max": "Adv at --eps-max",
    "adv_max_constant_lr": "Adv at --eps-max and the constant learning rate (what the authors' "
                           "recipe trains once its margins saturate)",
    "ima_authors_min": "the authors' recipe with the min slice Dice over the classes present",
    "ft_adv": "Adv fine-tuning the clean model",
    "ft_adv_max": "Adv fine-tuning the clean model at --eps-max (what ft_ima trains once its "
                  "margins saturate)",
    "ft_ima": "the authors' recipe fine-tuning the clean model",
    "ft_trades": "TRADES fine-tuning the clean model",
    "ft_nfgsm": "N-FGSM fine-tuning the clean model",
}
# The trainers of the baselines (name of the variant -> trainer class).
BASELINE_TRAINERS = {"trades": "nnUNetTrainerTRADES", "nfgsm": "nnUNetTrainerNFGSM"}
# What a variant of each kind is. The reference of the paired differences, the Adv front of the
# picture and the "dominated by (Adv)" column take the "adv" models (vanilla Adv) only.
# ft_ima is of kind "ima": an IMA reading (a candidate of the default, never a dominator); the
# other fine-tunings are of kind "finetune".
KINDS = ("clean", "adv", "ima", "baseline", "finetune")
# The kinds whose models may dominate a row within the intervals (RowStatistics.dominated_by):
# every kind but IMA, whose readings are what the comparison is about.
DOMINATING_KINDS = ("clean", "adv", "baseline", "finetune")
FINETUNE_WARMUP_EPOCHS = 1  # the fine-tunings' linear learning-rate warm-up


@dataclass(frozen=True)
class Variant:
    """One model of the experiment: a trainer class and its ``NNUNET_IMA_CONFIG`` settings (the
    training seed among them); a variant trained with several seeds is one Variant per seed."""

    name: str
    trainer: str
    settings: Dict[str, object]
    kind: str  # one of KINDS
    # "" for the evaluation seed (the folders of a one-seed run), "seed<s>" for the others.
    seed_folder: str = ""

    @property
    def seed(self) -> int:
        return int(self.settings["seed"])

    @property
    def finetunes(self) -> bool:
        """Whether the model starts from a clean model (trained after it)."""
        return self.settings.get("finetune_from") is not None

    @property
    def label(self) -> str:
        """The variant's name, with its seed where it is not the evaluation seed."""
        return f"{self.name} (seed {self.seed})" if self.seed_folder else self.name


# ---------------------------------------------------------------------------- options
# The rules of the options, worded as the command has always refused them.
@dataclass(frozen=True)
class Worded:
    """``rule`` (:mod:`nnunet_ima.declared`), its refusal worded ``"<problem>, got <value>"``."""

    rule: Rule
    problem: str

    @property
    def value_type(self) -> type:
        return self.rule.value_type

    def check(self, name: str, value: Any) -> None:
        try:
            self.rule.check(name, value)
        except InvalidSetting:
            raise InvalidSetting(name, f"{self.problem}, got {_shown([value])}") from None


def _whole(minimum: int) -> Worded:
    return Worded(Count(minimum), f"must be a whole number >= {minimum}")


BUDGET = Worded(Positive(), "must be > 0 and finite")


@dataclass(frozen=True)
class NoiseLevels:
    """Finite levels >= 0 holding 0 (the table's clean column) and a level > 0."""

    value_type: type = float

    def check(self, name: str, value: Any) -> None:
        levels = list(value)
        if not levels or not all(_is_number(n) and math.isfinite(n) and n >= 0 for n in levels):
            raise InvalidSetting(name, f"levels must be finite and >= 0, got {_shown(levels)}")
        if 0 not in levels or max(levels) <= 0:
            raise InvalidSetting(name, f"must hold 0 (the table's clean column) and a level > 0, "
                                       f"got {_shown(levels)}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _shown(values: Sequence) -> str:
    return " ".join(f"{v:g}" if _is_number(v) else repr(v) for v in values)


@dataclass(frozen=True)
class AblationOptions:
    """What the experiment trains and how it evaluates (all of it is part of the resume key).

    Every field is declared once with its help and rule (:mod:`nnunet_ima.declared`):
    ``nnunet-ima ablation`` builds its options from them and :func:`check_values` checks them.
    """

    dataset: str = setting(help="dataset id or name, planned (2d) and split with nnunet-ima "
                                "split", rule=Text())
    workdir: str = setting(help="folder for the models (one nnUNet_results per variant), the "
                                "evaluations, ablation.md / ablation.json / ablation.png",
                           rule=Text())
    variants: Sequence[str] = setting(
        DEFAULT_VARIANTS, rule=Several(Text()),
        help=f"models to train; 'adv' is one model per --adv-eps; authors-<factor> / "
             f"printed+<factor> with factor in {', '.join(FACTORS)}; baselines and controls: "
             f"trades, nfgsm (one per --baseline-eps), adv_constant_lr, adv_max, "
             f"adv_max_constant_lr, ima_authors_min; fine-tunings of the clean model (need "
             f"'clean', trained after the others): ft_adv, ft_trades, ft_nfgsm (one per "
             f"--baseline-eps), ft_adv_max (Adv at --eps-max), ft_ima; a budgeted variant spelled "
             f"with its budget (adv8, ft_trades10) builds that model alone")
    adv_eps: Sequence[float] = setting((4.0, 8.0, 16.0), help="budgets of the Adv models",
                                       rule=Several(BUDGET))
    baseline_eps: Sequence[float] = setting(
        (), rule=Several(BUDGET, minimum=0),
        help="budgets of trades, nfgsm, ft_adv, ft_trades and ft_nfgsm, default the --adv-eps "
             "budgets (e.g. --baseline-eps 8: one TRADES and one N-FGSM model, not one per Adv "
             "budget); a model keeps its name and settings (trades8 is TRADES at 8 whichever "
             "option chose it), so a workdir takes other budgets later")
    eps_max: float = setting(16.0, help="eps_max of every IMA model", rule=BUDGET)
    epochs: int = setting(10, help="training epochs of every model", rule=_whole(1))
    iterations: int = setting(10, help="training iterations per epoch", rule=_whole(1))
    val_iterations: int = setting(2, help="validation iterations per epoch (nnU-Net needs one: "
                                          "its epoch end reads the validation outputs)",
                                  rule=_whole(1))
    initial_lr: float = setting(0.01, help="learning rate of every model but clean_half_lr",
                                rule=BUDGET)
    finetune_epochs: int = setting(5, help="training epochs of the fine-tunings (ft_*) of the "
                                           "clean model", rule=_whole(1))
    finetune_lr: Optional[float] = setting(
        None, rule=BUDGET, optional=True,
        help="learning rate of the fine-tunings (ft_*), default --initial-lr; they warm it up "
             "linearly over their first epoch")
    pgd_steps: int = setting(5, help="PGD steps of the Adv and IMA trainings",
                             rule=_whole(1))
    binary_steps: int = setting(5, help="IMA's bisection steps", rule=_whole(1))
    seed: int = setting(0, rule=_whole(0),
                        help="the evaluation seed of every model (the same slices and attack "
                             "starts for all) and the training seed where --seeds is not given")
    seeds: Sequence[int] = setting(
        (), rule=Several(_whole(0), minimum=0),
        help="training seeds, default --seed alone: every variant is trained once per seed, "
             "the models of --seed in the workdir itself, those of another seed s in seed<s>/ "
             "(so a workdir takes more seeds later)")
    fold: int = setting(0, help="the nnU-Net fold every model trains", rule=_whole(0))
    jobs: int = setting(1, help="trainings side by side; the CPU cores are shared between them",
                        rule=_whole(1))
    device: str = setting("cpu", help="nnUNetv2_train's -device: cpu, cuda or mps",
                          rule=Text())
    noise: Sequence[float] = setting((0.0, 4.0, 8.0, 16.0),
                                     help="evaluation noise levels, L2 in z-score units",
                                     rule=NoiseLevels())
    eval_steps: int = setting(100, help="steps of every evaluation attack", rule=_whole(1))
    attacks: Sequence[str] = setting(
        ("pgd", "apgd"), rule=Several(Text()),
        help="nnunet-ima-eval attacks; the table takes the worst per noise level")
    cases: Sequence[str] = setting(("test",), rule=Several(Text()),
                                   help="case sets to evaluate, one table each: test, val")
    max_slices: Optional[int] = setting(12, help="slices evaluated per model and case set",
                                        rule=Worded(Count(1), "must be >= 1"), optional=True)
    bootstrap: int = setting(
        1000, rule=_whole(1),
        help="bootstrap draws of the intervals: the evaluated cases drawn with replacement, "
             "then slices within each drawn case; the same draws for every model")

    def __post_init__(self):
        # Lists as a program or argparse gives them; the options keep tuples (they are frozen).
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                object.__setattr__(self, f.name, tuple(value))

    @property
    def training_seeds(self) -> Tuple[int, ...]:
        """The seeds every variant is trained with: ``seeds``, or ``seed`` alone."""
        return tuple(self.seeds) or (self.seed,)

    @property
    def baseline_budgets(self) -> Tuple[float, ...]:
        """The budgets of the baselines and of the fine-tunings other than ft_ima:
        ``baseline_eps``, or ``adv_eps``."""
        return tuple(self.baseline_eps) or tuple(self.adv_eps)

    def resume_key(self) -> dict:
        """The options a result depends on (``jobs`` and ``workdir`` do not change results, more
        seeds add models beside those of ``seed``, the bootstrap is redrawn with each report;
        ``baseline_eps``, like ``variants``, chooses which models are built, each named by its
        budget, and changes none of them)."""
        key = asdict(self)
        for name in ("jobs", "workdir", "variants", "attacks", "cases", "seeds", "bootstrap",
                     "baseline_eps"):
            key.pop(name)
        return key


# Variants of one model per budget; spelled with a number (``ft_trades10``) they build the model
# of that budget alone, whatever --adv-eps / --baseline-eps say.
BUDGETED_FAMILIES = ("adv", "trades", "nfgsm", "ft_adv", "ft_trades", "ft_nfgsm")
_BUDGETED = re.compile(r"(%s)(\d+(?:\.\d+)?)\Z" % "|".join(
    sorted(BUDGETED_FAMILIES, key=len, reverse=True)))


def family_and_budgets(entry: str, options: AblationOptions
                       ) -> Tuple[str, Optional[Tuple[float, ...]]]:
    """``(family, budgets)`` of one ``--variants`` entry: ``ft_trades10`` -> ``("ft_trades",
    (10.0,))``; ``adv`` -> ``("adv", --adv-eps)``; the other budgeted families take
    ``options.baseline_budgets``; a variant without budgets -> ``(entry, None)``."""
    match = _BUDGETED.match(entry)
    if match:
        return match.group(1), (float(match.group(2)),)
    if entry == "adv":
        return entry, tuple(float(e) for e in options.adv_eps)
    if entry in BUDGETED_FAMILIES:
        return entry, tuple(float(e) for e in options.baseline_budgets)
    return entry, None


def build_variants(options: AblationOptions, dataset_name: Optional[str] = None) -> List[Variant]:
    """The models named by ``options.variants`` (``adv`` expands to one per ``adv_eps``, the
    baselines and ft_adv / ft_trades / ft_nfgsm to one per ``baseline_budgets``), for every
    seed of ``options.training_seeds`` in turn.

    ``dataset_name``: the dataset's full name, default ``options.dataset``. A fine-tuning's
    settings name the checkpoint of its seed's clean model by its absolute path in the model
    folder of that name (:func:`model_folder`), so that they are the same in every run.
    """
    dataset_name = dataset_name or options.dataset
    variants: List[Variant] = []
    for seed in options.training_seeds:
        folder = "" if seed == options.seed else f"seed{seed}"
        variants += [replace(v, seed_folder=folder)
                     for v in _variants_of_seed(options, seed, folder, dataset_name)]
    return variants


def _variants_of_seed(options: AblationOptions, seed: int, seed_folder: str = "",
                      dataset_name: Optional[str] = None) -> List[Variant]:
    schedule = {"num_epochs": options.epochs, "num_iterations_per_epoch": options.iterations,
                "num_val_iterations_per_epoch": options.val_iterations, "seed": seed,
                "initial_lr": options.initial_lr}
    attack = {"pgd_steps": options.pgd_steps}
    ima = dict(schedule, **attack, eps_max=options.eps_max, binary_steps=options.binary_steps)
    _check_variant_names(options)
    variants: List[Variant] = []
    for entry in options.variants:
        name, budgets = family_and_budgets(entry, options)
        if name == "clean":
            variants.append(Variant("clean", "nnUNetTrainerClean", dict(schedule), "clean"))
        elif name == "clean_half_lr":
            variants.append(Variant(name, "nnUNetTrainerClean",
                                    dict(schedule, initial_lr=options.initial_lr / 2), "clean"))
        elif name == "adv":
            for eps in budgets:
                variants.append(Variant(f"adv{eps:g}", "nnUNetTrainerAdv",
                                        dict(schedule, **attack, adv_eps=float(eps)), "adv"))
        elif name == "adv_constant_lr":
            # Adv under the IMA recipe's constant learning rate: whether Adv gains from it too.
            for eps in options.adv_eps:
                variants.append(Variant(f"adv{eps:g}_constant_lr", "nnUNetTrainerAdv",
                                        dict(schedule, **attack, adv_eps=float(eps),
                                             lr_schedule="constant"), "adv"))
        elif name in ("ima_printed", "ima_authors"):
            recipe = name.split("_", 1)[1]
            variants.append(Variant(name, "nnUNetTrainerIMA", dict(ima, recipe=recipe), "ima"))
        elif name.startswith("authors-") and name[len("authors-"):] in FACTORS:
            keys = FACTORS[name[len("authors-"):]]
            reverted = {k: RECIPES["printed"][k] for k in keys}
            variants.append(Variant(name, "nnUNetTrainerIMA",
                                    dict(ima, recipe="authors", **reverted), "ima"))
        elif name.startswith("printed+") and name[len("printed+"):] in FACTORS:
            keys = FACTORS[name[len("printed+"):]]
            added = {k: RECIPES["authors"][k] for k in keys}
            variants.append(Variant(name, "nnUNetTrainerIMA",
                                    dict(ima, recipe="printed", **added), "ima"))
        elif name in BASELINE_TRAINERS:
            # Adv's settings for another attack: the baselines differ from adv<eps> there only.
            for eps in budgets:
                variants.append(Variant(f"{name}{eps:g}", BASELINE_TRAINERS[name],
                                        dict(schedule, **attack, adv_eps=float(eps)),
                                        "baseline"))
        elif name in ("adv_max", "adv_max_constant_lr"):
            # Adv at IMA's largest margin; with the constant learning rate it is what the
            # authors' recipe trains once every margin has reached eps_max.
            constant = {"lr_schedule": "constant"} if name.endswith("_constant_lr") else {}
            variants.append(Variant(name, "nnUNetTrainerAdv",
                                    dict(schedule, **attack, adv_eps=float(options.eps_max),
                                         **constant), "adv"))
        elif name == "ima_authors_min":
            # A slice is correct only when every foreground class present reaches the threshold.
            # Over the present classes ("one"): with the authors' "zero" every slice lacking a
            # class would score 0, and on multi-class data nearly no slice would count correct.
            variants.append(Variant(name, "nnUNetTrainerIMA",
                                    dict(ima, recipe="authors", dice_reduce="min",
                                         dice_absent_class="one"), "ima"))
        elif name in FINETUNE_VARIANTS:
            start = _clean_checkpoint(options, seed, seed_folder, dataset_name)
            tuning = dict(schedule, num_epochs=options.finetune_epochs,
                          initial_lr=options.finetune_lr or options.initial_lr,
                          finetune_from=start, lr_warmup_epochs=FINETUNE_WARMUP_EPOCHS)
            trainer = FINETUNE_VARIANTS[name]
            if name == "ft_adv_max":
                # Adv at IMA's largest margin, from the same clean model: ft_ima's control.
                variants.append(Variant(name, trainer,
                                        dict(tuning, **attack, adv_eps=float(options.eps_max)),
                                        "finetune"))
            elif trainer == "nnUNetTrainerIMA":
                variants.append(Variant(name, trainer,
                                        dict(tuning, **attack, eps_max=options.eps_max,
                                             binary_steps=options.binary_steps,
                                             recipe="authors"), "ima"))
            else:
                for eps in budgets:
                    variants.append(Variant(f"{name}{eps:g}", trainer,
                                            dict(tuning, **attack, adv_eps=float(eps)),
                                            "finetune"))
        else:
            raise UserInputError(f"unknown variant {name!r}; known: clean, clean_half_lr, adv, "
                                 f"ima_printed, ima_authors, authors-<factor>, "
                                 f"printed+<factor> with factor in {sorted(FACTORS)}, and "
                                 f"{', '.join(EXTRA_VARIANTS)}")
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise UserInputError(f"variants repeat a model: {names}")
    for v in variants:  # every setting is checked before anything is trained
        settings_from_dict(v.settings, source=f"variant {v.name}")
    return variants


# fine-tuning variant -> its trainer; the ones other than IMA are one model per --baseline-eps.
FINETUNE_VARIANTS = {"ft_adv": "nnUNetTrainerAdv", "ft_adv_max": "nnUNetTrainerAdv",
                     "ft_trades": "nnUNetTrainerTRADES",
                     "ft_nfgsm": "nnUNetTrainerNFGSM", "ft_ima": "nnUNetTrainerIMA"}


def _check_variant_names(options: AblationOptions) -> None:
    """Refuse variant lists that would train a model twice or fine-tune a model not trained.

    Raises:
        UserInputError: naming the variants and the fix.
    """
    families = [family_and_budgets(entry, options) for entry in options.variants]
    chosen = {family for family, _ in families}
    built = {family: set() for family in chosen}
    for family, entry_budgets in families:
        built[family].update(entry_budgets or ())
    for name, twin in (("adv_max", "adv"), ("adv_max_constant_lr", "adv_constant_lr")):
        budgets = sorted(built["adv"]) if twin == "adv" and twin in chosen else \
            [float(e) for e in options.adv_eps]
        if name in chosen and twin in chosen and float(options.eps_max) in budgets:
            same = f"adv{options.eps_max:g}" + name[len("adv_max"):]
            raise UserInputError(
                f"variant {name} trains Adv at --eps-max {options.eps_max:g}, which variant "
                f"{twin} trains already as {same} (budgets {_shown(budgets)}): the "
                f"same model twice. Drop {name} from --variants, or {options.eps_max:g} from "
                f"--adv-eps")
    if {"ft_adv", "ft_adv_max"} <= chosen and float(options.eps_max) in built["ft_adv"]:
        raise UserInputError(
            f"variant ft_adv_max fine-tunes Adv at --eps-max {options.eps_max:g}, which variant "
            f"ft_adv trains already as ft_adv{options.eps_max:g} (budgets "
            f"{_shown(sorted(built['ft_adv']))}): the same model twice. Drop ft_adv_max from "
            f"--variants, or {options.eps_max:g} from --baseline-eps")
    tunings = sorted(entry for entry, (family, _) in zip(options.variants, families)
                     if family in FINETUNE_VARIANTS)
    if tunings and "clean" not in chosen:
        raise UserInputError(f"variants {', '.join(tunings)} fine-tune the clean model of their "
                             f"seed, which this run does not train: add clean to --variants")


def _clean_checkpoint(options: AblationOptions, seed: int, seed_folder: str,
                      dataset_name: Optional[str]) -> str:
    """The absolute path of the final checkpoint of the clean model of ``seed``: the start of
    that seed's fine-tunings."""
    clean = Variant("clean", "nnUNetTrainerClean", {"seed": seed}, "clean", seed_folder)
    folder = model_folder(options, clean, dataset_name or options.dataset)
    return os.path.abspath(final_checkpoint(folder, options.fold))


# ------------------------------------------------------------------------------- workdir
def seed_workdir(options: AblationOptions, variant: Variant) -> str:
    """The workdir of the variant's seed: the workdir for the evaluation seed, ``seed<s>/`` in
    it for the others."""
    return os.path.join(options.workdir, variant.seed_folder)


def results_root(options: AblationOptions, variant: Variant) -> str:
    """The ``nnUNet_results`` folder of one variant (each has its own: same trainer class)."""
    return os.path.join(seed_workdir(options, variant), "results", variant.name)


def model_folder(options: AblationOptions, variant: Variant, dataset_name: str) -> str:
    return os.path.join(results_root(options, variant), dataset_name,
                        f"{variant.trainer}__nnUNetPlans__2d")


def eval_folder(options: AblationOptions, variant: Variant, attack: str, cases: str) -> str:
    return os.path.join(seed_workdir(options, variant), "eval", cases, attack, variant.name)


CASE_SETS = ("test", "val")
# nnUNetv2_train's -device takes these names only (a GPU is chosen with CUDA_VISIBLE_DEVICES).
TRAINING_DEVICES = ("cpu", "cuda", "mps")


def check_values(options: AblationOptions) -> None:
    """Refuse option values that no experiment can run with (checks only; reads no files).

    Raises:
        UserInputError: naming the option, the value and what it takes.
    """
    try:
        validate_declared(options)
    except InvalidSetting as e:
        raise UserInputError(e.spelled(flag_name)) from None
    noise = list(options.noise)
    for option, values, known in (("--noise", noise, None), ("--cases", options.cases, CASE_SETS),
                                  ("--attacks", options.attacks, _attack_names()),
                                  ("--seeds", options.seeds, None),
                                  ("--baseline-eps", options.baseline_eps, None)):
        repeated = sorted({f"{v:g}" if isinstance(v, float) else str(v)
                           for v in values if list(values).count(v) > 1})
        if repeated:
            raise UserInputError(f"{option} names {', '.join(repeated)} more than once")
        unknown = [v for v in values if known is not None and v not in known]
        if unknown:
            raise UserInputError(f"{option}: unknown {', '.join(map(repr, unknown))}; choose "
                                 f"from {', '.join(known)}")
    if options.device not in TRAINING_DEVICES:
        gpu = options.device.split(":", 1)[1] if options.device.startswith("cuda:") else ""
        fix = (f"; choose the GPU with CUDA_VISIBLE_DEVICES={gpu} and --device cuda" if gpu
               else "")
        raise UserInputError(f"--device {options.device!r}: nnUNetv2_train takes "
                             f"{', '.join(TRAINING_DEVICES)}{fix}")
    from nnunet_ima.devices import resolve_device
    resolve_device(options.device)  # cuda on a machine without one
    if options.device == "mps":
        import torch
        if not torch.backends.mps.is_available():
            raise UserInputError("--device mps asked but no Apple GPU is available; use "
                                 "--device cpu")


def _attack_names() -> Sequence[str]:
    """The attacks ``nnunet-ima-eval --attack`` takes."""
    from nnunet_ima.evaluation.attacks import ATTACKS
    return tuple(ATTACKS) + ("ensemble",)


def check_dataset(options: AblationOptions, name: str) -> str:
    """The preprocessed folder of dataset ``name``, checked to be planned and preprocessed for
    2d and split so that ``options.fold`` trains on neither a test case nor a random split, and
    holding the case sets ``options.cases`` asks for.

    Raises:
        UserInputError: what is missing, and the command that makes it.
    """
    from nnunet_ima.nnunet.paths import preprocessed_dataset_folder
    from nnunet_ima.nnunet.splits import (SPLITS_FILENAME, TEST_CASES_FILENAME,
                                          fold_split_problem, read_test_cases)
    folder = preprocessed_dataset_folder(name)
    plans = os.path.join(folder, "nnUNetPlans.json")
    data = os.path.join(folder, "nnUNetPlans_2d")
    if not os.path.isfile(plans) or not os.path.isdir(data):
        raise UserInputError(f"{folder} has no 2d plans and data ({plans}, {data}): run "
                             f"nnUNetv2_plan_and_preprocess -d {options.dataset} -c 2d first")
    splits = os.path.join(folder, SPLITS_FILENAME)
    test_file = os.path.join(folder, TEST_CASES_FILENAME)
    if not os.path.isfile(splits):
        raise UserInputError(f"{splits} does not exist: split the dataset first, e.g. "
                             f"nnunet-ima split -d {options.dataset} --test 2")
    problem = fold_split_problem(folder, options.fold)
    if problem:
        raise UserInputError(f"--fold {options.fold}: {problem}")
    if "test" in options.cases:
        record = read_test_cases(test_file) if os.path.isfile(test_file) else {"test": []}
        if not record["test"]:
            raise UserInputError(f"--cases test: {test_file} holds no test cases; hold some out "
                                 f"with nnunet-ima split -d {options.dataset} --test N "
                                 f"--overwrite, or pass --cases val")
    return folder


def check_workdir(options: AblationOptions) -> None:
    """Refuse a workdir whose results were made with other options (reads, writes nothing)."""
    path = os.path.join(options.workdir, OPTIONS_FILENAME)
    if not os.path.isfile(path):
        return
    key = json.loads(json.dumps(options.resume_key()))  # as the file holds it
    recorded = read_json(path, "delete it, or use another --workdir")
    if not isinstance(recorded, dict):
        raise UserInputError(f"{path} is not a record of ablation options (found a "
                             f"{type(recorded).__name__}); delete it, or use another --workdir")
    changed = _differing(recorded, key)
    if changed:
        raise UserInputError(f"{options.workdir} holds an ablation made with other options "
                             f"(differing: {changed}); use another --workdir or the same "
                             f"options")


def _differing(recorded: dict, key: dict) -> List[str]:
    """The names whose values differ between a recorded resume key and ``key`` (both as JSON
    holds them). An option added after the record was written is missing from it: it differs
    only where its value is not its default (the value every earlier run had)."""
    defaults = json.loads(json.dumps({f.name: f.default for f in fields(AblationOptions)
                                      if f.name in key and f.default is not MISSING}))
    return sorted(k for k in set(recorded) | set(key)
                  if recorded.get(k, defaults.get(k)) != key.get(k))


def check_resources(options: AblationOptions, variants: List[Variant], dataset_name: str,
                    preprocessed_folder: str) -> None:
    """Refuse when the models still to train, and their evaluations, cannot fit on the
    workdir's disk, or ``options.jobs`` trainings side by side not in memory."""
    from nnunet_ima.nnunet import footprint
    from nnunet_ima.resources import check_disk, check_memory
    untrained = [v for v in variants if not os.path.isfile(
        final_checkpoint(model_folder(options, v, dataset_name), options.fold))]
    evaluations = len(variants) * len(options.attacks) * len(options.cases)
    if untrained:
        parameters = footprint.network_parameters(preprocessed_folder)
        needed = (len(untrained) * footprint.model_disk_bytes(parameters)
                  + evaluations * footprint.EVALUATION_BYTES)
        check_disk(options.workdir, needed,
                   f"training {len(untrained)} models ({parameters / 1e6:.1f} M parameters "
                   f"each) and {evaluations} evaluations",
                   "free some space, choose another --workdir or fewer --variants")
        jobs = min(options.jobs, len(untrained))
        check_memory(jobs * footprint.TRAINING_MEMORY_BYTES,
                     f"--jobs {options.jobs}: {jobs} trainings side by side",
                     "pass a smaller --jobs")
    else:
        check_disk(options.workdir, evaluations * footprint.EVALUATION_BYTES,
                   f"{evaluations} evaluations", "free some space or choose another --workdir")


def check_options(options: AblationOptions) -> None:
    """Refuse impossible option values and a workdir whose results were made with other
    options; record the options in the workdir otherwise."""
    check_values(options)
    check_workdir(options)
    record_options(options)


def record_options(options: AblationOptions) -> None:
    """Write the resume key into the workdir (after every check passed)."""
    path = os.path.join(options.workdir, OPTIONS_FILENAME)
    if not os.path.isfile(path):
        write_json(path, options.resume_key())


def train_all(options: AblationOptions, variants: List[Variant], dataset_name: str,
              env: Dict[str, str]) -> None:
    """Train every variant not trained yet, ``options.jobs`` at a time, each in its own
    ``nnUNet_results`` (:func:`results_root`): every other model first, then the fine-tunings,
    which start from the clean model of their seed.

    Raises:
        UserInputError: a training failed (the fine-tunings are not started then), or a clean
            model a fine-tuning starts from is missing after the first phase.
    """
    first = [v for v in variants if not v.finetunes]
    tunings = [v for v in variants if v.finetunes]
    _train(options, first, dataset_name, env)
    if not tunings:
        return
    missing = sorted({str(v.settings["finetune_from"]) for v in tunings
                      if not os.path.isfile(str(v.settings["finetune_from"]))})
    if missing:
        raise UserInputError(f"the fine-tunings start from {', '.join(missing)}, which the "
                             f"clean trainings did not leave; see {options.workdir}/logs and "
                             f"run the command again")
    _train(options, tunings, dataset_name, env)


def _train(options: AblationOptions, variants: List[Variant], dataset_name: str,
           env: Dict[str, str]) -> None:
    """One phase of :func:`train_all`: ``variants`` not trained yet, side by side."""
    commands = []
    threads = str(threads_per_job(options.jobs))
    for variant in variants:
        if os.path.isfile(final_checkpoint(model_folder(options, variant, dataset_name),
                                           options.fold)):
            print(f"{variant.label}: already trained", flush=True)
            continue
        root = results_root(options, variant)
        os.makedirs(root, exist_ok=True)
        commands.append(training_command(
            dataset_name, options.fold, variant.trainer, variant.settings,
            os.path.join(seed_workdir(options, variant), "configs", f"{variant.name}.json"),
            options.device, options.jobs,
            "_".join(["train", variant.name] + ([variant.seed_folder] if variant.seed_folder
                                                else [])),
            # continues a training an earlier run left unfinished
            resume=os.path.isdir(os.path.join(root, dataset_name)),
            env={"nnUNet_results": root, "OMP_NUM_THREADS": threads, "nnUNet_def_n_proc": "1"}))
    run_side_by_side(commands, os.path.join(options.workdir, "logs"), env, options.jobs)


def evaluation_options(options: AblationOptions, variant: Variant, attack: str, cases: str,
                       dataset_name: str) -> EvalOptions:
    """The evaluation of one (variant, attack, case set): the model by its folder, every noise
    level, ``options.eval_steps`` steps and the evaluation seed (whatever seed the model trained
    with: every model is scored on the same slices from the same starts); ``ensemble`` runs the
    default members with the gradient-masking checks, as ``nnunet-ima-eval --attack
    ensemble`` does."""
    from nnunet_ima.evaluation.ensemble import DEFAULT_ENSEMBLE
    from nnunet_ima.evaluation.options import EvalOptions
    from nnunet_ima.evaluation.robustness import AttackSettings
    ensemble = attack == "ensemble"
    members = {"ensemble": tuple(DEFAULT_ENSEMBLE), "masking_checks": True} if ensemble else {}
    return EvalOptions(
        output=eval_folder(options, variant, attack, cases),
        model_folders=(model_folder(options, variant, dataset_name),), folds=(options.fold,),
        cases=(cases,), max_slices=options.max_slices or None, noise=tuple(options.noise),
        attack=AttackSettings(attack="pgd" if ensemble else attack, steps=options.eval_steps,
                              seed=options.seed),
        device=options.device, progress=False, **members)


def evaluate_all(options: AblationOptions, variants: List[Variant], dataset_name: str) -> None:
    """Evaluate every (variant, attack, case set) not evaluated yet.

    The models are named by folder and the cases come from the user's ``nnUNet_preprocessed``
    (the dataset :func:`check_dataset` checked), so nothing of the environment is changed.
    """
    from nnunet_ima.evaluation.run import evaluate
    for cases in options.cases:
        for attack in options.attacks:
            for variant in variants:
                evaluation = evaluation_options(options, variant, attack, cases, dataset_name)
                if os.path.isfile(os.path.join(evaluation.output, "summary.json")):
                    continue
                print(f"\nevaluating {variant.label}: {attack}, {cases} cases, "
                      f"{options.eval_steps} steps -> {evaluation.output}", flush=True)
                try:
                    evaluate(evaluation)
                except UserInputError as e:
                    raise UserInputError(f"evaluating {variant.label} ({attack}, {cases} "
                                         f"cases): {e}") from None


# ---------------------------------------------------------------------------- results
@dataclass
class VariantResult:
    """One row of the ablation table (percent for Dice values)."""

    name: str
    kind: str
    clean_tvdi: float
    clean_adi: float
    tvdi: Dict[str, Dict[float, float]]  # attack -> noise -> TVDI
    adi: Dict[str, Dict[float, float]]
    worst_tvdi: Dict[float, float]        # noise -> min over the attacks
    worst_adi: Dict[float, float]
    auc_tvdi: float
    auc_adi: float
    adv_weight: float
    margin_mean: float
    adv_eps: Optional[float] = None
    # The last epoch's fraction of training slices whose margin reached eps_max (IMA only).
    margin_saturated: float = float("nan")
    # Seconds per training epoch (its validation included), from checkpoint_final.pth.
    seconds_per_epoch: float = float("nan")


def _read_summary(path: str) -> dict:
    with open(path) as f:
        summary = json.load(f)
    (model,) = summary["models"].values()
    return {float(level): values for level, values in model["noise"].items()}


def training_statistics(fold: str) -> Dict[str, float]:
    """Mean adversarial weight over the epochs, the final mean margin and the final fraction of
    saturated margins (NaN in a file written before that column existed), from
    ``ima_stats.csv``."""
    path = os.path.join(fold, STATS_FILENAME)
    if not os.path.isfile(path):
        return {"adv_weight": 0.0, "margin_mean": float("nan"),
                "margin_saturated": float("nan")}
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))

    def column(name: str) -> List[float]:
        return [float(r[name]) for r in rows if r.get(name) not in (None, "")]
    weights, margins, saturated = (column(n) for n in ("adv_weight", "margin_mean",
                                                       "margin_saturated"))
    return {"adv_weight": float(np.mean(weights)) if weights else float("nan"),
            "margin_mean": margins[-1] if margins else float("nan"),
            "margin_saturated": saturated[-1] if saturated else float("nan")}


def seconds_per_epoch(checkpoint: str) -> float:
    """Mean seconds per epoch (training and validation) of the training that left
    ``checkpoint``, from the epoch start and end times nnU-Net's logger keeps in it; NaN where
    there is no checkpoint or no finished epoch."""
    if not os.path.isfile(checkpoint):
        return float("nan")
    import torch  # the options and the table need no torch; only this reading does
    logging = torch.load(checkpoint, map_location="cpu", weights_only=False).get("logging", {})
    durations = [end - start for start, end in zip(logging.get("epoch_start_timestamps", ()),
                                                   logging.get("epoch_end_timestamps", ()))]
    return float(np.mean(durations)) if durations else float("nan")


def collect_results(options: AblationOptions, variants: List[Variant], dataset_name: str,
                    cases: str) -> List[VariantResult]:
    """The table rows of one case set, one per variant: the worst case over the attacks is taken
    per noise level, then every number is averaged over the variant's seeds."""
    return [_mean_over_seeds([_seed_result(options, v, dataset_name, cases) for v in runs])
            for runs in by_name(variants).values()]


def by_name(variants: Sequence[Variant]) -> Dict[str, List[Variant]]:
    """The variants grouped by name (one per seed, in seed order), in the order of the first
    seed."""
    groups: Dict[str, List[Variant]] = {}
    for variant in variants:
        groups.setdefault(variant.name, []).append(variant)
    return groups


def _seed_result(options: AblationOptions, variant: Variant, dataset_name: str,
                 cases: str) -> VariantResult:
    tvdi: Dict[str, Dict[float, float]] = {}
    adi: Dict[str, Dict[float, float]] = {}
    for attack in options.attacks:
        levels = _read_summary(os.path.join(eval_folder(options, variant, attack, cases),
                                            "summary.json"))
        tvdi[attack] = {n: 100 * v["tvdi"] for n, v in levels.items()}
        adi[attack] = {n: 100 * v["adi"] for n, v in levels.items()}
    noise = sorted(options.noise)
    worst_tvdi = {n: min(tvdi[a][n] for a in options.attacks) for n in noise}
    worst_adi = {n: min(adi[a][n] for a in options.attacks) for n in noise}
    folder = model_folder(options, variant, dataset_name)
    stats = training_statistics(os.path.join(folder, f"fold_{options.fold}"))
    ima = variant.trainer == "nnUNetTrainerIMA"  # the models with margins
    return VariantResult(
        name=variant.name, kind=variant.kind, clean_tvdi=worst_tvdi[noise[0]],
        clean_adi=worst_adi[noise[0]], tvdi=tvdi, adi=adi, worst_tvdi=worst_tvdi,
        worst_adi=worst_adi,
        auc_tvdi=robustness_auc(noise, [worst_tvdi[n] for n in noise]),
        auc_adi=robustness_auc(noise, [worst_adi[n] for n in noise]),
        adv_weight=stats["adv_weight"] if variant.kind != "clean" else 0.0,
        margin_mean=stats["margin_mean"] if ima else float("nan"),
        adv_eps=float(variant.settings["adv_eps"]) if "adv_eps" in variant.settings else None,
        margin_saturated=stats["margin_saturated"] if ima else float("nan"),
        seconds_per_epoch=seconds_per_epoch(final_checkpoint(folder, options.fold)))


def _mean_over_seeds(results: List[VariantResult]) -> VariantResult:
    """One row of the seeds' rows: every number (and every number of a dict) averaged; one
    seed's row is returned as it is."""
    if len(results) == 1:
        return results[0]

    def mean(values: list):
        if isinstance(values[0], dict):
            return {k: mean([v[k] for v in values]) for k in values[0]}
        if isinstance(values[0], float):
            return float(np.mean(values))
        return values[0]  # the name, the kind, the budget: the same for every seed
    return VariantResult(**{f.name: mean([getattr(r, f.name) for r in results])
                            for f in fields(VariantResult)})


# ------------------------------------------------------------------------- statistics
def slice_counts(folder: str) -> Dict[float, NoiseResult]:
    """Per noise level, the per-slice counts behind the TVDI of the evaluation in ``folder``:
    the attack's parts (``parts/*.npz``, where the evaluator keeps them), or for an ensemble
    the per-slice choice of members whose pooled TVDI is the lowest, as its headline TVDI
    takes it. ``per_slice.csv`` has per-class Dice only, not the counts that TVDI pools.

    Raises:
        UserInputError: a part is missing, naming it and the fix.
    """
    from nnunet_ima.evaluation.ensemble import SINGLE, combine
    from nnunet_ima.evaluation.report import load_part, part_path
    summary = read_json(os.path.join(folder, "summary.json"),
                        f"delete {folder} to evaluate again")
    ((model, entry),) = summary["models"].items()
    members = tuple(summary.get("ensemble", {}).get("members") or SINGLE)
    counts = {}
    for key in entry["noise"]:
        noise = float(key)
        # noise 0 is one clean pass, kept as the first member's part
        paths = {m: part_path(folder, model, noise, m) for m in members[:1 if noise == 0 else None]}
        missing = [path for path in paths.values() if not os.path.isfile(path)]
        if missing:
            raise UserInputError(f"{missing[0]} is missing: the intervals need the per-slice "
                                 f"counts of every evaluation; delete {folder} to evaluate "
                                 f"again")
        counts[noise] = combine({m: load_part(path) for m, path in paths.items()}, {},
                                {}).worst_tvdi
    return counts


@dataclass
class RowStatistics:
    """Clean TVDI and TVDI AUC (%) of one variant with their intervals
    (:class:`~nnunet_ima.statistics.Estimate`), their values per seed, their paired
    differences against the reference Adv model (``None`` for it, and where there is none), and
    the models of :data:`DOMINATING_KINDS` that dominate it within the intervals
    (:func:`~nnunet_ima.statistics.dominates` on clean TVDI and TVDI AUC), in table order."""

    clean_tvdi: Estimate
    auc_tvdi: Estimate
    per_seed: Dict[int, Dict[str, float]]
    clean_difference: Optional[Estimate] = None
    auc_difference: Optional[Estimate] = None
    dominated_by: List[str] = field(default_factory=list)


@dataclass
class CaseSetStatistics:
    """The intervals of one case set: per variant, and what they were computed on."""

    rows: Dict[str, RowStatistics]
    # the Adv model with the best mean TVDI AUC (the best fine-tuned Adv where none trained from
    # scratch: reference_candidates)
    reference: Optional[str]
    cases: int
    slices: int
    draws: int
    seeds: Tuple[int, ...]


def _scores(options: AblationOptions, counts: Dict[str, Dict[float, NoiseResult]],
            weights: np.ndarray) -> np.ndarray:
    """``(2, R)`` clean TVDI and TVDI AUC (%) of one model under each of the ``R`` rows of
    ``weights``: per attack and noise level the TVDI of the pooled counts, the worst over the
    attacks per level, then the AUC over the levels, as the table takes them."""
    noise = sorted(options.noise)
    worst = 100 * np.min([[tvdi_draws(c[n].tp, c[n].fp, c[n].fn, weights) for n in noise]
                          for c in counts.values()], axis=0)                     # (L, R)
    return np.stack([worst[0], [robustness_auc(noise, column) for column in worst.T]])


def reference_candidates(groups: Dict[str, List[Variant]]) -> List[str]:
    """The models the paired differences may be taken against: vanilla Adv trained from scratch
    (kind "adv"), or where there is none, vanilla Adv fine-tuned from the clean model (an
    experiment of fine-tunings only compares like with like)."""
    adv = [name for name, runs in groups.items() if runs[0].kind == "adv"]
    return adv or [name for name, runs in groups.items()
                   if runs[0].trainer == "nnUNetTrainerAdv" and runs[0].finetunes]


def collect_statistics(options: AblationOptions, variants: List[Variant],
                       cases: str) -> CaseSetStatistics:
    """The intervals of one case set (see :mod:`nnunet_ima.statistics`): every model of every
    seed is scored on the same bootstrap draws of the slices (``options.bootstrap`` of them,
    from a generator seeded with ``options.seed``), so that the differences are paired; and,
    for every model, the models of :data:`DOMINATING_KINDS` that dominate it within those
    intervals.

    Raises:
        UserInputError: an evaluation was made on other slices than the others.
    """
    groups = by_name(variants)
    counts = {(v.name, v.seed): {a: slice_counts(eval_folder(options, v, a, cases))
                                 for a in options.attacks} for v in variants}
    first = next(iter(next(iter(counts.values())).values()))[0.0]
    keys = list(zip(first.cases, first.slices))
    for v in variants:
        for attack, by_noise in counts[(v.name, v.seed)].items():
            if any(list(zip(r.cases, r.slices)) != keys for r in by_noise.values()):
                raise UserInputError(
                    f"{eval_folder(options, v, attack, cases)} was evaluated on other slices "
                    f"than {eval_folder(options, variants[0], options.attacks[0], cases)}, so "
                    f"the models cannot be compared slice by slice; delete it to evaluate it "
                    f"again")
    draws = case_slice_draws(first.cases, options.bootstrap,
                             np.random.default_rng(options.seed))
    # The first row scores every slice once: the values of the table itself.
    weights = np.vstack([np.ones((1, len(keys)), dtype=draws.dtype), draws])
    scores = {name: np.stack([_scores(options, counts[(v.name, v.seed)], weights) for v in runs])
              for name, runs in groups.items()}                                # (S, 2, 1 + R)
    rows = {name: RowStatistics(
        clean_tvdi=estimate(s[:, 0, 0], s[:, 0, 1:]), auc_tvdi=estimate(s[:, 1, 0], s[:, 1, 1:]),
        per_seed={v.seed: {"clean_tvdi": float(s[i, 0, 0]), "auc_tvdi": float(s[i, 1, 0])}
                  for i, v in enumerate(groups[name])})
        for name, s in scores.items()}
    adv = reference_candidates(groups)
    reference = max(adv, key=lambda name: rows[name].auc_tvdi.mean) if adv else None
    if reference is not None:
        base = scores[reference]
        for name, s in scores.items():
            if name != reference:
                rows[name].clean_difference = paired_difference(s[:, 0, 0], s[:, 0, 1:],
                                                                base[:, 0, 0], base[:, 0, 1:])
                rows[name].auc_difference = paired_difference(s[:, 1, 0], s[:, 1, 1:],
                                                              base[:, 1, 0], base[:, 1, 1:])
    # Every row, of every kind, against every model that is no IMA reading: whether a baseline
    # beats an IMA reading, and whether Adv beats a baseline, on the same seeds and draws.
    dominating = [name for name, runs in groups.items() if runs[0].kind in DOMINATING_KINDS]
    for name, s in scores.items():
        rows[name].dominated_by = [b for b in dominating if b != name and dominates(
            scores[b][:, :, 0], scores[b][:, :, 1:], s[:, :, 0], s[:, :, 1:])]
    return CaseSetStatistics(rows, reference, len(set(first.cases)), len(keys),
                             options.bootstrap, options.training_seeds)


def dominated_by(row: VariantResult, others: Sequence[VariantResult]) -> List[str]:
    """Names of the ``others`` at least as good on clean TVDI and TVDI AUC, better on one."""
    return [o.name for o in others
            if o.clean_tvdi >= row.clean_tvdi and o.auc_tvdi >= row.auc_tvdi
            and (o.clean_tvdi > row.clean_tvdi or o.auc_tvdi > row.auc_tvdi)]


def _fmt(value: float, digits: int = 2) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f"{value:.{digits}f}"


def markdown_table(rows: List[VariantResult], options: AblationOptions, cases: str) -> str:
    """One row per model: clean TVDI / ADI, worst-case TVDI per noise level, the AUCs, the mean
    adversarial weight, the final mean margin and share of saturated margins (IMA), the
    seconds per training epoch and the Adv models (kind "adv") that dominate it."""
    noise = sorted(options.noise)[1:]
    adv = [r for r in rows if r.kind == "adv"]
    header = (["model", "clean TVDI", "clean ADI"] + [f"TVDI@{n:g}" for n in noise]
              + ["TVDI AUC", "ADI AUC", "adv weight", "mean margin", "saturated %", "s/epoch",
                 "dominated by (Adv)"])
    lines = [f"Ablation on `{options.dataset}`, {cases} cases: worst case over "
             f"{' and '.join(a.upper() for a in options.attacks)} ({options.eval_steps} steps, "
             f"L2) per noise level; Dice in %; AUC = area under the TVDI (ADI) curve over noise "
             f"{', '.join(f'{n:g}' for n in sorted(options.noise))} / largest noise. "
             f"saturated %: IMA's training slices whose margin reached eps_max in the last "
             f"epoch. s/epoch: seconds per training epoch (validation included), comparable only "
             f"between models trained one at a time (--jobs 1): trainings side by side share "
             f"the cores and run slower.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        beaten = dominated_by(r, adv) if r.kind != "adv" else []
        lines.append("| " + " | ".join(
            [r.name, _fmt(r.clean_tvdi), _fmt(r.clean_adi)]
            + [_fmt(r.worst_tvdi[n]) for n in noise]
            + [_fmt(r.auc_tvdi), _fmt(r.auc_adi), _fmt(r.adv_weight, 3), _fmt(r.margin_mean),
               _fmt(100 * r.margin_saturated, 1), _fmt(r.seconds_per_epoch, 1),
               ", ".join(beaten) if beaten else ("none" if r.kind != "adv" else "")]) + " |")
    return "\n".join(lines) + "\n"


def _interval(e: Estimate, sign: str = "") -> str:
    """``mean [low, high]``, then ``seeds [low, high]`` where there are several seeds."""
    text = f"{e.mean:{sign}.2f} [{e.low:{sign}.2f}, {e.high:{sign}.2f}]"
    if not math.isnan(e.seed_low):
        text += f" seeds [{e.seed_low:{sign}.2f}, {e.seed_high:{sign}.2f}]"
    return text


def _difference(e: Optional[Estimate]) -> str:
    if e is None:
        return "reference"
    return _interval(e, "+") + (" *" if e.excludes_zero else "")


def interval_table(statistics: CaseSetStatistics, options: AblationOptions, cases: str) -> str:
    """One row per model: clean TVDI and TVDI AUC with their intervals, where there is an Adv
    model their paired differences against the best of them (``*`` where the intervals exclude
    0), and the models that dominate it within the intervals."""
    seeds = statistics.seeds
    several = len(seeds) > 1
    header = ["model", "clean TVDI", "TVDI AUC"]
    reference = statistics.reference
    if reference is not None:
        header += [f"clean TVDI - {reference}", f"TVDI AUC - {reference}"]
    caption = (f"Intervals on `{options.dataset}`, {cases} cases: the mean over "
               f"{len(seeds)} seed{'s' * several} ({' '.join(map(str, seeds))}) [95 % bootstrap "
               f"interval over the {statistics.cases} cases and their {statistics.slices} slices: "
               f"{statistics.draws} draws of cases, then of slices within each drawn case, the "
               f"same for every model]")
    if several:
        caption += "; seeds [95 % t interval over the seeds]"
    if reference is not None:
        caption += (f". Differences are paired against {reference}, the Adv model with the best "
                    f"TVDI AUC: the same seed, the same slices and the same draws; * where "
                    f"{'both intervals exclude' if several else 'the interval excludes'} 0.")
    else:
        caption += ". No Adv model to compare with."
    header.append("dominated by (within intervals)")
    caption += (" Dominated by (within intervals): the clean, Adv, baseline and fine-tuned models "
                "whose mean is at least this model's on clean TVDI and on TVDI AUC, and whose "
                "paired difference from it lies above 0 on at least one of the two (its "
                f"bootstrap interval{' and its seeds interval' * several}); IMA readings are "
                "never named here.")
    lines = [caption, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, row in statistics.rows.items():
        cells = [name, _interval(row.clean_tvdi), _interval(row.auc_tvdi)]
        if reference is not None:
            cells += [_difference(row.clean_difference), _difference(row.auc_difference)]
        cells.append(", ".join(row.dominated_by) or "none")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def draw_front(rows: List[VariantResult], path: str, title: str,
               statistics: Optional[CaseSetStatistics] = None) -> None:
    """Clean TVDI against TVDI AUC, one point per model, the Adv budgets joined as a front;
    with ``statistics``, each point's bootstrap intervals as error bars."""
    from nnunet_ima.plotting import pyplot, save_figure
    fig, ax = pyplot().subplots(figsize=(7, 5))
    adv = sorted((r for r in rows if r.kind == "adv"), key=lambda r: r.adv_eps)
    if adv:
        ax.plot([r.clean_tvdi for r in adv], [r.auc_tvdi for r in adv], "-o", color="tab:orange",
                label="Adv (budgets joined)")
    colours = {"clean": "tab:gray", "ima": "tab:blue", "adv": "tab:orange",
               "baseline": "tab:green", "finetune": "tab:purple"}
    for r in rows:
        if r.kind != "adv":
            ax.scatter(r.clean_tvdi, r.auc_tvdi, color=colours[r.kind], zorder=3)
        if statistics is not None:
            clean, auc = statistics.rows[r.name].clean_tvdi, statistics.rows[r.name].auc_tvdi
            ax.errorbar(r.clean_tvdi, r.auc_tvdi, xerr=[[r.clean_tvdi - clean.low],
                                                        [clean.high - r.clean_tvdi]],
                        yerr=[[r.auc_tvdi - auc.low], [auc.high - r.auc_tvdi]], fmt="none",
                        ecolor=colours[r.kind], alpha=0.5, capsize=2, zorder=2)
        ax.annotate(r.name, (r.clean_tvdi, r.auc_tvdi), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    ax.scatter([], [], color="tab:blue", label="IMA variants")
    ax.scatter([], [], color="tab:gray", label="clean")
    present = {r.kind for r in rows}
    for kind, label in (("baseline", "TRADES / N-FGSM"), ("finetune", "fine-tuned from clean")):
        if kind in present:
            ax.scatter([], [], color=colours[kind], label=label)
    ax.set_xlabel("clean TVDI (%)")
    ax.set_ylabel("TVDI AUC under attack (%)")
    if statistics is not None:
        title += (f"\nbars: 95 % bootstrap intervals over {statistics.cases} cases, "
                  f"{statistics.slices} slices" + (f", mean of {len(statistics.seeds)} seeds"
                                                   if len(statistics.seeds) > 1 else ""))
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def write_report(options: AblationOptions, variants: List[Variant], dataset_name: str) -> str:
    """Write ``ablation.md`` / ``ablation.json`` / ``ablation[_<cases>].png``; returns the tables
    (per case set, the means and then their intervals)."""
    tables = []
    everything = {}
    for cases in options.cases:
        rows = collect_results(options, variants, dataset_name, cases)
        statistics = collect_statistics(options, variants, cases)
        tables.append(markdown_table(rows, options, cases) + "\n"
                      + interval_table(statistics, options, cases))
        suffix = "" if len(options.cases) == 1 else f"_{cases}"
        draw_front(rows, os.path.join(options.workdir, PICTURE_FILENAME.replace(
            ".png", f"{suffix}.png")), f"{dataset_name}, {cases} cases: clean vs robust TVDI",
            statistics)
        everything[cases] = [{**asdict(r),
                              "settings": next(v.settings for v in variants if v.name == r.name),
                              "statistics": asdict(statistics.rows[r.name]),
                              "reference": statistics.reference}
                             for r in rows]
    text = "\n".join(tables)
    write_text(os.path.join(options.workdir, TABLE_FILENAME), text)
    write_json(os.path.join(options.workdir, RESULTS_FILENAME),
               {"options": asdict(options), "dataset_name": dataset_name, "cases": everything})
    return text


def check_inputs(options: AblationOptions) -> Tuple[str, List[Variant]]:
    """Every check of the experiment, made before anything is written or trained: the option
    values, the variants and their settings, the dataset (planned, split, the fold and case
    sets there), the workdir's earlier options, and the disk and memory the trainings need.

    Returns:
        The dataset's name and the variants.
    """
    from nnunet_ima.nnunet.paths import dataset_name, require_folder
    check_values(options)
    build_variants(options)  # the variants and their settings, before any folder is looked up
    require_folder("nnUNet_preprocessed")  # named before the dataset is looked up in it
    name = dataset_name(options.dataset)
    variants = build_variants(options, name)  # the fine-tunings name the clean models' folders
    folder = check_dataset(options, name)
    check_workdir(options)
    check_resources(options, variants, name, folder)
    return name, variants


def training_environment() -> Dict[str, str]:
    """This process's environment for the trainings: nnU-Net finds this package's trainers
    (``nnUNet_extTrainer``) whether or not the user exported it, and each training gets its own
    ``NNUNET_IMA_CONFIG``."""
    from nnunet_ima.nnunet.paths import trainer_dir
    env = dict(os.environ, nnUNet_extTrainer=trainer_dir())
    env.pop("NNUNET_IMA_CONFIG", None)
    return env


def run_ablation(options: AblationOptions, stop_after: str = "report") -> str:
    """Train, evaluate and report (each step skipped where already done); returns the tables.

    Every input is checked first (:func:`check_inputs`): a bad one is refused before the first
    model trains, not after the last.
    """
    name, variants = check_inputs(options)
    record_options(options)
    train_all(options, variants, name, training_environment())
    if stop_after == "train":
        return ""
    evaluate_all(options, variants, name)
    return write_report(options, variants, name)
