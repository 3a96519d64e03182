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
    nnunet-ima-eval -d 2 -tr nnUNetTrainerAdv nnUNetTrainerIMA --preset sea --norm linf \\
        --noise 0 0.1 0.2 -o robustness_heart_sea        # SEA's protocol; also quick, standard, rse

nnU-Net's spellings ``-device``, ``-chk checkpoint_best.pth`` and ``-f`` with several folds
work too; each fold is one model (``nnUNetTrainerIMA_fold1``). A case that a model's fold
trained on is refused (:mod:`.training_cases`) unless ``--allow-train-cases``, and then the
tables say so.

Outputs in ``-o OUT``: ``summary.json``, ``per_slice.csv``, ``tvdi.md``, ``adi.md``,
``size_breakdown.csv`` and ``.md`` (Dice per class and object size, :mod:`.objects`),
``curves.png``, ``examples.png``, and ``parts/`` (one file per finished (model, noise level),
each with the record of what produced it: a rerun with the same arguments resumes from the
parts whose record is its own and recomputes the others). While it runs, an evaluation holds
``OUT/nnunet-ima-eval.lock``; a second evaluation into the same ``OUT`` is refused.

Several processes (:mod:`.sharding`; docs/multi_gpu.md)::

    torchrun --nproc_per_node 4 -m nnunet_ima.evaluation.cli -d 2 -tr nnUNetTrainerIMA -o OUT
    nnunet-ima-eval -d 2 -tr nnUNetTrainerIMA --nproc 4 -o OUT      # the same, started for you
    nnunet-ima-eval -d 2 -tr nnUNetTrainerIMA -o OUT \\
        --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT         # one task of a SLURM array
    nnunet-ima-eval merge OUT                                        # after the last task

Under torchrun every rank computes its shard of the (model, noise level, member, batch) units
on ``cuda:LOCAL_RANK`` and rank 0 writes the tables; ``--shard i/n`` computes one shard into
``OUT/shards/<i>-of-<n>`` and writes no tables, which ``merge`` then writes from all the shards:
the same files one process writes.

This module only parses the command line: its options are built from the declarations of
:class:`.options.EvalOptions`, :class:`.robustness.AttackSettings` and
:class:`.masking.MaskingSettings` (help, default, type, choices), ``EvalOptions`` checks the
values, and :func:`.run.evaluate` does the work.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from typing import List, Optional, Sequence

from nnunet_ima import installed_version
from nnunet_ima.declared import InvalidSetting, add_option, declaration, option_arguments
from nnunet_ima.devices import add_device_argument
from nnunet_ima.errors import UserInputError, run_command
from nnunet_ima.help_format import DefaultsHelpFormatter

from nnunet_ima.evaluation.ensemble import DEFAULT_ENSEMBLE, PRESETS
from nnunet_ima.evaluation.masking import MaskingSettings
from nnunet_ima.evaluation.models import checkpoint_choice
from nnunet_ima.evaluation.options import EvalOptions, option_name
from nnunet_ima.evaluation.report import print_tables
from nnunet_ima.evaluation.robustness import AttackSettings
from nnunet_ima.evaluation.run import (evaluate, evaluate_distributed, evaluate_shard, merge,
                                       shard_summary)
from nnunet_ima.evaluation.sharding import parse_shard, torchrun_launch
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
        description="Attack trained nnU-Net models (2D slices, or whole volumes of 3d_fullres / "
                    "3d_lowres) with PGD (or SegPGD, APGD) at several noise "
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
    # --attack, --ensemble, --steps and --restarts default to None here (their declared
    # default is filled in by options_from_args), so that one given next to --preset, which
    # sets them, is refused even at its default value.
    add_option(attack, EvalOptions, "preset", metavar="PRESET")
    add_option(attack, AttackSettings, "attack", choices=declared_attack["choices"] + ("ensemble",),
               default=None,
               help=declared_attack["help"] + "; ensemble: every --ensemble member in turn, the "
                                              "headline being the per-slice worst case (default: "
                                              f"{declared_attack['default']}; with --preset: "
                                              "ensemble)")
    add_option(attack, EvalOptions, "ensemble", default=None, metavar="MEMBER",
               help=declaration(EvalOptions, "ensemble").help
               + f" (default: {' '.join(DEFAULT_ENSEMBLE)})")
    add_option(attack, AttackSettings, "norm")
    add_option(attack, AttackSettings, "steps", default=None,
               help=declaration(AttackSettings, "steps").help
               + f" (default: {option_arguments(AttackSettings, 'steps')['default']}, or the "
                 f"--preset's)")
    add_option(attack, AttackSettings, "restarts", default=None,
               help=declaration(AttackSettings, "restarts").help
               + f" (default: {option_arguments(AttackSettings, 'restarts')['default']})")
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
    minimal = p.add_argument_group("minimal noise (after the attacks, every sample)")
    minimal.add_argument("--minimal-noise", action="store_true",
                         help=declaration(EvalOptions, "minimal_noise").help)
    add_option(minimal, EvalOptions, "dice_threshold", metavar="DICE")
    add_option(minimal, EvalOptions, "minimal_noise_steps", metavar="STEPS")
    inference = p.add_argument_group("inference path")
    add_option(inference, EvalOptions, "inference")
    add_option(inference, EvalOptions, "tile_step_size")
    inference.add_argument("--disable-tta", action="store_true",
                           help="predictor: no mirroring, as nnUNetv2_predict --disable_tta")
    add_option(inference, EvalOptions, "tiles_per_pass")
    inference.add_argument("--gradient-checkpointing", action="store_true",
                           help=declaration(EvalOptions, "gradient_checkpointing").help)
    add_option(p, EvalOptions, "size_bins", metavar="VOXELS")
    add_option(p, AttackSettings, "batch_size")
    add_device_argument(p, "-device", "--device")
    add_option(p, AttackSettings, "seed")
    p.add_argument("-o", "--output", required=True,
                   help="output folder (created if missing; a rerun resumes in it; one "
                        "evaluation at a time)")
    p.add_argument("--overwrite", action="store_true",
                   help="discard results in OUTPUT made with other settings")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    several = p.add_argument_group(
        "several processes (docs/multi_gpu.md); `nnunet-ima-eval merge OUT` merges shards")
    several.add_argument("--shard", type=_argument_type(parse_shard), metavar="I/N",
                         help="compute only shard I of N (0 <= I < N) of the (model, noise, "
                              "member, batch) units into OUTPUT/shards/I-of-N, and no tables; "
                              "once all N are done, `nnunet-ima-eval merge OUTPUT` writes them "
                              "(under torchrun every rank is a shard by itself)")
    several.add_argument("--shard-wait", type=float, default=0.0, metavar="SECONDS",
                         help="--shard with --attack ensemble: how long a shard waits for the "
                              "other shards' results of a member before the next member (whose "
                              "samples depend on them); then it stops and a rerun continues")
    several.add_argument("--nproc", type=int, default=1, metavar="N",
                         help="run N processes on this machine through torchrun (one GPU each "
                              "with --device cuda) and merge their results")
    p.add_argument("--version", action="version", version=f"%(prog)s {installed_version()}")
    return p


def build_merge_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nnunet-ima-eval merge",
        description="Merge the shards of an evaluation (run with --shard I/N -o OUTPUT): check "
                    "that every shard ran the same settings and finished, then write the tables, "
                    "summary.json, per_slice.csv and figures one process would write.",
        formatter_class=DefaultsHelpFormatter)
    p.add_argument("output", metavar="OUTPUT", help="the -o of the shards")
    p.add_argument("-device", "--device", dest="device",
                   help="torch device for loading the models and the gradient-masking checks "
                        "(default: the shards' where this machine has it, else cuda when "
                        "available, else cpu)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace results of other settings in OUTPUT (the shards' own results "
                        "are never mixed with them)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def options_from_args(args: argparse.Namespace) -> EvalOptions:
    """The :class:`EvalOptions` of a parsed command line.

    Raises:
        UserInputError: a bad value, named by its option (``EvalOptions`` checks them all).
    """
    if args.preset is not None:
        _refuse_preset_conflicts(args)
    ensemble = args.attack == "ensemble" or args.preset is not None
    declared = AttackSettings()
    try:
        attack = AttackSettings(attack="pgd" if ensemble else (args.attack or declared.attack),
                                norm=args.norm,
                                steps=declared.steps if args.steps is None else args.steps,
                                alpha=args.alpha, random_start=not args.no_random_start,
                                loss=args.attack_loss, batch_size=args.batch_size,
                                seed=args.seed,
                                restarts=declared.restarts if args.restarts is None
                                else args.restarts)
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
        attack=attack, preset=args.preset,
        ensemble=tuple(DEFAULT_ENSEMBLE if args.ensemble is None else args.ensemble)
        if ensemble and args.preset is None else (),
        masking_checks=args.masking_checks == "on" or (args.masking_checks == "auto" and ensemble),
        minimal_noise=args.minimal_noise, dice_threshold=args.dice_threshold,
        minimal_noise_steps=args.minimal_noise_steps,
        masking=masking, inference=args.inference, tile_step_size=args.tile_step_size,
        disable_tta=args.disable_tta, tiles_per_pass=args.tiles_per_pass,
        gradient_checkpointing=args.gradient_checkpointing, size_bins=tuple(args.size_bins),
        device=args.device, overwrite=args.overwrite,
        progress=not args.no_progress)


def _refuse_preset_conflicts(args: argparse.Namespace) -> None:
    """``UserInputError`` for an option that ``--preset`` sets, given on the command line with
    it (even at its default: the preset would silently override it)."""
    given = [(f"--attack {args.attack}", "the attack (an ensemble)")
             if args.attack not in (None, "ensemble") else None,
             ("--ensemble " + " ".join(args.ensemble), "the members")
             if args.ensemble is not None else None,
             (f"--steps {args.steps}", "the steps") if args.steps is not None else None,
             (f"--restarts {args.restarts}", "the restarts") if args.restarts is not None else None,
             ("--no-random-start", "the random start") if args.no_random_start else None]
    for option, what in filter(None, given):
        preset = PRESETS[args.preset]
        raise UserInputError(
            f"--preset {args.preset} with {option}: the preset sets {what} (members "
            f"{' '.join(preset.members)}, {preset.steps} steps, random start, "
            f"{preset.restarts} restart{'s' if preset.restarts != 1 else ''}); drop "
            f"{option.split()[0]}, or drop --preset and choose members and settings with "
            f"--attack ensemble --ensemble")


def _evaluate_and_print(args: argparse.Namespace) -> int:
    options = options_from_args(args)
    if args.shard_wait < 0:
        raise UserInputError(f"--shard-wait must be >= 0 seconds, got {args.shard_wait:g}")
    launch = torchrun_launch()
    if launch is not None:
        if args.shard is not None:
            raise UserInputError(f"--shard {args.shard} under torchrun: torchrun already makes "
                                 f"each rank a shard (RANK/WORLD_SIZE); drop --shard")
        if evaluate_distributed(options, launch) is not None:
            print_tables(options.output)
        return 0
    if args.shard is not None:
        report = evaluate_shard(options, args.shard, wait=args.shard_wait)
        print(shard_summary(report, options.output), flush=True)
        return 0
    evaluate(options)
    print_tables(options.output)
    return 0


def _merge_and_print(args: argparse.Namespace) -> int:
    merge(args.output, device=args.device, progress=not args.no_progress,
          overwrite=args.overwrite)
    print_tables(args.output)
    return 0


def _without_nproc(argv: Sequence[str]) -> List[str]:
    """``argv`` without ``--nproc N`` (or ``--nproc=N``)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            kept.append(arg)
    return kept


def _relaunch(argv: Sequence[str], nproc: int) -> int:
    """This command again in ``nproc`` processes of this machine, through torchrun
    (``torch.distributed.run --standalone``: a free port of its own); torchrun's exit code."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
               "--nproc_per_node", str(nproc), "-m", "nnunet_ima.evaluation.cli",
               *_without_nproc(argv)]
    print("running python " + " ".join(command[1:]), flush=True)
    return subprocess.call(command)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Bad input: one message, exit code 2; Ctrl-C: exit code 130, and the same command resumes
    from the finished (model, noise) parts. ``merge OUTPUT`` merges the shards in OUTPUT."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["merge"]:
        merge_args = build_merge_parser().parse_args(argv[1:])
        return run_command("nnunet-ima-eval merge", lambda: _merge_and_print(merge_args))
    args = build_parser().parse_args(argv)
    if args.nproc < 1:
        build_parser().error(f"--nproc must be >= 1, got {args.nproc}")
    if args.nproc > 1 and torchrun_launch() is None:
        if args.shard is not None:
            build_parser().error("--nproc and --shard: --nproc makes its processes the shards; "
                                 "drop --shard")
        return _relaunch(argv, args.nproc)
    return run_command("nnunet-ima-eval", lambda: _evaluate_and_print(args))


if __name__ == "__main__":
    sys.exit(main())
