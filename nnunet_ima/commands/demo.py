"""``nnunet-ima demo``: the whole product on a small built-in dataset, on a CPU, in minutes.

It runs the same commands a user runs on a real dataset, printing each one:

1. ``nnunet-ima make-synthetic`` (a synthetic nnU-Net raw dataset: an organ and a lesion in
   small 3D volumes),
2. ``nnUNetv2_plan_and_preprocess -c 2d``,
3. ``nnunet-ima split`` (held-out test cases),
4. ``nnUNetv2_train ... -tr nnUNetTrainerClean / nnUNetTrainerAdv / nnUNetTrainerIMA`` with a
   short schedule written to an ``NNUNET_IMA_CONFIG`` file,
5. the evaluation of ``nnunet-ima-eval`` on the three models, called as a library
   (``evaluate(EvalOptions(...))``), which prints the TVDI and ADI tables.

Everything lives under ``--workdir`` (its own ``nnUNet_raw/preprocessed/results``); a finished
step is skipped when the demo is run again with the same options (``demo_options.json`` records
them; other options are refused rather than mixed with the earlier models). Every option, and
the memory and disk the demo needs, is checked before the first step.
"""
from __future__ import annotations

import argparse
import fnmatch
import math
import os
import shutil
import time
from typing import Dict

from nnunet_ima.errors import UserInputError
from nnunet_ima.io import read_json, write_json
from nnunet_ima.nnunet import footprint
from nnunet_ima.nnunet.experiment import NNUNET_FOLDERS, TRAINERS, Experiment
from nnunet_ima.nnunet.pipeline import Command, console_script
from nnunet_ima.nnunet.synthetic import FILE_BYTES_PER_VOXEL
from nnunet_ima.resources import check_disk, check_memory

DATASET_ID = 990
DATASET_NAME = f"Dataset{DATASET_ID}_SyntheticOrgan"
SHAPE = (16, 48, 48)  # make-synthetic's default, which the demo uses
TEST_CASES = 2  # held out by the demo's `nnunet-ima split --test 2`
OPTIONS_FILENAME = "demo_options.json"
# The options the demo's results depend on (the rest only change how it runs).
RESULT_OPTIONS = ("epochs", "iterations", "cases", "noise", "eval_steps", "max_slices")
# What a demo workdir holds: --fresh deletes a folder only when it holds nothing else.
DEMO_ENTRIES = (*NNUNET_FOLDERS, "logs", "robustness", OPTIONS_FILENAME, "nnUNetTrainer*.json")
# The demo's 2d network (counted from the plans nnU-Net makes for its data: the same for any
# --cases, every case having the same shape).
DEMO_PARAMETERS = 1_928_489
# nnU-Net's preprocessed copy of a case, per voxel: 6.8 bytes measured (float32 data, the
# segmentation, gt_segmentations), rounded up.
PREPROCESSED_BYTES_PER_VOXEL = 10


def demo_settings(epochs: int, iterations: int) -> Dict[str, dict]:
    """The short training schedule of each trainer (the paper's settings, scaled down).

    Budgets are L2 norms over a 48 x 48 z-scored slice: eps 8 is a per-pixel RMS of 8 / 48 =
    0.17 standard deviations, eps 16 of 0.33. They are the ablation's on this data
    (docs/benchmarks.md, "Which IMA"): Adv at the middle budget 8, IMA with eps_max 16 and its
    default (authors') recipe; at noise 16 the undefended model loses about half of its Dice.
    """
    # One seed for all three: the same initial network and the same first batches. Twice
    # nnU-Net's learning rate: with 0.01, 100 iterations often end before the small lesion
    # class is found at all.
    schedule = {"num_epochs": epochs, "num_iterations_per_epoch": iterations,
                "num_val_iterations_per_epoch": 2, "seed": 0, "initial_lr": 0.02}
    attack = {"pgd_steps": 5, "pgd_alpha": 4.0}
    return {
        "nnUNetTrainerClean": dict(schedule),
        "nnUNetTrainerAdv": dict(schedule, **attack, adv_eps=8.0),
        "nnUNetTrainerIMA": dict(schedule, **attack, eps_max=16.0, binary_steps=5),
    }


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default="nnunet_ima_demo",
                        help="folder for the demo's nnU-Net folders and results "
                             "(default ./nnunet_ima_demo)")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs (default 10)")
    parser.add_argument("--iterations", type=int, default=10,
                        help="training iterations per epoch (default 10)")
    parser.add_argument("--cases", type=int, default=10, help="synthetic cases (default 10)")
    parser.add_argument("--noise", type=float, nargs="+", default=[0.0, 4.0, 8.0, 16.0],
                        help="L2 noise levels of the evaluation (default 0 4 8 16)")
    parser.add_argument("--eval-steps", type=int, default=100,
                        help="PGD steps of the evaluation (default 100, as in the paper)")
    parser.add_argument("--max-slices", type=int, default=12,
                        help="test slices evaluated per model (default 12)")
    parser.add_argument("--verbose", action="store_true",
                        help="show the output of nnU-Net's commands instead of writing logs")
    parser.add_argument("--fresh", action="store_true", help="delete WORKDIR first")


def check_values(args: argparse.Namespace) -> None:
    """Refuse option values the demo cannot run with (reads and writes nothing)."""
    for option, value, minimum in (("--epochs", args.epochs, 1),
                                   ("--iterations", args.iterations, 1),
                                   ("--cases", args.cases, TEST_CASES + 2),
                                   ("--eval-steps", args.eval_steps, 1),
                                   ("--max-slices", args.max_slices, 1)):
        if value < minimum:
            why = (f" ({TEST_CASES} test cases, and a training and a validation case)"
                   if option == "--cases" else "")
            raise UserInputError(f"{option} must be >= {minimum}{why}, got {value}")
    shown = " ".join(f"{n:g}" for n in args.noise)
    if not all(math.isfinite(n) and n >= 0 for n in args.noise):
        raise UserInputError(f"--noise levels must be finite and >= 0, got {shown}")
    if len(set(args.noise)) != len(args.noise):
        raise UserInputError(f"--noise names a level more than once: {shown}")


def result_options(args: argparse.Namespace) -> dict:
    """The options recorded in ``demo_options.json`` (as JSON reads them back)."""
    return {name: list(map(float, args.noise)) if name == "noise" else getattr(args, name)
            for name in RESULT_OPTIONS}


def check_workdir(args: argparse.Namespace) -> None:
    """Refuse ``--fresh`` on a folder that is not the demo's (it would be deleted), and a demo
    folder made with other options (its models and tables would be reused for these)."""
    workdir = args.workdir
    if not os.path.isdir(workdir):
        return
    if args.fresh:
        foreign = sorted(e for e in os.listdir(workdir)
                         if not any(fnmatch.fnmatch(e, p) for p in DEMO_ENTRIES))
        if foreign:
            raise UserInputError(f"--fresh deletes --workdir {workdir}, but it holds "
                                 f"{', '.join(foreign[:5])}{' ...' * (len(foreign) > 5)}, "
                                 f"which the demo did not write; give the demo's own folder or "
                                 f"another --workdir")
        return
    path = os.path.join(workdir, OPTIONS_FILENAME)
    if os.path.isfile(path):
        recorded = read_json(path, "pass --fresh to start over")
        wanted = result_options(args)
        if recorded != wanted:
            changed = ["--" + k.replace("_", "-") for k in wanted
                       if not isinstance(recorded, dict) or recorded.get(k) != wanted[k]]
            raise UserInputError(f"--workdir {workdir} holds a demo made with other options "
                                 f"(differing: {', '.join(changed)}); "
                                 f"rerun with the same options, pass --fresh to start over, "
                                 f"or choose another --workdir")


def check_resources(args: argparse.Namespace) -> None:
    """Refuse when the demo's dataset, models and tables cannot fit on the disk, or one
    training not in memory (a case of the demo's shape takes a few MB to make)."""
    workdir = os.path.abspath(args.workdir)
    make_dataset = args.fresh or not os.path.isdir(os.path.join(workdir, "nnUNet_raw",
                                                                DATASET_NAME))
    voxels = math.prod(SHAPE) * args.cases
    untrained = [t for t in TRAINERS if args.fresh or not os.path.isfile(os.path.join(
        workdir, "nnUNet_results", DATASET_NAME, f"{t}__nnUNetPlans__2d", "fold_0",
        "checkpoint_final.pth"))]
    needed = ((voxels * (FILE_BYTES_PER_VOXEL + PREPROCESSED_BYTES_PER_VOXEL) if make_dataset
               else 0)
              + len(untrained) * footprint.model_disk_bytes(DEMO_PARAMETERS)
              + footprint.EVALUATION_BYTES)
    check_disk(workdir, needed, f"the demo ({args.cases} cases, {len(untrained)} models to "
                                f"train)", "free some space or choose another --workdir")
    if untrained:
        check_memory(footprint.TRAINING_MEMORY_BYTES, "one nnUNetv2_train of the demo",
                     "close other programs or run the demo on a larger machine")


def run(args: argparse.Namespace) -> int:
    check_values(args)
    check_workdir(args)
    check_resources(args)
    if args.fresh and os.path.isdir(args.workdir):
        shutil.rmtree(args.workdir)
    write_json(os.path.join(args.workdir, OPTIONS_FILENAME), result_options(args))
    start = time.time()
    experiment = Experiment(args.workdir, show_output=args.verbose)
    print(f"nnunet-ima demo in {experiment.workdir}")

    raw_dataset = os.path.join(experiment.folders["nnUNet_raw"], DATASET_NAME)
    if not os.path.isdir(raw_dataset):
        experiment.run(Command([console_script("nnunet-ima"), "make-synthetic", "-d",
                                str(DATASET_ID), "--cases", str(args.cases)], "make-synthetic"))
    if not experiment.preprocessed(DATASET_NAME):
        experiment.run(experiment.plan_and_preprocess_command(
            DATASET_ID, log_name="nnUNetv2_plan_and_preprocess"))
    experiment.run(Command([console_script("nnunet-ima"), "split", "-d", str(DATASET_ID),
                            "--test", "2", "--seed", "0"], "split"))

    settings = demo_settings(args.epochs, args.iterations)
    # One at a time: the CPU's cores go to one training.
    for command in experiment.training_commands(DATASET_ID, DATASET_NAME, settings, "cpu"):
        experiment.run(command)

    out = os.path.join(experiment.workdir, "robustness")
    experiment.evaluate(evaluation_options(args, out))
    print(f"\nDemo finished in {(time.time() - start) / 60:.1f} min. Results: {out}/ "
          f"(summary.json, tvdi.md, adi.md, curves.png, examples.png)")
    return 0


def evaluation_options(args: argparse.Namespace, out: str) -> "EvalOptions":
    """The demo's evaluation: fold 0 of the three trainers, on the CPU, into ``out`` (the
    experiment passes its own nnU-Net folders)."""
    from nnunet_ima.evaluation.options import EvalOptions
    from nnunet_ima.evaluation.robustness import AttackSettings
    return EvalOptions(output=out, dataset=DATASET_NAME, trainers=tuple(TRAINERS), folds=(0,),
                       noise=tuple(args.noise), attack=AttackSettings(steps=args.eval_steps),
                       max_slices=args.max_slices, device="cpu")
