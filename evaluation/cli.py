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

This module parses and checks the command line; :func:`.run.evaluate` does the work, on the
:class:`.options.EvalOptions` built here.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from nnunet_ima import installed_version
from nnunet_ima.devices import add_device_argument, resolve_device
from nnunet_ima.errors import UserInputError, run_command
from nnunet_ima.help_format import DefaultsHelpFormatter

from nnunet_ima.norms import NORMS

from nnunet_ima.evaluation.attacks import ATTACKS
from nnunet_ima.evaluation.ensemble import DEFAULT_ENSEMBLE, MEMBERS
from nnunet_ima.evaluation.masking import DEFAULT_QUERIES, DEFAULT_SLICES, MaskingSettings
from nnunet_ima.evaluation.models import checkpoint_choice
from nnunet_ima.evaluation.options import DEFAULT_NOISE, INFERENCE_PATHS, EvalOptions
from nnunet_ima.evaluation.robustness import ATTACK_LOSSES, LEVEL_BATCHING, AttackSettings
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
    models.add_argument("-d", "--dataset", help="dataset id or name, e.g. 2 or Dataset002_Heart")
    models.add_argument("-tr", "--trainers", nargs="+", default=["nnUNetTrainer"],
                        help="trainer names; one model per trainer")
    models.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier")
    models.add_argument("-c", "--configuration", default="2d", help="nnU-Net configuration")
    models.add_argument("-m", "--model-folders", nargs="+", metavar="FOLDER",
                        help="model folders (.../Trainer__Plans__2d) instead of -d/-tr/-p/-c")
    # Single-dash spellings are nnU-Net's (nnUNetv2_predict); declared so that argparse does not
    # read -device as -d evice or -chk as -c hk.
    models.add_argument("-f", "--fold", nargs="+", type=_argument_type(parse_fold), default=[0],
                        metavar="FOLD",
                        help="folds (numbers and/or 'all'); with several, each fold is one model, "
                             "named TRAINER_foldK")
    models.add_argument("-chk", "--checkpoint", default="final",
                        type=_argument_type(checkpoint_choice),
                        help="final, best or latest, or nnU-Net's file name "
                             "(checkpoint_best.pth, ...)")
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
    attack.add_argument("--noise", type=float, nargs="+", default=list(DEFAULT_NOISE),
                        help="noise levels (0 = clean), in z-score units")
    attack.add_argument("--attack", default="pgd", choices=ATTACKS + ("ensemble",),
                        help="pgd: projected gradient ascent with a fixed step; segpgd: SegPGD "
                             "(Gu et al. 2022), PGD on a CE that shifts weight from correctly to "
                             "wrongly classified pixels over the steps; apgd: Auto-PGD (Croce & "
                             "Hein 2020), momentum and a per-slice step size halved when the loss "
                             "stalls, keeping each slice's highest-loss iterate; apgd_sea: APGD "
                             "at radii 2, 1.5, 1 x noise keeping the lowest-Dice iterate (SEA, "
                             "Croce et al. 2024); ensemble: every --ensemble member in turn, "
                             "the headline being the per-slice worst case")
    attack.add_argument("--ensemble", nargs="+", default=list(DEFAULT_ENSEMBLE),
                        choices=list(MEMBERS), metavar="MEMBER",
                        help=f"members of --attack ensemble, in order ({', '.join(MEMBERS)}); "
                             f"apgd-* use SEA's losses and shrinking radius")
    attack.add_argument("--norm", default="l2", choices=NORMS, help="all attacks")
    attack.add_argument("--steps", type=int, default=100,
                        help="iterations (gradient steps) of every attack")
    attack.add_argument("--alpha", type=float, default=5.0,
                        help="pgd, segpgd: each step is alpha * noise / steps (apgd adapts its "
                             "own step, starting at 2 * noise)")
    attack.add_argument("--no-random-start", action="store_true",
                        help="all attacks: start at the input instead of a seeded random point "
                             "of the ball")
    attack.add_argument("--attack-loss", default="dc_ce", choices=ATTACK_LOSSES,
                        help="pgd, apgd, apgd_sea: loss maximised, nnU-Net's Dice + CE, CE, or "
                             "SEA's masked CE, class-balanced masked CE, Jensen-Shannon (segpgd "
                             "maximises its own weighted CE; ensemble members bring their own)")
    checks = p.add_argument_group("gradient-masking checks (after the attacks, on a few slices)")
    checks.add_argument("--masking-checks", default="auto", choices=("auto", "on", "off"),
                        help="a score-based black-box attack, TVDI monotone in noise, and an "
                             "unbounded attack; a check that fires is printed and footnoted in "
                             "the tables. auto: on with --attack ensemble")
    checks.add_argument("--masking-slices", type=int, default=DEFAULT_SLICES,
                        help="slices of the black-box and unbounded checks (seeded draw)")
    checks.add_argument("--masking-queries", type=int, default=DEFAULT_QUERIES,
                        help="forward passes of the black-box random search per slice")
    inference = p.add_argument_group("inference path")
    inference.add_argument("--inference", default="network", choices=INFERENCE_PATHS,
                           help="network: the 2D network on whole slices (padded to its "
                                "stride); predictor: what nnUNetv2_predict computes, nnU-Net's "
                                "sliding-window tiles with Gaussian weights and mirroring, "
                                "differentiated end to end (nnU-Net finds this package's "
                                "trainers in nnUNet_extTrainer; unset, the evaluator sets it)")
    inference.add_argument("--tile-step-size", type=float, default=0.5,
                           help="predictor: nnUNetv2_predict's -step_size")
    inference.add_argument("--disable-tta", action="store_true",
                           help="predictor: no mirroring, as nnUNetv2_predict --disable_tta")
    p.add_argument("--batch-size", type=int, default=16, help="slices per attack batch")
    p.add_argument("--level-batching", default="auto", choices=LEVEL_BATCHING,
                   help="attack a batch with fewer slices than --batch-size at several noise "
                        "levels at once (up to slices x levels = --batch-size); the counts are "
                        "those of one level at a time. auto: on GPUs only (CPUs gain nothing)")
    add_device_argument(p, "-device", "--device")
    p.add_argument("--seed", type=int, default=0,
                   help="random starts of the attacks and the --max-slices draw")
    p.add_argument("-o", "--output", required=True,
                   help="output folder (created if missing; a rerun resumes in it; one "
                        "evaluation at a time)")
    p.add_argument("--overwrite", action="store_true",
                   help="discard results in OUTPUT made with other settings")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--version", action="version", version=f"%(prog)s {installed_version()}")
    return p


def _check_args(args: argparse.Namespace) -> None:
    bad = [n for n in args.noise if not (n >= 0) or n != n or n == float("inf")]
    if bad:
        raise UserInputError(f"noise levels must be finite and >= 0, got {bad}")
    if args.steps < 1:
        raise UserInputError(f"--steps must be >= 1, got {args.steps}")
    if not args.alpha > 0:
        raise UserInputError(f"--alpha must be > 0, got {args.alpha}")
    if args.batch_size < 1:
        raise UserInputError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_slices is not None and args.max_slices < 1:
        raise UserInputError(f"--max-slices must be >= 1, got {args.max_slices}")
    for flag, value in (("--masking-slices", args.masking_slices),
                        ("--masking-queries", args.masking_queries)):
        if value < 1:
            raise UserInputError(f"{flag} must be >= 1, got {value}")
    if len(set(args.ensemble)) != len(args.ensemble):
        raise UserInputError(f"--ensemble names a member more than once: {args.ensemble}")
    if not 0 < args.tile_step_size <= 1:
        raise UserInputError(f"--tile-step-size must lie in (0, 1], got {args.tile_step_size}")
    if bool(args.images) != bool(args.labels):
        raise UserInputError("--images and --labels go together (labels are needed for Dice)")
    resolve_device(args.device)
    if not args.model_folders and not args.dataset:
        raise UserInputError("name the models: -d DATASET -tr TRAINER ... or -m FOLDER ...")
    if args.model_folders and args.dataset:
        raise UserInputError("name the models either by -d/-tr/-p/-c or by -m FOLDER, not both")
    repeated = sorted({str(f) for f in args.fold if args.fold.count(f) > 1})
    if repeated:
        raise UserInputError(f"-f names fold {', '.join(repeated)} more than once")
    if args.images and args.cases and set(args.cases) & {"test", "val"}:
        raise UserInputError("--cases test/val select preprocessed cases; with --images give case "
                             "identifiers of the images folder, or no --cases for all of them")


def options_from_args(args: argparse.Namespace) -> EvalOptions:
    """The :class:`EvalOptions` of a parsed (and checked) command line."""
    ensemble = args.attack == "ensemble"
    attack = AttackSettings(attack="pgd" if ensemble else args.attack, norm=args.norm,
                            steps=args.steps,
                            alpha=args.alpha, random_start=not args.no_random_start,
                            loss=args.attack_loss, batch_size=args.batch_size, seed=args.seed,
                            level_batching=args.level_batching)
    return EvalOptions(
        output=args.output, dataset=args.dataset, trainers=tuple(args.trainers),
        plans=args.plans, configuration=args.configuration,
        model_folders=tuple(args.model_folders or ()), folds=tuple(args.fold),
        checkpoint=args.checkpoint, cases=tuple(args.cases or ()),
        allow_train_cases=args.allow_train_cases, images=args.images, labels=args.labels,
        include_empty=args.include_empty, max_slices=args.max_slices, noise=tuple(args.noise),
        attack=attack, ensemble=tuple(args.ensemble) if ensemble else (),
        masking_checks=args.masking_checks == "on" or (args.masking_checks == "auto" and ensemble),
        masking=MaskingSettings(slices=args.masking_slices, queries=args.masking_queries),
        inference=args.inference, tile_step_size=args.tile_step_size,
        disable_tta=args.disable_tta, device=args.device, overwrite=args.overwrite,
        progress=not args.no_progress)


def _evaluate_and_print(args: argparse.Namespace) -> int:
    _check_args(args)
    evaluate(options_from_args(args))
    for metric in ("tvdi", "adi"):
        with open(os.path.join(args.output, f"{metric}.md")) as f:
            print("\n" + f.read(), end="")
    print(f"\nresults in {os.path.abspath(args.output)}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Bad input: one message, exit code 2; Ctrl-C: exit code 130, and the same command resumes
    from the finished (model, noise) parts."""
    args = build_parser().parse_args(argv)
    return run_command("nnunet-ima-eval", lambda: _evaluate_and_print(args))


if __name__ == "__main__":
    sys.exit(main())
