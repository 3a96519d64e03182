"""``nnunet-ima demo``: the whole product on a small built-in dataset, on a CPU, in minutes.

It runs the same commands a user runs on a real dataset, printing each one:

1. ``nnunet-ima make-synthetic`` (a synthetic nnU-Net raw dataset: an organ and a lesion in
   small 3D volumes; ``--dataset-folder`` takes any nnU-Net raw dataset instead),
2. ``nnUNetv2_plan_and_preprocess -c 2d``,
3. ``nnunet-ima split`` (held-out test cases),
4. ``nnUNetv2_train ... -tr nnUNetTrainerClean / nnUNetTrainerAdv / nnUNetTrainerIMA`` with a
   short schedule written to an ``NNUNET_IMA_CONFIG`` file,
5. ``nnunet-ima-eval`` on the three models, which prints the TVDI and ADI tables.

Everything lives under ``--workdir`` (its own ``nnUNet_raw/preprocessed/results``); a finished
step is skipped when the demo is run again.
"""
from __future__ import annotations

import argparse
import os
import shutil
import time
from typing import Dict

from nnunet_ima.errors import UserInputError
from nnunet_ima.nnunet.experiment import TRAINERS, Experiment
from nnunet_ima.nnunet.pipeline import Command, console_script

DATASET_ID = 990
DATASET_NAME = f"Dataset{DATASET_ID}_SyntheticOrgan"


def demo_settings(epochs: int, iterations: int) -> Dict[str, dict]:
    """The short training schedule of each trainer (the paper's settings, scaled down).

    Budgets are L2 norms over a 48 x 48 z-scored slice: eps 8 is a per-pixel RMS of 8 / 48 =
    0.17 standard deviations, eps 16 of 0.33. They are the ablation's on this data (README,
    "Which IMA"): Adv at the middle budget 8, IMA with eps_max 16 and its default (authors')
    recipe; at noise 16 the undefended model loses about half of its Dice.
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


def run(args: argparse.Namespace) -> int:
    if args.epochs < 1 or args.iterations < 1 or args.cases < 4:
        raise UserInputError("--epochs and --iterations must be >= 1 and --cases >= 4")
    if any(n < 0 for n in args.noise):
        raise UserInputError(f"noise levels must be >= 0, got {args.noise}")
    if args.fresh and os.path.isdir(args.workdir):
        shutil.rmtree(args.workdir)
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
    eval_args = ["-d", str(DATASET_ID), "-c", "2d", "-f", "0", "-tr", *TRAINERS,
                 "--noise", *[f"{n:g}" for n in args.noise], "--steps", str(args.eval_steps),
                 "--max-slices", str(args.max_slices), "--device", "cpu", "-o", out]
    code = experiment.evaluate(eval_args)
    if code:
        return code
    print(f"\nDemo finished in {(time.time() - start) / 60:.1f} min. Results: {out}/ "
          f"(summary.json, tvdi.md, adi.md, curves.png, examples.png)")
    return 0
