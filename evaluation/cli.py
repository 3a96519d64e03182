"""``nnunet-ima-eval``: TVDI and ADI of trained nnU-Net models under 100-step PGD (or SegPGD,
APGD, or the worst case of an attack ensemble), on the network or on nnU-Net's predictor.

Examples::

    nnunet-ima-eval -d 2 -c 2d -f 0 -tr nnUNetTrainer nnUNetTrainerAdv_eps15 nnUNetTrainerIMA \\
        --noise 0 5 15 25 -o robustness_heart
    nnunet-ima-eval -m $nnUNet_results/Dataset002_Heart/nnUNetTrainerIMA__nnUNetPlans__2d \\
        --images imagesTs --labels labelsTs -o robustness_heart_ts
    nnunet-ima-eval -d 2 -tr nnUNetTrainerIMA --attack apgd -o robustness_heart_apgd
    nnunet-ima-eval -d 2 -tr nnUNetTrainerAdv nnUNetTrainerIMA --attack ensemble \\
        --inference predictor -o robustness_heart_worst_case
    nnunet-ima-eval -d 2 -tr nnUNetTrainerIMA -f 0 1 2 3 4 -chk checkpoint_best.pth -device cuda \\
        -o robustness_heart_folds

nnU-Net's spellings ``-device``, ``-chk checkpoint_best.pth`` and ``-f`` with several folds
work too; each fold is one model (``nnUNetTrainerIMA_fold1``). A case that a model's fold
trained on is refused (:mod:`.training_cases`) unless ``--allow-train-cases``, and then the
tables say so.

Outputs in ``-o OUT``: ``summary.json``, ``per_slice.csv``, ``tvdi.md``, ``adi.md``,
``curves.png``, ``examples.png``, and ``parts/`` (one file per finished (model, noise level),
each with the record of what produced it: a rerun with the same arguments resumes from the
parts whose record is its own and recomputes the others). While it runs, an evaluation holds
``OUT/nnunet-ima-eval.lock``; a second evaluation into the same ``OUT`` is refused.

This module only parses the command line: its options are built from the declarations of
:class:`.options.EvalOptions`, :class:`.robustness.AttackSettings` and
:class:`.masking.MaskingSettings` (help, default, type, choices), ``EvalOptions`` checks the
values, and :func:`.run.evaluate` does the work.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from nnunet_ima import installed_version
from nnunet_ima.declared import InvalidSetting, add_option, option_arguments
from nnunet_ima.devices import add_device_argument
from nnunet_ima.errors import UserInputError, run_command
from nnunet_ima.help_format import DefaultsHelpFormatter

from nnunet_ima.evaluation.ensemble import DEFAULT_ENSEMBLE
from nnunet_ima.evaluation.masking import MaskingSettings
from nnunet_ima.evaluation.models import checkpoint_choice
from nnunet_ima.evaluation.options import EvalOptions, option_name
from nnunet_ima.evaluation.report import print_tables
from nnunet_ima.evaluation.robustness import AttackSettings
from nnunet_ima.evaluation.run import evaluate
from nnunet_ima.evaluation.training_cases import parse_fold


def _argument_type(parse):
    """An argparse ``type`` from a parser raising ``ValueError``, keeping its message."""
    def convert(text: str):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    convert.__name__ = parse.__name__
    return convert


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nnunet-ima-eval",
        description="Attack trained nnU-Net 2D models with PGD (or SegPGD, APGD) at several noise "
                    "levels and report TVDI / ADI tables (Total Voxel Dice Index, Average Dice "
                    "Index).",
        formatter_class=DefaultsHelpFormatter)
    models = p.add_argument_group("models (nnU-Net names, or folders with -m)")
    add_option(models, EvalOptions, "dataset", "-d", "--dataset")
    add_option(models, EvalOptions, "trainers", "-tr", "--trainers")
    add_option(models, EvalOptions, "plans", "-p", "--plans")
    add_option(models, EvalOptions, "configuration", "-c", "--configuration")
    models.add_argument("-m", "--model-folders", nargs="+", metavar="FOLDER",
                        help="model folders (.../Trainer__Plans__2d) instead of -d/-tr/-p/-c")
    # Single-dash spellings are nnU-Net's (nnUNetv2_predict); declared so that argparse does not
    # read -device as -d evice or -chk as -c hk.
    add_option(models, EvalOptions, "folds", "-f", "--fold", dest="fold",
               type=_argument_type(parse_fold), metavar="FOLD")
    add_option(models, EvalOptions, "checkpoint", "-chk", "--checkpoint", choices=None,
               type=_argument_type(checkpoint_choice))
    data = p.add_argument_group("test slices")
    data.add_argument("--cases", nargs="+", metavar="CASE",
                      help="'test' (test_cases.json of `nnunet-ima split`), 'val' (the fold's "
                           "validation cases) and/or case identifiers, e.g. --cases test val; "
                           "default: 'test' when test_cases.json exists, else 'val'")
    data.add_argument("--allow-train-cases", action="store_true",
                      help="score cases that the model's fold trained on (refused otherwise); the "
                           "tables then name them")
    data.add_argument("--images", help="raw test images folder (imagesTs), preprocessed with the "
                                       "model's plans; needs --labels")
    data.add_argument("--labels", help="raw test labels folder (labelsTs)")
    data.add_argument("--include-empty", action="store_true",
                      help="also evaluate slices without foreground in the ground truth")
    data.add_argument("--max-slices", type=int, help="evaluate at most this many slices (seeded)")
    attack = p.add_argument_group("attack")
    add_option(attack, EvalOptions, "noise")
    declared_attack = option_arguments(AttackSettings, "attack")
    add_option(attack, AttackSettings, "attack", choices=declared_attack["choices"] + ("ensemble",),
               help=declared_attack["help"] + "; ensemble: every --ensemble member in turn, the "
                                              "headline being the per-slice worst case")
    add_option(attack, EvalOptions, "ensemble", default=list(DEFAULT_ENSEMBLE), metavar="MEMBER")
    add_option(attack, AttackSettings, "norm")
    add_option(attack, AttackSettings, "steps")
    add_option(attack, AttackSettings, "alpha")
    attack.add_argument("--no-random-start", action="store_true",
                        help="all attacks: start at the input instead of a seeded random point "
                             "of the ball")
    add_option(attack, AttackSettings, "loss", option_name("loss"), dest="attack_loss")
    checks = p.add_argument_group("gradient-masking checks (after the attacks, on a few slices)")
    checks.add_argument("--masking-checks", default="auto", choices=("auto", "on", "off"),
                        help="a score-based black-box attack, TVDI monotone in noise, and an "
                             "unbounded attack; a check that fires is printed and footnoted in "
                             "the tables. auto: on with --attack ensemble")
    add_option(checks, MaskingSettings, "slices", option_name("slices"), dest="masking_slices")
    add_option(checks, MaskingSettings, "queries", option_name("queries"),
               dest="masking_queries")
    inference = p.add_argument_group("inference path")
    add_option(inference, EvalOptions, "inference")
    add_option(inference, EvalOptions, "tile_step_size")
    inference.add_argument("--disable-tta", action="store_true",
                           help="predictor: no mirroring, as nnUNetv2_predict --disable_tta")
    add_option(p, AttackSettings, "batch_size")
    add_device_argument(p, "-device", "--device")
    add_option(p, AttackSettings, "seed")
    p.add_argument("-o", "--output", required=True,
                   help="output folder (created if missing; a rerun resumes in it; one "
                        "evaluation at a time)")
    p.add_argument("--overwrite", action="store_true",
                   help="discard results in OUTPUT made with other settings")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--version", action="version", version=f"%(prog)s {installed_version()}")
    return p


def options_from_args(args: argparse.Namespace) -> EvalOptions:
    """The :class:`EvalOptions` of a parsed command line.

    Raises:
        UserInputError: a bad value, named by its option (``EvalOptions`` checks them all).
    """
    ensemble = args.attack == "ensemble"
    try:
        attack = AttackSettings(attack="pgd" if ensemble else args.attack, norm=args.norm,
                                steps=args.steps, alpha=args.alpha,
                                random_start=not args.no_random_start, loss=args.attack_loss,
                                batch_size=args.batch_size, seed=args.seed)
        masking = MaskingSettings(slices=args.masking_slices, queries=args.masking_queries)
    except InvalidSetting as e:
        raise UserInputError(e.spelled(option_name)) from None
    return EvalOptions(
        output=args.output, dataset=args.dataset, trainers=tuple(args.trainers),
        plans=args.plans, configuration=args.configuration,
        model_folders=tuple(args.model_folders or ()), folds=tuple(args.fold),
        checkpoint=args.checkpoint, cases=tuple(args.cases or ()),
        allow_train_cases=args.allow_train_cases, images=args.images, labels=args.labels,
        include_empty=args.include_empty, max_slices=args.max_slices, noise=tuple(args.noise),
        attack=attack, ensemble=tuple(args.ensemble) if ensemble else (),
        masking_checks=args.masking_checks == "on" or (args.masking_checks == "auto" and ensemble),
        masking=masking, inference=args.inference, tile_step_size=args.tile_step_size,
        disable_tta=args.disable_tta, device=args.device, overwrite=args.overwrite,
        progress=not args.no_progress)


def _evaluate_and_print(args: argparse.Namespace) -> int:
    options = options_from_args(args)
    evaluate(options)
    print_tables(options.output)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Bad input: one message, exit code 2; Ctrl-C: exit code 130, and the same command resumes
    from the finished (model, noise) parts."""
    args = build_parser().parse_args(argv)
    return run_command("nnunet-ima-eval", lambda: _evaluate_and_print(args))


if __name__ == "__main__":
    sys.exit(main())
